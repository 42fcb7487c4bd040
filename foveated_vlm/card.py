"""The model card of a Foveated VLM folder: README.md rendered from model_card.md with the architecture, the
training hyperparameters, Table 1 from the Trainer's log history and links to the report's figures."""

import math
import os
from functools import cache
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from foveated_vlm.metrics import derived_metrics

__all__ = [
    "IMPROVEMENT_BANDS",
    "REPORT_DIR",
    "REPORT_FIGURES",
    "TABLE1_METRICS",
    "FoveatedVLMModelCardInfo",
    "architecture_rows",
    "eval_results",
    "improvement_band",
    "latest_eval_metrics",
    "logged_means",
    "loss_formula",
    "objective_name",
    "policy_training",
    "report_figure_links",
    "table1_markdown",
    "table1_values",
    "write_model_card",
]

# The report's folder inside a run, and its figures: file name (glob pattern) -> title. The report draws them, the
# model card links them.
REPORT_DIR = "report"
REPORT_FIGURES = {
    "fig1_losses.png": "Figure 1: loss_fine and loss_coarse over training steps",
    "fig2_ratio.png": "Figure 2: loss_coarse / loss_fine over training steps",
    "fig3_attention_*.png": "Figure 3: Pass 1 and Pass 2 attention on a held-out clip",
    "fig4_predictions.png": "Figure 4: frame t, predicted and actual frame t+1",
}


# model_card.md lives at the repository's top; the build copies it into the package (setup.py), so an installed
# package finds it beside this module and a source checkout one folder up.
MODEL_CARD_TEMPLATE = next(
    path
    for path in (Path(__file__).resolve().parent / "model_card.md", Path(__file__).resolve().parents[1] / "model_card.md")
    if path.is_file()
)

# The licences of what a card can name, as their Hub pages give them (Hub id prefix -> licence). Weights a model
# starts from carry their licence into it; DINOv3's is Meta's own.
DINOV3_PREFIX = "facebook/dinov3-"
DINOV3_LICENSE = dict(
    license="other",
    license_name="dinov3-license",
    license_link="https://ai.meta.com/resources/models-and-libraries/dinov3-license/",
)
KNOWN_LICENSES = {
    DINOV3_PREFIX: "DINOv3 License (dinov3-license)",
    "HuggingFaceTB/SmolLM2-": "apache-2.0",
    "lmms-lab/LLaVA-Video-178K": "apache-2.0; its card allows academic research and education use only",
    "stabilityai/sd-vae-ft-": "mit",
}
# This package's licence (LICENSE), which a model without pretrained weights carries.
PACKAGE_LICENSE = "apache-2.0"


def license_of(hub_id: str) -> str:
    """The licence of a Hub id from KNOWN_LICENSES, else a pointer to its page."""
    for prefix, license in KNOWN_LICENSES.items():
        if hub_id.startswith(prefix):
            return license
    return "see its Hub page"


def card_license(base_models: list[str]) -> dict:
    """The card's licence metadata: DINOv3's where its weights are in the model, else the package's."""
    if any(name.startswith(DINOV3_PREFIX) for name in base_models):
        return dict(DINOV3_LICENSE)
    return dict(license=PACKAGE_LICENSE)


def latest_eval_metrics(log_history: list[dict]) -> Optional[dict]:
    """The last evaluation in a Trainer's `log_history` that has the foveation losses, or None."""
    evaluations = [entry for entry in log_history if "eval_loss/fine" in entry]
    return evaluations[-1] if evaluations else None


# How docs/DESIGN.md reads improvement = (coarse - fine) / coarse: upper bound of each band, and its name.
IMPROVEMENT_BANDS = ((0.0, "foveation hurts"), (0.05, "marginal"), (0.15, "proof of concept"), (math.inf, "strong"))


def improvement_band(value: float) -> str:
    return next(label for upper, label in IMPROVEMENT_BANDS if value < upper)


def improvement_bands_text() -> str:
    """The bands in words: "< 0 % foveation hurts, 0-5 % marginal, ..."."""
    parts, lower = [], None
    for upper, label in IMPROVEMENT_BANDS:
        if lower is None:
            span = f"< {upper:.0%}"
        else:
            span = f"> {lower:.0%}" if math.isinf(upper) else f"{lower:.0%}–{upper:.0%}"
        parts.append(f"{span} {label}")
        lower = upper
    return ", ".join(parts)


