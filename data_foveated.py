"""Training data for the foveated video model: videos are decoded and VAE-encoded ONCE into an Arrow dataset.

    find_videos / download_llava_video_slice + load_llava_captions   -> video paths (+ captions)
    precompute_dataset: decode map (num_proc CPU workers) -> VAE map (one process per device) -> output_dir/dataset
    load_precomputed + FoveatedVLMDataCollator                       -> training batches, no video decoding

Layout of `output_dir` after `precompute_dataset`:
    dataset/                     the final Arrow dataset (`datasets.load_from_disk`), failed videos left out
    failures.jsonl               one {"video_path", "reason"} line per video that could not be decoded
    precompute.json              settings, run fingerprint and counts of the run that wrote dataset/
    shards/<settings>/<k>-<ids>/ map caches of shard k: decoded*.arrow (frames), latents.arrow (VAE latents)

A shard's caches are named by a fingerprint of (VAE id or folder content, T, S, resize mode, sample_fps,
PRECOMPUTE_VERSION) and of the shard's video paths and sizes, so a rerun reuses every finished shard, and changing
any setting or video starts fresh caches for what changed.
"""

import hashlib
import json
import logging
import math
import os
import shutil
import tarfile
import time
from collections import Counter
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Optional

import datasets
import numpy as np
import torch
from accelerate import PartialState

from processing_foveated import (
    FoveatedVLMVideoError,
    frames_to_pixel_values,
    frames_to_vae_pixel_values,
    load_video,
    transform_box,
)


__all__ = [
    "COLUMNS",
    "DEFAULT_SHARD_SIZE",
    "DEFAULT_VAE",
    "LLAVA_CAPTIONS_FILE",
    "LLAVA_VIDEO_DIR",
    "MAX_MOVING_BOXES",
    "VAE_ENCODE_COUNTS",
    "FoveatedVLMDataCollator",
    "download_llava_video_slice",
    "find_videos",
    "load_llava_captions",
    "load_precomputed",
    "make_tiny_vae",
    "precompute_dataset",
    "split_train_eval",
]

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov")
DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"
# Bump when the decode or encode code changes what is written: old caches then stop matching.
PRECOMPUTE_VERSION = 1
# Videos per resumable unit: an interruption loses at most one shard of work per process.
DEFAULT_SHARD_SIZE = 256
# Moving-object boxes kept per frame; the hardest synthetic scene has 2 movers.
MAX_MOVING_BOXES = 4
# Pixels per VAE call on CPU (2 frames of 256 px, 8 of 128 px): the fastest chunk measured, see encode_with_vae.
CPU_PIXELS_PER_VAE_CALL = 2 * 256 * 256
# VAE work done in this process; a cached run adds nothing here, which is how tests and logs see a cache hit.
VAE_ENCODE_COUNTS: Counter = Counter()  # keys "calls", "frames"
# datasets' torch format makes every integer column int64 (its `dtype` default), so uint8 frames came out 8x larger
# and were cast back: 9/10 of a batch's loading time. `dtype=None` lets each column keep the dtype Arrow stores.
KEEP_STORED_DTYPES = {"dtype": None}

LLAVA_REPO_ID = "lmms-lab/LLaVA-Video-178K"
LLAVA_SUBSET = "0_30_s_academic_v0_1"
LLAVA_CAPTIONS_FILE = f"{LLAVA_SUBSET}/{LLAVA_SUBSET}_cap_processed.json"  # relative to the slice folder
LLAVA_VIDEO_DIR = "videos"  # relative to the slice folder

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
    tar_names = [f"{LLAVA_SUBSET}/{LLAVA_SUBSET}_videos_{k}.tar.gz" for k in range(1, num_video_tars + 1)]
    snapshot_download(
        repo_id=LLAVA_REPO_ID,
        repo_type="dataset",
        local_dir=local_dir,
        allow_patterns=[LLAVA_CAPTIONS_FILE, *tar_names],
    )
    for tar_name in tar_names:
        _extract_tar(local_dir / tar_name, local_dir / LLAVA_VIDEO_DIR)
    return local_dir


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


