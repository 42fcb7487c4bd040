import json
import os
import subprocess
import sys
from pathlib import Path

import decord
import numpy as np
import pytest

from synthetic_videos import (
    DIFFICULTIES,
    EVAL_SEED_OFFSET,
    generate_split,
    generate_video,
    write_video,
)


SCRIPT = Path(__file__).resolve().parents[1] / "synthetic_videos.py"
SPLIT_PARAMS = dict(num_train=3, num_eval=2, difficulty="medium", size=64, num_video_frames=12, fps=6.0, seed=5)


@pytest.fixture(scope="session")
def split(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("synthetic")
    return output_dir, generate_split(output_dir, **SPLIT_PARAMS)


def _boxes(ground_truth: dict) -> np.ndarray:
    """(F, K, 4) boxes of every object in every frame."""
    return np.array([[obj["box"] for obj in frame["objects"]] for frame in ground_truth["frames"]])


def test_generate_video_is_deterministic_by_seed():
    frames, ground_truth = generate_video(seed=3, difficulty="hard", size=64, num_video_frames=8)
    frames_again, ground_truth_again = generate_video(seed=3, difficulty="hard", size=64, num_video_frames=8)
    other_frames, other_ground_truth = generate_video(seed=4, difficulty="hard", size=64, num_video_frames=8)
    np.testing.assert_array_equal(frames, frames_again)
    assert json.dumps(ground_truth) == json.dumps(ground_truth_again)
    assert not np.array_equal(frames, other_frames)
    assert ground_truth["frames"] != other_ground_truth["frames"]


@pytest.mark.parametrize("difficulty", sorted(DIFFICULTIES))
def test_scene_follows_its_difficulty(difficulty):
    size, num_video_frames = 128, 16
    spec = DIFFICULTIES[difficulty]
    # The movers' speed follows the number of frames the model samples from the video.
    for seed, num_frames in zip(range(4), (8, 4, 8, 16)):
        frames, ground_truth = generate_video(seed, difficulty, size, num_video_frames, num_frames)
        assert frames.shape == (num_video_frames, size, size, 3) and frames.dtype == np.uint8
        keys = ("seed", "difficulty", "size", "num_video_frames", "num_frames")
        assert {key: ground_truth[key] for key in keys} == dict(
            seed=seed, difficulty=difficulty, size=size, num_video_frames=num_video_frames,
            num_frames=num_frames,
        )  # fmt: skip
        moving = np.array([obj["moving"] for obj in ground_truth["frames"][0]["objects"]])
        assert moving.sum() == spec.num_moving and (~moving).sum() == spec.num_static
        boxes = _boxes(ground_truth)  # (F, K, 4)
        assert boxes.min() >= 0 and boxes.max() <= size

        # Look-alikes: one side for all, within the difficulty's range (visible after 8x downsampling).
        sides = boxes[..., 2] - boxes[..., 0]
        np.testing.assert_allclose(sides, sides[0, 0], atol=2e-3)
        assert spec.side_range[0] * size - 1e-3 <= sides[0, 0] <= spec.side_range[1] * size + 1e-3

        # Static objects stay put; movers shift by about one side between two of the model's sampled frames.
        np.testing.assert_array_equal(boxes[:, ~moving], np.repeat(boxes[:1, ~moving], num_video_frames, axis=0))
        step = np.linalg.norm(np.diff(boxes[:, moving, :2], axis=0), axis=-1)  # (F-1, movers) px per frame
        shift_per_sample = np.median(step, axis=0) * (num_video_frames - 1) / (num_frames - 1)
        assert np.all((0.7 * sides[0, 0] < shift_per_sample) & (shift_per_sample < 1.3 * sides[0, 0]))

        # No overlap at frame 0.
        first = boxes[0]
        for i in range(len(first)):
            for j in range(i + 1, len(first)):
                overlap_x = min(first[i, 2], first[j, 2]) - max(first[i, 0], first[j, 0])
                overlap_y = min(first[i, 3], first[j, 3]) - max(first[i, 1], first[j, 1])
                assert overlap_x <= 0 or overlap_y <= 0, (seed, i, j)

        # Solid objects in strong contrast: every object's centre pixel differs clearly from the frame's median.
        for box in first:
            centre = frames[0, int((box[1] + box[3]) / 2), int((box[0] + box[2]) / 2)].astype(float)
            assert np.abs(centre - np.median(frames[0], axis=(0, 1))).max() > 60


def test_only_hard_flickers():
    def background_brightness(difficulty):
        frames, ground_truth = generate_video(seed=0, difficulty=difficulty, size=64, num_video_frames=16)
        covered = np.zeros((64, 64), dtype=bool)  # every pixel an object touches in any frame
        for x0, y0, x1, y1 in _boxes(ground_truth).reshape(-1, 4):
            covered[int(y0) : int(np.ceil(y1)), int(x0) : int(np.ceil(x1))] = True
        return frames[:, ~covered].astype(float).mean(axis=(1, 2))  # (F,)

    assert np.ptp(background_brightness("easy")) == 0
    assert np.ptp(background_brightness("hard")) > 4


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="difficulty"):
        generate_video(0, difficulty="extreme")
    with pytest.raises(ValueError, match="size"):
        generate_video(0, size=65)
    with pytest.raises(ValueError, match="num_frames"):
        generate_video(0, num_frames=1)
    with pytest.raises(ValueError, match="frames"):
        write_video("unused.mp4", np.zeros((2, 8, 8), np.uint8), fps=8)