# Table 1: model-index metric type -> logged metric name (docs/TRAINING.md), in the table's order.
TABLE1_METRICS = {
    "loss_coarse": "loss/coarse",
    "loss_fine": "loss/fine",
    "improvement": "improvement",
    "improvement_t2": "improvement_t2",
    "improvement_se": "improvement_se",  # the clip-level standard error of `improvement` (foveated_vlm.metrics)
    # With text as a target: cross-entropy (nats per scored token) of each pass's text after the frames.
    "loss_text_coarse": "loss/text_coarse",
    "loss_text_fine": "loss/text_fine",
    "improvement_text": "improvement_text",
    "improvement_text_se": "improvement_text_se",
}
# The task each of Table 1's metrics measures, for model-index.
TABLE1_TASKS = {"text": "Video captioning (text after the frames)", "": "Next-frame VAE latent prediction"}


# Logged metrics renamed when Pass 1 / Pass 2 became `coarse` / `fine` everywhere in code (they were `static` /
# `dynamic` too): logs written before still read, under the new names.
RENAMED_METRICS = {
    "attention/entropy_static": "attention/entropy_coarse",
    "attention/entropy_dynamic": "attention/entropy_fine",
    "tracking/static": "tracking/coarse",
    "tracking/dynamic": "tracking/fine",
    "tracking/static_first": "tracking/coarse_first",
    "teacher/static": "teacher/first_glance",
}


def logged_means(metrics: dict, prefix: str = "eval_") -> dict[str, float]:
    """Metric name -> value of a log entry or eval_results.json, without `prefix` and under today's names
    (`RENAMED_METRICS`); the derived metrics (improvements) computed from its losses where the log lacks them."""
    means = {RENAMED_METRICS.get(name[len(prefix):], name[len(prefix):]): value
             for name, value in metrics.items() if name.startswith(prefix)}  # fmt: skip
    return {**derived_metrics(means), **means}


def table1_values(metrics: dict, prefix: str = "eval_") -> dict[str, float]:
    """Table 1's values from logged means."""
    means = logged_means(metrics, prefix)
    return {metric: float(means[logged]) for metric, logged in TABLE1_METRICS.items() if logged in means}


def table1_markdown(metrics: dict, prefix: str = "eval_") -> str:
    """Table 1 (loss_coarse, loss_fine, improvement on all targets and on t >= 2, and the text losses where the model
    read text as a target) as Markdown from logged means."""
    values = table1_values(metrics, prefix)
    width = max(len("Metric"), *map(len, values))
    rows = [
        f"| {metric:<{width}} | {value:.4f} |" if metric.startswith("loss") else f"| {metric:<{width}} | {value:.2%} |"
        for metric, value in values.items()
    ]
    return "\n".join([f"| {'Metric':<{width}} | Value |", f"|{'-' * (width + 2)}|-------|", *rows])


def eval_results(metrics: dict, info: "FoveatedVLMModelCardInfo", prefix: str = "eval_") -> list[EvalResult]:
    """Table 1 as model-index entries, so that the Hub shows the results."""
    return [
        EvalResult(
            task_type="other",
            task_name=next(task for key, task in TABLE1_TASKS.items() if key in metric),
            dataset_type=info.datasets[0] if info.datasets else "custom",
            dataset_name=info.eval_dataset_name,
            dataset_split="eval",
            metric_type=metric,
            metric_name=metric,
            metric_value=value,
        )
        for metric, value in table1_values(metrics, prefix).items()
    ]


@dataclass
class FoveatedVLMModelCardInfo:
    """What the model card says that the model config and training arguments do not."""

    data_description: str = field(metadata={"help": "One paragraph: which videos, how many, how preprocessed."})
    datasets: list[str] = field(default_factory=list, metadata={"help": "Hub dataset ids, for the metadata."})
    base_models: list[str] = field(default_factory=list, metadata={"help": "Hub ids of pretrained backbones."})
    # None: no transformers pipeline can call the model (its forward takes clips of frames, and "feature-extraction"
    # would hand it text), so the card names none rather than one that fails.
    pipeline_tag: Optional[str] = field(default=None, metadata={"help": "Hub pipeline tag, where one works."})
    eval_dataset_name: str = field(
        default="held-out clips", metadata={"help": "The held-out split Table 1 is measured on, for model-index."}
    )
    frozen: Optional[list[str]] = field(
        default=None, metadata={"help": "Parts frozen in training (training policy, not in the checkpoint)."}
    )
    probes: dict = field(
        default_factory=dict, metadata={"help": "The research probes the run trained with (probes.json), if any."}
    )
    teacher: dict = field(
        default_factory=dict, metadata={"help": "The search teacher's settings the run trained with, if any."}
    )
    init_from: Optional[str] = field(
        default=None, metadata={"help": "The saved model the run started from (`--init_from`), if any."}
    )
    init_reset_fixations: bool = field(
        default=False, metadata={"help": "Whether that model's fixation writer was reset (`--init_reset_fixations`)."}
    )


