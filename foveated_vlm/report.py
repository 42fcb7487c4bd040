"""The report of a finished run: Table 1, figures 1-4, the clips the model predicts worst, the method and what limits
the result, for whoever decides on the next run.

Usage (installed: `foveated-report`; comparing runs, headroom and readouts: foveated_vlm/analyses.py):
    python -m foveated_vlm.report outputs/tiny                               # data paths from the run's data_paths.json
    python -m foveated_vlm.report RUN_DIR --eval_dataset data/arrow/.../eval --vae data/vae/tiny-128px --num_videos 6

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
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import numpy as np
import torch
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils.logging import tqdm

from foveated_vlm import metrics
from foveated_vlm.card import REPORT_DIR, REPORT_FIGURES, latest_eval_metrics
from foveated_vlm.captioning import captioning_markdown, evaluate_captioning
from foveated_vlm.data import (
    DATA_PATHS_FILE,
    MODEL_INPUT_NAMES,
    FoveatedVLMDataCollator,
    batch_to_device,
    load_precomputed,
    model_inputs,
    recorded_data_paths,
)
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
from foveated_vlm.report_text import (
    FoveatedVLMClipSummary,
    FoveatedVLMHardClip,
    FoveatedVLMHeldOut,
    FoveatedVLMReportSummary,
    _bullets,
    _executive_summary,
    _figure,
    _hardest_section,
    _limits,
    _method,
    _next_steps,
    _table1,
    markdown_to_html,
)
from foveated_vlm.teacher import TEACHER_FILE, load_teacher_settings
from processing_foveated import FoveatedVLMProcessor


__all__ = [
    "FoveatedVLMClipMetrics",
    "evaluate_clips",
    "load_log_history",
    "resolve_data_paths",
    "summarize_clips",
    "write_report",
    "main",
]


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
        batch = batch_to_device(collator(rows), device)
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


def summarize_clips(
    clips: FoveatedVLMClipMetrics, num_targets: int, num_patches: int, num_hardest: int, eval_dataset: str, model: str
) -> FoveatedVLMClipSummary:
    """The per-clip part of the report, from the clips' metrics."""
    fine, coarse = clips.metrics["loss/fine"], clips.metrics["loss/coarse"]
    copy = clips.metrics["loss/copy_t2"]
    order = np.argsort(-fine)[:num_hardest]
    categories = [metrics.clip_category(diffs) for diffs in clips.frame_diff]
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
        rank_correlation_frame_diff=metrics.rank_correlation(fine, mean_diff),
        rank_correlation_copy=metrics.rank_correlation(fine, copy),
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


def saved_model_dir(run_dir: Path) -> Optional[Path]:
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
    recorded = recorded_data_paths(run_dir)
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


@dataclass
class FoveatedVLMReportInputs:
    """Where the report reads the held-out clips from and how: the run, its held-out split and VAE (None: not
    found, so that part of the report is left out with a note), whether the run read captions before the frames,
    how many clips the figures show, and where the figures go."""

    run_dir: Path
    eval_dataset: Optional[str]
    vae: Optional[str]
    use_captions: bool
    num_videos: int
    device: str
    batch_size: int
    out: Path


