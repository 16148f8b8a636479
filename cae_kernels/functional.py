"""The public functions: ``conv3x3``, ``conv_transpose3x3``, ``max_pool2x2``, the
blocks that chain them, ``encoder_block`` and ``decoder_block``, and the
autoencoder's loss, ``sigmoid_cross_entropy``, and its optimizer's step, ``adam_``.

Each is one registered op (``torch.ops.cae.*``) with its own backward ops, so
it works under autograd, ``torch.compile`` and ``torch.library.opcheck``.
"""

import torch

from . import _registration

_ACTIVATIONS = (None, "relu")


def _relu_flag(activation):
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be None or 'relu', got {activation!r}")
    return activation == "relu"


def _check_stride(stride):
    if isinstance(stride, bool) or stride not in (1, 2):
        raise ValueError(f"stride must be 1 or 2, got {stride!r}")
    return int(stride)


class _Functions:
    """The public functions over one op namespace: ``cae`` (the built kernels) or
    ``cae_sim`` (the CUDA kernels run by the emulator, see ``cae_kernels.sim``)."""

    def __init__(self, ops):
        self._ops = ops

    def conv3x3(self, input, weight, bias=None, stride=1, activation=None):
        """3x3 convolution with padding 1, optionally fused with bias and ReLU.

        Same result as ``F.conv2d(input, weight, bias, stride, padding=1)``, then
        ReLU when ``activation="relu"``.

        Args:
            input: ``[N, C_in, H, W]``, NCHW or channels_last.
            weight: ``[C_out, C_in, 3, 3]``.
            bias: ``[C_out]`` or None.
            stride: 1 or 2; the output is ``ceil(H / stride) x ceil(W / stride)``.
            activation: None or ``"relu"``.
        Returns:
            ``[N, C_out, H_out, W_out]`` in the input's memory format.
        """
        return self._ops.conv3x3(input, weight, bias, _check_stride(stride), _relu_flag(activation))

    def conv_transpose3x3(self, input, weight, bias=None, stride=2, activation=None):
        """3x3 transposed convolution whose output is ``stride`` times the input size.

        Same result as ``F.conv_transpose2d(input, weight, bias, stride, padding=1,
        output_padding=stride - 1)``, then ReLU when ``activation="relu"``.

        Args:
            input: ``[N, C_in, H, W]``, NCHW or channels_last.
            weight: ``[C_in, C_out, 3, 3]`` (the layout of ``nn.ConvTranspose2d``).
            bias: ``[C_out]`` or None.
            stride: 1 or 2.
            activation: None or ``"relu"``.
        Returns:
            ``[N, C_out, stride * H, stride * W]`` in the input's memory format.
        """
        return self._ops.conv_transpose3x3(
            input, weight, bias, _check_stride(stride), _relu_flag(activation)
        )

    def encoder_block(self, input, weights, biases, activation="relu"):
        """An encoder block in one op: two 3x3 convolutions (stride 1, bias, activation),
        then a 2x2 max-pool, or with a third weight a stride-2 convolution (bias,
        activation).

        Same result as ``max_pool2x2(conv3x3(conv3x3(x, w1, b1, 1, act), w2, b2, 1, act))``
        or ``conv3x3(..., w_down, b_down, 2, act)``. Its backward recomputes the inner
        activations from ``input`` instead of keeping them: autograd saves the input and,
        for the pool, each window's winner (a byte a window: a2 is then not recomputed
        on CUDA), for the strided block with ReLU the output, its mask.

        Args:
            input: ``[N, C0, H, W]``, NCHW or channels_last.
            weights: ``[w1, w2]`` or ``[w1, w2, w_down]``, ``[C1, C0, 3, 3]``, ``[C1, C1, 3, 3]``, ...
            biases: one ``[C1]`` per weight.
            activation: None or ``"relu"``, for every convolution.
        Returns:
            ``[N, C1, ceil(H / 2), ceil(W / 2)]`` in the input's memory format.
        """
        return self._ops.encoder_block(input, list(weights), list(biases), _relu_flag(activation))[0]

    def decoder_block(self, input, weights, biases, output_size, activation="relu"):
        """A decoder block in one op: every weight but the last a stride-2 3x3 transposed
        convolution (bias, activation), the last a linear stride-1 one, the result
        center-cropped to ``output_size`` (top row ``(H - h) // 2``, likewise the left
        column). The backward recomputes the inner activations from ``input``.

        Args:
            input: ``[N, C0, H, W]``, NCHW or channels_last.
            weights: ``[C_in, C_out, 3, 3]`` each (``nn.ConvTranspose2d``'s layout).
            biases: one ``[C_out]`` per weight.
            output_size: ``(h, w)``, at most the last convolution's output size.
            activation: None or ``"relu"``, for every transposed convolution but the last.
        Returns:
            ``[N, C_out, h, w]`` in the input's memory format.
        """
        output_size = list(output_size)
        if len(output_size) != 2 or any(isinstance(s, bool) or not isinstance(s, int | torch.SymInt)
                                        for s in output_size):
            raise ValueError(f"output_size must be two ints (h, w), got {output_size!r}")
        return self._ops.decoder_block(input, list(weights), list(biases), _relu_flag(activation), output_size)

    def decoder_block_loss(self, input, weights, biases, target, activation="relu"):
        """``decoder_block`` and ``sigmoid_cross_entropy`` of its output in one op:
        ``(logits, loss, rmse)``, the crop given by ``target``'s size.

        On CUDA the block's kernel computes the loss of the logits it stores, and the
        backward's kernel the loss's gradient: the loss takes no launches of its own.
        ``loss`` and ``rmse`` (and ``target``) are in the block's accumulation dtype:
        float32 for float16 and bfloat16 (under autocast the block runs in the lower
        precision and the target is cast to float32), else the input's. ``loss`` is
        differentiable in the block's arguments, the target and the logits' own uses;
        ``rmse`` is a metric.

        Args:
            input, weights, biases, activation: as ``decoder_block``.
            target: ``[N, C_out, h, w]``, ``h, w`` at most the last convolution's output size.
        Returns:
            logits ``[N, C_out, h, w]`` in the input's memory format, loss and rmse 0-d.
        """
        return self._ops.decoder_block_loss(input, list(weights), list(biases), _relu_flag(activation), target)

    def max_pool2x2(self, input):
        """2x2 max-pool with stride 2; odd sizes round up (7 -> 4), NaN propagates.

        Same result as ``F.max_pool2d(input, 2, ceil_mode=True)``.
        """
        return self._ops.max_pool2x2(input)

    def sigmoid_cross_entropy(self, logits, target):
        """The autoencoder's loss and its metric in one pass: ``(loss, rmse)``, 0-d.

        ``loss`` is ``F.binary_cross_entropy_with_logits(logits, target)`` (the mean over
        every element), differentiable in both; ``rmse`` is
        ``(sigmoid(logits) - target).square().mean().sqrt()``, not differentiable. On
        CUDA one kernel computes both, and one the logits' gradient. Under autocast
        both run in float32, as PyTorch's loss does.
        """
        return self._ops.sigmoid_cross_entropy(logits, target)

    def adam_(self, params, grads, exp_avgs, exp_avg_sqs, steps, lr, betas=(0.9, 0.999), eps=1e-8,
              weight_decay=0.0):
        """One step of Adam over lists of float32 tensors, in place; returns the gradients' 2-norm.

        The update of ``torch.optim.Adam`` (amsgrad and maximize off; ``weight_decay`` added to
        the gradient): each ``steps[i]`` (a 0-d float32 tensor on the parameters' device) is
        incremented first, then ``params[i]``, ``exp_avgs[i]`` and ``exp_avg_sqs[i]`` updated
        from ``grads[i]`` (each strided as its parameter). The result is the 2-norm of all the
        gradients as read (``torch.nn.utils.get_total_norm(grads)``), 0-d. ``lr`` is a 0-d
        float32 tensor on the same device, read there (a schedule may fill it in place, as in
        a captured CUDA graph). On CUDA the whole step is one kernel launch (up to 32
        tensors), where PyTorch's fused Adam and norm take about five; elsewhere ATen's fused
        Adam runs. ``cae_kernels.optim.Adam`` is the optimizer built on it.
        """
        beta1, beta2 = betas
        return self._ops.adam_(list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(steps), lr,
                               float(beta1), float(beta2), float(eps), float(weight_decay))


_cae = _Functions(torch.ops.cae)
conv3x3 = _cae.conv3x3
conv_transpose3x3 = _cae.conv_transpose3x3
max_pool2x2 = _cae.max_pool2x2
encoder_block = _cae.encoder_block
decoder_block = _cae.decoder_block
decoder_block_loss = _cae.decoder_block_loss
sigmoid_cross_entropy = _cae.sigmoid_cross_entropy
adam_ = _cae.adam_
with_cuda = _registration.with_cuda

__all__ = ["adam_", "conv3x3", "conv_transpose3x3", "decoder_block", "decoder_block_loss", "encoder_block",
           "max_pool2x2",
           "sigmoid_cross_entropy"]
