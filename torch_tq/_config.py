"""The one place that reads configuration: explicit arguments, then TORCH_TQ_* variables, then defaults."""

from __future__ import annotations

import os
import re

from torch_tq.errors import InvalidArgument

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_UCX_PORT = 8081
DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_MATRIX_BYTES = 10 * 10**9  # the seed's 10 GB per matrix
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_CONNECT_TIMEOUT_S = 30.0  # how long a client waits for a server that is not up yet
DEFAULT_SHUTDOWN_GRACE_S = 5.0
# A same-host client's staged file that nobody holds open and nobody has published for
# this long was abandoned (its client died): the server removes it.
DEFAULT_STAGING_TIMEOUT_S = 60.0

_SIZE_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?i?b?)?\s*", re.IGNORECASE | re.ASCII)
_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "kib": 2**10, "ki": 2**10,
    "m": 10**6, "mb": 10**6, "mib": 2**20, "mi": 2**20,
    "g": 10**9, "gb": 10**9, "gib": 2**30, "gi": 2**30,
    "t": 10**12, "tb": 10**12, "tib": 2**40, "ti": 2**40,
}


def parse_size(text: str | int) -> int:
    """Parses a human size: ``4MiB``, ``256mib``, ``1.5GB``, ``4096``."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    match = _SIZE_RE.fullmatch(str(text))
    if not match or (match.group(2) or "").lower() not in _UNITS:
        raise InvalidArgument(f"not a size: {text!r} (try 4MiB, 256MiB, 1GB)")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").lower()])


def env(name: str) -> str | None:
    value = os.environ.get(f"TORCH_TQ_{name}")
    return value if value not in (None, "") else None


def default_data_dir() -> str:
    """The embedded default data directory: $TORCH_TQ_DATA_DIR or $XDG_DATA_HOME/torch_tq."""
    explicit = env("DATA_DIR")
    if explicit:
        return explicit
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "torch_tq")


def resolve(value, name: str, default, convert=lambda v: v):
    """``value`` if given, else TORCH_TQ_<name> converted, else ``default``."""
    if value is not None:
        return value
    raw = env(name)
    if raw is None:
        return default
    try:
        return convert(raw)
    except (ValueError, InvalidArgument) as e:
        raise InvalidArgument(f"TORCH_TQ_{name}={raw!r} is invalid: {e}") from None


def parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected 1/0, true/false, yes/no or on/off")
