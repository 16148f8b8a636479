"""The CUDA kernels' tiling (csrc/cuda), on both backends that run them: the emulator
everywhere, a GPU where there is one (tests/backends.py). Shapes that push the
planners -- many weight-gradient regions, many channel groups, extreme shared-memory
plans -- yet stay small enough for the emulator, in float64 against
torch.nn.functional."""

import contextlib

import pytest
import torch

from cae_kernels import reference

from backends import BACKENDS, FORMATS, HALF_DTYPES, assert_close, make_input, on_cuda_kernels, tf32

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transposed"])
@pytest.mark.parametrize("fmt", FORMATS)
@on_cuda_kernels()
def test_whole_backward_adds_the_weight_sums_in_the_input_gradients_launch(backend, fmt, transposed, stride,
                                                                           dtype):
    """A layer's whole backward: the weight gradient's partial sums are added by extra
    blocks of the input gradient's launch (2330 columns: 73 blocks of sums behind the
    correlation's own), bitwise equal to the separate ops, which add them in a launch of
    their own. Gated, a batch that spreads over several partial rows; float16 takes the
    tensor-core correlation (the stride-2 convolution's input gradient by parity
    class), float32 the exact kernels."""
    c_in, c_out = 10, 16
    x = make_input((9, c_in, 11, 13), dtype, backend.device, fmt).detach()
    if transposed:
        w = make_input((c_in, c_out, 3, 3), dtype, backend.device).detach()
        g = make_input((9, c_out, 11 * stride, 13 * stride), dtype, backend.device, fmt).detach()
        whole = backend.ops.conv_transpose3x3_backward
        grad_input = backend.ops.conv_transpose3x3_grad_input(g, g, w, x, stride)
        grad_weight, grad_bias = backend.ops.conv_transpose3x3_grad_weight(g, g, x, stride)
    else:
        w = make_input((c_out, c_in, 3, 3), dtype, backend.device).detach()
        size = ((11 - 1) // stride + 1, (13 - 1) // stride + 1)
        g = make_input((9, c_out, *size), dtype, backend.device, fmt).detach()
        whole = backend.ops.conv3x3_backward
        grad_input = backend.ops.conv3x3_grad_input(g, g, w, x, stride)
        grad_weight, grad_bias = backend.ops.conv3x3_grad_weight(g, g, x, stride)
    with contextlib.ExitStack() as stack:
        counts = stack.enter_context(backend.functions.count_launches()) if backend.name == "sim" else None
        ours = whole(g, g, w, x, stride)
    if counts is not None:  # the emulator counts: weight gradient, then the input gradient with the sums
        assert sum(counts.values()) == 2 and not any("reduce_partials" in k for k in counts), counts
        on_tensor_cores = dtype == torch.float16
        assert any("correlate_mma_kernel" in k for k in counts) == on_tensor_cores, counts
        assert any("weight_grad_mma_kernel" in k for k in counts) == (dtype == torch.float16), counts
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


# The tensor-core correlation (csrc/cuda/conv3x3_mma_kernels.cuh): float16 and bfloat16,
# and float32 on TF32 where PyTorch allows it for cuDNN's convolutions, on sm_80+ (the
# emulator's device is sm_90), with 2+ input and 5+ output channels.
MMA_SHAPES = (
    (1, 8, 16, 9, 13),  # batch 1, odd sizes (ragged tiles); two n = 8 tiles
    (2, 16, 8, 14, 14),  # an autoencoder layer (16 -> 8 at 14x14)
    (3, 5, 12, 9, 10),  # 5 input channels padded to 8 (an odd group count); 12 outputs in a group of 16
    (2, 100, 17, 9, 10),  # several passes through shared memory; two groups of 16 output channels
)


@contextlib.contextmanager
def mma_launches(backend, arch="90", kernel="correlate_mma_kernel"):
    """The launches of a tensor-core kernel (the correlation's, or the weight
    gradient's) inside the block (a list with one count; None off the emulator, where
    launches are not counted), on an emulated device of compute capability ``arch``."""
    if backend.name != "sim":
        yield [None]
        return
    counted = [0]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CAE_SIM_ARCH", arch)
        with backend.functions.count_launches() as counts:
            yield counted
    counted[0] = sum(c for name, c in counts.items() if kernel in name)


@pytest.mark.parametrize("dtype", [*HALF_DTYPES, torch.float32], ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("stride", [1, 2])
@on_cuda_kernels()
def test_correlate_on_tensor_cores(backend, stride, fmt, dtype):
    """Both convolutions' forward and input gradient through a fused ReLU (the gated
    correlations) against float64 at the dtype's tolerance (float32 with TF32 allowed:
    TF32 has float16's 10-bit mantissa); on the emulator the tensor-core kernel ran for
    each of them (the transposed correlation at stride 2 by parity class; odd sizes in
    the convolution's input gradient)."""
    with tf32(True):
        check_tensor_cores(backend, stride, fmt, dtype, torch.float16 if dtype == torch.float32 else dtype)


def check_tensor_cores(backend, stride, fmt, dtype, tolerance_dtype):
    def check(name, ours, expected, launched, mma):
        assert_close(ours, expected, backend.tolerance(tolerance_dtype, expected), name)
        assert launched[0] in (None, int(mma)), (name, launched)

    for n, c_in, c_out, h, w in MMA_SHAPES:
        x = make_input((n, c_in, h, w), dtype, backend.device, fmt, scale=0.5)
        weight = make_input((c_out, c_in, 3, 3), dtype, backend.device, scale=0.5).detach()
        bias = make_input((c_out,), dtype, backend.device).detach()
        xd, wd = x.detach().double().requires_grad_(), weight.double()
        # correlate: conv3x3's forward
        with mma_launches(backend) as launched:
            y = backend.functions.conv3x3(x, weight, bias, stride, "relu")
        ref = reference.conv3x3(xd, wd, bias.double(), stride)
        check(f"conv3x3 of {x.shape}", y, torch.relu(ref), launched, True)
        # correlate_transpose of the gated gradient: conv3x3's input gradient through
        # its ReLU (stride 1: a correlation with the flipped kernel; stride 2: one per
        # parity class)
        g = torch.randn_like(y)
        with mma_launches(backend) as launched:
            (ours,) = torch.autograd.grad(y, x, g)
        (expected,) = torch.autograd.grad(ref, xd, g.double() * (y.detach() > 0))  # our output's mask
        check(f"conv3x3's gated input gradient of {x.shape}", ours, expected, launched, True)
        # conv_transpose3x3 (c_out -> c_in channels) with bias and ReLU: its forward is
        # correlate_transpose, its input gradient correlate of gate(g) with the forward
        # output as the gate.
        xt = make_input((n, c_out, h, w), dtype, backend.device, fmt, scale=0.5)
        xtd = xt.detach().double().requires_grad_()
        bias_t = make_input((c_in,), dtype, backend.device).detach()
        with mma_launches(backend) as launched:
            out = backend.functions.conv_transpose3x3(xt, weight, bias_t, stride, "relu")
        ref = reference.conv_transpose3x3(xtd, wd, bias_t.double(), stride)
        check(f"conv_transpose3x3 of {xt.shape}", out, torch.relu(ref), launched, True)
        g = torch.randn_like(out)
        with mma_launches(backend) as launched:
            (ours,) = torch.autograd.grad(out, xt, g)
        (expected,) = torch.autograd.grad(ref, xtd, g.double() * (out.detach() > 0))
        check(f"conv_transpose3x3's gated input gradient of {xt.shape}", ours, expected, launched, True)


def test_correlate_exact_path_below_sm80_or_without_tf32():
    """On an emulated sm_75 the same float16 correlation runs on the plain kernel (no
    tensor cores), and both agree within float16's tolerance; float32 runs on tensor
    cores only where TF32 is allowed."""
    backend = BACKENDS["sim"]
    x = make_input((2, 8, 9, 7), torch.float16, "cpu", scale=0.5).detach()
    weight = make_input((16, 8, 3, 3), torch.float16, "cpu", scale=0.5).detach()
    results = {}
    for arch in ("75", "90"):
        with mma_launches(backend, arch) as launched:
            results[arch] = backend.functions.conv3x3(x, weight, None, 1)
        assert launched[0] == (arch == "90"), (arch, launched)
    expected = reference.conv3x3(x.double(), weight.double(), None, 1)
    for arch, y in results.items():
        assert_close(y, expected, backend.tolerance(torch.float16, expected), f"sm_{arch}")
    for allowed, arch in [(False, "90"), (True, "75"), (True, "90")]:
        with tf32(allowed), mma_launches(backend, arch) as launched:
            backend.functions.conv3x3(x.float(), weight.float(), None, 1)
        assert launched[0] == (allowed and arch == "90"), (allowed, arch, launched)
    # 16 tiny images per block at stride 2: their tf32 windows (4 bytes a channel) do
    # not fit in shared memory with 8 channels, float16's (2 bytes) do.
    x = make_input((3, 5, 7, 6), torch.float16, "cpu").detach()
    weight = make_input((12, 5, 3, 3), torch.float16, "cpu").detach()
    for dtype, mma in [(torch.float32, False), (torch.float16, True)]:
        with tf32(True), mma_launches(backend) as launched:
            backend.functions.conv3x3(x.to(dtype), weight.to(dtype), None, 2)
        assert launched[0] == mma, (dtype, launched)


def test_correlate_transpose_stride2_exact_path_below_sm80_or_without_tf32():
    """The stride-2 transposed convolution's forward follows the same rules: float16 on
    tensor cores on sm_90 only, float32 only with TF32 allowed; without it the exact
    kernel, within float32's tolerance of float64."""
    backend = BACKENDS["sim"]
    x = make_input((1, 8, 5, 3), torch.float32, "cpu").detach()
    weight = make_input((8, 16, 3, 3), torch.float32, "cpu").detach()
    expected = reference.conv_transpose3x3(x.double(), weight.double(), None, 2)
    for dtype, allowed, arch, mma in [(torch.float16, True, "75", False), (torch.float16, True, "90", True),
                                      (torch.float32, False, "90", False), (torch.float32, True, "75", False),
                                      (torch.float32, True, "90", True)]:
        with tf32(allowed), mma_launches(backend, arch) as launched:
            y = backend.functions.conv_transpose3x3(x.to(dtype), weight.to(dtype), None, 2)
        assert launched[0] == mma, (dtype, allowed, arch, launched)
        exact = dtype == torch.float32 and not mma
        tolerance = backend.tolerance(torch.float32 if exact else torch.float16, expected)
        assert_close(y, expected, tolerance, f"{dtype} sm_{arch} tf32={allowed}")


@pytest.mark.parametrize("c_in,c_out", [(8, 16), (16, 8), (5, 12)], ids=["8-16", "16-8", "5-12"])
@pytest.mark.parametrize("fmt", FORMATS)
@on_cuda_kernels()
def test_correlate_transpose_stride2_tensor_cores_tap_by_tap(backend, fmt, c_in, c_out):
    """The stride-2 transposed correlation on tensor cores, one tap of the kernel at a
    time: small integers, so float16 with fp32 accumulation is exact and each output
    equals float64's bit for bit, and a wrong parity class, tap or window offset shows
    as the tap it broke. The transposed convolution's forward (even sizes) and the
    convolution's input gradient (odd sizes: the last row and column of a class
    empty), batch 1 and 2."""
    f16 = torch.float16
    gen = torch.Generator().manual_seed(3)

    def integers(*shape):
        return torch.randint(-3, 4, shape, generator=gen).to(f16).to(backend.device)

    for tap in range(9):
        mask = torch.zeros(9, dtype=f16).view(3, 3).to(backend.device)
        mask.view(-1)[tap] = 1
        # the transposed convolution's forward: c_in -> c_out channels, 5x3 -> 10x6
        x = integers(1, c_in, 5, 3).contiguous(memory_format=FORMATS[fmt])
        w = integers(c_in, c_out, 3, 3) * mask
        with mma_launches(backend) as launched:
            y = backend.functions.conv_transpose3x3(x, w, None, 2)
        expected = reference.conv_transpose3x3(x.double(), w.double(), None, 2)
        assert launched[0] in (None, 1), launched
        assert torch.equal(y.double(), expected), f"conv_transpose3x3, tap {tap}"
        # the convolution's input gradient: c_out -> c_in channels, 5x3 -> 9x5
        x = integers(2, c_in, 9, 5).contiguous(memory_format=FORMATS[fmt]).requires_grad_()
        w = integers(c_out, c_in, 3, 3) * mask
        g = integers(2, c_out, 5, 3).contiguous(memory_format=FORMATS[fmt])
        y = backend.functions.conv3x3(x, w, None, 2)
        with mma_launches(backend) as launched:
            (ours,) = torch.autograd.grad(y, x, g)
        expected = torch.nn.grad.conv2d_input(x.shape, w.double(), g.double(), 2, 1)
        assert launched[0] in (None, 1), launched
        assert torch.equal(ours.double(), expected), f"conv3x3's input gradient, tap {tap}"


# The weight gradient on tensor cores (weight_grad_mma_kernel): 5 to 16 channels on the
# small side (a: the output gradient of a convolution, the input of a transposed one),
# any on the large side. (N, C_small, C_large, H, W of the small side.)
WEIGHT_GRAD_MMA_SHAPES = (
    (1, 8, 16, 9, 13),  # batch 1, odd sizes: positions not a multiple of 16
    (2, 16, 8, 14, 14),  # an autoencoder layer (16 x 8 channels at 14x14)
    (3, 5, 12, 5, 7),  # 5 rows of M padded to 16; 108 columns: a last unit of 2 tiles, half used
    (2, 8, 1, 11, 9),  # the 1-channel image: 9 columns, one unit split over 8 warps
)


def weight_grads(backend, transposed, stride, fmt, dtype, shape, seed=0, arch="90"):
    """Our weight and bias gradients of one layer through its fused ReLU (gated),
    float64 references, and the tensor-core kernel's launches (on an emulated device of
    compute capability ``arch``)."""
    n, small, large, h, w = shape
    torch.manual_seed(seed)
    if transposed:  # weight [small, large]: its input is the small side
        x = make_input((n, small, h, w), dtype, backend.device, fmt, scale=0.5).detach()
        weight = make_input((small, large, 3, 3), dtype, backend.device, scale=0.5).detach()
        y = backend.functions.conv_transpose3x3(x, weight, None, stride, "relu")
        op, ref_fn = backend.ops.conv_transpose3x3_grad_weight, reference.conv_transpose3x3
    else:  # weight [small, large]: its input is the large side
        size = (h * stride - stride + 1, w * stride - stride + 1)  # odd at stride 2 too
        x = make_input((n, large, *size), dtype, backend.device, fmt, scale=0.5).detach()
        weight = make_input((small, large, 3, 3), dtype, backend.device, scale=0.5).detach()
        y = backend.functions.conv3x3(x, weight, None, stride, "relu")
        op, ref_fn = backend.ops.conv3x3_grad_weight, reference.conv3x3
    g = torch.randn_like(y)
    with mma_launches(backend, arch, "weight_grad_mma_kernel") as launched:
        ours = op(g, y, x, stride)
    wd = weight.double().requires_grad_()
    gated = g.double() * (y > 0)
    (expected,) = torch.autograd.grad(ref_fn(x.double(), wd, None, stride), wd, gated)
    return ours, (expected, gated.sum((0, 2, 3))), launched[0]


@pytest.mark.parametrize("dtype", [*HALF_DTYPES, torch.float32], ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transposed"])
@on_cuda_kernels()
def test_weight_grad_on_tensor_cores(backend, transposed, stride, fmt, dtype):
    """Both convolutions' gated weight and bias gradients against float64 at the dtype's
    tolerance (float32 with TF32 allowed: float16's), the tensor-core kernel launched
    once for each on the emulator; bitwise the same in a second run."""
    tolerance_dtype = torch.float16 if dtype == torch.float32 else dtype
    with tf32(True):
        for shape in WEIGHT_GRAD_MMA_SHAPES:
            ours, expected, launched = weight_grads(backend, transposed, stride, fmt, dtype, shape)
            assert launched in (None, 1), (shape, launched)
            for got, ref, what in zip(ours, expected, ("weight", "bias"), strict=True):
                assert_close(got, ref, backend.tolerance(tolerance_dtype, ref), f"{what} gradient of {shape}")
            again, _, _ = weight_grads(backend, transposed, stride, fmt, dtype, shape)
            assert all(torch.equal(a, b) for a, b in zip(ours, again, strict=True)), f"run to run, {shape}"


def test_weight_grad_exact_path_below_sm80_without_tf32_or_out_of_shape():
    """The plain weight gradient where tensor cores do not apply: float32 without TF32
    (then float32's tolerance), an emulated sm_75, fewer than 5 or more than 16 channels
    on the small side; the bias gradient is exact float32 on tensor cores too."""
    backend = BACKENDS["sim"]
    shape = WEIGHT_GRAD_MMA_SHAPES[1]
    for allowed, arch in [(False, "90"), (True, "75")]:
        with tf32(allowed):
            ours, expected, launched = weight_grads(backend, False, 1, "nchw", torch.float32, shape, arch=arch)
        assert launched == 0, (allowed, arch, launched)
        for got, ref in zip(ours, expected, strict=True):
            assert_close(got, ref, backend.tolerance(torch.float32, ref))
    with tf32(True):
        ours, expected, launched = weight_grads(backend, False, 1, "nchw", torch.float32, shape)
        assert launched == 1
        assert_close(ours[1], expected[1], backend.tolerance(torch.float32, expected[1]), "bias gradient")
        for small in (4, 17):
            _, _, launched = weight_grads(backend, True, 2, "nchw", torch.float16, (2, small, 8, 6, 6))
            assert launched == 0, (small, launched)


@on_cuda_kernels()
def test_weight_grad_on_tensor_cores_tiling(backend):
    """float16 on tensor cores: 520 one-image regions over 512 partial rows (some
    blocks add a second region), the fragments added across 8 warps that split the
    positions (2 large channels: one unit) or by each lane (12: 5 units, one split);
    24 channels on the large side: 27 tiles, 9 units, more than a pass of 8 warps."""
    cases = [((520, 8, 2, 8, 8), False), ((520, 5, 12, 8, 8), False), ((2, 8, 24, 6, 6), True)]
    for shape, transposed in cases:
        ours, expected, launched = weight_grads(backend, transposed, 1, "nchw", torch.float16, shape)
        assert launched in (None, 1), (shape, launched)
        for got, ref, what in zip(ours, expected, ("weight", "bias"), strict=True):
            assert_close(got, ref, backend.tolerance(torch.float16, ref), f"{what} gradient of {shape}")
