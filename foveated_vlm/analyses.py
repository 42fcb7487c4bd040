"""Research analyses over finished runs and precomputed scenes, as subcommands:

    python -m foveated_vlm.analyses compare outputs/research/*              # one table row per run, seeds pooled
    python -m foveated_vlm.analyses headroom TRAIN_DATASET EVAL_DATASET     # what knowing a cued scene's level is worth
    python -m foveated_vlm.analyses readout RUN_DIR [TRAIN_DATASET] [--eval_dataset EVAL]
        # what each pass's state knows, and the fixations the policy writes

Each prints its result (a Markdown table, or JSON) and writes nothing.
"""


import argparse
import json
import re
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from transformers.utils.logging import tqdm

from foveated_vlm import metrics
from foveated_vlm.data import (
    DATA_PATHS_FILE,
    FoveatedVLMDataCollator,
    batch_to_device,
    load_precomputed,
    model_inputs,
    recorded_data_paths,
)
from foveated_vlm.probes import from_pretrained_with_probes
from foveated_vlm.report import load_log_history, resolve_data_paths, saved_model_dir
from foveated_vlm.report_text import FoveatedVLMHeldOut, markdown_table
from foveated_vlm.teacher import pass2_fixations, pass2_queries
from processing_foveated import FoveatedVLMProcessor

__all__ = ["compare_runs", "cued_headroom", "state_readout", "main"]

# ---- Comparing runs ----

SEED_SUFFIX = re.compile(r"-seed\d+$")
# (column, FoveatedVLMHeldOut field): the same numbers as Tables 1 and 2, read the same way from eval_results.json.
COMPARE_COLUMNS = (
    ("loss_coarse", "loss_coarse"),
    ("loss_fine", "loss_fine"),
    ("improvement", "improvement"),
    ("improvement t≥2", "improvement_t2"),
    ("copy t≥2", "loss_copy_t2"),
    ("coarse t≥2", "loss_coarse_t2"),
    ("fine t≥2", "loss_fine_t2"),
    ("state contribution fine", "state_contribution_fine"),
    ("entropy Pass 1", "entropy_coarse"),
    ("entropy Pass 2", "entropy_fine"),
    ("Pass 2 on box", "tracking_fine"),
    ("Pass 1 on box", "tracking_coarse"),
    ("chance", "tracking_chance"),
    ("Pass 1 on frame-1 box", "tracking_coarse_first"),
)
PERCENT_COLUMNS = ("improvement", "improvement t≥2")


def compare_runs(run_dirs: list) -> str:
    """A Markdown table of finished runs' held-out metrics (eval_results.json), one row per run name; runs named
    `NAME-seedK` are pooled into one row as mean ± standard deviation over seeds (each seed's value in brackets
    for the improvements). The last column is the t ≥ 2 improvement at each logged evaluation (mean over seeds):
    whether the effect grows with training."""
    groups: dict[str, list[tuple[FoveatedVLMHeldOut, Optional[int], Optional[float]]]] = {}
    curves: dict[str, list[dict[int, float]]] = {}
    for run_dir in map(Path, run_dirs):
        results_path = run_dir / "eval_results.json"
        if not results_path.is_file():
            raise FileNotFoundError(f"{results_path} not found: is {run_dir} a finished train_hf.py run?")
        held_out = FoveatedVLMHeldOut.from_logged(json.loads(results_path.read_text()), str(results_path))
        log_history, state, _ = load_log_history(run_dir)
        runtimes = [entry["train_runtime"] for entry in log_history if "train_runtime" in entry]
        steps = state.get("global_step") if state else None
        name = SEED_SUFFIX.sub("", run_dir.name)
        groups.setdefault(name, []).append((held_out, steps, runtimes[-1] if runtimes else None))
        curve = {e["step"]: e["eval_improvement_t2"] for e in log_history if "eval_improvement_t2" in e}
        curves.setdefault(name, []).append(curve)

    def cell(runs: list[FoveatedVLMHeldOut], name: str, percent: bool) -> str:
        values = np.array([getattr(run, name) for run in runs if getattr(run, name) is not None], dtype=float)
        if not len(values):
            return "-"
        scale, fmt = (100, "{:+.2f} %") if percent else (1, "{:.4f}")
        text = fmt.format(scale * values.mean())
        if len(values) > 1:
            text += f" ± {scale * values.std(ddof=1):.2f}" if percent else f" ± {values.std(ddof=1):.4f}"
            if percent:
                text += " (" + ", ".join(f"{scale * value:+.2f}" for value in values) + ")"
        return text

    rows = []
    for name, runs in groups.items():
        steps = sorted({steps for _, steps, _ in runs if steps is not None})
        seconds = [seconds for _, _, seconds in runs if seconds is not None]
        row = [name, str(len(runs)), "/".join(map(str, steps)) or "-", f"{np.mean(seconds):.0f}" if seconds else "-"]
        row += [cell([run for run, _, _ in runs], key, column in PERCENT_COLUMNS) for column, key in COMPARE_COLUMNS]
        shared_steps = sorted(set.intersection(*(set(curve) for curve in curves[name])))
        means = [np.mean([curve[step] for curve in curves[name]]) for step in shared_steps]
        row.append(" / ".join(f"{100 * value:+.1f}" for value in means) or "-")
        rows.append(row)
    header = ["run", "seeds", "steps", "train s"] + [column for column, _ in COMPARE_COLUMNS]
    return markdown_table(header + ["improvement t≥2 (%) by evaluation"], rows)


