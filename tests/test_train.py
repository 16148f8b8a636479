"""Training: the loss goes down, resume is bitwise, checkpoints are atomic, DDP agrees."""

import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import cae_kernels.app.training as training
from cae_kernels.app import build_model, checkpoints, evaluate, evaluation, load_model, train
from cae_kernels.app.data import Split, load_data
from cae_kernels.app.distributed import World
from cae_kernels.app.models import ConvAutoencoder
from cae_kernels.app.rundir import Config, ConfigError, atomic_write

REPO = Path(__file__).resolve().parents[1]
BACKENDS = ("cae", "torch")
# Tiny runs: 3 steps of 64 images per epoch.
TINY = dict(limit=192, batch_size=64, epochs=2, noise_factor=0.2)


def run(model_dir, **options):
    return train(model_dir, out=io.StringIO(), progress=False, **options)


def state(model_dir):
    return torch.load(checkpoints.latest(model_dir), weights_only=True)


def assert_same_weights(a: dict, b: dict):
    assert list(a) == list(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_short_training_lowers_the_eval_loss(tmp_path, backend):
    options = dict(backend=backend, limit=512, batch_size=32, learning_rate=5e-3, epochs=2, seed=3)
    torch.manual_seed(3)
    untrained = build_model(Config(**options))
    start = evaluate(untrained, load_data().eval.head(512))["loss"]
    result = run(tmp_path / "run", **options)
    final = result.history[-1]
    assert final["eval_loss"] < 0.6 * start, (start, result.history)
    assert final["eval_rmse"] < 0.35
    assert [h["epoch"] for h in result.history] == [1, 2] and result.step == 32


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, backend):
    whole = run(tmp_path / "whole", backend=backend, **TINY)
    run(tmp_path / "split", backend=backend, **{**TINY, "epochs": 1})
    resumed = run(tmp_path / "split", backend=backend, **TINY)
    assert_same_weights(whole.model.state_dict(), resumed.model.state_dict())
    a, b = state(tmp_path / "whole"), state(tmp_path / "split")
    assert (a["step"], a["epoch"]) == (b["step"], b["epoch"]) == (6, 2)
    assert_same_weights(a["model"], b["model"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [h["eval_loss"] for h in a["history"]] == [h["eval_loss"] for h in b["history"]]


def test_resume_of_the_fc_model_with_dropout_and_noise(tmp_path):
    options = dict(model="fc", dropout=0.2, **TINY)
    whole = run(tmp_path / "whole", **options)
    run(tmp_path / "split", **{**options, "epochs": 1})
    resumed = run(tmp_path / "split", **options)
    assert_same_weights(whole.model.state_dict(), resumed.model.state_dict())


def test_resume_takes_this_devices_adam_not_the_checkpoints(tmp_path):
    """A checkpoint's optimizer groups carry the writing run's Adam (fused on CUDA): resumed
    on the CPU, the run takes the CPU's again and ends where an uninterrupted one does."""
    whole = run(tmp_path / "whole", **TINY)
    run(tmp_path / "split", **{**TINY, "epochs": 1})
    checkpoint = state(tmp_path / "split")
    for group in checkpoint["optimizer"]["param_groups"]:
        group["fused"] = True  # as a CUDA run writes it
    checkpoints.save(tmp_path / "split", checkpoint)
    resumed = run(tmp_path / "split", **TINY)
    assert_same_weights(whole.model.state_dict(), resumed.model.state_dict())


def test_interrupt_keeps_the_checkpoint_and_resume_completes(tmp_path, monkeypatch):
    options = dict(backend="torch", **TINY)
    whole = run(tmp_path / "whole", **options)

    real_step, calls = training._train_step, []

    def interrupted_step(*args):
        calls.append(1)
        if len(calls) == 5:  # the second step of epoch 2
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(training, "_train_step", interrupted_step)
    out = io.StringIO()
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "run", out=out, progress=False, **options)
    assert "interrupted in epoch 2" in out.getvalue()
    assert "holds epoch 1 (step 3), intact" in out.getvalue()
    assert f"cae train --model-dir {tmp_path / 'run'}" in out.getvalue()
    assert state(tmp_path / "run")["epoch"] == 1
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]

    monkeypatch.setattr(training, "_train_step", real_step)
    resumed = run(tmp_path / "run", **options)
    assert_same_weights(whole.model.state_dict(), resumed.model.state_dict())


