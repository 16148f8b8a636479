"""A layer's whole backward op (conv3x3_backward / conv_transpose3x3_backward: one pass,
the gated gradient copied once) against the two separate backward ops it replaces in
autograd, at the autoencoder's layer shapes, on the CPU kernels.

    python benchmarks/fused_backward.py [--rounds 15] [--levels avx512,avx2]

Both run on the same inputs, interleaved round by round; medians, batch 256, float32.
"""

import argparse
import statistics
import time

import torch

import cae_kernels

from shapes import op_cases


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--levels", default=cae_kernels.cpu_capability(), help="comma-separated CPU levels")
    args = parser.parse_args()
    ops = torch.ops.cae
    print(f"torch threads {torch.get_num_threads()}; ratio = fused / separate, medians of {args.rounds}")
    for level in args.levels.split(","):
        cae_kernels.set_cpu_capability(level)
        for case in op_cases(256):
            if case.op == "max_pool2x2":
                continue
            transposed = case.op == "conv_transpose3x3"
            prefix = "conv_transpose3x3" if transposed else "conv3x3"
            grad_input, grad_weight, whole = (getattr(ops, f"{prefix}_{name}")
                                              for name in ("grad_input", "grad_weight", "backward"))
            for layout, memory_format in (("nchw", torch.contiguous_format), ("nhwc", torch.channels_last)):
                x = torch.randn(case.input_shape).to(memory_format=memory_format)
                w = torch.randn(case.weight_shape) * 0.2
                y = getattr(ops, prefix)(x, w, None, case.stride, bool(case.activation))
                relu_output = y if case.activation else None
                g = torch.randn_like(y)
                separate = lambda: (grad_input(g, relu_output, w, x, case.stride),  # noqa: E731
                                    grad_weight(g, relu_output, x, case.stride))
                fused = lambda: whole(g, relu_output, w, x, case.stride)  # noqa: E731
                times = {"separate": [], "fused": []}
                for _ in range(args.rounds):
                    for name, fn in (("separate", separate), ("fused", fused)):
                        start = time.perf_counter()
                        fn()
                        times[name].append(time.perf_counter() - start)
                s, f = (statistics.median(times[name]) * 1e3 for name in ("separate", "fused"))
                print(f"{level:8s} {case.id:28s} {layout}  separate {s:7.2f} ms  fused {f:7.2f} ms  ratio {f / s:.2f}")


if __name__ == "__main__":
    main()