def _sidecar_levels(video_path: str, frame_indices) -> Optional[list[int]]:
    """Each sampled frame's background level index from a cued clip's ground-truth sidecar `<stem>.json`; None for a
    clip without a sidecar or whose sidecar has no levels (not a cued clip)."""
    sidecar_path = Path(video_path).with_suffix(".json")
    if not sidecar_path.is_file():
        return None
    sidecar_frames = json.loads(sidecar_path.read_text())["frames"]
    if "level" not in sidecar_frames[0]:
        return None
    return [sidecar_frames[int(i)]["level"] for i in frame_indices]


def cued_headroom(train_dataset: str, eval_dataset: str) -> dict[str, float]:
    """`metrics.level_headroom` of two precomputed splits of cued clips (`load_precomputed` paths), with
    each sampled frame's background level read from the video's ground-truth sidecar."""

    def latents_and_levels(path: str) -> tuple[np.ndarray, np.ndarray]:
        columns = load_precomputed(path).with_format("numpy").select_columns(
            ["video_path", "frame_indices", "vae_latents"]
        )[:]
        levels = []
        for video_path, frame_indices in zip(columns["video_path"], columns["frame_indices"]):
            clip_levels = _sidecar_levels(video_path, frame_indices)
            if clip_levels is None:
                sidecar_path = Path(video_path).with_suffix(".json")
                raise ValueError(f"{sidecar_path} has no background levels: is {path} a cued split?")
            levels.append(clip_levels)
        return columns["vae_latents"], np.array(levels)

    return metrics.level_headroom(*latents_and_levels(train_dataset), *latents_and_levels(eval_dataset))


@torch.no_grad()
def _readout_samples(model, path, collator, batch_size: int, device) -> dict:
    """Each clip's LLM states at targets t = 1..T-1 (0-based: the state that has read frames < t and predicts latent
    t; t = 0 has read no frame) with what frame t needs: {"coarse", "fine": (M, E), "target", "cued"}. The target is
    frame t's background level index (M,) where every clip's sidecar has levels (a cued split), else the centre
    (x, y) (M, 2) of frame t's first moving box; targets without a box are left out.

    Per clip as well, for the place readout: {"coarse_by_frame", "fine_by_frame": (C, T, E), "place": (C, T, 2) the
    first box's centre in each frame (the cued target, the mover), "place_present": (C, T) bool}."""
    dataset = load_precomputed(path)
    frame_indices = dataset.select_columns(["frame_indices"]).with_format("numpy")["frame_indices"]
    levels = [_sidecar_levels(video, indices) for video, indices in zip(dataset["video_path"], frame_indices)]
    cued = all(clip is not None for clip in levels)
    if not cued and any(clip is not None for clip in levels):
        raise ValueError(f"only some clips of {path} have background levels in their sidecars")
    samples = {"coarse": [], "fine": [], "target": [], "coarse_by_frame": [], "fine_by_frame": [], "place": [],
               "place_present": [], "queries": []}
    model.eval()
    for start in tqdm(range(0, len(dataset), batch_size), desc=f"readout: {Path(path).name}", unit="batch"):
        rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        batch = batch_to_device(collator(rows), device)
        inputs = model_inputs(batch, model)
        inputs.pop("vae_latents", None)  # the states alone: no head pass
        outputs = model(**inputs)
        states = {name: getattr(outputs, f"state_{name}").float().cpu() for name in ("coarse", "fine")}  # (B, T, E)
        first_box = batch["moving_boxes"][:, :, 0].cpu()  # (B, T, 4) xyxy
        for name, state in states.items():
            samples[f"{name}_by_frame"].append(state)
        samples["place"].append((first_box[..., :2] + first_box[..., 2:]) / 2)  # (B, T, 2)
        samples["place_present"].append(metrics.box_present(first_box))  # (B, T)
        samples["queries"].append(outputs.queries.float().cpu())  # (B, T, Q)
        if cued:
            target = torch.tensor(levels[start : start + len(rows)])  # (B, T)
            keep = torch.ones(target.shape, dtype=torch.bool)
        else:
            target = samples["place"][-1]  # (B, T, 2)
            keep = samples["place_present"][-1].clone()  # (B, T)
        keep[:, 0] = False
        for name, state in states.items():
            samples[name].append(state[keep])  # (B, T, E) -> (n, E)
        samples["target"].append(target[keep])
    samples = {name: torch.cat(parts).numpy() for name, parts in samples.items()}
    if not len(samples["target"]):
        raise ValueError(f"no clip of {path} has a moving box at frames 1..T-1: nothing to read out")
    return {**samples, "cued": cued}


