"""The report of a finished run: Table 1, figures 1-4, the clips the model predicts worst, the method and what limits
the result, for whoever decides on the next run.

Usage:
    python -m foveated_vlm.report outputs/tiny                               # data paths from the run's data_paths.json
    python -m foveated_vlm.report RUN_DIR --eval_dataset data/arrow/.../eval --vae data/vae/tiny-128px --num_videos 6
    python -m foveated_vlm.report --compare outputs/research/*               # one table row per run, seeds pooled
    python -m foveated_vlm.report --headroom CACHE_DIR/arrow/train CACHE_DIR/arrow/eval   # a cued scene's headroom
    python -m foveated_vlm.report --readout RUN_DIR TRAIN_DATASET [--eval_dataset EVAL]   # what each pass's state knows

Writes `RUN_DIR/report/`: fig1_losses.png, fig2_ratio.png, fig3_attention_<k>.png, fig4_predictions.png,
metrics.json (every number the text quotes), report.md and report.html (self-contained, images embedded).

Table 1 is what training logged: the `eval_*` values of the last evaluation in trainer_state.json (of the run or of
its last checkpoint). The report runs the final model over the held-out split only for what training does not log:
per-clip numbers (the hardest clips and their kinds of motion), the streamed loss and figures 3-4. It measures Table 1
itself only where the log has no evaluation, with the trainer's metric functions (metrics.py), and says so.
Whatever is missing is said in the report instead of stopping it.

Targets are numbered as in docs/DESIGN.md: the model predicts latents v_1..v_T; "t >= 2" are the targets that have a
previous latent. Frame indices in figure titles are 0-based, as in the trainer's figures.
"""

import argparse
import base64
import html
import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import numpy as np
import torch
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils.logging import tqdm

from foveated_vlm import metrics
from foveated_vlm.card import (
    IMPROVEMENT_BANDS,
    REPORT_DIR,
    REPORT_FIGURES,
    architecture_rows,
    improvement_band,
    latest_eval_metrics,
    logged_means,
)
from foveated_vlm.captioning import FoveatedVLMCaptioning, captioning_markdown, evaluate_captioning
from foveated_vlm.data import MODEL_INPUT_NAMES, FoveatedVLMDataCollator, load_precomputed, model_inputs
from foveated_vlm.figures import (
    evenly_spaced_clips,
    plot_attention_maps,
    plot_losses,
    plot_prediction_figure,
    plot_ratio,
    stack_frames,
)
from modeling_foveated import FoveatedVLMModel
from foveated_vlm.probes import PROBES_FILE, from_pretrained_with_probes
from foveated_vlm.teacher import TEACHER_FILE
from processing_foveated import FoveatedVLMProcessor

