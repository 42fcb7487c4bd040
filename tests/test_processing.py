import pickle
import sys

import av
import numpy as np
import pytest
import torch
from transformers.dynamic_module_utils import get_imports

import processing_foveated
from processing_foveated import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    VIDEO_BACKENDS,
    FoveatedVLMProcessor,
    FoveatedVLMVideoError,
    FoveatedVLMVideoProcessor,
    default_video_backend,
    frames_to_pixel_values,
    frames_to_vae_pixel_values,
    load_video,
    sample_frame_indices,
    transform_box,
)
from foveated_vlm.synthetic import generate_video, write_video


# Every installed decoder: decord and PyAV on Linux (setup.py), PyAV alone on macOS arm64, torchcodec where installed.
BACKENDS = [backend for backend in VIDEO_BACKENDS if processing_foveated.is_video_backend_available(backend)]


@pytest.fixture(scope="session")
def videos(tmp_path_factory):
    """Real H.264 files: a square synthetic clip (16 frames), a wide one of noise (96 x 160, 10 frames) and a
    128 px synthetic clip of 48 frames."""
    folder = tmp_path_factory.mktemp("videos")
    square_frames, _ = generate_video(seed=0, difficulty="medium", size=64, num_video_frames=16)
    write_video(folder / "square.mp4", square_frames, fps=8)
    wide_frames = np.random.default_rng(0).integers(0, 256, size=(10, 96, 160, 3), dtype=np.uint8)
    write_video(folder / "wide.mp4", wide_frames, fps=25)
    long_frames, _ = generate_video(seed=1, difficulty="hard", size=128, num_video_frames=48)
    write_video(folder / "long.mp4", long_frames, fps=8)
    return {
        "square": folder / "square.mp4",
        "wide": folder / "wide.mp4",
        "long": folder / "long.mp4",
        "square_frames": square_frames,
    }


def test_remote_code_imports_only_torch_numpy_transformers():
    # transformers' check_imports demands every import it finds; the decoders are imported by transformers' readers.
    third_party = set(get_imports(processing_foveated.__file__)) - sys.stdlib_module_names
    assert third_party <= {"torch", "numpy", "transformers"}


def test_default_backend_is_the_first_installed(monkeypatch, videos):
    assert default_video_backend() == BACKENDS[0]
    # Without decord (macOS arm64) PyAV decodes.
    monkeypatch.setattr(processing_foveated, "is_video_backend_available", lambda backend: backend == "pyav")
    assert default_video_backend() == "pyav"
    assert load_video(videos["square"], num_frames=2, image_size=16)[0].shape == (2, 16, 16, 3)
    monkeypatch.setattr(processing_foveated, "is_video_backend_available", lambda backend: False)
    with pytest.raises(ImportError, match="pip install av"):
        default_video_backend()


# Frame sampling


def test_uniform_sampling_spans_the_video():
    np.testing.assert_array_equal(sample_frame_indices(16, 8), [0, 2, 4, 6, 9, 11, 13, 15])
    np.testing.assert_array_equal(sample_frame_indices(100, 2), [0, 99])
    np.testing.assert_array_equal(sample_frame_indices(8, 8), np.arange(8))


def test_short_video_repeats_frames():
    np.testing.assert_array_equal(sample_frame_indices(3, 8), [0, 0, 1, 1, 1, 1, 2, 2])
    np.testing.assert_array_equal(sample_frame_indices(1, 4), [0, 0, 0, 0])


def test_fixed_fps_sampling():
    # 30 fps sampled at 4 fps: a frame every 7.5 frames from frame 0 (halves round to even).
    indices = sample_frame_indices(100, 8, video_fps=30, sample_fps=4)
    np.testing.assert_array_equal(indices, [0, 8, 15, 22, 30, 38, 45, 52])
    # Too short: the last frame repeats.
    np.testing.assert_array_equal(sample_frame_indices(20, 5, video_fps=30, sample_fps=4), [0, 8, 15, 19, 19])


