"""FoveatedVLMTrainer (foveated_vlm/trainer.py): the metrics of foveated_vlm/metrics.py logged as means over accumulated
micro-batches and in evaluation (one definition per metric), frozen parameters, no host sync in a training step,
figures through the Trainer's integrations.

The tests train in process on small Arrow datasets built directly (runs.tiny_arrow_dataset).
"""

import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import TrainingArguments

from foveated_vlm import train as train_hf
from foveated_vlm.data import FoveatedVLMDataCollator, model_inputs
from foveated_vlm.metrics import clip_metrics, improvement_with_se, mean_metrics
from modeling_foveated import FoveatedVLMModel
from foveated_vlm.probes import FoveatedVLMProbes, apply_probes
from runs import tiny_arrow_dataset
from tiny import TINY_TEXT, numbered_tokenizer, tiny_config
from foveated_vlm.trainer import HOST_SYNC_OPERATORS, FoveatedVLMFigureCallback, FoveatedVLMTrainer

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models gain nothing from threads, and on a busy 2-core machine OpenMP's spin-waiting makes them 10-50x
    slower (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
        "attention/entropy_coarse": np.mean([o.entropy_coarse.item() for o in outputs]),
        "attention/entropy_fine": np.mean([o.entropy_fine.item() for o in outputs]),
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
    collator = FoveatedVLMDataCollator(tokenizer=numbered_tokenizer(TINY_TEXT["vocab_size"]), normalize_frames=False)
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
    model = apply_probes(FoveatedVLMModel(config), FoveatedVLMProbes(fine_queries=fine_queries))
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
    assert {"tracking/fine", "diag/state_contribution_fine", "loss/fine_changed", "improvement_t2_se"} <= set(expected)
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
        assert per_clip["tracking/fine"].isnan().all()  # per clip: undefined
        assert not any(name.startswith("tracking/") for name in mean_metrics(per_clip))  # means: absent
        del batch["moving_boxes"]
        assert not any(name.startswith("tracking/") for name in clip_metrics(model, outputs, batch))


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
