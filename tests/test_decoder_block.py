"""The fused decoder block (csrc/cuda/decoder_block_kernels.cuh) through the op
``decoder_block``: stride-2 transposed conv+bias+act layers, a linear stride-1 one, then
the center crop, in one launch. Against float64 PyTorch, and against the per-op kernels
it replaces (bitwise in float32 and float64: the same sums in the same order)."""

import pytest
import torch
import torch.nn.functional as F
from test_blocks import decoder_per_op

from cae_kernels import reference
from cae_kernels._registration import _suggest_memory_format

from backends import BACKENDS, FORMATS, HALF_DTYPES, assert_close, make_input, on_cuda_kernels, tf32

F64 = torch.float64
KERNEL = "cae::cuda::decoder_block_kernel"

# (N, C0, [C_out of each layer], h, w, output_size): the autoencoder's decoder (8 x 4 x 4
# -> 28 x 28), 1 to 4 layers, odd sizes and odd crops, no crop, one output channel or
# several (a group of 8), batch 1, and a batch of several blocks.
SHAPES = (
    (2, 8, (8, 8, 16, 1), 4, 4, (28, 28)),
    (2, 3, (4, 5, 6, 2), 3, 5, (21, 37)),
    (1, 4, (3, 1), 3, 2, (5, 3)),
    (3, 5, (3,), 5, 7, (5, 7)),
    (2, 3, (4, 5, 2), 2, 3, (7, 11)),
    (3, 9, (10, 9), 1, 1, (2, 2)),
)


def shape_id(s):
    return f"{len(s[2])}L-" + "x".join(map(str, (s[0], s[1], *s[2], s[3], s[4], *s[5])))


def block_params(c0, channels, dtype, device):
    scale = 0.5 if dtype in HALF_DTYPES else 1.0
    ins = (c0, *channels[:-1])
    weights = [make_input((a, b, 3, 3), dtype, device, scale=scale / 2).detach()
               for a, b in zip(ins, channels, strict=True)]
    biases = [make_input((b,), dtype, device, scale=scale).detach() for b in channels]
    return weights, biases


def reference_block(x, weights, biases, relu, output_size):
    """The block in float64 (cae_kernels.reference: torch.nn.functional)."""
    return decoder_per_op(reference, x.double(), [w.double() for w in weights], [b.double() for b in biases],
                          output_size, "relu" if relu else None)


def composed_block(functions, x, weights, biases, relu, output_size):
    """The same block from the per-op kernels."""
    return decoder_per_op(functions, x, weights, biases, output_size, "relu" if relu else None)


def tolerance(backend, dtype, expected, layers):
    # Several layers deep: the intermediates' rounding compounds in 16-bit types.
    rtol, atol = backend.tolerances[dtype]
    scale = float(layers) if dtype in HALF_DTYPES else 1.0
    return {"rtol": rtol * scale, "atol": atol * scale * max(1.0, expected.abs().max().item())}


def kernels_of(recorder):
    return [launch.kernel.split("<")[0] for launch in recorder.launches]


def fits(dtype, shape):
    """Whether the fused kernel takes the shape: the autoencoder's decoder does not fit
    shared memory in float64 (its 8 x 18 x 18 plane, the weights and a strip of
    one row of the 16 x 32 x 32 layer are 53 KiB)."""
    return not (dtype == F64 and shape == SHAPES[0])


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "linear"])
@pytest.mark.parametrize("fmt", FORMATS)
@on_cuda_kernels("dtype")
def test_decoder_block(backend, dtype, fmt, relu, shape):
    """One launch, the float64 reference's result at the dtype's tolerance, and the
    composed per-op kernels' result (bitwise in float32 and float64)."""
    n, c0, channels, h, w, size = shape
    x = make_input((n, c0, h, w), dtype, backend.device, fmt).detach()
    weights, biases = block_params(c0, channels, dtype, backend.device)
    if backend.name == "sim":
        from cae_kernels import sim

        with sim.record_launches() as recorder:
            out = backend.ops.decoder_block(x, weights, biases, relu, list(size))
        if fits(dtype, shape):
            assert kernels_of(recorder) == [KERNEL]
        else:
            assert KERNEL not in kernels_of(recorder)
    else:
        out = backend.ops.decoder_block(x, weights, biases, relu, list(size))
    expected = reference_block(x, weights, biases, relu, size)
    assert out.dtype == dtype and out.shape == expected.shape
    assert out.is_contiguous(memory_format=_suggest_memory_format(x))
    assert_close(out, expected, tolerance(backend, dtype, expected, len(channels)), "output")
    composed = composed_block(backend.functions, x, weights, biases, relu, size)
    if dtype in (torch.float32, F64):
        assert torch.equal(out, composed), (out - composed).abs().max()
    else:
        assert_close(out, composed.double(), tolerance(backend, dtype, expected, len(channels)),
                     "against the per-op kernels")


