"""The backends the op suite (test_ops.py) runs on, each with the dtypes, shapes and
tolerances that fit it, and the helpers every op test shares:

- ``cpu-<level>``: the CPU kernels at each instruction-set level this CPU runs
  (csrc/cpu/capability.h), that level in use for the test's duration;
- ``sim``: the CUDA kernels run on the CPU by the emulator (``cae_kernels.sim``, ops
  ``torch.ops.cae_sim`` on CPU tensors), on small shapes: it runs every CUDA thread as
  a fiber on one core; TF32 off, as on a GPU;
- ``cuda``: the CUDA kernels on a GPU, where there is one and they were built; TF32 off,
  so that cuDNN's references are full precision.

A test takes one through its ``backend`` argument, and may take per-backend values too::

    @on_every_backend()
    def test_x(backend): ...   # backend.device, backend.functions, backend.ops

    @on_cuda_kernels("dtype", "conv_shape")   # sim and cuda; each its own dtypes x shapes
    def test_y(backend, dtype, conv_shape): ...

The test ids start with the backend's name: ``test_conv3x3[sim-float64-3x3x5x9x11-...]``.
"""

import contextlib
import dataclasses
import importlib
import itertools

import pytest
import torch

import cae_kernels
from cae_kernels._registration import _suggest_memory_format

FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
HALF_DTYPES = (torch.float16, torch.bfloat16)


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    device: str  # where its tensors live
    module: str  # its functions (conv3x3, conv_transpose3x3, max_pool2x2): cae_kernels or cae_kernels.sim
    namespace: str  # its ops: torch.ops.<namespace>
    kernels: str  # "CPU" or "CUDA": whose dtypes (and error messages) they are
    dtypes: tuple  # in the order the error messages list them
    conv_shapes: tuple  # (N, C_in, C_out, H, W)
    pool_shapes: tuple  # (N, C, H, W)
    tolerances: dict  # dtype -> (rtol, atol for values of magnitude up to 1)
    cpu_level: str | None = None
    # The CPU grid's H x W are layer sizes, which a transposed convolution's output
    # keeps (its input is H/stride x W/stride); elsewhere they are its input's.
    transposed_to_grid_size: bool = False

    @property
    def functions(self):
        return importlib.import_module(self.module)  # cae_kernels.sim builds itself on first import

    @property
    def ops(self):
        self.functions  # noqa: B018  (registers the namespace's ops)
        return getattr(torch.ops, self.namespace)

    def tolerance(self, dtype, expected=None):
        """assert_close's rtol and atol; atol grows with the largest expected value."""
        rtol, atol = self.tolerances[dtype]
        scale = max(1.0, expected.abs().max().item()) if expected is not None and expected.numel() else 1.0
        return {"rtol": rtol, "atol": atol * scale}

    @contextlib.contextmanager
    def in_use(self):
        if self.cpu_level:
            previous = cae_kernels.cpu_capability()
            cae_kernels.set_cpu_capability(self.cpu_level)
            try:
                yield self
            finally:
                cae_kernels.set_cpu_capability(previous)
        elif self.device == "cuda":
            with tf32_off():
                yield self
        else:
            self.functions  # noqa: B018  (the emulator's build, if any, before the test's clock)
            with tf32_off():  # float32 on the exact path (TF32 tensor cores: test_cuda_kernels.py)
                yield self


