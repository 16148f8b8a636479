"""The decoder block with the autoencoder's loss, ``decoder_block_loss(input, weights,
biases, relu, target) -> (logits, loss, rmse)``: ``decoder_block`` then
``sigmoid_cross_entropy``, fused on the CUDA kernels (the block's kernel sums the loss,
the backward's kernel stages the loss's gradient: no launch for the loss either way),
composed on the CPU kernels. On every backend against float64 PyTorch and against the
two ops it replaces."""

import re

import pytest
import torch
import torch.nn.functional as F
from test_decoder_block import (
    BACKWARD_KERNEL,
    KERNEL,
    SHAPES,
    backward_tolerance,
    block_params,
    fits,
    kernels_of,
    masked_reference_block,
    reference_block,
    shape_id,
    tolerance,
)

from cae_kernels import _checks
from cae_kernels._registration import _suggest_memory_format

from backends import BACKENDS, FORMATS, assert_close, make_input, on_every_backend

F64 = torch.float64


def make_case(backend, dtype, fmt, shape):
    n, c0, channels, h, w, size = shape
    x = make_input((n, c0, h, w), dtype, backend.device, fmt).detach()
    weights, biases = block_params(c0, channels, dtype, backend.device)
    # Targets in [0, 1], as images; in the loss's dtype (float32 for the 16-bit types).
    target = torch.rand(n, channels[-1], *size, dtype=F64).to(backend.device, _checks.loss_dtype(dtype))
    return x, weights, biases, target.contiguous(memory_format=FORMATS[fmt])


def reference_loss(logits, target):
    logits, target = logits.double(), target.double()
    return (F.binary_cross_entropy_with_logits(logits, target),
            (torch.sigmoid(logits) - target).square().mean().sqrt())


def run(backend, fn):
    """fn() on the backend; on the emulated kernels, the launches it made as well."""
    if backend.name != "sim":
        return fn(), None
    from cae_kernels import sim

    with sim.record_launches() as recorder:
        result = fn()
    return result, kernels_of(recorder)


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "linear"])
@pytest.mark.parametrize("fmt", FORMATS)
@on_every_backend("dtype")
def test_forward(backend, dtype, fmt, relu, shape):
    """The block's logits, bitwise those of decoder_block in float32 and float64; the loss
    and the RMSE as PyTorch's in float64, and as sigmoid_cross_entropy's of the logits; on
    the emulated kernels, one launch where the block fits (the block's own)."""
    x, weights, biases, target = make_case(backend, dtype, fmt, shape)
    (logits, loss, rmse), launches = run(
        backend, lambda: backend.ops.decoder_block_loss(x, weights, biases, relu, target))
    if launches is not None:
        assert launches == [KERNEL] if fits(dtype, shape) else KERNEL not in launches
    size = list(target.shape[2:])
    block = backend.ops.decoder_block(x, weights, biases, relu, size)
    assert logits.dtype == dtype and logits.shape == target.shape
    assert logits.is_contiguous(memory_format=_suggest_memory_format(x))
    if dtype in (torch.float32, F64):
        assert torch.equal(logits, block)
    else:
        expected = reference_block(x, weights, biases, relu, size)
        assert_close(logits, expected, tolerance(backend, dtype, expected, len(shape[2])), "logits")
    assert loss.dtype == rmse.dtype == target.dtype and loss.shape == rmse.shape == ()
    # The loss of the logits the op returned, by PyTorch in float64 and by the loss op.
    ref_loss, ref_rmse = reference_loss(logits, target)
    op_loss, op_rmse = backend.ops.sigmoid_cross_entropy(logits.to(target.dtype), target)
    tol = backend.tolerance(target.dtype)
    for mine, ref, op, name in ((loss, ref_loss, op_loss, "loss"), (rmse, ref_rmse, op_rmse, "rmse")):
        assert_close(mine, ref, tol, name)
        assert_close(mine, op.double(), tol, f"{name} against sigmoid_cross_entropy")


