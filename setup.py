"""Build of cae_kernels' C++ (and, where a CUDA toolkit is present, CUDA) extension.

Environment:
  CAE_NO_CUDA=1   build the CPU kernels only, even where CUDA is available.
  CAE_CPU_ARCH    unset (default): a portable build whose CPU kernels are compiled
                  once per instruction-set level (baseline, AVX2, AVX-512) and
                  chosen at run time (csrc/cpu/capability.h). native, or any other
                  -march value: the whole extension for that CPU only, for
                  people who build where they run.
  FORCE_CUDA=1    fail unless the CUDA kernels can be built.
  TORCH_CUDA_ARCH_LIST  GPU architectures to compile for (default: the GPUs
                  visible at build time, or sm_75 to sm_90 plus PTX when none is).
"""

import glob
import os
import site
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover - only without torch in the build environment
    sys.exit(
        "cae_kernels builds against an installed torch: install torch first, then "
        "`pip install --no-build-isolation .`"
    )

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "7.5;8.0;8.6;8.9;9.0+PTX"


def flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def want_cuda():
    if flag("CAE_NO_CUDA"):
        return False
    missing = []
    if CUDA_HOME is None:
        missing.append("no CUDA toolkit was found (set CUDA_HOME)")
    if torch.version.cuda is None:
        missing.append(f"torch {torch.__version__} is a CPU-only build")
    if missing and flag("FORCE_CUDA"):
        sys.exit("FORCE_CUDA=1 but the CUDA kernels cannot be built: " + "; ".join(missing))
    return not missing


def cpu_arch_flags():
    """-march for the whole extension: none by default (the levels in
    csrc/cpu/level_*.cpp bring their own targets, so one build runs well on any
    CPU); CAE_CPU_ARCH=native (or another -march value) as an opt-in."""
    arch = os.environ.get("CAE_CPU_ARCH", "").strip()
    if arch in ("", "generic"):
        return []
    return [f"-march={arch}"]


def cuda_wheel_include_dirs():
    """Headers of the NVIDIA libraries that torch's CUDA wheels ship (cuBLAS, cuSPARSE, ...):
    torch's own CUDA headers include them, and a bare toolkit may lack them."""
    roots = site.getsitepackages() + [site.getusersitepackages(), os.path.dirname(os.path.dirname(torch.__file__))]
    found = []
    for root in roots:
        for include in sorted(glob.glob(os.path.join(root, "nvidia", "*", "include"))):
            if include not in found:
                found.append(include)
    return found


def extensions():
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # C++20 (the ops' requires-expressions): torch adds its own standard only where none is
    # given, and older torch (2.11) gives C++17.
    cxx_flags = ["-std=c++20", "-O3", "-fvisibility=hidden"]
    # GCC notes that passing vectors wider than -march's registers changes the
    # ABI: our vector helpers are inline, internal to each kernel.
    cxx_flags += ["-Wno-psabi"]
    cxx_flags += cpu_arch_flags()
    # With -march, even the baseline level uses that CPU's instructions
    # (cae_kernels._C.cpu_portable_build says which kind of build this is).
    macros = [] if cpu_arch_flags() else [("CAE_CPU_PORTABLE_BUILD", None)]
    # at::parallel_for is an inline "#pragma omp parallel" in torch's headers:
    # without -fopenmp it silently runs on one thread.
    openmp = ["-fopenmp"] if torch.backends.openmp.is_available() else []
    if not want_cuda():
        return [CppExtension("cae_kernels._C", sources, define_macros=macros,
                             extra_compile_args={"cxx": cxx_flags + openmp}, extra_link_args=openmp)]
    if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
    return [
        CUDAExtension(
            "cae_kernels._C",
            # csrc/cuda/*.cpp: host-only parts of the CUDA backend (no kernels)
            sources + sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp")),
            include_dirs=cuda_wheel_include_dirs(),
            define_macros=macros + [("CAE_WITH_CUDA", None)],
            extra_compile_args={
                "cxx": cxx_flags + openmp,
                "nvcc": ["-std=c++20", "-O3", "--expt-relaxed-constexpr", "-lineinfo"],
            },
            extra_link_args=openmp,
        )
    ]


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    packages=find_packages(include=["cae_kernels", "cae_kernels.*"]),
)
