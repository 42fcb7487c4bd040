"""Every metric of the Foveated VLM, one definition each (docs/TRAINING.md lists them with their logged names).

A metric is a value per clip, a tensor of shape (B,) computed from the model's `FoveatedVLMOutput` and the collated
batch (`clip_metrics`). The trainer logs means over the clips since its last log (`FoveatedVLMTrainer.log`), the
report reads the per-clip values for standard errors and its hardest clips: both use these functions. A clip for
which a metric is undefined (no latent cell changed, no moving box) holds NaN there; means skip such clips, and a
metric that no clip defines is absent from the means, not 0.

Targets are numbered as in docs/DESIGN.md: the model predicts latents v_1..v_T; "t >= 2" are the targets that have
a previous latent (v_1 is predicted from a learned start latent, the same task in both passes).
"""

import math
from typing import Optional

import datasets
import evaluate
import numpy as np
import torch


__all__ = [
    "clip_category",
    "rank_correlation",
    "CHANGED_CELL_THRESHOLD",
    "FoveatedVLMImprovement",
    "box_coverage",
    "box_present",
    "clip_metrics",
    "derived_metrics",
    "improvement",
    "improvement_with_se",
    "level_headroom",
    "linear_readout",
    "mean_metrics",
    "means_from_totals",
    "psnr",
    "text_headroom",
    "totals",
]

# A latent cell "changes" when the mean absolute change of its channels from the previous latent exceeds this: a
# tenth of the latents' standard deviation, which the VAE's scaling factor makes about 1.
CHANGED_CELL_THRESHOLD = 0.1
# Tracking samples each patch at this many points per side to measure how much of it the boxes cover.
BOX_COVERAGE_SUBDIVISIONS = 8
# Ridge penalty of `linear_readout`, relative to the mean diagonal of the standardised features' Gram matrix.
READOUT_RIDGE = 1e-3
# Table 1's improvements: name -> the per-clip (fine, coarse) losses it and its standard error are computed from.
IMPROVEMENTS = {
    "improvement": ("loss/fine", "loss/coarse"),
    "improvement_t2": ("loss/fine_t2", "loss/coarse_t2"),
    "improvement_text": ("loss/text_fine", "loss/text_coarse"),  # text as a target
}
TABLE1_LOSSES = tuple(name for pair in IMPROVEMENTS.values() for name in pair)


def _clip_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, T', C, h, w) x (B, T', C, h, w) -> (B,): the MSE over each clip's targets."""
    return (prediction.float() - target).pow(2).flatten(1).mean(1)


def loss_metrics(outputs, batch: dict) -> dict[str, torch.Tensor]:
    """Per clip: the two passes' MSE over all targets (`loss/fine`, `loss/coarse`, whose batch means are the model's
    `loss_fine` and `loss_coarse`), over the targets t >= 2 (`loss/*_t2`: the first target is the same task in both
    passes and dominates the mean), and the MSE of copying the previous latent there (`loss/copy_t2`, the baseline a
    useful prediction beats). `loss/aux` is the model's auxiliary reconstruction loss where it trains one; the model
    returns it for the batch only, so each clip carries the batch value (its batch mean is exact, a clip value is not
    that clip's)."""
    target = batch["vae_latents"].float()
    B = target.shape[0]
    later = slice(1, None)
    metrics = {
        "loss/fine": _clip_mse(outputs.pred_fine, target),
        "loss/coarse": _clip_mse(outputs.pred_coarse, target),
        "loss/fine_t2": _clip_mse(outputs.pred_fine[:, later], target[:, later]),
        "loss/coarse_t2": _clip_mse(outputs.pred_coarse[:, later], target[:, later]),
        "loss/copy_t2": _clip_mse(target[:, :-1], target[:, later]),
    }
    if outputs.loss_aux is not None:
        metrics["loss/aux"] = outputs.loss_aux.detach().float().expand(B)
    return metrics


