"""The block ops (encoder_block, decoder_block and their backward ops) on every backend:
against the per-op composition in each dtype and against PyTorch in float64, both
variants and layouts, odd sizes, batch 0 and 1, ReLU or none; gradcheck, opcheck, the
same error from the fakes as from the kernels; and the model on them (fused vs per-op,
bytes saved for the backward)."""

import importlib.util
import re
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cae_kernels import reference
from cae_kernels._registration import _suggest_memory_format
from cae_kernels.app.models import ConvAutoencoder

from backends import FORMATS, HALF_DTYPES, assert_close, make_input, on_every_backend

F64 = torch.float64

# (N, C0, C1, H, W): odd sizes (a last partial pool window, a ragged stride-2 row),
# batch 1 and one input channel (the image's block).
ENCODER_SHAPES = [(2, 3, 5, 13, 11), (1, 1, 4, 7, 6)]
# (N, C0, [C_out of each transposed convolution], h, w, output_size)
DECODER_SHAPES = [(2, 3, (4, 5, 2), 2, 3, (7, 11)), (1, 4, (3, 1), 3, 2, (6, 4)), (2, 3, (2,), 3, 4, (3, 3))]


def encoder_per_op(f, x, weights, biases, activation):
    """The block layer by layer with the functions of ``f`` (a backend's, or reference)."""
    a = f.conv3x3(x, weights[0], biases[0], 1, activation)
    a = f.conv3x3(a, weights[1], biases[1], 1, activation)
    return f.conv3x3(a, weights[2], biases[2], 2, activation) if len(weights) == 3 else f.max_pool2x2(a)


def decoder_per_op(f, x, weights, biases, output_size, activation):
    for weight, bias in zip(weights[:-1], biases[:-1], strict=True):
        x = f.conv_transpose3x3(x, weight, bias, 2, activation)
    x = f.conv_transpose3x3(x, weights[-1], biases[-1], 1, None)
    h, w = output_size
    top, left = (x.shape[-2] - h) // 2, (x.shape[-1] - w) // 2
    return x[..., top:top + h, left:left + w]


def encoder_inputs(backend, dtype, shape, fmt, strided):
    n, c0, c1, h, w = shape
    scale = 0.5 if dtype in HALF_DTYPES else 1.0
    x = make_input((n, c0, h, w), dtype, backend.device, fmt, scale=scale)
    weights = [make_input((c1, c0 if i == 0 else c1, 3, 3), dtype, backend.device, scale=scale / 2)
               for i in range(3 if strided else 2)]
    biases = [make_input((c1,), dtype, backend.device, scale=scale) for _ in weights]
    return x, weights, biases


def decoder_inputs(backend, dtype, shape, fmt):
    n, c0, channels, h, w, _ = shape
    scale = 0.5 if dtype in HALF_DTYPES else 1.0
    x = make_input((n, c0, h, w), dtype, backend.device, fmt, scale=scale)
    ins = (c0, *channels[:-1])
    weights = [make_input((a, b, 3, 3), dtype, backend.device, scale=scale / 2)
               for a, b in zip(ins, channels, strict=True)]
    biases = [make_input((b,), dtype, backend.device, scale=scale) for b in channels]
    return x, weights, biases


def check_against(backend, ours, theirs, inputs, their_inputs, grad, tolerance_dtype):
    """Output and every gradient of ``ours`` (of ``inputs``) against ``theirs`` (of
    ``their_inputs``, the same values), at ``tolerance_dtype``'s tolerance."""
    assert ours.shape == theirs.shape and ours.dtype == inputs[0].dtype
    assert ours.is_contiguous(memory_format=_suggest_memory_format(inputs[0]))
    assert_close(ours, theirs.double(), backend.tolerance(tolerance_dtype, theirs), "output")
    ours_grads = torch.autograd.grad(ours, inputs, grad)
    their_grads = torch.autograd.grad(theirs, their_inputs, grad.to(theirs.dtype))
    for i, (mine, expected) in enumerate(zip(ours_grads, their_grads, strict=True)):
        assert_close(mine, expected.double(), backend.tolerance(tolerance_dtype, expected), f"gradient {i}")


def twins(tensors, dtype=None):
    """Fresh leaves with the same values (in ``dtype``), for the other side's graph."""
    return [t.detach().to(dtype or t.dtype).requires_grad_() for t in tensors]