def _place_by_frame(train: dict, held_out: dict, name: str) -> list[Optional[float]]:
    """Held-out R² of the first box's centre in frame t from pass `name`'s state at t, one ridge per t = 1..T-1
    (None where fewer than two clips of a split have the box): whether the LLM keeps *where* as frames go by."""
    scores = []
    for t in range(1, train["place"].shape[1]):
        fit, score = train["place_present"][:, t], held_out["place_present"][:, t]
        if fit.sum() < 2 or score.sum() < 2:
            scores.append(None)
            continue
        features = (train[f"{name}_by_frame"][fit, t], held_out[f"{name}_by_frame"][score, t])
        readout = metrics.linear_readout(features[0], train["place"][fit, t], features[1],
                                                  held_out["place"][score, t])  # fmt: skip
        scores.append(readout["r2"])
    return scores


def _policy_fixations(model, held_out: dict) -> Optional[dict]:
    """What the policy's own fixations are on held-out clips (None for a model without fixations): the mean log sigma
    and L1 distance from the first box's centre (in [-1, 1] frame coordinates) of the fixations the first fine pass
    reads frames 1..T-1 with (written by Pass 1's queries) and, with saccades, the mean size of the first move and
    of the later ones ("stay" is the zero move) and the share of running-sum coordinates beyond 2 (the sum starts
    from q_init's move), where tanh's slope is under 0.07 and the place barely moves with the query."""
    if not model.config.fixation_bias:
        return None
    queries = torch.from_numpy(held_out["queries"]).to(model.device)  # (C, T, Q): Pass 1's, q_t written after frame t
    # The box centre (x, y) in [0, 1] -> a fixation's (y, x) in [-1, 1].
    place = torch.from_numpy(held_out["place"][:, 1:, ::-1].copy()) * 2 - 1  # (C, T-1, 2)
    present = torch.from_numpy(held_out["place_present"][:, 1:])  # (C, T-1)
    summary = {}
    with torch.no_grad():
        fixations = pass2_fixations(model, queries)[:, 1:].float().cpu()  # (C, T-1, 3): those of frames 1..T-1
        if model.config.fixation_mode == "saccade":
            # q_init's move, then the policy's: their running sum is what frames 0..T-1 are read at.
            moves = model.encoder.fixation_proj(pass2_queries(model, queries)).float()[..., :2].cpu()  # (C, T, 2)
            summary = {"first_move": moves[:, 1].abs().mean().item(), "later_moves": moves[:, 2:].abs().mean().item(),
                       "saturated": (moves.cumsum(1)[:, 1:].abs() > 2).float().mean().item()}
    error = (fixations[..., :2] - place).abs().sum(-1)[present]
    return {"log_sigma": fixations[..., 2].mean().item(),
            "fixation_error": error.mean().item() if len(error) else None, **summary}


