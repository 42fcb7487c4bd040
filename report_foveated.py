"""The report of a finished run, for management (seed §9): figures 1-4, Table 1 and what limits the result.

Usage:
    python report_foveated.py outputs/tiny                               # data paths from the run's data_paths.json
    python report_foveated.py RUN_DIR --eval_dataset data/arrow/.../eval --vae data/vae/tiny-128px --num_videos 6
    python report_foveated.py --compare outputs/research/*               # one table row per run, seeds pooled

Writes `RUN_DIR/report/`: fig1_losses.png, fig2_ratio.png, fig3_attention_<k>.png, fig4_predictions.png,
metrics.json (every number the text quotes), report.md and report.html (self-contained, images embedded).

Everything is measured from the run: the log history (trainer_state.json of the run or of its last checkpoint), the
final model on the whole held-out split, and the VAE decoder for the pictures. Whatever is missing is said in the
report instead of stopping it.

Target numbering follows the design: the model predicts latents v_1..v_T; "t >= 2" are the targets that have a
previous latent (v_1 is predicted from a learned start latent and a state that has seen no frame). Frame indices in
figure titles are 0-based, as in the trainer's figures.
"""

import argparse
import base64
import html
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from matplotlib.figure import Figure
from transformers.trainer_utils import get_last_checkpoint

from card_foveated import REPORT_DIR, architecture_rows
from data_foveated import FoveatedVLMDataCollator, load_precomputed
from figures_foveated import plot_attention_maps, plot_prediction_figure
from metrics_foveated import box_coverage, derived_metrics, model_inputs
from modeling_foveated import FoveatedVLMModel, attention_entropy
from probes_foveated import from_pretrained_with_probes
from processing_foveated import FoveatedVLMProcessor

__all__ = [
    "DATA_PATHS_FILE",
    "FoveatedVLMClipMetrics",
    "box_coverage",
    "clip_category",
    "evaluate_clips",
    "load_log_history",
    "plot_attention_figures",
    "plot_losses",
    "plot_prediction_figure",
    "plot_ratio",
    "resolve_data_paths",
    "summarize",
    "write_report",
    "main",
]

# Written by the training script next to the model: {"eval_dataset": folder, "vae": folder or Hub id}.
DATA_PATHS_FILE = "data_paths.json"

# Clip heuristics on the mean absolute difference of consecutive frames (pixels scaled to [0, 1]). A 16 px square
# moving on a 128 px synthetic frame gives about 0.01; a camera pan over a textured real scene 0.05-0.15.
STATIC_MAX_DIFF = 0.005  # below: nothing visible changes (about 1.3 grey levels on average)
FAST_MIN_DIFF = 0.05  # at or above: fast motion
CUT_MIN_DIFF = 0.20  # a scene cut: one frame pair differs this much ...
CUT_MIN_RATIO = 3.0  # ... and at least this many times the clip's median pair difference

# Attention whose entropy is at least this share of log(P) is called (almost) uniform.
UNIFORM_ENTROPY_SHARE = 0.99

# The seed's interpretation of improvement = (coarse - fine) / coarse (§8.1).
IMPROVEMENT_BANDS = ((0.0, "foveation hurts"), (0.05, "marginal"), (0.15, "PoC success"), (math.inf, "strong"))


# ---- Measuring the eval split ----


@dataclass
class FoveatedVLMClipMetrics:
    """Per-clip measurements of the final model on the eval split: N clips, T targets (v_1..v_T).

    Args:
        mse_fine, mse_coarse: (N, T) MSE of each target, Pass 2 (dynamic queries) and Pass 1 (static query).
        mse_copy: (N, T - 1) MSE of copying the previous latent, targets v_2..v_T.
        mse_autoregressive: (N, T) MSE of the focused stream of `model.stream(autoregressive=True)`.
        entropy_static, entropy_dynamic: (N,) mean attention entropy (nats) over the clip's frames.
        inside_static, inside_dynamic: (N, T - 1) attention mass inside the moving boxes on frames 2..T (the dynamic
            query there was emitted after seeing earlier frames); NaN where a frame has no box.
        box_area: (N, T - 1) fraction of the frame the boxes cover = the mass of uniform attention (chance).
        frame_diff: (N, T - 1) mean absolute difference of consecutive frames, pixels in [0, 1].
        names: (N,) the clips' video_id (or row index).
    """

    mse_fine: np.ndarray
    mse_coarse: np.ndarray
    mse_copy: np.ndarray
    mse_autoregressive: np.ndarray
    entropy_static: np.ndarray
    entropy_dynamic: np.ndarray
    inside_static: np.ndarray
    inside_dynamic: np.ndarray
    box_area: np.ndarray
    frame_diff: np.ndarray
    names: list


def _tracking(attention: torch.Tensor, coverage: torch.Tensor) -> torch.Tensor:
    """Attention mass inside the boxes on frames 2..T: (B, T, P) x (B, T, P) -> (B, T - 1), NaN where no box."""
    mass = (attention.float() * coverage).sum(-1)[:, 1:]
    return torch.where(coverage[:, 1:].sum(-1) > 0, mass, torch.full_like(mass, math.nan))


