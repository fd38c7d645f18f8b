"""Data-parallel training over torch_tq: every rank takes the same number of steps.

    torchrun --standalone --nproc_per_node=2 examples/ddp_train.py

Each rank trains a DDP model on batches from ``TQDataset(...).loader(batch_size=...)`` while
a producer (a thread of rank 0, standing in for a rollout) writes ``--items`` items and then
marks its types finished. In streaming mode (the default) the server deals the consumer group
in rounds of one batch per rank, so every rank gets the same number of batches and all end at
the same step; the items of a last round that cannot be filled stay in the group (a warning
says how many). ``--mode fixed`` reads a fixed range of index_ids, dealt as
``DistributedSampler`` deals them.

Without ``--location``, rank 0 starts a server of its own (a memory store) and tells the
other ranks where it is. ``--nodes n0=grpc://h0:8080,n1=grpc://h1:8080`` (the form of
``TORCH_TQ_NODES``) reads from a cluster of several nodes instead: each node deals the ids it
owns in rounds of its own, and the ranks still end at the same step. ``--report DIR`` writes what each rank read to ``DIR/rank<N>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import threading

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import torch_tq

FEATURES = 8


def features(i: int) -> torch.Tensor:
    return torch.randn(FEATURES, generator=torch.Generator().manual_seed(i))


def produce(location: str | torch_tq.Cluster, ids: range) -> None:
    """The rollout: writes each item, then marks the types finished."""
    with torch_tq.TensorSink(location) as sink:
        for i in ids:
            x = features(i)
            sink.write(i, {"x": x, "y": x.sum()})
        sink.finish()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--location", help="a running server (default: rank 0 starts one)")
    parser.add_argument("--nodes", help="a cluster of running servers, as TORCH_TQ_NODES")
    parser.add_argument("--mode", choices=["stream", "fixed"], default="stream")
    parser.add_argument("--items", type=int, default=201)
    parser.add_argument("--first-id", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=4, help="per rank")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers per rank")
    parser.add_argument("--group", default="ddp_trainer")
    parser.add_argument("--report", help="a directory for rank<N>.json")
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    server = None
    if args.nodes:
        location = torch_tq.Cluster.from_env(args.nodes)
    elif args.location is None:
        if rank == 0:
            server = torch_tq.start_server(storage="memory")
        where = [server.location if server else None]
        dist.broadcast_object_list(where, src=0)
        location = where[0]
    else:
        location = args.location

    ids = range(args.first_id, args.first_id + args.items)
    producer = None
    if args.mode == "stream":
        if rank == 0:  # while the ranks train
            producer = threading.Thread(target=produce, args=(location, ids))
            producer.start()
        dataset = torch_tq.TQDataset(location, ["x", "y"], group=args.group)
    else:
        if rank == 0:
            produce(location, ids)
        dist.barrier()  # fixed mode reads what is there
        dataset = torch_tq.TQDataset(location, ["x", "y"], index_ids=ids)

    model = DDP(torch.nn.Linear(FEATURES, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    seen: list[int] = []
    steps = 0
    for batch in dataset.loader(batch_size=args.batch_size, num_workers=args.workers):
        loss = torch.nn.functional.mse_loss(model(batch["x"]).squeeze(-1), batch["y"])
        optimizer.zero_grad()
        loss.backward()  # an allreduce: a rank with a step more would hang here
        optimizer.step()
        seen += batch["index_id"].tolist()
        steps += 1
    print(f"rank {rank}: {steps} steps, {len(seen)} items, last loss {loss.item():.4f}",
          flush=True)
    if args.report:
        os.makedirs(args.report, exist_ok=True)
        with open(os.path.join(args.report, f"rank{rank}.json"), "w") as f:
            json.dump({"rank": rank, "steps": steps, "ids": seen}, f)
    if producer is not None:
        producer.join()
    dist.barrier()  # nobody needs the server any more
    if server is not None:
        server.stop()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
