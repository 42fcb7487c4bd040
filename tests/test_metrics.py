"""foveated_vlm/metrics.py on planted numbers: each per-clip metric against a hand computation, Table 1's improvement
and its clip-level standard error, the attention entropy (the model's own definition), the state contribution, the
headroom of knowing a cued scene's level or of reading for the text, and the linear readout of what a state holds."""

import math

import numpy as np
import pytest
import torch
from tiny import tiny_config

from foveated_vlm import metrics as metrics_foveated
from foveated_vlm.metrics import (
    CHANGED_CELL_THRESHOLD,
    FoveatedVLMImprovement,
    clip_metrics,
    level_headroom,
    mean_metrics,
    text_headroom,
)
from modeling_foveated import FoveatedVLMModel, FoveatedVLMOutput


def test_improvement_metric_and_its_standard_error():
    # R = mean(fine) / mean(coarse) = 2 / (8/3) = 0.75; residuals fine - R coarse = (-0.5, 0.5, 0), sd 0.5;
    # SE = 0.5 / (sqrt(3) * 8/3).
    measured = FoveatedVLMImprovement().compute(loss_fine=[1.0, 2.0, 3.0], loss_coarse=[2.0, 2.0, 4.0])
    assert measured["improvement"] == pytest.approx(0.25)
    assert measured["improvement_se"] == pytest.approx(0.5 / (math.sqrt(3) * 8 / 3))
    assert measured["num_clips"] == 3
    # The delta method against the spread of the improvement over many resamples of the same clips.
    rng = np.random.default_rng(0)
    coarse = rng.uniform(1.0, 2.0, 400)
    fine = coarse * rng.uniform(0.7, 1.0, 400)
    se = FoveatedVLMImprovement().compute(loss_fine=fine, loss_coarse=coarse)["improvement_se"]
    resampled = [rng.integers(0, 400, 400) for _ in range(2000)]
    spread = np.std([1 - fine[i].mean() / coarse[i].mean() for i in resampled])
    assert se == pytest.approx(spread, rel=0.1)
    single = FoveatedVLMImprovement().compute(loss_fine=[1.0], loss_coarse=[2.0])
    assert single["improvement"] == 0.5 and math.isnan(single["improvement_se"])


def test_the_metrics_entropy_is_the_models():
    """metrics.attention_entropy repeats modeling_foveated.attention_entropy (so that the metrics do not load the
    model): the two agree on peaked, uniform and random attention."""
    from foveated_vlm import metrics
    import modeling_foveated

    attention = torch.stack([torch.eye(4)[0], torch.full((4,), 0.25), torch.rand(4).softmax(0)])  # (3, 4)
    for rows in (attention, attention[:1], attention[1:2]):
        torch.testing.assert_close(metrics.attention_entropy(rows), modeling_foveated.attention_entropy(rows))


def test_linear_readout_recovers_a_planted_linear_relation():
    rng = np.random.default_rng(0)
    # Features of very different scales and offsets: the standardisation makes the fit indifferent to them.
    x = rng.standard_normal((3000, 20)) * rng.uniform(0.1, 10, 20) + rng.uniform(-5, 5, 20)
    signal = (x - x.mean(0)) / x.std(0) @ rng.standard_normal((20, 2))  # (N, 2)
    train, held_out = slice(0, 2000), slice(2000, None)

    def r2(targets, features=x):
        return metrics_foveated.linear_readout(features[train], targets[train], features[held_out], targets[held_out])

    assert r2(signal)["r2"] > 0.999
    # Noise with the signal's variance in each coordinate: half of it is recoverable.
    noise = rng.standard_normal(signal.shape) * signal.std(0)
    assert r2(signal + noise)["r2"] == pytest.approx(0.5, abs=0.05)
    assert abs(r2(noise)["r2"]) < 0.03  # pure noise: nothing
    # Constant features predict the training mean, which scores exactly 0 (SST around the training mean).
    assert r2(signal, np.ones_like(x))["r2"] == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="kind"):
        metrics_foveated.linear_readout(x, signal, x, signal, kind="ranking")


def test_linear_readout_recovers_a_planted_class_rule():
    rng = np.random.default_rng(1)
    labels = rng.choice(4, size=3000, p=[0.4, 0.3, 0.2, 0.1])  # unbalanced: chance is the majority's share
    centres = rng.standard_normal((4, 16)) * 3
    x = np.concatenate([centres[labels] + rng.standard_normal((3000, 16)), rng.standard_normal((3000, 8))], axis=1)
    train, held_out = slice(0, 2000), slice(2000, None)

    def readout(targets):
        return metrics_foveated.linear_readout(
            x[train], targets[train], x[held_out], targets[held_out], kind="classification"
        )

    planted = readout(labels)
    assert planted["accuracy"] > 0.98
    majority = np.bincount(labels[train]).argmax()
    assert planted["chance"] == pytest.approx((labels[held_out] == majority).mean())
    shuffled = rng.permutation(labels)
    result = readout(shuffled)
    assert result["accuracy"] == pytest.approx(result["chance"], abs=0.05) and 0.3 < result["chance"] < 0.5


