"""Training of the Foveated VLM with the 🤗 Trainer.

`FoveatedTrainer` adds the foveation metrics to the Trainer's logs, averaged correctly over gradient-accumulation
micro-batches and processes. Two callbacks write what a run shows besides scalars: attention maps and decoded
predictions of a few fixed eval clips to TensorBoard, and a model card (README.md) into every checkpoint so that each
saved folder is Hub-ready. The figure and table functions are plain functions so that reports can reuse them.
"""

import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from huggingface_hub import ModelCard, ModelCardData
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from transformers import ProcessorMixin, Trainer, TrainerCallback
from transformers.dynamic_module_utils import custom_object_save
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, IntervalStrategy

from probes_foveated import probe_inputs
from processing_foveated import frames_to_pixel_values

__all__ = [
    "HOST_SYNC_OPERATORS",
    "MODEL_INPUT_NAMES",
    "FoveatedTrainer",
    "FoveatedVLMModelCardInfo",
    "FoveatedVLMFigureCallback",
    "FoveatedVLMHubFilesCallback",
    "foveation_metrics",
    "derived_metrics",
    "table1_markdown",
    "latest_eval_metrics",
    "write_model_card",
    "plot_attention_maps",
    "plot_predictions",
    "decode_latents",
]

# Operators that make the host wait for the accelerator: reading a value (`.item()`, `bool(tensor)`) or an output
# whose size depends on the data. The train step must not call them outside logging (tests/test_trainer.py).
HOST_SYNC_OPERATORS = frozenset(
    {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_consecutive", "repeat_interleave"}
)
# Batch columns the model's forward takes; the rest (moving_boxes, ...) are for metrics and figures only.
MODEL_INPUT_NAMES = ("pixel_values", "vae_latents", "input_ids", "attention_mask")
MODEL_CARD_TEMPLATE = Path(__file__).resolve().parent / "model_card.md"
# A latent cell "changes" when its mean absolute change over channels exceeds this (loss/fine_changed).
CHANGED_CELL_THRESHOLD = 0.1


def model_inputs(batch: dict, model=None) -> dict[str, torch.Tensor]:
    """The model's forward arguments from a collated batch, normalising uint8 `frames` where the collator left them
    (`FoveatedVLMDataCollator(normalize_frames=False)`) on whatever device they are, plus a probed `model`'s
    (`probes_foveated.probe_inputs`)."""
    inputs = {name: batch[name] for name in MODEL_INPUT_NAMES if name in batch}
    if "pixel_values" not in inputs and "frames" in batch:
        inputs["pixel_values"] = frames_to_pixel_values(batch["frames"])
    return {**inputs, **probe_inputs(model, batch)}


def foveation_metrics(model, outputs, inputs, state_contribution: bool = True) -> dict[str, torch.Tensor]:
    """Per-micro-batch diagnostics: batch-mean scalar tensors, left on the device (reading them would sync the host).

    Args:
        model: the unwrapped `FoveatedVLMModel`.
        outputs: its `FoveatedVLMOutput` on this batch.
        inputs: the whole collated batch, model inputs and the other columns (`moving_boxes`, ...).
        state_contribution: also measure the state contribution, two more forward passes of the head (most of
            what these diagnostics cost); the trainer asks for it in evaluation and on the steps that log.

    Return the same keys on every call with the same `state_contribution`: the trainer reduces them across
    processes by name.
    """
    metrics = {
        "loss/fine": outputs.loss_fine,
        "loss/coarse": outputs.loss_coarse,
        "attention/entropy_static": outputs.entropy_static,
        "attention/entropy_dynamic": outputs.entropy_dynamic,
    }
    if outputs.pred_fine is None:
        return metrics
    target = inputs["vae_latents"].float()
    with torch.no_grad():
        # Targets t >= 2 have a previous latent; the first is the same task in both passes and dominates the mean.
        later = slice(1, None)
        metrics["loss/fine_t2"] = (outputs.pred_fine[:, later] - target[:, later]).pow(2).mean()
        metrics["loss/coarse_t2"] = (outputs.pred_coarse[:, later] - target[:, later]).pow(2).mean()
        metrics["loss/copy_t2"] = (outputs.prev_latents[:, later].float() - target[:, later]).pow(2).mean()
        # Loss split into latent cells that change from the previous frame and cells that do not.
        change = (target - outputs.prev_latents.float()).abs().mean(dim=2, keepdim=True)[:, later]
        changed = (change > CHANGED_CELL_THRESHOLD).float()  # (B, T-1, 1, h, w)
        fine_error = (outputs.pred_fine[:, later] - target[:, later]).pow(2).mean(2, keepdim=True)
        metrics["loss/fine_changed"] = (fine_error * changed).sum() / changed.sum().clamp_min(1)
        metrics["loss/fine_unchanged"] = (fine_error * (1 - changed)).sum() / (1 - changed).sum().clamp_min(1)
        # State contribution: the head's loss with each clip's LLM state swapped for another clip's. Zero means
        # the head ignores the LLM, and then no gradient asks the queries to become selective.
        if state_contribution:
            # Both passes' swapped states in one head call: the previous latents are encoded once.
            swapped_states = torch.cat([outputs.state_fine.roll(1, dims=0), outputs.state_coarse.roll(1, dims=0)])
            swapped_fine, swapped_coarse = model.predict_latents(swapped_states, outputs.prev_latents).float().chunk(2)
            swaps = (("fine", swapped_fine, outputs.pred_fine), ("coarse", swapped_coarse, outputs.pred_coarse))
            for name, swapped, predicted in swaps:
                swapped_loss = (swapped[:, later] - target[:, later]).pow(2).mean()
                predicted_loss = (predicted[:, later] - target[:, later]).pow(2).mean()
                metrics[f"diag/state_contribution_{name}"] = swapped_loss - predicted_loss
        if "moving_boxes" in inputs:
            inside = moving_box_patch_mask(inputs["moving_boxes"], outputs.attn_static.shape[-1])  # (B, T, P)
            metrics["tracking/dynamic"] = (outputs.attn_dynamic * inside).sum(-1).mean()
            metrics["tracking/static"] = (outputs.attn_static * inside).sum(-1).mean()
            metrics["tracking/chance"] = inside.mean(-1).mean()
    return metrics


def moving_box_patch_mask(moving_boxes: torch.Tensor, num_patches: int) -> torch.Tensor:
    """1.0 for patches whose centre lies in a moving object's box: boxes (B, T, K, 4) normalised xyxy, -1 rows
    absent -> (B, T, P)."""
    side = int(round(num_patches**0.5))
    centres = (torch.arange(side, device=moving_boxes.device, dtype=torch.float32) + 0.5) / side
    ys, xs = torch.meshgrid(centres, centres, indexing="ij")
    xs, ys = xs.flatten(), ys.flatten()  # (P,)
    boxes = moving_boxes.float()[..., None]  # (B, T, K, 4, 1)
    inside = (xs >= boxes[..., 0, :]) & (xs <= boxes[..., 2, :]) & (ys >= boxes[..., 1, :]) & (ys <= boxes[..., 3, :])
    valid = (moving_boxes[..., 0] >= 0)[..., None]  # (B, T, K, 1)
    return (inside & valid).any(dim=2).float()


def derived_metrics(means: dict[str, float]) -> dict[str, float]:
    """`loss/ratio` = coarse / fine (> 1: foveation helps) and `improvement` = (coarse - fine) / coarse, the seed's
    success metric, from MEAN losses: a mean of per-batch ratios would weight noisy batches differently."""
    if "loss/fine" not in means or "loss/coarse" not in means:
        return {}
    fine, coarse = means["loss/fine"], means["loss/coarse"]
    derived = {
        "loss/ratio": coarse / fine if fine > 0 else math.inf,
        "improvement": (coarse - fine) / coarse if coarse > 0 else 0.0,
    }
    if means.get("loss/coarse_t2", 0) > 0:
        derived["improvement_t2"] = (means["loss/coarse_t2"] - means["loss/fine_t2"]) / means["loss/coarse_t2"]
    return derived


class FoveatedTrainer(Trainer):
    """
    A `Trainer` for `FoveatedVLMModel` that logs `foveation_metrics` next to the Trainer's own `loss`, `grad_norm` and
    `learning_rate`, as means over every micro-batch of every process since the last log, `eval_`-prefixed in
    evaluation. (In distributed evaluation accelerate pads the last batches with repeated clips so that every process
    gets one; those repeats count here, while the Trainer's own `eval_loss` drops them.)

    Every saved folder (checkpoints, the final model, pushes) is Hub-ready: weights, config with `auto_map`, remote
    code, processor and a README.md model card (`write_model_card`).

    Args:
        model_card_info (`FoveatedVLMModelCardInfo`, *optional*): what the model card says about the data and base
            models.
        *args, **kwargs: as for `Trainer`; pass the `FoveatedVLMProcessor` as `processing_class` so that it is saved.
    """

    # The model's loss is a mean over its clips: the Trainer divides it by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, *args, model_card_info: Optional["FoveatedVLMModelCardInfo"] = None, **kwargs):
        processor = kwargs.get("processing_class")
        # transformers' train() aligns the special tokens of a processor's tokenizer with the model and fails on a
        # processor without one (Phase 1); the Trainer never sees such a processor, `save_model` saves it.
        self._processor_without_tokenizer = None
        if isinstance(processor, ProcessorMixin) and getattr(processor, "tokenizer", None) is None:
            self._processor_without_tokenizer = processor
            kwargs["processing_class"] = None
        super().__init__(*args, **kwargs)
        if self.args.remove_unused_columns:
            raise ValueError(
                "FoveatedTrainer needs remove_unused_columns=False: the data collator reads columns the model's "
                "forward does not take (frames, moving_boxes, caption)."
            )
        # The model's forward takes **kwargs, so the Trainer would think it normalises its loss by
        # `num_items_in_batch`; it does not (and there are no `labels` to count).
        self.model_accepts_loss_kwargs = False
        # The targets are the latents. Naming them makes evaluation compute the loss: the model has no `labels`.
        self.label_names = ["vae_latents"]
        # Per mode, per metric: a tensor [sum over clips, number of clips] since the last log (TRL's `_metrics`).
        self._metrics = {"train": defaultdict(float), "eval": defaultdict(float)}
        self.model_card_info = model_card_info
        self.add_callback(FoveatedVLMHubFilesCallback(model_card_info, processor))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # `num_items_in_batch` is ignored: the loss is a per-batch mean (see `loss_is_scaled_for_ga`).
        unwrapped = self.accelerator.unwrap_model(model)
        outputs = model(**model_inputs(inputs, unwrapped))
        mode = "train" if model.training else "eval"
        batch_size = inputs["vae_latents"].shape[0]
        # The state contribution costs two head passes: in training, only on the micro-batches of a step that logs.
        state_contribution = mode == "eval" or self._step_logs()
        metrics = foveation_metrics(unwrapped, outputs, inputs, state_contribution)
        for name, value in metrics.items():
            value = value.detach().float()
            self._metrics[mode][name] += torch.stack([value * batch_size, torch.full_like(value, batch_size)])
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def _step_logs(self) -> bool:
        """Whether the optimizer step being computed ends with a log (the Trainer's own rule for `steps`)."""
        args, step = self.args, self.state.global_step + 1
        if args.logging_strategy != IntervalStrategy.STEPS:
            return True
        every = self.state.logging_steps or args.logging_steps
        return step % every == 0 or (args.logging_first_step and step == 1)

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        # Same decision as TRL: the Trainer logs evaluation results while the model is in eval mode.
        mode = "train" if self.model.training else "eval"
        metrics = self._metrics[mode]
        if metrics:
            names = sorted(metrics)
            # Every rank calls log() at the same points with the same names, so this collective matches up.
            totals = self.accelerator.reduce(torch.stack([metrics[name] for name in names]), "sum").tolist()
            means = {name: total / count for name, (total, count) in zip(names, totals)}
            means.update(derived_metrics(means))
            prefix = "eval_" if mode == "eval" else ""
            # In place, as the Trainer adds "epoch": `evaluate()` returns this same dict, so it carries them too.
            logs.update({prefix + name: value for name, value in means.items()})
            metrics.clear()
        super().log(logs, start_time)

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        """The Trainer's save (weights, config, remote code, processor) plus a processor without a tokenizer."""
        super().save_model(output_dir, _internal_call)
        if self._processor_without_tokenizer is not None and self.args.should_save:
            self._processor_without_tokenizer.save_pretrained(output_dir or self.args.output_dir)

    def create_model_card(self, **kwargs) -> None:
        """Write the package's model card (not the Trainer's generic one) into `output_dir`; `push_to_hub` calls it."""
        if self.is_world_process_zero():
            unwrapped = self.accelerator.unwrap_model(self.model)
            write_model_card(
                self.args.output_dir, unwrapped.config, self.args, self.state, self.model_card_info, **kwargs
            )


# ---- Tables and the model card ----


def latest_eval_metrics(log_history: list[dict]) -> Optional[dict]:
    """The last evaluation in a Trainer's `log_history` that has the foveation losses, or None."""
    evaluations = [entry for entry in log_history if "eval_loss/fine" in entry]
    return evaluations[-1] if evaluations else None


def table1_markdown(metrics: dict, prefix: str = "eval_") -> str:
    """The seed's Table 1 (loss_coarse, loss_fine, improvement) as Markdown from logged means."""
    coarse, fine = metrics[f"{prefix}loss/coarse"], metrics[f"{prefix}loss/fine"]
    improvement = derived_metrics({"loss/fine": fine, "loss/coarse": coarse})["improvement"]
    return "\n".join(
        [
            "| Metric      | Value |",
            "|-------------|-------|",
            f"| loss_coarse | {coarse:.4f} |",
            f"| loss_fine   | {fine:.4f} |",
            f"| Improvement | {improvement:.1%} |",
        ]
    )


@dataclass
class FoveatedVLMModelCardInfo:
    """What the model card says that the model config and training arguments do not."""

    data_description: str = field(metadata={"help": "One paragraph: which videos, how many, how preprocessed."})
    datasets: list[str] = field(default_factory=list, metadata={"help": "Hub dataset ids, for the metadata."})
    base_models: list[str] = field(default_factory=list, metadata={"help": "Hub ids of pretrained backbones."})
    # Not a generation or classification model: AutoModel returns queries, states and latent predictions.
    pipeline_tag: str = field(default="feature-extraction", metadata={"help": "Hub pipeline tag."})


def _architecture_rows(config) -> dict[str, str]:
    vision, text = config.vision_config, config.text_config
    latent = f"{config.latent_channels}×{config.latent_size}×{config.latent_size}"
    head = f"{config.head_type} ({'residual' if config.head_residual else 'full latent'}), {config.head_channels} ch"
    return {
        "Vision encoder": f"{vision.model_type}: {vision.num_hidden_layers} layers, width {vision.hidden_size}, "
        f"patch {vision.patch_size}, {config.num_patches} patches per frame",
        "Language model": f"{text.model_type}: {text.num_hidden_layers} layers, width {text.hidden_size}",
        "Query": f"{'deep (joins every encoder layer)' if config.deep_query else 'shallow (one cross-attention)'}, "
        f"width {config.query_dim}; one visual token per frame",
        "Clip": f"T = {config.num_frames} frames of {config.image_size}×{config.image_size} px",
        "Target": f"next-frame VAE latent {latent}",
        "Prediction head": head,
        "Loss": f"loss_fine + {config.lambda_coarse:g} · loss_coarse (MSE)",
    }


def _hyperparameter_rows(args, state) -> dict[str, str]:
    per_device = args.per_device_train_batch_size
    effective = per_device * args.gradient_accumulation_steps * args.world_size
    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    return {
        "Optimizer steps done": str(state.global_step),
        "Planned steps": str(args.max_steps) if args.max_steps > 0 else f"{args.num_train_epochs:g} epochs",
        "Clips per step": f"{effective} ({per_device} per device × {args.gradient_accumulation_steps} accumulation × "
        f"{args.world_size} processes)",
        "Learning rate": f"{args.learning_rate:g} ({getattr(args.lr_scheduler_type, 'value', args.lr_scheduler_type)}, "
        f"{args.warmup_steps} warmup steps)",
        "Weight decay": f"{args.weight_decay:g}",
        "Precision": precision,
        "Seed": str(args.seed),
    }


REPORT_DIR = "report"
# Titles of report_foveated.py's figures, for the model card's links (glob pattern -> title).
REPORT_FIGURES = {
    "fig1_losses.png": "Figure 1: loss_fine and loss_coarse over training steps",
    "fig2_ratio.png": "Figure 2: loss_coarse / loss_fine over training steps",
    "fig3_attention_*.png": "Figure 3: static and dynamic attention on a held-out clip",
    "fig4_predictions.png": "Figure 4: frame t, predicted and actual frame t+1",
}


def report_figure_links(folder) -> list[tuple[str, str]]:
    """(title, path relative to `folder`) of every report figure found in `folder`/report, in figure order."""
    report = Path(folder, REPORT_DIR)
    links = []
    for pattern, title in REPORT_FIGURES.items():
        paths = sorted(report.glob(pattern))
        for number, path in enumerate(paths, start=1):
            links.append((f"{title} ({number})" if len(paths) > 1 else title, f"{REPORT_DIR}/{path.name}"))
    return links


def write_model_card(
    folder, config, args, state, info: Optional[FoveatedVLMModelCardInfo] = None, **card_kwargs
) -> ModelCard:
    """Render `model_card.md` into `folder`/README.md with the measured Table 1 from `state.log_history`, if any.

    `card_kwargs` are what `Trainer.push_to_hub` passes to `create_model_card`: `model_name`, `tags`, ...
    """
    info = info or FoveatedVLMModelCardInfo(data_description="Not recorded.")
    tags = card_kwargs.get("tags") or []
    tags = [tags] if isinstance(tags, str) else list(tags)
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag=info.pipeline_tag,
        tags=["foveated-vlm", "video", "next-frame-prediction", "custom_code", *tags],
        datasets=info.datasets or None,
        base_model=info.base_models or None,
    )
    evaluation = latest_eval_metrics(state.log_history)
    repo_id = args.hub_model_id or card_kwargs.get("model_name") or Path(folder).name
    card = ModelCard.from_template(
        card_data,
        template_path=str(MODEL_CARD_TEMPLATE),
        model_name=Path(repo_id).name,
        repo_id=repo_id,
        architecture=_architecture_rows(config),
        data_description=info.data_description,
        hyperparameters=_hyperparameter_rows(args, state),
        table1=table1_markdown(evaluation) if evaluation else None,
        eval_step=evaluation["step"] if evaluation else None,
        num_frames=config.num_frames,
        image_size=config.image_size,
        figures=report_figure_links(folder),
        has_report=Path(folder, REPORT_DIR, "report.md").is_file(),
    )
    card.save(os.path.join(folder, "README.md"))
    return card


