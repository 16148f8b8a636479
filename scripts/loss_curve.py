#!/usr/bin/env python3
"""The training loss of the conv autoencoder on this package's kernels against PyTorch's.

Trains the same model from the same weights on the same batches (the bundled digits,
Adam and weight decay as ``cae train``) once per path -- ``torch`` (``torch.nn`` layers),
``cae`` (one op per layer) and ``cae-fused`` (the block ops) -- and prints how far each
loss curve strays from PyTorch's::

    cae-fused: 1000 steps, loss 0.6931 -> 0.1002 (torch 0.1003); largest |loss - torch's| / torch's: 2.1e-04 at step 812

The paths compute the same float32 sums in different orders, so their losses differ by
rounding from the first step and the difference grows as training amplifies it: the
check is a tolerance on the relative difference (``--tolerance``, default 1e-2), not
equality. ``--device cuda`` checks the CUDA kernels (exact float32 path: TF32 off for
every path).
"""

import argparse
import sys

import torch

from cae_kernels.app import data
from cae_kernels.app import training as train

PATHS = {"torch": ("torch", None), "cae": ("cae", False), "cae-fused": ("cae", True)}


def losses(path, args, device):
    backend, fused = PATHS[path]
    config = train.Config(model="conv", downsample=args.model, backend=backend, batch_size=args.batch_size)
    torch.manual_seed(args.seed)  # the init seed: the same weights on every path
    model = train.build_model(config).to(device)
    if fused is not None:
        model.fused = fused
    optimizer = train._adam(model, config.learning_rate, device)  # as the trainer: ours on our kernels
    weights = [p for name, p in model.named_parameters() if name.endswith("weight")]
    images = data.load_data().train.images
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed))
    curve = []
    for step in range(args.steps):
        index = order[torch.arange(step * args.batch_size, (step + 1) * args.batch_size) % len(images)]
        x = (images[index].to(torch.float32) / 255.0).reshape(-1, 1, 28, 28).to(device)
        loss, *_ = train._train_step(model, optimizer, weights, x, x, config.weight_decay)
        curve.append(loss)
    return torch.stack(curve).double().cpu()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--model", choices=("pool", "stride"), default="pool")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tolerance", type=float, default=1e-2,
                        help="largest relative difference from PyTorch's loss allowed at any step")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cudnn.allow_tf32 = False  # the exact float32 path everywhere
    torch.backends.cuda.matmul.allow_tf32 = False
    reference = losses("torch", args, device)
    failed = False
    for path in ("cae", "cae-fused"):
        curve = losses(path, args, device)
        relative = (curve - reference).abs() / reference.abs()
        worst = int(relative.argmax())
        failed |= bool(relative[worst] > args.tolerance)
        print(f"{path}: {args.steps} steps, loss {curve[0]:.4f} -> {curve[-1]:.4f} (torch {reference[-1]:.4f}); "
              f"largest |loss - torch's| / torch's: {relative[worst]:.1e} at step {worst}")
    if failed:
        print(f"loss_curve: a path strays more than {args.tolerance:g} from PyTorch's loss", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
