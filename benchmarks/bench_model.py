"""Train-step and query benchmarks at configs/phase1.yaml's shapes (DINOv3-S/16 + SmolLM2-135M, random weights).

Prints Markdown tables; measures, asserts nothing. Each configuration runs in a fresh subprocess so peak memory is
its own (CUDA `max_memory_allocated` on GPU, peak RSS on CPU).

    python benchmarks/bench_model.py                       # CPU: B=1-16 fp32, 1-2 bf16, variations, T, text; query
    python benchmarks/bench_model.py --suite gpu           # GPU: batch/precision grid, one-factor variations, T scaling
    python benchmarks/bench_model.py --suite cpu --steps 2 # quicker
    python benchmarks/bench_model.py --tables parts        # CPU: the train step vs the sum of its parts
    python benchmarks/bench_model.py --tables dispatch     # CPU: kernel launches and host syncs per step
    python benchmarks/bench_model.py --tables compile      # the step eager and under torch.compile (B=16)
    python benchmarks/bench_model.py --tables teacher      # configs/cued.yaml's step without and with the teacher
    python benchmarks/bench_model.py --tables text         # configs/phase2_text.yaml's step: captions as a target
"""

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from torch.utils._python_dispatch import TorchDispatchMode

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from configuration_foveated import DINOV3_VITS16_REGISTER_TOKENS, SMOLLM2_135M_DEFAULTS, FoveatedVLMConfig  # noqa: E402
from modeling_foveated import FoveatedVLMModel  # noqa: E402
from foveated_vlm.trainer import HOST_SYNC_OPERATORS  # noqa: E402

# Dense peak throughput of the devices we report against (vendor figures, TFLOP/s): bf16 tensor cores, fp32 via TF32.
PEAK_TFLOPS = {"H100": {"bf16": 989.0, "fp32": 494.0}, "H200": {"bf16": 989.0, "fp32": 494.0}}


def tiny_config(config_name: str = "tiny", **overrides) -> FoveatedVLMConfig:
    """The embedded default's model (configs/tiny.yaml: 128 px, 64-wide DINOv3, 128-wide Llama), or another YAML's."""
    config = yaml.safe_load((REPO_ROOT / "configs" / f"{config_name}.yaml").read_text())
    size = config["image_size"]
    return FoveatedVLMConfig(
        vision_config={**config["vision_config"], "image_size": size},
        text_config=config["text_config"],
        image_size=size,
        latent_size=size // 8,
        **{**config["model_config"], **overrides},
    )


def hollow_config(**overrides) -> FoveatedVLMConfig:
    """The phase1.yaml model's depths (12 DINOv3 layers, 30 Llama layers) and code path at widths of 32 and 32 px
    frames: the same operators as the phase1.yaml model with next to no arithmetic, so its step time is the host's
    cost of issuing them (what a launch-bound GPU step pays)."""
    narrow = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2)
    return FoveatedVLMConfig(
        vision_config={**narrow, "num_register_tokens": DINOV3_VITS16_REGISTER_TOKENS, "image_size": 32},
        text_config={**SMOLLM2_135M_DEFAULTS, **narrow, "num_key_value_heads": 1, "vocab_size": 256},
        image_size=32,
        latent_size=4,
        query_dim=32,
        head_channels=8,
        head_mlp_dim=16,
        **overrides,
    )


def build_model(
    deep_query=True, freeze_vision=False, num_frames=8, device="cpu", shapes="phase1", channels_last_head=True,
    **config_overrides,
):
    from foveated_vlm.train import freeze_for_training

    overrides = dict(num_frames=num_frames, deep_query=deep_query, **config_overrides)
    # phase1: the config's defaults, the shapes of configs/phase1.yaml (DINOv3 ViT-S/16 + SmolLM2-135M, 256 px).
    builders = {
        "tiny": tiny_config,
        # The positive control's model with saccade fixations: the search teacher's setting (configs/cued.yaml).
        "cued": lambda **o: tiny_config("cued", fixation_mode="saccade", **o),
        "hollow": hollow_config,
        "phase1": FoveatedVLMConfig,
    }
    config = builders[shapes](**overrides)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = FoveatedVLMModel(config).to(device).train()
    freeze_for_training(model, freeze_vision=freeze_vision)  # train_hf.py's policy
    if channels_last_head:  # train_hf.py's default
        model.prediction_head.to(memory_format=torch.channels_last)
    return model


