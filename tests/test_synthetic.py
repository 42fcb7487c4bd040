import json
import os
import subprocess
import sys

import decord
import numpy as np
import pytest

from processing_foveated import load_video, sample_frame_indices
from foveated_vlm.synthetic import (
    CUE_COLOUR_NAMES,
    DIFFICULTIES,
    EVAL_SEED_OFFSET,
    FoveatedVLMCueSpec,
    FoveatedVLMSceneSpec,
    describe_clip,
    generate_split,
    generate_video,
    write_video,
)


SCRIPT = ["-m", "foveated_vlm.synthetic"]
SPLIT_PARAMS = dict(num_train=3, num_eval=2, difficulty="medium", size=64, num_video_frames=12, fps=6.0, seed=5)
MOVER_DIFFICULTIES = sorted(name for name, spec in DIFFICULTIES.items() if spec.cue is None)
CUE = DIFFICULTIES["cued"].cue
# Cued videos at the default frame size, so the cue has its default 6 px; T = 8 frames, all read.
CUED_SIZE, CUED_T = 128, 8
# The decoded background's mean away from the objects is within 1.1 grey levels of its level (measured on 8 videos:
# ffmpeg's YUV -> RGB truncation, about -1, and the faint texture's mean over the visible background); the levels are
# 45 apart.
LEVEL_TOLERANCE = 3.0


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


@pytest.mark.parametrize("difficulty", MOVER_DIFFICULTIES)
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


@pytest.mark.slow
def test_cli(tmp_path):
    help_text = subprocess.run(
        [sys.executable, *SCRIPT, "--help"], capture_output=True, text=True, check=True
    ).stdout
    for flag in ("--output_dir", "--num_train", "--num_eval", "--difficulty", "--size", "--num_video_frames", "--fps"):
        assert flag in help_text
    result = subprocess.run(
        [sys.executable, *SCRIPT, "--output_dir", str(tmp_path), "--num_train", "2", "--num_eval", "1",
         "--difficulty", "easy", "--size", "32", "--num_video_frames", "4", "--seed", "7"],
        capture_output=True, text=True, check=True,
    )
    assert "2 train + 1 eval videos" in result.stdout
    assert sorted(path.name for path in (tmp_path / "train").iterdir()) == [
        "video_000000.json", "video_000000.mp4", "video_000001.json", "video_000001.mp4"
    ]


# --------------------------------------------------------------------------------------------------------------------
# The cued scene (the positive control)
# --------------------------------------------------------------------------------------------------------------------


def _cued_videos(output_dir, difficulty: str, num_eval: int, seed: int) -> tuple[dict, list]:
    """3 train videos of a cued scene: (the split's paths, [(decoded frames (F, S, S, 3) float, sidecar)])."""
    paths = generate_split(output_dir, num_train=3, num_eval=num_eval, difficulty=difficulty, size=CUED_SIZE,
                           num_video_frames=CUED_T, num_frames=CUED_T, seed=seed)  # fmt: skip
    videos = []
    for path in paths["train"]:
        frames, info = load_video(path, CUED_T, CUED_SIZE)
        # Uniform sampling with T = num_video_frames reads every frame, in order: the rule links what the model sees.
        assert info["frame_indices"] == list(range(CUED_T))
        videos.append((frames.astype(float), json.loads(open(path.replace(".mp4", ".json")).read())))
    return paths, videos


@pytest.fixture(scope="module")
def cued_split(tmp_path_factory):
    """Decoded frames (F, S, S, 3) float and sidecars of 3 cued train videos, read as the model reads them."""
    output_dir = tmp_path_factory.mktemp("cued")
    paths, videos = _cued_videos(output_dir, difficulty="cued", num_eval=1, seed=11)
    return output_dir, paths, videos


