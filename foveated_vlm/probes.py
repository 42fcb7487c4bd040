"""Research probes of the foveated model: what Pass 1 and Pass 2 read with, and whether Pass 2 is trained.

Each probe cuts one link of the design in docs/DESIGN.md to measure what it is worth (docs/RESULTS.md). They are
not part of the model a checkpoint records: `FoveatedVLMProbedModel.save_pretrained` writes a plain
`FoveatedVLMModel` checkpoint and the probes in `probes.json` beside it. This module is not remote code.

    python train_hf.py configs/tiny.yaml --fine_queries oracle      # HfArgumentParser reads FoveatedVLMProbes
"""

import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Optional

import torch

from modeling_foveated import FoveatedVLMModel

__all__ = [
    "PROBES_FILE",
    "FoveatedVLMProbes",
    "FoveatedVLMProbedModel",
    "from_pretrained_with_probes",
    "moving_box_centres",
]

PROBES_FILE = "probes.json"
COARSE_READERS = ("query", "mean_pool", "oracle_first")
FINE_QUERIES = ("predicted", "fixed", "random", "oracle")
# Spread of an oracle fixation, log sigma in [-1, 1] frame units: sigma ~ 0.14, about the half-side of a synthetic
# object.
ORACLE_LOG_SIGMA = -2.0


