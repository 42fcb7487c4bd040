"""Video loading and preprocessing for the Foveated VLM.

This file is also the remote code of a Hub checkpoint (`trust_remote_code=True`): it stays flat and self-contained and
imports only torch, numpy and transformers at module level. transformers' `check_imports` reads every import in the
file, nested ones included, except those under `if is_<library>_available():`; decord is imported that way.

A video becomes T frames of S x S pixels:
    decode (decord) -> sample T frame indices -> to RGB -> resize ("crop" or "squash") -> uint8 (T, S, S, 3)
and the uint8 frames become the two model inputs, nowhere else:
    frames_to_pixel_values      -> float32 (..., T, 3, S, S), ImageNet-normalised (DINOv3 input)
    frames_to_vae_pixel_values  -> float32 (..., T, 3, S, S) in [-1, 1] (Stable Diffusion VAE input)
"""

import io
import os

import numpy as np
import torch
import torch.nn.functional as F
from transformers import BatchFeature, ProcessorMixin
from transformers.dynamic_module_utils import custom_object_save
from transformers.utils import PROCESSOR_NAME, is_decord_available


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "RESIZE_MODES",
    "FoveatedVLMVideoError",
    "sample_frame_indices",
    "load_video",
    "transform_box",
    "frames_to_pixel_values",
    "frames_to_vae_pixel_values",
    "FoveatedVLMProcessor",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# "crop": shortest side to S, then a centre crop (keeps the aspect ratio, loses the borders of wide frames).
# "squash": straight to S x S (keeps everything, distorts the aspect ratio; the seed guide's way).
RESIZE_MODES = ("crop", "squash")


