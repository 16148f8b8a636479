"""The autoencoders of "Convolutional Autoencoder as TensorFlow estimator", in PyTorch.

``ConvAutoencoder`` runs on this package's kernels (``backend="cae"``) or on the
equivalent ``torch.nn`` layers (``backend="torch"``).  Both backends build their
layers from the same list of layer specifications, so parameter names and shapes
are identical: a ``state_dict`` saved with one loads into the other, and the two
give the same outputs up to float rounding.  ``backend="sim"`` is the ``cae`` layers
on the CUDA kernels run by the emulator (``cae_kernels.sim``: CPU tensors, slow, for
tiny batches), which counts their launches (``scripts/count_launches.py``).

Every layer is described once, by a ``LayerSpec``.  ``layer_shapes()`` derives the
input, weight and output shapes of each layer by tracing one forward pass, so
benchmarks and docs never retype them.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import nn as cae_nn

__all__ = [
    "BACKENDS",
    "ConvAutoencoder",
    "FCAutoencoder",
    "LayerShape",
    "LayerSpec",
    "he_init_",
]

BACKENDS = ("cae", "torch", "sim")
DOWNSAMPLE = ("pool", "stride")
ACTIVATIONS = ("relu", None)

# Standard deviation of a standard normal truncated to [-2, 2]; dividing by it keeps
# the variance of the truncated draw at the He target 2 / fan_in (as TF's
# VarianceScaling(scale=2.0, mode="fan_in", distribution="truncated_normal") does).
_TRUNCATED_NORMAL_STD = 0.87962566103423978


class LayerSpec(NamedTuple):
    """What one layer computes; both backends build their layer from it."""

    op: str  # "conv3x3" | "conv_transpose3x3" | "max_pool2x2" | "linear"
    in_channels: int
    out_channels: int
    stride: int = 1
    activation: str | None = None


class LayerShape(NamedTuple):
    """One layer's shapes for a given batch size, as run by the model."""

    name: str
    op: str
    input_shape: tuple[int, ...]
    weight_shape: tuple[int, ...] | None
    stride: int | None
    activation: str | None
    output_shape: tuple[int, ...]


