"""The CUDA kernels of ``csrc/cuda``, run on the CPU by the CUDA-semantics emulator.

The first use builds (with ninja, cached in torch's extensions directory) the very
sources the GPU build compiles -- ``csrc/ops.cpp`` and ``csrc/cuda/*.cu`` -- as C++
with ``-DCAE_SIM -DCAE_NAMESPACE=cae_sim``: ``csrc/sim/cuda_sim.h`` then runs every
CUDA thread as a fiber, with barriers, warp shuffles and shared memory as on a GPU
(see ``csrc/sim/README.md``). The ops are ``torch.ops.cae_sim.*`` on CPU tensors,
with the schemas, fake kernels and autograd of ``torch.ops.cae``; the functions here
have the signatures of the public ones::

    from cae_kernels import sim
    y = sim.conv3x3(x, w, b, stride=2, activation="relu")   # the CUDA kernels, on the CPU

Every launch is counted, per kernel (``launch_counts()``, ``reset_launch_counts()``, or
``with sim.count_launches() as counts:``): how many kernels a training step launches is
known without a GPU (``scripts/count_launches.py``). ``with sim.record_launches() as
launches:`` lists each launch's kernel, grid, block and dynamic shared memory, as the
launchers planned them; with ``dry_run=True`` the kernels are not run at all (garbage
results, but a large step's launch plan in seconds: ``scripts/kernel_notes.py``).

A kernel bug the emulator detects (a thread skipping a barrier, a deadlock, a bad
launch) raises RuntimeError. It is slow (a 128-block launch of 256 threads takes
tens of milliseconds): for tests on small shapes.

Environment:
  CAE_SIM_SANITIZE=address|thread  build with AddressSanitizer / ThreadSanitizer (a
                  separate build; load the sanitizer runtime first, e.g. with
                  LD_PRELOAD, see scripts/sim_sanitize.sh)
  CAE_SIM_CFLAGS  extra compiler flags (also a separate build)
  CAE_SIM_SCHEDULE=forward|reverse|shuffle:<seed>  the order in which the emulator
                  runs a block's threads (read at every launch)
  CAE_SIM_VERBOSE=1  show the build's commands

``python -m cae_kernels.sim --build`` only builds (for sanitizer builds, whose runtime
must be preloaded into the process that loads them, but not into the compilers).
"""

import collections
import contextlib
import hashlib
import os
from pathlib import Path

import torch
from torch.utils import cpp_extension

from . import _checks, _registration
from .functional import _Functions

NAMESPACE = "cae_sim"

_SANITIZERS = {
    "": ([], []),
    "address": (["-fsanitize=address", "-fno-omit-frame-pointer"], ["-fsanitize=address"]),
    "thread": (["-fsanitize=thread"], ["-fsanitize=thread"]),
}


def _csrc():
    """The C++ sources: the checkout (or editable install) this package lives in."""
    root = Path(os.environ.get("CAE_SIM_CSRC", Path(__file__).resolve().parent.parent / "csrc"))
    if not (root / "sim" / "cuda_sim.h").is_file() or not list((root / "cuda").glob("*.cu")):
        raise ImportError(
            f"cae_kernels.sim builds the CUDA kernels from source, but {root} does not hold "
            "csrc/cuda/*.cu and csrc/sim/cuda_sim.h: use a source checkout (pip install -e .) "
            "or point CAE_SIM_CSRC at its csrc folder"
        )
    return root


