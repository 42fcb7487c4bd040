"""Training data for the foveated video model: videos are decoded and VAE-encoded ONCE into Arrow files.

    find_videos / download_llava_video_slice + load_llava_captions   -> video paths (+ captions)
    precompute_dataset: decode map (num_proc CPU workers) -> VAE map (one process per device) -> a run of shard caches
    load_precomputed + FoveatedVLMDataCollator                       -> training batches, no video decoding

Layout of `output_dir` after `precompute_dataset`:
    shards/<settings>/<k>-<ids>/ map caches of shard k: decoded*.arrow (frames), latents.arrow (VAE latents)
    runs/<run id>/               one run: dataset.json (the shard cache files it reads, the rows kept), captions.arrow,
                                 failures.jsonl (one {"video_path", "reason"} line per video that could not be decoded)
                                 and precompute.json (settings and counts; written last, it marks a complete run)
    precompute.json              the record of the latest run, so that `load_precomputed(output_dir)` finds it

The frames and latents are stored once, in the shard caches; a run only names them. A shard's caches are named by a
fingerprint of (VAE id or folder content, T, S, resize mode, sample_fps, PRECOMPUTE_VERSION) and of the shard's video
paths, sizes and modification times; the run id hashes those shard names and the captions. So one key decides every
reuse: a rerun reuses every finished shard, changing any setting or video starts fresh caches for what changed, and
two folders of videos never share or overwrite each other's data.
"""

import hashlib
import json
import logging
import os
import shutil
import tarfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Optional

import datasets
import numpy as np
import torch
from accelerate import PartialState
from datasets.arrow_writer import ArrowWriter

from configuration_foveated import DEFAULT_IMAGE_SIZE, DEFAULT_NUM_FRAMES
from processing_foveated import (
    FoveatedVLMVideoError,
    frames_to_pixel_values,
    frames_to_vae_pixel_values,
    load_video,
    transform_box,
)


__all__ = [
    "ANSWER_MARK",
    "COLUMNS",
    "DATA_PATHS_FILE",
    "DEFAULT_IMAGE_SIZE",
    "DEFAULT_NUM_FRAMES",
    "DEFAULT_SHARD_SIZE",
    "LLAVA_CAPTIONS_FILE",
    "LLAVA_VIDEO_DATASET",
    "LLAVA_QA_FILES",
    "LLAVA_VIDEO_DIR",
    "MAX_MOVING_BOXES",
    "MODEL_INPUT_NAMES",
    "SD_VAE_ID",
    "FoveatedVLMDataCollator",
    "download_llava_video_slice",
    "fetch_llava_archive",
    "find_videos",
    "load_caption_files",
    "target_tokens",
    "load_llava_captions",
    "load_precomputed",
    "batch_to_device",
    "model_inputs",
    "precompute_dataset",
    "run_dir_of",
    "recorded_data_paths",
    "split_train_eval",
]

logger = logging.getLogger(__name__)


SD_VAE_ID = "stabilityai/sd-vae-ft-mse"
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov")
# Bump when the decode or encode code changes what is written: old caches then stop matching.
PRECOMPUTE_VERSION = 1
# Videos per resumable unit: an interruption loses at most one shard of work per process.
DEFAULT_SHARD_SIZE = 256
# Moving-object boxes kept per frame; the hardest synthetic scene has 2 movers.
MAX_MOVING_BOXES = 4
# Pixels per VAE call on CPU (2 frames of 256 px, 8 of 128 px): the activations of many frames at once spill out of
# a CPU's caches, so there smaller calls run faster; a GPU wants all frames of a batch in one call.
CPU_PIXELS_PER_VAE_CALL = 2 * 256 * 256
# datasets' torch format makes every integer column int64 (its `dtype` default), 8x the bytes of uint8 frames, cast
# back later at a large share of a batch's loading time. `dtype=None` lets each column keep the dtype Arrow stores.
KEEP_STORED_DTYPES = {"dtype": None}

LLAVA_VIDEO_DATASET = "lmms-lab/LLaVA-Video-178K"
LLAVA_SUBSET = "0_30_s_academic_v0_1"
LLAVA_CAPTIONS_FILE = f"{LLAVA_SUBSET}/{LLAVA_SUBSET}_cap_processed.json"  # relative to the slice folder
LLAVA_VIDEO_DIR = "videos"  # relative to the slice folder
# Question files of the subset, by `--text_target` (relative to the slice folder).
LLAVA_QA_FILES = {
    "qa_open": f"{LLAVA_SUBSET}/0_30_s_academic_oe_v0_1_qa_processed.json",
    "qa_choice": f"{LLAVA_SUBSET}/0_30_s_academic_mc_v0_1_qa_processed.json",
}
# Between a question and its answer in a text target: what comes before it is read, not scored (`target_tokens`).
ANSWER_MARK = "\nAnswer: "
RUN_FILES = ("dataset.json", "captions.arrow", "failures.jsonl", "precompute.json")