def _background_mask(ground_truth: dict, size: int) -> np.ndarray:
    """(S, S) bool: pixels at least 2 px away from every object (the objects stand still)."""
    mask = np.ones((size, size), dtype=bool)
    for x0, y0, x1, y1 in _boxes(ground_truth)[0]:
        mask[max(int(y0) - 2, 0) : int(np.ceil(y1)) + 2, max(int(x0) - 2, 0) : int(np.ceil(x1)) + 2] = False
    return mask


def test_cued_spec_defaults():
    spec = DIFFICULTIES["cued"]
    assert spec.num_moving == 0 and spec.num_static == 7 and spec.flicker == 0
    assert len(CUE.cue_colours) == 4 and len(CUE.levels) == 4 and CUE.level_of_cue == (0, 1, 2, 3)
    assert CUE.cue_side * 128 == pytest.approx(6)
    with pytest.raises(ValueError, match="level_of_cue"):
        FoveatedVLMCueSpec(level_of_cue=(0, 1))
    with pytest.raises(ValueError, match="level_of_cue"):
        FoveatedVLMCueSpec(level_of_cue=(0, 1, 2, 4))


@pytest.mark.parametrize("rung", ["cued", "cued_motion", "cued_appearance"])
@pytest.mark.parametrize("count", [1, 3])
def test_the_curriculum_scenes_are_their_rung_with_fewer_look_alikes(rung, count):
    _, ground_truth = generate_video(0, f"{rung}_{count}", size=64, num_video_frames=CUED_T, num_frames=CUED_T)
    objects = ground_truth["frames"][0]["objects"]
    assert len(objects) == count and sum(bool(o.get("target")) for o in objects) == 1
    assert DIFFICULTIES[f"{rung}_{count}"].cue == DIFFICULTIES[rung].cue
    moving = [bool(o.get("moving")) for o in objects]
    assert moving == ([bool(o.get("target")) for o in objects] if rung == "cued_motion" else [False] * count)
    if rung == "cued_appearance":  # the legend shows the target's own body colour
        assert ground_truth["legend"]["colour"] == ground_truth["body_colours"][ground_truth["target"]]


def test_cued_needs_every_frame_read():
    with pytest.raises(ValueError, match=r"num_video_frames \(16\) must equal num_frames \(8\)"):
        generate_video(0, "cued", size=64, num_video_frames=16, num_frames=8)
    # Any other T reads a subset or repeats frames, and frame t+1 would no longer be the one after t.
    assert sample_frame_indices(CUED_T, CUED_T).tolist() == list(range(CUED_T))


def test_cued_scene_structure():
    for seed in range(4):
        frames, ground_truth = generate_video(seed, "cued", CUED_SIZE, CUED_T, CUED_T)
        boxes = _boxes(ground_truth)  # (F, K, 4)
        assert boxes.shape[1] == DIFFICULTIES["cued"].num_static
        np.testing.assert_array_equal(boxes, np.repeat(boxes[:1], CUED_T, axis=0))  # nothing moves
        flags = [[(obj["moving"], obj["target"]) for obj in frame["objects"]] for frame in ground_truth["frames"]]
        target = ground_truth["target"]
        assert all(flag == (False, k == target) for frame in flags for k, flag in enumerate(frame))
        levels = [frame["level"] for frame in ground_truth["frames"]]
        cues = np.array([[obj["cue"] for obj in frame["objects"]] for frame in ground_truth["frames"]])  # (F, K)
        assert levels[1:] == [CUE.level_of_cue[c] for c in cues[:-1, target]]
        assert cues.min() >= 0 and cues.max() < len(CUE.cue_colours)
    # Cues are drawn per object and frame: over a few videos every colour shows up on targets and on others.
    assert set(cues.ravel()) == set(range(len(CUE.cue_colours)))


