"""Video loading and preprocessing for the Foveated VLM, on transformers' video processing.

This file is also the remote code of a Hub checkpoint (`trust_remote_code=True`): it stays flat and self-contained and
imports only torch, numpy and transformers (transformers' `check_imports` demands every import it finds, except under
`if is_<library>_available():`). torchcodec is imported by transformers' reader (`transformers.video_utils`),
decord and PyAV here under that test.

A video becomes T frames of S x S pixels:
    decode (decord, torchcodec or PyAV) -> sample T frame indices -> to RGB -> resize ("crop" or "squash") -> uint8
and the uint8 frames become the two model inputs, nowhere else:
    frames_to_pixel_values      -> float32 (..., T, 3, S, S), ImageNet-normalised (DINOv3 input)
    frames_to_vae_pixel_values  -> float32 (..., T, 3, S, S) in [-1, 1] (Stable Diffusion VAE input)

`FoveatedVLMVideoProcessor` (AutoVideoProcessor) runs that chain; `FoveatedVLMProcessor` (AutoProcessor) pairs it with
the LLM's tokenizer.

Why `VideoProcessorMixin` and not `BaseVideoProcessor`: `BaseVideoProcessor` is `VideoProcessorMixin` plus
`TorchvisionBackend` (transformers/video_processing_utils.py:586-587, `@requires(backends=("vision", "torchvision"))`),
and every operation it adds runs on `torchvision.transforms.v2.functional`, imported only when torchvision is
installed (video_processing_utils.py:67-68). No torchvision build works with the CPU wheel of torch 2.13 (the PyPI
wheels link libtorch_cuda.so), so this class builds on the mixin, which has the loading, saving, kwargs validation and
`preprocess` flow, and implements the four steps the mixin leaves open with torch alone.
"""

import io
import os

import numpy as np
import torch
import torch.nn.functional as F
from transformers import BatchFeature, ProcessorMixin
from transformers.processing_utils import VideosKwargs
from transformers.utils import is_av_available, is_decord_available, is_torchcodec_available
from transformers.video_processing_utils import VideoProcessorMixin
from transformers.video_utils import VIDEO_DECODERS, VideoMetadata

try:
    from .configuration_foveated import DEFAULT_IMAGE_SIZE, DEFAULT_NUM_FRAMES
except ImportError:  # installed as a top-level module rather than loaded as remote code
    from configuration_foveated import DEFAULT_IMAGE_SIZE, DEFAULT_NUM_FRAMES


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "RESIZE_MODES",
    "VIDEO_BACKENDS",
    "VIDEO_READERS",
    "is_video_backend_available",
    "FoveatedVLMVideoError",
    "default_video_backend",
    "sample_frame_indices",
    "load_video",
    "transform_box",
    "frames_to_pixel_values",
    "frames_to_vae_pixel_values",
    "FoveatedVLMVideoProcessor",
    "FoveatedVLMProcessor",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# "crop": shortest side to S, then a centre crop (keeps the aspect ratio, loses the borders of wide frames).
# "squash": straight to S x S (keeps everything, distorts the aspect ratio; docs/DESIGN.md's data flow).
RESIZE_MODES = ("crop", "squash")
# Decoders that take a path or a file object, in the order a default is chosen. decord first: it seeks to the
# keyframe before each sampled frame, where transformers' PyAV reader decodes every frame up to the last sampled one,
# so PyAV's cost grows with the video's length (benchmarks/bench_data.py: similar on short clips, decord ahead on
# long ones). decord has no macOS arm64 wheel; PyAV is always installed with this package.
VIDEO_BACKENDS = ("decord", "torchcodec", "pyav")
_BACKEND_AVAILABLE = {"decord": is_decord_available, "torchcodec": is_torchcodec_available, "pyav": is_av_available}


def is_video_backend_available(backend: str) -> bool:
    """Whether the decoder `backend` (one of `VIDEO_BACKENDS`) is installed."""
    if backend not in VIDEO_BACKENDS:
        raise ValueError(f"backend must be one of {VIDEO_BACKENDS}, got {backend!r}")
    return _BACKEND_AVAILABLE[backend]()


