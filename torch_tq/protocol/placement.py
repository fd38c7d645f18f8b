"""Which node owns an index_id: rendezvous (highest-random-weight) hashing over the nodes'
names.

Every node scores the key (the id's 8 bytes, little-endian) with XXH3-64 seeded by the
XXH3-64 of its name, and the highest score owns the key. Every type of an index_id lives on one node, every client (in any
process, any language with XXH3) computes the same owner without asking anyone, and adding
a node moves only the ids the new node now wins: about 1/(N+1) of them.

``placement_key`` groups ids: with ``placement_key=16``, ids ``16k .. 16k+15`` (a GRPO
group) hash as ``k`` and so share a node. It is a number, not a function, because the
nodes compute it too, to refuse a put of an id they do not own.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable, Sequence

import xxhash

from torch_tq.errors import InvalidArgument

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_U64 = struct.Struct("<Q")


def check_name(name) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidArgument(f"node name {name!r:.80} must be 1-64 ASCII letters, digits or "
                              "_.- starting with a letter or digit")
    return name


def check_placement_key(placement_key) -> int:
    if isinstance(placement_key, bool) or not isinstance(placement_key, int) or \
            not 1 <= placement_key <= 2**32:
        raise InvalidArgument(f"placement_key must be an integer in [1, 2**32] (ids "
                              f"k*P .. k*P+P-1 share a node), got {placement_key!r:.40}")
    return placement_key


def node_seeds(names: Iterable[str]) -> list[tuple[str, int]]:
    """``(name, seed)`` of each node: what :func:`owner` scores with."""
    return [(name, xxhash.xxh3_64_intdigest(name.encode())) for name in names]


def owner(index_id: int, seeds: Sequence[tuple[str, int]], placement_key: int = 1) -> str:
    """The name of the node that owns ``index_id`` among ``seeds`` (:func:`node_seeds`)."""
    key = _U64.pack(index_id // placement_key)
    best, best_score = "", -1
    for name, seed in seeds:
        score = xxhash.xxh3_64_intdigest(key, seed=seed)
        if score > best_score or (score == best_score and name < best):
            best, best_score = name, score
    return best