__all__ = [
    "DATA_PATHS_FILE",
    "FoveatedVLMClipMetrics",
    "FoveatedVLMClipSummary",
    "FoveatedVLMHardClip",
    "FoveatedVLMHeldOut",
    "FoveatedVLMReportSummary",
    "clip_category",
    "compare_runs",
    "cued_headroom",
    "evaluate_clips",
    "load_log_history",
    "markdown_to_html",
    "resolve_data_paths",
    "state_readout",
    "summarize_clips",
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
# Dynamic attention counts as selective below this share of Pass 1's (static) entropy ...
SELECTIVE_ENTROPY_SHARE = 0.95
# ... and as following the mover above this many times chance (uniform attention's mass in the box).
FOLLOWS_MOVER_TIMES_CHANCE = 1.5
# The first target dominates the full loss when its share is above this many times 1/T (its share if all weighed alike).
FIRST_TARGET_DOMINANCE = 2.0
# The improvement an evaluation split should be able to resolve: the upper end of docs/DESIGN.md's "marginal" band.
TARGET_EFFECT = IMPROVEMENT_BANDS[1][0]


# ---- What the report says, as typed records (metrics.json is their `asdict`) ----


def _logged(name: str, default=None):
    """A field read from the logged metric `name` (without the `eval_` prefix)."""
    return field(default=default, metadata={"logged": name})


@dataclass
class FoveatedVLMHeldOut:
    """Table 1: held-out means of the final model, with the trainer's metric names (docs/TRAINING.md)."""

    source: str  # where the numbers come from, for the text: the logged evaluation or this report's own pass
    step: Optional[int] = None
    loss_fine: float = _logged("loss/fine", math.nan)
    loss_coarse: float = _logged("loss/coarse", math.nan)
    improvement: float = _logged("improvement", math.nan)
    loss_fine_t2: Optional[float] = _logged("loss/fine_t2")
    loss_coarse_t2: Optional[float] = _logged("loss/coarse_t2")
    improvement_t2: Optional[float] = _logged("improvement_t2")
    improvement_se: Optional[float] = _logged("improvement_se")  # clip-level standard error (FoveatedVLMImprovement)
    improvement_t2_se: Optional[float] = _logged("improvement_t2_se")
    loss_copy_t2: Optional[float] = _logged("loss/copy_t2")
    entropy_static: Optional[float] = _logged("attention/entropy_static")
    entropy_dynamic: Optional[float] = _logged("attention/entropy_dynamic")
    state_contribution_fine: Optional[float] = _logged("diag/state_contribution_fine")
    state_contribution_coarse: Optional[float] = _logged("diag/state_contribution_coarse")
    tracking_dynamic: Optional[float] = _logged("tracking/dynamic")
    tracking_static: Optional[float] = _logged("tracking/static")
    tracking_chance: Optional[float] = _logged("tracking/chance")
    tracking_static_first: Optional[float] = _logged("tracking/static_first")
    loss_text_fine: Optional[float] = _logged("loss/text_fine")  # text as a target (nats per scored token)
    loss_text_coarse: Optional[float] = _logged("loss/text_coarse")
    improvement_text: Optional[float] = _logged("improvement_text")
    improvement_text_se: Optional[float] = _logged("improvement_text_se")

    @classmethod
    def from_logged(cls, metrics: dict, source: str, prefix: str = "eval_") -> "FoveatedVLMHeldOut":
        """From a log entry or eval_results.json; the improvements derived where the log lacks them."""
        means = logged_means(metrics, prefix)
        values = {f.name: means[f.metadata["logged"]] for f in fields(cls) if f.metadata.get("logged") in means}
        return cls(source=source, step=metrics.get("step"), **values)

    @property
    def has_tracking(self) -> bool:
        return self.tracking_chance is not None

    def first_target_share(self, num_targets: int) -> Optional[float]:
        """v_1's share of the full loss_fine: the full loss is the mean of v_1's and the T - 1 later targets' MSE."""
        if self.loss_fine_t2 is None or not self.loss_fine > 0:
            return None
        return 1 - (num_targets - 1) / num_targets * self.loss_fine_t2 / self.loss_fine


@dataclass
class FoveatedVLMHardClip:
    """One of the clips with the highest loss_fine, and what kind of motion it shows."""

    index: int
    name: str
    loss_fine: float
    loss_coarse: float
    loss_copy_t2: float
    mean_frame_diff: float
    max_frame_diff: float
    category: str


@dataclass
class FoveatedVLMClipSummary:
    """What only a pass over the held-out clips gives: spread over clips, streaming, the hardest clips."""

    eval_dataset: str
    model: str
    num_clips: int
    num_targets: int
    entropy_uniform: float  # log P, the entropy of uniform attention (nats)
    loss_fine_two_pass: float
    loss_fine_streamed: Optional[float]  # `model.stream(autoregressive=True)`; None with oracle fixations
    loss_fine_two_pass_t2: float
    loss_fine_streamed_t2: Optional[float]
    hardest: list[FoveatedVLMHardClip]
    categories_hardest: dict[str, int]
    categories_all: dict[str, int]
    mean_frame_diff_hardest: float
    mean_frame_diff_all: float
    rank_correlation_frame_diff: float  # Spearman's rho of a clip's loss_fine with its mean frame difference
    rank_correlation_copy: float  # ... with its copy-previous error (how much its latent changes)
    vae_psnr: Optional[float] = None  # the VAE's own decoding of Figure 4's targets against the real frames (dB)
    captioning: Optional[FoveatedVLMCaptioning] = None  # the three text modes, for a model trained on text

    @property
    def streamed_gap(self) -> Optional[float]:
        return None if self.loss_fine_streamed is None else self.loss_fine_streamed / self.loss_fine_two_pass - 1

    @property
    def streamed_gap_t2(self) -> Optional[float]:
        if self.loss_fine_streamed_t2 is None:
            return None
        return self.loss_fine_streamed_t2 / self.loss_fine_two_pass_t2 - 1


@dataclass
class FoveatedVLMReportSummary:
    """Every number the report quotes; metrics.json is its `asdict`."""

    held_out: Optional[FoveatedVLMHeldOut]
    clips: Optional[FoveatedVLMClipSummary]
    notes: list[str]
    steps: Optional[int] = None
    num_targets: Optional[int] = None


# ---- The pass over the held-out clips ----


@dataclass
class FoveatedVLMClipMetrics:
    """Per-clip values of the final model on the eval split (N clips).

    Args:
        metrics: `metrics.clip_metrics` of every clip: the trainer's metric name -> (N,), NaN where a clip
            lacks what a metric needs (tracking on a clip without boxes).
        loss_streamed, loss_streamed_t2: (N,) loss_fine of `model.stream(autoregressive=True)`, all targets and t >= 2;
            None for a model probed with oracle fixations (they exist in the two-pass forward only).
        frame_diff: (N, T - 1) mean absolute difference of consecutive frames, pixels in [0, 1].
        names: (N,) the clips' video_id (or row index).
    """

    metrics: dict[str, np.ndarray]
    loss_streamed: Optional[np.ndarray]
    loss_streamed_t2: Optional[np.ndarray]
    frame_diff: np.ndarray
    names: list[str]

    def means(self) -> dict[str, float]:
        """The means the trainer logs for these clips (`metrics.mean_metrics`), derived metrics included."""
        return metrics.mean_metrics({name: torch.from_numpy(value) for name, value in self.metrics.items()})


def _to_device(batch: dict, device) -> dict:
    return {name: value.to(device) if torch.is_tensor(value) else value for name, value in batch.items()}


def _streamed_losses(model, inputs: dict, target: torch.Tensor) -> list[torch.Tensor]:
    """Per-clip loss_fine of the stream where each next query comes from the stream itself (deployment):
    [(B,) over all targets, (B,) over t >= 2], the MSEs of `foveated_vlm.metrics`' `loss/fine` and `loss/fine_t2`."""
    streamed = model.stream(
        inputs["pixel_values"].unbind(1),
        target.unbind(1),
        input_ids=inputs.get("input_ids"),
        attention_mask=inputs.get("attention_mask"),
        autoregressive=True,
    )
    prediction = torch.stack([step.pred_fine for step in streamed], dim=1)  # (B, T, C, h, w)
    # The streamed predictions in place of both passes' two-pass ones: loss/fine keeps its one definition.
    streamed_outputs = SimpleNamespace(pred_fine=prediction, pred_coarse=prediction, loss_aux=None)
    losses = metrics.loss_metrics(streamed_outputs, {"vae_latents": target})
    return [losses["loss/fine"], losses["loss/fine_t2"]]


@torch.no_grad()
def evaluate_clips(model, dataset, collator, batch_size: int = 16, device="cpu") -> FoveatedVLMClipMetrics:
    """Run the final model over the whole eval split and keep each clip's metrics."""
    model.eval()
    per_clip, streamed, frame_diffs, stream = {}, [], [], True
    for start in tqdm(range(0, len(dataset), batch_size), desc="report: held-out clips", unit="batch"):
        rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        batch = _to_device(collator(rows), device)
        inputs = model_inputs(batch, model)
        outputs = model(**inputs)
        for name, value in metrics.clip_metrics(model, outputs, batch).items():
            per_clip.setdefault(name, []).append(value.float().cpu().numpy())
        # Probe inputs (oracle fixations) come from the batch's ground truth, which a stream does not have.
        stream = stream and inputs.keys() <= set(MODEL_INPUT_NAMES)
        if stream:
            losses = _streamed_losses(model, inputs, batch["vae_latents"].float())
            streamed.append([loss.cpu().numpy() for loss in losses])
        pixels = torch.from_numpy(stack_frames(rows)).float() / 255  # (B, T, S, S, 3)
        frame_diffs.append((pixels[:, 1:] - pixels[:, :-1]).abs().mean(dim=(2, 3, 4)).numpy())
    names = dataset["video_id"] if "video_id" in dataset.column_names else range(len(dataset))
    return FoveatedVLMClipMetrics(
        metrics={name: np.concatenate(parts) for name, parts in per_clip.items()},
        loss_streamed=np.concatenate([part[0] for part in streamed]) if stream else None,
        loss_streamed_t2=np.concatenate([part[1] for part in streamed]) if stream else None,
        frame_diff=np.concatenate(frame_diffs),
        names=[str(name) for name in names],
    )


# ---- Numbers from the clips ----


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


def summarize_clips(
    clips: FoveatedVLMClipMetrics, num_targets: int, num_patches: int, num_hardest: int, eval_dataset: str, model: str
) -> FoveatedVLMClipSummary:
    """The per-clip part of the report, from the clips' metrics."""
    fine, coarse = clips.metrics["loss/fine"], clips.metrics["loss/coarse"]
    copy = clips.metrics["loss/copy_t2"]
    order = np.argsort(-fine)[:num_hardest]
    categories = [clip_category(diffs) for diffs in clips.frame_diff]
    mean_diff = clips.frame_diff.mean(1)

    def count(indices) -> dict[str, int]:
        return {kind: sum(categories[i] == kind for i in indices) for kind in sorted(set(categories))}

    hardest = [
        FoveatedVLMHardClip(
            index=int(i),
            name=clips.names[i],
            loss_fine=float(fine[i]),
            loss_coarse=float(coarse[i]),
            loss_copy_t2=float(copy[i]),
            mean_frame_diff=float(mean_diff[i]),
            max_frame_diff=float(clips.frame_diff[i].max()),
            category=categories[i],
        )
        for i in order
    ]
    streamed = clips.loss_streamed is not None
    return FoveatedVLMClipSummary(
        eval_dataset=eval_dataset,
        model=model,
        num_clips=len(fine),
        num_targets=num_targets,
        entropy_uniform=math.log(num_patches),
        loss_fine_two_pass=float(fine.mean()),
        loss_fine_streamed=float(clips.loss_streamed.mean()) if streamed else None,
        loss_fine_two_pass_t2=float(clips.metrics["loss/fine_t2"].mean()),
        loss_fine_streamed_t2=float(clips.loss_streamed_t2.mean()) if streamed else None,
        hardest=hardest,
        categories_hardest=count(order),
        categories_all=count(range(len(fine))),
        mean_frame_diff_hardest=float(mean_diff[order].mean()),
        mean_frame_diff_all=float(mean_diff.mean()),
        rank_correlation_frame_diff=_rank_correlation(fine, mean_diff),
        rank_correlation_copy=_rank_correlation(fine, copy),
    )


# ---- Inputs: the log history, the model, the data ----


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


def _model_dir(run_dir: Path) -> Optional[Path]:
    """The final model in run_dir, else the last checkpoint's (a run stopped before its final save)."""
    if (run_dir / "config.json").is_file():
        return run_dir
    checkpoint = get_last_checkpoint(str(run_dir)) if run_dir.is_dir() else None
    return Path(checkpoint) if checkpoint and (Path(checkpoint) / "config.json").is_file() else None


def resolve_data_paths(
    run_dir: Path, eval_dataset: Optional[str], vae: Optional[str], use_captions: Optional[bool] = None
) -> tuple:
    """(eval dataset, VAE, use_captions, notes): the arguments win, else what the run recorded in DATA_PATHS_FILE
    (a run without captions by default)."""
    recorded_path = run_dir / DATA_PATHS_FILE
    recorded = json.loads(recorded_path.read_text()) if recorded_path.is_file() else {}
    eval_dataset, vae = eval_dataset or recorded.get("eval_dataset"), vae or recorded.get("vae")
    if use_captions is None:
        use_captions = recorded.get("use_captions", False)
    notes = []
    if eval_dataset is None:
        notes.append(f"No held-out dataset: pass --eval_dataset (the run has no {DATA_PATHS_FILE} naming it), so "
                     "the per-clip analysis, the attention figures and the hardest clips are missing.")
    if vae is None:
        notes.append(f"No VAE: pass --vae (the run has no {DATA_PATHS_FILE} naming it), so Figure 4 is missing.")
    return eval_dataset, vae, use_captions, notes


# ---- The report's text: every sentence from a number in the summary ----


def _pct(value: Optional[float]) -> str:
    """Signed percent to 3 significant digits: small effects (+0.0674 %) stay readable next to large ones."""
    return "n/a" if value is None or math.isnan(value) else f"{value * 100:+.3g}%"


def _num(value: Optional[float], digits: int = 4) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _bullets(items: list[str]) -> str:
    return "\n".join(f"- {item}" for item in items)


def _figure(path: Path, caption: str) -> str:
    return f"![{caption}]({path.name})\n\n*{caption}*"


def _executive_summary(summary: FoveatedVLMReportSummary) -> list[str]:
    held_out, clips = summary.held_out, summary.clips
    if held_out is None:
        return ["No held-out measurement: " + " ".join(summary.notes)]
    full, later = held_out.improvement, held_out.improvement_t2
    verb = "lowers" if full > 0 else "raises" if full < 0 else "does not change"
    steps = summary.steps if summary.steps is not None else "an unknown number of"
    text = [
        f"**Pass 2 (predicted queries) {verb} held-out next-frame latent MSE by {abs(full) * 100:.3g}% against Pass 1 "
        f"(static query) on the full loss** (improvement {_pct(full)}: {improvement_band(full)} in docs/DESIGN.md's "
        f"reading), and changes it by {_pct(later)} on the targets that have a previous latent (t ≥ 2), after "
        f"{steps} training steps ({held_out.source})."
    ]
    stderr = held_out.improvement_se
    if stderr is not None and not math.isnan(stderr):
        distinct = "distinguishable" if abs(full) > 2 * stderr else "not distinguishable"
        text.append(f"The clip-level standard error of the full-loss improvement is ±{stderr * 100:.2g}%: the "
                    f"measured effect is {distinct} from zero at two standard errors.")
    if clips is not None and held_out.entropy_static is not None:
        static, dynamic, uniform = held_out.entropy_static, held_out.entropy_dynamic, clips.entropy_uniform
        if min(static, dynamic) >= UNIFORM_ENTROPY_SHARE * uniform:
            text.append(f"Both passes attend almost uniformly (entropy {static:.3f} static and {dynamic:.3f} dynamic "
                        f"against log P = {uniform:.3f} nats), so whatever separates the two losses does not come "
                        "from where the queries look.")
    return text


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
        rows.append(["Held-out split", f"{num_clips if num_clips is not None else '?'} clips from `{eval_path}`"])
    return rows


def _method(config, probes: Optional[dict], state, log_history, eval_path, num_clips, teacher=None) -> list[str]:
    T, S, P = config.num_frames, config.image_size, config.num_patches
    latent = f"{config.latent_channels}×{config.latent_size}×{config.latent_size}"
    text = [
        "Each frame is read by the vision encoder once; a query token reads ONE visual token per frame from the "
        "cached encoder keys/values. Pass 1 (static query, coarse tokens, `loss_coarse`) reads every frame with a "
        "learned static query, and the LLM emits after each frame the query for the next one. Pass 2 (predicted "
        "queries, fine tokens, `loss_fine`) reads frame t with that query. A shared head predicts the next frame's VAE "
        "latent from the LLM state and the previous latent; the difference between the two losses is what choosing "
        "where to look buys. docs/DESIGN.md describes the design.",
        "```\n"
        f"frames [T={T}, 3, {S}, {S}] ──encoder, once per frame──► keys/values of {P} patches per frame\n"
        "Pass 1: q_static ──read──► z°_1..z°_T ──LLM──► q_1..q_T, states ──head(previous latent)──► loss_coarse\n"
        "Pass 2: q_init, q_1..q_(T-1) ──read──► z_1..z_T ──LLM──► states ──head(previous latent)──► loss_fine\n"
        f"targets: VAE latents v_1..v_T ({latent}); the prediction of v_t sees frames < t and v_(t-1) only\n"
        "```",
        _table(["Part", "This run"], [[name, value] for name, value in architecture_rows(config, probes, teacher).items()]),
        _table(["Training", "Value"], _training_rows(state, log_history, eval_path, num_clips)),
    ]
    if probes:
        text.append(f"This run trained with research probes (foveated_vlm/probes.py): `{json.dumps(probes)}`.")
    return text


def _table1(held_out: FoveatedVLMHeldOut, clips: Optional[FoveatedVLMClipSummary], num_targets) -> list[str]:
    h = held_out
    rows = [
        ["loss_coarse (Pass 1, static query)", _num(h.loss_coarse), _num(h.loss_coarse_t2)],
        ["loss_fine (Pass 2, predicted queries)", _num(h.loss_fine), _num(h.loss_fine_t2)],
        ["Improvement (coarse − fine) / coarse", _pct(h.improvement), _pct(h.improvement_t2)],
        ["Its clip-level standard error", _pct(h.improvement_se), _pct(h.improvement_t2_se)],
        ["Copy previous latent (baseline)", "n/a (v_1 has no previous latent)", _num(h.loss_copy_t2)],
    ]
    if h.loss_text_fine is not None:  # text as a target: one value per clip, so no t ≥ 2 column
        rows += [
            ["Text loss, Pass 1 (nats per token)", _num(h.loss_text_coarse), "-"],
            ["Text loss, Pass 2", _num(h.loss_text_fine), "-"],
            ["improvement_text (± its standard error)", f"{_pct(h.improvement_text)} ± {_pct(h.improvement_text_se)}",
             "-"],
        ]
    targets = f"all {num_targets} targets" if num_targets else "all targets"
    text = [
        f"**Table 1.** Held-out next-frame latent MSE of the final model, {h.source}. \"Full loss\" is the mean over "
        f"{targets} v_1..v_T, the headline; \"targets t ≥ 2\" leaves out v_1, which is predicted from a learned start "
        "latent by a state that has seen no frame.",
        _table(["Metric", "Full loss", "Targets t ≥ 2"], rows),
    ]
    secondary = [
        ["Attention entropy, static (nats)", _num(h.entropy_static, 3)],
        ["Attention entropy, dynamic (nats)", _num(h.entropy_dynamic, 3)],
        ["State contribution, Pass 2 (loss with another clip's LLM state − loss)", _num(h.state_contribution_fine)],
        ["State contribution, Pass 1", _num(h.state_contribution_coarse)],
    ]
    if clips is not None:
        secondary.insert(2, ["Uniform attention, log P (nats)", _num(clips.entropy_uniform, 3)])
        secondary += [
            ["loss_fine, two-pass (training's approximation)", _num(clips.loss_fine_two_pass)],
            ["loss_fine, streamed autoregressive (deployment)", _num(clips.loss_fine_streamed)],
            ["Streaming gap, full loss", _pct(clips.streamed_gap)],
            ["Streaming gap, targets t ≥ 2", _pct(clips.streamed_gap_t2)],
        ]
    if h.has_tracking:
        secondary += [
            ["Attention mass on the moving box, dynamic (`tracking/dynamic`)", _num(h.tracking_dynamic, 3)],
            ["Attention mass on the moving box, static (`tracking/static`)", _num(h.tracking_static, 3)],
            ["Chance: uniform attention's mass on the box (`tracking/chance`)", _num(h.tracking_chance, 3)],
        ]
    text += [
        "**Table 2.** Secondary metrics on the same split, named as in the training logs (docs/TRAINING.md). The "
        "streaming gap compares `model.stream(autoregressive=True)`, where the next query comes from the stream "
        "itself, with the two-pass forward used in training.",
        _table(["Metric", "Value"], secondary),
    ]
    return text


def _hardest_section(clips: FoveatedVLMClipSummary) -> list[str]:
    counts = lambda d: ", ".join(f"{n} {kind}" for kind, n in d.items() if n)  # noqa: E731
    return [
        "### Where it fails: the clips with the highest loss_fine",
        _table(
            ["Clip", "loss_fine", "loss_coarse", "copy previous (t ≥ 2)", "mean abs frame diff", "max", "kind"],
            [[c.name, _num(c.loss_fine), _num(c.loss_coarse), _num(c.loss_copy_t2), _num(c.mean_frame_diff),
              _num(c.max_frame_diff), c.category] for c in clips.hardest],
        ),
        f"Kinds among these {len(clips.hardest)}: {counts(clips.categories_hardest)}; in the whole split: "
        f"{counts(clips.categories_all)}. Their mean absolute frame difference is {clips.mean_frame_diff_hardest:.4f} "
        f"against {clips.mean_frame_diff_all:.4f} for the split; the rank correlation of a clip's loss_fine with its "
        f"frame difference is {clips.rank_correlation_frame_diff:.2f}, with its copy-previous error (how much the "
        f"latent changes) {clips.rank_correlation_copy:.2f}. Kinds, from the mean absolute difference of consecutive "
        f"frames with pixels in [0, 1]: static below {STATIC_MAX_DIFF}, fast motion from {FAST_MIN_DIFF}, scene cut "
        f"when one pair differs by at least {CUT_MIN_DIFF} and {CUT_MIN_RATIO:g}× the clip's median pair; moderate "
        "motion otherwise.",
    ]


def _limits(summary: FoveatedVLMReportSummary, train: dict) -> list[str]:
    """What limits the result, one measured statement each."""
    items = list(summary.notes)
    if len(train["step"]) >= 2:
        items.append(f"Training: train loss/fine went from {train['fine'][0]:.4f} (step {train['step'][0]:.0f}) to "
                     f"{train['fine'][-1]:.4f} (step {train['step'][-1]:.0f}); the last logged change was "
                     f"{_pct(train['fine'][-1] / train['fine'][-2] - 1)}.")
    h, clips, T = summary.held_out, summary.clips, summary.num_targets
    if h is None:
        return items
    share = h.first_target_share(T) if T else None
    if share is not None:
        # If v_1 stayed as it is and every later target were perfect, the full-loss improvement would be this.
        cap = 1 - share * h.loss_fine / h.loss_coarse
        verdict = "The first target dominates" if share > FIRST_TARGET_DOMINANCE / T else "The first target"
        items.append(f"{verdict}: v_1 makes up {share:.0%} of the full loss_fine (1/T = {1 / T:.0%} if all targets "
                     f"weighed the same), so with v_1 as it is the full-loss improvement could not exceed {cap:.0%} "
                     "even with perfect later predictions.")
    if h.loss_fine_t2 is not None and h.loss_copy_t2 is not None:
        fine, copy = h.loss_fine_t2, h.loss_copy_t2
        if fine >= copy:
            items.append(f"The head does not yet beat copying the previous latent on t ≥ 2 ({fine:.4f} vs {copy:.4f}): "
                         "until it can, both passes carry the same large reconstruction error and their difference "
                         "says little about foveation.")
        else:
            items.append(f"On t ≥ 2 loss_fine is {1 - fine / copy:.0%} below the copy-previous baseline ({fine:.4f} "
                         f"vs {copy:.4f}).")
    if h.entropy_static is not None and clips is not None:
        static, dynamic, uniform = h.entropy_static, h.entropy_dynamic, clips.entropy_uniform
        items.append(f"Attention entropy: dynamic {dynamic:.3f}, static {static:.3f}, uniform {uniform:.3f} nats: "
                     f"dynamic is at {dynamic / uniform:.0%} and static at {static / uniform:.0%} of uniform.")
    if h.has_tracking:
        chance = h.tracking_chance
        items.append(f"Tracking: dynamic attention puts {h.tracking_dynamic:.3f} of its mass on the moving box, "
                     f"static {h.tracking_static:.3f}, chance {chance:.3f} ({h.tracking_dynamic / chance:.2f}× and "
                     f"{h.tracking_static / chance:.2f}× chance).")
    else:
        items.append("Tracking: the eval split has no moving-object boxes, so whether attention follows what moves "
                     "is not measured.")
    if clips is not None:
        if clips.streamed_gap is None:
            items.append("Deployment: not measured: oracle fixations come from ground-truth boxes that a stream lacks.")
        else:
            items.append(f"Deployment: streaming with the stream's own queries changes loss_fine by "
                         f"{_pct(clips.streamed_gap)} (t ≥ 2: {_pct(clips.streamed_gap_t2)}) relative to the two-pass "
                         "training approximation.")
        if h.improvement_se is not None:
            items.append(f"Evaluation size: {clips.num_clips} clips; the full-loss improvement's clip-level standard "
                         f"error is ±{h.improvement_se * 100:.2g}%.")
        if clips.vae_psnr is not None:
            items.append(f"Target quality: the VAE's decoding of the actual latents reaches {clips.vae_psnr:.1f} dB "
                         "PSNR against the real frames of Figure 4's clips; detail the VAE loses is invisible to both "
                         "passes.")
    return items


def _next_steps(summary: FoveatedVLMReportSummary, state: Optional[dict], log_history: list[dict]) -> list[str]:
    """Next steps that follow from the measurements, and what this run cost (to size a request)."""
    items, h, T = [], summary.held_out, summary.num_targets
    if h is not None:
        if h.loss_fine_t2 is not None and h.loss_copy_t2 is not None and h.loss_fine_t2 >= h.loss_copy_t2:
            items.append("Get the head to the copy baseline first: train longer, or try `head_residual: true` (the "
                         "head then predicts the change from the previous latent).")
        selective = h.entropy_dynamic is not None and h.entropy_dynamic < SELECTIVE_ENTROPY_SHARE * h.entropy_static
        follows = h.has_tracking and h.tracking_dynamic > FOLLOWS_MOVER_TIMES_CHANCE * h.tracking_chance
        if h.entropy_dynamic is not None and (not selective or (h.has_tracking and not follows)):
            state_contribution = (f" (measured: {h.state_contribution_fine:.4g})"
                                  if h.state_contribution_fine is not None else "")
            items.append("The queries are not yet selective. They get a gradient only through the LLM state, so the "
                         f"state contribution{state_contribution} must be above zero first (`aux_current_weight` "
                         "trains the state), and a perfect policy (`--fine_queries oracle`, foveated_vlm/probes.py) tests "
                         "whether looking in the right place pays at this stage of training.")
        share = h.first_target_share(T) if T else None
        if share is not None and h.improvement < TARGET_EFFECT and share > FIRST_TARGET_DOMINANCE / T:
            items.append("Report progress on targets t ≥ 2 next to the full loss: v_1 caps the full-loss figure.")
    runtime = [e["train_runtime"] for e in log_history if "train_runtime" in e]
    if state is not None and runtime:
        items.append(f"Cost of this run, to size the request: {state.get('global_step')} optimizer steps of "
                     f"{state.get('train_batch_size')} clips per device in {runtime[-1]:.0f} s.")
    items.append(f"More compute would buy: pretrained DINOv3 + SmolLM2 at 256 px (configs/phase1.yaml), more steps, "
                 f"and a held-out split large enough to resolve a {TARGET_EFFECT:.0%} effect (the standard error "
                 "above says how far this one is).")
    return items


# ---- report.html from report.md ----

HTML_STYLE = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.45}"
    "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:3px 8px}"
    "img{max-width:100%}code{background:#f2f2f2}"
)