class FoveatedVLMVideoError(ValueError):
    """A video that cannot be loaded: missing, empty, not a video, truncated, or without frames.

    Kept because transformers' readers raise whatever their decoder raises (a RuntimeError from decord, an
    `av.error.InvalidDataError`, a bare `ValueError` from numpy on a stream that yields no frame): a data pipeline needs
    one type to catch, naming the file."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"Cannot load video {path}: {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self):
        # Rebuild from (path, reason) when pickled across DataLoader or datasets.map worker processes.
        return type(self), (self.path, self.reason)


def default_video_backend() -> str:
    """The first installed of `VIDEO_BACKENDS`."""
    for backend in VIDEO_BACKENDS:
        if is_video_backend_available(backend):
            return backend
    raise ImportError(f"Decoding video files needs one of {VIDEO_BACKENDS}: `pip install av`.")


def sample_frame_indices(
    num_video_frames: int, num_frames: int, video_fps: float | None = None, sample_fps: float | None = None
) -> np.ndarray:
    """Which `num_frames` frames of a video of `num_video_frames` frames to read.

    Uniform (default): spread evenly over the whole video, first and last frame included, each position rounded to
    the nearest frame. Fixed rate (`sample_fps` given): one frame every `video_fps / sample_fps` frames from frame 0.
    A video too short for the request repeats frames instead of failing (fixed rate repeats the last frame).

    Kept instead of transformers' `default_sample_indices_fn`, which takes `arange(n) * total // n` (never the last
    frame, so the end of a clip's motion is lost), raises on a video shorter than `num_frames`, and turns `fps` into a
    frame count; the model takes exactly T frames.

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


def _resize_frames(frames: torch.Tensor, image_size: int, resize_mode: str) -> torch.Tensor:
    """uint8 (T, 3, H, W) -> uint8 (T, 3, S, S).

    Kept because transformers' resize and centre crop are torchvision operations (`TorchvisionBackend`); the geometry
    is shared with `transform_box`, so the boxes of a clip land where its pixels do."""
    T, _, H, W = frames.shape
    resized_height, resized_width, top, left = _resize_geometry((H, W), image_size, resize_mode)
    pixels = frames.float()
    if (resized_height, resized_width) != (H, W):
        # antialias: a plain bilinear downscale aliases fine texture into moire that the VAE would then encode.
        pixels = F.interpolate(pixels, size=(resized_height, resized_width), mode="bilinear", antialias=True)
    pixels = pixels[:, :, top : top + image_size, left : left + image_size]  # (T, 3, S, S)
    return pixels.round().clamp(0, 255).to(torch.uint8)


def _to_rgb_channels_first(frames: torch.Tensor) -> torch.Tensor:
    """uint8 (T, H, W, C) with C in {1, 3, 4} -> uint8 (T, 3, H, W): grey is repeated, alpha is dropped."""
    frames = frames.permute(0, 3, 1, 2)  # (T, H, W, C) -> (T, C, H, W)
    if frames.shape[1] == 1:
        return frames.expand(-1, 3, -1, -1)
    return frames[:, :3]


def _first_line(error: Exception) -> str:
    # decord's messages carry a timestamp, a C++ source location and sometimes a stack trace; the first line is enough.
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _video_name(video) -> str:
    if isinstance(video, (bytes, bytearray)):
        return f"<{len(video)} bytes>"
    if isinstance(video, np.ndarray):
        return f"<array of shape {video.shape}>"
    return os.fspath(video)


def _read_video_decord(video, sample_indices_fn, **kwargs) -> tuple[torch.Tensor, VideoMetadata]:
    """transformers' `read_video_decord`, with decord on one thread.

    Kept because transformers' reader opens decord with its default of one FFmpeg thread per core: that costs more CPU
    time per clip (benchmarks/bench_data.py), and a data pipeline already decodes one clip per worker process."""
    if is_decord_available():  # check_imports does not demand an import under this test of every remote-code user
        import decord
    else:
        raise ImportError("video_backend='decord' needs decord: `pip install decord`")

    reader = decord.VideoReader(video, num_threads=1)
    try:
        metadata = VideoMetadata(total_num_frames=len(reader), fps=float(reader.get_avg_fps()), video_backend="decord")
        indices = sample_indices_fn(metadata=metadata, **kwargs)
        batch = reader.get_batch(indices)
        # decord's output "bridge" is process-wide state that other code may have switched to torch.
        return (batch if isinstance(batch, torch.Tensor) else torch.from_numpy(batch.asnumpy())), metadata
    finally:
        del reader  # frees the decoder and its file handle now rather than at garbage collection


