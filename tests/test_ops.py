"""The ops against torch.nn.functional, forward and backward, on every backend built
and present here (the CPU kernels at every instruction-set level this CPU runs, CUDA
with a GPU)."""

import math

import pytest
import torch
import torch.nn.functional as F

import cae_kernels
from backends import device, on_every_backend  # noqa: F401  (device: the fixture)
from cae_kernels import nn as cnn

CPU_DTYPES = (torch.float32, torch.float64)
FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}

# (C_in, C_out, H, W): the autoencoder's own layers at 28x28 (encoder 1->16->16->8...,
# decoder 8->8->16->1 at 4/8/16/32), a 1x1 image, odd sizes, one channel.
CONV_SHAPES = [
    (1, 16, 28, 28), (16, 16, 28, 28), (16, 8, 14, 14), (8, 8, 7, 7), (8, 8, 4, 4),
    (8, 16, 16, 16), (16, 1, 32, 32), (3, 5, 1, 1), (3, 4, 7, 13), (1, 1, 13, 7),
    # The CPU products' edges: rows not a multiple of the tile, columns short of a
    # vector, 8 or 16 channels (one-register rows, paired k, tap-blocked weight grads).
    (16, 1, 5, 7), (8, 3, 6, 5), (16, 5, 9, 7), (8, 8, 5, 9),
]


def reference(op, *args, **kwargs):
    """The functional op in float64 on the CPU."""
    cast = [a.detach().double().cpu().requires_grad_(a.requires_grad) if torch.is_tensor(a) else a for a in args]
    return op(*cast, **kwargs), cast


def tolerance(dtype, expected):
    scale = max(1.0, expected.abs().max().item())
    return {"rtol": 1e-4, "atol": 2e-4 * scale} if dtype == torch.float32 else {"rtol": 1e-9, "atol": 1e-9 * scale}


def assert_close(actual, expected, dtype):
    torch.testing.assert_close(actual.double().cpu(), expected.detach(), **tolerance(dtype, expected))


def make_input(n, c, h, w, dtype, device, fmt, noncontiguous=False):
    if noncontiguous:  # every other column of a wider tensor: neither layout's strides
        x = torch.randn(n, c, h, 2 * w, dtype=dtype, device=device)[..., ::2]
        assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
        return x.requires_grad_()
    return torch.randn(n, c, h, w, dtype=dtype, device=device).to(memory_format=FORMATS[fmt]).requires_grad_()


def check_forward_backward(ours, ref, inputs, ref_inputs, dtype, fmt):
    assert_close(ours, ref, dtype)
    if fmt == "nhwc" and ours.numel():
        assert ours.is_contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(ref)
    ours.backward(grad.to(ours.dtype).to(ours.device))
    ref.backward(grad)
    for mine, theirs in zip(inputs, ref_inputs):
        if mine is not None:
            assert mine.grad is not None
            assert_close(mine.grad, theirs.grad, dtype)


def every_conv_case(test):
    """The grid both convolution families are tested over."""
    marks = [
        on_every_backend,
        pytest.mark.parametrize("dtype", CPU_DTYPES),
        pytest.mark.parametrize("fmt", ["nchw", "nhwc"]),
        pytest.mark.parametrize("stride", [1, 2]),
        pytest.mark.parametrize("activation", [None, "relu"]),
        pytest.mark.parametrize("c_in,c_out,h,w", CONV_SHAPES),
    ]
    for mark in marks:
        test = mark(test)
    return test


@every_conv_case
def test_conv3x3(device, dtype, fmt, stride, activation, c_in, c_out, h, w):
    x = make_input(3, c_in, h, w, dtype, device, fmt)
    weight = torch.randn(c_out, c_in, 3, 3, dtype=dtype, device=device, requires_grad=True)
    bias = torch.randn(c_out, dtype=dtype, device=device, requires_grad=True)
    ours = cae_kernels.conv3x3(x, weight, bias, stride, activation)
    ref, ref_inputs = reference(F.conv2d, x, weight, bias, stride, 1)
    ref = F.relu(ref) if activation else ref
    check_forward_backward(ours, ref, (x, weight, bias), ref_inputs, dtype, fmt)


