"""Clusters from where they run: a Kubernetes StatefulSet's stable pod names, and a SLURM
job's node list (``scontrol show hostnames`` without ``scontrol``)."""

from __future__ import annotations

import os
import re

from torch_tq.errors import InvalidArgument

_RANGE_RE = re.compile(r"(\d+)(?:-(\d+))?")


def expand_hostlist(text: str) -> list[str]:
    """``"gpu[01-03,07],login1"`` -> ``["gpu01", "gpu02", "gpu03", "gpu07", "login1"]``:
    SLURM's host list form (zero padding kept; several bracket groups multiply:
    ``"r[1-2]n[1-2]"`` is four hosts).

    Raises:
        InvalidArgument: unbalanced brackets or a malformed range.
    """
    hosts: list[str] = []
    for item in _split_top(text.strip()):
        hosts.extend(_expand(item))
    if not hosts:
        raise InvalidArgument("the host list names no host")
    return hosts


def _split_top(text: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise InvalidArgument(f"unbalanced ']' in host list {text!r:.80}")
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth:
        raise InvalidArgument(f"unbalanced '[' in host list {text!r:.80}")
    items.append(text[start:])
    return [item.strip() for item in items if item.strip()]


def _expand(item: str) -> list[str]:
    open_at = item.find("[")
    if open_at < 0:
        return [item]
    close_at = item.index("]", open_at)
    prefix, body, rest = item[:open_at], item[open_at + 1:close_at], item[close_at + 1:]
    numbers: list[str] = []
    for part in body.split(","):
        match = _RANGE_RE.fullmatch(part.strip())
        if not match:
            raise InvalidArgument(f"bad range {part!r:.40} in host list {item!r:.80}")
        low, high = match.group(1), match.group(2) or match.group(1)
        if int(high) < int(low) or int(high) - int(low) > 100_000:
            raise InvalidArgument(f"bad range {part!r:.40} in host list {item!r:.80}")
        width = len(low) if low.startswith("0") else 0
        numbers.extend(str(n).zfill(width) for n in range(int(low), int(high) + 1))
    return [prefix + n + tail for n in numbers for tail in _expand(rest)]


def slurm_nodes(port: int, nodelist: str | None = None, scheme: str = "grpc") -> dict:
    """``{host: "grpc://host:port"}`` for every node of the SLURM job (``nodelist``, default
    ``$SLURM_JOB_NODELIST``)."""
    nodelist = nodelist if nodelist is not None else os.environ.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise InvalidArgument("SLURM_JOB_NODELIST is not set: not inside a SLURM job?")
    return {host: f"{scheme}://{host}:{int(port)}" for host in expand_hostlist(nodelist)}


def statefulset_nodes(name: str, replicas: int, namespace: str = "default", port: int = 8080,
                      service: str | None = None, scheme: str = "grpc",
                      domain: str = "svc.cluster.local") -> dict:
    """``{"<name>-<i>": "grpc://<name>-<i>.<service>.<namespace>.svc.cluster.local:<port>"}``:
    the stable DNS names a headless Service gives a StatefulSet's pods (``service``
    defaults to ``name``, as in ``deploy/kubernetes/torch-tq.yaml``)."""
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 1:
        raise InvalidArgument(f"replicas must be an integer >= 1, got {replicas!r:.40}")
    service = service or name
    return {f"{name}-{i}": f"{scheme}://{name}-{i}.{service}.{namespace}.{domain}:{int(port)}"
            for i in range(replicas)}
