"""The `cae` command end to end in subprocesses, outputs read back, and its error lines."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import cae_kernels
from cae_kernels.app import checkpoints
from cae_kernels.app.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]


def cae(*args, check=True):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "cae_kernels", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def events(folder):
    accumulator = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two short epochs of the default conv autoencoder (our kernels) on the bundled sample."""
    model_dir = tmp_path_factory.mktemp("cli") / "run"
    proc = cae("train", "--model-dir", model_dir, "--epochs", 2, "--limit", 256, "--batch-size", 64,
               "--noise-factor", 0.3, "--log-every", 1)
    return model_dir, proc


def test_train_writes_the_model_dir(trained):
    model_dir, proc = trained
    assert "total" in proc.stdout and "7,873" in proc.stdout  # the parameter table
    assert "epoch 1/2" in proc.stdout and "epoch 2/2" in proc.stdout and "img/s" in proc.stdout
    assert f"device: cpu (CPU kernels: {cae_kernels.cpu_capability()})" in proc.stdout
    config = json.loads((model_dir / "config.json").read_text())["config"]
    assert config["backend"] == "cae" and config["filters"] == [16, 8, 8] and config["noise_factor"] == 0.3
    checkpoint = torch.load(checkpoints.latest(model_dir), weights_only=True)
    assert (checkpoint["epoch"], checkpoint["step"]) == (2, 8)

    train_events = events(model_dir)
    tags = train_events.Tags()["scalars"]
    for tag in ("loss", "rmse", "learning_rate", "grad_norm", "epoch_loss"):
        assert tag in tags, tags
    assert [e.step for e in train_events.Scalars("loss")] == list(range(1, 9))
    assert train_events.Scalars("learning_rate")[-1].value == pytest.approx(1e-3)
    eval_events = events(model_dir / "eval")
    assert [e.step for e in eval_events.Scalars("loss")] == [4, 8]
    assert [e.step for e in eval_events.Scalars("rmse")] == [4, 8]
    grids = eval_events.Images("reconstructions")
    assert [g.step for g in grids] == [4, 8] and grids[0].width > 0

    projector = (model_dir / "projector_config.pbtxt").read_text()
    assert 'tensor_name: "codes:' in projector and "sprite" in projector and "metadata.tsv" in projector
    (embedding,) = (model_dir / "00008").iterdir()
    assert (embedding / "metadata.tsv").read_text().split() == [str(v) for v in _eval_labels(256)]
    assert (embedding / "sprite.png").exists() and (embedding / "tensors.tsv").exists()

    with Image.open(model_dir / "loss.png") as image:
        assert image.format == "PNG"
    with Image.open(model_dir / "reconstructions.gif") as gif:
        assert gif.format == "GIF" and gif.n_frames == 2
    assert sorted(p.name for p in (model_dir / "reconstructions").iterdir()) == ["epoch_0001.png", "epoch_0002.png"]


def _eval_labels(limit):
    from cae_kernels.app.data import load_data

    return load_data().eval.labels[:limit].tolist()


def test_evaluate_encode_reconstruct(trained):
    model_dir, _ = trained
    checkpoint = torch.load(checkpoints.latest(model_dir), weights_only=True)
    proc = cae("evaluate", "--model-dir", model_dir, "--backend", "torch")
    assert "eval loss" in proc.stdout and "epoch 2, step 8" in proc.stdout
    loss = float(proc.stdout.split("eval loss ")[1].split()[0])
    assert loss == pytest.approx(checkpoint["history"][-1]["eval_loss"], abs=1e-4)

    proc = cae("encode", "--model-dir", model_dir, "--limit", 60, "--tsne", "--output", model_dir / "c.pt")
    codes = torch.load(model_dir / "c.pt", weights_only=True)
    assert codes["codes"].shape == (60, 128) and codes["labels"].tolist() == _eval_labels(60)
    with Image.open(model_dir / "codes_tsne.png") as image:
        assert image.format == "PNG" and image.width > 300
    assert (model_dir / "projector" / "projector_config.pbtxt").exists()

    cae("encode", "--model-dir", model_dir, "--limit", 40, "--memory-format", "nhwc")
    assert np.load(model_dir / "codes.npy").shape == (40, 128)
    assert np.load(model_dir / "codes_labels.npy").tolist() == _eval_labels(40)
    assert (model_dir / "codes_pca.png").exists()

    proc = cae("reconstruct", "--model-dir", model_dir, "--images", 6)
    assert "noisy inputs" in proc.stdout
    with Image.open(model_dir / "reconstruction.png") as image:
        # 3 rows (originals, noisy, reconstructions) of 6 digits of 28 px, 2 px gaps, doubled.
        assert image.size == (2 * (6 * 30 + 2), 2 * (3 * 30 + 4))


