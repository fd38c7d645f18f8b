"""One benchmark, two versions of torch_tq, in one run: the figures of a commit before a
change and of this working tree, measured in alternation (this machine's speed drifts, so
separate runs would compare the drift).

The benchmark runs ``--rounds`` times in each tree, alternating (before, after, after,
before, ...: whichever runs second in a pair does not always belong to the same tree), each
time with that tree's package first on the path. Its figures are read from its output: a JSON object line
(``--json``), or table rows ``name   value`` (two or more spaces before the number). The
last lines give, per figure, the medians before and after and their ratio (after/before).

Example:
    python benchmarks/compare.py --before ce4dcd5 --rounds 3 -- benchmarks/batch.py --runs 3 --json
    python benchmarks/compare.py --before ce4dcd5 --rounds 3 -- benchmarks/transports.py -n 64MiB
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ROW = re.compile(r"^\s*(?P<name>[A-Za-z][^\n]*?)\s{2,}(?P<value>-?[0-9]+(?:\.[0-9]+)?)\b")


def figures(output: str) -> dict[str, float]:
    """The figures a benchmark printed: a JSON object line's numbers, else its table rows.
    A row is named after the unit its table's heading gives in parentheses (``(GB/s)``),
    so that two tables with the same row names stay apart."""
    found: dict[str, float] = {}
    unit = ""
    for line in output.splitlines():
        line_s = line.strip()
        if line and not line[0].isspace():
            heading = re.search(r"\(([^()]*)\)\s*$", line)
            unit = f" [{heading.group(1)}]" if heading else ""
        if line_s.startswith("{") and line_s.endswith("}"):
            try:
                obj = json.loads(line_s)
            except ValueError:
                continue
            found.update({k: float(v) for k, v in obj.items() if isinstance(v, (int, float))})
            continue
        m = _ROW.match(line)
        if m:
            found.setdefault(m.group("name").strip() + unit, float(m.group("value")))
    return found


def checkout(rev: str, where: str) -> str:
    """A worktree of ``rev`` with its extension built."""
    subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", "-f", where, rev],
                   check=True, capture_output=True)
    subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=where,
                   check=True, capture_output=True)
    return where


def run(tree: str, command: list[str]) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": tree}
    proc = subprocess.run([sys.executable, *command], cwd=tree, env=env, capture_output=True,
                          text=True, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"{command} failed in {tree}:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    return figures(proc.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", required=True, help="the commit to compare against")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("command", nargs=argparse.REMAINDER,
                    help="-- the benchmark and its arguments, relative to the repository")
    args = ap.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("give the benchmark after --")
    scratch = tempfile.mkdtemp(prefix="tq-compare-")
    before = checkout(args.before, os.path.join(scratch, "before"))
    runs: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    try:
        for r in range(args.rounds):
            order = [("before", before), ("after", ROOT)]
            for label, tree in order if r % 2 == 0 else order[::-1]:  # ABBA: no order bias
                runs[label].append(run(tree, command))
                print(f"round {r + 1}/{args.rounds} {label}: done", flush=True)
    finally:
        subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", before],
                       capture_output=True)
        shutil.rmtree(scratch, ignore_errors=True)
    names = [n for n in runs["after"][0] if all(n in f for f in runs["before"] + runs["after"])]
    print(f"{' '.join(command)}: medians of {args.rounds} alternating runs "
          f"(before = {args.before}, after = this tree)")
    width = max((len(n) for n in names), default=10) + 2
    for name in names:
        b = statistics.median(f[name] for f in runs["before"])
        a = statistics.median(f[name] for f in runs["after"])
        ratio = f"{a / b:6.2f}x" if b else "     -"
        print(f"  {name:<{width}} before {b:12.3f}   after {a:12.3f}   {ratio}")


if __name__ == "__main__":
    main()
