"""The ``cae`` command: train, evaluate, encode and reconstruct with a model directory.

    cae train --model-dir runs/mnist                 # conv autoencoder on the bundled sample
    cae evaluate --model-dir runs/mnist
    cae encode --model-dir runs/mnist --tsne
    cae reconstruct --model-dir runs/mnist
    torchrun --nproc_per_node=2 -m cae_kernels train --model-dir runs/ddp   # data parallel

Errors about data, configuration or devices print one line and exit with status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from pathlib import Path

import numpy as np
import torch

from . import checkpoints, viz
from .data import DataError, load_data
from .evaluation import encode_split, evaluate, load_model, reconstruct
from .rundir import Config, ConfigError, atomic_write, show
from .training import train

DEFAULT_MODEL_DIR = "runs/mnist"


def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 16,8,8, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _checked(convert, valid, expected: str):
    """An argparse type: convert, then refuse values outside the valid range."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not valid(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


_positive_int = _checked(int, lambda v: v >= 1, "a positive integer")
_probability = _checked(float, lambda v: 0.0 <= v < 1.0, "a probability in [0, 1)")
_non_negative = _checked(float, lambda v: v >= 0, "a number >= 0")


def build_parser() -> argparse.ArgumentParser:
    defaults = Config()

    def default(name: str) -> str:
        return f"(default: {show(getattr(defaults, name))})"

    parser = argparse.ArgumentParser(
        prog="cae",
        description="Train and use the convolutional autoencoder of 'Convolutional Autoencoder as "
                    "TensorFlow estimator' on this package's CPU/CUDA kernels.",
        epilog="Data parallel: torchrun --nproc_per_node=N -m cae_kernels train ... "
               "(or torchrun --no-python cae train ...).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("model directory and data")
    group.add_argument("--model-dir", default=DEFAULT_MODEL_DIR, metavar="DIR",
                       help="directory of the run: config, checkpoints, TensorBoard event files and "
                            f"pictures (like the estimator's model_dir) (default: {DEFAULT_MODEL_DIR})")
    group.add_argument("--data-dir", metavar="DIR",
                       help="folder of MNIST-format IDX files (MNIST, Fashion-MNIST, torchvision's "
                            "MNIST/raw, or images-/labels-idx?-ubyte[.gz]) (default: the bundled "
                            "5,000-digit MNIST sample, split 4,500 train / 500 eval)")
    group.add_argument("--limit", type=_positive_int, metavar="N",
                       help="use only the first N images of each split, for quick runs (default: all)")
    runtime = common.add_argument_group("execution")
    runtime.add_argument("--backend", choices=("cae", "torch"),
                         help="cae: this package's kernels; torch: the same network from torch.nn "
                              f"layers, for comparison {default('backend')}")
    runtime.add_argument("--memory-format", choices=("nchw", "nhwc"),
                         help=f"activation layout: nchw (contiguous) or nhwc (channels_last) "
                              f"{default('memory_format')}")
    runtime.add_argument("--device", metavar="DEVICE",
                         help=f"auto (CUDA where a GPU is usable, else the CPU), cpu, cuda or cuda:N "
                              f"{default('device')}")
    runtime.add_argument("--batch-size", type=_positive_int, metavar="N",
                         help=f"images per batch (global, split over torchrun processes) "
                              f"{default('batch_size')}")

    train = commands.add_parser(
        "train", parents=[common], help="train a model (resumes an existing model directory)",
        description="Train an autoencoder into --model-dir, or resume the run already there: it "
                    "continues from the last checkpoint and ends with the same weights as an "
                    "uninterrupted run. Options left out keep the run's stored values; options "
                    "that change what is trained must match them.")
    arch = train.add_argument_group("model")
    arch.add_argument("--model", choices=("conv", "fc"),
                      help=f"conv: convolutional autoencoder; fc: fully connected {default('model')}")
    arch.add_argument("--filters", type=_int_tuple, metavar="F1,F2,...",
                      help=f"conv: channels of the encoder levels (decoder mirrors them) {default('filters')}")
    arch.add_argument("--downsample", choices=("pool", "stride"),
                      help=f"conv: 2x2 max-pool or stride-2 3x3 conv after each level {default('downsample')}")
    arch.add_argument("--hidden", type=_int_tuple, metavar="H1,H2,...",
                      help=f"fc: hidden layer sizes of the encoder {default('hidden')}")
    arch.add_argument("--dropout", type=_probability, metavar="P",
                      help="fc: probability of dropping a hidden unit while training (the original "
                           "took the keep probability: its 0.8 is 0.2 here) (default: no dropout)")
    hyper = train.add_argument_group("training")
    hyper.add_argument("--epochs", type=_positive_int, metavar="N",
                       help=f"total epochs; raise it to train a finished run further {default('epochs')}")
    hyper.add_argument("--learning-rate", type=float, metavar="LR",
                       help=f"Adam learning rate, decayed x0.96 every 1000 steps (staircase) "
                            f"{default('learning_rate')}")
    hyper.add_argument("--weight-decay", type=_non_negative, metavar="WD",
                       help=f"L2 penalty WD * sum(w^2) / 2 on weights, not biases {default('weight_decay')}")
    hyper.add_argument("--noise-factor", type=_non_negative, metavar="S",
                       help="denoising: add S * N(0, 1) noise to the inputs (clipped to [0, 1]); the "
                            f"target stays the clean image {default('noise_factor')}")
    hyper.add_argument("--seed", type=int,
                       help=f"seed of the weights, data order, noise and dropout {default('seed')}")
    hyper.add_argument("--keep-checkpoints", type=_positive_int, default=checkpoints.DEFAULT_KEEP, metavar="N",
                       help="keep the last N checkpoints; a damaged newest one falls back to the one "
                            f"before (default: {checkpoints.DEFAULT_KEEP})")
    hyper.add_argument("--log-every", type=_positive_int, default=10, metavar="STEPS",
                       help="write train scalars to TensorBoard every STEPS steps (default: 10)")
    hyper.add_argument("--no-progress", action="store_true", help="no progress bar (it is drawn only on a terminal)")
    hyper.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction,
                       help="run the training step from a CUDA graph captured after a few eager steps: "
                            "the step's kernels launch as one graph, not one by one from Python; an error "
                            "without CUDA or under torchrun (default: on with a CUDA device and one process)")
    hyper.add_argument("--fused", action=argparse.BooleanOptionalAction,
                       help="run the conv autoencoder's encoder blocks and decoder as block ops (one "
                            "fused kernel per encoder block on CUDA; a block's inside recomputed in the "
                            "backward, not kept) instead of one op per layer; the same numbers either "
                            "way (default: on CUDA, off on the CPU kernels)")
    hyper.add_argument("--precision", choices=("float32", "bfloat16"), default="float32",
                       help="the forward's convolutions in bfloat16 under autocast (float32 sums; the loss, "
                            "gradients and Adam in float32), on CUDA or with --backend torch (default: float32)")
    train.set_defaults(func=_train)

    evaluate = commands.add_parser(
        "evaluate", parents=[common], help="eval loss and RMSE of a trained model",
        description="Mean sigmoid cross-entropy and RMSE (of sigmoid(logits) vs the clean images) "
                    "on the eval split.")
    evaluate.add_argument("--noise-factor", type=_non_negative, metavar="S",
                          help="input noise for the evaluation (default: the run's)")
    evaluate.set_defaults(func=_evaluate)

    encode = commands.add_parser(
        "encode", parents=[common], help="codes of images, projector files and a 2-D map",
        description="Encode a split's images: writes the codes with their labels, TensorBoard "
                    "projector files (codes, labels, sprite) and a PNG map of the codes in 2-D.")
    encode.add_argument("--split", choices=("eval", "train"), default="eval",
                        help="which images to encode (default: eval)")
    encode.add_argument("--output", metavar="FILE",
                        help="codes file: .npy (labels go beside it in NAME_labels.npy) or .pt "
                             "(a dict of codes and labels) (default: MODEL_DIR/codes.npy)")
    encode.add_argument("--tsne", action="store_true",
                        help="map the codes with t-SNE (exact, O(N^2): for up to a few thousand "
                             "points) instead of PCA")
    encode.add_argument("--perplexity", type=float, default=30.0, help="t-SNE perplexity (default: 30)")
    encode.add_argument("--map", metavar="PNG",
                        help="the 2-D map (default: MODEL_DIR/codes_pca.png or codes_tsne.png)")
    encode.add_argument("--projector-dir", metavar="DIR",
                        help="where the projector files go (default: MODEL_DIR/projector)")
    encode.add_argument("--force", action="store_true", help="overwrite existing --output/--map files")
    encode.set_defaults(func=_encode)

    reconstruct = commands.add_parser(
        "reconstruct", parents=[common], help="a PNG of images beside their reconstructions",
        description="Writes a PNG grid: originals, (noisy inputs,) reconstructions.")
    reconstruct.add_argument("--images", type=_positive_int, default=10, metavar="N",
                             help="how many eval images (default: 10)")
    reconstruct.add_argument("--noise-factor", type=_non_negative, metavar="S",
                             help="input noise (default: the run's)")
    reconstruct.add_argument("--output", metavar="PNG",
                             help="the PNG (default: MODEL_DIR/reconstruction.png)")
    reconstruct.add_argument("--force", action="store_true", help="overwrite an existing --output file")
    reconstruct.set_defaults(func=_reconstruct)
    return parser


