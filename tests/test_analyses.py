"""foveated_vlm/analyses.py on tiny run folders: runs compared with seeds pooled, and the linear readout of what each
pass's LLM state holds (the next level, the mover's centre, where the target is at every frame)."""

import json
import math

import pytest
import torch

from foveated_vlm import analyses
from foveated_vlm import metrics as metrics_foveated
from foveated_vlm.analyses import state_readout
from foveated_vlm.data import (
    DATA_PATHS_FILE,
    FoveatedVLMDataCollator,
    find_videos,
    load_precomputed,
    precompute_dataset,
)
from foveated_vlm.probes import PROBES_FILE, moving_box_centres
from foveated_vlm.report import main as report_main
from foveated_vlm.synthetic import generate_split
from modeling_foveated import FoveatedVLMModel
from runs import NUM_CLIPS, S, T, eval_dataset, make_run
from tiny import tiny_config, trainer_state

pytestmark = pytest.mark.usefixtures("one_thread")


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
        report_main(["--compare", str(tmp_path / "ablation")])
    assert f"--compare moved: python -m foveated_vlm.analyses compare {tmp_path / 'ablation'}" in capsys.readouterr().err



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


def test_state_readout_summarises_the_fixations_the_policy_writes(tmp_path, data):
    """With saccades: the mean log sigma, the L1 error from the first box's centre, the first and later moves and the
    share of running sums past 2, of the fixations Pass 2 reads frames 1..T-1 with (the running sum starts from
    q_init's move), as a direct forward gives them; a model without fixations has no summary."""
    eval_dataset(tmp_path / "train", seed=1, spread=0.1)
    eval_dataset(tmp_path / "eval", seed=2, spread=0.05)
    held_out = str(tmp_path / "eval")
    torch.manual_seed(0)
    model = FoveatedVLMModel(tiny_config(fixation_bias=True, fixation_mode="saccade"))
    with torch.no_grad():  # moves large enough that some running sums pass 2
        model.encoder.fixation_proj.weight.mul_(40.0)
    run_dir = make_run(tmp_path / "saccades", data, model=model)
    policy = state_readout(run_dir, tmp_path / "train", held_out)["policy"]

    dataset = load_precomputed(held_out)
    batch = FoveatedVLMDataCollator()([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        queries = model.eval()(pixel_values=batch["pixel_values"]).queries[:, :-1]  # (C, T-1, Q)
        # Pass 2 reads frame 0 with q_init, whose move starts the running sum: frames 1..T-1 are read from there.
        shifted = torch.cat([model.q_init.expand(len(queries), 1, -1), queries], dim=1)  # (C, T, Q)
        fixations = model.encoder.saccade_fixations(shifted)[0][:, 1:]  # (C, T-1, 3)
        moves = model.encoder.fixation_proj(shifted)[..., :2]  # (C, T, 2)
        start, moves = moves[:, :1], moves[:, 1:]
    assert start.abs().min() > 0.1  # q_init's own move is not negligible here
    place, present = moving_box_centres(batch["moving_boxes"])[:, 1:], (batch["moving_boxes"][:, 1:, 0] >= 0).all(-1)
    assert policy["log_sigma"] == pytest.approx(fixations[..., 2].mean().item(), abs=1e-5)
    error = (fixations[..., :2] - place).abs().sum(-1)[present].mean().item()
    assert policy["fixation_error"] == pytest.approx(error, abs=1e-5)
    assert policy["first_move"] == pytest.approx(moves[:, 0].abs().mean().item(), abs=1e-5)
    assert policy["later_moves"] == pytest.approx(moves[:, 1:].abs().mean().item(), abs=1e-5)
    saturated = ((start + moves.cumsum(1)).abs() > 2).float().mean().item()
    assert 0 < saturated < 1 and policy["saturated"] == pytest.approx(saturated)

    plain = make_run(tmp_path / "plain", data, model=FoveatedVLMModel(tiny_config(fixation_bias=False)))
    assert state_readout(plain, tmp_path / "train", held_out)["policy"] is None


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
    # The training split the run recorded is the default.
    recorded = json.loads((run_dir / DATA_PATHS_FILE).read_text())
    (run_dir / DATA_PATHS_FILE).write_text(json.dumps({**recorded, "train_dataset": train}))
    assert state_readout(run_dir) == result


def test_state_readout_bad_paths_name_the_file(tmp_path, data):
    with pytest.raises(FileNotFoundError, match="no saved model"):
        state_readout(tmp_path / "missing_run", data["eval_dataset"])
    run_dir = make_run(tmp_path / "run", data)
    with pytest.raises(FileNotFoundError, match="missing_split"):
        state_readout(run_dir, tmp_path / "missing_split")
    with pytest.raises(ValueError, match="no training split"):
        analyses.main(["readout", str(run_dir)])  # neither named nor recorded
