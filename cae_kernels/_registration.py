"""Fake kernels and autograd for the ``torch.ops.<namespace>`` ops.

The schemas and the device kernels live in C++ (``csrc/ops.cpp``, ``csrc/cpu``,
``csrc/cuda``); this module adds what Python does best: shape inference for
``torch.compile`` / meta tensors, and the backward formulas, which call the
backward ops of the same namespace. ``register("cae")`` runs on import;
``cae_kernels.sim`` runs ``register("cae_sim")`` for the emulated CUDA kernels.
"""

import torch

from . import _checks
from ._checks import conv_output_size, kernels_by_device, pool_output_size

try:
    from torch._prims_common import suggest_memory_format as _suggest_memory_format
except ImportError:  # older torch: the same rule, spelled out
    from torch._prims_common import are_strides_like_channels_last

    def _suggest_memory_format(t):
        if t.layout == torch.strided and are_strides_like_channels_last(t.shape, t.stride()):
            return torch.channels_last
        return torch.contiguous_format


def _empty(like, shape):
    # The kernels write their result in the input's own layout (csrc/shapes.h).
    return torch.empty(
        shape, dtype=like.dtype, device=like.device, memory_format=_suggest_memory_format(like)
    )


def _fakes(checks):
    """The fake kernels: each checks its arguments as the C++ op does (``_checks``), then
    returns an empty result of the kernel's shape, dtype and layout."""

    def conv3x3(input, weight, bias, stride, relu):
        checks.conv3x3(input, weight, bias, stride)
        n, _, h, w = input.shape
        return _empty(input, (n, weight.shape[0], conv_output_size(h, stride), conv_output_size(w, stride)))

    def conv_transpose3x3(input, weight, bias, stride, relu):
        checks.conv_transpose3x3(input, weight, bias, stride)
        n, _, h, w = input.shape
        return _empty(input, (n, weight.shape[1], h * stride, w * stride))

    def conv3x3_grad_input(grad_output, relu_output, weight, input, stride):
        checks.conv3x3_grad_input(grad_output, relu_output, weight, input, stride)
        return _empty(input, input.shape)

    def conv_transpose3x3_grad_input(grad_output, relu_output, weight, input, stride):
        checks.conv_transpose3x3_grad_input(grad_output, relu_output, weight, input, stride)
        return _empty(input, input.shape)

    # The weight gradient ops return the bias's gradient too (one pass over the samples).
    def conv3x3_grad_weight(grad_output, relu_output, input, stride):
        checks.conv3x3_grad_weight(grad_output, relu_output, input, stride)
        weight_shape = (grad_output.shape[1], input.shape[1], 3, 3)
        return input.new_empty(weight_shape), grad_output.new_empty((grad_output.shape[1],))

    def conv_transpose3x3_grad_weight(grad_output, relu_output, input, stride):
        checks.conv_transpose3x3_grad_weight(grad_output, relu_output, input, stride)
        weight_shape = (input.shape[1], grad_output.shape[1], 3, 3)
        return input.new_empty(weight_shape), grad_output.new_empty((grad_output.shape[1],))

    # The whole backward: the input gradient's fake (its checks and result), then the
    # weight's and the bias's gradients.
    def conv3x3_backward(grad_output, relu_output, weight, input, stride):
        grad_input = conv3x3_grad_input(grad_output, relu_output, weight, input, stride)
        return grad_input, input.new_empty(weight.shape), grad_output.new_empty((grad_output.shape[1],))

    def conv_transpose3x3_backward(grad_output, relu_output, weight, input, stride):
        grad_input = conv_transpose3x3_grad_input(grad_output, relu_output, weight, input, stride)
        return grad_input, input.new_empty(weight.shape), grad_output.new_empty((grad_output.shape[1],))

    def bias_grad(grad_output, relu_output):
        checks.bias_grad(grad_output, relu_output)
        return grad_output.new_empty((grad_output.shape[1],))

    def max_pool2x2(input):
        checks.max_pool2x2(input)
        n, c, h, w = input.shape
        return _empty(input, (n, c, pool_output_size(h), pool_output_size(w)))

    def max_pool2x2_grad_input(grad_output, input):
        checks.max_pool2x2_grad_input(grad_output, input)
        return _empty(input, input.shape)

    return {fake.__name__: fake for fake in (
        conv3x3, conv3x3_grad_input, conv3x3_grad_weight, conv_transpose3x3, conv_transpose3x3_grad_input,
        conv_transpose3x3_grad_weight, conv3x3_backward, conv_transpose3x3_backward, bias_grad, max_pool2x2,
        max_pool2x2_grad_input)}