def load_llava_captions(json_path: str | os.PathLike) -> dict[str, str]:
    """Captions of a LLaVA-Video caption file, keyed by video file stem (the `video_id` column).

    The file is a list of {"id", "video": "relative/path.mp4", "conversations": [{"from": "human", "value": prompt},
    {"from": "gpt", "value": caption}]}; the caption is the first "gpt" turn. A stem seen twice keeps its first caption.
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
        answers = [turn.get("value") for turn in record["conversations"] if turn.get("from") == "gpt"]
        if not answers or not isinstance(answers[0], str):
            raise ValueError(f"{json_path}: record {i} ({record['video']}) has no 'gpt' turn with a caption")
        captions.setdefault(Path(record["video"]).stem, answers[0].strip())
    return captions


# --------------------------------------------------------------------------------------------------------------------
# A tiny VAE with the SD VAE's geometry, for the offline default
# --------------------------------------------------------------------------------------------------------------------

# Fitting videos use seeds from here on: disjoint from synthetic_videos' train (seed + i) and eval (seed + 1e6 + i).
TINY_VAE_SEED_OFFSET = 2_000_000
TINY_VAE_HELD_OUT_SEED_OFFSET = 2_500_000
TINY_VAE_VERSION = 2
TINY_VAE_WIDTH = 16  # channels at every level; equal widths keep every shortcut an identity


def make_tiny_vae(
    output_dir: str | os.PathLike, image_size: int = 128, num_train_frames: int = 512, steps: int = 300, seed: int = 0
) -> str:
    """A small `diffusers.AutoencoderKL` with the SD VAE's geometry (8x downsampling, 4 latent channels, unit-std
    scaled latents), started as an 8x average-pool autoencoder and fitted briefly to synthetic frames; saved to
    `output_dir` and reused when that folder already holds one made with the same settings.

    Returns:
        `output_dir` as a string, loadable with `AutoencoderKL.from_pretrained`.
    """
    from diffusers import AutoencoderKL

    from synthetic_videos import DIFFICULTIES, generate_video

    output_dir = Path(output_dir)
    settings = dict(
        image_size=image_size, num_train_frames=num_train_frames, steps=steps, seed=seed, version=TINY_VAE_VERSION
    )
    settings_path = output_dir / "tiny_vae_settings.json"
    if settings_path.is_file() and json.loads(settings_path.read_text()) == settings:
        return str(output_dir)

    start = time.perf_counter()
    torch.manual_seed(seed)
    difficulties = sorted(DIFFICULTIES)
    frames_per_video = 8

    def synthetic_frames(first_seed: int, num_frames: int) -> torch.Tensor:
        num_videos = math.ceil(num_frames / frames_per_video)
        videos = [
            generate_video(first_seed + i, difficulties[i % len(difficulties)], image_size, frames_per_video)[0]
            for i in range(num_videos)
        ]
        return frames_to_vae_pixel_values(np.concatenate(videos)[:num_frames])  # (N, 3, S, S) in [-1, 1]

    train_pixels = synthetic_frames(TINY_VAE_SEED_OFFSET + seed * num_train_frames, num_train_frames)
    # 32 frames of 4 videos: full-resolution passes dominate the time of this function after the fit itself.
    held_out_pixels = synthetic_frames(TINY_VAE_HELD_OUT_SEED_OFFSET + seed * 32, 32)

    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,  # 3 stride-2 steps: 8x, as the SD VAE
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(TINY_VAE_WIDTH,) * 4,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=1,  # see _init_as_pooling_autoencoder
        sample_size=image_size,
        mid_block_add_attention=False,  # attention adds nothing on these scenes and costs time at this size
    )
    _init_as_pooling_autoencoder(vae)
    initial_psnr = _reconstruction_psnr(vae, held_out_pixels)
    _fit_tiny_vae(vae, train_pixels, steps, seed)

    with torch.no_grad():
        latents = vae.encode(train_pixels[:64]).latent_dist.mean
    # The SD convention: scaled latents have about unit std, which the prediction head assumes.
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    mean_colour = held_out_pixels.mean(dim=(2, 3), keepdim=True).expand_as(held_out_pixels)
    print(
        f"make_tiny_vae: held-out PSNR {_reconstruction_psnr(vae, held_out_pixels):.1f} dB after {steps} steps "
        f"({initial_psnr:.1f} dB at the average-pool start; each frame's mean colour: "
        f"{_psnr(mean_colour, held_out_pixels):.1f} dB), scaling_factor {vae.config.scaling_factor:.2f}, "
        f"{time.perf_counter() - start:.0f}s -> {output_dir}"
    )
    vae.save_pretrained(output_dir)
    settings_path.write_text(json.dumps(settings))  # last: its presence marks a complete folder
    return str(output_dir)


@torch.no_grad()
def _init_as_pooling_autoencoder(vae) -> None:
    """Make `vae` an exact autoencoder before any training: the encoder averages RGB over 8x8 cells into latent
    channels 0-2, the decoder repeats each cell (nearest-neighbour upsampling).

    From random weights a small AutoencoderKL needs thousands of steps to beat a frame's mean colour; from here a
    few hundred steps improve on a reconstruction that is already recognisable. Each ResNet block starts as the
    identity (its last conv zeroed). The output GroupNorms (one group) would erase each image's colour level, so
    every feature map carries the channels [+rgb, -rgb, +A, -A, 0...]: the group mean is 0 and the large anchor A
    fixes its std, so those norms become fixed scalings (exact to E[rgb^2] / A^2 ~ 3 %).
    """
    from diffusers.models.resnet import ResnetBlock2D

    anchor, silu_offset = 10.0, 10.0  # SiLU(x + 10) = x + 10 to 5e-4: the norm's SiLU passes the signal linearly
    C = vae.config.block_out_channels[0]
    L = vae.config.latent_channels
    group_std = math.sqrt(2 * anchor**2 / C)

    def set_conv(conv, taps: list[tuple[int, int, float]], channel_map: list[tuple[int, int, float]]) -> None:
        conv.weight.zero_()
        conv.bias.zero_()
        for out_channel, in_channel, sign in channel_map:
            for y, x, weight in taps:
                conv.weight[out_channel, in_channel, y, x] = sign * weight

    def centre(conv) -> list[tuple[int, int, float]]:
        return [(conv.kernel_size[0] // 2, conv.kernel_size[1] // 2, 1.0)]

    identity = [(c, c, 1.0) for c in range(C)]
    rgb_and_negated = [(c, c, 1.0) for c in range(3)] + [(3 + c, c, -1.0) for c in range(3)]
    for module in vae.modules():
        if isinstance(module, ResnetBlock2D):
            module.conv2.weight.zero_()
            module.conv2.bias.zero_()
    for conv_in in (vae.encoder.conv_in, vae.decoder.conv_in):
        set_conv(conv_in, centre(conv_in), rgb_and_negated)
        conv_in.bias[6], conv_in.bias[7] = anchor, -anchor
    # diffusers pads stride-2 convs on the right and bottom only: taps (0..1, 0..1) average each aligned 2x2 cell.
    average_2x2 = [(y, x, 0.25) for y in (0, 1) for x in (0, 1)]
    for block in vae.encoder.down_blocks:
        for downsampler in block.downsamplers or []:
            set_conv(downsampler.conv, average_2x2, identity)
    for block in vae.decoder.up_blocks:
        for upsampler in block.upsamplers or []:  # nearest 2x, then this conv
            set_conv(upsampler.conv, centre(upsampler.conv), identity)
    for norm in (vae.encoder.conv_norm_out, vae.decoder.conv_norm_out):
        norm.weight.zero_()
        norm.bias.zero_()
        norm.weight[:3], norm.bias[:3] = group_std, silu_offset
    for conv_out in (vae.encoder.conv_out, vae.decoder.conv_out):  # encoder: L means then L log-variances
        set_conv(conv_out, centre(conv_out), [(c, c, 1.0) for c in range(3)])
        conv_out.bias[:3] = -silu_offset
    vae.encoder.conv_out.bias[L:] = -10.0  # nearly deterministic posterior to start with
    set_conv(vae.quant_conv, centre(vae.quant_conv), [(c, c, 1.0) for c in range(2 * L)])
    set_conv(vae.post_quant_conv, centre(vae.post_quant_conv), [(c, c, 1.0) for c in range(L)])


def _fit_tiny_vae(vae, pixels: torch.Tensor, steps: int, seed: int) -> None:
    """MSE + a small KL on random 64 px crops on the 8 px latent grid (a fully convolutional VAE sees the same
    statistics as on whole frames, at a quarter of the cost). A low learning rate: the anchor channels amplify
    every weight that reads them, and a larger step first undoes the initialisation."""
    N, _, S, _ = pixels.shape
    crop, batch_size, kl_weight = min(64, S), 8, 1e-4
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-4, weight_decay=0.0)
    vae.train()
    for _ in range(steps):
        index = torch.randint(N, (batch_size,), generator=generator)
        top, left = (8 * torch.randint((S - crop) // 8 + 1, (2,), generator=generator)).tolist()
        batch = pixels[index, :, top : top + crop, left : left + crop]  # (B, 3, crop, crop)
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        kl_per_element = posterior.kl().mean() / posterior.mean[0].numel()
        loss = torch.nn.functional.mse_loss(reconstruction, batch) + kl_weight * kl_per_element
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    vae.eval()


@torch.no_grad()
def _reconstruction_psnr(vae, pixels: torch.Tensor) -> float:
    reconstruction = vae.decode(vae.encode(pixels).latent_dist.mean).sample.clamp(-1, 1)
    return _psnr(reconstruction, pixels)


def _psnr(prediction: torch.Tensor, target: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1]."""
    mse = ((prediction - target) / 2).pow(2).mean()
    return float(10 * torch.log10(1.0 / mse))


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
    """float32 (T, MAX_MOVING_BOXES, 4): normalised [x0, y0, x1, y1] of the moving objects at each sampled frame,
    from the synthetic ground-truth sidecar `<stem>.json` next to the video; rows of -1 where there is none."""
    boxes = np.full((len(frame_indices), MAX_MOVING_BOXES, 4), -1.0, dtype=np.float32)
    sidecar_path = Path(video_path).with_suffix(".json")
    if not sidecar_path.is_file():
        return boxes
    sidecar_frames = json.loads(sidecar_path.read_text())["frames"]
    for t, frame_index in enumerate(frame_indices):
        moving = [obj["box"] for obj in sidecar_frames[frame_index]["objects"] if obj["moving"]]
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


