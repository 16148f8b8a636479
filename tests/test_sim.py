"""The emulator's own tests (csrc/sim): bitwise reproducibility across runs and
thread schedules, kernel bugs (a barrier skipped, a deadlock, a bad launch) surfacing
as RuntimeError, the schedule read per launch, and the sanitizer builds. The CUDA
kernels' results under the emulator are the op suite's ``sim`` backend
(test_ops.py, test_cuda_kernels.py).

The first import builds the emulated extension (a few minutes, then cached).
"""

import os

import pytest
import torch

import cae_kernels
from cae_kernels import reference, sim

from backends import FORMATS, HALF_DTYPES, make_input


def test_cpu_kernels_keep_their_dtypes():
    """The emulated CUDA kernels take float16; the CPU kernels still refuse it."""
    x = torch.randn(1, 1, 4, 4, dtype=torch.float16)
    w = torch.randn(1, 1, 3, 3, dtype=torch.float16)
    assert sim.conv3x3(x, w).dtype == torch.float16
    with pytest.raises(RuntimeError, match="do not support dtype"):
        cae_kernels.conv3x3(x, w)


def forward_backward(x, w1, b1, w2, b2):
    """Every kernel once: conv (stride 2, ReLU), transposed conv, max-pool, backward."""
    y = sim.conv3x3(x, w1, b1, 2, "relu")
    z = sim.conv_transpose3x3(y, w2, b2, 2, "relu")
    p = sim.max_pool2x2(z)
    loss = (p * torch.linspace(-1, 1, p.numel(), dtype=p.dtype).reshape(p.shape)).sum()
    grads = torch.autograd.grad(loss, (x, w1, b1, w2, b2))
    return [t.detach() for t in (y, z, p) + grads]


def bitwise_equal(a, b):
    """Same bits (float32), not merely equal values."""
    bits = lambda t: t.contiguous().view(-1).view(torch.int32)  # noqa: E731
    return len(a) == len(b) and all(s.shape == t.shape and s.stride() == t.stride() and torch.equal(bits(s), bits(t))
                                    for s, t in zip(a, b, strict=True))


@pytest.mark.parametrize("fmt", FORMATS)
def test_bitwise_reproducible_across_runs_and_schedules(fmt, monkeypatch):
    """Same inputs, bitwise the same outputs and gradients: run after run, and whatever
    order the emulator runs a block's threads in (a missing barrier would show here).
    40 images of 7 x 7: several output-tile blocks, weight-gradient regions and bias
    chunks, so every reduction adds partial sums of several blocks."""
    shapes = [(40, 8, 7, 7), (16, 8, 3, 3), (16,), (16, 8, 3, 3), (8,)]
    inputs = [make_input(shape, torch.float32, "cpu", fmt) for shape in shapes]
    monkeypatch.setenv("CAE_SIM_SCHEDULE", "forward")
    first = forward_backward(*inputs)
    assert bitwise_equal(first, forward_backward(*inputs))
    for schedule in ["reverse", "shuffle:12345"]:
        monkeypatch.setenv("CAE_SIM_SCHEDULE", schedule)
        assert bitwise_equal(first, forward_backward(*inputs)), schedule


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_mma_fragment_layout(dtype):
    """One warp's m16n8k16 product through csrc/cuda/mma.cuh, its fragments loaded as the
    PTX ISA lays them out: D = A B + C for all-distinct A, B and C, so a wrong index in
    the emulator's gather (or a half swapped in a register) shows. The products are
    exact in float32, only the sum of 17 terms rounds."""
    a = torch.randn(16, 16, dtype=torch.float64).to(dtype)
    b = torch.randn(16, 8, dtype=torch.float64).to(dtype)
    c = torch.randn(16, 8, dtype=torch.float32)
    d = sim.ops._sim_mma(a, b, c)
    expected = a.double() @ b.double() + c.double()
    torch.testing.assert_close(d.double(), expected, rtol=1e-5, atol=1e-5)
    # A transposed operand is a different product: the check can fail.
    assert not torch.allclose(sim.ops._sim_mma(a.t().contiguous(), b, c).double(), expected, atol=1e-2)


def test_mma_tf32_fragment_layout():
    """The m16n8k8 tf32 product likewise; the product reads a float's upper 19 bits
    (sign, exponent, 10 mantissa bits) and ignores the rest, as the hardware does."""
    tf32 = lambda t: (t.view(torch.int32) & ~0x1FFF).view(torch.float32)  # noqa: E731
    a, b, c = torch.randn(16, 8), torch.randn(8, 8), torch.randn(16, 8)
    d = sim.ops._sim_mma(a, b, c)
    expected = tf32(a).double() @ tf32(b).double() + c.double()
    torch.testing.assert_close(d.double(), expected, rtol=1e-5, atol=1e-5)
    assert not torch.equal(tf32(a), a)  # the low bits were there to ignore
    assert not torch.allclose(sim.ops._sim_mma(a, b.t().contiguous(), c).double(), expected, atol=1e-2)


