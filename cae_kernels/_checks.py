"""The argument checks of the ops, in Python, for their fake kernels.

Under ``torch.compile`` and ``FakeTensorMode`` the C++ kernels never run: the fake
kernels (``_registration``) compute the output shapes instead.  They check their
arguments first with the rules below, which mirror the C++ checks of ``csrc/shapes.h``
and ``csrc/ops.h`` in order and wording, so that a bad argument gives the same
``RuntimeError`` message traced as run eagerly.  Change them together.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

# ScalarType names, as C++ prints them in the messages.
_DTYPE_NAMES = {
    torch.float32: "Float", torch.float64: "Double", torch.float16: "Half", torch.bfloat16: "BFloat16",
    torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte",
    torch.bool: "Bool", torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble",
}


class Kernels(NamedTuple):
    """What a backend's kernels accept (``CpuKernels`` / ``CudaKernels`` in C++)."""

    name: str
    dtypes: tuple[torch.dtype, ...]
    supported: str


CPU = Kernels("CPU", (torch.float32, torch.float64), "float32, float64")
CUDA = Kernels("CUDA", (torch.float32, torch.float64, torch.float16, torch.bfloat16),
               "float32, float64, float16, bfloat16")


def kernels_by_device(t: torch.Tensor) -> Kernels | None:
    """The kernels that run a tensor of ``t``'s device (None for meta tensors: no kernels)."""
    return {"cpu": CPU, "cuda": CUDA}.get(t.device.type)


def _check(condition, *parts) -> None:
    if not condition:
        raise RuntimeError("".join(map(str, parts)))


def _dtype(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def _sizes(sizes) -> str:
    return "[" + ", ".join(str(s) for s in sizes) + "]"


def is_non_overlapping_and_dense(t) -> bool:
    """c10's TensorImpl::is_non_overlapping_and_dense: the dims of two or more elements,
    by increasing stride, each stride the product of the sizes before it."""
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape, strict=True) if sz >= 2):
        if stride != expected:
            return False
        expected *= size
    return True


def conv_output_size(size, stride):
    """3x3 convolution, padding 1: ceil(size / stride)."""
    return (size + stride - 1) // stride


def pool_output_size(size):
    """2x2 max-pool with ceil_mode: odd sizes round up (7 -> 4)."""
    return (size + 1) // 2


def check_stride(stride) -> None:
    _check(stride in (1, 2), "cae: stride must be 1 or 2, got ", stride)


def check_like(t, name, input) -> None:
    _check(t.dtype == input.dtype, "cae: ", name, " has dtype ", _dtype(t.dtype), " but input has dtype ",
           _dtype(input.dtype))
    _check(t.device == input.device, "cae: ", name, " is on device ", t.device, " but input is on device ",
           input.device)


def check_activation(t, name, input) -> None:
    _check(t.dim() == 4, "cae: ", name, " must be a 4-D (N, C, H, W) tensor, got ", t.dim(),
           "-D with sizes ", _sizes(t.shape))
    check_like(t, name, input)


def check_same_shape(t, name, expected, what) -> None:
    _check(tuple(t.shape) == tuple(expected), "cae: ", name, " must have sizes ", _sizes(expected), " (", what,
           "), got ", _sizes(t.shape))


def check_weight(weight, input, layout) -> None:
    _check(weight.dim() == 4 and weight.shape[2] == 3 and weight.shape[3] == 3, "cae: weight must be ", layout,
           ", got sizes ", _sizes(weight.shape))
    check_like(weight, "weight", input)


def check_bias(bias, input, channels) -> None:
    if bias is None:
        return
    _check(bias.dim() == 1 and bias.shape[0] == channels, "cae: bias must have sizes [", channels, "], got ",
           _sizes(bias.shape))
    check_like(bias, "bias", input)


def check_relu_output(relu_output, grad_output, name="relu_output") -> None:
    if relu_output is None:
        return
    check_activation(relu_output, name, grad_output)
    check_same_shape(relu_output, name, grad_output.shape, "the shape of grad_output")


def check_pool_winners(winners, grad_output, input, weights) -> None:
    """encoder_block_backward's winners (ops.h), where given."""
    if winners is None:
        return
    _check(len(weights) == 2, "cae: encoder_block_backward takes winners for a pool block only (2 weights), got ",
           len(weights), " weights")
    _check(winners.dtype == torch.uint8, "cae: winners must have dtype Byte (the forward's), got ",
           _dtype(winners.dtype))
    _check(winners.device == input.device, "cae: winners is on device ", winners.device, " but input is on device ",
           input.device)
    check_same_shape(winners, "winners", grad_output.shape, "the shape of grad_output")


def check_input_channels(input, expected, weight) -> None:
    _check(input.shape[1] == expected, "cae: input has ", input.shape[1], " channels but weight of sizes ",
           _sizes(weight.shape), " expects ", expected)


def check_block_biases(op, weights, biases) -> None:
    _check(len(biases) == len(weights), "cae: ", op, " takes a bias per weight: ", len(weights), " weights, ",
           len(biases), " biases")


