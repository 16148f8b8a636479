"""The fake kernels check their arguments as the C++ ops do: the same message traced as eager.

Each bad call runs three ways: eagerly (the C++ checks of csrc/shapes.h, csrc/ops.h),
under FakeTensorMode and under torch.compile(fullgraph=True) (both: the fake kernels and
their rules in cae_kernels/_checks.py); all three must raise the same message.
"""

import re

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import cae_kernels  # noqa: F401 - registers torch.ops.cae
from cae_kernels import _checks

ops = torch.ops.cae


def t(*shape, dtype=torch.float32):
    return torch.randn(shape, dtype=dtype)


# (op, arguments, the exact message)
BAD_CALLS = {
    "conv3x3 3-D input": (
        ops.conv3x3, lambda: (t(1, 28, 28), t(4, 1, 3, 3), None, 1, False),
        "cae: input must be a 4-D (N, C, H, W) tensor, got 3-D with sizes [1, 28, 28]"),
    "conv3x3 unsupported dtype": (
        ops.conv3x3, lambda: (t(1, 1, 8, 8, dtype=torch.float16), t(4, 1, 3, 3, dtype=torch.float16), None, 1, False),
        "cae: the CPU kernels do not support dtype Half (supported: float32, float64)"),
    "conv3x3 stride 3": (
        ops.conv3x3, lambda: (t(1, 1, 8, 8), t(4, 1, 3, 3), None, 3, False),
        "cae: stride must be 1 or 2, got 3"),
    "conv3x3 5x5 weight": (
        ops.conv3x3, lambda: (t(1, 1, 8, 8), t(4, 1, 5, 5), None, 1, False),
        "cae: weight must be [C_out, C_in, 3, 3], got sizes [4, 1, 5, 5]"),
    "conv3x3 weight dtype": (
        ops.conv3x3, lambda: (t(1, 1, 8, 8), t(4, 1, 3, 3, dtype=torch.float64), None, 1, False),
        "cae: weight has dtype Double but input has dtype Float"),
    "conv3x3 channels": (
        ops.conv3x3, lambda: (t(2, 3, 8, 8), t(4, 2, 3, 3), None, 1, False),
        "cae: input has 3 channels but weight of sizes [4, 2, 3, 3] expects 2"),
    "conv3x3 bias size": (
        ops.conv3x3, lambda: (t(2, 3, 8, 8), t(4, 3, 3, 3), t(5), 2, True),
        "cae: bias must have sizes [4], got [5]"),
    "conv3x3 bias dtype": (
        ops.conv3x3, lambda: (t(2, 3, 8, 8), t(4, 3, 3, 3), t(4, dtype=torch.float64), 2, True),
        "cae: bias has dtype Double but input has dtype Float"),
    "conv_transpose3x3 channels": (
        ops.conv_transpose3x3, lambda: (t(2, 3, 8, 8), t(2, 4, 3, 3), None, 2, False),
        "cae: input has 3 channels but weight of sizes [2, 4, 3, 3] expects 2"),
    "conv_transpose3x3 weight": (
        ops.conv_transpose3x3, lambda: (t(2, 3, 8, 8), t(3, 4, 3), None, 2, False),
        "cae: weight must be [C_in, C_out, 3, 3], got sizes [3, 4, 3]"),
    "conv_transpose3x3 bias size": (
        ops.conv_transpose3x3, lambda: (t(2, 3, 8, 8), t(3, 4, 3, 3), t(3), 2, False),
        "cae: bias must have sizes [4], got [3]"),
    "conv3x3_grad_input grad_output shape": (
        ops.conv3x3_grad_input, lambda: (t(2, 4, 8, 8), None, t(4, 3, 3, 3), t(2, 3, 8, 8), 2),
        "cae: grad_output must have sizes [2, 4, 4, 4] (the convolution's output), got [2, 4, 8, 8]"),
    "conv3x3_grad_input grad_output dtype": (
        ops.conv3x3_grad_input, lambda: (t(2, 4, 4, 4, dtype=torch.float64), None, t(4, 3, 3, 3), t(2, 3, 8, 8), 2),
        "cae: grad_output has dtype Double but input has dtype Float"),
    "conv3x3_grad_input relu_output shape": (
        ops.conv3x3_grad_input, lambda: (t(2, 4, 4, 4), t(2, 4, 3, 3), t(4, 3, 3, 3), t(2, 3, 8, 8), 2),
        "cae: relu_output must have sizes [2, 4, 4, 4] (the shape of grad_output), got [2, 4, 3, 3]"),
    "conv3x3_grad_weight grad_output shape": (
        ops.conv3x3_grad_weight, lambda: (t(2, 4, 8, 8), None, t(2, 3, 8, 8), 2),
        "cae: grad_output of sizes [2, 4, 8, 8] does not match a stride-2 convolution of input of sizes "
        "[2, 3, 8, 8]"),
    "conv3x3_grad_weight 3-D input": (
        ops.conv3x3_grad_weight, lambda: (t(2, 4, 8, 8), None, t(3, 8, 8), 1),
        "cae: input must be a 4-D (N, C, H, W) tensor, got 3-D with sizes [3, 8, 8]"),
    "conv_transpose3x3_grad_input grad_output shape": (
        ops.conv_transpose3x3_grad_input, lambda: (t(2, 4, 8, 8), None, t(3, 4, 3, 3), t(2, 3, 8, 8), 2),
        "cae: grad_output must have sizes [2, 4, 16, 16] (the transposed convolution's output), got [2, 4, 8, 8]"),
    "conv_transpose3x3_grad_weight grad_output shape": (
        ops.conv_transpose3x3_grad_weight, lambda: (t(2, 4, 8, 8), None, t(2, 3, 8, 8), 2),
        "cae: grad_output must have sizes [2, 4, 16, 16] (the transposed convolution's output), got [2, 4, 8, 8]"),
    "bias_grad 2-D": (
        ops.bias_grad, lambda: (t(2, 4), None),
        "cae: grad_output must be a 4-D (N, C, H, W) tensor, got 2-D with sizes [2, 4]"),
    "bias_grad relu_output dtype": (
        ops.bias_grad, lambda: (t(2, 4, 3, 3), t(2, 4, 3, 3, dtype=torch.float64)),
        "cae: relu_output has dtype Double but input has dtype Float"),
    "max_pool2x2 3-D": (
        ops.max_pool2x2, lambda: (t(3, 7, 7),),
        "cae: input must be a 4-D (N, C, H, W) tensor, got 3-D with sizes [3, 7, 7]"),
    "max_pool2x2 integer": (
        ops.max_pool2x2, lambda: (torch.zeros(1, 1, 4, 4, dtype=torch.int64),),
        "cae: the CPU kernels do not support dtype Long (supported: float32, float64)"),
    "max_pool2x2_grad_input grad_output shape": (
        ops.max_pool2x2_grad_input, lambda: (t(1, 2, 3, 3), t(1, 2, 7, 7)),
        "cae: grad_output must have sizes [1, 2, 4, 4] (the max-pool's output), got [1, 2, 3, 3]"),
}


