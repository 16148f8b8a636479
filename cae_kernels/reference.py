"""The ops computed by ``torch.nn.functional``, with the signatures of ``cae_kernels``'s.

The tests check every backend's kernels against these in float64; the benchmarks
time them (in float32, oneDNN on the CPU, cuDNN on a GPU) as PyTorch's side.
"""

import torch.nn.functional as F


def _activate(y, activation):
    return F.relu(y) if activation == "relu" else y


def conv3x3(input, weight, bias=None, stride=1, activation=None):
    """``cae_kernels.conv3x3``: 3x3 convolution, padding 1, then the activation."""
    return _activate(F.conv2d(input, weight, bias, stride, 1), activation)


def conv_transpose3x3(input, weight, bias=None, stride=2, activation=None):
    """``cae_kernels.conv_transpose3x3``: the output is ``stride`` times the input size."""
    return _activate(F.conv_transpose2d(input, weight, bias, stride, 1, stride - 1), activation)


def max_pool2x2(input):
    """``cae_kernels.max_pool2x2``: odd sizes round up (a last partial window)."""
    return F.max_pool2d(input, 2, ceil_mode=True)
