"""The CUDA kernels on a GPU, what only a GPU shows: our CUDA kernels against our CPU
kernels, bitwise determinism of the model's step, 2048-image weight gradients, 64-bit
offsets, streams and the device guard, device mismatches. Every op against cuDNN is
the op suite's ``cuda`` backend (test_ops.py, test_cuda_kernels.py).

And `cae train`'s step captured in a CUDA graph against the eager step.

Skipped without a CUDA GPU or without the CUDA kernels built; scripts/gpu_check.sh is
the script that runs it on a GPU machine.
"""

import io

import pytest
import torch

import cae_kernels
from cae_kernels import reference

from backends import BACKENDS, FORMATS, assert_close, make_input, tf32_off

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not cae_kernels.with_cuda, reason="cae_kernels was built without its CUDA kernels"),
]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def no_tf32():
    """cuDNN's reference in full precision."""
    with tf32_off():
        yield


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("stride", [1, 2])
def test_cuda_matches_cpu_kernels(stride, fmt, dtype):
    """Our CUDA kernels against our CPU kernels, forward and backward, on the same inputs."""
    for op, wshape in ((cae_kernels.conv3x3, (16, 8, 3, 3)), (cae_kernels.conv_transpose3x3, (8, 16, 3, 3))):
        inputs = [make_input((6, 8, 13, 10), dtype, "cpu", fmt), make_input(wshape, dtype, "cpu"),
                  make_input((16,), dtype, "cpu")]
        results = {}
        for device in ("cpu", "cuda"):
            x, w, b = (t.detach().to(device).requires_grad_() for t in inputs)
            y = op(x, w, b, stride, "relu")
            p = cae_kernels.max_pool2x2(y)
            grads = torch.autograd.grad(p.square().sum(), (x, w, b))
            results[device] = [t.detach().cpu() for t in (y, p) + grads]
        for name, mine, theirs in zip(["y", "pool", "x", "w", "b"], results["cuda"], results["cpu"], strict=True):
            assert_close(mine, theirs.double(), BACKENDS["cuda"].tolerance(dtype, theirs), name)


# The autoencoder (filters 16, 8, 8, max-pool): op, C_in, C_out, stride, activation.
MODEL_LAYERS = [
    ("conv3x3", 1, 16, 1, "relu"), ("conv3x3", 16, 16, 1, "relu"), ("pool",),  # 28 -> 14
    ("conv3x3", 16, 8, 1, "relu"), ("conv3x3", 8, 8, 1, "relu"), ("pool",),  # 14 -> 7
    ("conv3x3", 8, 8, 1, "relu"), ("conv3x3", 8, 8, 1, "relu"), ("pool",),  # 7 -> 4
    ("conv_transpose3x3", 8, 8, 2, "relu"), ("conv_transpose3x3", 8, 8, 2, "relu"),  # 4 -> 8 -> 16
    ("conv_transpose3x3", 8, 16, 2, "relu"), ("conv_transpose3x3", 16, 1, 1, None),  # -> 32, 16 -> 1
]


def model_inputs(fmt, dtype, n=256):
    """An input batch of n and the autoencoder's parameters (weight, bias per layer)."""
    params = []
    for op, c_in, c_out, *_ in (layer for layer in MODEL_LAYERS if layer[0] != "pool"):
        params.append(make_input((c_out, c_in, 3, 3) if op == "conv3x3" else (c_in, c_out, 3, 3), dtype, "cuda",
                                 scale=0.3))
        params.append(make_input((c_out,), dtype, "cuda", scale=0.1))
    return make_input((n, 1, 28, 28), dtype, "cuda", fmt), params