def test_a_finished_run_is_left_alone(tmp_path):
    run(tmp_path / "run", backend="torch", **{**TINY, "epochs": 1})
    before = checkpoints.latest(tmp_path / "run").read_bytes()
    out = io.StringIO()
    train(tmp_path / "run", out=out, progress=False, epochs=1)
    assert "nothing to do" in out.getvalue()
    assert checkpoints.latest(tmp_path / "run").read_bytes() == before


def test_another_configuration_is_refused_naming_the_keys(tmp_path):
    run(tmp_path / "run", backend="torch", **{**TINY, "epochs": 1})
    with pytest.raises(ConfigError, match=r"filters: stored 16,8,8, given 32,8; seed: stored 0, given 1"):
        run(tmp_path / "run", filters=(32, 8), seed=1)
    with pytest.raises(ConfigError, match=r"model: stored conv, given fc"):
        run(tmp_path / "run", model="fc")
    # What does not change the run may differ: more epochs, another backend or layout.
    result = run(tmp_path / "run", epochs=2, backend="cae", memory_format="nhwc")
    assert result.step == 6 and result.config.filters == (16, 8, 8)


def test_options_are_checked_against_the_stored_run_not_the_defaults(tmp_path):
    run(tmp_path / "fc", model="fc", dropout=0.2, **{**TINY, "epochs": 1})
    # --dropout alone is a conv default's error, but this run is fc: it continues.
    assert run(tmp_path / "fc", dropout=0.2, epochs=2).config.model == "fc"
    with pytest.raises(ConfigError, match="dropout: stored 0.2, given 0.5"):
        run(tmp_path / "fc", dropout=0.5)
    with pytest.raises(ConfigError, match="dropout applies to the fully-connected model only"):
        run(tmp_path / "conv", dropout=0.2)


def test_files_not_ours_are_never_overwritten(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "loss.png").write_bytes(b"my own picture")
    with pytest.raises(ConfigError, match="loss.png; refusing to overwrite"):
        run(mine, backend="torch", **TINY)
    assert (mine / "loss.png").read_bytes() == b"my own picture"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"learning_rate": 1}')
    with pytest.raises(ConfigError, match="not written by `cae train`"):
        run(tmp_path / "other", backend="torch", **TINY)
    assert (tmp_path / "other" / "config.json").read_text() == '{"learning_rate": 1}'


@pytest.mark.parametrize("failure", (OSError("disk full"), KeyboardInterrupt()))
def test_atomic_write_keeps_the_old_file_whole(tmp_path, failure):
    path = tmp_path / "checkpoint.pt"
    atomic_write(path, lambda f: f.write(b"old, complete"))

    def half_then_fail(f):
        f.write(b"new, but only ha")
        raise failure

    with pytest.raises(type(failure)):
        atomic_write(path, half_then_fail)
    assert path.read_bytes() == b"old, complete"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_learning_rate_decays_by_096_every_1000_steps():
    config = Config(learning_rate=1e-3)
    assert training._learning_rate(config, 999) == 1e-3
    assert training._learning_rate(config, 1000) == pytest.approx(0.96e-3)
    assert training._learning_rate(config, 2999) == pytest.approx(1e-3 * 0.96**2)


def test_weight_decay_is_half_the_squared_weights_without_biases():
    model = ConvAutoencoder(backend="torch")
    for p in model.parameters():
        p.data.normal_()
    weights = model.weights()
    assert len(weights) == 10 and all(w.dim() == 4 for w in weights)
    expected = 1e-5 * sum((p ** 2).sum() for n, p in model.named_parameters() if n.endswith("weight")) / 2
    torch.testing.assert_close(training._weight_penalty(weights, 1e-5), expected)