def _setup_conv(ctx, inputs, output):
    input, weight, bias, stride, relu = inputs
    ctx.save_for_backward(input, weight, output if relu else None)
    ctx.stride = stride
    ctx.has_bias = bias is not None


def _setup_max_pool(ctx, inputs, output):
    (input,) = inputs
    ctx.save_for_backward(input)


def register(namespace, kernels=kernels_by_device):
    """Registers fake kernels and autograd for every op of ``torch.ops.<namespace>``.

    ``kernels(tensor)`` says which kernels run a tensor there (their dtypes), for the
    fakes' checks: by its device for ``cae``; the emulated CUDA kernels of ``cae_sim``
    run CUDA's on CPU tensors.
    """
    ops = getattr(torch.ops, namespace)

    def conv_backward(grad_input_op, grad_weight_op, backward_op):
        def backward(ctx, grad_output):
            input, weight, relu_output = ctx.saved_tensors
            needs_input, needs_weight, needs_bias = ctx.needs_input_grad[:3]
            needs_bias = needs_bias and ctx.has_bias
            if needs_input and needs_weight:  # one pass for all three
                grad_input, grad_weight, bias_sum = backward_op(grad_output, relu_output, weight, input, ctx.stride)
                return grad_input, grad_weight, bias_sum if needs_bias else None, None, None
            grad_input = grad_weight = grad_bias = None
            if needs_input:
                grad_input = grad_input_op(grad_output, relu_output, weight, input, ctx.stride)
            if needs_weight:  # the bias's gradient comes with it
                grad_weight, bias_sum = grad_weight_op(grad_output, relu_output, input, ctx.stride)
                grad_bias = bias_sum if needs_bias else None
            elif needs_bias:
                grad_bias = ops.bias_grad(grad_output, relu_output)
            return grad_input, grad_weight, grad_bias, None, None

        return backward

    def max_pool_backward(ctx, grad_output):
        (input,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None
        return ops.max_pool2x2_grad_input(grad_output, input)

    for name, fake in _fakes(_checks.OpChecks(kernels)).items():
        torch.library.register_fake(f"{namespace}::{name}")(fake)

    torch.library.register_autograd(
        f"{namespace}::conv3x3",
        conv_backward(ops.conv3x3_grad_input, ops.conv3x3_grad_weight, ops.conv3x3_backward),
        setup_context=_setup_conv,
    )
    torch.library.register_autograd(
        f"{namespace}::conv_transpose3x3",
        conv_backward(ops.conv_transpose3x3_grad_input, ops.conv_transpose3x3_grad_weight,
                      ops.conv_transpose3x3_backward),
        setup_context=_setup_conv,
    )
    torch.library.register_autograd(
        f"{namespace}::max_pool2x2", max_pool_backward, setup_context=_setup_max_pool
    )
    return ops


from . import _C  # noqa: E402  (loads the library: schemas and device kernels)

with_cuda = bool(_C.with_cuda)


def cpu_capability():
    """The instruction-set level of the CPU kernels in use: ``"baseline"``,
    ``"avx2"`` or ``"avx512"`` (the best this CPU runs, unless lowered by the
    ``CAE_CPU_CAPABILITY`` environment variable or :func:`set_cpu_capability`)."""
    return _C.cpu_capability()


def cpu_capabilities():
    """The levels this CPU can run, lowest first."""
    return list(_C.cpu_capabilities())


def set_cpu_capability(name):
    """Runs the CPU kernels of level ``name`` from now on (one of
    :func:`cpu_capabilities`); raises ValueError for a level this CPU lacks."""
    _C.set_cpu_capability(name)


register("cae")
