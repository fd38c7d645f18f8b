"""``python -m build`` makes an sdist (with csrc/) and a wheel; each installs into a fresh
venv and passes a smoke test there: the CLI, and a server with a put and a get.

The venvs see this environment's site-packages for torch_tq's dependencies (torch, pyarrow,
...: installing them again would take minutes and the network), but torch_tq itself comes
only from the built artifact, which the test checks. They see them through a ``.pth`` file
naming this interpreter's site-packages directories, not ``--system-site-packages``: run from
a virtualenv, that flag would show the base interpreter's packages, not the virtualenv's."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile

import pytest

import torch_tq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMOKE = """
import os, sys, torch, torch_tq
assert torch_tq.__file__.startswith(sys.prefix), torch_tq.__file__  # the venv's own copy
import torch_tq._C  # the compiled extension came along
with torch_tq.start_server(storage="memory") as srv:
    c = torch_tq.Client(srv.location)
    t = torch.randn(3, 5)
    c.put(7, "prompt", t)
    assert torch.equal(c.get(7, "prompt"), t)
print("smoke ok", torch_tq.__version__)
"""


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--sdist",
                           "--wheel", "--outdir", str(out), ROOT],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def _site_dirs() -> list[str]:
    """This interpreter's site-packages directories (a virtualenv's, then its base's)."""
    return [p for p in sys.path
            if os.path.basename(p) in ("site-packages", "dist-packages") and os.path.isdir(p)]


def _venv(path) -> str:
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=120)
    python = os.path.join(str(path), "bin", "python")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # Plain path lines: appended after the venv's own site-packages, and the .pth files in them
    # (this checkout's editable install among them) are not processed, so torch_tq itself
    # can only come from what the test installs.
    with open(os.path.join(purelib, "_outer_site.pth"), "w") as f:
        f.write("\n".join(_site_dirs()) + "\n")
    return python


def _smoke(python: str, cwd) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([python, "-c", SMOKE], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300, check=False)
    assert proc.returncode == 0 and f"smoke ok {torch_tq.__version__}" in proc.stdout, \
        proc.stderr[-3000:]
    cli = os.path.join(os.path.dirname(python), "torch-tq")
    proc = subprocess.run([cli, "--version"], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=60, check=False)
    assert proc.returncode == 0 and torch_tq.__version__ in proc.stdout, proc.stderr


def test_sdist_holds_the_sources_and_the_version(dist):
    (sdist,) = [p for p in os.listdir(dist) if p.endswith(".tar.gz")]
    assert sdist == f"torch_tq-{torch_tq.__version__}.tar.gz"
    with tarfile.open(os.path.join(dist, sdist)) as tar:
        names = tar.getnames()
    top = f"torch_tq-{torch_tq.__version__}"
    for needed in ("csrc/module.cpp", "setup.py", "pyproject.toml", "README.md",
                   "torch_tq/__init__.py", "torch_tq/_version.py"):
        assert f"{top}/{needed}" in names, needed
    (wheel,) = [p for p in os.listdir(dist) if p.endswith(".whl")]
    with zipfile.ZipFile(os.path.join(dist, wheel)) as z:
        names = z.namelist()
    assert any(n.startswith("torch_tq/_C") and n.endswith(".so") for n in names)
    assert "torch_tq/py.typed" in names


def test_wheel_installs_and_works_in_a_fresh_venv(dist, tmp_path):
    (wheel,) = [p for p in os.listdir(dist) if p.endswith(".whl")]
    python = _venv(tmp_path / "venv")
    # --ignore-installed: the venv sees this environment's torch_tq through the .pth, and pip
    # would call it installed already
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    "--ignore-installed", os.path.join(dist, wheel)], check=True, timeout=300)
    _smoke(python, tmp_path)


def test_sdist_builds_installs_and_works_in_a_fresh_venv(dist, tmp_path):
    (sdist,) = [p for p in os.listdir(dist) if p.endswith(".tar.gz")]
    python = _venv(tmp_path / "venv")
    # the venv's own (older) setuptools would shadow the one pyproject.toml asks for
    subprocess.run([python, "-m", "pip", "uninstall", "-q", "-y", "setuptools"], check=False,
                   timeout=120)
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    "--ignore-installed",
                    "--no-build-isolation", os.path.join(dist, sdist)], check=True, timeout=600)
    _smoke(python, tmp_path)