@every_conv_case
def test_conv_transpose3x3(device, dtype, fmt, stride, activation, c_in, c_out, h, w):
    h, w = (math.ceil(h / stride), math.ceil(w / stride))  # keep outputs near the layer sizes
    x = make_input(3, c_in, h, w, dtype, device, fmt)
    weight = torch.randn(c_in, c_out, 3, 3, dtype=dtype, device=device, requires_grad=True)
    bias = torch.randn(c_out, dtype=dtype, device=device, requires_grad=True)
    ours = cae_kernels.conv_transpose3x3(x, weight, bias, stride, activation)
    assert ours.shape == (3, c_out, stride * h, stride * w)
    ref, ref_inputs = reference(F.conv_transpose2d, x, weight, bias, stride, 1, stride - 1)
    ref = F.relu(ref) if activation else ref
    check_forward_backward(ours, ref, (x, weight, bias), ref_inputs, dtype, fmt)


@on_every_backend
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("fmt", ["nchw", "nhwc"])
@pytest.mark.parametrize("c,h,w", [(16, 28, 28), (16, 14, 14), (8, 7, 7), (1, 1, 1), (3, 13, 8), (5, 2, 9)])
def test_max_pool2x2(device, dtype, fmt, c, h, w):
    x = make_input(3, c, h, w, dtype, device, fmt)
    ours = cae_kernels.max_pool2x2(x)
    ref, ref_inputs = reference(F.max_pool2d, x, 2, ceil_mode=True)
    assert ours.shape == (3, c, (h + 1) // 2, (w + 1) // 2)
    check_forward_backward(ours, ref, (x,), ref_inputs, dtype, fmt)


@on_every_backend
@pytest.mark.parametrize("fmt", ["nchw", "nhwc"])
def test_max_pool2x2_ties_and_nan_follow_pytorch(device, fmt):
    x = torch.randint(-2, 3, (2, 3, 9, 7), dtype=torch.float64, device=device)  # many ties
    x[0, 1, 2, 3] = float("nan")
    x[1, 2, 4, 4] = float("-inf")
    x[1, 2, 8, 6] = float("nan")
    x[0, 2, 0:2, 0:2] = float("-inf")  # a whole window of -inf: the first one wins
    x[1, 0, 8, :] = float("-inf")  # the odd last row's partial windows, all -inf
    x[1, 1, :, 6] = float("-inf")  # the odd last column's
    x = x.to(memory_format=FORMATS[fmt]).requires_grad_()
    ours = cae_kernels.max_pool2x2(x)
    ref = F.max_pool2d(x, 2, ceil_mode=True)
    torch.testing.assert_close(ours, ref, equal_nan=True)
    grad = torch.randn_like(ref)
    (ours_grad,) = torch.autograd.grad(ours, x, grad)
    (ref_grad,) = torch.autograd.grad(ref, x, grad)
    torch.testing.assert_close(ours_grad, ref_grad)


@on_every_backend
@pytest.mark.parametrize("op", ["conv3x3", "conv_transpose3x3", "max_pool2x2"])
def test_noncontiguous_inputs(device, op):
    x = make_input(2, 4, 9, 6, torch.float64, device, "nchw", noncontiguous=True)
    weight = torch.randn(4, 4, 3, 3, dtype=torch.float64, device=device, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, device=device, requires_grad=True)
    if op == "conv3x3":
        ours = cae_kernels.conv3x3(x, weight.transpose(2, 3), bias, 2, "relu")
        ref, ref_inputs = reference(lambda x, w, b: F.relu(F.conv2d(x, w.transpose(2, 3), b, 2, 1)), x, weight, bias)
    elif op == "conv_transpose3x3":
        ours = cae_kernels.conv_transpose3x3(x, weight.transpose(2, 3), bias, 2, "relu")
        ref, ref_inputs = reference(
            lambda x, w, b: F.relu(F.conv_transpose2d(x, w.transpose(2, 3), b, 2, 1, 1)), x, weight, bias
        )
    else:
        ours = cae_kernels.max_pool2x2(x)
        ref, ref_inputs = reference(F.max_pool2d, x, 2, ceil_mode=True)
        weight = bias = None
    check_forward_backward(ours, ref, (x, weight, bias), ref_inputs, torch.float64, "nchw")


@on_every_backend
@pytest.mark.parametrize("fmt", ["nchw", "nhwc"])
def test_batch_zero_gives_empty_output_and_zero_gradients(device, fmt):
    x = make_input(0, 3, 8, 8, torch.float32, device, fmt)
    weight = torch.randn(4, 3, 3, 3, device=device, requires_grad=True)
    bias = torch.randn(4, device=device, requires_grad=True)
    weight_t = torch.randn(3, 4, 3, 3, device=device, requires_grad=True)
    outputs = [
        cae_kernels.conv3x3(x, weight, bias, 2, "relu"),
        cae_kernels.conv_transpose3x3(x, weight_t, bias, 2, "relu"),
        cae_kernels.max_pool2x2(x),
    ]
    assert [tuple(o.shape) for o in outputs] == [(0, 4, 4, 4), (0, 4, 16, 16), (0, 3, 4, 4)]
    sum(o.sum() for o in outputs).backward()
    assert x.grad.shape == x.shape
    for p in (weight, bias, weight_t):
        assert torch.equal(p.grad, torch.zeros_like(p))


@on_every_backend
@pytest.mark.parametrize("needs", ["input", "weight", "bias"])
def test_only_needed_gradients_are_computed(device, needs):
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, device=device, requires_grad=needs == "input")
    weight = torch.randn(4, 3, 3, 3, dtype=torch.float64, device=device, requires_grad=needs == "weight")
    bias = torch.randn(4, dtype=torch.float64, device=device, requires_grad=needs == "bias")
    cae_kernels.conv3x3(x, weight, bias, 1, "relu").sum().backward()
    for name, t in (("input", x), ("weight", weight), ("bias", bias)):
        assert (t.grad is not None) == (name == needs)