def test_sampling_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_video_frames"):
        sample_frame_indices(0, 8)
    with pytest.raises(ValueError, match="num_frames"):
        sample_frame_indices(10, 0)
    with pytest.raises(ValueError, match="video_fps"):
        sample_frame_indices(10, 4, video_fps=0.0, sample_fps=2)
    with pytest.raises(ValueError, match="sample_fps"):
        sample_frame_indices(10, 4, video_fps=25, sample_fps=-1)


# Loading and resizing


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_mp4(videos, backend):
    frames, info = load_video(videos["square"], num_frames=8, image_size=32, backend=backend)
    assert frames.shape == (8, 32, 32, 3) and frames.dtype == np.uint8
    assert info == {
        "frame_indices": [0, 2, 4, 6, 9, 11, 13, 15],
        "fps": 8.0,
        "num_video_frames": 16,
        "orig_size": (64, 64),
    }
    frames, info = load_video(str(videos["wide"]), num_frames=4, image_size=48, sample_fps=5, backend=backend)
    assert info["frame_indices"] == [0, 5, 9, 9] and info["fps"] == 25.0 and info["orig_size"] == (96, 160)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bytes_input_equals_path_input(videos, backend):
    from_path, path_info = load_video(videos["square"], num_frames=8, image_size=32, backend=backend)
    from_bytes, bytes_info = load_video(videos["square"].read_bytes(), num_frames=8, image_size=32, backend=backend)
    np.testing.assert_array_equal(from_bytes, from_path)
    assert bytes_info == path_info


@pytest.mark.parametrize("container, codec", [("mkv", "libx264"), ("webm", "libvpx-vp9")])
def test_backends_read_containers_without_a_frame_count(tmp_path, container, codec):
    # Matroska and WebM leave the stream's frame count at 0; the frames must still be found, by every backend.
    frames = np.random.default_rng(0).integers(0, 256, size=(12, 32, 32, 3), dtype=np.uint8)
    path = tmp_path / f"clip.{container}"
    with av.open(str(path), mode="w") as output:
        stream = output.add_stream(codec, rate=8)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for frame in frames:
            output.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        output.mux(stream.encode())
    with av.open(str(path)) as written:
        assert written.streams.video[0].frames == 0
    decoded = {backend: load_video(path, num_frames=4, image_size=32, backend=backend) for backend in BACKENDS}
    for backend, (clip, info) in decoded.items():
        assert info["num_video_frames"] == 12 and info["frame_indices"] == [0, 4, 7, 11], backend
        np.testing.assert_array_equal(clip, decoded[BACKENDS[0]][0], err_msg=backend)


@pytest.mark.parametrize("sample_fps", [None, 3.0])
@pytest.mark.parametrize("name, num_frames", [("square", 16), ("wide", 10), ("long", 48), ("long", 8), ("wide", 16)])
def test_backends_give_the_same_frames(videos, name, num_frames, sample_fps):
    # Every frame (or a sample, with repeats when num_frames exceeds the video), at the native size where crop mode
    # only cuts (no resampling), so the decoders' pixels are compared as decoded. decord and PyAV both run FFmpeg's
    # H.264 decoder and its BT.601 YUV -> RGB conversion: the measured difference is 0 on all these clips (noise
    # included), so the test asserts equality.
    image_size = {"square": 64, "wide": 96, "long": 128}[name]
    options = dict(num_frames=num_frames, image_size=image_size, sample_fps=sample_fps)
    reference, reference_info = load_video(videos[name], backend=BACKENDS[0], **options)
    for backend in BACKENDS[1:]:
        frames, info = load_video(videos[name], backend=backend, **options)
        assert info == reference_info, backend
        np.testing.assert_array_equal(frames, reference, err_msg=backend)
    # And the decoded pixels are the written ones, up to H.264's loss: a wrong frame or channel order would not be.
    if name == "square" and sample_fps is None:
        error = np.abs(reference.astype(np.int16) - videos["square_frames"].astype(np.int16))
        assert error.mean() < 3