@torch.no_grad()
def _measure_batch(model, batch: dict, frames: torch.Tensor) -> dict[str, torch.Tensor]:
    """All per-clip measurements of one collated batch; `frames` uint8 (B, T, S, S, 3)."""
    inputs = model_inputs(batch, model)
    outputs = model(**inputs)
    target = batch["vae_latents"].float()  # (B, T, C, h, w)
    if "oracle_fixations" in inputs:  # oracle fixations exist in training only: nothing to stream
        pred_autoregressive = torch.full_like(outputs.pred_fine, math.nan)
    else:
        streamed = model.stream(
            inputs["pixel_values"].unbind(1),
            target.unbind(1),
            input_ids=inputs.get("input_ids"),
            attention_mask=inputs.get("attention_mask"),
            autoregressive=True,
        )
        pred_autoregressive = torch.stack([step.pred_fine for step in streamed], dim=1)  # (B, T, C, h, w)
    coverage = box_coverage(batch["moving_boxes"].cpu(), math.isqrt(outputs.attn_static.shape[-1]))
    pixels = frames.float() / 255
    return {
        "mse_fine": (outputs.pred_fine - target).pow(2).mean(dim=(2, 3, 4)),
        "mse_coarse": (outputs.pred_coarse - target).pow(2).mean(dim=(2, 3, 4)),
        "mse_copy": (target[:, 1:] - target[:, :-1]).pow(2).mean(dim=(2, 3, 4)),
        "mse_autoregressive": (pred_autoregressive - target).pow(2).mean(dim=(2, 3, 4)),
        "entropy_static": torch.stack([attention_entropy(a) for a in outputs.attn_static]),
        "entropy_dynamic": torch.stack([attention_entropy(a) for a in outputs.attn_dynamic]),
        "inside_static": _tracking(outputs.attn_static.cpu(), coverage),
        "inside_dynamic": _tracking(outputs.attn_dynamic.cpu(), coverage),
        "box_area": torch.where(coverage[:, 1:].sum(-1) > 0, coverage[:, 1:].mean(-1), math.nan),
        "frame_diff": (pixels[:, 1:] - pixels[:, :-1]).abs().mean(dim=(2, 3, 4)),
    }


def _rows(dataset, indices) -> tuple[list[dict], torch.Tensor]:
    rows = [dataset[int(i)] for i in indices]
    frames = torch.stack([torch.as_tensor(row["frames"]) for row in rows]).to(torch.uint8)  # (B, T, S, S, 3)
    return rows, frames


def _to_device(batch: dict, device) -> dict:
    return {name: value.to(device) for name, value in batch.items()}


def evaluate_clips(model, dataset, collator, batch_size: int = 16, device="cpu") -> FoveatedVLMClipMetrics:
    """Run the final model over the whole eval split, two-pass and streamed, and keep per-clip measurements."""
    model.eval()
    parts = []
    for start in range(0, len(dataset), batch_size):
        rows, frames = _rows(dataset, range(start, min(start + batch_size, len(dataset))))
        measured = _measure_batch(model, _to_device(collator(rows), device), frames)
        parts.append({name: value.float().cpu().numpy() for name, value in measured.items()})
    merged = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
    names = dataset["video_id"] if "video_id" in dataset.column_names else list(range(len(dataset)))
    return FoveatedVLMClipMetrics(**merged, names=[str(name) for name in names])


# ---- Numbers ----


def improvement(coarse: float, fine: float) -> float:
    return derived_metrics({"loss/fine": fine, "loss/coarse": coarse})["improvement"]


def improvement_band(value: float) -> str:
    return next(label for upper, label in IMPROVEMENT_BANDS if value < upper)


def clip_category(diffs: np.ndarray) -> str:
    """static / scene cut / fast motion / moderate motion, from one clip's consecutive-frame differences."""
    if diffs.max() >= CUT_MIN_DIFF and diffs.max() >= CUT_MIN_RATIO * np.median(diffs):
        return "scene cut"
    if diffs.mean() < STATIC_MAX_DIFF:
        return "static"
    return "fast motion" if diffs.mean() >= FAST_MIN_DIFF else "moderate motion"