def text_metrics(outputs) -> dict[str, torch.Tensor]:
    """Per clip, with text as a target: each pass's mean cross-entropy (nats per scored token) of the clip's text
    (`loss/text_fine`, `loss/text_coarse`, whose batch means are the model's `loss_text_fine` and
    `loss_text_coarse`). With several fine passes, every pass's batch loss (`loss/fine_pass{k}`,
    `loss/text_fine_pass{k}`, k = 1..fine_passes), each clip carrying the batch value as `loss/aux` does."""
    metrics = {}
    if outputs.text_nll_fine is not None:
        metrics["loss/text_fine"] = outputs.text_nll_fine.detach().float()
        metrics["loss/text_coarse"] = outputs.text_nll_coarse.detach().float()
    for name, per_pass in (("loss/fine_pass", outputs.loss_fine_passes), ("loss/text_fine_pass", outputs.loss_text_fine_passes)):
        if per_pass is not None and len(per_pass) > 1:
            B = outputs.attn_coarse.shape[0]
            metrics.update({f"{name}{k + 1}": value.detach().float().expand(B) for k, value in enumerate(per_pass)})
    return metrics


def changed_cell_metrics(outputs, batch: dict) -> dict[str, torch.Tensor]:
    """Per clip, on targets t >= 2: Pass 2's MSE over the latent cells that change from the previous latent by more
    than `CHANGED_CELL_THRESHOLD` (`loss/fine_changed`: where a glimpse can help) and over the others
    (`loss/fine_unchanged`: where copying suffices). NaN for a clip without such cells."""
    target = batch["vae_latents"].float()
    change = (target[:, 1:] - target[:, :-1]).abs().mean(dim=2)  # (B, T-1, h, w)
    changed = (change > CHANGED_CELL_THRESHOLD).float()
    error = (outputs.pred_fine[:, 1:].float() - target[:, 1:]).pow(2).mean(dim=2)  # (B, T-1, h, w)
    metrics = {}
    for name, cells in (("loss/fine_changed", changed), ("loss/fine_unchanged", 1 - changed)):
        count = cells.flatten(1).sum(1)
        mean = (error * cells).flatten(1).sum(1) / count.clamp_min(1)
        metrics[name] = torch.where(count > 0, mean, math.nan)
    return metrics


def attention_entropy(attention: torch.Tensor) -> torch.Tensor:
    """Mean entropy in nats of distributions over the last dim; `log(P)` for uniform attention. The definition of
    `modeling_foveated.attention_entropy` (the model's entropy price), repeated here so that the metrics, and the
    card, figures and tiny VAE above them, do not load the model; tests/test_metrics.py checks they agree."""
    return -(attention * attention.clamp_min(1e-12).log()).sum(-1).mean()


def entropy_metrics(outputs) -> dict[str, torch.Tensor]:
    """Per clip: the mean entropy (nats) of Pass 1's and Pass 2's attention over the clip's frames, the model's
    `attention_entropy` of one clip; log(P) is uniform attention."""
    per_clip = torch.vmap(attention_entropy)
    return {
        "attention/entropy_coarse": per_clip(outputs.attn_coarse.float()),
        "attention/entropy_fine": per_clip(outputs.attn_fine.float()),
    }


def state_contribution_metrics(model, outputs, batch: dict) -> dict[str, torch.Tensor]:
    """Per clip, on targets t >= 2: how much worse the head predicts with each clip's LLM states swapped for another
    clip's (`diag/state_contribution_*`). Zero means the head ignores the LLM, and then no gradient asks the queries to
    become selective. Re-runs the head through `model.predict_latents`: two head passes, one call."""
    target = batch["vae_latents"].float()[:, 1:]
    swapped_states = torch.cat([outputs.state_fine.roll(1, dims=0), outputs.state_coarse.roll(1, dims=0)])
    swapped_fine, swapped_coarse = model.predict_latents(swapped_states, outputs.prev_latents).chunk(2)
    swaps = (("fine", swapped_fine, outputs.pred_fine), ("coarse", swapped_coarse, outputs.pred_coarse))
    return {
        f"diag/state_contribution_{name}": _clip_mse(swapped[:, 1:], target) - _clip_mse(predicted[:, 1:], target)
        for name, swapped, predicted in swaps
    }


def box_present(boxes):
    """Which box rows hold a box: (..., 4) normalised xyxy, absent rows filled with -1 -> (...) bool (torch or
    numpy)."""
    return (boxes >= 0).all(-1)


