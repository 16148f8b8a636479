"""The fused encoder block's forward (csrc/cuda/encoder_block_kernels.cuh) through the op
``encoder_block``: conv+bias+act, conv+bias+act, then a 2x2 max-pool (ceil mode) or a
stride-2 conv+bias+act, in one launch. Against float64 PyTorch, against the per-op
kernels it replaces (bitwise in float32 and float64: the same sums in the same order),
and its interior outputs a1 / a2 through the emulator's test hook."""

import pytest
import torch
import torch.nn.functional as F

from cae_kernels._registration import _suggest_memory_format

from backends import BACKENDS, FORMATS, HALF_DTYPES, assert_close, make_input, on_cuda_kernels, on_every_backend, tf32

F64 = torch.float64
VARIANTS = ("pool", "stride")

# (N, C0, C1, H, W): the pool model's three encoder blocks (28 -> 14 in several tiles
# per image; 16 input channels; 7 -> 4 with the ceil-mode edge), odd sizes with a
# partial group of channels, a 1x1 image, 40 input channels (several passes through
# shared memory in float64), and 5 (a1 on tensor cores in 16-bit types, its one k-step
# part zeros).
SHAPES = ((2, 1, 16, 28, 28), (2, 16, 8, 14, 14), (3, 8, 8, 7, 7), (2, 3, 5, 13, 11), (2, 2, 3, 1, 1),
          (1, 40, 4, 6, 9), (2, 5, 6, 9, 7))


def block_params(c0, c1, variant, dtype, device):
    count = 2 if variant == "pool" else 3
    weights = [make_input((c1, c0 if i == 0 else c1, 3, 3), dtype, device, scale=0.5).detach() for i in range(count)]
    biases = [make_input((c1,), dtype, device, scale=0.1).detach() for _ in range(count)]
    return weights, biases


def reference_block(x, weights, biases, relu):
    """a1, a2 and out in float64 (torch.nn.functional)."""
    def act(t):
        return torch.relu(t) if relu else t

    a1 = act(F.conv2d(x.double(), weights[0].double(), biases[0].double(), padding=1))
    a2 = act(F.conv2d(a1, weights[1].double(), biases[1].double(), padding=1))
    if len(weights) == 2:
        out = F.max_pool2d(a2, 2, ceil_mode=True)
    else:
        out = act(F.conv2d(a2, weights[2].double(), biases[2].double(), stride=2, padding=1))
    return a1, a2, out


def composed_activations(ops, x, weights, biases, relu):
    """The same block from the per-op kernels: a1, a2 and out."""
    a1 = ops.conv3x3(x, weights[0], biases[0], 1, relu)
    a2 = ops.conv3x3(a1, weights[1], biases[1], 1, relu)
    out = ops.max_pool2x2(a2) if len(weights) == 2 else ops.conv3x3(a2, weights[2], biases[2], 2, relu)
    return a1, a2, out


def composed_block(ops, x, weights, biases, relu):
    return composed_activations(ops, x, weights, biases, relu)[-1]


def tolerance(backend, dtype, expected):
    # Two or three layers deep: the intermediates' rounding compounds in 16-bit types.
    rtol, atol = backend.tolerances[dtype]
    scale = 2.0 if dtype in HALF_DTYPES else 1.0
    return {"rtol": rtol * scale, "atol": atol * scale * max(1.0, expected.abs().max().item())}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "linear"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("fmt", FORMATS)
@on_cuda_kernels("dtype")
def test_encoder_block(backend, dtype, fmt, variant, relu, shape):
    """One launch, the float64 reference's result at the dtype's tolerance, and the
    composed per-op kernels' result (bitwise where they sum in the same order: float32
    on the exact path, float64)."""
    n, c0, c1, h, w = shape
    x = make_input((n, c0, h, w), dtype, backend.device, fmt).detach()
    weights, biases = block_params(c0, c1, variant, dtype, backend.device)
    if backend.name == "sim":
        from cae_kernels import sim

        with sim.record_launches() as recorder:
            out, winners = backend.ops.encoder_block(x, weights, biases, relu)
        assert [launch.kernel.split("<")[0] for launch in recorder.launches] == ["cae::cuda::encoder_block_kernel"]
    else:
        out, winners = backend.ops.encoder_block(x, weights, biases, relu)
    *_, expected = reference_block(x, weights, biases, relu)
    assert out.dtype == dtype and out.shape == expected.shape
    # The input's layout as PyTorch reads it (one channel in channels_last is also plain contiguous).
    assert out.is_contiguous(memory_format=_suggest_memory_format(x))
    assert_close(out, expected, tolerance(backend, dtype, expected), "output")
    composed = composed_block(backend.ops, x, weights, biases, relu)
    if dtype in (torch.float32, F64):
        assert torch.equal(out, composed), (out - composed).abs().max()
    else:
        assert_close(out, composed.double(), tolerance(backend, dtype, expected), "against the per-op kernels")


