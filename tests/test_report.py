"""foveated_vlm/report.py and foveated_vlm/analyses.py on tiny run folders built in seconds: every file written, Table 1
read from the logged evaluation (or measured with the trainer's metric functions where nothing was logged), per-clip
numbers equal to a direct computation, images embedded in report.html, missing pieces reported instead of crashing,
runs compared, and the linear readout of each pass's LLM state."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datasets import Array3D, Array4D, Dataset, Features, Sequence, Value

from foveated_vlm import metrics as metrics_foveated
from foveated_vlm.data import FoveatedVLMDataCollator, find_videos, load_precomputed, model_inputs, precompute_dataset
from modeling_foveated import FoveatedVLMModel
from foveated_vlm.probes import PROBES_FILE, FoveatedVLMProbedModel, FoveatedVLMProbes
from foveated_vlm import analyses
from foveated_vlm.analyses import compare_runs, state_readout
from foveated_vlm.report import DATA_PATHS_FILE, main, write_report
from foveated_vlm.synthetic import generate_split
from tiny import LOGGED_EVAL, save_tiny_vae, tiny_config, trainer_state

T, S, LATENT, NUM_CLIPS, NUM_VIDEOS = 4, 64, 8, 5, 2  # tiny_config(): 4 frames of 64 px, latents 4 x 8 x 8

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and a busy machine makes OpenMP spin-waiting slow them down a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def eval_dataset(path, seed: int = 0, spread: float = 0.0) -> None:
    """A saved eval split with the precomputed columns; one box moves, clip 1 has none. `spread` moves clip i's box
    down by i * spread, so that where the box is differs between clips."""
    rng = np.random.default_rng(seed)
    boxes = np.full((NUM_CLIPS, T, 4, 4), -1.0, dtype=np.float32)
    for t in range(T):
        boxes[:, t, 0] = [0.1 + 0.15 * t, 0.2, 0.35 + 0.15 * t, 0.45]
    boxes[:, :, 0, 1::2] += spread * np.arange(NUM_CLIPS)[:, None, None]
    boxes[1] = -1.0
    features = Features(
        {
            "video_id": Value("string"),
            "video_path": Value("string"),
            "caption": Value("string"),
            "fps": Value("float32"),
            "frame_indices": Sequence(Value("int32")),
            "frames": Array4D((T, S, S, 3), "uint8"),
            "vae_latents": Array4D((T, 4, LATENT, LATENT), "float32"),
            "moving_boxes": Array3D((T, 4, 4), "float32"),
        }
    )
    columns = {
        "video_id": [f"clip{i}" for i in range(NUM_CLIPS)],
        "video_path": [f"clip{i}.mp4" for i in range(NUM_CLIPS)],
        "caption": [""] * NUM_CLIPS,
        "fps": [8.0] * NUM_CLIPS,
        "frame_indices": [list(range(T))] * NUM_CLIPS,
        "frames": rng.integers(0, 256, (NUM_CLIPS, T, S, S, 3), dtype=np.uint8),
        "vae_latents": rng.standard_normal((NUM_CLIPS, T, 4, LATENT, LATENT)).astype(np.float32),
        "moving_boxes": boxes,
    }
    Dataset.from_dict(columns, features=features).save_to_disk(str(path))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The held-out split and a VAE, shared by the run folders."""
    root = tmp_path_factory.mktemp("data")
    eval_dataset(root / "eval")
    save_tiny_vae(root / "vae", S)
    description = "Synthetic clips of the positive control (docs/RESULTS.md) (cued: look-alike objects)"
    return {"eval_dataset": str(root / "eval"), "vae": str(root / "vae"), "description": description}


def make_run(run_dir, data: dict, with_eval: bool = True, model=None):
    """A finished run folder: final model, trainer_state.json, data_paths.json naming the eval split and the VAE."""
    torch.manual_seed(0)
    (model or FoveatedVLMModel(tiny_config())).save_pretrained(str(run_dir))
    (run_dir / "trainer_state.json").write_text(json.dumps(trainer_state(with_eval)))
    (run_dir / DATA_PATHS_FILE).write_text(json.dumps(data))
    return run_dir


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
                         ("loss_copy_t2", "eval_loss/copy_t2"), ("tracking_dynamic", "eval_tracking/dynamic")):
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
    assert held_out["entropy_dynamic"] == pytest.approx(outputs.entropy_fine.item(), rel=1e-5)
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


