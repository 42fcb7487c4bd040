"""Throughput of the data pipeline against a plain per-video loop (not a test; prints a table).

    python benchmarks/bench_data.py --sizes 128 256

Precompute: `precompute_dataset` (the path of foveated_vlm/precompute.py: decode map with 2 workers, one VAE call per
batch) against a plain loop (per video: decord, resize, one VAE call per frame, torch.save).
Training input: the Arrow dataset through `load_precomputed` + `FoveatedVLMDataCollator` against decoding the
video with decord in every step (latents from the plain loop's .pt files), both in a DataLoader with 2 workers.
All runs use the same synthetic videos and the same small VAE (`make_tiny_vae`).

    python benchmarks/bench_data.py --decode_only --sizes 128 256

Decoding: decode + sample + resize of one clip (`processing_foveated.load_video`) with each installed decoder, and
with transformers' decord and PyAV readers in place of processing_foveated's; per video, wall and CPU time (CPU time
counts every thread of the process, so it is what a loader with one worker per core pays). Also the tokenizer load of
`train_hf.build_processor`: from the SmolLM2 GGUF file against the folder it is converted to.
"""

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from foveated_vlm.data import (  # noqa: E402
    FoveatedVLMDataCollator,
    load_precomputed,
    precompute_dataset,
)
import processing_foveated  # noqa: E402
from processing_foveated import VIDEO_BACKENDS, load_video  # noqa: E402
from foveated_vlm.synthetic import generate_split  # noqa: E402
from foveated_vlm.tiny_vae import make_tiny_vae  # noqa: E402


@torch.no_grad()
def per_frame_precompute(video_paths: list[Path], latent_dir: Path, vae, num_frames: int, image_size: int) -> None:
    """The plain precompute loop, on CPU in fp32: one video at a time, one VAE call per frame."""
    import decord

    latent_dir.mkdir(parents=True, exist_ok=True)
    for path in video_paths:
        reader = decord.VideoReader(str(path))
        indices = np.linspace(0, len(reader) - 1, num_frames, dtype=int)
        frames = torch.from_numpy(reader.get_batch(indices).asnumpy()).permute(0, 3, 1, 2).float()  # (T, 3, H, W)
        frames = F.interpolate(frames, size=(image_size, image_size), mode="bilinear", antialias=True) / 127.5 - 1
        latents = [vae.encode(frames[t : t + 1]).latent_dist.mean for t in range(num_frames)]  # (1, 4, S/8, S/8) each
        torch.save(torch.cat(latents) * vae.config.scaling_factor, latent_dir / f"{path.stem}.pt")  # (T, 4, S/8, S/8)


class DecodeEveryStep(torch.utils.data.Dataset):
    """A plain video dataset: decodes the video in every step, reads precomputed latents."""

    def __init__(self, video_paths: list[Path], latent_dir: Path, num_frames: int, image_size: int):
        self.video_paths, self.latent_dir = video_paths, latent_dir
        self.num_frames, self.image_size = num_frames, image_size

    def __len__(self) -> int:
        return len(self.video_paths)

    def __getitem__(self, index: int) -> dict:
        path = self.video_paths[index]
        frames, _ = load_video(path, self.num_frames, self.image_size)
        return {
            "frames": frames,
            "vae_latents": torch.load(self.latent_dir / f"{path.stem}.pt"),
            "moving_boxes": np.full((self.num_frames, 4, 4), -1.0, dtype=np.float32),
        }


def samples_per_second(dataset, epochs: int, batch_size: int, num_workers: int, collator=None) -> float:
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=num_workers,
        collate_fn=collator or FoveatedVLMDataCollator(),
        persistent_workers=True,
        pin_memory=torch.cuda.is_available(),  # as the phase configs load for a GPU
    )
    next(iter(loader))  # worker start-up is paid once per training run, not per step
    start = time.perf_counter()
    num_samples = sum(len(batch["vae_latents"]) for _ in range(epochs) for batch in loader)
    return num_samples / (time.perf_counter() - start)


def timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def decoding_rows(videos: list[Path], num_frames: int, size: int, repeats: int) -> list[tuple]:
    """(S, path, "wall ms, CPU ms per video") for load_video with each installed decoder, and with transformers' own
    decord and PyAV readers in place of processing_foveated's; the best of `repeats` interleaved passes, so that load
    from other processes hits every decoder alike."""
    from transformers.video_utils import VIDEO_DECODERS

    readers = processing_foveated.VIDEO_READERS
    decoders = {backend: (backend, readers[backend]) for backend in VIDEO_BACKENDS}
    decoders = {name: value for name, value in decoders.items() if processing_foveated.is_video_backend_available(name)}
    for backend in ("decord", "pyav"):  # the two readers processing_foveated replaces
        if backend in decoders:
            decoders[f"{backend}, transformers' reader"] = (backend, VIDEO_DECODERS[backend])
    timings = {name: [] for name in decoders}
    for _ in range(repeats):
        for name, (backend, reader) in decoders.items():
            kept, readers[backend] = readers[backend], reader
            try:
                wall, cpu = time.perf_counter(), time.process_time()
                for path in videos:
                    load_video(path, num_frames, size, backend=backend)
                timings[name].append((time.perf_counter() - wall, time.process_time() - cpu))
            finally:
                readers[backend] = kept
    rows = []
    for name, runs in timings.items():
        wall = 1000 * min(run[0] for run in runs) / len(videos)
        cpu = 1000 * min(run[1] for run in runs) / len(videos)
        rows.append((size, f"decode + sample + resize: load_video, {name}", f"{wall:.1f} ms wall, {cpu:.1f} ms CPU"))
    return rows