def _build_options():
    sanitize = _sanitizer()
    if sanitize not in _SANITIZERS:
        raise ValueError(f"CAE_SIM_SANITIZE must be 'address' or 'thread', got {sanitize!r}")
    cflags, ldflags = _SANITIZERS[sanitize]
    extra = os.environ.get("CAE_SIM_CFLAGS", "").split()
    name = NAMESPACE + (f"_{sanitize}" if sanitize else "")
    if extra:  # a build of its own per set of flags, so none clobbers another
        name += "_" + hashlib.sha1(" ".join(extra).encode()).hexdigest()[:8]
    # -O1: at -O2 g++ took 3.4x as long on the largest kernel file (the decoder block, 354 s
    # against 105 s) and ~4x on the whole build (ninja's job times summed, 1,063 s against
    # 270 s), for emulated tests only 15% faster (106 s against 122 s).
    # CAE_SIM_CFLAGS come later and win.
    cflags = ["-O1", "-DCAE_SIM", f"-DCAE_NAMESPACE={NAMESPACE}", "-Wno-unknown-pragmas"] + cflags + extra
    return name, cflags, ldflags + extra


def _sanitizer():
    return os.environ.get("CAE_SIM_SANITIZE", "").strip().lower()


def _runtime_loaded(sanitize):
    """Whether this process runs with the sanitizer's runtime (it must come first)."""
    try:
        with open("/proc/self/maps") as maps:
            return f"lib{sanitize[0]}san" in maps.read()
    except OSError:
        return False


class SanitizerRuntimeMissing(ImportError):
    pass


def _build():
    csrc = _csrc()
    name, cflags, ldflags = _build_options()
    verbose = os.environ.get("CAE_SIM_VERBOSE", "0") == "1"
    build_dir = Path(cpp_extension._get_build_directory(name, verbose))
    # The .cu files compile as C++: tiny wrappers include them (ninja's depfiles
    # then rebuild whatever a changed .cu or header touches).
    # csrc/sim/*.cpp: the emulator's own ops (test hooks, the launch counter)
    sources = [str(csrc / "ops.cpp")] + [str(cpp) for cpp in sorted((csrc / "sim").glob("*.cpp"))]
    sources += [str(cpp) for cpp in sorted((csrc / "cuda").glob("*.cpp"))]  # host-only parts
    for cu in sorted((csrc / "cuda").glob("*.cu")):
        wrapper = build_dir / f"cuda_{cu.stem}.cpp"
        text = f'// Generated by cae_kernels.sim: {cu.name} compiled as C++ for the emulator.\n#include "{cu}"\n'
        if not wrapper.is_file() or wrapper.read_text() != text:
            wrapper.write_text(text)
        sources.append(str(wrapper))
    try:
        cpp_extension.load(
            name=name,
            sources=sources,
            extra_cflags=cflags,
            extra_ldflags=ldflags,
            extra_include_paths=[str(csrc)],
            build_directory=str(build_dir),
            with_cuda=False,
            is_python_module=False,
            verbose=verbose,
        )
    except OSError as e:
        sanitize = _sanitizer()
        if sanitize and not _runtime_loaded(sanitize):
            lib = f"lib{sanitize[0]}san.so"
            raise SanitizerRuntimeMissing(
                f"{name} is built with -fsanitize={sanitize}; load it into a process started with "
                f"the sanitizer's runtime: LD_PRELOAD=$(g++ -print-file-name={lib}) "
                "(see scripts/sim_sanitize.sh)"
            ) from e
        raise


def _load():
    if not hasattr(torch.ops, NAMESPACE) or not hasattr(getattr(torch.ops, NAMESPACE), "conv3x3"):
        _build()
    # The emulated CUDA kernels run on CPU tensors: CUDA's dtypes.
    return _registration.register(NAMESPACE, kernels=lambda tensor: _checks.CUDA)


def launch_counts():
    """The kernel launches since the last ``reset_launch_counts()`` (or the build's
    loading), per kernel: ``{"cae::cuda::max_pool_nchw_kernel<float, float, false, true>": 1, ...}``.
    A launch counts once its configuration passed the emulator's checks."""
    names, counts = ops._sim_launch_counts()
    return dict(zip(names, counts, strict=True))


def reset_launch_counts():
    """Sets every launch count to zero."""
    ops._sim_reset_launch_counts()


