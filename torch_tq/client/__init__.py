"""The client side: ``Client`` and the transports under it."""
