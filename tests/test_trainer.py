"""FoveatedVLMTrainer, foveated_vlm/metrics.py and train_hf.py: accumulation-correct metrics, one definition per metric, frozen parameters, Hub-ready folders, resume after
SIGKILL and two processes.

The end-to-end tests run train_hf.py on a tiny synthetic setup in subprocesses; they share one data cache, built by the
first run. The in-process tests use small Arrow datasets built directly.
"""

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from datasets import Array3D, Array4D, Dataset, Features
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import DINOv3ViTConfig, DINOv3ViTModel, LlamaConfig, LlamaModel, PreTrainedTokenizerFast
from transformers import TrainingArguments

from foveated_vlm import train as train_hf
from foveated_vlm.data import FoveatedVLMDataCollator, load_precomputed, model_inputs
from foveated_vlm.metrics import (
    CHANGED_CELL_THRESHOLD,
    clip_metrics,
    improvement_with_se,
    level_headroom,
    mean_metrics,
)
from modeling_foveated import FoveatedVLMModel, FoveatedVLMOutput
from foveated_vlm.probes import FoveatedVLMProbedModel, FoveatedVLMProbes, moving_box_centres
from tiny import TINY_TEXT, TINY_VISION, tiny_config
from foveated_vlm.tiny_vae import make_tiny_vae
from foveated_vlm.trainer import HOST_SYNC_OPERATORS, FoveatedVLMFigureCallback, FoveatedVLMTrainer

REPO_ROOT = Path(__file__).resolve().parents[1]
T, S, LATENT = 4, 64, 8  # tiny_config(): 4 frames of 64 px, latents 4 x 8 x 8
MAX_STEPS, SAVE_STEPS = 4, 2


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models gain nothing from threads, and on a busy 2-core machine OpenMP's spin-waiting makes them 10-50x
    slower (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


def training_arguments(output_dir, **overrides) -> TrainingArguments:
    settings = dict(
        per_device_train_batch_size=2,
        report_to="none",
        remove_unused_columns=False,
        save_strategy="no",
        use_cpu=True,
        seed=0,
    )
    settings.update(overrides)
    return TrainingArguments(str(output_dir), **settings)


# ---- In process ----


def test_metrics_are_means_over_accumulated_micro_batches(tmp_path):
    torch.manual_seed(0)
    model = FoveatedVLMModel(tiny_config())
    dataset = tiny_arrow_dataset(8)
    collator = FoveatedVLMDataCollator()
    # lr 0: the weights stay those of the hand computation; one step = 4 micro-batches of 2 clips = the whole set.
    args = training_arguments(tmp_path, gradient_accumulation_steps=4, learning_rate=0.0, max_steps=2, logging_steps=1)
    trainer = FoveatedVLMTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
    trainer.train()

    model.eval()
    with torch.no_grad():  # each clip on its own: the mean of per-clip losses is the mean over the 4 micro-batches
        outputs = [model(**_model_inputs(collator([dataset[i]]))) for i in range(len(dataset))]
    expected = {
        "loss/fine": np.mean([o.loss_fine.item() for o in outputs]),
        "loss/coarse": np.mean([o.loss_coarse.item() for o in outputs]),
        "attention/entropy_static": np.mean([o.entropy_coarse.item() for o in outputs]),
        "attention/entropy_dynamic": np.mean([o.entropy_fine.item() for o in outputs]),
        "loss": np.mean([o.loss.item() for o in outputs]),
    }
    expected["loss/ratio"] = expected["loss/coarse"] / expected["loss/fine"]
    expected["improvement"] = (expected["loss/coarse"] - expected["loss/fine"]) / expected["loss/coarse"]
    train_logs = [entry for entry in trainer.state.log_history if "loss/fine" in entry]
    assert [entry["step"] for entry in train_logs] == [1, 2]
    for entry in train_logs:
        for name, value in expected.items():
            assert entry[name] == pytest.approx(value, rel=1e-4, abs=1e-7), name
    # The per-clip losses differ, so a last-micro-batch-only or unweighted-sum log would not pass the check above.
    assert np.std([o.loss_fine.item() for o in outputs]) > 1e-4


@pytest.mark.slow
def test_captioned_micro_batches_train_like_one_batch(tmp_path):
    """configs/phase2.yaml trains 8 clips as one micro-batch where it used 2 x 4: captions of different lengths are
    then padded to the longest of 8 instead of 2. Padding is masked, so the trained models must agree."""
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(2, TINY_TEXT["vocab_size"])]
    captions = [" ".join(rng.choice(words, size=int(rng.integers(0, 12)))) for _ in range(32)]
    dataset = tiny_arrow_dataset(32).add_column("caption", captions)
    collator = FoveatedVLMDataCollator(tokenizer=_tiny_tokenizer(TINY_TEXT["vocab_size"]), normalize_frames=False)
    models, logs = [], []
    for batch_size, accumulation in ((8, 1), (2, 4)):
        torch.manual_seed(0)
        # SGD: AdamW's normalised steps turn the float rounding of a different summation order into weight changes
        # of the order of the learning rate, which would hide what this test looks for.
        args = training_arguments(
            tmp_path / f"{batch_size}x{accumulation}", per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation, optim="sgd", learning_rate=0.5, max_steps=8, logging_steps=2,
        )
        model = FoveatedVLMModel(tiny_config())
        trainer = FoveatedVLMTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
        trainer.train()
        models.append(model.eval())
        logs.append([entry for entry in trainer.state.log_history if "loss/fine" in entry])
    for single, split in zip(*logs):
        for name in ("loss", "loss/fine", "loss/coarse"):
            assert single[name] == pytest.approx(split[name], rel=1e-5), name
    # The losses hardly depend on the captions at this size; the predictions do. With the caption mask ignored the
    # two models' predictions differed by 5e-6 (measured), with it by 4e-8.
    batch = model_inputs(collator([dataset[i] for i in range(8)]))
    with torch.no_grad():
        one_batch, accumulated = (model(**batch).pred_fine for model in models)
    assert one_batch.abs().mean() > 1e-3
    torch.testing.assert_close(one_batch, accumulated, atol=1e-6, rtol=1e-4)