def markdown_to_html(text: str, folder: Path, title: str) -> str:
    """A self-contained page from report.md: Python-Markdown (a dependency of tensorboard) renders it, and each
    image beside the report is embedded as a data URI, so the page can be mailed on its own."""
    import markdown

    body = markdown.markdown(text, extensions=["tables", "fenced_code"])

    def embed(match: re.Match) -> str:
        data = base64.b64encode((folder / html.unescape(match.group(1))).read_bytes()).decode("ascii")
        return f'src="data:image/png;base64,{data}"'

    body = re.sub(r'src="([^"/]+\.png)"', embed, body)
    return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{HTML_STYLE}</style></head><body>\n{body}\n</body></html>\n")


# ---- Putting it together ----


def _save(figure, path: Path) -> Path:
    figure.savefig(path, dpi=110)
    return path


def _json_safe(value):
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def _clip_figures(model, dataset, collator, clips: FoveatedVLMClipMetrics, vae, num_videos, device, out: Path):
    """Figures 3 (attention, one per clip) and 4 (decoded predictions) on evenly spaced eval clips:
    ([(path, caption)], VAE PSNR or None)."""
    indices = evenly_spaced_clips(len(dataset), num_videos)
    rows = [dataset[i] for i in indices]
    batch = _to_device(collator(rows), device)
    with torch.no_grad():
        outputs = model(**model_inputs(batch, model))
    frames, boxes = stack_frames(rows), batch["moving_boxes"].cpu().numpy()
    tracking = {name: clips.metrics.get(f"tracking/{name}") for name in ("dynamic", "static", "chance")}
    figures = []
    for k, i in enumerate(indices):
        has_box = metrics.box_present(boxes[k]).any()
        figure = plot_attention_maps(
            frames[k], outputs.attn_static[k].cpu(), outputs.attn_dynamic[k].cpu(), boxes[k] if has_box else None
        )
        numbers = ""
        if tracking["chance"] is not None and not np.isnan(tracking["chance"][i]):
            numbers = "; attention mass on the box: " + ", ".join(
                f"{name} {value[i]:.3f}" for name, value in tracking.items()
            )
        figure.suptitle(f"{REPORT_FIGURES['fig3_attention_*.png']}, clip {clips.names[i]}{numbers}", fontsize=9)
        caption = (f"Figure 3.{k + 1}. Eval clip {clips.names[i]}: Pass 1 (static query, top) and Pass 2 (predicted "
                   "queries, bottom) attention over each frame's patches, one colour scale from 0 for both rows (a "
                   "flat map is uniform attention); cyan: the ground-truth moving box where the clip has one. The "
                   "Pass 2 map at frame t is the attention of the query emitted after frame t-1.")
        figures.append((_save(figure, out / f"fig3_attention_{k}.png"), caption))
    psnr = None
    if vae is not None:
        from diffusers import AutoencoderKL

        vae_model = AutoencoderKL.from_pretrained(vae).to(device).eval()
        figure, psnr = plot_prediction_figure(vae_model, frames, batch["vae_latents"], outputs)
        caption = ("Figure 4. Per eval clip (rows): frame t, the actual frame t+1 as the VAE decodes its latent, and "
                   "the predicted frame t+1 decoded by the same VAE, Pass 2 (fine) and Pass 1 (coarse). The VAE's "
                   f"own decoding of these targets reaches {psnr:.1f} dB PSNR against the real frames: what a perfect "
                   "latent prediction would look like.")
        figures.append((_save(figure, out / "fig4_predictions.png"), caption))
    return figures, psnr