def test_compare_pools_seeds_into_mean_and_spread(tmp_path, capsys):
    improvements = {"base-seed0": 0.10, "base-seed1": 0.20, "base-seed2": 0.30, "ablation": -0.05}
    for name, value in improvements.items():
        run_dir = tmp_path / name
        run_dir.mkdir()
        results = {"eval_loss/coarse": 1.0, "eval_loss/fine": 1.0 - value, "eval_improvement": value}
        (run_dir / "eval_results.json").write_text(json.dumps(results))
        state = trainer_state(with_eval=False)
        curve = [{"step": 2, "eval_improvement_t2": value / 2}, {"step": 4, "eval_improvement_t2": value}]
        state["log_history"] += curve
        (run_dir / "trainer_state.json").write_text(json.dumps(state))
    analyses.main(["compare", *(str(tmp_path / name) for name in improvements)])
    table = capsys.readouterr().out
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()}
    # Mean and sample standard deviation over the three seeds, each seed listed; the single run has no spread.
    assert "| 3 | 4 | 3 |" in rows["base"] and "+20.00 % ± 10.00 (+10.00, +20.00, +30.00)" in rows["base"]
    assert "| -5.00 % |" in rows["ablation"] and "±" not in rows["ablation"]
    # The last column: the t >= 2 improvement at each evaluation, averaged over the seeds.
    assert rows["base"].endswith("| +10.0 / +20.0 |") and rows["ablation"].endswith("| -2.5 / -5.0 |")
    with pytest.raises(FileNotFoundError, match="eval_results.json"):
        analyses.main(["compare", str(tmp_path)])
    # The report's old flag names the new command.
    with pytest.raises(SystemExit):
        main(["--compare", str(tmp_path / "ablation")])
    assert f"--compare moved: python -m foveated_vlm.analyses compare {tmp_path / 'ablation'}" in capsys.readouterr().err


def test_compare_and_table2_show_the_same_tracking(tiny_run):
    run_dir, out = tiny_run
    (run_dir / "eval_results.json").write_text(json.dumps(LOGGED_EVAL))
    row = compare_runs([run_dir]).splitlines()[-1]
    markdown = (out / "report.md").read_text()
    for name in ("dynamic", "static", "chance"):
        value = LOGGED_EVAL[f"eval_tracking/{name}"]
        assert f"{value:.4f}" in row and f"{value:.3f}" in markdown, name