def _read_video_pyav(video, sample_indices_fn, **kwargs) -> tuple[np.ndarray, VideoMetadata]:
    """transformers' `read_video_pyav`, counting the frames where the container does not say.

    Kept because transformers' reader takes the frame count from the stream header, which Matroska and WebM files
    leave at 0, so it finds no frames in them; counting the packets reads the file but decodes nothing. The container
    is closed on return, not at garbage collection."""
    if is_av_available():  # check_imports does not demand an import under this test of every remote-code user
        import av
    else:
        raise ImportError("video_backend='pyav' needs PyAV: `pip install av`")

    with av.open(video) as container:
        stream = container.streams.video[0]
        num_frames = stream.frames
        if not num_frames:
            num_frames = sum(1 for packet in container.demux(stream) if packet.size)
            container.seek(0)
        fps = stream.average_rate or stream.guessed_rate
        metadata = VideoMetadata(total_num_frames=num_frames, fps=float(fps) if fps else None, video_backend="pyav")
        indices = sample_indices_fn(metadata=metadata, **kwargs)
        wanted, frames = set(indices), []
        for index, frame in enumerate(container.decode(stream)):
            if index in wanted:
                frames.append(frame.to_ndarray(format="rgb24"))
            if index >= indices[-1]:
                break
    return np.stack(frames), metadata


# The reader of each backend: reader(path or file object, sample_indices_fn) -> (uint8 frames, metadata), the frames
# (T, H, W, 3) from decord and PyAV, (T, 3, H, W) from torchcodec. `load_video` wraps them (`_read_video`).
VIDEO_READERS = {"decord": _read_video_decord, "torchcodec": VIDEO_DECODERS["torchcodec"], "pyav": _read_video_pyav}


def _read_video(video, sample_indices_fn, backend: str | None = None) -> tuple[torch.Tensor, VideoMetadata]:
    """Decode the sampled frames of a path, the bytes of a video file, or a uint8 frame array (F, H, W, C).

    `sample_indices_fn(metadata) -> int array` picks the frames once the frame count and rate are known.
    Returns uint8 (T, 3, H, W) RGB and the metadata, with `frames_indices` the sampled indices.
    Raises `FoveatedVLMVideoError` naming the video for every kind of broken input, whatever the backend.

    Kept around the readers for three things transformers' `load_video` lacks: bytes (it takes a path string, or
    treats anything else as decoded frames), named errors, and repeated indices (a short video repeats frames; its
    PyAV reader keeps a frame when its index is in the list, so a repeated index yields fewer frames than asked for:
    each distinct frame is decoded once here and repeated afterwards).
    """
    if not isinstance(video, (str, os.PathLike, bytes, bytearray, np.ndarray)):
        raise TypeError(f"video must be a path, bytes or a uint8 numpy array, got {type(video).__name__}")
    name = _video_name(video)
    if isinstance(video, np.ndarray):
        if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] not in (1, 3, 4):
            raise FoveatedVLMVideoError(
                name, f"a frame array must be uint8 (F, H, W, C) with C in (1, 3, 4), got {video.dtype}"
            )
        if len(video) == 0:
            raise FoveatedVLMVideoError(name, "the video has no frames")
        # An array carries no frame rate, so fixed-rate sampling fails with a message about video_fps.
        metadata = VideoMetadata(total_num_frames=len(video), fps=None, height=video.shape[1], width=video.shape[2])
        metadata.frames_indices = np.asarray(sample_indices_fn(metadata))
        return _to_rgb_channels_first(torch.from_numpy(video[metadata.frames_indices])), metadata
    if isinstance(video, (bytes, bytearray)):
        num_bytes, source = len(video), io.BytesIO(video)  # every reader takes a file object
    else:
        source = os.fspath(video)
        if not os.path.isfile(source):
            raise FoveatedVLMVideoError(name, "file not found")
        num_bytes = os.path.getsize(source)
    if num_bytes == 0:
        raise FoveatedVLMVideoError(name, "empty (0 bytes)")

    backend = backend or default_video_backend()
    if backend not in VIDEO_BACKENDS:
        raise ValueError(f"video_backend must be one of {VIDEO_BACKENDS} or None (first installed), got {backend!r}")
    sampled = {}

    def sample_distinct(metadata, **kwargs):
        if not metadata.total_num_frames:
            raise FoveatedVLMVideoError(name, "the video has no frames")
        sampled["indices"] = np.asarray(sample_indices_fn(metadata))
        sampled["distinct"], sampled["order"] = np.unique(sampled["indices"], return_inverse=True)
        return sampled["distinct"].tolist()

    try:
        frames, metadata = VIDEO_READERS[backend](source, sample_distinct)
        frames = torch.as_tensor(frames)
        if len(frames) != len(sampled["distinct"]):  # PyAV's reader stops quietly where a truncated stream ends
            raise ValueError(f"{backend} returned {len(frames)} of {len(sampled['distinct'])} frames")
    except (FoveatedVLMVideoError, ImportError):
        raise
    except Exception as error:  # decord: RuntimeError/DECORDError; PyAV: av.error.*; numpy: ValueError on no frames
        if "indices" not in sampled:
            reason = f"{backend} cannot open it: not a video, or truncated or corrupt ({_first_line(error)})"
        else:
            reason = f"frames {sampled['indices'].tolist()} failed to decode, truncated file? ({_first_line(error)})"
        raise FoveatedVLMVideoError(name, reason) from error
    frames = frames[torch.from_numpy(sampled["order"])]  # repeats restored, before the layout changes
    if backend != "torchcodec":
        # decord and PyAV: (T, H, W, 3), viewed channels first; the pixels stay channels-last in memory, which
        # the antialiased resize reads faster. torchcodec decodes to (T, 3, H, W).
        frames = _to_rgb_channels_first(frames)
    metadata.frames_indices = sampled["indices"]
    return frames, metadata


