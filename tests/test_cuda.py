"""The CUDA kernels on a GPU: every op, both layouts, all four dtypes, against cuDNN
(torch.nn.functional on CUDA in float64, TF32 off), gradcheck on CUDA, our CUDA kernels
against our CPU kernels, batch 0, bitwise determinism, and 64-bit indexing.

Skipped without a CUDA GPU or without the CUDA kernels built; scripts/gpu_check.sh is
the script that runs it on a GPU machine.
"""

import pytest
import torch
import torch.nn.functional as F

import cae_kernels

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not cae_kernels.with_cuda, reason="cae_kernels was built without its CUDA kernels"),
]

FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# (N, C_in, C_out, H, W): the autoencoder's layers at batch 256 (encoder at 28/14/7,
# decoder 4 -> 8 -> 16 -> 32 and the 16 -> 1 output), and ragged / odd shapes.
MODEL_SHAPES = [
    (256, 1, 16, 28, 28), (256, 16, 16, 28, 28), (256, 16, 8, 14, 14), (256, 8, 8, 7, 7),
    (256, 8, 8, 4, 4), (256, 8, 16, 16, 16), (256, 16, 1, 32, 32),
]
ODD_SHAPES = [(3, 3, 5, 9, 11), (5, 1, 16, 7, 7), (1, 18, 17, 3, 34), (4, 2, 3, 1, 1), (2, 5, 33, 37, 41),
              (2, 100, 3, 5, 6)]  # 100 input channels: several passes through shared memory


