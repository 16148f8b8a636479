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

    # The blocks: their own checks, then their convolutions' (the C++ op checks every
    # convolution before it runs one).
    def encoder_block(input, weights, biases, relu):
        checks.encoder_block(input, weights, biases)
        n, _, h, w = input.shape
        out = _empty(input, (n, weights[0].shape[0], pool_output_size(h), pool_output_size(w)))
        if len(weights) == 3:
            return out, input.new_empty((0,), dtype=torch.uint8)
        return out, torch.empty(out.shape, dtype=torch.uint8, device=input.device,
                                memory_format=_suggest_memory_format(input))

    def _block_grads(input, weights, biases, input_grad):
        grad_input = _empty(input, input.shape) if input_grad else input.new_empty((0,))
        return grad_input, [input.new_empty(w.shape) for w in weights], [b.new_empty(b.shape) for b in biases]

    def encoder_block_backward(grad_output, input, output, winners, weights, biases, relu, input_grad):
        out, _ = encoder_block(input, weights, biases, relu)
        _checks.check_block_grad_output(grad_output, input, out.shape)
        _checks._check(output is not None or not (len(weights) == 3 and relu),
                       "cae: encoder_block_backward needs the output of a strided block with relu (its ReLU mask)")
        _checks.check_relu_output(output, grad_output, "output")
        _checks.check_pool_winners(winners, grad_output, input, weights)
        return _block_grads(input, weights, biases, input_grad)

    def decoder_block(input, weights, biases, relu, output_size, size_name="output_size"):
        _checks.check_decoder_block_counts(weights, biases)
        a = input
        for i, (weight, bias) in enumerate(zip(weights, biases, strict=True)):
            a = conv_transpose3x3(a, weight, bias, 2 if i + 1 < len(weights) else 1, relu)
        _checks.check_crop(output_size, a.shape, size_name)
        return _empty(input, (a.shape[0], a.shape[1], *output_size))

    def decoder_block_backward(grad_output, input, weights, biases, relu, output_size, input_grad):
        out = decoder_block(input, weights, biases, relu, output_size)
        _checks.check_block_grad_output(grad_output, input, out.shape)
        return _block_grads(input, weights, biases, input_grad)

    def decoder_block_loss(input, weights, biases, relu, target):
        _checks.check_decoder_loss_target_dim(target)
        logits = decoder_block(input, weights, biases, relu, list(target.shape[2:]), "target's size")
        _checks.check_decoder_loss_target(target, input, weights)
        return logits, target.new_empty(()), target.new_empty(())

    def decoder_block_loss_backward(grad_loss, grad_output, logits, target, input, weights, biases, relu,
                                    input_grad):
        decoder_block_loss(input, weights, biases, relu, target)
        _checks.check_decoder_loss_backward(grad_loss, grad_output, logits, target, input)
        return _block_grads(input, weights, biases, input_grad)

    def sigmoid_cross_entropy(logits, target):
        checks.sigmoid_cross_entropy(logits, target)
        return logits.new_empty(()), logits.new_empty(())

    def sigmoid_cross_entropy_backward(grad_loss, logits, target):
        checks.sigmoid_cross_entropy_backward(grad_loss, logits, target)
        return _empty(logits, logits.shape)

    def adam_(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay):
        checks.adam_(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay)
        return lr.new_empty(())

    return {fake.__name__: fake for fake in (
        conv3x3, conv3x3_grad_input, conv3x3_grad_weight, conv_transpose3x3, conv_transpose3x3_grad_input,
        conv_transpose3x3_grad_weight, conv3x3_backward, conv_transpose3x3_backward, bias_grad, max_pool2x2,
        max_pool2x2_grad_input, encoder_block, encoder_block_backward, decoder_block, decoder_block_backward,
        decoder_block_loss, decoder_block_loss_backward, sigmoid_cross_entropy, sigmoid_cross_entropy_backward, adam_)}


def _setup_conv(ctx, inputs, output):
    input, weight, bias, stride, relu = inputs
    ctx.save_for_backward(input, weight, output if relu else None)
    ctx.stride = stride
    ctx.has_bias = bias is not None


def _setup_max_pool(ctx, inputs, output):
    (input,) = inputs
    ctx.save_for_backward(input)


def _setup_encoder_block(ctx, inputs, output):
    input, weights, biases, relu = inputs
    out, winners = output
    # The block's input (a1, and a2 where needed, are recomputed from it); the pool's
    # winner codes (a byte a window: the backward needs no a2); the strided block's
    # output, its last ReLU's mask: the next block's input, the same storage.
    strided = len(weights) == 3
    mask = out if relu and strided else None
    ctx.save_for_backward(input, mask, None if strided else winners, *weights, *biases)
    ctx.mark_non_differentiable(winners)
    ctx.set_materialize_grads(False)  # the winners' gradient: None, not a tensor of zeros (a launch)
    ctx.relu, ctx.count = relu, len(weights)


