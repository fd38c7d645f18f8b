"""The README and the pages under ``docs/``: every Python block runs as written, each
against a fresh server; the pages build with ``mkdocs build --strict`` (a broken link or
anchor fails); the README stays a front door (at most 10 KB).

A block runs as a script of its own (so ``if __name__ == "__main__":`` and DataLoader worker
processes behave as they do for a user who pastes it into a file), in an empty directory,
with a fresh memory-store server where the README says ``127.0.0.1:8080`` or
``localhost:8080`` (the port is the test server's: 8080 may be taken on a test machine).
A comment line just above a block changes how it runs:

* ``<!-- readme-test: skip (why) -->``: not run (a GPU, a cluster node, a server that
  serves until stopped); the reason is the skip message.
* ``<!-- readme-test: torchrun N -->``: run under ``torchrun --nproc_per_node=N``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

import torch_tq

from .conftest import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(os.path.join("docs", p) for p in os.listdir(os.path.join(ROOT, "docs"))
                               if p.endswith(".md"))
_BLOCK = re.compile(r"(?:<!-- readme-test: (?P<mark>[^>]*?) -->\n)?```python\n(?P<code>.*?)```",
                    re.S)


def _blocks() -> list[tuple[str, str, str]]:
    """(``page:line``, mark, code) of every Python block of every page."""
    blocks = []
    for page in PAGES:
        with open(os.path.join(ROOT, page)) as f:
            text = f.read()
        blocks += [(f"{page}:{text[:m.start('code')].count(chr(10))}", m.group("mark") or "",
                    m.group("code")) for m in _BLOCK.finditer(text)]
    return blocks


BLOCKS = _blocks()


def test_the_pages_have_python_blocks_and_only_known_marks():
    assert len(BLOCKS) >= 10
    assert any(where.startswith("README.md:") and not mark for where, mark, _ in BLOCKS)
    for where, mark, _ in BLOCKS:
        assert mark == "" or re.fullmatch(r"skip \(.+\)|torchrun [0-9]+", mark), (where, mark)


def test_the_readme_is_a_front_door():
    size = os.path.getsize(os.path.join(ROOT, "README.md"))
    assert size <= 10_000, f"README.md is {size} bytes: move reference material into docs/"


def test_the_docs_build_strictly(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet",
                           "--config-file", os.path.join(ROOT, "mkdocs.yml"),
                           "--site-dir", str(tmp_path / "site")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "site" / "index.html").exists()
    for page in PAGES[1:]:
        name = os.path.splitext(os.path.basename(page))[0]
        built = "index.html" if name == "index" else os.path.join(name, "index.html")
        assert (tmp_path / "site" / built).exists(), page


@pytest.mark.parametrize("where, mark, code", BLOCKS, ids=[b[0] for b in BLOCKS])
def test_block_runs(where, mark, code, tmp_path):
    if mark.startswith("skip"):
        pytest.skip(mark[len("skip ("):-1])
    with torch_tq.start_server(storage="memory") as srv:
        port = srv.location.rsplit(":", 1)[1]
        script = tmp_path / "block.py"
        script.write_text(re.sub(r"(127\.0\.0\.1|localhost):8080", rf"\1:{port}", code))
        if mark.startswith("torchrun"):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1",
                   f"--nproc_per_node={mark.split()[1]}", "--rdzv-backend=c10d",
                   f"--rdzv-endpoint=127.0.0.1:{free_port()}", str(script)]
        else:
            cmd = [sys.executable, str(script)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        env.pop("TORCH_TQ_LOCATION", None)
        proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=240,
                              env=env)
    assert proc.returncode == 0, f"block at {where}:\n{proc.stdout}\n{proc.stderr}"
    if mark.startswith("torchrun"):
        steps = re.findall(r"^rank \d+: (\d+) steps$", proc.stdout, re.M)
        assert len(steps) == int(mark.split()[1]) and len(set(steps)) == 1, proc.stdout