@pytest.mark.parametrize("resize_mode", ["crop", "squash"])
@pytest.mark.parametrize("orig_size", [(96, 160), (81, 37), (33, 33), (5, 300)])
@pytest.mark.parametrize("image_size", [32, 33])
def test_any_frame_size_becomes_square(orig_size, image_size, resize_mode):
    video = np.random.default_rng(0).integers(0, 256, size=(3, *orig_size, 3), dtype=np.uint8)
    frames, info = load_video(video, num_frames=4, image_size=image_size, resize_mode=resize_mode)
    assert frames.shape == (4, image_size, image_size, 3) and frames.dtype == np.uint8
    assert info["orig_size"] == orig_size and info["fps"] == 0.0 and info["frame_indices"] == [0, 1, 1, 2]


@pytest.mark.parametrize("resize_mode", ["crop", "squash"])
def test_wide_mp4_in_both_resize_modes(videos, resize_mode):
    frames, info = load_video(videos["wide"], num_frames=4, image_size=48, resize_mode=resize_mode)
    assert frames.shape == (4, 48, 48, 3) and info["orig_size"] == (96, 160)


def test_crop_keeps_the_centre_and_squash_keeps_everything():
    # Left third black, middle third grey, right third white: the centre crop of a 3:1 frame is all grey.
    video = np.zeros((1, 30, 90, 3), dtype=np.uint8)
    video[:, :, 30:60], video[:, :, 60:] = 128, 255
    cropped, _ = load_video(video, num_frames=1, image_size=30, resize_mode="crop")
    np.testing.assert_array_equal(cropped, 128)
    squashed, _ = load_video(video, num_frames=1, image_size=30, resize_mode="squash")
    assert squashed[0, :, 0].max() < 10 and squashed[0, :, -1].min() > 245


@pytest.mark.parametrize("resize_mode", ["crop", "squash"])
def test_transform_box_matches_load_video(resize_mode):
    box = np.array([50.0, 10.0, 74.0, 40.0])  # x0, y0, x1, y1 in a 60 x 100 frame
    video = np.zeros((1, 60, 100, 3), dtype=np.uint8)
    video[:, 10:40, 50:74] = 255
    image_size = 40
    frames, info = load_video(video, num_frames=1, image_size=image_size, resize_mode=resize_mode)
    ys, xs = np.nonzero(frames[0, :, :, 0] > 127)
    bright_box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]) / image_size
    expected = transform_box(box, info["orig_size"], image_size, resize_mode)
    np.testing.assert_allclose(bright_box, expected, atol=1.5 / image_size)
    # Batched boxes, and clipping of a box that the centre crop cuts off.
    boxes = transform_box(np.array([box, [0.0, 0.0, 10.0, 10.0]]), (60, 100), image_size, resize_mode)
    assert boxes.shape == (2, 4) and boxes.min() >= 0.0 and boxes.max() <= 1.0
    with pytest.raises(ValueError, match="box_xyxy"):
        transform_box([1.0, 2.0, 3.0], (60, 100), image_size, resize_mode)


def test_grayscale_and_rgba_become_rgb():
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, size=(2, 16, 16, 1), dtype=np.uint8)
    frames, _ = load_video(grey, num_frames=2, image_size=16)
    np.testing.assert_array_equal(frames, np.repeat(grey, 3, axis=-1))
    rgba = rng.integers(0, 256, size=(2, 16, 16, 4), dtype=np.uint8)
    frames, _ = load_video(rgba, num_frames=2, image_size=16)
    np.testing.assert_array_equal(frames, rgba[..., :3])


def test_load_video_rejects_bad_options_and_arrays(videos):
    with pytest.raises(ValueError, match="resize_mode"):
        load_video(videos["square"], num_frames=2, image_size=16, resize_mode="pad")
    with pytest.raises(FoveatedVLMVideoError, match="uint8"):
        load_video(np.zeros((2, 16, 16, 3), dtype=np.float32), num_frames=2, image_size=16)
    with pytest.raises(FoveatedVLMVideoError, match="C in"):
        load_video(np.zeros((2, 16, 16, 2), dtype=np.uint8), num_frames=2, image_size=16)
    with pytest.raises(ValueError, match="video_fps"):  # an array has no frame rate
        load_video(np.zeros((2, 16, 16, 3), dtype=np.uint8), num_frames=2, image_size=16, sample_fps=2)
    with pytest.raises(TypeError, match="video must be"):
        load_video(123, num_frames=2, image_size=16)
    with pytest.raises(ValueError, match="video_backend"):
        load_video(videos["square"], num_frames=2, image_size=16, backend="opencv")