def test_state_contribution_only_on_steps_that_log(tmp_path, monkeypatch):
    from foveated_vlm import trainer as trainer_foveated

    flags = []

    def recording_metrics(model, outputs, batch, state_contribution=True):
        flags.append(state_contribution)
        return clip_metrics(model, outputs, batch, state_contribution)

    monkeypatch.setattr(trainer_foveated, "clip_metrics", recording_metrics)
    torch.manual_seed(0)
    args = training_arguments(tmp_path, gradient_accumulation_steps=2, max_steps=4, logging_steps=2)
    trainer = FoveatedVLMTrainer(
        model=FoveatedVLMModel(tiny_config()), args=args, train_dataset=tiny_arrow_dataset(8),
        data_collator=FoveatedVLMDataCollator(),
    )
    trainer.train()
    assert flags == [False, False, True, True] * 2  # 4 steps of 2 micro-batches; steps 2 and 4 log
    logs = [entry for entry in trainer.state.log_history if "loss/fine" in entry]
    assert [entry["step"] for entry in logs] == [2, 4]
    assert all("diag/state_contribution_fine" in entry for entry in logs)


class HostSyncRecorder(TorchDispatchMode):
    """Records, for every operator that makes the host wait for the device (`.item()`, `bool(tensor)`, outputs sized
    by the data), the innermost Python file outside torch that asked for it."""

    def __init__(self):
        super().__init__()
        self.callers = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in HOST_SYNC_OPERATORS:
            torch_dir = str(Path(torch.__file__).parent)
            frames = [frame.filename for frame in traceback.extract_stack() if not frame.filename.startswith(torch_dir)]
            self.callers.append(Path(frames[-2]))  # [-1] is this method
        return func(*args, **(kwargs or {}))

    def ours(self) -> list[Path]:
        """The callers in this repository's code, not in its installed dependencies."""
        return [path for path in self.callers if REPO_ROOT in path.parents and ".venv" not in path.parts]


@pytest.mark.parametrize("fine_queries", ["predicted", "oracle"])
def test_train_step_never_syncs_the_host_in_package_code(tmp_path, fine_queries):
    # On a GPU a sync stalls the launch queue; the step's own code must not ask for any (transformers' Llama does
    # once per pass, and the Trainer's NaN filter twice per micro-batch: train_hf.py turns that one off).
    config = tiny_config(
        head_type="spatial", head_residual=True, aux_current_weight=1.0, fixation_bias=True, glimpse_position=True,
        token_dim=8,
    )
    torch.manual_seed(0)
    model = FoveatedVLMProbedModel(config, FoveatedVLMProbes(fine_queries=fine_queries))
    args = training_arguments(tmp_path, logging_steps=1)  # the step logs: the state contribution runs too
    trainer = FoveatedVLMTrainer(model=model, args=args, data_collator=FoveatedVLMDataCollator(normalize_frames=False))
    batch = trainer.data_collator([tiny_arrow_dataset(2)[i] for i in range(2)])
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # what train() sets before its micro-batches
    with HostSyncRecorder() as recorder:  # one optimizer step of train(): micro-batch, clipping, optimizer
        loss = trainer.training_step(model, batch)
        trainer.accelerator.clip_grad_norm_(model.parameters(), trainer.args.max_grad_norm)  # as train() clips
        trainer.optimizer.step()
    assert recorder.ours() == []
    with recorder:  # the recorder does see a sync in this repository's code
        bool(loss > 0)
    assert recorder.ours() == [Path(__file__).resolve()]


def _model_inputs(batch: dict) -> dict:
    return {name: batch[name] for name in ("pixel_values", "vae_latents")}


def test_logged_eval_metrics_are_the_metrics_module_means(tmp_path):
    """One definition: what the trainer logs in evaluation is `mean_metrics` of `clip_metrics` over the same clips,
    batched the same way (the state contribution swaps states within a batch), and its standard errors are
    `FoveatedVLMImprovement`'s."""
    torch.manual_seed(0)
    model = FoveatedVLMModel(tiny_config())
    dataset = tiny_arrow_dataset(5)  # 2 + 2 + 1: an uneven last batch
    args = training_arguments(tmp_path, per_device_eval_batch_size=2)
    trainer = FoveatedVLMTrainer(model=model, args=args, eval_dataset=dataset, data_collator=FoveatedVLMDataCollator())
    logged = trainer.evaluate()
    collator = FoveatedVLMDataCollator()
    model.eval()
    parts = []
    with torch.no_grad():
        for rows in ([0, 1], [2, 3], [4]):
            batch = collator([dataset[i] for i in rows])
            parts.append(clip_metrics(model, model(**model_inputs(batch, model)), batch))
    per_clip = {name: torch.cat([part[name] for part in parts]) for name in parts[0]}
    expected = mean_metrics(per_clip)
    expected.update(improvement_with_se({name: values.numpy() for name, values in per_clip.items()}))
    assert {"tracking/dynamic", "diag/state_contribution_fine", "loss/fine_changed", "improvement_t2_se"} <= set(expected)
    for name, value in expected.items():
        # An improvement is a difference of two losses summed in float32 (each good to ~1e-7 relative) over one.
        absolute = 1e-6 if name.startswith("improvement") else 1e-7
        assert logged[f"eval_{name}"] == pytest.approx(value, rel=1e-4, abs=absolute), name
    fine = np.mean([model(**_model_inputs(collator([dataset[i]]))).loss_fine.item() for i in range(len(dataset))])
    assert logged["eval_loss/fine"] == pytest.approx(fine, rel=1e-4)  # weighted by clips, not by batches
    assert not any(name.startswith("loss/") for name in logged)