_TRAIN_OPTIONS = ("model", "filters", "downsample", "hidden", "dropout", "epochs", "batch_size",
                  "learning_rate", "weight_decay", "noise_factor", "seed", "data_dir", "limit",
                  "backend", "memory_format", "device")


def _train(args) -> int:
    options = {name: getattr(args, name) for name in _TRAIN_OPTIONS if getattr(args, name) is not None}
    train(args.model_dir, progress=not args.no_progress, log_every=args.log_every,
          keep_checkpoints=args.keep_checkpoints, cuda_graph=args.cuda_graph, fused=args.fused,
          precision=args.precision, **options)
    return 0


def _load(args):
    model, config, checkpoint = load_model(args.model_dir, backend=args.backend, device=args.device,
                                           memory_format=args.memory_format)
    data = load_data(args.data_dir if args.data_dir is not None else config.data_dir)
    limit = args.limit if args.limit is not None else config.limit
    batch_size = args.batch_size or config.batch_size
    return model, config, checkpoint, data, limit, batch_size, next(model.parameters()).device


def _noise(args, config) -> float:
    return args.noise_factor if args.noise_factor is not None else config.noise_factor


def _evaluate(args) -> int:
    model, config, checkpoint, data, limit, batch_size, device = _load(args)
    metrics = evaluate(model, data.eval.head(limit), batch_size, _noise(args, config), device)
    print(f"eval loss {metrics['loss']:.4f}  rmse {metrics['rmse']:.4f}  on {metrics['images']} images "
          f"({data.source}), model at epoch {checkpoint['epoch']}, step {checkpoint['step']}")
    return 0


