"""The loss op, ``sigmoid_cross_entropy(logits, target) -> (loss, rmse)``: PyTorch's
binary cross-entropy on logits (mean) and the RMSE of the sigmoid, on every backend
(one fused kernel each way on the CUDA kernels, ATen's ops on the CPU kernels'
backend), against float64 references."""

import pytest
import torch
import torch.nn.functional as F

from backends import HALF_DTYPES, assert_close, make_input, on_cuda_kernels, on_every_backend


def reference(logits, target):
    logits, target = logits.double(), target.double()
    return (F.binary_cross_entropy_with_logits(logits, target),
            (torch.sigmoid(logits) - target).square().mean().sqrt())


SHAPES = [(1, 1, 1, 1), (2, 1, 28, 28), (3, 5, 7, 9), (70001,), (4, 3)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("fmt", ["nchw", "nhwc", "noncontiguous"])
@on_every_backend("dtype")
def test_loss_and_rmse_match_pytorch(backend, dtype, shape, fmt):
    if fmt != "nchw" and (len(shape) != 4 or shape[-1] == 1):
        pytest.skip("a layout of 4-D tensors, two columns or more")
    device = backend.device
    # Logits up to +-40 (the saturated sigmoid: no overflow), targets in [0, 1] as images.
    logits = make_input(shape, dtype, device, fmt if fmt != "noncontiguous" else "nchw", scale=8.0,
                        noncontiguous=fmt == "noncontiguous")
    target = torch.rand(shape, dtype=torch.float64).to(device, dtype)
    if fmt == "nhwc":
        target = target.contiguous(memory_format=torch.channels_last)
    loss, rmse = backend.functions.sigmoid_cross_entropy(logits, target)
    ref_loss, ref_rmse = reference(logits.detach(), target)
    assert loss.shape == () and rmse.shape == () and loss.dtype == dtype and rmse.dtype == dtype
    tolerance = backend.tolerance(dtype)
    assert_close(loss, ref_loss, tolerance, "loss")
    assert_close(rmse, ref_rmse, tolerance, "rmse")
    assert not rmse.requires_grad
    grad = torch.randn((), dtype=torch.float64)
    (ours,) = torch.autograd.grad(loss, logits, grad.to(device, dtype))
    ref_logits = logits.detach().double().requires_grad_()
    (theirs,) = torch.autograd.grad(reference(ref_logits, target)[0], ref_logits, grad.to(device))
    assert ours.shape == logits.shape
    assert_close(ours, theirs, backend.tolerance(dtype, theirs / theirs.abs().max()), "gradient of logits")


@on_every_backend()
def test_target_gradient_and_gradcheck(backend):
    device = backend.device
    logits = make_input((2, 3, 4, 5), torch.float64, device)
    target = torch.rand(2, 3, 4, 5, dtype=torch.float64, device=device, requires_grad=True)
    f = backend.functions.sigmoid_cross_entropy
    assert torch.autograd.gradcheck(lambda x, t: f(x, t)[0], (logits, target))
    # The target's gradient alone: the logits' is not computed.
    (grad_target,) = torch.autograd.grad(f(logits.detach(), target)[0], target)
    torch.testing.assert_close(grad_target, -logits.detach() / logits.numel())


@on_every_backend()
def test_opcheck(backend):
    logits = make_input((2, 1, 5, 3), torch.float64, backend.device)
    target = torch.rand(2, 1, 5, 3, dtype=torch.float64, device=backend.device)
    torch.library.opcheck(backend.ops.sigmoid_cross_entropy, (logits, target))
    torch.library.opcheck(backend.ops.sigmoid_cross_entropy_backward,
                          (torch.tensor(0.5, dtype=torch.float64, device=backend.device), logits.detach(), target))


@on_every_backend()
def test_extreme_logits_are_finite(backend):
    """|x| up to 1e4: exp(-x) overflows, the stable form does not."""
    device = backend.device
    logits = torch.tensor([-1e4, -50.0, 0.0, 50.0, 1e4], dtype=torch.float64, device=device).requires_grad_()
    target = torch.tensor([0.0, 1.0, 0.5, 0.0, 1.0], dtype=torch.float64, device=device)
    loss, rmse = backend.functions.sigmoid_cross_entropy(logits, target)
    ref_loss, ref_rmse = reference(logits.detach(), target)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(rmse, ref_rmse)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


@on_every_backend()
def test_empty_input_is_nan_like_pytorch(backend):
    logits = torch.empty(0, 1, 28, 28, dtype=torch.float64, device=backend.device, requires_grad=True)
    target = torch.empty(0, 1, 28, 28, dtype=torch.float64, device=backend.device)
    loss, rmse = backend.functions.sigmoid_cross_entropy(logits, target)
    assert loss.isnan() and rmse.isnan()
    loss.backward()
    assert logits.grad.shape == logits.shape


@on_every_backend()
def test_bad_arguments(backend):
    f, device = backend.functions.sigmoid_cross_entropy, backend.device
    x = torch.randn(2, 3, dtype=torch.float64, device=device)
    with pytest.raises(RuntimeError, match=r"target must have the logits' sizes \[2, 3\], got \[3, 2\]"):
        f(x, torch.rand(3, 2, dtype=torch.float64, device=device))
    with pytest.raises(RuntimeError, match="cae: target has dtype Float but input has dtype Double"):
        f(x, torch.rand(2, 3, device=device))
    with pytest.raises(RuntimeError, match="do not support dtype Int"):
        f(x.int(), x.int())
    with pytest.raises(RuntimeError, match="grad_loss must be 0-D, got sizes \\[2\\]"):
        backend.ops.sigmoid_cross_entropy_backward(torch.ones(2, dtype=torch.float64, device=device), x, x)
    # The fakes raise the same messages.
    mode = torch._subclasses.fake_tensor.FakeTensorMode()
    fx, ft = mode.from_tensor(x), mode.from_tensor(x.t().contiguous())
    with mode, pytest.raises(RuntimeError, match=r"target must have the logits' sizes \[2, 3\], got \[3, 2\]"):
        backend.ops.sigmoid_cross_entropy(fx, ft)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@on_cuda_kernels()
def test_autocast_runs_the_loss_in_float32(backend, dtype):
    device = backend.device
    logits = torch.randn(2, 1, 6, 6, device=device).to(dtype)
    target = torch.rand(2, 1, 6, 6, device=device)
    with torch.autocast(device, dtype=dtype):
        loss, rmse = backend.functions.sigmoid_cross_entropy(logits, target)
    assert loss.dtype == torch.float32 and rmse.dtype == torch.float32
    torch.testing.assert_close(loss.double(), reference(logits, target)[0], rtol=1e-5, atol=1e-6)


@on_cuda_kernels()
def test_one_launch_each_way_and_deterministic(backend):
    """On the CUDA kernels the loss and the RMSE are one launch (the blocks' sums added
    in the kernel, in block order: the same bits every run), the gradient another."""
    if backend.name != "sim":
        pytest.skip("launches are counted by the emulator")
    from cae_kernels import sim

    logits = torch.randn(64, 1, 28, 28, requires_grad=True)  # several blocks of the sum
    target = torch.rand(64, 1, 28, 28)
    with sim.count_launches() as counts:
        loss, rmse = sim.sigmoid_cross_entropy(logits, target)
        loss.backward()
    assert sorted(n.split("<")[0].rsplit("::", 1)[-1] for n in counts) == [
        "sigmoid_cross_entropy_grad_kernel", "sigmoid_cross_entropy_kernel"]
    assert sum(counts.values()) == 2
    again = sim.sigmoid_cross_entropy(logits.detach(), target)
    assert torch.equal(loss.detach(), again[0]) and torch.equal(rmse, again[1])