def test_probed_run_is_reported_with_its_probes(tmp_path, data):
    """A run trained with oracle fixations: the report re-applies them from probes.json and does not stream."""
    run_dir = make_run(tmp_path / "oracle", data, with_eval=False)
    (run_dir / PROBES_FILE).write_text(json.dumps({"fine_queries": "oracle"}))
    out = write_report(run_dir, num_videos=1, batch_size=8)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["clips"]["loss_fine_streamed"] is None
    model = FoveatedVLMProbedModel.from_model(
        FoveatedVLMModel.from_pretrained(str(run_dir)), FoveatedVLMProbes(fine_queries="oracle")
    ).eval()
    dataset = load_precomputed(data["eval_dataset"])
    batch = FoveatedVLMDataCollator()([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        outputs = model(**model_inputs(batch, model))
    assert metrics["held_out"]["loss_fine"] == pytest.approx(outputs.loss_fine.item(), rel=1e-5)
    assert "oracle" in (out / "report.md").read_text()


# ---- The linear state readout ----


def test_state_readout_of_a_mover_split(tmp_path, data, capsys):
    """The CLI on a tiny run, eval split from its data_paths.json; the samples are the states at t = 1..T-1 of the
    frames with a box, read out as `linear_readout` does it on a direct forward."""
    run_dir = make_run(tmp_path / "run", data)
    eval_dataset(tmp_path / "train", seed=1, spread=0.1)  # other frames; boxes whose place differs between clips
    eval_dataset(tmp_path / "eval", seed=2, spread=0.05)
    held_out = str(tmp_path / "eval")
    analyses.main(["readout", str(run_dir), str(tmp_path / "train"), "--eval_dataset", held_out, "--batch_size", "2"])
    result = json.loads(capsys.readouterr().out)
    assert result["quantity"] == "mover centre" and result["metric"] == "r2" and "chance" not in result
    assert result["num_train"] == result["num_eval"] == (NUM_CLIPS - 1) * (T - 1)  # clip 1 has no box
    assert math.isfinite(result["coarse"]) and math.isfinite(result["fine"])

    model = FoveatedVLMModel.from_pretrained(str(run_dir)).eval()
    keep = [i for i in range(NUM_CLIPS) if i != 1]

    def samples(path):  # the whole split in one forward: {pass: (4 * (T-1), E)}, centres (4 * (T-1), 2)
        dataset = load_precomputed(path)
        batch = FoveatedVLMDataCollator()([dataset[i] for i in range(len(dataset))])
        with torch.no_grad():
            outputs = model(pixel_values=batch["pixel_values"])
        box = batch["moving_boxes"][keep, 1:, 0]  # (4, T-1, 4)
        centres = torch.stack([box[..., 0] + box[..., 2], box[..., 1] + box[..., 3]], -1).reshape(-1, 2) / 2
        states = {name: getattr(outputs, f"state_{name}")[keep, 1:].flatten(0, 1) for name in ("coarse", "fine")}
        return states, centres

    train_states, train_centres = samples(tmp_path / "train")
    eval_states, eval_centres = samples(held_out)
    for name in ("coarse", "fine"):
        expected = metrics_foveated.linear_readout(train_states[name], train_centres, eval_states[name], eval_centres)
        assert result[name] == pytest.approx(expected["r2"], rel=1e-3, abs=1e-4), name

    # The place readout: one ridge per t over the clips with a box, the state at t against the centre in frame t.
    place = result["place_by_frame"]
    assert len(place["coarse"]) == len(place["fine"]) == T - 1
    for t in range(1, T):
        (train_state, train_centre), (eval_state, eval_centre) = (
            (states["coarse"].reshape(len(keep), T - 1, -1)[:, t - 1], centres.reshape(len(keep), T - 1, 2)[:, t - 1])
            for states, centres in ((train_states, train_centres), (eval_states, eval_centres))
        )
        expected = metrics_foveated.linear_readout(train_state, train_centre, eval_state, eval_centre)["r2"]
        assert math.isfinite(expected) and place["coarse"][t - 1] == pytest.approx(expected, rel=1e-3, abs=1e-4), t


@pytest.fixture(scope="module")
def cued_splits(tmp_path_factory, data):
    """Precomputed train (4 clips) and eval (2 clips) splits of the cued scene, sidecars with levels beside them."""
    root = tmp_path_factory.mktemp("cued")
    generate_split(root / "videos", num_train=4, num_eval=2, difficulty="cued", size=S, num_video_frames=T,
                   num_frames=T)  # fmt: skip
    for split in ("train", "eval"):
        precompute_dataset(find_videos(root / "videos" / split), root / split, num_frames=T, image_size=S,
                           vae=data["vae"], batch_size=4)  # fmt: skip
    return str(root / "train"), str(root / "eval")


def test_state_readout_of_a_cued_oracle_run(tmp_path, data, cued_splits):
    """A cued split: the next level is classified; an oracle run is read with its oracle fixations."""
    train, held_out = cued_splits
    run_dir = make_run(tmp_path / "oracle", {**data, "eval_dataset": held_out})
    (run_dir / PROBES_FILE).write_text(json.dumps({"fine_queries": "oracle"}))
    result = state_readout(run_dir, train)
    assert result["quantity"] == "next level" and result["metric"] == "accuracy"
    assert result["num_train"] == 4 * (T - 1) and result["num_eval"] == 2 * (T - 1)
    assert result["eval_dataset"] == held_out
    for name in ("coarse", "fine", "chance"):
        assert 0 <= result[name] <= 1 and result[name] * result["num_eval"] == pytest.approx(
            round(result[name] * result["num_eval"])
        ), name  # a share of the 6 held-out targets
    with pytest.raises(ValueError, match="not the same kind"):
        state_readout(run_dir, train, data["eval_dataset"])


def test_state_readout_bad_paths_name_the_file(tmp_path, data):
    with pytest.raises(FileNotFoundError, match="no saved model"):
        state_readout(tmp_path / "missing_run", data["eval_dataset"])
    run_dir = make_run(tmp_path / "run", data)
    with pytest.raises(FileNotFoundError, match="missing_split"):
        state_readout(run_dir, tmp_path / "missing_split")
    with pytest.raises(SystemExit):
        analyses.main(["readout", str(run_dir)])  # the training split is missing
