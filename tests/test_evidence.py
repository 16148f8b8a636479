"""Evidence without a GPU: the emulator's launch counter, the models on the emulated
kernels (``backend="sim"``), scripts/count_launches.py, and scripts/sass_report.py's
parsing and ``--check`` on a synthetic cuobjdump output.

The sim tests build the emulated extension on first use (minutes, then cached).
"""

import importlib.util
import textwrap
from pathlib import Path

import pytest
import torch

from backends import tf32_off

ROOT = Path(__file__).resolve().parent.parent


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- scripts/sass_report.py on a synthetic cuobjdump output ------------------------

RES_USAGE = textwrap.dedent("""\
    Resource usage:
     Common:
      GLOBAL:28 CONSTANT[4]:224
     Function _ZN3cae4cuda10fma_kernelIfEEvPf:
      REG:40 STACK:0 SHARED:1056 LOCAL:0 CONSTANT[0]:576 TEXTURE:0 SURFACE:0 SAMPLER:0
     Function _ZN3cae4cuda12spill_kernelIfEEvPf:
      REG:255 STACK:24 SHARED:0 LOCAL:0 CONSTANT[0]:576 TEXTURE:0 SURFACE:0 SAMPLER:0
     Function _ZN3cae4cuda15gemm_mma_kernelIN3c104HalfEEEvPT_:
      REG:96 STACK:0 SHARED:17408 LOCAL:0 CONSTANT[0]:576 TEXTURE:0 SURFACE:0 SAMPLER:0
    """)

SASS = textwrap.dedent("""\

    \tcode for sm_90
    \t.target\tsm_90

    \t\tFunction : _ZN3cae4cuda10fma_kernelIfEEvPf
    \t.headerflags\t@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
            /*0000*/                   LDC R1, c[0x0][0x28] ;            /* 0x00000a00ff017b82 */
                                                                        /* 0x000fe20000000800 */
            /*0010*/                   I2F.U32.RP R5, R4 ;               /* 0x0000000400057306 */
            /*0020*/                   MUFU.RCP R5, R5 ;                 /* 0x0000000500057308 */
            /*0030*/                   FFMA R0, R2, R3, R0 ;             /* 0x0000000302007223 */
            /*0040*/               @!P0 FFMA.FTZ R0, R2, R3, R0 ;        /* 0x0000000302007223 */
            /*0050*/                   DFMA R6, R8, R10, R6 ;            /* 0x0000000a0806722b */
            /*0060*/                   EXIT ;                            /* 0x000000000000794d */
            /*0070*/                   BRA 0x70;                         /* 0xfffffffc00fc7947 */
            /*0080*/                   NOP;                              /* 0x0000000000007918 */
            ..........

    \t\tFunction : _ZN3cae4cuda12spill_kernelIfEEvPf
            /*0000*/                   STL [R1+0x4], R20 ;               /* 0x0000041401007387 */
            /*0010*/                   LDL R20, [R1+0x4] ;               /* 0x0000040001147983 */
            /*0020*/                   EXIT ;                            /* 0x000000000000794d */

    \t\tFunction : _ZN3cae4cuda15gemm_mma_kernelIN3c104HalfEEEvPT_
            /*0000*/                   FFMA R0, R2, R3, R0 ;             /* 0x0000000302007223 */
            /*0010*/                   EXIT ;                            /* 0x000000000000794d */
    """)

PTXAS_LOG = textwrap.dedent("""\
    ptxas info    : Compiling entry function '_ZN3cae4cuda12spill_kernelIfEEvPf' for 'sm_90'
    ptxas info    : Function properties for _ZN3cae4cuda12spill_kernelIfEEvPf
        24 bytes stack frame, 20 bytes spill stores, 36 bytes spill loads
    ptxas info    : Used 255 registers, used 1 barriers
    ptxas info    : Function properties for _ZN3cae4cuda10fma_kernelIfEEvPf
        0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
    """)


@pytest.fixture(scope="module")
def sass_report():
    return load_script("sass_report")


