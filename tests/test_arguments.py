"""foveated_vlm/arguments.py: a YAML recipe and the command line become the model, data and training arguments; flags
without effect, unknown keys and settings that contradict each other are refused where they are set."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from foveated_vlm import data as data_foveated
from foveated_vlm import train as train_hf


def test_cued_config_is_tiny_on_the_cued_scene():
    tiny, cued = (yaml.safe_load(Path(f"configs/{name}.yaml").read_text()) for name in ("tiny", "cued"))
    changed = {"difficulty", "num_video_frames", "num_train_videos", "num_eval_videos", "cache_dir", "max_steps",
               "eval_steps", "save_steps", "model_config"}  # fmt: skip
    assert {key: value for key, value in cued.items() if key not in changed} == {
        key: value for key, value in tiny.items() if key not in changed
    }
    # The model: the full-width token and a 32-channel head (docs/RESULTS.md says why), the rest as in tiny.
    cued_model = {"token_dim": None, "head_channels": 32, "head_mlp_dim": 128}
    assert cued["model_config"] == {**tiny["model_config"], **cued_model}
    _, data_args, training_args, _, _ = train_hf.parse_arguments(["configs/cued.yaml"])
    assert data_args.difficulty == "cued" and data_args.num_video_frames == data_args.num_frames
    assert training_args.max_steps == training_args.save_steps  # the one checkpoint is the final model


def test_command_line_model_config_updates_the_yaml_one():
    model_args, data_args, _, _, _ = train_hf.parse_arguments(
        ["configs/tiny.yaml", "--model_config", '{"lambda_coarse": 3, "token_dim": null}', "--freeze_vision", "true"]
    )
    tiny_yaml = yaml.safe_load(Path("configs/tiny.yaml").read_text())["model_config"]
    assert model_args.model_config == {**tiny_yaml, "lambda_coarse": 3, "token_dim": None}
    model = train_hf.build_model(model_args, data_args, latent_shape=(4, 16, 16))
    assert model.config.lambda_coarse == 3 and model.config.token_dim is None and model.config.query_dim == 64
    assert not any(p.requires_grad for p in model.encoder.backbone.parameters())
    with pytest.raises(ValueError, match="model_config must be a JSON object"):
        train_hf.parse_arguments(["configs/tiny.yaml", "--model_config", "[1, 2]"])


def test_help_lists_every_argument(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_hf.main(["configs/phase1.yaml", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for name in ("--vision_model", "--model_config", "--data_source", "--vae", "--profile_memory", "--max_steps"):
        assert name in text


def test_unknown_config_key_names_the_file(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("learning_rat: 0.1\n")
    with pytest.raises(ValueError, match=r"bad.yaml: unknown keys \['learning_rat'\]"):
        train_hf.parse_arguments([str(config)])


@pytest.mark.parametrize(
    "argv, flag, source",
    [
        (["configs/tiny.yaml", "--video_dir", "/nonexistent/folder"], "--video_dir", "--data_source synthetic"),
        (["configs/tiny.yaml", "--eval_fraction", "0.1"], "--eval_fraction", "--data_source synthetic"),
        (["configs/tiny.yaml", "--download_llava"], "--download_llava", "--data_source synthetic"),
        (["configs/tiny.yaml", "--sample_fps", "4"], "--sample_fps", "--data_source synthetic"),
        (["--video_dir", "/videos"], "--video_dir", "--data_source llava_video"),
        (["--data_source", "video_dir", "--video_dir", "/videos", "--llava_dir", "x"], "--llava_dir",
         "--data_source video_dir"),
        (["--data_source", "video_dir", "--video_dir", "/v", "--num_train_videos", "8"], "--num_train_videos",
         "--data_source video_dir"),
    ],
)  # fmt: skip
def test_a_data_flag_without_effect_is_refused_naming_both(argv, flag, source):
    with pytest.raises(ValueError) as error:
        train_hf.parse_arguments(argv)
    assert flag in str(error.value) and source in str(error.value)


def test_source_specific_defaults_apply_to_their_source():
    _, data_args, _, _, _ = train_hf.parse_arguments(["--data_source", "video_dir", "--video_dir", "/videos"])
    assert (data_args.eval_fraction, data_args.llava_dir, data_args.num_train_videos) == (0.05, None, None)
    dataclasses.replace(data_args, eval_fraction=0.1)  # checked again, still valid
    assert (data_args.num_frames, data_args.image_size) == (data_foveated.DEFAULT_NUM_FRAMES,
                                                            data_foveated.DEFAULT_IMAGE_SIZE)  # fmt: skip
    with pytest.raises(ValueError, match="--data_source video_dir needs --video_dir"):
        train_hf.parse_arguments(["--data_source", "video_dir"])


def test_a_recipe_runs_on_a_video_folder_with_its_synthetic_keys_set_aside(caplog):
    """configs/cued.yaml keeps its model and training choices under --data_source video_dir; its synthetic-only keys
    are set aside with a notice each, while such a key given on the command line is still refused."""
    argv = ["configs/cued.yaml", "--data_source", "video_dir", "--video_dir", "/videos"]
    with caplog.at_level("WARNING", logger="foveated_vlm.train"):
        model_args, data_args, training_args, _, _ = train_hf.parse_arguments(argv)
    recipe = yaml.safe_load(Path("configs/cued.yaml").read_text())
    assert model_args.model_config == recipe["model_config"] and training_args.max_steps == recipe["max_steps"]
    assert (data_args.data_source, data_args.video_dir, data_args.num_train_videos) == ("video_dir", "/videos", None)
    for key in ("num_train_videos", "num_eval_videos", "difficulty", "synthetic_size", "num_video_frames"):
        assert any(key in record.getMessage() and "set aside" in record.getMessage() for record in caplog.records)
    with pytest.raises(ValueError, match="--num_train_videos has no effect with --data_source video_dir"):
        train_hf.parse_arguments(argv + ["--num_train_videos", "8"])


def test_text_target_settings_are_checked_where_they_are_set():
    with pytest.raises(ValueError, match="--use_captions .* --text_target caption"):
        train_hf.parse_arguments(["configs/cued.yaml", "--text_target", "caption", "--use_captions", "true"])
    with pytest.raises(SystemExit):  # argparse refuses a value outside the choices
        train_hf.parse_arguments(["configs/cued.yaml", "--text_target", "answer"])
    with pytest.raises(ValueError, match="--text_target qa_choice reads LLaVA-Video's question files.*not synthetic"):
        train_hf.parse_arguments(["configs/cued.yaml", "--text_target", "qa_choice"])
    _, data_args, _, _, _ = train_hf.parse_arguments(
        ["configs/phase2_text.yaml", "--text_target", "qa_open", "--use_cpu", "true", "--bf16", "false"]
    )
    assert data_args.text_target == "qa_open"
