import os
import random

import pytest
import torch

from backends import backend  # noqa: F401  (the fixture every op test takes its backend from)


@pytest.fixture(autouse=True)
def fresh_seed(request):
    """Fresh random inputs every run; the seed is printed so a failure can be replayed
    with CAE_TEST_SEED=<seed>."""
    seed = int(os.environ.get("CAE_TEST_SEED", random.SystemRandom().randrange(2**31)))
    torch.manual_seed(seed)
    print(f"[seed {seed}: replay with CAE_TEST_SEED={seed}]")
    yield seed


# With CAE_TEST_NAN_EMPTY=1 every tensor torch.empty makes (ours: outputs, gradients,
# the partial sums' scratch) starts as NaN, as PyTorch's deterministic mode fills them:
# a kernel that reads an element it never wrote fails its test instead of passing on the
# zeros fresh CPU memory often holds (a GPU's caching allocator hands back old values).
# scripts/sim_sanitize.sh runs the emulated kernels so.
if os.environ.get("CAE_TEST_NAN_EMPTY") == "1":
    torch.use_deterministic_algorithms(True, warn_only=True)  # a test's own nondeterministic ops only warn
    torch.utils.deterministic.fill_uninitialized_memory = True


# A run that must survive a crashing test (scripts/gpu_check.sh on a GPU): with
# CAE_TEST_JOURNAL=<file>, each test's id is appended before it runs ("start <id>")
# and its outcome after ("passed|failed|skipped <id>", a failure's report indented
# below), so a segfault loses nothing already run; a rerun with the same journal
# deselects every test the journal shows started, the one that crashed among them.
_JOURNAL = os.environ.get("CAE_TEST_JOURNAL")


def _journal(line):
    with open(_JOURNAL, "a") as f:
        f.write(line + "\n")


if _JOURNAL:

    def pytest_collection_modifyitems(config, items):
        if not os.path.exists(_JOURNAL):
            return
        with open(_JOURNAL) as f:
            started = {line.removeprefix("start ") for line in f.read().splitlines() if line.startswith("start ")}
        deselected = [item for item in items if item.nodeid in started]
        if deselected:
            config.hook.pytest_deselected(items=deselected)
            items[:] = [item for item in items if item.nodeid not in started]

    def pytest_runtest_logstart(nodeid, location):
        _journal(f"start {nodeid}")

    def pytest_runtest_logreport(report):
        # One outcome a test: its call's, or its setup's or teardown's where those fail or skip.
        if report.when == "call" or report.outcome != "passed":
            _journal(f"{report.outcome} {report.nodeid}")
            if report.failed:
                _journal("\n".join("    " + line for line in report.longreprtext.splitlines()))