def count_flops(model, pixel_values, vae_latents, input_ids=None) -> dict:
    """Forward FLOPs of one batch by part (matmul, conv, attention), counted stage by stage with FlopCounterMode."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    def flops_of(fn):
        counter = FlopCounterMode(display=False)  # its module tracker needs autograd on, so no no_grad here
        # The math attention's matmuls are counted on any device; the CPU's fused SDPA kernel has no FLOP formula
        # and counted 0 (a tenth of the encoder at phase1.yaml shapes). The GPU's flash kernel counts the same as math.
        with sdpa_kernel(SDPBackend.MATH), counter:
            result = fn()
        return counter.get_total_flops(), result

    B, T = pixel_values.shape[:2]
    encoder_flops, cache = flops_of(lambda: model.encoder.encode_patches(pixel_values.flatten(0, 1)))
    query_flops, (tokens, _) = flops_of(lambda: model.read_coarse(cache, B, T))
    if input_ids is None:
        text_embeds = tokens.new_zeros(B, 0, tokens.shape[-1])
    else:
        text_embeds = model.language_model.get_input_embeddings()(input_ids)  # (B, text, E)
    llm_flops, states = flops_of(lambda: model.run_language_model(model.coarse_token, tokens, text_embeds, None))
    prev_latents = model.previous_latents(vae_latents)
    head_flops, _ = flops_of(lambda: model.predict_latents(states[:, :T].repeat(2, 1, 1), prev_latents))
    parts = {"encoder": encoder_flops, "queries": 2 * query_flops, "llm": 2 * llm_flops, "head": head_flops}
    return {**parts, "total": sum(parts.values())}


def run_step_benchmark(args) -> dict:
    device = args.device
    # Text as a target (configs/phase2_text.yaml): its joint objective, a caption after the frames in both passes.
    objective = dict(text_loss_weight=1.0, latent_loss_weight=0.5) if args.target_tokens else {}
    model = build_model(
        args.deep_query, args.freeze_vision, args.num_frames, device, args.shapes, bool(args.channels_last_head),
        **objective,
    )
    if args.grad_ckpt:
        model.gradient_checkpointing_enable()
    B, T, S = args.batch_size, args.num_frames, model.config.image_size
    pixel_values = torch.randn(B, T, 3, S, S, device=device)
    vae_latents = torch.randn(B, T, 4, S // 8, S // 8, device=device)
    # Phase 2: a caption of `text_tokens` tokens prepended to both LLM sequences (no padding: the longest caption).
    text = {}
    if args.text_tokens:
        input_ids = torch.randint(0, model.config.text_config.vocab_size, (B, args.text_tokens), device=device)
        text = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    target = {}
    if args.target_tokens:  # every token scored: the longest caption, `max_text_length`
        target_ids = torch.randint(0, model.config.text_config.vocab_size, (B, args.target_tokens), device=device)
        target = dict(target_ids=target_ids, target_labels=target_ids)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=device == "cuda"
    )
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    # `--torch_compile true --torch_compile_mode MODE` in train_hf.py: the Trainer compiles the whole model.
    forward = torch.compile(model, mode=args.compile_mode or None) if args.compile else model
    teacher = None
    if args.teacher_grid:
        from foveated_vlm.teacher import FoveatedVLMSearchTeacher, FoveatedVLMTeacherArguments

        settings = dict(teacher=True, teacher_grid=args.teacher_grid, teacher_frames=args.teacher_frames,
                        teacher_search=args.teacher_search, teacher_samples=args.teacher_samples)
        if args.teacher_frozen_scorer:
            # The recipe's second stage: a saved copy of the model scores the candidates, frozen, and no candidate
            # trains (docs/RESULTS.md, "A second stage").
            with tempfile.TemporaryDirectory() as scorer_dir:  # the scorer's weights are read at construction
                model.save_pretrained(scorer_dir)
                settings.update(teacher_scorer=scorer_dir, teacher_wta_weight=0.0)
                teacher = FoveatedVLMSearchTeacher(FoveatedVLMTeacherArguments(**settings))
        else:
            teacher = FoveatedVLMSearchTeacher(FoveatedVLMTeacherArguments(**settings))

    def step():
        if args.teacher_frozen_scorer == 2:  # every clip new to the scorer, as in the first epoch
            teacher.scored_clips.clear()
        with autocast:
            model_inputs = dict(pixel_values=pixel_values, vae_latents=vae_latents, **text, **target)
            outputs = forward(**model_inputs, output_patch_cache=teacher is not None)
            loss = outputs.loss
            if teacher is not None:
                scorer_inputs = model_inputs if teacher.scorer is not None else None
                loss = loss + teacher(model, outputs, vae_latents, **text, progress=0.5,
                                      scorer_inputs=scorer_inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    warmup_seconds = time.perf_counter() - start
    # Compiling leaves ~10^6 Python objects behind; the full collection they trigger (seconds, measured) belongs to
    # the warmup, not to one of the timed steps.
    gc.collect()
    if device == "cuda":
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
    flops = count_flops(model, pixel_values[:1], vae_latents[:1], text["input_ids"][:1] if text else None)
    return {
        "seconds_per_step": seconds,
        "samples_per_s": B / seconds,
        "peak_gb": peak_gb,
        "flops_per_sample": flops,
        "warmup_seconds": warmup_seconds,
    }


# The prediction head's one call per step: both passes, and the auxiliary reconstruction when the config has it.
HEAD_PART = "head (one call per step)"


def step_parts(model, pixel_values, vae_latents) -> dict:
    """
    The train step's parts as closures, each forward + backward from detached inputs (in the order the step runs
    them): encoding, the two query readings, the two LLM passes, the shared head (both passes and the auxiliary
    reconstruction in one call), the trainer's per-step diagnostics. Each entry is `(run, times)`: the step runs
    `run` that many times. Call `model.zero_grad` between runs; the optimizer is left out (it needs real gradients).
    """
    from foveated_vlm.metrics import clip_metrics

    config = model.config
    B, T = pixel_values.shape[:2]
    inputs = {"pixel_values": pixel_values, "vae_latents": vae_latents}

    def leaf(tensor):
        return tensor.detach().requires_grad_(True)

    def backward(*outputs):  # tensors or tuples of tensors (the per-layer K/V)
        tensors = [t for output in outputs for t in (output if isinstance(output, tuple) else (output,))]
        sum(tensor.float().sum() for tensor in tensors).backward()

    with torch.no_grad():
        cache = model.encoder.encode_patches(pixel_values.flatten(0, 1))
        output = model(pixel_values, vae_latents)
    cache = type(cache)(**{k: (tuple(map(leaf, v)) if isinstance(v, tuple) else leaf(v)) for k, v in cache.items()})
    queries = leaf(output.queries)
    tokens = leaf(torch.randn(B, T, config.text_config.hidden_size))
    empty_text = tokens.new_zeros(B, 0, tokens.shape[-1])
    # The head's one call in the forward: both passes, and two more blocks of states for the auxiliary reconstruction.
    copies = 4 if config.aux_current_weight > 0 else 2
    states = leaf(torch.cat([output.state_coarse, output.state_fine] * (copies // 2)))
    prev_latents = model.previous_latents(vae_latents)
    return {
        "encode frames": (lambda: backward(*model.encoder.encode_patches(pixel_values.flatten(0, 1)).to_tuple()), 1),
        "2 x query reading": (lambda: backward(*model.read_fine(queries, cache, B, T)), 2),
        "2 x LLM pass": (lambda: backward(model.run_language_model(model.coarse_token, tokens, empty_text, None)), 2),
        HEAD_PART: (lambda: backward(model.predict_latents(states, prev_latents)), 1),
        "trainer diagnostics": (lambda: clip_metrics(model, output, inputs), 1),
    }


def run_parts_benchmark(args) -> dict:
    """
    The train step against the sum of its parts (`step_parts`, plus the optimizer step), each timed alone. What
    the whole step costs beyond the sum is glue (concatenations, losses, autograd bookkeeping).
    """
    from foveated_vlm.metrics import clip_metrics

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

    def step():  # what the Trainer does per step: forward, diagnostics, backward, optimizer
        step_output = model(pixel_values, vae_latents)
        clip_metrics(model, step_output, inputs)
        step_output.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # The whole step first, from a fresh model: timing it after the parts (whose backward calls pile up gradients
    # the optimizer part then applies) measured it 2x slower than a training run's steps.
    step_seconds = timed(step)

    def alone(fn):  # one part's forward + backward, from zeroed gradients
        def run():
            model.zero_grad(set_to_none=True)
            fn()
        return timed(run)

    step_part_runs = step_parts(model, pixel_values, vae_latents)
    parts = {name: times * alone(run) for name, (run, times) in step_part_runs.items()}
    model.prediction_head.to(memory_format=torch.contiguous_format)  # the head as it was before `channels_last_head`
    head_contiguous_seconds = alone(step_part_runs[HEAD_PART][0])
    model.prediction_head.to(memory_format=torch.channels_last)
    model.zero_grad(set_to_none=True)
    model(pixel_values, vae_latents).loss.backward()  # real gradients for the optimizer to apply
    parts["optimizer step"] = timed(optimizer.step)
    optimizer.zero_grad(set_to_none=True)
    result = {"parts_seconds": parts, "step_seconds": step_seconds, "head_contiguous_seconds": head_contiguous_seconds}
    if args.compile:
        # What `--torch_compile true` does in train_hf.py: the Trainer compiles the whole model.
        eager, model = model, torch.compile(model)
        start = time.perf_counter()
        step()
        result["compile_seconds"] = time.perf_counter() - start
        result["compiled_step_seconds"] = timed(step)
        model = eager
    return result


class DispatchCounter(TorchDispatchMode):
    """
    Counts the aten operators dispatched while active, forward and backward. On a GPU every counted operator that
    is not a view or an allocation launches a kernel, and one of `HOST_SYNC_OPERATORS` makes the host wait for the
    device.
    """

    NO_KERNEL = {"empty", "empty_strided", "empty_like", "detach", "alias", "lift_fresh", "_reshape_alias", "set_"}

    def __init__(self):
        super().__init__()
        self.operators = 0
        self.kernels = 0
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.operators += 1
        self.kernels += not func.is_view and name not in self.NO_KERNEL
        self.syncs += name in HOST_SYNC_OPERATORS
        return func(*args, **(kwargs or {}))

    def counts(self) -> dict:
        return {"operators": self.operators, "kernels": self.kernels, "syncs": self.syncs}


def run_dispatch_benchmark(args) -> dict:
    """
    Operators, kernel launches and host syncs of one train step, counted with `DispatchCounter`: per part
    (`step_parts`), and for the real `FoveatedVLMTrainer` step (what `train_hf.py` runs: forward, diagnostics, backward,
    clipping, fused AdamW, scheduler), with its CPU time. Steps that log are left out (logging reads the metrics).
    """
    import tempfile

    from transformers import TrainerCallback, TrainingArguments

    from foveated_vlm.data import MAX_MOVING_BOXES, FoveatedVLMDataCollator
    from foveated_vlm.trainer import FoveatedVLMTrainer

    model = build_model(
        args.deep_query, args.freeze_vision, args.num_frames, "cpu", args.shapes, bool(args.channels_last_head)
    )
    config = model.config
    B, T, S, h = args.batch_size, args.num_frames, config.image_size, config.latent_size
    result = {"parts": {}}
    if args.precision == "fp32":  # the parts once; autocast would only add casts
        pixel_values = torch.randn(B, T, 3, S, S)
        vae_latents = torch.randn(B, T, config.latent_channels, h, h)
        for name, (run, times) in step_parts(model, pixel_values, vae_latents).items():
            model.zero_grad(set_to_none=True)
            with DispatchCounter() as counter:
                run()
            result["parts"][name] = {key: times * value for key, value in counter.counts().items()}
        model.zero_grad(set_to_none=True)

    rows = [
        {
            "frames": torch.randint(0, 256, (T, S, S, 3), dtype=torch.uint8),
            "vae_latents": torch.randn(T, config.latent_channels, h, h),
            "moving_boxes": torch.full((T, MAX_MOVING_BOXES, 4), -1.0),
        }
        for _ in range(B * (args.warmup + args.steps + 1))
    ]

    class CountSteps(TrainerCallback):
        """Between `on_step_begin` and `on_step_end` (the batch is fetched before): times the steps after the warmup
        ones, then counts the dispatched operators of one more step (counting slows a step down)."""

        def __init__(self):
            self.seconds, self.counts = [], None

        def on_step_begin(self, training_args, state, control, **kwargs):
            self.counter = DispatchCounter().__enter__() if state.global_step == state.max_steps - 1 else None
            self.start = time.perf_counter()

        def on_step_end(self, training_args, state, control, **kwargs):
            seconds = time.perf_counter() - self.start
            if self.counter is not None:
                self.counter.__exit__(None, None, None)
                self.counts = self.counter.counts()
            elif state.global_step > warmup:
                self.seconds.append(seconds)

    warmup = args.warmup
    callback = CountSteps()
    with tempfile.TemporaryDirectory() as output_dir:
        training_args = TrainingArguments(
            output_dir=output_dir,
            per_device_train_batch_size=B,
            max_steps=args.warmup + args.steps + 1,
            logging_steps=10_000,  # no step of the measured ones logs
            logging_nan_inf_filter=bool(args.nan_filter),
            bf16=args.precision == "bf16",
            use_cpu=True,
            save_strategy="no",
            eval_strategy="no",
            report_to="none",
            remove_unused_columns=False,
            dataloader_num_workers=0,
            disable_tqdm=True,
            max_grad_norm=1.0,
        )
        trainer = FoveatedVLMTrainer(
            model=model,
            args=training_args,
            train_dataset=rows,
            data_collator=FoveatedVLMDataCollator(normalize_frames=False),
            callbacks=[callback],
        )
        trainer.train()
    result["step"] = {**callback.counts, "seconds": sorted(callback.seconds)[len(callback.seconds) // 2]}
    if args.precision == "fp32":
        # What torch.compile makes of the forward, without and with text (Phase 2): one graph lets CUDA graphs
        # (`reduce-overhead`) replay the whole step. After the timed steps: eager steps run after tracing were
        # measured 1.2-1.7x slower.
        input_ids = torch.randint(0, config.text_config.vocab_size, (B, 6))
        attention_mask = torch.ones_like(input_ids)
        attention_mask[0, -2:] = 0  # a padded caption
        for name, text in (("no text", {}), ("text", dict(input_ids=input_ids, attention_mask=attention_mask))):
            explained = torch._dynamo.explain(lambda: model(pixel_values, vae_latents, **text).loss)()
            result.setdefault("graphs", {})[name] = [explained.graph_count, explained.graph_break_count]
            torch._dynamo.reset()
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
        f"{'frozen' if settings.get('freeze_vision', 0) else 'trainable'} | {settings.get('num_frames', 8)}"
        f"{' + %d text' % settings['text_tokens'] if settings.get('text_tokens') else ''}"
        f"{' + %d target text' % settings['target_tokens'] if settings.get('target_tokens') else ''} | "
        f"{'NHWC' if settings.get('channels_last_head', 1) else 'NCHW'} | "
        f"{result['samples_per_s']:.2f} | {1e3 * result['seconds_per_step'] / settings['batch_size']:.1f} | "
        f"{result['peak_gb']:.2f} | {achieved:.2f} | {mfu} |"
    )


STEP_HEADER = (
    "| B | precision | grad ckpt | query | DINO | T | head convs | samples/s | ms/sample | peak GB | TFLOP/s | MFU |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=["cpu", "gpu"], default="gpu" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--tables",
        default="step,query",
        help="Comma-separated: step, query, parts (CPU: the step vs the sum of its parts), dispatch (CPU: kernel "
        "launches and host syncs per step), compile (the step eager and under torch.compile), teacher (the search "
        "teacher's cost per step), text (configs/phase2_text.yaml's step, captions as a target).",
    )
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="step", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--compile_batch_size", type=int, default=16, help="B of the compile table.")
    parser.add_argument("--batch_size", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--num_frames", type=int, default=8, help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--grad_ckpt", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--deep_query", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--freeze_vision", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--shapes", default="phase1", help=argparse.SUPPRESS)
    parser.add_argument("--compile", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--compile_mode", default="", help=argparse.SUPPRESS)
    parser.add_argument("--nan_filter", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--channels_last_head", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--text_tokens", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--target_tokens", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--teacher_grid", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--teacher_frames", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--teacher_search", default="frame", help=argparse.SUPPRESS)
    parser.add_argument("--teacher_frozen_scorer", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--teacher_samples", type=int, default=2, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        if args.device == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        runs = {"step": run_step_benchmark, "query": run_query_benchmark, "parts": run_parts_benchmark,
                "dispatch": run_dispatch_benchmark}
        print(json.dumps(runs[args.mode](args)))
        return

    tables = set(args.tables.split(","))
    if "parts" in tables:
        print_parts_table(args)
    if "dispatch" in tables:
        print_dispatch_tables(args)
    device = "cuda" if args.suite == "gpu" else "cpu"
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {os.cpu_count()} cores"
    if tables & {"step", "query"}:
        print(f"# phase1.yaml shapes (DINOv3-S/16 + SmolLM2-135M, random weights, 256 px, T=8 unless noted) "
              f"on {where}\n")
    common = dict(device=device, steps=args.steps, warmup=args.warmup)
    if device == "cpu":
        # phase1.yaml shapes take 5-7 s per clip and step on 2 cores in fp32 (B = 16: 17 GB of the machine's 24).
        # Without bf16 instructions (AVX2 only) a bf16 step is about 12x slower, so bf16 only at B = 1 and 2.
        grid = [dict(batch_size=b, precision="fp32") for b in (1, 2, 8, 16)]
        grid += [dict(batch_size=b, precision="bf16") for b in (1, 2)]
        grid += [dict(batch_size=1, precision="fp32", **change) for change in (
            dict(grad_ckpt=1), dict(deep_query=0), dict(freeze_vision=1))]
        grid += [dict(batch_size=1, precision="fp32", num_frames=t) for t in (4, 8, 16, 32)]
        # Phase 2's longest captions (`max_text_length` 256) in both LLM passes, at its 2 x 4 and at 8 x 1.
        grid += [dict(batch_size=b, precision="fp32", text_tokens=256) for b in (2, 8)]
    else:
        grid = [dict(batch_size=b, precision=p) for p in ("bf16", "fp32") for b in (1, 2, 8, 16)]
        # The eager step costs about the same host time at any B (docs/PERFORMANCE.md), so larger B amortises it.
        grid += [dict(batch_size=b, precision="bf16") for b in (32, 64)]
        grid += [dict(batch_size=8, precision="bf16", **change) for change in (
            dict(grad_ckpt=1), dict(deep_query=0), dict(freeze_vision=1), dict(channels_last_head=0))]
        grid += [dict(batch_size=2, precision="bf16", grad_ckpt=1)]
        grid += [dict(batch_size=4, precision="bf16", num_frames=t) for t in (4, 8, 16, 32)]
        grid += [dict(batch_size=b, precision="bf16", text_tokens=256) for b in (2, 8)]
    if "step" in tables:
        print_step_tables(grid, common, device)
    if "query" in tables:
        print_query_table(common, device)
    if "compile" in tables:
        print_compile_table(common, device, args.compile_batch_size)
    if "teacher" in tables:
        print_teacher_table(common, device)
    if "text" in tables:
        print_text_target_table(common, device)


def print_text_target_table(common, device):
    """configs/phase2_text.yaml's step: a 128-token caption (`max_text_length`, every token scored) read after the
    frames in both passes, whose LM head writes a vocabulary-wide logit row per token, with the joint objective;
    against the same step without text. TFLOP/s counts the frames' part of the step only (`count_flops`)."""
    precision = "bf16" if device == "cuda" else "fp32"
    print(f"\n## Text as a target (configs/phase2_text.yaml), {precision}\n")
    print(STEP_HEADER)
    for batch_size in (2, 8):
        for target_tokens in (0, 128):
            settings = dict(batch_size=batch_size, precision=precision, target_tokens=target_tokens)
            print(step_row(settings, run_child(mode="step", **common, **settings), device), flush=True)


