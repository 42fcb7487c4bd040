"""The model card of a Foveated VLM folder: README.md rendered from model_card.md with the architecture, the
training hyperparameters, Table 1 from the Trainer's log history and links to the report's figures."""

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from huggingface_hub import ModelCard, ModelCardData

from metrics_foveated import derived_metrics

__all__ = [
    "REPORT_DIR",
    "FoveatedVLMModelCardInfo",
    "architecture_rows",
    "latest_eval_metrics",
    "report_figure_links",
    "table1_markdown",
    "write_model_card",
]

MODEL_CARD_TEMPLATE = Path(__file__).resolve().parent / "model_card.md"


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


def architecture_rows(config) -> dict[str, str]:
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
        "Frozen": ", ".join(
            name for name, frozen in (("vision", config.freeze_vision), ("text", config.freeze_text)) if frozen
        )
        or "nothing",
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
        architecture=architecture_rows(config),
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
