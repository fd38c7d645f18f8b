"""Running one call per node at once."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any


def parallel(tasks: list[tuple[str, Any]], run) -> None:
    """``run(name, arg)`` for every task, one thread per node (what each waits on is its
    node's network)."""
    if len(tasks) == 1:
        run(*tasks[0])
        return
    with ThreadPoolExecutor(max(1, len(tasks)), "torch_tq-cluster") as pool:
        for future in [pool.submit(run, *task) for task in tasks]:
            future.result()
