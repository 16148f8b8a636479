#!/usr/bin/env python3
"""How many bytes a training step keeps for its backward pass, per model and backend.

Runs the forward and the loss of the convolutional autoencoder as training does
(``model.forward_loss``: on the fused blocks the decoder and the loss are one op) under
``torch.autograd.graph.saved_tensors_hooks`` and sums the storage of every tensor autograd
saves (each storage once: a tensor saved by two nodes, or a view of a saved tensor, is
counted once), then prints per model, layout and backend::

    pool NHWC cae:   saved for backward per step: 25.7 MB at batch 256 (...)

``cae`` is this package's per-op path (each layer saves what its backward reads),
``cae-fused`` its fused blocks (each block saves its input, the strided block its output
too: the next block's input; the backward recomputes the rest), ``torch`` the same model on
``torch.nn`` layers. The fused step's target: at most a quarter of the per-op path's. No
GPU needed: what is saved does not depend on the device.
"""

import argparse
import sys

import torch
import torch.nn.functional as F

from cae_kernels.app.models import ConvAutoencoder

VARIANTS = ("pool", "stride")
LAYOUTS = {"NCHW": torch.contiguous_format, "NHWC": torch.channels_last}


def saved_bytes(model, x, target):
    """Bytes of the distinct storages autograd saves for the backward of ``model``'s loss
    (``forward_loss``, as training computes it; a module without one: the binary
    cross-entropy of its output)."""
    forward_loss = getattr(model, "forward_loss", None)
    if forward_loss is None:
        def forward_loss(x, target):
            return F.binary_cross_entropy_with_logits(model(x), target)

    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward_loss(x, target)
    return sum(storages.values())


# What each printed name runs: the backend and whether on the fused blocks.
PATHS = {"cae": ("cae", False), "cae-fused": ("cae", True), "torch": ("torch", None)}


def measure(downsample, backend, memory_format, batch_size, seed=0, fused=None):
    torch.manual_seed(seed)
    model = ConvAutoencoder(downsample=downsample, backend=backend, memory_format=memory_format, fused=fused)
    x = torch.rand(batch_size, 1, 28, 28)
    return saved_bytes(model, x, x)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--model", choices=VARIANTS, action="append", help="default: both")
    args = parser.parse_args(argv)
    for downsample in args.model or VARIANTS:
        for layout, memory_format in LAYOUTS.items():
            sizes = {name: measure(downsample, backend, memory_format, args.batch_size, fused=fused)
                     for name, (backend, fused) in PATHS.items()}
            for name, size in sizes.items():
                versus = (f"{size / sizes['cae']:.2f} of the per-op path's" if name == "cae-fused"
                          else f"{size / sizes['torch']:.2f} of torch.nn's")
                print(f"{downsample} {layout} {name}: saved for backward per step: {size / 1e6:.1f} MB "
                      f"at batch {args.batch_size} ({versus})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
