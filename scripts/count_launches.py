#!/usr/bin/env python3
"""How many kernels one training step launches, counted on the emulated CUDA kernels.

Runs one step of the training loop (``cae_kernels.app.training._train_step``: forward,
cross-entropy, backward, Adam, loss sum) of the convolutional autoencoder with ``backend="sim"``
-- the CUDA kernels of csrc/cuda run by the emulator on the CPU, which counts every
launch -- at a tiny batch, for each downsampling variant, on the per-op path and on the
fused blocks (``fused=True``, ``<model>-fused``: what the model runs on CUDA by
default), and prints per model and path::

    pool: launches per step: N
      <count>  <kernel>
      ...
    pool-fused: launches per step: M
      ...

The step is training's own (``_train_step``): the model, the loss op, the backward
from a kept seed, ``cae_kernels.optim.Adam`` (one launch for every parameter's update,
the step counts and the gradient norm) and the epoch's loss sum. The kernels are this
package's; torch's ops besides them are listed after them (``+ M torch ops``): on a GPU
each launches at least one kernel, so ``N + M`` is a lower bound on the step's launches
there. Views, allocations and the like launch nothing and are not listed. The count follows the layers, not
the batch size (the same at batch 2 and 16, NCHW and channels_last: the plans change the
grids, not the number of launches).

``--budget N`` exits 1 when a model's step launches more than N kernels, ours and torch's
ops together (``N + M``); ``--budget pool=N`` sets one model's, ``--budget pool-fused=N``
its fused path's (repeatable). CI runs it at today's counts, so a change that adds
launches fails until the budget is raised on purpose.
"""

import argparse
import collections
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cae_kernels import sim
from cae_kernels.app.models import ConvAutoencoder
from cae_kernels.app.training import _adam, _train_step

VARIANTS = ("pool", "stride")
PATHS = {"": False, "-fused": True}  # the budget key's suffix -> fused


# torch ops that launch no kernel: metadata, views, allocations, the profiler's marks.
NO_KERNEL = {"detach", "empty", "empty_like", "empty_strided", "lift_fresh", "alias", "view", "_unsafe_view",
             "as_strided", "t", "transpose", "permute", "expand", "squeeze", "unsqueeze"}


class TorchOps(TorchDispatchMode):
    """Counts the torch ops dispatched (not this package's: their kernels are counted)."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if func.namespace == "aten" and not func.is_view and name not in NO_KERNEL:
            self.counts[f"aten.{name}"] += 1
        return func(*args, **(kwargs or {}))


def count_step(downsample, batch_size=2, memory_format=torch.contiguous_format, seed=0, fused=False):
    """The launches of one training step, per kernel (a Counter): the per-op path, or the
    fused blocks'; and the torch ops it dispatches (a Counter)."""
    torch.manual_seed(seed)
    model = ConvAutoencoder(downsample=downsample, backend="sim", memory_format=memory_format, fused=fused)
    optimizer = _adam(model, 1e-3, torch.device("cpu"))
    x = torch.rand(batch_size, 1, 28, 28)
    loss_sum = torch.zeros((), dtype=torch.float64)
    # The first step makes Adam's state and the backward's seed.
    _train_step(model, optimizer, model.weights(), x, x, weight_decay=0.0, loss_sum=loss_sum)
    with sim.count_launches() as counts, TorchOps() as torch_ops:
        _train_step(model, optimizer, model.weights(), x, x, weight_decay=0.0, loss_sum=loss_sum)
    return counts, torch_ops.counts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=VARIANTS, action="append",
                        help="the downsampling variant (repeatable; default: both)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--nhwc", action="store_true", help="channels_last activations")
    parser.add_argument("--budget", action="append", default=[], metavar="[MODEL=]N",
                        help="fail when a step launches more than N kernels (one model's with MODEL=N)")
    args = parser.parse_args(argv)
    keys = [variant + suffix for variant in VARIANTS for suffix in PATHS]
    budgets = {}
    for budget in args.budget:
        model, _, limit = budget.rpartition("=")
        if model not in ("", *keys) or not limit.isdigit():
            parser.error(f"--budget takes N or MODEL=N with MODEL one of {tuple(keys)}, got {budget!r}")
        for key in [model] if model else keys:
            budgets[key] = int(limit)

    memory_format = torch.channels_last if args.nhwc else torch.contiguous_format
    over = []
    for downsample in args.model or VARIANTS:
        for suffix, fused in PATHS.items():
            key = downsample + suffix
            counts, torch_ops = count_step(downsample, args.batch_size, memory_format, fused=fused)
            total, others = sum(counts.values()), sum(torch_ops.values())
            print(f"{key}: launches per step: {total} + {others} torch ops = at least {total + others} on a GPU")
            for table in (counts, torch_ops):
                for name, count in sorted(table.items(), key=lambda item: (-item[1], item[0])):
                    print(f"  {count:4d}  {name}")
            if key in budgets and total + others > budgets[key]:
                over.append(f"{key}: {total} + {others} launches per step, over the budget of {budgets[key]}")
    for line in over:
        print(f"count_launches: {line}", file=sys.stderr)
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
