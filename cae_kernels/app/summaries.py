"""What a run shows of itself: TensorBoard event files and the pictures in its model directory.

- train scalars in the model directory, eval scalars and reconstruction grids in ``eval/``,
  the embedding projector files of the eval codes;
- ``loss.png``, ``reconstructions.gif`` and ``reconstructions/epoch_NNNN.png``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import viz
from .data import Split
from .rundir import atomic_write

__all__ = ["Writers", "save_frame", "write_pictures"]


class Writers:
    """TensorBoard event files: train scalars in model_dir, eval scalars and images in eval/."""

    def __init__(self, model_dir: Path, purge_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events logged after the checkpoint by an interrupted run.
        self.train = SummaryWriter(str(model_dir), purge_step=purge_step)
        self.eval = SummaryWriter(str(model_dir / "eval"), purge_step=purge_step)

    def train_scalars(self, step: int, **values: float) -> None:
        for tag, value in values.items():
            self.train.add_scalar(tag, value, step)

    def epoch_end(self, step: int, record: dict, rows: list[torch.Tensor]) -> None:
        self.train.add_scalar("epoch_loss", record["train_loss"], step)
        self.train.add_scalar("images_per_second", record["images_per_second"], step)
        self.eval.add_scalar("loss", record["eval_loss"], step)
        self.eval.add_scalar("rmse", record["eval_rmse"], step)
        self.eval.add_scalar("epoch_loss", record["eval_loss"], step)
        grid = torch.from_numpy(viz.comparison_grid(rows))
        self.eval.add_image("reconstructions", grid, step, dataformats="HW")
        self.train.flush()
        self.eval.flush()

    def embedding(self, step: int, codes: torch.Tensor, split: Split) -> None:
        self.train.add_embedding(codes, metadata=split.labels.tolist(),
                                 label_img=split.images.float() / 255.0, global_step=step, tag="codes")

    def close(self) -> None:
        self.train.close()
        self.eval.close()


def save_frame(model_dir: Path, epoch: int, rows: list[torch.Tensor]) -> None:
    """``reconstructions/epoch_NNNN.png``: the comparison grid of one epoch."""
    frames = model_dir / "reconstructions"
    frames.mkdir(exist_ok=True)
    grid = viz.comparison_grid(rows)
    atomic_write(frames / f"epoch_{epoch:04d}.png", lambda f: viz.save_png(grid, f))


def write_pictures(model_dir: Path, history: list[dict]) -> None:
    """``loss.png`` of the history so far and ``reconstructions.gif`` of the epochs' frames."""
    atomic_write(model_dir / "loss.png", lambda f: viz.plot_losses(history, f))
    paths = [model_dir / "reconstructions" / f"epoch_{record['epoch']:04d}.png" for record in history]
    frames = [viz.read_png(path) for path in paths if path.exists()]
    if frames:
        atomic_write(model_dir / "reconstructions.gif", lambda f: viz.save_gif(frames, f))