def expected_winners(a2, out, relu):
    """Each pool window's winner code from a2 (the first maximum, row-major: 0 to 3; the
    ceil mode's edge windows padded with -inf), 4 where the ReLU at the winner is closed."""
    n, c, h, w = a2.shape
    padded = F.pad(a2.double(), (0, w % 2, 0, h % 2), value=float("-inf"))
    windows = padded.unfold(2, 2, 2).unfold(3, 2, 2).reshape(n, c, (h + 1) // 2, (w + 1) // 2, 4)
    codes = windows.argmax(-1)
    if relu:
        codes = torch.where(out.double() > 0, codes, 4)
    return codes.to(torch.uint8)


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "linear"])
@pytest.mark.parametrize("fmt", FORMATS)
@on_every_backend("dtype")
def test_pool_winners(backend, dtype, fmt, relu):
    """The pool block's second output: each window's winner code (uint8, the output's
    sizes and layout) from the block's own a2 (the emulator's test hook: the fused
    kernel's; else the per-op kernels', the CPU's composed codes from ATen's max-pool
    indices); the strided block's is empty."""
    for n, c0, c1, h, w in ((2, 3, 5, 13, 11), (2, 1, 16, 28, 28), (3, 8, 8, 7, 7), (0, 2, 4, 5, 5)):
        x = make_input((n, c0, h, w), dtype, backend.device, fmt).detach()
        weights, biases = block_params(c0, c1, "pool", dtype, backend.device)
        out, winners = backend.ops.encoder_block(x, weights, biases, relu)
        if backend.name == "sim" and n > 0:
            own_out, _, a2 = backend.ops._sim_encoder_block_interiors(x, weights, biases, relu)
            assert torch.equal(own_out, out)
        else:
            *_, a2, own_out = composed_activations(backend.ops, x, weights, biases, relu)
        assert winners.dtype == torch.uint8 and winners.shape == out.shape
        assert winners.is_contiguous(memory_format=_suggest_memory_format(x))
        assert torch.equal(winners, expected_winners(a2, out, relu))
        if relu and n > 0:
            assert 0 < (winners == 4).sum() < winners.numel()
    weights, biases = block_params(3, 4, "stride", dtype, backend.device)
    _, winners = backend.ops.encoder_block(make_input((2, 3, 6, 6), dtype, backend.device, fmt), weights, biases,
                                           True)
    assert winners.dtype == torch.uint8 and winners.numel() == 0


