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
