"""The report's text: typed records of what it says (metrics.json is their `asdict`), every sentence written from
a number in them, and report.html from report.md. foveated_vlm/report.py computes the records and writes the files."""


import base64
import html
import json
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Optional


from foveated_vlm.card import (
    IMPROVEMENT_BANDS,
    architecture_rows,
    improvement_band,
    logged_means,
    policy_training,
)
from foveated_vlm import metrics

if TYPE_CHECKING:  # a type only: the report's text does not load the text inference (and the model) at run time
    from foveated_vlm.captioning import FoveatedVLMCaptioning


__all__ = [
    "FoveatedVLMClipSummary",
    "FoveatedVLMHardClip",
    "FoveatedVLMHeldOut",
    "FoveatedVLMReportSummary",
    "markdown_to_html",
]

# Attention whose entropy is at least this share of log(P) is called (almost) uniform.
UNIFORM_ENTROPY_SHARE = 0.99
# Pass 2's attention counts as selective below this share of Pass 1's entropy ...
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
    entropy_coarse: Optional[float] = _logged("attention/entropy_coarse")
    entropy_fine: Optional[float] = _logged("attention/entropy_fine")
    state_contribution_fine: Optional[float] = _logged("diag/state_contribution_fine")
    state_contribution_coarse: Optional[float] = _logged("diag/state_contribution_coarse")
    tracking_fine: Optional[float] = _logged("tracking/fine")
    tracking_coarse: Optional[float] = _logged("tracking/coarse")
    tracking_chance: Optional[float] = _logged("tracking/chance")
    tracking_coarse_first: Optional[float] = _logged("tracking/coarse_first")
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
    captioning: Optional["FoveatedVLMCaptioning"] = None  # the three text modes, for a model trained on text

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


# ---- The report's text: every sentence from a number in the summary ----


def _pct(value: Optional[float]) -> str:
    """Signed percent to 3 significant digits: small effects (+0.0674 %) stay readable next to large ones."""
    return "n/a" if value is None or math.isnan(value) else f"{value * 100:+.3g}%"


def _num(value: Optional[float], digits: int = 4) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
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
    if clips is not None and held_out.entropy_coarse is not None:
        coarse, fine, uniform = held_out.entropy_coarse, held_out.entropy_fine, clips.entropy_uniform
        if min(coarse, fine) >= UNIFORM_ENTROPY_SHARE * uniform:
            text.append(f"Both passes attend almost uniformly (entropy {coarse:.3f} in Pass 1 and {fine:.3f} in Pass 2 "
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
        "Pass 1: q_coarse ──read──► z°_1..z°_T ──LLM──► q_1..q_T, states ──head(previous latent)──► loss_coarse\n"
        "Pass 2: q_init, q_1..q_(T-1) ──read──► z_1..z_T ──LLM──► states ──head(previous latent)──► loss_fine\n"
        f"targets: VAE latents v_1..v_T ({latent}); the prediction of v_t sees frames < t and v_(t-1) only\n"
        "```",
        markdown_table(["Part", "This run"], [[name, value] for name, value in architecture_rows(config, probes, teacher).items()]),
        markdown_table(["Training", "Value"], _training_rows(state, log_history, eval_path, num_clips)),
    ]
    if probes:
        text.append(f"This run trained with research probes (foveated_vlm/probes.py): `{json.dumps(probes)}`.")
    return text


