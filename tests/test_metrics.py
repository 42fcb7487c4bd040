"""foveated_vlm/metrics.py on planted numbers: Table 1's improvement and its clip-level standard error, the attention
entropy (the model's own definition), and the linear readout of what a state holds."""

import math

import numpy as np
import pytest
import torch

from foveated_vlm import metrics as metrics_foveated
from foveated_vlm.metrics import FoveatedVLMImprovement


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