@pytest.fixture(params=sorted(BAD_CALLS), ids=str)
def bad_call(request):
    op, make_args, message = BAD_CALLS[request.param]
    return op, make_args(), re.escape(message)


def test_eager_raises_the_message(bad_call):
    op, args, message = bad_call
    with pytest.raises(RuntimeError, match=message):
        op(*args)


def test_fake_tensor_mode_raises_the_same_message(bad_call):
    op, args, message = bad_call
    with FakeTensorMode() as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        with pytest.raises(RuntimeError, match=message):
            op(*fake_args)


def test_torch_compile_raises_the_same_message(bad_call):
    op, args, message = bad_call
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: op(*a), fullgraph=True, backend="eager")
    with pytest.raises(RuntimeError, match=message):
        compiled(*args)


def test_device_mismatch_is_checked_by_the_fakes():
    # Meta tensors run the fake kernels eagerly; the C++ message is the same (see test_cuda.py for a GPU).
    with pytest.raises(RuntimeError, match=re.escape("cae: weight is on device meta but input is on device cpu")):
        _checks.check_like(torch.empty(4, 1, 3, 3, device="meta"), "weight", t(1, 1, 8, 8))


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and cae_kernels.with_cuda), reason="needs the CUDA kernels")
def test_device_mismatch_message_agrees_with_cuda():
    x, w = t(1, 1, 8, 8).cuda(), t(4, 1, 3, 3)
    message = re.escape(f"cae: weight is on device cpu but input is on device {x.device}")
    with pytest.raises(RuntimeError, match=message):
        ops.conv3x3(x, w, None, 1, False)
    with FakeTensorMode() as mode, pytest.raises(RuntimeError, match=message):
        ops.conv3x3(mode.from_tensor(x), mode.from_tensor(w), None, 1, False)


GOOD_CALLS = [
    (ops.conv3x3, lambda: (t(2, 3, 7, 7).to(memory_format=torch.channels_last), t(4, 3, 3, 3), t(4), 2, True)),
    (ops.conv_transpose3x3, lambda: (t(2, 3, 4, 4), t(3, 5, 3, 3), None, 2, False)),
    (ops.conv3x3_grad_input, lambda: (t(2, 4, 4, 4), None, t(4, 3, 3, 3), t(2, 3, 7, 7), 2)),
    (ops.conv3x3_grad_weight, lambda: (t(2, 4, 4, 4), t(2, 4, 4, 4), t(2, 3, 7, 7), 2)),
    (ops.conv_transpose3x3_grad_input, lambda: (t(2, 5, 8, 8), None, t(3, 5, 3, 3), t(2, 3, 4, 4), 2)),
    (ops.conv_transpose3x3_grad_weight, lambda: (t(2, 5, 8, 8), None, t(2, 3, 4, 4), 2)),
    (ops.bias_grad, lambda: (t(2, 4, 3, 3), None)),
    (ops.max_pool2x2, lambda: (t(1, 2, 7, 7),)),
    (ops.max_pool2x2_grad_input, lambda: (t(1, 2, 4, 4), t(1, 2, 7, 7))),
]


@pytest.mark.parametrize("op, make_args", GOOD_CALLS, ids=lambda v: getattr(v, "__name__", ""))
def test_good_calls_pass_the_checks_with_the_eager_shapes(op, make_args):
    args = make_args()
    eager = op(*args)
    with FakeTensorMode() as mode:
        fake = op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
    eager, fake = (r if isinstance(r, tuple) else (r,) for r in (eager, fake))
    for e, f in zip(eager, fake, strict=True):
        assert (f.shape, f.stride(), f.dtype) == (e.shape, e.stride(), e.dtype)