def test_noise_is_added_to_inputs_only_and_clipped(tmp_path, monkeypatch):
    x = torch.rand(8, 1, 28, 28)
    noisy = evaluation.noisy(x, 0.5, torch.Generator().manual_seed(0))
    assert noisy.min() >= 0 and noisy.max() <= 1 and not torch.equal(noisy, x)
    assert evaluation.noisy(x, 0.0, torch.Generator()) is x

    # In training, the step gets noisy inputs and the clean images as its targets.
    steps, real_step = [], training._train_step

    def spy(model, optimizer, weights, inputs, target, *args):
        steps.append((inputs.clone(), target.clone()))
        return real_step(model, optimizer, weights, inputs, target, *args)

    monkeypatch.setattr(training, "_train_step", spy)
    run(tmp_path / "run", backend="torch", limit=64, batch_size=64, epochs=1, noise_factor=0.5, seed=0)
    ((inputs, target),) = steps
    order = torch.randperm(64, generator=torch.Generator().manual_seed(0))  # the run's data order
    assert torch.equal(target, load_data().train.images[:64][order].float() / 255)
    changed = (inputs != target).float().mean().item()
    assert changed > 0.5 and inputs.min() >= 0 and inputs.max() <= 1


def test_steps_do_not_read_values_back_from_the_device(tmp_path, monkeypatch):
    """Losses and metrics stay on the device between log intervals: the host reads
    (Tensor.item) that the trainer makes do not grow with a run's number of steps.
    (PyTorch's own Adam reads its step count on the CPU; on CUDA the trainer takes
    the fused Adam, which does not.)"""
    real_item, reads = torch.Tensor.item, []

    def counting_item(self):
        if "cae_kernels" in sys._getframe(1).f_code.co_filename:
            reads.append(1)
        return real_item(self)

    monkeypatch.setattr(torch.Tensor, "item", counting_item)
    counts = []
    for limit in (128, 512):  # 2 and 8 steps
        reads.clear()
        run(tmp_path / str(limit), backend="torch", limit=limit, batch_size=64, epochs=1, log_every=1000)
        counts.append(len(reads))
    assert counts[0] == counts[1], counts


def test_evaluate_is_mean_cross_entropy_and_rmse():
    model = ConvAutoencoder(backend="torch").eval()
    images = torch.randint(0, 256, (37, 1, 28, 28), dtype=torch.uint8)
    metrics = evaluate(model, Split(images, torch.zeros(37, dtype=torch.long)), batch_size=16)
    x = images.float() / 255
    with torch.no_grad():
        logits = model(x)
    assert metrics["loss"] == pytest.approx(F.binary_cross_entropy_with_logits(logits, x).item(), rel=1e-5)
    assert metrics["rmse"] == pytest.approx((torch.sigmoid(logits) - x).square().mean().sqrt().item(), rel=1e-5)


def test_load_model_needs_a_trained_run(tmp_path):
    with pytest.raises(ConfigError, match="no trained model"):
        load_model(tmp_path)


def test_cuda_device_gives_a_clear_error_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        evaluation.resolve_device("cuda:1")
    with pytest.raises(ConfigError, match="unknown device"):
        evaluation.resolve_device("gpu")


DDP_SCRIPT = textwrap.dedent("""
    import os, sys, torch
    from cae_kernels.app import train
    result = train(sys.argv[1], progress=False, backend="cae", limit=256, batch_size=64, epochs=2,
                   noise_factor=0.2)
    torch.save(result.model.state_dict(), os.path.join(sys.argv[2], f"rank{os.environ['RANK']}.pt"))
""")