def _measure(model_dir: Path, eval_dataset: str, vae, use_captions, num_videos, device, batch_size, out: Path):
    """The pass over the held-out clips: (the model, its clip metrics, the clip summary, [(figure path, caption)])."""
    model = from_pretrained_with_probes(str(model_dir)).to(device).eval()
    # The clips are read as the run read them: with their captions before the frames only if it trained on them so,
    # after the frames if it trained on text as a target.
    caption_as_target = model.config.text_loss_weight > 0
    processor = None
    if use_captions or caption_as_target:
        processor = FoveatedVLMProcessor.from_pretrained(model_dir, trust_remote_code=True)
    dataset = load_precomputed(eval_dataset)
    collator = FoveatedVLMDataCollator(processor and processor.tokenizer, caption_as_target=caption_as_target)
    clips = evaluate_clips(model, dataset, collator, batch_size, device)
    config = model.config
    summary = summarize_clips(
        clips, config.num_frames, config.num_patches, min(num_videos, len(dataset)), str(eval_dataset), str(model_dir)
    )
    if caption_as_target and clips.loss_streamed is not None:  # streams exist without a probe's ground truth
        summary.captioning = evaluate_captioning(model, processor, dataset, batch_size, device=device)
    figures, summary.vae_psnr = _clip_figures(model, dataset, collator, clips, vae, num_videos, device, out)
    return clips, summary, figures


