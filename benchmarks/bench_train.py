"""The whole training step (forward, loss, backward, Adam) as ``cae train`` runs it:
our kernels (backend="cae": the fused block ops on CUDA, per op on the CPU; on CUDA
also the per-op path) against the same network from torch.nn layers, eager and
under torch.compile, both layouts; on CUDA also our kernels' step from a CUDA graph, as
``cae train`` runs it there; with each step's peak memory; and one training epoch over
the bundled sample."""

import json
import subprocess
import sys

import pytest
import torch

from cae_kernels.app import data
from cae_kernels.app import training as train

from conftest import LOWER_CPU_LEVELS, cpu_level_of

MODELS = {
    "conv-pool": {"model": "conv", "downsample": "pool"},
    "conv-stride": {"model": "conv", "downsample": "stride"},
    "fc": {"model": "fc"},
}
# The FC autoencoder is nn.Linear layers in either backend: it runs on PyTorch's GEMMs.
IMPLS = {
    "cae": ("cae", None),
    "torch": ("torch", None),
    "torch-compile": ("torch", "default"),
    "torch-compile-reduce-overhead": ("torch", "reduce-overhead"),
    "cae-graph": ("cae", None),  # CUDA only: the step captured in a CUDA graph (train.GraphedStep)
    # CUDA only: "cae" runs the fused block ops there (ConvAutoencoder's default); this is
    # the per-op path beside it, eager and graphed.
    "cae-per-op": ("cae", None),
    "cae-per-op-graph": ("cae", None),
} | {f"cae@{level}": ("cae", None) for level in LOWER_CPU_LEVELS}
LAYOUTS = ("nchw", "nhwc")


def make_step(model_name, impl, layout, batch, device):
    """Returns (step, inputs): one Adam step of the model on real digits."""
    backend, compile_mode = IMPLS[impl]
    config = train.Config(**MODELS[model_name], backend=backend, memory_format=layout, batch_size=batch)
    torch.manual_seed(0)
    model = train.build_model(config).to(device)
    if "-per-op" in impl:
        model.fused = False
    if compile_mode:
        model = torch.compile(model, mode=compile_mode)
    optimizer = train._adam(model, config.learning_rate, device)  # as the trainer: ours on our kernels
    weights = [p for name, p in model.named_parameters() if name.endswith("weight")]
    images = data.load_data().train.images
    batches = []
    for i in range(3):  # rotated between calls
        index = torch.arange(i * batch, (i + 1) * batch) % len(images)
        x = (images[index].to(torch.float32) / 255.0).reshape(batch, 1, 28, 28).to(device)
        batches.append((x,))

    def step(x, target):
        return train._train_step(model, optimizer, weights, x, target, config.weight_decay)

    if impl.endswith("-graph"):  # as the trainer: fused, capturable Adam, its learning rate a tensor
        train._make_capturable(optimizer, torch.tensor(config.learning_rate, device=device))
        step = train.GraphedStep(step, train.CudaGraph(device), batch,
                                 release_grads=lambda: optimizer.zero_grad(set_to_none=True))
    return (lambda x: step(x, x)), batches


def prepare(step, impl, inputs):
    """Compiles, or warms up and captures, outside the timing: the calls before a replay."""
    if impl.startswith("torch-compile") or impl.endswith("-graph"):
        for i in range(train.WARMUP_STEPS + 1):
            step(*inputs[i % len(inputs)])


def skip_unless_applicable(settings, model_name, impl, layout):
    if "@" in impl and settings.device.type != "cpu":
        pytest.skip("CPU levels apply to the CPU kernels")
    if impl.endswith("-graph") and settings.device.type != "cuda":
        pytest.skip("CUDA graphs need --device cuda")
    if "-per-op" in impl and settings.device.type != "cuda":
        pytest.skip("the CPU kernels run per op by default: that is cae")
    if model_name == "fc" and (impl.startswith("cae") or layout == "nhwc"):
        pytest.skip("the FC autoencoder has no convolutions: one layout, PyTorch's linear layers")
    if settings.quick and impl.startswith("torch-compile") and (model_name, layout, impl) != ("conv-pool", "nchw", "torch-compile"):
        pytest.skip("--quick compiles one configuration only")


def peak_memory_bytes(settings, model_name, impl, layout, batch):
    """Peak memory of a training step beyond what the model, data and optimizer hold.
    GPU: the caching allocator's peak (a graphed step's: of the warm-up, the capture and
    a replay). CPU: the peak resident set of a fresh process during a few steps, above
    its resident set before them."""
    if settings.device.type == "cuda":
        step, inputs = make_step(model_name, impl, layout, batch, settings.device)
        step(*inputs[0])
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        if impl.endswith("-graph"):
            prepare(step, impl, inputs)
        step(*inputs[1])
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    command = [sys.executable, __file__, "--memory", model_name, impl, layout, str(batch)]
    result = subprocess.run(command, capture_output=True, text=True, check=True, cwd=str(settings.root))
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_memory_bytes"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_train_step(benchmark, settings, batch, model_name, impl, layout):
    skip_unless_applicable(settings, model_name, impl, layout)
    step, inputs = make_step(model_name, impl, layout, batch, settings.device)
    prepare(step, impl, inputs)
    benchmark.group = f"train step {model_name} batch {batch}"
    benchmark.extra_info.update(
        kind="train", model=model_name, impl=impl, layout=layout, batch=batch, device=settings.device.type,
        peak_memory_bytes=peak_memory_bytes(settings, model_name, impl, layout, batch),
    )
    with cpu_level_of(impl):
        settings.run(benchmark, step, inputs)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("impl", ["cae", "torch"])
def test_train_epoch(benchmark, settings, impl, layout):
    """One epoch of the conv autoencoder over the bundled sample's training split, batch 256."""
    split = data.load_data().train
    limit = 512 if settings.quick else len(split.images)
    step, _ = make_step("conv-pool", impl, layout, 256, settings.device)
    x_all = (split.images[:limit].to(torch.float32) / 255.0).reshape(limit, 1, 28, 28).to(settings.device)
    order = torch.randperm(limit, generator=torch.Generator().manual_seed(0))

    def epoch():
        for i in range(0, limit, 256):
            step(x_all[order[i:i + 256].to(settings.device)])

    benchmark.group = "train epoch conv-pool (bundled sample)"
    benchmark.extra_info.update(kind="epoch", model="conv-pool", impl=impl, layout=layout, batch=256,
                                images=limit, device=settings.device.type)
    rounds = 1 if settings.quick else 3
    benchmark.pedantic(lambda: (epoch(), settings.synchronize()), rounds=rounds, iterations=1,
                       warmup_rounds=0 if settings.quick else 1)


def _rss_kib(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _memory_main(model_name, impl, layout, batch):
    step, inputs = make_step(model_name, impl, layout, int(batch), torch.device("cpu"))
    step(*inputs[0])  # allocations that persist (Adam's state, compiled code) come first
    # Linux: writing 5 to clear_refs resets the peak resident set (VmHWM) to the
    # current one, so VmHWM afterwards is the peak of these steps alone.
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    base = _rss_kib("VmRSS")
    with cpu_level_of(impl):
        for x in inputs:
            step(*x)
    print(json.dumps({"peak_memory_bytes": (_rss_kib("VmHWM") - base) * 1024}))


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "--memory":
    _memory_main(*sys.argv[2:])
