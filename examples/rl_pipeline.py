"""An RL post-training data flow through one torch_tq server, end to end.

    rollout  --prompt, resp-->  reference model  --ref_log_prob-->  trainer (2 ranks x 2 workers)

* the **rollout** process writes ``prompt`` and ``resp`` for each index_id with a
  :class:`~torch_tq.TensorSink` and marks those types finished;
* the **reference** stage streams index_ids that have ``prompt`` and ``resp`` (consumer group
  ``ref_stage``), adds ``ref_log_prob`` and marks it finished when its input is done;
* the **trainer** runs two data-parallel ranks, each a ``DataLoader`` with two workers over
  ``TQDataset(group="actor_update")`` built by ``TQDataset.loader(batch_size=4, ...)``;
  the server deals the index_ids that have all three types in rounds of one batch per rank,
  so both ranks get the same number of batches (what cannot fill a last round stays in the
  group).

The script checks that both ranks got the same count, that no index_id reached the trainer
twice, that every one arrived with all its types intact or is still in the group, and prints
what each stage did.

    python examples/rl_pipeline.py [--items 64] [--storage memory|disk]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import tempfile
import time

import torch
import torch_tq

SEQ, HIDDEN = 16, 8
BATCH = 4  # per rank


def prompt_of(i: int) -> torch.Tensor:
    return torch.full((SEQ,), i % 1000, dtype=torch.int64)


def resp_of(i: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(i)
    return torch.randn(SEQ, HIDDEN, generator=g)


def rollout(location: str, ids: list[int]) -> None:
    with torch_tq.TensorSink(location, max_inflight_bytes=64 << 20) as sink:
        for i in ids:
            sink.write(i, {"prompt": prompt_of(i), "resp": resp_of(i)})
        sink.finish()  # no more prompt/resp: downstream groups can end cleanly


def reference(location: str) -> None:
    ds = torch_tq.TQDataset(location, ["prompt", "resp"], group="ref_stage")
    with torch_tq.TensorSink(location) as sink:
        for item in ds:  # ends when prompt/resp are finished and all consumed
            ref = torch.log_softmax(item["resp"], dim=-1).sum(dim=-1)
            sink.write(int(item["index_id"]), {"ref_log_prob": ref})
        sink.finish(["ref_log_prob"])


def trainer_rank(location: str, rank: int, world: int, out) -> None:
    ds = torch_tq.TQDataset(location, ["prompt", "resp", "ref_log_prob"], group="actor_update",
                            rank=rank, world_size=world)
    seen = []
    for batch in ds.loader(batch_size=BATCH, num_workers=2):  # forkserver, in_order=False
        for k, i in enumerate(batch["index_id"].tolist()):
            assert torch.equal(batch["prompt"][k], prompt_of(i)), i
            assert torch.equal(batch["resp"][k], resp_of(i)), i
            want = torch.log_softmax(resp_of(i), dim=-1).sum(dim=-1)
            assert torch.equal(batch["ref_log_prob"][k], want), i
            seen.append(i)
    out.put((rank, seen))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--storage", choices=["memory", "disk"], default="memory")
    args = parser.parse_args(argv)
    ids = list(range(1000, 1000 + args.items))
    data_dir = tempfile.mkdtemp(prefix="tq-example-") if args.storage == "disk" else None

    ctx = mp.get_context("spawn")
    t0 = time.perf_counter()
    with torch_tq.start_server(storage=args.storage, data_dir=data_dir) as server:
        loc = server.location
        out = ctx.Queue()
        trainers = [ctx.Process(target=trainer_rank, args=(loc, r, 2, out)) for r in range(2)]
        stages = [ctx.Process(target=reference, args=(loc,)),
                  ctx.Process(target=rollout, args=(loc, ids))]
        for p in trainers + stages:  # consumers first: they wait for their producers
            p.start()
        seen = dict(out.get(timeout=600) for _ in trainers)
        for p in trainers + stages:
            p.join(60)
            if p.exitcode != 0:
                print(f"{p.name} failed with exit code {p.exitcode}", file=sys.stderr)
                return 1
        status = torch_tq.Client(loc).group_status("actor_update")
    elapsed = time.perf_counter() - t0

    everything = seen[0] + seen[1]
    assert len(seen[0]) == len(seen[1]), f"unequal ranks: {len(seen[0])} and {len(seen[1])}"
    assert len(set(everything)) == len(everything), "an index_id was delivered twice"
    left = len(ids) - len(everything)
    assert left < 2 * BATCH and status["ready"] == left, "an index_id was lost"
    assert status["consumed"] == len(everything)
    print(f"rollout wrote {len(ids)} x (prompt, resp); reference added ref_log_prob; "
          f"trainer rank 0 got {len(seen[0])}, rank 1 got {len(seen[1])} in batches of "
          f"{BATCH}, each index_id once with all 3 types, {left} left in the group "
          f"({elapsed:.1f} s, {args.storage} store)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