class _Head:
    """A stand-in model whose head predicts each latent cell as the mean of the state: the state contribution of a
    hand-made output can then be computed by hand."""

    def predict_latents(self, states, prev_latents):
        return states.mean(-1)[..., None, None, None].expand(*states.shape[:2], *prev_latents.shape[2:])


def test_each_metric_matches_a_hand_computation():
    # 2 clips, T = 2 targets of 1 x 2 x 2 latent cells, P = 4 patches (a 2 x 2 grid).
    target = torch.zeros(2, 2, 1, 2, 2)
    target[0, 1, 0, 0, 0] = 1.0  # clip 0: one of the 4 cells changes at t = 2 (above CHANGED_CELL_THRESHOLD)
    target[1, 1] = CHANGED_CELL_THRESHOLD / 2  # clip 1: every cell changes, below the threshold
    pred_fine = target.clone()
    pred_fine[0, 1, 0, 0, 0] += 2.0  # clip 0, t = 2: error 4 on the changed cell ...
    pred_fine[0, 1, 0, 1, 1] += 1.0  # ... and 1 on an unchanged one
    pred_fine[1, 0] += 1.0  # clip 1: error 1 on all cells of t = 1 only
    pred_coarse = target + 1.0  # error 1 everywhere
    uniform, corner = torch.full((4,), 0.25), torch.tensor([1.0, 0.0, 0.0, 0.0])
    attn_coarse = torch.stack([torch.stack([uniform, uniform])] * 2)  # (2, 2, 4)
    attn_fine = torch.stack([torch.stack([uniform, corner])] * 2)
    boxes = torch.full((2, 2, 1, 4), -1.0)
    boxes[0, :, 0] = torch.tensor([0.0, 0.0, 0.5, 0.5])  # clip 0: the top-left patch on both frames
    boxes[1, 0, 0] = torch.tensor([0.0, 0.0, 1.0, 1.0])  # clip 1: a box on frame 1 only, which tracking leaves out
    state_coarse = torch.zeros(2, 2, 3)
    state_coarse[1] = 3.0  # swapping clips moves clip 0's coarse prediction to 3, clip 1's to 0
    state_fine = state_coarse.clone()
    prev_latents = torch.cat([torch.zeros(2, 1, 1, 2, 2), target[:, :-1]], dim=1)
    outputs = FoveatedVLMOutput(
        loss_fine=(pred_fine - target).pow(2).mean(), loss_coarse=(pred_coarse - target).pow(2).mean(),
        loss_aux=torch.tensor(0.5), pred_fine=pred_fine, pred_coarse=pred_coarse, attn_coarse=attn_coarse,
        attn_fine=attn_fine, state_coarse=state_coarse, state_fine=state_fine, prev_latents=prev_latents,
    )
    metrics = clip_metrics(_Head(), outputs, {"vae_latents": target, "moving_boxes": boxes})
    # Clip 0: fine errors 4 + 1 over 8 cells; clip 1: 4 x 1 over 8 cells. Coarse: 1 everywhere.
    expected = {
        "loss/fine": [5 / 8, 4 / 8],
        "loss/coarse": [1.0, 1.0],
        "loss/aux": [0.5, 0.5],
        "loss/fine_t2": [5 / 4, 0.0],
        "loss/coarse_t2": [1.0, 1.0],
        "loss/copy_t2": [1 / 4, (CHANGED_CELL_THRESHOLD / 2) ** 2],
        "loss/fine_changed": [4.0, math.nan],  # clip 1 has no changed cell
        "loss/fine_unchanged": [1 / 3, 0.0],
        "attention/entropy_coarse": [math.log(4)] * 2,
        "attention/entropy_fine": [math.log(4) / 2] * 2,  # frame 1 uniform, frame 2 one-hot
        "tracking/fine": [1.0, math.nan],  # clip 0, frame 2: all mass on the box's patch
        "tracking/coarse": [0.25, math.nan],
        "tracking/chance": [0.25, math.nan],
        "tracking/coarse_first": [0.25, 1.0],  # frame 1 counts here: clip 1's box covers the whole frame
    }
    # State contribution at t = 2, coarse: clip 0 swapped predicts 3 against targets {1, 0, 0, 0} -> (4 + 27) / 4,
    # unswapped 1 -> 1; clip 1 swapped predicts 0 against 0.05 everywhere -> 0.0025, unswapped 1.
    swapped = [(4 + 3 * 9) / 4 - 1.0, (CHANGED_CELL_THRESHOLD / 2) ** 2 - 1.0]
    expected["diag/state_contribution_coarse"] = swapped
    # Fine: unswapped errors at t = 2 are 5/4 and 0; swapped the same as coarse.
    expected["diag/state_contribution_fine"] = [(4 + 3 * 9) / 4 - 5 / 4, (CHANGED_CELL_THRESHOLD / 2) ** 2]
    assert set(metrics) == set(expected)
    for name, values in expected.items():
        torch.testing.assert_close(metrics[name], torch.tensor(values), equal_nan=True, msg=name)
    means = mean_metrics(metrics)
    assert means["loss/fine_changed"] == 4.0 and means["tracking/fine"] == 1.0  # NaN clips are left out
    assert means["improvement"] == pytest.approx((1.0 - 9 / 16) / 1.0)
    assert means["loss/ratio"] == pytest.approx(16 / 9)
    assert means["improvement_t2"] == pytest.approx(1.0 - 5 / 8)