def test_split_writes_readable_mp4s_with_sidecars(split):
    output_dir, paths = split
    assert [len(paths["train"]), len(paths["eval"])] == [SPLIT_PARAMS["num_train"], SPLIT_PARAMS["num_eval"]]
    for split_name in ("train", "eval"):
        for path in paths[split_name]:
            assert path.startswith(str(output_dir / split_name))
            sidecar = json.loads(open(path.replace(".mp4", ".json")).read())
            keys = ["seed", "difficulty", "size", "fps", "num_video_frames", "num_frames", "frames"]
            assert list(sidecar) == keys
            frames, ground_truth = generate_video(
                sidecar["seed"], SPLIT_PARAMS["difficulty"], SPLIT_PARAMS["size"], SPLIT_PARAMS["num_video_frames"]
            )
            assert sidecar == {**ground_truth, "fps": SPLIT_PARAMS["fps"]}

            reader = decord.VideoReader(path, num_threads=1)
            assert len(reader) == SPLIT_PARAMS["num_video_frames"]
            assert reader.get_avg_fps() == pytest.approx(SPLIT_PARAMS["fps"])
            decoded = reader.get_batch(list(range(len(reader)))).asnumpy()
            del reader
            assert decoded.shape == frames.shape
            # crf 17 is visually lossless; what is left is chroma subsampling at object edges and ffmpeg's YUV -> RGB
            # conversion, which truncates (about -1.7 levels on average, in decord and PyAV alike).
            assert np.abs(decoded.astype(float) - frames).mean() < 4.0


def test_train_and_eval_seeds_are_disjoint(split):
    _, paths = split
    seeds = {
        name: [json.loads(open(path.replace(".mp4", ".json")).read())["seed"] for path in paths[name]]
        for name in ("train", "eval")
    }
    start = SPLIT_PARAMS["seed"]
    assert seeds["train"] == list(range(start, start + SPLIT_PARAMS["num_train"]))
    assert seeds["eval"] == [start + EVAL_SEED_OFFSET + i for i in range(SPLIT_PARAMS["num_eval"])]
    with pytest.raises(ValueError, match="num_train"):
        generate_split(split[0], num_train=EVAL_SEED_OFFSET + 1, num_eval=1)


def test_rerun_skips_up_to_date_videos_and_redoes_changed_ones(tmp_path):
    params = dict(num_train=2, num_eval=1, size=32, num_video_frames=4, fps=4.0, seed=0)
    paths = generate_split(tmp_path, difficulty="easy", **params)
    mtimes = {path: os.path.getmtime(path) for path in paths["train"] + paths["eval"]}
    assert generate_split(tmp_path, difficulty="easy", **params) == paths
    assert {path: os.path.getmtime(path) for path in mtimes} == mtimes

    generate_split(tmp_path, difficulty="hard", **params)
    for path in mtimes:
        assert json.loads(open(path.replace(".mp4", ".json")).read())["difficulty"] == "hard"
    # Another T changes the movers' speed: the videos are made again.
    generate_split(tmp_path, difficulty="hard", num_frames=3, **params)
    for path in mtimes:
        assert json.loads(open(path.replace(".mp4", ".json")).read())["num_frames"] == 3
    assert not list(tmp_path.glob("*/.tmp-*"))


def test_cli(tmp_path):
    help_text = subprocess.run(
        [sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, check=True
    ).stdout
    for flag in ("--output_dir", "--num_train", "--num_eval", "--difficulty", "--size", "--num_video_frames", "--fps"):
        assert flag in help_text
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--output_dir", str(tmp_path), "--num_train", "2", "--num_eval", "1",
         "--difficulty", "easy", "--size", "32", "--num_video_frames", "4", "--seed", "7"],
        capture_output=True, text=True, check=True,
    )
    assert "2 train + 1 eval videos" in result.stdout
    assert sorted(path.name for path in (tmp_path / "train").iterdir()) == [
        "video_000000.json", "video_000000.mp4", "video_000001.json", "video_000001.mp4"
    ]