COLUMNS = ("video_id", "video_path", "caption", "fps", "frame_indices", "frames", "vae_latents", "moving_boxes")


# --------------------------------------------------------------------------------------------------------------------
# Finding videos
# --------------------------------------------------------------------------------------------------------------------


def find_videos(video_dir: str | os.PathLike) -> list[Path]:
    """All videos (mp4, webm, mkv, avi, mov; any case) under `video_dir`, recursively, sorted."""
    video_dir = Path(video_dir)
    if not video_dir.is_dir():
        raise FileNotFoundError(f"video_dir {video_dir} does not exist or is not a folder")
    paths = sorted(p for p in video_dir.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file())
    if not paths:
        raise FileNotFoundError(f"video_dir {video_dir} holds no videos (looked for {', '.join(VIDEO_EXTENSIONS)})")
    return paths


def split_train_eval(
    paths: list[str | os.PathLike], eval_fraction: float, seed: int = 0
) -> tuple[list[Path], list[Path]]:
    """Split videos into (train, eval), each video by a hash of (seed, its file name) alone, so adding videos or
    moving the folder never moves an old video to the other side. Keeps the input order within each side."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    train, held_out = [], []
    for path in map(Path, paths):
        digest = hashlib.sha256(f"{seed}/{path.name}".encode()).digest()
        position = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)
        (held_out if position < eval_fraction else train).append(path)
    return train, held_out


# --------------------------------------------------------------------------------------------------------------------
# LLaVA-Video-178K, 0-30 s academic subset
# --------------------------------------------------------------------------------------------------------------------


def download_llava_video_slice(local_dir: str | os.PathLike, num_video_tars: int = 1) -> Path:
    """Download the captions and the first `num_video_tars` video archives (~5 GB each) of LLaVA-Video-178K's
    0-30 s academic subset and extract the videos. Archives already extracted are skipped.

    Returns:
        `local_dir`, holding `LLAVA_CAPTIONS_FILE` (for `load_llava_captions`) and `LLAVA_VIDEO_DIR`/ (for
        `find_videos`).
    """
    from huggingface_hub import snapshot_download

    if num_video_tars < 1:
        raise ValueError(f"num_video_tars must be >= 1, got {num_video_tars}")
    local_dir = Path(local_dir)
    tar_names = [_llava_tar_name(k) for k in range(1, num_video_tars + 1)]
    snapshot_download(
        repo_id=LLAVA_VIDEO_DATASET,
        repo_type="dataset",
        local_dir=local_dir,
        allow_patterns=[LLAVA_CAPTIONS_FILE, *LLAVA_QA_FILES.values(), *tar_names],
    )
    for tar_name in tar_names:
        _extract_tar(local_dir / tar_name, local_dir / LLAVA_VIDEO_DIR)
    return local_dir


def _llava_tar_name(index: int) -> str:
    """Video archive `index` (1-based) of the subset, relative to the slice folder."""
    return f"{LLAVA_SUBSET}/{LLAVA_SUBSET}_videos_{index}.tar.gz"


def fetch_llava_archive(local_dir: str | os.PathLike, index: int) -> Path:
    """Download the caption file and video archive `index` (1-based, ~5 GB) of LLaVA-Video-178K's 0-30 s academic
    subset, extract the archive into `LLAVA_VIDEO_DIR/archive-<index>/` and delete it: the folder of its videos.
    What is already there (the captions, an extracted archive) is not fetched again."""
    from huggingface_hub import hf_hub_download

    if index < 1:
        raise ValueError(f"LLaVA-Video archives are numbered from 1, got {index}")
    local_dir = Path(local_dir)
    folder = local_dir / LLAVA_VIDEO_DIR / f"archive-{index}"
    tar_name = _llava_tar_name(index)
    wanted = [LLAVA_CAPTIONS_FILE, *LLAVA_QA_FILES.values()]
    if not (folder / f".extracted-{Path(tar_name).name}").exists():
        wanted.append(tar_name)
    for filename in wanted:
        if not (local_dir / filename).is_file():
            hf_hub_download(LLAVA_VIDEO_DATASET, filename, repo_type="dataset", local_dir=local_dir)
    _extract_tar(local_dir / tar_name, folder)
    (local_dir / tar_name).unlink(missing_ok=True)
    return folder


def _extract_tar(tar_path: Path, destination: Path) -> None:
    # The marker is written only after a complete extraction, so an interrupted one is redone (files overwritten).
    marker = destination / f".extracted-{tar_path.name}"
    if marker.exists():
        return
    destination.mkdir(parents=True, exist_ok=True)
    logger.info("extracting %s into %s", tar_path, destination)
    with tarfile.open(tar_path) as archive:
        # The "data" filter refuses absolute paths, `..`, links leaving `destination` and device files.
        archive.extractall(destination, filter="data")
    marker.touch()


def load_caption_files(video_paths: list) -> dict[str, str]:
    """Captions of a folder's videos: the text of the file beside each one (`clip.mp4` -> `clip.txt`), stripped,
    keyed by video file stem (the `video_id` column); videos without one are left out (their caption is "")."""
    captions = {}
    for path in map(Path, video_paths):
        caption_file = path.with_suffix(".txt")
        if caption_file.is_file():
            captions[path.stem] = caption_file.read_text(encoding="utf-8").strip()
    return captions


def load_llava_captions(json_path: str | os.PathLike, with_question: bool = False) -> dict[str, str]:
    """Captions of a LLaVA-Video caption file, keyed by video file stem (the `video_id` column).

    The file is a list of {"id", "video": "relative/path.mp4", "conversations": [{"from": "human", "value": prompt},
    {"from": "gpt", "value": caption}]}; the caption is the first "gpt" turn. A stem seen twice keeps its first caption.
    `with_question` (the question files, `LLAVA_QA_FILES`): the text is the first question, without its `<image>`
    placeholder, `ANSWER_MARK` and its answer, so that only the answer is scored.
    """
    json_path = Path(json_path)
    try:
        records = json.loads(json_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{json_path} is not valid JSON: {error}") from error
    if not isinstance(records, list):
        raise ValueError(f"{json_path}: expected a list of records, got {type(records).__name__}")
    captions = {}
    for i, record in enumerate(records):
        if not isinstance(record, dict) or "video" not in record or "conversations" not in record:
            raise ValueError(
                f"{json_path}: record {i} needs the fields 'video' and 'conversations', got {record!r:.200}"
            )
        turns = record["conversations"]
        answers = [k for k, turn in enumerate(turns) if turn.get("from") == "gpt"]
        if not answers or not isinstance(turns[answers[0]].get("value"), str):
            raise ValueError(f"{json_path}: record {i} ({record['video']}) has no 'gpt' turn with a caption")
        text = turns[answers[0]]["value"].strip()
        if with_question:
            asked = [turn.get("value") for turn in turns[: answers[0]] if turn.get("from") == "human"]
            if not asked or not isinstance(asked[-1], str):
                raise ValueError(f"{json_path}: record {i} ({record['video']}) has no 'human' turn before its answer")
            text = asked[-1].replace("<image>", "").strip() + ANSWER_MARK + text
        captions.setdefault(Path(record["video"]).stem, text)
    return captions


# --------------------------------------------------------------------------------------------------------------------
# Precompute: decode map -> VAE map -> Arrow
# --------------------------------------------------------------------------------------------------------------------


def _decoded_features(num_frames: int, image_size: int) -> datasets.Features:
    return datasets.Features(
        {
            "video_path": datasets.Value("string"),
            "video_id": datasets.Value("string"),
            "fps": datasets.Value("float32"),
            "frame_indices": datasets.Sequence(datasets.Value("int32")),
            "frames": datasets.Array4D((num_frames, image_size, image_size, 3), "uint8"),
            "moving_boxes": datasets.Array3D((num_frames, MAX_MOVING_BOXES, 4), "float32"),
            "error": datasets.Value("string"),  # "" when the video decoded
        }
    )


def _read_moving_boxes(video_path: str, frame_indices: list[int], orig_size, image_size: int, resize_mode: str):
    """float32 (T, MAX_MOVING_BOXES, 4): normalised [x0, y0, x1, y1] of the boxes of what the next frame depends on
    (movers, or the cued target) at each sampled frame, from the synthetic ground-truth sidecar `<stem>.json` next to
    the video; rows of -1 where there is none."""
    boxes = np.full((len(frame_indices), MAX_MOVING_BOXES, 4), -1.0, dtype=np.float32)
    sidecar_path = Path(video_path).with_suffix(".json")
    if not sidecar_path.is_file():
        return boxes
    sidecar_frames = json.loads(sidecar_path.read_text())["frames"]
    for t, frame_index in enumerate(frame_indices):
        # Only the cued scene's objects carry a "target" flag.
        objects = sidecar_frames[frame_index]["objects"]
        moving = [obj["box"] for obj in objects if obj["moving"] or obj.get("target", False)]
        for k, box in enumerate(moving[:MAX_MOVING_BOXES]):
            box = transform_box(box, orig_size, image_size, resize_mode)
            if box[2] > box[0] and box[3] > box[1]:  # a box outside a centre crop collapses to zero area: absent
                boxes[t, k] = box
    return boxes


def _decode_one(
    video_path: str, num_frames: int, image_size: int, resize_mode: str, sample_fps: Optional[float]
) -> dict:
    T, S = num_frames, image_size
    try:
        frames, info = load_video(video_path, T, S, resize_mode=resize_mode, sample_fps=sample_fps)
    except FoveatedVLMVideoError as error:
        reason = error.reason
    else:
        try:
            moving_boxes = _read_moving_boxes(video_path, info["frame_indices"], info["orig_size"], S, resize_mode)
        except (OSError, ValueError, KeyError, IndexError, TypeError) as error:
            reason = f"sidecar {Path(video_path).with_suffix('.json').name}: {type(error).__name__}: {error}"
        else:
            return dict(
                fps=info["fps"], frame_indices=info["frame_indices"], frames=frames, moving_boxes=moving_boxes, error=""
            )
    # A failed row keeps the fixed shapes so the batch stays one Arrow table; it is filtered out at the end.
    return dict(
        fps=0.0,
        frame_indices=[],
        frames=np.zeros((T, S, S, 3), dtype=np.uint8),
        moving_boxes=np.full((T, MAX_MOVING_BOXES, 4), -1.0, dtype=np.float32),
        error=reason or "unknown decode error",  # an empty error would read as success
    )


def decode_videos(
    batch: dict, rank: Optional[int], num_frames: int, image_size: int, resize_mode: str, sample_fps: Optional[float]
) -> dict:
    """Decode map: {"video_path": [B paths]} -> one row per video, failures recorded in "error" instead of raised.
    One decord reader per video, opened and closed inside the worker that decodes it."""
    if rank is not None:
        # A forked map worker (rank set) whose parent already ran torch ops (e.g. the VAE of an earlier shard) hangs
        # in the OpenMP pool it inherited; one thread per worker avoids the pool and suits num_proc workers anyway,
        # as in torch's DataLoader workers.
        torch.set_num_threads(1)
    rows = [_decode_one(path, num_frames, image_size, resize_mode, sample_fps) for path in batch["video_path"]]
    return {
        "video_id": [Path(path).stem for path in batch["video_path"]],
        "fps": [row["fps"] for row in rows],
        "frame_indices": [row["frame_indices"] for row in rows],
        "frames": np.stack([row["frames"] for row in rows]),  # (B, T, S, S, 3)
        "moving_boxes": np.stack([row["moving_boxes"] for row in rows]),  # (B, T, MAX_MOVING_BOXES, 4)
        "error": [row["error"] for row in rows],
    }


def _vae_downsampling(vae_config) -> int:
    return 2 ** (len(vae_config["block_out_channels"]) - 1)  # one stride-2 step between consecutive blocks


def _latent_features(vae, num_frames: int, image_size: int) -> datasets.Features:
    h = image_size // _vae_downsampling(vae.config)
    shape = (num_frames, vae.config.latent_channels, h, h)
    return datasets.Features({"vae_latents": datasets.Array4D(shape, "float32")})


@torch.no_grad()
def encode_with_vae(batch: dict, vae) -> dict:
    """VAE map, a pure function of (batch, vae): `latent_dist.mean * scaling_factor` of every decoded frame of the
    batch, in one VAE call on GPU; rows whose decode failed get zeros (they are dropped later)."""
    frames = batch["frames"]  # (B, T, S, S, 3), integer tensor
    B, T, S = frames.shape[:3]
    h = S // _vae_downsampling(vae.config)
    latents = torch.zeros(B, T, vae.config.latent_channels, h, h)
    decoded = [i for i, error in enumerate(batch["error"]) if not error]
    if not decoded:
        return {"vae_latents": latents.numpy()}
    pixel_values = frames_to_vae_pixel_values(frames[decoded].to(torch.uint8))  # (b, T, 3, S, S)
    pixel_values = pixel_values.flatten(0, 1).to(vae.device, vae.dtype)  # (b, T, 3, S, S) -> (b*T, 3, S, S)
    frames_per_call = len(pixel_values) if vae.device.type == "cuda" else max(1, CPU_PIXELS_PER_VAE_CALL // (S * S))
    encoded = torch.cat(
        [vae.encode(chunk).latent_dist.mean for chunk in pixel_values.split(frames_per_call)]
    )  # (b*T, C, h, w)
    encoded = encoded.float().cpu() * vae.config.scaling_factor
    latents[decoded] = encoded.unflatten(0, (len(decoded), T))  # (b*T, C, h, w) -> (b, T, C, h, w)
    return {"vae_latents": latents.numpy()}


def _hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def _vae_identity(vae: str) -> str:
    """A Hub id stands for itself; a local folder for a hash of its files' content, so refitting a local VAE into
    the same folder invalidates the caches."""
    folder = Path(vae)
    if not folder.is_dir():
        return vae
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode())
        with open(path, "rb") as file:
            for chunk in iter(lambda: file.read(1 << 20), b""):
                digest.update(chunk)
    return f"local:{digest.hexdigest()[:16]}"


def _video_identity(path: str) -> list:
    """What a shard's key knows of a video: its absolute path, size and modification time (-1s when missing)."""
    try:
        stat = os.stat(path)
    except OSError:
        return [path, -1, -1]
    return [path, stat.st_size, stat.st_mtime_ns]


