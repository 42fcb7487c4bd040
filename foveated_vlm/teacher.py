"""A search teacher for Pass 2: where to look, learned by trying glimpses and keeping what predicts best.

Training only; nothing here is part of a checkpoint. Plain backpropagation through a soft glimpse does not find a small
target (docs/RESULTS.md): a glimpse pays only once it sits on the target, so the first gradient towards it is near zero.
The teacher turns *where to look* into a supervised problem without ground truth, as search-supervised glimpse
policies do (Harvey et al. 2019; Saccader's location pretraining; annealed multiple-choice learning):

1. **Search.** K candidate glimpses: narrow fixations on the centres of a grid of cells, each with `q_init`'s query
   vector, scored by the model's own next-latent loss (no box, cue or sidecar is read). `teacher_search="frame"`: a
   candidate reads one frame t in place of Pass 2's token of frame t, and the state after it predicts latent t+1. A
   candidate at frame t changes only the states from t on, so every candidate branches off the shared Pass-2 prefix
   (tokens of frames < t) in one LLM call with a block mask, instead of re-running the pass. `"stay"`: a candidate is
   a place held in every frame (the saccades' zero move), Pass 2 re-run there, scored over the clip's targets. With
   `teacher_scorer` a frozen saved model (a first stage) scores them instead, so that the scorer cannot drift while the
   policy learns to follow it (docs/RESULTS.md, "A second stage"); its scores depend on the clip alone, so it searches
   each clip once.
2. **Posterior and candidate training.** The candidates' posterior is a softmax of their negative scores (losses
   relative to their mean, or standardised over the candidates), at a temperature annealed from broad to sharp over
   training. The LLM, head and query path also train on a few candidates per frame, so that the head learns what a
   glimpse on each cell is worth before the policy looks there. Drawn from the posterior
   (`teacher_wta_sampling="posterior"`, the soft winner-takes-all of multiple-choice learning) they let the teacher's
   hindsight choose which candidate trains on the very targets it was chosen by: the candidates specialise on
   different guesses, and the best one wins whether or not it is on the target (measured in docs/RESULTS.md). Drawn
   uniformly, or from the posterior of other targets than those they train on (`"held_out"`), they do not.
3. **Distillation.** Pass 2's own glimpse of frame t (its attention mass per cell) is pulled towards the posterior by
   cross-entropy, so queries that select by content learn as well as those that select by place.
4. **The first glance.** Pass 1's static glimpse of frame t-1 (`stay`: of frame 1) is pulled towards the posterior:
   what the teacher finds worth reading is what the static read before it must have seen for the LLM to aim there.

The ablation `teacher_search="gumbel"` replaces the search: a straight-through Gumbel-softmax draw of one cell from
Pass 2's own glimpse mass per cell is read narrowly in place of Pass 2's token, and its next-latent loss trains the
policy through the draw (Jang et al. 2017); it has no posterior to distil.

`loss_fine` stays Pass 2 reading with the policy's own queries; evaluation and streaming use the policy alone.
"""

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

from modeling_foveated import FoveatedVLMModel, FoveatedVLMOutput, _position_ids

__all__ = [
    "TEACHER_FILE",
    "FoveatedVLMSearchTeacher",
    "FoveatedVLMTeacherArguments",
    "FoveatedVLMTeacherOutput",
    "load_teacher_settings",
    "branch_states",
    "cell_mass",
    "clip_keys",
    "later_moves",
    "pass2_fixations",
    "pass2_queries",
]

WTA_SAMPLING = ("uniform", "posterior", "held_out")
TEACHER_SEARCHES = ("frame", "stay", "gumbel")
TEACHER_SCORES = ("relative", "standardized")
DISTILL_TARGETS = ("mass", "position", "fixation")
DISTILL_DISTANCES = ("squared", "absolute")
DISTILL_PLACES = ("mean", "best")
# The teacher's settings as saved beside a model trained with it (the report and the card read them).
TEACHER_FILE = "teacher.json"
# Settings renamed in a release, as teacher.json files written before it name them.
RENAMED_SETTINGS = {"teacher_static_weight": "teacher_first_glance_weight"}