def _setup_decoder_block(ctx, inputs, output):
    input, weights, biases, relu, output_size = inputs
    ctx.save_for_backward(input, *weights, *biases)
    ctx.relu, ctx.count, ctx.output_size = relu, len(weights), list(output_size)


def _setup_decoder_block_loss(ctx, inputs, output):
    input, weights, biases, relu, target = inputs
    # The logits (the forward's output) give the loss's gradient without recomputing
    # the last layer.
    ctx.save_for_backward(input, output[0], target, *weights, *biases)
    ctx.mark_non_differentiable(output[2])  # the RMSE: a metric
    ctx.set_materialize_grads(False)
    ctx.relu, ctx.count = relu, len(weights)


def _setup_loss(ctx, inputs, output):
    logits, target = inputs
    ctx.save_for_backward(logits, target)
    ctx.mark_non_differentiable(output[1])  # the RMSE: a metric
    ctx.set_materialize_grads(False)  # whose gradient is None, not a tensor of zeros to fill


def _block_gradients(ctx, grads):
    """The backward's (grad_input, grad_weights, grad_biases) as autograd takes them: each
    where ``needs_input_grad`` asks for it (a Tensor[] argument: a list of flags)."""
    grad_input, grad_weights, grad_biases = grads
    needs_input, needs_weights, needs_biases = ctx.needs_input_grad[:3]
    return (
        grad_input if needs_input else None,
        [g if needed else None for g, needed in zip(grad_weights, needs_weights, strict=True)],
        [g if needed else None for g, needed in zip(grad_biases, needs_biases, strict=True)],
    )


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

    # The blocks' backward ops compute every weight's and bias's gradient; the input's
    # only where autograd needs it.
    def encoder_block_backward(ctx, grad_output, grad_winners):
        if grad_output is None:
            return None, [None] * ctx.count, [None] * ctx.count, None
        input, mask, winners, *params = ctx.saved_tensors
        grads = ops.encoder_block_backward(grad_output, input, mask, winners, params[:ctx.count],
                                           params[ctx.count:], ctx.relu, ctx.needs_input_grad[0])
        return (*_block_gradients(ctx, grads), None)

    def decoder_block_backward(ctx, grad_output):
        input, *params = ctx.saved_tensors
        grads = ops.decoder_block_backward(grad_output, input, params[:ctx.count], params[ctx.count:], ctx.relu,
                                           ctx.output_size, ctx.needs_input_grad[0])
        return (*_block_gradients(ctx, grads), None, None)

    # The loss's gradient, and the logits' own where they have one, staged by the
    # block's backward; only the logits': the block's own backward.
    def decoder_block_loss_backward(ctx, grad_logits, grad_loss, grad_rmse):
        input, logits, target, *params = ctx.saved_tensors
        weights, biases = params[:ctx.count], params[ctx.count:]
        if grad_loss is None and grad_logits is None:
            return None, [None] * ctx.count, [None] * ctx.count, None, None
        if grad_loss is None:
            grads = ops.decoder_block_backward(grad_logits, input, weights, biases, ctx.relu, list(target.shape[2:]),
                                               ctx.needs_input_grad[0])
        else:
            grads = ops.decoder_block_loss_backward(grad_loss, grad_logits, logits, target, input, weights, biases,
                                                    ctx.relu, ctx.needs_input_grad[0])
        grad_target = None
        if ctx.needs_input_grad[4] and grad_loss is not None:
            grad_target = -logits.to(target.dtype) * (grad_loss / logits.numel())
        return (*_block_gradients(ctx, grads), None, grad_target)

    # The logits' gradient from the loss's; the target's (rarely wanted) is
    # -logits * grad_loss / numel, as PyTorch's binary_cross_entropy_with_logits.
    def loss_backward(ctx, grad_loss, grad_rmse):
        logits, target = ctx.saved_tensors
        if grad_loss is None:
            return None, None
        grad_logits = ops.sigmoid_cross_entropy_backward(grad_loss, logits, target) if ctx.needs_input_grad[0] else None
        grad_target = -logits * (grad_loss / logits.numel()) if ctx.needs_input_grad[1] else None
        return grad_logits, grad_target

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
    torch.library.register_autograd(
        f"{namespace}::encoder_block", encoder_block_backward, setup_context=_setup_encoder_block
    )
    torch.library.register_autograd(
        f"{namespace}::decoder_block", decoder_block_backward, setup_context=_setup_decoder_block
    )
    torch.library.register_autograd(
        f"{namespace}::decoder_block_loss", decoder_block_loss_backward, setup_context=_setup_decoder_block_loss
    )
    torch.library.register_autograd(
        f"{namespace}::sigmoid_cross_entropy", loss_backward, setup_context=_setup_loss
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
