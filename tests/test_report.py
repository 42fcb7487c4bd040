"""report_foveated.py on a tiny run folder built in seconds: every file written, Table 1 equal to a direct computation
over the eval split, images embedded in report.html, and missing pieces reported instead of crashing."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datasets import Array3D, Array4D, Dataset, Features, Sequence, Value

from data_foveated import FoveatedVLMDataCollator, load_precomputed
from modeling_foveated import FoveatedVLMModel
from report_foveated import DATA_PATHS_FILE, box_coverage, main, write_report
from tiny import save_tiny_vae, tiny_config

T, S, LATENT, NUM_CLIPS, NUM_VIDEOS = 4, 64, 8, 5, 2  # tiny_config(): 4 frames of 64 px, latents 4 x 8 x 8


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and a busy machine makes OpenMP spin-waiting slow them down a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def eval_dataset(path, seed: int = 0) -> None:
    """A saved eval split with the precomputed columns; one box moves, clip 1 has none."""
    rng = np.random.default_rng(seed)
    boxes = np.full((NUM_CLIPS, T, 4, 4), -1.0, dtype=np.float32)
    for t in range(T):
        boxes[:, t, 0] = [0.1 + 0.15 * t, 0.2, 0.35 + 0.15 * t, 0.45]
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


def tiny_vae(path) -> None:
    save_tiny_vae(path, S)


def trainer_state(with_eval: bool = True) -> dict:
    log = [
        {"step": 2, "loss": 2.2, "learning_rate": 1e-3, "loss/fine": 1.10, "loss/coarse": 1.12},
        {"step": 4, "loss": 2.0, "learning_rate": 5e-4, "loss/fine": 0.98, "loss/coarse": 1.02},
        {"step": 4, "train_runtime": 3.0, "train_loss": 2.1},
    ]
    if with_eval:
        log.insert(2, {"step": 4, "eval_loss": 2.0, "eval_loss/fine": 0.99, "eval_loss/coarse": 1.01})
    return {"global_step": 4, "max_steps": 4, "train_batch_size": 2, "log_history": log}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished run folder: final model, trainer_state.json, data_paths.json naming the eval split and the VAE."""
    root = tmp_path_factory.mktemp("report")
    run_dir = root / "run"
    torch.manual_seed(0)
    FoveatedVLMModel(tiny_config()).save_pretrained(str(run_dir))
    (run_dir / "trainer_state.json").write_text(json.dumps(trainer_state()))
    eval_dataset(root / "eval")
    tiny_vae(root / "vae")
    (run_dir / DATA_PATHS_FILE).write_text(json.dumps({"eval_dataset": str(root / "eval"), "vae": str(root / "vae")}))
    out = write_report(run_dir, num_videos=NUM_VIDEOS, batch_size=2)  # batches of 2 over 5 clips: a ragged last one
    return run_dir, out


def test_writes_every_file(tiny_run):
    run_dir, out = tiny_run
    assert out == run_dir / "report"
    expected = ["fig1_losses.png", "fig2_ratio.png", "fig4_predictions.png", "metrics.json", "report.md", "report.html"]
    expected += [f"fig3_attention_{k}.png" for k in range(NUM_VIDEOS)]
    for name in expected:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert not list(out.glob(f"fig3_attention_{NUM_VIDEOS}.png"))
    markdown = (out / "report.md").read_text()
    for section in ("1. Executive summary", "2. Method", "3. Results", "4. What limits it", "5. Next steps"):
        assert section in markdown


