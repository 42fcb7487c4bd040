"""Training of the Foveated VLM with the 🤗 Trainer.

`FoveatedVLMTrainer` adds the metrics of foveated_vlm/metrics.py to the Trainer's logs, averaged correctly over
gradient-accumulation micro-batches and processes. Callbacks write what a run shows besides scalars: attention maps
and decoded predictions of a few fixed eval clips to TensorBoard and wandb (foveated_vlm/figures.py), and a model card
(foveated_vlm/card.py) into every checkpoint so that each saved folder is Hub-ready.
"""

import dataclasses
import json
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from transformers import Trainer, TrainerCallback
from transformers.integrations import TensorBoardCallback, WandbCallback
from transformers.integrations.integration_utils import default_logdir
from transformers.dynamic_module_utils import custom_object_save
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, IntervalStrategy

from foveated_vlm.card import FoveatedVLMModelCardInfo, write_model_card
from foveated_vlm.data import batch_to_device, model_inputs
from foveated_vlm.figures import evenly_spaced_clips, plot_attention_maps, plot_prediction_figure, stack_frames
from foveated_vlm.metrics import (
    TABLE1_LOSSES,
    clip_metrics,
    improvement_with_se,
    means_from_totals,
    teacher_metrics,
    totals,
)
from foveated_vlm.probes import PROBES_FILE, glimpse_supervision, probes_of
from foveated_vlm.teacher import TEACHER_FILE, FoveatedVLMSearchTeacher

__all__ = [
    "HOST_SYNC_OPERATORS",
    "TRAINING_ARGS_JSON",
    "FoveatedVLMTrainer",
    "FoveatedVLMFigureCallback",
    "FoveatedVLMFinalEvaluationCallback",
    "FoveatedVLMHubFilesCallback",
    "teacher_inputs",
]

# The training arguments as saved with the model: JSON, where the Trainer writes a pickle (TRAINING_ARGS_NAME).
TRAINING_ARGS_JSON = "training_args.json"


