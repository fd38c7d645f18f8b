"""Writes notebooks/quickstart.ipynb and notebooks/benchmarks.ipynb (without outputs);
then ``python notebooks/run_notebooks.py`` executes them and stores their outputs.

Both read their sizes from the environment, so CI runs them tiny:
``TORCH_TQ_NB_SIZES`` (benchmark sizes, default 1KiB..1GiB), ``TORCH_TQ_NB_RUNS`` (timings
per figure, default 3), ``TORCH_TQ_NB_ITEMS`` (quickstart's pipeline length, default 64).
"""

from __future__ import annotations

import os

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = os.path.dirname(os.path.abspath(__file__))


def quickstart() -> nbformat.NotebookNode:
    cells = [
        new_markdown_cell(
            "# torch_tq quickstart\n\n"
            "A storage server, a put and a get, metadata, batches, a `DataLoader(TQDataset)` "
            "pipeline and a safetensors round trip, all on this machine. The outputs below are "
            "from a real run; the last cell says which machine."),
        new_code_cell(
            "import os, subprocess, tempfile\n"
            "import torch\n"
            "import torch_tq\n\n"
            "# a server in its own process (a memory store: nothing is written to disk; its log\n"
            "# is not shown here)\n"
            "server = torch_tq.start_server(storage=\"memory\", stderr=subprocess.DEVNULL)\n"
            "client = torch_tq.Client(server.location)\n"
            "print(server.location, \"transport:\", client.transport)"),
        new_markdown_cell("## put, get, metadata"),
        new_code_cell(
            "prompt = torch.randint(0, 32_000, (4, 128))\n"
            "client.put(1, \"prompt\", prompt)\n"
            "client.put(1, \"resp\", torch.randn(4, 256).bfloat16())\n"
            "back = client.get(1, \"prompt\")\n"
            "print(torch.equal(back, prompt), back.dtype, tuple(back.shape))\n"
            "print(client.metadata(1))\n"
            "for m in client.list(1):\n"
            "    print(m)"),
        new_markdown_cell("## Batches: each item succeeds or fails on its own"),
        new_code_cell(
            "items = {(100 + i, \"advantage\"): torch.randn(256) for i in range(8)}\n"
            "print([r.success for r in client.put_many(items)])\n"
            "results = client.get_many([*items, (999, \"advantage\")])\n"
            "print([(r.index_id, r.success, r.code) for r in results][-3:])"),
        new_markdown_cell(
            "## A training loop's input: `DataLoader(TQDataset)`\n\n"
            "A producer writes `prompt` and `resp` for each index_id; the loader reads them "
            "back as dicts of tensors, batched."),
        new_code_cell(
            "from torch.utils.data import DataLoader\n"
            "from torch_tq import TQDataset\n\n"
            "n = int(os.environ.get(\"TORCH_TQ_NB_ITEMS\", \"64\"))\n"
            "for i in range(n):\n"
            "    client.put(1000 + i, \"prompt\", torch.full((16,), i))\n"
            "    client.put(1000 + i, \"resp\", torch.full((32,), float(i)))\n"
            "ds = TQDataset(server.location, [\"prompt\", \"resp\"], index_ids=range(1000, 1000 + n))\n"
            "seen = 0\n"
            "for batch in DataLoader(ds, batch_size=8):\n"
            "    assert (batch[\"prompt\"][:, 0] == batch[\"index_id\"] - 1000).all()\n"
            "    seen += len(batch[\"index_id\"])\n"
            "print(\"items read:\", seen, \"last batch:\", {k: tuple(v.shape) for k, v in batch.items()})"),
        new_markdown_cell("## safetensors export and import"),
        new_code_cell(
            "path = os.path.join(tempfile.mkdtemp(), \"step.safetensors\")\n"
            "print(client.export_safetensors(path, [1]))\n"
            "client.delete(1)\n"
            "print(client.import_safetensors(path))\n"
            "print(torch.equal(client.get(1, \"prompt\"), prompt))"),
        new_code_cell(
            "client.close()\n"
            "server.stop()\n"
            "from torch_tq.tools.cli import environment\n"
            "env = environment()\n"
            "print({k: env[k] for k in (\"torch_tq\", \"python\", \"torch\", \"pyarrow\", "
            "\"cuda\", \"cpus\", \"platform\")})"),
    ]
    return new_notebook(cells=cells, metadata={"kernelspec": {
        "name": "python3", "display_name": "Python 3", "language": "python"}})