class FoveatedVLMVideoError(ValueError):
    """A video that cannot be loaded: missing, empty, not a video, truncated, or without frames."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"Cannot load video {path}: {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self):
        # Rebuild from (path, reason) when pickled across DataLoader or datasets.map worker processes.
        return type(self), (self.path, self.reason)


def sample_frame_indices(
    num_video_frames: int, num_frames: int, video_fps: float | None = None, sample_fps: float | None = None
) -> np.ndarray:
    """Which `num_frames` frames of a video of `num_video_frames` frames to read.

    Uniform (default): spread evenly over the whole video, first and last frame included,
    `np.linspace(0, n - 1, num_frames).round()` (numpy rounds halves to even). The seed guide truncates
    (`dtype=int`), which pulls every index towards the start; rounding takes the frame nearest to each ideal position.

    Fixed rate (`sample_fps` given): one frame every `video_fps / sample_fps` frames starting at frame 0, positions
    rounded the same way.

    A video too short for the request repeats frames instead of failing: uniform sampling then shows every frame
    about equally often, in order; fixed-rate sampling repeats the last frame.

    Returns:
        int64 array (num_frames,), non-decreasing, in [0, num_video_frames - 1].
    """
    if num_video_frames < 1:
        raise ValueError(f"num_video_frames must be >= 1, got {num_video_frames}: a video without frames")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if sample_fps is None:
        positions = np.linspace(0, num_video_frames - 1, num_frames)
    else:
        if sample_fps <= 0:
            raise ValueError(f"sample_fps must be > 0, got {sample_fps}")
        if video_fps is None or not video_fps > 0:
            raise ValueError(f"sample_fps needs the video's frame rate, but video_fps is {video_fps}")
        positions = np.arange(num_frames) * (video_fps / sample_fps)
    return np.minimum(positions.round().astype(np.int64), num_video_frames - 1)


def _resize_geometry(orig_size: tuple[int, int], image_size: int, resize_mode: str) -> tuple[int, int, int, int]:
    """(resized_height, resized_width, top, left): resize the frame to the first two, then crop S x S at (top, left)."""
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
    height, width = orig_size
    if resize_mode == "squash":
        return image_size, image_size, 0, 0
    scale = image_size / min(height, width)
    resized_height = max(image_size, round(height * scale))
    resized_width = max(image_size, round(width * scale))
    return resized_height, resized_width, (resized_height - image_size) // 2, (resized_width - image_size) // 2


def _resize_frames(frames: np.ndarray, image_size: int, resize_mode: str) -> np.ndarray:
    """uint8 (T, H, W, 3) -> uint8 (T, S, S, 3)."""
    T, H, W, _ = frames.shape
    resized_height, resized_width, top, left = _resize_geometry((H, W), image_size, resize_mode)
    pixels = torch.from_numpy(frames).permute(0, 3, 1, 2).float()  # (T, H, W, 3) -> (T, 3, H, W)
    if (resized_height, resized_width) != (H, W):
        # antialias: a plain bilinear downscale aliases fine texture into moire that the VAE would then encode.
        pixels = F.interpolate(pixels, size=(resized_height, resized_width), mode="bilinear", antialias=True)
    pixels = pixels[:, :, top : top + image_size, left : left + image_size]  # (T, 3, S, S)
    return pixels.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (T, S, S, 3)


def _to_rgb(frames: np.ndarray) -> np.ndarray:
    """uint8 (T, H, W, C) with C in {1, 3, 4} -> uint8 (T, H, W, 3): grey is repeated, alpha is dropped."""
    if frames.shape[-1] == 1:
        return np.repeat(frames, 3, axis=-1)
    return frames[..., :3]


def _first_line(error: Exception) -> str:
    # decord's messages carry a timestamp, a C++ source location and sometimes a stack trace; the first line is enough.
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _import_decord():
    # Under `if is_decord_available()` so that check_imports does not require decord of every remote-code user.
    if is_decord_available():
        import decord

        return decord
    raise ImportError("FoveatedVLMProcessor decodes video files with decord: `pip install decord`.")


def _decode_video(video: str | os.PathLike | bytes, name: str, num_frames: int, sample_fps: float | None):
    """Decode the sampled frames of a video file or its bytes: (uint8 (T, H, W, 3), frame indices, fps, frame count)."""
    if isinstance(video, (bytes, bytearray)):
        num_bytes = len(video)
        source = io.BytesIO(video)  # decord reads file-like objects through its own in-memory AVIO
    else:
        source = os.fspath(video)
        if not os.path.isfile(source):
            raise FoveatedVLMVideoError(name, "file not found")
        num_bytes = os.path.getsize(source)
    if num_bytes == 0:
        raise FoveatedVLMVideoError(name, "empty (0 bytes)")

    decord = _import_decord()
    try:
        reader = decord.VideoReader(source, num_threads=1)
    except Exception as error:  # decord raises RuntimeError, DECORDError or AssertionError for unreadable input
        raise FoveatedVLMVideoError(
            name, f"decord cannot open it: not a video, or truncated or corrupt ({_first_line(error)})"
        ) from error
    try:
        num_video_frames = len(reader)
        if num_video_frames == 0:
            raise FoveatedVLMVideoError(name, "the video has no frames")
        fps = float(reader.get_avg_fps())
        frame_indices = sample_frame_indices(num_video_frames, num_frames, fps, sample_fps)
        try:
            batch = reader.get_batch(frame_indices.tolist())
            # decord's output "bridge" is process-wide state that other code may have switched to torch.
            frames = batch.numpy() if isinstance(batch, torch.Tensor) else batch.asnumpy()  # (T, H, W, 3)
        except Exception as error:
            raise FoveatedVLMVideoError(
                name, f"frames {frame_indices.tolist()} failed to decode, truncated file? ({_first_line(error)})"
            ) from error
    finally:
        del reader  # frees the decoder and its file handle now rather than at garbage collection
    return frames, frame_indices, fps, num_video_frames


def load_video(
    video: str | os.PathLike | bytes | np.ndarray,
    num_frames: int,
    image_size: int,
    resize_mode: str = "crop",
    sample_fps: float | None = None,
) -> tuple[np.ndarray, dict]:
    """Read `num_frames` frames of a video as RGB S x S.

    Args:
        video: a path, the bytes of a video file, or decoded frames as a uint8 array (F, H, W, C) with C in
            {1, 3, 4} (grey and alpha become RGB; an array carries no frame rate, so no `sample_fps`).
        num_frames: T, the number of frames to sample (see `sample_frame_indices`).
        image_size: S, the side of the output frames.
        resize_mode: "crop" (shortest side to S, centre crop) or "squash" (S x S, aspect ratio not kept).
        sample_fps: sample at this rate instead of uniformly over the whole video.

    Returns:
        frames: uint8 (T, S, S, 3).
        info: {"frame_indices": list[int], "fps": float (0.0 for arrays), "num_video_frames": int,
            "orig_size": (H, W)}.

    Raises:
        FoveatedVLMVideoError: naming the file and the reason, for any video that cannot be read.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    if isinstance(video, np.ndarray):
        name = f"<array of shape {video.shape}>"
        if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] not in (1, 3, 4):
            raise FoveatedVLMVideoError(
                name, f"a frame array must be uint8 (F, H, W, C) with C in (1, 3, 4), got {video.dtype}"
            )
        if len(video) == 0:
            raise FoveatedVLMVideoError(name, "the video has no frames")
        fps, num_video_frames = 0.0, len(video)
        frame_indices = sample_frame_indices(num_video_frames, num_frames, fps, sample_fps)
        frames = _to_rgb(video[frame_indices])  # (T, H, W, 3)
    elif isinstance(video, (str, os.PathLike, bytes, bytearray)):
        name = f"<{len(video)} bytes>" if isinstance(video, (bytes, bytearray)) else os.fspath(video)
        frames, frame_indices, fps, num_video_frames = _decode_video(video, name, num_frames, sample_fps)
    else:
        raise TypeError(f"video must be a path, bytes or a uint8 numpy array, got {type(video).__name__}")

    H, W = frames.shape[1:3]
    info = {
        "frame_indices": frame_indices.tolist(),
        "fps": fps,
        "num_video_frames": num_video_frames,
        "orig_size": (H, W),
    }
    return _resize_frames(frames, image_size, resize_mode), info


