"""Every metric of the Foveated VLM, one definition each, used by the trainer's logging and by the report."""

import math

__all__ = ["derived_metrics"]


def derived_metrics(means: dict[str, float]) -> dict[str, float]:
    """`loss/ratio` = coarse / fine (> 1: foveation helps) and `improvement` = (coarse - fine) / coarse, the seed's
    success metric, from MEAN losses: a mean of per-batch ratios would weight noisy batches differently."""
    if "loss/fine" not in means or "loss/coarse" not in means:
        return {}
    fine, coarse = means["loss/fine"], means["loss/coarse"]
    derived = {
        "loss/ratio": coarse / fine if fine > 0 else math.inf,
        "improvement": (coarse - fine) / coarse if coarse > 0 else 0.0,
    }
    if means.get("loss/coarse_t2", 0) > 0:
        derived["improvement_t2"] = (means["loss/coarse_t2"] - means["loss/fine_t2"]) / means["loss/coarse_t2"]
    return derived