def psnr(prediction: torch.Tensor, target: torch.Tensor) -> float:
    """PSNR in dB of images with values in [0, 1]."""
    mse = (torch.as_tensor(prediction, dtype=torch.float32) - torch.as_tensor(target, dtype=torch.float32)).pow(2)
    return float(10 * torch.log10(1.0 / mse.mean().clamp_min(1e-12)))


def box_coverage(boxes: torch.Tensor, grid: int, subdivisions: int = BOX_COVERAGE_SUBDIVISIONS) -> torch.Tensor:
    """Share of each patch covered by the union of the boxes: (B, T, K, 4) normalised xyxy, rows with a negative
    value absent -> (B, T, P), on the boxes' device. Sampled at `subdivisions`² points per patch (half-open intervals),
    so uniform attention's mass inside the boxes equals the mean coverage exactly."""
    side = grid * subdivisions
    centres = (torch.arange(side, dtype=torch.float32, device=boxes.device) + 0.5) / side  # (side,)
    boxes = boxes.float()
    valid = box_present(boxes)[..., None, None]  # (B, T, K, 1, 1)
    x0, y0, x1, y1 = (boxes[..., i, None, None] for i in range(4))  # (B, T, K, 1, 1) each
    inside_x = (centres >= x0) & (centres < x1)  # (B, T, K, 1, side)
    inside_y = (centres[:, None] >= y0) & (centres[:, None] < y1)  # (B, T, K, side, 1)
    mask = (valid & inside_x & inside_y).any(dim=2).float()  # (B, T, side, side)
    B, T = mask.shape[:2]
    mask = mask.view(B, T, grid, subdivisions, grid, subdivisions)  # rows/columns split into patches
    return mask.mean(dim=(3, 5)).flatten(2)  # (B, T, g, g) -> (B, T, P), row-major like the patch tokens


def tracking_metrics(outputs, batch: dict) -> dict[str, torch.Tensor]:
    """Per clip: the attention mass inside the moving boxes, averaged over frames 2..T that have a box, for the
    Pass 2 (`tracking/fine`) and Pass 1 (`tracking/coarse`), and the same for uniform attention, the
    boxes' mean coverage (`tracking/chance`); and Pass 1's mass inside frame 1's boxes
    (`tracking/coarse_first`), where the cued scene marks its target. NaN for a clip with no box on those frames;
    no keys for a batch without `moving_boxes`.

    This is the one definition of "attention on the mover", chosen for faithfulness:
    - Fractional coverage: a patch half inside the box counts half, so uniform attention scores exactly the box's
      share of the frame; counting patch centres would make chance jump with where a box's edge falls.
    - Frames 2..T: Pass 2's query of frame 1 is the learned initial query, emitted before any frame was seen, so
      it cannot track; including it would dilute Pass 2's score with a constant.
    - Frames without a box are left out, not counted as 0: there is nothing to track there, and data without boxes
      (LLaVA-Video) would otherwise log a tracking of 0 that means nothing.
    """
    if "moving_boxes" not in batch:
        return {}
    coverage = box_coverage(batch["moving_boxes"], math.isqrt(outputs.attn_coarse.shape[-1]))[:, 1:]  # (B, T-1, P)
    has_box = (coverage.sum(-1) > 0).float()  # (B, T-1)
    frames = has_box.sum(1)

    def over_frames(per_frame: torch.Tensor) -> torch.Tensor:  # (B, T-1) -> (B,), NaN without a box
        return torch.where(frames > 0, (per_frame * has_box).sum(1) / frames.clamp_min(1), math.nan)

    first = box_coverage(batch["moving_boxes"][:, :1], math.isqrt(outputs.attn_coarse.shape[-1]))[:, 0]  # (B, P)
    return {
        "tracking/fine": over_frames((outputs.attn_fine[:, 1:].float() * coverage).sum(-1)),
        "tracking/coarse": over_frames((outputs.attn_coarse[:, 1:].float() * coverage).sum(-1)),
        "tracking/chance": over_frames(coverage.mean(-1)),
        # Frame 1 apart: where the cued target is marked, so Pass 1 can see there where to look later.
        "tracking/coarse_first": torch.where(
            first.sum(-1) > 0, (outputs.attn_coarse[:, 0].float() * first).sum(-1), math.nan
        ),
    }