def tokenizer_rows() -> list[tuple]:
    """Loading SmolLM2's tokenizer from the GGUF file against loading the folder build_processor converts it to."""
    import tempfile

    from transformers import AutoTokenizer

    from foveated_vlm.train import SMOLLM2_GGUF, resolve_pretrained

    name, gguf_file = resolve_pretrained(SMOLLM2_GGUF)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(name, gguf_file=gguf_file)
    from_gguf = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        start = time.perf_counter()
        AutoTokenizer.from_pretrained(folder)
        from_folder = time.perf_counter() - start
    return [
        ("-", "tokenizer: SmolLM2 from the GGUF file", f"{from_gguf:.2f} s"),
        ("-", "tokenizer: SmolLM2 from its saved folder (build_processor's cache)", f"{from_folder:.2f} s"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default="outputs/bench_data", help="Videos, VAE and outputs go here.")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128], help="Frame sides S to measure.")
    parser.add_argument("--num_videos", type=int, default=40)
    parser.add_argument("--num_frames", type=int, default=8, help="T frames sampled per video.")
    parser.add_argument("--num_video_frames", type=int, default=48, help="Frames in each synthetic video.")
    parser.add_argument("--epochs", type=int, default=3, help="DataLoader passes over the videos per measurement.")
    parser.add_argument("--batch_size", type=int, default=8, help="Clips per batch (configs/phase1.yaml: 8).")
    parser.add_argument("--num_workers", type=int, default=2, help="Loader workers (configs/phase1.yaml: 4).")
    parser.add_argument("--decode_only", action="store_true", help="Only the decoding and tokenizer rows.")
    parser.add_argument("--repeats", type=int, default=5, help="Passes over the videos per decoder (best counts).")
    args = parser.parse_args()
    work_dir = Path(args.work_dir)
    if args.decode_only:
        rows = tokenizer_rows()
        for size in args.sizes:
            video_dir = work_dir / f"videos_{size}"
            split = generate_split(video_dir, args.num_videos, 0, "medium", size, args.num_video_frames, fps=8.0)
            videos = [Path(path) for path in split["train"]]
            rows += decoding_rows(videos, args.num_frames, size, args.repeats)
        print_rows(args, rows)
        return

    from diffusers import AutoencoderKL

    vae_path = make_tiny_vae(work_dir / "tiny_vae", image_size=128)
    vae = AutoencoderKL.from_pretrained(vae_path).eval()  # fully convolutional: the same weights serve 256 px
    rows = []
    for size in args.sizes:
        video_dir = work_dir / f"videos_{size}"
        split = generate_split(video_dir, args.num_videos, 0, "medium", size, args.num_video_frames, fps=8.0)
        videos = [Path(path) for path in split["train"]]
        output_dir, latent_dir = work_dir / f"precomputed_{size}", work_dir / f"plain_latents_{size}"
        shutil.rmtree(output_dir, ignore_errors=True)
        shutil.rmtree(latent_dir, ignore_errors=True)

        def ours():
            precompute_dataset(
                videos, output_dir, args.num_frames, size, vae=vae_path, num_proc=2, batch_size=8, shard_size=64
            )

        cold = timed(ours)
        shutil.rmtree(output_dir / "runs")  # warm rerun through the shard caches, not the recorded-run shortcut
        warm = timed(ours)
        plain = timed(lambda: per_frame_precompute(videos, latent_dir, vae, args.num_frames, size))
        precomputed = load_precomputed(output_dir)
        loading = dict(epochs=args.epochs, batch_size=args.batch_size, num_workers=args.num_workers)
        uint8_collator = FoveatedVLMDataCollator(normalize_frames=False)
        uint8 = samples_per_second(precomputed, collator=uint8_collator, **loading)
        # datasets' own torch format: the frames as int64, cast back to uint8 in the collator
        int64 = samples_per_second(precomputed.with_format("torch"), collator=uint8_collator, **loading)
        arrow = samples_per_second(precomputed, **loading)
        decoding = samples_per_second(DecodeEveryStep(videos, latent_dir, args.num_frames, size), **loading)
        workers = f"{args.num_workers} worker{'s' * (args.num_workers != 1)}"
        loaded = "{:.1f} samples/s".format
        n = len(videos)
        rows += [
            (size, "precompute: precompute_dataset, num_proc 2, batched VAE", f"{n / cold:.2f} videos/s"),
            (size, "precompute: same, rerun (shard caches hit)", f"{n / warm:.2f} videos/s"),
            (size, "precompute: plain loop, per-frame VAE", f"{n / plain:.2f} videos/s"),
            (size, f"training input: Arrow + collator, uint8 frames (train_hf.py), {workers}", loaded(uint8)),
            (size, f"training input: same, datasets' default torch format (int64 frames), {workers}", loaded(int64)),
            (size, f"training input: Arrow + collator normalising on the CPU, {workers}", loaded(arrow)),
            (size, f"training input: decord decode per step, {workers}", loaded(decoding)),
        ]

    print_rows(args, rows)


def print_rows(args, rows: list[tuple]) -> None:
    print(
        f"\n{args.num_videos} synthetic videos of {args.num_video_frames} frames, T={args.num_frames}, "
        f"batches of {args.batch_size}, "
        f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    )
    print("| S | path | throughput |\n|---|---|---|")
    for size, path, value in rows:
        print(f"| {size} | {path} | {value} |")


if __name__ == "__main__":
    main()