def _rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho (no tie correction), NaN for fewer than 3 clips or a constant input."""
    if len(a) < 3:
        return math.nan
    ranks_a, ranks_b = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    if ranks_a.std() == 0 or ranks_b.std() == 0:
        return math.nan
    return float(np.corrcoef(ranks_a, ranks_b)[0, 1])


def summarize(clips: FoveatedVLMClipMetrics, num_patches: int, num_hardest: int) -> dict:
    """Every number of Table 1 and the analysis, from per-clip measurements. Means over equal-sized targets, so each
    equals the MSE over all elements of the split."""
    fine, coarse = clips.mse_fine, clips.mse_coarse
    N, T = fine.shape
    # Clip-level standard error of the full-loss improvement: paired differences, relative to mean coarse loss.
    paired = coarse.mean(1) - fine.mean(1)
    has_box = ~np.isnan(clips.box_area)
    summary = {
        "num_clips": N,
        "num_targets": T,
        "full": {"loss_coarse": float(coarse.mean()), "loss_fine": float(fine.mean())},
        "t_ge_2": {"loss_coarse": float(coarse[:, 1:].mean()), "loss_fine": float(fine[:, 1:].mean())},
        "copy_previous_t_ge_2": float(clips.mse_copy.mean()),
        "improvement_full_stderr": float(paired.std(ddof=1) / math.sqrt(N) / coarse.mean()) if N > 1 else math.nan,
        "first_target_share_of_full_loss_fine": float(fine[:, 0].mean() / fine.sum(1).mean()),
        "entropy_static": float(clips.entropy_static.mean()),
        "entropy_dynamic": float(clips.entropy_dynamic.mean()),
        "entropy_uniform": math.log(num_patches),
        "autoregressive": {
            "loss_fine_two_pass": float(fine.mean()),
            "loss_fine_autoregressive": float(clips.mse_autoregressive.mean()),
            "loss_fine_two_pass_t_ge_2": float(fine[:, 1:].mean()),
            "loss_fine_autoregressive_t_ge_2": float(clips.mse_autoregressive[:, 1:].mean()),
        },
        "tracking": None,
    }
    for split in ("full", "t_ge_2"):
        summary[split]["improvement"] = improvement(summary[split]["loss_coarse"], summary[split]["loss_fine"])
    if has_box.any():
        summary["tracking"] = {
            "frames_with_box": int(has_box.sum()),
            "inside_dynamic": float(clips.inside_dynamic[has_box].mean()),
            "inside_static": float(clips.inside_static[has_box].mean()),
            "chance": float(clips.box_area[has_box].mean()),
        }
    summary["hardest"] = _hardest(clips, num_hardest)
    return summary


def _hardest(clips: FoveatedVLMClipMetrics, num_hardest: int) -> dict:
    """The clips with the highest full loss_fine and how their frame differences compare with the whole split."""
    loss = clips.mse_fine.mean(1)
    order = np.argsort(-loss)[:num_hardest]
    categories = [clip_category(diffs) for diffs in clips.frame_diff]
    mean_diff = clips.frame_diff.mean(1)
    count = lambda indices: {c: sum(categories[i] == c for i in indices) for c in sorted(set(categories))}  # noqa: E731
    return {
        "clips": [
            {
                "index": int(i),
                "name": clips.names[i],
                "loss_fine": float(loss[i]),
                "loss_coarse": float(clips.mse_coarse[i].mean()),
                "copy_previous_t_ge_2": float(clips.mse_copy[i].mean()),
                "mean_frame_diff": float(mean_diff[i]),
                "max_frame_diff": float(clips.frame_diff[i].max()),
                "category": categories[i],
            }
            for i in order
        ],
        "categories_hardest": count(order),
        "categories_all": count(range(len(loss))),
        "mean_frame_diff_hardest": float(mean_diff[order].mean()),
        "mean_frame_diff_all": float(mean_diff.mean()),
        "rank_correlation_loss_fine_vs_frame_diff": _rank_correlation(loss, mean_diff),
        "rank_correlation_loss_fine_vs_copy_previous": _rank_correlation(loss, clips.mse_copy.mean(1)),
    }


# ---- Log history and figures 1-2 ----


def load_log_history(run_dir: Path) -> tuple[list[dict], Optional[dict], Optional[Path]]:
    """(log_history, trainer state, the file read) from trainer_state.json of the run or of its last checkpoint."""
    candidates = [run_dir / "trainer_state.json"]
    if run_dir.is_dir() and get_last_checkpoint(str(run_dir)):
        candidates.append(Path(get_last_checkpoint(str(run_dir))) / "trainer_state.json")
    for path in candidates:
        if path.is_file():
            state = json.loads(path.read_text())
            return state.get("log_history", []), state, path
    return [], None, None


def _series(log_history: list[dict], prefix: str) -> dict[str, np.ndarray]:
    """Steps and mean fine/coarse losses of the log entries that have both (prefix "" for train, "eval_")."""
    entries = [e for e in log_history if f"{prefix}loss/fine" in e and f"{prefix}loss/coarse" in e and "step" in e]
    return {
        "step": np.array([e["step"] for e in entries], dtype=float),
        "fine": np.array([e[f"{prefix}loss/fine"] for e in entries], dtype=float),
        "coarse": np.array([e[f"{prefix}loss/coarse"] for e in entries], dtype=float),
    }


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
    """Figure 1: loss/fine and loss/coarse over optimizer steps; train lines, eval markers."""
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
    ax.set_title("Figure 1: dynamic (fine) vs static (coarse) query loss")
    return figure


def plot_ratio(train: dict, evaluation: dict) -> Figure:
    """Figure 2: loss/coarse / loss/fine over steps; above the 1.0 line foveation helps."""
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
    ax.set_title("Figure 2: loss ratio (> 1: dynamic queries predict better)")
    return figure


# ---- Figures 3-4 ----


def plot_attention_figures(frames, outputs, boxes, clips, indices) -> list[Figure]:
    """Figure 3, one per clip: static vs dynamic attention over time, the moving box, the clip's tracking numbers.
    `frames` uint8 (N, T, S, S, 3), `outputs` the model's on these N clips, `indices` their rows in `clips`."""
    figures = []
    for k, i in enumerate(indices):
        has_box = (boxes[k] >= 0).all(-1).any()
        figure = plot_attention_maps(
            frames[k], outputs.attn_static[k].cpu(), outputs.attn_dynamic[k].cpu(), boxes[k] if has_box else None
        )
        tracking = ""
        if not np.isnan(clips.box_area[i]).all():
            tracking = (f"; attention mass in the box over frames 1..{clips.box_area.shape[1]}: dynamic "
                        f"{np.nanmean(clips.inside_dynamic[i]):.3f}, static {np.nanmean(clips.inside_static[i]):.3f}, "
                        f"chance {np.nanmean(clips.box_area[i]):.3f}")
        figure.suptitle(f"Figure 3.{k + 1}: eval clip {clips.names[i]}{tracking}", fontsize=9)
        figures.append(figure)
    return figures


# ---- report.md and report.html from one list of blocks ----


