"""Both notebooks run end to end (at tiny sizes, into a temporary copy: the committed
outputs stay those of the full run) against the real server each one starts."""

from __future__ import annotations

import os
import sys

import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "notebooks"))

import run_notebooks  # noqa: E402


def _text(nb) -> str:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            assert o.output_type != "error", f"{o.ename}: {o.evalue}"
            if o.output_type == "stream":
                out.append(o.text)
            elif "data" in o:
                out.append(o.data.get("text/plain", ""))
    return "\n".join(out)


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setenv("TORCH_TQ_NB_SIZES", "1KiB,64KiB")
    monkeypatch.setenv("TORCH_TQ_NB_RUNS", "1")
    monkeypatch.setenv("TORCH_TQ_NB_ITEMS", "16")


def test_quickstart_runs(tiny, tmp_path):
    nb = nbformat.read(run_notebooks.run("quickstart.ipynb", str(tmp_path), timeout=600), 4)
    text = _text(nb)
    assert "items read: 16" in text
    assert "'keys': [(1, 'prompt'), (1, 'resp')]" in text
    assert "NOT_FOUND" in text


def test_benchmarks_runs_and_plots(tiny, tmp_path):
    nb = nbformat.read(run_notebooks.run("benchmarks.ipynb", str(tmp_path), timeout=600), 4)
    text = _text(nb)
    assert "64 KiB  torch_tq grpc" in text and "pyarrow.flight" in text
    assert "x plain flight" in text
    pngs = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(pngs) == 1


def test_committed_notebooks_carry_a_full_run():
    for name in run_notebooks.NOTEBOOKS:
        nb = nbformat.read(os.path.join(ROOT, "notebooks", name), 4)
        text = _text(nb)
        assert text.strip(), f"{name} has no outputs"
    bench = _text(nbformat.read(os.path.join(ROOT, "notebooks", "benchmarks.ipynb"), 4))
    assert "1 GiB  torch_tq same-host" in bench  # the full range was run