@pytest.mark.parametrize("fmt", FORMATS)
def test_images_share_a_block(fmt):
    """A batch large enough that two images share a block (the grid keeps its 264
    blocks), the last block with one image."""
    from cae_kernels import sim

    backend = BACKENDS["sim"]
    with backend.in_use():
        n, size = 601, (3, 4)
        x = make_input((n, 2, 2, 2), torch.float32, backend.device, fmt).detach()
        weights, biases = block_params(2, (3, 2), torch.float32, backend.device)
        with sim.record_launches() as recorder:
            out = backend.ops.decoder_block(x, weights, biases, True, list(size))
        (launch,) = recorder.launches
        assert launch.kernel.startswith(KERNEL) and launch.blocks == -(-n // 2)
        assert torch.equal(out, composed_block(backend.functions, x, weights, biases, True, size))


@pytest.mark.parametrize("case", ["five-layers", "too-large"])
def test_declined_shapes_are_composed(case):
    """More layers than the kernel takes, or an input whose plane does not fit shared
    memory: the op composes the block from the per-op kernels, with the same result."""
    from cae_kernels import sim

    backend = BACKENDS["sim"]
    with backend.in_use():
        if case == "five-layers":
            n, c0, channels, h, w, size = 1, 2, (2, 2, 2, 2, 1), 1, 2, (15, 30)
        else:  # the input's plane alone: 2 x 102 x 102 elements, 81 KiB
            n, c0, channels, h, w, size = 1, 2, (3,), 100, 100, (99, 100)
        x = make_input((n, c0, h, w), torch.float32, backend.device).detach()
        weights, biases = block_params(c0, channels, torch.float32, backend.device)
        with sim.record_launches() as recorder:
            out = backend.ops.decoder_block(x, weights, biases, True, list(size))
        assert KERNEL not in kernels_of(recorder)
        assert kernels_of(recorder).count("cae::cuda::correlate_transpose_kernel") == len(channels)
        assert torch.equal(out, composed_block(backend.functions, x, weights, biases, True, size))
        expected = reference_block(x, weights, biases, True, size)
        assert_close(out, expected, tolerance(backend, torch.float32, expected, len(channels)), "output")
        if case == "too-large":  # a smaller image fits
            x = x[:, :, :60, :60].contiguous()
            with sim.record_launches() as recorder:
                out = backend.ops.decoder_block(x, weights, biases, True, [59, 60])
            assert kernels_of(recorder) == [KERNEL]
            assert torch.equal(out, composed_block(backend.functions, x, weights, biases, True, (59, 60)))


BACKWARD_KERNEL = "cae::cuda::decoder_block_backward_kernel"


def tf32_rounded(t):
    """float32 rounded to tf32 as the tensor cores' operands are (mma.cuh's to_tf32:
    10 mantissa bits, to nearest, ties away from zero)."""
    bits = t.float().contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def masked_reference_block(functions, x, weights, biases, relu, size, *, on_tf32=False):
    """The block in float64 through PyTorch, on float64 leaves: ``(leaves, output)``, the
    hidden ReLUs masked where the backend's own hidden layers (in the inputs' dtype, the
    fused kernel's bit for bit in float32 and float64) are positive; ``on_tf32``: where
    the fused kernel's float32 layers on tf32 tensor cores are (their operands rounded to
    tf32, the products summed in float64; the per-op kernels keep layers of few channels
    off the tensor cores). A pre-activation within rounding of zero must not flip between
    the kernel and the reference: that would move its gradient arbitrarily far."""
    inputs = [t.detach().double().requires_grad_() for t in (x, *weights, *biases)]
    k = len(weights)
    h, hidden = inputs[0], x.detach()
    for i in range(k - 1):
        h = F.conv_transpose2d(h, inputs[1 + i], inputs[1 + k + i], stride=2, padding=1, output_padding=1)
        if relu and on_tf32:
            hidden = F.conv_transpose2d(tf32_rounded(hidden).double(), tf32_rounded(weights[i]).double(),
                                        biases[i].double(), stride=2, padding=1, output_padding=1)
            h = h * (hidden > 0)
            hidden = torch.relu(hidden).float()
        elif relu:
            hidden = functions.conv_transpose3x3(hidden, weights[i].detach(), biases[i].detach(), 2, "relu")
            h = h * (hidden > 0)
    full = F.conv_transpose2d(h, inputs[k], inputs[2 * k], stride=1, padding=1)
    height, width = size
    top, left = (full.shape[2] - height) // 2, (full.shape[3] - width) // 2
    return inputs, full[..., top:top + height, left:left + width]


def backward_reference(functions, x, weights, biases, relu, size, grad, *, on_tf32=False):
    """Every gradient in float64 by autograd through PyTorch, with the backend's ReLU masks
    (``on_tf32``: the tensor cores', masked_reference_block)."""
    inputs, out = masked_reference_block(functions, x, weights, biases, relu, size, on_tf32=on_tf32)
    return torch.autograd.grad(out, inputs, grad.double())


def per_op_grads(functions, x, weights, biases, relu, size, grad):
    """Every gradient by autograd through the per-op kernels."""
    inputs = [t.detach().requires_grad_() for t in (x, *weights, *biases)]
    k = len(weights)
    out = composed_block(functions, inputs[0], inputs[1:k + 1], inputs[k + 1:], relu, size)
    return torch.autograd.grad(out, inputs, grad)


def backward_tolerance(backend, dtype, expected, layers):
    # Sums over every position of the batch, several layers deep.
    tol = tolerance(backend, dtype, expected, layers)
    scale = 4.0 if dtype in HALF_DTYPES else 1.0
    return {"rtol": tol["rtol"] * scale, "atol": tol["atol"] * scale}


@pytest.mark.parametrize("input_grad", [True, False], ids=["input-grad", "no-input-grad"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "linear"])
@pytest.mark.parametrize("fmt", FORMATS)
@on_cuda_kernels("dtype")
def test_decoder_block_backward(backend, dtype, fmt, relu, shape, input_grad):
    """One launch; every gradient as PyTorch's in float64 and as the per-op kernels' at
    the dtype's tolerance; grad_input empty where not asked for."""
    n, c0, channels, h, w, size = shape
    x = make_input((n, c0, h, w), dtype, backend.device, fmt).detach()
    weights, biases = block_params(c0, channels, dtype, backend.device)
    grad = make_input((n, channels[-1], *size), dtype, backend.device, fmt).detach()
    args = (grad, x, weights, biases, relu, list(size), input_grad)
    if backend.name == "sim":
        from cae_kernels import sim

        with sim.record_launches() as recorder:
            grad_input, grad_weights, grad_biases = backend.ops.decoder_block_backward(*args)
        assert kernels_of(recorder) == [BACKWARD_KERNEL]
    else:
        grad_input, grad_weights, grad_biases = backend.ops.decoder_block_backward(*args)
    ours = [grad_input, *grad_weights, *grad_biases]
    layers = len(channels)
    expected = backward_reference(backend.functions, x, weights, biases, relu, size, grad)
    per_op = per_op_grads(backend.functions, x, weights, biases, relu, size, grad)
    if input_grad:
        assert grad_input.is_contiguous(memory_format=_suggest_memory_format(x))
    else:
        assert grad_input.numel() == 0
        ours, expected, per_op = ours[1:], expected[1:], per_op[1:]
    for i, (mine, ref, theirs) in enumerate(zip(ours, expected, per_op, strict=True)):
        assert mine.dtype == dtype and mine.shape == ref.shape
        assert_close(mine, ref, backward_tolerance(backend, dtype, ref, layers), f"gradient {i}")
        assert_close(mine, theirs.double(), backward_tolerance(backend, dtype, ref, layers),
                     f"gradient {i} against the per-op kernels")


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[4], SHAPES[2]], ids=shape_id)
@pytest.mark.parametrize("fmt", FORMATS)
@on_cuda_kernels()
def test_decoder_block_on_tf32_tensor_cores(backend, fmt, shape):
    """float32 with TF32 allowed (PyTorch's default for cuDNN): the hidden layers (in the
    forward and in the backward's recompute alike), and the weight gradients of the layers
    with more than one output channel and the input gradients where the output gradient
    has more than one, on tf32 tensor cores (every layer's input has at most 16 channels):
    deterministic, not equal to the exact path's where the tensor cores ran, within
    float16's tolerance of float64 (the ReLU masks of tf32 products, masked_reference_block;
    the recompute's are the forward's to the bit: test_tf32_recompute_finds_the_forwards_gates).
    On an emulated sm_75 (where the block fits its shared memory), everything the exact
    path's."""
    n, c0, channels, h, w, size = shape
    x = make_input((n, c0, h, w), torch.float32, backend.device, fmt).detach()
    weights, biases = block_params(c0, channels, torch.float32, backend.device)
    grad = make_input((n, channels[-1], *size), torch.float32, backend.device, fmt).detach()
    layers = len(channels)
    runs = {}
    for allowed, arch in ((False, "90"), (True, "90"), (True, "90"), (True, "75")):
        if arch == "75" and (backend.name != "sim" or shape == SHAPES[0]):
            continue  # (the autoencoder's decoder: past sm_75's shared memory, composed)
        with pytest.MonkeyPatch.context() as mp, tf32(allowed):
            mp.setenv("CAE_SIM_ARCH", arch)
            out = backend.ops.decoder_block(x, weights, biases, True, list(size))
            gi, gw, gb = backend.ops.decoder_block_backward(grad, x, weights, biases, True, list(size), True)
        runs.setdefault((allowed, arch), []).append([out, gi, *gw, *gb])
    exact, (tc, tc_again) = runs[False, "90"][0], runs[True, "90"]
    for i, (mine, again) in enumerate(zip(tc, tc_again, strict=True)):
        assert torch.equal(mine, again), f"result {i}: not deterministic"
    assert not torch.equal(tc[0], exact[0]), "the forward: no tensor cores"
    for j in range(layers):
        if channels[j] > 1:  # (one output channel: the warps' sums)
            assert not torch.equal(tc[2 + j], exact[2 + j]), f"layer {j}'s weight gradient: no tensor cores"
    expected = reference_block(x, weights, biases, True, size)
    assert_close(tc[0], expected, tolerance(backend, torch.float16, expected, layers), "the forward on tf32")
    expected = backward_reference(backend.functions, x, weights, biases, True, size, grad, on_tf32=True)
    for i, (mine, ref) in enumerate(zip(tc[1:], expected, strict=True)):
        assert_close(mine, ref, backward_tolerance(backend, torch.float16, ref, layers), f"gradient {i} on tf32")
    if (True, "75") in runs:
        for i, (mine, theirs) in enumerate(zip(runs[True, "75"][0], exact, strict=True)):
            assert torch.equal(mine, theirs), f"result {i} on sm_75"


