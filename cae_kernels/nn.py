"""``nn.Module`` layers over the public functions.

Parameters have the names and shapes of ``nn.Conv2d`` / ``nn.ConvTranspose2d``
and the same default initialization, so a ``state_dict`` moves between these
layers and PyTorch's.

Each layer calls the functions of its ``functions`` attribute: ``cae_kernels.functional``
(the built kernels) by default, or ``cae_kernels.sim`` (the CUDA kernels on the
emulator, on CPU tensors) when set so on a layer.
"""

import math

import torch
from torch import nn

from . import functional as F

__all__ = ["Conv3x3", "ConvTranspose3x3", "MaxPool2x2"]


class _Conv(nn.Module):
    _transposed = False
    functions = F

    def __init__(self, in_channels, out_channels, stride, activation, bias, device, dtype):
        super().__init__()
        F._check_stride(stride)
        F._relu_flag(activation)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.stride, self.activation = stride, activation
        shape = (in_channels, out_channels) if self._transposed else (out_channels, in_channels)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(*shape, 3, 3, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        if bias is False:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self):
        # nn.Conv2d's and nn.ConvTranspose2d's own defaults.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in, _ = nn.init._calculate_fan_in_and_fan_out(self.weight)
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def extra_repr(self):
        return (
            f"{self.in_channels}, {self.out_channels}, stride={self.stride}, "
            f"activation={self.activation!r}, bias={self.bias is not None}"
        )


class Conv3x3(_Conv):
    """3x3 convolution, padding 1, stride 1 or 2, optional fused ReLU.

    Equivalent to ``nn.Conv2d(in_channels, out_channels, 3, stride, padding=1)``
    (followed by ``nn.ReLU`` when ``activation="relu"``).
    """

    def __init__(self, in_channels, out_channels, stride=1, activation=None, bias=True,
                 device=None, dtype=None):
        super().__init__(in_channels, out_channels, stride, activation, bias, device, dtype)

    def forward(self, input):
        return self.functions.conv3x3(input, self.weight, self.bias, self.stride, self.activation)


class ConvTranspose3x3(_Conv):
    """3x3 transposed convolution that scales the size by ``stride`` (1 or 2).

    Equivalent to ``nn.ConvTranspose2d(in_channels, out_channels, 3, stride, padding=1,
    output_padding=stride - 1)`` (followed by ``nn.ReLU`` when ``activation="relu"``).
    """

    _transposed = True

    def __init__(self, in_channels, out_channels, stride=2, activation=None, bias=True,
                 device=None, dtype=None):
        super().__init__(in_channels, out_channels, stride, activation, bias, device, dtype)

    def forward(self, input):
        return self.functions.conv_transpose3x3(input, self.weight, self.bias, self.stride, self.activation)


class MaxPool2x2(nn.Module):
    """2x2 max-pool, stride 2, ceil mode: ``nn.MaxPool2d(2, ceil_mode=True)``."""

    functions = F

    def forward(self, input):
        return self.functions.max_pool2x2(input)