def test_tracking_is_absent_without_boxes(tmp_path):
    """Data without boxes (LLaVA-Video: the collator's moving_boxes are all -1) logs no tracking, not a tracking
    of 0; the metrics that need no boxes are still there."""
    torch.manual_seed(0)
    model = FoveatedVLMModel(tiny_config())
    args = training_arguments(tmp_path, per_device_train_batch_size=2, max_steps=2, logging_steps=1)
    trainer = FoveatedVLMTrainer(
        model=model, args=args, train_dataset=tiny_arrow_dataset(4, boxes=False),
        eval_dataset=tiny_arrow_dataset(3, boxes=False), data_collator=FoveatedVLMDataCollator(),
    )
    trainer.train()
    logged = [*[entry for entry in trainer.state.log_history if "loss/fine" in entry], trainer.evaluate()]
    for entry in logged:
        assert not any("tracking/" in name for name in entry), entry
        assert any(name.endswith("loss/fine_t2") for name in entry)
    batch = FoveatedVLMDataCollator()([tiny_arrow_dataset(2, boxes=False)[i] for i in range(2)])
    with torch.no_grad():
        outputs = model(**model_inputs(batch, model))
        per_clip = clip_metrics(model, outputs, batch)
        assert per_clip["tracking/dynamic"].isnan().all()  # per clip: undefined
        assert not any(name.startswith("tracking/") for name in mean_metrics(per_clip))  # means: absent
        del batch["moving_boxes"]
        assert not any(name.startswith("tracking/") for name in clip_metrics(model, outputs, batch))


class _Head:
    """A stand-in model whose head predicts each latent cell as the mean of the state: the state contribution of a
    hand-made output can then be computed by hand."""

    def predict_latents(self, states, prev_latents):
        return states.mean(-1)[..., None, None, None].expand(*states.shape[:2], *prev_latents.shape[2:])


def test_each_metric_matches_a_hand_computation():
    # 2 clips, T = 2 targets of 1 x 2 x 2 latent cells, P = 4 patches (a 2 x 2 grid).
    target = torch.zeros(2, 2, 1, 2, 2)
    target[0, 1, 0, 0, 0] = 1.0  # clip 0: one of the 4 cells changes at t = 2 (above CHANGED_CELL_THRESHOLD)
    target[1, 1] = CHANGED_CELL_THRESHOLD / 2  # clip 1: every cell changes, below the threshold
    pred_fine = target.clone()
    pred_fine[0, 1, 0, 0, 0] += 2.0  # clip 0, t = 2: error 4 on the changed cell ...
    pred_fine[0, 1, 0, 1, 1] += 1.0  # ... and 1 on an unchanged one
    pred_fine[1, 0] += 1.0  # clip 1: error 1 on all cells of t = 1 only
    pred_coarse = target + 1.0  # error 1 everywhere
    uniform, corner = torch.full((4,), 0.25), torch.tensor([1.0, 0.0, 0.0, 0.0])
    attn_coarse = torch.stack([torch.stack([uniform, uniform])] * 2)  # (2, 2, 4)
    attn_fine = torch.stack([torch.stack([uniform, corner])] * 2)
    boxes = torch.full((2, 2, 1, 4), -1.0)
    boxes[0, :, 0] = torch.tensor([0.0, 0.0, 0.5, 0.5])  # clip 0: the top-left patch on both frames
    boxes[1, 0, 0] = torch.tensor([0.0, 0.0, 1.0, 1.0])  # clip 1: a box on frame 1 only, which tracking leaves out
    state_coarse = torch.zeros(2, 2, 3)
    state_coarse[1] = 3.0  # swapping clips moves clip 0's coarse prediction to 3, clip 1's to 0
    state_fine = state_coarse.clone()
    prev_latents = torch.cat([torch.zeros(2, 1, 1, 2, 2), target[:, :-1]], dim=1)
    outputs = FoveatedVLMOutput(
        loss_fine=(pred_fine - target).pow(2).mean(), loss_coarse=(pred_coarse - target).pow(2).mean(),
        loss_aux=torch.tensor(0.5), pred_fine=pred_fine, pred_coarse=pred_coarse, attn_coarse=attn_coarse,
        attn_fine=attn_fine, state_coarse=state_coarse, state_fine=state_fine, prev_latents=prev_latents,
    )
    metrics = clip_metrics(_Head(), outputs, {"vae_latents": target, "moving_boxes": boxes})
    # Clip 0: fine errors 4 + 1 over 8 cells; clip 1: 4 x 1 over 8 cells. Coarse: 1 everywhere.
    expected = {
        "loss/fine": [5 / 8, 4 / 8],
        "loss/coarse": [1.0, 1.0],
        "loss/aux": [0.5, 0.5],
        "loss/fine_t2": [5 / 4, 0.0],
        "loss/coarse_t2": [1.0, 1.0],
        "loss/copy_t2": [1 / 4, (CHANGED_CELL_THRESHOLD / 2) ** 2],
        "loss/fine_changed": [4.0, math.nan],  # clip 1 has no changed cell
        "loss/fine_unchanged": [1 / 3, 0.0],
        "attention/entropy_static": [math.log(4)] * 2,
        "attention/entropy_dynamic": [math.log(4) / 2] * 2,  # frame 1 uniform, frame 2 one-hot
        "tracking/dynamic": [1.0, math.nan],  # clip 0, frame 2: all mass on the box's patch
        "tracking/static": [0.25, math.nan],
        "tracking/chance": [0.25, math.nan],
        "tracking/static_first": [0.25, 1.0],  # frame 1 counts here: clip 1's box covers the whole frame
    }
    # State contribution at t = 2, coarse: clip 0 swapped predicts 3 against targets {1, 0, 0, 0} -> (4 + 27) / 4,
    # unswapped 1 -> 1; clip 1 swapped predicts 0 against 0.05 everywhere -> 0.0025, unswapped 1.
    swapped = [(4 + 3 * 9) / 4 - 1.0, (CHANGED_CELL_THRESHOLD / 2) ** 2 - 1.0]
    expected["diag/state_contribution_coarse"] = swapped
    # Fine: unswapped errors at t = 2 are 5/4 and 0; swapped the same as coarse.
    expected["diag/state_contribution_fine"] = [(4 + 3 * 9) / 4 - 5 / 4, (CHANGED_CELL_THRESHOLD / 2) ** 2]
    assert set(metrics) == set(expected)
    for name, values in expected.items():
        torch.testing.assert_close(metrics[name], torch.tensor(values), equal_nan=True, msg=name)
    means = mean_metrics(metrics)
    assert means["loss/fine_changed"] == 4.0 and means["tracking/dynamic"] == 1.0  # NaN clips are left out
    assert means["improvement"] == pytest.approx((1.0 - 9 / 16) / 1.0)
    assert means["loss/ratio"] == pytest.approx(16 / 9)
    assert means["improvement_t2"] == pytest.approx(1.0 - 5 / 8)