def _vae_downsampling(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)  # one stride-2 step between consecutive blocks


def _latent_features(vae, num_frames: int, image_size: int) -> datasets.Features:
    downsampling = _vae_downsampling(vae)
    if image_size % downsampling:
        raise ValueError(f"image_size {image_size} is not a multiple of the VAE's downsampling factor {downsampling}")
    h = image_size // downsampling
    shape = (num_frames, vae.config.latent_channels, h, h)
    return datasets.Features({"vae_latents": datasets.Array4D(shape, "float32")})


@torch.no_grad()
def encode_with_vae(batch: dict, vae) -> dict:
    """VAE map, a pure function of (batch, vae): `latent_dist.mean * scaling_factor` of every decoded frame of the
    batch, in one VAE call on GPU; rows whose decode failed get zeros (they are dropped later)."""
    frames = batch["frames"]  # (B, T, S, S, 3), integer tensor
    B, T, S = frames.shape[:3]
    h = S // _vae_downsampling(vae)
    latents = torch.zeros(B, T, vae.config.latent_channels, h, h)
    decoded = [i for i, error in enumerate(batch["error"]) if not error]
    if not decoded:
        return {"vae_latents": latents.numpy()}
    pixel_values = frames_to_vae_pixel_values(frames[decoded].to(torch.uint8))  # (b, T, 3, S, S)
    pixel_values = pixel_values.flatten(0, 1).to(vae.device, vae.dtype)  # (b, T, 3, S, S) -> (b*T, 3, S, S)
    # On CPU the activations of many frames at once spill out of the caches: 64 frames of 256 px in one call took
    # 2.7x as long as 2 at a time (tiny VAE, 2 cores). A GPU wants them all at once.
    frames_per_call = len(pixel_values) if vae.device.type == "cuda" else max(1, CPU_PIXELS_PER_VAE_CALL // (S * S))
    encoded = torch.cat(
        [vae.encode(chunk).latent_dist.mean for chunk in pixel_values.split(frames_per_call)]
    )  # (b*T, C, h, w)
    encoded = encoded.float().cpu() * vae.config.scaling_factor
    latents[decoded] = encoded.unflatten(0, (len(decoded), T))  # (b*T, C, h, w) -> (b, T, C, h, w)
    VAE_ENCODE_COUNTS["calls"] += 1
    VAE_ENCODE_COUNTS["frames"] += len(decoded) * T
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


def _load_vae(vae: str, device: torch.device):
    from diffusers import AutoencoderKL

    # bf16 halves memory and time on GPU at no visible cost for a frozen encoder; CPUs run bf16 convolutions slowly.
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoencoderKL.from_pretrained(vae, torch_dtype=dtype).to(device).eval()
    model.requires_grad_(False)
    return model


@dataclass(frozen=True)
class _PrecomputeSettings:
    num_frames: int
    image_size: int
    resize_mode: str
    sample_fps: Optional[float]
    vae: str
    batch_size: int
    num_proc: int


def _precompute_shard(paths: list[str], shard_dir: Path, settings: _PrecomputeSettings, get_vae) -> datasets.Dataset:
    """Decode + encode one shard through two cached maps; a finished shard is two cache hits (no decode, no VAE)."""
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
    return datasets.concatenate_datasets([decoded, latents.with_format(None)], axis=1)


def precompute_dataset(
    video_paths: list[str | os.PathLike],
    output_dir: str | os.PathLike,
    num_frames: int = 8,
    image_size: int = 256,
    vae: str = DEFAULT_VAE,
    resize_mode: str = "crop",
    sample_fps: Optional[float] = None,
    captions: Optional[dict[str, str]] = None,
    num_proc: int = 1,
    batch_size: int = 8,
    device: Optional[str | torch.device] = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
) -> datasets.Dataset:
    """Decode T frames of every video and encode them with a frozen VAE, once, into `output_dir/dataset`.

    Videos go in shards of `shard_size`; each shard is a decode map (`num_proc` CPU workers) and a VAE map (this
    process, on `device`, default: the accelerate process's device), both cached under `output_dir/shards/`. Under
    `accelerate launch` shard k is done by process k mod num_processes; the main process then concatenates the shards
    into one dataset. A rerun reuses every finished shard; a rerun with nothing changed returns the saved dataset.

    Args:
        video_paths: video files; duplicates are dropped.
        output_dir: receives `dataset/`, `failures.jsonl`, `precompute.json` and the shard caches.
        num_frames, image_size, resize_mode, sample_fps: T, S and the sampling of `processing_foveated.load_video`.
        vae: a diffusers `AutoencoderKL` Hub id or local folder.
        captions: video_id (file stem) -> caption; missing ones are "".
        num_proc: decode workers per process.
        batch_size: videos per map batch; one VAE call encodes all `batch_size * T` frames.
        device: where the VAE runs.
        shard_size: videos per resumable unit.

    Returns:
        The saved dataset, columns `COLUMNS`, failed videos left out.
    """
    if num_frames < 1 or image_size < 8 or image_size % 8:
        raise ValueError(f"need num_frames >= 1 and image_size a multiple of 8, got {num_frames} and {image_size}")
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
    shard_dirs = []
    for k, first in enumerate(range(0, len(paths), shard_size)):
        shard_paths = paths[first : first + shard_size]
        sizes = [os.path.getsize(p) if os.path.isfile(p) else -1 for p in shard_paths]
        shard_dirs.append((shard_paths, output_dir / "shards" / settings_id / f"{k:05d}-{_hash([shard_paths, sizes])}"))
    run_id = _hash([settings_id, [str(d) for _, d in shard_dirs], captions or {}])
    dataset_dir, record_path = output_dir / "dataset", output_dir / "precompute.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    if dataset_dir.is_dir() and record.get("run_id") == run_id:
        if state.is_main_process:
            print(f"precompute_dataset: {dataset_dir} is up to date ({record['counts']})")
        return datasets.load_from_disk(str(dataset_dir))

    get_vae = cache(lambda: _load_vae(vae, torch.device(device) if device is not None else state.device))
    for shard_paths, shard_dir in shard_dirs[state.process_index :: state.num_processes]:
        _precompute_shard(shard_paths, shard_dir, settings, get_vae)
    state.wait_for_everyone()
    if state.is_main_process:
        # Every shard is a cache hit here, those of the other processes included.
        shards = [_precompute_shard(shard_paths, shard_dir, settings, get_vae) for shard_paths, shard_dir in shard_dirs]
        _save_final_dataset(datasets.concatenate_datasets(shards), output_dir, captions or {}, run_id, what)
    state.wait_for_everyone()
    return datasets.load_from_disk(str(dataset_dir))


def _save_final_dataset(
    dataset: datasets.Dataset, output_dir: Path, captions: dict[str, str], run_id: str, settings: dict
) -> None:
    """Drop failed rows (listed in failures.jsonl), add captions, save to output_dir/dataset through a temporary
    folder so that an interrupted save never leaves a half-written dataset."""
    errors = list(dataset["error"])
    video_paths = list(dataset["video_path"])
    failures = [{"video_path": path, "reason": error} for path, error in zip(video_paths, errors) if error]
    with open(output_dir / "failures.jsonl", "w") as file:
        file.writelines(json.dumps(failure) + "\n" for failure in failures)

    caption_column = [captions.get(video_id, "") for video_id in dataset["video_id"]]
    dataset = dataset.add_column("caption", caption_column, feature=datasets.Value("string"))
    dataset = dataset.select_columns(list(COLUMNS))
    # select keeps an index mapping (no copy); save_to_disk then writes only the selected rows.
    dataset = dataset.select([i for i, error in enumerate(errors) if not error])

    dataset_dir, temporary_dir = output_dir / "dataset", output_dir / "dataset.tmp"
    shutil.rmtree(temporary_dir, ignore_errors=True)
    # datasets writes no shard at all for zero rows, and then cannot load the folder back.
    dataset.save_to_disk(str(temporary_dir), num_shards=1 if len(dataset) == 0 else None)
    shutil.rmtree(dataset_dir, ignore_errors=True)
    os.replace(temporary_dir, dataset_dir)

    counts = dict(num_in=len(errors), num_ok=len(dataset), num_failed=len(failures))
    record = dict(run_id=run_id, settings=settings, counts=counts)
    (output_dir / "precompute.json").write_text(json.dumps(record, indent=1))
    print(
        f"precompute_dataset: {counts['num_in']} in = {counts['num_ok']} ok + {counts['num_failed']} failed "
        f"-> {dataset_dir}" + (f" (failures listed in {output_dir / 'failures.jsonl'})" if failures else "")
    )


# --------------------------------------------------------------------------------------------------------------------
# Training side
# --------------------------------------------------------------------------------------------------------------------


def load_precomputed(path: str | os.PathLike) -> datasets.Dataset:
    """The precomputed dataset (`output_dir` or `output_dir/dataset`), formatted as torch tensors in the dtypes
    stored: Arrow arrays become tensors directly (reading Array4D columns as Python lists is ~30x slower), frames
    stay uint8."""
    path = Path(path)
    if (path / "dataset").is_dir():
        path = path / "dataset"
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"{path} holds no saved dataset; run precompute_latents.py first")
    dataset = datasets.load_from_disk(str(path))
    missing = set(COLUMNS) - set(dataset.column_names)
    if missing:
        raise ValueError(f"{path} lacks the columns {sorted(missing)}; was it written by precompute_dataset?")
    return dataset.with_format("torch", **KEEP_STORED_DTYPES)