def test_sass_report_parses_cuobjdump(sass_report):
    kernels = sass_report.parse_res_usage(RES_USAGE)
    sass_report.parse_sass(SASS, kernels)
    sass_report.parse_ptxas_log(PTXAS_LOG, kernels)
    fma = kernels["_ZN3cae4cuda10fma_kernelIfEEvPf"]
    assert (fma.registers, fma.stack, fma.shared, fma.local) == (40, 0, 1056, 0)
    assert (fma.instructions, fma.ffma, fma.dfma, fma.tensor_core) == (8, 2, 1, 0)
    assert fma.int_divisions == 1 and fma.local_accesses == 0
    assert (fma.spill_stores, fma.spill_loads) == (0, 0)
    spill = kernels["_ZN3cae4cuda12spill_kernelIfEEvPf"]
    assert (spill.registers, spill.stack, spill.local_accesses) == (255, 24, 2)
    assert (spill.spill_stores, spill.spill_loads) == (20, 36)
    mma = kernels["_ZN3cae4cuda15gemm_mma_kernelIN3c104HalfEEEvPT_"]
    assert mma.marked_mma and mma.tensor_core == 0 and mma.spill_stores is None


def test_sass_report_counts_tensor_core_instructions(sass_report):
    kernels = sass_report.parse_sass(textwrap.dedent("""\
        \t\tFunction : _Z15gemm_mma_kernelv
                /*0000*/                   HMMA.16816.F32 R4, R8, R12, R4 ;  /* 0x0000000c0804723c */
                /*0010*/              @P0  HGMMA.64x64x16.F32 R24, gdesc[UR4], R24 ;  /* 0x00000000041879f0 */
                /*0020*/                   EXIT ;                            /* 0x000000000000794d */
        """))
    assert kernels["_Z15gemm_mma_kernelv"].tensor_core == 2
    assert all(sass_report.TENSOR_CORE.match(op) for op in ("HMMA", "IMMA", "DMMA", "HGMMA"))
    assert not any(sass_report.TENSOR_CORE.match(op) for op in ("FFMA", "HFMA2", "IMAD"))


def test_sass_report_names(sass_report):
    name = "void cae::cuda::correlate_kernel<c10::Half, float, 2, 8, (bool)1>(cae::cuda::CorrelateArgs<c10::Half>)"
    assert sass_report.shorten(name) == "correlate_kernel<half, float, 2, 8, true>"
    assert sass_report.MMA_NAME.search("gemm_mma_kernel<half>")
    assert sass_report.MMA_NAME.search("wgmma_tile")
    assert not sass_report.MMA_NAME.search("max_pool_nchw_kernel<float>")  # no "mma" word
    assert not sass_report.MMA_NAME.search("gamma_kernel")


def write_fixture(tmp_path):
    paths = {}
    for name, text in (("res", RES_USAGE), ("sass", SASS), ("ptxas", PTXAS_LOG)):
        paths[name] = tmp_path / f"{name}.txt"
        paths[name].write_text(text)
    return paths


def test_sass_report_check_fails_on_a_spill_and_on_mma_without_tensor_cores(sass_report, tmp_path, capsys):
    p = write_fixture(tmp_path)
    report = tmp_path / "report.md"
    argv = ["--res-usage", str(p["res"]), "--sass", str(p["sass"]), "--ptxas-log", str(p["ptxas"]),
            "-o", str(report)]
    assert sass_report.main(argv) == 0  # no --check: only the report
    text = report.read_text()
    assert "| `fma_kernel<float>` | 40 | 48 |" in text
    assert "20/36" in text
    assert sass_report.main(argv + ["--check"]) == 1
    err = capsys.readouterr().err
    assert "spill_kernel<float>: uses local memory (spills): spill stores (bytes) 20" in err
    assert "gemm_mma_kernel<half>: named as a tensor-core kernel but has no tensor-core instruction" in err
    assert "fma_kernel" not in err.replace("3 kernels", "")


def test_sass_report_allow_local(sass_report, tmp_path, capsys):
    p = write_fixture(tmp_path)
    res_only = RES_USAGE.replace(
        "_ZN3cae4cuda15gemm_mma_kernelIN3c104HalfEEEvPT_", "_ZN3cae4cuda10two_kernelIN3c104HalfEEEvPT_")
    p["res"].write_text(res_only)
    p["sass"].write_text(SASS.replace("_ZN3cae4cuda15gemm_mma_kernelIN3c104HalfEEEvPT_",
                                      "_ZN3cae4cuda10two_kernelIN3c104HalfEEEvPT_"))
    allowed = tmp_path / "allowed.txt"
    argv = ["--res-usage", str(p["res"]), "--sass", str(p["sass"]), "-o", str(tmp_path / "r.md")]
    assert sass_report.main(argv + ["--write-allow-local", str(allowed)]) == 0
    assert sass_report.read_allowed(allowed) == {"spill_kernel<float>"}
    assert sass_report.main(argv + ["--check", "--allow-local", str(allowed)]) == 0
    allowed.write_text("# none known\n")
    assert sass_report.main(argv + ["--check", "--allow-local", str(allowed)]) == 1


