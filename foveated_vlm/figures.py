"""Figures of a Foveated VLM run, drawn by the trainer's figure callback (TensorBoard) and by the report (PNG)."""

import math
from typing import Optional

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from foveated_vlm.metrics import box_present, derived_metrics, psnr

__all__ = [
    "decode_latents",
    "evenly_spaced_clips",
    "plot_attention_maps",
    "plot_losses",
    "plot_prediction_figure",
    "plot_predictions",
    "plot_ratio",
    "stack_frames",
]

def evenly_spaced_clips(num_rows: int, num_clips: int) -> list[int]:
    """Row indices of `num_clips` clips spread evenly over a split of `num_rows`, first and last included: the clips
    the figures show."""
    return np.linspace(0, num_rows - 1, min(num_clips, num_rows)).round().astype(int).tolist()


def stack_frames(rows: list[dict]) -> np.ndarray:
    """The uint8 `frames` of dataset rows stacked: (N, T, S, S, 3)."""
    return np.stack([np.asarray(row["frames"], dtype=np.uint8) for row in rows])


def plot_attention_maps(frames, attn_coarse, attn_fine, boxes=None) -> Figure:
    """Pass 1's and Pass 2's attention of one clip over time.

    Args:
        frames: uint8 (T, S, S, 3).
        attn_coarse, attn_fine: (T, P) attention over the P = g × g patches of each frame.
        boxes: optional (T, K, 4) ground-truth moving boxes, normalised [x0, y0, x1, y1]; rows with a negative
            value are absent boxes.

    Returns:
        A figure, rows Pass 1 / Pass 2, one column per frame, the heatmap over the frame. Both rows share one colour
        scale from 0, so a flat (uniform) map looks flat instead of being stretched into noise.
    """
    frames = np.asarray(frames)
    attn_coarse, attn_fine = np.asarray(attn_coarse, dtype=np.float32), np.asarray(attn_fine, dtype=np.float32)
    T, S = frames.shape[0], frames.shape[1]
    P = attn_coarse.shape[-1]
    grid = math.isqrt(P)
    if grid * grid != P:
        raise ValueError(f"attention has {P} patches per frame; expected a square number (a g x g patch grid)")
    vmax = float(max(attn_coarse.max(), attn_fine.max()))
    figure = Figure(figsize=(1.8 * T, 4.0), layout="constrained")
    axes = figure.subplots(2, T, squeeze=False)
    for row, (name, attention) in enumerate((("Pass 1", attn_coarse), ("Pass 2", attn_fine))):
        for t in range(T):
            ax = axes[row, t]
            ax.imshow(frames[t])
            heatmap = attention[t].reshape(grid, grid)  # (P,) -> (g, g), row-major like the patch sequence
            ax.imshow(heatmap, cmap="inferno", alpha=0.6, vmin=0.0, vmax=vmax, extent=(0, S, S, 0))
            if boxes is not None:
                frame_boxes = np.asarray(boxes)[t]  # (K, 4)
                for x0, y0, x1, y1 in frame_boxes[box_present(frame_boxes)]:
                    box = Rectangle((x0 * S, y0 * S), (x1 - x0) * S, (y1 - y0) * S, fill=False, edgecolor="cyan")
                    ax.add_patch(box)
            ax.set_title(f"{name} t={t}", fontsize=8)
            ax.axis("off")
    return figure


