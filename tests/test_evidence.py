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
    # forward; input gradient; weight and bias gradients, their reduction
    assert sum(counts.values()) == 4, counts
    assert any("correlate_kernel" in name for name in counts)
    assert any("reduce_partials_kernel" in name for name in counts)
    # Launches that fail count too (the configuration was valid); a bad one does not.
    with sim.count_launches() as counts:
        with pytest.raises(RuntimeError):
            sim.ops._sim_fault("too_many_threads")
        with pytest.raises(RuntimeError):
            sim.ops._sim_fault("early_return")
    assert counts == {"early_return_kernel": 1}


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


def test_count_launches_script(capsys):
    count_launches = load_script("count_launches")
    assert count_launches.main(["--model", "pool"]) == 0
    out = capsys.readouterr().out
    total = int(out.splitlines()[0].split("launches per step: ")[1])
    assert total > 0
    assert count_launches.main(["--model", "pool", "--budget", str(total - 1)]) == 1
    assert count_launches.main(["--model", "pool", "--budget", f"pool={total}", "--budget", "stride=1"]) == 0
    assert count_launches.main(["--model", "pool", "--budget", f"pool={total - 1}"]) == 1