def test_resume_and_refusal_through_the_cli(trained):
    model_dir, _ = trained
    proc = cae("train", "--model-dir", model_dir, "--filters", "32,8", "--epochs", 3, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "filters: stored 16,8,8, given 32,8" in proc.stderr
    proc = cae("train", "--model-dir", model_dir, "--epochs", 3, "--backend", "torch")
    assert "resuming ConvAutoencoder" in proc.stdout and "epoch 3/3" in proc.stdout
    assert torch.load(checkpoints.latest(model_dir), weights_only=True)["epoch"] == 3


def test_user_files_are_not_overwritten(trained, tmp_path):
    model_dir, _ = trained
    mine = tmp_path / "mine.png"
    mine.write_bytes(b"mine")
    assert main(["reconstruct", "--model-dir", str(model_dir), "--output", str(mine)]) == 1
    assert mine.read_bytes() == b"mine"


@pytest.mark.parametrize("make_bad, message", [
    (lambda d: None, "no such data directory"),
    (lambda d: d.mkdir(), "no MNIST-format IDX files"),
    (lambda d: (d.mkdir(), (d / "images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03\x00\x00\x00\x05"),
                (d / "labels-idx1-ubyte").write_bytes(b"")), "images-idx3-ubyte: truncated"),
    (lambda d: (d.mkdir(), (d / "images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x01" + bytes(4)),
                (d / "labels-idx1-ubyte").write_bytes(b"")), "images-idx3-ubyte: wrong magic number 2049"),
])
def test_bad_data_is_one_error_line(tmp_path, capsys, make_bad, message):
    data_dir = tmp_path / "data"
    make_bad(data_dir)
    status = main(["train", "--model-dir", str(tmp_path / "run"), "--data-dir", str(data_dir), "--backend", "torch"])
    err = capsys.readouterr().err
    assert status == 1 and message in err and str(data_dir) in err
    assert err.startswith("cae train: error: ") and err.count("\n") == 1


def test_bad_data_in_a_subprocess_has_no_traceback(tmp_path):
    proc = cae("evaluate", "--model-dir", tmp_path, "--data-dir", tmp_path / "missing", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "no trained model" in proc.stderr  # the model dir is checked first


def test_unavailable_cuda_is_one_error_line(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert main(["train", "--model-dir", str(tmp_path / "run"), "--device", "cuda"]) == 1
    err = capsys.readouterr().err
    assert "CUDA is not available" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_help_explains_every_flag_with_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag, default in [("--model-dir", "runs/mnist"), ("--data-dir", "bundled"), ("--model", "conv"),
                          ("--filters", "16,8,8"), ("--downsample", "pool"), ("--epochs", "50"),
                          ("--batch-size", "256"), ("--learning-rate", "0.001"), ("--weight-decay", "1e-05"),
                          ("--noise-factor", "0.0"), ("--dropout", "no dropout"), ("--backend", "cae"),
                          ("--memory-format", "nhwc"), ("--device", "auto"), ("--seed", "0")]:
        assert flag in text
        after = text.split(flag + " ", 2)[-1]
        assert f"(default: {default}" in after[:400] or f"default: the {default}" in after[:400], flag
    for command in ("evaluate", "encode", "reconstruct"):
        assert build_parser().parse_args([command]).command == command


def test_keep_checkpoints_option(tmp_path):
    assert build_parser().parse_args(["train"]).keep_checkpoints == 5
    assert build_parser().parse_args(["train", "--keep-checkpoints", "2"]).keep_checkpoints == 2
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--keep-checkpoints", "0"])


def _copy(model_dir, tmp_path):
    import shutil

    return Path(shutil.copytree(model_dir, tmp_path / "copy"))


def test_a_truncated_checkpoint_falls_back_with_a_warning(trained, tmp_path):
    model_dir = _copy(trained[0], tmp_path)
    newest, before = checkpoints.checkpoint_paths(model_dir)[:2]  # epoch 2 or 3: other tests train on
    newest.write_bytes(newest.read_bytes()[:1000])
    epoch = torch.load(before, weights_only=True)["epoch"]
    proc = cae("evaluate", "--model-dir", model_dir)
    assert "Traceback" not in proc.stderr and f"epoch {epoch}, step {4 * epoch}" in proc.stdout
    assert proc.stderr.strip().count("\n") == 0
    assert newest.name in proc.stderr and f"using {before.name}" in proc.stderr


def test_no_intact_checkpoint_is_one_error_line(trained, tmp_path):
    model_dir = _copy(trained[0], tmp_path)
    for path in model_dir.glob("checkpoint_epoch_*.pt"):
        path.write_bytes(path.read_bytes()[:1000])
    for command in (("evaluate",), ("train", "--epochs", 3)):
        proc = cae(*command, "--model-dir", model_dir, check=False)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.strip().count("\n") == 0
        assert proc.stderr.startswith(f"cae {command[0]}: error: no intact checkpoint in {model_dir}: ")
        assert "checkpoint_epoch_0002.pt (" in proc.stderr and "checkpoint_epoch_0001.pt (" in proc.stderr
        assert "Move the damaged file(s) away" in proc.stderr


def test_a_model_dir_that_is_a_file_is_one_error_line(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("")
    for command in ("train", "evaluate", "encode", "reconstruct"):
        assert main([command, "--model-dir", str(afile)]) == 1
        err = capsys.readouterr().err
        assert err == f"cae {command}: error: --model-dir {afile} is a file, not a directory; " \
                      f"name a new or existing model directory\n"


def test_a_held_model_dir_is_one_error_line(tmp_path, capsys):
    from cae_kernels.app import rundir

    with rundir.lock(tmp_path / "run"):
        assert main(["train", "--model-dir", str(tmp_path / "run"), "--backend", "torch", "--limit", "64"]) == 1
    err = capsys.readouterr().err
    assert err == (f"cae train: error: {tmp_path / 'run'} is in use by another `cae train` (process {os.getpid()}); "
                   f"wait for it to finish, or train into another --model-dir\n")


def test_an_unwritable_output_is_one_error_line(trained, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("")
    assert main(["reconstruct", "--model-dir", str(trained[0]), "--output", str(afile / "r.png")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("cae reconstruct: error: ") and err.count("\n") == 1 and str(afile) in err


def test_the_cuda_graph_flag(tmp_path, capsys, monkeypatch):
    parse = build_parser().parse_args
    assert parse(["train"]).cuda_graph is None  # the trainer decides: on with CUDA and one process
    assert parse(["train", "--cuda-graph"]).cuda_graph is True
    assert parse(["train", "--no-cuda-graph"]).cuda_graph is False
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--cuda-graph, --no-cuda-graph" in capsys.readouterr().out

    # Forced on without CUDA: one error line, nothing written.
    assert main(["train", "--model-dir", str(tmp_path / "run"), "--device", "cpu", "--cuda-graph"]) == 1
    err = capsys.readouterr().err
    assert "--cuda-graph needs a CUDA device; this run's device is cpu" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()

    # The flag reaches train().
    import cae_kernels.app.cli as cli

    given = []
    monkeypatch.setattr(cli, "train", lambda *args, **kwargs: given.append(kwargs["cuda_graph"]))
    for flags in ([], ["--cuda-graph"], ["--no-cuda-graph"]):
        assert main(["train", "--model-dir", str(tmp_path / "run"), *flags]) == 0
    assert given == [None, True, False]


def test_the_fused_flag_reaches_train(tmp_path, monkeypatch):
    parse = build_parser().parse_args
    assert parse(["train"]).fused is None  # the model decides: fused on CUDA
    assert parse(["train", "--fused"]).fused is True and parse(["train", "--no-fused"]).fused is False
    import cae_kernels.app.cli as cli

    given = []
    monkeypatch.setattr(cli, "train", lambda *args, **kwargs: given.append(kwargs["fused"]))
    for flags in ([], ["--fused"], ["--no-fused"]):
        assert main(["train", "--model-dir", str(tmp_path / "run"), *flags]) == 0
    assert given == [None, True, False]


def test_the_precision_option_reaches_train(tmp_path, monkeypatch, capsys):
    import cae_kernels.app.cli as cli

    given = []
    monkeypatch.setattr(cli, "train", lambda *args, **kwargs: given.append(kwargs["precision"]))
    for flags in ([], ["--precision", "bfloat16"], ["--precision", "float32"]):
        assert main(["train", "--model-dir", str(tmp_path / "run"), *flags]) == 0
    assert given == ["float32", "bfloat16", "float32"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--precision", "float16"])
    assert "invalid choice: 'float16'" in capsys.readouterr().err