# Small shapes, float64: gradcheck on every op and option, both layouts.
@on_every_backend
@pytest.mark.parametrize("fmt", ["nchw", "nhwc"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("transposed", [False, True])
def test_conv_gradcheck(device, fmt, stride, activation, with_bias, transposed):
    x = make_input(2, 3, 5, 4, torch.float64, device, fmt)
    shape = (3, 2, 3, 3) if transposed else (2, 3, 3, 3)
    weight = torch.randn(shape, dtype=torch.float64, device=device, requires_grad=True)
    bias = torch.randn(2, dtype=torch.float64, device=device, requires_grad=True) if with_bias else None
    op = cae_kernels.conv_transpose3x3 if transposed else cae_kernels.conv3x3
    assert torch.autograd.gradcheck(lambda x, w, b: op(x, w, b, stride, activation), (x, weight, bias))


@on_every_backend
@pytest.mark.parametrize("fmt", ["nchw", "nhwc"])
def test_max_pool_gradcheck(device, fmt):
    x = make_input(2, 3, 7, 6, torch.float64, device, fmt)
    assert torch.autograd.gradcheck(cae_kernels.max_pool2x2, (x,))


def opcheck_samples(device):
    def t(*shape, fmt="nchw", grad=True):
        return make_input(*shape, torch.float64, device, fmt) if len(shape) == 4 and fmt else torch.randn(
            shape, dtype=torch.float64, device=device, requires_grad=grad
        )

    ops = torch.ops.cae
    for fmt in ("nchw", "nhwc"):
        for stride in (1, 2):
            x = t(2, 3, 7, 6, fmt=fmt)
            yield ops.conv3x3, (x, t(4, 3, 3, 3, fmt=None), t(4, fmt=None), stride, True)
            yield ops.conv3x3, (x, t(4, 3, 3, 3, fmt=None), None, stride, False)
            yield ops.conv_transpose3x3, (x, t(3, 4, 3, 3, fmt=None), t(4, fmt=None), stride, True)
            h = (7 + stride - 1) // stride
            g = make_input(2, 4, h, (6 + stride - 1) // stride, torch.float64, device, fmt).detach()
            yield ops.conv3x3_grad_input, (g, g.relu(), t(4, 3, 3, 3, fmt=None, grad=False), x.detach(), stride)
            yield ops.conv3x3_grad_weight, (g, None, x.detach(), stride)
            gt = make_input(2, 4, 7 * stride, 6 * stride, torch.float64, device, fmt).detach()
            yield ops.conv_transpose3x3_grad_input, (gt, gt.relu(), t(3, 4, 3, 3, fmt=None, grad=False), x.detach(), stride)
            yield ops.conv_transpose3x3_grad_weight, (gt, None, x.detach(), stride)
        yield ops.bias_grad, (x.detach(), x.detach().relu())
        yield ops.max_pool2x2, (x,)
        yield ops.max_pool2x2_grad_input, (t(2, 3, 4, 3, fmt=fmt).detach(), x.detach())


@on_every_backend
@pytest.mark.parametrize("fmt", ["nchw", "nhwc"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("c_in,c_out", [(0, 5), (3, 5), (16, 8), (8, 16), (16, 1)])
def test_weight_grad_ops_return_the_bias_gradient(device, fmt, stride, transposed, c_in, c_out):
    """The weight-gradient ops sum the gated output gradient per channel in the same
    pass (with no input channels, alone)."""
    x = make_input(2, c_in, 7, 6, torch.float64, device, fmt).detach()
    if transposed:
        op, out_shape = torch.ops.cae.conv_transpose3x3_grad_weight, (2, c_out, 7 * stride, 6 * stride)
    else:
        op, out_shape = torch.ops.cae.conv3x3_grad_weight, (2, c_out, math.ceil(7 / stride), math.ceil(6 / stride))
    g = make_input(*out_shape, torch.float64, device, fmt).detach()
    relu_output = make_input(*out_shape, torch.float64, device, fmt).detach().relu()
    for gate in (relu_output, None):
        _, grad_bias = op(g, gate, x, stride)
        gated = g if gate is None else g * (gate > 0)
        assert_close(grad_bias, gated.sum((0, 2, 3)), torch.float64)


@on_every_backend
def test_opcheck(device):
    for op, args in opcheck_samples(device):
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    conv = cnn.Conv3x3(1, 4, stride=2, activation="relu").double()
    up = cnn.ConvTranspose3x3(4, 2, stride=2, activation="relu").double()

    def model(x):
        return up(cae_kernels.max_pool2x2(conv(x))).sum()

    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 1, 13, 13, dtype=torch.float64)
    expected = model(x)
    expected_grads = torch.autograd.grad(expected, list(conv.parameters()) + list(up.parameters()))
    actual = compiled(x)
    actual_grads = torch.autograd.grad(actual, list(conv.parameters()) + list(up.parameters()))
    torch.testing.assert_close(actual, expected)
    for a, e in zip(actual_grads, expected_grads):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("stride", [1, 2])
def test_modules_exchange_state_dicts_with_pytorch_layers(transposed, stride):
    if transposed:
        ours = cnn.ConvTranspose3x3(3, 5, stride=stride, activation="relu").double()
        theirs = torch.nn.ConvTranspose2d(3, 5, 3, stride, padding=1, output_padding=stride - 1).double()
    else:
        ours = cnn.Conv3x3(3, 5, stride=stride, activation="relu").double()
        theirs = torch.nn.Conv2d(3, 5, 3, stride, padding=1).double()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    torch.testing.assert_close(ours(x), F.relu(theirs(x)))
    ours.load_state_dict(theirs.state_dict())
    pool = cnn.MaxPool2x2()
    torch.testing.assert_close(pool(x), torch.nn.MaxPool2d(2, ceil_mode=True)(x))
    assert "stride=" in repr(ours)


def test_module_default_init_matches_pytorch_statistics():
    ours = cnn.Conv3x3(16, 16).weight
    theirs = torch.nn.Conv2d(16, 16, 3).weight
    bound = 1 / math.sqrt(16 * 9)  # kaiming_uniform(a=sqrt(5)) on fan_in 144
    assert ours.abs().max() <= bound and theirs.abs().max() <= bound
    assert ours.abs().max() > 0.9 * bound


# Bad input: a clear error naming the problem and the values.
def bad_inputs():
    x = torch.randn(2, 3, 8, 8)
    w = torch.randn(4, 3, 3, 3)
    wt = torch.randn(3, 4, 3, 3)
    b = torch.randn(4)
    yield "input 3-D", lambda: cae_kernels.conv3x3(x[0], w), r"input must be a 4-D \(N, C, H, W\) tensor, got 3-D"
    yield "weight 5x5", lambda: cae_kernels.conv3x3(x, torch.randn(4, 3, 5, 5)), r"weight must be \[C_out, C_in, 3, 3\], got sizes \[4, 3, 5, 5\]"
    yield "weight 2-D", lambda: cae_kernels.conv3x3(x, torch.randn(4, 3)), r"weight must be \[C_out, C_in, 3, 3\], got sizes \[4, 3\]"
    yield "channels", lambda: cae_kernels.conv3x3(x, torch.randn(4, 2, 3, 3)), r"input has 3 channels but weight of sizes \[4, 2, 3, 3\] expects 2"
    yield "transposed channels", lambda: cae_kernels.conv_transpose3x3(x, torch.randn(4, 3, 3, 3)), r"input has 3 channels but weight of sizes \[4, 3, 3, 3\] expects 4"
    yield "bias size", lambda: cae_kernels.conv3x3(x, w, torch.randn(5)), r"bias must have sizes \[4\], got \[5\]"
    yield "transposed bias size", lambda: cae_kernels.conv_transpose3x3(x, wt, torch.randn(3)), r"bias must have sizes \[4\], got \[3\]"
    yield "weight dtype", lambda: cae_kernels.conv3x3(x, w.double()), r"weight has dtype Double but input has dtype Float"
    yield "bias dtype", lambda: cae_kernels.conv3x3(x, w, b.double()), r"bias has dtype Double but input has dtype Float"
    yield "integer input", lambda: cae_kernels.max_pool2x2(x.long()), r"CPU kernels do not support dtype Long \(supported: float32, float64\)"
    yield "half on CPU", lambda: cae_kernels.conv3x3(x.half(), w.half()), r"do not support dtype Half"
    yield "stride 3", lambda: cae_kernels.conv3x3(x, w, stride=3), r"stride must be 1 or 2, got 3"
    yield "stride 3 (op)", lambda: torch.ops.cae.conv3x3(x, w, None, 3, False), r"stride must be 1 or 2, got 3"
    yield "activation", lambda: cae_kernels.conv3x3(x, w, activation="tanh"), r"activation must be None or 'relu', got 'tanh'"
    yield "pool 2-D", lambda: cae_kernels.max_pool2x2(torch.randn(4, 4)), r"input must be a 4-D"
    yield "grad_output shape", lambda: torch.ops.cae.conv3x3_grad_input(torch.randn(2, 4, 5, 5), None, w, x, 2), r"grad_output must have sizes \[2, 4, 4, 4\]"
    yield "relu_output shape", lambda: torch.ops.cae.bias_grad(torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 4)), r"relu_output must have sizes \[2, 4, 5, 5\]"
    yield "pool grad shape", lambda: torch.ops.cae.max_pool2x2_grad_input(torch.randn(2, 3, 3, 4), x), r"grad_output must have sizes \[2, 3, 4, 4\]"
    yield "module stride", lambda: cnn.Conv3x3(3, 4, stride=4), r"stride must be 1 or 2, got 4"
    yield "module activation", lambda: cnn.ConvTranspose3x3(3, 4, activation="gelu"), r"activation must be None or 'relu'"


@pytest.mark.parametrize("call,pattern", [pytest.param(c, p, id=name) for name, c, p in bad_inputs()])
def test_bad_input_gets_a_clear_error(call, pattern):
    with pytest.raises((RuntimeError, ValueError), match=pattern):
        call()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_mismatch_is_named():
    x = torch.randn(2, 3, 8, 8, device="cuda")
    with pytest.raises(RuntimeError, match=r"weight is on device cpu but input is on device cuda:0"):
        cae_kernels.conv3x3(x, torch.randn(4, 3, 3, 3))


@pytest.mark.skipif(cae_kernels.with_cuda, reason="checks the CUDA stub of a CPU-only build")
def test_cpu_only_build_names_missing_cuda():
    cuda_keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    x, w = torch.randn(1, 1, 4, 4), torch.randn(1, 1, 3, 3)
    with pytest.raises(RuntimeError, match=r"cae::conv3x3 got a CUDA tensor, but cae_kernels was built without CUDA"):
        torch.ops.cae.conv3x3.default.redispatch(cuda_keys, x, w, None, 1, False)