@pytest.fixture(autouse=True)
def no_tf32():
    """cuDNN's reference in full precision."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def tolerance(dtype):
    return {
        torch.float64: dict(rtol=1e-10, atol=1e-10),
        torch.float32: dict(rtol=2e-4, atol=2e-4),
        torch.float16: dict(rtol=1e-2, atol=1e-2),
        torch.bfloat16: dict(rtol=5e-2, atol=5e-2),
    }[dtype]


def make(shape, dtype, fmt="nchw", device="cuda", seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    if len(shape) == 4:
        t = t.contiguous(memory_format=FORMATS[fmt])
    return t.requires_grad_()


def compare_with_reference(ours_fn, ref_fn, inputs, dtype, relu=False):
    """Forward and every gradient of ours (CUDA, dtype) against ref_fn on CUDA in
    float64 from the same (rounded) inputs: cuDNN's double-precision kernels.

    relu: ours fuses a ReLU into ref_fn's result. The forward is compared with
    relu(reference); the backward reference applies *our* output's mask, so an output
    within rounding of zero cannot flip the mask between the two."""
    out = ours_fn(*inputs)
    assert out.is_cuda and out.dtype == dtype
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    ref = ref_fn(*ref_inputs)
    tol = tolerance(dtype)
    scale = max(1.0, ref.abs().max().item())
    expected = F.relu(ref) if relu else ref
    torch.testing.assert_close(out.double(), expected, rtol=tol["rtol"], atol=tol["atol"] * scale)
    if relu:
        ref = ref * (out.detach() > 0)
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(ref.device)
    ours_grads = torch.autograd.grad(out, inputs, grad.to(dtype))
    ref_grads = torch.autograd.grad(ref, ref_inputs, grad)
    for name, mine, theirs in zip("xwb"[: len(ours_grads)], ours_grads, ref_grads, strict=True):
        s = max(1.0, theirs.abs().max().item())
        torch.testing.assert_close(mine.double(), theirs, rtol=tol["rtol"], atol=tol["atol"] * s,
                                   msg=lambda m, name=name: f"gradient of {name}: {m}")
    return out


def conv_ref(stride):
    return lambda x, w, b: F.conv2d(x, w, b, stride, 1)


def conv_transpose_ref(stride):
    return lambda x, w, b: F.conv_transpose2d(x, w, b, stride, 1, stride - 1)


def input_scale(dtype):
    # Half precision: keep sums of 9 * 16 products well inside float16's range.
    return 0.5 if dtype in (torch.float16, torch.bfloat16) else 1.0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("n,c_in,c_out,h,w", MODEL_SHAPES + ODD_SHAPES)
def test_conv3x3(n, c_in, c_out, h, w, fmt, stride, activation, dtype):
    s = input_scale(dtype)
    x = make((n, c_in, h, w), dtype, fmt, scale=s)
    weight = make((c_out, c_in, 3, 3), dtype, seed=2, scale=s)
    bias = make((c_out,), dtype, seed=3)
    out = compare_with_reference(lambda x, w, b: cae_kernels.conv3x3(x, w, b, stride, activation),
                                 conv_ref(stride), (x, weight, bias), dtype, relu=activation == "relu")
    assert out.is_contiguous(memory_format=FORMATS[fmt]) or c_in == 1 or h * w == 1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("stride", [2, 1])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("n,c_in,c_out,h,w", MODEL_SHAPES + ODD_SHAPES)
def test_conv_transpose3x3(n, c_in, c_out, h, w, fmt, stride, activation, dtype):
    s = input_scale(dtype)
    x = make((n, c_in, h, w), dtype, fmt, scale=s)
    weight = make((c_in, c_out, 3, 3), dtype, seed=2, scale=s)
    bias = make((c_out,), dtype, seed=3)
    compare_with_reference(lambda x, w, b: cae_kernels.conv_transpose3x3(x, w, b, stride, activation),
                           conv_transpose_ref(stride), (x, weight, bias), dtype,
                           relu=activation == "relu")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(256, 16, 28, 28), (256, 8, 14, 14), (256, 8, 7, 7), (3, 5, 9, 11),
                                   (2, 3, 1, 1), (1, 12, 5, 2)])
def test_max_pool2x2(shape, fmt, dtype):
    x = make(shape, dtype, fmt)
    out = cae_kernels.max_pool2x2(x)
    ref_x = x.detach().clone().requires_grad_()
    ref = F.max_pool2d(ref_x, 2, ceil_mode=True)
    assert torch.equal(out, ref)  # a selection: exact in every dtype
    grad = torch.randn_like(ref)
    (ours,) = torch.autograd.grad(out, x, grad)
    (theirs,) = torch.autograd.grad(ref, ref_x, grad)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("fmt", FORMATS)
def test_max_pool2x2_nan_ties_inf(fmt):
    row = [1.0, 1.0, 2.0, float("nan"), -float("inf"), -float("inf"), 5.0]
    image = [row, row[::-1], [3.0, 3.0, 0.0, 0.0, float("inf"), 1.0, -1.0]]
    x = torch.tensor([[image, image[::-1]]], device="cuda")  # [1, 2, 3, 7]
    x = x.contiguous(memory_format=FORMATS[fmt]).requires_grad_()
    ref_x = x.detach().clone().requires_grad_()
    out, ref = cae_kernels.max_pool2x2(x), F.max_pool2d(ref_x, 2, ceil_mode=True)
    torch.testing.assert_close(out, ref, equal_nan=True)
    grad = torch.arange(1.0, ref.numel() + 1, device="cuda").reshape(ref.shape)
    out.backward(grad)
    ref.backward(grad)
    assert torch.equal(x.grad, ref_x.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("stride", [1, 2])
def test_cuda_matches_cpu_kernels(stride, fmt, dtype):
    """Our CUDA kernels against our CPU kernels, forward and backward."""
    tol = tolerance(dtype)
    for op, wshape in ((cae_kernels.conv3x3, (16, 8, 3, 3)), (cae_kernels.conv_transpose3x3, (8, 16, 3, 3))):
        results = {}
        for device in ("cpu", "cuda"):
            x = make((6, 8, 13, 10), dtype, fmt, device=device)
            w = make(wshape, dtype, device=device, seed=2)
            b = make((16,), dtype, device=device, seed=3)
            y = op(x, w, b, stride, "relu")
            p = cae_kernels.max_pool2x2(y)
            grads = torch.autograd.grad(p.square().sum(), (x, w, b))
            results[device] = [t.detach().cpu() for t in (y, p) + grads]
        for mine, theirs in zip(results["cuda"], results["cpu"], strict=True):
            atol = tol["atol"] * max(1.0, theirs.abs().max().item())
            torch.testing.assert_close(mine, theirs, rtol=tol["rtol"], atol=atol)


@pytest.mark.parametrize("op", ["conv3x3", "conv_transpose3x3"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("stride", [1, 2])
def test_gradcheck(op, fmt, stride):
    x = make((2, 3, 6, 5), torch.float64, fmt)
    w = make((4, 3, 3, 3) if op == "conv3x3" else (3, 4, 3, 3), torch.float64, seed=2)
    b = make((4,), torch.float64, seed=3)
    fn = getattr(cae_kernels, op)
    assert torch.autograd.gradcheck(lambda x, w, b: fn(x, w, b, stride, "relu"), (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w, b: fn(x, w, b, stride, None), (x, w, b))


@pytest.mark.parametrize("fmt", FORMATS)
def test_gradcheck_max_pool(fmt):
    assert torch.autograd.gradcheck(cae_kernels.max_pool2x2, (make((2, 3, 5, 4), torch.float64, fmt),))


@pytest.mark.parametrize("fmt", FORMATS)
def test_batch_zero(fmt):
    for op, wshape in ((cae_kernels.conv3x3, (4, 3, 3, 3)), (cae_kernels.conv_transpose3x3, (3, 4, 3, 3))):
        x = make((0, 3, 5, 5), torch.float32, fmt)
        w = make(wshape, torch.float32, seed=2)
        b = make((4,), torch.float32, seed=3)
        y = op(x, w, b, 2, "relu")
        assert y.shape[0] == 0 and y.is_cuda
        gx, gw, gb = torch.autograd.grad(y.sum(), (x, w, b))
        assert gx.shape == x.shape and torch.equal(gw, torch.zeros_like(w)) and torch.equal(gb, torch.zeros_like(b))
    assert cae_kernels.max_pool2x2(make((0, 2, 3, 3), torch.float32, fmt)).shape == (0, 2, 2, 2)


# The autoencoder (filters 16, 8, 8, max-pool): op, C_in, C_out, stride, activation.
MODEL_LAYERS = [
    ("conv3x3", 1, 16, 1, "relu"), ("conv3x3", 16, 16, 1, "relu"), ("pool",),  # 28 -> 14
    ("conv3x3", 16, 8, 1, "relu"), ("conv3x3", 8, 8, 1, "relu"), ("pool",),  # 14 -> 7
    ("conv3x3", 8, 8, 1, "relu"), ("conv3x3", 8, 8, 1, "relu"), ("pool",),  # 7 -> 4
    ("conv_transpose3x3", 8, 8, 2, "relu"), ("conv_transpose3x3", 8, 8, 2, "relu"),  # 4 -> 8 -> 16
    ("conv_transpose3x3", 8, 16, 2, "relu"), ("conv_transpose3x3", 16, 1, 1, None),  # -> 32, 16 -> 1
]


def model_step(fmt, dtype, n=256):
    """Forward and backward through the autoencoder's layers at batch n."""
    h = x = make((n, 1, 28, 28), dtype, fmt)
    params = []
    for i, layer in enumerate(MODEL_LAYERS):
        if layer[0] == "pool":
            h = cae_kernels.max_pool2x2(h)
            continue
        op, c_in, c_out, stride, activation = layer
        w = make((c_out, c_in, 3, 3) if op == "conv3x3" else (c_in, c_out, 3, 3), dtype, seed=2 * i + 2, scale=0.3)
        b = make((c_out,), dtype, seed=2 * i + 3, scale=0.1)
        params += [w, b]
        h = getattr(cae_kernels, op)(h, w, b, stride, activation)
    loss = h.float().square().mean()
    return [t.detach() for t in (h,) + torch.autograd.grad(loss, [x] + params)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
def test_bitwise_deterministic(fmt, dtype):
    """No float atomics: the same inputs give the same bits, run after run."""
    first = model_step(fmt, dtype)
    for _ in range(2):
        again = model_step(fmt, dtype)
        for a, b in zip(first, again, strict=True):
            assert torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def test_weight_grad_many_regions():
    """More weight-gradient regions than partial-sum blocks (512): 2048 images of 28x28."""
    x = make((2048, 8, 28, 28), torch.float32)
    g = make((2048, 16, 28, 28), torch.float32, seed=5)
    ours, _ = torch.ops.cae.conv3x3_grad_weight(g, None, x, 1)
    ref = torch.nn.grad.conv2d_weight(x.detach().double(), (16, 8, 3, 3), g.detach().double(), 1, 1)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_large_tensor_64bit_offsets():
    """More than 2^31 elements (float16, ~4.3 GB each): offsets must be 64-bit."""
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip("needs 24 GiB of free GPU memory")
    n = 2**31 // (256 * 256) + 2
    x = torch.randn(n, 1, 256, 256, device="cuda", dtype=torch.float16)
    w = torch.randn(1, 1, 3, 3, device="cuda", dtype=torch.float16)
    y = cae_kernels.conv3x3(x, w)
    tail = F.conv2d(x[-2:].float(), w.float(), None, 1, 1)
    torch.testing.assert_close(y[-2:].float(), tail, rtol=1e-2, atol=1e-2)
    p = cae_kernels.max_pool2x2(x)
    torch.testing.assert_close(p[-2:], F.max_pool2d(x[-2:], 2, ceil_mode=True))
    del y, p, x
    torch.cuda.empty_cache()


def test_current_stream_and_device_guard():
    """Kernels run on the current stream (work on a side stream is ordered after what
    that stream waited for)."""
    side = torch.cuda.Stream()
    x = make((64, 8, 28, 28), torch.float32).detach()
    w = make((16, 8, 3, 3), torch.float32, seed=2).detach()
    expected = cae_kernels.conv3x3(x, w)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y = cae_kernels.conv3x3(x, w)
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    if torch.cuda.device_count() > 1:
        x1, w1 = x.to("cuda:1"), w.to("cuda:1")
        assert cae_kernels.conv3x3(x1, w1).device == x1.device


def test_errors_name_the_problem():
    x = torch.randn(1, 2, 5, 5, device="cuda")
    with pytest.raises(RuntimeError, match="device"):
        cae_kernels.conv3x3(x, torch.randn(3, 2, 3, 3))
    with pytest.raises(RuntimeError, match="channels"):
        cae_kernels.conv3x3(x, torch.randn(3, 4, 3, 3, device="cuda"))
    with pytest.raises(RuntimeError, match="dtype"):
        cae_kernels.conv3x3(x.to(torch.int32), torch.randn(3, 2, 3, 3, device="cuda").to(torch.int32))