def _assert_the_cue_rule(background: np.ndarray, ground_truth: dict) -> None:
    """For every t: frame t+1's background grey level (F,) is the level the target's cue colour in frame t maps to;
    frame 0's is the one its sidecar records."""
    target = ground_truth["target"]
    target_cues = [frame["objects"][target]["cue"] for frame in ground_truth["frames"]]
    expected = [CUE.levels[CUE.level_of_cue[c]] for c in target_cues[:-1]]
    np.testing.assert_allclose(background[1:], expected, atol=LEVEL_TOLERANCE)
    np.testing.assert_allclose(background[0], CUE.levels[ground_truth["frames"][0]["level"]], atol=LEVEL_TOLERANCE)


def test_cued_rule_holds_in_the_decoded_pixels(cued_split):
    _, _, videos = cued_split
    for frames, ground_truth in videos:
        background = frames[:, _background_mask(ground_truth, CUED_SIZE)].mean(axis=(1, 2))  # (F,) grey level
        _assert_the_cue_rule(background, ground_truth)


def test_cued_ground_truth_matches_the_pixels(cued_split):
    _, _, videos = cued_split
    colours = np.array(CUE.cue_colours)  # (C, 3)
    for frames, ground_truth in videos:
        target = ground_truth["target"]
        for t, frame in enumerate(ground_truth["frames"]):
            for k, obj in enumerate(frame["objects"]):
                body = _check_cue_and_read_body(frames[t], obj, colours, (t, k))
                # The body: the target's mark colour in frame 0, the look-alikes' colour everywhere else.
                expected = CUE.target_colour if (k == target and t == 0) else CUE.object_colour
                assert np.abs(body - expected).max() < 30, (t, k, body)


def _check_cue_and_read_body(frame: np.ndarray, obj: dict, colours: np.ndarray, where) -> np.ndarray:
    """Assert that an object's cue (its 2 x 2 centre pixels) is nearest to its recorded colour with a wide margin;
    return its body's pixel 2 px inside the left edge (inside a disc too, outside the cue)."""
    x0, y0, x1, y1 = obj["box"]
    cx, cy = int((x0 + x1) / 2), int((y0 + y1) / 2)
    centre = frame[cy - 1 : cy + 1, cx - 1 : cx + 1].mean(axis=(0, 1))
    distance = np.abs(colours - centre).max(axis=1)  # (C,)
    assert distance[obj["cue"]] < 40 and np.delete(distance, obj["cue"]).min() > 120, (where, distance)
    return frame[cy, int(np.ceil(x0)) + 2]


def test_cued_train_and_eval_seeds_are_disjoint(cued_split):
    _, paths, _ = cued_split
    sidecars = {
        name: [json.loads(open(path.replace(".mp4", ".json")).read()) for path in paths[name]]
        for name in ("train", "eval")
    }
    train_seeds = {sidecar["seed"] for sidecar in sidecars["train"]}
    eval_seeds = {sidecar["seed"] for sidecar in sidecars["eval"]}
    assert eval_seeds == {11 + EVAL_SEED_OFFSET} and not train_seeds & eval_seeds
    assert all(sidecar["frames"] != sidecars["eval"][0]["frames"] for sidecar in sidecars["train"])


def test_cued_motion_target_is_the_only_mover_and_unmarked():
    # The ladder's rung 2: the cued rule, the target revealed by its motion instead of its frame-0 colour.
    assert DIFFICULTIES["cued_motion"].cue.target_marked_by == "motion"
    with pytest.raises(ValueError, match="target_marked_by"):
        FoveatedVLMCueSpec(target_marked_by="size")
    for seed in range(4):
        frames, ground_truth = generate_video(seed, "cued_motion", CUED_SIZE, CUED_T, CUED_T)
        boxes = _boxes(ground_truth)  # (F, K, 4)
        target = ground_truth["target"]
        others = np.delete(boxes, target, axis=1)
        np.testing.assert_array_equal(others, np.repeat(others[:1], CUED_T, axis=0))  # the look-alikes stand still
        side = boxes[0, target, 2] - boxes[0, target, 0]
        steps = np.linalg.norm(np.diff(boxes[:, target, :2], axis=0), axis=-1)  # (F-1,) pixels per frame
        assert (steps > 0).all() and (steps <= 1.2 * side + 1e-3).all()
        flags = [[(obj["moving"], obj["target"]) for obj in frame["objects"]] for frame in ground_truth["frames"]]
        assert all(flag == (k == target, k == target) for frame in flags for k, flag in enumerate(frame))
        levels = [frame["level"] for frame in ground_truth["frames"]]
        target_cues = [frame["objects"][target]["cue"] for frame in ground_truth["frames"]]
        assert levels[1:] == [CUE.level_of_cue[c] for c in target_cues[:-1]]