def test_level_headroom_on_a_hand_computed_example():
    # Latents (N, T, C=2, 1, 1): channel 0 carries the change, channel 1 stays 0 (so each MSE is half the
    # channel-0 one). Training changes by (level before, level after): (0, 1): +1, +1; (1, 0): -1; (0, 0): 0.
    def latents(values):
        values = np.array(values, dtype=float)[..., None, None, None]  # (N, T, 1, 1, 1)
        return np.concatenate([values, np.zeros_like(values)], axis=2)

    train_latents, train_levels = latents([[0, 1, 0], [0, 0, 1]]), [[0, 1, 0], [0, 0, 1]]
    eval_latents, eval_levels = latents([[0, 2, 0]]), [[0, 1, 0]]  # changes +2 at (0, 1), -2 at (1, 0)
    measured = level_headroom(train_latents, train_levels, eval_latents, eval_levels)
    # Known next level: predicted +1 and -1, errors 1 and 1. Unknown: from level 0 the mean of +1, 0, +1 = 2/3
    # (error (4/3)^2 = 16/9), from level 1 -1 (error 1). Copy: errors 4 and 4.
    assert measured["mse_level_known"] == pytest.approx(1 / 2)
    assert measured["mse_level_unknown"] == pytest.approx((16 / 9 + 1) / 2 / 2)
    assert measured["mse_copy"] == pytest.approx(4 / 2)
    assert measured["headroom"] == pytest.approx(25 / 36 - 1 / 2)
    with pytest.raises(ValueError, match=r"levels \(1, 1\)"):
        level_headroom(train_latents, train_levels, eval_latents, [[0, 1, 1]])


def test_frozen_parameters_get_no_optimizer_state(tmp_path):
    torch.manual_seed(0)
    model = FoveatedVLMModel(tiny_config())
    train_hf.freeze_for_training(model, freeze_vision=True)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    assert any(name.startswith("encoder.backbone.") for name in frozen)
    args = training_arguments(tmp_path, learning_rate=1e-2, weight_decay=0.1, max_steps=2)
    trainer = FoveatedVLMTrainer(
        model=model, args=args, train_dataset=tiny_arrow_dataset(4), data_collator=FoveatedVLMDataCollator()
    )
    trainer.train()

    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    with_state = {id(p) for p in trainer.optimizer.state}
    for name, parameter in model.named_parameters():
        if name in frozen:
            assert id(parameter) not in optimized and id(parameter) not in with_state, name
            assert torch.equal(parameter, frozen[name]), f"{name} changed (weight decay on a frozen parameter?)"
    assert with_state == {id(p) for p in model.parameters() if p.requires_grad}


def test_phase_configs_build_offline_from_local_backbones(tmp_path):
    vision_dir, text_dir = tmp_path / "dinov3", tmp_path / "llama"
    DINOv3ViTModel(DINOv3ViTConfig(**TINY_VISION)).save_pretrained(vision_dir)
    LlamaModel(LlamaConfig(**{k: v for k, v in TINY_TEXT.items() if k != "model_type"})).save_pretrained(text_dir)
    _tiny_tokenizer(vocab_size=TINY_TEXT["vocab_size"]).save_pretrained(text_dir)
    for config_name in ("phase1", "phase2"):
        model_args, data_args, training_args, _, _ = train_hf.parse_arguments(
            [f"configs/{config_name}.yaml", "--vision_model", str(vision_dir), "--text_model", str(text_dir)]
            + ["--bf16", "false", "--output_dir", str(tmp_path / config_name)]
        )
        # 8 clips per optimizer step, however they are split into micro-batches.
        effective_batch = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
        assert effective_batch == 8 and training_args.learning_rate == 1e-4
        assert training_args.report_to == ["tensorboard"] and not training_args.remove_unused_columns
        # Phase 1 trains compiled (docs/PERFORMANCE.md); Phase 2's captions change the shapes from batch to batch.
        assert training_args.torch_compile == (config_name == "phase1")
        model = train_hf.build_model(model_args, data_args, latent_shape=(4, 32, 32))
        config = model.config
        assert (config.image_size, config.num_frames, config.latent_size, config.query_dim) == (256, 8, 32, 384)
        assert config.vision_config.hidden_size == TINY_VISION["hidden_size"]
        assert config.text_config.hidden_size == TINY_TEXT["hidden_size"]
        processor = train_hf.build_processor(model_args, data_args, config.text_config.vocab_size)
        assert processor.tokenizer is not None  # always, so that every checkpoint takes text
        # ... but the captions reach the model only in Phase 2: Phase 1 ignores text.
        clips = tiny_arrow_dataset(2)
        data = train_hf.PreparedData(clips, clips, "", "", "", use_captions=data_args.use_captions)
        training_args.num_attention_figures = 0
        trainer = train_hf.build_trainer(model, processor, data, model_args, data_args, training_args)
        assert (trainer.data_collator.tokenizer is not None) == (config_name == "phase2")


