"""Executes the notebooks in place (their outputs are committed): ``python
notebooks/run_notebooks.py [NAME.ipynb ...]``; with ``--out DIR`` the executed copies go
there instead (what the tests do, at tiny sizes, so the committed outputs stay)."""

from __future__ import annotations

import argparse
import os
import sys

import nbformat
from nbclient import NotebookClient

HERE = os.path.dirname(os.path.abspath(__file__))
NOTEBOOKS = ["quickstart.ipynb", "benchmarks.ipynb"]


def run(name: str, out_dir: str | None = None, timeout: int = 1800) -> str:
    path = os.path.join(HERE, name)
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": HERE}}).execute()
    target = os.path.join(out_dir, name) if out_dir else path
    nbformat.write(nb, target)
    return target


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("names", nargs="*", default=NOTEBOOKS)
    ap.add_argument("--out", default=None, help="write the executed copies here")
    args = ap.parse_args(argv)
    for name in args.names:
        print("executed", run(name, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
