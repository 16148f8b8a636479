"""The CUDA kernels (csrc/cuda), run on the CPU by the CUDA-semantics emulator.

Every kernel through ``cae_kernels.sim`` against ``torch.nn.functional`` in float64:
forward and every gradient, NCHW and channels_last, both strides, with and without
the fused ReLU, at sizes that leave ragged tile edges (the kernels tile 2..32-pixel
rows x columns, several images per block for small images, 16 channels per group,
32 x 32 weight-gradient regions); float16/bfloat16 with float32 accumulation;
gradcheck; bitwise reproducibility across runs and thread schedules; and kernel
bugs (a barrier skipped, a deadlock, a bad launch) surfacing as RuntimeError.

The first import builds the emulated extension (a few minutes, then cached).
Shapes stay small: the emulator runs every CUDA thread as a fiber on one core.
"""

import os

import pytest
import torch
import torch.nn.functional as F

from cae_kernels import sim
from cae_kernels._registration import _suggest_memory_format

FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}

# (N, C_in, C_out, H, W) with the tile edges each exercises (output tile chosen
# from the output size; see csrc/cuda/common.cuh, plan_output_tile).
CONV_SHAPES = [
    (3, 3, 5, 9, 11),  # 16x16 tile, ragged in both directions; 5 channels in a group of 8
    (5, 1, 16, 7, 7),  # 8x8 tiles of 4 images: the last block holds 1 image; C_in 1
    (2, 16, 8, 14, 14),  # an autoencoder layer (16 -> 8 at 14x14)
    (9, 8, 1, 4, 3),  # tiny images, 16 per block: one block, 9 of 16 images; C_out 1
    (1, 18, 17, 3, 34),  # 17 channels: two groups of 16; 34 columns: two 32-column tiles
    (4, 2, 3, 1, 1),  # 1x1 images
    (2, 100, 3, 5, 6),  # 100 input channels: several passes through shared memory
]
DTYPES = [torch.float64, torch.float32]


def tolerance(dtype):
    return {
        torch.float64: dict(rtol=1e-10, atol=1e-10),
        torch.float32: dict(rtol=1e-4, atol=1e-4),
        torch.float16: dict(rtol=1e-2, atol=2e-2),
        torch.bfloat16: dict(rtol=4e-2, atol=8e-2),
    }[dtype]


def make(shape, dtype, fmt="nchw", seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    if len(shape) == 4:
        t = t.contiguous(memory_format=FORMATS[fmt])
    return t.requires_grad_()


def run_and_compare(ours_fn, ref_fn, inputs, dtype, fmt, relu=False):
    """Forward and every gradient of ours_fn(*inputs) against ref_fn in float64.

    relu: ours fuses a ReLU into ref_fn's result. The forward is compared with
    relu(reference); the backward reference applies *our* output's mask, so an output
    within rounding of zero cannot flip the mask between the two."""
    out = ours_fn(*inputs)
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    ref = ref_fn(*ref_inputs)
    assert out.dtype == dtype and out.shape == ref.shape
    # The result comes back in the input's layout, read as PyTorch reads it (one
    # channel in channels_last is also plain contiguous, and counts as that).
    assert out.is_contiguous(memory_format=_suggest_memory_format(inputs[0]))
    tol = tolerance(dtype)
    torch.testing.assert_close(out.double(), F.relu(ref) if relu else ref, **tol)
    if relu:
        ref = ref * (out.detach() > 0)
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ours_grads = torch.autograd.grad(out, inputs, grad.to(dtype))
    ref_grads = torch.autograd.grad(ref, ref_inputs, grad)
    for name, mine, theirs in zip("xwb"[: len(ours_grads)], ours_grads, ref_grads, strict=True):
        scale = max(1.0, theirs.abs().max().item())
        torch.testing.assert_close(mine.double(), theirs, rtol=tol["rtol"], atol=tol["atol"] * scale,
                                   msg=lambda m, name=name: f"grad of {name}: {m}")


def conv_ref(stride):
    return lambda x, w, b: F.conv2d(x, w, b, stride, 1)


def conv_transpose_ref(stride):
    return lambda x, w, b: F.conv_transpose2d(x, w, b, stride, 1, stride - 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("n,c_in,c_out,h,w", CONV_SHAPES)
def test_conv3x3(n, c_in, c_out, h, w, fmt, stride, activation, dtype):
    x = make((n, c_in, h, w), dtype, fmt)
    weight = make((c_out, c_in, 3, 3), dtype, seed=2)
    bias = make((c_out,), dtype, seed=3)
    run_and_compare(lambda x, w, b: sim.conv3x3(x, w, b, stride, activation),
                    conv_ref(stride), (x, weight, bias), dtype, fmt, relu=activation == "relu")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("stride", [2, 1])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("n,c_in,c_out,h,w", CONV_SHAPES)
def test_conv_transpose3x3(n, c_in, c_out, h, w, fmt, stride, activation, dtype):
    x = make((n, c_in, h, w), dtype, fmt)
    weight = make((c_in, c_out, 3, 3), dtype, seed=2)
    bias = make((c_out,), dtype, seed=3)
    run_and_compare(lambda x, w, b: sim.conv_transpose3x3(x, w, b, stride, activation),
                    conv_transpose_ref(stride), (x, weight, bias), dtype, fmt, relu=activation == "relu")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(2, 3, 7, 9), (1, 8, 8, 6), (3, 16, 1, 1), (2, 5, 4, 3), (1, 1, 5, 2)])