class _Document:
    """Headings, paragraphs, bullet lists, tables and figures, rendered to Markdown and to self-contained HTML.
    Inline markup: `code` and **bold** only (no Markdown package is a dependency)."""

    def __init__(self, title: str):
        self.title = title
        self.blocks: list[tuple] = []

    def heading(self, text: str, level: int = 2):
        self.blocks.append(("heading", level, text))

    def paragraph(self, text: str):
        self.blocks.append(("paragraph", text))

    def bullets(self, items: list[str]):
        if items:
            self.blocks.append(("bullets", items))

    def preformatted(self, text: str):
        self.blocks.append(("preformatted", text))

    def table(self, header: list[str], rows: list[list[str]]):
        self.blocks.append(("table", header, rows))

    def figure(self, path: Path, caption: str):
        self.blocks.append(("figure", path, caption))

    def markdown(self) -> str:
        lines = [f"# {self.title}", ""]
        for kind, *content in self.blocks:
            if kind == "heading":
                lines += ["#" * content[0] + " " + content[1]]
            elif kind == "paragraph":
                lines += [content[0]]
            elif kind == "bullets":
                lines += [f"- {item}" for item in content[0]]
            elif kind == "preformatted":
                lines += ["```", content[0], "```"]
            elif kind == "table":
                header, rows = content
                lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                lines += ["| " + " | ".join(row) + " |" for row in rows]
            else:
                path, caption = content
                lines += [f"![{caption}]({path.name})", "", f"*{caption}*"]
            lines.append("")
        return "\n".join(lines)

    @staticmethod
    def _inline(text: str) -> str:
        text = html.escape(text)
        text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
        return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)

    def html(self) -> str:
        parts = [f"<h1>{self._inline(self.title)}</h1>"]
        for kind, *content in self.blocks:
            if kind == "heading":
                parts.append(f"<h{content[0]}>{self._inline(content[1])}</h{content[0]}>")
            elif kind == "paragraph":
                parts.append(f"<p>{self._inline(content[0])}</p>")
            elif kind == "preformatted":
                parts.append(f"<pre>{html.escape(content[0])}</pre>")
            elif kind == "bullets":
                parts.append("<ul>" + "".join(f"<li>{self._inline(item)}</li>" for item in content[0]) + "</ul>")
            elif kind == "table":
                header, rows = content
                head = "".join(f"<th>{self._inline(cell)}</th>" for cell in header)
                body = "".join("<tr>" + "".join(f"<td>{self._inline(c)}</td>" for c in row) + "</tr>" for row in rows)
                parts.append(f"<table><tr>{head}</tr>{body}</table>")
            else:
                path, caption = content
                data = base64.b64encode(path.read_bytes()).decode("ascii")
                parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
                             f"<figcaption>{self._inline(caption)}</figcaption></figure>")
        style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.45}"
                 "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:3px 8px}"
                 "img{max-width:100%}figcaption{font-style:italic;font-size:90%}code{background:#f2f2f2}")
        return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{html.escape(self.title)}</title>"
                f"<style>{style}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")


# ---- The report's text: every sentence from a measured number ----


def _pct(value: float) -> str:
    """Signed percent to 3 significant digits: small effects (+0.0674 %) stay readable next to large ones."""
    return "n/a" if value is None or math.isnan(value) else f"{value * 100:+.3g}%"


def _executive_summary(doc: _Document, summary: Optional[dict], steps: Optional[int], notes: list[str]):
    doc.heading("1. Executive summary")
    if summary is None:
        doc.paragraph("No held-out measurement: " + " ".join(notes))
        return
    full, later = summary["full"]["improvement"], summary["t_ge_2"]["improvement"]
    verb = "lowers" if full > 0 else "raises" if full < 0 else "does not change"
    stderr = summary["improvement_full_stderr"]
    doc.paragraph(
        f"**Dynamic foveated attention {verb} held-out next-frame latent MSE by {abs(full) * 100:.3g}% on the full "
        "loss** "
        f"(improvement {_pct(full)}, the seed's metric and this report's headline: {improvement_band(full)}), and "
        f"changes it by {_pct(later)} on the targets that have a previous latent (t ≥ 2), over "
        f"{summary['num_clips']} held-out clips after {steps if steps is not None else 'an unknown number of'} "
        "training steps."
    )
    if not math.isnan(stderr):
        distinct = "distinguishable" if abs(full) > 2 * stderr else "not distinguishable"
        doc.paragraph(f"The clip-level standard error of the full-loss improvement is ±{stderr * 100:.2g}%: the "
                      f"measured effect is {distinct} from zero at two standard errors.")
    static, dynamic, uniform = summary["entropy_static"], summary["entropy_dynamic"], summary["entropy_uniform"]
    if min(static, dynamic) >= UNIFORM_ENTROPY_SHARE * uniform:
        doc.paragraph(f"Both passes attend almost uniformly (entropy {static:.3f} static and {dynamic:.3f} dynamic "
                      f"against log P = {uniform:.3f} nats), so whatever separates the two losses does not come from "
                      "where the queries look.")


def _training_rows(state: Optional[dict], log_history: list[dict], eval_path, num_clips) -> list[list[str]]:
    rows = []
    if state is not None:
        rows += [["Optimizer steps done", f"{state.get('global_step')} (planned {state.get('max_steps')})"],
                 ["Clips per device batch", str(state.get("train_batch_size"))]]
    rates = [e["learning_rate"] for e in log_history if "learning_rate" in e]
    if rates:
        rows.append(["Peak learning rate (logged)", f"{max(rates):.3g}"])
    runtime = [e["train_runtime"] for e in log_history if "train_runtime" in e]
    if runtime:
        rows.append(["Training wall time", f"{runtime[-1]:.0f} s"])
    if eval_path is not None:
        rows.append(["Held-out split", f"{num_clips} clips from `{eval_path}`"])
    return rows


