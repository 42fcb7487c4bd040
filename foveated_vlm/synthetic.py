"""Synthetic benchmark videos where *where to look* matters.

Each video shows a static, smooth, low-contrast textured background and several look-alike solid objects (same
colour and shape within a video). Only some of them move, at a constant velocity, bouncing off the borders. A single
glimpse of one frame cannot tell which look-alike moves; predicting the next frame needs tracking across frames,
which is what a dynamic, content-dependent glimpse can do and a static one cannot.

Objects are solid and large enough (side >= size / 10) to survive the 8x downsampling of the VAE latent: fine
texture averages away there and leaves nothing to predict.

The `cued` scene is the positive control of docs/DESIGN.md ("When can a glimpse beat a static read?"): nothing
moves; K look-alikes each show a small centre cue of a random colour in every frame, one of them (the target) is
marked in frame 0 only, and the target's cue colour in frame t sets the background level of frame t+1. Only a glimpse
aimed at the target, whose place frame 0 reveals, can predict the next frame's brightness. `cued_motion` is the
same rule with the target revealed by its motion instead (it moves, the others stand still), the ladder's next rung.
`cued_appearance`, the third rung: the objects stand still, each in its own body colour, and a legend swatch in frame
0 only shows the target's colour: finding the target means matching the legend to a body.

Usage:
    python -m foveated_vlm.synthetic --output_dir data/synthetic --num_train 512 --num_eval 64 --difficulty medium
"""

import argparse
import json
import logging
import os
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Optional

import av
import numpy as np
from transformers.utils.logging import tqdm


__all__ = [
    "DIFFICULTIES",
    "EVAL_SEED_OFFSET",
    "FoveatedVLMCueSpec",
    "FoveatedVLMSceneSpec",
    "describe_clip",
    "generate_video",
    "write_video",
    "generate_split",
]

logger = logging.getLogger(__name__)

# Eval videos use seeds seed + EVAL_SEED_OFFSET + i, so train and eval never share a seed while num_train stays below.
EVAL_SEED_OFFSET = 1_000_000
# Smallest luminance difference between objects and the background's base colour, out of 255.
MIN_OBJECT_CONTRAST = 90.0
# Peak amplitude of the background texture, out of 255: low contrast, so the texture never looks like an object.
BACKGROUND_TEXTURE_AMPLITUDE = 12.0
SHAPES = ("square", "disc")


