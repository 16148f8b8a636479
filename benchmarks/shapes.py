"""The layer shapes the benchmarks run, derived from the models (never typed twice)."""

from typing import NamedTuple

from cae_kernels.models import ConvAutoencoder


class OpCase(NamedTuple):
    op: str  # "conv3x3" | "conv_transpose3x3" | "max_pool2x2"
    input_shape: tuple  # (N, C, H, W)
    weight_shape: tuple | None
    stride: int | None
    activation: str | None
    output_shape: tuple

    @property
    def id(self):
        n, c, h, w = self.input_shape
        if self.op == "max_pool2x2":
            return f"pool-{c}x{h}x{w}"
        kind = "conv" if self.op == "conv3x3" else "convT"
        act = "-relu" if self.activation else ""
        return f"{kind}-s{self.stride}-{c}to{self.output_shape[1]}-{h}x{w}{act}"

    def flops(self, backward):
        """Floating-point work: 2 per multiply-add over every tap of the 3x3 window
        (the zero padding included, as convolution FLOP counts usually are); the input
        and weight gradients each cost as much as the forward. Max-pool: one compare
        per input element read."""
        if self.op == "max_pool2x2":
            n, c, h, w = self.output_shape
            return n * c * h * w * 4 * (2 if backward else 1)
        small = self.output_shape if self.op == "conv3x3" else self.input_shape
        c_big = self.input_shape[1] if self.op == "conv3x3" else self.output_shape[1]
        n, c_small, h, w = small
        forward = 2 * n * c_small * h * w * c_big * 9
        return forward * (3 if backward else 1)

    def min_bytes(self, backward, itemsize):
        """The fewest bytes the op must move: read its inputs and parameters, write its
        outputs; the backward also reads grad_output, the saved input (and output for the
        ReLU mask) and writes the gradients."""
        numel = lambda shape: 1 if shape is None else __import__("math").prod(shape)  # noqa: E731
        x, y, w = numel(self.input_shape), numel(self.output_shape), numel(self.weight_shape)
        w = w if self.weight_shape else 0
        forward = x + w + y
        if not backward:
            return forward * itemsize
        relu = y if self.activation else 0
        return (forward + y + x + relu + x + w) * itemsize


def op_cases(batch_size):
    """Each distinct (op, shape, stride) the conv autoencoder's pool and stride variants
    run, in network order."""
    cases = {}
    for downsample in ("pool", "stride"):
        for layer in ConvAutoencoder(downsample=downsample).layer_shapes(batch_size):
            case = OpCase(layer.op, layer.input_shape, layer.weight_shape, layer.stride,
                          layer.activation, layer.output_shape)
            cases.setdefault((case.op, case.input_shape, case.weight_shape, case.stride), case)
    return list(cases.values())