def _method(doc: _Document, config, state, log_history, eval_path, num_clips):
    doc.heading("2. Method")
    doc.paragraph(
        "Each frame is read by the vision encoder once; a query token reads ONE visual token per frame from the "
        "cached encoder keys/values. Pass 1 reads every frame with a learned static query; the LLM emits after each "
        "frame the query for the next one. Pass 2 reads frame t with that query. A shared head predicts the next "
        "frame's VAE latent from the LLM state and the previous latent. loss_coarse is Pass 1's MSE, loss_fine Pass "
        "2's; the difference is what choosing where to look buys."
    )
    T, S, P = config.num_frames, config.image_size, config.num_patches
    latent = f"{config.latent_channels}×{config.latent_size}×{config.latent_size}"
    doc.preformatted(
        f"frames [T={T}, 3, {S}, {S}] ──encoder, once per frame──► keys/values of {P} patches per frame\n"
        "Pass 1: q_static ──read──► z°_1..z°_T ──LLM──► q_1..q_T, states ──head(previous latent)──► loss_coarse\n"
        "Pass 2: q_init, q_1..q_(T-1) ──read──► z_1..z_T ──LLM──► states ──head(previous latent)──► loss_fine\n"
        f"targets: VAE latents v_1..v_T ({latent}); the prediction of v_t sees frames < t and v_(t-1) only"
    )
    doc.table(["Part", "This run"], [[name, value] for name, value in architecture_rows(config).items()])
    doc.table(["Training", "Value"], _training_rows(state, log_history, eval_path, num_clips))


def _table1(doc: _Document, summary: dict):
    full, later = summary["full"], summary["t_ge_2"]
    copy = summary["copy_previous_t_ge_2"]
    rows = [
        ["loss_coarse (static query)", f"{full['loss_coarse']:.4f}", f"{later['loss_coarse']:.4f}"],
        ["loss_fine (dynamic queries)", f"{full['loss_fine']:.4f}", f"{later['loss_fine']:.4f}"],
        ["Improvement (coarse − fine) / coarse", _pct(full["improvement"]), _pct(later["improvement"])],
        ["Copy previous latent (baseline)", "n/a (v_1 has no previous latent)", f"{copy:.4f}"],
    ]
    doc.paragraph(f"**Table 1.** Held-out next-frame latent MSE of the final model over all {summary['num_clips']} "
                  f"eval clips. \"Full loss\" is the seed's definition (mean over all {summary['num_targets']} "
                  "targets v_1..v_T, the headline); \"targets t ≥ 2\" leaves out v_1, which is predicted from a "
                  "learned start latent by a state that has seen no frame.")
    doc.table(["Metric", "Full loss (seed's definition)", "Targets t ≥ 2"], rows)
    ar = summary["autoregressive"]
    entropy_rows = [
        ["Attention entropy, static (nats)", f"{summary['entropy_static']:.3f}"],
        ["Attention entropy, dynamic (nats)", f"{summary['entropy_dynamic']:.3f}"],
        ["Uniform attention, log P (nats)", f"{summary['entropy_uniform']:.3f}"],
        ["loss_fine, two-pass (training's approximation)", f"{ar['loss_fine_two_pass']:.4f}"],
        ["loss_fine, streamed autoregressive (deployment)", f"{ar['loss_fine_autoregressive']:.4f}"],
        ["Autoregressive gap, full loss", _pct(ar["loss_fine_autoregressive"] / ar["loss_fine_two_pass"] - 1)],
        ["Autoregressive gap, targets t ≥ 2",
         _pct(ar["loss_fine_autoregressive_t_ge_2"] / ar["loss_fine_two_pass_t_ge_2"] - 1)],
    ]
    tracking = summary["tracking"]
    if tracking is not None:
        entropy_rows += [
            ["Attention mass in moving box, dynamic", f"{tracking['inside_dynamic']:.3f}"],
            ["Attention mass in moving box, static", f"{tracking['inside_static']:.3f}"],
            ["Box area fraction (chance)", f"{tracking['chance']:.3f}"],
        ]
    doc.paragraph("**Table 2.** Secondary metrics on the same split. The autoregressive gap compares "
                  "`model.stream(autoregressive=True)` (the next query comes from the focused stream) with the "
                  "two-pass forward used in training. Tracking uses frames 2..T that show a moving box"
                  + (f" ({tracking['frames_with_box']} frames)" if tracking else "") + "; uniform attention puts the "
                  "box's area fraction inside it.")
    doc.table(["Metric", "Value"], entropy_rows)


def _hardest_section(doc: _Document, hardest: dict):
    doc.heading("Where it fails: the clips with the highest loss_fine", 3)
    doc.table(
        ["Clip", "loss_fine", "loss_coarse", "copy previous (t ≥ 2)", "mean abs frame diff", "max", "kind"],
        [[c["name"], f"{c['loss_fine']:.4f}", f"{c['loss_coarse']:.4f}", f"{c['copy_previous_t_ge_2']:.4f}",
          f"{c['mean_frame_diff']:.4f}", f"{c['max_frame_diff']:.4f}", c["category"]] for c in hardest["clips"]],
    )
    counts = lambda d: ", ".join(f"{n} {kind}" for kind, n in d.items() if n)  # noqa: E731
    doc.paragraph(
        f"Kinds among these {len(hardest['clips'])}: {counts(hardest['categories_hardest'])}; in the whole split: "
        f"{counts(hardest['categories_all'])}. Their mean absolute frame difference is "
        f"{hardest['mean_frame_diff_hardest']:.4f} against {hardest['mean_frame_diff_all']:.4f} for the split; the "
        "rank "
        f"correlation of a clip's loss_fine with its frame difference is "
        f"{hardest['rank_correlation_loss_fine_vs_frame_diff']:.2f}, with its copy-previous error (how much the "
        f"latent changes) {hardest['rank_correlation_loss_fine_vs_copy_previous']:.2f}. Kinds, from the mean absolute "
        f"difference of consecutive frames with pixels in [0, 1]: static below {STATIC_MAX_DIFF}, fast motion from "
        f"{FAST_MIN_DIFF}, scene cut when one pair differs by at least {CUT_MIN_DIFF} and {CUT_MIN_RATIO:g}× the "
        "clip's median pair; moderate motion otherwise."
    )