@contextlib.contextmanager
def count_launches():
    """The launches made inside the ``with`` block, per kernel (a ``Counter``, filled when
    the block ends); the counts outside it are left alone::

        with sim.count_launches() as counts:
            sim.max_pool2x2(x)
        assert sum(counts.values()) == 1
    """
    counts = collections.Counter()
    before = launch_counts()
    try:
        yield counts
    finally:
        for name, count in launch_counts().items():
            if count > before.get(name, 0):
                counts[name] = count - before.get(name, 0)


class Launch(collections.namedtuple("Launch", "kernel grid block shared_bytes")):
    """One recorded launch: the kernel's name (as ``launch_counts()`` gives it), grid and
    block as ``(x, y, z)``, and the dynamic shared memory per block in bytes."""

    __slots__ = ()

    @property
    def blocks(self):
        return self.grid[0] * self.grid[1] * self.grid[2]

    @property
    def threads_per_block(self):
        return self.block[0] * self.block[1] * self.block[2]


def _take_launch_records():
    names, numbers = ops._sim_take_launch_records()
    return [
        Launch(name, tuple(numbers[7 * i : 7 * i + 3]), tuple(numbers[7 * i + 3 : 7 * i + 6]), numbers[7 * i + 6])
        for i, name in enumerate(names)
    ]


class LaunchRecorder:
    """What ``record_launches()`` yields: ``launches``, the launches so far in order
    (complete once the ``with`` block ends); ``poll()`` brings it up to date inside
    the block and returns the launches since the previous ``poll()``."""

    def __init__(self):
        self.launches = []

    def poll(self):
        new = _take_launch_records()
        self.launches += new
        return new


@contextlib.contextmanager
def record_launches(dry_run=False):
    """Records the launches made inside the ``with`` block, in order::

        with sim.record_launches() as recorder:
            sim.max_pool2x2(x)
        assert recorder.launches[0].kernel.startswith("cae::cuda::max_pool")

    ``dry_run=True``: every launch is checked, counted and recorded, but no kernel
    runs: **whatever the kernels should write keeps its old contents** (outputs come
    from ``torch.empty``: garbage, possibly NaN), so only the launch plan is
    meaningful -- which is the point: a batch-256 training step takes seconds
    instead of hours. Not reentrant (one recorder per process).
    """
    if _recording[0]:
        raise RuntimeError("sim.record_launches() is already active (it is not reentrant)")
    recorder = LaunchRecorder()
    _recording[0] = True
    ops._sim_set_launch_recording(True)
    ops._sim_set_dry_run(bool(dry_run))
    try:
        yield recorder
    finally:
        ops._sim_set_dry_run(False)
        recorder.poll()
        ops._sim_set_launch_recording(False)
        _recording[0] = False


_recording = [False]  # whether a record_launches() block is active


if __name__ == "__main__":  # python -m cae_kernels.sim --build
    import sys

    if sys.argv[1:] != ["--build"]:
        sys.exit("usage: python -m cae_kernels.sim --build")
    # Build, but load nothing: a sanitized library may only be loaded into a process
    # started with its runtime (ASan aborts the process otherwise).
    load_library, torch.ops.load_library = torch.ops.load_library, lambda path: None
    try:
        _build()
    finally:
        torch.ops.load_library = load_library
    print(f"built {_build_options()[0]}")
else:
    ops = _load()
    _functions = _Functions(ops)
    conv3x3 = _functions.conv3x3
    conv_transpose3x3 = _functions.conv_transpose3x3
    max_pool2x2 = _functions.max_pool2x2
    encoder_block = _functions.encoder_block
    decoder_block = _functions.decoder_block
    decoder_block_loss = _functions.decoder_block_loss
    sigmoid_cross_entropy = _functions.sigmoid_cross_entropy
    adam_ = _functions.adam_

__all__ = [
    "adam_",
    "conv3x3",
    "conv_transpose3x3",
    "Launch",
    "LaunchRecorder",
    "count_launches",
    "decoder_block",
    "decoder_block_loss",
    "encoder_block",
    "launch_counts",
    "max_pool2x2",
    "ops",
    "record_launches",
    "reset_launch_counts",
    "sigmoid_cross_entropy",
]