def _load_vae(vae: str, device: torch.device):
    from diffusers import AutoencoderKL

    # bf16 halves memory and time on GPU at no visible cost for a frozen encoder; CPUs run bf16 convolutions slowly.
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoencoderKL.from_pretrained(vae, torch_dtype=dtype).to(device).eval()
    model.requires_grad_(False)
    return model


def _check_image_size(vae: str, image_size: int) -> None:
    from diffusers import AutoencoderKL

    downsampling = _vae_downsampling(AutoencoderKL.load_config(vae))
    if image_size < downsampling or image_size % downsampling:
        raise ValueError(f"image_size {image_size} is not a multiple of the VAE's downsampling factor {downsampling}")


@dataclass(frozen=True)
class _PrecomputeSettings:
    num_frames: int
    image_size: int
    resize_mode: str
    sample_fps: Optional[float]
    vae: str
    batch_size: int
    num_proc: int


def _precompute_shard(paths: list[str], shard_dir: Path, settings: _PrecomputeSettings, get_vae) -> dict:
    """Decode + encode one shard through two cached maps; a finished shard is two cache hits (no decode, no VAE).

    Returns:
        {"decoded": [cache files], "latents": [cache files]}, relative to the output folder (two levels up).
    """
    shard_dir.mkdir(parents=True, exist_ok=True)
    T, S = settings.num_frames, settings.image_size
    videos = datasets.Dataset.from_dict({"video_path": paths})
    decoded = videos.map(
        decode_videos,
        batched=True,
        with_rank=True,
        batch_size=settings.batch_size,
        # datasets' default of 1000 rows per write would hold ~1.5 GB of 256 px frames in memory per worker.
        writer_batch_size=settings.batch_size,
        num_proc=settings.num_proc if settings.num_proc > 1 else None,
        fn_kwargs=dict(num_frames=T, image_size=S, resize_mode=settings.resize_mode, sample_fps=settings.sample_fps),
        features=_decoded_features(T, S),
        cache_file_name=str(shard_dir / "decoded.arrow"),
        new_fingerprint=f"{shard_dir.parent.name}-{shard_dir.name}-decoded",
        load_from_cache_file=True,
        desc=f"decode {shard_dir.name}",
    )
    latents_file = shard_dir / "latents.arrow"
    vae = None if latents_file.exists() else get_vae()  # loaded only when there is work
    # The VAE map stays in this process: CUDA cannot run in forked map workers; devices scale out as processes.
    latents = decoded.with_format("torch", columns=["frames", "error"], **KEEP_STORED_DTYPES).map(
        encode_with_vae,
        batched=True,
        batch_size=settings.batch_size,
        writer_batch_size=settings.batch_size,
        remove_columns=decoded.column_names,  # keep only vae_latents: the frames are stored once, in decoded
        fn_kwargs=dict(vae=vae),
        features=None if vae is None else _latent_features(vae, T, S),  # a cache hit reads them from the file
        cache_file_name=str(latents_file),
        new_fingerprint=f"{shard_dir.parent.name}-{shard_dir.name}-latents",
        load_from_cache_file=True,
        desc=f"VAE {shard_dir.name}",
    )
    if len(latents) != len(decoded):
        raise RuntimeError(f"{latents_file} has {len(latents)} rows for {len(decoded)} videos; delete {shard_dir}")
    output_dir = shard_dir.parents[2]

    def relative(dataset: datasets.Dataset) -> list[str]:
        return [os.path.relpath(f["filename"], output_dir) for f in dataset.cache_files]

    return {"decoded": relative(decoded), "latents": relative(latents)}