def _limits(summary: Optional[dict], train: dict, notes: list[str]) -> list[str]:
    """What limits the result, one measured statement each."""
    items = list(notes)
    if len(train["step"]) >= 2:
        items.append(f"Training: train loss/fine went from {train['fine'][0]:.4f} (step {train['step'][0]:.0f}) to "
                     f"{train['fine'][-1]:.4f} (step {train['step'][-1]:.0f}); the last logged change was "
                     f"{_pct(train['fine'][-1] / train['fine'][-2] - 1)}.")
    if summary is None:
        return items
    share, full = summary["first_target_share_of_full_loss_fine"], summary["full"]
    # If v_1 stayed as it is and every later target were perfect, the full-loss improvement would be this.
    cap = 1 - share * full["loss_fine"] / full["loss_coarse"]
    T = summary["num_targets"]
    verdict = "The first target dominates" if share > 2 / T else "The first target"
    items.append(f"{verdict}: v_1 makes up {share:.0%} of the full loss_fine (1/T = {1 / T:.0%} if all targets "
                 f"weighed the same), so with v_1 as it is the full-loss improvement could not exceed {cap:.0%} even "
                 "with perfect later predictions.")
    fine, copy = summary["t_ge_2"]["loss_fine"], summary["copy_previous_t_ge_2"]
    if fine >= copy:
        items.append(f"The head does not yet beat copying the previous latent on t ≥ 2 ({fine:.4f} vs {copy:.4f}): "
                     "until it can, both passes carry the same large reconstruction error and their difference "
                     "says little about foveation.")
    else:
        items.append(f"On t ≥ 2 loss_fine is {1 - fine / copy:.0%} below the copy-previous baseline ({fine:.4f} vs "
                     f"{copy:.4f}).")
    static, dynamic, uniform = summary["entropy_static"], summary["entropy_dynamic"], summary["entropy_uniform"]
    items.append(f"Attention entropy: dynamic {dynamic:.3f}, static {static:.3f}, uniform {uniform:.3f} nats: dynamic "
                 f"is at {dynamic / uniform:.0%} and static at {static / uniform:.0%} of uniform.")
    tracking = summary["tracking"]
    if tracking is not None:
        items.append(f"Tracking: dynamic attention puts {tracking['inside_dynamic']:.3f} of its mass in the moving "
                     f"box, static {tracking['inside_static']:.3f}, chance {tracking['chance']:.3f} "
                     f"({tracking['inside_dynamic'] / tracking['chance']:.2f}× and "
                     f"{tracking['inside_static'] / tracking['chance']:.2f}× chance).")
    else:
        items.append("Tracking: the eval split has no moving-object boxes, so whether attention follows what moves "
                     "is not measured.")
    ar = summary["autoregressive"]
    items.append(f"Deployment: streaming with the focused stream's own queries changes loss_fine by "
                 f"{_pct(ar['loss_fine_autoregressive'] / ar['loss_fine_two_pass'] - 1)} (t ≥ 2: "
                 f"{_pct(ar['loss_fine_autoregressive_t_ge_2'] / ar['loss_fine_two_pass_t_ge_2'] - 1)}) relative to "
                 "the two-pass training approximation.")
    items.append(f"Evaluation size: {summary['num_clips']} clips; the full-loss improvement's clip-level standard "
                 f"error is ±{summary['improvement_full_stderr'] * 100:.2g}%.")
    if "vae_psnr_shown_clips" in summary:
        items.append(f"Target quality: the VAE's decoding of the actual latents reaches "
                     f"{summary['vae_psnr_shown_clips']:.1f} dB PSNR against the real frames of Figure 4's clips; "
                     "detail the VAE loses is invisible to both passes.")
    return items


def _next_steps(summary: Optional[dict], state: Optional[dict], log_history: list[dict]) -> list[str]:
    """Next steps that follow from the measurements, and what this run cost (to size a request)."""
    items = []
    if summary is not None:
        if summary["t_ge_2"]["loss_fine"] >= summary["copy_previous_t_ge_2"]:
            items.append("Get the head to the copy baseline first: train longer, or `head_residual: true` "
                         "(a residual head reached the copy error within 100 steps in the prototype).")
        tracking = summary["tracking"]
        selective = summary["entropy_dynamic"] < 0.95 * summary["entropy_static"]
        follows = tracking is not None and tracking["inside_dynamic"] > 1.5 * tracking["chance"]
        if not selective or (tracking is not None and not follows):
            items.append("The queries are not yet selective. The state path must be open first (without "
                         "`aux_current_weight` the head ignores the LLM state and the queries get no gradient), and "
                         "a perfect policy (`fine_queries: oracle`) is the test of whether looking in the right place "
                         "pays yet; in docs/RESULTS.md it did not until the model predicts motion at all, so train "
                         "longer, on more clips or from pretrained backbones first.")
        first_target_dominates = summary["first_target_share_of_full_loss_fine"] > 2 / summary["num_targets"]
        if summary["full"]["improvement"] < 0.05 and first_target_dominates:
            items.append("Report progress on targets t ≥ 2 next to the full loss: v_1 caps the full-loss figure.")
    runtime = [e["train_runtime"] for e in log_history if "train_runtime" in e]
    if state is not None and runtime:
        items.append(f"Cost of this run, to size the request: {state.get('global_step')} optimizer steps of "
                     f"{state.get('train_batch_size')} clips per device in {runtime[-1]:.0f} s.")
    items.append("More compute would buy: pretrained DINOv3 + SmolLM2 at 256 px (configs/phase1.yaml), more steps, "
                 "and a held-out split large enough to resolve a 5 % effect (the standard error above says how far "
                 "this one is).")
    return items


# ---- Putting it together ----