def test_cued_motion_pixels_follow_the_ground_truth(tmp_path):
    paths = generate_split(tmp_path, num_train=2, num_eval=0, difficulty="cued_motion", size=CUED_SIZE,
                           num_video_frames=CUED_T, num_frames=CUED_T, seed=5)  # fmt: skip
    colours = np.array(CUE.cue_colours)  # (C, 3)
    for path in paths["train"]:
        frames, _ = load_video(path, CUED_T, CUED_SIZE)
        frames = frames.astype(float)
        ground_truth = json.loads(open(path.replace(".mp4", ".json")).read())
        target = ground_truth["target"]
        for t, frame in enumerate(ground_truth["frames"]):
            x0, y0, x1, y1 = frame["objects"][target]["box"]
            cx, cy = int((x0 + x1) / 2), int((y0 + y1) / 2)
            # The cue rides on the moving target (drawn last, so never hidden) and the body is never marked.
            centre = frames[t, cy - 1 : cy + 1, cx - 1 : cx + 1].mean(axis=(0, 1))
            assert np.abs(colours - centre).max(axis=1).argmin() == frame["objects"][target]["cue"]
            body = frames[t, cy, int(np.ceil(x0)) + 2]
            assert np.abs(body - CUE.object_colour).max() < 30, (t, body)


# --------------------------------------------------------------------------------------------------------------------
# The ladder's third rung: the target known by its body colour, which a legend shows in frame 0
# --------------------------------------------------------------------------------------------------------------------

APPEARANCE = DIFFICULTIES["cued_appearance"].cue
# At 128 px: a 12 px swatch 4 px from the top-left corner; objects keep out of [0, 20) x [0, 20).
LEGEND_BOX = (4, 4, 16, 16)
LEGEND_KEEP_OUT = 20


@pytest.fixture(scope="module")
def appearance_split(tmp_path_factory):
    """Decoded frames (F, S, S, 3) float and sidecars of 3 cued_appearance train videos, read as the model reads
    them."""
    _, videos = _cued_videos(tmp_path_factory.mktemp("cued_appearance"), "cued_appearance", num_eval=0, seed=21)
    return videos


