"""The fused encoder block's forward (csrc/cuda/encoder_block_kernels.cuh) through the op
``encoder_block``: conv+bias+act, conv+bias+act, then a 2x2 max-pool (ceil mode) or a
stride-2 conv+bias+act, in one launch. Against float64 PyTorch, against the per-op
kernels it replaces (bitwise in float32 and float64: the same sums in the same order),
and its interior outputs a1 / a2 through the emulator's test hook."""

import pytest
import torch
import torch.nn.functional as F

from cae_kernels._registration import _suggest_memory_format

from backends import BACKENDS, FORMATS, assert_close, make_input, on_cuda_kernels

F64 = torch.float64
VARIANTS = ("pool", "stride")

# (N, C0, C1, H, W): the pool model's three encoder blocks (28 -> 14 in several tiles
# per image; 16 input channels; 7 -> 4 with the ceil-mode edge), odd sizes with a
# partial group of channels, a 1x1 image, and 40 input channels (several passes through
# shared memory in float64).
SHAPES = ((2, 1, 16, 28, 28), (2, 16, 8, 14, 14), (3, 8, 8, 7, 7), (2, 3, 5, 13, 11), (2, 2, 3, 1, 1),
          (1, 40, 4, 6, 9))


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


def composed_block(ops, x, weights, biases, relu):
    """The same block from the per-op kernels."""
    a1 = ops.conv3x3(x, weights[0], biases[0], 1, relu)
    a2 = ops.conv3x3(a1, weights[1], biases[1], 1, relu)
    return ops.max_pool2x2(a2) if len(weights) == 2 else ops.conv3x3(a2, weights[2], biases[2], 2, relu)


def tolerance(backend, dtype, expected):
    # Two or three layers deep: the intermediates' rounding compounds in 16-bit types.
    rtol, atol = backend.tolerances[dtype]
    scale = 2.0 if dtype in (torch.float16, torch.bfloat16) else 1.0
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
            out = backend.ops.encoder_block(x, weights, biases, relu)
        assert [launch.kernel.split("<")[0] for launch in recorder.launches] == ["cae::cuda::encoder_block_kernel"]
    else:
        out = backend.ops.encoder_block(x, weights, biases, relu)
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
            assert torch.equal(out, backend.ops.encoder_block(x, weights, biases, True))
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
                out = backend.ops.encoder_block(x, weights, biases, True)
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
            out = backend.ops.encoder_block(x, weights, biases, True)
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
    out = torch.ops.cae.encoder_block(x, weights, biases, True)
    assert torch.equal(out, composed_block(torch.ops.cae, x, weights, biases, True))
    *_, expected = reference_block(x, weights, biases, True)
    assert_close(out, expected, tolerance(BACKENDS["sim"], dtype, expected), "output")