def precompute_dataset(
    video_paths: list[str | os.PathLike],
    output_dir: str | os.PathLike,
    num_frames: int = DEFAULT_NUM_FRAMES,
    image_size: int = DEFAULT_IMAGE_SIZE,
    vae: str = SD_VAE_ID,
    resize_mode: str = "crop",
    sample_fps: Optional[float] = None,
    captions: Optional[dict[str, str]] = None,
    num_proc: int = 1,
    batch_size: int = 8,
    device: Optional[str | torch.device] = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
) -> datasets.Dataset:
    """Decode T frames of every video and encode them with a frozen VAE, once, into `output_dir`.

    Videos go in shards of `shard_size`; each shard is a decode map (`num_proc` CPU workers) and a VAE map (this
    process, on `device`, default: the accelerate process's device), both cached under `output_dir/shards/`. Under
    `accelerate launch` shard k is done by process k mod num_processes; the main process then records the run in
    `output_dir/runs/<run id>/`, which names the shard caches instead of copying them. A rerun reuses every
    finished shard; a rerun with nothing changed returns the recorded run.

    Args:
        video_paths: video files; duplicates are dropped.
        output_dir: receives `shards/`, `runs/` and `precompute.json` (the latest run).
        num_frames, image_size, resize_mode, sample_fps: T, S and the sampling of `processing_foveated.load_video`.
        vae: a diffusers `AutoencoderKL` Hub id or local folder.
        captions: video_id (file stem) -> caption; missing ones are "".
        num_proc: decode workers per process.
        batch_size: videos per map batch; one VAE call encodes all `batch_size * T` frames.
        device: where the VAE runs.
        shard_size: videos per resumable unit.

    Returns:
        The run's dataset (`load_precomputed`), columns `COLUMNS`, failed videos left out.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if batch_size < 1 or num_proc < 1 or shard_size < 1:
        raise ValueError(f"batch_size, num_proc, shard_size must be >= 1, got {batch_size}, {num_proc}, {shard_size}")
    paths = sorted({os.path.abspath(p) for p in video_paths})
    if not paths:
        raise ValueError("video_paths is empty")
    output_dir = Path(output_dir)
    state = PartialState()
    settings = _PrecomputeSettings(num_frames, image_size, resize_mode, sample_fps, vae, batch_size, num_proc)

    # batch_size and num_proc change how, not what: they stay out of the fingerprints.
    what = dict(
        num_frames=num_frames, image_size=image_size, resize_mode=resize_mode, sample_fps=sample_fps, vae=vae,
        vae_identity=_vae_identity(vae), version=PRECOMPUTE_VERSION,
    )  # fmt: skip
    settings_id = _hash({key: value for key, value in what.items() if key != "vae"})
    shard_dirs = _plan_shards(paths, output_dir / "shards" / settings_id, shard_size)
    run_id = _hash([settings_id, [d.name for _, d in shard_dirs], captions or {}])
    run_dir = output_dir / "runs" / run_id
    if _is_complete_run(run_dir):
        record = json.loads((run_dir / "precompute.json").read_text())
        if state.is_main_process:
            logger.info("precompute_dataset: %s is up to date (%s)", run_dir, record["counts"])
            _write_json(output_dir / "precompute.json", record)
        state.wait_for_everyone()
        return load_precomputed(run_dir)

    _check_image_size(vae, image_size)
    get_vae = cache(lambda: _load_vae(vae, torch.device(device) if device is not None else state.device))
    for shard_paths, shard_dir in shard_dirs[state.process_index :: state.num_processes]:
        _precompute_shard(shard_paths, shard_dir, settings, get_vae)
    state.wait_for_everyone()
    if state.is_main_process:
        # Every shard is a cache hit here, those of the other processes included.
        shard_files = [_precompute_shard(paths_k, shard_dir, settings, get_vae) for paths_k, shard_dir in shard_dirs]
        _write_run(output_dir, run_id, shard_files, captions or {}, what)
    get_vae.cache_clear()  # the VAE's memory goes back before training starts
    state.wait_for_everyone()
    return load_precomputed(run_dir)


def _plan_shards(paths: list[str], settings_dir: Path, shard_size: int) -> list[tuple[list[str], Path]]:
    """(video paths, cache folder) per shard; the folder is named by the shard's videos' paths, sizes and mtimes."""
    plan = []
    for k, first in enumerate(range(0, len(paths), shard_size)):
        shard_paths = paths[first : first + shard_size]
        plan.append((shard_paths, settings_dir / f"{k:05d}-{_hash([_video_identity(p) for p in shard_paths])}"))
    return plan


def _is_complete_run(run_dir: Path) -> bool:
    """A run folder with all its files (precompute.json, written last, among them) whose shard caches all exist."""
    if not all((run_dir / name).is_file() for name in RUN_FILES):
        return False
    manifest = json.loads((run_dir / "dataset.json").read_text())
    output_dir = run_dir.parents[1]
    names = [name for shard in manifest["shards"] for name in shard["decoded"] + shard["latents"]]
    return all((output_dir / name).is_file() for name in names)


def _shard_tables(output_dir: Path, shard_files: list[dict]) -> datasets.Dataset:
    """The shard caches side by side (decoded | latents) and one after another, memory-mapped: nothing is copied."""

    def read(names: list[str]) -> datasets.Dataset:
        return datasets.concatenate_datasets([datasets.Dataset.from_file(str(output_dir / name)) for name in names])

    shards = [datasets.concatenate_datasets([read(s["decoded"]), read(s["latents"])], axis=1) for s in shard_files]
    return datasets.concatenate_datasets(shards)


def _write_run(
    output_dir: Path, run_id: str, shard_files: list[dict], captions: dict[str, str], settings: dict
) -> None:
    """Record a run: the failed rows (failures.jsonl), the captions of every row (captions.arrow), the shard files
    and the rows kept (dataset.json); precompute.json last, as the mark of a complete run."""
    dataset = _shard_tables(output_dir, shard_files)
    errors = list(dataset["error"])
    video_paths = list(dataset["video_path"])
    failures = [{"video_path": path, "reason": error} for path, error in zip(video_paths, errors) if error]
    run_dir = output_dir / "runs" / run_id
    shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted earlier attempt at the same run
    run_dir.mkdir(parents=True)
    with open(run_dir / "failures.jsonl", "w") as file:
        file.writelines(json.dumps(failure) + "\n" for failure in failures)
    caption_column = [captions.get(video_id, "") for video_id in dataset["video_id"]]
    caption_features = datasets.Features({"caption": datasets.Value("string")})
    with ArrowWriter(path=str(run_dir / "captions.arrow"), features=caption_features) as writer:
        writer.write_batch({"caption": caption_column})
        writer.finalize()
    keep = [i for i, error in enumerate(errors) if not error]
    (run_dir / "dataset.json").write_text(json.dumps({"shards": shard_files, "rows": keep}))

    counts = dict(num_in=len(errors), num_ok=len(keep), num_failed=len(failures))
    record = dict(run_id=run_id, run_dir=f"runs/{run_id}", settings=settings, counts=counts)
    _write_json(run_dir / "precompute.json", record)
    _write_json(output_dir / "precompute.json", record)
    logger.info(
        "precompute_dataset: %d in = %d ok + %d failed -> %s%s", counts["num_in"], counts["num_ok"],
        counts["num_failed"], run_dir, f" (failures listed in {run_dir / 'failures.jsonl'})" if failures else "",
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------------------------
# Training side
# --------------------------------------------------------------------------------------------------------------------


def _write_json(path: Path, value) -> None:
    """Through a temporary file: a run reading the record while another rewrites it never sees half a file."""
    temporary_path = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    temporary_path.write_text(json.dumps(value, indent=1))
    os.replace(temporary_path, path)


def _run_dir(path: str | os.PathLike) -> Path:
    """The run folder of `path`: `path` itself when it is one, else the latest run recorded in `path/precompute.json`
    (a `precompute_dataset` output folder)."""
    path = Path(path)
    if (path / "dataset.json").is_file():
        return path
    record_path = path / "precompute.json"
    if not record_path.is_file():
        raise FileNotFoundError(f"{path} holds no precomputed dataset; run foveated_vlm/precompute.py first")
    return path / json.loads(record_path.read_text())["run_dir"]


def load_precomputed(path: str | os.PathLike) -> datasets.Dataset:
    """The precomputed clips at `path`, formatted as torch tensors in the dtypes stored: Arrow arrays become tensors
    directly (reading Array4D columns as Python lists is far slower), frames stay uint8.

    `path` is an output folder of `precompute_dataset` (its latest run), one of its run folders (read from the shard
    caches the run names), or a `Dataset.save_to_disk` folder with the same columns (e.g. a split shared on its own).
    """
    path = Path(path)
    if (path / "state.json").is_file():
        dataset = datasets.load_from_disk(str(path))
        missing = set(COLUMNS) - set(dataset.column_names)
        if missing:
            raise ValueError(f"{path} lacks the columns {sorted(missing)}; was it written by precompute_dataset?")
        return dataset.with_format("torch", **KEEP_STORED_DTYPES)
    run_dir = _run_dir(path)
    if not _is_complete_run(run_dir):
        raise FileNotFoundError(f"{run_dir} is not a complete precompute run (or its shard caches were deleted)")
    manifest = json.loads((run_dir / "dataset.json").read_text())
    dataset = _shard_tables(run_dir.parents[1], manifest["shards"])
    captions = datasets.Dataset.from_file(str(run_dir / "captions.arrow"))
    dataset = datasets.concatenate_datasets([dataset, captions], axis=1).select_columns(list(COLUMNS))
    # In memory: an index list, no write next to the shard caches.
    dataset = dataset.select(manifest["rows"], keep_in_memory=True)
    return dataset.with_format("torch", **KEEP_STORED_DTYPES)


# Written by the training script next to the model: {"eval_dataset": run folder, "train_dataset": run folder or null,
# "vae": folder or Hub id, "use_captions", "description"}; the report and the analyses read their defaults from it.
DATA_PATHS_FILE = "data_paths.json"


def recorded_data_paths(run_dir: str | os.PathLike) -> dict:
    """What a run recorded in DATA_PATHS_FILE about its data; {} where there is no such file (a checkpoint folder, a
    Hub id, a run from before the file)."""
    path = Path(run_dir) / DATA_PATHS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def run_dir_of(dataset: datasets.Dataset) -> Path:
    """The run folder a `load_precomputed` dataset was read from: the one holding its captions file."""
    files = {Path(f["filename"]) for f in dataset.cache_files}
    (run_dir,) = {path.parent for path in files if path.name == "captions.arrow"}
    return run_dir


# Batch columns the model's forward takes; the rest (moving_boxes, frames, ...) are for metrics and figures only.
MODEL_INPUT_NAMES = ("pixel_values", "vae_latents", "input_ids", "attention_mask", "target_ids", "target_labels")


def model_inputs(batch: dict, model=None) -> dict[str, torch.Tensor]:
    """The model's forward arguments from a collated batch: its model columns, uint8 `frames` normalised into
    `pixel_values` where the collator left them (`FoveatedVLMDataCollator(normalize_frames=False)`) on whatever device
    they are, and what the model's readers take from the batch (`reader_kwargs`: a probed reader's ground truth,
    foveated_vlm/probes.py; the design's readers take nothing)."""
    inputs = {name: batch[name] for name in MODEL_INPUT_NAMES if name in batch}
    if "pixel_values" not in inputs and "frames" in batch:
        inputs["pixel_values"] = frames_to_pixel_values(batch["frames"])
    reader_kwargs = {}
    for reader in (getattr(model, "coarse_reader", None), getattr(model, "fine_reader", None)):
        batch_inputs = getattr(reader, "batch_inputs", None)  # asked of the reader, not imported
        if batch_inputs is not None:
            reader_kwargs.update(batch_inputs(batch))
    return {**inputs, "reader_kwargs": reader_kwargs} if reader_kwargs else inputs