def test_a_random_recipe_reads_with_a_pretrained_llm_named_on_the_command_line(tmp_path, caplog):
    """configs/cued.yaml (random backbones) with --text_model: the YAML's text_config is set aside with a notice, the
    encoder stays the recipe's random one and the LLM carries the named weights; a text_config given on the command
    line beside the name is refused, naming it."""
    text_dir = tmp_path / "llama"
    torch.manual_seed(0)
    text = LlamaModel(LlamaConfig(**{k: v for k, v in TINY_TEXT.items() if k != "model_type"}))
    text.save_pretrained(text_dir)
    with caplog.at_level(logging.WARNING, logger="foveated_vlm.train"):
        model_args, data_args, _, _, _ = train_hf.parse_arguments(
            ["configs/cued.yaml", "--text_model", str(text_dir), "--output_dir", str(tmp_path / "out")]
        )
    assert "text_config set aside" in caplog.text and model_args.text_config is None
    model = train_hf.build_model(model_args, data_args, latent_shape=(4, 16, 16))
    recipe = yaml.safe_load(Path("configs/cued.yaml").read_text())
    assert model.config.vision_config.hidden_size == recipe["vision_config"]["hidden_size"]
    assert model.config.text_config.hidden_size == TINY_TEXT["hidden_size"]
    torch.testing.assert_close(model.language_model.norm.weight, text.norm.weight)
    torch.testing.assert_close(model.language_model.embed_tokens.weight, text.embed_tokens.weight)

    model_args, data_args, _, _, _ = train_hf.parse_arguments(
        ["configs/cued.yaml", "--text_model", str(text_dir), "--text_config", json.dumps(TINY_TEXT)]
        + ["--output_dir", str(tmp_path / "out")]
    )
    with pytest.raises(ValueError, match="^text_config describes a random backbone"):
        train_hf.build_model(model_args, data_args, latent_shape=(4, 16, 16))


def test_figures_reach_tensorboard_and_wandb_through_the_trainers_integrations(tmp_path):
    """The attention figures go to every integration report_to enabled (here TensorBoard, and a wandb run faked
    where the WandbCallback keeps it), at the evaluation's step; with report_to none the callback draws nothing."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers.integrations import WandbCallback

    class FakeWandb:  # what WandbCallback calls on the wandb module
        logged = []

        @staticmethod
        def Image(figure):
            return ("image", type(figure).__name__)

        @classmethod
        def log(cls, values):
            cls.logged.append(values)

    wandb_callback = WandbCallback.__new__(WandbCallback)  # no wandb installed, and no run to start
    wandb_callback._wandb, wandb_callback._initialized = FakeWandb, True
    clips = tiny_arrow_dataset(4)
    collator = FoveatedVLMDataCollator()
    args = training_arguments(tmp_path, report_to="tensorboard")
    trainer = FoveatedVLMTrainer(model=FoveatedVLMModel(tiny_config()), args=args, eval_dataset=clips,
                                 data_collator=collator)  # fmt: skip
    trainer.add_callback(wandb_callback)
    trainer.add_callback(FoveatedVLMFigureCallback(clips, collator, None, 2, trainer.callback_handler))
    trainer.evaluate()
    (run,) = {path.parent for path in (tmp_path / "runs").rglob("events.out.tfevents.*")}
    images = EventAccumulator(str(run), size_guidance={"images": 0}).Reload().Tags()["images"]
    assert set(images) == {"attention/clip_0", "attention/clip_1"}
    (logged,) = [values for values in FakeWandb.logged if "attention/clip_0" in values]  # the rest: scalars
    assert logged == {"attention/clip_0": ("image", "Figure"), "attention/clip_1": ("image", "Figure"),
                      "train/global_step": 0}  # fmt: skip

    silent = training_arguments(tmp_path / "none")
    trainer = FoveatedVLMTrainer(model=FoveatedVLMModel(tiny_config()), args=silent, eval_dataset=clips,
                                 data_collator=collator)  # fmt: skip
    figures = FoveatedVLMFigureCallback(clips, collator, None, 2, trainer.callback_handler)
    figures.batch = None  # drawing would fail on it
    trainer.add_callback(figures)
    trainer.evaluate()


def test_evaluation_keeps_only_the_losses_table1_needs(tmp_path, monkeypatch):
    """Evaluation holds no output tensor of the split: every prediction step returns its loss alone (the Trainer asks
    for the loss only when no compute_metrics is set), and Table 1's standard errors keep one row of losses per
    clip."""
    returned = []
    original = FoveatedVLMTrainer.prediction_step

    def spy(self, *args, **kwargs):
        returned.append(original(self, *args, **kwargs))
        return returned[-1]

    monkeypatch.setattr(FoveatedVLMTrainer, "prediction_step", spy)
    args = training_arguments(tmp_path, per_device_eval_batch_size=2)
    trainer = FoveatedVLMTrainer(model=FoveatedVLMModel(tiny_config()), args=args, eval_dataset=tiny_arrow_dataset(6),
                                 data_collator=FoveatedVLMDataCollator())  # fmt: skip
    metrics = trainer.evaluate()
    assert len(returned) == 3 and all(logits is None and labels is None for _, logits, labels in returned)
    assert "eval_improvement_se" in metrics and not trainer._eval_clip_losses  # cleared once logged


def _tiny_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<pad>": 1, **{f"w{i}": i for i in range(2, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>")


def test_bf16_on_a_cpu_without_bf16_instructions_warns(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(train_hf, "cpu_has_native_bf16", lambda: False)
    for bf16, warns in ((True, True), (False, False)):
        caplog.clear()
        args = train_hf.FoveatedTrainingArguments(output_dir=str(tmp_path), use_cpu=True, bf16=bf16)
        with caplog.at_level(logging.WARNING, logger=train_hf.__name__):
            train_hf.warn_if_emulated_bf16(args)
        assert ("`--bf16 false`" in caplog.text) == warns


# ---- End to end: train_hf.py in subprocesses on a tiny synthetic setup ----


def _write_tiny_config(folder: Path, cache_dir: Path, vae: str) -> Path:
    # The processor always carries a tokenizer; the random tiny LLM's vocabulary fits this one.
    _tiny_tokenizer(vocab_size=TINY_TEXT["vocab_size"]).save_pretrained(folder / "tokenizer")
    config = {
        "vision_model": "",
        "text_model": "",
        "tokenizer": str(folder / "tokenizer"),
        "vision_config": dict(TINY_VISION),
        "text_config": dict(TINY_TEXT),
        "model_config": {"query_dim": 16, "head_channels": 16, "head_mlp_dim": 32},
        "data_source": "synthetic",
        "num_train_videos": 8,
        "num_eval_videos": 4,
        "synthetic_size": S,
        "num_video_frames": 8,
        "num_frames": T,
        "image_size": S,
        "vae": vae,
        "cache_dir": str(cache_dir),
        "per_device_train_batch_size": 2,
        "per_device_eval_batch_size": 2,
        "learning_rate": 1e-3,
        # Constant: the schedule does not depend on max_steps, so a killed run may be planned longer than its resume.
        "lr_scheduler_type": "constant",
        "max_steps": MAX_STEPS,
        "logging_steps": 1,
        # The Trainer evaluates at step 2 and, being the last, at step 4: train_hf.py reuses that one (one final
        # evaluation). The two-process run covers "no".
        "eval_strategy": "steps",
        "eval_steps": SAVE_STEPS,
        "save_steps": SAVE_STEPS,
        "report_to": "tensorboard",
        "num_attention_figures": 2,
        "dataloader_num_workers": 0,
        "dataloader_pin_memory": False,  # no accelerator here: torch warns at every loader otherwise
        "seed": 0,
    }
    path = folder / "tiny_test.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _env() -> dict:
    # One thread per process: the tiny model gains nothing from more, and two processes on two cores would otherwise
    # oversubscribe them.
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT))


def _run(command: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        pytest.fail(f"{command} exited with {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One uninterrupted `python train_hf.py CONFIG --max_steps 4` run; its data cache serves the other runs."""
    folder = tmp_path_factory.mktemp("tiny_run")
    # `vae: tiny` fits for minutes; a few steps make latents of the right shape, which is all these tests need.
    vae = make_tiny_vae(folder / "vae", image_size=S, num_train_frames=16, steps=5)
    config = _write_tiny_config(folder, folder / "data", vae)
    output_dir = folder / "run"
    result = _run([sys.executable, "train_hf.py", str(config), "--max_steps", str(MAX_STEPS), "--output_dir", str(output_dir)])
    return {"config": config, "output_dir": output_dir, "stdout": result.stdout}