def model_step(x, params):
    """Forward and backward through the autoencoder's layers."""
    h, weights = x, iter(params)
    for layer in MODEL_LAYERS:
        if layer[0] == "pool":
            h = cae_kernels.max_pool2x2(h)
            continue
        op, _, _, stride, activation = layer
        h = getattr(cae_kernels, op)(h, next(weights), next(weights), stride, activation)
    loss = h.float().square().mean()
    return [t.detach() for t in (h,) + torch.autograd.grad(loss, [x] + params)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
def test_bitwise_deterministic(fmt, dtype):
    """No float atomics: the same inputs give the same bits, run after run."""
    x, params = model_inputs(fmt, dtype)
    first = model_step(x, params)
    for _ in range(2):
        again = model_step(x, params)
        for a, b in zip(first, again, strict=True):
            assert torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def test_weight_grad_many_regions():
    """More weight-gradient regions than partial-sum blocks (512): 2048 images of 28x28."""
    x = make_input((2048, 8, 28, 28), torch.float32, "cuda").detach()
    g = make_input((2048, 16, 28, 28), torch.float32, "cuda").detach()
    ours, _ = torch.ops.cae.conv3x3_grad_weight(g, None, x, 1)
    ref = torch.nn.grad.conv2d_weight(x.double(), (16, 8, 3, 3), g.double(), 1, 1)
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
    tail = reference.conv3x3(x[-2:].float(), w.float())
    torch.testing.assert_close(y[-2:].float(), tail, rtol=1e-2, atol=1e-2)
    p = cae_kernels.max_pool2x2(x)
    torch.testing.assert_close(p[-2:], reference.max_pool2x2(x[-2:]))
    del y, p, x
    torch.cuda.empty_cache()


def test_current_stream_and_device_guard():
    """Kernels run on the current stream (work on a side stream is ordered after what
    that stream waited for)."""
    side = torch.cuda.Stream()
    x = make_input((64, 8, 28, 28), torch.float32, "cuda").detach()
    w = make_input((16, 8, 3, 3), torch.float32, "cuda").detach()
    expected = cae_kernels.conv3x3(x, w)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y = cae_kernels.conv3x3(x, w)
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    if torch.cuda.device_count() > 1:
        x1, w1 = x.to("cuda:1"), w.to("cuda:1")
        assert cae_kernels.conv3x3(x1, w1).device == x1.device


def test_device_mismatch_is_named():
    x = torch.randn(2, 3, 8, 8, device="cuda")
    with pytest.raises(RuntimeError, match=r"weight is on device cpu but input is on device cuda:0"):
        cae_kernels.conv3x3(x, torch.randn(4, 3, 3, 3))


@pytest.mark.parametrize("backend", ["cae", "torch"])
def test_the_graphed_training_step_gives_the_eager_losses(tmp_path, monkeypatch, backend):
    """`cae train` on CUDA, the step from a CUDA graph (the default) against --no-cuda-graph:
    3 epochs of 3 batches of 64 and one of 8, so 3 warm-up steps, the capture, 6 replays
    and a short batch in every epoch run eagerly. The same kernels in the same order;
    only Adam's learning rate is a device tensor instead of a number, so losses and
    weights agree to 1e-4 relative (float32 rounding of the step size, at most)."""
    from cae_kernels.app import training

    replays, real_replay = [], training.CudaGraph.replay

    def counted(self):
        replays.append(1)
        return real_replay(self)

    monkeypatch.setattr(training.CudaGraph, "replay", counted)
    options = dict(backend=backend, device="cuda", limit=200, batch_size=64, epochs=3, noise_factor=0.2,
                   log_every=1, out=io.StringIO(), progress=False)
    eager = training.train(tmp_path / "eager", cuda_graph=False, **options)
    assert not replays
    graphed = training.train(tmp_path / "graphed", **options)  # capturing the ops would fail on a host sync
    assert len(replays) == 6 and graphed.step == eager.step == 12
    for key in ("train_loss", "eval_loss", "eval_rmse"):
        got, expected = ([h[key] for h in r.history] for r in (graphed, eager))
        assert got == pytest.approx(expected, rel=1e-4), key
    for name, value in eager.model.state_dict().items():
        torch.testing.assert_close(graphed.model.state_dict()[name], value, rtol=1e-4, atol=1e-6, msg=name)