@torch.no_grad()
def teacher_metrics(taught, batch: dict, grid: int) -> dict[str, torch.Tensor]:
    """Per clip: the search teacher's own metrics (foveated_vlm/teacher.py), and how often its best cell overlaps the
    target's box (`teacher/on_target`, over the scored frames with a box) against the share of cells that do
    (`teacher/on_target_chance`), and how far the best cell's centre lies from the box's centre (`teacher/place_error`,
    |dy| + |dx| in [-1, 1] frame units: the error of the place a position distillation towards the best cell
    teaches). The first box is the target's (the cued scenes). The boxes are read here, for evaluation, never by the
    teacher. No box keys for a batch without `moving_boxes`."""
    metrics = dict(taught.metrics)
    if "moving_boxes" not in batch:
        return metrics
    overlaps = box_coverage(batch["moving_boxes"], grid) > 0  # (B, T, K): cells the box overlaps
    frames = taught.frames  # (B, F)
    overlaps = overlaps.gather(1, frames[:, :, None].expand(-1, -1, overlaps.shape[-1])).float()  # (B, F, K)
    has_box = (overlaps.sum(-1) > 0).float()  # (B, F)
    counted = has_box.sum(1)
    best = overlaps.gather(-1, taught.posterior.argmax(-1, keepdim=True))[..., 0]  # (B, F)
    metrics["teacher/on_target"] = torch.where(counted > 0, (best * has_box).sum(1) / counted.clamp_min(1), math.nan)
    chance = (overlaps.mean(-1) * has_box).sum(1) / counted.clamp_min(1)
    metrics["teacher/on_target_chance"] = torch.where(counted > 0, chance, math.nan)
    cell = taught.posterior.argmax(-1)  # (B, F)
    best_centre = torch.stack([cell // grid, cell % grid], dim=-1).float() * 2 / grid + 1 / grid - 1  # (B, F, 2)
    box = batch["moving_boxes"][:, :, 0].float().gather(1, frames[:, :, None].expand(-1, -1, 4))  # (B, F, 4)
    box_centre = torch.stack([box[..., 1] + box[..., 3], box[..., 0] + box[..., 2]], dim=-1) - 1  # (y, x)
    error = (best_centre - box_centre).abs().sum(-1)  # (B, F)
    metrics["teacher/place_error"] = torch.where(counted > 0, (error * has_box).sum(1) / counted.clamp_min(1), math.nan)
    return metrics


@torch.no_grad()
def clip_metrics(model, outputs, batch: dict, state_contribution: bool = True) -> dict[str, torch.Tensor]:
    """Every metric of one batch, per clip: name -> (B,) float tensor, left on the device (reading it would make
    the host wait).

    Args:
        model: the unwrapped `FoveatedVLMModel` that produced `outputs` (for the state contribution's head pass).
        outputs: its `FoveatedVLMOutput` on this batch.
        batch: the whole collated batch, model inputs and the other columns (`moving_boxes`, ...).
        state_contribution: also measure the state contribution (most of what these metrics cost); the trainer asks
            for it in evaluation and on the steps that log.

    The keys depend only on what the batch and the output carry and on `state_contribution`, never on values: the
    trainer reduces them across processes by name.
    """
    metrics = {**entropy_metrics(outputs), **text_metrics(outputs)}
    if outputs.pred_fine is None:  # no latent targets: no latent losses
        return metrics
    metrics.update(loss_metrics(outputs, batch))
    metrics.update(changed_cell_metrics(outputs, batch))
    if state_contribution:
        metrics.update(state_contribution_metrics(model, outputs, batch))
    metrics.update(tracking_metrics(outputs, batch))
    return metrics


def totals(values: torch.Tensor) -> torch.Tensor:
    """Per-clip values (..., N) -> (..., 2): [sum, count] over the clips that define them (not NaN), on the device;
    what adds up across micro-batches and processes."""
    defined = ~values.isnan()
    return torch.stack([torch.where(defined, values, 0.0).sum(-1), defined.sum(-1).to(values.dtype)], dim=-1)


def means_from_totals(names: list[str], summed: list[list[float]]) -> dict[str, float]:
    """Means from `totals` added up, with the derived metrics; a metric that no clip defines is left out."""
    means = {name: total / count for name, (total, count) in zip(names, summed) if count > 0}
    return {**means, **derived_metrics(means)}


def mean_metrics(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-clip values of any number of clips (name -> (N,)) -> the means the trainer would log for them."""
    names = sorted(values)
    return means_from_totals(names, [totals(values[name].float()).tolist() for name in names])


def improvement(fine: float, coarse: float) -> float:
    """Table 1's improvement (docs/DESIGN.md): (coarse - fine) / coarse, from MEAN losses over clips (a mean of
    per-clip ratios would weight clips with a small coarse loss heavily). Above 0: choosing where to look helps."""
    return (coarse - fine) / coarse if coarse > 0 else 0.0


def derived_metrics(means: dict[str, float]) -> dict[str, float]:
    """From mean losses: `loss/ratio` = coarse / fine (> 1: foveation helps) and each of `IMPROVEMENTS` whose losses
    are there (`improvement`, `improvement_t2`, `improvement_text`)."""
    derived = {}
    if "loss/fine" in means and "loss/coarse" in means:
        fine = means["loss/fine"]
        derived["loss/ratio"] = means["loss/coarse"] / fine if fine > 0 else math.inf
    for name, (fine, coarse) in IMPROVEMENTS.items():
        if fine in means and coarse in means:
            derived[name] = improvement(means[fine], means[coarse])
    return derived


def level_headroom(
    train_latents: np.ndarray, train_levels: np.ndarray, eval_latents: np.ndarray, eval_levels: np.ndarray
) -> dict[str, float]:
    """What knowing the next frame's background level is worth in the cued scene, on the targets t >= 2.

    Two predictors of latent t from latent t-1, each adding the mean change that the training clips show for its
    group of targets: `mse_level_known` groups by (level t-1, level t), the best a model that reads the target's cue
    can do with the level alone; `mse_level_unknown` groups by level t-1 only, what history without the cue gives.
    `headroom` = unknown - known is what a glimpse at the target can win; `mse_copy` is `loss/copy_t2`. Errors are
    MSEs over every latent element of the held-out targets, as `loss/*_t2` are.

    Args:
        train_latents, eval_latents: VAE latents (N, T, C, h, w).
        train_levels, eval_levels: integer background level of each frame (N, T).

    Raises:
        ValueError: when a held-out group never occurs in training (too few training clips for the levels).
    """
    train_latents, eval_latents = np.asarray(train_latents, np.float64), np.asarray(eval_latents, np.float64)

    def transitions(latents, levels):  # (N*(T-1), C*h*w) changes, (N*(T-1),) levels before and after
        levels = np.asarray(levels, np.int64)
        change = (latents[:, 1:] - latents[:, :-1]).reshape(-1, int(np.prod(latents.shape[2:])))
        return change, levels[:, :-1].reshape(-1), levels[:, 1:].reshape(-1)

    train_change, train_before, train_after = transitions(train_latents, train_levels)
    eval_change, eval_before, eval_after = transitions(eval_latents, eval_levels)

    def grouped_mse(train_keys: np.ndarray, eval_keys: np.ndarray) -> float:
        predicted = np.empty_like(eval_change)
        for key in np.unique(eval_keys, axis=0):
            in_train = (train_keys == key).all(-1)
            if not in_train.any():
                raise ValueError(f"levels {tuple(key.tolist())} occur in the held-out clips but never in training")
            predicted[(eval_keys == key).all(-1)] = train_change[in_train].mean(0)
        return float(((eval_change - predicted) ** 2).mean())

    known = grouped_mse(np.stack([train_before, train_after], -1), np.stack([eval_before, eval_after], -1))
    unknown = grouped_mse(train_before[:, None], eval_before[:, None])
    return {
        "mse_copy": float((eval_change**2).mean()),
        "mse_level_unknown": unknown,
        "mse_level_known": known,
        "headroom": unknown - known,
    }


def text_headroom(train_targets: list[list[int]], eval_targets: list[list[int]]) -> dict[str, float]:
    """What reading the clip is worth to its text target, in nats per target token (the unit of `loss/text_*`).

    `without_reading`: the held-out cross-entropy of a writer that knows the captions' form but sees no frame: at
    each position, the training captions' token frequencies there (add-one smoothed over the tokens seen in
    training; a held-out token never seen there costs the log of that count plus one). `with_reading`: 0, for
    captions written from the clip's generator state (`foveated_vlm.synthetic.describe_clip`): every word follows from what
    the frames show, so a reader that sees it can write it exactly. `headroom` = without − with, the most a
    glimpse can win; a pass that reads the whole frame already gets part of it where the words are in any glimpse.

    Args:
        train_targets, eval_targets: token ids of each clip's target text, end of text included (`target_tokens`).
    """
    counts: dict[int, dict[int, int]] = {}
    for ids in train_targets:
        for position, token in enumerate(ids):
            counts.setdefault(position, {}).setdefault(token, 0)
            counts[position][token] += 1
    per_clip = []
    for ids in eval_targets:
        nats = 0.0
        for position, token in enumerate(ids):
            seen = counts.get(position, {})
            total, kinds = sum(seen.values()), len(seen) + 1  # + 1: the unseen token
            nats -= math.log((seen.get(token, 0) + 1) / (total + kinds))
        per_clip.append(nats / max(len(ids), 1))
    without = float(np.mean(per_clip))
    return {"without_reading": without, "with_reading": 0.0, "headroom": without}


def linear_readout(
    train_features: np.ndarray,
    train_targets: np.ndarray,
    eval_features: np.ndarray,
    eval_targets: np.ndarray,
    kind: str = "regression",
    ridge: float = READOUT_RIDGE,
) -> dict[str, float]:
    """How much of a quantity a linear map of the features recovers on held-out samples: ridge regression in closed
    form, fitted on the training samples only. Used to ask what each pass's LLM state knows about the next frame.

    The features are standardised with the training mean and standard deviation (a constant feature stays 0) and get
    a bias column; the penalty, not on the bias, is `ridge` * N_train, `ridge` times the mean diagonal of the
    standardised features' Gram matrix, so it does not depend on the features' scale or the number of samples.

    Args:
        train_features, eval_features: (N, F) and (M, F).
        train_targets, eval_targets: kind="regression": (N,) or (N, D) floats; kind="classification": (N,) integer
            class ids (a held-out class never seen in training counts as wrong).
        kind: "regression" or "classification".

    Returns:
        regression: {"r2"}: held-out R² = 1 - SSE / SST per target dimension, with SST around the *training* mean
            (predicting the training mean scores 0; below 0 is worse), averaged over the D dimensions so each
            coordinate weighs alike whatever its spread; a dimension whose held-out targets all equal the training
            mean is left out (NaN if every one is).
        classification: {"accuracy", "chance"}: the held-out accuracy of the argmax of a ridge fit to one-hot targets,
            and what always answering the most frequent training class scores on the held-out samples.
    """
    if kind not in ("regression", "classification"):
        raise ValueError(f"kind must be 'regression' or 'classification', got {kind!r}")
    train_x, eval_x = np.asarray(train_features, np.float64), np.asarray(eval_features, np.float64)
    mean, std = train_x.mean(0), train_x.std(0)
    std = np.where(std > 0, std, 1.0)

    def design(x: np.ndarray) -> np.ndarray:  # (N, F) -> (N, F + 1), standardised, bias last
        return np.concatenate([(x - mean) / std, np.ones((len(x), 1))], axis=1)

    train_x, eval_x = design(train_x), design(eval_x)
    if kind == "classification":
        train_ids, eval_ids = np.asarray(train_targets, np.int64), np.asarray(eval_targets, np.int64)
        classes, counts = np.unique(train_ids, return_counts=True)
        train_y = (train_ids[:, None] == classes).astype(np.float64)  # (N, classes) one-hot
    else:
        train_y = np.asarray(train_targets, np.float64).reshape(len(train_x), -1)  # (N, D)
    gram = train_x.T @ train_x
    penalty = np.full(len(gram), ridge * len(train_x))
    penalty[-1] = 0.0  # the bias is not shrunk
    weights = np.linalg.solve(gram + np.diag(penalty), train_x.T @ train_y)  # (F + 1, D or classes)
    predicted = eval_x @ weights
    if kind == "classification":
        return {
            "accuracy": float((classes[predicted.argmax(1)] == eval_ids).mean()),
            "chance": float((eval_ids == classes[counts.argmax()]).mean()),
        }
    eval_y = np.asarray(eval_targets, np.float64).reshape(len(eval_x), -1)  # (M, D)
    sse = ((eval_y - predicted) ** 2).sum(0)
    sst = ((eval_y - train_y.mean(0)) ** 2).sum(0)
    varies = sst > 0  # a dimension held at the training mean has nothing to recover
    return {"r2": float((1 - sse[varies] / sst[varies]).mean()) if varies.any() else math.nan}


class FoveatedVLMImprovement(evaluate.Metric):
    """Table 1's improvement = (coarse - fine) / coarse from per-clip losses, with its clip-level standard error.

    The improvement is `improvement(mean(fine), mean(coarse))` = 1 - R with R = mean(fine) / mean(coarse), a ratio
    of means. Its standard error is the delta method's for a ratio of means: the residuals d_i = fine_i - R coarse_i
    have mean 0, and SE = sd(d) / (sqrt(n) mean(coarse)), with the sample standard deviation (n - 1). Clips are the
    unit, since the frames of one clip are not independent. With fewer than 2 clips the SE is NaN.

    Instantiate it directly (`FoveatedVLMImprovement().compute(loss_fine=..., loss_coarse=...)`); it is not an
    `evaluate.load` script. Returns `improvement`, `improvement_se` and `num_clips`.
    """

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Improvement (coarse - fine) / coarse of the foveated model, with a clip-level standard error.",
            citation="",
            inputs_description="loss_fine, loss_coarse: one mean-squared error per held-out clip, for each pass.",
            features=datasets.Features({"loss_fine": datasets.Value("float64"), "loss_coarse": datasets.Value("float64")}),
        )

    def _compute(self, loss_fine, loss_coarse) -> dict:
        fine, coarse = np.asarray(loss_fine, dtype=np.float64), np.asarray(loss_coarse, dtype=np.float64)
        n = len(fine)
        ratio = fine.mean() / coarse.mean()
        se = (fine - ratio * coarse).std(ddof=1) / (math.sqrt(n) * coarse.mean()) if n > 1 else math.nan
        return {"improvement": improvement(fine.mean(), coarse.mean()), "improvement_se": float(se), "num_clips": n}


def improvement_with_se(values: dict, metric: Optional[FoveatedVLMImprovement] = None) -> dict[str, float]:
    """Each of `IMPROVEMENTS` whose per-clip losses are there (name -> (N,) tensors or arrays), with its standard
    error (`improvement_se`, `improvement_t2_se`, `improvement_text_se`)."""
    metric = metric or FoveatedVLMImprovement(keep_in_memory=True)
    results = {}
    for name, (fine_name, coarse_name) in IMPROVEMENTS.items():
        fine, coarse = values.get(fine_name), values.get(coarse_name)
        if fine is not None and coarse is not None and len(fine) > 0:
            measured = metric.compute(loss_fine=np.asarray(fine), loss_coarse=np.asarray(coarse))
            results[name] = measured["improvement"]
            results[f"{name}_se"] = measured["improvement_se"]
    return results


# Clip heuristics on the mean absolute difference of consecutive frames (pixels scaled to [0, 1]). A 16 px square
# moving on a 128 px synthetic frame gives about 0.01; a camera pan over a textured real scene 0.05-0.15.
STATIC_MAX_DIFF = 0.005  # below: nothing visible changes (about 1.3 grey levels on average)
FAST_MIN_DIFF = 0.05  # at or above: fast motion
CUT_MIN_DIFF = 0.20  # a scene cut: one frame pair differs this much ...
CUT_MIN_RATIO = 3.0  # ... and at least this many times the clip's median pair difference


def clip_category(diffs: np.ndarray) -> str:
    """static / scene cut / fast motion / moderate motion, from one clip's consecutive-frame differences."""
    if diffs.max() >= CUT_MIN_DIFF and diffs.max() >= CUT_MIN_RATIO * np.median(diffs):
        return "scene cut"
    if diffs.mean() < STATIC_MAX_DIFF:
        return "static"
    return "fast motion" if diffs.mean() >= FAST_MIN_DIFF else "moderate motion"


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho (no tie correction), NaN for fewer than 3 clips or a constant input."""
    if len(a) < 3:
        return math.nan
    ranks_a, ranks_b = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    if ranks_a.std() == 0 or ranks_b.std() == 0:
        return math.nan
    return float(np.corrcoef(ranks_a, ranks_b)[0, 1])