def _model_dir(run_dir: Path) -> Optional[Path]:
    """The final model in run_dir, else the last checkpoint's (a run stopped before its final save)."""
    if (run_dir / "config.json").is_file():
        return run_dir
    checkpoint = get_last_checkpoint(str(run_dir)) if run_dir.is_dir() else None
    return Path(checkpoint) if checkpoint and (Path(checkpoint) / "config.json").is_file() else None


def resolve_data_paths(run_dir: Path, eval_dataset: Optional[str], vae: Optional[str]) -> tuple:
    """(eval dataset, VAE, notes): the arguments win, else what the run recorded in DATA_PATHS_FILE."""
    recorded_path = run_dir / DATA_PATHS_FILE
    recorded = json.loads(recorded_path.read_text()) if recorded_path.is_file() else {}
    eval_dataset, vae = eval_dataset or recorded.get("eval_dataset"), vae or recorded.get("vae")
    notes = []
    if eval_dataset is None:
        notes.append(f"No held-out dataset: pass --eval_dataset (the run has no {DATA_PATHS_FILE} naming it), so "
                     "Table 1, the attention figures and the failure analysis are missing.")
    if vae is None:
        notes.append(f"No VAE: pass --vae (the run has no {DATA_PATHS_FILE} naming it), so Figure 4 is missing.")
    return eval_dataset, vae, notes


def _save(figure: Figure, path: Path) -> Path:
    figure.savefig(path, dpi=110)
    return path


def _json_safe(value):
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def _measure(model_dir: Path, eval_dataset: str, vae: Optional[str], num_videos: int, device, batch_size, out: Path):
    """Table-1 summary and figures 3-4 from the final model on the eval split: (summary, [(path, caption)])."""
    model = from_pretrained_with_probes(model_dir).to(device).eval()
    tokenizer = None
    if (model_dir / "processor_config.json").is_file():
        tokenizer = FoveatedVLMProcessor.from_pretrained(model_dir, trust_remote_code=True).tokenizer
    dataset = load_precomputed(eval_dataset)
    collator = FoveatedVLMDataCollator(tokenizer)
    clips = evaluate_clips(model, dataset, collator, batch_size, device)
    summary = summarize(clips, model.config.num_patches, min(num_videos, len(dataset)))
    summary["eval_dataset"], summary["model"] = str(eval_dataset), str(model_dir)

    indices = np.linspace(0, len(dataset) - 1, min(num_videos, len(dataset))).round().astype(int).tolist()
    rows, frames = _rows(dataset, indices)
    batch = _to_device(collator(rows), device)
    with torch.no_grad():
        outputs = model(**model_inputs(batch, model))
    frames, boxes = frames.numpy(), batch["moving_boxes"].cpu().numpy()
    attention_figures = plot_attention_figures(frames, outputs, boxes, clips, indices)
    figures = []
    for k, (i, figure) in enumerate(zip(indices, attention_figures)):
        caption = (f"Figure 3.{k + 1}. Eval clip {clips.names[i]}: static (top) and dynamic (bottom) attention over "
                   "each frame's patches, one colour scale from 0 for both rows (a flat map is uniform attention); "
                   "cyan: the ground-truth moving box where the clip has one. The dynamic map at frame t is the "
                   "attention of the query emitted after frame t-1.")
        figures.append((_save(figure, out / f"fig3_attention_{k}.png"), caption))
    if vae is not None:
        from diffusers import AutoencoderKL

        vae_model = AutoencoderKL.from_pretrained(vae).to(device).eval()
        figure, psnr = plot_prediction_figure(vae_model, frames, batch["vae_latents"], outputs)
        summary["vae_psnr_shown_clips"] = psnr
        caption = ("Figure 4. Per eval clip (rows): frame t, the actual frame t+1 as the VAE decodes its latent, and "
                   "the predicted frame t+1 decoded by the same VAE, with dynamic (fine) and static (coarse) queries. "
                   f"The VAE's own decoding of these targets reaches {summary['vae_psnr_shown_clips']:.1f} dB PSNR "
                   "against the real frames: what a perfect latent prediction would look like.")
        figures.append((_save(figure, out / "fig4_predictions.png"), caption))
    return summary, figures