def batch_to_device(batch: dict, device) -> dict:
    """A collated batch with its tensors on `device` (its other values, e.g. caption strings, as they are)."""
    return {name: value.to(device) if torch.is_tensor(value) else value for name, value in batch.items()}


@dataclass
class FoveatedVLMDataCollator:
    """Rows of `load_precomputed` -> a batch of model inputs.

    Args:
        tokenizer: tokenizes the captions; None leaves text out.
        max_text_length: captions are truncated to this many tokens.
        normalize_frames: True returns `pixel_values`; False returns the uint8 `frames` instead, a quarter of the
            bytes, for the trainer to normalise on the accelerator (`model_inputs`): the loader's main cost is this
            conversion.
        caption_as_target: the caption is text as a target, read after the frames (`target_ids`, `target_labels`),
            instead of text prepended to them (Phase 2's `input_ids`).

    Returns:
        pixel_values: float32 (B, T, 3, S, S), ImageNet-normalised (or frames: uint8 (B, T, S, S, 3)).
        vae_latents: float32 (B, T, C, h, w), the targets.
        moving_boxes: float32 (B, T, MAX_MOVING_BOXES, 4), normalised boxes, rows of -1 where absent.
        input_ids, attention_mask: int64 (B, L), the captions right-padded, when `tokenizer` is set.
        target_ids, target_labels: int64 (B, L) instead, with `caption_as_target`: each caption and the tokenizer's
            end-of-text token, right-padded; the labels hold -100 on the padding.
    """

    tokenizer: Optional[Any] = None
    max_text_length: int = 256
    normalize_frames: bool = True
    caption_as_target: bool = False

    def __post_init__(self):
        if self.caption_as_target and self.tokenizer is None:
            raise ValueError("caption_as_target needs a tokenizer")

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        # uint8 from `load_precomputed`; rows in another integer dtype (datasets' default torch format) are cast.
        frames = torch.stack([torch.as_tensor(row["frames"]) for row in rows]).to(torch.uint8)  # (B, T, S, S, 3)
        batch = {
            "pixel_values" if self.normalize_frames else "frames": (
                frames_to_pixel_values(frames) if self.normalize_frames else frames
            ),
            "vae_latents": torch.stack([torch.as_tensor(row["vae_latents"], dtype=torch.float32) for row in rows]),
            "moving_boxes": torch.stack([torch.as_tensor(row["moving_boxes"], dtype=torch.float32) for row in rows]),
        }
        if self.caption_as_target:
            captions = [row["caption"] for row in rows]
            batch["target_ids"], batch["target_labels"] = target_tokens(self.tokenizer, captions, self.max_text_length)
        elif self.tokenizer is not None:
            text = self.tokenizer(
                [row["caption"] for row in rows], padding=True, truncation=True, max_length=self.max_text_length, return_tensors="pt"
            )
            batch["input_ids"], batch["attention_mask"] = text["input_ids"], text["attention_mask"]
        return batch


