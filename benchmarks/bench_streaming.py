"""Per-frame latency of streaming inference (`FoveatedVLMModel.stream`), random weights, batch 1.

Each frame is encoded once and both LLM streams step one token with their own KV caches, so the cost of frame t
should not grow with t. For contrast, the table also times what a model without caches pays for frame t: the
parallel forward over all t frames seen so far. Prints Markdown tables; measures, asserts nothing.

    python benchmarks/bench_streaming.py                  # tiny (configs/tiny.yaml) and phase1.yaml shapes, CPU
    python benchmarks/bench_streaming.py --shapes tiny --num_frames 128
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench_model import tiny_config  # noqa: E402  (this folder is on sys.path when run as a script)
from configuration_foveated import FoveatedVLMConfig  # noqa: E402
from modeling_foveated import FoveatedVLMModel  # noqa: E402


def windows(num_frames: int) -> list[tuple[int, int]]:
    """Frame ranges [1, 4], [5, 8], [9, 16], ... doubling up to num_frames."""
    ranges, start, end = [], 1, 4
    while start <= num_frames:
        ranges.append((start, min(end, num_frames)))
        start, end = end + 1, end * 2
    return ranges


@torch.no_grad()
def stream_latencies(model, frames, latents, autoregressive=False) -> list[float]:
    """Seconds spent producing each frame's output, in order."""
    latencies = []
    stream = model.stream(iter(frames.unbind(1)), iter(latents.unbind(1)), autoregressive=autoregressive)
    while True:
        start = time.perf_counter()
        try:
            next(stream)
        except StopIteration:
            return latencies
        latencies.append(time.perf_counter() - start)


@torch.no_grad()
def recompute_latency(model, frames, latents, t: int, repeats: int) -> float:
    """Median seconds of one parallel forward over the first t frames (the no-cache way to handle frame t)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(frames[:, :t], latents[:, :t])
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def benchmark(name: str, config: FoveatedVLMConfig, num_frames: int, repeats: int) -> None:
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = FoveatedVLMModel(config).eval()
    S, h = config.image_size, config.latent_size
    frames = torch.randn(1, num_frames, 3, S, S)
    latents = torch.randn(1, num_frames, config.latent_channels, h, h)
    stream_latencies(model, frames[:, :4], latents[:, :4])  # warm-up: allocator, kernels
    runs = [stream_latencies(model, frames, latents) for _ in range(repeats)]
    per_frame = [statistics.median(run[t] for run in runs) for t in range(num_frames)]  # (num_frames,)
    autoregressive = stream_latencies(model, frames, latents, autoregressive=True)

    print(f"\n### {name}: {config.image_size} px, encoder {config.vision_config.num_hidden_layers}x"
          f"{config.vision_config.hidden_size}, LLM {config.text_config.num_hidden_layers}x"
          f"{config.text_config.hidden_size}, batch 1, {torch.get_num_threads()} threads, median of {repeats}\n")
    print("| frames | stream ms/frame | autoregressive ms/frame | no cache: forward over frames 1..t, ms (t = last) |")
    print("|---|---|---|---|")
    for first, last in windows(num_frames):
        stream_ms = 1000 * statistics.median(per_frame[first - 1 : last])
        auto_ms = 1000 * statistics.median(autoregressive[first - 1 : last])
        recompute_ms = 1000 * recompute_latency(model, frames, latents, last, repeats)
        print(f"| {first}-{last} | {stream_ms:.1f} | {auto_ms:.1f} | {recompute_ms:.1f} |")
    first_half = statistics.median(per_frame[: num_frames // 2])
    second_half = statistics.median(per_frame[num_frames // 2 :])
    print(f"\nsecond half / first half of the clip, stream ms per frame: {second_half / first_half:.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", choices=("tiny", "phase1", "both"), default="both")
    parser.add_argument("--num_frames", type=int, default=None, help="Frames streamed (default 64 tiny, 32 phase1).")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.shapes in ("tiny", "both"):
        benchmark("tiny (configs/tiny.yaml)", tiny_config(), args.num_frames or 64, args.repeats)
    if args.shapes in ("phase1", "both"):  # the config's defaults: configs/phase1.yaml's shapes
        benchmark("phase1.yaml (DINOv3-S/16 + SmolLM2-135M shapes)", FoveatedVLMConfig(), args.num_frames or 32,
                  args.repeats)


if __name__ == "__main__":
    main()
