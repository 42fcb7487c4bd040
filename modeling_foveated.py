"""Foveated video model: one visual token per frame, the LLM decides where to look in the next frame.

Remote code: this file is copied into Hub checkpoints, so it stays flat and imports only torch and transformers at
module level (transformers' `check_imports` requires every top-level import to be installed).

Shapes: B clips, T frames, S = image_size, P = (S / patch)^2 patches, L = 1 + registers + P encoder tokens,
D = encoder width, E = LLM width, Q = query_dim, C x h x w = VAE latent.
"""

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    DynamicCache,
    LogitsProcessorList,
    PreTrainedModel,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)
from transformers import initialization as init
from transformers.modeling_outputs import ModelOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.dinov3_vit.modeling_dinov3_vit import (
    DINOv3ViTModel,
    apply_rotary_pos_emb,
    eager_attention_forward,
    get_patches_center_coordinates,
)

try:
    from .configuration_foveated import FoveatedVLMConfig
except ImportError:  # installed as a top-level module rather than loaded as remote code
    from configuration_foveated import FoveatedVLMConfig

__all__ = [
    "FoveatedVLMOutput",
    "FoveatedVLMPatchCache",
    "FoveatedVLMStreamOutput",
    "FoveatedVLMCrossAttention",
    "FoveatedVLMEncoder",
    "FoveatedVLMPredictionHead",
    "FoveatedVLMPreTrainedModel",
    "FoveatedVLMModel",
    "FoveatedVLMStreams",
    "TEXT_MODES",
    "attention_entropy",
]


# The streams text can be read from or written by (`FoveatedVLMModel.generate_text`, `score_text`): Pass 1 alone, the
# parallel passes' last fine stream, and one fine stream that reads with its own queries (the deployed form).
TEXT_MODES = ("coarse", "fine", "autoregressive")

@dataclass
class FoveatedVLMPatchCache(ModelOutput):
    """
    What `FoveatedVLMEncoder.encode_patches` computes once per frame; any number of queries reuse it.

    Args:
        patch_features (`torch.FloatTensor` of shape `(N, P, D)`):
            Final (normalised) encoder features of the patch tokens.
        layer_keys (`tuple(torch.FloatTensor)`, one per layer, each of shape `(N, heads, L, D / heads)`):
            Keys of all encoder tokens (CLS, registers, patches; RoPE applied to patches) at each layer's input.
        layer_values (`tuple(torch.FloatTensor)`, same shapes as `layer_keys`):
            Values of all encoder tokens at each layer.
        final_features (`torch.FloatTensor` of shape `(N, L, D)`):
            Final features of all encoder tokens (what the shallow query attends to).
    """

    patch_features: Optional[torch.FloatTensor] = None
    # Not `keys`/`values`: those would shadow the mapping methods of ModelOutput.
    layer_keys: Optional[tuple] = None
    layer_values: Optional[tuple] = None
    final_features: Optional[torch.FloatTensor] = None


class _RenamedFields:
    """Read-only aliases of output fields renamed in this release (Pass 1 / Pass 2 are `coarse` / `fine` in code;
    `static` / `dynamic` were a second name for them): `output.attn_static` still reads `attn_coarse`, with a
    warning. Attribute access only; the outputs' keys are the new names. To be removed in the next release."""

    _RENAMED = {"attn_static": "attn_coarse", "attn_dynamic": "attn_fine", "entropy_static": "entropy_coarse",
                "entropy_dynamic": "entropy_fine"}  # fmt: skip

    def __getattr__(self, name):
        new = type(self)._RENAMED.get(name)
        if new is None:
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")
        warnings.warn(f"{name} is renamed {new}; the old name goes in the next release", FutureWarning, stacklevel=2)
        return getattr(self, new)


@dataclass
class FoveatedVLMOutput(_RenamedFields, ModelOutput):
    """
    Output of [`FoveatedVLMModel`]: both passes of one clip batch.

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*): the trained loss (`FoveatedVLMConfig.lambda_coarse`
            writes it out): with the default weights `loss_fine + lambda_coarse * loss_coarse`, plus
            `aux_current_weight * loss_aux` when `config.aux_current_weight > 0` and `fine_entropy_weight *
            entropy_fine` when `config.fine_entropy_weight > 0`.
        loss_fine (`torch.FloatTensor` of shape `()`, *optional*): MSE of Pass 2 (predicted queries, fine tokens).
        loss_coarse (`torch.FloatTensor` of shape `()`, *optional*): MSE of Pass 1 (static query, coarse tokens).
        loss_aux (`torch.FloatTensor` of shape `()`, *optional*): the auxiliary current-frame reconstruction loss
            (mean over both passes), when `config.aux_current_weight > 0`.
        pred_fine (`torch.FloatTensor` of shape `(B, T, C, h, w)`, *optional*): Pass-2 prediction of latents 1..T.
        pred_coarse (`torch.FloatTensor` of shape `(B, T, C, h, w)`, *optional*): Pass-1 prediction of latents 1..T.
        queries (`torch.FloatTensor` of shape `(B, T, Q)`): `q_t` emitted after frame t (Pass 1); frame t+1 is
            read with it in Pass 2.
        attn_coarse (`torch.FloatTensor` of shape `(B, T, P)`): `q_coarse`'s attention over each frame's patches.
        attn_fine (`torch.FloatTensor` of shape `(B, T, P)`): the attention of the query that read frame t in
            Pass 2 (`q_init` for t = 1, else `q_{t-1}`).
        entropy_coarse (`torch.FloatTensor` of shape `()`): mean entropy (nats) of `attn_coarse`.
        entropy_fine (`torch.FloatTensor` of shape `()`): mean entropy (nats) of `attn_fine`.
        state_coarse (`torch.FloatTensor` of shape `(B, T, E)`): LLM states the head reads in Pass 1 (at
            `<coarse>`, z°_1..z°_{T-1}).
        state_fine (`torch.FloatTensor` of shape `(B, T, E)`): LLM states the head reads in Pass 2.
        prev_latents (`torch.FloatTensor` of shape `(B, T, C, h, w)`, *optional*): `[z_vae_init, v_1..v_{T-1}]`.
        patch_cache (`FoveatedVLMPatchCache`, *optional*): the B * T frames' encoder cache, with
            `output_patch_cache=True`.
        tokens_fine (`torch.FloatTensor` of shape `(B, T, E)`, *optional*): Pass 2's visual tokens as the LLM reads
            them, with `output_patch_cache=True`.
        loss_text_fine (`torch.FloatTensor` of shape `()`, *optional*): with `target_ids`: the mean over clips of
            `text_nll_fine`.
        loss_text_coarse (`torch.FloatTensor` of shape `()`, *optional*): the same for Pass 1.
        text_nll_fine (`torch.FloatTensor` of shape `(B,)`, *optional*): with `target_ids`: each clip's mean
            cross-entropy (nats per token) of the last fine pass on its scored text tokens.
        text_nll_coarse (`torch.FloatTensor` of shape `(B,)`, *optional*): the same for Pass 1.
        loss_fine_passes (`torch.FloatTensor` of shape `(fine_passes,)`, *optional*): every fine pass's latent MSE,
            the last being `loss_fine`.
        loss_text_fine_passes (`torch.FloatTensor` of shape `(fine_passes,)`, *optional*): every fine pass's text
            loss, the last being `loss_text_fine`.
    """

    loss: Optional[torch.FloatTensor] = None
    loss_fine: Optional[torch.FloatTensor] = None
    loss_coarse: Optional[torch.FloatTensor] = None
    loss_aux: Optional[torch.FloatTensor] = None
    pred_fine: Optional[torch.FloatTensor] = None
    pred_coarse: Optional[torch.FloatTensor] = None
    queries: Optional[torch.FloatTensor] = None
    attn_coarse: Optional[torch.FloatTensor] = None
    attn_fine: Optional[torch.FloatTensor] = None
    entropy_coarse: Optional[torch.FloatTensor] = None
    entropy_fine: Optional[torch.FloatTensor] = None
    state_coarse: Optional[torch.FloatTensor] = None
    state_fine: Optional[torch.FloatTensor] = None
    prev_latents: Optional[torch.FloatTensor] = None
    patch_cache: Optional[FoveatedVLMPatchCache] = None
    tokens_fine: Optional[torch.FloatTensor] = None
    loss_text_fine: Optional[torch.FloatTensor] = None
    loss_text_coarse: Optional[torch.FloatTensor] = None
    text_nll_fine: Optional[torch.FloatTensor] = None
    text_nll_coarse: Optional[torch.FloatTensor] = None
    loss_fine_passes: Optional[torch.FloatTensor] = None
    loss_text_fine_passes: Optional[torch.FloatTensor] = None