def target_tokens(tokenizer, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Texts as targets: (target_ids, target_labels), int64 (B, L). Each text's tokens (at most `max_length` - 1)
    and the end-of-text token, so that a model learns where to stop; right-padded, with labels -100 there. A text
    with a question (`question ANSWER_MARK answer`) is read whole and scored on the answer and end-of-text only."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no eos_token: text as a target needs one")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    parts = [text.partition(ANSWER_MARK) for text in texts]  # (question, mark, answer); a caption is all answer
    read = tokenizer([question + mark if mark else "" for question, mark, _ in parts], add_special_tokens=False)
    scored = tokenizer([answer if mark else question for question, mark, answer in parts], add_special_tokens=False)
    sequences = []  # (ids, how many leading ones are read, not scored)
    for read_ids, scored_ids in zip(read["input_ids"], scored["input_ids"]):
        ids = (read_ids + scored_ids)[: max_length - 1] + [eos]
        sequences.append((ids, min(len(read_ids), len(ids) - 1)))
    length = max(len(ids) for ids, _ in sequences)
    target_ids = torch.full((len(sequences), length), pad, dtype=torch.long)
    target_labels = torch.full((len(sequences), length), -100, dtype=torch.long)
    for i, (ids, num_read) in enumerate(sequences):
        target_ids[i, : len(ids)] = torch.tensor(ids)
        target_labels[i, num_read : len(ids)] = torch.tensor(ids[num_read:])
    return target_ids, target_labels