def _clip_figures(model, dataset, collator, clips: FoveatedVLMClipMetrics, vae, num_videos, device, out: Path):
    """Figures 3 (attention, one per clip) and 4 (decoded predictions) on evenly spaced eval clips:
    ([(path, caption)], VAE PSNR or None)."""
    indices = evenly_spaced_clips(len(dataset), num_videos)
    rows = [dataset[i] for i in indices]
    batch = batch_to_device(collator(rows), device)
    with torch.no_grad():
        outputs = model(**model_inputs(batch, model))
    frames, boxes = stack_frames(rows), batch["moving_boxes"].cpu().numpy()
    tracking = {name: clips.metrics.get(f"tracking/{name}") for name in ("fine", "coarse", "chance")}
    figures = []
    for k, i in enumerate(indices):
        has_box = metrics.box_present(boxes[k]).any()
        figure = plot_attention_maps(
            frames[k], outputs.attn_coarse[k].cpu(), outputs.attn_fine[k].cpu(), boxes[k] if has_box else None
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


def _measure(model_dir: Path, inputs: FoveatedVLMReportInputs):
    """The pass over the held-out clips: (its clip metrics, the clip summary, [(figure path, caption)])."""
    device, batch_size = inputs.device, inputs.batch_size
    model = from_pretrained_with_probes(str(model_dir)).to(device).eval()
    # The clips are read as the run read them: with their captions before the frames only if it trained on them so,
    # after the frames if it trained on text as a target.
    caption_as_target = model.config.text_loss_weight > 0
    processor = None
    if inputs.use_captions or caption_as_target:
        processor = FoveatedVLMProcessor.from_pretrained(model_dir, trust_remote_code=True)
    dataset = load_precomputed(inputs.eval_dataset)
    collator = FoveatedVLMDataCollator(processor and processor.tokenizer, caption_as_target=caption_as_target)
    clips = evaluate_clips(model, dataset, collator, batch_size, device)
    config = model.config
    summary = summarize_clips(
        clips, config.num_frames, config.num_patches, min(inputs.num_videos, len(dataset)), str(inputs.eval_dataset),
        str(model_dir),
    )
    if caption_as_target and clips.loss_streamed is not None:  # streams exist without a probe's ground truth
        summary.captioning = evaluate_captioning(model, processor, dataset, batch_size, device=device)
    figures, summary.vae_psnr = _clip_figures(model, dataset, collator, clips, inputs.vae, inputs.num_videos, device,
                                              inputs.out)  # fmt: skip
    return clips, summary, figures


def _held_out(inputs: FoveatedVLMReportInputs, log_history: list[dict], notes: list[str]):
    """Table 1 (logged, else measured), the clip analysis and figures 3-4, and the model's config and probes:
    (held_out, clip summary, [(figure path, caption)], config, probes), None where the run lacks what they need."""
    logged = latest_eval_metrics(log_history)
    held_out = None
    if logged:
        held_out = FoveatedVLMHeldOut.from_logged(logged, f"from the evaluation logged at step {logged.get('step')}")
    model_dir = saved_model_dir(inputs.run_dir)
    if model_dir is None:
        notes.append(f"No saved model in {inputs.run_dir} or its checkpoints: nothing on the held-out split is measured.")
        return held_out, None, [], None, None
    config = FoveatedVLMModel.config_class.from_pretrained(model_dir)
    probes_path = model_dir / PROBES_FILE
    probes = json.loads(probes_path.read_text()) if probes_path.is_file() else None
    if inputs.eval_dataset is None:
        return held_out, None, [], config, probes
    clips, clip_summary, clip_figures = _measure(model_dir, inputs)
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
    inputs = FoveatedVLMReportInputs(run_dir, eval_dataset, vae, use_captions, num_videos, device, batch_size, out)
    held_out, clips, clip_figures, config, probes = _held_out(inputs, log_history, notes)
    summary = FoveatedVLMReportSummary(
        held_out=held_out,
        clips=clips,
        notes=notes,
        steps=state.get("global_step") if state else None,
        num_targets=config.num_frames if config is not None else None,
    )
    (out / "metrics.json").write_text(json.dumps(_json_safe(asdict(summary)), indent=1))

    text = [f"# Foveated VLM: report on {run_dir.name}"]
    if description is None:
        description = recorded_data_paths(run_dir).get("description")
    if description:
        text.append(f"**Clips.** {description}")
    text += ["## 1. Executive summary", *_executive_summary(summary)]
    teacher_path = run_dir / TEACHER_FILE
    teacher = load_teacher_settings(teacher_path) if teacher_path.is_file() else None
    if config is not None:
        num_clips = clips.num_clips if clips else None
        text += ["## 2. Method", *_method(config, probes, state, log_history, eval_dataset, num_clips, teacher)]
    text.append("## 3. Results")
    if held_out is not None:
        text += _table1(held_out, clips, summary.num_targets, teacher)
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


def main(argv: Optional[list[str]] = None) -> Optional[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", nargs="+", help="A finished train_hf.py output_dir.")
    # The analyses that were flags here are subcommands of foveated_vlm.analyses now: say so instead of failing on
    # an unknown flag.
    for name in ("compare", "headroom", "readout"):
        parser.add_argument(f"--{name}", action="store_true", help=f"Moved: python -m foveated_vlm.analyses {name}.")
    parser.add_argument("--eval_dataset", help=f"Held-out Arrow dataset; default: the run's {DATA_PATHS_FILE}.")
    parser.add_argument(
        "--vae", help=f"AutoencoderKL (folder or Hub id) for decoding; default: the run's {DATA_PATHS_FILE}."
    )
    parser.add_argument("--num_videos", type=int, default=6, help="Eval clips in Figures 3-4; also how many hardest.")
    parser.add_argument("--device", default="cpu", help="torch device for the model and the VAE.")
    parser.add_argument("--batch_size", type=int, default=16, help="Eval clips per forward.")
    args = parser.parse_args(argv)
    for name in ("compare", "headroom", "readout"):
        if getattr(args, name):
            parser.error(f"--{name} moved: python -m foveated_vlm.analyses {name} {' '.join(args.run_dir)}")
    if len(args.run_dir) != 1:
        parser.error("one run_dir at a time (foveated_vlm.analyses compare tabulates several)")
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