# Operators that make the host wait for the accelerator: reading a value (`.item()`, `bool(tensor)`) or an output
# whose size depends on the data. A train step calls none of them outside logging (tests/test_trainer.py checks it,
# benchmarks/bench_model.py counts them).
HOST_SYNC_OPERATORS = frozenset(
    {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_consecutive", "repeat_interleave"}
)


class FoveatedVLMTrainer(Trainer):
    """
    A `Trainer` for `FoveatedVLMModel` that logs the metrics of foveated_vlm/metrics.py next to the Trainer's own `loss`,
    `grad_norm` and `learning_rate`, as means over every clip of every micro-batch and process since the last log,
    `eval_`-prefixed in evaluation, where it adds Table 1's standard errors (`eval_improvement_se`,
    `eval_improvement_t2_se`). (In distributed evaluation accelerate pads the last batches with repeated clips so
    that every process gets one; those repeats count here, while the Trainer's own `eval_loss` drops them.)

    Every saved folder (checkpoints, the final model, pushes) is Hub-ready and holds no pickle: weights, config with
    `auto_map`, remote code, processor, `training_args.json` and a README.md model card (`write_model_card`).

    Args:
        model_card_info (`FoveatedVLMModelCardInfo`, *optional*): what the model card says about the data and base
            models.
        teacher (`FoveatedVLMSearchTeacher`, *optional*): the search teacher (foveated_vlm/teacher.py): its terms join
            the training loss, and its search is logged in training and evaluation (`teacher/...`).
        *args, **kwargs: as for `Trainer`; pass the `FoveatedVLMProcessor` as `processing_class` so that it is saved.
    """

    # The model's loss is a mean over its clips: the Trainer divides it by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        *args,
        model_card_info: Optional[FoveatedVLMModelCardInfo] = None,
        teacher: Optional[FoveatedVLMSearchTeacher] = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.teacher = teacher
        if self.args.remove_unused_columns:
            raise ValueError(
                "FoveatedVLMTrainer needs remove_unused_columns=False: the data collator reads columns the model's "
                "forward does not take (frames, moving_boxes, caption)."
            )
        # The targets are the latents. Naming them makes evaluation compute the loss: the model has no `labels`.
        self.label_names = ["vae_latents"]
        # Per mode, per metric: a tensor [sum over clips, number of clips] since the last log (TRL's `_metrics`).
        self._metrics = {"train": defaultdict(float), "eval": defaultdict(float)}
        self._eval_clip_losses = []  # (B, len(_eval_loss_names)) per eval micro-batch since the last log
        self._eval_loss_names = []  # which of TABLE1_LOSSES the model's outputs give
        self.model_card_info = model_card_info
        self.add_callback(FoveatedVLMHubFilesCallback(model_card_info))
        # TensorBoard's integration picks output_dir/runs/<time> only when training begins; an evaluation without
        # training (train_hf.py --evaluate_model) would write to ./runs of wherever it was started.
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
                callback.logging_dir = os.path.join(self.args.output_dir, default_logdir())

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # `num_items_in_batch` is ignored: the loss is a per-batch mean (see `loss_is_scaled_for_ga`).
        unwrapped = self.accelerator.unwrap_model(model)
        forward_inputs = model_inputs(inputs, unwrapped)
        outputs = model(**forward_inputs, output_patch_cache=self.teacher is not None)
        mode = "train" if model.training else "eval"
        # The state contribution costs two head passes: in training, only on the micro-batches of a step that logs.
        state_contribution = mode == "eval" or self._step_logs()
        metrics = clip_metrics(unwrapped, outputs, inputs, state_contribution)
        loss = outputs.loss
        probes = probes_of(unwrapped)
        if probes is not None and probes.supervises and model.training:
            # The calibration probes (ground truth, never a recipe) train on the boxes' centres the readers got.
            centres = forward_inputs["reader_kwargs"]["oracle_fixations"]
            loss = loss + glimpse_supervision(unwrapped, outputs, centres, probes)
        if self.teacher is not None:
            progress = self.state.global_step / max(self.state.max_steps, 1)
            scorer_inputs = forward_inputs if self.teacher.scorer is not None else None
            taught = self.teacher(unwrapped, outputs, progress=progress, scorer_inputs=scorer_inputs,
                                  **teacher_inputs(inputs))
            metrics.update(teacher_metrics(taught, inputs, self.teacher.args.teacher_grid))
            if taught.loss is not None:
                loss = loss + taught.loss
            # The cache is the teacher's alone: evaluation must not gather it with the predictions.
            outputs = dataclasses.replace(outputs, patch_cache=None, tokens_fine=None)
        names = list(metrics)
        summed = totals(torch.stack([metrics[name].detach().float() for name in names]))  # (M, B) -> (M, 2)
        for name, row in zip(names, summed):
            self._metrics[mode][name] += row
        # Table 1's standard errors need every clip's losses, not only their sums. Which losses there are follows
        # from the run's settings alone, so every batch and process has the same ones.
        self._eval_loss_names = [name for name in TABLE1_LOSSES if name in metrics]
        if mode == "eval" and self._eval_loss_names:
            self._eval_clip_losses.append(torch.stack([metrics[name].float() for name in self._eval_loss_names], 1))
        return (loss, outputs) if return_outputs else loss

    def _step_logs(self) -> bool:
        """Whether the optimizer step being computed ends with a log: the Trainer's own rule for `steps`
        (`DefaultFlowCallback.on_step_end`). The Trainer decides it only after the step's micro-batches have run
        (`TrainerControl.should_log`), too late for them, so it is repeated here."""
        args, step = self.args, self.state.global_step + 1
        if args.logging_strategy != IntervalStrategy.STEPS:
            return True
        every = self.state.logging_steps or args.logging_steps
        return step % every == 0 or (args.logging_first_step and step == 1)

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        # Same decision as TRL: the Trainer logs evaluation results while the model is in eval mode.
        mode = "train" if self.model.training else "eval"
        metrics = self._metrics[mode]
        if metrics:
            names = sorted(metrics)
            # Every rank calls log() at the same points with the same names, so this collective matches up.
            summed = self.accelerator.reduce(torch.stack([metrics[name] for name in names]), "sum").tolist()
            means = means_from_totals(names, summed)
            if mode == "eval" and self._eval_clip_losses:
                means.update(self._improvement_standard_errors())
            prefix = "eval_" if mode == "eval" else ""
            # In place, as the Trainer adds "epoch": `evaluate()` returns this same dict, so it carries them too.
            logs.update({prefix + name: value for name, value in means.items()})
            metrics.clear()
        super().log(logs, start_time)

    def _improvement_standard_errors(self) -> dict[str, float]:
        """`improvement_se` and `improvement_t2_se` over every process's eval clips (`FoveatedVLMImprovement`)."""
        losses = self.accelerator.pad_across_processes(torch.cat(self._eval_clip_losses), pad_index=math.nan)
        losses = self.accelerator.gather(losses).cpu().numpy()  # (clips, len(_eval_loss_names)), NaN rows: padding
        losses = losses[~np.isnan(losses).any(axis=1)]
        self._eval_clip_losses.clear()
        measured = improvement_with_se({name: losses[:, i] for i, name in enumerate(self._eval_loss_names)})
        return {name: value for name, value in measured.items() if name.endswith("_se")}

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        """The Trainer's save (weights, config, remote code, processor), the teacher's and probes' settings beside it,
        and the training arguments as JSON instead of the Trainer's pickle, which the Hub would flag and which loads
        only with this exact transformers."""
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            output_dir = output_dir or self.args.output_dir
            Path(output_dir, TRAINING_ARGS_NAME).unlink(missing_ok=True)
            Path(output_dir, TRAINING_ARGS_JSON).write_text(self.args.to_json_string())
            # What trained the model besides its own loss, for the report and the card; the weights stay the plain
            # model's (from_pretrained_with_probes applies the probes again).
            if self.teacher is not None:
                Path(output_dir, TEACHER_FILE).write_text(json.dumps(self.teacher.args.to_dict(), indent=1))
            probes = probes_of(self.accelerator.unwrap_model(self.model))
            if probes is not None:
                Path(output_dir, PROBES_FILE).write_text(json.dumps(probes.to_dict(), indent=1))

    def create_model_card(self, **kwargs) -> None:
        """Write the package's model card (not the Trainer's generic one) into `output_dir`; `push_to_hub` calls it."""
        if self.is_world_process_zero():
            unwrapped = self.accelerator.unwrap_model(self.model)
            write_model_card(
                self.args.output_dir, unwrapped.config, self.args, self.state, self.model_card_info, **kwargs
            )


def teacher_inputs(batch: dict) -> dict[str, torch.Tensor]:
    """What the search teacher may read of a batch: the targets and the text, never a ground-truth column."""
    return {name: batch[name] for name in ("vae_latents", "input_ids", "attention_mask") if name in batch}


class FoveatedVLMHubFilesCallback(TrainerCallback):
    """The Hub files the Trainer does not write itself. Into every checkpoint: README.md. Into `output_dir` before a
    push from a checkpoint (the Trainer then copies in only the weights and config, and saves the processor): README.md
    and the remote code.

    Args:
        info: what the model card says about the data and base models.
    """

    def __init__(self, info: Optional[FoveatedVLMModelCardInfo] = None):
        self.info = info

    def on_save(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero:
            checkpoint = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            write_model_card(checkpoint, model.config, args, state, self.info)

    def on_push_begin(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero:
            os.makedirs(args.output_dir, exist_ok=True)
            custom_object_save(model, args.output_dir, config=model.config)
            write_model_card(args.output_dir, model.config, args, state, self.info)


class FoveatedVLMFinalEvaluationCallback(TrainerCallback):
    """Evaluates once at the last step with `eval_strategy="no"`, inside training, as the Trainer itself does with
    "steps" and "epoch": the run ends with one evaluation of the final model, logged at the last step into the same
    TensorBoard file as the training (an `evaluate()` after `train()` opens a second one). Needs an eval dataset."""

    def on_step_end(self, args, state, control, **kwargs):
        if args.eval_strategy == IntervalStrategy.NO and state.global_step >= state.max_steps:
            control.should_evaluate = True


class FoveatedVLMFigureCallback(TrainerCallback):
    """At each evaluation, for the same few eval clips every time: Pass 1 vs Pass 2 attention maps over time
    (`attention/clip_i`), and frame t, actual and predicted t+1 decoded by the VAE (`predictions`). They go where the
    Trainer's scalars go, through its integrations (`report_to`): TensorBoard's writer and wandb's run; with neither,
    nothing is drawn.

    Args:
        eval_dataset: the precomputed eval split (columns frames, vae_latents, moving_boxes, ...).
        data_collator: the collator the Trainer uses, to build the model inputs of the chosen clips.
        vae_path: folder or Hub id of the `diffusers.AutoencoderKL` that made the latents; None skips predictions.
        num_clips: how many clips, spread evenly over the eval split.
        callback_handler: the Trainer's `callback_handler`, whose integration callbacks receive the figures.
    """

    def __init__(self, eval_dataset, data_collator, vae_path: Optional[str], num_clips: int = 4,
                 callback_handler=None):  # fmt: skip
        rows = [eval_dataset[i] for i in evenly_spaced_clips(len(eval_dataset), num_clips)]
        self.batch = data_collator(rows)
        self.frames = stack_frames(rows)  # (N, T, S, S, 3)
        self.vae_path = vae_path
        self.callback_handler = callback_handler
        self._vae = None

    def _sinks(self) -> list:
        """The integration callbacks that can take a figure now (each starts its writer or run on the first log,
        which the Trainer makes before `on_evaluate`)."""
        callbacks = self.callback_handler.callbacks if self.callback_handler is not None else []
        tensorboard = [cb for cb in callbacks if isinstance(cb, TensorBoardCallback) and cb.tb_writer is not None]
        wandb = [cb for cb in callbacks if isinstance(cb, WandbCallback) and getattr(cb, "_initialized", False)]
        return tensorboard + wandb

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        sinks = self._sinks() if state.is_world_process_zero else []
        # Every rank runs the forward, or none does: with sharded parameters (FSDP) it is a collective, and whether
        # any figure goes out is a setting (report_to), the same on every rank.
        if not any(name in ("tensorboard", "wandb") for name in args.report_to):
            return
        device = next(model.parameters()).device
        inputs = model_inputs(batch_to_device(self.batch, device), model)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            outputs = model(**inputs)
        model.train(was_training)
        if not sinks:
            return
        boxes = self.batch.get("moving_boxes")
        figures = {
            f"attention/clip_{i}": plot_attention_maps(
                self.frames[i],
                outputs.attn_coarse[i].cpu(),
                outputs.attn_fine[i].cpu(),
                boxes[i].cpu() if boxes is not None else None,
            )
            for i in range(len(self.frames))
        }
        if self.vae_path is not None:
            figures["predictions"] = self._prediction_figure(outputs, device)
        for sink in sinks:
            if isinstance(sink, TensorBoardCallback):
                for tag, figure in figures.items():
                    sink.tb_writer.add_figure(tag, figure, state.global_step, close=False)
                sink.tb_writer.flush()
            else:  # wandb, as WandbCallback logs its scalars: keyed by the Trainer's step
                images = {tag: sink._wandb.Image(figure) for tag, figure in figures.items()}
                sink._wandb.log({**images, "train/global_step": state.global_step})

    def _prediction_figure(self, outputs, device):
        from diffusers import AutoencoderKL  # only the process that draws needs diffusers

        if self._vae is None:
            self._vae = AutoencoderKL.from_pretrained(self.vae_path).eval()
        figure, _ = plot_prediction_figure(self._vae.to(device), self.frames, self.batch["vae_latents"], outputs)
        self._vae.to("cpu")  # keep accelerator memory for training
        return figure
