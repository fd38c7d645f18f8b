"""The client side: ``Client``, the transports under it, and the safetensors export and import
built on it."""