def he_init_(weight: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """He (variance scaling, fan-in, scale 2.0) truncated-normal init, in place.

    fan_in is ``weight.shape[1] * receptive field``: in_features for ``Linear``,
    in_channels*9 for a 3x3 conv, and for a transposed conv (weight ``[in, out, 3, 3]``)
    out_channels*9 -- the same number TF computes for its ``[3, 3, out, in]`` kernel.
    """
    fan_in = weight.shape[1] * weight[0][0].numel()
    std = math.sqrt(2.0 / fan_in) / _TRUNCATED_NORMAL_STD
    with torch.no_grad():
        return nn.init.trunc_normal_(weight, 0.0, std, -2.0 * std, 2.0 * std, generator=generator)


# --- torch.nn versions of the layers (backend="torch") ------------------------------------


def _apply_activation(x: torch.Tensor, activation: str | None) -> torch.Tensor:
    return F.relu(x) if activation == "relu" else x


class _TorchConv3x3(nn.Conv2d):
    """``nn.Conv2d(k=3, padding=1)`` with the activation fused in, like ``cae_kernels.nn.Conv3x3``."""

    def __init__(self, in_channels, out_channels, stride=1, activation=None, bias=True):
        super().__init__(in_channels, out_channels, 3, stride=stride, padding=1, bias=bias)
        self.activation = activation

    def forward(self, x):
        return _apply_activation(super().forward(x), self.activation)


class _TorchConvTranspose3x3(nn.ConvTranspose2d):
    """``nn.ConvTranspose2d(k=3, padding=1, output_padding=stride-1)`` (+activation)."""

    def __init__(self, in_channels, out_channels, stride=2, activation=None, bias=True):
        super().__init__(in_channels, out_channels, 3, stride=stride, padding=1,
                         output_padding=stride - 1, bias=bias)
        self.activation = activation

    def forward(self, x):
        return _apply_activation(super().forward(x), self.activation)


class _TorchLinear(nn.Linear):
    def __init__(self, in_features, out_features, activation=None):
        super().__init__(in_features, out_features)
        self.activation = activation

    def forward(self, x):
        return _apply_activation(super().forward(x), self.activation)


def _to_memory_format(x: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    """``x`` with the canonical strides of ``memory_format``.

    ``x.contiguous(memory_format=...)`` is not enough: with one channel (the images) a
    tensor is contiguous in both layouts and keeps its NCHW strides, and kernels read
    the layout from the strides, so the whole network would run NCHW.
    """
    if x.stride() == torch.empty(x.shape, device="meta", memory_format=memory_format).stride():
        return x
    return torch.empty_like(x, memory_format=memory_format).copy_(x)


def _build_layer(spec: LayerSpec, backend: str) -> nn.Module:
    if spec.op == "linear":
        return _TorchLinear(spec.in_channels, spec.out_channels, spec.activation)
    if backend == "torch":
        if spec.op == "conv3x3":
            return _TorchConv3x3(spec.in_channels, spec.out_channels, spec.stride, spec.activation)
        if spec.op == "conv_transpose3x3":
            return _TorchConvTranspose3x3(spec.in_channels, spec.out_channels, spec.stride,
                                          spec.activation)
        if spec.op == "max_pool2x2":
            return nn.MaxPool2d(2, ceil_mode=True)
    elif backend in ("cae", "sim"):
        layer = None
        if spec.op == "conv3x3":
            layer = cae_nn.Conv3x3(spec.in_channels, spec.out_channels, stride=spec.stride,
                                   activation=spec.activation)
        elif spec.op == "conv_transpose3x3":
            layer = cae_nn.ConvTranspose3x3(spec.in_channels, spec.out_channels, stride=spec.stride,
                                            activation=spec.activation)
        elif spec.op == "max_pool2x2":
            layer = cae_nn.MaxPool2x2()
        if layer is not None:
            if backend == "sim":
                from .. import sim  # the first use builds the emulated kernels (minutes)

                layer.functions = sim
            return layer
    raise ValueError(f"no {spec.op!r} layer for backend {backend!r}")


# --- the models ----------------------------------------------------------------------------


class _Autoencoder(nn.Module):
    """Shared machinery: layers built from specs, He init, shape tracing."""

    encoder: nn.Sequential
    decoder: nn.Sequential

    def _build(self, encoder: Sequence[tuple[str, LayerSpec]], decoder: Sequence[tuple[str, LayerSpec]],
               backend: str, dropout: float | None = None) -> None:
        # Draw the init seed before any layer exists: layer constructors consume the global
        # RNG differently per backend, and both backends must start from the same weights.
        init_seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        self._specs: dict[str, LayerSpec] = {}
        for part, specs in (("encoder", encoder), ("decoder", decoder)):
            layers = OrderedDict()
            for index, (name, spec) in enumerate(specs):
                layers[name] = _build_layer(spec, backend)
                self._specs[f"{part}.{name}"] = spec
                last_decoder_layer = part == "decoder" and index == len(specs) - 1
                if dropout and not last_decoder_layer:
                    layers[f"{name}_dropout"] = nn.Dropout(dropout)
            setattr(self, part, nn.Sequential(layers))
        self.reset_parameters(torch.Generator().manual_seed(init_seed))

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """He-initialize every weight (truncated normal, fan-in, scale 2) and zero every bias."""
        for name in self._specs:
            layer = self.get_submodule(name)
            if getattr(layer, "weight", None) is not None:
                he_init_(layer.weight, generator)
            if getattr(layer, "bias", None) is not None:
                with torch.no_grad():
                    layer.bias.zero_()

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch's ``(loss, rmse)``: the mean binary cross-entropy of ``logits`` against
        ``target`` (differentiable) and the RMSE of their sigmoid (a metric)."""
        loss = F.binary_cross_entropy_with_logits(logits, target)
        with torch.no_grad():
            return loss, (torch.sigmoid(logits) - target).square().mean().sqrt()

    def forward_loss(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(logits, loss, rmse)`` of a batch: ``forward`` then ``loss``, where a model
        fuses the two (ConvAutoencoder's decoder block computes the loss of its output)."""
        logits = self(x)
        return logits, *self.loss(logits, target)

    def weights(self) -> list[nn.Parameter]:
        """The parameters that weight decay applies to: all weights, no biases."""
        return [p for name, p in self.named_parameters() if name.endswith("weight")]

    def _example_input(self) -> torch.Tensor:
        raise NotImplementedError

    def layer_shapes(self, batch_size: int = 1) -> list[LayerShape]:
        """Each layer's op, input/weight/output shape, stride and activation for ``batch_size``.

        Traced from one forward pass of a single example, so the shapes are exactly what
        the model runs.
        """
        seen: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        handles = []
        for name in self._specs:
            def hook(module, args, output, name=name):
                seen[name] = (tuple(args[0].shape), tuple(output.shape))
            handles.append(self.get_submodule(name).register_forward_hook(hook))
        was_training = self.training
        try:
            self.eval()
            with torch.no_grad():
                self(self._example_input())
        finally:
            self.train(was_training)
            for handle in handles:
                handle.remove()

        shapes = []
        for name, spec in self._specs.items():
            in_shape, out_shape = seen[name]
            weight = getattr(self.get_submodule(name), "weight", None)
            shapes.append(LayerShape(
                name=name,
                op=spec.op,
                input_shape=(batch_size, *in_shape[1:]),
                weight_shape=tuple(weight.shape) if weight is not None else None,
                stride=spec.stride if spec.op != "linear" else None,
                activation=spec.activation,
                output_shape=(batch_size, *out_shape[1:]),
            ))
        return shapes


class ConvAutoencoder(_Autoencoder):
    """The convolutional autoencoder of the blog post (7,873 parameters at the defaults).

    Encoder: for each entry of ``filters``, two 3x3 convolutions (padding 1, bias, ReLU),
    then a 2x2 max-pool with ceil mode (``downsample="pool"``) or a stride-2 3x3
    convolution (``downsample="stride"``): 28 -> 14 -> 7 -> 4.  Decoder: for the filters
    reversed, a stride-2 3x3 transposed convolution (bias, ReLU): 4 -> 8 -> 16 -> 32, then
    a linear stride-1 3x3 transposed convolution to ``in_channels``, center-cropped to the
    image size.  ``forward`` returns logits; apply ``torch.sigmoid`` for pixel values.

    ``fused`` (backends "cae" and "sim"): run each encoder block and the decoder as one op
    (``encoder_block``, ``decoder_block``), whose backward recomputes a block's inner
    activations from its input, so a training step keeps a fraction of the per-op path's
    activations; None (the default) fuses on CUDA and on the emulated CUDA kernels, not on
    the CPU kernels (see ``uses_fused_blocks``). The blocks read the layers' own
    parameters: names, ``state_dict`` and results are the per-op path's.
    """

    def __init__(self, filters: Sequence[int] = (16, 8, 8), downsample: str = "pool",
                 activation: str | None = "relu", backend: str = "cae",
                 memory_format: torch.memory_format = torch.contiguous_format,
                 in_channels: int = 1, image_size: tuple[int, int] = (28, 28), fused: bool | None = None):
        super().__init__()
        filters = tuple(int(f) for f in filters)
        if not filters or min(filters) < 1:
            raise ValueError(f"filters must be one or more positive channel counts, got {filters}")
        if downsample not in DOWNSAMPLE:
            raise ValueError(f"downsample must be one of {DOWNSAMPLE}, got {downsample!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if fused not in (None, True, False):
            raise ValueError(f"fused must be None, True or False, got {fused!r}")
        if fused and backend == "torch":
            raise ValueError("fused blocks are this package's ops: backend 'cae' or 'sim', not 'torch'")
        if memory_format not in (torch.contiguous_format, torch.channels_last):
            raise ValueError(f"memory_format must be torch.contiguous_format or torch.channels_last, "
                             f"got {memory_format}")
        self.filters = filters
        self.downsample = downsample
        self.activation = activation
        self.backend = backend
        self.memory_format = memory_format
        self.in_channels = in_channels
        self.image_size = tuple(image_size)
        self.fused = fused

        encoder, channels = [], in_channels
        for level, f in enumerate(filters, 1):
            encoder.append((f"conv{level}_1", LayerSpec("conv3x3", channels, f, 1, activation)))
            encoder.append((f"conv{level}_2", LayerSpec("conv3x3", f, f, 1, activation)))
            if downsample == "pool":
                encoder.append((f"down{level}", LayerSpec("max_pool2x2", f, f, 2)))
            else:
                encoder.append((f"down{level}", LayerSpec("conv3x3", f, f, 2, activation)))
            channels = f
        decoder = []
        for level, f in enumerate(reversed(filters), 1):
            decoder.append((f"deconv{level}", LayerSpec("conv_transpose3x3", channels, f, 2, activation)))
            channels = f
        decoder.append(("output", LayerSpec("conv_transpose3x3", channels, in_channels, 1, None)))
        self._build(encoder, decoder, backend)

    def _example_input(self):
        p = next(self.parameters())
        return torch.zeros(1, self.in_channels, *self.image_size, device=p.device, dtype=p.dtype)

    def uses_fused_blocks(self, x: torch.Tensor) -> bool:
        """Whether the forward of ``x`` runs the fused block ops (``encoder_block``,
        ``decoder_block``: one op per block, the backward recomputing each block's inside)
        instead of one op per layer: ``fused`` where set; by default on CUDA tensors with
        backend "cae", always with "sim" (the CUDA kernels, emulated: it runs what CUDA
        runs), never on the CPU kernels."""
        if self.fused is not None:
            return self.fused
        return self.backend == "sim" or (self.backend == "cae" and x.is_cuda)

    def _blocks(self, part: str, names: Sequence[str]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        layers = [self.get_submodule(f"{part}.{name}") for name in names]
        return [layer.weight for layer in layers], [layer.bias for layer in layers]

    def _decoder_params(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The decoder block's weights and biases: its layers' own."""
        names = [f"deconv{level}" for level in range(1, len(self.filters) + 1)] + ["output"]
        return self._blocks("decoder", names)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images [N, C, H, W] -> codes [N, filters[-1], h, w] (4x4x8 = 128 values at the defaults)."""
        x = _to_memory_format(x, self.memory_format)
        if not self.uses_fused_blocks(x):
            return self.encoder(x)
        for level in range(1, len(self.filters) + 1):
            names = [f"conv{level}_1", f"conv{level}_2"] + ([f"down{level}"] if self.downsample == "stride" else [])
            weights, biases = self._blocks("encoder", names)
            x = self.get_submodule(f"encoder.{names[0]}").functions.encoder_block(x, weights, biases, self.activation)
        return x

    def decode(self, code: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Codes -> logits [N, C, *size] (``size`` defaults to ``image_size``)."""
        code = _to_memory_format(code, self.memory_format)
        height, width = size if size is not None else self.image_size
        scale = 2 ** len(self.filters)
        full = (code.shape[-2] * scale, code.shape[-1] * scale)
        if full[0] < height or full[1] < width:
            raise ValueError(f"decoder output {full} is smaller than the image size {(height, width)}")
        if self.uses_fused_blocks(code):
            weights, biases = self._decoder_params()
            out = self.functions.decoder_block(code, weights, biases, (height, width), self.activation)
            return _to_memory_format(out, self.memory_format)
        out = self.decoder(code)
        top, left = (out.shape[-2] - height) // 2, (out.shape[-1] - width) // 2
        return _to_memory_format(out[..., top:top + height, left:left + width], self.memory_format)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x), size=tuple(x.shape[-2:]))

    def forward_loss(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # On the fused blocks the decoder's op computes the loss of the logits it stores
        # (``decoder_block_loss``: on CUDA no launch of its own, forward or backward).
        # It crops its output to the target's size, so a target unlike x is refused here,
        # on every path alike.
        if target.shape != x.shape:
            raise ValueError(f"target has shape {tuple(target.shape)}, the input {tuple(x.shape)}: they must match")
        if not self.uses_fused_blocks(x):
            return super().forward_loss(x, target)
        weights, biases = self._decoder_params()
        code = _to_memory_format(self.encode(x), self.memory_format)
        target = _to_memory_format(target, self.memory_format)
        logits, loss, rmse = self.functions.decoder_block_loss(code, weights, biases, target, self.activation)
        return _to_memory_format(logits, self.memory_format), loss, rmse

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # This package's loss op on its backends: on CUDA one kernel for both, one for
        # the gradient, instead of a dozen small ones.
        if self.backend == "torch":
            return super().loss(logits, target)
        return self.functions.sigmoid_cross_entropy(logits, target)

    @property
    def functions(self):
        """The op functions the layers call (backends "cae" and "sim"): ``cae_kernels`` or
        ``cae_kernels.sim``."""
        return self.decoder.output.functions

    def layer_shapes(self, batch_size: int = 1) -> list[LayerShape]:
        # Traced layer by layer (each layer's hook must run): the per-op path, whose
        # shapes the blocks share.
        fused, self.fused = self.fused, False
        try:
            return super().layer_shapes(batch_size)
        finally:
            self.fused = fused

    def extra_repr(self) -> str:
        return (f"filters={self.filters}, downsample={self.downsample!r}, backend={self.backend!r}, "
                f"memory_format={self.memory_format}, fused={self.fused}")


class FCAutoencoder(_Autoencoder):
    """The fully-connected autoencoder of the first blog post (222,384 parameters at the defaults).

    784 -> 128 -> 64 -> 32 -> 64 -> 128 -> 784 with ReLU and a linear last layer.  With
    ``dropout=p`` every hidden layer's output is dropped with probability ``p`` while
    training.  (The original's ``--dropout`` was the *keep* probability: its 0.8 is p=0.2.)
    Takes [N, 1, 28, 28] or [N, 784] and returns logits in the input's shape.
    """

    def __init__(self, hidden: Sequence[int] = (128, 64, 32), dropout: float | None = None,
                 in_features: int = 784):
        super().__init__()
        hidden = tuple(int(h) for h in hidden)
        if not hidden or min(hidden) < 1:
            raise ValueError(f"hidden must be one or more positive layer sizes, got {hidden}")
        if dropout is not None and not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout is the probability of dropping a unit, in [0, 1); got {dropout}")
        self.hidden = hidden
        self.dropout = dropout
        self.in_features = in_features
        sizes = (in_features, *hidden)
        encoder = [(f"fc{i}", LayerSpec("linear", a, b, activation="relu"))
                   for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True), 1)]
        back = sizes[::-1]
        decoder = [(f"fc{i}", LayerSpec("linear", a, b, activation="relu" if i < len(hidden) else None))
                   for i, (a, b) in enumerate(zip(back[:-1], back[1:], strict=True), 1)]
        self._build(encoder, decoder, "torch", dropout)

    def _example_input(self):
        p = next(self.parameters())
        return torch.zeros(1, self.in_features, device=p.device, dtype=p.dtype)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x.reshape(x.shape[0], -1))

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        return self.decoder(code)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x)).reshape(x.shape)