def print_teacher_table(common, device):
    """The train step of configs/cued.yaml's model (saccades, B = 16, T = 8, 128 px) without and with the search
    teacher (foveated_vlm/teacher.py) at a few grids and frames per clip: what the teacher costs per step."""
    print(f"\n## The search teacher's cost, configs/cued.yaml's model, B = 16, fp32, on {device}\n")
    print("| teacher | candidates per clip | s/step | vs plain |\n|---|---|---|---|")
    plain = None
    # (search, grid, frames, frozen scorer, candidates trained per clip)
    rows = (("frame", 0, 0, 0, 2), ("frame", 4, 0, 0, 2), ("frame", 4, 2, 0, 2), ("frame", 8, 1, 0, 2),
            ("stay", 4, 0, 0, 2), ("stay", 4, 0, 0, 4), ("stay", 4, 0, 2, 2), ("stay", 4, 0, 1, 2))
    for search, grid, frames, frozen, samples in rows:
        settings = dict(batch_size=16, shapes="cued", teacher_grid=grid, teacher_frames=frames, teacher_search=search,
                        teacher_frozen_scorer=frozen, teacher_samples=samples)
        result = run_child(mode="step", **common, **settings)
        if "error" in result:
            print(f"| grid {grid} | error: {result['error'][:80]} |", flush=True)
            continue
        seconds = result["seconds_per_step"]
        plain = plain or seconds
        name = "off" if not grid else f"{search}: {grid}×{grid} cells, {frames or 'all'} frames"
        if grid and not frozen and search == "stay":
            name += f", {samples} of them trained per clip" + (" (the recipe's stage 1)" if samples == 4 else "")
        if frozen:
            # The frozen scorer searches each clip once (FoveatedVLMSearchTeacher.frozen_search).
            seen = "clips it has searched (from the second epoch)" if frozen == 1 else "new clips (the first epoch)"
            name += f", a frozen scorer, no candidate training (the recipe's stage 2): {seen}"
        # frame: one glimpse per cell and scored frame (7 frames with a next latent); stay: one re-run of Pass 2
        # (8 glimpses) per cell.
        candidates = grid * grid * (8 if search == "stay" else frames or 7)
        print(f"| {name} | {candidates} | {seconds:.2f} | {seconds / plain:.2f}× |", flush=True)


