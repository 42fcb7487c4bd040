"""Data pipeline (foveated_vlm/data.py): discovery, LLaVA captions, precompute (failures, caching, resume, scale-out),
loading and collation.

One module-scoped precompute over real mp4 files (6 synthetic videos with sidecars + 4 broken files) with a tiny
random VAE feeds most tests; tests that rerun it copy its output folder first.
"""

import io
import json
import os
import shutil
import tarfile
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import datasets
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from runs import BROKEN, NUM_GOOD
from tiny import save_tiny_tokenizer, tiny_tokenizer

from foveated_vlm import data as data_foveated
from foveated_vlm import analyses
from foveated_vlm import train as train_hf
from foveated_vlm.data import (
    ANSWER_MARK,
    COLUMNS,
    LLAVA_CAPTIONS_FILE,
    LLAVA_VIDEO_DIR,
    MAX_MOVING_BOXES,
    FoveatedVLMDataCollator,
    download_llava_video_slice,
    find_videos,
    load_llava_captions,
    load_precomputed,
    model_inputs,
    precompute_dataset,
    run_dir_of,
    split_train_eval,
    target_tokens,
)
from processing_foveated import frames_to_vae_pixel_values, load_video, transform_box
from foveated_vlm.synthetic import generate_split
from foveated_vlm.metrics import level_headroom


T, S = 4, 64  # latents (4, 4, 8, 8)
SHARD_SIZE = 4  # 10 files -> shards of 4, 4, 2
CAPTIONS = {"video_000001": "a square moves to the left"}


def precompute(video_dir: Path, output_dir: Path, vae: str, **overrides) -> datasets.Dataset:
    settings = dict(num_frames=T, image_size=S, vae=vae, batch_size=2, shard_size=SHARD_SIZE, captions=CAPTIONS)
    return precompute_dataset(find_videos(video_dir), output_dir, **{**settings, **overrides})


@contextmanager
def counting_vae_frames():
    """Counts the frames every VAE that precompute loads meanwhile encodes: yields a list holding the count."""
    count = [0]
    load_vae = data_foveated._load_vae

    def load_counting_vae(*args, **kwargs):
        vae = load_vae(*args, **kwargs)
        encode = vae.encode

        def counting_encode(pixels, *encode_args, **encode_kwargs):
            count[0] += len(pixels)
            return encode(pixels, *encode_args, **encode_kwargs)

        vae.encode = counting_encode
        return vae

    with mock.patch.object(data_foveated, "_load_vae", load_counting_vae):
        yield count


def precompute_counting_vae_frames(*args, **kwargs) -> tuple[datasets.Dataset, int]:
    """`precompute`, and the number of frames the VAE encoded in this process meanwhile."""
    with counting_vae_frames() as count:
        dataset = precompute(*args, **kwargs)
    return dataset, count[0]


@pytest.fixture(scope="module")
def precomputed(video_dir, tiny_vae, tmp_path_factory):
    """(output_dir, dataset, frames the VAE encoded) of a first run with 2 decode workers."""
    output_dir = tmp_path_factory.mktemp("precomputed")
    dataset, frames = precompute_counting_vae_frames(video_dir, output_dir, tiny_vae, num_proc=2)
    return output_dir, dataset, frames