def _held_out(run_dir: Path, log_history, eval_dataset, vae, use_captions, num_videos, device, batch_size, out, notes):
    """Table 1 (logged, else measured), the clip analysis and figures 3-4, and the model's config and probes:
    (held_out, clip summary, [(figure path, caption)], config, probes), None where the run lacks what they need."""
    logged = latest_eval_metrics(log_history)
    held_out = None
    if logged:
        held_out = FoveatedVLMHeldOut.from_logged(logged, f"from the evaluation logged at step {logged.get('step')}")
    model_dir = _model_dir(run_dir)
    if model_dir is None:
        notes.append(f"No saved model in {run_dir} or its checkpoints: nothing on the held-out split is measured.")
        return held_out, None, [], None, None
    config = FoveatedVLMModel.config_class.from_pretrained(model_dir)
    probes_path = model_dir / PROBES_FILE
    probes = json.loads(probes_path.read_text()) if probes_path.is_file() else None
    if eval_dataset is None:
        return held_out, None, [], config, probes
    clips, clip_summary, clip_figures = _measure(
        model_dir, eval_dataset, vae, use_captions, num_videos, device, batch_size, out
    )
    if config.text_loss_weight > 0 and clip_summary.captioning is None:
        notes.append("The captioning modes are not measured: the probes' oracle fixations exist in the parallel "
                     "forward only, not in the streams that write text.")
    if held_out is None:
        measured = {**clips.means(), **metrics.improvement_with_se(clips.metrics)}
        held_out = FoveatedVLMHeldOut.from_logged(measured, "measured by this report (the log has no evaluation)", "")
    return held_out, clip_summary, clip_figures, config, probes