@contextlib.contextmanager
def tf32(allowed):
    """cuDNN's and cuBLAS's float32 precision inside the block: TF32 where ``allowed``
    (PyTorch's default for cuDNN), else full float32; our float32 convolutions follow
    cuDNN's setting (TF32 tensor cores where cuDNN may use them)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def tf32_off():
    """Full float32 precision (cuDNN's references, our exact kernels)."""
    return tf32(False)


ALL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

# The CPU kernels: the autoencoder's own layers at 28x28 (encoder 1->16->16->8...,
# decoder 8->8->16->1 at 4/8/16/32), a 1x1 image, odd sizes, one channel, batch 1; then
# the CPU products' edges: rows not a multiple of the tile, columns short of a vector,
# 8 or 16 channels (one-register rows, paired k, tap-blocked weight grads).
CPU_CONV_SHAPES = (
    (3, 1, 16, 28, 28), (3, 16, 16, 28, 28), (3, 16, 8, 14, 14), (3, 8, 8, 7, 7), (3, 8, 8, 4, 4),
    (3, 8, 16, 16, 16), (3, 16, 1, 32, 32), (3, 3, 5, 1, 1), (3, 3, 4, 7, 13), (3, 1, 1, 13, 7), (1, 8, 16, 9, 6),
    (3, 16, 1, 5, 7), (3, 8, 3, 6, 5), (3, 16, 5, 9, 7), (3, 8, 8, 5, 9),
)
CPU_POOL_SHAPES = ((3, 16, 28, 28), (3, 16, 14, 14), (3, 8, 7, 7), (3, 1, 1, 1), (3, 3, 13, 8), (3, 5, 2, 9))

# The emulated CUDA kernels, with the tile edges each shape exercises (the output tile
# is chosen from the output size; see csrc/cuda/common.cuh, plan_output_tile).
SIM_CONV_SHAPES = (
    (3, 3, 5, 9, 11),  # 16x16 tile, ragged in both directions; 5 channels in a group of 8
    (5, 1, 16, 7, 7),  # 8x8 tiles of 4 images: the last block holds 1 image; C_in 1
    (2, 16, 8, 14, 14),  # an autoencoder layer (16 -> 8 at 14x14)
    (9, 8, 1, 4, 3),  # tiny images, 16 per block: one block, 9 of 16 images; C_out 1
    (1, 18, 17, 3, 34),  # 17 channels: two groups of 16; 34 columns: two 32-column tiles
    (4, 2, 3, 1, 1),  # 1x1 images
    (2, 100, 3, 5, 6),  # 100 input channels: several passes through shared memory
)
SIM_POOL_SHAPES = ((2, 3, 7, 9), (1, 8, 8, 6), (3, 16, 1, 1), (2, 5, 4, 3), (1, 1, 5, 2))

# The CUDA kernels on a GPU: the autoencoder's layers at batch 256 (encoder at 28/14/7,
# decoder 4 -> 8 -> 16 -> 32 and the 16 -> 1 output), then ragged and odd shapes.
CUDA_CONV_SHAPES = (
    (256, 1, 16, 28, 28), (256, 16, 16, 28, 28), (256, 16, 8, 14, 14), (256, 8, 8, 7, 7),
    (256, 8, 8, 4, 4), (256, 8, 16, 16, 16), (256, 16, 1, 32, 32),
    (3, 3, 5, 9, 11), (5, 1, 16, 7, 7), (1, 18, 17, 3, 34), (4, 2, 3, 1, 1), (2, 5, 33, 37, 41),
    (2, 100, 3, 5, 6),  # 100 input channels: several passes through shared memory
)
CUDA_POOL_SHAPES = ((256, 16, 28, 28), (256, 8, 14, 14), (256, 8, 7, 7), (3, 5, 9, 11), (2, 3, 1, 1), (1, 12, 5, 2))

BACKENDS = {
    f"cpu-{level}": Backend(
        f"cpu-{level}", "cpu", "cae_kernels", "cae", "CPU", (torch.float32, torch.float64),
        CPU_CONV_SHAPES, CPU_POOL_SHAPES, {torch.float64: (1e-9, 1e-9), torch.float32: (1e-4, 2e-4)}, level,
        transposed_to_grid_size=True,
    )
    for level in cae_kernels.cpu_capabilities()
}
BACKENDS["sim"] = Backend(
    "sim", "cpu", "cae_kernels.sim", "cae_sim", "CUDA", ALL_DTYPES, SIM_CONV_SHAPES, SIM_POOL_SHAPES,
    {torch.float64: (1e-10, 1e-10), torch.float32: (1e-4, 1e-4), torch.float16: (1e-2, 2e-2),
     torch.bfloat16: (4e-2, 8e-2)},
)
if torch.cuda.is_available() and cae_kernels.with_cuda:
    BACKENDS["cuda"] = Backend(
        "cuda", "cuda", "cae_kernels", "cae", "CUDA", ALL_DTYPES, CUDA_CONV_SHAPES, CUDA_POOL_SHAPES,
        {torch.float64: (1e-10, 1e-10), torch.float32: (2e-4, 2e-4), torch.float16: (1e-2, 1e-2),
         torch.bfloat16: (5e-2, 5e-2)},
    )
CUDA_KERNEL_BACKENDS = [name for name in BACKENDS if BACKENDS[name].kernels == "CUDA"]

# Each backend's own values of the fields a test may ask for.
_FIELDS = {"dtype": "dtypes", "conv_shape": "conv_shapes", "pool_shape": "pool_shapes"}


def _id(value):
    if isinstance(value, tuple):
        return "x".join(map(str, value))
    return str(value).removeprefix("torch.")


def _parametrize(names, fields):
    rows = [
        # Marked "cuda" on a GPU: scripts/gpu_check.sh selects the GPU's tests by it.
        pytest.param(name, *values, id="-".join(map(_id, (name, *values))),
                     marks=[pytest.mark.cuda] if BACKENDS[name].device == "cuda" else [])
        for name in names
        for values in itertools.product(*(getattr(BACKENDS[name], _FIELDS[f]) for f in fields))
    ]
    return pytest.mark.parametrize(("backend", *fields), rows, indirect=["backend"])


def on_every_backend(*fields):
    """Parametrizes ``backend`` over every backend here and, for each, over its own
    values of ``fields`` ("dtype", "conv_shape", "pool_shape")."""
    return _parametrize(list(BACKENDS), fields)


def on_cuda_kernels(*fields):
    """``on_every_backend``, over the backends that run the CUDA kernels: sim and cuda."""
    return _parametrize(CUDA_KERNEL_BACKENDS, fields)


@pytest.fixture
def backend(request):
    """The ``Backend`` named ``request.param``, in use for the test's duration."""
    with BACKENDS[request.param].in_use() as b:
        yield b


def make_input(shape, dtype, device, fmt="nchw", *, scale=1.0, noncontiguous=False):
    """A fresh random leaf (from float64, rounded to dtype) that requires grad; 4-D
    tensors in ``fmt``'s layout, or, noncontiguous, every other column of a wider one:
    neither layout's strides."""
    if noncontiguous:
        *rest, w = shape
        x = (torch.randn(*rest, 2 * w, dtype=torch.float64) * scale).to(device, dtype)[..., ::2]
        assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
        return x.requires_grad_()
    x = (torch.randn(shape, dtype=torch.float64) * scale).to(device, dtype)
    if len(shape) == 4:
        x = x.contiguous(memory_format=FORMATS[fmt])
    return x.requires_grad_()


def assert_close(actual, expected, tolerance, name=None):
    """``actual`` (any dtype) against the float64 ``expected`` on the same device; NaN
    where expected has NaN."""
    msg = None if name is None else (lambda m: f"{name}: {m}")
    torch.testing.assert_close(actual.double(), expected.detach(), **tolerance, equal_nan=True, msg=msg)


def check_forward_backward(backend, ours_fn, ref_fn, inputs, relu=False, exact=False):
    """Forward and every gradient of ``ours_fn(*inputs)`` against ``ref_fn`` (a function of
    ``cae_kernels.reference``) in float64 on the same (rounded) inputs, on the backend's
    device (cuDNN's float64 kernels on a GPU). Returns our output.

    relu: ours fuses a ReLU into ref_fn's result. The forward is compared with
    relu(reference); the backward reference applies *our* output's mask, so an output
    within rounding of zero cannot flip the mask between the two.
    exact: a selection (max-pool), equal in every dtype."""
    out = ours_fn(*inputs)
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    ref = ref_fn(*ref_inputs)
    dtype = inputs[0].dtype
    assert out.dtype == dtype and out.device == inputs[0].device and out.shape == ref.shape
    # The result comes back in the input's layout, read as PyTorch reads it (one
    # channel in channels_last is also plain contiguous, and counts as that).
    assert out.is_contiguous(memory_format=_suggest_memory_format(inputs[0]))

    def tolerance(expected):
        return {"rtol": 0.0, "atol": 0.0} if exact else backend.tolerance(dtype, expected)

    expected = torch.relu(ref) if relu else ref
    assert_close(out, expected, tolerance(expected), "output")
    if relu:
        ref = ref * (out.detach() > 0)
    grad = torch.randn(ref.shape, dtype=torch.float64).to(ref.device, dtype)  # the same numbers for both
    ours_grads = torch.autograd.grad(out, inputs, grad)
    ref_grads = torch.autograd.grad(ref, ref_inputs, grad.double())
    for name, mine, theirs in zip(("input", "weight", "bias")[: len(inputs)], ours_grads, ref_grads, strict=True):
        assert_close(mine, theirs, tolerance(theirs), f"gradient of {name}")
    return out
