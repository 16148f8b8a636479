#!/usr/bin/env python3
"""The generated tables of docs/kernels.md: every CUDA kernel launch of one training step at
batch 256, with its launch shape, traffic, work and an *estimated* H200 time.

Nothing here runs on a GPU. One training step of each model variant (``pool``, ``stride``;
``cae_kernels.app.training._train_step`` on ``ConvAutoencoder(backend="sim")``), NCHW and
NHWC, per op and fused (``fused=True``: the blocks' ops, CUDA's default), runs on the
emulated CUDA kernels in dry-run mode (``sim.record_launches(dry_run=True)``: the launchers
plan and check every launch exactly as the GPU build does, the kernels do not run), so grid,
block and dynamic shared memory are the planners' own. Registers and static
shared memory per kernel come from the committed SASS report
(benchmarks/results/sass-sm90.md). Everything else is arithmetic on the op's tensor shapes,
with the model and its constants written out in the generated text (``MODEL``).

    python scripts/kernel_notes.py            # rewrite the tables in docs/kernels.md
    python scripts/kernel_notes.py --check    # exit 1 if the committed tables are stale
    python scripts/kernel_notes.py --print    # the tables on stdout

The output depends only on the sources and the SASS report (no timing, no machine state);
it takes about 30 s once the emulated kernels are built.
"""


import argparse
import functools
import importlib.util
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "kernels.md"
SASS_REPORT = ROOT / "benchmarks" / "results" / "sass-sm90.md"
BEGIN = "<!-- kernel_notes.py: begin (generated, do not edit) -->"
END = "<!-- kernel_notes.py: end -->"

BATCH = 256
VARIANTS = ("pool", "stride")
LAYOUTS = (("NCHW", torch.contiguous_format), ("NHWC", torch.channels_last))

# --- the machine: H200 SXM -------------------------------------------------------------
SMS = 132
CLOCK_HZ = 1.98e9
HBM_BYTES_PER_S = 4.8e12
HBM_FRACTION = 0.8  # achievable share of the HBM bandwidth for streaming kernels
FP32_FLOPS = SMS * 128 * 2 * CLOCK_HZ  # 128 FP32 lanes per SM, an FMA is 2 FLOPs: ~67 TFLOP/s
ISSUE_PER_CLOCK = 4  # warp instructions per SM and clock (4 schedulers); also FFMA: 4 x 32 lanes
LDS_PER_CLOCK = 1  # shared-memory wavefronts per SM and clock (128 bytes/clock)
LAUNCH_US = 2.0  # fixed cost per launch: back-to-back small kernels in one stream, no graph
# Per staged element, float32, from the sm_90 SASS of the staging loops (division-free walks;
# benchmarks/results/sass-sm90.md's notes): index arithmetic, bounds, load, convert, store.
STAGE_INSTRUCTIONS = {False: 58, True: 25}  # by layout: NCHW, NHWC (vector loads)
# The loss inside the decoder's kernels (decoder_block_loss), estimated rather than read from
# the SASS: per logit in the forward, the target's load and index, exp and log1p (MUFU with
# their range fixes), a reciprocal and the two sums; per element of the backward's output
# gradient, beyond its staging, the logit's and target's loads, exp and a reciprocal.
LOSS_INSTRUCTIONS = 40
LOSS_GRAD_INSTRUCTIONS = 20
# Tensor cores through mma.sync: issue slots a product holds its warp's scheduler (the tensor
# pipe's rate for mma.sync on sm_90, about 512 dense f16 multiply-adds per SM and clock, so an
# m16n8k16 (2048) takes 4 per scheduler; tf32 half the rate: m16n8k8 (1024) also 4).
MMA_ISSUE = 4
REGISTERS_PER_SM = 65536
SHARED_PER_SM = 228 * 1024
RESERVED_SHARED = 1024  # per block, sm_80 and later
MAX_THREADS_PER_SM = 2048
MAX_BLOCKS_PER_SM = 32
PYTORCH_STEP_MS = (0.35, 0.45)  # the issue's estimate of PyTorch + cuDNN GPU time per step
# A global load's round trip under load (HBM, or L2 for data the previous kernel wrote), what a
# thread waits when its next instruction needs the value. Not from NVIDIA's figures: the H200
# run's per-op costs (docs/kernels.md, "What the model left out") fit about this.
MEMORY_LATENCY_S = 0.6e-6
# Loads a staging loop keeps in flight per thread (batched_walk, stage_batch in
# conv3x3_kernels.cuh): 4 of 4 bytes, 1 of 16 (an NHWC vector of 4 floats), fewer under a
# kernel's register cap: correlate_kernel with up to 8 output channels a thread 1, the weight
# gradients and the transposed correlation 2. KERNEL_NOTES_STAGE_BATCH=1 models the loops as
# they were before batched_walk (one load in flight).
STAGE_BATCH_MAX = int(os.environ.get("KERNEL_NOTES_STAGE_BATCH", "4"))
# Warps an SM needs resident to issue at its full rate: a scheduler's warps wait ~30 clocks for
# a shared load and ~4 for an FFMA it depends on, so it takes about 8 warps to have one ready
# each clock. With fewer, issue slows in proportion (the fused kernels run 8-16 warps an SM).
WARPS_FOR_FULL_ISSUE = 32

MODEL = f"""\
**Model (an estimate, not a measurement).** H200 SXM: {SMS} SMs at {CLOCK_HZ / 1e9:.2f} GHz,
{HBM_BYTES_PER_S / 1e12:.1f} TB/s HBM3e of which {HBM_FRACTION:.0%} is taken as achievable,
{FP32_FLOPS / 1e12:.0f} TFLOP/s FP32 FMA ({ISSUE_PER_CLOCK} warp instructions issued per SM
and clock), {LDS_PER_CLOCK} shared-memory wavefront per SM and clock, {SHARED_PER_SM // 1024} KiB
shared memory, 64K registers, {MAX_THREADS_PER_SM} threads and {MAX_BLOCKS_PER_SM} blocks per SM.
Per launch:

- *launch shape*: grid, block and dynamic shared memory as the launcher planned them (recorded
  by the emulator in dry-run); *regs*: registers per thread from `sass-sm90.md`;
  *blocks/SM*: the least of the register, shared-memory (dynamic + static, at least the
  {RESERVED_SHARED} B the system reserves per block), thread and block limits; *waves*:
  blocks / ({SMS} x blocks/SM).
- *bytes*: compulsory traffic, each tensor the kernel reads counted once and each it writes
  once (the weight-gradient partial sums included: written by `weight_grad`, read by
  `reduce_partials`); L2 re-reads of staged windows are not counted.
- *FLOPs*: 2 x multiply-adds of the product, counting the taps that fall on padding (9 per
  output and input channel; a stride-2 transposed convolution: 9 per input pixel).
- *instr/output*: warp instructions x 32 / output elements, from the kernel's loop
  structure: the inner loop's FFMA and shared loads (input tap: 1 load, stride-2 correlate
  2 wavefronts for its 2-way bank conflict; weights: one broadcast load per 4 output
  channels), and for the convolution kernels the staging of their shared memory (the
  tile's input window and weights, every input channel once; {STAGE_INSTRUCTIONS[False]}
  instructions per staged element in NCHW, {STAGE_INSTRUCTIONS[True]} in NHWC, as the sm_90 SASS of the
  staging loops has them). The weight gradient's staging is not counted (a lower
  bound). *instr/output* of `weight_grad` is per gradient element: a reduction over all
  positions of the batch.
- *waits*: the global loads a thread of a block waits for one after another: its staging
  loop's elements (window, weights) over the loads it keeps in flight (4 of 4 bytes, one
  16-byte NHWC vector, 1 or 2 in the kernels with tight register caps), a grid-stride
  loop's iterations; a staging of float32 with no ReLU gate goes by cp.async (`copy_async`:
  no register holds a copy, so all are in flight at once), one wait at the barrier that ends
  it, however many elements (the weight gradients' stagings are still counted as batched
  loads: pessimistic); t wait = ceil(waves) x waits x {MEMORY_LATENCY_S * 1e6:.1f} us (the blocks of a
  wave wait side by side, the waves one after another).
- *time* = max(t mem / SM fill, t wait + max(t issue, t shared) / wave efficiency) +
  {LAUNCH_US:.0f} us per launch, where t mem = bytes / ({HBM_FRACTION:.0%} of HBM), t issue = warp
  instructions / ({ISSUE_PER_CLOCK} x {SMS} x clock), t shared = wavefronts / ({LDS_PER_CLOCK} x
  {SMS} x clock); SM fill = min(blocks, {SMS}) / {SMS}; wave efficiency = waves / ceil(waves)
  above one wave, the SM fill below it (a lone block is taken to get its SM's whole
  throughput: optimistic). t issue and t shared are at full rate with {WARPS_FOR_FULL_ISSUE}
  or more resident warps an SM (blocks/SM x warps a block), slower in proportion below (a
  scheduler needs about 8 warps to have one ready every clock while the others wait for
  shared loads). The latency of the global loads is t wait only: no overlap of one block's
  waiting with another's issue on the same SM (pessimistic), none of the barriers' cost
  (optimistic). The H200 run (`benchmarks/results/gpu-h200/`) is how these two terms were
  set: before the staging loops kept several loads in flight (`KERNEL_NOTES_STAGE_BATCH=1`
  models them), this model gives 0.63-0.76 of every measured graphed step (pool and stride,
  per op and fused, both layouts; without the two terms 0.21-0.26).
"""

FUSED_MODEL = f"""\
**The fused step** (`ConvAutoencoder(fused=True)`, what CUDA runs by default): one launch per
encoder block (`encoder1`..`encoder3`) and its backward, one for the decoder with the loss and
one for its backward (`decoder_block_loss`: the loss summed in the decoder's kernel, its
gradient staged in the backward's), Adam's one. The block kernels are modeled from their loop structure as the
per-op ones, with the same constants: their tilings are copies of the planners, checked against
the recorded grid and shared memory; a warp runs 32 consecutive work items; per channel and tap
of `accumulate_windows` the window's loads (each value once for a work item's 2 rows), two
broadcast weight loads for 8 output channels and the FFMA; the stride-1 layers on tensor cores
by strips of 8 columns and 4 rows (`mma_pass_strips`: a window row's A values loaded once per
column offset and k-step for every tap that reads them, a strip's lanes past the columns
computed too); the stride-2 transposed layers on
tensor cores per parity class (its 1, 2 or 4 taps), else issuing the union of a warp's taps (both
parities of a row or column in one warp: up to 9 where 2.25 are needed); the weight gradients
from their per-position loads, with the bank conflicts of the first warp's addresses; staging
as above per staged element (weights included). *bytes*: the
block's input, weights, output (and gradients) once, plus the grid sums' partial rows (written,
read by the finishing blocks); *FLOPs*: what the kernels compute, recomputed halos, strip rows
and the backward's recompute of the forward included; *instr/output* of a backward block: per
gradient element (weights, biases, the input's where asked). Left out: the barriers between phases
(a block waits for its slowest warp), the finishing blocks' serial sums over the partial rows,
the index arithmetic of the stride-2 loops, and the latency within a phase: the decoder's first
layers (4 x 4 and 8 x 8 images) are a few warps of work per block, and the third encoder block's
phases keep 32-50 of 256 threads busy, so where a fused kernel is latency-bound its time here is
optimistic. What the block kernels' 1-2 blocks of 8 warps an SM cost is in the model: issue at
the share of the {WARPS_FOR_FULL_ISSUE} warps an SM needs to issue every clock (8-16 of them:
a half or a quarter of the rate).
"""

