"""The CUDA kernels' tiling (csrc/cuda), on both backends that run them: the emulator
everywhere, a GPU where there is one (tests/backends.py). Shapes that push the
planners -- many weight-gradient regions, many channel groups, extreme shared-memory
plans -- yet stay small enough for the emulator, in float64 against
torch.nn.functional."""

import pytest
import torch

from cae_kernels import reference

from backends import FORMATS, assert_close, make_input, on_cuda_kernels

F64 = torch.float64


@pytest.mark.parametrize("fmt", FORMATS)
@on_cuda_kernels()
def test_weight_grad_many_regions(backend, fmt):
    """More weight-gradient regions than partial-sum blocks (512): blocks loop over
    regions. 520 images of 24 x 24 (one region each), NCHW and channels_last."""
    x = make_input((520, 1, 24, 24), F64, backend.device, fmt).detach()
    g = make_input((520, 2, 24, 24), F64, backend.device, fmt).detach()
    ours, ours_bias = backend.ops.conv3x3_grad_weight(g, None, x, 1)
    ref = torch.nn.grad.conv2d_weight(x, (2, 1, 3, 3), g, 1, 1)
    assert_close(ours, ref, backend.tolerance(F64, ref), "weight gradient")
    assert_close(ours_bias, g.sum((0, 2, 3)), backend.tolerance(F64, ref), "bias gradient")


@pytest.mark.parametrize("stride", [1, 2])
@on_cuda_kernels()
def test_shared_memory_plans_fit_every_shape(backend, stride):
    """The planners keep dynamic shared memory within the 48 KiB a launch may take
    (the host refuses more): extreme shapes in float64, where it is tightest."""
    cases = [(600, 2, 2, 1, 1), (1, 1, 1, 1, 200), (1, 1, 1, 200, 1), (2, 40, 3, 40, 40)]
    for n, c_in, c_out, h, w in cases:
        x = make_input((n, c_in, h, w), F64, backend.device).detach()
        weight = make_input((c_out, c_in, 3, 3), F64, backend.device).detach()
        y = backend.functions.conv3x3(x, weight, None, stride)
        expected = reference.conv3x3(x, weight, None, stride)
        assert_close(y, expected, backend.tolerance(F64, expected), f"output of {x.shape}")
        g = torch.randn_like(y)
        expected = torch.nn.grad.conv2d_weight(x, weight.shape, g, stride, 1)
        ours, _ = backend.ops.conv3x3_grad_weight(g, None, x, stride)
        assert_close(ours, expected, backend.tolerance(F64, expected), f"weight gradient of {x.shape}")


@on_cuda_kernels()
def test_many_channel_groups(backend):
    """40 groups of 16 output channels: blockIdx.x = group * tile blocks + tile."""
    x = make_input((2, 3, 5, 4), F64, backend.device).detach()
    w = make_input((640, 3, 3, 3), F64, backend.device).detach()
    expected = reference.conv3x3(x, w, None, 2)
    assert_close(backend.functions.conv3x3(x, w, None, 2), expected, backend.tolerance(F64, expected), "conv3x3")
    wt = make_input((3, 640, 3, 3), F64, backend.device).detach()
    expected = reference.conv_transpose3x3(x, wt, None, 1)
    assert_close(backend.functions.conv_transpose3x3(x, wt, None, 1), expected, backend.tolerance(F64, expected),
                 "conv_transpose3x3")


@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transposed"])
@pytest.mark.parametrize("fmt", FORMATS)
@on_cuda_kernels()
def test_whole_backward_adds_the_weight_sums_in_the_input_gradients_launch(backend, fmt, transposed):
    """A layer's whole backward: the weight gradient's partial sums are added by extra
    blocks of the input gradient's launch (2330 columns: 73 blocks of sums behind the
    correlation's own), bitwise equal to the separate ops, which add them in a launch of
    their own. Gated, stride 2, a batch that spreads over several partial rows."""
    c_in, c_out, stride = 10, 16, 2
    x = make_input((9, c_in, 11, 13), torch.float32, backend.device, fmt).detach()
    if transposed:
        w = make_input((c_in, c_out, 3, 3), torch.float32, backend.device).detach()
        g = make_input((9, c_out, 22, 26), torch.float32, backend.device, fmt).detach()
        whole = backend.ops.conv_transpose3x3_backward
        grad_input = backend.ops.conv_transpose3x3_grad_input(g, g, w, x, stride)
        grad_weight, grad_bias = backend.ops.conv_transpose3x3_grad_weight(g, g, x, stride)
    else:
        w = make_input((c_out, c_in, 3, 3), torch.float32, backend.device).detach()
        g = make_input((9, c_out, 6, 7), torch.float32, backend.device, fmt).detach()
        whole = backend.ops.conv3x3_backward
        grad_input = backend.ops.conv3x3_grad_input(g, g, w, x, stride)
        grad_weight, grad_bias = backend.ops.conv3x3_grad_weight(g, g, x, stride)
    ours = whole(g, g, w, x, stride)
    separate = (grad_input, grad_weight, grad_bias)
    for got, expected, what in zip(ours, separate, ("input", "weight", "bias"), strict=True):
        assert torch.equal(got, expected), f"{what} gradient differs from the separate op's"


@pytest.mark.parametrize(
    "shape",
    [
        # 130 images of 16 x 16 at stride 1: regions of 64 positions (520, more than the
        # 512 partial rows: some blocks add a second region), 2 passes over 16 units
        (130, 8, 8, 16, 1),
        # stride 2, 24 channels of b: more than a region's shared memory holds at once,
        # so the channels are staged in chunks
        (2, 8, 24, 16, 2),
    ],
    ids=["regions-over-partial-rows", "channels-in-chunks"],
)
@on_cuda_kernels()
def test_weight_grad_staging(backend, shape):
    """The weight gradient stages every channel of a region at once where it fits, in
    chunks where it does not, and a block with several regions adds them up in order."""
    n, c_out, c_in, size, stride = shape
    x = make_input((n, c_in, size, size), F64, backend.device).detach()
    out_size = (size - 1) // stride + 1
    g = make_input((n, c_out, out_size, out_size), F64, backend.device).detach()
    ours, ours_bias = backend.ops.conv3x3_grad_weight(g, g, x, stride)
    gated = g * (g > 0)
    ref = torch.nn.grad.conv2d_weight(x, (c_out, c_in, 3, 3), gated, stride, 1)
    assert_close(ours, ref, backend.tolerance(F64, ref), "weight gradient")
    assert_close(ours_bias, gated.sum((0, 2, 3)), backend.tolerance(F64, ref), "bias gradient")
