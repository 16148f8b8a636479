"""Adam's step as one op, ``adam_`` (one kernel on the CUDA kernels, ATen's fused Adam on
the CPU kernels' backend), and ``cae_kernels.optim.Adam`` built on it: against
``torch.optim.Adam`` in float64, its state_dict, the argument checks (eager and fake),
opcheck, and the emulated kernel's single launch and bitwise-reproducible norm."""

import copy

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from cae_kernels.optim import Adam

from backends import on_every_backend

# A conv weight, its bias, a channels_last weight, a 0-d and an empty tensor, and one large
# enough that the CUDA kernel's grid has several blocks.
SHAPES = [(4, 3, 3, 3), (4,), (2, 5, 3, 3), (), (0, 3), (3000,)]


def make_state(device, count=1, seed=0):
    """Parameters and `count` rounds of their gradients, fresh random, float32."""
    generator = torch.Generator().manual_seed(seed)
    params = []
    for i, shape in enumerate(SHAPES):
        p = torch.randn(shape, generator=generator)
        if i == 2:
            p = p.contiguous(memory_format=torch.channels_last)
        params.append(p.to(device))
    # Each gradient strided as its parameter, as autograd makes it.
    grads = [[torch.empty_like(p).copy_(torch.randn(p.shape, generator=generator)) for p in params]
             for _ in range(count)]
    return params, grads


