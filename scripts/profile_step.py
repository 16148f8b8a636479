#!/usr/bin/env python3
"""Where a training step's GPU time goes, per kernel: the measured counterpart of the
design notes' model (docs/kernels.md, "Where the time goes").

Runs eager training steps of the conv autoencoder (the benchmarks' ``make_step``: real
digits, ``cae train``'s step) under ``torch.profiler`` and prints, for each path and
layout, the kernels' GPU time per step, largest first, their sum, and the step's wall
time from a CUDA graph beside it::

    cae (fused) nhwc, batch 256: 10 kernels, 612.0 us of GPU time a step; graphed step 801.2 us (...)
       calls    us/step   share  kernel
           3      301.2    49%   cae::cuda::encoder_block_backward_kernel<float, float, true, ...>
      ...

GPU time summed over kernels is what the model's "kernel time" estimates; a graphed
step's wall time above it is gaps between kernels (launch latency, dependencies). The
graphed step is timed twice, with TF32 on (PyTorch's default: the per-op correlations run
on tensor cores, the fused block kernels do not yet) and off (exact float32 everywhere):
the difference between the two paths with TF32 off is what fusing buys by itself.

``--ncu`` instead runs one fused step between ``cudaProfilerStart`` and
``cudaProfilerStop`` and nothing else, for Nsight Compute:
``ncu --profile-from-start off --section SpeedOfLight ... python scripts/profile_step.py --ncu``
(scripts/gpu_check.sh does).
"""

import argparse
import os
import re
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))

from bench_train import make_step, prepare  # noqa: E402

IMPLS = {"cae": "cae (fused)", "cae-per-op": "cae (per op)", "torch": "torch"}


def kernel_name(name):
    """A kernel's name without ``void`` and its parameter list (its template arguments kept)."""
    name = re.sub(r"^void ", "", name)
    depth = 0
    for i, ch in enumerate(name):
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "(" and depth == 0:
            return name[:i]
    return name


def kernel_times(step, inputs, steps):
    """{kernel: (calls, us)} per step, from the profiler's GPU activity over ``steps`` steps."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(steps):
            step(*inputs[i % len(inputs)])
        torch.cuda.synchronize()
    times = {}
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        calls, us = times.get(kernel_name(event.name), (0, 0.0))
        times[kernel_name(event.name)] = (calls + 1, us + event.time_range.elapsed_us())
    return {k: (calls / steps, us / steps) for k, (calls, us) in times.items()}


def graphed_step_us(impl, layout, batch, device, steps, tf32=True):
    """Median wall time of a step replayed from a CUDA graph (our kernels only), in us;
    ``tf32=False`` captures it with TF32 off: the exact float32 path."""
    if impl == "torch":
        return None
    previous, torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.allow_tf32, tf32  # read at the capture
    try:
        step, inputs = make_step("conv-pool", f"{impl}-graph", layout, batch, device)
        prepare(step, f"{impl}-graph", inputs)
    finally:
        torch.backends.cudnn.allow_tf32 = previous
    times = []
    for i in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step(*inputs[i % len(inputs)])
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return sorted(times)[len(times) // 2]


def report(impl, layout, batch, device, steps):
    step, inputs = make_step("conv-pool", impl, layout, batch, device)
    for i in range(5):  # Adam's state, the allocator's blocks, cuDNN's choices
        step(*inputs[i % len(inputs)])
    times = kernel_times(step, inputs, steps)
    total = sum(us for _, us in times.values())
    calls = sum(c for c, _ in times.values())
    graphed = graphed_step_us(impl, layout, batch, device, steps)
    exact = graphed_step_us(impl, layout, batch, device, steps, tf32=False)
    print(f"{IMPLS[impl]} {layout}, batch {batch}: {calls:g} kernels, {total:.1f} us of GPU time a step"
          + (f"; graphed step {graphed:.1f} us ({exact:.1f} us exact float32)" if graphed is not None else ""))
    print(f"  {'calls':>6} {'us/step':>10} {'share':>7}  kernel")
    for name, (c, us) in sorted(times.items(), key=lambda kv: -kv[1][1]):
        print(f"  {c:>6g} {us:>10.1f} {us / total:>7.0%}  {name[:140]}")
    print()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20, help="steps profiled (and graphed steps timed)")
    parser.add_argument("--layouts", nargs="+", default=["nhwc", "nchw"], choices=["nhwc", "nchw"])
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    parser.add_argument("--ncu", action="store_true", help="one fused NHWC step inside a profiler range")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (torch sees none)")
    device = torch.device("cuda")
    torch.backends.cudnn.allow_tf32 = True  # PyTorch's default, as the benchmarks run
    if args.ncu:
        step, inputs = make_step("conv-pool", "cae", args.layouts[0], args.batch_size, device)
        for i in range(3):
            step(*inputs[i % len(inputs)])
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        step(*inputs[0])
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
        return 0
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    for layout in args.layouts:
        for impl in args.impls:
            report(impl, layout, args.batch_size, device, args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
