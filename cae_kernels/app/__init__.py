"""The autoencoder application on top of the kernel library: models, data, training, the ``cae`` command.

One module per concern:

- ``models``: ``ConvAutoencoder`` (on this package's kernels or on ``torch.nn``) and ``FCAutoencoder``;
- ``data``: MNIST-format IDX files and the bundled 5,000-digit sample;
- ``rundir``: a model directory's configuration, atomic writes and the trainer's lock;
- ``checkpoints``: the last few checkpoints, verified when loaded;
- ``distributed``: data parallelism under ``torchrun``;
- ``training``: ``train``; ``evaluation``: ``load_model``, ``evaluate``, ``reconstruct``, ``encode_split``;
- ``summaries``: TensorBoard event files and the run's pictures; ``viz``: the pictures themselves;
- ``cli``: the ``cae`` command.

The kernel library (``cae_kernels``, ``cae_kernels.nn``) never imports this package.
"""

from .evaluation import build_model, encode_split, evaluate, load_model, reconstruct, resolve_device
from .models import ConvAutoencoder, FCAutoencoder
from .rundir import Config, ConfigError, RunDirBusyError
from .training import TrainResult, train

__all__ = [
    "Config",
    "ConfigError",
    "ConvAutoencoder",
    "FCAutoencoder",
    "RunDirBusyError",
    "TrainResult",
    "build_model",
    "encode_split",
    "evaluate",
    "load_model",
    "reconstruct",
    "resolve_device",
    "train",
]