def test_max_pool2x2(shape, fmt, dtype):
    x = make(shape, dtype, fmt)
    run_and_compare(lambda x: sim.max_pool2x2(x), lambda x: F.max_pool2d(x, 2, ceil_mode=True), (x,), dtype, fmt)


@pytest.mark.parametrize("fmt", FORMATS)
def test_max_pool2x2_ties_nan_and_inf(fmt):
    """PyTorch's argmax: first maximum wins, NaN wins (the last one), -inf windows pick
    their first element; the gradient goes exactly there."""
    x = torch.tensor([[
        [1.0, 1.0, 2.0, float("nan"), -float("inf"), -float("inf"), 5.0],
        [1.0, 0.0, float("nan"), 2.0, -float("inf"), -float("inf"), 5.0],
        [3.0, 3.0, 0.0, 0.0, float("inf"), 1.0, -1.0],
    ]], dtype=torch.float64)
    x = torch.stack([x[0], x[0].flip(-1)]).unsqueeze(0).contiguous(memory_format=FORMATS[fmt])  # [1, 2, 3, 7]
    ours_in = x.clone().requires_grad_()
    ref_in = x.clone().requires_grad_()
    ours, ref = sim.max_pool2x2(ours_in), F.max_pool2d(ref_in, 2, ceil_mode=True)
    torch.testing.assert_close(ours, ref, equal_nan=True)
    grad = torch.arange(1.0, ref.numel() + 1, dtype=torch.float64).reshape(ref.shape)
    ours.backward(grad)
    ref.backward(grad)
    assert torch.equal(ours_in.grad, ref_in.grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
def test_reduced_precision(fmt, dtype):
    """float16 / bfloat16 accumulate in float32: close to the float64 result."""
    x = make((3, 8, 6, 5), dtype, fmt)
    w = make((16, 8, 3, 3), dtype, seed=2)
    wt = make((8, 16, 3, 3), dtype, seed=4)
    b = make((16,), dtype, seed=3)
    run_and_compare(lambda x, w, b: sim.conv3x3(x, w, b, 2, "relu"), conv_ref(2), (x, w, b), dtype, fmt, relu=True)
    run_and_compare(lambda x, w, b: sim.conv_transpose3x3(x, w, b, 2, None), conv_transpose_ref(2), (x, wt, b), dtype,
                    fmt)
    run_and_compare(lambda x: sim.max_pool2x2(x), lambda x: F.max_pool2d(x, 2, ceil_mode=True), (x,), dtype, fmt)


def test_cpu_kernels_keep_their_dtypes():
    """The emulated CUDA kernels take float16; the CPU kernels still refuse it."""
    import cae_kernels

    x = torch.randn(1, 1, 4, 4, dtype=torch.float16)
    w = torch.randn(1, 1, 3, 3, dtype=torch.float16)
    assert sim.conv3x3(x, w).dtype == torch.float16
    with pytest.raises(RuntimeError, match="do not support dtype"):
        cae_kernels.conv3x3(x, w)


@pytest.mark.parametrize("fmt", FORMATS)
def test_weight_grad_many_regions(fmt):
    """More weight-gradient regions than partial-sum blocks (512): blocks loop over
    regions. 520 images of 24 x 24 (one region each), NCHW and channels_last."""
    x = make((520, 1, 24, 24), torch.float64, fmt)
    g = make((520, 2, 24, 24), torch.float64, fmt, seed=5)
    ours, ours_bias = sim.ops.conv3x3_grad_weight(g, None, x, 1)
    ref = torch.nn.grad.conv2d_weight(x.detach(), (2, 1, 3, 3), g.detach(), 1, 1)
    torch.testing.assert_close(ours, ref, **tolerance(torch.float64))
    torch.testing.assert_close(ours_bias, g.detach().sum((0, 2, 3)), **tolerance(torch.float64))


@pytest.mark.parametrize("stride", [1, 2])
def test_shared_memory_plans_fit_every_shape(stride):
    """The planners keep dynamic shared memory within the 48 KiB a launch may take
    (the host refuses more): extreme shapes in float64, where it is tightest."""
    cases = [(600, 2, 2, 1, 1), (1, 1, 1, 1, 200), (1, 1, 1, 200, 1), (2, 40, 3, 40, 40)]
    for n, c_in, c_out, h, w in cases:
        x = make((n, c_in, h, w), torch.float64)
        weight = make((c_out, c_in, 3, 3), torch.float64, seed=2)
        y = sim.conv3x3(x, weight, None, stride)
        torch.testing.assert_close(y, F.conv2d(x, weight, None, stride, 1))
        g = make(y.shape, torch.float64, seed=4).detach()
        torch.testing.assert_close(sim.ops.conv3x3_grad_weight(g, None, x.detach(), stride)[0],
                                   torch.nn.grad.conv2d_weight(x.detach(), weight.shape, g, stride, 1))


def test_gated_backward_ops():
    """The backward ops with a relu_output gate, directly (the autograd path passes it
    only when ReLU was fused)."""
    x = make((2, 3, 6, 7), torch.float64, "nhwc")
    w = make((4, 3, 3, 3), torch.float64, seed=2)
    y = F.conv2d(x.detach(), w.detach(), None, 2, 1)
    relu_out = torch.relu(y).contiguous(memory_format=torch.channels_last)
    g = make(y.shape, torch.float64, "nhwc", seed=6).detach()
    gated = g * (relu_out > 0)
    grad_weight, grad_bias = sim.ops.conv3x3_grad_weight(g, relu_out, x.detach(), 2)
    torch.testing.assert_close(grad_weight, torch.nn.grad.conv2d_weight(x.detach(), w.shape, gated, 2, 1))
    torch.testing.assert_close(grad_bias, gated.sum((0, 2, 3)))
    torch.testing.assert_close(sim.ops.conv3x3_grad_input(g, relu_out, w.detach(), x.detach(), 2),
                               torch.nn.grad.conv2d_input(x.shape, w.detach(), gated, 2, 1))
    torch.testing.assert_close(sim.ops.bias_grad(g, relu_out), gated.sum((0, 2, 3)))


@pytest.mark.parametrize("op", ["conv3x3", "conv_transpose3x3"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("stride", [1, 2])
def test_gradcheck(op, fmt, stride):
    x = make((2, 3, 5, 4), torch.float64, fmt)
    w = make((2, 3, 3, 3) if op == "conv3x3" else (3, 2, 3, 3), torch.float64, seed=2)
    b = make((2,), torch.float64, seed=3)
    fn = getattr(sim, op)
    assert torch.autograd.gradcheck(lambda x, w, b: fn(x, w, b, stride, "relu"), (x, w, b))


@pytest.mark.parametrize("fmt", FORMATS)
def test_gradcheck_max_pool(fmt):
    x = make((1, 2, 5, 4), torch.float64, fmt)
    assert torch.autograd.gradcheck(sim.max_pool2x2, (x,))


def forward_backward(fmt, dtype=torch.float32):
    """Every kernel once: conv (stride 2, ReLU), transposed conv, max-pool, backward.
    40 images of 7 x 7: several output-tile blocks, weight-gradient regions and bias
    chunks, so every reduction adds partial sums of several blocks."""
    torch.manual_seed(0)
    x = make((40, 8, 7, 7), dtype, fmt)
    w1 = make((16, 8, 3, 3), dtype, seed=2)
    b1 = make((16,), dtype, seed=3)
    w2 = make((16, 8, 3, 3), dtype, seed=4)
    b2 = make((8,), dtype, seed=5)
    y = sim.conv3x3(x, w1, b1, 2, "relu")
    z = sim.conv_transpose3x3(y, w2, b2, 2, "relu")
    p = sim.max_pool2x2(z)
    loss = (p * torch.linspace(-1, 1, p.numel(), dtype=dtype).reshape(p.shape)).sum()
    grads = torch.autograd.grad(loss, (x, w1, b1, w2, b2))
    return [t.detach() for t in (y, z, p) + grads]


def bitwise_equal(a, b):
    """Same bits (float32), not merely equal values."""
    bits = lambda t: t.contiguous().view(-1).view(torch.int32)  # noqa: E731
    return len(a) == len(b) and all(s.shape == t.shape and s.stride() == t.stride() and torch.equal(bits(s), bits(t))
                                    for s, t in zip(a, b, strict=True))


@pytest.mark.parametrize("fmt", FORMATS)
def test_bitwise_reproducible_across_runs_and_schedules(fmt, monkeypatch):
    """Same inputs, bitwise the same outputs and gradients: run after run, and whatever
    order the emulator runs a block's threads in (a missing barrier would show here)."""
    monkeypatch.setenv("CAE_SIM_SCHEDULE", "forward")
    first = forward_backward(fmt)
    assert bitwise_equal(first, forward_backward(fmt))
    for schedule in ["reverse", "shuffle:12345"]:
        monkeypatch.setenv("CAE_SIM_SCHEDULE", schedule)
        assert bitwise_equal(first, forward_backward(fmt)), schedule


@pytest.mark.parametrize("fault,message", [
    ("early_return", "every thread must reach every barrier"),
    ("divergent_barrier", "divergent barriers"),
    ("deadlock", "deadlock"),
    ("shuffle_mask", "mask"),
    ("too_many_threads", "invalid configuration"),
    ("empty_grid", "invalid configuration"),
])
def test_kernel_bugs_raise(fault, message):
    with pytest.raises(RuntimeError, match=message):
        sim.ops._sim_fault(fault)
    sim.ops._sim_fault("none")  # the emulator is usable again afterwards
    x = torch.randn(1, 1, 3, 3)
    torch.testing.assert_close(sim.max_pool2x2(x), F.max_pool2d(x, 2, ceil_mode=True))


def test_schedule_env_is_read_per_launch(monkeypatch):
    monkeypatch.setenv("CAE_SIM_SCHEDULE", "no-such-order")
    with pytest.raises(RuntimeError):
        sim.max_pool2x2(torch.randn(1, 1, 2, 2))


def test_many_channel_groups():
    """40 groups of 16 output channels: blockIdx.x = group * tile blocks + tile."""
    x = make((2, 3, 5, 4), torch.float64)
    w = make((640, 3, 3, 3), torch.float64, seed=2)
    torch.testing.assert_close(sim.conv3x3(x, w, None, 2), F.conv2d(x, w, None, 2, 1))
    wt = make((3, 640, 3, 3), torch.float64, seed=2)
    torch.testing.assert_close(sim.conv_transpose3x3(x, wt, None, 1), F.conv_transpose2d(x, wt, None, 1, 1))


def test_errors_name_the_problem():
    with pytest.raises(RuntimeError, match="stride must be 1 or 2"):
        sim.ops.conv3x3(torch.randn(1, 1, 3, 3), torch.randn(1, 1, 3, 3), None, 3, False)
    with pytest.raises(ValueError, match="activation"):
        sim.conv3x3(torch.randn(1, 1, 3, 3), torch.randn(1, 1, 3, 3), activation="tanh")


def test_batch_zero_and_empty():
    x = torch.randn(0, 3, 5, 5, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    y = sim.conv3x3(x, w, None, 2)
    assert y.shape == (0, 4, 3, 3)
    (gw,) = torch.autograd.grad(y.sum(), (w,))
    assert torch.equal(gw, torch.zeros_like(w))
    assert sim.max_pool2x2(torch.randn(0, 2, 3, 3)).shape == (0, 2, 2, 2)


@pytest.mark.skipif(os.environ.get("CAE_SIM_SANITIZE") is None, reason="a sanitizer build only")
def test_sanitizer_build_is_loaded():
    """Under scripts/sim_sanitize.sh the tests above ran in the sanitized build, with its runtime."""
    sanitize = os.environ["CAE_SIM_SANITIZE"].strip().lower()
    sim.max_pool2x2(torch.randn(1, 1, 2, 2))  # the emulated ops are loaded
    with open("/proc/self/maps") as maps:
        mapped = {line.split()[-1].rsplit("/", 1)[-1] for line in maps if "/" in line}
    name = sim._build_options()[0]
    assert name.startswith(f"{sim.NAMESPACE}_{sanitize}") and f"{name}.so" in mapped, sorted(mapped)
    assert f"{sim.NAMESPACE}.so" not in mapped  # not the plain build
    assert any(lib.startswith(f"lib{sanitize[0]}san.so") for lib in mapped), sorted(mapped)
