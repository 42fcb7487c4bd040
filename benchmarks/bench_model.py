"""Train-step and query benchmarks at the seed's shapes (DINOv3-S/16 + SmolLM2-135M shapes, random weights).

Prints Markdown tables; measures, asserts nothing. Each configuration runs in a fresh subprocess so peak memory is
its own (CUDA `max_memory_allocated` on GPU, peak RSS on CPU).

    python benchmarks/bench_model.py                       # CPU: B=1 fp32 step, query vs re-encode
    python benchmarks/bench_model.py --suite gpu           # GPU: batch/precision grid, one-factor variations, T scaling
    python benchmarks/bench_model.py --suite cpu --steps 2 # quicker
    python benchmarks/bench_model.py --tables parts        # CPU: the train step vs the sum of its parts
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from configuration_foveated import FoveatedVLMConfig  # noqa: E402
from modeling_foveated import FoveatedVLMModel  # noqa: E402

# Dense peak throughput of the devices we report against (vendor figures, TFLOP/s): bf16 tensor cores, fp32 via TF32.
PEAK_TFLOPS = {"H100": {"bf16": 989.0, "fp32": 494.0}, "H200": {"bf16": 989.0, "fp32": 494.0}}


def tiny_config(**overrides) -> FoveatedVLMConfig:
    """The embedded default's model (configs/tiny.yaml: 128 px, 64-wide DINOv3, 128-wide Llama)."""
    config = yaml.safe_load((REPO_ROOT / "configs" / "tiny.yaml").read_text())
    size = config["image_size"]
    return FoveatedVLMConfig(
        vision_config={**config["vision_config"], "image_size": size},
        text_config=config["text_config"],
        image_size=size,
        latent_size=size // 8,
        **{**config["model_config"], **overrides},
    )


def build_model(deep_query=True, freeze_vision=False, num_frames=8, device="cpu", shapes="seed"):
    overrides = dict(num_frames=num_frames, deep_query=deep_query, freeze_vision=freeze_vision)
    config = tiny_config(**overrides) if shapes == "tiny" else FoveatedVLMConfig(**overrides)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return FoveatedVLMModel(config).to(device).train()


