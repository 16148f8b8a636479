"""Pictures of an autoencoder: image grids, the training GIF, loss curves, 2-D code maps.

Everything here takes tensors/arrays and writes to a path or a binary file object, so
callers decide where files go (and can write them atomically).  matplotlib is used
through its object API (no pyplot global state, no display needed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

__all__ = [
    "comparison_grid",
    "save_png",
    "read_png",
    "save_gif",
    "plot_losses",
    "plot_codes",
    "pca_2d",
    "tsne_2d",
]


def comparison_grid(rows: Sequence[torch.Tensor], columns: int = 10, pad: int = 2,
                    scale: int = 2) -> np.ndarray:
    """Images side by side: ``rows[0]`` (e.g. originals) above ``rows[1]`` (reconstructions)...

    Each row is [N, 1, H, W] (or [N, H, W]) with values in [0, 1]; all have the same N.
    With more than ``columns`` images the rows wrap into bands, separated by a wider gap.
    Returns a uint8 gray image [height, width] (white grid lines, black background digits),
    enlarged ``scale`` times with nearest-neighbour pixels.
    """
    rows = [r.detach().float().cpu().reshape(r.shape[0], r.shape[-2], r.shape[-1]).clamp(0, 1)
            for r in rows]
    n, height, width = rows[0].shape
    columns = max(1, min(columns, n))
    bands = math.ceil(n / columns)
    cell_h, cell_w = height + pad, width + pad
    band_h = len(rows) * cell_h + pad
    canvas = np.full((bands * band_h + pad, columns * cell_w + pad), 255, dtype=np.uint8)
    for index in range(n):
        band, col = divmod(index, columns)
        for r, images in enumerate(rows):
            top = pad + band * band_h + r * cell_h
            left = pad + col * cell_w
            canvas[top:top + height, left:left + width] = (images[index].numpy() * 255 + 0.5).astype(np.uint8)
    if scale > 1:
        canvas = canvas.repeat(scale, axis=0).repeat(scale, axis=1)
    return canvas


def save_png(image: np.ndarray, file) -> None:
    Image.fromarray(image).save(file, format="PNG", optimize=True)


def read_png(file) -> np.ndarray:
    """A PNG as a uint8 gray image (what ``save_png`` wrote)."""
    with Image.open(file) as image:
        return np.asarray(image.convert("L"))


def save_gif(frames: Sequence[np.ndarray], file, duration_ms: int = 400) -> None:
    """An animated GIF looping over ``frames`` (uint8 gray images of one size); the last one lingers."""
    images = [Image.fromarray(frame) for frame in frames]
    durations = [duration_ms] * (len(images) - 1) + [duration_ms * 4]
    images[0].save(file, format="GIF", save_all=True, append_images=images[1:],
                   duration=durations, loop=0)


def _figure(width=6.4, height=4.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def plot_losses(history: Sequence[dict], file) -> None:
    """Train and eval loss per epoch (left) and eval RMSE (right), as a PNG."""
    epochs = [h["epoch"] for h in history]
    figure = _figure(9.0, 3.6)
    loss_ax, rmse_ax = figure.subplots(1, 2)
    loss_ax.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    loss_ax.plot(epochs, [h["eval_loss"] for h in history], "s-", label="eval")
    loss_ax.set(xlabel="epoch", ylabel="sigmoid cross-entropy", title="loss")
    loss_ax.legend()
    rmse_ax.plot(epochs, [h["eval_rmse"] for h in history], "s-", color="C1")
    rmse_ax.set(xlabel="epoch", ylabel="RMSE (pixels in [0, 1])", title="eval RMSE")
    for ax in (loss_ax, rmse_ax):
        ax.grid(alpha=0.3)
        if len(epochs) < 12:
            ax.set_xticks(epochs)
    figure.tight_layout()
    figure.savefig(file, format="png")


def plot_codes(points: torch.Tensor, labels: torch.Tensor, file, title: str) -> None:
    """A 2-D scatter of codes, one color per digit, with a legend, as a PNG."""
    points = torch.as_tensor(points).detach().cpu().numpy()
    labels = torch.as_tensor(labels).cpu().numpy()
    figure = _figure(6.4, 6.0)
    ax = figure.subplots()
    for label in np.unique(labels):
        chosen = labels == label
        ax.scatter(points[chosen, 0], points[chosen, 1], s=8, alpha=0.7, color=f"C{int(label) % 10}",
                   label=str(label))
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(title="digit", markerscale=2.5, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    figure.tight_layout()
    figure.savefig(file, format="png")


def pca_2d(x: torch.Tensor) -> torch.Tensor:
    """Projection onto the first two principal components (exact SVD), [N, D] -> [N, 2]."""
    x = torch.as_tensor(x, dtype=torch.float64)
    centered = x - x.mean(dim=0)
    _, _, vh = torch.linalg.svd(centered, full_matrices=False)
    # Fix the signs (SVD's are arbitrary): the largest loading of each component is positive.
    components = vh[:2] * torch.sign(vh[:2].gather(1, vh[:2].abs().argmax(1, keepdim=True)))
    return centered @ components.T


def _conditional_probabilities(sq_dist: torch.Tensor, perplexity: float, steps: int = 64) -> torch.Tensor:
    """Row-wise Gaussian affinities whose entropy is log(perplexity), by bisection on beta = 1/(2 sigma^2)."""
    n = sq_dist.shape[0]
    eye = torch.eye(n, dtype=torch.bool)
    d = sq_dist.masked_fill(eye, math.inf)
    d = d - d.min(dim=1, keepdim=True).values  # shift per row: same P, no underflow
    target = math.log(perplexity)
    beta = torch.full((n, 1), 1.0 / d[~eye].median().clamp_min(1e-12).item(), dtype=d.dtype)
    low = torch.zeros_like(beta)
    high = torch.full_like(beta, math.inf)
    for _ in range(steps):
        p = torch.exp(-d * beta)
        total = p.sum(dim=1, keepdim=True)
        entropy = torch.log(total) + beta * (torch.nan_to_num(d * p, nan=0.0)).sum(dim=1, keepdim=True) / total
        too_flat = entropy > target  # entropy too high: narrow the kernel
        low = torch.where(too_flat, beta, low)
        high = torch.where(too_flat, high, beta)
        beta = torch.where(torch.isinf(high), beta * 2, (low + high) / 2)
    p = torch.exp(-d * beta)
    return p / p.sum(dim=1, keepdim=True)


def tsne_2d(x: torch.Tensor, perplexity: float = 30.0, iterations: int = 750, seed: int = 0) -> torch.Tensor:
    """Exact t-SNE (van der Maaten & Hinton, 2008) to 2-D; O(N^2) memory, for up to a few thousand points.

    Standard schedule: early exaggeration 12 for 250 iterations with momentum 0.5, then
    momentum 0.8; learning rate max(N / 48, 50); per-coordinate gains.  Deterministic for
    a given ``seed``.
    """
    x = torch.as_tensor(x, dtype=torch.float64)
    n = x.shape[0]
    if n < 5:
        raise ValueError(f"t-SNE needs at least 5 points, got {n}")
    perplexity = min(perplexity, (n - 1) / 3)
    p = _conditional_probabilities(torch.cdist(x, x).square(), perplexity)
    p = ((p + p.T) / (2 * n)).clamp_min(1e-12)

    generator = torch.Generator().manual_seed(seed)
    y = torch.randn(n, 2, generator=generator, dtype=torch.float64) * 1e-4
    velocity = torch.zeros_like(y)
    gains = torch.ones_like(y)
    learning_rate = max(n / 48.0, 50.0)
    eye = torch.eye(n, dtype=torch.bool)
    for iteration in range(iterations):
        early = iteration < 250
        kernel = (1.0 / (1.0 + torch.cdist(y, y).square())).masked_fill(eye, 0.0)
        q = (kernel / kernel.sum()).clamp_min(1e-12)
        weights = ((12.0 if early else 1.0) * p - q) * kernel
        gradient = 4.0 * (weights.sum(dim=1, keepdim=True) * y - weights @ y)
        same_sign = torch.sign(gradient) == torch.sign(velocity)
        gains = torch.where(same_sign, gains * 0.8, gains + 0.2).clamp_min(0.01)
        velocity = (0.5 if early else 0.8) * velocity - learning_rate * gains * gradient
        y = y + velocity
        y = y - y.mean(dim=0)
    return y