def _table1(held_out: FoveatedVLMHeldOut, clips: Optional[FoveatedVLMClipSummary], num_targets,
            teacher: Optional[dict] = None) -> list[str]:
    h = held_out
    rows = [
        ["loss_coarse (Pass 1, static query)", _num(h.loss_coarse), _num(h.loss_coarse_t2)],
        ["loss_fine (Pass 2, predicted queries)", _num(h.loss_fine), _num(h.loss_fine_t2)],
        ["Improvement (coarse − fine) / coarse", _pct(h.improvement), _pct(h.improvement_t2)],
        ["Its clip-level standard error", _pct(h.improvement_se), _pct(h.improvement_t2_se)],
    ]
    if clips is not None and clips.loss_fine_streamed is not None:
        # Training's Pass 2 reads with the queries Pass 1 wrote; deployed, each query comes from the stream's own
        # focused state, and an aiming policy keeps only part of its gain there (docs/RESULTS.md, section 1).
        rows.append(
            [
                "Improvement of the deployed stream (coarse − streamed autoregressive) / coarse",
                _pct(1 - clips.loss_fine_streamed / h.loss_coarse),
                _pct(1 - clips.loss_fine_streamed_t2 / h.loss_coarse_t2),
            ]
        )
    rows.append(["Copy previous latent (baseline)", "n/a (v_1 has no previous latent)", _num(h.loss_copy_t2)])
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
        f"latent by a state that has seen no frame. Pass 2's policy was trained by {policy_training(teacher)}.",
        markdown_table(["Metric", "Full loss", "Targets t ≥ 2"], rows),
    ]
    secondary = [
        ["Attention entropy, Pass 1 (nats)", _num(h.entropy_coarse, 3)],
        ["Attention entropy, Pass 2 (nats)", _num(h.entropy_fine, 3)],
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
            ["Attention mass on the moving box, Pass 2 (`tracking/fine`)", _num(h.tracking_fine, 3)],
            ["Attention mass on the moving box, Pass 1 (`tracking/coarse`)", _num(h.tracking_coarse, 3)],
            ["Chance: uniform attention's mass on the box (`tracking/chance`)", _num(h.tracking_chance, 3)],
        ]
    text += [
        "**Table 2.** Secondary metrics on the same split, named as in the training logs (docs/TRAINING.md). The "
        "streaming gap compares `model.stream(autoregressive=True)`, where the next query comes from the stream "
        "itself, with the two-pass forward used in training.",
        markdown_table(["Metric", "Value"], secondary),
    ]
    return text


def _hardest_section(clips: FoveatedVLMClipSummary) -> list[str]:
    counts = lambda d: ", ".join(f"{n} {kind}" for kind, n in d.items() if n)  # noqa: E731
    return [
        "### Where it fails: the clips with the highest loss_fine",
        markdown_table(
            ["Clip", "loss_fine", "loss_coarse", "copy previous (t ≥ 2)", "mean abs frame diff", "max", "kind"],
            [[c.name, _num(c.loss_fine), _num(c.loss_coarse), _num(c.loss_copy_t2), _num(c.mean_frame_diff),
              _num(c.max_frame_diff), c.category] for c in clips.hardest],
        ),
        f"Kinds among these {len(clips.hardest)}: {counts(clips.categories_hardest)}; in the whole split: "
        f"{counts(clips.categories_all)}. Their mean absolute frame difference is {clips.mean_frame_diff_hardest:.4f} "
        f"against {clips.mean_frame_diff_all:.4f} for the split; the rank correlation of a clip's loss_fine with its "
        f"frame difference is {clips.rank_correlation_frame_diff:.2f}, with its copy-previous error (how much the "
        f"latent changes) {clips.rank_correlation_copy:.2f}. Kinds, from the mean absolute difference of consecutive "
        f"frames with pixels in [0, 1]: static below {metrics.STATIC_MAX_DIFF}, fast motion from {metrics.FAST_MIN_DIFF}, scene cut "
        f"when one pair differs by at least {metrics.CUT_MIN_DIFF} and {metrics.CUT_MIN_RATIO:g}× the clip's median pair; moderate "
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
    if h.entropy_coarse is not None and clips is not None:
        coarse, fine, uniform = h.entropy_coarse, h.entropy_fine, clips.entropy_uniform
        items.append(f"Attention entropy: Pass 2 {fine:.3f}, Pass 1 {coarse:.3f}, uniform {uniform:.3f} nats: "
                     f"Pass 2 is at {fine / uniform:.0%} and Pass 1 at {coarse / uniform:.0%} of uniform.")
    if h.has_tracking:
        chance = h.tracking_chance
        items.append(f"Tracking: Pass 2's attention puts {h.tracking_fine:.3f} of its mass on the moving box, "
                     f"Pass 1's {h.tracking_coarse:.3f}, chance {chance:.3f} ({h.tracking_fine / chance:.2f}× and "
                     f"{h.tracking_coarse / chance:.2f}× chance).")
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
        selective = h.entropy_fine is not None and h.entropy_fine < SELECTIVE_ENTROPY_SHARE * h.entropy_coarse
        follows = h.has_tracking and h.tracking_fine > FOLLOWS_MOVER_TIMES_CHANCE * h.tracking_chance
        if h.entropy_fine is not None and (not selective or (h.has_tracking and not follows)):
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