def copy_of(output_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "precomputed"
    shutil.copytree(output_dir, copy)
    return copy


# --------------------------------------------------------------------------------------------------------------------
# Discovery and splits
# --------------------------------------------------------------------------------------------------------------------


def test_find_videos_is_recursive_case_insensitive_and_sorted(tmp_path):
    for name in ("b.mp4", "a/c.MOV", "a/d.webm", "a/b/e.MkV", "f.avi", "notes.txt", "g.json"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).touch()
    found = find_videos(tmp_path)
    assert found == sorted(found)
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["a/b/e.MkV", "a/c.MOV", "a/d.webm", "b.mp4", "f.avi"]

    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_videos(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no videos"):
        find_videos(tmp_path / "empty")


def test_split_train_eval_is_stable_when_videos_are_added():
    paths = [f"videos/clip_{i:04d}.mp4" for i in range(400)]
    train, held_out = split_train_eval(paths, eval_fraction=0.2, seed=0)
    assert sorted(map(str, train + held_out)) == sorted(paths) and 50 < len(held_out) < 110
    more_train, more_held_out = split_train_eval(paths + [f"videos/new_{i}.mp4" for i in range(100)], 0.2, seed=0)
    assert set(held_out) <= set(more_held_out) and set(train) <= set(more_train)
    assert split_train_eval(paths, 0.2, seed=1)[1] != held_out
    with pytest.raises(ValueError, match="eval_fraction"):
        split_train_eval(paths, 1.0)


# --------------------------------------------------------------------------------------------------------------------
# LLaVA-Video-178K (the Hub is out of reach here: the parser reads a fixture, the download is faked)
# --------------------------------------------------------------------------------------------------------------------

LLAVA_RECORDS = [
    {
        "id": "v_abc",
        "video": "academic_source/Charades/ABC12.mp4",
        "conversations": [
            {"from": "human", "value": "<image>\nDescribe this video in detail."},
            {"from": "gpt", "value": " A man opens a fridge. "},
        ],
    },
    {
        "id": "v_xyz",
        "video": "academic_source/NextQA/1010/4771.mp4",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat happens?"},
            {"from": "gpt", "value": "A dog runs."},
        ],
    },
]


def test_load_llava_captions_keys_by_video_stem(tmp_path):
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(LLAVA_RECORDS))
    assert load_llava_captions(path) == {"ABC12": "A man opens a fridge.", "4771": "A dog runs."}

    path.write_text(json.dumps([{"video": "x.mp4", "conversations": [{"from": "human", "value": "hi"}]}]))
    with pytest.raises(ValueError, match=r"record 0 \(x.mp4\) has no 'gpt' turn"):
        load_llava_captions(path)
    path.write_text(json.dumps([{"id": "no video"}]))
    with pytest.raises(ValueError, match="record 0 needs the fields"):
        load_llava_captions(path)


def test_llava_questions_are_read_with_their_answers_and_only_the_answer_is_scored(tmp_path):
    path = tmp_path / "qa.json"
    path.write_text(json.dumps(LLAVA_RECORDS))
    texts = load_llava_captions(path, with_question=True)
    assert texts["ABC12"] == "Describe this video in detail." + ANSWER_MARK + "A man opens a fridge."
    path.write_text(json.dumps([{"video": "x.mp4", "conversations": [{"from": "gpt", "value": "B."}]}]))
    with pytest.raises(ValueError, match=r"record 0 \(x.mp4\) has no 'human' turn"):
        load_llava_captions(path, with_question=True)

    tokenizer = tiny_tokenizer()
    question, answer = "where does the square move ?", "the square"
    target_ids, target_labels = target_tokens(tokenizer, [question + ANSWER_MARK + answer, answer], 32)
    eos = tokenizer.eos_token_id
    read = tokenizer(question + ANSWER_MARK, add_special_tokens=False)["input_ids"]
    scored = tokenizer(answer, add_special_tokens=False)["input_ids"]
    assert target_ids[0, : len(read) + len(scored) + 1].tolist() == read + scored + [eos]
    assert target_labels[0].tolist() == [-100] * len(read) + scored + [eos]  # the question is read, not scored
    assert target_labels[1, : len(scored) + 1].tolist() == scored + [eos]  # a caption is scored whole