def test_cued_appearance_spec_and_scene_structure():
    spec = DIFFICULTIES["cued_appearance"]
    assert APPEARANCE.target_marked_by == "appearance" and spec.num_moving == 0 and spec.num_static == 7
    # The rule, cues and levels are the cued scene's.
    assert (APPEARANCE.cue_colours, APPEARANCE.levels, APPEARANCE.level_of_cue) == (
        CUE.cue_colours, CUE.levels, CUE.level_of_cue
    )
    with pytest.raises(ValueError, match="target_marked_by"):
        FoveatedVLMCueSpec(target_marked_by="shape")
    with pytest.raises(ValueError, match="body_colours"):
        FoveatedVLMSceneSpec(
            num_moving=0, num_static=7, side_range=(1 / 8, 1 / 6), flicker=0.0,
            cue=FoveatedVLMCueSpec(target_marked_by="appearance", body_colours=APPEARANCE.body_colours[:6]),
        )  # fmt: skip

    # The palette stays clear of the cues (>= 110 RGB), the mark and the grey levels (>= 80 of chroma), and its
    # colours stay apart (>= 45 in one channel).
    palette = np.array(APPEARANCE.body_colours)  # (P, 3)
    assert np.linalg.norm(palette[:, None] - np.array(CUE.cue_colours)[None], axis=-1).min() >= 110
    assert np.linalg.norm(palette - CUE.target_colour, axis=-1).min() >= 110
    assert (np.ptp(palette, axis=1) >= 80).all()
    assert min(np.abs(a - b).max() for i, a in enumerate(palette) for b in palette[i + 1 :]) >= 45

    targets = set()
    for seed in range(6):
        frames, ground_truth = generate_video(seed, "cued_appearance", CUED_SIZE, CUED_T, CUED_T)
        boxes = _boxes(ground_truth)  # (F, K, 4)
        np.testing.assert_array_equal(boxes, np.repeat(boxes[:1], CUED_T, axis=0))  # nothing moves
        target = ground_truth["target"]
        # The target is flagged as in `cued`, so the oracle and tracking metrics read its box.
        flags = [[(obj["moving"], obj["target"]) for obj in frame["objects"]] for frame in ground_truth["frames"]]
        assert all(flag == (False, k == target) for frame in flags for k, flag in enumerate(frame))
        levels = [frame["level"] for frame in ground_truth["frames"]]
        cues = np.array([[obj["cue"] for obj in frame["objects"]] for frame in ground_truth["frames"]])  # (F, K)
        assert levels[1:] == [CUE.level_of_cue[c] for c in cues[:-1, target]]
        # Seven distinct body colours from the palette; the legend shows the target's, in its fixed place.
        body_colours = [tuple(colour) for colour in ground_truth["body_colours"]]
        assert len(body_colours) == boxes.shape[1] == len(set(body_colours))
        assert set(body_colours) <= set(APPEARANCE.body_colours)
        assert ground_truth["legend"] == {"box": list(map(float, LEGEND_BOX)), "colour": list(body_colours[target])}
        # No object reaches into the legend's corner, in any frame.
        assert ((boxes[..., 0] >= LEGEND_KEEP_OUT) | (boxes[..., 1] >= LEGEND_KEEP_OUT)).all()
        targets.add(body_colours[target])
    assert len(targets) > 1  # the target's colour changes from video to video

    # More layouts, small: objects keep out of the legend and its margin, as wide as its offset, at any size.
    for seed in range(40):
        _, ground_truth = generate_video(seed, "cued_appearance", 64, 2, 2)
        x0, _, x1, _ = ground_truth["legend"]["box"]
        assert (x0, x1) == (2, 8)  # 4 / 128 and 12 / 128 of 64 px, snapped to even pixels
        boxes = _boxes(ground_truth)
        assert ((boxes[..., 0] >= x1 + x0) | (boxes[..., 1] >= x1 + x0)).all(), seed


def test_cued_sidecars_are_unchanged_by_the_appearance_rung():
    # `cued` and `cued_motion` keep their keys and their look-alike bodies: the appearance rung adds keys only to
    # its own videos. (Their bytes were checked against the code before the rung by hand.)
    keys = ["seed", "difficulty", "size", "num_video_frames", "num_frames", "frames", "target"]
    for difficulty in ("cued", "cued_motion"):
        frames, ground_truth = generate_video(0, difficulty, CUED_SIZE, 4, 4)
        assert list(ground_truth) == keys
        assert set(ground_truth["frames"][0]["objects"][0]) == {"box", "moving", "target", "cue"}
        x0, y0, x1, y1 = next(obj["box"] for obj in ground_truth["frames"][1]["objects"] if not obj["target"])
        assert np.abs(frames[1, int((y0 + y1) / 2), int(np.ceil(x0)) + 2] - np.array(CUE.object_colour)).max() <= 1


def test_cued_appearance_rule_holds_in_the_decoded_pixels(appearance_split):
    for frames, ground_truth in appearance_split:
        mask = _background_mask(ground_truth, CUED_SIZE)
        mask[:LEGEND_KEEP_OUT, :LEGEND_KEEP_OUT] = False  # the legend, in frame 0
        background = frames[:, mask].mean(axis=(1, 2))  # (F,) grey level
        _assert_the_cue_rule(background, ground_truth)