def write_report(
    run_dir,
    eval_dataset=None,
    vae=None,
    num_videos: int = 6,
    device="cpu",
    batch_size: int = 16,
    use_captions=None,
    description: Optional[str] = None,
) -> Path:
    """Write RUN_DIR/report/ (figures, metrics.json, report.md, report.html); return that folder. `eval_dataset`,
    `vae`, `use_captions` and `description` (of the clips: which scene, how many) default to what the run recorded
    in DATA_PATHS_FILE."""
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
    eval_dataset, vae, use_captions, data_notes = resolve_data_paths(run_dir, eval_dataset, vae, use_captions)
    notes += data_notes
    held_out, clips, clip_figures, config, probes = _held_out(
        run_dir, log_history, eval_dataset, vae, use_captions, num_videos, device, batch_size, out, notes
    )
    summary = FoveatedVLMReportSummary(
        held_out=held_out,
        clips=clips,
        notes=notes,
        steps=state.get("global_step") if state else None,
        num_targets=config.num_frames if config is not None else None,
    )
    (out / "metrics.json").write_text(json.dumps(_json_safe(asdict(summary)), indent=1))

    text = [f"# Foveated VLM: report on {run_dir.name}"]
    recorded_path = run_dir / DATA_PATHS_FILE
    if description is None and recorded_path.is_file():
        description = json.loads(recorded_path.read_text()).get("description")
    if description:
        text.append(f"**Clips.** {description}")
    text += ["## 1. Executive summary", *_executive_summary(summary)]
    if config is not None:
        num_clips = clips.num_clips if clips else None
        teacher_path = run_dir / TEACHER_FILE
        teacher = json.loads(teacher_path.read_text()) if teacher_path.is_file() else None
        text += ["## 2. Method", *_method(config, probes, state, log_history, eval_dataset, num_clips, teacher)]
    text.append("## 3. Results")
    if held_out is not None:
        text += _table1(held_out, clips, summary.num_targets)
    if clips is not None and clips.captioning is not None:
        text.append(captioning_markdown(clips.captioning))
    text += [
        _figure(fig1, f"{REPORT_FIGURES['fig1_losses.png']}. Full loss over optimizer steps: training means per "
                      "logging interval (lines), held-out evaluations (markers)."),
        _figure(fig2, f"{REPORT_FIGURES['fig2_ratio.png']}; above the dotted 1.0 line Pass 2 (predicted queries) "
                      "predicts better."),
        *(_figure(path, caption) for path, caption in clip_figures),
    ]
    if clips is not None:
        text += _hardest_section(clips)
    text += ["## 4. What limits it", _bullets(_limits(summary, train))]
    text += ["## 5. Next steps and resource request", _bullets(_next_steps(summary, state, log_history))]
    report_md = "\n\n".join(text) + "\n"
    (out / "report.md").write_text(report_md)
    (out / "report.html").write_text(markdown_to_html(report_md, out, title=f"Foveated VLM: report on {run_dir.name}"))
    return out


# ---- Comparing runs ----

SEED_SUFFIX = re.compile(r"-seed\d+$")
# (column, FoveatedVLMHeldOut field): the same numbers as Tables 1 and 2, read the same way from eval_results.json.
COMPARE_COLUMNS = (
    ("loss_coarse", "loss_coarse"),
    ("loss_fine", "loss_fine"),
    ("improvement", "improvement"),
    ("improvement t≥2", "improvement_t2"),
    ("copy t≥2", "loss_copy_t2"),
    ("coarse t≥2", "loss_coarse_t2"),
    ("fine t≥2", "loss_fine_t2"),
    ("state contribution fine", "state_contribution_fine"),
    ("entropy static", "entropy_static"),
    ("entropy dynamic", "entropy_dynamic"),
    ("on mover dynamic", "tracking_dynamic"),
    ("on mover static", "tracking_static"),
    ("chance", "tracking_chance"),
    ("static on frame-1 box", "tracking_static_first"),
)
PERCENT_COLUMNS = ("improvement", "improvement t≥2")