@dataclass
class FoveatedVLMStreamOutput(_RenamedFields, ModelOutput):
    """
    One frame t of [`FoveatedVLMModel.stream`] (B clips).

    Args:
        pred_fine (`torch.FloatTensor` of shape `(B, C, h, w)`, *optional*): the Pass-2 (focused) stream's
            prediction of latent t, made before frame t was read (from frames < t and latent t-1); None when latent
            t-1 was not given.
        pred_coarse (`torch.FloatTensor` of shape `(B, C, h, w)`, *optional*): the Pass-1 stream's prediction.
        query (`torch.FloatTensor` of shape `(B, Q)`): the query emitted after frame t (reads frame t+1).
        attn_coarse (`torch.FloatTensor` of shape `(B, P)`): `q_coarse`'s attention over frame t.
        attn_fine (`torch.FloatTensor` of shape `(B, P)`): the Pass-2 query's attention over frame t.
    """

    pred_fine: Optional[torch.FloatTensor] = None
    pred_coarse: Optional[torch.FloatTensor] = None
    query: Optional[torch.FloatTensor] = None
    attn_coarse: Optional[torch.FloatTensor] = None
    attn_fine: Optional[torch.FloatTensor] = None


def attention_entropy(attention: torch.Tensor) -> torch.Tensor:
    """Mean entropy in nats of distributions over the last dim; `log(P)` for uniform attention."""
    return -(attention * attention.clamp_min(1e-12).log()).sum(-1).mean()


class FoveatedVLMCrossAttention(nn.Module):
    """The `shallow` query: one multi-head cross-attention of the query token over the final encoder features."""

    def __init__(self, config: FoveatedVLMConfig):
        super().__init__()
        self.config = config
        width = config.vision_config.hidden_size
        self.num_heads = config.vision_config.num_attention_heads
        self.head_dim = width // self.num_heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.o_proj = nn.Linear(width, width)

    def forward(self, query_state, features, logit_bias=None, logit_scale=None):
        """query_state (N, M, D), features (N, L, D), logit_bias (N, M, L), logit_scale () -> (N, M, D), weights
        (N, H, M, L)."""
        N, L, D = features.shape
        M = query_state.shape[1]
        query = self.q_proj(query_state).view(N, M, self.num_heads, self.head_dim).transpose(1, 2)
        key = self.k_proj(features).view(N, L, self.num_heads, self.head_dim).transpose(1, 2)
        value = self.v_proj(features).view(N, L, self.num_heads, self.head_dim).transpose(1, 2)
        logits = torch.matmul(query, key.transpose(-1, -2)).float() * self.head_dim**-0.5  # (N, H, M, L)
        if logit_scale is not None:
            logits = logits * logit_scale.float()
        if logit_bias is not None:
            logits = logits + logit_bias[:, None]
        weights = logits.softmax(dim=-1).to(value.dtype)
        attended = torch.matmul(weights, value).transpose(1, 2).reshape(N, M, D)
        return self.o_proj(attended), weights


