"""The CPU kernels' instruction-set levels (csrc/cpu/capability.h): which one runs,
how a user lowers it, and that a portable build keeps wide vectors inside the level
kernels. The op suite itself runs at every level (tests/backends.py)."""

import os
import platform
import re
import shutil
import subprocess
import sys

import pytest

import cae_kernels

LEVELS = ["baseline", "avx2", "avx512"]


def run_python(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env})


def test_the_best_supported_level_runs_by_default():
    supported = cae_kernels.cpu_capabilities()
    assert supported[0] == "baseline" and supported == [lv for lv in LEVELS if lv in supported]
    result = run_python("import cae_kernels; print(cae_kernels.cpu_capability())", CAE_CPU_CAPABILITY="")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == supported[-1]


@pytest.mark.parametrize("level", ["baseline", "avx2", "avx512"])
def test_environment_variable_selects_a_level(level):
    result = run_python("import cae_kernels; print(cae_kernels.cpu_capability())", CAE_CPU_CAPABILITY=level)
    if level in cae_kernels.cpu_capabilities():
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == level
    else:  # the import itself fails, naming the level and what the CPU has (and, off x86-64, why)
        assert result.returncode != 0
        assert re.search(f"CPU capability '{level}' is not available on this CPU.*; it supports: baseline",
                         result.stderr)


def test_unknown_level_is_named():
    with pytest.raises(ValueError, match=r"unknown CPU capability 'sse9'; expected one of: baseline, avx2, avx512"):
        cae_kernels.set_cpu_capability("sse9")
    result = run_python("import cae_kernels", CAE_CPU_CAPABILITY="AVX2")
    assert result.returncode != 0 and "unknown CPU capability 'AVX2'" in result.stderr


def test_set_cpu_capability_switches_and_refuses_missing_levels():
    previous = cae_kernels.cpu_capability()
    try:
        for level in LEVELS:
            if level in cae_kernels.cpu_capabilities():
                cae_kernels.set_cpu_capability(level)
                assert cae_kernels.cpu_capability() == level
            else:
                with pytest.raises(ValueError, match=f"'{level}' is not available on this CPU"):
                    cae_kernels.set_cpu_capability(level)
    finally:
        cae_kernels.set_cpu_capability(previous)


def avx_functions(library):
    """The functions of a shared library whose code needs AVX, each with what it uses:
    "ymm" and "zmm" (256- and 512-bit registers), "vex" (any VEX- or EVEX-encoded
    instruction, whose mnemonics all start with v: scalar and 128-bit ones too)."""
    listing = subprocess.run(
        ["objdump", "-d", "-C", "--no-show-raw-insn", library], capture_output=True, text=True, check=True
    ).stdout
    found, function = {}, None
    for line in listing.splitlines():
        if line.endswith(">:") and " <" in line:
            function = line.split(" <", 1)[1][:-2]
            continue
        fields = line.split("\t")
        if not function or len(fields) < 2 or not fields[1].strip():
            continue
        mnemonic = fields[1].split()[0]
        kinds = {kind for kind in ("ymm", "zmm") if "%" + kind in fields[1]}
        if mnemonic.startswith("v") and mnemonic not in ("verr", "verw"):
            kinds.add("vex")
        if kinds:
            found.setdefault(function, set()).update(kinds)
    return found


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 levels only")
@pytest.mark.skipif(not cae_kernels._C.cpu_portable_build, reason="built with -march (CAE_CPU_ARCH)")
@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump (binutils)")
def test_avx_code_stays_inside_the_level_kernels():
    """Everything outside namespaces cae::cpu::avx2 and cae::cpu::avx512 must run on any
    x86-64 CPU, one without AVX too: an inline function of torch or the standard library
    compiled for AVX2 in a level's unit could otherwise be the copy the linker keeps for
    every caller. Not only wide registers: a scalar loop compiled there is VEX-encoded
    (vaddss on xmm registers), which a CPU without AVX cannot run either."""
    found = avx_functions(cae_kernels._C.__file__)
    assert any("cae::cpu::avx2::" in f and "ymm" in kinds for f, kinds in found.items()), "no AVX2 code"
    assert not any("cae::cpu::avx2::" in f and "zmm" in kinds for f, kinds in found.items())
    assert any("cae::cpu::avx512::" in f and "zmm" in kinds for f, kinds in found.items())
    leaks = sorted(f for f in found if "cae::cpu::avx2::" not in f and "cae::cpu::avx512::" not in f)
    assert not leaks, f"{len(leaks)} functions outside the level kernels need AVX: {leaks[:10]}"