def test_table1_equals_direct_computation(tiny_run):
    run_dir, out = tiny_run
    summary = json.loads((out / "metrics.json").read_text())["summary"]
    model = FoveatedVLMModel.from_pretrained(str(run_dir)).eval()
    dataset = load_precomputed(summary["eval_dataset"])
    batch = FoveatedVLMDataCollator()([dataset[i] for i in range(len(dataset))])
    target = batch["vae_latents"]
    with torch.no_grad():
        outputs = model(pixel_values=batch["pixel_values"], vae_latents=target)
        streamed = model.stream(batch["pixel_values"].unbind(1), target.unbind(1), autoregressive=True)
        autoregressive = torch.stack([step.pred_fine for step in streamed], dim=1)

    expected = {
        ("full", "loss_fine"): outputs.loss_fine.item(),
        ("full", "loss_coarse"): outputs.loss_coarse.item(),
        ("t_ge_2", "loss_fine"): F.mse_loss(outputs.pred_fine[:, 1:], target[:, 1:]).item(),
        ("t_ge_2", "loss_coarse"): F.mse_loss(outputs.pred_coarse[:, 1:], target[:, 1:]).item(),
    }
    for (split, name), value in expected.items():
        assert summary[split][name] == pytest.approx(value, rel=1e-5), (split, name)
    full = summary["full"]
    assert full["improvement"] == pytest.approx((full["loss_coarse"] - full["loss_fine"]) / full["loss_coarse"])
    assert summary["copy_previous_t_ge_2"] == pytest.approx(F.mse_loss(target[:, :-1], target[:, 1:]).item(), rel=1e-5)
    assert summary["entropy_static"] == pytest.approx(outputs.entropy_static.item(), rel=1e-5)
    assert summary["entropy_dynamic"] == pytest.approx(outputs.entropy_dynamic.item(), rel=1e-5)
    assert summary["entropy_uniform"] == pytest.approx(math.log(model.config.num_patches))
    ar = summary["autoregressive"]
    assert ar["loss_fine_autoregressive"] == pytest.approx(F.mse_loss(autoregressive, target).item(), rel=1e-5)
    # Boxes on 4 of 5 clips, frames 2..T.
    assert summary["tracking"]["frames_with_box"] == (NUM_CLIPS - 1) * (T - 1)
    assert len(summary["hardest"]["clips"]) == NUM_VIDEOS
    # The text quotes the measured numbers.
    markdown = (out / "report.md").read_text()
    assert f"{full['loss_fine']:.4f}" in markdown and f"{summary['t_ge_2']['loss_coarse']:.4f}" in markdown


def test_html_embeds_every_image(tiny_run):
    _, out = tiny_run
    page = (out / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == len(list(out.glob("*.png")))
    assert ".png" not in page.replace("data:image/png", "")  # no link to a file beside it


def test_uniform_attention_in_box_is_chance():
    boxes = torch.full((1, 2, 4, 4), -1.0)
    boxes[0, 0, 0] = torch.tensor([0.1, 0.3, 0.55, 0.6])
    boxes[0, 0, 1] = torch.tensor([0.5, 0.5, 0.9, 0.7])  # overlaps the first: the union counts once
    coverage = box_coverage(boxes, grid=4, subdivisions=20)  # (1, 2, 16)
    assert coverage[0, 1].sum() == 0
    uniform = torch.full((16,), 1 / 16)
    union_area = 0.45 * 0.3 + 0.4 * 0.2 - 0.05 * 0.1
    assert (uniform * coverage[0, 0]).sum().item() == pytest.approx(union_area, abs=1e-3)


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
    assert json.loads((out / "metrics.json").read_text())["summary"] is None


def test_cli_paths_without_vae(tiny_run, tmp_path):
    """--eval_dataset given on the command line, no VAE: Table 1 and attention figures, no Figure 4."""
    run_dir, first = tiny_run
    bare = tmp_path / "cli"
    FoveatedVLMModel.from_pretrained(str(run_dir)).save_pretrained(str(bare))
    eval_path = json.loads((first / "metrics.json").read_text())["summary"]["eval_dataset"]
    out = main([str(bare), "--eval_dataset", eval_path, "--num_videos", "1", "--batch_size", "8"])
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
        (run_dir / "trainer_state.json").write_text(json.dumps(trainer_state()))
    main(["--compare", *(str(tmp_path / name) for name in improvements)])
    rows = {line.split(" | ")[0].strip("| "): line for line in capsys.readouterr().out.splitlines()}
    # Mean and sample standard deviation over the three seeds, each seed listed; the single run has no spread.
    assert "| 3 | 4 | 3 |" in rows["base"] and "+20.00 % ± 10.00 (+10.00, +20.00, +30.00)" in rows["base"]
    assert "| -5.00 % |" in rows["ablation"] and "±" not in rows["ablation"]
    with pytest.raises(FileNotFoundError, match="eval_results.json"):
        main(["--compare", str(tmp_path)])