# Bad files: every kind raises FoveatedVLMVideoError naming the file


def _write_without_frames(path):
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        container.start_encoding()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["missing", "zero_bytes", "random_bytes", "truncated", "no_frames"])
def test_bad_video_file_raises_naming_the_file(videos, tmp_path, kind, backend):
    path = tmp_path / f"{kind}.mp4"
    if kind == "zero_bytes":
        path.write_bytes(b"")
    elif kind == "random_bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "truncated":
        data = videos["square"].read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "no_frames":
        _write_without_frames(path)
        assert path.stat().st_size > 0
    for num_frames in (4, 16):  # a few frames, and every frame
        with pytest.raises(FoveatedVLMVideoError) as error:
            load_video(path, num_frames=num_frames, image_size=32, backend=backend)
        assert error.value.path == str(path) and str(path) in str(error.value)
        assert error.value.reason and error.value.reason in str(error.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_truncated_file_whose_index_survives_fails_at_decoding(videos, tmp_path, backend):
    # faststart puts the index first, so a file cut inside its last frame still opens; that frame cannot be decoded.
    with av.open(str(videos["square"])) as container:
        last_packet = [packet for packet in container.demux(video=0) if packet.size][-1]
    path = tmp_path / "cut.mp4"
    path.write_bytes(videos["square"].read_bytes()[: last_packet.pos + last_packet.size // 2])
    with pytest.raises(FoveatedVLMVideoError, match="cut.mp4") as error:
        load_video(path, num_frames=16, image_size=32, backend=backend)
    assert "failed to decode" in error.value.reason


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_video_bytes_and_arrays_raise(videos, backend):
    with pytest.raises(FoveatedVLMVideoError, match="<0 bytes>"):
        load_video(b"", num_frames=4, image_size=32, backend=backend)
    with pytest.raises(FoveatedVLMVideoError, match="<4096 bytes>"):
        load_video(np.random.default_rng(0).bytes(4096), num_frames=4, image_size=32, backend=backend)
    data = videos["square"].read_bytes()
    with pytest.raises(FoveatedVLMVideoError, match=f"<{len(data) // 2} bytes>"):
        load_video(data[: len(data) // 2], num_frames=4, image_size=32, backend=backend)
    with pytest.raises(FoveatedVLMVideoError, match="no frames"):
        load_video(np.zeros((0, 16, 16, 3), dtype=np.uint8), num_frames=4, image_size=32)


def test_video_error_survives_pickling():
    error = pickle.loads(pickle.dumps(FoveatedVLMVideoError("a.mp4", "file not found")))
    assert (error.path, error.reason) == ("a.mp4", "file not found")
    assert str(error) == "Cannot load video a.mp4: file not found"


# Normalisation


def test_uniform_grey_gives_imagenet_values():
    frames = torch.full((2, 3, 8, 8, 3), 128, dtype=torch.uint8)  # (B, T, S, S, 3)
    pixel_values = frames_to_pixel_values(frames)
    assert pixel_values.shape == (2, 3, 3, 8, 8) and pixel_values.dtype == torch.float32
    assert pixel_values.is_contiguous()
    expected = (128 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(pixel_values[0, 0, :, 0, 0], expected)
    torch.testing.assert_close(pixel_values.amax(dim=(0, 1, 3, 4)), pixel_values.amin(dim=(0, 1, 3, 4)))


def test_vae_values_span_minus_one_to_one():
    frames = torch.arange(256, dtype=torch.uint8).view(1, 16, 16, 1).expand(1, 16, 16, 3)  # (T, S, S, 3)
    vae_pixel_values = frames_to_vae_pixel_values(frames)
    assert vae_pixel_values.shape == (1, 3, 16, 16)
    assert vae_pixel_values.min() == -1.0 and vae_pixel_values.max() == 1.0
    torch.testing.assert_close(vae_pixel_values[0, 0, 8, 0], torch.tensor(128 / 127.5 - 1))
    # numpy input and channel order: channel c of the output is channel c of the input.
    frames = np.zeros((1, 4, 4, 3), dtype=np.uint8)
    frames[..., 2] = 255
    np.testing.assert_array_equal(frames_to_vae_pixel_values(frames)[0, :, 0, 0].numpy(), [-1.0, -1.0, 1.0])


def test_normalisation_rejects_float_frames():
    with pytest.raises(ValueError, match="uint8"):
        frames_to_pixel_values(torch.zeros(2, 8, 8, 3))
    with pytest.raises(ValueError, match="uint8"):
        frames_to_vae_pixel_values(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))


# Processors


def test_video_processor_on_videos(videos):
    video_processor = FoveatedVLMVideoProcessor(num_frames=4, image_size=32)
    video_inputs = [videos["square"], videos["wide"].read_bytes(), videos["square_frames"]]
    batch = video_processor(video_inputs)
    assert set(batch) == {"pixel_values", "vae_pixel_values"}
    assert batch["pixel_values"].shape == batch["vae_pixel_values"].shape == (3, 4, 3, 32, 32)
    frames = torch.from_numpy(np.stack([load_video(video, 4, 32)[0] for video in video_inputs]))
    torch.testing.assert_close(batch["pixel_values"], frames_to_pixel_values(frames), rtol=0, atol=0)
    torch.testing.assert_close(batch["vae_pixel_values"], frames_to_vae_pixel_values(frames), rtol=0, atol=0)
    assert video_processor(videos["square"])["pixel_values"].shape == (1, 4, 3, 32, 32)


def test_video_processor_options_per_call_and_per_instance(videos):
    # transformers' video processors take every option per call too; the instance keeps its own.
    video_processor = FoveatedVLMVideoProcessor(num_frames=4, image_size=32)
    batch = video_processor(videos["wide"], num_frames=3, image_size=24, resize_mode="squash", fps=5.0)
    frames, _ = load_video(videos["wide"], 3, 24, resize_mode="squash", sample_fps=5.0)
    torch.testing.assert_close(batch["vae_pixel_values"][0], frames_to_vae_pixel_values(frames), rtol=0, atol=0)
    assert video_processor(videos["wide"])["pixel_values"].shape == (1, 4, 3, 32, 32)
    for backend in BACKENDS:
        pinned = FoveatedVLMVideoProcessor(num_frames=4, image_size=32, video_backend=backend)
        torch.testing.assert_close(pinned(videos["square"]), video_processor(videos["square"]), rtol=0, atol=0)


def test_video_processor_rejects_bad_options(videos, tmp_path):
    with pytest.raises(ValueError, match="resize_mode"):
        FoveatedVLMVideoProcessor(resize_mode="pad")
    with pytest.raises(ValueError, match="video_backend"):
        FoveatedVLMVideoProcessor(video_backend="opencv")
    with pytest.raises(ValueError, match="image_mean"):
        FoveatedVLMVideoProcessor(image_mean=[0.5])
    video_processor = FoveatedVLMVideoProcessor(num_frames=2, image_size=16)
    with pytest.raises(ValueError, match="resize_mode"):
        video_processor(videos["square"], resize_mode="pad")
    with pytest.raises(ValueError, match="do_sample_frames"):
        video_processor(videos["square"], do_sample_frames=False)
    with pytest.raises(FoveatedVLMVideoError, match="file not found"):
        video_processor(tmp_path / "missing.mp4")


def test_processor_with_text(videos, tokenizer):
    processor = FoveatedVLMProcessor(FoveatedVLMVideoProcessor(num_frames=2, image_size=16), tokenizer)
    batch = processor(videos=[videos["square"]] * 2, text=["where does the square move ?", "the square"])
    assert batch["input_ids"].tolist() == [[2, 3, 4, 5, 6, 7], [4, 5, 0, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1] * 6, [1, 1, 0, 0, 0, 0]]
    assert batch["pixel_values"].shape == batch["vae_pixel_values"].shape == (2, 2, 3, 16, 16)
    assert processor.model_input_names == ["pixel_values", "vae_pixel_values", "input_ids", "attention_mask"]
    assert set(processor(text="the square")) == {"input_ids", "attention_mask"}
    assert set(processor(videos=videos["square"])) == {"pixel_values", "vae_pixel_values"}
    # Video options go to the video processor, the rest to the tokenizer.
    batch = processor(videos=videos["square"], text="the square", num_frames=3, padding="max_length", max_length=4)
    assert batch["pixel_values"].shape[1] == 3 and batch["input_ids"].tolist() == [[4, 5, 0, 0]]
    with pytest.raises(ValueError, match="one text per video"):
        processor(videos=[videos["square"]] * 2, text="the square")
    with pytest.raises(ValueError, match="videos"):
        processor()


def test_processor_needs_a_tokenizer_and_a_video_processor(tokenizer):
    with pytest.raises((TypeError, ValueError)):
        FoveatedVLMProcessor(FoveatedVLMVideoProcessor(), None)
    with pytest.raises(TypeError, match="video_processor"):
        FoveatedVLMProcessor(tokenizer, tokenizer)


@pytest.mark.slow
def test_save_and_load_in_a_fresh_process(videos, tokenizer, tmp_path, run_isolated_python):
    processors = {
        "crop_any_backend": FoveatedVLMProcessor(FoveatedVLMVideoProcessor(num_frames=2, image_size=24), tokenizer),
        "squash_pyav": FoveatedVLMProcessor(
            FoveatedVLMVideoProcessor(num_frames=4, image_size=32, resize_mode="squash", fps=16, video_backend="pyav"),
            tokenizer,
        ),
    }
    video_inputs = [str(videos["square"]), str(videos["wide"])]
    text = ["where does the square move ?", "the square"]
    for name, processor in processors.items():
        processor.save_pretrained(tmp_path / name)
        assert (tmp_path / name / "processing_foveated.py").is_file()
        torch.save(dict(processor(videos=video_inputs, text=text)), tmp_path / f"{name}.pt")

    # `transformers.AutoVideoProcessor` is a placeholder that raises without torchvision
    # (models/auto/video_processing_auto.py: `@requires(backends=("vision", "torchvision"))`); the class itself, from
    # its module, needs nothing of torchvision, and is what `AutoProcessor` uses for the video processor.
    run_isolated_python(
        f"""
import torch
from transformers import AutoProcessor
from transformers.models.auto.video_processing_auto import AutoVideoProcessor
try:
    import processing_foveated
    raise SystemExit("processing_foveated must not be importable here")
except ImportError:
    pass
for name in ("crop_any_backend", "squash_pyav"):
    expected = torch.load(f"{{name}}.pt")
    processor = AutoProcessor.from_pretrained(name, trust_remote_code=True)
    assert type(processor).__module__.startswith("transformers_modules"), type(processor).__module__
    assert type(processor.video_processor).__name__ == "FoveatedVLMVideoProcessor"
    output = processor(videos={video_inputs!r}, text={text!r})
    assert output.keys() == expected.keys(), (name, output.keys(), expected.keys())
    for key in expected:
        assert torch.equal(output[key], expected[key]), (name, key)
    video_processor = AutoVideoProcessor.from_pretrained(name, trust_remote_code=True)
    assert type(video_processor).__module__.startswith("transformers_modules"), type(video_processor).__module__
    output = video_processor({video_inputs!r})
    for key in ("pixel_values", "vae_pixel_values"):
        assert torch.equal(output[key], expected[key]), (name, key)
""",
        cwd=tmp_path,
    )
    for name, processor in processors.items():
        # The saved folder names its video processor as remote code (auto_map), found through AutoVideoProcessor.
        reloaded = FoveatedVLMProcessor.from_pretrained(tmp_path / name, trust_remote_code=True)
        for option in ("num_frames", "fps", "image_size", "resize_mode", "video_backend", "image_mean", "image_std"):
            assert getattr(reloaded.video_processor, option) == getattr(processor.video_processor, option), option
        assert reloaded.tokenizer.get_vocab() == processor.tokenizer.get_vocab()


@pytest.mark.parametrize("setting", [dict(num_frames=0), dict(image_size=0), dict(fps=-1.0), dict(num_frames=2.5)])
def test_a_bad_processor_setting_is_refused_where_it_is_set(setting):
    (name,) = setting
    with pytest.raises(ValueError, match=f"^{name} must be"):
        FoveatedVLMVideoProcessor(**setting)