def check_decoder_block_counts(weights, biases) -> None:
    _check(len(weights) > 0, "cae: decoder_block takes one or more weights, got 0")
    check_block_biases("decoder_block", weights, biases)


def check_crop(output_size, full_shape, size_name="output_size") -> None:
    """The decoder block's crop (after its convolutions' checks)."""
    h, w = full_shape[2], full_shape[3]
    _check(len(output_size) == 2 and 0 <= output_size[0] <= h and 0 <= output_size[1] <= w,
           "cae: decoder_block's ", size_name, " must be [H, W] within its output of [", h, ", ", w, "], got ",
           _sizes(output_size))


def loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a block computes its loss in (C++'s at::toOpMathType): float32 for the
    16-bit floats, else the block's own."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def check_decoder_loss_target_dim(target) -> None:
    _check(target.dim() == 4, "cae: decoder_block_loss's target must be a 4-D (N, C, H, W) tensor, got ",
           target.dim(), "-D with sizes ", _sizes(target.shape))


def check_decoder_loss_target(target, input, weights) -> None:
    """decoder_block_loss's target, after the block's checks."""
    dtype = loss_dtype(input.dtype)
    _check(target.dtype == dtype, "cae: decoder_block_loss's target must have dtype ", _dtype(dtype),
           " (the loss's dtype for input of dtype ", _dtype(input.dtype), "), got ", _dtype(target.dtype))
    _check(target.device == input.device, "cae: target is on device ", target.device, " but input is on device ",
           input.device)
    check_same_shape(target, "target", (input.shape[0], weights[-1].shape[1], target.shape[2], target.shape[3]),
                     "the block's output: the input's batch, the last weight's channels")


def check_decoder_loss_backward(grad_loss, grad_output, logits, target, input) -> None:
    """decoder_block_loss_backward's own arguments, after the forward's checks."""
    check_activation(logits, "logits", input)
    check_same_shape(logits, "logits", target.shape, "the target's")
    if grad_output is not None:
        check_activation(grad_output, "grad_output", input)
        check_same_shape(grad_output, "grad_output", target.shape, "the target's")
    _check(grad_loss.dim() == 0, "cae: decoder_block_loss_backward's grad_loss must be 0-D, got sizes ",
           _sizes(grad_loss.shape))
    check_like(grad_loss, "grad_loss", target)


def check_block_grad_output(grad_output, input, expected) -> None:
    check_activation(grad_output, "grad_output", input)
    check_same_shape(grad_output, "grad_output", expected, "the block's output")


class OpChecks:
    """Every op's checks, as ``Ops<K>`` of csrc/ops.h runs them; ``kernels`` picks K for a tensor."""

    def __init__(self, kernels=kernels_by_device):
        self.kernels = kernels

    def dtype(self, input) -> None:
        k = self.kernels(input)
        if k is not None:
            _check(input.dtype in k.dtypes, "cae: the ", k.name, " kernels do not support dtype ",
                   _dtype(input.dtype), " (supported: ", k.supported, ")")

    def input(self, input, stride) -> None:
        check_activation(input, "input", input)
        self.dtype(input)
        check_stride(stride)

    def input_and_weight(self, input, stride, weight, transposed) -> None:
        self.input(input, stride)
        check_weight(weight, input, "[C_in, C_out, 3, 3]" if transposed else "[C_out, C_in, 3, 3]")
        check_input_channels(input, weight.shape[0 if transposed else 1], weight)

    def conv3x3(self, input, weight, bias, stride) -> None:
        self.input_and_weight(input, stride, weight, False)
        check_bias(bias, input, weight.shape[0])

    def conv3x3_grad_input(self, grad_output, relu_output, weight, input, stride) -> None:
        self.input_and_weight(input, stride, weight, False)
        check_activation(grad_output, "grad_output", input)
        n, _, h, w = input.shape
        check_same_shape(grad_output, "grad_output",
                         (n, weight.shape[0], conv_output_size(h, stride), conv_output_size(w, stride)),
                         "the convolution's output")
        check_relu_output(relu_output, grad_output)

    def conv3x3_grad_weight(self, grad_output, relu_output, input, stride) -> None:
        self.input(input, stride)
        check_activation(grad_output, "grad_output", input)
        n, _, h, w = input.shape
        _check(grad_output.shape[0] == n and grad_output.shape[2] == conv_output_size(h, stride)
               and grad_output.shape[3] == conv_output_size(w, stride),
               "cae: grad_output of sizes ", _sizes(grad_output.shape), " does not match a stride-", stride,
               " convolution of input of sizes ", _sizes(input.shape))
        check_relu_output(relu_output, grad_output)

    def conv_transpose3x3(self, input, weight, bias, stride) -> None:
        self.input_and_weight(input, stride, weight, True)
        check_bias(bias, input, weight.shape[1])

    def _transpose_grad_output(self, grad_output, input, channels, stride) -> None:
        check_activation(grad_output, "grad_output", input)
        n, _, h, w = input.shape
        check_same_shape(grad_output, "grad_output", (n, channels, h * stride, w * stride),
                         "the transposed convolution's output")

    def conv_transpose3x3_grad_input(self, grad_output, relu_output, weight, input, stride) -> None:
        self.input_and_weight(input, stride, weight, True)
        self._transpose_grad_output(grad_output, input, weight.shape[1], stride)
        check_relu_output(relu_output, grad_output)

    def conv_transpose3x3_grad_weight(self, grad_output, relu_output, input, stride) -> None:
        self.input(input, stride)
        check_activation(grad_output, "grad_output", input)
        self._transpose_grad_output(grad_output, input, grad_output.shape[1], stride)
        check_relu_output(relu_output, grad_output)

    def bias_grad(self, grad_output, relu_output) -> None:
        check_activation(grad_output, "grad_output", grad_output)
        self.dtype(grad_output)
        check_relu_output(relu_output, grad_output)

    def encoder_block(self, input, weights, biases) -> None:
        _check(len(weights) in (2, 3), "cae: encoder_block takes 2 weights (pool) or 3 (strided), got ",
               len(weights))
        check_block_biases("encoder_block", weights, biases)
        self.conv3x3(input, weights[0], biases[0], 1)
        channels = weights[0].shape[0]
        for i in range(1, len(weights)):
            check_weight(weights[i], input, "[C1, C1, 3, 3]")
            _check(tuple(weights[i].shape[:2]) == (channels, channels), "cae: encoder_block's weight ", i,
                   " must have sizes [", channels, ", ", channels, ", 3, 3], got ", _sizes(weights[i].shape))
            check_bias(biases[i], input, channels)

    def max_pool2x2(self, input) -> None:
        check_activation(input, "input", input)
        self.dtype(input)

    def sigmoid_cross_entropy(self, logits, target) -> None:
        self.dtype(logits)
        check_like(target, "target", logits)
        _check(target.shape == logits.shape, "cae: sigmoid_cross_entropy's target must have the logits' sizes ",
               _sizes(logits.shape), ", got ", _sizes(target.shape))

    def sigmoid_cross_entropy_backward(self, grad_loss, logits, target) -> None:
        self.sigmoid_cross_entropy(logits, target)
        _check(grad_loss.dim() == 0, "cae: sigmoid_cross_entropy_backward's grad_loss must be 0-D, got sizes ",
               _sizes(grad_loss.shape))
        check_like(grad_loss, "grad_loss", logits)

    def adam_(self, params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay) -> None:
        counts = [len(t) for t in (params, grads, exp_avgs, exp_avg_sqs, steps)]
        _check(len(set(counts)) == 1, "cae: adam_ takes one tensor per parameter in every list; got ", counts[0],
               " params, ", counts[1], " grads, ", counts[2], " exp_avgs, ", counts[3], " exp_avg_sqs and ",
               counts[4], " steps")
        _check(lr.dim() == 0 and lr.dtype == torch.float32, "cae: adam_'s lr must be a 0-D float32 tensor, got dtype ",
               _dtype(lr.dtype), " and sizes ", _sizes(lr.shape))
        _check(0 <= beta1 < 1 and 0 <= beta2 < 1, f"cae: adam_'s betas must be in [0, 1), got ({beta1:g}, {beta2:g})")
        _check(eps >= 0 and weight_decay >= 0,
               f"cae: adam_'s eps and weight_decay must be non-negative, got {eps:g} and {weight_decay:g}")
        for i, p in enumerate(params):
            _check(p.dtype == torch.float32, "cae: adam_ takes float32 parameters; params[", i, "] has dtype ",
                   _dtype(p.dtype))
            _check(p.device == lr.device, "cae: adam_'s params[", i, "] is on device ", p.device,
                   " but lr is on device ", lr.device)
            _check(is_non_overlapping_and_dense(p), "cae: adam_'s params[", i,
                   "] must be dense (non-overlapping, no gaps), got sizes ", _sizes(p.shape), " and strides ",
                   _sizes(p.stride()))
            for name, t in (("grads", grads[i]), ("exp_avgs", exp_avgs[i]), ("exp_avg_sqs", exp_avg_sqs[i])):
                _check(t.dtype == torch.float32 and t.device == p.device and t.shape == p.shape
                       and t.stride() == p.stride(),
                       "cae: adam_'s ", name, "[", i, "] must be like params[", i, "] (float32 on ", p.device,
                       ", sizes ", _sizes(p.shape), ", strides ", _sizes(p.stride()), "), got ", _dtype(t.dtype),
                       " on ", t.device, ", sizes ", _sizes(t.shape), ", strides ", _sizes(t.stride()))
            step = steps[i]
            _check(step.dim() == 0 and step.dtype == torch.float32 and step.device == p.device,
                   "cae: adam_'s steps[", i, "] must be a 0-D float32 tensor on ", p.device, ", got dtype ",
                   _dtype(step.dtype), ", sizes ", _sizes(step.shape), " on ", step.device)

    def max_pool2x2_grad_input(self, grad_output, input) -> None:
        self.max_pool2x2(input)
        check_activation(grad_output, "grad_output", input)
        n, c, h, w = input.shape
        check_same_shape(grad_output, "grad_output", (n, c, pool_output_size(h), pool_output_size(w)),
                         "the max-pool's output")
