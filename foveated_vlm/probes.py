"""Research probes of the foveated model: what Pass 1 and Pass 2 read with, and whether Pass 2 is trained.

Each probe cuts one link of the design in docs/DESIGN.md to measure what it is worth (docs/RESULTS.md). A probe is
applied by composition: `apply_probes` swaps the model's parameter-free readers (`coarse_reader`, `fine_reader`) for
the ones below, as PEFT swaps layers; the model's class and weights stay what they are. What a probe reads of the
ground truth travels with the inputs (`forward(reader_kwargs={"oracle_fixations": ...})`, made by
`foveated_vlm.data.model_inputs` from the readers' `batch_inputs`), never as module state. A checkpoint stays a plain
`FoveatedVLMModel`; the trainer writes the probes beside it in `probes.json`. This module is not remote code.

    python train_hf.py configs/tiny.yaml --fine_queries oracle      # HfArgumentParser reads FoveatedVLMProbes
"""

import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Optional

import torch
from torch import nn

from modeling_foveated import FoveatedVLMCoarseReader, FoveatedVLMFineReader, FoveatedVLMModel

__all__ = [
    "PROBES_FILE",
    "FoveatedVLMProbes",
    "apply_probes",
    "from_pretrained_with_probes",
    "glimpse_supervision",
    "moving_box_centres",
    "parameters_outside_loss",
    "probes_of",
]

PROBES_FILE = "probes.json"
COARSE_READERS = ("query", "mean_pool", "oracle_first")
FINE_QUERIES = ("predicted", "fixed", "random", "oracle")
SUPERVISE_DISTANCES = ("squared", "absolute")
SUPERVISE_PLACES = ("exact", "cell")
SUPERVISE_MISSES = ("step", "clip")
# The grid of a search teacher's candidate cells (foveated_vlm/teacher.py's default), for the probes that mimic it.
TEACHER_LIKE_GRID = 4
# Spread of an oracle fixation, log sigma in [-1, 1] frame units: sigma ~ 0.14, about the half-side of a synthetic
# object.
ORACLE_LOG_SIGMA = -2.0


