"""Build torch_tq and its small C extension ``torch_tq._C``.

The extension needs only the CPython headers: no torch, CUDA or Arrow at build time
(see DESIGN.md, "C++ extension").
"""

import os
import re

from setuptools import Extension, find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _version() -> str:
    with open(os.path.join(HERE, "torch_tq", "_version.py"), encoding="utf-8") as f:
        match = re.search(r'__version__ = "([^"]+)"', f.read())
    if match is None:
        raise RuntimeError("torch_tq/_version.py has no __version__")
    return match.group(1)


def _readme() -> str:
    path = os.path.join(HERE, "README.md")
    if not os.path.exists(path):
        return ""
    with open(path, encoding="utf-8") as f:
        return f.read()


setup(
    name="torch_tq",
    version=_version(),
    description="Move tensors between RL post-training stages through Arrow Flight storage servers",
    long_description=_readme(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["torch_tq", "torch_tq.*"]),
    package_data={"torch_tq": ["py.typed"]},
    ext_modules=[
        Extension(
            "torch_tq._C",
            sources=["csrc/module.cpp"],
            language="c++",
            extra_compile_args=["-O2", "-std=c++17", "-fvisibility=hidden"],
            libraries=["dl"],
        )
    ],
    install_requires=[
        # 2.13.0 must satisfy this (CI and fresh machines install that CPU build from disk).
        "torch>=2.1",
        "pyarrow>=14",
        "numpy>=1.24",
        "xxhash>=3.0",
    ],
    extras_require={
        "snappy": ["cramjam>=2.7"],
        "ucx": ["ucxx-cu12>=0.52"],
        "progress": ["tqdm>=4"],
        "ray": ["ray>=2.9"],
        "metrics": ["prometheus-client>=0.17"],
        "notebooks": ["nbformat>=5", "nbclient>=0.7", "ipykernel>=6", "matplotlib>=3.6"],
        "test": ["pytest>=7", "hypothesis>=6", "pandas>=2", "torchdata>=0.9", "cramjam>=2.7",
                 "safetensors>=0.4", "build>=1"],
    },
    entry_points={"console_scripts": ["torch-tq=torch_tq.tools.cli:main"]},
    zip_safe=False,
)
