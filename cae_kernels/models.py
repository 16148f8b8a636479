"""The autoencoders, kept importable here: they live in ``cae_kernels.app.models``.

Importing this module imports the application package (``cae_kernels.app``); the kernel
library itself (``cae_kernels``, ``cae_kernels.nn``) does not.
"""

from .app.models import BACKENDS, ConvAutoencoder, FCAutoencoder, LayerShape, LayerSpec, he_init_

__all__ = ["BACKENDS", "ConvAutoencoder", "FCAutoencoder", "LayerShape", "LayerSpec", "he_init_"]