@dataclass
class FoveatedVLMProbes:
    coarse_reader: str = field(
        default="query",
        metadata={
            "help": "How Pass 1 reads a frame: query (the design: the learned q_coarse), mean_pool (the plain "
            "average of the final patch features) or oracle_first (q_coarse, but frame 1 with a fixation on the true "
            "centre of its moving box or cued target: Pass 1 is told where the target is, and must still learn to "
            "aim Pass 2 there).",
            "choices": COARSE_READERS,
        },
    )
    fine_queries: str = field(
        default="predicted",
        metadata={
            "help": "Which queries Pass 2 reads with: predicted (the design: the Pass-1 LLM's query after frame t-1), "
            "fixed (the learned q_init for every frame), random (fresh Gaussian queries with the predicted queries' "
            "RMS each call) or oracle (q_init looking at the true centre of the mover or cued target, from the "
            "batch's moving_boxes). All but the first cut the link between LLM and glimpse.",
            "choices": FINE_QUERIES,
        },
    )
    fine_loss_weight: float = field(
        default=1.0,
        metadata={
            "help": "Weight of loss_fine in the loss; 0 trains Pass 1 alone (the coarse-only baseline: Pass 2 is still "
            "evaluated, and its own parameters are frozen)."
        },
    )

    supervise_fixations: float = field(
        default=0.0,
        metadata={
            "help": "Weight of an MSE pulling the attention-weighted position of Pass 2's glimpses of frames 2..T "
            "towards the true target centre (ground truth from the boxes: a calibration of the policy's second "
            "link, docs/RESULTS.md, never a recipe)."
        },
    )
    supervise_first_glance: float = field(
        default=0.0,
        metadata={
            "help": "Weight of an MSE pulling the attention-weighted position of Pass 1's glimpse of frame 1 towards "
            "the true target centre (ground truth: a calibration of the policy's first link)."
        },
    )
    supervise_noise: float = field(
        default=0.0,
        metadata={
            "help": "Share of clips, drawn afresh at every training step, whose supervised place (both terms above) is "
            "a wrong one: the centre of a random cell of a 4x4 grid, held in every frame. It asks whether a target "
            "that is right in most clips only, as a search teacher's is, still teaches the policy."
        },
    )
    supervise_distance: str = field(
        default="squared",
        metadata={
            "help": "The distance both terms above take: squared (the squared distance, whose minimiser over mixed "
            "targets is their mean) or absolute (|dy| + |dx|, whose minimiser is their per-coordinate median: a "
            "minority of wrong places does not move it).",
            "choices": SUPERVISE_DISTANCES,
        },
    )
    supervise_place: str = field(
        default="exact",
        metadata={
            "help": "The right place both terms above take: exact (the target's centre) or cell (the centre of the "
            "4x4 grid cell the target's centre lies in, as a search teacher's best cell would give it).",
            "choices": SUPERVISE_PLACES,
        },
    )
    supervise_misses: str = field(
        default="step",
        metadata={
            "help": "How supervise_noise picks its wrong clips and places: step (drawn afresh at every step) or clip "
            "(fixed per clip, from its true centre, so the same clips are missed, at the same wrong place, in every "
            "epoch, as a teacher's hard clips would be).",
            "choices": SUPERVISE_MISSES,
        },
    )

    def __post_init__(self):
        for name, choices in (("supervise_distance", SUPERVISE_DISTANCES), ("supervise_place", SUPERVISE_PLACES),
                              ("supervise_misses", SUPERVISE_MISSES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}={getattr(self, name)!r} must be one of {choices}")
        for name in ("supervise_fixations", "supervise_first_glance"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if not 0 <= self.supervise_noise <= 1:
            raise ValueError(f"supervise_noise={self.supervise_noise} must lie in [0, 1]")
        if self.supervise_noise and not (self.supervise_fixations or self.supervise_first_glance):
            raise ValueError("supervise_noise corrupts the places of supervise_fixations / supervise_first_glance: "
                             "set one of them")
        if self.coarse_reader not in COARSE_READERS:
            raise ValueError(f"coarse_reader={self.coarse_reader!r} must be one of {COARSE_READERS}")
        if self.fine_queries not in FINE_QUERIES:
            raise ValueError(f"fine_queries={self.fine_queries!r} must be one of {FINE_QUERIES}")
        if self.fine_loss_weight < 0:
            raise ValueError(f"fine_loss_weight={self.fine_loss_weight} must be >= 0")

    @property
    def supervises(self) -> bool:
        """True when the calibration terms (`glimpse_supervision`) join the training loss."""
        return self.supervise_fixations > 0 or self.supervise_first_glance > 0

    @property
    def needs_oracle(self) -> bool:
        """True when the forward reads ground-truth fixations (`oracle_fixations`)."""
        return (
            self.fine_queries == "oracle"
            or self.coarse_reader == "oracle_first"
            or self.supervises
        )

    @property
    def active(self) -> bool:
        """True when any probe differs from the design."""
        return self != FoveatedVLMProbes()

    def to_dict(self) -> dict:
        return asdict(self)


class _ProbedReader(nn.Module):
    """What both probed readers share: the probes, and the ground truth they read from the batch."""

    def __init__(self, probes: FoveatedVLMProbes):
        super().__init__()
        self.probes = probes

    def batch_inputs(self, batch: dict) -> dict:
        """The reader's inputs from a collated batch: `oracle_fixations` (B, T, 2) where a probe reads the ground
        truth (the centre of each frame's first moving box), else nothing."""
        if not self.probes.needs_oracle:
            return {}
        if "moving_boxes" not in batch:
            raise ValueError("oracle probes need the batch's moving_boxes (synthetic clips carry them)")
        return {"oracle_fixations": moving_box_centres(batch["moving_boxes"])}


class ProbedCoarseReader(_ProbedReader, FoveatedVLMCoarseReader):
    """Pass 1 reading by `coarse_reader`: query (the design), mean_pool or oracle_first."""

    def forward(self, model, cache, B, T, oracle_fixations=None, **reader_kwargs):
        if self.probes.coarse_reader == "oracle_first":
            if not model.config.fixation_bias:
                raise ValueError("coarse_reader='oracle_first' steers q_coarse's fixation: it needs fixation_bias")
            # q_coarse's own fixation in every frame but the first, which looks at its target.
            fixations = model.encoder.fixation(model.q_coarse[None]).expand(B, T, 3)  # (B, T, 3)
            oracle = _with_oracle_spread(oracle_fixations, "coarse_reader='oracle_first'", B, T)  # (B, T, 3)
            fixations = torch.cat([oracle[:, :1], fixations[:, 1:]], dim=1)
            return model._read_frames(model.q_coarse.expand(B, T, -1), cache, B, T, fixations)
        if self.probes.coarse_reader == "mean_pool":
            tokens = cache.patch_features.mean(dim=1)  # (B*T, P, D) -> (B*T, D)
            num_patches = cache.patch_features.shape[1]
            attention = torch.full((B * T, num_patches), 1.0 / num_patches, device=tokens.device)
            return model._tokens_to_llm(tokens, attention, B, T)
        return super().forward(model, cache, B, T)


class ProbedFineReader(_ProbedReader, FoveatedVLMFineReader):
    """Pass 2 reading by `fine_queries` (predicted: the design; fixed, random, oracle), its loss weighed by
    `fine_loss_weight`."""

    def __init__(self, probes: FoveatedVLMProbes):
        super().__init__(probes)
        self.loss_weight = probes.fine_loss_weight

    def forward(self, model, queries, cache, B, T, fixations=None, oracle_fixations=None, **reader_kwargs):
        mode = self.probes.fine_queries
        if mode == "oracle":
            oracle = _with_oracle_spread(oracle_fixations, "fine_queries='oracle'", B, T)
            return model._read_frames(model.q_init.to(queries.dtype).expand_as(queries), cache, B, T, oracle)
        if mode == "fixed":
            queries = model.q_init.to(queries.dtype).expand_as(queries)
        elif mode == "random":
            rms = queries.detach().float().pow(2).mean().sqrt()
            queries = (torch.randn_like(queries, dtype=torch.float32) * rms).to(queries.dtype)
        if mode != "predicted":
            fixations = None  # the replaced queries' own, not those the stream worked out from the predicted ones
        return super().forward(model, queries, cache, B, T, fixations)


def _with_oracle_spread(oracle_fixations, probe: str, B: int, T: int) -> torch.Tensor:
    """The call's ground-truth centres (B, T, 2) -> fixations (B, T, 3) with the oracle's spread."""
    if oracle_fixations is None:
        raise ValueError(f"{probe} reads where forward(reader_kwargs={{'oracle_fixations': ...}}) says; stream() has none")
    if tuple(oracle_fixations.shape) != (B, T, 2):
        raise ValueError(f"oracle_fixations must have shape ({B}, {T}, 2); got {tuple(oracle_fixations.shape)}")
    centres = oracle_fixations.float()
    return torch.cat([centres, torch.full_like(centres[..., :1], ORACLE_LOG_SIGMA)], dim=-1)


def apply_probes(model: FoveatedVLMModel, probes: FoveatedVLMProbes) -> FoveatedVLMModel:
    """Swap `model`'s readers for probed ones in place and return it: the same class and parameters, nothing copied.
    The design's probes (`FoveatedVLMProbes()`) leave the design's readers."""
    if probes.active:
        model.coarse_reader = ProbedCoarseReader(probes)
        model.fine_reader = ProbedFineReader(probes)
    return model


def probes_of(model: FoveatedVLMModel) -> Optional[FoveatedVLMProbes]:
    """The probes `apply_probes` gave `model`, or None for the design."""
    return getattr(model.fine_reader, "probes", None)


def parameters_outside_loss(probes: FoveatedVLMProbes) -> list[str]:
    """Names of the parameters the probes leave without a gradient (to freeze: DDP rejects them)."""
    unused = []
    if probes.coarse_reader == "mean_pool":
        unused.append("q_coarse")
    if probes.fine_queries != "predicted" or probes.fine_loss_weight == 0:
        unused += ["query_head.weight", "query_head.bias"]  # Pass 2 alone reads the predicted queries
    if probes.fine_queries == "random" or probes.fine_loss_weight == 0:
        unused.append("q_init")
    if probes.fine_loss_weight == 0:
        unused.append("fine_token")
    return unused


def glimpse_supervision(model, outputs, oracle_fixations: torch.Tensor, probes: FoveatedVLMProbes) -> torch.Tensor:
    """The calibration terms the trainer adds to the loss: distances (`supervise_distance`) of glimpse positions from
    the true centres (B, T, 2), of Pass 2's glimpses of frames 2..T and of Pass 1's glimpse of frame 1. In training with
    `supervise_noise`, a share of the clips is supervised towards a wrong place instead (`corrupted_centres`); with
    `supervise_place="cell"` the right places are their grid cells' centres."""
    centres = oracle_fixations.float()
    if model.training and probes.supervise_noise:
        centres = corrupted_centres(centres, probes.supervise_noise, per_clip=probes.supervise_misses == "clip")
    if probes.supervise_place == "cell":
        centres = cell_centres(centres)  # a wrong place is a cell centre already
    B, T, P = outputs.attn_fine.shape

    def distance(where, target):  # (..., 2) -> mean over the glimpses
        difference = where - target
        return (difference.abs() if probes.supervise_distance == "absolute" else difference.pow(2)).sum(-1).mean()

    loss = outputs.attn_fine.new_zeros((), dtype=torch.float32)
    if probes.supervise_fixations:
        where = model.glimpse_summary(outputs.attn_fine[:, 1:].reshape(-1, P))[:, :2].view(B, T - 1, 2)
        loss = loss + probes.supervise_fixations * distance(where, centres[:, 1:])
    if probes.supervise_first_glance:
        where = model.glimpse_summary(outputs.attn_coarse[:, 0])[:, :2]  # (B, 2)
        loss = loss + probes.supervise_first_glance * distance(where, centres[:, 0])
    return loss


def cell_centres(centres: torch.Tensor, grid: int = TEACHER_LIKE_GRID) -> torch.Tensor:
    """Places (..., 2) in [-1, 1] -> the centre of the grid x grid cell each lies in."""
    cell = ((centres + 1) * grid / 2).floor().clamp(0, grid - 1)
    return (cell * 2 + 1) / grid - 1


def corrupted_centres(
    centres: torch.Tensor, share: float, grid: int = TEACHER_LIKE_GRID, per_clip: bool = False
) -> torch.Tensor:
    """centres (B, T, 2) with those of a random `share` of clips replaced by the centre of a random cell of a
    grid x grid split, the same in every frame (a wrong place, as a search teacher's miss would be).

    per_clip: draw which clips miss, and where, from each clip's own frame-0 centre instead of afresh, so that a clip
    is missed (or not) at the same place every time it is read."""
    B = centres.shape[0]
    if per_clip:
        # Two uniforms per clip, a fixed hash of its place: the classic fract(sin(.) * 43758.5453) shader hash.
        first = centres[:, 0].double()  # (B, 2); float64 keeps the hash's low digits
        draw = torch.frac((torch.sin(first[:, 0] * 12.9898 + first[:, 1] * 78.233) * 43758.5453).abs())  # (B,)
        where = torch.frac(draw * 9973.0)  # (B,): a second uniform from the first
        missed = draw < share
        cell = (where * grid * grid).long().clamp(max=grid * grid - 1)
    else:
        cell = torch.randint(grid * grid, (B,), device=centres.device)
        missed = torch.rand(B, device=centres.device) < share  # (B,)
    wrong = torch.stack([cell // grid, cell % grid], dim=-1).float() * 2 / grid + 1 / grid - 1  # (B, 2)
    return torch.where(missed[:, None, None], wrong[:, None].expand_as(centres), centres)


def from_pretrained_with_probes(folder: str, **kwargs) -> FoveatedVLMModel:
    """Load a saved model, with its probes applied when `probes.json` lies beside it."""
    model = FoveatedVLMModel.from_pretrained(folder, **kwargs)
    probes_path = os.path.join(folder, PROBES_FILE)
    if not os.path.isfile(probes_path):
        return model
    with open(probes_path) as file:
        probes = json.load(file)
    known = {f.name for f in fields(FoveatedVLMProbes)}
    return apply_probes(model, FoveatedVLMProbes(**{k: v for k, v in probes.items() if k in known}))


def moving_box_centres(moving_boxes: torch.Tensor) -> torch.Tensor:
    """(y, x) in [-1, 1] of the first moving box in each frame, the frame centre where there is none:
    boxes (B, T, K, 4) normalised xyxy, -1 rows absent -> (B, T, 2)."""
    box = moving_boxes[:, :, 0].float()  # (B, T, 4)
    centre = torch.stack([box[..., 1] + box[..., 3], box[..., 0] + box[..., 2]], dim=-1) - 1  # 2 * mid - 1
    present = (box >= 0).all(-1, keepdim=True)  # (B, T, 1): absent rows are filled with -1
    return torch.where(present, centre, torch.zeros_like(centre))
