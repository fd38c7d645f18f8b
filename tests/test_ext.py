"""The C extension builds, imports and answers without a GPU."""

import torch_tq._C as _C


def test_abi_version():
    assert _C.abi_version() == 1


def test_cuda_runtime_version_is_none_or_positive():
    version = _C.cuda_runtime_version()
    # On a CPU-only machine there is no libcudart; on a GPU machine it is e.g. 12040.
    assert version is None or (isinstance(version, int) and version > 0)
