"""foveated_vlm/captioning.py: the three text modes of a model trained with text as a target, scored and captioned on
held-out clips, and the captioning command after a training run."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from datasets import concatenate_datasets
from runs import tiny_arrow_dataset
from tiny import TEXT_ONLY, save_tiny_tokenizer, save_tiny_vae, tiny_config, tiny_tokenizer

from foveated_vlm import captioning as captioning_foveated
from foveated_vlm import train as train_hf
from foveated_vlm.captioning import captioning_markdown, evaluate_captioning
from foveated_vlm.data import ANSWER_MARK, FoveatedVLMDataCollator, load_precomputed, model_inputs
from foveated_vlm.synthetic import describe_clip, generate_split
from modeling_foveated import TEXT_MODES, FoveatedVLMModel
from processing_foveated import FoveatedVLMProcessor, FoveatedVLMVideoProcessor


def test_each_mode_is_scored_over_the_clips_and_its_greedy_captions_matched():
    """Batches of 2 over 3 clips: each mode's text loss is the mean of the per-clip losses of one direct pass, and a
    clip whose reference is the model's own greedy caption in a mode counts as a match there."""
    torch.manual_seed(0)
    model = FoveatedVLMModel(tiny_config(**TEXT_ONLY)).eval()
    # Every id of the tiny LLM's vocabulary (128) is a word: [PAD] 0, [UNK] 1, w2 .. w126, [EOS] 127.
    tokenizer = tiny_tokenizer(words=tuple(f"w{i}" for i in range(2, 127)))
    processor = FoveatedVLMProcessor(FoveatedVLMVideoProcessor(num_frames=4, image_size=64), tokenizer)
    clips = tiny_arrow_dataset(3)
    collator = FoveatedVLMDataCollator(tokenizer, caption_as_target=True)
    with torch.no_grad():
        first = model_inputs(collator([{**clips[0], "caption": ""}]), model)
        written = model.generate_text(first["pixel_values"], mode="fine", max_new_tokens=4,
                                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    own_caption = processor.batch_decode(written, skip_special_tokens=True)[0].strip()
    assert own_caption  # the model wrote words, so that a match means something
    clips = clips.add_column("caption", [own_caption, "w3 w4 w5", "w9"])

    captioning = evaluate_captioning(model, processor, clips, batch_size=2, max_new_tokens=4, num_examples=2)

    inputs = model_inputs(collator([clips[i] for i in range(3)]), model)
    with torch.no_grad():
        for mode in TEXT_MODES:
            per_clip = model.score_text(inputs["pixel_values"], inputs["target_ids"], inputs["target_labels"], mode=mode)
            assert captioning.text_loss[mode] == pytest.approx(per_clip.mean().item(), rel=1e-4), mode
    assert captioning.num_clips == 3 and captioning.exact_match["fine"] == pytest.approx(1 / 3)
    assert [example["reference"] for example in captioning.examples] == [own_caption, "w3 w4 w5"]
    assert captioning.examples[0]["fine"] == own_caption
    coarse, fine = captioning.text_loss["coarse"], captioning.text_loss["fine"]
    assert captioning.to_dict()["improvement_text"] == pytest.approx((coarse - fine) / coarse)
    markdown = captioning_markdown(captioning)
    for mode in TEXT_MODES:
        assert f"| {mode} | {captioning.text_loss[mode]:.4f} |" in markdown, mode


def test_a_question_is_read_and_only_its_answer_is_matched():
    """References `question ANSWER_MARK answer`: the model reads the question after the frames and writes the answer,
    and the match compares answers alone."""
    tokenizer = tiny_tokenizer(words=("Answer", ":", *(f"w{i}" for i in range(4, 127))))  # the mark is words
    processor = FoveatedVLMProcessor(FoveatedVLMVideoProcessor(num_frames=4, image_size=64), tokenizer)
    clips = tiny_arrow_dataset(2)
    question = "w5 w6 w7" + ANSWER_MARK
    collator = FoveatedVLMDataCollator(tokenizer, caption_as_target=True)
    prompt = tokenizer([question], add_special_tokens=False, return_tensors="pt")
    for seed in range(10):  # a random model whose answer has words, so that a match means something
        torch.manual_seed(seed)
        model = FoveatedVLMModel(tiny_config(**TEXT_ONLY)).eval()
        with torch.no_grad():
            first = model_inputs(collator([{**clips[0], "caption": ""}]), model)
            written = model.generate_text(first["pixel_values"], mode="fine", max_new_tokens=4,
                                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                          prompt_ids=prompt["input_ids"], prompt_mask=prompt["attention_mask"])  # fmt: skip
        own_answer = processor.batch_decode(written, skip_special_tokens=True)[0].strip()
        if own_answer:
            break
    assert own_answer
    clips = clips.add_column("caption", [question + own_answer, "w2 w3" + ANSWER_MARK + "w9"])
    captioning = evaluate_captioning(model, processor, clips, batch_size=2, max_new_tokens=4, num_examples=2)
    assert captioning.exact_match["fine"] == pytest.approx(1 / 2)
    assert [example["reference"] for example in captioning.examples] == [own_answer, "w9"]
    mixed = clips.select([0]).map(lambda row: {"caption": "w3 w4"})
    with pytest.raises(ValueError, match="mixes questions and captions"):
        evaluate_captioning(model, processor, concatenate_datasets([clips.select([0]), mixed]), batch_size=2)


@pytest.fixture(scope="module")
def captioned_videos(tmp_path_factory) -> Path:
    """Cued clips in a plain folder, each with its description beside it as clip.txt (no sidecars)."""
    root = tmp_path_factory.mktemp("captioned")
    generated = generate_split(root / "generated", num_train=6, num_eval=0, difficulty="cued", size=64,
                               num_video_frames=4, num_frames=4)
    folder = root / "videos"
    folder.mkdir()
    for path in map(Path, generated["train"]):
        shutil.copy(path, folder / path.name)
        (folder / path.with_suffix(".txt").name).write_text(describe_clip(json.loads(path.with_suffix(".json").read_text())))
    return folder


@pytest.mark.slow
def test_text_target_training_runs_end_to_end_with_report_and_captioning(captioned_videos, tmp_path):
    """`train_hf.py` with text as a target on a folder of videos with caption files: text losses in the logs and
    Table 1, the objective on the card, the three modes in the report, and the captioning command's gap."""
    output_dir = tmp_path / "run"
    argv = [
        "configs/cued.yaml", "--data_source", "video_dir", "--video_dir", str(captioned_videos), "--eval_fraction", "0.5",
        "--cache_dir", str(tmp_path / "cache"), "--vae", save_tiny_vae(tmp_path / "vae", 64), "--num_frames", "4",
        "--image_size", "64", "--tokenizer", save_tiny_tokenizer(tmp_path / "tokenizer"), "--max_steps", "2",
        "--logging_steps", "1", "--num_attention_figures", "0", "--report_to", "none", "--output_dir", str(output_dir),
        "--text_target", "caption", "--model_config", json.dumps({**TEXT_ONLY, "fine_passes": 2}),
    ]  # fmt: skip
    trainer = train_hf.main(argv)
    logged = trainer.state.log_history
    assert any("loss/text_fine_pass1" in entry and "loss/text_fine_pass2" in entry for entry in logged)
    final = json.loads((output_dir / "eval_results.json").read_text())
    assert {"eval_loss/text_fine", "eval_loss/text_coarse", "eval_improvement_text", "eval_improvement_text_se"} <= set(final)
    card = (output_dir / "README.md").read_text()
    assert "improvement_text" in card and "loss_text_fine_pass1 + loss_text_fine" in card
    report = (output_dir / "report" / "report.md").read_text()
    assert "improvement_text" in report and "| autoregressive |" in report
    captioning = captioning_foveated.main([str(output_dir), "--max_new_tokens", "4", "--output", str(tmp_path / "c.json")])
    recorded = json.loads((output_dir / "data_paths.json").read_text())
    eval_dataset = recorded["eval_dataset"]
    assert set(captioning.text_loss) == set(TEXT_MODES) and captioning.num_clips == len(load_precomputed(eval_dataset))
    assert json.loads((tmp_path / "c.json").read_text())["autoregressive_gap"] == pytest.approx(
        captioning.text_loss["autoregressive"] / captioning.text_loss["fine"] - 1)
    # The headroom, on the splits the run recorded unless two are named.
    assert captioning_foveated.main([str(output_dir), "--headroom"]) == captioning_foveated.main(
        [str(output_dir), "--headroom", recorded["train_dataset"], eval_dataset])
    with pytest.raises(SystemExit):
        captioning_foveated.main([str(output_dir), "--headroom", eval_dataset])
    # Without --text_target the data cannot feed a text objective: refused before training, naming the flag.
    with pytest.raises(ValueError, match="add --text_target caption"):
        train_hf.main([arg for arg in argv if arg not in ("--text_target", "caption")])
