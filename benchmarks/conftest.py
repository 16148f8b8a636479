"""Shared setup of the benchmark suite (pytest-benchmark).

Run: ``python -m pytest benchmarks --benchmark-json=bench.json`` (add ``--device cuda``
on a GPU), then ``python benchmarks/report.py bench.json``. ``--quick`` runs every
benchmark once on tiny batches: it checks that the suite executes, nothing more.
"""

import contextlib
import os
import platform
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import cae_kernels  # noqa: E402

import ceiling  # noqa: E402

# Our CPU kernels also at each lower instruction-set level this CPU runs, as
# implementations "cae@<level>" beside "cae" (the level in use), so that one run
# compares them side by side.
LOWER_CPU_LEVELS = [level for level in cae_kernels.cpu_capabilities() if level != cae_kernels.cpu_capability()]


@contextlib.contextmanager
def cpu_level_of(impl):
    """Runs the CPU kernels at the level an implementation "cae@<level>" names."""
    if "@" not in impl:
        yield
        return
    previous = cae_kernels.cpu_capability()
    cae_kernels.set_cpu_capability(impl.split("@", 1)[1])
    try:
        yield
    finally:
        cae_kernels.set_cpu_capability(previous)


def cpu_model():
    """The CPU's model name, with its family and model numbers (a VM may show only
    "AMD EPYC": family 25 model 1 is Zen 3, family 6 model 143 Sapphire Rapids)."""
    fields = {}
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        for line in info:
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    if "model name" not in fields:
        return platform.processor() or platform.machine()
    return f"{fields['model name']} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')})"


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", help="tiny batches, one round: only check the suite runs")
    parser.addoption("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.addoption("--rounds", type=int, default=None, help="timed rounds per benchmark")


def pytest_configure(config):
    if config.getoption("--device", default="cpu") == "cuda":
        # PyTorch at its best: cuDNN autotuning on, as a user would run it.
        torch.backends.cudnn.benchmark = True


class Settings:
    def __init__(self, config):
        self.quick = config.getoption("--quick")
        self.device = torch.device(config.getoption("--device"))
        if self.device.type == "cuda" and not torch.cuda.is_available():
            pytest.exit("--device cuda but no CUDA GPU is visible", returncode=2)
        gpu = self.device.type == "cuda"
        self.batch_sizes = [4] if self.quick else ([256, 1024] if gpu else [256])
        default_rounds = 1 if self.quick else (50 if gpu else 21)  # the CPU is shared and noisy
        self.rounds = config.getoption("--rounds") or default_rounds
        self.warmup = 0 if self.quick else (10 if gpu else 2)
        self.root = config.rootpath

    def synchronize(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run(self, benchmark, step, inputs):
        """Times step(*inputs[i]) with the inputs rotated between calls, so repeated calls
        do not just measure the cache, and the device synchronized inside the timing."""
        state = {"i": 0}

        def timed():
            args = inputs[state["i"] % len(inputs)]
            state["i"] += 1
            step(*args)
            self.synchronize()

        benchmark.pedantic(timed, rounds=self.rounds, iterations=1, warmup_rounds=self.warmup)


@pytest.fixture(scope="session")
def settings(pytestconfig):
    return Settings(pytestconfig)


def pytest_generate_tests(metafunc):
    # The batch sizes depend on --device and --quick, so they are parametrized here.
    if "batch" in metafunc.fixturenames:
        metafunc.parametrize("batch", Settings(metafunc.config).batch_sizes, ids=lambda b: f"batch{b}")


def pytest_benchmark_update_machine_info(config, machine_info):
    settings = Settings(config)
    machine_info["torch"] = torch.__version__
    machine_info["cae_kernels"] = cae_kernels.__version__
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["cpu_model"] = cpu_model()
    machine_info["cpu_capability"] = cae_kernels.cpu_capability()
    machine_info["cpu_capabilities"] = cae_kernels.cpu_capabilities()
    machine_info["command"] = " ".join(["python -m pytest"] + sys.argv[1:])
    if settings.device.type == "cuda":
        machine_info["gpu"] = torch.cuda.get_device_name(settings.device)
        machine_info["cuda"] = torch.version.cuda
        machine_info["cudnn"] = torch.backends.cudnn.version()
        machine_info["cudnn_allow_tf32_default"] = torch.backends.cudnn.allow_tf32
    machine_info["platform"] = platform.platform()
    machine_info["ceiling"] = ceiling.measure(settings.device, quick=settings.quick)