class FoveatedVLMEncoder(nn.Module):
    """
    DINOv3 ViT that reads a frame once (`encode_patches`) and then answers queries (`query`): a query is one extra
    token that attends to the cached encoder keys/values. Encoder tokens never attend to the query, so the cache
    does not depend on it and any number of queries per frame cost one token through the layers each.
    """

    def __init__(self, config: FoveatedVLMConfig):
        super().__init__()
        self.config = config
        vision_config = config.vision_config
        self.backbone = DINOv3ViTModel(vision_config)
        self.num_heads = vision_config.num_attention_heads
        self.head_dim = vision_config.hidden_size // self.num_heads
        self.num_prefix_tokens = 1 + vision_config.num_register_tokens
        self.query_in_proj = nn.Linear(config.query_dim, vision_config.hidden_size)
        if config.query_logit_scale is not None:
            # log of a learned factor on the query's content logits (both passes; see the config).
            self.query_log_scale = nn.Parameter(torch.empty(()))
        if config.fixation_bias:
            # (mu_y, mu_x, log sigma) of the fixation, read from the query vector.
            self.fixation_proj = nn.Linear(config.query_dim, 3)
        if not config.deep_query:
            self.shallow_attention = FoveatedVLMCrossAttention(config)
            self.shallow_norm = nn.LayerNorm(vision_config.hidden_size, eps=vision_config.layer_norm_eps)
        self.gradient_checkpointing = False

    def _attention_interface(self) -> Callable:
        return ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config.vision_config._attn_implementation, eager_attention_forward
        )

    def _encode_layer(self, layer, hidden_states, cos, sin):
        """One DINOv3ViTLayer that also returns its keys/values: (N, L, D) -> (N, L, D), 2 x (N, H, L, d)."""
        # Written out rather than calling `layer` with a K/V-capturing attention function: transformers picks that
        # function by the shared `vision_config._attn_implementation`, which every encode would have to switch and
        # restore (global state changed inside a possibly compiled forward), and `_query_layer` reads the same
        # submodules anyway. test_cached_query_equals_masked_full_sequence checks this against DINOv3's own forward.
        attention = layer.attention
        N, L, D = hidden_states.shape
        normed = layer.norm1(hidden_states)
        query = attention.q_proj(normed).view(N, L, self.num_heads, self.head_dim).transpose(1, 2)
        key = attention.k_proj(normed).view(N, L, self.num_heads, self.head_dim).transpose(1, 2)
        value = attention.v_proj(normed).view(N, L, self.num_heads, self.head_dim).transpose(1, 2)
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        attended, _ = self._attention_interface()(
            attention, query, key, value, None, dropout=0.0, scaling=attention.scaling
        )  # (N, L, H, d)
        attended = attention.o_proj(attended.reshape(N, L, D))
        hidden_states = hidden_states + layer.drop_path(layer.layer_scale1(attended))
        mlp_out = layer.layer_scale2(layer.mlp(layer.norm2(hidden_states)))
        hidden_states = hidden_states + layer.drop_path(mlp_out)
        return hidden_states, key, value

    def encode_patches(self, pixel_values: torch.Tensor) -> FoveatedVLMPatchCache:
        """Run frames `(N, 3, S, S)` through the encoder once; return final features and every layer's K/V."""
        backbone = self.backbone
        pixel_values = pixel_values.to(backbone.embeddings.patch_embeddings.weight.dtype)
        hidden_states = backbone.embeddings(pixel_values)  # (N, L, D)
        cos, sin = backbone.rope_embeddings(pixel_values)  # (P, d) each
        keys, values = [], []
        for layer in backbone.model.layer:
            if self.gradient_checkpointing and self.training:
                hidden_states, key, value = self._gradient_checkpointing_func(
                    self._encode_layer, layer, hidden_states, cos, sin
                )
            else:
                hidden_states, key, value = self._encode_layer(layer, hidden_states, cos, sin)
            keys.append(key)
            values.append(value)
        final_features = backbone.norm(hidden_states)  # (N, L, D)
        return FoveatedVLMPatchCache(
            patch_features=final_features[:, self.num_prefix_tokens :],
            layer_keys=tuple(keys),
            layer_values=tuple(values),
            final_features=final_features,
        )

    def _query_layer(self, layer, query_state, key_cache, value_cache, logit_bias):
        """
        M query tokens per frame through one encoder layer (no RoPE): (N, M, D) -> (N, M, D), attention
        (N, H, M, L + 1). Each query attends to the frame's cached keys/values and to its own key only, never to the
        other queries, so M queries cost what M separate reads would, without copying the cache. `logit_bias`
        (N, M, L + 1) or None is added to the attention logits.
        """
        attention = layer.attention
        N, M, D = query_state.shape
        normed = layer.norm1(query_state)
        query = attention.q_proj(normed).view(N, M, self.num_heads, self.head_dim).transpose(1, 2)  # (N, H, M, d)
        own_key = attention.k_proj(normed).view(N, M, self.num_heads, self.head_dim).transpose(1, 2)
        own_value = attention.v_proj(normed).view(N, M, self.num_heads, self.head_dim).transpose(1, 2)
        # Few query rows: explicit softmax costs the same as a fused kernel and gives the weights for diagnostics.
        # The query's own key/value are handled apart instead of concatenated to the cache, which would copy the
        # whole cache for every query.
        cache_logits = torch.matmul(query, key_cache.transpose(-1, -2))  # (N, H, M, L)
        own_logit = (query * own_key).sum(-1, keepdim=True)  # (N, H, M, 1)
        logits = (torch.cat([cache_logits, own_logit], dim=-1) * attention.scaling).float()  # (N, H, M, L + 1)
        if self.config.query_logit_scale is not None:
            logits = logits * self.query_log_scale.float().exp()
        if logit_bias is not None:
            logits = logits + logit_bias[:, None]
        weights = logits.softmax(dim=-1).to(value_cache.dtype)
        attended = torch.matmul(weights[..., :-1], value_cache) + weights[..., -1:] * own_value  # (N, H, M, d)
        attended = attended.transpose(1, 2).reshape(N, M, D)
        attended = attention.o_proj(attended)
        query_state = query_state + layer.drop_path(layer.layer_scale1(attended))
        mlp_out = layer.layer_scale2(layer.mlp(layer.norm2(query_state)))
        query_state = query_state + layer.drop_path(mlp_out)
        return query_state, weights

    def patch_coordinates(self, num_patches: int, device) -> torch.Tensor:
        """(P, 2) patch-centre coordinates (y, x) in [-1, 1], row-major like the patch tokens."""
        side = int(round(num_patches**0.5))
        return get_patches_center_coordinates(side, side, dtype=torch.float32, device=device)

    def fixation(self, queries: torch.Tensor) -> torch.Tensor:
        """The fixation a query asks for: (..., Q) -> (..., 3) = centre (y, x) in [-1, 1] and log sigma."""
        fixation = self.fixation_proj(queries).float()  # (..., 3)
        centre = torch.tanh(fixation[..., :2])  # (..., 2) in [-1, 1]
        return torch.cat([centre, _clamp_log_sigma(fixation[..., 2:])], dim=-1)

    def saccade_fixations(
        self, queries: torch.Tensor, position: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        `fixation_mode="saccade"`: each query writes a *move* of the fixation and its spread. The centre for frame t
        is `tanh` of the running sum of the moves of the queries up to t, so "stay" is the zero move and the model
        never has to recall an absolute place.

        Args:
            queries: `(B, T, Q)`, the queries that read frames 1..T in order.
            position: `(B, 2)`, *optional*: the running sum before the first of them (streaming); zero at the start.

        Returns:
            fixations `(B, T, 3)` as (y, x, log sigma), and the running sum after the last query `(B, 2)`.
        """
        raw = self.fixation_proj(queries).float()  # (B, T, 3)
        positions = raw[..., :2].cumsum(dim=1)  # (B, T, 2): the moves of queries 1..t summed
        if position is not None:
            positions = positions + position[:, None]
        fixations = torch.cat([torch.tanh(positions), _clamp_log_sigma(raw[..., 2:])], dim=-1)
        return fixations, positions[:, -1]

    def fixation_logit_bias(self, fixations: torch.Tensor, num_patches: int) -> torch.Tensor:
        """Gaussian fixation prior over patches: fixations (..., 3) as (y, x, log sigma) -> logit bias (..., P)."""
        centre, log_sigma = fixations[..., :2].float(), fixations[..., 2].float()
        coords = self.patch_coordinates(num_patches, fixations.device)  # (P, 2)
        squared_distance = (coords - centre[..., None, :]).pow(2).sum(-1)  # (..., P)
        return -squared_distance / (2 * torch.exp(2 * log_sigma)[..., None])

    def query(
        self, queries: torch.Tensor, cache: FoveatedVLMPatchCache, fixations: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Read tokens out of cached frames: one query per frame, or M per frame that never see each other.

        Args:
            queries: `(N, Q)`, one per cached frame, or `(N, M, Q)`, M per frame.
            cache: `encode_patches` of the same N frames.
            fixations: `(N, 3)` or `(N, M, 3)`, *optional*: (y, x, log sigma) of a Gaussian bias on the attention
                logits that replaces the query's own fixation (`config.fixation_bias`); saccades, a probe or the
                search teacher impose one this way.

        Returns:
            tokens `(N, D)` or `(N, M, D)`: each query's final (normalised) encoder state.
            attention `(N, P)` or `(N, M, P)`: each query's attention over the frame's patch tokens, averaged over
            heads and, in deep mode, over all layers; renormalised over the patches (CLS/register mass left out), so a
            uniform map has entropy `log(P)`.
        """
        single = queries.ndim == 2
        if single:
            queries = queries.unsqueeze(1)  # (N, Q) -> (N, 1, Q)
            fixations = None if fixations is None else fixations.unsqueeze(1)
        query_state = self.query_in_proj(queries)  # (N, M, D)
        if fixations is None and self.config.fixation_bias:
            fixations = self.fixation(queries)
        patch_bias = None if fixations is None else self.fixation_logit_bias(fixations, cache.patch_features.shape[1])
        if self.config.deep_query:
            logit_bias = None
            if patch_bias is not None:  # no bias on CLS, registers and the query's own key
                logit_bias = F.pad(patch_bias, (self.num_prefix_tokens, 1))  # (N, M, P) -> (N, M, L + 1)
            layer_attention = []
            for layer, key_cache, value_cache in zip(self.backbone.model.layer, cache.layer_keys, cache.layer_values):
                query_state, weights = self._query_layer(layer, query_state, key_cache, value_cache, logit_bias)
                layer_attention.append(weights)
            tokens = self.backbone.norm(query_state)  # (N, M, D)
            # (N, layers, H, M, L + 1) -> (N, M, L + 1)
            weights = torch.stack(layer_attention, dim=1).mean(dim=(1, 2))
            patch_attention = weights[..., self.num_prefix_tokens : -1]  # own key is last
        else:
            logit_bias = None
            if patch_bias is not None:
                logit_bias = F.pad(patch_bias, (self.num_prefix_tokens, 0))  # (N, M, P) -> (N, M, L)
            scale = self.query_log_scale.exp() if self.config.query_logit_scale is not None else None
            attended, weights = self.shallow_attention(query_state, cache.final_features, logit_bias, scale)
            patch_attention = weights.mean(1)[..., self.num_prefix_tokens :]  # (N, H, M, L) -> (N, M, P)
            tokens = self.shallow_norm(query_state + attended)
        patch_attention = patch_attention.float()
        # A narrow fixation can leave the patches almost no mass (the rest on CLS and registers): the floor stays far
        # below that, so the map is still its true shape and a penalty on its entropy cannot be met by looking nowhere.
        patch_attention = patch_attention / patch_attention.sum(-1, keepdim=True).clamp_min(1e-30)
        if single:
            return tokens[:, 0], patch_attention[:, 0]
        return tokens, patch_attention


def _clamp_log_sigma(log_sigma: torch.Tensor) -> torch.Tensor:
    """Keeps a fixation's Gaussian bias finite in both directions."""
    return log_sigma.clamp(-4.0, 2.0)


class FoveatedVLMPredictionHead(nn.Module):
    """
    Predicts the next latent from an LLM state and the previous latent. FiLM: an MLP maps the state to per-channel
    gamma, beta that modulate a conv encoding of the previous latent, decoded back to a full latent. In `spatial`
    mode the state is also tiled over the (downsampled) grid together with x, y coordinates, so it can place a
    change instead of only rescaling channels.
    """

    def __init__(self, config: FoveatedVLMConfig):
        super().__init__()
        self.config = config
        channels = config.head_channels
        state_dim = config.text_config.hidden_size
        self.film = nn.Sequential(
            nn.Linear(state_dim, config.head_mlp_dim), nn.SiLU(), nn.Linear(config.head_mlp_dim, 2 * channels)
        )
        self.latent_encoder = nn.Sequential(
            nn.Conv2d(config.latent_channels, channels, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, stride=2, padding=1),
            nn.SiLU(),
        )
        if config.head_type == "spatial":
            self.state_to_grid = nn.Linear(state_dim, channels)
            self.grid_mixer = nn.Conv2d(2 * channels + 2, channels, 1)
        self.latent_decoder = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(channels, config.latent_channels, 3, padding=1),
        )

    def forward(self, state: torch.Tensor, prev_latent: torch.Tensor) -> torch.Tensor:
        """
        `state` (k * N, E), `prev_latent` (N, C, h, w) -> predicted latents (k * N, C, h, w).

        k >= 1 states per previous latent (the passes, the auxiliary reconstruction), stacked like `torch.cat` of k
        `(N, E)` blocks. The previous latent is encoded once for all k: its encoding does not depend on the state.
        """
        copies, remainder = divmod(state.shape[0], prev_latent.shape[0])
        if copies == 0 or remainder:
            raise ValueError(
                f"the head needs k >= 1 states per previous latent: got {state.shape[0]} states for "
                f"{prev_latent.shape[0]} latents"
            )
        features = self.latent_encoder(prev_latent)  # (N, ch, h/2, w/2)
        if copies > 1:
            features = features.repeat(copies, 1, 1, 1)  # (k * N, ch, h/2, w/2)
            prev_latent = prev_latent.repeat(copies, 1, 1, 1)
        if self.config.head_type == "spatial":
            N, _, grid_h, grid_w = features.shape
            state_grid = self.state_to_grid(state)[:, :, None, None].expand(-1, -1, grid_h, grid_w)
            ys = torch.linspace(-1, 1, grid_h, device=features.device, dtype=features.dtype)
            xs = torch.linspace(-1, 1, grid_w, device=features.device, dtype=features.dtype)
            coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij")).expand(N, -1, -1, -1)  # (N, 2, h/2, w/2)
            features = self.grid_mixer(torch.cat([features, state_grid, coords], dim=1))
        gamma, beta = self.film(state).chunk(2, dim=-1)  # (N, ch) each
        features = features * (1 + gamma[:, :, None, None]) + beta[:, :, None, None]
        prediction = self.latent_decoder(features)
        if self.config.head_residual:
            prediction = prev_latent + prediction
        return prediction


