"""Every op of the autoencoder at its own layer shapes: ours against PyTorch's
(torch.nn.functional: oneDNN on the CPU, cuDNN on a GPU), NCHW against channels_last,
forward alone and forward+backward, float32."""

import pytest
import torch

import cae_kernels
from cae_kernels import reference

from conftest import LOWER_CPU_LEVELS, cpu_level_of
from shapes import op_cases

LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
# "torch-tf32": cuDNN as users get it on a GPU (TF32 tensor cores for float32);
# "torch": like for like, TF32 off.
IMPLS = ["cae", "torch", "torch-tf32"] + [f"cae@{level}" for level in LOWER_CPU_LEVELS]


def call(functions, case):
    """The case's op from ``functions``: ``cae_kernels`` (ours) or ``cae_kernels.reference``
    (PyTorch's, the same computation by torch.nn.functional)."""
    if case.op == "max_pool2x2":
        return lambda x, w, b: functions.max_pool2x2(x)
    op = getattr(functions, case.op)
    return lambda x, w, b: op(x, w, b, case.stride, case.activation)


@pytest.mark.parametrize("direction", ["forward", "forward+backward"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", op_cases(1), ids=lambda c: c.id)  # shapes at batch 1, scaled below
def test_op(benchmark, settings, batch, case, impl, layout, direction):
    if impl == "torch-tf32" and (settings.device.type != "cuda" or case.op == "max_pool2x2"):
        pytest.skip("TF32 applies to convolutions on a GPU")
    if "@" in impl and settings.device.type != "cpu":
        pytest.skip("CPU levels apply to the CPU kernels")
    case = case._replace(input_shape=(batch, *case.input_shape[1:]), output_shape=(batch, *case.output_shape[1:]))
    fn = call(cae_kernels if impl.startswith("cae") else reference, case)
    backward = direction == "forward+backward"
    dtype, device, memory_format = torch.float32, settings.device, LAYOUTS[layout]

    def make_inputs():
        x = torch.randn(case.input_shape, device=device, dtype=dtype).to(memory_format=memory_format)
        w = b = None
        if case.weight_shape:
            w = torch.randn(case.weight_shape, device=device, dtype=dtype) * 0.2
            out_channels = case.weight_shape[0 if case.op == "conv3x3" else 1]
            b = torch.randn(out_channels, device=device, dtype=dtype)
        return tuple(t.requires_grad_(backward) if t is not None else None for t in (x, w, b))

    inputs = [make_inputs() for _ in range(3)]
    grad = torch.randn(case.output_shape, device=device, dtype=dtype).to(memory_format=memory_format)

    def step(x, w, b):
        y = fn(x, w, b)
        if backward:
            torch.autograd.grad(y, [t for t in (x, w, b) if t is not None], grad)

    benchmark.group = f"{case.id} {direction} batch {batch}"
    benchmark.extra_info.update(
        kind="op", op=case.op, case=case.id, impl=impl, layout=layout, direction=direction,
        batch=batch, dtype="float32", device=device.type, tf32=impl == "torch-tf32",
        cpu_level=cae_kernels.cpu_capability() if impl == "cae" else impl.partition("@")[2] or None,
        flops=case.flops(backward), min_bytes=case.min_bytes(backward, 4),
    )
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = impl == "torch-tf32"
    try:
        with cpu_level_of(impl):
            settings.run(benchmark, step, inputs)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