def plot_predictions(frames_t, actual_next, predicted_fine, predicted_coarse=None, t: Optional[int] = None) -> Figure:
    """Next-frame predictions of N clips, one row each: frame t | actual t+1 | predicted t+1 (fine) [| (coarse)].

    All images are (N, H, W, 3), uint8 or float in [0, 1]; `t` (optional) puts the frame index in the titles. Pass
    the VAE decoding of the actual latent as `actual_next` to compare like with like: the model predicts latents, so
    the VAE's own loss is not its error.
    """
    now, then = ("t", "t+1") if t is None else (str(t), str(t + 1))
    columns = [(f"frame {now}", frames_t), (f"actual {then} (VAE)", actual_next)]
    columns.append((f"predicted {then}, fine", predicted_fine))
    if predicted_coarse is not None:
        columns.append((f"predicted {then}, coarse", predicted_coarse))
    N = len(frames_t)
    figure = Figure(figsize=(2.2 * len(columns), 2.2 * N), layout="constrained")
    axes = figure.subplots(N, len(columns), squeeze=False)
    for col, (title, images) in enumerate(columns):
        for row in range(N):
            axes[row, col].imshow(np.asarray(images[row]))
            axes[row, col].axis("off")
        axes[0, col].set_title(title, fontsize=8)
    return figure


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> np.ndarray:
    """Scaled VAE latents (N, C, h, w), as stored in the dataset, -> float images (N, H, W, 3) in [0, 1]."""
    latents = latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor
    images = vae.decode(latents).sample  # (N, 3, H, W) in [-1, 1]
    return ((images.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()


def plot_prediction_figure(vae, frames, latents, outputs) -> tuple[Figure, float]:
    """Figure 4: the last frame predicted from all earlier ones (the most context), VAE-decoded; and the PSNR (dB)
    of the VAE's own decoding of the actual latent against the real frame, i.e. what the target can show at best."""
    t = outputs.pred_fine.shape[1] - 2
    actual = decode_latents(vae, latents[:, t + 1])  # (N, S, S, 3) in [0, 1]
    figure = plot_predictions(
        frames[:, t],
        actual,
        decode_latents(vae, outputs.pred_fine[:, t + 1]),
        decode_latents(vae, outputs.pred_coarse[:, t + 1]),
        t=t,
    )
    figure.suptitle(f"Frame {t}, and frame {t + 1} predicted from frames 0..{t} and actual (VAE-decoded latents)",
                    fontsize=9)
    return figure, psnr(actual, frames[:, t + 1].astype(np.float32) / 255)


# ---- Figures 1-2 from the log history ----


def _finish(ax, has_data: bool, log_scale: bool = False):
    """Grid and legend, or a note where the log history had nothing to draw."""
    ax.grid(alpha=0.3)
    ax.set_xlabel("optimizer step")
    if has_data:
        ax.legend(fontsize=8)
        if log_scale:
            ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no fine/coarse losses in the log history", ha="center", transform=ax.transAxes)


def plot_losses(train: dict, evaluation: dict) -> Figure:
    """Figure 1: loss/fine and loss/coarse over optimizer steps; train lines, eval markers. Each of `train` and
    `evaluation` holds arrays `step`, `fine`, `coarse` (empty where the log has none)."""
    figure = Figure(figsize=(7, 4), layout="constrained")
    ax = figure.subplots()
    for name, color in (("fine", "tab:blue"), ("coarse", "tab:orange")):
        # Fine drawn thinner on top of coarse: both stay visible where they coincide.
        size = dict(linewidth=1.2, markersize=4, zorder=3) if name == "fine" else dict(linewidth=2.8, markersize=8)
        if len(train["step"]):
            ax.plot(train["step"], train[name], color=color, label=f"train loss/{name}", **size)
        if len(evaluation["step"]):
            ax.plot(evaluation["step"], evaluation[name], "o--", color=color, label=f"eval loss/{name}", **size)
    _finish(ax, bool(len(train["step"]) or len(evaluation["step"])), log_scale=True)
    ax.set_ylabel("next-frame latent MSE (log scale)")
    ax.set_title("loss_fine and loss_coarse over training steps")
    return figure


def plot_ratio(train: dict, evaluation: dict) -> Figure:
    """Figure 2: loss/coarse / loss/fine over steps (`loss/ratio`); above the 1.0 line Pass 2 predicts better."""
    figure = Figure(figsize=(7, 3.5), layout="constrained")
    ax = figure.subplots()
    for series, style, label in ((train, "-", "train"), (evaluation, "o--", "eval")):
        if len(series["step"]):
            ratio = [derived_metrics({"loss/fine": f, "loss/coarse": c})["loss/ratio"]
                     for f, c in zip(series["fine"], series["coarse"])]
            ax.plot(series["step"], ratio, style, label=label)
    ax.axhline(1.0, color="black", linewidth=1, linestyle=":", label="1.0 (no effect)")
    _finish(ax, bool(len(train["step"]) or len(evaluation["step"])))
    ax.set_ylabel("loss/coarse ÷ loss/fine")
    ax.set_title("loss_coarse / loss_fine over training steps")
    return figure