@dataclass
class FoveatedVLMTeacherArguments:
    """The search teacher's settings (`train_hf.py` flags; off by default)."""

    teacher: bool = field(default=False, metadata={"help": "Train Pass 2's policy with the search teacher."})
    teacher_grid: int = field(
        default=4,
        metadata={"help": "Candidate cells per side (K = grid^2 candidate glimpses per frame); must divide the "
        "patches per side."},
    )
    teacher_log_sigma: Optional[float] = field(
        default=None, metadata={"help": "log sigma of a candidate's fixation, in half-widths; default log(1 / grid)."}
    )
    teacher_frames: int = field(
        default=0,
        metadata={"help": "frame search: frames scored per clip and step, drawn at random; 0: every frame with a next "
        "latent."},
    )
    teacher_samples: int = field(
        default=2, metadata={"help": "Candidates per scored frame drawn for the winner-takes-all term."}
    )
    teacher_search: str = field(
        default="stay",
        metadata={
            "help": "What a candidate is: frame (a glimpse of one frame, branched off Pass 2's own earlier tokens; a "
            "posterior per frame) or stay (a place held in every frame, Pass 2 re-run there: the saccades' zero move; "
            "one posterior per clip from its mean loss, and the first-glance term on Pass 1's glimpse of frame 1), or "
            "gumbel (the ablation without a teacher: a straight-through Gumbel-softmax draw of one cell from Pass 2's "
            "own glimpse mass per cell, read narrowly in place of Pass 2's token, its next-latent loss weighted by "
            "teacher_wta_weight at the annealed temperature; no search, so no distillation or first-glance term).",
            "choices": TEACHER_SEARCHES,
        },
    )
    teacher_scores: str = field(
        default="standardized",
        metadata={
            "help": "What the posterior's softmax reads: relative (losses over their mean over candidates) or "
            "standardized (losses standardised over candidates).",
            "choices": TEACHER_SCORES,
        },
    )
    teacher_wta_sampling: str = field(
        default="held_out",
        metadata={
            "help": "How the winner-takes-all term draws its candidates: uniform (every cell alike: the head learns "
            "what each glimpse is worth), posterior (the soft winner-takes-all proper, which the teacher's "
            "hindsight turns into multiple-choice learning: the candidates specialise on guesses and the best one "
            "wins without being on the target; docs/RESULTS.md) or held_out (from the posterior of other targets "
            "than those the candidate then trains on).",
            "choices": WTA_SAMPLING,
        },
    )
    teacher_temperature_start: float = field(
        default=3.0, metadata={"help": "Posterior temperature at step 0, on the scores of teacher_scores."}
    )
    teacher_temperature_end: float = field(
        default=0.3, metadata={"help": "Posterior temperature at the last step (annealed geometrically)."}
    )
    teacher_wta_weight: float = field(default=1.0, metadata={"help": "Weight of the soft winner-takes-all term."})
    teacher_wta_until: float = field(
        default=1.0,
        metadata={"help": "Share of training after which the search's winner-takes-all term stops (1: throughout). It "
        "trains the scorer; kept on, it slows the policy's second link (docs/RESULTS.md), and it is half the teacher's "
        "cost. The gumbel ablation's one term is not affected."},
    )
    teacher_distill_weight: float = field(
        default=1.0, metadata={"help": "Weight of distilling the posterior into Pass 2's glimpse (0: off)."}
    )
    teacher_first_glance_weight: float = field(
        default=1.0,
        metadata={"help": "Weight of pulling Pass 1's static glimpse of frame t-1 towards the posterior of frame t "
        "(the first-glance signal; 0: off)."},
    )
    teacher_move_weight: float = field(
        default=0.0,
        metadata={"help": "With saccade fixations, weight of an L1 cost on the policy's later moves (every move "
        "after the first; 0: off). 'Stay' is the zero move: a policy that writes about the same move after every "
        "frame drifts off what it found and onto tanh's flat tails, where no distillation moves it (docs/RESULTS.md). "
        "The cost reads only the policy's own queries."},
    )
    teacher_distill_target: str = field(
        default="mass",
        metadata={
            "help": "What the distillation and first-glance terms match: 'mass' (cross-entropy of the glimpse's "
            "attention mass per cell against the posterior; selects by content or by place), 'position' (squared "
            "distance of the glimpse's attention-weighted position from the posterior's mean cell centre; the "
            "calibration probes' loss, with the teacher's place instead of the box's) or 'fixation' (the distance of "
            "the fixation the policy writes, its centre and log sigma, from the teacher's candidate: its gradient "
            "does not fade while the fixation is broad, where moving a flat bias barely moves the glimpse; the "
            "first-glance term then matches the static glimpse's position, the static query having one fixation for "
            "every frame; needs fixations and teacher_distill_from_frame 1).",
            "choices": DISTILL_TARGETS,
        },
    )

    teacher_distill_distance: str = field(
        default="squared",
        metadata={
            "help": "With teacher_distill_target position or fixation, the distance: squared, or absolute (|dy| + "
            "|dx|, whose minimiser over the teacher's places is their median: the clips it misses do not pull the "
            "policy off the others; docs/RESULTS.md).",
            "choices": DISTILL_DISTANCES,
        },
    )
    teacher_distill_place: str = field(
        default="mean",
        metadata={
            "help": "With teacher_distill_target position or fixation, the teacher's place: mean (the posterior's "
            "mean cell centre, drawn towards the other cells by the posterior's spread) or best (the centre of its "
            "most probable cell).",
            "choices": DISTILL_PLACES,
        },
    )

    teacher_distill_from_frame: int = field(
        default=0,
        metadata={"help": "The first frame whose Pass-2 glimpse is distilled. 0: every scored frame, including "
        "frame 0, which Pass 2 reads with q_init before anything is seen, so no policy can aim it; 1: only the "
        "glimpses the policy writes, as the calibration probes supervise them (stay: frames 1..T-1 towards the "
        "clip's place)."},
    )

    teacher_confident_share: float = field(
        default=1.0,
        metadata={"help": "Share of each batch's clips that the distillation and first-glance terms train on: those "
        "whose search gain (teacher/search_gain, read without ground truth) is highest. A scorer right in a part of "
        "the clips is right more often where its best place beats the others most (docs/RESULTS.md); 1: every clip."},
    )

    teacher_scorer: Optional[str] = field(
        default=None,
        metadata={"help": "A saved FoveatedVLM folder (e.g. an earlier run with the teacher) that scores the "
        "candidates, frozen, instead of the model in training: its posterior then stays as right as it was while "
        "the policy learns to follow it (docs/RESULTS.md). None: the model in training scores them."},
    )

    def __post_init__(self):
        for name, choices in (("teacher_distill_distance", DISTILL_DISTANCES),
                              ("teacher_distill_place", DISTILL_PLACES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}={getattr(self, name)!r} must be one of {choices}")
        for name in ("teacher_grid", "teacher_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.teacher_scorer and self.teacher_search == "gumbel":
            raise ValueError("teacher_scorer scores a search's candidates; teacher_search='gumbel' has no search")
        if self.teacher_distill_from_frame not in (0, 1):
            raise ValueError(f"teacher_distill_from_frame={self.teacher_distill_from_frame} must be 0 or 1")
        if self.teacher_frames < 0:
            raise ValueError(f"teacher_frames={self.teacher_frames} must be >= 0 (0: every frame)")
        for name in ("teacher_temperature_start", "teacher_temperature_end"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if self.teacher_search not in TEACHER_SEARCHES:
            raise ValueError(f"teacher_search={self.teacher_search!r} must be one of {TEACHER_SEARCHES}")
        if self.teacher_scores not in TEACHER_SCORES:
            raise ValueError(f"teacher_scores={self.teacher_scores!r} must be one of {TEACHER_SCORES}")
        if self.teacher_distill_target not in DISTILL_TARGETS:
            raise ValueError(f"teacher_distill_target={self.teacher_distill_target!r} must be one of {DISTILL_TARGETS}")
        if self.teacher_distill_target == "fixation" and self.teacher_distill_from_frame != 1:
            raise ValueError("teacher_distill_target='fixation' distils the fixations the policy writes: it needs "
                             "teacher_distill_from_frame=1 (frame 0 is read by q_init, before anything is seen)")
        if self.teacher_wta_sampling not in WTA_SAMPLING:
            raise ValueError(f"teacher_wta_sampling={self.teacher_wta_sampling!r} must be one of {WTA_SAMPLING}")
        if not 0 <= self.teacher_wta_until <= 1:
            raise ValueError(f"teacher_wta_until={self.teacher_wta_until} must lie in [0, 1] (a share of training)")
        if not 0 < self.teacher_confident_share <= 1:
            raise ValueError(f"teacher_confident_share={self.teacher_confident_share} must lie in (0, 1] (a share of "
                             "each batch's clips)")
        for name in ("teacher_wta_weight", "teacher_distill_weight", "teacher_first_glance_weight",
                     "teacher_move_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")

    def to_dict(self) -> dict:
        return asdict(self)


def load_teacher_settings(path) -> dict:
    """A run's teacher.json, its settings under today's names (`RENAMED_SETTINGS`)."""
    settings = json.loads(Path(path).read_text())
    return {RENAMED_SETTINGS.get(name, name): value for name, value in settings.items()}


@dataclass
class FoveatedVLMTeacherOutput:
    """What one teacher call found and what it adds to the loss.

    loss: the weighted sum of the terms below, or None outside training.
    frames: (B, F) indices t of the scored frames (each predicts latent t+1).
    posterior: (B, F, K) the candidates' posterior over the grid's cells, row-major like the patches.
    metrics: per-clip values (B,) for the trainer's logs, `teacher/...`.
    """

    loss: Optional[torch.Tensor]
    frames: torch.Tensor
    posterior: torch.Tensor
    metrics: dict


def cell_mass(attention: torch.Tensor, grid: int) -> torch.Tensor:
    """Attention over a square of patches (..., P) -> its mass per cell of a grid x grid split (..., grid^2),
    row-major."""
    side = math.isqrt(attention.shape[-1])
    block = side // grid
    cells = attention.reshape(*attention.shape[:-1], grid, block, grid, block)  # (..., gy, by, gx, bx)
    return cells.sum(dim=(-3, -1)).flatten(-2)


def pass2_queries(model: FoveatedVLMModel, queries: torch.Tensor) -> torch.Tensor:
    """The queries `(B, T, Q)` that Pass 2 reads frames 0..T-1 with, from Pass 1's `(B, T, Q)`: `q_init` for frame 0,
    then the query written after frame t-1 for frame t (the model's forward shifts them the same way)."""
    first = model.q_init.expand(queries.shape[0], 1, -1).to(queries.dtype)
    return torch.cat([first, queries[:, :-1]], dim=1)


def pass2_fixations(model: FoveatedVLMModel, queries: torch.Tensor) -> torch.Tensor:
    """The fixations `(B, T, 3)` as (y, x, log sigma) that Pass 2 reads frames 0..T-1 with, from Pass 1's queries
    `(B, T, Q)`, as the design's fine reader works them out from `pass2_queries` (with saccades, `q_init`'s move
    starts the running sum)."""
    shifted = pass2_queries(model, queries)  # (B, T, Q)
    if model.config.fixation_mode == "saccade":
        return model.encoder.saccade_fixations(shifted)[0]
    return model.encoder.fixation(shifted)


def later_moves(model: FoveatedVLMModel, queries: torch.Tensor) -> torch.Tensor:
    """Per clip (B,): the mean L1 size of the saccades' later moves, those of the queries `(B, T, Q)` written after
    frames 1..T-2 (the query after frame 0 writes the first move; the one after frame T-1 reads no frame)."""
    moves = model.encoder.fixation_proj(queries[:, 1:-1]).float()[..., :2]  # (B, T-2, 2)
    return moves.abs().sum(-1).mean(1)


class FoveatedVLMSearchTeacher:
    """The search teacher (module docstring). Call it on a model's output made with `output_patch_cache=True`."""

    def __init__(self, args: FoveatedVLMTeacherArguments):
        self.args = args
        self.scorer = None
        if args.teacher_scorer:
            try:
                self.scorer = FoveatedVLMModel.from_pretrained(args.teacher_scorer)
            except (OSError, ValueError) as error:
                raise ValueError(f"teacher_scorer={args.teacher_scorer!r} is not a saved FoveatedVLM model: "
                                 f"{error}") from error
            # Frozen: no gradient, no dropout, never saved with the model it teaches.
            self.scorer.eval().requires_grad_(False)
            # It runs the head once per candidate; channels-last convolutions halve its search on a CPU
            # (benchmarks/bench_model.py --tables teacher). train_hf.py's `channels_last_head` is about trained
            # parameters (DeepSpeed needs them contiguous); a frozen copy outside the optimizer can always take it.
            self.scorer.prediction_head.to(memory_format=torch.channels_last)
        # A frozen scorer's candidate losses depend on the clip alone, so each clip is searched once, in every frame,
        # and its losses (T - 1, K) kept on the CPU under the clip's key (`clip_keys`): from the second epoch on the
        # search costs nothing (a frozen stage 2's step then costs about a plain step; docs/RESULTS.md).
        self.scored_clips: dict[bytes, torch.Tensor] = {}

    def frozen_search(self, scorer_inputs: dict, cells: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """The frozen scorer's losses (B, F, K) of the candidates `cells` (K, 3) at `frames` (B, F), from the model
        inputs the trained model got: looked up per clip, the scorer run only on the clips it has not searched."""
        # A probed reader's ground truth (`reader_kwargs`) is the trained model's; the scorer reads the design's way.
        inputs = {name: value for name, value in scorer_inputs.items() if name != "reader_kwargs"}
        vae_latents = inputs["vae_latents"]
        (B, T), K, device = vae_latents.shape[:2], cells.shape[0], vae_latents.device
        # The keys are read on the host: one small copy per step (the latents and a pixel subsample), where the
        # search it replaces runs Pass 2 once per candidate.
        keys = clip_keys(inputs)
        first_rows = {}
        for row, key in enumerate(keys):
            first_rows.setdefault(key, row)
        new = [row for key, row in first_rows.items() if key not in self.scored_clips]  # rows of unsearched clips
        if new:
            if self.scorer.device != device:
                self.scorer.to(device)
            rows = torch.tensor(new, device=device)
            subset = {name: value[rows] if torch.is_tensor(value) and value.shape[:1] == (B,) else value
                      for name, value in inputs.items()}
            every = torch.arange(T - 1, device=device).expand(len(new), T - 1)  # (N, T - 1)
            with torch.no_grad():
                outputs = self.scorer(**subset, output_patch_cache=True)
                search = (self.scorer, outputs, subset["vae_latents"], subset.get("input_ids"),
                          subset.get("attention_mask"))
                losses = self.search_losses(search, cells, every).float().cpu()  # (N, T - 1, K)
            self.scored_clips.update({keys[row]: clip for row, clip in zip(new, losses)})
        losses = torch.stack([self.scored_clips[key] for key in keys]).to(device)  # (B, T - 1, K)
        return losses.gather(1, frames[..., None].expand(-1, -1, K))

    def search_losses(self, search: tuple, cells: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """(B, F, K): candidate k's loss on the target after frame t, searched with `search` = (model, its output,
        vae_latents, input_ids, attention_mask). `stay` scores every frame, so `frames` must be 0..T-2."""
        B, K = frames.shape[0], cells.shape[0]
        if self.args.teacher_search == "stay":
            return self.stay_losses(*search, cells.expand(B, K, 3)).transpose(1, 2)
        return self.candidate_losses(*search, frames, cells.expand(B, frames.shape[1], K, 3))

    def temperature(self, progress: float) -> float:
        """Geometric annealing from `teacher_temperature_start` (progress 0) to `teacher_temperature_end` (1)."""
        start, end = self.args.teacher_temperature_start, self.args.teacher_temperature_end
        return start * (end / start) ** min(max(progress, 0.0), 1.0)

    def posterior(self, losses: torch.Tensor, temperature: float) -> torch.Tensor:
        """Candidates' losses (..., K) -> their posterior (..., K): a softmax of the negative losses, relative to their
        mean (`teacher_scores="relative"`: the temperature does not depend on the loss's scale) or standardised over
        the candidates (`"standardized"`: nor on how much the candidates differ, so the best ones stand out as soon as
        any difference is consistent)."""
        if self.args.teacher_scores == "standardized":
            scores = (losses - losses.mean(-1, keepdim=True)) / losses.std(-1, keepdim=True).clamp_min(1e-12)
        else:
            scores = losses / losses.mean(-1, keepdim=True).clamp_min(1e-12)
        return (-scores / temperature).softmax(-1)

    def candidate_fixations(self, num_patches: int, device) -> torch.Tensor:
        """(K, 3): (y, x, log sigma) of a narrow fixation on the centre of each cell, row-major."""
        grid = self.args.teacher_grid
        side = math.isqrt(num_patches)
        if side % grid:
            raise ValueError(f"teacher_grid={grid} must divide the {side} patches per side of a frame")
        centres = (torch.arange(grid, device=device, dtype=torch.float32) * 2 + 1) / grid - 1  # (grid,)
        ys, xs = torch.meshgrid(centres, centres, indexing="ij")
        log_sigma = self.args.teacher_log_sigma
        log_sigma = math.log(1.0 / grid) if log_sigma is None else log_sigma
        return torch.stack([ys.flatten(), xs.flatten(), torch.full_like(ys.flatten(), log_sigma)], dim=-1)

    def __call__(
        self,
        model: FoveatedVLMModel,
        outputs: FoveatedVLMOutput,
        vae_latents: torch.Tensor,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        progress: float = 0.0,
        scorer_inputs: Optional[dict] = None,
    ) -> FoveatedVLMTeacherOutput:
        """
        Args:
            model: the unwrapped model that made `outputs`.
            outputs: its output with `output_patch_cache=True` on these inputs.
            vae_latents, input_ids, attention_mask: the same model inputs; the teacher reads nothing else.
            progress: the share of training done, for the temperature and `teacher_wta_until`.
            scorer_inputs: with `teacher_scorer`, the model inputs `model` got (`data.model_inputs`), which the frozen
                scorer reads (`frozen_search`).

        In training mode (`model.training`) it returns the loss terms; otherwise only the search and its metrics.
        """
        if outputs.patch_cache is None:
            raise ValueError("the search teacher needs the model's output made with output_patch_cache=True")
        args = self.args
        B, T = vae_latents.shape[:2]
        cells = self.candidate_fixations(outputs.attn_fine.shape[-1], vae_latents.device)  # (K, 3)
        K = cells.shape[0]
        temperature = self.temperature(progress)
        stay = args.teacher_search == "stay"
        inputs = (model, outputs, vae_latents, input_ids, attention_mask)
        if args.teacher_search == "gumbel":
            return self._gumbel(inputs, cells, temperature)
        if self.scorer is not None and scorer_inputs is None:
            raise ValueError("teacher_scorer is set: pass the model inputs as scorer_inputs, which the scorer reads")

        # Search: every candidate, without a graph, by the frozen scorer or the model in training (the candidate
        # training is always the latter's). losses (B, F, K): candidate k's loss on the target after frame t.
        every = torch.arange(T - 1, device=vae_latents.device).expand(B, T - 1)  # (B, T - 1)
        frames = every if stay else self._scored_frames(B, T, vae_latents.device)  # (B, F)
        if self.scorer is not None:
            losses = self.frozen_search(scorer_inputs, cells, frames)
        else:
            with torch.no_grad():
                losses = self.search_losses(inputs, cells, frames)
        if stay:
            # One place per clip: the posterior of the mean loss over the clip's targets, the same at every frame.
            posterior = self.posterior(losses.mean(1), temperature)[:, None].expand(-1, T - 1, -1)
        else:
            posterior = self.posterior(losses, temperature)  # (B, F, K)

        loss_best = losses.mean(1).min(-1).values if stay else losses.min(-1).values.mean(1)  # (B,)
        loss_mean = losses.mean((1, 2))  # (B,)
        metrics = {
            **_policy_metrics(outputs, vae_latents, frames, posterior, temperature),
            "teacher/loss_best": loss_best,
            "teacher/loss_mean": loss_mean,
            # How much the best place beats an average one, read without ground truth: a scorer that has not learned
            # what to read finds every place alike. On real video, where no box says whether its pick is right, this
            # is the readout of the scorer (on `cued` it tracks teacher/on_target, docs/RESULTS.md).
            "teacher/search_gain": 1 - loss_best / loss_mean.clamp_min(1e-12),
        }
        loss = None
        if model.training:
            terms = {}
            if args.teacher_wta_weight > 0 and progress < args.teacher_wta_until:
                terms["wta"] = self._candidate_training(inputs, cells, frames, losses, posterior, temperature)
            target_cells = posterior.detach()
            match = self._glimpse_match(model, cells)
            if args.teacher_distill_weight > 0:
                if args.teacher_distill_target == "fixation":
                    terms["distill"] = self._fixation_distillation(model, outputs.queries, cells, target_cells, frames)
                else:
                    terms["distill"] = self._distillation(match, target_cells, outputs.attn_fine, frames)
            if args.teacher_first_glance_weight > 0:
                if stay:
                    # The first glance: Pass 1's static glimpse of frame 1 towards the clip's place.
                    terms["first_glance"] = match(target_cells[:, 0], outputs.attn_coarse[:, 0])
                else:
                    # Pass 1's static glimpse of frame t-1, for the scored frames t >= 1.
                    earlier = (frames - 1).clamp_min(0)
                    per_frame = match(target_cells, _at_frames(outputs.attn_coarse, earlier))
                    terms["first_glance"] = _mean_where(per_frame, frames >= 1)
            if args.teacher_move_weight > 0:
                terms["move"] = later_moves(model, outputs.queries)
            if args.teacher_confident_share < 1:
                confident = confident_clips(metrics["teacher/search_gain"], args.teacher_confident_share)  # (B,)
                for name in ("distill", "first_glance"):
                    if name in terms:
                        # Renormalised so that the term's scale does not depend on the share kept.
                        terms[name] = terms[name] * confident * (B / confident.sum())
            weights = {"wta": args.teacher_wta_weight, "distill": args.teacher_distill_weight,
                       "first_glance": args.teacher_first_glance_weight, "move": args.teacher_move_weight}
            per_clip = sum(weights[name] * value for name, value in terms.items())
            loss = per_clip.mean() if terms else None
            metrics.update({f"teacher/{name}": value.detach() for name, value in terms.items()})
        return FoveatedVLMTeacherOutput(loss=loss, frames=frames, posterior=posterior, metrics=metrics)

    def _distillation(self, match, target_cells, attn_fine, frames) -> torch.Tensor:
        """Per clip (B,): the distance (`match`) of Pass 2's glimpses from the teacher's, mean over the distilled frames
        (`teacher_distill_from_frame`)."""
        stay = self.args.teacher_search == "stay"
        if not self.args.teacher_distill_from_frame:
            return match(target_cells, _at_frames(attn_fine, frames)).mean(1)
        if stay:  # one place per clip: Pass 2's glimpses of frames 1..T-1, each written by the policy
            return match(target_cells, attn_fine[:, 1:]).mean(1)
        # A frame search's frame 0 is q_init's read.
        return _mean_where(match(target_cells, _at_frames(attn_fine, frames)), frames >= 1)

    def _gumbel(self, inputs, cells, temperature) -> FoveatedVLMTeacherOutput:
        """The ablation without a search (`teacher_search="gumbel"`). Its "posterior" is the policy's own glimpse mass
        per cell, so `teacher/on_target` reads where the policy looks; there is nothing to distil."""
        model, outputs, vae_latents = inputs[:3]
        B, T = vae_latents.shape[:2]
        frames = self._scored_frames(B, T, vae_latents.device)  # (B, F)
        with torch.no_grad():
            mass = cell_mass(_at_frames(outputs.attn_fine, frames), self.args.teacher_grid).float()  # (B, F, K)
            metrics = _policy_metrics(outputs, vae_latents, frames, mass, temperature)
        loss = None
        if model.training and self.args.teacher_wta_weight > 0:
            per_clip = self.gumbel_losses(inputs, cells, frames, temperature).mean(1)  # (B,)
            loss = self.args.teacher_wta_weight * per_clip.mean()
            metrics["teacher/wta"] = per_clip.detach()
        return FoveatedVLMTeacherOutput(loss=loss, frames=frames, posterior=mass, metrics=metrics)

    def _fixation_distillation(self, model, queries, cells, target_cells, frames) -> torch.Tensor:
        """`teacher_distill_target="fixation"`, per clip (B,): the distance of the fixation (centre and log sigma) the
        policy wrote for each distilled frame t >= 1 from the teacher's candidate there, mean over those frames. With
        `fine_passes` > 1 these are the first fine pass's fixations, which Pass 1's queries write."""
        fixations = pass2_fixations(model, queries)  # (B, T, 3): frame 0's is q_init's, never distilled
        if self.args.teacher_search == "stay":
            written, keep = fixations[:, 1:], None  # (B, T - 1, 3): the posterior's frames 1..T-1
        else:
            written, keep = _at_frames(fixations, frames), frames >= 1  # (B, F, 3)
        best = self.args.teacher_distill_place == "best"
        place = cells[target_cells.argmax(-1), :2] if best else target_cells @ cells[:, :2]  # (B, F, 2)
        difference = torch.cat([written[..., :2] - place, written[..., 2:] - cells[0, 2]], dim=-1)  # (B, F, 3)
        per_frame = _distance(difference, self.args.teacher_distill_distance)  # (B, F)
        return per_frame.mean(1) if keep is None else _mean_where(per_frame, keep)

    def _glimpse_match(self, model, cells: torch.Tensor):
        """The distance of a glimpse from the teacher's, (posterior (..., K), glimpse attention (..., P)) -> (...), by
        `teacher_distill_target` (the first-glance term's, and the distillation's but for `fixation`)."""
        grid = self.args.teacher_grid
        if self.args.teacher_distill_target == "mass":
            return lambda posterior, attention: _cross_entropy(posterior, cell_mass(attention, grid))

        best = self.args.teacher_distill_place == "best"

        def position_distance(posterior, attention):
            place = cells[posterior.argmax(-1), :2] if best else posterior @ cells[:, :2]  # (..., 2)
            where = model.glimpse_summary(attention.reshape(-1, attention.shape[-1]))[:, :2]
            return _distance(where.view(place.shape) - place, self.args.teacher_distill_distance)

        return position_distance

    def _candidate_training(self, inputs, cells, frames, losses, posterior, temperature) -> torch.Tensor:
        """The candidates that train the LLM, head and query path, and their mean loss per clip (B,).

        `uniform`: any cell alike. `posterior`: drawn from the posterior (the soft winner-takes-all, as an estimate).
        `held_out`: drawn from the posterior of other targets than those they are trained on (stay: the clip's even
        and odd targets in turn; frame: the mean over the other scored frames), so that a candidate is not chosen
        because its guess happened to fit the very targets it then trains on."""
        args, (B, F_, K), S = self.args, losses.shape, self.args.teacher_samples
        stay = args.teacher_search == "stay"
        sampling = args.teacher_wta_sampling
        if stay:
            train_on = torch.ones(B, S, F_, device=losses.device)  # (B, S, F): which targets train each draw
            if sampling == "held_out":
                halves = [self.posterior(losses[:, half::2].mean(1), temperature) for half in (0, 1)]  # (B, K) each
                first = torch.multinomial(halves[0], (S + 1) // 2, replacement=True)  # trained on the odd targets
                second = torch.multinomial(halves[1], S // 2, replacement=True)  # trained on the even targets
                picks = torch.cat([first, second], dim=1)  # (B, S)
                parity = torch.arange(F_, device=losses.device) % 2
                train_on = torch.cat([(parity == 1).expand(B, first.shape[1], F_),
                                      (parity == 0).expand(B, second.shape[1], F_)], dim=1).float()
            else:
                drawn_from = posterior[:, 0] if sampling == "posterior" else torch.ones_like(posterior[:, 0])
                picks = torch.multinomial(drawn_from, S, replacement=True)  # (B, S)
            picked_losses = self.stay_losses(*inputs, cells[picks])  # (B, S, F)
            return (picked_losses * train_on).sum((1, 2)) / train_on.sum((1, 2)).clamp_min(1)
        if sampling == "held_out":
            others = (losses.sum(1, keepdim=True) - losses) / max(F_ - 1, 1)  # (B, F, K): the other frames' mean
            drawn_from = self.posterior(others, temperature)
        else:
            drawn_from = posterior if sampling == "posterior" else torch.ones_like(posterior)
        picks = torch.multinomial(drawn_from.reshape(B * F_, K), S, replacement=True)
        return self.candidate_losses(*inputs, frames, cells[picks].view(B, F_, S, 3)).mean((1, 2))

    def stay_losses(self, model, outputs, vae_latents, input_ids, attention_mask, fixations: torch.Tensor):
        """
        `teacher_search="stay"`: Pass 2 re-run with each candidate fixation held in every frame.

        fixations (B, M, 3) -> losses (B, M, T - 1) of predicting latents 2..T, each from the state after reading
        frames 1..t at that place (the first target is predicted before any frame is read and is left out).
        """
        B, T = vae_latents.shape[:2]
        M = fixations.shape[1]
        queries = model.q_init.expand(B * T, M, -1)  # (B*T, M, Q)
        held = fixations[:, None].expand(B, T, M, 3).reshape(B * T, M, 3)
        tokens, attention = model.encoder.query(queries, outputs.patch_cache, held)  # (B*T, M, D), (B*T, M, P)
        # (B*T, M, ...) -> (M*B*T, ...): M blocks of B clips, the head's layout.
        tokens = tokens.view(B, T, M, -1).permute(2, 0, 1, 3).reshape(M * B * T, -1)
        attention = attention.view(B, T, M, -1).permute(2, 0, 1, 3).reshape(M * B * T, -1)
        visual, _ = model._tokens_to_llm(tokens, attention, M * B, T)  # (M*B, T, E)
        text_embeds = model._embed_text(input_ids, B).repeat(M, 1, 1)
        text_mask = attention_mask.repeat(M, 1) if attention_mask is not None else None
        hidden = model.run_language_model(model.fine_token, visual, text_embeds, text_mask)  # (M*B, T + 1, E)
        prev = model.previous_latents(vae_latents)[:, 1:]  # (B, T - 1, C, h, w): latents 1..T-1
        predictions = model.predict_latents(hidden[:, 1:T], prev).float()  # (M*B, T - 1, C, h, w)
        predictions = predictions.view(M, B, T - 1, *predictions.shape[2:])
        losses = (predictions - vae_latents[None, :, 1:].float()).pow(2).flatten(3).mean(-1)  # (M, B, T - 1)
        return losses.permute(1, 0, 2)

    def _scored_frames(self, B: int, T: int, device) -> torch.Tensor:
        """(B, F): the frames t whose glimpse is searched, each with a next latent (t <= T - 2), in order."""
        every = T - 1
        count = self.args.teacher_frames or every
        if count >= every:
            return torch.arange(every, device=device).expand(B, every)
        return torch.rand(B, every, device=device).argsort(-1)[:, :count].sort(-1).values

    def candidate_losses(
        self, model, outputs, vae_latents, input_ids, attention_mask, frames: torch.Tensor, fixations: torch.Tensor
    ) -> torch.Tensor:
        """
        The next-latent MSE after Pass 2 reads frame t with each candidate fixation instead of its own query.

        frames (B, F) frame indices t <= T - 2; fixations (B, F, M, 3) -> losses (B, F, M) of predicting latent t+1
        from latent t and the state after the candidate's token, the Pass-2 tokens of frames < t before it.
        """
        candidates = self.candidate_tokens(model, outputs, frames, fixations)
        return self.branch_losses(model, outputs, vae_latents, input_ids, attention_mask, frames, candidates)

    def candidate_tokens(self, model, outputs, frames: torch.Tensor, fixations: torch.Tensor) -> torch.Tensor:
        """frames (B, F), fixations (B, F, M, 3) -> (B, F, M, E): the LLM inputs of q_init's glimpse of frame t with
        each fixation, made as Pass 2's own tokens are."""
        (B, F_, M), T = fixations.shape[:3], outputs.attn_fine.shape[1]
        cache = outputs.patch_cache
        rows = (torch.arange(B, device=frames.device)[:, None] * T + frames).flatten()  # (B*F,) rows of the cache
        frame_cache = type(cache)(
            patch_features=cache.patch_features[rows],
            layer_keys=tuple(key[rows] for key in cache.layer_keys),
            layer_values=tuple(value[rows] for value in cache.layer_values),
            final_features=cache.final_features[rows],
        )
        queries = model.q_init.expand(B * F_, M, -1)  # (B*F, M, Q)
        tokens, attention = model.encoder.query(queries, frame_cache, fixations.reshape(B * F_, M, 3))
        D = tokens.shape[-1]
        candidates, _ = model._tokens_to_llm(tokens.reshape(-1, D), attention.reshape(B * F_ * M, -1), B, F_ * M)
        return candidates.view(B, F_, M, -1)

    def branch_losses(
        self, model, outputs, vae_latents, input_ids, attention_mask, frames: torch.Tensor, candidates: torch.Tensor
    ) -> torch.Tensor:
        """candidates (B, F, M, E), each read in place of Pass 2's token of frame t -> losses (B, F, M) of predicting
        latent t+1 from latent t and the state after it."""
        M = candidates.shape[2]
        states = branch_states(model, outputs.tokens_fine.detach(), candidates, frames,
                               input_ids, attention_mask)  # (B, F, M, E)
        prev = _at_frames(vae_latents, frames)  # (B, F, C, h, w)
        target = _at_frames(vae_latents, frames + 1).float()
        B, F_ = frames.shape
        # The head takes k blocks of B clips: (B, F, M, E) -> (M * B, F, E).
        predictions = model.predict_latents(states.permute(2, 0, 1, 3).flatten(0, 1), prev).float()
        predictions = predictions.view(M, B, F_, *predictions.shape[2:])  # (M, B, F, C, h, w)
        return (predictions - target[None]).pow(2).flatten(3).mean(-1).permute(1, 2, 0)  # (B, F, M)

    def gumbel_losses(self, inputs, cells, frames, temperature) -> torch.Tensor:
        """`teacher_search="gumbel"`: Pass 2's own glimpse of frame t, as attention mass per cell, gives the logits of a
        straight-through Gumbel-softmax draw of one cell; the drawn cell's narrow glimpse is read in place of Pass 2's
        token, and its next-latent loss (B, F) trains the LLM and head, and the policy through the draw."""
        model, outputs = inputs[:2]
        B, F_ = frames.shape
        K = cells.shape[0]
        logits = cell_mass(_at_frames(outputs.attn_fine, frames), self.args.teacher_grid).float().clamp_min(1e-8).log()
        draw = torch.nn.functional.gumbel_softmax(logits, tau=temperature, hard=True)  # (B, F, K): one-hot forward
        candidates = self.candidate_tokens(model, outputs, frames, cells.expand(B, F_, K, 3))  # (B, F, K, E)
        chosen = (draw[..., None].to(candidates.dtype) * candidates).sum(2, keepdim=True)  # (B, F, 1, E)
        return self.branch_losses(*inputs[:5], frames, chosen)[..., 0]


def confident_clips(search_gain: torch.Tensor, share: float) -> torch.Tensor:
    """(B,) search gains -> (B,) 1.0 for the ceil(share * B) clips with the highest gain, 0.0 for the others."""
    keep = max(1, math.ceil(share * search_gain.shape[0]))
    confident = torch.zeros_like(search_gain)
    confident[search_gain.topk(keep).indices] = 1.0
    return confident


def clip_keys(inputs: dict) -> list[bytes]:
    """One key per clip of a batch of model inputs: a digest of its latents and text (the latents are its frames'
    encoding) and of every 8th pixel of every 8th row, so that clips differing only in frames differ too."""
    parts = [inputs["vae_latents"], inputs.get("input_ids"), inputs.get("attention_mask")]
    if inputs.get("pixel_values") is not None:
        parts.append(inputs["pixel_values"][..., ::8, ::8])
    parts = [part.detach().cpu().float().contiguous() for part in parts if part is not None]
    keys = []
    for row in range(parts[0].shape[0]):
        digest = hashlib.blake2b(digest_size=16)
        for part in parts:
            digest.update(part[row].numpy().tobytes())
        keys.append(digest.digest())
    return keys


def branch_states(model, prefix_tokens, candidates, frames, input_ids=None, attention_mask=None) -> torch.Tensor:
    """
    The LLM state after each candidate token, each read in place of Pass 2's token of its frame: one LLM call over
    `[text, <fine>, z_1..z_{T-1}, candidates]` where candidate (b, f, m) sees only the text, `<fine>`, the tokens of
    the frames before `frames[b, f]` and itself, at the position of the token it replaces.

    prefix_tokens (B, T, E) Pass 2's tokens; candidates (B, F, M, E); frames (B, F) -> states (B, F, M, E).
    """
    B, T, E = prefix_tokens.shape
    F_, M = candidates.shape[1:3]
    text_embeds = model._embed_text(input_ids, B)  # (B, n, E)
    n = text_embeds.shape[1]
    text_mask = attention_mask if attention_mask is not None else text_embeds.new_ones(B, n, dtype=torch.long)
    mode = model.fine_token.to(prefix_tokens.dtype).expand(B, 1, -1)
    prefix = torch.cat([text_embeds.to(prefix_tokens.dtype), mode, prefix_tokens[:, : T - 1]], dim=1)  # (B, n+T, E)
    length = prefix.shape[1]
    inputs_embeds = torch.cat([prefix, candidates.reshape(B, F_ * M, E).to(prefix.dtype)], dim=1)

    # Which positions each query row may read: the prefix is causal over real (unpadded) tokens; candidate (f, m)
    # reads the text, <fine>, z_1..z_{t-1} (prefix columns < n + 1 + t) and itself.
    prefix_valid = torch.cat([text_mask.bool(), text_mask.new_ones(B, T).bool()], dim=1)  # (B, n + T)
    columns = torch.arange(length, device=frames.device)
    causal = columns[None, :] <= columns[:, None]  # (n+T, n+T)
    prefix_rows = causal[None] & prefix_valid[:, None, :]  # (B, n+T, n+T)
    limit = (n + 1 + frames).repeat_interleave(M, dim=1)  # (B, F*M): first prefix column a candidate may not read
    candidate_prefix = (columns[None, None, :] < limit[:, :, None]) & prefix_valid[:, None, :]  # (B, F*M, n+T)
    total = length + F_ * M
    allowed = torch.zeros(B, total, total, dtype=torch.bool, device=frames.device)
    allowed[:, :length, :length] = prefix_rows
    allowed[:, length:, :length] = candidate_prefix
    allowed[:, length:, length:] = torch.eye(F_ * M, dtype=torch.bool, device=frames.device)
    # A padded text row reads nothing else; let it read itself so its softmax stays finite (its output is unused).
    allowed |= torch.eye(total, dtype=torch.bool, device=frames.device)[None]
    dtype = inputs_embeds.dtype
    mask = torch.zeros(B, 1, total, total, dtype=dtype, device=frames.device)
    mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)

    prefix_positions = _position_ids(prefix_valid.long())  # (B, n + T)
    candidate_positions = prefix_positions.gather(1, limit)  # the position of the token each candidate replaces
    position_ids = torch.cat([prefix_positions, candidate_positions], dim=1)
    hidden = model.language_model(
        inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    return hidden[:, length:].view(B, F_, M, E)


def _policy_metrics(outputs, vae_latents, frames, posterior, temperature: float) -> dict:
    """Per clip (B,): the temperature, the posterior's entropy and the policy's own loss on the scored targets (Pass
    2's prediction of latent t+1)."""
    errors = _at_frames(outputs.pred_fine, frames + 1).float() - _at_frames(vae_latents, frames + 1).float()
    return {
        "teacher/temperature": torch.full((frames.shape[0],), temperature, device=frames.device),
        "teacher/loss_policy": errors.pow(2).flatten(2).mean(-1).mean(1),
        "teacher/posterior_entropy": -(posterior * posterior.clamp_min(1e-12).log()).sum(-1).mean(1),
    }


def _at_frames(values: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """values (B, T, ...) at frames (B, F) -> (B, F, ...)."""
    index = frames.view(*frames.shape, *([1] * (values.ndim - 2))).expand(-1, -1, *values.shape[2:])
    return values.gather(1, index)


def _mean_where(per_frame: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Per clip (B,): the mean of per_frame (B, F) over the frames where keep (B, F) holds (0 where none does)."""
    keep = keep.to(per_frame.dtype)
    return (per_frame * keep).sum(1) / keep.sum(1).clamp_min(1)


def _distance(difference: torch.Tensor, kind: str) -> torch.Tensor:
    """`teacher_distill_distance` over the last dim: (..., D) -> (...), absolute (L1) or squared."""
    return (difference.abs() if kind == "absolute" else difference.pow(2)).sum(-1)


def _cross_entropy(target: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """Cross-entropy (nats) of distributions `mass` against `target` over the last dim: (..., K) -> (...)."""
    return -(target * mass.float().clamp_min(1e-8).log()).sum(-1)