def _target(path: str | None, default: Path, force: bool) -> Path:
    """A user-chosen output file must not exist unless --force; our defaults in the model dir may."""
    if path is None:
        return default
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; choose another file or pass --force to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _encode(args) -> int:
    from torch.utils.tensorboard import SummaryWriter

    model, config, checkpoint, data, limit, batch_size, device = _load(args)
    model_dir = Path(args.model_dir)
    split = getattr(data, args.split).head(limit)
    output = _target(args.output, model_dir / "codes.npy", args.force)
    if output.suffix not in (".npy", ".pt"):
        raise ConfigError(f"--output {output}: use a .npy or .pt file")
    method = "tsne" if args.tsne else "pca"
    map_path = _target(args.map, model_dir / f"codes_{method}.png", args.force)
    if args.tsne and len(split) > 5000:
        raise ConfigError(f"t-SNE here is exact, O(N^2); {len(split)} points is too many: pass --limit 5000 or less")

    codes = encode_split(model, split, batch_size, device)
    if output.suffix == ".pt":
        atomic_write(output, lambda f: torch.save({"codes": codes, "labels": split.labels}, f))
        written = [output]
    else:
        beside = output.with_name(output.stem + "_labels.npy")
        labels_path = _target(beside if args.output is not None else None, beside, args.force)
        atomic_write(output, lambda f: np.save(f, codes.numpy()))
        atomic_write(labels_path, lambda f: np.save(f, split.labels.numpy()))
        written = [output, labels_path]

    projector_dir = Path(args.projector_dir) if args.projector_dir else model_dir / "projector"
    # add_embedding prints a warning when it rewrites an embedding of the same step; ours.
    with SummaryWriter(str(projector_dir)) as writer, contextlib.redirect_stdout(io.StringIO()):
        writer.add_embedding(codes, metadata=split.labels.tolist(), label_img=split.images.float() / 255.0,
                             global_step=checkpoint["step"], tag=f"codes_{args.split}")

    if args.tsne:
        points = viz.tsne_2d(codes, perplexity=args.perplexity, seed=config.seed)
        title = f"t-SNE of {codes.shape[1]}-value codes ({len(split)} {args.split} images)"
    else:
        points = viz.pca_2d(codes)
        title = f"PCA of {codes.shape[1]}-value codes ({len(split)} {args.split} images)"
    atomic_write(map_path, lambda f: viz.plot_codes(points, split.labels, f, title))
    written.append(map_path)
    print(f"encoded {len(split)} {args.split} images to codes of {codes.shape[1]} values: "
          f"{', '.join(map(str, written))}; projector files in {projector_dir} "
          f"(tensorboard --logdir {projector_dir})")
    return 0


def _reconstruct(args) -> int:
    model, config, checkpoint, data, limit, batch_size, device = _load(args)
    output = _target(args.output, Path(args.model_dir) / "reconstruction.png", args.force)
    images = data.eval.head(limit).images[:args.images]
    rows = reconstruct(model, images, _noise(args, config), device)
    grid = viz.comparison_grid(rows)
    atomic_write(output, lambda f: viz.save_png(grid, f))
    kinds = "originals, noisy inputs, reconstructions" if len(rows) == 3 else "originals, reconstructions"
    print(f"wrote {output}: {len(images)} eval images, rows of {kinds}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the ``cae`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (DataError, ConfigError) as exc:
        print(f"cae {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a path the command cannot write or read: one line too
        text = f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else str(exc)
        print(f"cae {args.command}: error: {text}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if args.command != "train":  # train says itself what the checkpoint holds
            print(f"\ncae {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
