"""Autocast: the convolutions run in the region's float16 or bfloat16, as PyTorch's do,
and max-pool keeps its input's dtype. On a GPU these are the CUDA kernels under
``torch.autocast("cuda")``; everywhere, the same kernels under the emulator, whose ops
run on CPU tensors and so take ``torch.autocast("cpu")`` (csrc/ops.cpp)."""

import pytest
import torch
import torch.nn.functional as F

import cae_kernels
from cae_kernels import reference

from backends import HALF_DTYPES, on_cuda_kernels


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("transposed", [False, True])
@on_cuda_kernels()
def test_convolutions_run_in_the_autocast_dtype(backend, transposed, dtype):
    device, f = backend.device, backend.functions
    x = torch.randn(2, 3, 7, 6, device=device, requires_grad=True)
    w = (torch.randn((3, 4, 3, 3) if transposed else (4, 3, 3, 3), device=device) * 0.3).requires_grad_()
    b = torch.randn(4, device=device, requires_grad=True)
    op = f.conv_transpose3x3 if transposed else f.conv3x3
    with torch.autocast(device, dtype=dtype):
        y = op(x, w, b, stride=2, activation="relu")
        pooled = f.max_pool2x2(y)
    assert y.dtype == dtype and pooled.dtype == dtype
    # The reference: PyTorch in float64 on the inputs rounded to the autocast dtype.
    xr, wr, br = (t.detach().to(dtype).double().requires_grad_() for t in (x, w, b))
    ref = (reference.conv_transpose3x3 if transposed else reference.conv3x3)(xr, wr, br, 2, "relu")
    torch.testing.assert_close(y.double(), ref, **backend.tolerance(dtype))
    grad = torch.randn_like(ref)
    y.backward(grad.to(dtype))
    ref.backward(grad)
    for leaf, ref_leaf in ((x, xr), (w, wr), (b, br)):
        assert leaf.grad.dtype == torch.float32  # autocast's casts carry the gradient back
        torch.testing.assert_close(leaf.grad.double(), ref_leaf.grad, **backend.tolerance(dtype, ref_leaf.grad))


def test_cpu_kernels_stay_float32_under_cpu_autocast():
    """The CPU kernels have no float16/bfloat16 path: CPU autocast leaves them alone."""
    x, w = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = cae_kernels.conv3x3(x, w, None, 1, "relu")
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, F.conv2d(x, w, None, 1, 1).relu(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@on_cuda_kernels()
def test_blocks_run_in_the_autocast_dtype_like_their_layers(backend, dtype):
    """The block ops cast like the convolutions they chain: the same result and gradients
    as those convolutions called one by one under autocast."""
    device, f = backend.device, backend.functions
    gen = torch.Generator().manual_seed(0)

    def leaf(*shape, scale=0.3):
        return (torch.randn(shape, generator=gen) * scale).to(device).requires_grad_()

    x = leaf(2, 3, 9, 7, scale=1.0)
    enc_w, enc_b = [leaf(5, 3, 3, 3), leaf(5, 5, 3, 3), leaf(5, 5, 3, 3)], [leaf(5), leaf(5), leaf(5)]
    dec_w, dec_b = [leaf(5, 4, 3, 3), leaf(4, 2, 3, 3)], [leaf(4), leaf(2)]

    def fused():
        code = f.encoder_block(x, enc_w, enc_b)
        return code, f.decoder_block(code, dec_w, dec_b, (9, 7))

    def per_op():
        a = f.conv3x3(x, enc_w[0], enc_b[0], 1, "relu")
        a = f.conv3x3(a, enc_w[1], enc_b[1], 1, "relu")
        code = f.conv3x3(a, enc_w[2], enc_b[2], 2, "relu")
        d = f.conv_transpose3x3(code, dec_w[0], dec_b[0], 2, "relu")
        d = f.conv_transpose3x3(d, dec_w[1], dec_b[1], 1, None)
        return code, d[..., :9, :7]

    leaves = [x, *enc_w, *enc_b, *dec_w, *dec_b]
    results = []
    for run in (fused, per_op):
        with torch.autocast(device, dtype=dtype):
            code, out = run()
        assert code.dtype == dtype and out.dtype == dtype
        grads = torch.autograd.grad(out.float().square().sum(), leaves)
        results.append((out, grads))
    (out, grads), (ref_out, ref_grads) = results
    torch.testing.assert_close(out, ref_out, **backend.tolerance(dtype))
    for g, ref in zip(grads, ref_grads, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, ref, **backend.tolerance(dtype, ref))
