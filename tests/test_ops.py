"""The op suite: every op against torch.nn.functional in float64 (cae_kernels.reference),
forward and backward, on every backend built and present here (tests/backends.py: the
CPU kernels at each instruction-set level this CPU runs, the CUDA kernels under the
emulator, and on a GPU), each at its own dtypes, shapes and tolerances."""

import math

import pytest
import torch

import cae_kernels
from cae_kernels import nn as cnn
from cae_kernels import reference
from cae_kernels.functional import _Functions

from backends import FORMATS, HALF_DTYPES, assert_close, check_forward_backward, make_input, on_every_backend

F64 = torch.float64


def every_conv_case(test):
    """Each backend's dtypes x conv shapes, both layouts and strides, ReLU fused or not."""
    marks = [
        on_every_backend("dtype", "conv_shape"),
        pytest.mark.parametrize("fmt", FORMATS),
        pytest.mark.parametrize("stride", [1, 2]),
        pytest.mark.parametrize("activation", [None, "relu"]),
    ]
    for mark in marks:
        test = mark(test)
    return test


def conv_inputs(backend, dtype, shape, fmt, transposed):
    n, c_in, c_out, h, w = shape
    # Half precision: keep sums of 9 * C_in products well inside float16's range.
    scale = 0.5 if dtype in HALF_DTYPES else 1.0
    x = make_input((n, c_in, h, w), dtype, backend.device, fmt, scale=scale)
    weight = make_input((c_in, c_out, 3, 3) if transposed else (c_out, c_in, 3, 3), dtype, backend.device, scale=scale)
    bias = make_input((c_out,), dtype, backend.device)
    return x, weight, bias


@every_conv_case
def test_conv3x3(backend, dtype, conv_shape, fmt, stride, activation):
    check_forward_backward(
        backend,
        lambda x, w, b: backend.functions.conv3x3(x, w, b, stride, activation),
        lambda x, w, b: reference.conv3x3(x, w, b, stride),
        conv_inputs(backend, dtype, conv_shape, fmt, transposed=False),
        relu=activation == "relu",
    )


@every_conv_case
def test_conv_transpose3x3(backend, dtype, conv_shape, fmt, stride, activation):
    n, c_in, c_out, h, w = conv_shape
    if backend.transposed_to_grid_size:
        h, w = math.ceil(h / stride), math.ceil(w / stride)
    out = check_forward_backward(
        backend,
        lambda x, w, b: backend.functions.conv_transpose3x3(x, w, b, stride, activation),
        lambda x, w, b: reference.conv_transpose3x3(x, w, b, stride),
        conv_inputs(backend, dtype, (n, c_in, c_out, h, w), fmt, transposed=True),
        relu=activation == "relu",
    )
    assert out.shape == (n, c_out, stride * h, stride * w)