def run_optimizer(cls, params, rounds, **kwargs):
    params = [p.clone().requires_grad_() for p in params]
    optimizer = cls(params, **kwargs)
    norms = []
    for grads in rounds:
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone().to(p.dtype)
        reference_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        optimizer.step()
        norms.append((getattr(optimizer, "grad_norm", None), reference_norm))
    return params, optimizer, norms


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
@on_every_backend()
def test_adam_matches_torch_in_float64(backend, weight_decay):
    params, rounds = make_state(backend.device, count=3)
    kwargs = {"lr": 1e-2, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": weight_decay}
    ours, optimizer, norms = run_optimizer(Adam, params, rounds, functions=backend.functions, **kwargs)
    theirs, reference, _ = run_optimizer(torch.optim.Adam, [p.double() for p in params], rounds, foreach=False,
                                         **kwargs)
    for i, (p, q) in enumerate(zip(ours, theirs, strict=True)):
        assert p.stride() == params[i].stride()
        torch.testing.assert_close(p.detach(), q.detach().float(), rtol=1e-5, atol=1e-6, msg=f"param {i}")
        state, ref_state = optimizer.state[p], reference.state[q]
        assert state["step"].item() == ref_state["step"].item() == 3
        assert state["step"].device == p.device
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(state[key], ref_state[key].float(), rtol=1e-5, atol=1e-7, msg=key)
    for ours_norm, reference_norm in norms:
        assert ours_norm.shape == () and ours_norm.device == params[0].device
        torch.testing.assert_close(ours_norm, reference_norm, rtol=1e-5, atol=0)


@on_every_backend()
def test_state_dict_round_trips_with_torch_adam(backend):
    params, rounds = make_state(backend.device, count=4)
    kwargs = {"lr": 3e-3}
    # Two steps with ours, two more with torch's from our state_dict, and the same with the roles swapped.
    ours, optimizer, _ = run_optimizer(Adam, params, rounds[:2], functions=backend.functions, **kwargs)
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    torch_adam = torch.optim.Adam(theirs, foreach=False, **kwargs)
    torch_adam.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # no tensor shared with ours
    back = [p.detach().clone().requires_grad_() for p in ours]
    ours_again = Adam(back, functions=backend.functions, **kwargs)
    ours_again.load_state_dict(copy.deepcopy(torch_adam.state_dict()))
    for grads in rounds[2:]:
        for group in (theirs, back):
            for p, g in zip(group, grads, strict=True):
                p.grad = g.clone()
        torch_adam.step()
        ours_again.step()
    for p, q in zip(back, theirs, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        assert ours_again.state[p]["step"].item() == 4


def amsgrad(rounds):
    return {"amsgrad": True}


def grads_strided_unlike_their_parameters(rounds):
    for grads in rounds:
        grads[2] = grads[2].contiguous()  # params[2] is channels_last
    return {}


@pytest.mark.parametrize("unserved", [amsgrad, grads_strided_unlike_their_parameters])
@on_every_backend()
def test_what_adam_does_not_serve_takes_torchs_step(backend, unserved):
    params, rounds = make_state(backend.device, count=2)
    kwargs = unserved(rounds)
    ours, _, norms = run_optimizer(Adam, params, rounds, functions=backend.functions, **kwargs)
    theirs, _, _ = run_optimizer(torch.optim.Adam, params, rounds, foreach=False, **kwargs)
    assert all(norm is None for norm, _ in norms)
    for p, q in zip(ours, theirs, strict=True):
        torch.testing.assert_close(p, q)


def adam_args(device, params=None):
    params = params if params is not None else make_state(device)[0]
    return (params, [torch.randn_like(p) for p in params], [torch.zeros_like(p) for p in params],
            [torch.zeros_like(p) for p in params], [torch.zeros((), device=device) for _ in params],
            torch.tensor(1e-3, device=device), 0.9, 0.999, 1e-8, 0.0)


def replaced(args, index, value):
    args = list(args)
    args[index] = value
    return tuple(args)


def bad_arguments(device):
    args = adam_args(device)
    params = args[0]
    strided = [p.clone() for p in args[1]]
    strided[2] = strided[2].contiguous()  # params[2] is channels_last
    return [
        (replaced(args, 1, args[1][:-1]), "one tensor per parameter in every list; got 6 params, 5 grads"),
        (replaced(args, 0, [params[0].double()] + params[1:]), r"float32 parameters; params\[0\] has dtype Double"),
        (replaced(args, 1, strided), r"grads\[2\] must be like params\[2\] \(float32 on .*strides \[45, 1, 15, 5\]"),
        (replaced(args, 0, [params[0][:, :, :, :2]] + params[1:]), r"params\[0\] must be dense"),
        (replaced(args, 4, [torch.zeros(1, device=device)] + args[4][1:]),
         r"steps\[0\] must be a 0-D float32 tensor on .*sizes \[1\]"),
        (replaced(args, 5, torch.tensor([1e-3], device=device)), r"lr must be a 0-D float32 tensor.*sizes \[1\]"),
        (replaced(args, 6, 1.0), r"betas must be in \[0, 1\), got \(1, 0.999\)"),
        (replaced(args, 8, -1e-8), "eps and weight_decay must be non-negative, got -1e-08 and 0"),
    ]


@on_every_backend()
def test_bad_arguments_raise_the_same_error_eagerly_and_faked(backend):
    for args, message in bad_arguments(backend.device):
        with pytest.raises(RuntimeError, match=message):
            backend.ops.adam_(*args)
        with FakeTensorMode(allow_non_fake_inputs=False) as mode:
            fake = [[mode.from_tensor(t) for t in a] if isinstance(a, list) else
                    mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
            with pytest.raises(RuntimeError, match=message):
                backend.ops.adam_(*fake)


@on_every_backend()
def test_opcheck(backend):
    torch.library.opcheck(backend.ops.adam_, adam_args(backend.device))


def test_emulated_step_is_one_launch_and_reproducible():
    sim = pytest.importorskip("cae_kernels.sim")
    norms, results = [], []
    inputs = adam_args("cpu")
    for _ in range(2):
        args = [[t.clone() for t in a] if isinstance(a, list) else a for a in inputs]
        with sim.count_launches() as counts:
            norms.append(sim.adam_(*args[:6], betas=args[6:8], eps=args[8], weight_decay=args[9]))
        results.append(args[0])
        assert dict(counts) == {"cae::cuda::adam_kernel": 1}
    assert torch.equal(norms[0], norms[1])
    for p, q in zip(*results, strict=True):
        assert torch.equal(p, q)


def test_more_tensors_than_one_launch_takes_are_composed():
    sim = pytest.importorskip("cae_kernels.sim")
    params = [torch.randn(7) for _ in range(40)]
    rounds = [[torch.randn(7) for _ in params]]
    ours, _, norms = run_optimizer(Adam, params, rounds, functions=sim)
    theirs, _, _ = run_optimizer(torch.optim.Adam, params, rounds, foreach=False)
    torch.testing.assert_close(norms[0][0], norms[0][1])
    for p, q in zip(ours, theirs, strict=True):
        torch.testing.assert_close(p, q)