class FoveatedVLMPreTrainedModel(PreTrainedModel):
    config_class = FoveatedVLMConfig
    config: FoveatedVLMConfig
    base_model_prefix = "foveated"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DINOv3ViTLayer", "FoveatedVLMPredictionHead"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    # Checkpoints saved before Pass 1's query was renamed `q_coarse` (it was `q_static`) still load.
    _RENAMED_WEIGHTS = {r"^q_static$": "q_coarse"}

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        kwargs["key_mapping"] = {**cls._RENAMED_WEIGHTS, **(kwargs.get("key_mapping") or {})}
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # (model, loading info) with output_loading_info
        # transformers reverts load-time renamings on save; this one must not be, so that saves carry the new name.
        conversions = getattr(model, "_weight_conversions", None) or []
        old_names = list(cls._RENAMED_WEIGHTS)
        model._weight_conversions = [c for c in conversions if getattr(c, "source_patterns", None) != old_names]
        return loaded

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, FoveatedVLMModel):
            # transformers' init functions skip parameters already loaded from a checkpoint.
            init.normal_(module.q_coarse, std=self.config.query_init_std)
            init.normal_(module.q_init, std=self.config.query_init_std)
            for parameter in (module.coarse_token, module.fine_token, module.video_end_token, module.z_vae_init):
                init.normal_(parameter, std=self.config.mode_token_init_std)
        if isinstance(module, FoveatedVLMEncoder) and self.config.query_logit_scale is not None:
            init.constant_(module.query_log_scale, math.log(self.config.query_logit_scale))
        if isinstance(module, FoveatedVLMModel) and self.config.fixation_bias:
            # log sigma of every query's fixation before training: the spread's bias (its weights start near 0).
            # Set here, after the encoder's Linear layers had their own init, and only where nothing was loaded.
            bias = module.encoder.fixation_proj.bias
            if not getattr(bias, "_is_hf_initialized", False):
                with torch.no_grad():
                    bias[2] = math.log(self.config.fixation_init_spread)


class FoveatedVLMCoarseReader(nn.Module):
    """How Pass 1 reads a frame in the design: the learned `q_coarse` reads every cached frame. Without parameters (the
    model holds them), so that a research probe can replace it (`FoveatedVLMModel` docstring)."""

    def forward(self, model, cache: FoveatedVLMPatchCache, B: int, T: int, **reader_kwargs):
        return model._read_frames(model.q_coarse.expand(B, T, -1), cache, B, T)  # (B, T, E), (B, T, P)


class FoveatedVLMFineReader(nn.Module):
    """How Pass 2 reads a frame in the design: with the query predicted for it, and its fixation (the saccades' running
    sum worked out here unless given). `loss_weight` is how much `loss_fine` weighs. Without parameters."""

    loss_weight = 1.0

    def forward(self, model, queries, cache: FoveatedVLMPatchCache, B: int, T: int, fixations=None, **reader_kwargs):
        if fixations is None and model.config.fixation_mode == "saccade":
            fixations, _ = model.encoder.saccade_fixations(queries)
        return model._read_frames(queries, cache, B, T, fixations)  # (B, T, E), (B, T, P)


