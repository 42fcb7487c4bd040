"""Tiny data and run folders shared by the tests, built in seconds: real mp4 files (synthetic videos with sidecars,
and broken files) for the data, precompute and train tests; clips with the precomputed columns, in memory for the
trainer and train tests; for the report and analyses tests a held-out split with those columns, a VAE, and a finished
run (final model, trainer_state.json, data_paths.json)."""

import json
from pathlib import Path

import numpy as np
import torch
from datasets import Array3D, Array4D, Dataset, Features, Sequence, Value

from foveated_vlm.data import DATA_PATHS_FILE
from foveated_vlm.synthetic import generate_split
from modeling_foveated import FoveatedVLMModel
from tiny import tiny_config, trainer_state

T, S, LATENT, NUM_CLIPS = 4, 64, 8, 5  # tiny_config(): 4 frames of 64 px, latents 4 x 8 x 8
NUM_GOOD = 6  # synthetic videos in video_folder()/train
BROKEN = ("empty.mp4", "random_bytes.mp4", "truncated.mp4", "text_renamed.mp4")  # in video_folder()/broken


def video_folder(root: Path) -> Path:
    """`root` with NUM_GOOD synthetic videos of S px and their sidecars in train/, and the BROKEN files in broken/."""
    # "hard" scenes have 2 movers: the boxes test sees filled and absent rows.
    generate_split(root, num_train=NUM_GOOD, num_eval=0, difficulty="hard", size=S, num_video_frames=12, fps=8.0)
    good_bytes = (root / "train" / "video_000000.mp4").read_bytes()
    broken_dir = root / "broken"
    broken_dir.mkdir()
    (broken_dir / "empty.mp4").write_bytes(b"")
    (broken_dir / "random_bytes.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    (broken_dir / "truncated.mp4").write_bytes(good_bytes[: len(good_bytes) // 2])
    (broken_dir / "text_renamed.mp4").write_text("not a video, just text\n")
    return root


def eval_dataset(path, seed: int = 0, spread: float = 0.0) -> None:
    """A saved eval split with the precomputed columns; one box moves, clip 1 has none. `spread` moves clip i's box
    down by i * spread, so that where the box is differs between clips."""
    rng = np.random.default_rng(seed)
    boxes = np.full((NUM_CLIPS, T, 4, 4), -1.0, dtype=np.float32)
    for t in range(T):
        boxes[:, t, 0] = [0.1 + 0.15 * t, 0.2, 0.35 + 0.15 * t, 0.45]
    boxes[:, :, 0, 1::2] += spread * np.arange(NUM_CLIPS)[:, None, None]
    boxes[1] = -1.0
    features = Features(
        {
            "video_id": Value("string"),
            "video_path": Value("string"),
            "caption": Value("string"),
            "fps": Value("float32"),
            "frame_indices": Sequence(Value("int32")),
            "frames": Array4D((T, S, S, 3), "uint8"),
            "vae_latents": Array4D((T, 4, LATENT, LATENT), "float32"),
            "moving_boxes": Array3D((T, 4, 4), "float32"),
        }
    )
    columns = {
        "video_id": [f"clip{i}" for i in range(NUM_CLIPS)],
        "video_path": [f"clip{i}.mp4" for i in range(NUM_CLIPS)],
        "caption": [""] * NUM_CLIPS,
        "fps": [8.0] * NUM_CLIPS,
        "frame_indices": [list(range(T))] * NUM_CLIPS,
        "frames": rng.integers(0, 256, (NUM_CLIPS, T, S, S, 3), dtype=np.uint8),
        "vae_latents": rng.standard_normal((NUM_CLIPS, T, 4, LATENT, LATENT)).astype(np.float32),
        "moving_boxes": boxes,
    }
    Dataset.from_dict(columns, features=features).save_to_disk(str(path))


def tiny_arrow_dataset(num_clips: int, seed: int = 0, boxes: bool = True) -> Dataset:
    """Random clips with the precomputed columns the collator reads; `boxes=False`: every box row absent (-1), as
    the collator emits for data without boxes."""
    rng = np.random.default_rng(seed)
    boxes_column = np.full((num_clips, T, 4, 4), -1.0, dtype=np.float32)
    if boxes:
        boxes_column[:, :, 0] = [0.25, 0.25, 0.5, 0.5]
    features = Features(
        {
            "frames": Array4D((T, S, S, 3), "uint8"),
            "vae_latents": Array4D((T, 4, LATENT, LATENT), "float32"),
            "moving_boxes": Array3D((T, 4, 4), "float32"),
        }
    )
    columns = {
        "frames": rng.integers(0, 256, (num_clips, T, S, S, 3), dtype=np.uint8),
        "vae_latents": rng.standard_normal((num_clips, T, 4, LATENT, LATENT)).astype(np.float32),
        "moving_boxes": boxes_column,
    }
    return Dataset.from_dict(columns, features=features)


def make_run(run_dir, data: dict, with_eval: bool = True, model=None):
    """A finished run folder: final model, trainer_state.json, data_paths.json naming the eval split and the VAE."""
    torch.manual_seed(0)
    (model or FoveatedVLMModel(tiny_config())).save_pretrained(str(run_dir))
    (run_dir / "trainer_state.json").write_text(json.dumps(trainer_state(with_eval)))
    (run_dir / DATA_PATHS_FILE).write_text(json.dumps(data))
    return run_dir