class FoveatedVLMHubFilesCallback(TrainerCallback):
    """The Hub files the Trainer does not write itself. Into every checkpoint: README.md. Into `output_dir` before a
    push from a checkpoint (the Trainer then copies in only the weights and config): README.md, the remote code and
    the processor.

    Args:
        info: what the model card says about the data and base models.
        processor: the `FoveatedVLMProcessor` saved with the model.
    """

    def __init__(self, info: Optional[FoveatedVLMModelCardInfo] = None, processor=None):
        self.info = info
        self.processor = processor

    def on_save(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero:
            checkpoint = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            write_model_card(checkpoint, model.config, args, state, self.info)

    def on_push_begin(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero:
            os.makedirs(args.output_dir, exist_ok=True)
            custom_object_save(model, args.output_dir, config=model.config)
            if self.processor is not None:
                self.processor.save_pretrained(args.output_dir)
            write_model_card(args.output_dir, model.config, args, state, self.info)


# ---- Figures ----


def plot_attention_maps(frames, attn_static, attn_dynamic, boxes=None) -> Figure:
    """Static vs dynamic attention of one clip over time.

    Args:
        frames: uint8 (T, S, S, 3).
        attn_static, attn_dynamic: (T, P) attention over the P = g × g patches of each frame.
        boxes: optional (T, K, 4) ground-truth moving boxes, normalised [x0, y0, x1, y1]; rows with a negative
            value are absent boxes.

    Returns:
        A figure, rows static / dynamic, one column per frame, the heatmap over the frame. Both rows share one colour
        scale from 0, so a flat (uniform) map looks flat instead of being stretched into noise.
    """
    frames = np.asarray(frames)
    attn_static, attn_dynamic = np.asarray(attn_static, dtype=np.float32), np.asarray(attn_dynamic, dtype=np.float32)
    T, S = frames.shape[0], frames.shape[1]
    P = attn_static.shape[-1]
    grid = math.isqrt(P)
    if grid * grid != P:
        raise ValueError(f"attention has {P} patches per frame; expected a square number (a g x g patch grid)")
    vmax = float(max(attn_static.max(), attn_dynamic.max()))
    figure = Figure(figsize=(1.8 * T, 4.0), layout="constrained")
    axes = figure.subplots(2, T, squeeze=False)
    for row, (name, attention) in enumerate((("static", attn_static), ("dynamic", attn_dynamic))):
        for t in range(T):
            ax = axes[row, t]
            ax.imshow(frames[t])
            heatmap = attention[t].reshape(grid, grid)  # (P,) -> (g, g), row-major like the patch sequence
            ax.imshow(heatmap, cmap="inferno", alpha=0.6, vmin=0.0, vmax=vmax, extent=(0, S, S, 0))
            if boxes is not None:
                for x0, y0, x1, y1 in np.asarray(boxes)[t]:
                    if min(x0, y0, x1, y1) >= 0:
                        ax.add_patch(
                            Rectangle((x0 * S, y0 * S), (x1 - x0) * S, (y1 - y0) * S, fill=False, edgecolor="cyan")
                        )
            ax.set_title(f"{name} t={t}", fontsize=8)
            ax.axis("off")
    return figure


def plot_predictions(frames_t, actual_next, predicted_fine, predicted_coarse=None, t: Optional[int] = None) -> Figure:
    """Next-frame predictions of N clips, one row each: frame t | actual t+1 | predicted t+1 (fine) [| (coarse)].

    All images are (N, H, W, 3), uint8 or float in [0, 1]; `t` (optional) puts the frame index in the titles. Pass the VAE decoding of the actual latent as
    `actual_next` to compare like with like: the model predicts latents, so the VAE's own loss is not its error.
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


class FoveatedVLMFigureCallback(TrainerCallback):
    """At each evaluation, writes to TensorBoard, for the same few eval clips every time: static vs dynamic attention
    maps over time (`attention/clip_i`), and frame t, actual and predicted t+1 decoded by the VAE (`predictions`).

    Args:
        eval_dataset: the precomputed eval split (columns frames, vae_latents, moving_boxes, ...).
        data_collator: the collator the Trainer uses, to build the model inputs of the chosen clips.
        vae_path: folder or Hub id of the `diffusers.AutoencoderKL` that made the latents; None skips predictions.
        num_clips: how many clips, spread evenly over the eval split.
        log_dir: TensorBoard folder; default `output_dir/runs/figures`, next to the Trainer's scalar runs.
    """

    def __init__(self, eval_dataset, data_collator, vae_path: Optional[str], num_clips: int = 4, log_dir=None):
        indices = np.linspace(0, len(eval_dataset) - 1, min(num_clips, len(eval_dataset))).round().astype(int)
        rows = [eval_dataset[int(i)] for i in indices]
        self.batch = data_collator(rows)
        self.frames = np.stack([np.asarray(row["frames"], dtype=np.uint8) for row in rows])  # (N, T, S, S, 3)
        self.vae_path = vae_path
        self.log_dir = log_dir
        self._vae = None
        self._writer = None

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        # Every rank runs the forward: with sharded parameters (FSDP) it is a collective.
        device = next(model.parameters()).device
        inputs = {name: value.to(device) for name, value in model_inputs(self.batch, model).items()}
        was_training = model.training
        model.eval()
        with torch.no_grad():
            outputs = model(**inputs)
        model.train(was_training)
        if not state.is_world_process_zero:
            return
        writer = self._get_writer(args)
        boxes = self.batch.get("moving_boxes")
        for i in range(len(self.frames)):
            figure = plot_attention_maps(
                self.frames[i],
                outputs.attn_static[i].cpu(),
                outputs.attn_dynamic[i].cpu(),
                boxes[i].cpu() if boxes is not None else None,
            )
            writer.add_figure(f"attention/clip_{i}", figure, state.global_step)
        if self.vae_path is not None:
            writer.add_figure("predictions", self._prediction_figure(outputs, device), state.global_step)
        writer.flush()

    def _prediction_figure(self, outputs, device) -> Figure:
        """Predict the last frame from all the earlier ones: the prediction with the most context."""
        from diffusers import AutoencoderKL  # only the process that draws needs diffusers

        if self._vae is None:
            self._vae = AutoencoderKL.from_pretrained(self.vae_path).eval()
        vae = self._vae.to(device)
        t = outputs.pred_fine.shape[1] - 2
        latents = self.batch["vae_latents"][:, t + 1]
        figure = plot_predictions(
            self.frames[:, t],
            decode_latents(vae, latents),
            decode_latents(vae, outputs.pred_fine[:, t + 1]),
            decode_latents(vae, outputs.pred_coarse[:, t + 1]),
            t=t,
        )
        self._vae.to("cpu")  # keep accelerator memory for training
        return figure

    def _get_writer(self, args):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(self.log_dir or os.path.join(args.output_dir, "runs", "figures"))
        return self._writer

    def on_train_end(self, args, state, control, **kwargs):
        if self._writer is not None:
            self._writer.flush()
