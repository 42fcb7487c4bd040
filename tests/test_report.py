"""foveated_vlm/report.py on tiny run folders built in seconds: every file written, Table 1 read from the logged
evaluation (or measured with the trainer's metric functions where nothing was logged), per-clip numbers equal to a
direct computation, images embedded in report.html, and missing pieces reported instead of crashing."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from foveated_vlm.data import FoveatedVLMDataCollator, load_precomputed, model_inputs
from modeling_foveated import FoveatedVLMModel
from foveated_vlm.probes import PROBES_FILE, FoveatedVLMProbes, apply_probes
from foveated_vlm.analyses import compare_runs
from foveated_vlm.report import main, write_report
from runs import NUM_CLIPS, make_run
from tiny import LOGGED_EVAL, trainer_state

NUM_VIDEOS = 2
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data):
    """A run whose log has a final evaluation."""
    run_dir = make_run(tmp_path_factory.mktemp("report") / "run", data)
    out = write_report(run_dir, num_videos=NUM_VIDEOS, batch_size=2)  # batches of 2 over 5 clips: a ragged last one
    return run_dir, out


@pytest.fixture(scope="module")
def unlogged_run(tmp_path_factory, data):
    """A run whose log has no evaluation: the report measures Table 1 itself."""
    run_dir = make_run(tmp_path_factory.mktemp("report") / "unlogged", data, with_eval=False)
    return run_dir, write_report(run_dir, num_videos=NUM_VIDEOS, batch_size=2)


def direct_outputs(run_dir):
    """The saved model on the whole eval split in one batch, two-pass and streamed."""
    model = FoveatedVLMModel.from_pretrained(str(run_dir)).eval()
    metrics = json.loads((run_dir / "report" / "metrics.json").read_text())
    dataset = load_precomputed(metrics["clips"]["eval_dataset"])
    batch = FoveatedVLMDataCollator()([dataset[i] for i in range(len(dataset))])
    target = batch["vae_latents"]
    with torch.no_grad():
        outputs = model(pixel_values=batch["pixel_values"], vae_latents=target)
        streamed = model.stream(batch["pixel_values"].unbind(1), target.unbind(1), autoregressive=True)
    return model, batch, outputs, torch.stack([step.pred_fine for step in streamed], dim=1), metrics


def test_writes_every_file(tiny_run):
    run_dir, out = tiny_run
    assert out == run_dir / "report"
    expected = ["fig1_losses.png", "fig2_ratio.png", "fig4_predictions.png", "metrics.json", "report.md", "report.html"]
    expected += [f"fig3_attention_{k}.png" for k in range(NUM_VIDEOS)]
    for name in expected:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert not list(out.glob(f"fig3_attention_{NUM_VIDEOS}.png"))
    markdown = (out / "report.md").read_text()
    assert "Pass 2's policy was trained by backpropagation through the glimpses only." in markdown  # Table 1's line
    for section in ("1. Executive summary", "2. Method", "3. Results", "4. What limits it", "5. Next steps",
                    "Where it fails"):
        assert section in markdown
    assert "the seed" not in markdown.lower()  # the design is docs/DESIGN.md
    # Which clips the numbers are on, as the run recorded them: a reader sees that this is the positive control.
    assert "**Clips.** Synthetic clips of the positive control (docs/RESULTS.md) (cued: look-alike objects)" in markdown


def test_table1_is_the_logged_evaluation(tiny_run):
    """The report quotes what training logged, not a second measurement of its own."""
    _, out = tiny_run
    held_out = json.loads((out / "metrics.json").read_text())["held_out"]
    assert held_out["source"] == "from the evaluation logged at step 4"
    for name, logged in (("loss_fine", "eval_loss/fine"), ("loss_coarse_t2", "eval_loss/coarse_t2"),
                         ("loss_copy_t2", "eval_loss/copy_t2"), ("tracking_fine", "eval_tracking/fine")):
        assert held_out[name] == LOGGED_EVAL[logged], name
    coarse, fine = LOGGED_EVAL["eval_loss/coarse"], LOGGED_EVAL["eval_loss/fine"]
    assert held_out["improvement"] == pytest.approx((coarse - fine) / coarse)
    markdown = (out / "report.md").read_text()
    for value in ("0.9871", "1.0123", "0.9512", "1.8765", "0.235", "±0.31%"):
        assert value in markdown, value


def test_unlogged_table1_is_measured_with_the_metrics_module(unlogged_run):
    run_dir, out = unlogged_run
    model, batch, outputs, streamed, metrics = direct_outputs(run_dir)
    held_out, clips = metrics["held_out"], metrics["clips"]
    assert held_out["source"].startswith("measured by this report")
    target = batch["vae_latents"]
    # Means over equal-sized clips: batches of 2 weighted by their size give the whole split's MSE.
    assert held_out["loss_fine"] == pytest.approx(outputs.loss_fine.item(), rel=1e-5)
    assert held_out["loss_coarse"] == pytest.approx(outputs.loss_coarse.item(), rel=1e-5)
    fine_t2 = F.mse_loss(outputs.pred_fine[:, 1:], target[:, 1:]).item()
    assert held_out["loss_fine_t2"] == pytest.approx(fine_t2, rel=1e-5)
    assert held_out["loss_copy_t2"] == pytest.approx(F.mse_loss(target[:, :-1], target[:, 1:]).item(), rel=1e-5)
    assert held_out["entropy_fine"] == pytest.approx(outputs.entropy_fine.item(), rel=1e-5)
    assert held_out["tracking_chance"] is not None  # 4 of 5 clips have boxes
    # The streamed loss and the clip-level standard error come from the per-clip pass too.
    assert clips["loss_fine_streamed"] == pytest.approx(F.mse_loss(streamed, target).item(), rel=1e-5)
    per_clip = lambda pred: (pred - target).pow(2).mean(dim=(1, 2, 3, 4)).double().numpy()  # noqa: E731
    fine, coarse = per_clip(outputs.pred_fine), per_clip(outputs.pred_coarse)
    # The delta method's standard error of 1 - mean(fine) / mean(coarse), clips as the unit.
    residuals = fine - fine.mean() / coarse.mean() * coarse
    stderr = residuals.std(ddof=1) / math.sqrt(NUM_CLIPS) / coarse.mean()
    # The tiny untrained model's passes differ by about 1e-6 of the loss, so float32 round-off moves the last digits.
    assert held_out["improvement_se"] == pytest.approx(stderr, rel=0.05)
    hardest = clips["hardest"]
    assert len(hardest) == NUM_VIDEOS and hardest[0]["loss_fine"] == pytest.approx(per_clip(outputs.pred_fine).max())
    markdown = (out / "report.md").read_text()
    assert f"{held_out['loss_fine']:.4f}" in markdown and "measured by this report" in markdown
    # The deployed stream's improvement, from the two losses checked against direct runs above.
    deployed = 1 - clips["loss_fine_streamed"] / held_out["loss_coarse"]
    row = "| Improvement of the deployed stream (coarse − streamed autoregressive) / coarse |"
    assert f"{row} {deployed * 100:+.3g}% |" in markdown


def test_html_embeds_every_image(tiny_run):
    _, out = tiny_run
    page = (out / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == len(list(out.glob("*.png")))
    assert ".png" not in page.replace("data:image/png", "")  # no link to a file beside it
    assert "<table>" in page and "<pre><code>" in page  # Table 1 and the method's diagram rendered


def test_missing_pieces_are_reported(tiny_run, tmp_path):
    """No eval in the log, no data paths, no VAE: the report is still written and says what is missing."""
    run_dir, _ = tiny_run
    bare = tmp_path / "bare"
    FoveatedVLMModel.from_pretrained(str(run_dir)).save_pretrained(str(bare))
    (bare / "trainer_state.json").write_text(json.dumps(trainer_state(with_eval=False)))
    out = main([str(bare)])
    markdown = (out / "report.md").read_text()
    assert "no evaluation" in markdown and "No held-out dataset" in markdown and "No VAE" in markdown
    assert (out / "fig1_losses.png").is_file() and not (out / "fig4_predictions.png").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["held_out"] is None and metrics["clips"] is None


def test_logged_table1_without_the_eval_split(tiny_run, tmp_path):
    """A run folder without data paths still reports Table 1 from its log; only the per-clip analysis is missing."""
    run_dir, _ = tiny_run
    bare = tmp_path / "logged"
    FoveatedVLMModel.from_pretrained(str(run_dir)).save_pretrained(str(bare))
    (bare / "trainer_state.json").write_text(json.dumps(trainer_state()))
    out = main([str(bare)])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["held_out"]["loss_fine"] == LOGGED_EVAL["eval_loss/fine"] and metrics["clips"] is None
    markdown = (out / "report.md").read_text()
    assert "0.9871" in markdown and "No held-out dataset" in markdown and "Where it fails" not in markdown


def test_cli_paths_without_vae(tiny_run, data, tmp_path):
    """--eval_dataset given on the command line, no VAE: the clip analysis and attention figures, no Figure 4."""
    run_dir, _ = tiny_run
    bare = tmp_path / "cli"
    FoveatedVLMModel.from_pretrained(str(run_dir)).save_pretrained(str(bare))
    out = main([str(bare), "--eval_dataset", data["eval_dataset"], "--num_videos", "1", "--batch_size", "8"])
    assert (out / "fig3_attention_0.png").is_file() and not (out / "fig4_predictions.png").exists()
    assert "No VAE" in (out / "report.md").read_text()
    assert "No trainer_state.json" in (out / "report.md").read_text()


def test_compare_and_table2_show_the_same_tracking(tiny_run):
    run_dir, out = tiny_run
    (run_dir / "eval_results.json").write_text(json.dumps(LOGGED_EVAL))
    row = compare_runs([run_dir]).splitlines()[-1]
    markdown = (out / "report.md").read_text()
    for name in ("fine", "coarse", "chance"):
        value = LOGGED_EVAL[f"eval_tracking/{name}"]
        assert f"{value:.4f}" in row and f"{value:.3f}" in markdown, name


def test_probed_run_is_reported_with_its_probes(tmp_path, data):
    """A run trained with oracle fixations: the report re-applies them from probes.json and does not stream."""
    run_dir = make_run(tmp_path / "oracle", data, with_eval=False)
    (run_dir / PROBES_FILE).write_text(json.dumps({"fine_queries": "oracle"}))
    out = write_report(run_dir, num_videos=1, batch_size=8)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["clips"]["loss_fine_streamed"] is None
    model = apply_probes(FoveatedVLMModel.from_pretrained(str(run_dir)), FoveatedVLMProbes(fine_queries="oracle")).eval()
    dataset = load_precomputed(data["eval_dataset"])
    batch = FoveatedVLMDataCollator()([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        outputs = model(**model_inputs(batch, model))
    assert metrics["held_out"]["loss_fine"] == pytest.approx(outputs.loss_fine.item(), rel=1e-5)
    assert "oracle" in (out / "report.md").read_text()