# --- the SASS report ------------------------------------------------------------------

def load_sass_report(path=SASS_REPORT):
    """{short kernel name: (registers, static shared bytes)} from the report's table."""
    kernels = {}
    for line in Path(path).read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 13 and cells[0].startswith("`") and cells[1].isdigit():
            kernels[cells[0].strip("`")] = (int(cells[1]), int(cells[7]))
    if not kernels:
        raise SystemExit(f"kernel_notes: no kernel table in {path}")
    return kernels


def _sass_report_module():
    spec = importlib.util.spec_from_file_location("sass_report", ROOT / "scripts" / "sass_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- recording a step -----------------------------------------------------------------

@dataclass
class OpCall:
    """One call of a cae_sim op with the launches it made."""

    layer: str
    op: str
    args: dict  # schema argument name -> tensor (or None)
    results: list  # result tensors
    launches: list = field(default_factory=list)


class _OpRecorder(TorchDispatchMode):
    """Attributes each cae_sim op call, and the launches it makes, to a layer: forward ops
    by the layer whose module runs, backward ops by the tensors they share with it."""

    def __init__(self, recorder, model=None):
        super().__init__()
        self.recorder = recorder
        self.calls = []
        self.layer = None
        self.by_weight, self.by_input, self.by_output = {}, {}, {}
        self.hooks = []
        for name in model._specs if model is not None else ():
            module = model.get_submodule(name)
            self.hooks.append(module.register_forward_pre_hook(lambda m, a, name=name: self._enter(name)))

    def _enter(self, name):
        self.layer = name

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        namespace, _, op = func._schema.name.partition("::")
        if namespace != "cae_sim" or op.startswith("_sim"):  # torch's ops, the emulator's hooks
            return func(*args, **kwargs)
        self.recorder.poll()
        out = func(*args, **kwargs)
        launches = self.recorder.poll()
        names = [a.name for a in func._schema.arguments]
        bound = dict(zip(names, args, strict=False))
        bound.update(kwargs)
        results = list(out) if isinstance(out, (tuple, list)) else [out]
        self.calls.append(OpCall(self._layer(op, bound, results), op, bound, results, launches))
        return out

    def _layer(self, op, bound, results):
        if op.startswith("sigmoid_cross_entropy"):
            return "loss"
        if op == "adam_":
            return "optimizer"
        if op.startswith("decoder_block"):
            return "decoder"

        def key(t):
            return t.untyped_storage().data_ptr() if isinstance(t, torch.Tensor) else None

        if op == "encoder_block":  # the fused path's blocks, in order; their backward by the input
            name = f"encoder{sum(call.op == op for call in self.calls) + 1}"
            self.by_input[key(bound["input"])] = name
            return name
        if op == "encoder_block_backward":
            return self.by_input.get(key(bound["input"]), "?")

        if op in ("conv3x3", "conv_transpose3x3", "max_pool2x2"):  # forward: the running module
            if bound.get("weight") is not None:
                self.by_weight[key(bound["weight"])] = self.layer
            self.by_input[key(bound["input"])] = self.layer
            self.by_output[key(results[0])] = self.layer
            return self.layer
        # backward: the tensors it shares with the layer's forward (saved for backward)
        for table, arg in ((self.by_weight, "weight"), (self.by_input, "input"), (self.by_output, "relu_output")):
            if bound.get(arg) is not None and key(bound[arg]) in table:
                return table[key(bound[arg])]
        return "?"

    def close(self):
        for hook in self.hooks:
            hook.remove()


def record_step(downsample, memory_format, batch_size=BATCH, seed=0, fused=False):
    """The cae_sim op calls (with their launches) of one dry-run training step: per op
    (each launch belongs to one layer), or `fused` (the blocks' ops: what CUDA runs by
    default; a launch belongs to a block, the decoder, the loss or the optimizer)."""
    from cae_kernels import sim
    from cae_kernels.app.models import ConvAutoencoder
    from cae_kernels.app.training import _adam, _train_step

    torch.manual_seed(seed)
    model = ConvAutoencoder(downsample=downsample, backend="sim", memory_format=memory_format, fused=fused)
    optimizer = _adam(model, 1e-3, torch.device("cpu"))
    x = torch.rand(batch_size, 1, 28, 28)
    with sim.record_launches(dry_run=True) as recorder:
        mode = _OpRecorder(recorder, model)
        try:
            with mode:
                _train_step(model, optimizer, model.weights(), x, x, weight_decay=0.0)
        finally:
            mode.close()
    recorded = sum(len(call.launches) for call in mode.calls)
    if recorded != len(recorder.launches):
        raise RuntimeError(f"{len(recorder.launches)} launches, {recorded} of them inside a cae_sim op")
    return model, mode.calls


# --- the model of a launch ------------------------------------------------------------

def nbytes(t):
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def kernel_family(name):
    base = name.split("<", 1)[0].rsplit("::", 1)[-1]
    return base.removesuffix("_kernel")


def template_args(name):
    inner = name[name.index("<") + 1 : name.rindex(">")]
    return [a.strip() for a in inner.split(",")]


@dataclass
class Estimate:
    bytes: int = 0
    flops: int = 0
    outputs: int = 0
    warp_instructions: float = 0.0
    wavefronts: float = 0.0
    waits: float = 0.0  # global loads a thread waits for in sequence (per block)


def stage_batch(load_bytes, most=STAGE_BATCH_MAX):
    """Loads in flight per thread in a staging loop (stage_batch in conv3x3_kernels.cuh)."""
    fit = 1 if load_bytes >= 16 else 2 if load_bytes >= 8 else 4
    return max(1, min(fit, most))


def staging_waits(elements, nhwc_vec=False, most=STAGE_BATCH_MAX, threads=None):
    """A thread's waits staging `elements` float32 values with a block's threads (THREADS
    unless given): NHWC vectors of 4 where the channels allow (one 16-byte load each),
    else one per element."""
    per_load = 4 if nhwc_vec else 1
    return math.ceil(elements / ((threads or THREADS) * per_load * stage_batch(4 * per_load, most)))


def _conv_shapes(call):
    """(MACs, output tensor of the correlate/correlate_transpose launch, inputs it reads)."""
    a = call.args
    forward = call.op in ("conv3x3", "conv_transpose3x3")
    weight = a["weight"]
    if forward:
        out = call.results[0]
        reads = [a["input"], weight, a.get("bias")]
    else:
        out = a["input"]  # the input gradient has the input's shape
        reads = [a["grad_output"], a.get("relu_output"), weight]
    return weight, out, reads


def _small_positions(call):
    """N x positions of the strided (small) side of the layer: the 3x3 product's length."""
    a = call.args
    sides = [t for t in (a.get("input"), a.get("grad_output")) if isinstance(t, torch.Tensor)]
    if not sides and call.results:
        sides = [call.results[0]]
    return min(t.shape[0] * t.shape[2] * t.shape[3] for t in sides)


def estimate(call, launch, index_in_op):
    """The Estimate of one launch of `call`."""
    family = kernel_family(launch.kernel)
    a = call.args
    e = Estimate()
    if call.op.removesuffix("_backward").removesuffix("_loss") in BLOCK_MODELS and family not in BLOCK_MODELS:
        raise SystemExit(f"kernel_notes: {call.op} composed per-op kernels ({launch.kernel}): its kernel "
                         "declined the shapes; the model covers the fused kernel only")
    warps = launch.blocks * launch.threads_per_block // 32
    if family in ("correlate", "correlate_transpose"):
        weight, out, reads = _conv_shapes(call)
        targs = template_args(launch.kernel)
        acc_bytes = 8 if targs[1] == "double" else 4
        stride, cob, nhwc = int(targs[2]), int(targs[3]), targs[4] == "true"
        c_in = reads[0].shape[1]  # the channels the kernel stages and sums over
        e.bytes = sum(nbytes(t) for t in reads) + nbytes(out)
        e.flops = 2 * weight.numel() * _small_positions(call)
        e.outputs = out.numel()
        # per warp and input channel: taps x (COB FFMA + an input load + weight loads)
        if family == "correlate":
            taps, input_wavefronts = 9, 9 * stride  # stride 2: 2-way bank conflicts
        else:
            taps = 9 if stride == 1 else 9 / 4  # stride 2: 1, 2, 2 or 4 taps by parity
            input_wavefronts = taps
        weight_loads = taps * math.ceil(cob / 4)
        per_channel_issue = taps * cob + taps + weight_loads + 2
        per_channel = _staged_per_channel(launch, family, stride, cob, out, acc_bytes)
        staged = c_in * per_channel
        # correlate_kernel under a cap of 64 or 80 registers (up to 8 output channels) keeps one
        # load in flight, the transposed kernel 2; the weights: COB loads a tap, a tap a thread
        most = (1 if cob <= 8 else STAGE_BATCH_MAX) if family == "correlate" else min(2, STAGE_BATCH_MAX)
        weight_waits = math.ceil(c_in * 9 / THREADS)
        if _copies(reads[0]) and a.get("relu_output") is None:
            # the window by cp.async (and correlate's weights): one wait a chunk of channels
            chunks = math.ceil(c_in / (launch.shared_bytes // (acc_bytes * per_channel)))
            e.waits = chunks + (weight_waits if family == "correlate_transpose" else 0)
        else:
            e.waits = staging_waits(c_in * (per_channel - 9 * cob), nhwc and c_in % 4 == 0, most) + weight_waits
        e.warp_instructions = warps * c_in * per_channel_issue + launch.blocks * staged / 32 * STAGE_INSTRUCTIONS[nhwc]
        e.wavefronts = warps * c_in * (input_wavefronts + weight_loads) + launch.blocks * staged / 32
    elif family == "correlate_mma":
        # implicit GEMM on tensor cores (conv3x3_mma_kernels.cuh): per warp and 8-channel group of
        # a tap, one product per m16 tile pair and n8 tile (k16: two groups a product), its A
        # and B fragments loaded from shared memory (32-bit words); the window and weights
        # staged as for correlate; the accumulators go through shared memory to store_pixel.
        weight, out, reads = _conv_shapes(call)
        targs = template_args(launch.kernel)
        tf32, cob, nhwc = "TF32" in targs[1], int(targs[2]), targs[3] == "true"
        c_in = reads[0].shape[1]
        groups = math.ceil(c_in / 8)
        e.bytes = sum(nbytes(t) for t in reads) + nbytes(out)
        e.flops = 2 * weight.numel() * _small_positions(call)
        e.outputs = out.numel()
        n, _, height, width = out.shape
        cols = _pow2_at_least(width, 2, 32)
        rows = _pow2_at_least(height, 2, 256 // cols)
        samples = 256 // (rows * cols)
        if out.shape[2] > reads[0].shape[2]:
            # stride-2 transposed: the tile's four parity classes from one stride-1 window of the
            # small side, (rows / 2 + 1) x (cols / 2 + 1); two warps a class, each over its
            # class's 1, 2, 2 or 4 taps (k16: its groups paired within the class)
            k_steps = sum(t * groups if tf32 else math.ceil(t * groups / 2) for t in (1, 2, 2, 4)) / 4
            window = (rows // 2 + 1) * (cols // 2 + 1) * samples
        else:
            k_steps = 9 * (groups if tf32 else math.ceil(groups / 2))
            stride = 1 if out.shape[2] == reads[0].shape[2] else 2
            window = ((rows - 1) * stride + 3) * ((cols - 1) * stride + 3) * samples
        products_per_warp = k_steps * 2 * (cob // 8)  # 2 m16 tiles x the n8 tiles
        fragment_loads = k_steps * (2 * 4 + (cob // 8) * 2)  # A: 4 words a tile; B: 2 a tile
        mma_warps = launch.blocks * launch.threads_per_block // 32
        staged = groups * 8 * (window + 9 * cob)
        # stage_words: an operand word a load (tf32: one float; 16-bit: two channels, two loads)
        e.waits = staging_waits(groups * 8 * window) + math.ceil(groups * 8 * 9 / THREADS)
        e.warp_instructions = (mma_warps * (products_per_warp * MMA_ISSUE + fragment_loads + 2 * cob)
                               + launch.blocks * staged / 32 * STAGE_INSTRUCTIONS[nhwc])
        e.wavefronts = mma_warps * (fragment_loads + 2 * cob) + launch.blocks * staged / 32
    elif family in ("weight_grad", "weight_grad_mma"):
        grad_w, grad_b = _weight_grad_results(call)
        positions = _small_positions(call)
        macs = grad_w.numel() * positions
        c_a, c_b = grad_w.shape[0], grad_w.shape[1]
        partial = launch.blocks * (grad_w.numel() + (grad_b.numel() if grad_b is not None else 0)) * 4
        e.bytes = nbytes(a["grad_output"]) + nbytes(a.get("relu_output")) + nbytes(a["input"]) + partial
        e.flops = 2 * macs
        e.outputs = grad_w.numel()
        targs = template_args(launch.kernel)
        # a block's regions staged whole (every channel of both sides; b's halo not counted),
        # 2 loads in flight (the weight gradients' register caps), NHWC vectors where allowed
        nhwc = targs[-1] == "true"
        small, large = a["grad_output"], a["input"]
        if small.shape[2] > large.shape[2]:
            small, large = large, small
        e.waits = (staging_waits(small.numel() / launch.blocks, nhwc and small.shape[1] % 4 == 0, 2)
                   + staging_waits(large.numel() / launch.blocks, nhwc and large.shape[1] % 4 == 0, 2))
        if family == "weight_grad_mma":
            # tensor cores (conv3x3_mma_kernels.cuh): per warp, unit of 3 n8 tiles of the 9 C_b
            # columns and k step (16 positions, tf32 8): 3 products; the lane's k positions'
            # window offsets, A (2 rows) and B (each tile) as staged floats, one load each;
            # a 32-bit operand word built from each pair (or tf32 value); ~8 for addressing.
            k = 8 if "TF32" in targs[1] else 16
            lane_k = k // 4
            units = math.ceil(math.ceil(9 * c_b / 8) / 3)
            warp_iterations = units * positions / k
            loads = lane_k * (1 + 2 + 3)
            e.warp_instructions = warp_iterations * (3 * MMA_ISSUE + loads + (4 + 2 * 3) + 8)
            e.wavefronts = warp_iterations * loads
            return e
        stride, car = int(targs[2]), int(targs[3])
        warp_iterations = positions / 32 * math.ceil(c_a / car) * c_b
        e.warp_instructions = warp_iterations * (9 * car + car + 1 + 9 + 4)
        e.wavefronts = warp_iterations * (car + 1 + 9 * stride)
    elif family == "reduce_partials":
        grad_w, grad_b = _weight_grad_results(call)
        cols = (grad_w.numel() if grad_w is not None else 0) + (grad_b.numel() if grad_b is not None else 0)
        rows = call.launches[index_in_op - 1].grid[0]  # partial rows: the previous launch's grid.x
        e.bytes = rows * cols * 4 + cols * (grad_b if grad_b is not None else grad_w).element_size()
        e.outputs = cols
        e.flops = rows * cols
        e.waits = math.ceil(rows / 8 / 16)  # every 8th row a thread, nvcc's 16-fold unrolled loads
    elif family.startswith("bias_grad"):
        g = a["grad_output"]
        e.bytes = nbytes(g) + nbytes(a.get("relu_output")) + launch.grid[0] * g.shape[1] * 4
        e.outputs = launch.grid[0] * g.shape[1]
        e.flops = g.numel()
    elif family.startswith("max_pool"):
        if call.op == "max_pool2x2":
            e.bytes = nbytes(a["input"]) + nbytes(call.results[0])
            e.outputs = call.results[0].numel()
        else:
            e.bytes = nbytes(a["grad_output"]) + 2 * nbytes(a["input"])
            e.outputs = a["input"].numel()
    elif family.startswith("sigmoid_cross_entropy"):
        x = a["logits"]
        if family == "sigmoid_cross_entropy":  # logits, target; two sums a block (the last adds them)
            e.bytes = 2 * nbytes(x) + launch.grid[0] * 2 * 4
            e.outputs = 2
        else:  # and the gradient written
            e.bytes = 3 * nbytes(x)
            e.outputs = x.numel()
        e.flops = 8 * x.numel()
    elif family == "adam":  # params, grads, exp_avgs, exp_avg_sqs read, three of them written; one sum a block
        numel = sum(p.numel() for p in a["params"])
        e.bytes = 7 * 4 * numel + launch.grid[0] * 4
        e.outputs = numel
        e.flops = 12 * numel
    elif family in BLOCK_MODELS:
        BLOCK_MODELS[family](call, launch, e)
    else:
        raise SystemExit(f"kernel_notes: no model for kernel {launch.kernel} (add one)")
    if family.startswith(("bias_grad", "max_pool", "sigmoid_cross_entropy", "adam")):
        # grid-stride loops: an iteration's loads (a pool window's 4 at once) before its use
        elements = e.outputs if family.startswith("max_pool") else e.bytes / 8
        e.waits = math.ceil(elements / (launch.blocks * THREADS))
    return e


def _copies(x):
    """Whether the block kernels stage x by cp.async (copy_async): no conversion on the way
    (float32 and float64 into planes of their own type)."""
    return x.dtype in (torch.float32, torch.float64)


def _balanced_tile(n, hi):
    """balanced_tile (common.cuh): the least tile of at most hi covering n in as few tiles."""
    return math.ceil(n / math.ceil(n / hi))


def _pow2_at_least(n, lo, hi):
    p = lo
    while p < n and p < hi:
        p *= 2
    return p


def _staged_per_channel(launch, family, stride, cob, out, acc_bytes):
    """Shared-memory elements a convolution block stages per input channel: the tile's
    input window (odd plane stride) in each of its images, and 9 x COB weights. The tile
    follows plan_output_tile; checked against the recorded shared memory, which is
    exactly a whole number of such channels (the chunk), so a planner change that this
    copy misses stops the script instead of skewing the numbers."""
    n, _, height, width = out.shape
    cols = _pow2_at_least(width, 2, 32)
    rows = _pow2_at_least(height, 2, 256 // cols)
    samples = 256 // (rows * cols)
    if family == "correlate":
        in_rows, in_cols = (rows - 1) * stride + 3, (cols - 1) * stride + 3
    elif stride == 1:
        in_rows, in_cols = rows + 2, cols + 2
    else:
        in_rows, in_cols = rows // 2 + 1, cols // 2 + 1
    per_channel = 9 * cob + samples * ((in_rows * in_cols) | 1)
    chunk, rest = divmod(launch.shared_bytes, per_channel * acc_bytes)
    if rest or chunk < 1:
        raise SystemExit(f"kernel_notes: {launch.kernel} stages {launch.shared_bytes} B, not a whole number of "
                         f"channels of {per_channel * acc_bytes} B: update _staged_per_channel to the planner")
    return per_channel


def _weight_grad_results(call):
    weights = [t for t in call.results if isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[-2:] == (3, 3)]
    biases = [t for t in call.results if isinstance(t, torch.Tensor) and t.dim() == 1]
    return (weights[0] if weights else None), (biases[0] if biases else None)


# --- the fused blocks -------------------------------------------------------------------
# The block kernels (encoder_block_kernels.cuh, encoder_block_backward_kernels.cuh,
# decoder_block_kernels.cuh) run 256 threads that take work items (a pixel or two rows of a
# column, and 8 channels) in StridedDigits order, so a warp runs 32 consecutive items: a
# block's warp items are ceil(items / 32). (The encoder backward's block runs 512 threads
# where it fills an SM: its _Work takes the launch's.) Their tilings are copied from the planners and
# checked against the recorded grid and shared memory, as _staged_per_channel does.

THREADS = 256  # kThreads
MMA_PASS_TILES = 2  # kMmaPassTiles: tiles of 16 positions of a mma_pass warp item
MMA_A1_CHANNELS = 4  # kMmaA1Channels: the input channels from which a1 takes the tensor cores
GROUP = 8  # kBlockGroup: a work item's output channels
WEIGHT_GRAD_CHANNELS = 4  # kWeightGradChannels: a decoder weight-gradient item's input channels
WEIGHT_VEC = 4  # a tap's 8 weights: two Vec<float, 4> broadcast loads (vec_width<float, 8>)
BLOCK_SMEM_BUDGET = 44 * 1024  # kSmemBudget: the forward blocks' tiles
BLOCK_FILL = 264  # kBlockFill
GRID_SUMS_GROUP = 32  # kGridSumsGroup
GRAD_SUMS, GRAD_CHANNELS = 10, 4  # kGradSums, kGradChannels (the encoder backward's weight gradients)
POOL_INSTRUCTIONS = 30  # a max-pool window in shared memory: 4 loads, compares, index, store
# Per staged weight element, estimated from the source (not the SASS): stage_weight_rows, a
# coalesced load and its address (a vector store per 4); the transposed copies (the decoder's
# layers, the encoder backward's) divide by run-time channel counts for every element.
WEIGHT_STAGE_INSTRUCTIONS = {"rows": 6, "transposed": 30}


def _warp_items(items):
    return math.ceil(items / 32)


@dataclass
class _Work:
    """Per-block work of a block kernel, summed in warp instructions, wavefronts and FMAs."""

    nhwc: bool
    threads: int = THREADS
    issue: float = 0.0
    wavefronts: float = 0.0
    fmas: float = 0.0
    waits: float = 0.0

    def windows(self, items, channels, pixels, input_conflict=1, first=True):
        """`items` thread items of accumulate_windows<pixels, 8> over `channels`: per channel
        and tap the (pixels + 2) x 3 window loads (each once), two broadcast weight loads and
        8 x pixels FFMA, 2 for the loop; per item the sums stored (and read where not the
        first chunk)."""
        warps = _warp_items(items)
        loads_in, loads_w = (pixels + 2) * 3, 9 * GROUP // WEIGHT_VEC
        ffma = 9 * GROUP * pixels
        sums = pixels * GROUP * (1 if first else 2)
        self.issue += warps * (channels * (ffma + loads_in + loads_w + 2) + sums)
        self.wavefronts += warps * (channels * (loads_in * input_conflict + loads_w) + sums)
        self.fmas += items * channels * ffma

    def mma_layer(self, positions, channels, groups, input_conflict=1, taps=9):
        """mma_pass_positions over `positions` (`taps` of the 9 each: a stride-2 transposed layer's parity
        class 1, 2 or 4): a warp item per MMA_PASS_TILES tiles of 16 positions (the last item's
        tiles past the end computed too); per 8-channel group of a tap, each output group's B
        fragment once (2 loads, 2 cvt to tf32), each tile's A fragment (4 loads, 4 cvt) and its
        m16n8k8 products, 3 for the loop; per tile ~40 for its positions' addresses, and per
        group and position the epilogue's 2 channels (bias, ReLU, rounding, the shared store:
        ~12)."""
        items = math.ceil(positions / (16 * MMA_PASS_TILES))
        tiles, finished = items * MMA_PASS_TILES, math.ceil(positions / 16)
        steps = taps * math.ceil(channels / 8)
        self.issue += (items * steps * (MMA_PASS_TILES * (8 + groups * MMA_ISSUE) + groups * 4 + 3)
                       + tiles * 40 + finished * groups * 2 * 12)
        self.wavefronts += (items * steps * (MMA_PASS_TILES * 4 * input_conflict + 2 * groups)
                            + finished * groups * 2 * 2)
        self.fmas += positions * channels * taps * GROUP * groups

    def mma_strips(self, rows, cols, samples, channels, groups, pitch, channel_stride):
        """mma_pass_strips (the stride-1 correlation) over rows x cols x samples: a warp item
        per strip of 8 columns and 2 x MMA_PASS_TILES rows of a sample (lanes past the columns,
        rows past the end computed too); per k-step (8 channels) and column offset the
        strip's 2 x MMA_PASS_TILES + 2 window rows of both channel halves (a load and a cvt
        each), per tap each group's B fragment (2 loads, 2 cvt) and the tiles' products, 3 for
        the tap loop (the products of tiles wholly past the rows skipped); per tile ~40 for
        the window rows' addresses, and per group and row of 8 finished positions the
        epilogue's 2 channels (~12, 2 shared stores)."""
        band = 2 * MMA_PASS_TILES
        strips = math.ceil(cols / 8)
        items = samples * math.ceil(rows / band) * strips
        tiles = samples * math.ceil(rows / 2) * strips
        steps = math.ceil(channels / 8)
        a_loads = 3 * 2 * (band + 2)
        conflict = _strip_conflicts(band, pitch, channel_stride)
        self.issue += (items * steps * (2 * a_loads + 9 * (groups * 4 + 3)) + tiles * steps * 9 * groups * MMA_ISSUE
                       + items * MMA_PASS_TILES * 40 + samples * strips * rows * groups * 12)
        self.wavefronts += (items * steps * (a_loads * conflict + 9 * 2 * groups)
                            + samples * strips * rows * groups * 2)
        self.fmas += rows * cols * samples * channels * 9 * GROUP * groups

    def taps(self, items, channels, issued_taps, group, thread_taps=None, input_conflict=1, pixels=1):
        """Items of a transposed correlation (accumulate_transposed, the encoder backward's
        stride-2 loop) issuing `issued_taps` taps per channel and warp (the union of its
        threads' taps, from _issued_taps) where a thread computes `thread_taps` (stride 2:
        2.25 on average): a tap is an input load per pixel of the item, the group's weight
        loads (once for the pixels) and its FFMA."""
        warps = _warp_items(items)
        loads_w = max(1, group // WEIGHT_VEC)
        self.issue += warps * channels * (issued_taps * ((group + 1) * pixels + loads_w) + 2)
        self.wavefronts += warps * channels * issued_taps * (input_conflict * pixels + loads_w)
        self.fmas += items * channels * (thread_taps or issued_taps) * group * pixels

    def last_layer(self, items, channels, pixels, group):
        """Items of the decoder's last layer (accumulate_last_layer: `pixels` of a column
        and `group` channels a thread): per channel its (pixels + 2) x 3 window's loads,
        per tap the group's weight loads and group x pixels FFMA, 2 for the loop."""
        warps = _warp_items(items)
        loads_in, loads_w = 3 * (pixels + 2), 9 * max(1, group // WEIGHT_VEC)
        ffma = 9 * group * pixels
        self.issue += warps * channels * (ffma + loads_in + loads_w + 2)
        self.wavefronts += warps * channels * (loads_in + loads_w)
        self.fmas += items * channels * ffma

    def stage(self, elements, weights=None, channels=1, copies=False, own_wait=True):
        """Elements staged into shared memory: an input's or a gradient's window of
        `channels`, or `weights` ("rows" or "transposed", WEIGHT_STAGE_INSTRUCTIONS: a group
        of 8 loads a thread at a time). `copies`: by cp.async (copy_async: float32 with no
        gate), every copy in flight at once and one wait at the barrier after them. No waits
        of its own (`own_wait` False) where they overlap another staging's (copies issued
        before the same barrier) or work that covers their latency."""
        per_element = STAGE_INSTRUCTIONS[self.nhwc] if weights is None else WEIGHT_STAGE_INSTRUCTIONS[weights]
        self.issue += elements / 32 * per_element
        self.wavefronts += elements / 32
        if not own_wait:
            return
        if copies:
            self.waits += 1
        elif weights is None:
            self.waits += staging_waits(elements, self.nhwc and channels % 4 == 0, threads=self.threads)
        else:
            self.waits += math.ceil(elements / (self.threads * GROUP))

    def global_loads(self, elements):
        """A loop over `elements` with a global load each, batched as the staging."""
        self.waits += staging_waits(elements, threads=self.threads)

    def fill(self, elements):
        """Shared memory zeroed: a store and the loop, a thread per element."""
        self.issue += elements / 32 * 3
        self.wavefronts += elements / 32

    def add(self, e, blocks):
        e.waits += self.waits
        e.warp_instructions += self.issue * blocks
        e.wavefronts += self.wavefronts * blocks
        e.flops += 2 * self.fmas * blocks


def _bank_wavefronts(addresses):
    """Wavefronts of one warp's 32-bit shared loads: the most distinct words in one bank."""
    banks = {}
    for a in set(addresses):
        banks[a % 32] = banks.get(a % 32, 0) + 1
    return max(banks.values())


def _window_conflicts(cols, rows, samples, step, pitch, sample_stride):
    """Wavefronts of a warp's input loads, averaged over a block's warps, where work items run
    (column, row, sample) and an item's window starts at sample_stride x sample + step x (row
    x pitch + column): the pair rows of layer_pass (step 2 in rows only: pass step=(2, 1)),
    the stride-2 windows (step 2 both ways)."""
    row_step, col_step = step
    items = cols * rows * samples
    total = 0
    for first in range(0, items, 32):
        words = [(i // (cols * rows)) * sample_stride + row_step * ((i // cols) % rows) * pitch + col_step * (i % cols)
                 for i in range(first, min(first + 32, items))]
        total += _bank_wavefronts(words)
    return total / math.ceil(items / 32)


def _mma_conflicts(cols, rows, samples, pitch, sample_stride, channel_stride, stride=1):
    """Wavefronts of mma_pass_positions' A loads, averaged over the tiles: lane (g, t) reads
    position 16 x tile + g (row-major over rows x cols per sample; the second load g + 8;
    its window `stride` rows and columns from the last's) of channel t."""
    positions = cols * rows * samples
    total = tiles = 0
    for first in range(0, positions, 16):
        for half in (0, 8):
            words = []
            for lane in range(32):
                p = min(first + half + lane // 4, positions - 1)
                s, r, c = p // (rows * cols), p % (rows * cols) // cols, p % cols
                words.append(s * sample_stride + stride * (r * pitch + c) + (lane % 4) * channel_stride)
            total += _bank_wavefronts(words)
            tiles += 1
    return total / tiles


def _strip_conflicts(band, pitch, channel_stride):
    """Wavefronts of mma_pass_strips' A loads: lane (g, t) reads column x0 + g + kx of a
    window row, channel t; averaged over the strip's first columns (x0 a multiple of 8) in a
    row and the column offsets."""
    loads = [_bank_wavefronts([(lane % 4) * channel_stride + j * pitch + x0 + lane // 4 + kx for lane in range(32)])
             for j in range(band + 2) for x0 in range(0, max(8, pitch - 2), 8) for kx in range(3)]
    return sum(loads) / len(loads)


def tensor_cores(x):
    """The block kernels' tensor_cores argument (encoder_block_args.h; the emulator's device
    is sm_90)."""
    tf32_ok = x.dtype != torch.float32 or torch.backends.cudnn.allow_tf32
    return x.dtype != torch.float64 and tf32_ok


def mma_pass_fits(x, channels):
    """Whether the encoder kernels' pass producing `channels` runs on tensor cores
    (tensor_cores and mma_pass_fits)."""
    return tensor_cores(x) and channels <= 2 * GROUP


def a1_on_tensor_cores(x, c1):
    """a1_on_tensor_cores: a1 = correlate(x, w1) on tensor cores too, from
    MMA_A1_CHANNELS input channels on."""
    return mma_pass_fits(x, c1) and x.shape[1] >= MMA_A1_CHANNELS


def _mma_channel_stride(n):
    """mma_channel_stride: at least n, 24 mod 32."""
    return n + (24 - n) % 32


def _backward_pitch(w):
    """backward_pitch: the least pitch at least w + 2 that is 6 to 13 mod 32."""
    pitch = w + 2
    return pitch if 6 <= pitch % 32 <= 13 else pitch + (38 - pitch % 32) % 32


def _grid_sums_bytes(blocks, size):
    """finish_grid_sums' traffic: each block's row written, read by its group's last block,
    the groups' rows written and read by the grid's last; the totals, float32."""
    groups = math.ceil(blocks / GRID_SUMS_GROUP)
    return (2 * blocks + 2 * groups + 1) * size * 4


def _check_plan(launch, blocks, smem_bytes):
    if launch.blocks != blocks or launch.shared_bytes != smem_bytes:
        raise SystemExit(f"kernel_notes: {launch.kernel} planned {launch.blocks} blocks, {launch.shared_bytes} B; "
                         f"the copy of its planner says {blocks}, {smem_bytes} B: update it")


def _encoder_tiling(n, c0, c1, h, w, strided, launch, mma, mma_a1):
    """plan_encoder_block: the output tile, images per block and the regions (a2, a1, input);
    `mma`: a2 on tensor cores, whose A loads want a1's channels 8 banks apart; `mma_a1`: a1
    too (the input window's channels likewise, at least a k-step of them a chunk)."""
    h_out, w_out = math.ceil(h / 2), math.ceil(w / 2)
    groups = math.ceil(c1 / GROUP)
    rows, cols = _balanced_tile(h_out, 8), _balanced_tile(w_out, 8)
    tiles = math.ceil(h_out / rows) * math.ceil(w_out / cols)
    samples = 1
    while samples * 2 * 4 * rows * cols <= THREADS and tiles * math.ceil(n / (samples * 2)) >= BLOCK_FILL:
        samples *= 2
    least_chunk = min(c0, 8) if mma_a1 else 1
    while True:
        r2, c2 = 2 * rows + (2 if strided else 0), 2 * cols + (1 if strided else 0)
        r1, c1_ = r2 + 2, c2 + 2
        r0, c0_ = r1 + 2, c1_ + 2
        w2 = groups * GROUP * c1 * 9
        stride1 = _mma_channel_stride(r1 * c1_) if mma else (r1 * c1_) | 1
        fixed = w2 * (2 if strided else 1) + samples * c1 * (stride1 + ((r2 * c2) | 1))
        stride0 = _mma_channel_stride(r0 * c0_) if mma_a1 else (r0 * c0_) | 1
        per_channel = samples * stride0 + groups * GROUP * 9
        if (fixed + per_channel * least_chunk) * 4 <= BLOCK_SMEM_BUDGET:
            break
        if samples > 1:
            samples //= 2
        elif rows >= cols and rows > 1:
            rows = _balanced_tile(h_out, rows - 1)
        else:
            cols = _balanced_tile(w_out, cols - 1)
    blocks = math.ceil(h_out / rows) * math.ceil(w_out / cols) * math.ceil(n / samples)
    chunk, rest = divmod(launch.shared_bytes // 4 - fixed, per_channel)
    if rest or chunk < 1 or launch.blocks != blocks:
        raise SystemExit(f"kernel_notes: {launch.kernel}: {launch.blocks} blocks, {launch.shared_bytes} B, not "
                         f"the copy of plan_encoder_block's ({blocks} blocks, chunks of {per_channel * 4} B)")
    return dict(rows=rows, cols=cols, samples=samples, groups=groups, r2=r2, c2=c2, r1=r1, c1=c1_, r0=r0, c0=c0_,
                chunk=chunk, stride0=stride0, sample0=chunk * stride0, sample1=c1 * stride1,
                sample2=c1 * ((r2 * c2) | 1), mma=mma, mma_a1=mma_a1)


def _encoder_block(call, launch, e):
    """encoder_block_kernel: per block, a1 over the a2 region plus a 1-pixel halo (from the
    input window, a further pixel, staged once per input channel), a2 over the output tile's
    window (2 x tile, +1 column and +2 rows strided), then the pool or the stride-2
    correlation; the halos are recomputed by every block that needs them."""
    a = call.args
    x, weights = a["input"], a["weights"]
    n, c0, h, w = x.shape
    c1, strided = weights[0].shape[0], len(weights) == 3
    t = _encoder_tiling(n, c0, c1, h, w, strided, launch, mma_pass_fits(x, c1), a1_on_tensor_cores(x, c1))
    s, g = t["samples"], t["groups"]
    work = _Work(launch.kernel.endswith("true>"))
    copies = _copies(x)
    work.stage(s * c0 * t["r0"] * t["c0"], channels=c0, copies=copies)
    work.stage(g * GROUP * 9 * (c0 + c1 * (2 if strided else 1)), "rows", copies=copies, own_wait=not copies)
    # a1 (the input channels' chunks: sums kept in shared memory between them), a2, each over
    # its region; the warp's pair rows conflict where a region is narrower than 32 columns
    if t["mma_a1"]:
        for first in range(0, c0, t["chunk"]):
            work.mma_strips(t["r1"], t["c1"], s, min(t["chunk"], c0 - first), g, t["c0"], t["stride0"])
    else:
        conflict = _window_conflicts(t["c1"], t["r1"] // 2, s, (2, 1), t["c0"], t["sample0"])
        work.windows(t["c1"] * t["r1"] // 2 * s * g, c0, 2, input_conflict=conflict)
    if t["mma"]:
        work.mma_strips(t["r2"], t["c2"], s, c1, g, t["c1"], t["sample1"] // c1)
    else:
        conflict = _window_conflicts(t["c2"], t["r2"] // 2, s, (2, 1), t["c1"], t["sample1"])
        work.windows(t["c2"] * t["r2"] // 2 * s * g, c1, 2, input_conflict=conflict)
    if strided:  # stride-2 windows over a2
        conflict = _window_conflicts(t["cols"], t["rows"], s, (2, 2), t["c2"], t["sample2"])
        work.windows(t["cols"] * t["rows"] * s * g, c1, 1, input_conflict=conflict)
    else:
        work.issue += _warp_items(c1 * t["rows"] * t["cols"] * s) * POOL_INSTRUCTIONS
        work.wavefronts += _warp_items(c1 * t["rows"] * t["cols"] * s) * 4
    work.add(e, launch.blocks)
    out, winners = call.results[:2]
    e.bytes = nbytes(x) + sum(nbytes(t) for t in weights + a["biases"]) + nbytes(out) + nbytes(winners)
    e.outputs = out.numel()


def _weight_grad_pass(work, c_g, c_src, g_rows, g_cols, samples, g_plane, g_pitch, src_plane, src_pitch, stride):
    """weight_grad_pass: an item of 4 gradient channels, one source channel and a slice of
    the rows; per position 9 source loads, 4 gradient loads, 36 + 4 FFMA/FADD, ~3 for the
    walk; slices' sums through the scratch. Bank conflicts from the first warp's addresses."""
    pairs = math.ceil(c_g / GRAD_CHANNELS) * c_src
    slices = min(1 if pairs >= work.threads else work.threads // pairs, g_rows)
    items = pairs * slices
    positions = samples * math.ceil(g_rows / slices) * g_cols  # the longest slice
    per_position = 9 + GRAD_CHANNELS + GRAD_CHANNELS * GRAD_SUMS + 3
    lanes = [(i % pairs, i // pairs) for i in range(min(32, items))]
    src_words = [(p % c_src) * src_plane + stride * sl * src_pitch for p, sl in lanes]
    g_words = [(p // c_src) * GRAD_CHANNELS * g_plane + sl * g_pitch for p, sl in lanes]
    warps = _warp_items(items)
    work.issue += warps * positions * per_position
    work.wavefronts += warps * positions * (9 * _bank_wavefronts(src_words) + GRAD_CHANNELS * _bank_wavefronts(g_words))
    work.fmas += pairs * samples * g_rows * g_cols * GRAD_CHANNELS * GRAD_SUMS
    if slices > 1:  # per channel: the items' sums stored, each pair's slices summed
        work.issue += GRAD_CHANNELS * (warps * GRAD_SUMS + _warp_items(pairs) * slices * GRAD_SUMS * 2)
        work.wavefronts += GRAD_CHANNELS * (warps * GRAD_SUMS + _warp_items(pairs) * slices * GRAD_SUMS)


MMA_GRAD_TILES = 6  # kMmaGradTiles: n-tiles of a weight_grad_pass_mma warp item


@functools.cache
def _mma_grad_wavefronts(c_g, c_src, g_rows, g_cols, samples, g_plane, g_pitch, src_plane, src_pitch, stride):
    """weight_grad_pass_mma's fragment loads, in wavefronts over every k-step of the block:
    the A loads (channels gl and gl + 8 at positions t and t + 4; none past C_g) and, per
    n-tile, the B loads (column n = tile x 8 + gl: channel n / 9, tap n % 9, at the same
    positions), the planes `samples` deep (c_g and c_src channels a sample)."""
    per_sample, columns = g_rows * g_cols, c_src * 9
    positions, tiles = samples * per_sample, math.ceil(columns / 8)
    a_total, b_total = 0, [0] * tiles
    for first in range(0, positions, 4):  # a step's half: 4 positions, the lanes' t
        at = []
        for t in range(4):
            p = first + t
            if p < positions:
                sample, r, c = p // per_sample, p % per_sample // g_cols, p % g_cols
                at.append((t, sample * c_g * g_plane + r * g_pitch + c,
                           sample * c_src * src_plane + stride * (r * src_pitch + c)))
        for channel0 in (0, 8):
            words = [(channel0 + gl) * g_plane + g for gl in range(8) if channel0 + gl < c_g for _, g, _ in at]
            a_total += _bank_wavefronts(words) if words else 0
        for tile in range(tiles):
            words = [(n // 9) * src_plane + (n % 9) // 3 * src_pitch + n % 3 + src
                     for n in range(tile * 8, min(tile * 8 + 8, columns)) for _, _, src in at]
            b_total[tile] += _bank_wavefronts(words)
    return a_total, b_total


def _weight_grad_pass_mma(work, c_g, c_src, g_rows, g_cols, samples, g_plane, g_pitch, src_plane, src_pitch, stride,
                          bias=True):
    """weight_grad_pass_mma: warps of MMA_GRAD_TILES n-tiles (c_src x 9 columns) and a slice
    of the 8-position k-steps; per step 4 A loads, 2 B loads a tile, a cvt each, ~12 for the
    positions' walk, an m16n8k8 a tile; the slices' row updates. Bank conflicts from the
    first step's addresses. With `bias`, bias_grad_pass: a thread per channel and share of
    the positions (a load and an add each, ~4 with the walk)."""
    tiles = math.ceil(c_src * 9 / 8)
    groups = math.ceil(tiles / MMA_GRAD_TILES)
    slices = max(1, work.threads // 32 // groups)
    steps = math.ceil(samples * g_rows * g_cols / 8)
    a_loads, b_loads = _mma_grad_wavefronts(c_g, c_src, g_rows, g_cols, samples, g_plane, g_pitch, src_plane,
                                            src_pitch, stride)
    per_step_issue = 8 + 12 + MMA_GRAD_TILES * 4
    for group in range(groups):
        # (the loads of tiles past the columns are predicated off: no wavefronts)
        in_group = min(MMA_GRAD_TILES, tiles - group * MMA_GRAD_TILES)
        work.issue += steps * (per_step_issue + in_group * MMA_ISSUE)
        work.wavefronts += a_loads + sum(b_loads[group * MMA_GRAD_TILES:(group + 1) * MMA_GRAD_TILES])
    work.issue += slices * groups * MMA_GRAD_TILES * 4 * 2  # the row, slice after slice
    positions = samples * g_rows * g_cols
    work.fmas += c_g * c_src * 9 * positions
    if bias:
        work.issue += positions * c_g / 32 * 4
        work.wavefronts += positions * c_g / 32


def _encoder_block_backward(call, launch, e):
    """encoder_block_backward_kernel: whole images per block in padded planes; a1 recomputed,
    and a2 unless the forward's pool winners are given; grad_z2 (the pool's winners, or dw_down
    and the stride-2 transposed correlation); dw2; grad_z1 (stride-1 transposed: a correlation
    with the flipped weights); dw1 and the input gradient; the partial rows summed by
    finish_grid_sums."""
    a = call.args
    x, weights, go = a["input"], a["weights"], a["grad_output"]
    n, c0, h, w = x.shape
    c1, strided = weights[0].shape[0], len(weights) == 3
    h_out, w_out = go.shape[2], go.shape[3]
    g1, g0 = math.ceil(c1 / GROUP), math.ceil(c0 / GROUP)
    rows = h + (h & 1)
    out_pitch, out_plane = w_out + 1, (((h_out + 1) * (w_out + 1)) | 1) if strided else 0
    w1_size = max(g1 * GROUP * c0 * 9, g0 * GROUP * c1 * 9)
    w2_size = g1 * GROUP * c1 * 9
    threads = launch.threads_per_block  # 512 where a block fills an SM (backward_max_threads)
    fixed = w1_size + w2_size * (2 if strided else 1) + threads * GRAD_SUMS
    budget = launch.shared_bytes // 4  # the opt-in limit is the device's: take the plan's images
    # the planes' pitch and channel stride where the tensor cores may read them: backward_pitch
    # (W + 2 where only that fits the device), mma_channel_stride; the pool's output gradient
    # and winner codes staged (pool_go, winner_slots) where they fit too
    pool_go = c1 * h_out * w_out
    winners = a.get("winners")  # the forward's pool winners: a2 is not recomputed
    winner_slots = math.ceil(pool_go / 4) + 1 if winners is not None else 0  # their bytes in words
    pitches = ([_backward_pitch(w)] if tensor_cores(x) else []) + [w + 2]
    for pitch, staged in [(pitches[0], not strided and _copies(x))] + [(p, False) for p in pitches]:
        plane = _mma_channel_stride((rows + 2) * pitch) if tensor_cores(x) else ((rows + 2) * pitch) | 1
        per_image = (c0 + 2 * c1) * plane + c1 * out_plane + (pool_go + winner_slots if staged else 0)
        samples = 1
        while fixed + 2 * samples * per_image <= budget and math.ceil(n / (2 * samples)) >= BLOCK_FILL:
            samples *= 2
        if fixed + samples * per_image == budget:
            break
    _check_plan(launch, math.ceil(n / samples), (fixed + samples * per_image) * 4)
    sums = (c1 * c0 * 9 + c1) + (c1 * c1 * 9 + c1) * (2 if strided else 1)
    work = _Work(launch.kernel.endswith("true>"), threads)
    copies = _copies(x)
    work.stage(samples * c0 * (rows + 2) * (w + 2), channels=c0, copies=copies)
    if strided:  # gated by the output's ReLU where it has one
        work.stage(samples * c1 * (h_out + 1) * (w_out + 1), channels=c1, copies=copies and not a["relu"])
    work.stage(g1 * GROUP * c0 * 9 + w2_size, "rows", copies=copies, own_wait=not copies)  # w1, w2 for the recompute
    # w_down with the input; w1 and w2 copied during phases 2-4, waited for before phase 5
    work.stage(g0 * GROUP * c1 * 9 + w2_size * (2 if strided else 1), "transposed", copies=copies,
               own_wait=not copies)
    work.fill(2 * samples * c1 * plane)
    pairs_items = w * (rows // 2) * samples

    def conflict(channels):  # layer_pass's pair rows over padded planes of `channels`
        return _window_conflicts(w, rows // 2, samples, (2, 1), pitch, channels * plane)

    if a1_on_tensor_cores(x, c1):  # a1
        work.mma_strips(rows, w, samples, c0, g1, pitch, plane)
    else:
        work.windows(pairs_items * g1, c0, 2, input_conflict=conflict(c0))
    weight_grads = _weight_grad_pass_mma if mma_pass_fits(x, c1) else _weight_grad_pass
    if winners is None and mma_pass_fits(x, c1):  # a2
        work.mma_strips(rows, w, samples, c1, g1, pitch, plane)
    elif winners is None:
        work.windows(pairs_items * g1, c1, 2, input_conflict=conflict(c1))
    if strided:
        weight_grads(work, c1, c1, h_out, w_out, samples, out_plane, out_pitch, plane, pitch, 2)
        items = w * h * samples * g1
        # a warp's threads take consecutive x, both parities (and rows where W < 32: both
        # row parities): 2 x 2 taps issued (2 x 1.5 over one row); the weights as two vectors
        work.taps(items, c1, 4 if w < 32 else 3, GROUP, thread_taps=2.25)
    else:
        windows = _warp_items(c1 * h_out * w_out * samples)
        work.issue += windows * (POOL_INSTRUCTIONS + 8)
        work.wavefronts += windows * 8
        if staged:  # copied in with the input, behind its wait; read from shared memory here
            work.stage(samples * (pool_go + winner_slots), "rows", copies=True, own_wait=False)
        else:
            work.global_loads(c1 * h_out * w_out * samples)  # the output gradient, a window each
    weight_grads(work, c1, c1, h, w, samples, plane, pitch, plane, pitch, 1)  # dw2
    if mma_pass_fits(x, c1):  # grad_z1
        work.mma_strips(rows, w, samples, c1, g1, pitch, plane)
    else:
        work.windows(pairs_items * g1, c1, 2, input_conflict=conflict(c1))
    weight_grads(work, c1, c0, h, w, samples, plane, pitch, plane, pitch, 1)  # dw1
    input_grad = bool(a.get("input_grad"))
    if input_grad and mma_pass_fits(x, c0):
        work.mma_strips(rows, w, samples, c1, g0, pitch, plane)
    elif input_grad:
        work.windows(pairs_items * g0, c1, 2, input_conflict=conflict(c1))
    work.issue += _warp_items(sums) * 4  # the row's stores
    work.add(e, launch.blocks)
    e.bytes = (nbytes(x) + nbytes(go) + (nbytes(a.get("output")) if strided and a["relu"] else 0) + nbytes(winners)
               + sum(nbytes(t) for t in weights + a["biases"]) * 2  # read, gradients written
               + (nbytes(x) if input_grad else 0) + _grid_sums_bytes(launch.blocks, sums))
    e.outputs = sums + (x.numel() if input_grad else 0)


def _issued_taps(width, rows, samples_groups, pixels=1):
    """Taps per channel a warp issues in decoder_hidden_rows' stride-2 transposed
    correlation, averaged over its warps: items run (`pixels` columns of a parity, column
    parity, row: the even rows, then the odd, ...), a thread's taps follow its pixels'
    parities (1, 2, 2 or 4) and a warp issues the union of its threads' (a warp over both
    row parities runs all three rows of taps)."""
    per_parity = math.ceil(width / 2 / pixels)
    half = (rows + 1) // 2
    items = per_parity * 2 * rows * samples_groups
    total = 0
    for first in range(0, items, 32):
        taps = set()
        for i in range(first, min(first + 32, items)):
            x = 2 * pixels * (i % per_parity) + (i // per_parity) % 2
            r = (i // (2 * per_parity)) % rows
            y = 2 * r if r < half else 2 * (r - half) + 1
            ky = {k for k in range(3) if (y + 1 - k) % 2 == 0}
            kx = {k for k in range(3) if (x + 1 - k) % 2 == 0}
            taps |= {(p, q) for p in ky for q in kx}
        total += len(taps)
    return total / math.ceil(items / 32)


def _decoder_tiling(call, launch, backward):
    """plan_decoder_block: images per block, strip rows (forward) and the planes' sizes."""
    a = call.args
    x, weights = a["input"], a["weights"]
    n, _, h, w = x.shape
    chans = [x.shape[1]] + [wt.shape[1] for wt in weights]
    layers = len(weights)
    # decoder_block_loss and its backward: the crop is the target's size
    h_out, w_out = a["output_size"] if "output_size" in a else a["target"].shape[2:]

    # the planes' channel stride: mma_channel_stride where the tensor cores read them (mma_pass's
    # A fragments: 8 positions of 4 channels; weight_grad_pass_mma's: of 8 channels)
    mma = tensor_cores(x)

    def weight_elements(c_in, c_out, group):
        return math.ceil(c_out / group) * group * c_in * 9

    def elements(samples, strip):
        offset = max([weight_elements(chans[i], chans[i + 1], GROUP) for i in range(layers - 1)], default=0)
        if backward:
            offset = max([offset] + [weight_elements(chans[i + 1], chans[i], GROUP) for i in range(layers)])
        else:
            offset += weight_elements(chans[layers - 1], chans[layers], 1 if chans[layers] == 1 else GROUP)
        planes = []
        for i in range(layers + 1 if backward else layers):
            scale = min(i, layers - 1)
            strip_plane = not backward and layers > 1 and i == layers - 1
            prows = strip + 2 if strip_plane else (h << scale) + 2
            pcols = (w << scale) + 2
            plane = _mma_channel_stride(prows * pcols) if mma else (prows * pcols) | 1
            planes.append((prows, pcols, plane))
            offset += samples * chans[i] * plane
        return offset, planes

    budget = BLOCK_SMEM_BUDGET if not backward else launch.shared_bytes
    strip = h_out
    while elements(1, strip)[0] * 4 > budget and strip > 1 and layers > 1 and not backward:
        strip = math.ceil(strip / 2)
    samples = 1
    while math.ceil(n / (samples * 2)) >= BLOCK_FILL and elements(samples * 2, strip)[0] * 4 <= budget:
        samples *= 2
    total, planes = elements(samples, strip)
    # plan_loss_target: the backward with the loss alone copies the block's target and grad_loss
    # in after the planes (float32: no conversion)
    loss_copied = (backward and call.op == "decoder_block_loss_backward" and _copies(x)
                   and a.get("grad_output") is None)
    if loss_copied:
        total += samples * chans[layers] * h_out * w_out + 1
    _check_plan(launch, math.ceil(n / samples), total * 4)
    return dict(samples=samples, strip=strip, planes=planes, chans=chans, layers=layers, h=h, w=w,
                h_out=h_out, w_out=w_out, loss_copied=loss_copied)


def _decoder_hidden_taps(work, call, t, i, y_first, rows):
    """Hidden layer i's output rows [y_first, y_first + rows) of the block's images, as
    decoder_hidden_rows computes them in the forward and in the backward's recompute: on tensor
    cores (mma_pass_fits) the rows outside the image zeroed and each row and column parity's
    grid over the input (the rows inside) through mma_pass with its 1, 2 or 4 taps; else two
    pixels of a column parity a thread."""
    s, c_a, c_b = t["samples"], t["chans"][i], t["chans"][i + 1]
    groups, size_w = math.ceil(c_b / GROUP), t["w"] << (i + 1)
    if not mma_pass_fits(call.args["input"], c_b):
        pixels = 2
        work.taps(math.ceil(size_w / 2 / pixels) * 2 * rows * s * groups, c_a,
                  _issued_taps(size_w, rows, s * groups, pixels), GROUP, thread_taps=2.25, pixels=pixels)
        return
    _, cols, plane = t["planes"][i]
    y_lo, y_hi = max(y_first, 0), min(y_first + rows, t["h"] << (i + 1))
    work.fill((rows - (y_hi - y_lo)) * size_w * c_b * s)
    for row_parity in (0, 1):
        y0 = y_lo + ((y_lo ^ row_parity) & 1)  # decoder_parity_mma: the parity's first row
        if y0 >= y_hi:
            continue
        parity_rows = (y_hi - y0 + 1) // 2
        conflict = _mma_conflicts(cols - 2, parity_rows, s, cols, c_a * plane, plane)
        for col_parity in (0, 1):
            work.mma_layer(parity_rows * (cols - 2) * s, c_a, groups, input_conflict=conflict,
                           taps=(1 + row_parity) * (1 + col_parity))


def _decoder_block(call, launch, e):
    """decoder_block_kernel: whole images per block; the hidden stride-2 layers over whole
    planes, the last hidden layer strip by strip (its two border rows recomputed for every
    strip), the stride-1 last layer at the crop's positions only."""
    t = _decoder_tiling(call, launch, backward=False)
    s, chans, layers = t["samples"], t["chans"], t["layers"]
    work = _Work(launch.kernel.endswith("true>"))
    p0 = t["planes"][0]
    copies = _copies(call.args["input"])
    work.stage(s * chans[0] * p0[0] * p0[1], channels=chans[0], copies=copies)
    # the last layer's weights and the first's with the input (one wait for the copies), then
    # each hidden layer's just before the layer
    for i in [layers - 1] + list(range(layers - 1)):
        work.stage(chans[i] * chans[i + 1] * 9, "transposed", copies=copies,
                   own_wait=not copies or 0 < i < layers - 1)
    work.fill(sum(s * chans[i] * pl[2] for i, pl in enumerate(t["planes"]) if i > 0))
    top = ((t["h"] << (layers - 1)) - t["h_out"]) // 2  # the crop's first row
    for i in range(layers - 1):
        if i + 2 < layers:
            strips = [(0, t["h"] << (i + 1))]
        else:  # the last layer's input rows of a strip: its window's, one above and below
            strips = [(top + y - 1, min(t["strip"], t["h_out"] - y) + 2) for y in range(0, t["h_out"], t["strip"])]
        for y_first, rows in strips:
            _decoder_hidden_taps(work, call, t, i, y_first, rows)
    last_group = 1 if chans[layers] == 1 else GROUP
    pixels = 4 if last_group == 1 else 1  # decoder_last_pixels: a thread's pixels of a column
    row_groups = sum(math.ceil(min(t["strip"], t["h_out"] - y) / pixels) for y in range(0, t["h_out"], t["strip"]))
    items = t["w_out"] * row_groups * s * math.ceil(chans[layers] / last_group)
    work.last_layer(items, chans[layers - 1], pixels, last_group)
    a = call.args
    out = call.results[0]
    loss = call.op == "decoder_block_loss"
    if loss:  # each logit's cross-entropy and squared error: the target's load, exp, log1p, a division
        work.issue += _warp_items(items) * pixels * last_group * LOSS_INSTRUCTIONS
    work.add(e, launch.blocks)
    e.bytes = nbytes(a["input"]) + sum(nbytes(t) for t in a["weights"] + a["biases"]) + nbytes(out)
    if loss:
        e.bytes += nbytes(a["target"]) + _grid_sums_bytes(launch.blocks, 2)
    e.outputs = out.numel() + (2 if loss else 0)


def _decoder_block_backward(call, launch, e):
    """decoder_block_backward_kernel: whole images per block in opt-in shared memory; the
    hidden layers recomputed whole; per layer from the last, its weight and bias gradients
    (a thread per element, each summing every position of the block's images) and its
    input's gradient (over the output gradient, stride 2 but the last: mma_pass where it
    fits and the gradient has more than one channel, else accumulate_windows);
    the partial rows summed by finish_grid_sums."""
    t = _decoder_tiling(call, launch, backward=True)
    s, chans, layers, planes = t["samples"], t["chans"], t["layers"], t["planes"]
    a = call.args
    work = _Work(launch.kernel.endswith("true>"))
    p0, pg = planes[0], planes[layers]
    loss = call.op == "decoder_block_loss_backward"
    copies = _copies(a["input"])
    work.stage(s * chans[0] * p0[0] * p0[1], channels=chans[0], copies=copies)
    if loss:  # stage_loss_grad: the logits and the target (and grad_output) an element, and the
        # output gradient from them: a sigmoid per element
        work.issue += s * chans[layers] * pg[0] * pg[1] / 32 * (STAGE_INSTRUCTIONS[False] + LOSS_GRAD_INSTRUCTIONS)
        work.wavefronts += s * chans[layers] * pg[0] * pg[1] / 32
        if t["loss_copied"]:  # copies behind the input's wait; finish_loss_grad reads both, writes one
            work.wavefronts += s * chans[layers] * pg[0] * pg[1] / 32 * 2
        else:  # loaded, batched
            work.global_loads(s * chans[layers] * pg[0] * pg[1])
    else:
        work.stage(s * chans[layers] * pg[0] * pg[1], channels=chans[layers], copies=copies, own_wait=not copies)
    work.fill(sum(s * chans[i] * pl[2] for i, pl in enumerate(planes) if 0 < i < layers))
    for i in range(layers - 1):  # the first layer's weights with the planes (one wait for the copies)
        work.stage(chans[i] * chans[i + 1] * 9, "transposed", copies=copies, own_wait=not copies or i > 0)
        _decoder_hidden_taps(work, call, t, i, 0, t["h"] << (i + 1))
    input_grad = bool(a.get("input_grad"))
    sums = 0
    for i in reversed(range(layers)):
        c_a, c_b = chans[i], chans[i + 1]
        stride = 2 if i + 1 < layers else 1
        (in_rows, in_cols, in_plane), (g_rows, g_cols, g_plane) = planes[i], planes[i + 1]
        hw = (in_rows - 2) * (in_cols - 2)
        size = c_a * c_b * 9
        sums += size + c_b
        # weight gradient (decoder_weight_grad_row): a warp per item of WEIGHT_GRAD_CHANNELS input
        # channels and one output channel, its lanes over the positions; per position the
        # inputs' loads, the window's 9 loads, the FFMA and ~4 for the walk; the first warp's
        # addresses give the bank conflicts; then the lanes' sums: 32 by warp_reduce_scatter (31
        # shuffles, each with an add and two selects), the rest by warp_sum (5 shuffles and adds)
        h_in, w_in = in_rows - 2, in_cols - 2
        issue_before = work.issue
        if mma_pass_fits(a["input"], c_a) and c_b > 1:  # weight_grad_pass_mma: M the input's channels
            _weight_grad_pass_mma(work, c_a, c_b, h_in, w_in, s, in_plane, in_cols, g_plane, g_cols, stride,
                                  bias=False)
        else:
            a_ch = WEIGHT_GRAD_CHANNELS
            items = math.ceil(c_a / a_ch) * c_b
            rounds = math.ceil(s * hw / 32)
            first = [(p // (w_in * h_in), (p // w_in) % h_in, p % w_in) for p in range(min(32, s * hw))]
            x_words = [n * c_a * in_plane + (y + 1) * in_cols + x + 1 for n, y, x in first]
            g_words = [n * c_b * g_plane + stride * y * g_cols + stride * x for n, y, x in first]
            per_item = 9 * a_ch
            rest = per_item - 32
            work.issue += items * (rounds * (a_ch + 9 + per_item + 4) + 31 * 4 + rest * 2 * 5)
            work.wavefronts += items * (rounds * (a_ch * _bank_wavefronts(x_words) + 9 * _bank_wavefronts(g_words))
                                        + 31 + rest * 5)
            work.fmas += size * s * hw
        g_hw = (g_rows - 2) * (g_cols - 2)
        work.issue += c_b * (math.ceil(s * g_hw / 32) * 4 + 10)  # bias: a warp each, a load and an add per position
        work.wavefronts += c_b * (math.ceil(s * g_hw / 32) + 5)
        if i == 0 and not input_grad:
            break
        # copied while the weight gradient runs: its latency covered where the block's weight
        # gradient issues for longer (at most 2 warp instructions a clock for one of an SM's 2 blocks)
        covered = (work.issue - issue_before) / 2 >= MEMORY_LATENCY_S * CLOCK_HZ
        work.stage(c_a * c_b * 9, "rows", copies=copies, own_wait=not (copies and covered))
        if c_b > 1 and mma_pass_fits(a["input"], c_a):  # mma_pass, the windows `stride` apart
            conflict = _mma_conflicts(in_cols - 2, in_rows - 2, s, g_cols, c_b * g_plane, g_plane, stride)
            work.mma_layer(hw * s, c_b, math.ceil(c_a / GROUP), input_conflict=conflict)
        else:
            conflict = _window_conflicts(in_cols - 2, in_rows - 2, s, (stride, stride), g_cols, c_b * g_plane)
            work.windows(hw * s * math.ceil(c_a / GROUP), c_b, 1, input_conflict=conflict)
    work.add(e, launch.blocks)
    output_grads = (nbytes(a["logits"]) + nbytes(a["target"]) if loss else 0) + nbytes(a.get("grad_output"))
    e.bytes = (nbytes(a["input"]) + output_grads + sum(nbytes(t) for t in a["weights"] + a["biases"]) * 2
               + (nbytes(a["input"]) if input_grad else 0) + _grid_sums_bytes(launch.blocks, sums))
    e.outputs = sums + (a["input"].numel() if input_grad else 0)


BLOCK_MODELS = {
    "encoder_block": _encoder_block,
    "encoder_block_backward": _encoder_block_backward,
    "decoder_block": _decoder_block,
    "decoder_block_backward": _decoder_block_backward,
}


def blocks_per_sm(launch, registers, static_shared):
    threads = launch.threads_per_block
    warps = math.ceil(threads / 32)
    regs_per_warp = math.ceil(registers * 32 / 256) * 256
    by_registers = REGISTERS_PER_SM // (regs_per_warp * warps)
    shared = launch.shared_bytes + max(static_shared, RESERVED_SHARED)
    by_shared = SHARED_PER_SM // shared
    return min(by_registers, by_shared, MAX_THREADS_PER_SM // threads, MAX_BLOCKS_PER_SM)


def wave_efficiency(blocks, waves):
    """The share of the GPU's throughput a launch gets: under one wave, the share of SMs
    with a block (a lone block is taken to get its SM's whole throughput: optimistic);
    over one, the last wave's idle slots (waves / ceil(waves))."""
    return min(blocks, SMS) / SMS if waves <= 1 else waves / math.ceil(waves)


@dataclass
class Row:
    layer: str
    op: str
    kernel: str
    launch: object
    registers: int
    per_sm: int
    waves: float
    est: Estimate
    t_mem: float
    t_issue: float
    t_lds: float
    t_wait: float
    time: float


def model_launch(call, index, launch, sass, shorten):
    short = shorten(launch.kernel)
    if short not in sass:
        raise SystemExit(f"kernel_notes: {short} is not in {SASS_REPORT.name}: regenerate the SASS report")
    registers, static_shared = sass[short]
    per_sm = blocks_per_sm(launch, registers, static_shared)
    waves = launch.blocks / (SMS * per_sm)
    est = estimate(call, launch, index)
    # Memory: any SM with a block pulls its share of the bandwidth; compute: the
    # waves' idle slots are lost.
    fill = min(launch.blocks, SMS) / SMS
    t_mem = est.bytes / (HBM_FRACTION * HBM_BYTES_PER_S)
    t_issue = est.warp_instructions / (ISSUE_PER_CLOCK * SMS * CLOCK_HZ)
    t_lds = est.wavefronts / (LDS_PER_CLOCK * SMS * CLOCK_HZ)
    t_wait = math.ceil(waves) * est.waits * MEMORY_LATENCY_S
    # fewer resident warps than the schedulers need to issue every clock
    occupancy = min(1.0, per_sm * launch.threads_per_block / 32 / WARPS_FOR_FULL_ISSUE)
    t_issue, t_lds = t_issue / occupancy, t_lds / occupancy
    time = (max(t_mem / fill, t_wait + max(t_issue, t_lds) / wave_efficiency(launch.blocks, waves))
            + LAUNCH_US * 1e-6)
    return Row(call.layer, call.op, short, launch, registers, per_sm, waves, est, t_mem, t_issue, t_lds, t_wait,
               time)


def model_step(calls, sass, shorten):
    return [model_launch(call, i, launch, sass, shorten) for call in calls for i, launch in enumerate(call.launches)]


# --- the text ---------------------------------------------------------------------------

def _us(seconds):
    return f"{seconds * 1e6:.1f}"


def _shape(launch):
    grid = "x".join(str(d) for d in launch.grid if d != 1) or "1"
    if launch.grid[1:] != (1, 1):
        grid = "x".join(str(d) for d in launch.grid)
    return f"{grid} x {launch.block[0]}"


def step_table(rows):
    lines = [
        "| # | layer | op | kernel | grid x block | dyn. shared KiB | regs | blocks/SM | waves | MB | MFLOP "
        "| instr/output | waits | t mem us | t issue us | t shared us | t wait us | time us |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(rows, 1):
        e = r.est
        per_output = f"{e.warp_instructions * 32 / e.outputs:.0f}" if e.warp_instructions else "-"
        lines.append(
            f"| {i} | {r.layer} | `{r.op}` | `{r.kernel}` | {_shape(r.launch)} | {r.launch.shared_bytes / 1024:.1f} "
            f"| {r.registers} | {r.per_sm} | {r.waves:.2f} | {e.bytes / 1e6:.2f} | {e.flops / 1e6:.0f} "
            f"| {per_output} | {e.waits:.0f} | {_us(r.t_mem)} | {_us(r.t_issue)} | {_us(r.t_lds)} | {_us(r.t_wait)} "
            f"| {_us(r.time)} |"
        )
    return lines


def summary(steps):
    """One row per model, layout and path: `steps` maps (variant, layout, path) to rows."""
    lines = [
        "| model | layout | path | launches | MB | GFLOP | kernel time beyond launch cost us | launch cost us "
        "| expected step us | vs PyTorch+cuDNN (350-450 us) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (variant, layout, path), rows in steps.items():
        total = sum(r.time for r in rows)
        fixed = len(rows) * LAUNCH_US * 1e-6
        ratio = f"{total * 1e3 / PYTORCH_STEP_MS[1]:.2f}-{total * 1e3 / PYTORCH_STEP_MS[0]:.2f}"
        lines.append(
            f"| {variant} | {layout} | {path} | {len(rows)} | {sum(r.est.bytes for r in rows) / 1e6:.1f} "
            f"| {sum(r.est.flops for r in rows) / 1e9:.2f} | {_us(total - fixed)} | {_us(fixed)} | {_us(total)} "
            f"| {ratio} |"
        )
    return lines


def per_kernel(steps):
    """Launches and expected time per kernel family, one column per model and layout."""
    families = {}
    for config, rows in steps.items():
        for r in rows:
            cell = families.setdefault(kernel_family(r.launch.kernel), {}).setdefault(config, [0, 0.0])
            cell[0] += 1
            cell[1] += r.time
    configs = list(steps)
    lines = ["| kernel | " + " | ".join(f"{v} {layout}" for v, layout in configs) + " |",
             "|---|" + "---|" * len(configs)]
    for name, cells in sorted(families.items(), key=lambda kv: -max(t for _, t in kv[1].values())):
        lines.append(f"| `{name}` | " + " | ".join(
            f"{cells[c][0]} x, {_us(cells[c][1])} us" if c in cells else "-" for c in configs) + " |")
    return lines


FORWARD_OPS = ("conv3x3", "conv_transpose3x3", "max_pool2x2", "encoder_block", "decoder_block",
               "decoder_block_loss", "sigmoid_cross_entropy")


def per_layer(steps):
    """Each layer's expected forward and backward time, one column per model and layout."""
    layers = {}
    for config, rows in steps.items():
        for r in rows:
            cell = layers.setdefault(r.layer, {}).setdefault(config, [0.0, 0.0])
            cell[0 if r.op in FORWARD_OPS else 1] += r.time
    configs = list(steps)
    lines = ["| layer | " + " | ".join(f"{v} {layout}: fwd + bwd us" for v, layout in configs) + " |",
             "|---|" + "---|" * len(configs)]
    for name, cells in layers.items():
        lines.append(f"| {name} | " + " | ".join(
            f"{_us(cells[c][0])} + {_us(cells[c][1])}" if c in cells else "-" for c in configs) + " |")
    return lines


PATHS = (("per-op", False), ("fused", True))


def generate():
    from cae_kernels import sim  # noqa: F401  (builds the emulated kernels on first use)

    sass = load_sass_report()
    shorten = _sass_report_module().shorten
    steps = {}
    for path, fused in PATHS:
        for variant in VARIANTS:
            for layout, memory_format in LAYOUTS:
                _, calls = record_step(variant, memory_format, fused=fused)
                steps[(variant, layout, path)] = model_step(calls, sass, shorten)
    by_path = {path: {(v, layout): rows for (v, layout, p), rows in steps.items() if p == path}
               for path, _ in PATHS}
    out = [BEGIN, "", f"Generated by `python scripts/kernel_notes.py` from the planners (dry-run launches "
           f"at batch {BATCH}, float32) and `benchmarks/results/sass-sm90.md`.", "", MODEL.rstrip(), "",
           FUSED_MODEL.rstrip(), "", "### One training step, summed", ""]
    out += summary(steps)
    for path, _ in PATHS:
        out += ["", f"Launches and expected time per kernel, {path} path (launch cost included):", ""]
        out += per_kernel(by_path[path])
    out += ["", "Expected time per layer (per-op path) and per block (fused path), forward + backward "
            "(launch cost included):", ""]
    for path, _ in PATHS:
        out += per_layer(by_path[path]) + [""]
    for path, _ in PATHS:
        for (variant, layout), rows in by_path[path].items():
            out += [f"### `{variant}` model, {layout}, {path}, batch {BATCH}", ""]
            out += step_table(rows) + [""]
    out += [END]
    return "\n".join(out) + "\n"


def splice(doc_text, generated):
    if BEGIN not in doc_text or END not in doc_text:
        raise SystemExit(f"kernel_notes: {DOC} lacks the markers {BEGIN!r} ... {END!r}")
    head, rest = doc_text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return head + generated.rstrip("\n") + tail


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 if docs/kernels.md's tables are stale")
    mode.add_argument("--print", action="store_true", help="print the tables instead of writing them")
    args = parser.parse_args(argv)
    generated = generate()
    if args.print:
        sys.stdout.write(generated)
        return 0
    current = DOC.read_text()
    updated = splice(current, generated)
    if args.check:
        if updated != current:
            print(f"kernel_notes: the tables in {DOC.relative_to(ROOT)} are stale: run "
                  "python scripts/kernel_notes.py", file=sys.stderr)
            return 1
        return 0
    if updated != current:
        DOC.write_text(updated)
        print(f"kernel_notes: updated {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
