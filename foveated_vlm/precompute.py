"""Decode every video of a folder and encode its frames with a frozen VAE, once, into an Arrow dataset.

    python -m foveated_vlm.precompute --video_dir data/videos --output_dir data/precomputed --num_proc 8
    accelerate launch --num_processes 4 -m foveated_vlm.precompute --video_dir data/videos --output_dir data/precomputed \
        --eval_fraction 0.05
    accelerate launch train_hf.py configs/phase1.yaml --data_source precomputed --precomputed_dir data/precomputed

With `--eval_fraction` the videos are split into OUTPUT_DIR/train and OUTPUT_DIR/eval (each video by a hash of its
file name, as train_hf.py splits a folder), which `train_hf.py --data_source precomputed` reads. Captions come from
`--captions_json` (LLaVA-Video) or from a text file beside each video (clip.mp4 -> clip.txt). Reruns reuse finished
shards (see foveated_vlm.data.precompute_dataset). Exits non-zero only when no video succeeded;
the videos that failed are listed in the run's failures.jsonl (OUTPUT_DIR/runs/<run id>/, named in the log).
"""

import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

from transformers import HfArgumentParser

from foveated_vlm.data import (
    DEFAULT_IMAGE_SIZE,
    DEFAULT_NUM_FRAMES,
    DEFAULT_SHARD_SIZE,
    SD_VAE_ID,
    find_videos,
    load_caption_files,
    load_llava_captions,
    precompute_dataset,
    split_train_eval,
)
from processing_foveated import RESIZE_MODES


__all__ = ["FoveatedVLMPrecomputeArguments", "main"]


@dataclass
class FoveatedVLMPrecomputeArguments:
    video_dir: str = field(metadata={"help": "Folder searched recursively for mp4, webm, mkv, avi and mov files."})
    output_dir: str = field(metadata={"help": "Receives shards/ (the data), runs/ and precompute.json (latest run)."})
    num_frames: int = field(default=DEFAULT_NUM_FRAMES, metadata={"help": "Frames T sampled per video."})
    image_size: int = field(
        default=DEFAULT_IMAGE_SIZE, metadata={"help": "Frame side S in pixels; a multiple of the VAE's downsampling."}
    )
    vae: str = field(default=SD_VAE_ID, metadata={"help": "diffusers AutoencoderKL: a Hub id or a local folder."})
    resize_mode: str = field(
        default="crop",
        metadata={"help": "crop: shortest side to S, centre crop; squash: S x S.", "choices": list(RESIZE_MODES)},
    )
    sample_fps: Optional[float] = field(
        default=None, metadata={"help": "Sample at this frame rate from frame 0 instead of uniformly over the video."}
    )
    num_proc: int = field(default=1, metadata={"help": "Decoding worker processes (per accelerate process)."})
    batch_size: int = field(default=8, metadata={"help": "Videos per batch; one VAE call encodes batch_size * T."})
    shard_size: int = field(
        default=DEFAULT_SHARD_SIZE, metadata={"help": "Videos per resumable shard (the unit a rerun skips)."}
    )
    captions_json: Optional[str] = field(
        default=None, metadata={"help": "LLaVA-Video caption file (list of {video, conversations}) for `caption`."}
    )
    eval_fraction: Optional[float] = field(
        default=None,
        metadata={"help": "Hold out this share of the videos: output_dir/train and output_dir/eval, for train_hf.py "
        "--data_source precomputed. Default: one dataset in output_dir."},
    )
    split_seed: int = field(default=0, metadata={"help": "Seed of the train/eval split (train_hf.py's split_seed)."})


def main(argv: Optional[list[str]] = None) -> int:
    (args,) = HfArgumentParser(FoveatedVLMPrecomputeArguments).parse_args_into_dataclasses(args=argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    videos = find_videos(args.video_dir)
    captions = load_llava_captions(args.captions_json) if args.captions_json else load_caption_files(videos)
    if args.eval_fraction is None:
        splits = {"": videos}
    else:
        train, evaluation = split_train_eval(videos, args.eval_fraction, seed=args.split_seed)
        splits = {"train": train, "eval": evaluation}
    num_ok = 0
    for split, paths in splits.items():
        dataset = precompute_dataset(
            paths,
            os.path.join(args.output_dir, split),
            num_frames=args.num_frames,
            image_size=args.image_size,
            vae=args.vae,
            resize_mode=args.resize_mode,
            sample_fps=args.sample_fps,
            captions=captions,
            num_proc=args.num_proc,
            batch_size=args.batch_size,
            shard_size=args.shard_size,
        )
        num_ok += len(dataset)
    return 0 if num_ok else 1


if __name__ == "__main__":
    sys.exit(main())