HUB_FILES = (
    "config.json",
    "model.safetensors",
    "configuration_foveated.py",
    "modeling_foveated.py",
    "processing_foveated.py",
    "processor_config.json",
    "README.md",
)


@pytest.mark.slow
def test_end_to_end_run_prints_table1_and_saves_hub_ready_folders(tiny_run, run_isolated_python):
    output_dir = tiny_run["output_dir"]
    assert "| loss_coarse    |" in tiny_run["stdout"] and "Wall time" in tiny_run["stdout"]
    eval_results = json.loads((output_dir / "eval_results.json").read_text())
    assert {"eval_loss/fine", "eval_loss/coarse", "eval_improvement"} <= set(eval_results)
    checkpoint = output_dir / f"checkpoint-{SAVE_STEPS}"
    for folder in (output_dir, checkpoint):
        missing = [name for name in HUB_FILES if not (folder / name).is_file()]
        assert not missing, f"{folder} lacks {missing}"
        config = json.loads((folder / "config.json").read_text())
        assert config["auto_map"]["AutoModel"] == "modeling_foveated.FoveatedVLMModel"

    readme = (output_dir / "README.md").read_text()
    assert readme.startswith("---\n") and "library_name: transformers" in readme
    # No pipeline can call the model, so the card names none; random backbones carry the package's licence.
    assert "pipeline_tag:" not in readme and "license: apache-2.0" in readme
    assert f"the local folder, \"{output_dir}\"" in readme
    assert f"| loss_fine      | {eval_results['eval_loss/fine']:.4f} |" in readme
    # A checkpoint's card holds the evaluation made at its step (the Trainer evaluates before it saves).
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    at_checkpoint = next(entry for entry in history if "eval_loss" in entry and entry["step"] == SAVE_STEPS)
    assert f"| loss_fine      | {at_checkpoint['eval_loss/fine']:.4f} |" in (checkpoint / "README.md").read_text()
    # The analysis report is written after training, and the model card links its figures (the checkpoint's has none).
    report = output_dir / "report"
    assert (report / "report.md").is_file() and (report / "report.html").is_file()
    for figure in ("fig1_losses.png", "fig2_ratio.png", "fig3_attention_0.png", "fig4_predictions.png"):
        assert (report / figure).is_file() and f"(report/{figure})" in readme, figure
    assert "(report/report.md)" in readme and "report/" not in (checkpoint / "README.md").read_text()
    # The figures go through the Trainer's TensorBoard integration: into its one run, beside the scalars.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run,) = {path.parent for path in (output_dir / "runs").rglob("events.out.tfevents.*")}
    images = EventAccumulator(str(run), size_guidance={"images": 0}).Reload().Tags()["images"]
    assert {"attention/clip_0", "predictions"} <= set(images), images
    data_paths = json.loads((output_dir / "data_paths.json").read_text())  # for foveated_vlm/report.py
    assert len(load_precomputed(data_paths["eval_dataset"])) == 4 and Path(data_paths["vae"]).is_dir()
    assert data_paths["use_captions"] is False  # the report reads the clips as training did
    assert json.loads((output_dir / "training_args.json").read_text())["max_steps"] == MAX_STEPS

    for folder in (output_dir, checkpoint):
        run_isolated_python(
            f"""
            import torch
            from transformers import AutoModel, AutoProcessor
            model, info = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True, output_loading_info=True)
            assert not info["missing_keys"] and not info["unexpected_keys"], info
            processor = AutoProcessor.from_pretrained({str(folder)!r}, trust_remote_code=True)
            assert type(model).__name__ == "FoveatedVLMModel" and type(processor).__name__ == "FoveatedVLMProcessor"
            assert processor.video_processor.num_frames == {T} and processor.video_processor.image_size == {S}
            output = model(torch.randn(1, {T}, 3, {S}, {S}), torch.randn(1, {T}, 4, {LATENT}, {LATENT}))
            assert torch.isfinite(output.loss)
            """,
            folder.parent,
        )


