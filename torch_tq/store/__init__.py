"""Where matrices live: the engine and catalog, file and memory backends, consumer groups.

Nothing here knows Flight, the client or the server."""
