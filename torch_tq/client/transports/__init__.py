"""How matrices move between a client and its server, one module per transport.

Each transport implements :class:`~torch_tq.client.transports.base.Transport`; the router
(:mod:`torch_tq.client.routing`) picks one per process and holds the fallback policy.
gRPC (:mod:`.grpc`) is always there and carries every control call; :mod:`.same_host` and
:mod:`.ucx` are the fast paths. A new transport is one more module here, listed in
:data:`torch_tq.client.routing.CANDIDATES`, and one more entry of the conformance suite
(``tests/conformance``).
"""
