#!/usr/bin/env python3
"""bfloat16 training against float32: the eval loss ``cae train`` reaches either way.

Trains the conv autoencoder twice with ``cae train``'s defaults (50 epochs on the bundled
digits, batch 256, the same seed), once in float32 and once with ``--precision bfloat16``
(the forward's convolutions in bfloat16 under autocast), each in a fresh temporary run
directory, and prints the final eval losses and their relative difference::

    precision_check: eval loss after 50 epochs: float32 0.1021, bfloat16 0.1030 (+0.9%), tolerance 2%

Exits 1 when the difference is over ``--tolerance`` (default 0.02, the issue's 2%). On a GPU
this checks this package's bfloat16 kernels (``scripts/gpu_check.sh`` runs it); on a CPU
only ``--backend torch`` trains in bfloat16 (the CPU kernels compute in float32).
"""

import argparse
import io
import sys
import tempfile
from pathlib import Path

from cae_kernels.app import train


def final_eval_loss(run_dir, args, precision):
    options = dict(epochs=args.epochs, backend=args.backend, seed=args.seed)
    if args.device:
        options["device"] = args.device
    if args.limit:
        options["limit"] = args.limit
    result = train(run_dir, out=io.StringIO(), progress=False, precision=precision, **options)
    return result.history[-1]["eval_loss"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--backend", choices=("cae", "torch"), default="cae")
    parser.add_argument("--device", help="as cae train's --device (default: CUDA where there is a GPU)")
    parser.add_argument("--limit", type=int, help="images per split (a quick run)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tolerance", type=float, default=0.02,
                        help="largest relative difference of bfloat16's eval loss from float32's")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        full, half = (final_eval_loss(Path(tmp) / p, args, p) for p in ("float32", "bfloat16"))
    difference = (half - full) / full
    print(f"precision_check: eval loss after {args.epochs} epochs: float32 {full:.4f}, bfloat16 {half:.4f} "
          f"({difference:+.1%}), tolerance {args.tolerance:.0%}")
    return 0 if abs(difference) <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