@pytest.mark.slow
def test_final_evaluation_runs_once(tiny_run):
    """The Trainer evaluates at the last step itself: train_hf.py reuses that evaluation for Table 1 instead of
    running a second one, so the log history and TensorBoard hold it once."""
    output_dir = tiny_run["output_dir"]
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    evaluations = [entry for entry in history if "eval_loss" in entry]
    assert [entry["step"] for entry in evaluations] == [SAVE_STEPS, MAX_STEPS]
    eval_results = json.loads((output_dir / "eval_results.json").read_text())
    assert eval_results == {name: value for name, value in evaluations[-1].items() if name != "step"}
    assert eval_results["eval_improvement_se"] > 0
    assert len(list((output_dir / "runs").rglob("events.out.tfevents.*"))) == 1


@pytest.mark.slow
def test_saved_folder_holds_no_pickle(tiny_run):
    """Every file of the final folder (checkpoints aside: they keep the optimizer state a resume needs) is one the
    Hub can show without unpickling: no pickle, no torch.save zip."""
    output_dir = tiny_run["output_dir"]
    files = [path for path in output_dir.rglob("*") if path.is_file() and not path.relative_to(output_dir).parts[0].startswith("checkpoint-")]
    assert {"model.safetensors", "training_args.json", "trainer_state.json", "README.md"} <= {p.name for p in files}
    for path in files:
        assert path.suffix not in (".bin", ".pt", ".pth", ".pkl", ".pickle"), path
        head = path.read_bytes()[:2]
        assert not head.startswith(b"\x80") and head != b"PK", f"{path} is a pickle or a torch.save zip"
    assert not list(output_dir.rglob("training_args.bin"))  # nor in the checkpoints


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(tiny_run, tmp_path):
    output_dir = tmp_path / "killed"
    # Planned far longer than it will live; with a constant learning rate only the step count matters.
    command = [sys.executable, "train_hf.py", str(tiny_run["config"]), "--output_dir", str(output_dir)]
    process = subprocess.Popen(command + ["--max_steps", "1000"], cwd=REPO_ROOT, env=_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state_file = output_dir / f"checkpoint-{SAVE_STEPS}" / "trainer_state.json"
    deadline = time.monotonic() + 240
    while not _is_complete_json(state_file):  # trainer_state.json is the last file a checkpoint gets
        assert process.poll() is None, f"the run ended before checkpoint-{SAVE_STEPS}:\n{process.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()
    assert process.returncode == -signal.SIGKILL

    checkpoint = output_dir / f"checkpoint-{SAVE_STEPS}"
    _run(command + ["--max_steps", str(MAX_STEPS), "--resume_from_checkpoint", str(checkpoint)])
    resumed = load_file(output_dir / "model.safetensors")
    uninterrupted = load_file(tiny_run["output_dir"] / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for name in resumed:
        assert torch.allclose(resumed[name], uninterrupted[name], rtol=1e-5, atol=1e-6), name
    initial = load_file(checkpoint / "model.safetensors")
    assert any(not torch.equal(initial[name], resumed[name]) for name in resumed), "the resumed run did not train"


def _is_complete_json(path: Path) -> bool:
    try:
        json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return True


# Launched by accelerate on every rank: train, then record what this rank ended with.
TWO_PROCESS_SCRIPT = """
import hashlib, json, sys
import torch
from foveated_vlm import train as train_hf

trainer = train_hf.main(sys.argv[2:])
digest = hashlib.sha256()
for name, parameter in sorted(trainer.model.state_dict().items()):
    digest.update(name.encode())
    digest.update(parameter.detach().cpu().contiguous().numpy().tobytes())
rank = trainer.args.process_index
with open(f"{sys.argv[1]}/rank{rank}.json", "w") as f:
    json.dump({"params": digest.hexdigest(), "log_history": trainer.state.log_history}, f)
"""


@pytest.mark.slow
def test_two_processes_end_identical_and_log_once(tiny_run, tmp_path):
    script = tmp_path / "two_process_run.py"
    script.write_text(TWO_PROCESS_SCRIPT)
    output_dir = tmp_path / "ddp"
    # The shipped accelerate config (a multi-GPU launch: one process each through torch.distributed.run); use_cpu
    # makes them one gloo group on the CPU. (`accelerate launch --cpu` would start a single process.)
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2"]
    launch = [*accelerate, "--config_file", "configs/accelerate/ddp.yaml"]
    run_args = [str(tiny_run["config"]), "--max_steps", "3", "--output_dir", str(output_dir), "--use_cpu", "true",
                "--eval_strategy", "no"]
    _run(launch + [str(script), str(tmp_path), *run_args], timeout=400)

    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0]["params"] == ranks[1]["params"]
    # Metrics are reduced across ranks identically, so both ranks hold the same (global) values.
    logs = [[entry for entry in rank["log_history"] if "loss/fine" in entry or "eval_loss/fine" in entry] for rank in ranks]
    # 3 training logs, then the one final evaluation that eval_strategy "no" gets at the last step.
    assert [entry["step"] for entry in logs[0]] == [1, 2, 3, 3]
    assert sum("eval_loss/fine" in entry for entry in logs[0]) == 1
    timings = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second")
    assert [{k: v for k, v in entry.items() if k not in timings} for entry in logs[0]] == [
        {k: v for k, v in entry.items() if k not in timings} for entry in logs[1]
    ]

    # Only rank 0 writes: one trainer_state.json log history and TensorBoard files from a single process.
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert [entry["step"] for entry in state["log_history"] if "loss/fine" in entry] == [1, 2, 3]
    event_files = list((output_dir / "runs").rglob("events.out.tfevents.*"))
    writers = {path.name.split(".")[-2] for path in event_files}  # events.out.tfevents.<time>.<host>.<pid>.<n>
    assert event_files and len(writers) == 1, event_files
    # The final evaluation ran inside training: one event file, scalars and figures.
    assert len(event_files) == 1, event_files

    # FSDP with the shipped config (each DINOv3 and Llama layer sharded over the two processes) trains the same
    # model and saves one ordinary checkpoint. On the CPU, FSDP cannot broadcast the initial weights
    # (sync_module_states); every rank builds the same ones from the seed anyway.
    fsdp_dir = tmp_path / "fsdp"
    fsdp = [*accelerate, "--config_file", "configs/accelerate/fsdp.yaml", "--fsdp_sync_module_states", "false"]
    _run(fsdp + ["train_hf.py", *run_args[:-6], "--output_dir", str(fsdp_dir), "--use_cpu", "true",
                 "--eval_strategy", "no", "--write_report", "false"], timeout=400)
    sharded, replicated = (FoveatedVLMModel.from_pretrained(folder) for folder in (fsdp_dir, output_dir))
    for (name, value), (_, reference) in zip(sharded.state_dict().items(), replicated.state_dict().items()):
        torch.testing.assert_close(value, reference, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.slow
def test_profile_memory_runs_one_step_and_reports_peak(tiny_run, tmp_path, capsys):
    trainer = train_hf.main([str(tiny_run["config"]), "--profile_memory", "--output_dir", str(tmp_path / "profile")])
    assert trainer.state.global_step == 1
    assert "Peak memory:" in capsys.readouterr().out
    assert not list((tmp_path / "profile").glob("checkpoint-*"))
    # train_hf.py's default: the head's conv weights, and the optimizer state that follows them, are channels-last.
    head_weight = trainer.model.prediction_head.latent_decoder[-1].weight
    assert head_weight.is_contiguous(memory_format=torch.channels_last) and not head_weight.is_contiguous()
    assert trainer.optimizer.state[head_weight]["exp_avg"].is_contiguous(memory_format=torch.channels_last)


def test_oracle_fixations_are_the_moving_box_centres():
    boxes = torch.full((1, 2, 4, 4), -1.0)
    boxes[0, 0, 0] = torch.tensor([0.0, 0.5, 0.5, 1.0])  # x0, y0, x1, y1: centre x 0.25, y 0.75
    centres = moving_box_centres(boxes)
    torch.testing.assert_close(centres, torch.tensor([[[0.5, -0.5], [0.0, 0.0]]]))  # (y, x); no box -> centre
    model = FoveatedVLMProbedModel(tiny_config(), FoveatedVLMProbes(fine_queries="oracle"))
    inputs = model_inputs({"frames": torch.zeros(1, 2, 8, 8, 3, dtype=torch.uint8), "moving_boxes": boxes}, model)
    assert set(inputs) == {"pixel_values", "oracle_fixations"}


def test_state_contribution_is_zero_for_a_head_that_ignores_its_state():
    torch.manual_seed(0)
    model = FoveatedVLMModel(tiny_config()).eval()
    pixel_values, vae_latents = torch.randn(3, 4, 3, 64, 64), torch.randn(3, 4, 4, 8, 8)
    batch = {"vae_latents": vae_latents}
    with torch.no_grad():
        model.prediction_head.film[-1].weight.normal_(std=1.0)  # a head that reads its state strongly
        reading = clip_metrics(model, model(pixel_values, vae_latents), batch)
        model.prediction_head.film[-1].weight.zero_()
        model.prediction_head.film[-1].bias.zero_()
        ignoring = clip_metrics(model, model(pixel_values, vae_latents), batch)
    assert ignoring["diag/state_contribution_fine"].abs().max() < 1e-6
    assert reading["diag/state_contribution_fine"].abs().min() > 1e-6


@pytest.mark.parametrize("difficulty, marked", [("cued", "marked in frame 0"), ("cued_motion", "the only one that moves"),
                                                 ("medium", None)])
def test_the_clips_description_names_the_positive_control(tmp_path, difficulty, marked):
    # What the model card, Table 1's printout and the report say the numbers are on.
    argv = ["configs/cued.yaml", "--difficulty", difficulty, "--cache_dir", str(tmp_path), "--num_train_videos", "1",
            "--num_eval_videos", "1"]
    _, data_args, _, _, _ = train_hf.parse_arguments(argv)
    _, _, description = train_hf.split_videos(data_args, data_args.split_seed)
    assert description.startswith("Synthetic clips") and f"({difficulty}: " in description
    assert ("positive control" in description) == (marked is not None)
    assert marked is None or marked in description