def count_flops(model, pixel_values, vae_latents) -> dict:
    """Forward FLOPs of one batch by part (matmul, conv, attention), counted stage by stage with FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    def flops_of(fn):
        counter = FlopCounterMode(display=False)  # its module tracker needs autograd on, so no no_grad here
        with counter:
            result = fn()
        return counter.get_total_flops(), result

    B, T = pixel_values.shape[:2]
    encoder_flops, cache = flops_of(lambda: model.encoder.encode_patches(pixel_values.flatten(0, 1)))
    static = model.q_static.expand(B, T, -1)
    query_flops, (tokens, _) = flops_of(lambda: model._read_frames(static, cache, B, T))
    empty_text = tokens.new_zeros(B, 0, tokens.shape[-1])
    llm_flops, states = flops_of(lambda: model._run_language_model(model.coarse_token, tokens, empty_text, None))
    prev_latents = model.previous_latents(vae_latents).repeat(2, 1, 1, 1, 1)
    head_flops, _ = flops_of(lambda: model.predict_latents(states[:, :T].repeat(2, 1, 1), prev_latents))
    parts = {"encoder": encoder_flops, "queries": 2 * query_flops, "llm": 2 * llm_flops, "head": head_flops}
    return {**parts, "total": sum(parts.values())}


def run_step_benchmark(args) -> dict:
    device = args.device
    model = build_model(args.deep_query, args.freeze_vision, args.num_frames, device)
    if args.grad_ckpt:
        model.gradient_checkpointing_enable()
    B, T, S = args.batch_size, args.num_frames, model.config.image_size
    pixel_values = torch.randn(B, T, 3, S, S, device=device)
    vae_latents = torch.randn(B, T, 4, S // 8, S // 8, device=device)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=device == "cuda"
    )
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def step():
        with autocast:
            loss = model(pixel_values, vae_latents).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    if device == "cuda":
        peak_gb = torch.cuda.max_memory_allocated() / 1e9
    else:
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB -> GB
    flops = count_flops(model, pixel_values[:1], vae_latents[:1])
    return {"seconds_per_step": seconds, "samples_per_s": B / seconds, "peak_gb": peak_gb, "flops_per_sample": flops}


def run_parts_benchmark(args) -> dict:
    """
    The train step against the sum of its parts, each timed alone with forward + backward from detached inputs:
    encoding, the two query readings, the two LLM passes, the shared head (both passes in one call), the trainer's
    per-step diagnostics, and the optimizer step. What the whole step costs beyond the sum is glue (concatenations,
    losses, autograd bookkeeping).
    """
    from trainer_foveated import foveation_metrics

    model = build_model(args.deep_query, args.freeze_vision, args.num_frames, "cpu", args.shapes)
    config = model.config
    B, T, S, h = args.batch_size, args.num_frames, config.image_size, config.latent_size
    pixel_values = torch.randn(B, T, 3, S, S)
    vae_latents = torch.randn(B, T, config.latent_channels, h, h)
    inputs = {"pixel_values": pixel_values, "vae_latents": vae_latents}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def timed(fn) -> float:
        for _ in range(args.warmup):
            fn()
        start = time.perf_counter()
        for _ in range(args.steps):
            fn()
        return (time.perf_counter() - start) / args.steps

    def backward(*outputs):  # tensors or tuples of tensors (the per-layer K/V)
        tensors = [t for output in outputs for t in (output if isinstance(output, tuple) else (output,))]
        sum(tensor.float().sum() for tensor in tensors).backward()

    def step():  # what the Trainer does per step: forward, diagnostics, backward, optimizer
        step_output = model(pixel_values, vae_latents)
        foveation_metrics(model, step_output, inputs)
        step_output.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def leaf(tensor):
        return tensor.detach().requires_grad_(True)

    # The whole step first, from a fresh model: timing it after the parts (whose backward calls pile up gradients
    # the optimizer part then applies) measured it 2x slower than a training run's steps.
    step_seconds = timed(step)

    with torch.no_grad():
        cache = model.encoder.encode_patches(pixel_values.flatten(0, 1))
        output = model(pixel_values, vae_latents)
    cache = type(cache)(**{k: (tuple(map(leaf, v)) if isinstance(v, tuple) else leaf(v)) for k, v in cache.items()})
    queries = leaf(output.queries)
    tokens = leaf(torch.randn(B, T, config.text_config.hidden_size))
    empty_text = tokens.new_zeros(B, 0, tokens.shape[-1])
    states = leaf(torch.cat([output.state_coarse, output.state_fine]))
    prev_latents = model.previous_latents(vae_latents).repeat(2, 1, 1, 1, 1)

    def alone(fn):  # one part's forward + backward, from zeroed gradients
        def run():
            model.zero_grad(set_to_none=True)
            fn()
        return timed(run)

    parts = {
        "encode frames": alone(lambda: backward(*model.encoder.encode_patches(pixel_values.flatten(0, 1)).to_tuple())),
        "2 x query reading": 2 * alone(lambda: backward(*model._read_frames(queries, cache, B, T))),
        "2 x LLM pass": 2 * alone(
            lambda: backward(model._run_language_model(model.coarse_token, tokens, empty_text, None))
        ),
        "head (both passes)": alone(lambda: backward(model.predict_latents(states, prev_latents))),
        "trainer diagnostics": timed(lambda: foveation_metrics(model, output, inputs)),
    }
    if config.aux_current_weight > 0:  # the auxiliary reconstruction runs the head once more over both passes
        parts["auxiliary head pass"] = parts["head (both passes)"]
    model.zero_grad(set_to_none=True)
    model(pixel_values, vae_latents).loss.backward()  # real gradients for the optimizer to apply
    parts["optimizer step"] = timed(optimizer.step)
    optimizer.zero_grad(set_to_none=True)
    result = {"parts_seconds": parts, "step_seconds": step_seconds}
    if args.compile:
        # What `--torch_compile true` does in train_hf.py: the Trainer compiles the whole model.
        eager, model = model, torch.compile(model)
        start = time.perf_counter()
        step()
        result["compile_seconds"] = time.perf_counter() - start
        result["compiled_step_seconds"] = timed(step)
        model = eager
    return result


def run_query_benchmark(args) -> dict:
    """Per frame: `query` through the cached K/V vs re-encoding the frame with the query appended."""
    device = args.device
    model = build_model(device=device, shapes=args.shapes).eval()
    encoder = model.encoder
    N, S = args.batch_size * args.num_frames, model.config.image_size
    pixel_values = torch.randn(N, 3, S, S, device=device)
    queries = torch.randn(N, model.config.query_dim, device=device)

    def reencode():
        backbone = encoder.backbone
        hidden = backbone.embeddings(pixel_values)
        cos, sin = backbone.rope_embeddings(pixel_values)
        sequence = torch.cat([encoder.query_in_proj(queries).unsqueeze(1), hidden], dim=1)
        mask = torch.zeros(1, 1, sequence.shape[1], sequence.shape[1], device=device)
        mask[..., 1:, 0] = float("-inf")  # patches never see the query
        for layer in backbone.model.layer:
            sequence = layer(sequence, attention_mask=mask, position_embeddings=(cos, sin))
        return backbone.norm(sequence[:, 0])

    def timed(fn):
        with torch.no_grad():
            for _ in range(args.warmup):
                fn()
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.steps):
                fn()
            if device == "cuda":
                torch.cuda.synchronize()
        return (time.perf_counter() - start) / args.steps / N

    with torch.no_grad():
        cache = encoder.encode_patches(pixel_values)
    cached = timed(lambda: encoder.query(queries, cache))
    full = timed(reencode)
    encode = timed(lambda: encoder.encode_patches(pixel_values))
    return {"cached_query_ms": cached * 1e3, "reencode_ms": full * 1e3, "encode_ms": encode * 1e3}


def run_child(**settings) -> dict:
    command = [sys.executable, __file__, "--child"] + [f"--{k}={v}" for k, v in settings.items()]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        return {"error": (result.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def device_peak(device, precision):
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    for key, peaks in PEAK_TFLOPS.items():
        if key in name:
            return peaks[precision]
    return None


def step_row(settings, result, device):
    if "error" in result:
        return f"| {settings} | error: {result['error'][:80]} |"
    flops = result["flops_per_sample"]
    train_flops = 3 * flops["total"]  # forward + backward (2x forward)
    achieved = train_flops * result["samples_per_s"] / 1e12
    peak = device_peak(device, settings.get("precision", "fp32"))
    mfu = f"{100 * achieved / peak:.1f} %" if peak else "-"
    return (
        f"| {settings['batch_size']} | {settings.get('precision', 'fp32')} | {settings.get('grad_ckpt', 0)} | "
        f"{'deep' if settings.get('deep_query', 1) else 'shallow'} | "
        f"{'frozen' if settings.get('freeze_vision', 0) else 'trainable'} | {settings.get('num_frames', 8)} | "
        f"{result['samples_per_s']:.2f} | {1e3 * result['seconds_per_step'] / settings['batch_size']:.1f} | "
        f"{result['peak_gb']:.2f} | {achieved:.2f} | {mfu} |"
    )


STEP_HEADER = (
    "| B | precision | grad ckpt | query | DINO | T | samples/s | ms/sample | peak GB | TFLOP/s | MFU |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=["cpu", "gpu"], default="gpu" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--tables", default="step,query", help="Comma-separated: step, query, parts (step vs sum of its parts, CPU)."
    )
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="step", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--batch_size", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--num_frames", type=int, default=8, help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--grad_ckpt", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--deep_query", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--freeze_vision", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--shapes", default="seed", help=argparse.SUPPRESS)
    parser.add_argument("--compile", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        if args.device == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        run = {"step": run_step_benchmark, "query": run_query_benchmark, "parts": run_parts_benchmark}[args.mode]
        print(json.dumps(run(args)))
        return

    tables = set(args.tables.split(","))
    if "parts" in tables:
        print_parts_table(args)
    device = "cuda" if args.suite == "gpu" else "cpu"
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {os.cpu_count()} cores"
    if tables & {"step", "query"}:
        print(f"# Seed shapes (DINOv3-S/16 + SmolLM2-135M, random weights, 256 px, T=8 unless noted) on {where}\n")
    common = dict(device=device, steps=args.steps, warmup=args.warmup)
    if device == "cpu":
        grid = [dict(batch_size=1, precision="fp32")]
    else:
        grid = [dict(batch_size=b, precision=p) for p in ("bf16", "fp32") for b in (1, 2, 8, 16)]
        grid += [dict(batch_size=8, precision="bf16", **change) for change in (
            dict(grad_ckpt=1), dict(deep_query=0), dict(freeze_vision=1))]
        grid += [dict(batch_size=2, precision="bf16", grad_ckpt=1)]
        grid += [dict(batch_size=4, precision="bf16", num_frames=t) for t in (4, 8, 16, 32)]
    if "step" in tables:
        print_step_tables(grid, common, device)
    if "query" in tables:
        print_query_table(common, device)


def print_step_tables(grid, common, device):
    print("## Train step (forward + backward + AdamW)\n")
    print(STEP_HEADER)
    flops = None
    for settings in grid:
        result = run_child(mode="step", **common, **settings)
        flops = result.get("flops_per_sample", flops) if settings.get("num_frames", 8) == 8 else flops
        print(step_row(settings, result, device), flush=True)
    if flops:
        print("\n## Forward FLOPs per sample (T=8), counted with torch.utils.flop_counter\n")
        print("| part | GFLOP | share |\n|---|---|---|")
        for name in ("encoder", "queries", "llm", "head"):
            print(f"| {name} | {flops[name] / 1e9:.2f} | {100 * flops[name] / flops['total']:.1f} % |")
        print(f"| total | {flops['total'] / 1e9:.2f} | 100 % |")


def print_query_table(common, device):
    print("\n## Query through the cached K/V vs re-encoding the frame with the query appended (per frame)\n")
    print("| frames per call | cached query ms | re-encode ms | ratio | encode_patches ms |\n|---|---|---|---|---|")
    for batch_size in (1, 8) if device == "cpu" else (8, 32):
        query = run_child(mode="query", **common, batch_size=batch_size)
        if "error" in query:
            print(f"| {8 * batch_size} | error: {query['error']} |")
            continue
        ratio = query["reencode_ms"] / query["cached_query_ms"]
        print(f"| {8 * batch_size} | {query['cached_query_ms']:.3f} | {query['reencode_ms']:.3f} | {ratio:.1f}x | "
              f"{query['encode_ms']:.3f} |", flush=True)


def print_parts_table(args):
    """Train step vs the sum of its separately timed parts (CPU), tiny and seed shapes."""
    print(f"# Train step vs the sum of its parts, CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)\n")
    for shapes, batch_size in (("tiny", 16), ("seed", 1)):
        result = run_child(mode="parts", shapes=shapes, batch_size=batch_size, steps=args.steps, warmup=args.warmup,
                           compile=int(shapes == "tiny"))
        if "error" in result:
            print(f"{shapes}: error: {result['error']}")
            continue
        parts, step = result["parts_seconds"], result["step_seconds"]
        total = sum(parts.values())
        print(f"## {shapes} shapes, B = {batch_size}, T = 8, fp32\n")
        print("| part | ms | share of the sum |\n|---|---|---|")
        for name, seconds in parts.items():
            print(f"| {name} | {1e3 * seconds:.1f} | {100 * seconds / total:.1f} % |")
        print(f"| **sum of parts** | {1e3 * total:.1f} | 100 % |")
        print(f"| **whole step** | {1e3 * step:.1f} | {step / total:.2f}x the sum |")
        if "compiled_step_seconds" in result:
            compiled = result["compiled_step_seconds"]
            print(f"| whole step, torch.compile (first step {result['compile_seconds']:.0f} s) | {1e3 * compiled:.1f} "
                  f"| {step / compiled:.2f}x faster than eager |")
        print(flush=True)


if __name__ == "__main__":
    main()