@dataclass(frozen=True)
class FoveatedVLMCueSpec:
    """The cued scene's rule: cue colour c of the target in frame t -> background level `level_of_cue[c]` in t+1.

    Colours are RGB out of 255. The objects are near-black and the background grey, so that the cues (saturated
    hues of different luminance) and the target's frame-0 mark (magenta) differ from both in hue; the levels are
    45 grey values apart, a global step the 8x latent keeps whole.

    With target_marked_by="appearance" each object's body takes its own colour of `body_colours` instead (a random
    assignment per video). These are dark, saturated hues at least 23 degrees of hue from every cue colour and the
    magenta mark, luminance 36-72 (18-54 below the darkest level, with 85-125 of chroma against its grey): each cue
    stays >= 110 RGB (Euclidean) from every body, and two bodies differ by >= 57 (one channel by >= 45)."""

    cue_side: float = 6 / 128  # fraction of the frame size: inside one 16 px encoder patch, a quarter of an object
    cue_colours: tuple[tuple[float, float, float], ...] = (
        (230.0, 30.0, 30.0),  # red
        (30.0, 200.0, 30.0),  # green
        (40.0, 70.0, 255.0),  # blue
        (240.0, 220.0, 30.0),  # yellow
    )
    levels: tuple[float, ...] = (90.0, 135.0, 180.0, 225.0)  # background grey values, all >= 75 above the objects
    level_of_cue: tuple[int, ...] = (0, 1, 2, 3)  # cue colour index -> level index of the next frame
    object_colour: tuple[float, float, float] = (15.0, 15.0, 15.0)
    target_colour: tuple[float, float, float] = (255.0, 0.0, 255.0)  # the target's body in frame 0 only
    # How history reveals the target: "colour" (its body is `target_colour` in frame 0, then a look-alike),
    # "motion" (a look-alike throughout that moves, about one side per frame, bouncing; the others stand still) or
    # "appearance" (every object has its own body colour; in frame 0 only, a legend swatch shows the target's).
    target_marked_by: str = "colour"
    # "appearance" only: the palette the bodies draw distinct colours from, and the legend, a square of the target's
    # body colour `legend_offset` from the top-left corner; objects keep out of the swatch and its margin
    # ([0, 2 * offset + side) in x and y). Both snap to even pixels (whole yuv420p chroma samples).
    body_colours: tuple[tuple[float, float, float], ...] = (
        (100.0, 50.0, 10.0),  # brown, hue 27 degrees
        (55.0, 85.0, 0.0),  # olive, 81
        (0.0, 95.0, 45.0),  # sea green, 148
        (0.0, 100.0, 120.0),  # teal, 190
        (0.0, 45.0, 85.0),  # deep azure, 208 (darker than teal)
        (75.0, 5.0, 130.0),  # violet, 274
        (115.0, 15.0, 60.0),  # wine, 333
    )
    legend_side: float = 12 / 128  # twice the cue: a whole 8x latent cell at 128 px, inside the first 16 px patch
    legend_offset: float = 4 / 128

    def __post_init__(self):
        if len(self.level_of_cue) != len(self.cue_colours):
            raise ValueError(
                f"level_of_cue needs one level per cue colour ({len(self.cue_colours)}), got {len(self.level_of_cue)}"
            )
        if not all(0 <= level < len(self.levels) for level in self.level_of_cue):
            raise ValueError(f"level_of_cue must index levels (0..{len(self.levels) - 1}), got {self.level_of_cue}")
        if self.target_marked_by not in ("colour", "motion", "appearance"):
            raise ValueError(
                f"target_marked_by must be 'colour', 'motion' or 'appearance', got {self.target_marked_by!r}"
            )


@dataclass(frozen=True)
class FoveatedVLMSceneSpec:
    num_moving: int
    num_static: int
    side_range: tuple[float, float]  # object side as a fraction of the frame size, sampled once per video
    flicker: float  # amplitude of the global brightness flicker (0.05 = +-5 %), 0 for none
    cue: Optional[FoveatedVLMCueSpec] = None  # the cued scene's rule (its look-alikes are the static objects)

    def __post_init__(self):
        if self.cue is not None and self.cue.target_marked_by == "appearance":
            if len(set(self.cue.body_colours)) < self.num_static:
                raise ValueError(
                    f"cue.body_colours needs {self.num_static} distinct colours (one per object), "
                    f"got {len(set(self.cue.body_colours))}"
                )


# The cued scenes' objects: K = 7 still look-alikes, more candidates than one static token can report the cues of.
_CUED_OBJECTS = dict(num_moving=0, num_static=7, side_range=(1 / 8, 1 / 6), flicker=0.0)

DIFFICULTIES = {
    "easy": FoveatedVLMSceneSpec(num_moving=1, num_static=1, side_range=(1 / 8, 1 / 6), flicker=0.0),
    "medium": FoveatedVLMSceneSpec(num_moving=1, num_static=3, side_range=(1 / 8, 1 / 6), flicker=0.0),
    # Smaller objects still span 1.3-1.6 latent cells at 8x downsampling.
    "hard": FoveatedVLMSceneSpec(num_moving=2, num_static=4, side_range=(1 / 10, 1 / 8), flicker=0.05),
    "cued": FoveatedVLMSceneSpec(**_CUED_OBJECTS, cue=FoveatedVLMCueSpec()),
    # The ladder's second rung: the same rule, the target known only by its motion (the cue rides on it).
    "cued_motion": FoveatedVLMSceneSpec(**_CUED_OBJECTS, cue=FoveatedVLMCueSpec(target_marked_by="motion")),
    # The third rung: the same rule, nothing moves, the target known by its body colour, which a legend in frame 0
    # shows.
    "cued_appearance": FoveatedVLMSceneSpec(**_CUED_OBJECTS, cue=FoveatedVLMCueSpec(target_marked_by="appearance")),
    # A rung with fewer look-alikes, for a curriculum (`--curriculum`): with one, any glimpse on an object reads the
    # target's cue, so the head can learn the cue rule before it must also tell the target from the others. The
    # appearance rung has its own (coloured bodies, the legend): a head that learned the rule on `cued_1`'s dark bodies
    # reads tokens there that it has not seen (docs/RESULTS.md). So has the motion rung (a moving target).
    **{
        f"{rung}_{count}": FoveatedVLMSceneSpec(
            **{**_CUED_OBJECTS, "num_static": count}, cue=FoveatedVLMCueSpec(target_marked_by=marked_by)
        )
        for rung, marked_by in (("cued", "colour"), ("cued_motion", "motion"), ("cued_appearance", "appearance"))
        for count in (1, 3)
    },
}