@pytest.mark.parametrize("fmt", FORMATS)
@on_every_backend("dtype", "pool_shape")
def test_max_pool2x2(backend, dtype, pool_shape, fmt):
    x = make_input(pool_shape, dtype, backend.device, fmt)
    out = check_forward_backward(backend, backend.functions.max_pool2x2, reference.max_pool2x2, (x,), exact=True)
    n, c, h, w = pool_shape
    assert out.shape == (n, c, (h + 1) // 2, (w + 1) // 2)


@pytest.mark.parametrize("fmt", FORMATS)
@on_every_backend("dtype")
def test_max_pool2x2_ties_nan_and_inf_follow_pytorch(backend, dtype, fmt):
    """PyTorch's argmax: the first maximum wins, a NaN wins, a window of -inf picks its
    first element; the gradient goes exactly there."""
    x = torch.randint(-2, 3, (2, 3, 9, 7), dtype=F64)  # many ties
    x[0, 1, 2, 3] = x[0, 1, 3, 2] = float("nan")  # two NaNs in one window
    x[0, 0, 4, 4] = float("inf")
    x[1, 2, 4, 4] = float("-inf")
    x[1, 2, 8, 6] = float("nan")  # alone in the last, partial window
    x[0, 2, 0:2, 0:2] = float("-inf")  # a whole window of -inf
    x[1, 0, 8, :] = float("-inf")  # the odd last row's partial windows, all -inf
    x[1, 1, :, 6] = float("-inf")  # the odd last column's
    x = x.to(backend.device, dtype).contiguous(memory_format=FORMATS[fmt]).requires_grad_()
    check_forward_backward(backend, backend.functions.max_pool2x2, reference.max_pool2x2, (x,), exact=True)


@pytest.mark.parametrize("op", ["conv3x3", "conv_transpose3x3", "max_pool2x2"])
@on_every_backend()
def test_noncontiguous_inputs(backend, op):
    x = make_input((2, 4, 9, 6), F64, backend.device, noncontiguous=True)
    if op == "max_pool2x2":
        check_forward_backward(backend, backend.functions.max_pool2x2, reference.max_pool2x2, (x,), exact=True)
        return
    weight = make_input((4, 4, 3, 3), F64, backend.device).detach().transpose(2, 3).requires_grad_()
    bias = make_input((4,), F64, backend.device)
    ours, ref = getattr(backend.functions, op), getattr(reference, op)
    check_forward_backward(
        backend, lambda x, w, b: ours(x, w, b, 2, "relu"), lambda x, w, b: ref(x, w, b, 2), (x, weight, bias), relu=True
    )


@pytest.mark.parametrize("fmt", FORMATS)
@on_every_backend()
def test_batch_zero_gives_empty_output_and_zero_gradients(backend, fmt):
    f, device = backend.functions, backend.device
    x = make_input((0, 3, 8, 7), torch.float32, device, fmt)
    weight = make_input((4, 3, 3, 3), torch.float32, device)
    weight_t = make_input((3, 4, 3, 3), torch.float32, device)
    bias = make_input((4,), torch.float32, device)
    outputs = [f.conv3x3(x, weight, bias, 2, "relu"), f.conv_transpose3x3(x, weight_t, bias, 2, "relu"), f.max_pool2x2(x)]
    assert [tuple(o.shape) for o in outputs] == [(0, 4, 4, 4), (0, 4, 16, 14), (0, 3, 4, 4)]
    assert all(o.device == x.device for o in outputs)
    sum(o.sum() for o in outputs).backward()
    assert x.grad.shape == x.shape
    for p in (weight, bias, weight_t):
        assert torch.equal(p.grad, torch.zeros_like(p))


@pytest.mark.parametrize("transposed", [False, True])
@on_every_backend()
def test_zero_input_channels_give_the_activated_bias(backend, transposed):
    """No input channel: every output is act(bias) (the emulated CUDA planner divided by
    the channel count here), and the weight's gradient is empty."""
    x = make_input((2, 0, 5, 4), F64, backend.device)
    weight = make_input((0, 3, 3, 3) if transposed else (3, 0, 3, 3), F64, backend.device)
    bias = torch.tensor([0.5, -1.0, 2.0], dtype=F64, device=backend.device, requires_grad=True)
    op = backend.functions.conv_transpose3x3 if transposed else backend.functions.conv3x3
    y = op(x, weight, bias, 2, "relu")
    assert torch.equal(y, torch.tensor([0.5, 0.0, 2.0], dtype=F64, device=backend.device).view(1, 3, 1, 1).expand_as(y))
    y.sum().backward()
    assert weight.grad.shape == weight.shape and x.grad.shape == x.shape
    assert torch.equal(bias.grad, torch.tensor([y.shape[2] * y.shape[3] * 2.0, 0.0, y.shape[2] * y.shape[3] * 2.0],
                                               dtype=F64, device=backend.device))


@pytest.mark.parametrize("needs", ["input", "weight", "bias"])
@on_every_backend()
def test_only_needed_gradients_are_computed(backend, needs):
    x = torch.randn(2, 3, 6, 6, dtype=F64, device=backend.device, requires_grad=needs == "input")
    weight = torch.randn(4, 3, 3, 3, dtype=F64, device=backend.device, requires_grad=needs == "weight")
    bias = torch.randn(4, dtype=F64, device=backend.device, requires_grad=needs == "bias")
    backend.functions.conv3x3(x, weight, bias, 1, "relu").sum().backward()
    for name, t in (("input", x), ("weight", weight), ("bias", bias)):
        assert (t.grad is not None) == (name == needs)


# Small shapes, float64: gradcheck on every op and option, both layouts.
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("transposed", [False, True])
@on_every_backend()
def test_conv_gradcheck(backend, fmt, stride, activation, with_bias, transposed):
    x = make_input((2, 3, 5, 4), F64, backend.device, fmt)
    weight = make_input((3, 2, 3, 3) if transposed else (2, 3, 3, 3), F64, backend.device)
    bias = make_input((2,), F64, backend.device) if with_bias else None
    op = backend.functions.conv_transpose3x3 if transposed else backend.functions.conv3x3
    assert torch.autograd.gradcheck(lambda x, w, b: op(x, w, b, stride, activation), (x, weight, bias))


@pytest.mark.parametrize("fmt", FORMATS)
@on_every_backend()
def test_max_pool_gradcheck(backend, fmt):
    x = make_input((2, 3, 7, 6), F64, backend.device, fmt)
    assert torch.autograd.gradcheck(backend.functions.max_pool2x2, (x,))


def opcheck_samples(backend):
    def t(*shape, fmt="nchw", grad=True):
        return make_input(shape, F64, backend.device, fmt).requires_grad_(grad)

    ops = backend.ops
    for fmt in FORMATS:
        for stride in (1, 2):
            x = t(2, 3, 7, 6, fmt=fmt)
            yield ops.conv3x3, (x, t(4, 3, 3, 3), t(4), stride, True)
            yield ops.conv3x3, (x, t(4, 3, 3, 3), None, stride, False)
            yield ops.conv_transpose3x3, (x, t(3, 4, 3, 3), t(4), stride, True)
            h = (7 + stride - 1) // stride
            g = t(2, 4, h, (6 + stride - 1) // stride, fmt=fmt, grad=False)
            yield ops.conv3x3_grad_input, (g, g.relu(), t(4, 3, 3, 3, grad=False), x.detach(), stride)
            yield ops.conv3x3_grad_weight, (g, None, x.detach(), stride)
            gt = t(2, 4, 7 * stride, 6 * stride, fmt=fmt, grad=False)
            yield ops.conv_transpose3x3_grad_input, (gt, gt.relu(), t(3, 4, 3, 3, grad=False), x.detach(), stride)
            yield ops.conv_transpose3x3_grad_weight, (gt, None, x.detach(), stride)
            yield ops.conv3x3_backward, (g, g.relu(), t(4, 3, 3, 3, grad=False), x.detach(), stride)
            yield ops.conv_transpose3x3_backward, (gt, None, t(3, 4, 3, 3, grad=False), x.detach(), stride)
        yield ops.bias_grad, (x.detach(), x.detach().relu())
        yield ops.max_pool2x2, (x,)
        yield ops.max_pool2x2_grad_input, (t(2, 3, 4, 3, fmt=fmt, grad=False), x.detach())


@on_every_backend()
def test_opcheck(backend):
    for op, args in opcheck_samples(backend):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("c_in,c_out", [(0, 5), (3, 5), (16, 8), (8, 16), (16, 1)])
@on_every_backend()
def test_weight_grad_ops_return_the_bias_gradient(backend, fmt, stride, transposed, c_in, c_out):
    """The weight-gradient ops sum the gated output gradient per channel in the same
    pass (with no input channels, alone)."""
    x = make_input((2, c_in, 7, 6), F64, backend.device, fmt).detach()
    if transposed:
        op, out_shape = backend.ops.conv_transpose3x3_grad_weight, (2, c_out, 7 * stride, 6 * stride)
    else:
        op, out_shape = backend.ops.conv3x3_grad_weight, (2, c_out, math.ceil(7 / stride), math.ceil(6 / stride))
    g = make_input(out_shape, F64, backend.device, fmt).detach()
    relu_output = make_input(out_shape, F64, backend.device, fmt).detach().relu()
    for gate in (relu_output, None):
        _, grad_bias = op(g, gate, x, stride)
        expected = (g if gate is None else g * (gate > 0)).sum((0, 2, 3))
        assert_close(grad_bias, expected, backend.tolerance(F64, expected))


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("n,c_in,c_out,h,w", [(3, 16, 16, 9, 7), (2, 8, 16, 5, 6), (1, 3, 5, 4, 9), (70, 8, 8, 3, 2),
                                               (2, 16, 1, 6, 5), (2, 1, 8, 7, 7)])
@on_every_backend()
def test_whole_backward_ops(backend, transposed, stride, fmt, gated, n, c_in, c_out, h, w):
    """conv3x3_backward / conv_transpose3x3_backward: a layer's three gradients at once
    (the CPU's one pass shares the gated gradient's copy between the input and the
    weight gradient). Ragged grids, channels in whole vectors or not, more samples than
    the 64 batch chunks, batch 1."""
    x = make_input((n, c_in, h, w), F64, backend.device, fmt).detach()
    if transposed:
        weight = make_input((c_in, c_out, 3, 3), F64, backend.device).detach()
        op, forward = backend.ops.conv_transpose3x3_backward, reference.conv_transpose3x3
    else:
        weight = make_input((c_out, c_in, 3, 3), F64, backend.device).detach()
        op, forward = backend.ops.conv3x3_backward, reference.conv3x3
    out_shape = forward(x, weight, None, stride).shape
    g = make_input(out_shape, F64, backend.device, fmt).detach()
    relu_output = make_input(out_shape, F64, backend.device, fmt).detach().relu() if gated else None
    grad_input, grad_weight, grad_bias = op(g, relu_output, weight, x, stride)
    gated_g = g * (relu_output > 0) if gated else g
    ref_x, ref_w = x.clone().requires_grad_(), weight.clone().requires_grad_()
    expected = torch.autograd.grad(forward(ref_x, ref_w, None, stride), (ref_x, ref_w), gated_g)
    assert grad_input.is_contiguous(memory_format=FORMATS[fmt])
    for name, ours, theirs in (("input", grad_input, expected[0]), ("weight", grad_weight, expected[1]),
                               ("bias", grad_bias, gated_g.sum((0, 2, 3)))):
        assert_close(ours, theirs, backend.tolerance(F64, theirs), name)


@pytest.mark.parametrize("fmt", FORMATS)
@on_every_backend()
def test_gated_backward_ops(backend, fmt):
    """The backward ops with a relu_output gate, directly (the autograd path passes it
    only when ReLU was fused)."""
    x = make_input((2, 3, 6, 7), F64, backend.device, fmt).detach()
    w = make_input((4, 3, 3, 3), F64, backend.device).detach()
    relu_out = reference.conv3x3(x, w, None, 2, "relu").contiguous(memory_format=FORMATS[fmt])
    g = make_input(relu_out.shape, F64, backend.device, fmt).detach()
    gated = g * (relu_out > 0)
    ops = backend.ops
    grad_weight, grad_bias = ops.conv3x3_grad_weight(g, relu_out, x, 2)
    expected = {
        "weight": (grad_weight, torch.nn.grad.conv2d_weight(x, w.shape, gated, 2, 1)),
        "bias": (grad_bias, gated.sum((0, 2, 3))),
        "input": (ops.conv3x3_grad_input(g, relu_out, w, x, 2), torch.nn.grad.conv2d_input(x.shape, w, gated, 2, 1)),
        "bias alone": (ops.bias_grad(g, relu_out), gated.sum((0, 2, 3))),
    }
    for name, (ours, theirs) in expected.items():
        assert_close(ours, theirs, backend.tolerance(F64, theirs), name)


def test_torch_compile_fullgraph():
    conv = cnn.Conv3x3(1, 4, stride=2, activation="relu").double()
    up = cnn.ConvTranspose3x3(4, 2, stride=2, activation="relu").double()

    def model(x):
        return up(cae_kernels.max_pool2x2(conv(x))).sum()

    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 1, 13, 13, dtype=F64)
    expected = model(x)
    expected_grads = torch.autograd.grad(expected, list(conv.parameters()) + list(up.parameters()))
    actual = compiled(x)
    actual_grads = torch.autograd.grad(actual, list(conv.parameters()) + list(up.parameters()))
    torch.testing.assert_close(actual, expected)
    for a, e in zip(actual_grads, expected_grads, strict=True):
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
    x = torch.randn(2, 3, 9, 9, dtype=F64)
    torch.testing.assert_close(ours(x), torch.relu(theirs(x)))
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


# Bad input: a clear error naming the problem and the values, the same on every backend
# (csrc/shapes.h and csrc/ops.h check for all of them).
def bad_inputs(f, ops, device):
    """(name, call, pattern) with f the backend's functions and ops its op namespace."""
    x = torch.randn(2, 3, 8, 8, device=device)
    w = torch.randn(4, 3, 3, 3, device=device)
    wt = torch.randn(3, 4, 3, 3, device=device)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(shape, dtype=dtype, device=device)

    yield "input 3-D", lambda: f.conv3x3(x[0], w), r"input must be a 4-D \(N, C, H, W\) tensor, got 3-D"
    yield "weight 5x5", lambda: f.conv3x3(x, randn(4, 3, 5, 5)), r"weight must be \[C_out, C_in, 3, 3\], got sizes \[4, 3, 5, 5\]"
    yield "weight 2-D", lambda: f.conv3x3(x, randn(4, 3)), r"weight must be \[C_out, C_in, 3, 3\], got sizes \[4, 3\]"
    yield "channels", lambda: f.conv3x3(x, randn(4, 2, 3, 3)), r"input has 3 channels but weight of sizes \[4, 2, 3, 3\] expects 2"
    yield "transposed channels", lambda: f.conv_transpose3x3(x, randn(4, 3, 3, 3)), r"input has 3 channels but weight of sizes \[4, 3, 3, 3\] expects 4"
    yield "bias size", lambda: f.conv3x3(x, w, randn(5)), r"bias must have sizes \[4\], got \[5\]"
    yield "transposed bias size", lambda: f.conv_transpose3x3(x, wt, randn(3)), r"bias must have sizes \[4\], got \[3\]"
    yield "weight dtype", lambda: f.conv3x3(x, w.double()), r"weight has dtype Double but input has dtype Float"
    yield "bias dtype", lambda: f.conv3x3(x, w, randn(4, dtype=torch.float64)), r"bias has dtype Double but input has dtype Float"
    yield "stride 3", lambda: f.conv3x3(x, w, stride=3), r"stride must be 1 or 2, got 3"
    yield "stride 3 (op)", lambda: ops.conv3x3(x, w, None, 3, False), r"stride must be 1 or 2, got 3"
    yield "activation", lambda: f.conv3x3(x, w, activation="tanh"), r"activation must be None or 'relu', got 'tanh'"
    yield "pool 2-D", lambda: f.max_pool2x2(randn(4, 4)), r"input must be a 4-D"
    yield "grad_output shape", lambda: ops.conv3x3_grad_input(randn(2, 4, 5, 5), None, w, x, 2), r"grad_output must have sizes \[2, 4, 4, 4\]"
    yield "relu_output shape", lambda: ops.bias_grad(randn(2, 4, 5, 5), randn(2, 4, 5, 4)), r"relu_output must have sizes \[2, 4, 5, 5\]"
    yield "pool grad shape", lambda: ops.max_pool2x2_grad_input(randn(2, 3, 3, 4), x), r"grad_output must have sizes \[2, 3, 4, 4\]"


@pytest.mark.parametrize("name", [name for name, _, _ in bad_inputs(cae_kernels, torch.ops.cae, "cpu")])
@on_every_backend()
def test_bad_input_gets_a_clear_error(backend, name):
    check_bad_input(backend.functions, backend.ops, backend.device, name)


def check_bad_input(functions, ops, device, name):
    """bad_inputs' case `name` raises its clear error."""
    call, pattern = {n: (c, p) for n, c, p in bad_inputs(functions, ops, device)}[name]
    with pytest.raises((RuntimeError, ValueError), match=pattern):
        call()


# ScalarType names, as the C++ messages print them.
DTYPE_NAMES = {torch.float32: "Float", torch.float64: "Double", torch.float16: "Half", torch.bfloat16: "BFloat16",
               torch.int64: "Long", torch.int32: "Int"}


@on_every_backend()
def test_unsupported_dtypes_are_named(backend):
    """Each op names the dtype it got and the dtypes the backend's kernels take."""
    supported = ", ".join(str(d).removeprefix("torch.") for d in backend.dtypes)
    unsupported = [d for d in DTYPE_NAMES if d not in backend.dtypes]
    assert unsupported
    for dtype in unsupported:
        x = torch.ones(2, 3, 8, 8, dtype=dtype, device=backend.device)
        w = torch.ones(3, 3, 3, 3, dtype=dtype, device=backend.device)
        pattern = rf"{backend.kernels} kernels do not support dtype {DTYPE_NAMES[dtype]} \(supported: {supported}\)"
        for op, args in {"conv3x3": (x, w), "conv_transpose3x3": (x, w), "max_pool2x2": (x,)}.items():
            with pytest.raises(RuntimeError, match=pattern):
                getattr(backend.functions, op)(*args)


@pytest.mark.parametrize("make,pattern", [
    (lambda: cnn.Conv3x3(3, 4, stride=4), r"stride must be 1 or 2, got 4"),
    (lambda: cnn.ConvTranspose3x3(3, 4, activation="gelu"), r"activation must be None or 'relu'"),
], ids=["stride", "activation"])
def test_modules_refuse_bad_arguments(make, pattern):
    with pytest.raises(ValueError, match=pattern):
        make()


class OpsOnCudaKey:
    """torch.ops.cae with every call sent to the CUDA dispatch key's kernels (the nvcc
    build's registration, csrc/cuda/register.cpp) whatever device its tensors are on."""

    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)

    def __getattr__(self, name):
        op = getattr(torch.ops.cae, name).default
        return lambda *args: op.redispatch(self.keys, *args)


@pytest.mark.cuda  # no GPU needed; on one it tells a crash on CUDA tensors from one in the checks
@pytest.mark.skipif(not cae_kernels.with_cuda, reason="checks the CUDA kernels' registration")
@pytest.mark.parametrize("name", [name for name, _, _ in bad_inputs(cae_kernels, torch.ops.cae, "cpu")])
def test_cuda_build_refuses_bad_input_before_the_device(name):
    """The CUDA build's own ops check every argument before they touch a device: on
    CPU tensors, on any machine, each bad input is the clear error the backends give."""
    ops = OpsOnCudaKey()
    check_bad_input(_Functions(ops), ops, "cpu", name)


@pytest.mark.skipif(cae_kernels.with_cuda, reason="checks the CUDA stub of a CPU-only build")
def test_cpu_only_build_names_missing_cuda():
    x, w = torch.randn(1, 1, 4, 4), torch.randn(1, 1, 3, 3)
    with pytest.raises(RuntimeError, match=r"cae::conv3x3 got a CUDA tensor, but cae_kernels was built without CUDA"):
        OpsOnCudaKey().conv3x3(x, w, None, 1, False)