def compare_runs(run_dirs: list) -> str:
    """A Markdown table of finished runs' held-out metrics (eval_results.json), one row per run name; runs named
    `NAME-seedK` are pooled into one row as mean ± standard deviation over seeds (each seed's value in brackets
    for the improvements). The last column is the t ≥ 2 improvement at each logged evaluation (mean over seeds):
    whether the effect grows with training."""
    groups: dict[str, list[tuple[FoveatedVLMHeldOut, Optional[int], Optional[float]]]] = {}
    curves: dict[str, list[dict[int, float]]] = {}
    for run_dir in map(Path, run_dirs):
        results_path = run_dir / "eval_results.json"
        if not results_path.is_file():
            raise FileNotFoundError(f"{results_path} not found: is {run_dir} a finished train_hf.py run?")
        held_out = FoveatedVLMHeldOut.from_logged(json.loads(results_path.read_text()), str(results_path))
        log_history, state, _ = load_log_history(run_dir)
        runtimes = [entry["train_runtime"] for entry in log_history if "train_runtime" in entry]
        steps = state.get("global_step") if state else None
        name = SEED_SUFFIX.sub("", run_dir.name)
        groups.setdefault(name, []).append((held_out, steps, runtimes[-1] if runtimes else None))
        curve = {e["step"]: e["eval_improvement_t2"] for e in log_history if "eval_improvement_t2" in e}
        curves.setdefault(name, []).append(curve)

    def cell(runs: list[FoveatedVLMHeldOut], name: str, percent: bool) -> str:
        values = np.array([getattr(run, name) for run in runs if getattr(run, name) is not None], dtype=float)
        if not len(values):
            return "-"
        scale, fmt = (100, "{:+.2f} %") if percent else (1, "{:.4f}")
        text = fmt.format(scale * values.mean())
        if len(values) > 1:
            text += f" ± {scale * values.std(ddof=1):.2f}" if percent else f" ± {values.std(ddof=1):.4f}"
            if percent:
                text += " (" + ", ".join(f"{scale * value:+.2f}" for value in values) + ")"
        return text

    rows = []
    for name, runs in groups.items():
        steps = sorted({steps for _, steps, _ in runs if steps is not None})
        seconds = [seconds for _, _, seconds in runs if seconds is not None]
        row = [name, str(len(runs)), "/".join(map(str, steps)) or "-", f"{np.mean(seconds):.0f}" if seconds else "-"]
        row += [cell([run for run, _, _ in runs], key, column in PERCENT_COLUMNS) for column, key in COMPARE_COLUMNS]
        shared_steps = sorted(set.intersection(*(set(curve) for curve in curves[name])))
        means = [np.mean([curve[step] for curve in curves[name]]) for step in shared_steps]
        row.append(" / ".join(f"{100 * value:+.1f}" for value in means) or "-")
        rows.append(row)
    header = ["run", "seeds", "steps", "train s"] + [column for column, _ in COMPARE_COLUMNS]
    return _table(header + ["improvement t≥2 (%) by evaluation"], rows)


def _sidecar_levels(video_path: str, frame_indices) -> Optional[list[int]]:
    """Each sampled frame's background level index from a cued clip's ground-truth sidecar `<stem>.json`; None for a
    clip without a sidecar or whose sidecar has no levels (not a cued clip)."""
    sidecar_path = Path(video_path).with_suffix(".json")
    if not sidecar_path.is_file():
        return None
    sidecar_frames = json.loads(sidecar_path.read_text())["frames"]
    if "level" not in sidecar_frames[0]:
        return None
    return [sidecar_frames[int(i)]["level"] for i in frame_indices]


def cued_headroom(train_dataset: str, eval_dataset: str) -> dict[str, float]:
    """`metrics.level_headroom` of two precomputed splits of cued clips (`load_precomputed` paths), with
    each sampled frame's background level read from the video's ground-truth sidecar."""

    def latents_and_levels(path: str) -> tuple[np.ndarray, np.ndarray]:
        columns = load_precomputed(path).with_format("numpy").select_columns(
            ["video_path", "frame_indices", "vae_latents"]
        )[:]
        levels = []
        for video_path, frame_indices in zip(columns["video_path"], columns["frame_indices"]):
            clip_levels = _sidecar_levels(video_path, frame_indices)
            if clip_levels is None:
                sidecar_path = Path(video_path).with_suffix(".json")
                raise ValueError(f"{sidecar_path} has no background levels: is {path} a cued split?")
            levels.append(clip_levels)
        return columns["vae_latents"], np.array(levels)

    return metrics.level_headroom(*latents_and_levels(train_dataset), *latents_and_levels(eval_dataset))


@torch.no_grad()
def _readout_samples(model, path, collator, batch_size: int, device) -> dict:
    """Each clip's LLM states at targets t = 1..T-1 (0-based: the state that has read frames < t and predicts latent
    t; t = 0 has read no frame) with what frame t needs: {"coarse", "fine": (M, E), "target", "cued"}. The target is
    frame t's background level index (M,) where every clip's sidecar has levels (a cued split), else the centre
    (x, y) (M, 2) of frame t's first moving box; targets without a box are left out.

    Per clip as well, for the place readout: {"coarse_by_frame", "fine_by_frame": (C, T, E), "place": (C, T, 2) the
    first box's centre in each frame (the cued target, the mover), "place_present": (C, T) bool}."""
    dataset = load_precomputed(path)
    frame_indices = dataset.select_columns(["frame_indices"]).with_format("numpy")["frame_indices"]
    levels = [_sidecar_levels(video, indices) for video, indices in zip(dataset["video_path"], frame_indices)]
    cued = all(clip is not None for clip in levels)
    if not cued and any(clip is not None for clip in levels):
        raise ValueError(f"only some clips of {path} have background levels in their sidecars")
    samples = {"coarse": [], "fine": [], "target": [], "coarse_by_frame": [], "fine_by_frame": [], "place": [],
               "place_present": []}
    model.eval()
    for start in tqdm(range(0, len(dataset), batch_size), desc=f"readout: {Path(path).name}", unit="batch"):
        rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        batch = _to_device(collator(rows), device)
        inputs = model_inputs(batch, model)
        inputs.pop("vae_latents", None)  # the states alone: no head pass
        outputs = model(**inputs)
        states = {name: getattr(outputs, f"state_{name}").float().cpu() for name in ("coarse", "fine")}  # (B, T, E)
        first_box = batch["moving_boxes"][:, :, 0].cpu()  # (B, T, 4) xyxy
        for name, state in states.items():
            samples[f"{name}_by_frame"].append(state)
        samples["place"].append((first_box[..., :2] + first_box[..., 2:]) / 2)  # (B, T, 2)
        samples["place_present"].append(metrics.box_present(first_box))  # (B, T)
        if cued:
            target = torch.tensor(levels[start : start + len(rows)])  # (B, T)
            keep = torch.ones(target.shape, dtype=torch.bool)
        else:
            target = samples["place"][-1]  # (B, T, 2)
            keep = samples["place_present"][-1].clone()  # (B, T)
        keep[:, 0] = False
        for name, state in states.items():
            samples[name].append(state[keep])  # (B, T, E) -> (n, E)
        samples["target"].append(target[keep])
    samples = {name: torch.cat(parts).numpy() for name, parts in samples.items()}
    if not len(samples["target"]):
        raise ValueError(f"no clip of {path} has a moving box at frames 1..T-1: nothing to read out")
    return {**samples, "cued": cued}