def print_step_tables(grid, common, device):
    print("## Train step (forward + backward + AdamW)\n")
    print(STEP_HEADER)
    flops = None
    for settings in grid:
        result = run_child(mode="step", **common, **settings)
        plain_t8 = settings.get("num_frames", 8) == 8 and not settings.get("text_tokens")
        flops = result.get("flops_per_sample", flops) if plain_t8 else flops
        print(step_row(settings, result, device), flush=True)
    if flops:
        print("\n## Forward FLOPs per sample (T=8), counted with torch.utils.flop_counter\n")
        print("| part | GFLOP | share |\n|---|---|---|")
        for name in ("encoder", "queries", "llm", "head"):
            print(f"| {name} | {flops[name] / 1e9:.2f} | {100 * flops[name] / flops['total']:.1f} % |")
        print(f"| total | {flops['total'] / 1e9:.2f} | 100 % |")


def print_compile_table(common, device, batch_size):
    """
    The step eager and under `torch.compile` (default mode; `reduce-overhead` = CUDA graphs on a GPU). On a CPU at
    hollow shapes: what compiling saves of the host's cost of issuing the step.
    """
    precision, shapes = ("bf16", "phase1") if device == "cuda" else ("fp32", "hollow")
    print(f"\n## torch.compile, B = {batch_size}, {precision}, {shapes} shapes\n")
    print("| model | warmup s | samples/s | ms/step | peak GB | vs eager |\n|---|---|---|---|---|---|")
    modes = ("default", "reduce-overhead") if device == "cuda" else ("default",)
    eager = None
    for mode in ("eager",) + modes:
        settings = dict(batch_size=batch_size, precision=precision, shapes=shapes)
        if mode != "eager":
            settings.update(compile=1, compile_mode="" if mode == "default" else mode)
        result = run_child(mode="step", **common, **settings)
        if "error" in result:
            print(f"| {mode} | error: {result['error'][:80]} |", flush=True)
            continue
        eager = eager or result["samples_per_s"]
        print(f"| {mode} | {result['warmup_seconds']:.0f} | {result['samples_per_s']:.2f} | "
              f"{1e3 * result['seconds_per_step']:.1f} | {result['peak_gb']:.2f} | "
              f"{result['samples_per_s'] / eager:.2f}x |", flush=True)


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
    """Train step vs the sum of its separately timed parts (CPU), tiny and phase1.yaml shapes."""
    print(f"# Train step vs the sum of its parts, CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)\n")
    for shapes, batch_size in (("tiny", 16), ("phase1", 1)):
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
        print(f"| {HEAD_PART}, contiguous conv weights | {1e3 * result['head_contiguous_seconds']:.1f} | "
              f"{result['head_contiguous_seconds'] / parts[HEAD_PART]:.2f}x the channels-last head |")
        if "compiled_step_seconds" in result:
            compiled = result["compiled_step_seconds"]
            print(f"| whole step, torch.compile (first step {result['compile_seconds']:.0f} s) | {1e3 * compiled:.1f} "
                  f"| {step / compiled:.2f}x faster than eager |")
        print(flush=True)