def test_two_process_gloo_training_ends_with_identical_weights(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(script), str(tmp_path / "run"), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert_same_weights(rank0, rank1)
    checkpoint = state(tmp_path / "run")
    assert_same_weights(checkpoint["model"], rank0)
    assert checkpoint["epoch"] == 2 and checkpoint["step"] == 8  # 4 global batches of 64 per epoch
    assert len(checkpoint["rng"]["ranks"]) == 2
    assert len(list((tmp_path / "run").glob("events.out.tfevents.*"))) == 1  # written once, by rank 0
    assert proc.stdout.count("epoch 2/2") == 1


# --- checkpoints: the last few kept, verified, and a damaged one falls back ----------------


def checkpoint_names(model_dir):
    return [p.name for p in checkpoints.checkpoint_paths(model_dir)]


def test_the_last_checkpoints_are_kept(tmp_path):
    run(tmp_path / "run", backend="torch", **{**TINY, "epochs": 3}, keep_checkpoints=2)
    assert checkpoint_names(tmp_path / "run") == ["checkpoint_epoch_0003.pt", "checkpoint_epoch_0002.pt"]
    run(tmp_path / "run", backend="torch", **{**TINY, "epochs": 4})  # 5 by default: none deleted now
    assert checkpoint_names(tmp_path / "run") == [f"checkpoint_epoch_{e:04d}.pt" for e in (4, 3, 2)]
    with pytest.raises(ConfigError, match="keep_checkpoints must be at least 1, got 0"):
        run(tmp_path / "run", epochs=5, keep_checkpoints=0)


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty"])
def test_a_damaged_checkpoint_falls_back_to_the_one_before(tmp_path, capsys, damage):
    options = dict(backend="torch", **TINY)
    whole = run(tmp_path / "whole", **options)
    run(tmp_path / "run", **options)
    newest = tmp_path / "run" / "checkpoint_epoch_0002.pt"
    data = bytearray(newest.read_bytes())
    if damage == "flip":  # torch.load alone would not notice: the SHA-256 does
        data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data[:len(data) // 2] if damage == "truncate" else b"" if damage == "empty" else data))

    _, _, checkpoint = load_model(tmp_path / "run")
    err = capsys.readouterr().err
    assert checkpoint["epoch"] == 1
    assert err.count("\n") == 1 and err.startswith("warning: skipped damaged checkpoint(s)")
    assert "checkpoint_epoch_0002.pt" in err and "using checkpoint_epoch_0001.pt (epoch 1, step 3)" in err

    resumed = run(tmp_path / "run", **options)  # trains epoch 2 again, to the same weights
    assert "checkpoint_epoch_0002.pt" in capsys.readouterr().err
    assert_same_weights(whole.model.state_dict(), resumed.model.state_dict())
    assert state(tmp_path / "run")["epoch"] == 2


def test_no_intact_checkpoint_is_one_clear_error(tmp_path):
    run(tmp_path / "run", backend="torch", **TINY)
    for path in checkpoints.checkpoint_paths(tmp_path / "run"):
        path.write_bytes(path.read_bytes()[:100])
    message = r"no intact checkpoint in .*run: checkpoint_epoch_0002.pt \(.*\); checkpoint_epoch_0001.pt \(.*\)"
    with pytest.raises(checkpoints.CheckpointError, match=message):
        load_model(tmp_path / "run")
    with pytest.raises(checkpoints.CheckpointError, match=message):
        run(tmp_path / "run", epochs=3)


def test_a_run_directory_with_only_checkpoint_pt_still_loads_and_resumes(tmp_path):
    """Run directories of the previous version: one checkpoint.pt, no checkpoints.json."""
    options = dict(backend="torch", **TINY)
    whole = run(tmp_path / "whole", **options)
    old = tmp_path / "old"
    run(old, **{**options, "epochs": 1})
    (old / "checkpoint_epoch_0001.pt").rename(old / "checkpoint.pt")
    (old / "checkpoints.json").unlink()
    model, _, checkpoint = load_model(old)
    assert checkpoint["epoch"] == 1
    resumed = run(old, **options)
    assert_same_weights(whole.model.state_dict(), resumed.model.state_dict())
    assert checkpoint_names(old) == ["checkpoint_epoch_0002.pt", "checkpoint.pt"]


# --- one trainer per model directory ------------------------------------------------------


LOCK_HOLDER = textwrap.dedent("""
    import sys, time
    from cae_kernels.app import rundir
    with rundir.lock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(60)
""")


def test_a_second_trainer_is_refused_while_the_first_holds_the_directory(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(tmp_path / "run")], env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        message = rf"{tmp_path / 'run'} is in use by another `cae train` \(process {holder.pid}\)"
        with pytest.raises(training.rundir.RunDirBusyError, match=message):
            run(tmp_path / "run", backend="torch", **TINY)
    finally:
        holder.kill()
        holder.wait()
    # The holder died without unlocking: the OS dropped its lock, the directory is free.
    assert run(tmp_path / "run", backend="torch", **{**TINY, "epochs": 1}).step == 3


def test_the_lock_refuses_a_second_open_file_description_in_the_same_process(tmp_path):
    with training.rundir.lock(tmp_path / "run"):
        with pytest.raises(training.rundir.RunDirBusyError, match="in use by another `cae train`"):
            with training.rundir.lock(tmp_path / "run"):
                pass
    with training.rundir.lock(tmp_path / "run"):  # released on exit
        pass


def test_a_model_dir_that_is_a_file_is_a_clear_error(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    with pytest.raises(ConfigError, match=r"--model-dir .*afile is a file, not a directory"):
        run(afile, backend="torch", **TINY)
    with pytest.raises(ConfigError, match=r"--model-dir .*afile/run: .*afile is a file, not a directory"):
        run(afile / "run", backend="torch", **TINY)
    with pytest.raises(ConfigError, match=r"afile is a file, not a directory"):
        load_model(afile)
    assert afile.read_text() == "mine"


# --- the step from a CUDA graph: its logic on the CPU, with DirectCalls for the graph -------------------------


def test_when_the_step_is_graphed():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    one, two = World(), World(rank=0, size=2)
    assert training._use_cuda_graph(None, cuda, one)  # the default on CUDA
    assert not training._use_cuda_graph(None, cpu, one) and not training._use_cuda_graph(None, cuda, two)
    assert not training._use_cuda_graph(False, cuda, one) and not training._use_cuda_graph(False, cpu, one)
    assert training._use_cuda_graph(True, cuda, one)
    with pytest.raises(ConfigError, match="--cuda-graph needs a CUDA device; this run's device is cpu"):
        training._use_cuda_graph(True, cpu, one)
    with pytest.raises(ConfigError, match="not supported with 2 torchrun processes"):
        training._use_cuda_graph(True, cuda, two)


def _steps(batches, graphed):
    """Losses of Adam steps on ``batches`` (x, target): eagerly, or through a GraphedStep
    over DirectCalls; and the inputs each call of the step function got."""
    torch.manual_seed(0)
    model = ConvAutoencoder(backend="torch")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    seen = []

    def step(x, target):
        seen.append(x)
        return training._train_step(model, optimizer, model.weights(), x, target, 1e-5)

    if graphed:
        step = training.GraphedStep(step, training.DirectCalls(), batch=16,
                                    release_grads=lambda: optimizer.zero_grad(set_to_none=True), warmup=2)
    return [step(x, target)[0].item() for x, target in batches], seen


def test_the_graphed_step_gives_the_eager_losses():
    """Two warm-up steps, the capture on static buffers, replays with each batch copied in,
    and the short batch eager: the losses of eager steps, bit for bit (the same ops)."""
    images = load_data().train.images[:16 * 6 + 5].float() / 255
    batches = [(images[i:i + 16], images[i:i + 16]) for i in range(0, len(images), 16)]  # 6 of 16, 1 of 5
    batches = batches[:3] + batches[-1:] + batches[3:]  # a short batch before the capture too
    eager, _ = _steps(batches, graphed=False)
    graphed, seen = _steps(batches, graphed=True)
    assert graphed == eager
    # Calls: 2 warm-ups on the batches, the capture's replay on the static buffers, the short
    # batch eagerly, 3 replays, the short batch eagerly.
    static = seen[2]
    assert seen[0] is batches[0][0] and seen[1] is batches[1][0] and static is not batches[2][0]
    assert seen[3] is batches[3][0] and len(seen[3]) == 5
    assert all(x is static for x in seen[4:7]) and seen[7] is batches[7][0] and len(seen) == 8


def _graphed_on_the_cpu(monkeypatch):
    """The trainer's graphed path on the CPU: DirectCalls instead of a CUDA graph."""
    monkeypatch.setattr(training, "_use_cuda_graph", lambda requested, device, world: True)
    monkeypatch.setattr(training._Trainer, "new_graph", lambda self: training.DirectCalls())


def test_the_graphed_trainer_logic_on_the_cpu(tmp_path, monkeypatch):
    """With the graph's twin: the losses of eager training (to the float rounding of the
    fused Adam it takes), a checkpoint as an eager run writes it, and bitwise resume."""
    options = dict(TINY, limit=200, epochs=3)  # 3 batches of 64 and one of 8 an epoch: captured in epoch 2
    eager = run(tmp_path / "eager", **options)
    _graphed_on_the_cpu(monkeypatch)
    whole = run(tmp_path / "whole", **options)
    for key in ("train_loss", "eval_loss", "eval_rmse"):
        got, expected = ([h[key] for h in r.history] for r in (whole, eager))
        assert got == pytest.approx(expected, rel=1e-5), key
    assert whole.step == 12
    group = state(tmp_path / "whole")["optimizer"]["param_groups"][0]
    assert group["lr"] == 1e-3 and type(group["lr"]) is float and group["capturable"] is False

    run(tmp_path / "split", **{**options, "epochs": 2})  # 2 warm-ups, capture; then again after the resume
    resumed = run(tmp_path / "split", **options)
    assert_same_weights(whole.model.state_dict(), resumed.model.state_dict())
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in whole.history]


def test_the_graphed_learning_rate_follows_the_schedule(tmp_path, monkeypatch):
    """The learning rate is a tensor the graph reads, filled when the schedule changes it."""
    _graphed_on_the_cpu(monkeypatch)
    monkeypatch.setattr(training, "LR_DECAY_STEPS", 2)
    rates, real_step = [], training._train_step

    def spy(model, optimizer, *args):
        (group,) = optimizer.param_groups
        rates.append(group["lr"].item())
        return real_step(model, optimizer, *args)

    monkeypatch.setattr(training, "_train_step", spy)
    run(tmp_path / "run", **dict(TINY, limit=320, epochs=1))  # 5 steps: 3 warm-up, 2 replayed
    assert rates == pytest.approx([1e-3, 1e-3, 0.96e-3, 0.96e-3, 0.96 ** 2 * 1e-3], rel=1e-6)


def test_fused_blocks_train_as_the_per_op_path(tmp_path):
    """`fused=True` (`--fused`) runs the conv model on the block ops: on the CPU kernels
    they compose the same kernels, so the same losses to the bit; a run resumes with the
    other path; the flag is refused where there are no block ops."""
    per_op = run(tmp_path / "per-op", **TINY, fused=False)
    fused = run(tmp_path / "fused", **TINY, fused=True)
    assert [h["train_loss"] for h in fused.history] == [h["train_loss"] for h in per_op.history]
    assert fused.model.fused is True and per_op.model.fused is False
    resumed = run(tmp_path / "per-op", **{**TINY, "epochs": 3}, fused=True)
    assert resumed.model.fused is True and len(resumed.history) == 3
    for options in (dict(model="fc"), dict(backend="torch")):
        with pytest.raises(ConfigError, match="--fused runs this package's block ops"):
            run(tmp_path / "refused", **TINY, **options, fused=True)
        assert not (tmp_path / "refused").exists()


def test_bfloat16_precision_runs_the_forward_under_autocast(tmp_path, monkeypatch):
    """`precision="bfloat16"` (`--precision bfloat16`) trains with the forward under
    autocast: the convolutions see bfloat16 (with backend torch on the CPU here; on CUDA
    with this package's kernels), the loss stays float32, the run differs from float32's
    only by rounding; where the forward cannot run in bfloat16 (the CPU kernels) it is
    refused before anything is written."""
    seen = []  # the dtypes the convolutions compute in: their outputs'
    real_forward = torch.nn.Conv2d.forward

    def spy(self, input):
        out = real_forward(self, input)
        seen.append(out.dtype)
        return out

    monkeypatch.setattr(torch.nn.Conv2d, "forward", spy)
    options = dict(TINY, backend="torch")
    full = run(tmp_path / "float32", **options)
    assert set(seen) == {torch.float32}
    seen.clear()
    half = run(tmp_path / "bfloat16", **options, precision="bfloat16")
    assert torch.bfloat16 in seen
    losses = [h["train_loss"] for h in half.history], [h["train_loss"] for h in full.history]
    assert losses[0] != losses[1]
    assert losses[0] == pytest.approx(losses[1], rel=0.05)
    with pytest.raises(ConfigError, match="--precision bfloat16 needs CUDA or backend torch"):
        run(tmp_path / "refused", **TINY, precision="bfloat16")
    assert not (tmp_path / "refused").exists()
    with pytest.raises(ConfigError, match="precision must be one of"):
        run(tmp_path / "refused", **TINY, precision="float16")
