"""This machine's ceilings, measured the same way on the CPU and on a GPU:

- compute: the best of several runs of a large float32 matrix multiply
  (``torch.mm``: MKL/oneDNN on the CPU, cuBLAS on a GPU, TF32 off), in GFLOP/s;
- memory: the best of several copies of a large float32 tensor, counting the bytes
  read and written, in GB/s.

The achieved rate of every benchmark row is reported against these two numbers.
"""

import time

import torch


def _best_seconds(fn, device, repeats):
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def measure(device, quick=False):
    device = torch.device(device)
    n = 512 if quick else (8192 if device.type == "cuda" else 2048)
    copy_mb = 16 if quick else (2048 if device.type == "cuda" else 256)
    repeats = 2 if quick else 7
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        a = torch.randn(n, n, device=device)
        b = torch.randn(n, n, device=device)
        mm_seconds = _best_seconds(lambda: torch.mm(a, b), device, repeats)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    src = torch.empty(copy_mb * 2**20 // 4, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    copy_seconds = _best_seconds(lambda: dst.copy_(src), device, repeats)
    return {
        "gflops": 2 * n**3 / mm_seconds / 1e9,
        "gbytes_per_s": 2 * src.numel() * 4 / copy_seconds / 1e9,
        "how": f"best of {repeats}: float32 {n}x{n} matmul (TF32 off); copy of {copy_mb} MiB",
    }
