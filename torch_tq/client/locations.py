"""Where a server is: the location forms a ``Client`` accepts, made canonical."""

from __future__ import annotations

from torch_tq._config import DEFAULT_PORT
from torch_tq.errors import InvalidArgument


def normalize_location(location: str) -> str:
    """``host:port``, ``grpc://host:port`` or ``grpc+tcp://host:port`` -> ``grpc://host:port``;
    ``grpc+tls://host:port`` stays as it is."""
    if not isinstance(location, str) or not location:
        raise InvalidArgument(f"location must be a string like grpc://HOST:PORT, got {location!r}")
    if "://" not in location:
        location = "grpc://" + location
    scheme, rest = location.split("://", 1)
    if scheme not in ("grpc", "grpc+tcp", "grpc+tls"):
        raise InvalidArgument(f"unsupported location scheme {scheme!r} (use grpc://HOST:PORT, "
                              "or grpc+tls://HOST:PORT)")
    if not rest:
        raise InvalidArgument(f"location {location!r} names no host")
    has_port = ":" in rest and not rest.endswith("]") and rest.rsplit(":", 1)[1].isdigit()
    if not has_port:
        rest = f"{rest}:{DEFAULT_PORT}"
    return f"{'grpc+tls' if scheme == 'grpc+tls' else 'grpc'}://{rest}"


def split_locations(location) -> tuple[str, list[str]]:
    """``"grpc://h:p"`` or a list of gRPC and ``ucx://``/``rdma://`` locations -> (the gRPC
    control location, the UCX locations)."""
    if isinstance(location, str):
        location = [location]
    if not isinstance(location, (list, tuple)) or not location:
        raise InvalidArgument(f"location must be a string or a list of them, got {location!r}")
    grpc_locs, ucx_locs = [], []
    for loc in location:
        if isinstance(loc, str) and loc.split("://", 1)[0] in ("ucx", "rdma") and "://" in loc:
            ucx_locs.append("ucx://" + loc.split("://", 1)[1])
        else:
            grpc_locs.append(normalize_location(loc))
    if len(grpc_locs) > 1:
        raise InvalidArgument(f"more than one gRPC location: {grpc_locs}")
    if not grpc_locs:  # only UCX named: the control plane is on the same host, default port
        host = ucx_locs[0].split("://", 1)[1].rsplit(":", 1)[0]
        grpc_locs.append(normalize_location(f"{host}:{DEFAULT_PORT}"))
    return grpc_locs[0], ucx_locs