def _luminance(rgb: np.ndarray) -> float:
    return float(rgb @ np.array([0.299, 0.587, 0.114]))


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A smooth random texture (size, size, 3) float32 around a dark or light base colour (3,), both in [0, 255]."""
    low, high = (30.0, 100.0) if rng.random() < 0.5 else (155.0, 225.0)
    base_colour = rng.uniform(low, high, size=3)
    coords = (np.arange(size) + 0.5) / size
    y, x = np.meshgrid(coords, coords, indexing="ij")  # (size, size) each
    texture = np.zeros((size, size, 3))
    # A few low-frequency plane waves (1-4 cycles per frame), each with its own tint.
    num_waves = 4
    for _ in range(num_waves):
        freq_x, freq_y = rng.uniform(-4.0, 4.0, size=2)
        wave = np.sin(2 * np.pi * (freq_x * x + freq_y * y) + rng.uniform(0, 2 * np.pi))  # (size, size)
        tint = rng.uniform(0.5, 1.0, size=3)
        texture += wave[..., None] * tint * (BACKGROUND_TEXTURE_AMPLITUDE / num_waves)
    return (base_colour + texture).astype(np.float32), base_colour


def _object_colour(rng: np.random.Generator, background_colour: np.ndarray) -> np.ndarray:
    background_luminance = _luminance(background_colour)
    while True:  # rejection sampling: about half of all colours pass for any background base colour
        colour = rng.uniform(0.0, 255.0, size=3)
        if abs(_luminance(colour) - background_luminance) >= MIN_OBJECT_CONTRAST:
            return colour.astype(np.float32)


def _place_without_overlap(
    rng: np.random.Generator, num_objects: int, side: float, size: int, keep_out: float = 0.0
) -> np.ndarray:
    """Top-left corners (num_objects, 2) as (x, y) of squares of `side` that keep a gap of at least 2 px, and stay out
    of the top-left square [0, keep_out) x [0, keep_out) (none with the default 0: the same draws)."""
    gap = 2.0
    corners = []
    for _ in range(10_000):
        candidate = rng.uniform(0.0, size - side, size=2)
        if (candidate < keep_out).all():
            continue
        if all(np.abs(candidate - other).max() >= side + gap for other in corners):
            corners.append(candidate)
            if len(corners) == num_objects:
                return np.stack(corners)
    raise RuntimeError(f"could not place {num_objects} objects of side {side:.1f} px in a {size} px frame")


def _bounce(start: np.ndarray, velocity: np.ndarray, num_video_frames: int, extent: float) -> np.ndarray:
    """Positions (num_video_frames, 2) of a point moving at `velocity` px/frame inside [0, extent], reflected at the
    ends."""
    unfolded = start + velocity * np.arange(num_video_frames)[:, None]  # (F, 2)
    folded = np.mod(unfolded, 2 * extent)
    return np.where(folded <= extent, folded, 2 * extent - folded)


def _coverage_1d(low: float, high: float, pixels: np.ndarray) -> np.ndarray:
    """Fraction of each pixel [i, i+1) covered by the interval [low, high): anti-aliased edges for sub-pixel motion."""
    return np.clip(np.minimum(pixels + 1, high) - np.maximum(pixels, low), 0.0, 1.0)


def _paint(frame: np.ndarray, shape: str, box: np.ndarray, colour: np.ndarray) -> None:
    """Blend a solid anti-aliased square or disc filling `box` = [x0, y0, x1, y1] into `frame` (S, S, 3), in place."""
    size = frame.shape[0]
    x0, y0, x1, y1 = box
    # Only the pixels around the box (a disc's soft edge reaches half a pixel beyond it) are touched.
    ys = np.arange(max(int(y0) - 1, 0), min(int(np.ceil(y1)) + 1, size))
    xs = np.arange(max(int(x0) - 1, 0), min(int(np.ceil(x1)) + 1, size))
    if shape == "square":
        alpha = _coverage_1d(y0, y1, ys)[:, None] * _coverage_1d(x0, x1, xs)[None, :]
    else:
        distance = np.hypot(xs[None, :] + 0.5 - (x0 + x1) / 2, ys[:, None] + 0.5 - (y0 + y1) / 2)
        alpha = np.clip((x1 - x0) / 2 - distance + 0.5, 0.0, 1.0)
    patch = frame[ys[0] : ys[-1] + 1, xs[0] : xs[-1] + 1]  # (h, w, 3) view
    patch += alpha[..., None] * (colour - patch)


def generate_video(
    seed: int,
    difficulty: str = "medium",
    size: int = 128,
    num_video_frames: int = 16,
    num_frames: Optional[int] = None,
) -> tuple[np.ndarray, dict]:
    """Render one synthetic video, fully determined by its arguments.

    A mover's speed assumes the reader samples `num_frames` (T) frames uniformly over the whole video (default: T of
    the model's config): between two of them it shifts by about one object side, far enough to change the
    latent, close enough to be tracked, whatever the video's length. Other sampling changes the task.

    Returns:
        frames: uint8 array (num_video_frames, size, size, 3), RGB.
        ground_truth: {"seed", "difficulty", "size", "num_video_frames", "num_frames",
            "frames": [{"objects": [{"box", "moving"}]}]}.
            Boxes are [x0, y0, x1, y1] in continuous pixel coordinates (pixel i spans [i, i+1)); objects keep their
            order in every frame, so index k is the same object throughout. The cued scene adds "target" (the
            target's index), each frame's "level" (index into `FoveatedVLMCueSpec.levels`) and each object's
            "target" flag and "cue" (index into `FoveatedVLMCueSpec.cue_colours`). `cued_appearance` adds
            "body_colours" (each object's RGB, constant) and "legend" ({"box", "colour"}: the frame-0 swatch, in
            the target's body colour).

    Raises:
        ValueError: for the cued scene, when num_video_frames != num_frames: its rule links consecutive frames, so
            uniform sampling must read every frame in order.
    """
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {sorted(DIFFICULTIES)}, got {difficulty!r}")
    if size < 32 or size % 2:
        raise ValueError(f"size must be an even number >= 32 (H.264 with yuv420p needs even sides), got {size}")
    if num_video_frames < 2:
        raise ValueError(f"num_video_frames must be >= 2 so that something can move, got {num_video_frames}")
    num_frames = _resolve_num_frames(num_frames)
    if num_frames < 2:
        raise ValueError(f"num_frames must be >= 2 (speeds are set between two), got {num_frames}")
    spec = DIFFICULTIES[difficulty]
    rng = np.random.default_rng(seed)
    ground_truth = {
        "seed": seed,
        "difficulty": difficulty,
        "size": size,
        "num_video_frames": num_video_frames,
        "num_frames": num_frames,
    }
    if spec.cue is not None:
        if num_video_frames != num_frames:
            raise ValueError(
                f"difficulty {difficulty!r} sets frame t+1 from frame t, so the model must read every frame: "
                f"num_video_frames ({num_video_frames}) must equal num_frames ({num_frames})"
            )
        frames, ground_truth_frames, extra = _render_cued(rng, spec, size, num_video_frames)
        return frames, {**ground_truth, "frames": ground_truth_frames, **extra}

    background, background_colour = _background(rng, size)  # (S, S, 3)
    colour = _object_colour(rng, background_colour)
    shape = SHAPES[rng.integers(len(SHAPES))]
    side = rng.uniform(*spec.side_range) * size
    num_objects = spec.num_moving + spec.num_static
    corners = _place_without_overlap(rng, num_objects, side, size)  # (K, 2)

    # Movers first, each shifting by about one side between two sampled frames.
    frames_between_samples = (num_video_frames - 1) / (num_frames - 1)
    tracks = []  # K arrays of (F, 2) top-left corners
    for k in range(num_objects):
        if k < spec.num_moving:
            angle = rng.uniform(0.0, 2 * np.pi)
            speed = side / frames_between_samples * rng.uniform(0.8, 1.2)
            velocity = speed * np.array([np.cos(angle), np.sin(angle)])
            tracks.append(_bounce(corners[k], velocity, num_video_frames, size - side))
        else:
            tracks.append(np.repeat(corners[k][None], num_video_frames, axis=0))

    # A slow sinusoidal flicker: mild, global, and predictable from the frames seen so far.
    flicker_period = rng.uniform(4.0, 8.0)
    flicker_phase = rng.uniform(0.0, 2 * np.pi)
    gains = 1.0 + spec.flicker * np.sin(2 * np.pi * np.arange(num_video_frames) / flicker_period + flicker_phase)

    frames = np.empty((num_video_frames, size, size, 3), dtype=np.uint8)
    ground_truth_frames = []
    for t in range(num_video_frames):
        frame = background.copy()
        objects = []
        # Static objects first, movers on top: a mover passing over a look-alike stays whole.
        for k in reversed(range(num_objects)):
            x0, y0 = tracks[k][t]
            box = np.array([x0, y0, x0 + side, y0 + side])
            _paint(frame, shape, box, colour)
            objects.append({"box": [round(float(v), 3) for v in box], "moving": k < spec.num_moving})
        frames[t] = np.clip(np.rint(frame * gains[t]), 0, 255).astype(np.uint8)
        ground_truth_frames.append({"objects": objects[::-1]})

    return frames, {**ground_truth, "frames": ground_truth_frames}


def _render_cued(
    rng: np.random.Generator, spec: FoveatedVLMSceneSpec, size: int, num_video_frames: int
) -> tuple[np.ndarray, list[dict], dict]:
    """The cued scene (see FoveatedVLMCueSpec): frames (F, S, S, 3) uint8, ground-truth frames, and the video-wide
    ground truth ({"target": the target's index}, plus "body_colours" and "legend" for "appearance")."""
    cue = spec.cue
    by_appearance = cue.target_marked_by == "appearance"
    textured, base_colour = _background(rng, size)
    texture = textured - base_colour  # (S, S, 3): the same faint texture on every level
    shape = SHAPES[rng.integers(len(SHAPES))]
    side = rng.uniform(*spec.side_range) * size
    num_objects = spec.num_static
    legend_side = max(2, 2 * round(cue.legend_side * size / 2))
    legend_offset = 2 * round(cue.legend_offset * size / 2)
    legend_box = np.array([legend_offset, legend_offset, legend_offset + legend_side, legend_offset + legend_side])
    keep_out = 2 * legend_offset + legend_side if by_appearance else 0.0  # the legend and its margin
    corners = _place_without_overlap(rng, num_objects, side, size, keep_out)  # (K, 2)
    target = int(rng.integers(num_objects))
    tracks = np.repeat(corners[None], num_video_frames, axis=0)  # (F, K, 2) top-left corners
    if cue.target_marked_by == "motion":
        angle = rng.uniform(0.0, 2 * np.pi)
        velocity = side * rng.uniform(0.8, 1.2) * np.array([np.cos(angle), np.sin(angle)])  # one side per frame
        tracks[:, target] = _bounce(corners[target], velocity, num_video_frames, size - side)
    cues = rng.integers(len(cue.cue_colours), size=(num_video_frames, num_objects))  # (F, K)
    levels = np.empty(num_video_frames, dtype=np.int64)
    levels[0] = rng.integers(len(cue.levels))
    levels[1:] = np.asarray(cue.level_of_cue)[cues[:-1, target]]  # the rule: target's cue at t -> level at t+1
    bodies = [cue.object_colour] * num_objects
    extra = {"target": target}
    if by_appearance:  # drawn after everything the other cued scenes draw
        bodies = [cue.body_colours[i] for i in rng.permutation(len(cue.body_colours))[:num_objects]]
        extra["body_colours"] = [list(colour) for colour in bodies]
        extra["legend"] = {"box": [float(v) for v in legend_box], "colour": list(bodies[target])}

    # Cues snapped to even pixels with an even side: yuv420p keeps one chroma sample per 2x2 block, so an aligned
    # cue keeps its hue whole instead of bleeding into the object.
    cue_side = max(2, 2 * round(cue.cue_side * size / 2))
    cue_corners = 2 * np.round((tracks + side / 2 - cue_side / 2) / 2)  # (F, K, 2) as (x, y)
    marked_by_colour = cue.target_marked_by == "colour"

    frames = np.empty((num_video_frames, size, size, 3), dtype=np.uint8)
    ground_truth_frames = []
    for t in range(num_video_frames):
        frame = cue.levels[levels[t]] + texture
        if by_appearance and t == 0:
            _paint(frame, "square", legend_box, np.asarray(bodies[target], dtype=np.float32))
        objects = []
        # The target last: a moving target passing over a look-alike stays whole, cue included.
        for k in sorted(range(num_objects), key=lambda k: k == target):
            box = np.array([*tracks[t, k], *(tracks[t, k] + side)])
            body = cue.target_colour if (k == target and t == 0 and marked_by_colour) else bodies[k]
            _paint(frame, shape, box, np.asarray(body, dtype=np.float32))
            _paint(frame, "square", np.array([*cue_corners[t, k], *(cue_corners[t, k] + cue_side)]),
                   np.asarray(cue.cue_colours[cues[t, k]], dtype=np.float32))  # fmt: skip
        for k in range(num_objects):
            box = [round(float(v), 3) for v in (*tracks[t, k], *(tracks[t, k] + side))]
            moving = k == target and cue.target_marked_by == "motion"
            objects.append({"box": box, "moving": moving, "target": k == target, "cue": int(cues[t, k])})
        frames[t] = np.clip(np.rint(frame), 0, 255).astype(np.uint8)
        ground_truth_frames.append({"level": int(levels[t]), "objects": objects})
    return frames, ground_truth_frames, extra


# The cue colours' names, in `FoveatedVLMCueSpec.cue_colours`' order.
CUE_COLOUR_NAMES = ("red", "green", "blue", "yellow")
# How the describer names the target of each way of marking it.
TARGET_NAMES = {"colour": "marked", "motion": "moving", "appearance": "announced"}
# Compass words for a direction in image coordinates (y grows downwards), counter-clockwise from "right".
DIRECTION_NAMES = ("right", "up-right", "up", "up-left", "left", "down-left", "down", "down-right")


def describe_clip(ground_truth: dict, num_frames: Optional[int] = None) -> str:
    """A caption of a clip, written from its generator state as a describer who watched it would write it: text as
    a target (docs/TRAINING.md). The words carry what a glimpse has to read.

    - Cued scenes: the target's cue colour in the last frame, e.g. "the marked object's last cue is green." Only a
      reader that finds the target (marked, moving or announced in frame 0) and still looks at it in the last frame
      can write it. (Its cue in an earlier frame is no test: the next frame's background level tells it to any read
      of the whole frame.)
    - The other scenes: where each mover heads between the first two sampled frames, e.g. "1 of 4 objects moves
      down-left." A glimpse that tracks the mover can read its heading; the count is in any glimpse of the frame.

    Args:
        ground_truth: `generate_video`'s ground truth (a sidecar's JSON).
        num_frames: how many frames the reader samples, uniformly over the video (default: the sidecar's
            `num_frames`); the cue colours named are those of the sampled frames.
    """
    frames = ground_truth["frames"]
    num_frames = num_frames or ground_truth.get("num_frames") or len(frames)
    sampled = np.linspace(0, len(frames) - 1, num_frames).round().astype(int)
    spec = DIFFICULTIES[ground_truth["difficulty"]]
    if spec.cue is not None:
        last_cue = frames[sampled[-1]]["objects"][ground_truth["target"]]["cue"]
        return f"the {TARGET_NAMES[spec.cue.target_marked_by]} object's last cue is {CUE_COLOUR_NAMES[last_cue]}."
    first, second = (frames[t]["objects"] for t in sampled[:2])
    headings = []
    for before, after in zip(first, second):
        if before["moving"]:
            dx = (after["box"][0] + after["box"][2] - before["box"][0] - before["box"][2]) / 2
            dy = (after["box"][1] + after["box"][3] - before["box"][1] - before["box"][3]) / 2
            sector = round(np.arctan2(-dy, dx) / (np.pi / 4)) % len(DIRECTION_NAMES)
            headings.append(DIRECTION_NAMES[sector])
    if not headings:
        return f"none of {len(first)} objects moves."
    verb = "moves" if len(headings) == 1 else "move"
    return f"{len(headings)} of {len(first)} objects {verb} {' and '.join(headings)}."


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float) -> None:
    """Write uint8 RGB frames (F, H, W, 3) as an H.264 mp4 (libx264, yuv420p, crf 17: visually lossless)."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (F, H, W, 3), got {frames.dtype} {frames.shape}")
    _, height, width, _ = frames.shape
    # faststart puts the index (moov atom) before the data, as streaming players and partial downloads expect.
    with av.open(str(path), mode="w", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "17", "preset": "medium"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())  # flush the encoder's delayed frames


def _write_atomically(path: Path, write) -> None:
    """Write through a temporary file so that an interrupted run never leaves a complete-looking broken file."""
    temporary_path = path.with_name(f".tmp-{path.name}")
    write(temporary_path)
    os.replace(temporary_path, path)


def _resolve_num_frames(num_frames: Optional[int]) -> int:
    if num_frames is not None:
        return num_frames
    from configuration_foveated import DEFAULT_NUM_FRAMES  # imports transformers: only when the default is asked for

    return DEFAULT_NUM_FRAMES


def _video_params(
    seed: int, difficulty: str, size: int, fps: float, num_video_frames: int, num_frames: int
) -> dict:
    return {
        "seed": seed, "difficulty": difficulty, "size": size, "fps": fps, "num_video_frames": num_video_frames,
        "num_frames": num_frames,
    }  # fmt: skip


def _is_up_to_date(video_path: Path, sidecar_path: Path, params: dict) -> bool:
    if not (video_path.is_file() and sidecar_path.is_file()):
        return False
    try:
        sidecar = json.loads(sidecar_path.read_text())
    except json.JSONDecodeError:
        return False
    return all(sidecar.get(key) == value for key, value in params.items())


def generate_split(
    output_dir: str | os.PathLike,
    num_train: int,
    num_eval: int,
    difficulty: str = "medium",
    size: int = 128,
    num_video_frames: int = 16,
    fps: float = 8.0,
    seed: int = 0,
    num_frames: Optional[int] = None,
) -> dict[str, list[str]]:
    """Write output_dir/{train,eval}/video_XXXXXX.mp4, each with a JSON sidecar video_XXXXXX.json holding
    generate_video's ground truth plus the fps. `num_frames`: see generate_video.

    Train videos use seeds seed .. seed+num_train-1, eval videos seed+EVAL_SEED_OFFSET+i: the eval split is held out
    by seed. A video whose files already exist with the same parameters is not rendered again.

    Returns:
        {"train": [mp4 paths], "eval": [mp4 paths]}, written or reused, in seed order.
    """
    if not 0 <= num_train <= EVAL_SEED_OFFSET:
        raise ValueError(f"num_train must be in [0, {EVAL_SEED_OFFSET}] to keep eval seeds disjoint, got {num_train}")
    if num_eval < 0:
        raise ValueError(f"num_eval must be >= 0, got {num_eval}")
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    num_frames = _resolve_num_frames(num_frames)
    split_seeds = {
        "train": [seed + i for i in range(num_train)],
        "eval": [seed + EVAL_SEED_OFFSET + i for i in range(num_eval)],
    }
    paths = {}
    num_reused = 0
    for split, seeds in split_seeds.items():
        split_dir = Path(output_dir) / split
        split_dir.mkdir(parents=True, exist_ok=True)
        paths[split] = []
        for i, video_seed in enumerate(tqdm(seeds, desc=f"synthetic {split} clips", unit="clip")):
            video_path = split_dir / f"video_{i:06d}.mp4"
            sidecar_path = video_path.with_suffix(".json")
            params = _video_params(video_seed, difficulty, size, fps, num_video_frames, num_frames)
            paths[split].append(str(video_path))
            if _is_up_to_date(video_path, sidecar_path, params):
                num_reused += 1
                continue
            frames, ground_truth = generate_video(video_seed, difficulty, size, num_video_frames, num_frames)
            _write_atomically(video_path, lambda p: write_video(p, frames, fps))
            # The sidecar goes last: its presence with matching params marks the pair as complete.
            sidecar = {**params, **{key: value for key, value in ground_truth.items() if key not in params}}
            _write_atomically(sidecar_path, lambda p: p.write_text(json.dumps(sidecar)))
    logger.info("%d videos written, %d reused", num_train + num_eval - num_reused, num_reused)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="Folder that receives train/ and eval/.")
    parser.add_argument("--num_train", type=int, default=512, help="Number of train videos (seeds seed..seed+N-1).")
    parser.add_argument(
        "--num_eval", type=int, default=64, help=f"Number of eval videos (seeds seed+{EVAL_SEED_OFFSET}+i)."
    )
    parser.add_argument(
        "--difficulty",
        choices=sorted(DIFFICULTIES),
        default="medium",
        help="easy: 1 mover + 1 static look-alike; medium: 1 + 3; hard: 2 + 4, smaller objects, brightness flicker; "
        "cued: 7 still look-alikes, the target's cue colour sets the next frame's background level "
        "(needs --num_frames equal to --num_video_frames); cued_motion: the same, the target known only because it "
        "moves; cued_appearance: the same, still, each object in its own colour, a legend in frame 0 showing the "
        "target's.",
    )
    parser.add_argument("--size", type=int, default=128, help="Frame side in pixels (even, >= 32).")
    parser.add_argument("--num_video_frames", type=int, default=16, help="Frames per video.")
    parser.add_argument(
        "--num_frames",
        type=int,
        default=None,
        help="Frames the model samples uniformly per video (T; default: the model config's): sets the movers' speed.",
    )
    parser.add_argument("--fps", type=float, default=8.0, help="Frame rate written into the mp4.")
    parser.add_argument("--seed", type=int, default=0, help="First train seed; eval seeds are offset from it.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    start = time.perf_counter()
    paths = generate_split(
        args.output_dir,
        num_train=args.num_train,
        num_eval=args.num_eval,
        difficulty=args.difficulty,
        size=args.size,
        num_video_frames=args.num_video_frames,
        fps=args.fps,
        seed=args.seed,
        num_frames=args.num_frames,
    )
    spec = DIFFICULTIES[args.difficulty]
    print(
        f"{len(paths['train'])} train + {len(paths['eval'])} eval videos in {args.output_dir} "
        f"({args.difficulty}: {spec.num_moving} moving + {spec.num_static} static look-alikes; "
        f"{args.num_video_frames} frames of {args.size}x{args.size} at {args.fps:g} fps) "
        f"in {time.perf_counter() - start:.1f}s"
    )


if __name__ == "__main__":
    main()