@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("strided", [False, True], ids=["pool", "stride"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", ENCODER_SHAPES, ids=lambda s: "x".join(map(str, s)))
@on_every_backend("dtype")
def test_encoder_block(backend, dtype, shape, fmt, strided, activation):
    """Forward and backward: as the per-op path in every dtype, as PyTorch in float64."""
    x, weights, biases = encoder_inputs(backend, dtype, shape, fmt, strided)
    inputs = [x, *weights, *biases]
    k = len(weights)

    def block(x, *params):
        return backend.functions.encoder_block(x, params[:k], params[k:], activation)

    out = block(*inputs)
    n, _, c1, h, w = shape
    assert out.shape == (n, c1, (h + 1) // 2, (w + 1) // 2)
    grad = torch.randn(out.shape, dtype=F64).to(backend.device, dtype)
    per_op = twins(inputs)
    check_against(backend, out, encoder_per_op(backend.functions, per_op[0], per_op[1:k + 1], per_op[k + 1:],
                                               activation), inputs, per_op, grad, dtype)
    if dtype == F64:
        out = block(*inputs)
        ref = twins(inputs, F64)
        check_against(backend, out, encoder_per_op(reference, ref[0], ref[1:k + 1], ref[k + 1:], activation),
                      inputs, ref, grad, F64)


@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", DECODER_SHAPES, ids=lambda s: f"{len(s[2])}-layers")
@on_every_backend("dtype")
def test_decoder_block(backend, dtype, shape, fmt, activation):
    x, weights, biases = decoder_inputs(backend, dtype, shape, fmt)
    inputs = [x, *weights, *biases]
    k, size = len(weights), shape[-1]

    def block(x, *params):
        return backend.functions.decoder_block(x, params[:k], params[k:], size, activation)

    out = block(*inputs)
    assert out.shape == (shape[0], shape[2][-1], *size)
    grad = torch.randn(out.shape, dtype=F64).to(backend.device, dtype)
    per_op = twins(inputs)
    check_against(backend, out, decoder_per_op(backend.functions, per_op[0], per_op[1:k + 1], per_op[k + 1:],
                                               size, activation), inputs, per_op, grad, dtype)
    if dtype == F64:
        out = block(*inputs)
        ref = twins(inputs, F64)
        check_against(backend, out, decoder_per_op(reference, ref[0], ref[1:k + 1], ref[k + 1:], size, activation),
                      inputs, ref, grad, F64)


@pytest.mark.parametrize("strided", [False, True], ids=["pool", "stride"])
@on_every_backend()
def test_blocks_of_an_empty_batch(backend, strided):
    x, weights, biases = encoder_inputs(backend, torch.float32, (0, 3, 4, 7, 5), "nchw", strided)
    code = backend.functions.encoder_block(x, weights, biases)
    assert code.shape == (0, 4, 4, 3)
    dx, dweights, dbiases = decoder_inputs(backend, torch.float32, (0, 4, (3, 2), 4, 3, (7, 5)), "nchw")
    out = backend.functions.decoder_block(code, dweights, dbiases, (7, 5))
    assert out.shape == (0, 2, 7, 5)
    out.sum().backward()
    assert x.grad.shape == x.shape
    for p in (*weights, *biases, *dweights, *dbiases):
        assert torch.equal(p.grad, torch.zeros_like(p))


@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("strided", [False, True], ids=["pool", "stride"])
@pytest.mark.parametrize("fmt", FORMATS)
@on_every_backend()
def test_encoder_block_gradcheck(backend, fmt, strided, activation):
    x, weights, biases = encoder_inputs(backend, F64, (1, 2, 3, 5, 4), fmt, strided)
    k = len(weights)
    assert torch.autograd.gradcheck(
        lambda x, *p: backend.functions.encoder_block(x, p[:k], p[k:], activation), (x, *weights, *biases))


@pytest.mark.parametrize("fmt", FORMATS)
@on_every_backend()
def test_decoder_block_gradcheck(backend, fmt):
    x, weights, biases = decoder_inputs(backend, F64, (1, 2, (3, 2), 4, 5, (7, 9)), fmt)
    k = len(weights)
    assert torch.autograd.gradcheck(
        lambda x, *p: backend.functions.decoder_block(x, p[:k], p[k:], (7, 9), "relu"), (x, *weights, *biases))


@on_every_backend()
def test_block_opcheck(backend):
    ops = backend.ops
    for fmt in FORMATS:
        for strided in (False, True):
            x, weights, biases = encoder_inputs(backend, F64, (2, 3, 4, 7, 6), fmt, strided)
            torch.library.opcheck(ops.encoder_block, (x, weights, biases, True))
            out, winners = ops.encoder_block(x, weights, biases, True)
            out = out.detach()
            g = torch.randn_like(out)
            detached = [[t.detach() for t in ts] for ts in (weights, biases)]
            for input_grad in (True, False):
                for given in (None, winners) if not strided else (None,):
                    torch.library.opcheck(ops.encoder_block_backward,
                                          (g, x.detach(), out, given, *detached, True, input_grad))
        x, weights, biases = decoder_inputs(backend, F64, (2, 3, (4, 2), 6, 4, (11, 7)), fmt)
        torch.library.opcheck(ops.decoder_block, (x, weights, biases, True, [11, 7]))
        g = make_input((2, 2, 11, 7), F64, backend.device, fmt).detach()
        detached = [[t.detach() for t in ts] for ts in (weights, biases)]
        for input_grad in (True, False):
            torch.library.opcheck(ops.decoder_block_backward, (g, x.detach(), *detached, True, [11, 7], input_grad))


class _BackwardCalls(TorchDispatchMode):
    """The input_grad flags the blocks' backward ops were called with."""

    def __init__(self):
        super().__init__()
        self.input_grad = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._opname in ("encoder_block_backward", "decoder_block_backward"):
            self.input_grad.append(args[-1])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("strided", [False, True], ids=["pool", "stride"])
@on_every_backend()
def test_input_gradient_only_where_needed(backend, strided):
    """Autograd asks the backward ops for the input's gradient only where it needs it; the
    op then returns an empty tensor for it, and the weights' gradients as with it."""
    f = backend.functions
    for needs_input in (False, True):
        x, weights, biases = encoder_inputs(backend, F64, (2, 3, 4, 7, 6), "nchw", strided)
        dx, dweights, dbiases = decoder_inputs(backend, F64, (2, 4, (3, 2), 4, 3, (7, 6)), "nchw")
        x.requires_grad_(needs_input)
        with _BackwardCalls() as calls:
            f.decoder_block(f.encoder_block(x, weights, biases), dweights, dbiases, (7, 6)).sum().backward()
        assert calls.input_grad == [True, needs_input]  # the decoder's input is the encoder's output
        assert (x.grad is not None) == needs_input
    out, winners = backend.ops.encoder_block(x, weights, biases, True)
    winners = None if strided else winners
    g = torch.randn_like(out)
    params = [[t.detach() for t in ts] for ts in (weights, biases)]
    without = backend.ops.encoder_block_backward(g, x.detach(), out, winners, *params, True, False)
    with_input = backend.ops.encoder_block_backward(g, x.detach(), out, winners, *params, True, True)
    assert without[0].numel() == 0 and with_input[0].shape == x.shape
    for ours, theirs in zip(without[1] + without[2], with_input[1] + with_input[2], strict=True):
        torch.testing.assert_close(ours, theirs)


def bad_block_calls(device):
    """(name, op name, args, message): the blocks' own checks, then a convolution's inside."""

    def t(*shape):
        return torch.randn(shape, device=device)

    x = t(2, 3, 8, 8)
    w1, w2, b = t(4, 3, 3, 3), t(4, 4, 3, 3), t(4)
    yield ("one weight", "encoder_block", (x, [w1], [b], True),
           "cae: encoder_block takes 2 weights (pool) or 3 (strided), got 1")
    yield ("four weights", "encoder_block", (x, [w1, w2, w2, w2], [b] * 4, False),
           "cae: encoder_block takes 2 weights (pool) or 3 (strided), got 4")
    yield ("bias count", "encoder_block", (x, [w1, w2], [b], True),
           "cae: encoder_block takes a bias per weight: 2 weights, 1 biases")
    yield ("first weight", "encoder_block", (x, [t(4, 2, 3, 3), w2], [b, b], True),
           "cae: input has 3 channels but weight of sizes [4, 2, 3, 3] expects 2")
    yield ("second weight", "encoder_block", (x, [w1, t(4, 5, 3, 3)], [b, b], True),
           "cae: encoder_block's weight 1 must have sizes [4, 4, 3, 3], got [4, 5, 3, 3]")
    yield ("down weight", "encoder_block", (x, [w1, w2, t(4, 4, 5, 5)], [b, b, b], True),
           "cae: weight must be [C1, C1, 3, 3], got sizes [4, 4, 5, 5]")
    yield ("second bias", "encoder_block", (x, [w1, w2], [b, t(5)], True),
           "cae: bias must have sizes [4], got [5]")
    yield ("grad_output", "encoder_block_backward", (t(2, 4, 8, 8), x, None, None, [w1, w2], [b, b], True, True),
           "cae: grad_output must have sizes [2, 4, 4, 4] (the block's output), got [2, 4, 8, 8]")
    yield ("strided mask", "encoder_block_backward",
           (t(2, 4, 4, 4), x, None, None, [w1, w2, w2], [b] * 3, True, True),
           "cae: encoder_block_backward needs the output of a strided block with relu (its ReLU mask)")
    codes = torch.zeros(2, 4, 4, 4, dtype=torch.uint8, device=device)
    yield ("strided winners", "encoder_block_backward",
           (t(2, 4, 4, 4), x, t(2, 4, 4, 4), codes, [w1, w2, w2], [b] * 3, True, True),
           "cae: encoder_block_backward takes winners for a pool block only (2 weights), got 3 weights")
    yield ("winners dtype", "encoder_block_backward",
           (t(2, 4, 4, 4), x, None, codes.float(), [w1, w2], [b, b], True, True),
           "cae: winners must have dtype Byte (the forward's), got Float")
    yield ("winners shape", "encoder_block_backward",
           (t(2, 4, 4, 4), x, None, codes[:, :, :3], [w1, w2], [b, b], True, True),
           "cae: winners must have sizes [2, 4, 4, 4] (the shape of grad_output), got [2, 4, 3, 4]")
    wt1, wt2 = t(3, 4, 3, 3), t(4, 1, 3, 3)
    yield ("no weights", "decoder_block", (x, [], [], True, [8, 8]),
           "cae: decoder_block takes one or more weights, got 0")
    yield ("decoder bias count", "decoder_block", (x, [wt1, wt2], [b], True, [8, 8]),
           "cae: decoder_block takes a bias per weight: 2 weights, 1 biases")
    yield ("decoder channels", "decoder_block", (x, [wt1, t(3, 1, 3, 3)], [b, t(1)], True, [8, 8]),
           "cae: input has 4 channels but weight of sizes [3, 1, 3, 3] expects 3")
    yield ("output_size", "decoder_block", (x, [wt1, wt2], [b, t(1)], True, [17, 9]),
           "cae: decoder_block's output_size must be [H, W] within its output of [16, 16], got [17, 9]")
    yield ("decoder grad_output", "decoder_block_backward",
           (t(2, 1, 9, 9), x, [wt1, wt2], [b, t(1)], True, [9, 8], True),
           "cae: grad_output must have sizes [2, 1, 9, 8] (the block's output), got [2, 1, 9, 9]")


@pytest.mark.parametrize("name", [name for name, *_ in bad_block_calls("cpu")])
@on_every_backend()
def test_bad_block_arguments(backend, name):
    """The same message from the kernels' checks and from the fakes (meta tensors)."""
    for device in (backend.device, "meta"):
        _, op, args, message = next(c for c in bad_block_calls(device) if c[0] == name)
        with pytest.raises(RuntimeError, match=re.escape(message)):
            getattr(backend.ops, op)(*args)


def test_block_functions_check_their_arguments():
    import cae_kernels

    x, w, b = torch.randn(1, 1, 4, 4), torch.randn(2, 1, 3, 3), torch.randn(2)
    with pytest.raises(ValueError, match="activation must be None or 'relu', got 'tanh'"):
        cae_kernels.encoder_block(x, [w, w], [b, b], activation="tanh")
    with pytest.raises(ValueError, match=r"output_size must be two ints \(h, w\), got \[4\]"):
        cae_kernels.decoder_block(x, [w.transpose(0, 1)], [torch.randn(2)], (4,))


# --- the model on the blocks ----------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("downsample", ["pool", "stride"])
def test_model_fused_matches_per_op(downsample, fmt):
    """Same outputs and gradients as the per-op path (the same CPU kernels: equal), the
    same state_dict, the same layer shapes."""
    torch.manual_seed(3)
    fused = ConvAutoencoder(downsample=downsample, memory_format=FORMATS[fmt], image_size=(13, 11), fused=True)
    per_op = ConvAutoencoder(downsample=downsample, memory_format=FORMATS[fmt], image_size=(13, 11), fused=False)
    per_op.load_state_dict(fused.state_dict())
    assert fused.uses_fused_blocks(torch.zeros(1)) and not per_op.uses_fused_blocks(torch.zeros(1))
    x = torch.rand(3, 1, 13, 11)
    outputs = []
    for model in (fused, per_op):
        out = model(x)
        torch.nn.functional.binary_cross_entropy_with_logits(out, x).backward()
        outputs.append(out)
    torch.testing.assert_close(outputs[0], outputs[1])
    assert outputs[0].stride() == outputs[1].stride()
    for (name, p), q in zip(fused.named_parameters(), per_op.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    assert fused.layer_shapes(4) == per_op.layer_shapes(4)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("downsample", ["pool", "stride"])
def test_model_forward_loss_fused_matches_per_op(downsample, fmt):
    """forward_loss on the blocks (the decoder and the loss in one op, decoder_block_loss)
    as the per-op path's forward then loss: logits, loss, RMSE and gradients."""
    torch.manual_seed(4)
    fused = ConvAutoencoder(downsample=downsample, memory_format=FORMATS[fmt], image_size=(13, 11), fused=True)
    per_op = ConvAutoencoder(downsample=downsample, memory_format=FORMATS[fmt], image_size=(13, 11), fused=False)
    per_op.load_state_dict(fused.state_dict())
    x, target = torch.rand(3, 1, 13, 11), torch.rand(3, 1, 13, 11)
    results = []
    for model in (fused, per_op):
        logits, loss, rmse = model.forward_loss(x, target)
        loss.backward()
        results.append((logits, loss, rmse))
    for ours, theirs in zip(*results, strict=True):
        torch.testing.assert_close(ours, theirs)
    assert results[0][0].stride() == results[1][0].stride()
    torch.testing.assert_close(results[1][1:], per_op.loss(per_op(x), target))
    for (name, p), q in zip(fused.named_parameters(), per_op.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


@pytest.mark.parametrize("fused", [True, False])
def test_model_forward_loss_refuses_a_target_unlike_the_input(fused):
    """The fused decoder crops its output to the target's size: a smaller target would
    give a loss of part of the image, so every path refuses it the same way."""
    model = ConvAutoencoder(fused=fused)
    x = torch.rand(2, 1, 28, 28)
    for target in (x[..., :20, :20], x[:1], torch.rand(2, 1, 32, 32)):
        with pytest.raises(ValueError, match=rf"target has shape {re.escape(str(tuple(target.shape)))}, "
                                             r"the input \(2, 1, 28, 28\): they must match"):
            model.forward_loss(x, target)


def test_model_chooses_the_fused_path_by_device_and_backend():
    x = torch.zeros(1)
    assert not ConvAutoencoder(backend="cae").uses_fused_blocks(x)  # the CPU kernels: per op
    assert not ConvAutoencoder(backend="torch").uses_fused_blocks(x)
    assert ConvAutoencoder(backend="cae", fused=True).uses_fused_blocks(x)
    with pytest.raises(ValueError, match="fused blocks are this package's ops"):
        ConvAutoencoder(backend="torch", fused=True)
    meta = torch.zeros(1, device="meta")
    assert not ConvAutoencoder(backend="cae").uses_fused_blocks(meta)
    if torch.cuda.is_available():
        assert ConvAutoencoder(backend="cae").uses_fused_blocks(x.cuda())


def _saved_bytes_script():
    path = Path(__file__).resolve().parent.parent / "scripts" / "saved_bytes.py"
    spec = importlib.util.spec_from_file_location("saved_bytes", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("downsample", ["pool", "stride"])
def test_fused_model_saves_at_most_a_quarter(downsample):
    """The fused step keeps the image, each block's output (the next block's input), the
    pool's winner codes (a byte an output element), the parameters and the loss's logits:
    exactly, and at most a quarter of the per-op path's."""
    saved = _saved_bytes_script()
    batch = 8
    fused = saved.measure(downsample, "cae", torch.contiguous_format, batch, fused=True)
    per_op = saved.measure(downsample, "cae", torch.contiguous_format, batch, fused=False)
    model = ConvAutoencoder(downsample=downsample)
    params = sum(p.nbytes for p in model.parameters())
    image = batch * 28 * 28 * 4
    block_outputs = batch * (16 * 14 * 14 + 8 * 7 * 7 + 8 * 4 * 4)
    winners = block_outputs if downsample == "pool" else 0
    # the image (also the target) and the logits
    assert fused == params + 2 * image + 4 * block_outputs + winners
    assert fused <= per_op / 4


@pytest.mark.parametrize("with_loss", [False, True], ids=["forward", "forward_loss"])
@pytest.mark.parametrize("downsample", ["pool", "stride"])
def test_fused_model_under_torch_compile(downsample, with_loss):
    """The blocks trace whole (fakes, autograd) in one graph, the decoder with its loss too:
    the same loss and gradients."""
    model = ConvAutoencoder(downsample=downsample, image_size=(13, 11), fused=True).double()
    x = torch.rand(2, 1, 13, 11, dtype=F64)

    def step(x):
        if with_loss:
            return model.forward_loss(x, x)[1]
        return torch.nn.functional.binary_cross_entropy_with_logits(model(x), x)

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        loss = fn(x)
        results.append((loss, torch.autograd.grad(loss, list(model.parameters()))))
    (eager, eager_grads), (compiled, compiled_grads) = results
    torch.testing.assert_close(compiled, eager)
    for ours, theirs in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(ours, theirs)
