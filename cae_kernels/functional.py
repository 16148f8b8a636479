"""The public functions: ``conv3x3``, ``conv_transpose3x3`` and ``max_pool2x2``.

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

    def max_pool2x2(self, input):
        """2x2 max-pool with stride 2; odd sizes round up (7 -> 4), NaN propagates.

        Same result as ``F.max_pool2d(input, 2, ceil_mode=True)``.
        """
        return self._ops.max_pool2x2(input)


_cae = _Functions(torch.ops.cae)
conv3x3 = _cae.conv3x3
conv_transpose3x3 = _cae.conv_transpose3x3
max_pool2x2 = _cae.max_pool2x2
with_cuda = _registration.with_cuda

__all__ = ["conv3x3", "conv_transpose3x3", "max_pool2x2"]
