"""The backends the op suite runs on: the CPU kernels at every instruction-set
level this machine runs (csrc/cpu/capability.h), and CUDA where a GPU and the CUDA
kernels are both present. A test takes one through its ``device`` argument:

    @on_every_backend
    def test_x(device): ...   # device is "cpu" (at the level of the test's id) or "cuda"
"""

import pytest
import torch

import cae_kernels

BACKENDS = [f"cpu-{level}" for level in cae_kernels.cpu_capabilities()]
if torch.cuda.is_available() and cae_kernels.with_cuda:
    BACKENDS.append("cuda")

on_every_backend = pytest.mark.parametrize("device", BACKENDS, indirect=True)


@pytest.fixture
def device(request):
    """The torch device of the backend ``request.param``; a CPU level is in use for
    the test's duration."""
    backend = request.param
    if not backend.startswith("cpu-"):
        yield backend
        return
    previous = cae_kernels.cpu_capability()
    cae_kernels.set_cpu_capability(backend.removeprefix("cpu-"))
    try:
        yield "cpu"
    finally:
        cae_kernels.set_cpu_capability(previous)