def state_readout(run_dir, train_dataset=None, eval_dataset=None, batch_size: int = 16, device="cpu") -> dict:
    """What a linear readout of each pass's LLM state recovers, on held-out clips, of what the next frame needs
    (docs/DESIGN.md's conditions): `metrics.linear_readout` fitted on the training split's states, scored on
    the held-out split's, for Pass 1 (`state_coarse`) and Pass 2 (`state_fine`) apart.

    On a cued split the quantity is frame t's background level, set by the target's cue in frame t-1 (classification
    accuracy, with chance); on a mover split the centre of frame t's first moving box (held-out R²). A Pass 1 that
    already holds it leaves a glimpse nothing to add. The run's model is read with its probes (an oracle run with
    oracle fixations) and its captions where it trained on them.

    The place readout asks the link before that: from the state at each t, the held-out R² of where the first box
    is in frame t (on a cued split the marked target, which does not move; on a mover split the mover). A state
    after frame 0 that holds the target's place, and a state a few frames later that has lost it, is the break
    docs/RESULTS.md's calibration found in a small LLM trained from scratch.

    Args:
        run_dir: a train_hf.py output_dir (its final model, else its last checkpoint's).
        train_dataset, eval_dataset: `load_precomputed` paths; both default to the splits the run recorded in
            DATA_PATHS_FILE.

    Returns:
        {"quantity": "next level" | "mover centre", "metric": "accuracy" | "r2", "coarse", "fine", "chance"
        (classification only), "num_train", "num_eval" ((clip, target) samples), "place_by_frame": {"coarse",
        "fine": [R² at t = 1..T-1]}, "policy" (`_policy_fixations`: the fixations the policy writes), "eval_dataset"}.
    """
    run_dir = Path(run_dir)
    model_dir = saved_model_dir(run_dir)
    if model_dir is None:
        raise FileNotFoundError(f"no saved model (config.json) in {run_dir} or its checkpoints")
    eval_dataset, _, use_captions, _ = resolve_data_paths(run_dir, eval_dataset, None)
    if eval_dataset is None:
        raise ValueError(f"no held-out dataset: pass eval_dataset ({run_dir / DATA_PATHS_FILE} names none)")
    train_dataset = train_dataset or recorded_data_paths(run_dir).get("train_dataset")
    if train_dataset is None:
        raise ValueError(f"no training split: pass train_dataset ({run_dir / DATA_PATHS_FILE} names none)")
    model = from_pretrained_with_probes(str(model_dir)).to(device)
    tokenizer = None  # the clips are read as the run read them
    if use_captions:
        tokenizer = FoveatedVLMProcessor.from_pretrained(model_dir, trust_remote_code=True).tokenizer
    collator = FoveatedVLMDataCollator(tokenizer)
    train = _readout_samples(model, train_dataset, collator, batch_size, device)
    held_out = _readout_samples(model, eval_dataset, collator, batch_size, device)
    if train["cued"] != held_out["cued"]:
        kind_of = lambda samples: "cued" if samples["cued"] else "no levels"  # noqa: E731
        raise ValueError(
            f"{train_dataset} ({kind_of(train)}) and {eval_dataset} ({kind_of(held_out)}) are not the same kind of "
            "split. A cued clip's levels are read from the sidecar beside its video (the `video_path` column): a "
            "cache whose videos have moved reads as no levels"
        )
    kind = "classification" if train["cued"] else "regression"
    metric = "accuracy" if train["cued"] else "r2"
    scores = {
        name: metrics.linear_readout(train[name], train["target"], held_out[name], held_out["target"], kind)
        for name in ("coarse", "fine")
    }
    result = {"quantity": "next level" if train["cued"] else "mover centre", "metric": metric}
    result.update({name: score[metric] for name, score in scores.items()})
    if train["cued"]:
        result["chance"] = scores["coarse"]["chance"]
    place = {name: _place_by_frame(train, held_out, name) for name in ("coarse", "fine")}
    return {**result, "num_train": len(train["target"]), "num_eval": len(held_out["target"]),
            "place_by_frame": place, "policy": _policy_fixations(model, held_out), "eval_dataset": str(eval_dataset)}


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    compare = commands.add_parser("compare", help="A table of finished runs' held-out metrics, seeds pooled.")
    compare.add_argument("runs", nargs="+", help="train_hf.py output_dirs; NAME-seedK ones are pooled.")
    headroom = commands.add_parser(
        "headroom", help="What knowing the next level is worth on a cued scene (metrics.level_headroom)."
    )
    headroom.add_argument("train_dataset", help="The scene's precomputed training split.")
    headroom.add_argument("eval_dataset", help="The scene's precomputed held-out split.")
    readout = commands.add_parser(
        "readout",
        help="What a linear readout of each pass's LLM state recovers on held-out clips, and the fixations the policy "
        "writes there (state_readout).",
    )
    readout.add_argument("run_dir", help="A finished train_hf.py output_dir.")
    readout.add_argument(
        "train_dataset", nargs="?",
        help=f"The precomputed training split the readouts are fitted on; default: the run's {DATA_PATHS_FILE}.",
    )
    readout.add_argument("--eval_dataset", help=f"Held-out split; default: the run's {DATA_PATHS_FILE}.")
    readout.add_argument("--batch_size", type=int, default=16, help="Clips per forward.")
    readout.add_argument("--device", default="cpu", help="torch device for the model.")
    args = parser.parse_args(argv)
    if args.command == "compare":
        print(compare_runs(args.runs))
    elif args.command == "headroom":
        print(json.dumps(cued_headroom(args.train_dataset, args.eval_dataset), indent=1))
    else:
        result = state_readout(args.run_dir, args.train_dataset, args.eval_dataset, args.batch_size, args.device)
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
