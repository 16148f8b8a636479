"""cae_kernels: hand-written CPU and CUDA kernels for a convolutional autoencoder.

The ops are registered as ``torch.ops.cae.*``; use them through the functions
below or the layers of ``cae_kernels.nn``.
"""

from . import nn, optim
from ._registration import cpu_capabilities, cpu_capability, set_cpu_capability
from .functional import (
    adam_,
    conv3x3,
    conv_transpose3x3,
    decoder_block,
    decoder_block_loss,
    encoder_block,
    max_pool2x2,
    sigmoid_cross_entropy,
    with_cuda,
)

# The one place the version is written: pyproject.toml reads this literal (without importing).
__version__ = "0.1.0"
__all__ = [
    "conv3x3",
    "conv_transpose3x3",
    "max_pool2x2",
    "encoder_block",
    "decoder_block",
    "decoder_block_loss",
    "sigmoid_cross_entropy",
    "adam_",
    "nn",
    "optim",
    "with_cuda",
    "cpu_capability",
    "cpu_capabilities",
    "set_cpu_capability",
    "__version__",
]
