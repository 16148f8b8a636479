#!/usr/bin/env python3
"""The training loss of the conv autoencoder on this package's kernels, against exact arithmetic.

Trains the same model from the same weights on the same batches (the bundled digits, Adam and
weight decay as ``cae train``) along several paths and compares each loss curve with the
reference's, PyTorch in float64 (as good as exact next to float32: its rounding is 2^29 times
finer):

- ``torch``: PyTorch in float32, in the layout trained (``--layout``), and ``torch-<other>``
  in the other layout: the same float32 sums in other orders (cuDNN or oneDNN pick other
  algorithms per layout);
- ``cae``: our kernels, one op per layer; ``cae-fused``: our block ops (CUDA's default).

Every float32 path differs from exact arithmetic by rounding from the first step, and training
amplifies the difference; how far PyTorch's own float32 paths stray from the reference is
the scale of what rounding alone does to this run. So the check is relative to them; on the
CPU (``python scripts/loss_curve.py``, torch 2.14.1, an AMD EPYC, 2 cores; on the CPU the fused
path is composed from the per-op kernels)::

    torch float64 (reference), nhwc: 1000 steps, loss 0.7692 -> 0.1311
    torch, float32 nhwc: largest |loss - reference's| / reference's 2.9e-03 at step 861 (final 0.1310)
    torch-nchw, float32 nchw: largest |loss - reference's| / reference's 4.3e-03 at step 998 (final 0.1311)
    cae, float32 nhwc: largest |loss - reference's| / reference's 3.5e-03 at step 934 (final 0.1311)
    cae-fused, float32 nhwc: largest |loss - reference's| / reference's 3.5e-03 at step 934 (final 0.1311)
    bound for cae's paths: max(0.01, 2 x 4.3e-03) = 1.0e-02: ok

A path of ours fails when it strays further than ``--margin`` times the farther of PyTorch's
two float32 paths (the largest relative difference over the steps is an extreme of a noisy
curve: a margin of 2 keeps one unlucky step from failing a correct path), and further than
``--tolerance`` (1e-2: a 1% loss difference, a few times what rounding alone gives here).
TF32 is off for every path (``--device cuda``: the exact float32 path).
"""

import argparse
import sys

import torch

from cae_kernels.app import data
from cae_kernels.app import training as train

OTHER_LAYOUT = {"nhwc": "nchw", "nchw": "nhwc"}


def losses(backend, fused, layout, dtype, args, device):
    """The loss of each step of one path, a float64 tensor on the CPU."""
    config = train.Config(model="conv", downsample=args.model, backend=backend, batch_size=args.batch_size,
                          memory_format=layout)
    torch.manual_seed(args.seed)  # the init seed: the same weights on every path
    model = train.build_model(config).to(device, dtype)
    if fused is not None:
        model.fused = fused
    optimizer = train._adam(model, config.learning_rate, device)  # as the trainer: ours on our kernels
    weights = [p for name, p in model.named_parameters() if name.endswith("weight")]
    images = data.load_data().train.images
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed))
    curve = []
    for step in range(args.steps):
        index = order[torch.arange(step * args.batch_size, (step + 1) * args.batch_size) % len(images)]
        x = (images[index].to(torch.float32) / 255.0).reshape(-1, 1, 28, 28).to(device, dtype)
        loss, *_ = train._train_step(model, optimizer, weights, x, x, config.weight_decay)
        curve.append(loss)
    return torch.stack(curve).double().cpu()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--model", choices=("pool", "stride"), default="pool")
    parser.add_argument("--layout", choices=tuple(OTHER_LAYOUT), default="nhwc")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--margin", type=float, default=2.0,
                        help="how many times PyTorch's float32 difference from float64 ours may reach")
    parser.add_argument("--tolerance", type=float, default=1e-2,
                        help="the relative difference from float64 allowed whatever PyTorch's is")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cudnn.allow_tf32 = False  # the exact float32 path everywhere
    torch.backends.cuda.matmul.allow_tf32 = False
    reference = losses("torch", None, args.layout, torch.float64, args, device)
    print(f"torch float64 (reference), {args.layout}: {args.steps} steps, "
          f"loss {reference[0]:.4f} -> {reference[-1]:.4f}")
    other = OTHER_LAYOUT[args.layout]
    paths = {"torch": ("torch", None, args.layout), f"torch-{other}": ("torch", None, other),
             "cae": ("cae", False, args.layout), "cae-fused": ("cae", True, args.layout)}
    strays = {}
    for name, (backend, fused, layout) in paths.items():
        curve = losses(backend, fused, layout, torch.float32, args, device)
        relative = (curve - reference).abs() / reference.abs()
        worst = int(relative.argmax())
        strays[name] = float(relative[worst])
        print(f"{name}, float32 {layout}: largest |loss - reference's| / reference's {relative[worst]:.1e} "
              f"at step {worst} (final {curve[-1]:.4f})", flush=True)
    control = max(strays["torch"], strays[f"torch-{other}"])
    bound = max(args.tolerance, args.margin * control)
    failed = [name for name in ("cae", "cae-fused") if strays[name] > bound]
    print(f"bound for cae's paths: max({args.tolerance:g}, {args.margin:g} x {control:.1e}) = {bound:.1e}: "
          + (f"FAILED ({', '.join(failed)})" if failed else "ok"))
    if failed:
        print(f"loss_curve: {', '.join(failed)} strayed further from float64 than the bound", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