class FoveatedVLMModel(FoveatedVLMPreTrainedModel):
    """
    The two-pass foveated next-frame predictor (docs/DESIGN.md).

    Pass 1 reads every frame with the learned `q_coarse` (coarse tokens), runs the LLM over
    `[text, <coarse>, z°_1..z°_T]` and emits a query `q_t` after each frame. Pass 2 reads frame t with `q_{t-1}`
    (`q_init` for the first frame; fine tokens) and runs the same LLM over `[text, <fine>, z_1..z_T]`. In both
    passes the shared head predicts latent t from the state at the position just before frame t and latent t-1
    (`z_vae_init` for t = 1), so each prediction sees frames < t only (the index rule).

    `coarse_reader` and `fine_reader` are the design's choices of how Pass 1 reads a frame, which queries Pass 2 reads
    with and how much `loss_fine` weighs. They hold no parameters, so a research probe swaps them without changing the
    class or the checkpoint (`foveated_vlm.probes.apply_probes`, as PEFT swaps layers); `forward(reader_kwargs=...)`
    passes a swapped reader its own inputs.
    """

    # The loss is a mean over latent cells, not a sum over tokens: the Trainer must not pass `num_items_in_batch`.
    accepts_loss_kwargs = False

    def __init__(self, config: FoveatedVLMConfig):
        super().__init__(config)
        self.encoder = FoveatedVLMEncoder(config)
        self.language_model = AutoModel.from_config(config.text_config)
        text_width = config.text_config.hidden_size
        vision_width = config.vision_config.hidden_size
        if config.token_dim is not None:
            self.token_bottleneck = nn.Linear(vision_width, config.token_dim)
        self.dino_to_llm = nn.Linear(config.token_dim or vision_width, text_width)
        self.query_head = nn.Linear(text_width, config.query_dim)
        if config.glimpse_position:
            self.glimpse_to_llm = nn.Linear(3, text_width)  # (mean y, mean x, spread) of the attention
        self.prediction_head = FoveatedVLMPredictionHead(config)
        self.coarse_reader = FoveatedVLMCoarseReader()
        self.fine_reader = FoveatedVLMFineReader()

        self.q_coarse = nn.Parameter(torch.empty(config.query_dim))  # Pass 1's static query
        self.q_init = nn.Parameter(torch.empty(config.query_dim))
        self.coarse_token = nn.Parameter(torch.empty(text_width))
        self.fine_token = nn.Parameter(torch.empty(text_width))
        self.video_end_token = nn.Parameter(torch.empty(text_width))  # <video_end>: the text target follows it
        # The LM head is the language model's own: its input embeddings where they are tied (SmolLM2), else its own.
        tied = getattr(config.text_config, "tie_word_embeddings", False)
        self.lm_head = None if tied else nn.Linear(text_width, config.text_config.vocab_size, bias=False)
        latent_shape = (config.latent_channels, config.latent_size, config.latent_size)
        self.z_vae_init = nn.Parameter(torch.empty(latent_shape))

        self.post_init()

    @property
    def q_static(self) -> nn.Parameter:
        """Deprecated name of `q_coarse`, kept for one release."""
        warnings.warn("q_static is renamed q_coarse; the old name goes in the next release", FutureWarning, stacklevel=2)
        return self.q_coarse

    @classmethod
    def from_backbones(
        cls,
        vision: Optional[str] = "facebook/dinov3-vits16-pretrain-lvd1689m",
        text: Optional[str] = "HuggingFaceTB/SmolLM2-135M-Instruct",
        text_gguf_file: Optional[str] = None,
        **config_overrides,
    ) -> "FoveatedVLMModel":
        """
        Build the model around pretrained backbones (Hub ids or local folders; `text_gguf_file` loads the LLM from a
        GGUF file inside `text`). The new parts (query path, projections, head, mode tokens) are initialised fresh.
        An empty name keeps that backbone random, built from `vision_config` / `text_config` among the overrides
        (e.g. a tiny encoder with the real SmolLM2, which a CPU can train).
        """
        if vision:
            if config_overrides.get("vision_config"):
                raise ValueError(f"vision_config describes a random encoder; leave it out with vision={vision!r}")
            vision_model = AutoModel.from_pretrained(vision)
            config_overrides["vision_config"] = vision_model.config.to_dict()
        if text:
            if config_overrides.get("text_config"):
                raise ValueError(f"text_config describes a random LLM; leave it out with text={text!r}")
            causal_lm = AutoModelForCausalLM.from_pretrained(text, gguf_file=text_gguf_file)
            text_model = causal_lm.get_decoder()
            # GGUF weights arrive de-quantized to float; the checkpoint we write is a plain one.
            config_overrides["text_config"] = {
                k: v for k, v in text_model.config.to_dict().items() if k != "quantization_config"
            }
        model = cls(FoveatedVLMConfig(**config_overrides))
        if vision:
            model.encoder.backbone.load_state_dict(vision_model.state_dict())
        if text:
            model.language_model.load_state_dict(text_model.state_dict())
            if model.lm_head is not None:
                model.lm_head.load_state_dict(causal_lm.get_output_embeddings().state_dict())
        return model

    def _check_inputs(self, pixel_values, vae_latents, input_ids, attention_mask, target_ids=None, target_labels=None):
        config = self.config
        S = config.image_size
        if pixel_values.ndim != 5 or tuple(pixel_values.shape[2:]) != (3, S, S):
            raise ValueError(f"pixel_values must have shape (B, T, 3, {S}, {S}); got {tuple(pixel_values.shape)}")
        B, T = pixel_values.shape[:2]
        if T < 2:
            raise ValueError(f"pixel_values has T={T} frames; the model needs T >= 2")
        if vae_latents is not None:
            expected = (B, T, config.latent_channels, config.latent_size, config.latent_size)
            if tuple(vae_latents.shape) != expected:
                raise ValueError(f"vae_latents must have shape {expected}; got {tuple(vae_latents.shape)}")
        if input_ids is not None and (input_ids.ndim != 2 or input_ids.shape[0] != B):
            raise ValueError(f"input_ids must have shape ({B}, text_length); got {tuple(input_ids.shape)}")
        if attention_mask is not None and (input_ids is None or attention_mask.shape != input_ids.shape):
            raise ValueError("attention_mask needs input_ids of the same shape")
        if target_ids is not None and (target_ids.ndim != 2 or target_ids.shape[0] != B):
            raise ValueError(f"target_ids must have shape ({B}, target_length); got {tuple(target_ids.shape)}")
        if target_labels is not None and (target_ids is None or target_labels.shape != target_ids.shape):
            raise ValueError("target_labels needs target_ids of the same shape")
        if config.text_loss_weight > 0 and target_ids is None and self.training:
            raise ValueError(
                f"text_loss_weight={config.text_loss_weight} trains on text as a target: pass target_ids (and "
                "target_labels), e.g. from the data collator with a caption target"
            )

    def _embed_text(self, input_ids: Optional[torch.Tensor], B: int) -> torch.Tensor:
        """The text prepended to both LLM sequences: (B, text, E), text = 0 without `input_ids`."""
        if input_ids is None:
            return self.coarse_token.new_zeros(B, 0, self.config.text_config.hidden_size)
        return self.language_model.get_input_embeddings()(input_ids)

    def run_language_model(self, mode_token, visual_tokens, text_embeds, text_mask, suffix_embeds=None):
        """
        LLM over `[text, mode, z_1..z_T, suffix]`; returns the states at `[mode, z_1..z_T, suffix]`: (B, T + 1 + S, E).
        The suffix (B, S, E), *optional*, is `<video_end>` and the text target (`target_embeddings`).
        """
        B, T, _ = visual_tokens.shape
        mode = mode_token.to(visual_tokens.dtype).expand(B, 1, -1)
        suffix = [] if suffix_embeds is None else [suffix_embeds.to(visual_tokens.dtype)]
        inputs_embeds = torch.cat([text_embeds, mode, visual_tokens, *suffix], dim=1)  # (B, text + 1 + T + S, E)
        attention_mask = position_ids = None
        if text_mask is not None:
            # Padding inside the text must not shift the visual positions: positions count real tokens only.
            after_text = inputs_embeds.shape[1] - text_mask.shape[1]
            attention_mask = torch.cat([text_mask, text_mask.new_ones(B, after_text)], dim=1)
            position_ids = _position_ids(attention_mask)
        hidden = self.language_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        return hidden[:, text_embeds.shape[1] :]

    def target_embeddings(self, target_ids: torch.Tensor) -> torch.Tensor:
        """What each pass reads after its frames for text as a target, teacher-forced: `[<video_end>, t_1..t_{L-1}]`
        (B, L, E), whose states predict the target tokens t_1..t_L (`target_ids` (B, L), padded on the right: a causal
        LLM never lets a real token see the padding after it)."""
        B = target_ids.shape[0]
        video_end = self.video_end_token.expand(B, 1, -1)
        return torch.cat([video_end, self._embed_text(target_ids[:, :-1], B).to(video_end.dtype)], dim=1)

    def text_logits(self, states: torch.Tensor) -> torch.Tensor:
        """The language model's LM head: states (..., E) -> next-token logits (..., vocabulary)."""
        if self.lm_head is not None:
            return self.lm_head(states)
        return F.linear(states, self.language_model.get_input_embeddings().weight)

    def text_nll(self, states: torch.Tensor, target_ids: torch.Tensor, target_labels: Optional[torch.Tensor] = None):
        """Per clip, the mean cross-entropy (nats per token) of the scored target tokens: states (B, L, E) at
        `target_embeddings`' positions -> (B,). `target_labels` (B, L) holds -100 where a token is not scored (a
        question, padding); by default every token is."""
        labels = target_ids if target_labels is None else target_labels
        logits = self.text_logits(states).float()  # (B, L, V)
        per_token = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")  # (B, L)
        scored = (labels != -100).float()
        return (per_token * scored).sum(1) / scored.sum(1).clamp_min(1)

    def _read_frames(self, queries, cache, B, T, fixations=None):
        """Query every cached frame: queries (B, T, Q) -> LLM-width tokens (B, T, E), attention (B, T, P).
        `fixations` (B, T, 3), *optional*, replace the queries' own (see `FoveatedVLMEncoder.query`)."""
        if fixations is not None:
            fixations = fixations.reshape(B * T, 3)  # (B, T, 3) -> (B*T, 3)
        tokens, attention = self.encoder.query(queries.reshape(B * T, -1), cache, fixations)  # (B*T, D), (B*T, P)
        return self._tokens_to_llm(tokens, attention, B, T)

    def _tokens_to_llm(self, tokens, attention, B, T):
        """Encoder-width tokens (B*T, D) -> LLM inputs (B, T, E), through the optional bottleneck."""
        if self.config.token_dim is not None:
            tokens = self.token_bottleneck(tokens)  # (B*T, token_dim)
        tokens = self.dino_to_llm(tokens)  # (B*T, E)
        if self.config.glimpse_position:
            tokens = tokens + self.glimpse_to_llm(self.glimpse_summary(attention).to(tokens.dtype))
        return tokens.view(B, T, -1), attention.view(B, T, -1)  # (B*T, E) -> (B, T, E), (B*T, P) -> (B, T, P)

    def read_coarse(self, cache: FoveatedVLMPatchCache, B: int, T: int, **reader_kwargs):
        """Pass 1 reads every cached frame: tokens (B, T, E), attention (B, T, P), by `coarse_reader`."""
        return self.coarse_reader(self, cache, B, T, **reader_kwargs)

    def read_fine(self, queries, cache: FoveatedVLMPatchCache, B: int, T: int, fixations=None, **reader_kwargs):
        """Pass 2 reads frame t with the query predicted for it, queries (B, T, Q): tokens (B, T, E), attention
        (B, T, P), by `fine_reader`. `fixations` (B, T, 3), *optional*, are the queries' own, worked out already (the
        stream carries the saccades' running sum from frame to frame); by default they follow from `queries` alone."""
        return self.fine_reader(self, queries, cache, B, T, fixations, **reader_kwargs)

    @property
    def fine_loss_weight(self) -> float:
        """Weight of `loss_fine` in the loss, the fine reader's: 1 in the design; at 0, Pass 2 builds no graph."""
        return self.fine_reader.loss_weight

    def glimpse_summary(self, attention: torch.Tensor) -> torch.Tensor:
        """Where a glimpse landed: attention (N, P) -> (N, 3) = attention-weighted mean (y, x) and spread."""
        coords = self.encoder.patch_coordinates(attention.shape[-1], attention.device)  # (P, 2)
        mean = attention @ coords  # (N, 2)
        # The floor keeps the gradient finite for a glimpse on one patch (zero spread), where sqrt's is infinite.
        spread = (attention @ coords.pow(2).sum(-1) - mean.pow(2).sum(-1)).clamp_min(1e-8).sqrt()  # (N,)
        return torch.cat([mean, spread[:, None]], dim=-1)

    def forward(
        self,
        pixel_values: torch.Tensor,
        vae_latents: Optional[torch.Tensor] = None,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        target_ids: Optional[torch.Tensor] = None,
        target_labels: Optional[torch.Tensor] = None,
        output_patch_cache: bool = False,
        reader_kwargs: Optional[dict] = None,
        return_dict: bool = True,
    ) -> FoveatedVLMOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(B, T, 3, S, S)`): ImageNet-normalised frames.
            vae_latents (`torch.FloatTensor` of shape `(B, T, C, h, w)`, *optional*): target latents; without them
                the model returns queries and attention only.
            input_ids, attention_mask (`torch.LongTensor` of shape `(B, text_length)`, *optional*): text prepended
                to both LLM sequences (Phase 2).
            target_ids (`torch.LongTensor` of shape `(B, target_length)`, *optional*): text as a target, read by
                every pass after its frames and `<video_end>` (caption, or question and answer), right-padded.
            target_labels (`torch.LongTensor` of shape `(B, target_length)`, *optional*): `target_ids` with -100
                where a token is not scored (the question, padding); default: every token is.
            output_patch_cache (`bool`, *optional*): also return the frames' encoder cache and Pass 2's LLM inputs,
                which a training-time search over other glimpses of the same frames reuses (foveated_vlm/teacher.py).
            reader_kwargs (`dict`, *optional*): inputs of swapped readers (a research probe's, e.g. ground-truth
                fixations), passed to both readers; the design's readers take none.
        """
        reader_kwargs = reader_kwargs or {}
        self._check_inputs(pixel_values, vae_latents, input_ids, attention_mask, target_ids, target_labels)
        B, T, C, H, W = pixel_values.shape
        cache = self.encoder.encode_patches(pixel_values.reshape(B * T, C, H, W))  # frames encoded once

        text_embeds = self._embed_text(input_ids, B)  # (B, text, E)
        suffix = None if target_ids is None else self.target_embeddings(target_ids)  # (B, L, E)

        # Pass 1: the static query reads every frame; the LLM emits q_t after frame t.
        coarse_tokens, attn_coarse = self.read_coarse(cache, B, T, **reader_kwargs)  # (B, T, E), (B, T, P)
        hidden = self.run_language_model(self.coarse_token, coarse_tokens, text_embeds, attention_mask, suffix)
        hidden_coarse, text_states_coarse = hidden[:, : T + 1], hidden[:, T + 1 :]  # (B, T + 1, E), (B, L, E)
        queries = self.query_head(hidden_coarse[:, 1:])  # (B, T, Q)

        # The fine passes: fine pass k reads frame t with the query the pass before it emitted after frame t-1.
        # A Pass 2 that the loss does not weigh is still evaluated, without building its graph.
        fine_passes = []  # per fine pass: (LLM states (B, T + 1, E), text states (B, L, E))
        pass_queries = queries
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.fine_loss_weight > 0):
            for _ in range(self.config.fine_passes):
                first = self.q_init.expand(B, 1, -1).to(pass_queries.dtype)
                shifted_queries = torch.cat([first, pass_queries[:, :-1]], dim=1)  # (B, T, Q)
                # (B, T, E), (B, T, P)
                fine_tokens, attn_fine = self.read_fine(shifted_queries, cache, B, T, **reader_kwargs)
                hidden = self.run_language_model(self.fine_token, fine_tokens, text_embeds, attention_mask, suffix)
                fine_passes.append((hidden[:, : T + 1], hidden[:, T + 1 :]))
                pass_queries = self.query_head(hidden[:, 1 : T + 1])
        hidden_fine = fine_passes[-1][0]

        entropy_fine = attention_entropy(attn_fine)
        # ModelOutput's tuple holds the fields set when it is built: gather them all first.
        values = dict(
            queries=queries,
            attn_coarse=attn_coarse,
            attn_fine=attn_fine,
            entropy_coarse=attention_entropy(attn_coarse),
            entropy_fine=entropy_fine,
            state_coarse=hidden_coarse[:, :T],
            state_fine=hidden_fine[:, :T],
            patch_cache=cache if output_patch_cache else None,
            tokens_fine=fine_tokens if output_patch_cache else None,
        )
        config, lambda_coarse = self.config, self.config.lambda_coarse
        losses = []  # the terms of the loss
        if vae_latents is not None:
            prev_latents = values["prev_latents"] = self.previous_latents(vae_latents)  # (B, T, C, h, w)
            states_fine = [states for states, _ in fine_passes]
            pred_coarse, preds_fine, reconstructions = self._predict(hidden_coarse, states_fine, prev_latents)
            target = vae_latents.float()
            loss_coarse = F.mse_loss(pred_coarse, target)
            loss_fine_passes = torch.stack([F.mse_loss(pred, target) for pred in preds_fine])  # (fine_passes,)
            values.update(pred_coarse=pred_coarse, pred_fine=preds_fine[-1], loss_coarse=loss_coarse,
                          loss_fine=loss_fine_passes[-1], loss_fine_passes=loss_fine_passes)
            losses.append(config.latent_loss_weight * (
                self.fine_loss_weight * loss_fine_passes.sum() + lambda_coarse * loss_coarse))
            if reconstructions is not None:
                loss_aux = F.mse_loss(reconstructions, target.repeat(len(reconstructions) // B, 1, 1, 1, 1))
                values["loss_aux"] = loss_aux
                losses.append(config.aux_current_weight * loss_aux)
        if target_ids is not None:
            nll_coarse = self.text_nll(text_states_coarse, target_ids, target_labels)  # (B,)
            nll_fine = torch.stack([self.text_nll(states, target_ids, target_labels) for _, states in fine_passes])
            loss_text_fine_passes = nll_fine.mean(1)  # (fine_passes,)
            values.update(text_nll_coarse=nll_coarse, text_nll_fine=nll_fine[-1], loss_text_coarse=nll_coarse.mean(),
                          loss_text_fine=loss_text_fine_passes[-1], loss_text_fine_passes=loss_text_fine_passes)
            if config.text_loss_weight > 0:
                losses.append(config.text_loss_weight * (
                    self.fine_loss_weight * loss_text_fine_passes.sum() + lambda_coarse * nll_coarse.mean()))
        if losses:
            if config.fine_entropy_weight > 0:
                losses.append(config.fine_entropy_weight * entropy_fine)
            values["loss"] = sum(losses)
        output = FoveatedVLMOutput(**values)
        return output if return_dict else output.to_tuple()

    def _predict(self, hidden_coarse, hidden_fine, prev_latents):
        """
        The shared head in one batched call over the LLM states at `[mode, z_1..z_T]` (B, T + 1, E) of Pass 1 and of
        each fine pass (`hidden_fine`, a list): predictions of latents 1..T, `pred_coarse` (B, T, C, h, w) and one
        per fine pass (a list), and the auxiliary reconstructions (k * B, T, C, h, w) stacked pass by pass, or None
        when `aux_current_weight` is 0.
        """
        B, T = prev_latents.shape[:2]
        # The states before frame t predict latent t; those that have just read frame t reconstruct it (auxiliary).
        head_states = [hidden_coarse[:, :T], *(states[:, :T] for states in hidden_fine)]
        num_predictions = len(head_states)
        if self.config.aux_current_weight > 0:
            head_states.append(hidden_coarse[:, 1:])
            if self.fine_loss_weight > 0:  # a Pass 2 the loss does not weigh stays out of the auxiliary term too
                head_states.extend(states[:, 1:] for states in hidden_fine)
        predictions = self.predict_latents(torch.cat(head_states, dim=0), prev_latents).float()  # (k * B, T, C, h, w)
        blocks = predictions.split(B)
        reconstructions = predictions[num_predictions * B :] if len(head_states) > num_predictions else None
        return blocks[0], list(blocks[1:num_predictions]), reconstructions

    def predict_latents(self, states: torch.Tensor, prev_latents: torch.Tensor) -> torch.Tensor:
        """
        The shared head over a clip batch: states (k * B, T, E), k blocks of B clips stacked on dim 0, and
        prev_latents (B, T, C, h, w) -> (k * B, T, C, h, w). The previous latents are encoded once for all k.
        """
        kB, T = states.shape[:2]
        prediction = self.prediction_head(states.reshape(kB * T, -1), prev_latents.flatten(0, 1))
        # The head stacks its k blocks of B * T rows: reshape them back to k blocks of B clips.
        return prediction.view(kB, T, *prediction.shape[1:])

    def previous_latents(self, vae_latents: torch.Tensor) -> torch.Tensor:
        """`[z_vae_init, v_1..v_{T-1}]`: the latent the head starts from for each target, (B, T, C, h, w)."""
        first = self.z_vae_init.to(vae_latents.dtype).expand(vae_latents.shape[0], 1, -1, -1, -1)
        return torch.cat([first, vae_latents[:, :-1]], dim=1)

    @torch.no_grad()
    def stream(
        self,
        frames: Iterable[torch.Tensor],
        vae_latents: Optional[Iterable[Optional[torch.Tensor]]] = None,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        autoregressive: bool = False,
        streams: Optional["FoveatedVLMStreams"] = None,
    ) -> Iterator[FoveatedVLMStreamOutput]:
        """
        Streaming inference: frames arrive one at a time, each is encoded once, and the LLM streams step one token
        per frame with their own KV caches, so the cost per frame stays constant as the clip grows.

        The Pass-1 stream reads frame t with `q_coarse` and emits `q_t`; each fine stream reads frame t with the query
        the stream before it emitted after frame t-1 (`fine_passes` of them; the last one predicts). With
        `autoregressive=True` one fine stream reads with the queries it emits itself instead (what a deployed model
        would do; training uses the parallel passes). Without it, stacking the outputs over t reproduces the
        parallel `forward`.

        Args:
            frames: iterable of `(B, 3, S, S)` ImageNet-normalised frames.
            vae_latents: iterable of `(B, C, h, w)` latents of the same frames (or None items); latent t lets the
                head predict latent t+1.
            input_ids, attention_mask: optional text prepended to every stream.
            streams: a `FoveatedVLMStreams` to step (made on the first frame otherwise); after the frames it holds
                every stream's KV cache, from which `score_text` and `generate_text` go on to the text.
        """
        latents = iter(vae_latents) if vae_latents is not None else None
        for frame in frames:
            B = frame.shape[0]
            if streams is None:
                streams = FoveatedVLMStreams(self, B, input_ids, attention_mask, autoregressive)
            if not streams.states:  # prime every stream with [text, mode]; their states predict latent 1
                streams.start()
                prev_latent = self.z_vae_init.expand(B, -1, -1, -1)

            pred_fine = pred_coarse = None
            if prev_latent is not None:
                states = torch.cat([streams.states[0], streams.states[-1]], dim=0)  # (2B, E)
                pred_coarse, pred_fine = self.prediction_head(states, prev_latent).float().chunk(2)

            cache = self.encoder.encode_patches(frame)  # the frame is encoded once for every stream
            tokens, attention = self.read_coarse(cache, B, 1)  # (B, 1, E), (B, 1, P)
            stream_tokens, attn_coarse = [tokens], attention
            for k, query in enumerate(streams.queries):  # fine stream k + 1 reads with `query`
                fixation = None
                if self.config.fixation_mode == "saccade":
                    fixation, streams.saccade_positions[k] = self.encoder.saccade_fixations(
                        query.unsqueeze(1), streams.saccade_positions[k]
                    )
                tokens, attn_fine = self.read_fine(query.unsqueeze(1), cache, B, 1, fixation)
                stream_tokens.append(tokens)
            streams.step(stream_tokens)
            prev_latent = next(latents) if latents is not None else None
            yield FoveatedVLMStreamOutput(
                pred_fine=pred_fine,
                pred_coarse=pred_coarse,
                query=streams.queries[-1],
                attn_coarse=attn_coarse[:, 0],
                attn_fine=attn_fine[:, 0],
            )

    @torch.no_grad()
    def read_clip(
        self,
        pixel_values: torch.Tensor,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        autoregressive: bool = False,
    ) -> "FoveatedVLMStreams":
        """Stream a whole clip (B, T, 3, S, S) and `<video_end>`: the streams, ready for text."""
        streams = FoveatedVLMStreams(self, pixel_values.shape[0], input_ids, attention_mask, autoregressive)
        for _ in self.stream(pixel_values.unbind(1), streams=streams):
            pass
        streams.step([self.video_end_token.expand(pixel_values.shape[0], 1, -1)] * streams.num_streams, queries=False)
        return streams

    @torch.no_grad()
    def score_text(
        self,
        pixel_values: torch.Tensor,
        target_ids: torch.Tensor,
        target_labels: Optional[torch.Tensor] = None,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        mode: str = "fine",
    ) -> torch.Tensor:
        """Each clip's mean cross-entropy (nats per scored token, as `text_nll_*` of `forward`) of its text target,
        read through the streams after the frames: (B,). `mode` is one of `TEXT_MODES`: "coarse" (Pass 1 alone),
        "fine" (the parallel passes: equals `forward`'s `text_nll_fine`) or "autoregressive" (the deployed form)."""
        streams = self.read_clip(pixel_values, input_ids, attention_mask, autoregressive=mode == "autoregressive")
        index = _stream_index(mode)
        states = [streams.states[index]]  # (B, E): the state at <video_end> predicts the first target token
        if target_ids.shape[1] > 1:
            streams.step([self._embed_text(target_ids[:, :-1], target_ids.shape[0])] * streams.num_streams, queries=False)
            states.append(streams.hidden[index])  # (B, L - 1, E)
        return self.text_nll(torch.cat([states[0][:, None], *states[1:]], dim=1), target_ids, target_labels)

    @torch.no_grad()
    def generate_text(
        self,
        pixel_values: torch.Tensor,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        mode: str = "fine",
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        eos_token_id: Optional[int] = None,
        pad_token_id: Optional[int] = None,
        prompt_ids: Optional[torch.Tensor] = None,
        prompt_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Video captioning: text written after the frames and `<video_end>`, token by token with the KV cache of the
        stream `mode` names (`TEXT_MODES`): "coarse" (Pass 1 alone), "fine" (coarse + fine: the last fine stream,
        reading with the queries of the stream before it) or "autoregressive" (one stream that reads with its own
        queries). Greedy, or sampled with transformers' temperature and top-p warpers. Returns the new tokens
        (B, n <= max_new_tokens); after a clip's `eos_token_id` (default the text config's) its row holds
        `pad_token_id` (default: the eos token). The processor's `batch_decode` turns them into strings.
        `prompt_ids` (B, L), *optional*, left-padded with `prompt_mask` (B, L): text read after `<video_end>` before
        writing, e.g. a question and `\nAnswer: `, so that what is written is its answer."""
        if mode not in TEXT_MODES:
            raise ValueError(f"mode={mode!r} must be one of {TEXT_MODES}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
        eos_token_id = self.config.text_config.eos_token_id if eos_token_id is None else eos_token_id
        pad_token_id = eos_token_id if pad_token_id is None else pad_token_id
        warpers = LogitsProcessorList()
        if do_sample:
            if temperature != 1.0:
                warpers.append(TemperatureLogitsWarper(temperature))
            if top_p < 1.0:
                warpers.append(TopPLogitsWarper(top_p))
        streams = self.read_clip(pixel_values, input_ids, attention_mask, autoregressive=mode == "autoregressive")
        index = _stream_index(mode)
        B = pixel_values.shape[0]
        if prompt_ids is not None:
            if prompt_mask is not None and not prompt_mask[:, -1].all():
                raise ValueError("prompt_ids must be left-padded: the last column of prompt_mask must be 1 in every row")
            streams.step_one(index, self._embed_text(prompt_ids, B), prompt_mask)
        written = torch.zeros(B, 0, dtype=torch.long, device=pixel_values.device)
        done = torch.zeros(B, dtype=torch.bool, device=pixel_values.device)
        for _ in range(max_new_tokens):
            scores = warpers(written, self.text_logits(streams.states[index]).float())  # (B, V)
            token = torch.multinomial(scores.softmax(-1), 1)[:, 0] if do_sample else scores.argmax(-1)  # (B,)
            token = torch.where(done, pad_token_id if pad_token_id is not None else 0, token)
            written = torch.cat([written, token[:, None]], dim=1)
            if eos_token_id is not None:
                done = done | (token == eos_token_id)
            if done.all():
                break
            # Only the stream being read needs the token; the others are not used after <video_end>.
            streams.step_one(index, self._embed_text(token[:, None], B))
        return written


def _stream_index(mode: str) -> int:
    """Which stream a text mode reads: the first (Pass 1) or the last (the focused one)."""
    if mode not in TEXT_MODES:
        raise ValueError(f"mode={mode!r} must be one of {TEXT_MODES}")
    return 0 if mode == "coarse" else -1


def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count real tokens only, so left or inner padding does not shift what follows: (B, n)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


class FoveatedVLMStreams:
    """
    The LLM streams of `FoveatedVLMModel.stream`, each with its own KV cache: Pass 1's, then the fine ones
    (`fine_passes` of them, or one with `autoregressive`). Per stream: `states` (B, E), the last state, and `hidden`
    (B, n, E), the states of the last inputs; per fine stream, the query it reads the next frame with (`queries`) and
    its saccades' running sum.
    """

    def __init__(self, model: FoveatedVLMModel, B: int, input_ids=None, attention_mask=None, autoregressive=False):
        self.model = model
        self.B = B
        self.autoregressive = autoregressive
        self.num_streams = 1 + (1 if autoregressive else model.config.fine_passes)
        self.input_ids, self.mask = input_ids, attention_mask
        self.caches = [DynamicCache(config=model.config.text_config) for _ in range(self.num_streams)]
        self.states, self.hidden = [], []
        self.queries = [model.q_init.expand(B, -1)] * (self.num_streams - 1)
        self.saccade_positions = [None] * (self.num_streams - 1)

    def start(self):
        """Read `[text, mode]` into every stream."""
        model, B = self.model, self.B
        text_embeds = model._embed_text(self.input_ids, B)  # (B, text, E)
        modes = [model.coarse_token] + [model.fine_token] * (self.num_streams - 1)
        text_mask, self.mask = self.mask, None if self.mask is None else self.mask[:, :0]
        new_mask = None if text_mask is None else torch.cat([text_mask, text_mask.new_ones(B, 1)], dim=1)
        # The first frame is read with q_init: the states after [text, mode] write no query.
        self.step([torch.cat([text_embeds, mode.expand(B, 1, -1)], dim=1) for mode in modes], new_mask, queries=False)

    def step(self, inputs: list, new_mask: Optional[torch.Tensor] = None, queries: bool = True):
        """Append inputs (B, n, E), one per stream, the same n; then (`queries`) the fine streams' next queries: each
        from the stream before it (from itself with `autoregressive`)."""
        positions = self._extend_mask(inputs[0].shape[1], new_mask)
        self.hidden = [self._run(inputs[k], k, positions) for k in range(self.num_streams)]
        self.states = [hidden[:, -1] for hidden in self.hidden]
        if not queries:
            return
        query_head = self.model.query_head
        sources = self.states[1:] if self.autoregressive else self.states[:-1]
        self.queries = [query_head(state) for state in sources]  # (B, Q) each

    def step_one(self, index: int, inputs: torch.Tensor, new_mask: Optional[torch.Tensor] = None):
        """Append inputs (B, n, E) to one stream only (text being read or written; `new_mask` (B, n) marks a
        prompt's left padding); the others stop here."""
        if new_mask is not None and self.mask is None:  # every earlier input was real
            self.mask = new_mask.new_ones(self.B, self.caches[index].get_seq_length())
        positions = self._extend_mask(inputs.shape[1], new_mask)
        self.hidden[index] = self._run(inputs, index, positions)
        self.states[index] = self.hidden[index][:, -1]

    def _extend_mask(self, n: int, new_mask: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """Grow the attention mask by n inputs (all real unless `new_mask` says); their position ids (B, n)."""
        if self.mask is None:
            return None
        new_mask = self.mask.new_ones(self.B, n) if new_mask is None else new_mask
        self.mask = torch.cat([self.mask, new_mask], dim=1)
        return _position_ids(self.mask)[:, -n:]

    def _run(self, inputs: torch.Tensor, index: int, position_ids) -> torch.Tensor:
        return self.model.language_model(
            inputs_embeds=inputs, attention_mask=self.mask, position_ids=position_ids, cache=self.caches[index],
            use_cache=True,
        ).last_hidden_state


FoveatedVLMConfig.register_for_auto_class()
FoveatedVLMModel.register_for_auto_class("AutoModel")