def load_video(
    video: str | os.PathLike | bytes | np.ndarray,
    num_frames: int,
    image_size: int,
    resize_mode: str = "crop",
    sample_fps: float | None = None,
    backend: str | None = None,
) -> tuple[np.ndarray, dict]:
    """Read `num_frames` frames of a video as RGB S x S.

    Args:
        video: a path, the bytes of a video file, or decoded frames as a uint8 array (F, H, W, C) with C in
            {1, 3, 4} (grey and alpha become RGB; an array carries no frame rate, so no `sample_fps`).
        num_frames: T, the number of frames to sample (see `sample_frame_indices`).
        image_size: S, the side of the output frames.
        resize_mode: "crop" (shortest side to S, centre crop) or "squash" (S x S, aspect ratio not kept).
        sample_fps: sample at this rate instead of uniformly over the whole video.
        backend: "decord", "torchcodec" or "pyav" (transformers' readers); None takes the first installed.

    Returns:
        frames: uint8 (T, S, S, 3).
        info: {"frame_indices": list[int], "fps": float (0.0 for arrays), "num_video_frames": int,
            "orig_size": (H, W)}.

    Raises:
        FoveatedVLMVideoError: naming the file and the reason, for any video that cannot be read.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")

    def sample(metadata):
        return sample_frame_indices(metadata.total_num_frames, num_frames, metadata.fps, sample_fps)

    frames, metadata = _read_video(video, sample, backend)  # (T, 3, H, W)
    info = {
        "frame_indices": metadata.frames_indices.tolist(),
        "fps": float(metadata.fps or 0.0),
        "num_video_frames": int(metadata.total_num_frames),
        "orig_size": tuple(frames.shape[2:]),
    }
    return _resize_frames(frames, image_size, resize_mode).permute(0, 2, 3, 1).numpy(), info  # (T, S, S, 3)


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
    """uint8 (..., T, S, S, 3) -> float32 (..., T, 3, S, S), normalised with ImageNet statistics (DINOv3 input).

    Kept as a function because the collator and the trainer normalise uint8 frames read from the Arrow cache, where
    no video processor runs (transformers' fused rescale-and-normalise is a `TorchvisionBackend` method)."""
    pixels = _channels_first_float(frames) / 255.0
    mean = torch.tensor(image_mean, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    std = torch.tensor(image_std, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    return (pixels - mean) / std


def frames_to_vae_pixel_values(frames: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 (..., T, S, S, 3) -> float32 (..., T, 3, S, S) in [-1, 1] (Stable Diffusion VAE input).

    Kept because a transformers video processor has one normalisation; the VAE needs this second range of the same
    frames."""
    return _channels_first_float(frames) / 127.5 - 1.0


class FoveatedVLMVideoProcessorKwargs(VideosKwargs, total=False):
    """transformers' video keys plus this processor's own (`image_size`, `resize_mode`)."""

    image_size: int
    resize_mode: str


class FoveatedVLMVideoProcessor(VideoProcessorMixin):
    """Videos (paths, bytes or uint8 frame arrays) -> `pixel_values` and `vae_pixel_values`, (B, T, 3, S, S).

    Loads with `AutoVideoProcessor.from_pretrained(folder, trust_remote_code=True)`. Without torchvision, the name
    `transformers.AutoVideoProcessor` is a placeholder that raises (models/auto/video_processing_auto.py:265,
    `@requires(backends=("vision", "torchvision"))`); the class itself needs no torchvision, so import it from
    `transformers.models.auto.video_processing_auto` there. `AutoProcessor` does that for the processor's own video
    processor. Of transformers' video keys it reads `num_frames`, `fps`, `image_mean`, `image_std` and
    `return_tensors`; every option can be given per call.

    Args:
        num_frames: T, frames sampled per video.
        fps: sample T frames at this rate from frame 0, instead of uniformly over the whole video. Unlike
            transformers' `fps`, which sets how many frames to take, T stays fixed: the model takes T frames.
        image_size: S, the side of each frame.
        resize_mode: "crop" (shortest side to S, centre crop) or "squash" (S x S, aspect ratio not kept).
        video_backend: "decord", "torchcodec" or "pyav"; None takes the first installed when a video is decoded, so
            a saved processor also works where decord is missing (macOS arm64). A constructor option only: the
            decoder is a property of the machine, not of one call.
        image_mean, image_std: per-channel normalisation of `pixel_values` (ImageNet for DINOv3).
    """

    valid_kwargs = FoveatedVLMVideoProcessorKwargs
    model_input_names = ["pixel_values", "vae_pixel_values"]
    num_frames = DEFAULT_NUM_FRAMES
    fps = None
    image_size = DEFAULT_IMAGE_SIZE
    resize_mode = "crop"
    video_backend = None
    image_mean = IMAGENET_MEAN
    image_std = IMAGENET_STD
    do_sample_frames = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if self.video_backend is not None and self.video_backend not in VIDEO_BACKENDS:
            raise ValueError(f"video_backend must be one of {VIDEO_BACKENDS} or None, got {self.video_backend!r}")
        # A bad setting is refused here, naming it, rather than surfacing later as a failure to read a good video.
        if not isinstance(self.num_frames, int) or self.num_frames < 1:
            raise ValueError(f"num_frames must be an integer >= 1 (frames sampled per video), got {self.num_frames!r}")
        if not isinstance(self.image_size, int) or self.image_size < 1:
            raise ValueError(f"image_size must be an integer >= 1 (the frame side in pixels), got {self.image_size!r}")
        if self.fps is not None and self.fps <= 0:
            raise ValueError(f"fps must be > 0 (frames sampled per second) or None, got {self.fps!r}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError(f"image_mean and image_std need 3 values (RGB), got {self.image_mean}, {self.image_std}")
        # Lists, as they come back from the saved JSON, so a reloaded processor compares equal.
        self.image_mean, self.image_std = list(self.image_mean), list(self.image_std)
        for option in ("num_frames", "image_size", "resize_mode"):  # written out even at their class defaults
            setattr(self, option, getattr(self, option))

    def sample_frames(self, metadata: VideoMetadata, num_frames: int | None = None, fps: float | None = None, **kwargs):
        """T frame indices for a video described by `metadata` (see `sample_frame_indices`)."""
        num_frames = num_frames if num_frames is not None else self.num_frames
        return sample_frame_indices(metadata.total_num_frames, num_frames, metadata.fps, fps)

    def _decode_and_sample_videos(self, videos, video_metadata=None, do_sample_frames=None, sample_indices_fn=None):
        """Each video (path, bytes or frame array) -> uint8 (T, 3, H, W) and its `VideoMetadata`."""
        if not do_sample_frames or sample_indices_fn is None:
            raise ValueError("FoveatedVLMVideoProcessor always samples T frames: do_sample_frames must stay True")
        videos = list(videos) if isinstance(videos, (list, tuple)) else [videos]
        decoded = [_read_video(video, sample_indices_fn, self.video_backend) for video in videos]
        return [frames for frames, _ in decoded], [metadata for _, metadata in decoded]

    def _prepare_input_videos(self, videos, **kwargs):
        return videos  # already RGB, channels first (done per video while decoding, where the layout is known)

    def _preprocess(self, videos, image_size, resize_mode, image_mean, image_std, return_tensors=None, **kwargs):
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
        frames = torch.stack([_resize_frames(video, image_size, resize_mode) for video in videos])  # (B, T, 3, S, S)
        frames = frames.permute(0, 1, 3, 4, 2)  # (B, T, S, S, 3): the layout of the uint8 Arrow cache
        data = {
            "pixel_values": frames_to_pixel_values(frames, image_mean, image_std),
            "vae_pixel_values": frames_to_vae_pixel_values(frames),
        }
        return BatchFeature(data, tensor_type=return_tensors)


class FoveatedVLMProcessor(ProcessorMixin):
    """Videos and text -> model inputs: a `FoveatedVLMVideoProcessor` and the LLM's tokenizer.

    Loads with `AutoProcessor.from_pretrained(folder, trust_remote_code=True)`. A saved folder names its video
    processor as remote code (its `auto_map`), so `FoveatedVLMProcessor.from_pretrained` needs
    `trust_remote_code=True` as well.
    """

    def __init__(self, video_processor: FoveatedVLMVideoProcessor, tokenizer):
        super().__init__(video_processor, tokenizer)

    def check_argument_for_proper_class(self, argument_name, argument):
        # Kept because the inherited check looks the base class "VideoProcessorMixin" up in
        # `transformers.VIDEO_PROCESSOR_MAPPING` (processing_utils.py:1084, 2036-2042), which without torchvision is a
        # placeholder object (`AutoVideoProcessor` is `@requires(backends=("vision", "torchvision"))`,
        # models/auto/video_processing_auto.py:265), so any processor with a video processor fails to build there.
        if argument_name == "video_processor":
            if not isinstance(argument, VideoProcessorMixin):
                raise TypeError(f"video_processor must be a VideoProcessorMixin, got {type(argument).__name__}")
            return VideoProcessorMixin
        return super().check_argument_for_proper_class(argument_name, argument)

    def __call__(
        self,
        videos=None,
        text: str | list[str] | None = None,
        return_tensors: str | None = "pt",
        padding: bool | str = True,
        **kwargs,
    ) -> BatchFeature:
        """Process one video or a list of them (paths, bytes or uint8 arrays), and text.

        Video options (`num_frames`, `fps`, `image_size`, `resize_mode`, ...) go to the video processor,
        everything else to the tokenizer.

        Returns:
            BatchFeature with `pixel_values` (B, T, 3, S, S) ImageNet-normalised and `vae_pixel_values`
            (B, T, 3, S, S) in [-1, 1] when videos are given, `input_ids` and `attention_mask` when text is given.
        """
        if videos is None and text is None:
            raise ValueError("FoveatedVLMProcessor needs `videos`, `text` or both.")
        video_keys = FoveatedVLMVideoProcessorKwargs.__annotations__
        video_kwargs = {key: kwargs.pop(key) for key in list(kwargs) if key in video_keys}
        data = {}
        if videos is not None:
            videos = list(videos) if isinstance(videos, (list, tuple)) else [videos]
            data.update(self.video_processor(videos, return_tensors=return_tensors, **video_kwargs))
        if text is not None:
            num_texts = 1 if isinstance(text, str) else len(text)
            if videos is not None and num_texts != len(videos):
                raise ValueError(f"got {num_texts} texts for {len(videos)} videos; pass one text per video")
            data.update(self.tokenizer(text, padding=padding, return_tensors=return_tensors, **kwargs))
        return BatchFeature(data, tensor_type=return_tensors)


FoveatedVLMVideoProcessor.register_for_auto_class("AutoVideoProcessor")
FoveatedVLMProcessor.register_for_auto_class("AutoProcessor")