@dataclass
class FoveatedVLMDataCollator:
    """Rows of `load_precomputed` -> a batch of model inputs.

    Args:
        tokenizer: tokenizes the captions (Phase 2); None leaves text out.
        max_text_length: captions are truncated to this many tokens.
        normalize_frames: True returns `pixel_values`; False returns the uint8 `frames` instead, a quarter of the
            bytes, for the trainer to normalise on the accelerator (`model_inputs`): the loader's main cost is this
            conversion.

    Returns:
        pixel_values: float32 (B, T, 3, S, S), ImageNet-normalised (or frames: uint8 (B, T, S, S, 3)).
        vae_latents: float32 (B, T, C, h, w), the targets.
        moving_boxes: float32 (B, T, MAX_MOVING_BOXES, 4), normalised boxes, rows of -1 where absent.
        input_ids, attention_mask: int64 (B, L), the captions right-padded, only when `tokenizer` is set.
    """

    tokenizer: Optional[Any] = None
    max_text_length: int = 256
    normalize_frames: bool = True

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
        if self.tokenizer is not None:
            text = self.tokenizer(
                [row["caption"] for row in rows],
                padding=True,
                truncation=True,
                max_length=self.max_text_length,
                return_tensors="pt",
            )
            batch["input_ids"], batch["attention_mask"] = text["input_ids"], text["attention_mask"]
        return batch