def loss_formula(config, probes: Optional[dict] = None, teacher: Optional[dict] = None) -> str:
    """The trained loss with every term, as the model's forward sums it; `probes` (probes.json) may reweight
    loss_fine, and the search teacher's settings (foveated_vlm/teacher.py) add its training-only terms."""
    fine_weight = (probes or {}).get("fine_loss_weight", 1.0)
    passes, latent_weight, text_weight = config.fine_passes, config.latent_loss_weight, config.text_loss_weight

    def objective(weight: float, fine: str, coarse: str) -> list[str]:
        # Every fine pass's loss, the last being `fine`; then Pass 1's.
        names = [f"{fine}_pass{k}" for k in range(1, passes)] + [fine]
        terms = [name if fine_weight == 1 else f"{fine_weight:g} · {name}" for name in names]
        terms.append(f"{config.lambda_coarse:g} · {coarse}")
        return terms if weight == 1 else [f"{weight:g} · ({' + '.join(terms)})"]

    terms = []
    if latent_weight > 0:
        terms += objective(latent_weight, "loss_fine", "loss_coarse")
    if text_weight > 0:
        terms += objective(text_weight, "loss_text_fine", "loss_text_coarse")
    if config.aux_current_weight > 0:
        terms.append(f"{config.aux_current_weight:g} · loss_aux")
    if config.fine_entropy_weight > 0:
        terms.append(f"{config.fine_entropy_weight:g} · entropy_fine")
    # The Gumbel ablation has no search to distil: its one term is the drawn glimpse's loss.
    gumbel = (teacher or {}).get("teacher_search") == "gumbel"
    for name in ("wta",) if gumbel else ("wta", "distill", "first_glance", "move"):
        weight = (teacher or {}).get(f"teacher_{name}_weight", 0)
        until = (teacher or {}).get("teacher_wta_until", 1) if name == "wta" and not gumbel else 1
        if weight > 0 and until > 0:
            when = f" (the first {until:.0%} of the steps)" if until < 1 else ""
            terms.append(f"{weight:g} · teacher/{name}{when}")
    return " + ".join(terms)


def objective_name(config) -> str:
    """Which targets the model trains on, in words, for the card's architecture table and Table 1's line."""
    latent, text = config.latent_loss_weight, config.text_loss_weight
    if text == 0:
        return "next-frame latent (the design)"
    if latent == 0:
        return "text: the clip's text after the frames and <video_end>"
    return f"joint: {latent:g} × next-frame latent + {text:g} × text after the frames"


def policy_training(teacher: Optional[dict]) -> str:
    """How Pass 2's policy was trained, in one line for the card and the report."""
    if not teacher:
        return "backpropagation through the glimpses only"
    grid = teacher["teacher_grid"]
    if teacher.get("teacher_search") == "gumbel":
        return (
            f"straight-through Gumbel-softmax over {grid}×{grid} cells of Pass 2's own glimpse (foveated_vlm/teacher.py, "
            f"the ablation without a search), temperature {teacher['teacher_temperature_start']:g} → "
            f"{teacher['teacher_temperature_end']:g}; no ground truth"
        )
    # Settings saved before the option existed were distilled by mass.
    target = teacher.get("teacher_distill_target", "mass")
    if target == "fixation":
        distilled = ("distilled into the fixations the policy writes (centre and spread) and, by glimpse position, "
                     "into Pass 1's glimpse of the frame before")
    else:
        matched = {"mass": "attention mass per cell", "position": "glimpse position"}[target]
        distilled = f"distilled ({matched}) into Pass 2's glimpse and Pass 1's glimpse of the frame before"
    scorer = teacher.get("teacher_scorer")
    scored_by = f" of the frozen model `{scorer}`" if scorer else ""
    wta = ""
    if teacher.get("teacher_wta_weight", 1.0) > 0:
        per = "clip" if teacher.get("teacher_search") == "stay" else "scored frame"
        wta = f", {teacher['teacher_samples']} candidates per {per} trained by soft winner-takes-all"
    share = teacher.get("teacher_confident_share", 1.0)
    clips = f" on the {share:.0%} of each batch's clips with the highest search gain" if share < 1 else ""
    move = ", an L1 cost on the saccades' later moves" if teacher.get("teacher_move_weight", 0.0) > 0 else ""
    return (
        f"search teacher (foveated_vlm/teacher.py): {grid}×{grid} candidate glimpses per frame scored by the next-latent "
        f"loss{scored_by}, a posterior at temperature {teacher['teacher_temperature_start']:g} → "
        f"{teacher['teacher_temperature_end']:g}{wta}, {distilled}{clips}{move}; no ground truth"
    )