# --- the emulator's launch counter and backend="sim" ------------------------------


@pytest.fixture(scope="module")
def sim():
    from cae_kernels import sim

    return sim


def test_launch_counter_counts_and_resets(sim):
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    sim.reset_launch_counts()
    assert sim.launch_counts() == {}
    sim.max_pool2x2(x)
    counts = sim.launch_counts()
    assert sum(counts.values()) == 1
    (name,) = counts
    # The kernel's own name, from its symbol: NCHW, float64, forward, pairs of columns.
    assert name == "cae::cuda::max_pool_nchw_kernel<double, double, false, true>"
    sim.max_pool2x2(x)
    assert sim.launch_counts() == {name: 2}
    sim.reset_launch_counts()
    assert sim.launch_counts() == {}


def test_count_launches_context(sim):
    x = torch.randn(1, 2, 5, 5, requires_grad=True)
    w = torch.randn(4, 2, 3, 3, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    sim.max_pool2x2(x)  # outside: not counted
    with sim.count_launches() as counts:
        sim.conv3x3(x, w, b).sum().backward()
    # forward; weight and bias gradients' partial sums; input gradient, whose extra
    # blocks add those sums (no reduction launch of its own)
    assert sum(counts.values()) == 3, counts
    assert any("correlate_kernel" in name for name in counts)
    assert any("weight_grad_kernel" in name for name in counts)
    assert any("correlate_transpose_kernel" in name for name in counts)
    assert not any("reduce_partials_kernel" in name for name in counts)
    # Launches that fail count too (the configuration was valid); a bad one does not.
    with sim.count_launches() as counts:
        with pytest.raises(RuntimeError):
            sim.ops._sim_fault("too_many_threads")
        with pytest.raises(RuntimeError):
            sim.ops._sim_fault("early_return")
    assert counts == {"early_return_kernel": 1}


def pow2_at_least(n, lo, hi):
    p = lo
    while p < n and p < hi:
        p *= 2
    return p


def test_record_launches_gives_the_planned_shape(sim):
    # A stride-1 conv3x3, 9 images of 40x40, 5 -> 20 channels: the output tile is
    # 8 x 32 pixels of one image (256 threads), 5 x 2 tiles per image, 16 output
    # channels per thread (2 groups for 20); one pass stages all 5 input channels:
    # their 10 x 34 windows (odd stride 341) and 5 x 9 x 16 weights.
    N, C_in, C_out, H, W = 9, 5, 20, 40, 40
    x, w = torch.randn(N, C_in, H, W), torch.randn(C_out, C_in, 3, 3)
    cols = pow2_at_least(W, 2, 32)
    rows = pow2_at_least(H, 2, 256 // cols)
    samples = 256 // (rows * cols)
    blocks = -(-H // rows) * -(-W // cols) * -(-N // samples) * -(-C_out // 16)
    window = ((rows - 1) + 3) * ((cols - 1) + 3)
    shared = (C_in * 9 * 16 + samples * C_in * (window | 1)) * 4
    assert (cols, rows, samples, blocks, shared) == (32, 8, 1, 180, 9700)
    with tf32_off(), sim.record_launches() as recorder:  # the exact kernel, not TF32 tensor cores
        y = sim.conv3x3(x, w, None)
    (launch,) = recorder.launches
    assert launch == sim.Launch("cae::cuda::correlate_kernel<float, float, 1, 16, false>",
                                (blocks, 1, 1), (256, 1, 1), shared)
    assert launch.blocks == blocks and launch.threads_per_block == 256
    torch.testing.assert_close(y, torch.nn.functional.conv2d(x, w, padding=1), rtol=1e-4, atol=1e-4)
    # A dry run plans, checks and records the same launch.
    with tf32_off(), sim.record_launches(dry_run=True) as recorder:
        sim.conv3x3(x, w, None)
    assert recorder.launches == [launch]


def test_record_launches_dry_run_runs_no_thread(sim):
    # The kernel's threads would fail (thread 0 skips a barrier): in a dry run it is
    # counted and recorded, but nothing runs, so nothing fails.
    with sim.count_launches() as counts, sim.record_launches(dry_run=True) as recorder:
        sim.ops._sim_fault("early_return")
        with pytest.raises(RuntimeError):  # the configuration is still checked
            sim.ops._sim_fault("too_many_threads")
        assert [launch.kernel for launch in recorder.poll()] == ["early_return_kernel"]
    assert counts == {"early_return_kernel": 1}
    assert recorder.launches == [sim.Launch("early_return_kernel", (1, 1, 1), (64, 1, 1), 0)]
    # Outside the block kernels run again, and nothing more is recorded.
    with pytest.raises(RuntimeError):
        sim.ops._sim_fault("early_return")
    assert len(recorder.launches) == 1
    with sim.record_launches() as recorder, pytest.raises(RuntimeError, match="not reentrant"):
        with sim.record_launches():
            pass
    with sim.record_launches() as inner:  # the failed nesting left no recorder behind
        sim.max_pool2x2(torch.randn(1, 1, 4, 4))
    assert len(inner.launches) == 1


@pytest.mark.parametrize("downsample", ["pool", "stride"])
def test_models_sim_backend_matches_cae(downsample):
    from cae_kernels.app.models import ConvAutoencoder
    from cae_kernels.app.training import _train_step

    models = {}
    with tf32_off():  # the emulated float32 convolutions on the exact path, not TF32
        for backend in ("cae", "sim"):
            torch.manual_seed(7)
            model = ConvAutoencoder(downsample=downsample, backend=backend)
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
            x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(1))
            loss, _, grad_norm = _train_step(model, optimizer, model.weights(), x, x, weight_decay=0.0)
            models[backend] = (model, loss.item(), grad_norm.item())
    (cae, cae_loss, cae_norm), (emulated, sim_loss, sim_norm) = models["cae"], models["sim"]
    assert sim_loss == pytest.approx(cae_loss, rel=1e-5)
    assert sim_norm == pytest.approx(cae_norm, rel=1e-4)
    for (name, p), q in zip(cae.named_parameters(), emulated.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("downsample", ["pool", "stride"])
def test_fused_step_within_the_launch_budget(downsample):
    """The issue's budget: at most 10 launches a fused training step, ours and torch's ops
    together (a zero-filled gradient for an output nobody differentiates is a launch too)."""
    ours, torch_ops = load_script("count_launches").count_step(downsample, batch_size=4, fused=True)
    assert sum(ours.values()) + sum(torch_ops.values()) <= 10, (ours, torch_ops)


def test_count_launches_script(capsys):
    count_launches = load_script("count_launches")
    assert count_launches.main(["--model", "pool"]) == 0
    out = capsys.readouterr().out
    total, others = map(int, out.splitlines()[0].split("launches per step: ")[1].split(" torch ops")[0].split(" + "))
    assert total > 0
    # Adam and the gradient norm are one kernel of ours; the epoch's loss sum one torch op.
    assert "cae::cuda::adam_kernel" in out and "aten.add_" in out and 0 < others < 5
    step = total + others  # the budget counts both
    assert count_launches.main(["--model", "pool", "--budget", str(step - 1)]) == 1
    assert count_launches.main(["--model", "pool", "--budget", f"pool={step}", "--budget", "stride=1"]) == 0
    assert count_launches.main(["--model", "pool", "--budget", f"pool={step - 1}"]) == 1


# --- scripts/kernel_notes.py ---------------------------------------------------------


def test_kernel_notes_model_of_a_step(sim):
    kernel_notes = load_script("kernel_notes")
    sass = kernel_notes.load_sass_report()
    shorten = kernel_notes._sass_report_module().shorten
    model, calls = kernel_notes.record_step("pool", torch.contiguous_format, batch_size=4)
    rows = kernel_notes.model_step(calls, sass, shorten)
    count_launches = load_script("count_launches")
    assert len(rows) == sum(count_launches.count_step("pool", batch_size=4)[0].values())
    layers = {name.rsplit(".", 1)[-1] for name in model._specs}
    assert {r.layer.rsplit(".", 1)[-1] for r in rows} == layers | {"loss", "optimizer"}  # every launch has its layer
    forward = next(r for r in rows if r.layer.endswith("conv1_2") and r.op == "conv3x3")
    # conv1_2: 16 -> 16 channels at 28 x 28: input, weight, bias read, output written
    activation = 4 * 16 * 28 * 28 * 4
    assert forward.est.bytes == 2 * activation + (16 * 16 * 9 + 16) * 4
    assert forward.est.flops == 2 * 9 * 16 * 16 * 4 * 28 * 28
    assert forward.est.outputs == 4 * 16 * 28 * 28
    assert forward.time > kernel_notes.LAUNCH_US * 1e-6
    assert forward.per_sm >= 1 and forward.registers == sass[forward.kernel][0]


@pytest.mark.parametrize("downsample", ["pool", "stride"])
def test_kernel_notes_model_of_a_fused_step(sim, downsample):
    kernel_notes = load_script("kernel_notes")
    shorten = kernel_notes._sass_report_module().shorten
    model, calls = kernel_notes.record_step(downsample, torch.contiguous_format, batch_size=4, fused=True)
    # Registers and static shared memory are the SASS report's inputs, regenerated after the
    # kernels change; the block kernels' arithmetic is what this checks.
    sass = {shorten(launch.kernel): (128, 16) for call in calls for launch in call.launches}
    rows = kernel_notes.model_step(calls, sass, shorten)  # every launch modeled, or it stops
    count_launches = load_script("count_launches")
    assert len(rows) == sum(count_launches.count_step(downsample, batch_size=4, fused=True)[0].values())
    # the loss inside the decoder's kernels: no launch of its own
    assert {r.layer for r in rows} == {"encoder1", "encoder2", "encoder3", "decoder", "optimizer"}
    assert [r.op for r in rows if r.layer == "decoder"] == ["decoder_block_loss", "decoder_block_loss_backward"]
    assert all(r.time > kernel_notes.LAUNCH_US * 1e-6 and r.est.bytes > 0 and r.est.flops > 0 for r in rows)
    # Adam streams its tensors: bytes and FLOPs, no instruction model
    assert all(r.est.warp_instructions > 0 for r in rows if r.layer != "optimizer")
    first = next(r for r in rows if r.layer == "encoder1" and r.op == "encoder_block")
    weights = 16 * 1 * 9 + 16 + (16 * 16 * 9 + 16) * (2 if downsample == "stride" else 1)
    winners = 4 * 16 * 14 * 14 if downsample == "pool" else 0  # a byte a pool window
    assert first.est.bytes == 4 * 28 * 28 * 4 + weights * 4 + 4 * 16 * 14 * 14 * 4 + winners
    assert first.est.outputs == 4 * 16 * 14 * 14
    if downsample == "pool":
        # 7 x 7 output tiles (balanced: 14 in two), 4 an image: a1 over 16 x 16, a2 over 14 x 14
        assert first.launch.blocks == 16
        assert first.est.flops == 2 * 16 * (16 * 16 * 16 * 9 + 14 * 14 * 16 * 16 * 9)
    # the backward: more FLOPs than the forward (the recompute and the gradients' products),
    # its partial rows in the bytes
    for name in ("encoder1", "decoder"):
        fwd, bwd = (r for r in rows if r.layer == name)
        assert bwd.op.endswith("_backward") and bwd.est.flops > fwd.est.flops
        assert bwd.est.bytes > fwd.est.bytes


def test_kernel_notes_issued_taps():
    kernel_notes = load_script("kernel_notes")
    # 64 columns: a warp is one row and one column parity: 1, 2, 2 or 4 taps, 2.25 on average
    assert kernel_notes._issued_taps(64, 2, 1) == 2.25
    # 8 columns: a warp spans 4 rows of one parity (the even rows, then the odd), both
    # column parities: 3 taps, then 6
    assert kernel_notes._issued_taps(8, 8, 1) == 4.5
    # two pixels a thread (the forward's): a warp of 64 columns takes both column parities
    assert kernel_notes._issued_taps(64, 2, 1, pixels=2) == 4.5
    # 6 rows: the first warp takes the 3 even rows and the first odd one (9 taps), the
    # second the other two odd rows (6)
    assert kernel_notes._issued_taps(8, 6, 1) == 7.5


def test_kernel_notes_bias_grad_and_reduction(sim):
    kernel_notes = load_script("kernel_notes")
    g = torch.randn(3, 5, 6, 7)
    with sim.record_launches() as recorder, kernel_notes._OpRecorder(recorder) as mode:
        grad_bias = sim.ops.bias_grad(g, None)
    torch.testing.assert_close(grad_bias, g.sum((0, 2, 3)))
    (call,) = mode.calls
    rows = kernel_notes.model_step(mode.calls, kernel_notes.load_sass_report(),
                                   kernel_notes._sass_report_module().shorten)
    bias, reduce = rows
    chunks = call.launches[0].grid[0]
    assert bias.est.bytes == g.numel() * 4 + chunks * 5 * 4  # g read, the partials written
    assert reduce.est.bytes == chunks * 5 * 4 + 5 * 4  # the partials read, the sum written


def test_kernel_notes_splice_and_check(tmp_path, monkeypatch):
    kernel_notes = load_script("kernel_notes")
    doc = tmp_path / "kernels.md"
    doc.write_text(f"# prose\n\n{kernel_notes.BEGIN}\nold\n{kernel_notes.END}\n\nmore prose\n")
    monkeypatch.setattr(kernel_notes, "DOC", doc)
    monkeypatch.setattr(kernel_notes, "ROOT", tmp_path)
    generated = f"{kernel_notes.BEGIN}\nnew table\n{kernel_notes.END}\n"
    monkeypatch.setattr(kernel_notes, "generate", lambda: generated)
    assert kernel_notes.main(["--check"]) == 1
    assert kernel_notes.main([]) == 0
    assert doc.read_text() == f"# prose\n\n{generated}\nmore prose\n"
    assert kernel_notes.main(["--check"]) == 0


def test_saved_bytes_counts_each_storage_once():
    from cae_kernels import nn as cae_nn

    saved = load_script("saved_bytes")
    layer = cae_nn.Conv3x3(1, 3, activation="relu")
    x, target = torch.rand(2, 1, 5, 5), torch.rand(2, 3, 5, 5)
    # The conv keeps its input, weight and ReLU output; the loss its logits (that output:
    # counted once) and its target.
    assert saved.saved_bytes(layer, x, target) == x.nbytes + layer.weight.nbytes + 2 * target.nbytes
    # A model's activations grow with the batch, its weights do not.
    sizes = [saved.measure("pool", "cae", torch.contiguous_format, batch) for batch in (2, 4, 6)]
    assert sizes[2] - sizes[1] == sizes[1] - sizes[0] > 0
    assert sizes[0] > sizes[1] - sizes[0]


def test_loss_curve_script(capsys):
    """A few steps of each path against PyTorch's float64 (the GPU script runs 1,000):
    within a tolerance no float32 rounding reaches in a few steps; the exit status reports
    a path of ours beyond the bound (a negative one: every path)."""
    script = load_script("loss_curve")
    args = ["--steps", "3", "--batch-size", "16"]
    assert script.main([*args, "--tolerance", "1e-3", "--margin", "0"]) == 0
    out = capsys.readouterr().out
    assert "torch float64 (reference), nhwc: 3 steps" in out
    for path in ("torch, float32 nhwc", "torch-nchw, float32 nchw", "cae, float32 nhwc", "cae-fused, float32 nhwc"):
        assert f"{path}: largest |loss - reference's| / reference's " in out
    assert "bound for cae's paths: max(0.001, 0 x " in out and out.rstrip().endswith("= 1.0e-03: ok")
    assert script.main([*args, "--tolerance", "-1", "--margin", "-1"]) == 1
    assert "FAILED (cae, cae-fused)" in capsys.readouterr().out


def test_precision_check_script(capsys):
    """A quick run of both precisions (PyTorch's layers on the CPU: the CPU kernels have no
    bfloat16); the GPU script runs cae train's 50 epochs on our kernels. The exit status
    reports a difference beyond the tolerance (a negative one: always)."""
    script = load_script("precision_check")
    args = ["--epochs", "1", "--limit", "128", "--backend", "torch", "--device", "cpu"]
    assert script.main([*args, "--tolerance", "0.5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("precision_check: eval loss after 1 epochs: float32 ") and "bfloat16" in out
    assert script.main([*args, "--tolerance", "-1"]) == 1