def write_report(run_dir, eval_dataset=None, vae=None, num_videos: int = 6, device="cpu", batch_size: int = 16) -> Path:
    """Write RUN_DIR/report/ (figures, metrics.json, report.md, report.html); return that folder."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run_dir {run_dir} is not a folder")
    out = run_dir / REPORT_DIR
    out.mkdir(exist_ok=True)
    log_history, state, state_path = load_log_history(run_dir)
    notes = [] if state_path else [f"No trainer_state.json in {run_dir} or its checkpoints: Figures 1-2 are empty."]
    train, evaluation = _series(log_history, ""), _series(log_history, "eval_")
    if state_path and not len(train["step"]):
        notes.append("The log history has no train loss/fine and loss/coarse entries.")
    if state_path and not len(evaluation["step"]):
        notes.append("The log history has no evaluation: Figures 1-2 show training means only.")
    fig1 = _save(plot_losses(train, evaluation), out / "fig1_losses.png")
    fig2 = _save(plot_ratio(train, evaluation), out / "fig2_ratio.png")

    model_dir = _model_dir(run_dir)
    eval_dataset, vae, data_notes = resolve_data_paths(run_dir, eval_dataset, vae)
    notes += data_notes
    summary, clip_figures = None, []
    if model_dir is None:
        notes.append(f"No saved model in {run_dir} or its checkpoints: nothing on the held-out split is measured.")
    elif eval_dataset is not None:
        summary, clip_figures = _measure(model_dir, eval_dataset, vae, num_videos, device, batch_size, out)
    (out / "metrics.json").write_text(json.dumps(_json_safe({"summary": summary, "notes": notes}), indent=1))

    doc = _Document(f"Foveated VLM: report on {run_dir.name}")
    _executive_summary(doc, summary, state.get("global_step") if state else None, notes)
    if model_dir is not None:
        config = FoveatedVLMModel.config_class.from_pretrained(model_dir)
        _method(doc, config, state, log_history, eval_dataset, summary["num_clips"] if summary else None)
    doc.heading("3. Results")
    if summary is not None:
        _table1(doc, summary)
    doc.figure(fig1, "Figure 1. loss/fine (dynamic queries) and loss/coarse (static query), full loss, over "
                     "optimizer steps: training means per logging interval (lines), held-out evaluations (markers).")
    doc.figure(fig2, "Figure 2. loss/coarse ÷ loss/fine over steps; above the dotted 1.0 line the dynamic queries "
                     "predict better.")
    for path, caption in clip_figures:
        doc.figure(path, caption)
    if summary is not None:
        _hardest_section(doc, summary["hardest"])
    doc.heading("4. What limits it")
    doc.bullets(_limits(summary, train, notes))
    doc.heading("5. Next steps and resource request")
    doc.bullets(_next_steps(summary, state, log_history))
    (out / "report.md").write_text(doc.markdown())
    (out / "report.html").write_text(doc.html())
    return out


# ---- Comparing runs ----

SEED_SUFFIX = re.compile(r"-seed\d+$")
# (column, eval_results.json key) of the comparison table; t>=2 columns use the targets that have a previous latent.
COMPARE_COLUMNS = (
    ("loss_coarse", "eval_loss/coarse"),
    ("loss_fine", "eval_loss/fine"),
    ("improvement", "eval_improvement"),
    ("improvement t≥2", "eval_improvement_t2"),
    ("copy t≥2", "eval_loss/copy_t2"),
    ("fine t≥2", "eval_loss/fine_t2"),
    ("state contribution fine", "eval_diag/state_contribution_fine"),
    ("entropy static", "eval_attention/entropy_static"),
    ("entropy dynamic", "eval_attention/entropy_dynamic"),
    ("on mover dynamic", "eval_tracking/dynamic"),
    ("on mover static", "eval_tracking/static"),
    ("chance", "eval_tracking/chance"),
)
PERCENT_COLUMNS = ("improvement", "improvement t≥2")


def compare_runs(run_dirs: list) -> str:
    """A Markdown table of finished runs' held-out metrics (eval_results.json), one row per run name; runs named
    `NAME-seedK` are pooled into one row as mean ± standard deviation over seeds (each seed's value in brackets
    for the improvements)."""
    groups: dict[str, list[dict]] = {}
    for run_dir in map(Path, run_dirs):
        results_path = run_dir / "eval_results.json"
        if not results_path.is_file():
            raise FileNotFoundError(f"{results_path} not found: is {run_dir} a finished train_hf.py run?")
        results = json.loads(results_path.read_text())
        _, state, _ = load_log_history(run_dir)
        results["steps"] = state.get("global_step") if state else None
        log_history = (state or {}).get("log_history", [])
        runtimes = [entry["train_runtime"] for entry in log_history if "train_runtime" in entry]
        results["train_seconds"] = runtimes[-1] if runtimes else None
        groups.setdefault(SEED_SUFFIX.sub("", run_dir.name), []).append(results)

    def cell(runs: list[dict], key: str, percent: bool) -> str:
        values = np.array([run[key] for run in runs if run.get(key) is not None], dtype=float)
        if not len(values):
            return "-"
        scale, fmt = (100, "{:+.2f} %") if percent else (1, "{:.4f}")
        text = fmt.format(scale * values.mean())
        if len(values) > 1:
            text += f" ± {scale * values.std(ddof=1):.2f}" if percent else f" ± {values.std(ddof=1):.4f}"
            if percent:
                text += " (" + ", ".join(f"{scale * value:+.2f}" for value in values) + ")"
        return text

    header = ["run", "seeds", "steps", "train s"] + [name for name, _ in COMPARE_COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, runs in groups.items():
        steps = sorted({run["steps"] for run in runs if run["steps"] is not None})
        seconds = [run["train_seconds"] for run in runs if run["train_seconds"] is not None]
        row = [name, str(len(runs)), "/".join(map(str, steps)) or "-", f"{np.mean(seconds):.0f}" if seconds else "-"]
        row += [cell(runs, key, name in PERCENT_COLUMNS) for name, key in COMPARE_COLUMNS]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> Optional[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", nargs="+", help="A finished train_hf.py output_dir (several with --compare).")
    parser.add_argument("--compare", action="store_true", help="Print a table comparing the runs; write nothing.")
    parser.add_argument("--eval_dataset", help=f"Held-out Arrow dataset; default: the run's {DATA_PATHS_FILE}.")
    parser.add_argument(
        "--vae", help=f"AutoencoderKL (folder or Hub id) for decoding; default: the run's {DATA_PATHS_FILE}."
    )
    parser.add_argument("--num_videos", type=int, default=6, help="Eval clips in Figures 3-4; also how many hardest.")
    parser.add_argument("--device", default="cpu", help="torch device for the model and the VAE.")
    parser.add_argument("--batch_size", type=int, default=16, help="Eval clips per forward.")
    args = parser.parse_args(argv)
    if args.compare:
        print(compare_runs(args.run_dir))
        return None
    if len(args.run_dir) != 1:
        parser.error("one run_dir at a time (or --compare to tabulate several)")
    args.run_dir = args.run_dir[0]
    if args.num_videos < 1:
        parser.error(f"--num_videos must be >= 1, got {args.num_videos}")
    out = write_report(args.run_dir, args.eval_dataset, args.vae, args.num_videos, args.device, args.batch_size)
    print(f"report written to {out / 'report.md'} and {out / 'report.html'}")
    return out


if __name__ == "__main__":
    main()
