"""foveated_vlm/precompute.py, the command that decodes and VAE-encodes a folder of videos once: its exit code, two
processes under accelerate launch, and --eval_fraction's train/ and eval/ splits feeding train_hf.py."""

import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
from runs import BROKEN, NUM_GOOD
from tiny import save_tiny_tokenizer

from foveated_vlm import precompute as precompute_latents
from foveated_vlm import train as train_hf
from foveated_vlm.data import find_videos, load_precomputed, split_train_eval

REPO_ROOT = Path(__file__).resolve().parents[1]
T, S = 4, 64  # latents (4, 4, 8, 8)


def cli_arguments(video_dir: Path, output_dir: Path, vae: str) -> list[str]:
    return [
        "--video_dir", str(video_dir), "--output_dir", str(output_dir), "--vae", vae, "--num_frames", str(T),
        "--image_size", str(S), "--batch_size", "2", "--shard_size", "2",
    ]  # fmt: skip


def run_cli(command: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT))
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_exit_code_is_nonzero_only_when_nothing_succeeded(video_dir, tiny_vae, tmp_path, caplog):
    ok = run_cli([sys.executable, "-m", "foveated_vlm.precompute", *cli_arguments(video_dir, tmp_path / "all", tiny_vae)])
    assert ok.returncode == 0, ok.stderr
    assert f"{NUM_GOOD + len(BROKEN)} in = {NUM_GOOD} ok + {len(BROKEN)} failed" in ok.stderr
    assert len(load_precomputed(tmp_path / "all")) == NUM_GOOD

    # In this process: a second interpreter start would only repeat what the run above showed.
    caplog.set_level("INFO", logger="foveated_vlm.data")
    assert precompute_latents.main(cli_arguments(video_dir / "broken", tmp_path / "none", tiny_vae)) == 1
    assert f"{len(BROKEN)} in = 0 ok + {len(BROKEN)} failed" in caplog.text


@pytest.mark.slow
def test_accelerate_launch_two_processes_write_one_dataset(video_dir, tiny_vae, tmp_path):
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2"]
    arguments = cli_arguments(video_dir / "train", tmp_path / "out", tiny_vae)
    result = run_cli([*accelerate, "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                      "-m", "foveated_vlm.precompute", *arguments])  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    dataset = load_precomputed(tmp_path / "out")
    assert sorted(dataset["video_path"]) == sorted(str(p) for p in (video_dir / "train").glob("*.mp4"))
    assert len(set(dataset["video_path"])) == len(dataset) == NUM_GOOD
    # 6 videos in shards of 2: both processes wrote shards, each exactly once.
    (settings_dir,) = (tmp_path / "out" / "shards").iterdir()
    assert all((shard / "latents.arrow").is_file() for shard in settings_dir.iterdir())
    assert len(list(settings_dir.iterdir())) == 3


def test_precomputed_train_and_eval_folders_feed_training(video_dir, tiny_vae, tmp_path):
    """`foveated_vlm/precompute.py --eval_fraction` writes train/ and eval/, split as train_hf.py splits a folder; then
    `train_hf.py --data_source precomputed` trains on them without decoding a video."""
    output = tmp_path / "precomputed"
    arguments = cli_arguments(video_dir / "train", output, tiny_vae) + ["--eval_fraction", "0.5"]
    assert precompute_latents.main(arguments) == 0
    train, evaluation = split_train_eval(find_videos(video_dir / "train"), 0.5)
    for split, paths in (("train", train), ("eval", evaluation)):
        assert sorted(load_precomputed(output / split)["video_path"]) == sorted(map(str, paths))
    common = [
        "configs/cued.yaml", "--data_source", "precomputed", "--precomputed_dir", str(output),
        "--num_frames", str(T), "--image_size", str(S), "--tokenizer", save_tiny_tokenizer(tmp_path / "tokenizer"),
        "--max_steps", "1", "--num_attention_figures", "0", "--report_to", "none", "--write_report", "false",
        "--output_dir", str(tmp_path / "run"),
    ]  # fmt: skip
    with mock.patch.object(train_hf, "precompute_dataset", side_effect=AssertionError("decoded videos")):
        trainer = train_hf.main(common)
    assert trainer.state.global_step == 1 and len(trainer.train_dataset) == len(train)
    recorded = json.loads((tmp_path / "run" / "data_paths.json").read_text())
    assert recorded["vae"] == os.path.abspath(tiny_vae)  # the VAE the latents were made with
    with pytest.raises(ValueError, match=f"--num_frames 8 differs from {T}, the num_frames .*precompute.json"):
        train_hf.main([arg if arg != str(T) else "8" for arg in common])
    with pytest.raises(ValueError, match="--data_source precomputed needs --precomputed_dir"):
        train_hf.parse_arguments(["configs/cued.yaml", "--data_source", "precomputed"])