def _tar_gz(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def test_download_llava_video_slice_extracts_once_and_safely(tmp_path, monkeypatch):
    import huggingface_hub

    members = {"academic_source/Charades/ABC12.mp4": b"video bytes"}
    requests = []

    def fake_snapshot_download(repo_id, repo_type, local_dir, allow_patterns):
        requests.append((repo_id, repo_type, allow_patterns))
        for pattern in allow_patterns:
            (Path(local_dir) / pattern).parent.mkdir(parents=True, exist_ok=True)
            content = json.dumps(LLAVA_RECORDS).encode() if pattern.endswith(".json") else _tar_gz(members)
            (Path(local_dir) / pattern).write_bytes(content)
        return str(local_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    root = download_llava_video_slice(tmp_path / "llava", num_video_tars=2)
    assert requests[0][:2] == ("lmms-lab/LLaVA-Video-178K", "dataset")
    assert requests[0][2][1:] == [
        "0_30_s_academic_v0_1/0_30_s_academic_oe_v0_1_qa_processed.json",
        "0_30_s_academic_v0_1/0_30_s_academic_mc_v0_1_qa_processed.json",
        "0_30_s_academic_v0_1/0_30_s_academic_v0_1_videos_1.tar.gz",
        "0_30_s_academic_v0_1/0_30_s_academic_v0_1_videos_2.tar.gz",
    ]
    assert [p.name for p in find_videos(root / LLAVA_VIDEO_DIR)] == ["ABC12.mp4"]
    assert load_llava_captions(root / LLAVA_CAPTIONS_FILE)["ABC12"] == "A man opens a fridge."

    # Extracted archives are skipped: an edited file survives a second call.
    extracted = root / LLAVA_VIDEO_DIR / "academic_source/Charades/ABC12.mp4"
    extracted.write_bytes(b"edited")
    download_llava_video_slice(tmp_path / "llava", num_video_tars=2)
    assert extracted.read_bytes() == b"edited"

    # A member escaping the destination folder is refused.
    members = {"../escaped.mp4": b"x"}
    with pytest.raises(tarfile.OutsideDestinationError):
        download_llava_video_slice(tmp_path / "evil")
    assert not (tmp_path / "evil" / "escaped.mp4").exists()


# --------------------------------------------------------------------------------------------------------------------
# Precompute
# --------------------------------------------------------------------------------------------------------------------


def test_precompute_keeps_every_good_video_and_lists_every_broken_one(precomputed, video_dir):
    output_dir, dataset, frames_encoded = precomputed
    good = sorted(str(p) for p in (video_dir / "train").glob("*.mp4"))
    assert sorted(dataset["video_path"]) == good
    assert frames_encoded == NUM_GOOD * T  # the broken rows never reach the VAE

    failures = [json.loads(line) for line in (run_dir_of(dataset) / "failures.jsonl").read_text().splitlines()]
    assert sorted(Path(f["video_path"]).name for f in failures) == sorted(BROKEN)
    assert all(f["reason"] for f in failures)
    reasons = {Path(f["video_path"]).name: f["reason"] for f in failures}
    assert "empty" in reasons["empty.mp4"]
    counts = json.loads((output_dir / "precompute.json").read_text())["counts"]
    assert counts == {"num_in": NUM_GOOD + len(BROKEN), "num_ok": NUM_GOOD, "num_failed": len(BROKEN)}


def test_precomputed_features_shapes_and_values(precomputed, tiny_vae):
    output_dir, dataset, _ = precomputed
    assert list(dataset.features) == list(COLUMNS)
    assert dataset.features["frames"] == datasets.Array4D((T, S, S, 3), "uint8")
    assert dataset.features["vae_latents"] == datasets.Array4D((T, 4, S // 8, S // 8), "float32")
    assert dataset.features["moving_boxes"] == datasets.Array3D((T, MAX_MOVING_BOXES, 4), "float32")
    assert dataset.features["frame_indices"] == datasets.Sequence(datasets.Value("int32"))
    assert dataset.features["fps"] == datasets.Value("float32")

    rows = load_precomputed(output_dir)
    row = rows[1]
    assert row["video_id"] == "video_000001" and row["caption"] == CAPTIONS["video_000001"]
    assert rows[0]["caption"] == ""
    assert float(row["fps"]) == pytest.approx(8.0)

    # The frames are load_video's, the latents the VAE's mean of exactly those frames, times scaling_factor.
    frames, info = load_video(row["video_path"], T, S)
    assert row["frame_indices"].tolist() == info["frame_indices"]
    # In their stored dtypes: uint8 frames, not datasets' default int64 (8x the bytes to load and cast back).
    assert row["frames"].dtype == torch.uint8 and row["vae_latents"].dtype == torch.float32
    assert torch.equal(row["frames"], torch.from_numpy(frames))
    vae = AutoencoderKL.from_pretrained(tiny_vae).eval()
    with torch.no_grad():
        expected = vae.encode(frames_to_vae_pixel_values(frames)).latent_dist.mean * vae.config.scaling_factor
    torch.testing.assert_close(row["vae_latents"], expected, rtol=1e-4, atol=1e-5)


def test_moving_boxes_come_from_the_sidecar(precomputed):
    output_dir, _, _ = precomputed
    row = load_precomputed(output_dir)[0]
    sidecar = json.loads(Path(row["video_path"]).with_suffix(".json").read_text())
    for t, frame_index in enumerate(row["frame_indices"].tolist()):
        moving = [obj["box"] for obj in sidecar["frames"][frame_index]["objects"] if obj["moving"]]
        assert len(moving) == 2  # "hard" scenes
        expected = transform_box(moving, (S, S), S, "crop")
        np.testing.assert_allclose(row["moving_boxes"][t, :2].numpy(), expected, atol=1e-6)
        assert (row["moving_boxes"][t, 2:] == -1).all()


def test_cued_moving_boxes_are_the_target_in_every_frame(tiny_vae, precomputed, tmp_path):
    precomputed_dir = precomputed[0]  # "hard" scenes: no levels
    # Nothing moves in the cued scene: the one box is the target's, what the next frame depends on.
    paths = generate_split(tmp_path / "videos", num_train=2, num_eval=0, difficulty="cued", size=S, num_video_frames=T,
                           num_frames=T)  # fmt: skip
    dataset = precompute(tmp_path / "videos" / "train", tmp_path / "out", tiny_vae)
    assert sorted(dataset["video_path"]) == sorted(os.path.abspath(path) for path in paths["train"])
    batch = FoveatedVLMDataCollator()([dataset[i] for i in range(len(dataset))])
    assert batch["moving_boxes"].shape == (2, T, MAX_MOVING_BOXES, 4)
    for i, path in enumerate(dataset["video_path"]):
        sidecar = json.loads(Path(path).with_suffix(".json").read_text())
        target_boxes = [frame["objects"][sidecar["target"]]["box"] for frame in sidecar["frames"]]  # every frame read
        np.testing.assert_allclose(batch["moving_boxes"][i, :, 0].numpy(), np.array(target_boxes) / S, atol=1e-6)
        assert (batch["moving_boxes"][i, :, 1:] == -1).all()

    # The headroom's command reads each sampled frame's level from the same sidecars.
    levels = [[frame["level"] for frame in json.loads(Path(path).with_suffix(".json").read_text())["frames"]]
              for path in dataset["video_path"]]  # fmt: skip
    latents = batch["vae_latents"].numpy()
    expected = level_headroom(latents, levels, latents, levels)
    assert analyses.cued_headroom(tmp_path / "out", tmp_path / "out") == pytest.approx(expected)
    with pytest.raises(ValueError, match="no background levels"):
        analyses.cued_headroom(tmp_path / "out", precomputed_dir)


def test_moving_boxes_without_a_sidecar_and_a_broken_sidecar(video_dir, tiny_vae, tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    shutil.copy(video_dir / "train" / "video_000000.mp4", videos / "no_sidecar.mp4")
    shutil.copy(video_dir / "train" / "video_000001.mp4", videos / "broken_sidecar.mp4")
    (videos / "broken_sidecar.json").write_text('{"frames": [')
    dataset = precompute(videos, tmp_path / "out", tiny_vae).with_format("torch")
    assert dataset["video_id"] == ["no_sidecar"]
    assert (dataset[0]["moving_boxes"] == -1).all()
    (failure,) = [json.loads(line) for line in (run_dir_of(dataset) / "failures.jsonl").read_text().splitlines()]
    assert failure["video_path"].endswith("broken_sidecar.mp4") and "sidecar broken_sidecar.json" in failure["reason"]


def test_second_identical_run_does_no_vae_work(precomputed, video_dir, tiny_vae, tmp_path):
    output_dir, dataset, _ = precomputed
    output_dir = copy_of(output_dir, tmp_path)
    rerun, frames = precompute_counting_vae_frames(video_dir, output_dir, tiny_vae)
    assert frames == 0 and rerun["video_path"] == dataset["video_path"]

    # Without the run's record, the shards' map caches are hit: still no VAE work, same content.
    shutil.rmtree(output_dir / "runs")
    rebuilt, frames = precompute_counting_vae_frames(video_dir, output_dir, tiny_vae)
    assert frames == 0
    rebuilt = rebuilt.with_format("torch")
    assert rebuilt["video_path"] == dataset["video_path"]
    assert torch.equal(rebuilt[:]["vae_latents"], dataset.with_format("torch")[:]["vae_latents"])


def test_resume_redoes_only_the_missing_shard(precomputed, video_dir, tiny_vae, tmp_path):
    output_dir, dataset, _ = precomputed
    output_dir = copy_of(output_dir, tmp_path)
    # An interruption: the run was never recorded and one shard never finished.
    shutil.rmtree(output_dir / "runs")
    (settings_dir,) = (output_dir / "shards").iterdir()
    # Sorted paths put the 4 broken files (broken/) in shard 0, videos 0-3 in shard 1, videos 4-5 in shard 2.
    shards = sorted(settings_dir.iterdir())
    shutil.rmtree(shards[1])
    resumed, frames = precompute_counting_vae_frames(video_dir, output_dir, tiny_vae)
    assert frames == SHARD_SIZE * T
    assert sorted(settings_dir.iterdir()) == shards
    assert resumed["video_path"] == dataset["video_path"]


def test_changing_num_frames_or_the_vae_invalidates(precomputed, video_dir, tiny_vae, tmp_path):
    output_dir, _, _ = precomputed
    output_dir = copy_of(output_dir, tmp_path)
    changed, frames = precompute_counting_vae_frames(video_dir, output_dir, tiny_vae, num_frames=3)
    assert frames == NUM_GOOD * 3
    assert changed.features["vae_latents"].shape == (3, 4, S // 8, S // 8)

    other_vae = tmp_path / "other_vae"
    vae = AutoencoderKL.from_pretrained(tiny_vae)
    vae.register_to_config(scaling_factor=1.0)
    vae.save_pretrained(other_vae)
    assert precompute_counting_vae_frames(video_dir, output_dir, str(other_vae))[1] == NUM_GOOD * T
    assert len(list((output_dir / "shards").iterdir())) == 3  # one cache folder per (T, S, VAE, ...) setting


# --------------------------------------------------------------------------------------------------------------------
# Training side
# --------------------------------------------------------------------------------------------------------------------


def caption_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate("a square moves to the left".split())}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]")


def test_collator_in_a_dataloader_with_two_workers(precomputed):
    output_dir, _, _ = precomputed
    dataset = load_precomputed(output_dir)
    collator = FoveatedVLMDataCollator(tokenizer=caption_tokenizer(), max_text_length=16)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collator)
    batches = list(loader)
    assert len(batches) == NUM_GOOD // 2
    batch = batches[0]
    assert batch["pixel_values"].shape == (2, T, 3, S, S) and batch["pixel_values"].dtype == torch.float32
    assert batch["vae_latents"].shape == (2, T, 4, S // 8, S // 8) and batch["vae_latents"].dtype == torch.float32
    assert batch["moving_boxes"].shape == (2, T, MAX_MOVING_BOXES, 4)
    # Row 0 has no caption, row 1 has six words: padded to 6, row 0 all padding.
    assert batch["input_ids"].shape == (2, 6)
    assert batch["attention_mask"].tolist() == [[0] * 6, [1] * 6]
    # ImageNet normalisation of uint8 frames stays within about [-2.2, 2.7].
    assert -2.2 < batch["pixel_values"].min() and batch["pixel_values"].max() < 2.7

    without_text = FoveatedVLMDataCollator()([dataset[0], dataset[1]])
    assert set(without_text) == {"pixel_values", "vae_latents", "moving_boxes"}

    # Training's collator leaves uint8 frames for the accelerator; the trainer's normalisation gives the same inputs.
    raw = FoveatedVLMDataCollator(normalize_frames=False)([dataset[0], dataset[1]])
    assert set(raw) == {"frames", "vae_latents", "moving_boxes"} and raw["frames"].dtype == torch.uint8
    inputs = model_inputs(raw)
    assert set(inputs) == {"pixel_values", "vae_latents"}
    assert torch.equal(inputs["pixel_values"], without_text["pixel_values"])


def test_targets_are_captions_and_end_of_text_right_padded():
    tokenizer = tiny_tokenizer()
    target_ids, target_labels = target_tokens(tokenizer, ["where does the square move ?", "the square"], 16)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    assert target_ids.tolist() == [[2, 3, 4, 5, 6, 7, eos], [4, 5, eos, pad, pad, pad, pad]]
    assert target_labels.tolist() == [[2, 3, 4, 5, 6, 7, eos], [4, 5, eos, -100, -100, -100, -100]]
    assert target_tokens(tokenizer, ["where does the square move ?"], 3)[0].tolist() == [[2, 3, eos]]  # truncated
    rows = [{"frames": np.zeros((4, 64, 64, 3), np.uint8), "vae_latents": np.zeros((4, 4, 8, 8), np.float32),
             "moving_boxes": np.full((4, 4, 4), -1.0, np.float32), "caption": "the square"}]
    batch = FoveatedVLMDataCollator(tokenizer, caption_as_target=True)(rows)
    assert "input_ids" not in batch and batch["target_ids"].tolist() == [[4, 5, eos]]
    with pytest.raises(ValueError, match="caption_as_target needs a tokenizer"):
        FoveatedVLMDataCollator(caption_as_target=True)


def test_load_precomputed_names_a_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no precomputed dataset"):
        load_precomputed(tmp_path)


# --------------------------------------------------------------------------------------------------------------------
# Storage and keys
# --------------------------------------------------------------------------------------------------------------------


def test_a_run_names_the_shard_caches_instead_of_copying_them(precomputed):
    output_dir, dataset, _ = precomputed
    arrow_files = sorted(path.relative_to(output_dir) for path in output_dir.rglob("*.arrow"))
    shard_files = [path for path in arrow_files if path.parts[0] == "shards"]
    run_files = [path for path in arrow_files if path.parts[0] == "runs"]
    assert sorted(shard_files + run_files) == arrow_files
    # Per shard: the decode map's files (one per worker) and one VAE map file; the run adds only its captions.
    assert {path.name for path in shard_files} == {"decoded_00000_of_00002.arrow", "decoded_00001_of_00002.arrow",
                                                   "latents.arrow"}  # fmt: skip
    assert [path.name for path in run_files] == ["captions.arrow"]
    assert {path.name for path in run_dir_of(dataset).iterdir()} == set(data_foveated.RUN_FILES)
    # The loaded dataset reads the frames and latents from the shard caches themselves (shard 0, all broken videos,
    # has no row to read).
    read = {Path(f["filename"]).relative_to(output_dir) for f in dataset.cache_files}
    assert read <= set(arrow_files) and len({path.parent for path in read if path.parts[0] == "shards"}) == 2
    run_bytes = sum(path.stat().st_size for path in (output_dir / "runs").rglob("*") if path.is_file())
    shard_bytes = sum((output_dir / path).stat().st_size for path in shard_files)
    assert run_bytes < shard_bytes / 100


def test_a_run_with_a_deleted_shard_is_not_up_to_date(precomputed, video_dir, tiny_vae, tmp_path):
    output_dir, dataset, _ = precomputed
    output_dir = copy_of(output_dir, tmp_path)
    (settings_dir,) = (output_dir / "shards").iterdir()
    shutil.rmtree(sorted(settings_dir.iterdir())[2])
    with pytest.raises(FileNotFoundError, match="shard caches were deleted"):
        load_precomputed(output_dir)
    rebuilt, frames = precompute_counting_vae_frames(video_dir, output_dir, tiny_vae)
    assert frames == 2 * T and rebuilt["video_path"] == dataset["video_path"]


def test_a_changed_video_gets_a_new_shard(precomputed, video_dir, tiny_vae, tmp_path):
    """The shard key holds each video's size and modification time: a video rewritten in place is encoded again."""
    videos = tmp_path / "videos"
    shutil.copytree(video_dir / "train", videos)
    first, frames = precompute_counting_vae_frames(videos, tmp_path / "out", tiny_vae)
    assert frames == NUM_GOOD * T
    replaced = videos / "video_000004.mp4"
    replaced.write_bytes((videos / "video_000005.mp4").read_bytes())
    os.utime(replaced, ns=(replaced.stat().st_atime_ns, replaced.stat().st_mtime_ns + 10**9))
    second, frames = precompute_counting_vae_frames(videos, tmp_path / "out", tiny_vae)
    assert frames == 2 * T  # videos 4 and 5 share the last shard of 2
    assert run_dir_of(second) != run_dir_of(first)
    second = second.with_format("torch")
    assert torch.equal(second[4]["frames"], second[5]["frames"])


# --------------------------------------------------------------------------------------------------------------------
# train_hf: data arguments and data building
# --------------------------------------------------------------------------------------------------------------------


def test_the_search_recipe_trains_on_a_video_folder(video_dir, tiny_vae, tmp_path):
    """`train_hf.py configs/cued.yaml --data_source video_dir --video_dir <folder>` trains, with saccades and the search
    teacher: the teacher reads no sidecar, so plain videos serve."""
    folder = tmp_path / "plain_videos"
    folder.mkdir()
    for path in sorted((video_dir / "train").glob("*.mp4")):
        shutil.copy(path, folder / path.name)  # the videos without their JSON sidecars
    output_dir = tmp_path / "run"
    argv = [
        "configs/cued.yaml", "--data_source", "video_dir", "--video_dir", str(folder), "--eval_fraction", "0.5",
        "--cache_dir", str(tmp_path / "cache"), "--vae", tiny_vae, "--num_frames", str(T), "--image_size", str(S),
        "--tokenizer", save_tiny_tokenizer(tmp_path / "tokenizer"), "--max_steps", "2", "--logging_steps", "1",
        "--write_report", "false",
        "--num_attention_figures", "0", "--report_to", "none", "--output_dir", str(output_dir),
        "--model_config", '{"fixation_mode": "saccade"}', "--teacher", "true",
    ]  # fmt: skip
    trainer = train_hf.main(argv)
    logged = trainer.state.log_history
    assert any("teacher/distill" in entry for entry in logged)
    final = [entry for entry in logged if "eval_loss/fine" in entry][-1]
    assert "eval_teacher/search_gain" in final and "eval_teacher/on_target" not in final  # no boxes: absent, not 0
    assert json.loads((output_dir / "teacher.json").read_text())["teacher"] is True
    assert "search teacher" in (output_dir / "README.md").read_text()