def benchmarks() -> nbformat.NotebookNode:
    cells = [
        new_markdown_cell(
            "# torch_tq benchmarks\n\n"
            "Starts a memory-store server from this notebook and times a put and a get of one "
            "float32 matrix per size, on every transport this machine has (gRPC, same-host, "
            "UCX), against baselines measured in the same run: memcpy, raw loopback TCP "
            "between two Python processes, and a plain `pyarrow.flight` server "
            "(`torch_tq.tools.bench`, the suite behind `torch-tq bench`). Sizes come from "
            "`TORCH_TQ_NB_SIZES` (default 1 KiB to 1 GiB); each figure is a median of "
            "`TORCH_TQ_NB_RUNS` timings (more for small sizes). The outputs are from a real "
            "run; the next cell says which machine."),
        new_code_cell(
            "import os\n"
            "from torch_tq.tools import bench\n"
            "from torch_tq._config import parse_size\n"
            "from torch_tq.tools.cli import environment\n\n"
            "sizes = [parse_size(s) for s in os.environ.get(\n"
            "    \"TORCH_TQ_NB_SIZES\", \"1KiB,16KiB,256KiB,4MiB,64MiB,256MiB,1GiB\").split(\",\")]\n"
            "runs = int(os.environ.get(\"TORCH_TQ_NB_RUNS\", \"3\"))\n"
            "env = environment()\n"
            "print({k: env[k] for k in (\"torch_tq\", \"python\", \"torch\", \"pyarrow\", \"ucxx\", "
            "\"cuda\", \"cpus\", \"platform\")})\n"
            "print(\"sizes:\", [bench.human_size(s) for s in sizes], \"runs:\", runs)"),
        new_code_cell(
            "rows = bench.suite(sizes, runs=runs)\n"
            "print(bench.table(rows))"),
        new_code_cell(
            "%matplotlib inline\n"
            "import matplotlib.pyplot as plt\n\n"
            "methods = list(dict.fromkeys(r[\"method\"] for r in rows))\n"
            "fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))\n"
            "for ax, (op, field, label) in zip(axes, [(\"put\", \"gbps\", \"put, GB/s\"),\n"
            "                                         (\"get\", \"gbps\", \"get, GB/s\"),\n"
            "                                         (\"get\", \"us\", \"get latency, µs\")]):\n"
            "    for m in methods:\n"
            "        pts = sorted((r[\"size\"], r[field]) for r in rows if r[\"method\"] == m and r[\"op\"] == op)\n"
            "        style = \"--\" if not m.startswith(\"torch_tq\") else \"-\"\n"
            "        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker=\"o\", label=m)\n"
            "    ax.set_xscale(\"log\", base=2); ax.set_yscale(\"log\")\n"
            "    ax.set_xlabel(\"matrix size, bytes\"); ax.set_title(label); ax.grid(True, alpha=0.3)\n"
            "axes[0].legend(fontsize=8)\n"
            "plt.tight_layout()"),
        new_code_cell(
            "# the ratios the reading below quotes, for the largest size of this run\n"
            "big = max(sizes)\n"
            "by = {(r[\"method\"], r[\"op\"]): r for r in rows if r[\"size\"] == big}\n"
            "for m in methods:\n"
            "    if m.startswith(\"torch_tq\"):\n"
            "        print(f\"{m:<20} {bench.human_size(big)}: get {by[(m, 'get')]['gbps']:.2f} GB/s = \"\n"
            "              f\"{by[(m, 'get')]['gbps'] / by[('pyarrow.flight', 'get')]['gbps']:.2f}x plain flight, \"\n"
            "              f\"{by[(m, 'get')]['gbps'] / by[('tcp', 'get')]['gbps']:.2f}x raw TCP; put \"\n"
            "              f\"{by[(m, 'put')]['gbps'] / by[('pyarrow.flight', 'put')]['gbps']:.2f}x plain flight\")"),
        new_markdown_cell(READING),
    ]
    return new_notebook(cells=cells, metadata={"kernelspec": {
        "name": "python3", "display_name": "Python 3", "language": "python"}})


READING = os.environ.get("TORCH_TQ_NB_READING", "## Reading the results\n\n(filled in after a run)")


if __name__ == "__main__":
    reading = os.path.join(HERE, "benchmarks_reading.md")
    if os.path.exists(reading):
        READING = open(reading, encoding="utf-8").read()
    nbformat.write(quickstart(), os.path.join(HERE, "quickstart.ipynb"))
    nbformat.write(benchmarks(), os.path.join(HERE, "benchmarks.ipynb"))