@pytest.mark.parametrize("blocks", [1, 31, 32, 33, 97])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_grid_sums_in_block_order(blocks, dtype):
    """finish_grid_sums (csrc/cuda/grid_sums.cuh): one block of the grid gets the sums
    of every block's row, added in block order within groups of 32, then the groups
    in order -- the same bits as that order in Python -- and the tickets are left at
    zero for the next launch."""
    size = 301
    partials = torch.randn(blocks, size, dtype=dtype) * torch.logspace(-3, 3, size, dtype=dtype)
    totals, tickets, finishers = sim.ops._sim_grid_sums(partials)
    groups = [partials[g:g + 32] for g in range(0, blocks, 32)]
    expected = None
    for rows in groups:
        group_sum = rows[0].clone()
        for row in rows[1:]:
            group_sum += row
        expected = group_sum if expected is None else expected + group_sum
    assert torch.equal(totals, expected)
    eps = torch.finfo(dtype).eps
    assert ((totals.double() - partials.double().sum(0)).abs() <= blocks * eps * partials.abs().sum(0)).all()
    assert finishers.item() == 1
    assert tickets.tolist() == [0] * (len(groups) + 1)
    if blocks > 1:  # another order rounds differently: the check sees the order
        assert not torch.equal(totals, partials.flip(0).cumsum(0)[-1])


def test_shared_memory_opt_in(monkeypatch):
    """Above 48 KiB of dynamic shared memory a kernel must opt in, as on the GPU,
    up to the device's limit (227 KiB on sm_90, 64 KiB on sm_75)."""
    assert sim.ops._sim_smem_launch(48 * 1024, False) == 227 * 1024
    with pytest.raises(RuntimeError, match="more than 48 KiB and than the 0 opted in"):
        sim.ops._sim_smem_launch(48 * 1024 + 4, False)
    assert sim.ops._sim_smem_launch(200 * 1024, True) == 227 * 1024
    monkeypatch.setenv("CAE_SIM_ARCH", "75")
    with pytest.raises(RuntimeError, match="cannot give a CUDA kernel 102400 bytes of shared memory"):
        sim.ops._sim_smem_launch(100 * 1024, True)
    assert sim.ops._sim_smem_launch(64 * 1024, True) == 64 * 1024


@pytest.mark.parametrize("fault,message", [
    ("early_return", "every thread must reach every barrier"),
    ("divergent_barrier", "divergent barriers"),
    ("deadlock", "deadlock"),
    ("shuffle_mask", "mask"),
    ("too_many_threads", "invalid configuration"),
    ("empty_grid", "invalid configuration"),
    ("unwaited_copies", "cp.async copies never waited for"),
])
def test_kernel_bugs_raise(fault, message):
    with pytest.raises(RuntimeError, match=message):
        sim.ops._sim_fault(fault)
    sim.ops._sim_fault("none")  # the emulator is usable again afterwards
    x = torch.randn(1, 1, 3, 3)
    torch.testing.assert_close(sim.max_pool2x2(x), reference.max_pool2x2(x))


def test_copy_async_lands_at_the_wait():
    """cp.async (copy_async): nothing is guaranteed in shared memory before the thread's wait,
    so the emulator copies there, and a kernel that reads too early sees the old value."""
    assert sim.ops._sim_copy_async().tolist() == [-1.0, 3.0, 0.0]


def test_schedule_env_is_read_per_launch(monkeypatch):
    monkeypatch.setenv("CAE_SIM_SCHEDULE", "no-such-order")
    with pytest.raises(RuntimeError):
        sim.max_pool2x2(torch.randn(1, 1, 2, 2))


@pytest.mark.skipif(os.environ.get("CAE_SIM_SANITIZE") is None, reason="a sanitizer build only")
def test_sanitizer_build_is_loaded():
    """Under scripts/sim_sanitize.sh the emulated kernels run in the sanitized build, with its runtime."""
    sanitize = os.environ["CAE_SIM_SANITIZE"].strip().lower()
    sim.max_pool2x2(torch.randn(1, 1, 2, 2))  # the emulated ops are loaded
    with open("/proc/self/maps") as maps:
        mapped = {line.split()[-1].rsplit("/", 1)[-1] for line in maps if "/" in line}
    name = sim._build_options()[0]
    assert name.startswith(f"{sim.NAMESPACE}_{sanitize}") and f"{name}.so" in mapped, sorted(mapped)
    assert f"{sim.NAMESPACE}.so" not in mapped  # not the plain build
    assert any(lib.startswith(f"lib{sanitize[0]}san.so") for lib in mapped), sorted(mapped)