@pytest.mark.parametrize("allow_tf32", [False, True], ids=["exact", "tf32"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "linear"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_backward_with_the_forwards_winners(fmt, relu, allow_tf32):
    """The pool block's backward given the forward's winners (no a2 recomputed) and
    without them (a2 recomputed, its winners found again): one launch each, the same
    gradients to the bit, on the exact path and on tf32 tensor cores."""
    from cae_kernels import sim

    backend = BACKENDS["sim"]
    with backend.in_use(), pytest.MonkeyPatch.context() as mp, tf32(allow_tf32):
        mp.setenv("CAE_SIM_ARCH", "90")
        for shape in ((2, 1, 16, 28, 28), (2, 16, 8, 14, 14), (3, 8, 8, 7, 7), (1, 3, 5, 9, 11)):
            x, weights, biases, go = backward_inputs(backend, torch.float32, fmt, "pool", shape)
            _, winners = backend.ops.encoder_block(x, weights, biases, relu)
            grads = []
            for given in (winners, None):
                with sim.record_launches() as recorder:
                    gi, gw, gb = backend.ops.encoder_block_backward(go, x, None, given, weights, biases, relu, True)
                assert [launch.kernel.split("<")[0] for launch in recorder.launches] == [BACKWARD_KERNEL]
                grads.append([gi, *gw, *gb])
            for name, a, b in zip(("input", "w1", "w2", "b1", "b2"), *grads, strict=True):
                assert torch.equal(a, b), f"{shape}: {name}'s gradient"
            # The kernel reads the codes: every window's top-left element as its winner
            # moves w2's gradient.
            _, gw, _ = backend.ops.encoder_block_backward(go, x, None, torch.zeros_like(winners), weights, biases,
                                                          relu, True)
            assert not torch.equal(gw[1], grads[0][2]), f"{shape}: the codes were not read"


@pytest.mark.parametrize("fmt", FORMATS)
def test_backward_stages_the_pool_gradient_where_it_fits(fmt):
    """The pool block's backward copies its output gradient and the forward's winner codes
    into shared memory with its input where they fit: on sm_90 (227 KiB a block) one
    image's 8 x 7 x 7 of each, beside 96 KiB of 14 x 14 planes; on sm_86 (99 KiB) they do
    not fit and phase 3 reads global memory. The same gradients to the bit either way, and
    the per-op backward's; 9 x 9 images of 5 channels (125 bytes of codes an image: images
    1 to 4 start off a word's start) take the codes' first and last bytes one by one."""
    from cae_kernels import sim

    backend = BACKENDS["sim"]
    # the first on tf32 tensor cores (planes backward_pitch apart), the second exact
    cases = (((3, 16, 8, 14, 14), True, 8 * 7 * 7 + 8 * 7 * 7 // 4 + 1), ((5, 3, 5, 9, 9), False, None))
    for shape, allow_tf32, staged in cases:
        with backend.in_use(), tf32(allow_tf32):
            x, weights, biases, go = backward_inputs(backend, torch.float32, fmt, "pool", shape)
            _, winners = backend.ops.encoder_block(x, weights, biases, True)
            grads, smem = {}, {}
            for arch in ("90", "86"):
                with pytest.MonkeyPatch.context() as mp, sim.record_launches() as recorder:
                    mp.setenv("CAE_SIM_ARCH", arch)
                    gi, gw, gb = backend.ops.encoder_block_backward(go, x, None, winners, weights, biases, True,
                                                                    True)
                (launch,) = recorder.launches
                grads[arch], smem[arch] = [gi, *gw, *gb], launch.shared_bytes
            if staged is not None:  # float32 elements a block: the gradient and the codes' words
                assert smem["90"] - smem["86"] == 4 * staged, smem
            for name, a, b in zip(("input", "w1", "w2", "b1", "b2"), grads["90"], grads["86"], strict=True):
                assert torch.equal(a, b), f"{shape}: {name}'s gradient"
            if not allow_tf32:
                check_against_per_op(backend, torch.float32, "pool", grads["90"], x, weights, biases, True, go, True)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_interior_outputs(dtype, fmt, variant):
    """a1 and a2 as the kernel stores them at its own (non-halo) positions, which tile
    the image: every element written once, equal to the reference (and, in float32, to
    the per-op kernels' a1 and a2 bitwise). Odd sizes: tiles overhang the image."""
    backend = BACKENDS["sim"]
    with backend.in_use():
        for n, c0, c1, h, w in ((2, 3, 16, 19, 21), (3, 8, 8, 7, 7)):
            x = make_input((n, c0, h, w), dtype, backend.device, fmt).detach()
            weights, biases = block_params(c0, c1, variant, dtype, backend.device)
            out, a1, a2 = backend.ops._sim_encoder_block_interiors(x, weights, biases, True)
            ref_a1, ref_a2, ref_out = reference_block(x, weights, biases, True)
            for name, ours, ref in (("a1", a1, ref_a1), ("a2", a2, ref_a2), ("out", out, ref_out)):
                assert ours.is_contiguous(memory_format=FORMATS[fmt])
                assert_close(ours, ref, tolerance(backend, dtype, ref), name)
            assert torch.equal(out, backend.ops.encoder_block(x, weights, biases, True)[0])
            if dtype == torch.float32:
                composed_a1 = backend.ops.conv3x3(x, weights[0], biases[0], 1, True)
                assert torch.equal(a1, composed_a1)
                assert torch.equal(a2, backend.ops.conv3x3(composed_a1, weights[1], biases[1], 1, True))


@pytest.mark.parametrize("fmt", FORMATS)
def test_images_share_a_block(fmt):
    """A batch large enough that 7 x 7 images pack two to a block (the grid keeps its
    264 blocks), the last block with one image; the 4 x 4 layer's tiny images four."""
    from cae_kernels import sim

    backend = BACKENDS["sim"]
    with backend.in_use():
        for n, h, per_block in ((601, 7, 2), (1100, 4, 4)):
            x = make_input((n, 8, h, h), torch.float32, backend.device, fmt).detach()
            weights, biases = block_params(8, 8, "pool", torch.float32, backend.device)
            with sim.record_launches() as recorder:
                out = backend.ops.encoder_block(x, weights, biases, True)[0]
            (launch,) = recorder.launches
            assert launch.blocks == -(-n // per_block)
            *_, expected = reference_block(x, weights, biases, True)
            assert_close(out, expected, tolerance(backend, torch.float32, expected), f"output of {x.shape}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_declined_shapes_are_composed(variant):
    """Channel counts whose w2 (and w_down) do not fit shared memory: the kernel declines
    and the op composes the block from the per-op kernels (correlations and the pool),
    with the same result; the test hook reports the decline."""
    from cae_kernels import sim

    backend = BACKENDS["sim"]
    with backend.in_use():
        c1 = 40 if variant == "pool" else 24
        x = make_input((1, 2, 5, 6), torch.float32, backend.device).detach()
        weights, biases = block_params(2, c1, variant, torch.float32, backend.device)
        with sim.record_launches() as recorder:
            out = backend.ops.encoder_block(x, weights, biases, True)[0]
        kernels = [launch.kernel.split("<")[0] for launch in recorder.launches]
        assert kernels == ["cae::cuda::correlate_kernel"] * 2 + (
            ["cae::cuda::max_pool_nchw_kernel"] if variant == "pool" else ["cae::cuda::correlate_kernel"])
        *_, expected = reference_block(x, weights, biases, True)
        assert_close(out, expected, tolerance(backend, torch.float32, expected), "output")
        with pytest.raises(RuntimeError, match="declined"):
            backend.ops._sim_encoder_block_interiors(x, weights, biases, True)
        # One channel fewer fits.
        weights, biases = block_params(2, c1 - (8 if variant == "pool" else 1), variant, torch.float32,
                                       backend.device)
        with sim.record_launches() as recorder:
            backend.ops.encoder_block(x, weights, biases, True)
        assert len(recorder.launches) == 1


def test_argument_checks():
    backend = BACKENDS["sim"]
    x = torch.randn(1, 2, 5, 5)
    w, b = [torch.randn(4, 2, 3, 3), torch.randn(4, 4, 3, 3)], [torch.randn(4), torch.randn(4)]
    with pytest.raises(RuntimeError, match="takes 2 weights"):
        backend.ops.encoder_block(x, w[:1], b[:1], True)
    with pytest.raises(RuntimeError, match="a bias per weight"):
        backend.ops.encoder_block(x, w, b[:1], True)
    with pytest.raises(RuntimeError, match=r"weight 1 must have sizes \[4, 4, 3, 3\]"):
        backend.ops.encoder_block(x, [w[0], torch.randn(4, 3, 3, 3)], b, True)
    with pytest.raises(RuntimeError, match="channels"):
        backend.ops.encoder_block(x, [torch.randn(4, 3, 3, 3), w[1]], b, True)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_cpu_composes_the_block(dtype, fmt, variant):
    """The CPU backend has no fused kernel: Ops<CpuKernels> composes the block from its
    per-op kernels, the same result as calling them."""
    x = make_input((2, 3, 13, 11), dtype, "cpu", fmt).detach()
    weights, biases = block_params(3, 8, variant, dtype, "cpu")
    out = torch.ops.cae.encoder_block(x, weights, biases, True)[0]
    assert torch.equal(out, composed_block(torch.ops.cae, x, weights, biases, True))
    *_, expected = reference_block(x, weights, biases, True)
    assert_close(out, expected, tolerance(BACKENDS["sim"], dtype, expected), "output")


# --- The backward (csrc/cuda/encoder_block_backward_kernels.cuh): one launch for every
# gradient, each block's images summed in a fixed order, the blocks' sums added by the
# last block to finish.

# (N, C0, C1, H, W): odd sizes (a pool window and a stride-2 window past the edge), a
# partial group of channels, a 1x1 image, one input channel, 16 of them, and 20 channels
# of 10 inputs (partial last groups both ways, more (c1, c0) pairs than threads).
BACKWARD_SHAPES = ((2, 3, 8, 7, 5), (3, 16, 8, 6, 6), (2, 1, 5, 1, 1), (1, 3, 4, 3, 9), (2, 1, 16, 10, 12),
                   (1, 10, 20, 4, 5))
BACKWARD_KERNEL = "cae::cuda::encoder_block_backward_kernel"


def reference_grads(x, weights, biases, relu, grad_output, rounded_to=None, kernels_activations=None):
    """The input's, weights' and biases' gradients in float64 (PyTorch's autograd);
    `rounded_to`: a1 and a2 rounded to that dtype as the kernels store them (the
    gradient passes the rounding unchanged), so that the ReLU gates and the pool's
    winners are the kernels' (a 16-bit tie or flip moves a whole gradient);
    `kernels_activations`: the kernel's own forward (a1, a2, out) in their place alike."""
    leaves = [t.detach().double().requires_grad_() for t in (x, *weights, *biases)]
    x64, weights64, biases64 = leaves[0], leaves[1:1 + len(weights)], leaves[1 + len(weights):]

    def act(t, layer):
        if kernels_activations is not None:  # the kernel's values, and its gates
            ours = kernels_activations[layer].double()
            t = t * (ours > 0) if relu else t
            return t + (ours - t).detach()
        t = torch.relu(t) if relu else t
        return t if rounded_to is None else t + (t.to(rounded_to).double() - t).detach()

    a1 = act(F.conv2d(x64, weights64[0], biases64[0], padding=1), 0)
    a2 = act(F.conv2d(a1, weights64[1], biases64[1], padding=1), 1)
    if len(weights) == 2:
        out = F.max_pool2d(a2, 2, ceil_mode=True)
    else:
        out = act(F.conv2d(a2, weights64[2], biases64[2], stride=2, padding=1), 2)
    out.backward(grad_output.double())
    return [t.grad for t in leaves]


def float64_grads(ops, dtype, x, weights, biases, relu, grad_output):
    """reference_grads through the gates and pool winners the kernels see: 16-bit
    types' rounded activations, on the emulator the fused kernel's own (the test
    hook's: a float64 sum rounds to the other 16-bit neighbour of the kernel's float32
    one now and then, and a near-tie in a pool window then flips its winner);
    float32's own forward from the per-op kernels (on the exact path bitwise the fused
    kernels'), as float64's signs and near-ties differ from float32's in about one
    draw of 150 at 2 x 16 x 28 x 28, which moves whole gradients."""
    if dtype in HALF_DTYPES and hasattr(ops, "_sim_encoder_block_interiors"):
        with torch.no_grad():
            out, a1, a2 = ops._sim_encoder_block_interiors(x, weights, biases, relu)
        return reference_grads(x, weights, biases, relu, grad_output, kernels_activations=(a1, a2, out))
    if dtype == torch.float32:
        with torch.no_grad():
            activations = composed_activations(ops, x, weights, biases, relu)
        return reference_grads(x, weights, biases, relu, grad_output, kernels_activations=activations)
    return reference_grads(x, weights, biases, relu, grad_output, None if dtype == F64 else dtype)


def fused_backward(ops, x, weights, biases, relu, grad_output, input_grad):
    """encoder_block_backward as autograd calls it (the pool's winners from the forward,
    the strided block's output as its mask), and the kernels it launched."""
    from cae_kernels import sim

    out, winners = ops.encoder_block(x, weights, biases, relu)
    strided = len(weights) == 3
    mask = out if strided and relu else None
    with sim.record_launches() as recorder:
        grad_input, grad_weights, grad_biases = ops.encoder_block_backward(
            grad_output, x, mask, None if strided else winners, weights, biases, relu, input_grad)
    return [grad_input, *grad_weights, *grad_biases], [launch.kernel.split("<")[0] for launch in recorder.launches]


def composed_grads(ops, x, weights, biases, relu, grad_output):
    """The same gradients through the per-op kernels' autograd (the composed backward)."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, *weights, *biases)]
    k = len(weights)
    composed_block(ops, leaves[0], leaves[1:1 + k], leaves[1 + k:], relu).backward(grad_output)
    return [t.grad for t in leaves]


def grad_tolerance(backend, dtype, expected):
    # A backward through three layers and sums over every position: 16-bit types round
    # the recomputed activations and the per-op path's stored gradients.
    tol = tolerance(backend, dtype, expected)
    if dtype in HALF_DTYPES:
        tol = {k: 4 * v for k, v in tol.items()}
    return tol


def backward_inputs(backend, dtype, fmt, variant, shape):
    n, c0, c1, h, w = shape
    x = make_input((n, c0, h, w), dtype, backend.device, fmt).detach()
    weights, biases = block_params(c0, c1, variant, dtype, backend.device)
    go = make_input((n, c1, (h + 1) // 2, (w + 1) // 2), dtype, backend.device, fmt).detach()
    return x, weights, biases, go


NAMES = ("input", "w1", "w2", "w_down")


def check_grads(backend, dtype, ours, expected, input_grad, what):
    k = (len(ours) - 1) // 2
    names = ["input", *NAMES[1:1 + k], *(f"b{name[1:]}" for name in NAMES[1:1 + k])]
    for name, got, ref in zip(names, ours, expected, strict=True):
        if name == "input" and not input_grad:
            assert got.numel() == 0
            continue
        assert got.dtype == dtype and got.shape == ref.shape, name
        assert_close(got, ref, grad_tolerance(backend, dtype, ref), f"{name}'s gradient {what}")


def check_against_per_op(backend, dtype, variant, ours, x, weights, biases, relu, grad_output, input_grad):
    """The fused backward's gradients against the composed per-op backward's. Not in
    16-bit types with the pool: the per-op forward rounds its own a2, one unit off the
    fused kernel's now and then, and a near-tie in a pool window then has another winner
    (one failure in about 20,000 emulated 16-bit block cases here); float64_grads covers
    those through the kernel's own activations."""
    if dtype in HALF_DTYPES and variant == "pool":
        return
    composed = composed_grads(backend.ops, x, weights, biases, relu, grad_output)
    check_grads(backend, dtype, ours, [c.double() for c in composed], input_grad, "against the per-op backward")


@pytest.mark.parametrize("shape", BACKWARD_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("input_grad", [True, False], ids=["input_grad", "no_input_grad"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "linear"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("fmt", FORMATS)
@on_cuda_kernels("dtype")
def test_encoder_block_backward(backend, dtype, fmt, variant, relu, input_grad, shape):
    """One launch of the fused backward (sim), every gradient as float64 autograd gives
    it and as the composed per-op backward does (check_against_per_op), to the dtype's
    rounding; the input's in the input's layout, or empty when not asked for."""
    x, weights, biases, go = backward_inputs(backend, dtype, fmt, variant, shape)
    if backend.name == "sim":
        ours, kernels = fused_backward(backend.ops, x, weights, biases, relu, go, input_grad)
        assert kernels == [BACKWARD_KERNEL]
    else:
        out, winners = backend.ops.encoder_block(x, weights, biases, relu)
        mask, winners = (out if relu else None, None) if variant == "stride" else (None, winners)
        gi, gw, gb = backend.ops.encoder_block_backward(go, x, mask, winners, weights, biases, relu, input_grad)
        ours = [gi, *gw, *gb]
    if input_grad:
        assert ours[0].is_contiguous(memory_format=_suggest_memory_format(x))
    expected = float64_grads(backend.ops, dtype, x, weights, biases, relu, go)
    check_grads(backend, dtype, ours, expected, input_grad, "against float64")
    check_against_per_op(backend, dtype, variant, ours, x, weights, biases, relu, go, input_grad)


@pytest.mark.parametrize("variant", VARIANTS)
def test_backward_pool_winner_ties(variant):
    """Linear identity convolutions make a2 the input, whose small integers tie inside
    most pool windows: the output gradient goes to PyTorch's winner (row-major, the first
    maximum) exactly; the strided block's taps alike."""
    backend = BACKENDS["sim"]
    with backend.in_use():
        identity = torch.zeros(1, 1, 3, 3, dtype=F64)
        identity[0, 0, 1, 1] = 1
        weights = [identity, identity.clone()] + ([torch.randn(1, 1, 3, 3, dtype=F64)] if variant == "stride" else [])
        biases = [torch.zeros(1, dtype=F64) for _ in weights]
        x = torch.randint(0, 3, (2, 1, 7, 9), generator=torch.Generator().manual_seed(1)).to(F64)
        go = torch.randn(2, 1, 4, 5, dtype=F64)
        ours, kernels = fused_backward(backend.ops, x, weights, biases, False, go, True)
        assert kernels == [BACKWARD_KERNEL]
        expected = reference_grads(x, weights, biases, False, go)
        assert torch.equal(ours[0], expected[0]) if variant == "pool" else torch.allclose(ours[0], expected[0])
        for got, ref in zip(ours[1:], expected[1:], strict=True):
            torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_backward_many_blocks_deterministic(fmt, variant, monkeypatch):
    """A batch of 601 tiny images: two to a block (the grid keeps its 264 blocks), the
    last block with one, so the blocks' sums meet through several groups of tickets.
    The gradients match the reference, and are bitwise the same under another thread
    schedule (the sums' order does not depend on which block finishes last)."""
    backend = BACKENDS["sim"]
    with backend.in_use():
        x, weights, biases, go = backward_inputs(backend, torch.float32, fmt, variant, (601, 2, 4, 3, 3))
        from cae_kernels import sim

        mask = backend.ops.encoder_block(x, weights, biases, True)[0] if variant == "stride" else None
        with sim.record_launches() as recorder:
            gi, gw, gb = backend.ops.encoder_block_backward(go, x, mask, None, weights, biases, True, True)
        (launch,) = recorder.launches
        assert launch.blocks == 301
        expected = float64_grads(backend.ops, torch.float32, x, weights, biases, True, go)
        check_grads(backend, torch.float32, [gi, *gw, *gb], expected, True, "against float64")
        monkeypatch.setenv("CAE_SIM_SCHEDULE", "shuffle:7")
        gi2, gw2, gb2 = backend.ops.encoder_block_backward(go, x, mask, None, weights, biases, True, True)
        for a, b in zip([gi, *gw, *gb], [gi2, *gw2, *gb2], strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("variant", VARIANTS)
def test_backward_declined_shapes_are_composed(variant):
    """The pool model's first block (28 x 28, 16 channels) fits one image per block in
    float32; in float64 it does not fit shared memory: the kernel declines and the
    composed backward (recompute, then the per-op kernels) gives the gradients."""
    backend = BACKENDS["sim"]
    with backend.in_use():
        for dtype, fused in ((torch.float32, True), (F64, False)):
            x, weights, biases, go = backward_inputs(backend, dtype, "nchw", variant, (1, 1, 16, 28, 28))
            ours, kernels = fused_backward(backend.ops, x, weights, biases, True, go, True)
            assert (kernels == [BACKWARD_KERNEL]) == fused, kernels
            assert fused or "cae::cuda::encoder_block_kernel" in kernels
            expected = float64_grads(backend.ops, dtype, x, weights, biases, True, go)
            check_grads(backend, dtype, ours, expected, True, "against float64")


# Threads a block of the fused backward for each shape (test below).
BACKWARD_THREADS = {(2, 1, 16, 28, 28): 512, (2, 16, 8, 14, 14): 256, (1, 1, 8, 48, 48): 512}


@pytest.mark.parametrize("shape", BACKWARD_THREADS, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@on_cuda_kernels()
def test_backward_block_size_follows_shared_memory(backend, dtype, fmt, variant, shape):
    """The pool model's first block (a 28 x 28 image of 16 channels a block, over half an
    SM's shared memory) runs 512 threads a block, its second (14 x 14) the usual 256
    (the emulator's launch record; on a GPU, that both launch); a 48 x 48 image of 8
    channels fits only with its planes' rows unpadded (W + 2 apart, not backward_pitch's
    70) and runs so. Every gradient as float64 autograd and the per-op backward
    (check_against_per_op) give it, either way."""
    x, weights, biases, go = backward_inputs(backend, dtype, fmt, variant, shape)
    mask = backend.ops.encoder_block(x, weights, biases, True)[0] if variant == "stride" else None
    if backend.name == "sim":
        from cae_kernels import sim

        with sim.record_launches() as recorder:
            gi, gw, gb = backend.ops.encoder_block_backward(go, x, mask, None, weights, biases, True, True)
        (launch,) = recorder.launches
        assert launch.kernel.startswith(BACKWARD_KERNEL) and launch.threads_per_block == BACKWARD_THREADS[shape], launch
    else:
        gi, gw, gb = backend.ops.encoder_block_backward(go, x, mask, None, weights, biases, True, True)
    ours = [gi, *gw, *gb]
    expected = float64_grads(backend.ops, dtype, x, weights, biases, True, go)
    check_grads(backend, dtype, ours, expected, True, "against float64")
    check_against_per_op(backend, dtype, variant, ours, x, weights, biases, True, go, True)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("fmt", FORMATS)
@on_cuda_kernels()
def test_encoder_block_on_tf32_tensor_cores(backend, fmt, variant):
    """float32 with TF32 allowed (PyTorch's default for cuDNN): the block's 16 -> 16 (or
    12 -> 12) products on tf32 tensor cores: a2 in the forward and in the backward's
    recompute alike, and the backward's grad_z1, input gradient and weight gradients
    (the biases' in exact float32). Forward and backward
    not equal to the exact path's (the tensor cores ran); on an emulated sm_75, or
    without TF32, the exact path's bitwise. The forward within float16's tolerance of
    float64, and the backward: of the linear strided block (no ReLU gate or pool winner
    that a rounding could flip: every gradient continuous in a2), and on the emulator
    with ReLU through the gates and winners of the forward's own a1, a2 and output (the
    test hook's): the recompute must find the forward's."""
    for shape in ((2, 3, 16, 9, 11), (1, 8, 12, 7, 10)):  # small enough for sm_75's fused backward
        x, weights, biases, go = backward_inputs(backend, torch.float32, fmt, variant, shape)
        results = {}
        for allowed, arch in ((False, "90"), (True, "75"), (True, "90")):
            if backend.name != "sim" and arch == "75":
                continue
            with pytest.MonkeyPatch.context() as mp, tf32(allowed):
                mp.setenv("CAE_SIM_ARCH", arch)
                out = backend.ops.encoder_block(x, weights, biases, True)[0]
                gi, gw, gb = backend.ops.encoder_block_backward(go, x, out if variant == "stride" else None, None,
                                                                weights, biases, True, True)
                results[allowed, arch] = [out, gi, *gw, *gb]
        *_, expected = reference_block(x, weights, biases, True)
        assert_close(results[True, "90"][0], expected, tolerance(backend, torch.float16, expected), "forward")
        for i, what in ((0, "forward"), (1, "input gradient"), (2, "w1's gradient"), (3, "w2's gradient")):
            assert not torch.equal(results[True, "90"][i], results[False, "90"][i]), f"{what}: no tensor cores"
        if (True, "75") in results:  # (the weight gradients' sums follow sm_75's blocks)
            for i, what in ((0, "forward"), (1, "input gradient")):
                assert torch.equal(results[True, "75"][i], results[False, "90"][i]), f"{what} on sm_75"
        if variant == "stride":
            with tf32(True):
                gi, gw, gb = backend.ops.encoder_block_backward(go, x, None, None, weights, biases, False, True)
            expected = reference_grads(x, weights, biases, False, go)
            check_tf32_grads(backend, [gi, *gw, *gb], expected, "linear")
        if backend.name == "sim":
            with pytest.MonkeyPatch.context() as mp, tf32(True):
                mp.setenv("CAE_SIM_ARCH", "90")
                out, a1, a2 = backend.ops._sim_encoder_block_interiors(x, weights, biases, True)
                mask = out if variant == "stride" else None
                gi, gw, gb = backend.ops.encoder_block_backward(go, x, mask, None, weights, biases, True, True)
            expected = reference_grads(x, weights, biases, True, go, kernels_activations=(a1, a2, out))
            check_tf32_grads(backend, [gi, *gw, *gb], expected, "relu")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("layer", "c0"), [("a2", 2), ("a1", 8), ("a1", 72)], ids=["a2", "a1", "a1-in-chunks"])
def test_tf32_recompute_finds_the_forwards_gates(fmt, variant, layer, c0):
    """The backward's a1 and a2, recomputed on tf32 tensor cores, are the forward's to the
    bit: a constant image and a bias cancelling the exact path's a1 (or a2) put every
    interior a1 (a2) within rounding of zero, where tf32's and float32's sums fall on
    either side of the ReLU (a recompute that differs from the forward moves whole
    gradients). a1 takes the tensor cores from 4 input channels; 72 do not fit the
    forward's shared memory at once, so its chunks of 16 must sum as the backward's one
    pass does; they are also 14 groups of dw1's n-tiles for the backward's 8 warps, taken
    in rounds (w1's gradient was 20% wrong when the groups past the warps were skipped)."""
    backend = BACKENDS["sim"]
    with backend.in_use(), pytest.MonkeyPatch.context() as mp:
        mp.setenv("CAE_SIM_ARCH", "90")
        n, c1, h, w = 2, 16, 10, 8
        x = torch.full((n, c0, h, w), 0.75).contiguous(memory_format=FORMATS[fmt])
        weights, biases = block_params(c0, c1, variant, torch.float32, "cpu")
        if layer == "a1":
            biases[0] = -backend.ops.conv3x3(x, weights[0], None, 1, False)[0, :, h // 2, w // 2].contiguous()
        else:
            a1 = backend.ops.conv3x3(x, weights[0], biases[0], 1, True)
            biases[1] = -backend.ops.conv3x3(a1, weights[1], None, 1, False)[0, :, h // 2, w // 2].contiguous()
        go = make_input((n, c1, (h + 1) // 2, (w + 1) // 2), torch.float32, "cpu", fmt).detach()
        with tf32(True):
            out, a1, a2 = backend.ops._sim_encoder_block_interiors(x, weights, biases, True)
            gi, gw, gb = backend.ops.encoder_block_backward(go, x, out if variant == "stride" else None, None, weights,
                                                            biases, True, True)
        interior = (a1 if layer == "a1" else a2)[:, :, 2:-2, 2:-2]
        assert 0 < (interior > 0).sum() < interior.numel() and interior.abs().max() < 1e-2, f"{layer} is not on zero"
        expected = reference_grads(x, weights, biases, True, go, kernels_activations=(a1, a2, out))
        check_tf32_grads(backend, [gi, *gw, *gb], expected, f"{layer} on zero")


def check_tf32_grads(backend, ours, expected, what):
    names = ["input", *NAMES[1:len(ours) // 2 + 1], *(f"b{name[1:]}" for name in NAMES[1:len(ours) // 2 + 1])]
    for name, got, ref in zip(names, ours, expected, strict=True):
        assert_close(got, ref, grad_tolerance(backend, torch.float16, ref), f"{name}'s gradient on tf32 ({what})")


@pytest.mark.parametrize("variant", VARIANTS)
def test_backward_gradcheck_several_blocks(variant):
    """gradcheck (float64) through the op with three images, a block each."""
    backend = BACKENDS["sim"]
    with backend.in_use():
        x, weights, biases, _ = backward_inputs(backend, F64, "nhwc", variant, (3, 2, 3, 3, 4))
        k = len(weights)
        leaves = [t.requires_grad_() for t in (x, *weights, *biases)]
        assert torch.autograd.gradcheck(
            lambda x, *p: backend.functions.encoder_block(x, p[:k], p[k:], "relu"), leaves)