def test_cued_appearance_ground_truth_matches_the_pixels(appearance_split):
    colours = np.array(CUE.cue_colours)  # (C, 3)
    palette = np.array(APPEARANCE.body_colours)  # (P, 3)
    for frames, ground_truth in appearance_split:
        for t, frame in enumerate(ground_truth["frames"]):
            for k, obj in enumerate(frame["objects"]):
                # The cue reads as clearly on a coloured body as on a near-black one.
                body = _check_cue_and_read_body(frames[t], obj, colours, (t, k))
                # The body: its own colour in every frame (the target's is not marked), nearest to it of the palette.
                expected = np.array(ground_truth["body_colours"][k])
                assert np.abs(body - expected).max() < 30, (t, k, body, expected)
                assert np.abs(palette - body).max(axis=1).argmin() == APPEARANCE.body_colours.index(tuple(expected))


def test_cued_appearance_legend_shows_the_target_in_frame_0_only(appearance_split):
    palette = np.array(APPEARANCE.body_colours)  # (P, 3)
    x0, y0, x1, y1 = LEGEND_BOX
    for frames, ground_truth in appearance_split:
        target = ground_truth["target"]
        target_colour = np.array(ground_truth["body_colours"][target])
        # Frame 0: the swatch (1 px inside its edges) has the target's body colour, nearest of the whole palette.
        swatch = frames[0, y0 + 1 : y1 - 1, x0 + 1 : x1 - 1].reshape(-1, 3)
        assert np.abs(swatch - target_colour).max() < 30
        assert np.abs(palette - swatch.mean(axis=0)).max(axis=1).argmin() == APPEARANCE.body_colours.index(
            tuple(target_colour)
        )
        # Later frames: where the legend was (2 px around it too) is plain grey background at the frame's level: no
        # pixel with the palette's chroma (>= 85; the textured grey reaches 13 after decoding).
        for t in range(1, CUED_T):
            corner = frames[t, y0 - 2 : y1 + 2, x0 - 2 : x1 + 2].reshape(-1, 3)
            assert np.ptp(corner, axis=1).max() < 30, t
            level = CUE.levels[ground_truth["frames"][t]["level"]]
            # (within the faint texture's +-12 around the level; the levels are 45 apart)
            assert np.abs(corner.mean() - level) < 15, (t, corner.mean(), level)


def test_generating_a_split_shows_its_progress(tmp_path, capsys):
    generate_split(tmp_path, num_train=2, num_eval=1, difficulty="cued", size=32, num_video_frames=4, num_frames=4)
    progress = capsys.readouterr().err
    assert "synthetic train clips: 100%" in progress and "synthetic eval clips: 100%" in progress


def test_synthetic_captions_name_what_the_glimpse_must_read():
    _, cued = generate_video(0, "cued", size=64, num_video_frames=4, num_frames=4)
    last_cue = cued["frames"][-1]["objects"][cued["target"]]["cue"]
    assert describe_clip(cued) == f"the marked object's last cue is {CUE_COLOUR_NAMES[last_cue]}."
    _, motion = generate_video(0, "cued_motion", size=64, num_video_frames=4, num_frames=4)
    assert describe_clip(motion).startswith("the moving object's last cue is ")
    _, medium = generate_video(0, "medium", size=64, num_video_frames=16, num_frames=8)
    mover = [k for k, o in enumerate(medium["frames"][0]["objects"]) if o["moving"]]
    (box0, box1) = (medium["frames"][t]["objects"][mover[0]]["box"] for t in (0, 2))  # sampled frames 0 and 1 of 8
    heading = describe_clip(medium).removeprefix("1 of 4 objects moves ").removesuffix(".")
    dx, dy = box1[0] - box0[0], box1[1] - box0[1]
    assert ("right" in heading) == (dx > abs(dy) / 2.5) and ("down" in heading) == (dy > abs(dx) / 2.5)