@pytest.mark.parametrize("fmt", FORMATS)
def test_tf32_recompute_finds_the_forwards_gates(fmt):
    """The backward's hidden layer, recomputed on tf32 tensor cores, is the forward's to
    the bit. A constant image and a bias cancelling the exact path's sums put the hidden
    layer's interior at odd rows and columns within rounding of zero, where tf32's and
    float32's sums fall on either side of the ReLU; the last layer (its centre tap an
    identity) passes the forward's hidden layer out whole, and the reference gradients
    take its ReLU mask: a recompute that differs moves whole gradients."""
    backend = BACKENDS["sim"]
    with backend.in_use(), pytest.MonkeyPatch.context() as mp:
        mp.setenv("CAE_SIM_ARCH", "90")
        n, c0, c1, h, w = 2, 8, 16, 5, 6
        size = [2 * h, 2 * w]
        x = torch.full((n, c0, h, w), 0.75).contiguous(memory_format=FORMATS[fmt])
        w0 = make_input((c0, c1, 3, 3), torch.float32, "cpu", scale=0.25).detach()
        w1 = torch.zeros(c1, c1, 3, 3)
        w1[:, :, 1, 1] = torch.eye(c1)
        b1 = torch.zeros(c1)
        linear = backend.ops.decoder_block(x, [w0, w1], [b1, b1], False, size)  # the exact path
        b0 = -linear[0, :, 2 * (h // 2) + 1, 2 * (w // 2) + 1].contiguous()
        go = make_input((n, c1, *size), torch.float32, "cpu", fmt).detach()
        with tf32(True):
            out = backend.ops.decoder_block(x, [w0, w1], [b0, b1], True, size)
            gi, gw, gb = backend.ops.decoder_block_backward(go, x, [w0, w1], [b0, b1], True, size, True)
    interior = out[:, :, 1:2 * h - 2:2, 1:2 * w - 2:2]
    assert 0 < (interior > 0).sum() < interior.numel() and interior.max() < 1e-2, "the layer is not on zero"
    leaves = [t.double().requires_grad_() for t in (x, w0, w1, b0, b1)]
    hidden = F.conv_transpose2d(leaves[0], leaves[1], leaves[3], stride=2, padding=1, output_padding=1)
    full = F.conv_transpose2d(hidden * (out > 0), leaves[2], leaves[4], stride=1, padding=1)
    expected = torch.autograd.grad(full, leaves, go.double())
    for name, mine, ref in zip(["input", "w0", "w1", "b0", "b1"], [gi, *gw, *gb], expected, strict=True):
        assert_close(mine, ref, backward_tolerance(backend, torch.float16, ref, 2), f"{name}'s gradient on tf32")


@pytest.mark.parametrize("fmt", FORMATS)
def test_backward_is_deterministic_over_many_blocks(fmt):
    """301 blocks of two images (ten ticket groups of finish_grid_sums): the weight and
    bias gradients the same bits on every run, and right."""
    from cae_kernels import sim

    backend = BACKENDS["sim"]
    with backend.in_use():
        n, size = 601, (3, 4)
        x = make_input((n, 2, 2, 2), torch.float32, backend.device, fmt).detach()
        weights, biases = block_params(2, (3, 2), torch.float32, backend.device)
        grad = make_input((n, 2, *size), torch.float32, backend.device, fmt).detach()
        runs = []
        for _ in range(2):
            with sim.record_launches() as recorder:
                runs.append(backend.ops.decoder_block_backward(grad, x, weights, biases, True, list(size), True))
            (launch,) = recorder.launches
            assert launch.kernel.startswith(BACKWARD_KERNEL) and launch.blocks == -(-n // 2)
        (gi1, gw1, gb1), (gi2, gw2, gb2) = runs
        for a, b in zip([gi1, *gw1, *gb1], [gi2, *gw2, *gb2], strict=True):
            assert torch.equal(a, b)
        expected = backward_reference(backend.functions, x, weights, biases, True, size, grad)
        for i, (mine, ref) in enumerate(zip([gi1, *gw1, *gb1], expected, strict=True)):
            assert_close(mine, ref, backward_tolerance(backend, torch.float32, ref, 2), f"gradient {i}")


@pytest.mark.parametrize("fmt", FORMATS)
def test_backward_gradcheck(fmt):
    """gradcheck in float64 through the op's autograd (the fused backward, one launch)."""
    from cae_kernels import sim

    backend = BACKENDS["sim"]
    with backend.in_use():
        x = make_input((2, 3, 2, 3), F64, backend.device, fmt)
        weights, biases = block_params(3, (4, 2, 2), F64, backend.device)
        params = [p.requires_grad_() for p in (*weights, *biases)]

        def block(x, *p):
            return backend.functions.decoder_block(x, p[:3], p[3:], (7, 11), "relu")

        out = block(x, *params)
        with sim.record_launches() as recorder:
            out.backward(torch.ones_like(out))
        assert BACKWARD_KERNEL in kernels_of(recorder)
        assert torch.autograd.gradcheck(block, (x, *params))


@pytest.mark.parametrize("arch, fused", [("75", False), ("86", True)])
def test_backward_declines_past_the_opt_in_limit(monkeypatch, arch, fused):
    """The autoencoder's decoder needs 98 KB of shared memory an image for the backward:
    more than sm_75's 64 KiB (the op runs the per-op chain, with the same gradients),
    within sm_86's 99 KiB (one launch)."""
    from cae_kernels import sim

    backend = BACKENDS["sim"]
    monkeypatch.setenv("CAE_SIM_ARCH", arch)
    with backend.in_use():
        n, c0, channels, h, w, size = SHAPES[0]
        x = make_input((n, c0, h, w), torch.float32, backend.device).detach()
        weights, biases = block_params(c0, channels, torch.float32, backend.device)
        grad = make_input((n, channels[-1], *size), torch.float32, backend.device).detach()
        with sim.record_launches() as recorder:
            grads = backend.ops.decoder_block_backward(grad, x, weights, biases, True, list(size), True)
        assert (kernels_of(recorder) == [BACKWARD_KERNEL]) == fused
        assert (BACKWARD_KERNEL in kernels_of(recorder)) == fused
        grad_input, grad_weights, grad_biases = grads
        expected = backward_reference(backend.functions, x, weights, biases, True, size, grad)
        for i, (mine, ref) in enumerate(zip([grad_input, *grad_weights, *grad_biases], expected, strict=True)):
            assert_close(mine, ref, backward_tolerance(backend, torch.float32, ref, len(channels)), f"gradient {i}")