def architecture_rows(config, probes: Optional[dict] = None, teacher: Optional[dict] = None) -> dict[str, str]:
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
        "Target": (f"next-frame VAE latent {latent}" if config.text_loss_weight == 0 else objective_name(config))
        + (f"; latents of `{config.target_vae}`" if config.target_vae else ""),
        "Fine passes": f"{config.fine_passes}" + (" (the design)" if config.fine_passes == 1 else
                                                 ": each reads with the queries of the pass before it"),
        "Prediction head": head,
        "Fixations": "none (content-only query)" if not config.fixation_bias else (
            "saccades (each query writes a move)" if config.fixation_mode == "saccade" else "absolute places"
        ),
        "Loss": f"`{loss_formula(config, probes, teacher)}`",
        "Policy training": policy_training(teacher),
    }


def _hyperparameter_rows(args, state, info: "FoveatedVLMModelCardInfo") -> dict[str, str]:
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
        **({"Started from": f"`{info.init_from}`" + (", its fixation writer reset" if info.init_reset_fixations else "")}
           if info.init_from else {}),
        **({"Frozen in training": ", ".join(info.frozen) or "nothing"} if info.frozen is not None else {}),
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


@cache
def hub_namespace() -> str:
    """The account a push would go to, from the saved token, without a network call where there is no token; asked
    once per process (a run writes a card at every save)."""
    from huggingface_hub import get_token, whoami

    if get_token() is None:
        return "<namespace>"
    try:
        return whoami()["name"]
    except Exception:  # offline, or a token the Hub refuses: the card still gets written
        return "<namespace>"


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
        **card_license(info.base_models),
    )
    evaluation = latest_eval_metrics(state.log_history)
    # The id the checkpoint has on the Hub: hub_model_id, else the Trainer's default, the folder's name under the
    # pushing account's namespace (written as a placeholder when no token says which account that is).
    repo_id = args.hub_model_id or f"{hub_namespace()}/{card_kwargs.get('model_name') or Path(folder).name}"
    licenses = [(name, license_of(name)) for name in [*info.base_models, *info.datasets]]
    if config.target_vae and not os.path.isdir(config.target_vae):  # a Hub id: its licence too
        licenses.append((config.target_vae, license_of(config.target_vae)))
    if evaluation:
        card_data.model_name = Path(repo_id).name
        card_data.eval_results = eval_results(evaluation, info)
    card = ModelCard.from_template(
        card_data,
        template_path=str(MODEL_CARD_TEMPLATE),
        model_name=Path(repo_id).name,
        repo_id=repo_id,
        architecture=architecture_rows(config, info.probes, info.teacher),
        data_description=info.data_description,
        hyperparameters=_hyperparameter_rows(args, state, info),
        table1=table1_markdown(evaluation) if evaluation else None,
        loss=loss_formula(config, info.probes, info.teacher),
        policy=policy_training(info.teacher),
        improvement_bands=improvement_bands_text(),
        eval_step=evaluation["step"] if evaluation else None,
        num_frames=config.num_frames,
        image_size=config.image_size,
        figures=report_figure_links(folder),
        has_report=Path(folder, REPORT_DIR, "report.md").is_file(),
        local_folder=str(folder),
        licenses=licenses,
        license=card_data.license_name or card_data.license,
    )
    card.save(os.path.join(folder, "README.md"))
    return card