def print_dispatch_tables(args):
    """Kernel launches and host syncs per train step (CPU, counted), and the host's time to issue them."""
    print(f"# Kernel launches and host syncs per train step, CPU ({os.cpu_count()} cores, "
          f"{torch.get_num_threads()} threads), B = 1, T = 8\n")
    variants = [
        dict(shapes="hollow", precision="fp32", nan_filter=1),
        dict(shapes="hollow", precision="bf16", nan_filter=1),
        dict(shapes="hollow", precision="bf16", nan_filter=0),
        dict(shapes="phase1", precision="fp32", nan_filter=1),
    ]
    results = [run_child(mode="dispatch", batch_size=1, steps=args.steps, warmup=args.warmup, **v) for v in variants]
    parts = next((r["parts"] for r in results if r.get("parts")), None)
    if parts:
        print("## Per part, forward + backward (hollow shapes, fp32)\n")
        print("| part | operators | kernel launches | host syncs |\n|---|---|---|---|")
        for name, counts in parts.items():
            print(f"| {name} | {counts['operators']} | {counts['kernels']} | {counts['syncs']} |")
        print()
    for name, (graphs, breaks) in next((r["graphs"] for r in results if r.get("graphs")), {}).items():
        print(f"torch.compile of the forward ({name}): {graphs} graph(s), {breaks} graph break(s)")
    print()
    print("## The FoveatedVLMTrainer's step (forward, diagnostics, backward, clipping, fused AdamW; not a logging step)\n")
    print("| shapes | precision | logging_nan_inf_filter | operators | kernel launches | host syncs | CPU ms/step |")
    print("|---|---|---|---|---|---|---|")
    for variant, result in zip(variants, results):
        settings = f"| {variant['shapes']} | {variant['precision']} | {bool(variant['nan_filter'])} |"
        if "error" in result:
            print(f"{settings} error: {result['error'][:80]} |")
            continue
        step = result["step"]
        print(f"{settings} {step['operators']} | {step['kernels']} | {step['syncs']} | {1e3 * step['seconds']:.0f} |",
              flush=True)
    print()


if __name__ == "__main__":
    main()