@dataclass
class FoveatedVLMProbes:
    coarse_reader: str = field(
        default="query",
        metadata={
            "help": "How Pass 1 reads a frame: query (the design: the learned q_static), mean_pool (the plain "
            "average of the final patch features) or oracle_first (q_static, but frame 1 with a fixation on the true "
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

    def __post_init__(self):
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
    def needs_oracle(self) -> bool:
        """True when the forward reads ground-truth fixations (`oracle_fixations`)."""
        return (
            self.fine_queries == "oracle"
            or self.coarse_reader == "oracle_first"
            or self.supervise_fixations > 0
            or self.supervise_first_glance > 0
        )

    @property
    def active(self) -> bool:
        """True when any probe differs from the design."""
        return self != FoveatedVLMProbes()

    def to_dict(self) -> dict:
        return asdict(self)


class FoveatedVLMProbedModel(FoveatedVLMModel):
    """
    A `FoveatedVLMModel` with probes: the same parameters, with Pass 1's reader, Pass 2's queries or the weight of
    `loss_fine` changed. With `fine_queries="oracle"` or `coarse_reader="oracle_first"`, `forward` takes
    `oracle_fixations` (B, T, 2).
    """

    def __init__(self, config, probes: Optional[FoveatedVLMProbes] = None):
        super().__init__(config)
        self.probes = probes or FoveatedVLMProbes()
        self._oracle_fixations = None

    @classmethod
    def from_model(cls, model: FoveatedVLMModel, probes: FoveatedVLMProbes) -> "FoveatedVLMProbedModel":
        """Turn `model` into a probed model in place and return it: the same parameters, nothing copied."""
        model.__class__ = cls
        model.probes = probes
        model._oracle_fixations = None
        return model

    def probe_inputs(self, batch: dict) -> dict:
        """The probed forward's extra arguments from a collated batch: `oracle_fixations` where a probe reads the
        ground truth (`FoveatedVLMProbes.needs_oracle`: the centre of each frame's first moving box), else nothing."""
        if not self.probes.needs_oracle:
            return {}
        if "moving_boxes" not in batch:
            raise ValueError("oracle probes need the batch's moving_boxes (synthetic clips carry them)")
        return {"oracle_fixations": moving_box_centres(batch["moving_boxes"])}

    def forward(self, pixel_values: torch.Tensor, *args, oracle_fixations: Optional[torch.Tensor] = None, **kwargs):
        r"""
        `FoveatedVLMModel.forward` (which refuses any other argument), and:
            oracle_fixations (`torch.FloatTensor` of shape `(B, T, 2)`, *optional*): with `fine_queries="oracle"` or
                `coarse_reader="oracle_first"` only: (y, x) in [-1, 1] of what matters in each frame, e.g. the moving
                object's true centre.
        """
        B, T = pixel_values.shape[:2]
        oracle = self.probes.needs_oracle
        if oracle != (oracle_fixations is not None):
            raise ValueError(
                "oracle_fixations (B, T, 2) are needed with the probes that read the ground truth "
                "(fine_queries='oracle', coarse_reader='oracle_first', supervise_fixations, supervise_first_glance), "
                "and only then"
            )
        if oracle and tuple(oracle_fixations.shape) != (B, T, 2):
            raise ValueError(f"oracle_fixations must have shape ({B}, {T}, 2); got {tuple(oracle_fixations.shape)}")
        # `read_fine` is called from inside the base forward: it finds this call's fixations here.
        self._oracle_fixations = oracle_fixations
        try:
            output = super().forward(pixel_values, *args, **kwargs)
        finally:
            self._oracle_fixations = None
        if output.loss is not None and (self.probes.supervise_fixations or self.probes.supervise_first_glance):
            centres = oracle_fixations.float()
            if self.training and self.probes.supervise_noise:
                centres = self._corrupted(centres)
            output.loss = output.loss + self._glimpse_supervision(output, centres)
        return output

    def _corrupted(self, centres: torch.Tensor) -> torch.Tensor:
        """centres (B, T, 2) with those of a random `supervise_noise` share of clips replaced by the centre of a random
        cell of a 4x4 grid, the same in every frame (a wrong place, as a search teacher's miss would be)."""
        B = centres.shape[0]
        grid = 4
        cell = torch.randint(grid * grid, (B,), device=centres.device)
        wrong = torch.stack([cell // grid, cell % grid], dim=-1).float() * 2 / grid + 1 / grid - 1  # (B, 2)
        missed = torch.rand(B, device=centres.device) < self.probes.supervise_noise  # (B,)
        return torch.where(missed[:, None, None], wrong[:, None].expand_as(centres), centres)

    def _glimpse_supervision(self, output, centres: torch.Tensor) -> torch.Tensor:
        """The calibration terms: squared distances of glimpse positions from the true centres (B, T, 2)."""
        B, T, P = output.attn_fine.shape
        loss = 0.0
        if self.probes.supervise_fixations:
            where = self.glimpse_summary(output.attn_fine[:, 1:].reshape(-1, P))[:, :2].view(B, T - 1, 2)
            loss = loss + self.probes.supervise_fixations * (where - centres[:, 1:]).pow(2).sum(-1).mean()
        if self.probes.supervise_first_glance:
            where = self.glimpse_summary(output.attn_coarse[:, 0])[:, :2]  # (B, 2)
            loss = loss + self.probes.supervise_first_glance * (where - centres[:, 0]).pow(2).sum(-1).mean()
        return loss

    def _oracle_fixations_or_fail(self, probe: str) -> torch.Tensor:
        """The call's (B, T, 3) ground-truth fixations: its (y, x) and the oracle's spread."""
        if self._oracle_fixations is None:
            raise ValueError(f"{probe} reads where forward(oracle_fixations=...) says; stream() has none")
        centres = self._oracle_fixations.float()  # (B, T, 2)
        return torch.cat([centres, torch.full_like(centres[..., :1], ORACLE_LOG_SIGMA)], dim=-1)  # (B, T, 3)

    def read_coarse(self, cache, B, T):
        if self.probes.coarse_reader == "oracle_first":
            if not self.config.fixation_bias:
                raise ValueError("coarse_reader='oracle_first' steers q_static's fixation: it needs fixation_bias")
            # q_static's own fixation in every frame but the first, which looks at its target.
            fixations = self.encoder.fixation(self.q_static[None]).expand(B, T, 3)  # (B, T, 3)
            oracle = self._oracle_fixations_or_fail("coarse_reader='oracle_first'")  # (B, T, 3)
            fixations = torch.cat([oracle[:, :1], fixations[:, 1:]], dim=1)
            return self._read_frames(self.q_static.expand(B, T, -1), cache, B, T, fixations)
        if self.probes.coarse_reader == "mean_pool":
            tokens = cache.patch_features.mean(dim=1)  # (B*T, P, D) -> (B*T, D)
            num_patches = cache.patch_features.shape[1]
            attention = torch.full((B * T, num_patches), 1.0 / num_patches, device=tokens.device)
            return self._tokens_to_llm(tokens, attention, B, T)
        return super().read_coarse(cache, B, T)

    def read_fine(self, queries, cache, B, T, fixations=None):
        mode = self.probes.fine_queries
        if mode == "oracle":
            fixations = self._oracle_fixations_or_fail("fine_queries='oracle'")
            return self._read_frames(self.q_init.to(queries.dtype).expand_as(queries), cache, B, T, fixations)
        if mode == "fixed":
            queries = self.q_init.to(queries.dtype).expand_as(queries)
        elif mode == "random":
            rms = queries.detach().float().pow(2).mean().sqrt()
            queries = (torch.randn_like(queries, dtype=torch.float32) * rms).to(queries.dtype)
        if mode != "predicted":
            fixations = None  # the replaced queries' own, not those the stream worked out from the predicted ones
        return super().read_fine(queries, cache, B, T, fixations)

    @property
    def fine_loss_weight(self) -> float:
        return self.probes.fine_loss_weight

    def parameters_outside_loss(self) -> list[str]:
        """Names of the parameters the probes leave without a gradient (to freeze: DDP rejects them)."""
        probes, unused = self.probes, []
        if probes.coarse_reader == "mean_pool":
            unused.append("q_static")
        if probes.fine_queries != "predicted" or probes.fine_loss_weight == 0:
            unused += ["query_head.weight", "query_head.bias"]  # Pass 2 alone reads the predicted queries
        if probes.fine_queries == "random" or probes.fine_loss_weight == 0:
            unused.append("q_init")
        if probes.fine_loss_weight == 0:
            unused.append("fine_token")
        return unused

    def save_pretrained(self, save_directory, **kwargs):
        """A plain `FoveatedVLMModel` checkpoint (what `AutoModel` loads) and `probes.json` beside it."""
        # The probes add no weights: saved as the plain class, the checkpoint's auto_map and architectures name the
        # model's remote code, not this module.
        self.__class__ = FoveatedVLMModel
        try:
            FoveatedVLMModel.save_pretrained(self, save_directory, **kwargs)
        finally:
            self.__class__ = FoveatedVLMProbedModel
        if kwargs.get("is_main_process", True):
            with open(os.path.join(save_directory, PROBES_FILE), "w") as file:
                json.dump(self.probes.to_dict(), file, indent=1)


def from_pretrained_with_probes(folder: str, **kwargs) -> FoveatedVLMModel:
    """Load a saved model, with its probes when `probes.json` lies beside it."""
    model = FoveatedVLMModel.from_pretrained(folder, **kwargs)
    probes_path = os.path.join(folder, PROBES_FILE)
    if not os.path.isfile(probes_path):
        return model
    with open(probes_path) as file:
        probes = json.load(file)
    known = {f.name for f in fields(FoveatedVLMProbes)}
    return FoveatedVLMProbedModel.from_model(model, FoveatedVLMProbes(**{k: v for k, v in probes.items() if k in known}))


def moving_box_centres(moving_boxes: torch.Tensor) -> torch.Tensor:
    """(y, x) in [-1, 1] of the first moving box in each frame, the frame centre where there is none:
    boxes (B, T, K, 4) normalised xyxy, -1 rows absent -> (B, T, 2)."""
    box = moving_boxes[:, :, 0].float()  # (B, T, 4)
    centre = torch.stack([box[..., 1] + box[..., 3], box[..., 0] + box[..., 2]], dim=-1) - 1  # 2 * mid - 1
    present = (box >= 0).all(-1, keepdim=True)  # (B, T, 1): absent rows are filled with -1
    return torch.where(present, centre, torch.zeros_like(centre))