def test_state_contribution_is_zero_for_a_head_that_ignores_its_state():
    torch.manual_seed(0)
    model = FoveatedVLMModel(tiny_config()).eval()
    pixel_values, vae_latents = torch.randn(3, 4, 3, 64, 64), torch.randn(3, 4, 4, 8, 8)
    batch = {"vae_latents": vae_latents}
    with torch.no_grad():
        model.prediction_head.film[-1].weight.normal_(std=1.0)  # a head that reads its state strongly
        reading = clip_metrics(model, model(pixel_values, vae_latents), batch)
        model.prediction_head.film[-1].weight.zero_()
        model.prediction_head.film[-1].bias.zero_()
        ignoring = clip_metrics(model, model(pixel_values, vae_latents), batch)
    assert ignoring["diag/state_contribution_fine"].abs().max() < 1e-6
    assert reading["diag/state_contribution_fine"].abs().min() > 1e-6


def test_level_headroom_on_a_hand_computed_example():
    # Latents (N, T, C=2, 1, 1): channel 0 carries the change, channel 1 stays 0 (so each MSE is half the
    # channel-0 one). Training changes by (level before, level after): (0, 1): +1, +1; (1, 0): -1; (0, 0): 0.
    def latents(values):
        values = np.array(values, dtype=float)[..., None, None, None]  # (N, T, 1, 1, 1)
        return np.concatenate([values, np.zeros_like(values)], axis=2)

    train_latents, train_levels = latents([[0, 1, 0], [0, 0, 1]]), [[0, 1, 0], [0, 0, 1]]
    eval_latents, eval_levels = latents([[0, 2, 0]]), [[0, 1, 0]]  # changes +2 at (0, 1), -2 at (1, 0)
    measured = level_headroom(train_latents, train_levels, eval_latents, eval_levels)
    # Known next level: predicted +1 and -1, errors 1 and 1. Unknown: from level 0 the mean of +1, 0, +1 = 2/3
    # (error (4/3)^2 = 16/9), from level 1 -1 (error 1). Copy: errors 4 and 4.
    assert measured["mse_level_known"] == pytest.approx(1 / 2)
    assert measured["mse_level_unknown"] == pytest.approx((16 / 9 + 1) / 2 / 2)
    assert measured["mse_copy"] == pytest.approx(4 / 2)
    assert measured["headroom"] == pytest.approx(25 / 36 - 1 / 2)
    with pytest.raises(ValueError, match=r"levels \(1, 1\)"):
        level_headroom(train_latents, train_levels, eval_latents, [[0, 1, 1]])


def test_text_headroom_is_the_cross_entropy_of_a_writer_that_sees_no_frame():
    # Template token 5, then one of four colour tokens uniformly, then the end of text 9.
    train = [[5, colour, 9] for colour in (1, 2, 3, 4) * 25]
    measured = text_headroom(train, [[5, 3, 9], [5, 1, 9]])
    smoothed_template = -math.log(101 / 102)  # seen 100 times in 100, add-one over {seen, unseen}
    colour = -math.log(26 / 105)  # 25 of 100, add-one over 4 seen + 1 unseen
    assert measured["without_reading"] == pytest.approx((2 * smoothed_template + colour) / 3)
    assert measured["headroom"] == measured["without_reading"] and measured["with_reading"] == 0
    unseen = text_headroom(train, [[5, 7, 9]])["without_reading"]
    assert unseen == pytest.approx((2 * smoothed_template - math.log(1 / 105)) / 3)