def _place_by_frame(train: dict, held_out: dict, name: str) -> list[Optional[float]]:
    """Held-out R² of the first box's centre in frame t from pass `name`'s state at t, one ridge per t = 1..T-1
    (None where fewer than two clips of a split have the box): whether the LLM keeps *where* as frames go by."""
    scores = []
    for t in range(1, train["place"].shape[1]):
        fit, score = train["place_present"][:, t], held_out["place_present"][:, t]
        if fit.sum() < 2 or score.sum() < 2:
            scores.append(None)
            continue
        features = (train[f"{name}_by_frame"][fit, t], held_out[f"{name}_by_frame"][score, t])
        readout = metrics.linear_readout(features[0], train["place"][fit, t], features[1],
                                                  held_out["place"][score, t])  # fmt: skip
        scores.append(readout["r2"])
    return scores


def state_readout(run_dir, train_dataset, eval_dataset=None, batch_size: int = 16, device="cpu") -> dict:
    """What a linear readout of each pass's LLM state recovers, on held-out clips, of what the next frame needs
    (docs/DESIGN.md's conditions): `metrics.linear_readout` fitted on the training split's states, scored on
    the held-out split's, for Pass 1 (`state_coarse`) and Pass 2 (`state_fine`) apart.

    On a cued split the quantity is frame t's background level, set by the target's cue in frame t-1 (classification
    accuracy, with chance); on a mover split the centre of frame t's first moving box (held-out R²). A Pass 1 that
    already holds it leaves a glimpse nothing to add. The run's model is read with its probes (an oracle run with
    oracle fixations) and its captions where it trained on them.

    The place readout asks the link before that: from the state at each t, the held-out R² of where the first box
    is in frame t (on a cued split the marked target, which does not move; on a mover split the mover). A state
    after frame 0 that holds the target's place, and a state a few frames later that has lost it, is the break
    docs/RESULTS.md's calibration found in a small LLM trained from scratch.

    Args:
        run_dir: a train_hf.py output_dir (its final model, else its last checkpoint's).
        train_dataset, eval_dataset: `load_precomputed` paths; `eval_dataset` defaults to the run's DATA_PATHS_FILE.

    Returns:
        {"quantity": "next level" | "mover centre", "metric": "accuracy" | "r2", "coarse", "fine", "chance"
        (classification only), "num_train", "num_eval" ((clip, target) samples), "place_by_frame": {"coarse",
        "fine": [R² at t = 1..T-1]}, "eval_dataset"}.
    """
    run_dir = Path(run_dir)
    model_dir = _model_dir(run_dir)
    if model_dir is None:
        raise FileNotFoundError(f"no saved model (config.json) in {run_dir} or its checkpoints")
    eval_dataset, _, use_captions, _ = resolve_data_paths(run_dir, eval_dataset, None)
    if eval_dataset is None:
        raise ValueError(f"no held-out dataset: pass eval_dataset ({run_dir / DATA_PATHS_FILE} names none)")
    model = from_pretrained_with_probes(str(model_dir)).to(device)
    tokenizer = None  # the clips are read as the run read them
    if use_captions:
        tokenizer = FoveatedVLMProcessor.from_pretrained(model_dir, trust_remote_code=True).tokenizer
    collator = FoveatedVLMDataCollator(tokenizer)
    train = _readout_samples(model, train_dataset, collator, batch_size, device)
    held_out = _readout_samples(model, eval_dataset, collator, batch_size, device)
    if train["cued"] != held_out["cued"]:
        raise ValueError(f"{train_dataset} and {eval_dataset} are not the same kind of split (cued or not)")
    kind = "classification" if train["cued"] else "regression"
    metric = "accuracy" if train["cued"] else "r2"
    scores = {
        name: metrics.linear_readout(train[name], train["target"], held_out[name], held_out["target"], kind)
        for name in ("coarse", "fine")
    }
    result = {"quantity": "next level" if train["cued"] else "mover centre", "metric": metric}
    result.update({name: score[metric] for name, score in scores.items()})
    if train["cued"]:
        result["chance"] = scores["coarse"]["chance"]
    place = {name: _place_by_frame(train, held_out, name) for name in ("coarse", "fine")}
    return {**result, "num_train": len(train["target"]), "num_eval": len(held_out["target"]),
            "place_by_frame": place, "eval_dataset": str(eval_dataset)}


def main(argv: Optional[list[str]] = None) -> Optional[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", nargs="+", help="A finished train_hf.py output_dir (several with --compare).")
    parser.add_argument("--compare", action="store_true", help="Print a table comparing the runs; write nothing.")
    parser.add_argument(
        "--headroom",
        action="store_true",
        help="Instead of a run: print what knowing the next level is worth (metrics.level_headroom) on a "
        "cued scene, given its training and held-out precomputed datasets as the two positional paths.",
    )
    parser.add_argument(
        "--readout",
        action="store_true",
        help="Instead of a report: print what a linear readout of each pass's LLM state recovers of the next frame's "
        "level (cued) or mover centre on the held-out clips (state_readout), given RUN_DIR and the training "
        "precomputed dataset as the two positional paths.",
    )
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
    if args.headroom:
        if len(args.run_dir) != 2:
            parser.error("--headroom takes two paths: the training and the held-out precomputed datasets")
        print(json.dumps(cued_headroom(*args.run_dir), indent=1))
        return None
    if args.readout:
        if len(args.run_dir) != 2:
            parser.error("--readout takes two paths: the run and the training precomputed dataset")
        print(json.dumps(state_readout(*args.run_dir, args.eval_dataset, args.batch_size, args.device), indent=1))
        return None
    if len(args.run_dir) != 1:
        parser.error("one run_dir at a time (or --compare to tabulate several)")
    args.run_dir = args.run_dir[0]
    if args.num_videos < 1:
        parser.error(f"--num_videos must be >= 1, got {args.num_videos}")
    out = write_report(args.run_dir, args.eval_dataset, args.vae, args.num_videos, args.device, args.batch_size)
    print(f"report written to {out / 'report.md'} and {out / 'report.html'}")
    return out


def cli() -> None:
    """The `foveated-report` command: `main` without its return value, which a console script would print."""
    main()


if __name__ == "__main__":
    main()