def transform_box(
    box_xyxy: np.ndarray | list, orig_size: tuple[int, int], image_size: int, resize_mode: str = "crop"
) -> np.ndarray:
    """Map pixel boxes [x0, y0, x1, y1] (..., 4) of an (H, W) frame into the processed S x S frame, as fractions of S
    clipped to [0, 1] (a box outside a centre crop collapses onto its border). Uses the same geometry as load_video."""
    boxes = np.asarray(box_xyxy, dtype=np.float64)
    if boxes.shape[-1:] != (4,):
        raise ValueError(f"box_xyxy must have shape (..., 4) as [x0, y0, x1, y1], got {boxes.shape}")
    height, width = orig_size
    resized_height, resized_width, top, left = _resize_geometry(orig_size, image_size, resize_mode)
    scale = np.array([resized_width / width, resized_height / height] * 2)
    offset = np.array([left, top] * 2)
    return np.clip((boxes * scale - offset) / image_size, 0.0, 1.0)


def _channels_first_float(frames: torch.Tensor | np.ndarray) -> torch.Tensor:
    frames = torch.as_tensor(frames)
    if frames.dtype != torch.uint8 or frames.ndim < 3 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (..., H, W, 3), got {frames.dtype} {tuple(frames.shape)}")
    return frames.movedim(-1, -3).contiguous().float()  # (..., H, W, 3) -> (..., 3, H, W)


