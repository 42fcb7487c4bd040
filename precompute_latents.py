"""Decode every video of a folder and encode its frames with a frozen VAE, once, into an Arrow dataset.

    python precompute_latents.py --video_dir data/videos --output_dir data/precomputed --num_proc 8
    accelerate launch --num_processes 4 precompute_latents.py --video_dir data/videos --output_dir data/precomputed

Reruns reuse finished shards (see data_foveated.precompute_dataset). Exits non-zero only when no video succeeded;
the videos that failed are listed in the run's failures.jsonl (OUTPUT_DIR/runs/<run id>/, named in the log).
"""

import logging
import sys
from dataclasses import dataclass, field
from typing import Optional

from transformers import HfArgumentParser

from data_foveated import (
    DEFAULT_IMAGE_SIZE,
    DEFAULT_NUM_FRAMES,
    DEFAULT_SHARD_SIZE,
    SD_VAE_ID,
    find_videos,
    load_llava_captions,
    precompute_dataset,
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


def main(argv: Optional[list[str]] = None) -> int:
    (args,) = HfArgumentParser(FoveatedVLMPrecomputeArguments).parse_args_into_dataclasses(args=argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    captions = load_llava_captions(args.captions_json) if args.captions_json else None
    dataset = precompute_dataset(
        find_videos(args.video_dir),
        args.output_dir,
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
    return 0 if len(dataset) else 1


if __name__ == "__main__":
    sys.exit(main())