def loss_backward_reference(functions, x, weights, biases, target, grad_loss, grad_logits):
    """Every gradient in float64 through PyTorch, of grad_loss * loss + <grad_logits, logits>,
    with the backend's ReLU masks (masked_reference_block)."""
    inputs, logits = masked_reference_block(functions, x, weights, biases, True, target.shape[2:])
    total = reference_loss(logits, target)[0] * grad_loss
    if grad_logits is not None:
        total = total + (logits * grad_logits.double()).sum()
    return torch.autograd.grad(total, inputs)


@pytest.mark.parametrize("logits_grad", [False, True], ids=["loss", "loss-and-logits"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("fmt", FORMATS)
@on_every_backend("dtype")
def test_backward(backend, dtype, fmt, shape, logits_grad):
    """Through autograd: every gradient as PyTorch's in float64, from the loss alone and
    from the loss and a use of the logits (the backward op's grad_output); on the emulated
    kernels, the backward one launch (the block's backward's own)."""
    x, weights, biases, target = make_case(backend, dtype, fmt, shape)
    inputs = [t.clone().requires_grad_() for t in (x, *weights, *biases)]
    k = len(weights)
    logits, loss, _ = backend.functions.decoder_block_loss(inputs[0], inputs[1:k + 1], inputs[k + 1:], target)
    grad_loss = 1.0 + torch.rand(()).item()
    grad_logits = make_input(tuple(logits.shape), dtype, backend.device, fmt).detach() if logits_grad else None
    total = loss * grad_loss + ((logits * grad_logits).sum().to(loss.dtype) if logits_grad else 0)
    grads, launches = run(backend, lambda: torch.autograd.grad(total, inputs))
    if launches is not None:
        assert launches == [BACKWARD_KERNEL]
    expected = loss_backward_reference(backend.functions, x, weights, biases, target, grad_loss, grad_logits)
    for i, (mine, ref) in enumerate(zip(grads, expected, strict=True)):
        assert mine.dtype == dtype and mine.shape == ref.shape
        assert_close(mine, ref, backward_tolerance(backend, dtype, ref, len(shape[2])), f"gradient {i}")


@pytest.mark.parametrize("fmt", FORMATS)
def test_backward_copies_the_loss_inputs(fmt):
    """The emulated backward in float32 with the loss alone copies the logits into the
    output gradient's plane and the block's target (and grad_loss) after the planes with
    its input, and finishes the loss's gradient in shared memory: one more region of
    shared memory than with a grad_output added (whose path loads the three and adds
    it); the same gradients to the bit as that path with a zero grad_output. Three images
    of the autoencoder's decoder, one a block."""
    from cae_kernels import sim

    backend = BACKENDS["sim"]
    with backend.in_use():
        x, weights, biases, target = make_case(backend, torch.float32, fmt, (3, 8, (8, 8, 16, 1), 4, 4, (28, 28)))
        logits = backend.ops.decoder_block_loss(x, weights, biases, True, target)[0]
        grad_loss = torch.tensor(1.5)
        runs = []
        for grad_output in (None, torch.zeros_like(logits)):
            with sim.record_launches() as recorder:
                grads = backend.ops.decoder_block_loss_backward(grad_loss, grad_output, logits, target, x, weights,
                                                                biases, True, True)
            (launch,) = recorder.launches
            runs.append(([grads[0], *grads[1], *grads[2]], launch.shared_bytes))
        (copied, smem_copied), (loaded, smem_loaded) = runs
        assert smem_copied - smem_loaded == 4 * (28 * 28 + 1)
        for i, (a, b) in enumerate(zip(copied, loaded, strict=True)):
            assert torch.equal(a, b), f"gradient {i}"


@pytest.mark.parametrize("fmt", FORMATS)
def test_one_launch_each_way_and_deterministic(fmt):
    """On the emulated kernels, the autoencoder's decoder in float32 with its loss: one
    launch forward (the block's), one backward (the block's backward's); 301 blocks of two
    images (ten ticket groups of the grid's sums) give the same bits every run."""
    from cae_kernels import sim

    backend = BACKENDS["sim"]
    with backend.in_use():
        n, size = 601, (3, 4)
        x = make_input((n, 2, 2, 2), torch.float32, backend.device, fmt).detach()
        weights, biases = block_params(2, (3, 2), torch.float32, backend.device)
        target = torch.rand(n, 2, *size).contiguous(memory_format=FORMATS[fmt])
        runs = []
        for _ in range(2):
            inputs = [t.clone().requires_grad_() for t in (x, *weights, *biases)]
            with sim.record_launches() as forward:
                logits, loss, rmse = backend.functions.decoder_block_loss(inputs[0], inputs[1:3], inputs[3:], target)
            with sim.record_launches() as backward:
                grads = torch.autograd.grad(loss, inputs)
            assert [launch.kernel.split("<")[0] for launch in forward.launches] == [KERNEL]
            assert [launch.kernel.split("<")[0] for launch in backward.launches] == [BACKWARD_KERNEL]
            assert forward.launches[0].blocks == -(-n // 2)
            runs.append((loss, rmse, *grads))
        for a, b in zip(*runs, strict=True):
            assert torch.equal(a, b)
        ref_loss, ref_rmse = reference_loss(logits, target)
        assert_close(runs[0][0], ref_loss, backend.tolerance(torch.float32), "loss")
        assert_close(runs[0][1], ref_rmse, backend.tolerance(torch.float32), "rmse")


@on_every_backend()
def test_gradcheck_and_the_target_gradient(backend):
    """gradcheck in float64 in every argument, the target's too (as PyTorch's loss has it)."""
    x = make_input((2, 3, 2, 3), F64, backend.device)
    weights, biases = block_params(3, (4, 2, 2), F64, backend.device)
    params = [p.requires_grad_() for p in (*weights, *biases)]
    target = torch.rand(2, 2, 7, 11, dtype=F64, device=backend.device, requires_grad=True)

    def loss_of(x, target, *p):
        logits, loss, _ = backend.functions.decoder_block_loss(x, p[:3], p[3:], target)
        return loss, logits

    assert torch.autograd.gradcheck(loss_of, (x, target, *params))


@on_every_backend()
def test_opcheck(backend):
    x = make_input((2, 3, 2, 3), torch.float32, backend.device)
    weights, biases = block_params(3, (4, 2), torch.float32, backend.device)
    weights = [w.requires_grad_() for w in weights]
    target = torch.rand(2, 2, 3, 5, device=backend.device)
    torch.library.opcheck(backend.ops.decoder_block_loss, (x, weights, biases, True, target))
    logits, *_ = backend.ops.decoder_block_loss(x, weights, biases, True, target)
    g = torch.rand((), device=backend.device)
    detached = [[t.detach() for t in ts] for ts in (weights, biases)]
    for grad_output in (None, torch.rand_like(logits)):
        torch.library.opcheck(backend.ops.decoder_block_loss_backward,
                              (g, grad_output, logits.detach(), target, x.detach(), *detached, True, True))


@on_every_backend()
def test_batch_0_and_1(backend):
    """Batch 1 as the composed ops; batch 0: empty logits, the loss NaN as PyTorch's mean
    over no elements, zero gradients."""
    for n in (1, 0):
        x = make_input((n, 3, 2, 3), torch.float32, backend.device)
        weights, biases = block_params(3, (4, 1), torch.float32, backend.device)
        weights = [w.requires_grad_() for w in weights]
        target = torch.rand(n, 1, 3, 5, device=backend.device)
        logits, loss, rmse = backend.functions.decoder_block_loss(x, weights, biases, target)
        ref_loss, ref_rmse = reference_loss(logits, target)
        if n == 0:
            assert logits.shape == (0, 1, 3, 5) and loss.isnan() and rmse.isnan()
            loss = logits.sum()  # the loss's gradient at batch 0: NaN times nothing
        else:
            assert_close(loss, ref_loss, backend.tolerance(torch.float32), "loss")
        grads = torch.autograd.grad(loss, [x, *weights])
        if n == 0:
            assert all(not g.any() for g in grads)


def test_autocast_runs_the_block_in_bfloat16_and_the_loss_in_float32():
    backend = BACKENDS["sim"]
    with backend.in_use():
        n, c0, channels, h, w, size = SHAPES[0]
        x = make_input((n, c0, h, w), torch.float32, backend.device).detach()
        weights, biases = block_params(c0, channels, torch.float32, backend.device)
        target = torch.rand(n, 1, *size)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, loss, rmse = backend.functions.decoder_block_loss(x, weights, biases, target)
        assert logits.dtype == torch.bfloat16 and loss.dtype == rmse.dtype == torch.float32
        ref_loss, _ = reference_loss(logits, target)  # of the bfloat16 logits, in float64
        assert_close(loss, ref_loss, backend.tolerance(torch.float32), "loss")


def t(*shape, dtype=torch.float32):
    return torch.randn(shape, dtype=dtype)


def block_args():
    return t(2, 3, 2, 3), [t(3, 4, 3, 3), t(4, 2, 3, 3)], [t(4), t(2)]


# (arguments, the exact message): eager and under FakeTensorMode (test_fakes runs the
# C++ and fake checks of every op side by side; these are this op's own).
BAD_CALLS = {
    "3-D target": (lambda: (*block_args(), True, t(2, 7, 5)),
                   "cae: decoder_block_loss's target must be a 4-D (N, C, H, W) tensor, got 3-D with sizes "
                   "[2, 7, 5]"),
    "target larger than the output": (lambda: (*block_args(), True, t(2, 2, 5, 5)),
                                      "cae: decoder_block's target's size must be [H, W] within its output "
                                      "of [4, 6], got [5, 5]"),
    "target dtype": (lambda: (*block_args(), True, t(2, 2, 3, 5, dtype=F64)),
                     "cae: decoder_block_loss's target must have dtype Float (the loss's dtype for input of "
                     "dtype Float), got Double"),
    "target channels": (lambda: (*block_args(), True, t(2, 3, 3, 5)),
                        "cae: target must have sizes [2, 2, 3, 5] (the block's output: the input's batch, the "
                        "last weight's channels), got [2, 3, 3, 5]"),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_arguments_raise_the_same_message_eagerly_and_faked(case):
    import re

    from torch._subclasses.fake_tensor import FakeTensorMode

    make_args, message = BAD_CALLS[case]
    args = make_args()
    op = torch.ops.cae.decoder_block_loss
    with pytest.raises(RuntimeError, match=re.escape(message)):
        op(*args)
    with FakeTensorMode() as mode, pytest.raises(RuntimeError, match=re.escape(message)):
        op(*[[mode.from_tensor(a) for a in arg] if isinstance(arg, list) else
             mode.from_tensor(arg) if isinstance(arg, torch.Tensor) else arg for arg in args])


def test_backward_checks_grad_loss():
    x, weights, biases = block_args()
    target = torch.rand(2, 2, 3, 5)
    logits = torch.ops.cae.decoder_block_loss(x, weights, biases, True, target)[0]
    with pytest.raises(RuntimeError, match=r"grad_loss must be 0-D, got sizes \[1\]"):
        torch.ops.cae.decoder_block_loss_backward(torch.ones(1), None, logits, target, x, weights, biases, True, True)
    with pytest.raises(RuntimeError, match=re.escape("cae: logits must have sizes [2, 2, 3, 5] (the target's)")):
        torch.ops.cae.decoder_block_loss_backward(torch.ones(()), None, logits[:, :1], target, x, weights, biases,
                                                  True, True)