def frames_to_pixel_values(
    frames: torch.Tensor | np.ndarray,
    image_mean: tuple[float, ...] = IMAGENET_MEAN,
    image_std: tuple[float, ...] = IMAGENET_STD,
) -> torch.Tensor:
    """uint8 (..., T, S, S, 3) -> float32 (..., T, 3, S, S), normalised with ImageNet statistics (DINOv3 input)."""
    pixels = _channels_first_float(frames) / 255.0
    mean = torch.tensor(image_mean, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    std = torch.tensor(image_std, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    return (pixels - mean) / std


def frames_to_vae_pixel_values(frames: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 (..., T, S, S, 3) -> float32 (..., T, 3, S, S) in [-1, 1] (Stable Diffusion VAE input)."""
    return _channels_first_float(frames) / 127.5 - 1.0


class FoveatedVLMProcessor(ProcessorMixin):
    """Turns videos (and, from Phase 2 on, text) into model inputs.

    The tokenizer is optional: Phase 1 trains on videos alone. ProcessorMixin expects every sub-processor to exist,
    so the methods that touch them are adapted to an absent tokenizer: the type check, `model_input_names`,
    `save_pretrained` (no tokenizer files), `to_dict` (records whether there are any) and
    `_get_arguments_from_pretrained` (loads none when there are none).

    Args:
        tokenizer: the LLM's tokenizer, or None for video-only use.
        num_frames: T, frames sampled per video.
        image_size: S, the side of each frame.
        resize_mode: "crop" (shortest side to S, centre crop) or "squash" (S x S, aspect ratio not kept).
        sample_fps: sample at this rate from frame 0 instead of uniformly over the whole video.
        image_mean, image_std: per-channel normalisation of `pixel_values` (ImageNet for DINOv3).
    """

    def __init__(
        self,
        tokenizer=None,
        num_frames: int = 8,
        image_size: int = 256,
        resize_mode: str = "crop",
        sample_fps: float | None = None,
        image_mean: tuple[float, ...] | list[float] = IMAGENET_MEAN,
        image_std: tuple[float, ...] | list[float] = IMAGENET_STD,
    ):
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
        if len(image_mean) != 3 or len(image_std) != 3:
            raise ValueError(f"image_mean and image_std need 3 values (RGB), got {image_mean} and {image_std}")
        self.num_frames = num_frames
        self.image_size = image_size
        self.resize_mode = resize_mode
        self.sample_fps = sample_fps
        # Lists, as they come back from processor_config.json, so a reloaded processor compares equal.
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        super().__init__(tokenizer)

    def __call__(
        self,
        videos=None,
        text: str | list[str] | None = None,
        return_tensors: str | None = "pt",
        padding: bool | str = True,
        **tokenizer_kwargs,
    ) -> BatchFeature:
        """Process one video or a list of them (paths, bytes or uint8 arrays), and optionally text.

        Returns:
            BatchFeature with `pixel_values` (B, T, 3, S, S) ImageNet-normalised and `vae_pixel_values`
            (B, T, 3, S, S) in [-1, 1] when videos are given, `input_ids` and `attention_mask` when text is given.
        """
        if videos is None and text is None:
            raise ValueError("FoveatedVLMProcessor needs `videos`, `text` or both.")
        data = {}
        if videos is not None:
            videos = list(videos) if isinstance(videos, (list, tuple)) else [videos]
            frames = np.stack(
                [
                    load_video(video, self.num_frames, self.image_size, self.resize_mode, self.sample_fps)[0]
                    for video in videos
                ]
            )  # (B, T, S, S, 3)
            data["pixel_values"] = frames_to_pixel_values(frames, self.image_mean, self.image_std)
            data["vae_pixel_values"] = frames_to_vae_pixel_values(frames)
        if text is not None:
            if self.tokenizer is None:
                raise ValueError("`text` needs a tokenizer, but this FoveatedVLMProcessor has none (tokenizer=None).")
            num_texts = 1 if isinstance(text, str) else len(text)
            if videos is not None and num_texts != len(videos):
                raise ValueError(f"got {num_texts} texts for {len(videos)} videos; pass one text per video")
            data.update(self.tokenizer(text, padding=padding, **tokenizer_kwargs))
        return BatchFeature(data, tensor_type=return_tensors)

    @property
    def model_input_names(self) -> list[str]:
        text_input_names = self.tokenizer.model_input_names if self.tokenizer is not None else []
        return ["pixel_values", "vae_pixel_values", *text_input_names]

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument is None:  # the optional tokenizer
            return None
        return super().check_argument_for_proper_class(argument_name, argument)

    def to_dict(self) -> dict:
        output = super().to_dict()
        output["has_tokenizer"] = self.tokenizer is not None  # read back by _get_arguments_from_pretrained
        return output

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> list[str]:
        """Write processor_config.json (with `auto_map`), this file as remote code, and the tokenizer if any."""
        if self.tokenizer is not None:
            return super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        if push_to_hub:
            raise ValueError(
                "save_pretrained(push_to_hub=True) needs a tokenizer; use processor.push_to_hub(repo_id), which saves "
                "to a temporary folder and uploads it."
            )
        # What ProcessorMixin.save_pretrained does, minus the sub-processors: copy this file next to the config and
        # point the config's auto_map at it.
        os.makedirs(save_directory, exist_ok=True)
        custom_object_save(self, save_directory, config=self)
        processor_file = os.path.join(save_directory, PROCESSOR_NAME)
        self.to_json_file(processor_file)
        return [processor_file]

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        if processor_dict is not None and processor_dict.get("has_tokenizer") is False:
            return [None]  # saved without a tokenizer: there are no tokenizer files to load
        return super()._get_arguments_from_pretrained(pretrained_model_name_or_path, processor_dict, **kwargs)


FoveatedVLMProcessor.register_for_auto_class("AutoProcessor")
