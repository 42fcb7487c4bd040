"""Configuration of the foveated video model (remote code: flat, self-contained, only transformers at top level)."""

import warnings
from typing import Optional

from transformers import AutoConfig, PretrainedConfig
from transformers.models.dinov3_vit import DINOv3ViTConfig
from transformers.models.llama import LlamaConfig

__all__ = ["DEFAULT_IMAGE_SIZE", "DEFAULT_NUM_FRAMES", "FoveatedVLMConfig"]

# The frame side S and the frames per clip T of the design; the processor and the data pipeline default to them.
DEFAULT_IMAGE_SIZE = 256
DEFAULT_NUM_FRAMES = 8

# DINOv3ViTConfig's defaults are the shapes of facebook/dinov3-vits16-pretrain-lvd1689m (ViT-S/16) except for its
# 4 register tokens.
DINOV3_VITS16_REGISTER_TOKENS = 4

# Shapes of HuggingFaceTB/SmolLM2-135M-Instruct (a Llama; LlamaConfig's defaults are Llama-2-7B's).
SMOLLM2_135M_DEFAULTS = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
)

HEAD_TYPES = ("film", "spatial")
FIXATION_MODES = ("absolute", "saccade")


class FoveatedVLMConfig(PretrainedConfig):
    r"""
    Configuration of [`FoveatedVLMModel`]: a DINOv3 ViT reads each frame once, a query token reads one visual token
    per frame out of the cached encoder keys/values, an LLM reads the tokens and emits the next query, and a
    prediction head predicts the next frame's VAE latent.

    The class defaults are the design in docs/DESIGN.md. The shipped `configs/tiny.yaml` switches on six of the
    options below on top of it: `head_type="spatial"`, `head_residual=True`, `aux_current_weight=1.0`,
    `fixation_bias=True`, `glimpse_position=True` and `token_dim=8`.

    The config records the model's design only. Freezing is training policy (`train_hf.py --freeze_vision`), and the
    research probes (oracle fixations, fixed or random Pass-2 queries, coarse-only training) live in
    `foveated_vlm/probes.py`.

    Args:
        vision_config (`dict` or `DINOv3ViTConfig`, *optional*):
            The vision encoder; defaults to DINOv3 ViT-S/16 shapes.
        text_config (`dict` or `PretrainedConfig`, *optional*):
            Any decoder-only LM config; defaults to SmolLM2-135M (Llama) shapes.
        image_size (`int`, *optional*, defaults to 256):
            Frame side S in pixels; a multiple of the vision patch size.
        num_frames (`int`, *optional*, defaults to 8):
            Frames per clip T used in training (the model accepts any T >= 2 at run time).
        query_dim (`int`, *optional*, defaults to 384):
            Width of the query vectors emitted by the LLM (`q_static`, `q_init`, `query_head` output).
        latent_channels (`int`, *optional*, defaults to 4):
            Channels of the target VAE latent.
        latent_size (`int`, *optional*, defaults to 32):
            Side of the target VAE latent; must be `image_size / 8` (the SD VAE downsamples 8x).
        lambda_coarse (`float`, *optional*, defaults to 1.0):
            Weight of Pass 1's losses against Pass 2's: `loss = latent_loss_weight * (loss_fine + lambda_coarse *
            loss_coarse) + text_loss_weight * (loss_text_fine + lambda_coarse * loss_text_coarse) (+
            aux_current_weight * loss_aux + fine_entropy_weight * entropy_fine)`; with `fine_passes > 1` every
            fine pass's losses join their Pass-2 term.
        latent_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight of the next-frame latent objective (the design's).
        text_loss_weight (`float`, *optional*, defaults to 0.0):
            Weight of text as a target: after the frames each pass reads `<video_end>` and the clip's text with
            teacher forcing, and its cross-entropy on the scored tokens (`target_labels`) is `loss_text_coarse` /
            `loss_text_fine`, through the language model's own LM head. 0 with `latent_loss_weight` 1: latent only
            (the default); 1 and 0: text only; both above 0: joint. The text losses are measured whenever
            `target_ids` are given, whatever the weights.
        fine_passes (`int`, *optional*, defaults to 1):
            How many fine passes follow the static one. Fine pass k+1 reads frame t with the query fine pass k
            wrote after frame t-1 (fine pass 1 reads with Pass 1's); `loss_fine` is the last pass's. 1 is the design.
        deep_query (`bool`, *optional*, defaults to `True`):
            `True`: the query joins every encoder layer, attending to that layer's cached keys/values.
            `False` ("shallow"): one cross-attention of the query over the final encoder features.
        head_type (`str`, *optional*, defaults to `"film"`):
            `"film"`: a per-channel FiLM head. `"spatial"`: the state is also broadcast over the latent grid with
            x/y coordinate channels, so it can say *where* something changes.
        head_channels (`int`, *optional*, defaults to 128):
            Conv width of the prediction head.
        head_mlp_dim (`int`, *optional*, defaults to 512):
            Hidden width of the MLP mapping the LLM state to FiLM's gamma and beta.
        head_residual (`bool`, *optional*, defaults to `False`):
            Predict `previous latent + output` instead of the full latent.
        fixation_bias (`bool`, *optional*, defaults to `False`):
            Give the query a spatial component: a fixation point and spread, read from the query vector by a learned
            projection, add `-|p - mu|^2 / (2 sigma^2)` to its attention logits over patch p at every layer. Both
            passes have it; the static query's fixation is the same for every frame.
        fixation_mode (`str`, *optional*, defaults to `"absolute"`):
            With `fixation_bias`, what a Pass-2 query's fixation says. `"absolute"`: the place to look at. `"saccade"`:
            a move from where the previous glimpse looked; the centre for frame t is `tanh` of the running sum of the
            moves written by the queries that read frames 1..t, so "stay" is the zero move and the LLM never has to
            recall a place (docs/RESULTS.md: a small LLM does not carry an absolute place forward). Pass 1's
            `q_static` is the same query in every frame and keeps its absolute fixation. Without `fixation_bias` the
            query selects by content only (the founding design).
        fixation_init_spread (`float`, *optional*, defaults to 1.0):
            With `fixation_bias`: sigma of every fixation before training, in half-widths of the frame (1.0: a broad
            bias over the whole frame; 0.14: about the half-side of a synthetic object, an oracle fixation's spread).
        glimpse_position (`bool`, *optional*, defaults to `False`):
            Tell the LLM where the glimpse landed: the attention-weighted mean patch position and spread are projected
            and added to each visual token (both passes).
        aux_current_weight (`float`, *optional*, defaults to 0.0):
            Weight of an auxiliary loss `loss_aux` in both passes: the shared head, given the state that has just
            read frame t and latent t-1, reconstructs latent t. It asks the state to carry what changed in the frame
            it saw, which the next-frame loss alone does not get started (the head ignores a state that carries
            nothing). Predictions and `loss_fine`/`loss_coarse` still obey the index rule.
        fine_entropy_weight (`float`, *optional*, defaults to 0.0):
            Weight of the mean entropy (nats) of Pass 2's attention, added to the loss: a price on diffuse glimpses,
            the remedy the founding guide gives for queries that stay uniform. It pushes every Pass-2 query towards
            one place; which place still comes from the next-frame loss alone.
        query_logit_scale (`float`, *optional*):
            A learned factor on the query's content attention logits (over the cached keys, both passes), starting
            at this value; `None` keeps the encoder's own scale. A small encoder trained from scratch has small
            logits, so a query's attention starts near uniform and its content selectivity learns slowly; a larger
            factor lets it pick out what it attends to.
        token_dim (`int`, *optional*):
            Width of a linear bottleneck every visual token passes through before the LLM (both passes). `None`
            keeps the encoder width. A narrow token cannot summarise a whole frame, which is where a glimpse that
            picks *what* to summarise can beat a static one.
        query_init_std (`float`, *optional*, defaults to 1.0):
            Std of the learned `q_static` and `q_init` vectors.
        mode_token_init_std (`float`, *optional*, defaults to 0.02):
            Std of the learned `<coarse>`/`<fine>` mode tokens and `z_vae_init`.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Std of the new linear/conv layers.
        target_vae (`str`, *optional*):
            The VAE (Hub id or folder) whose latents the model learned to predict, recorded by the training script:
            latents of another VAE mean something else to the head.
    """

    model_type = "foveated_vlm"
    sub_configs = {"vision_config": AutoConfig, "text_config": AutoConfig}

    def __init__(
        self,
        vision_config=None,
        text_config=None,
        image_size: int = DEFAULT_IMAGE_SIZE,
        num_frames: int = DEFAULT_NUM_FRAMES,
        query_dim: int = 384,
        latent_channels: int = 4,
        latent_size: int = 32,
        lambda_coarse: float = 1.0,
        latent_loss_weight: float = 1.0,
        text_loss_weight: float = 0.0,
        fine_passes: int = 1,
        deep_query: bool = True,
        head_type: str = "film",
        head_channels: int = 128,
        head_mlp_dim: int = 512,
        head_residual: bool = False,
        fixation_bias: bool = False,
        fixation_mode: str = "absolute",
        fixation_init_spread: float = 1.0,
        glimpse_position: bool = False,
        aux_current_weight: float = 0.0,
        fine_entropy_weight: float = 0.0,
        query_logit_scale=None,
        token_dim=None,
        query_init_std: float = 1.0,
        mode_token_init_std: float = 0.02,
        initializer_range: float = 0.02,
        target_vae: Optional[str] = None,
        **kwargs,
    ):
        if "dynamic_entropy_weight" in kwargs:  # its name before this release; config.json files saved then still load
            warnings.warn("dynamic_entropy_weight is renamed fine_entropy_weight; the old name goes in the next release",
                          FutureWarning, stacklevel=2)
            fine_entropy_weight = kwargs.pop("dynamic_entropy_weight")
        if vision_config is None:
            vision_config = DINOv3ViTConfig(num_register_tokens=DINOV3_VITS16_REGISTER_TOKENS, image_size=image_size)
        elif isinstance(vision_config, dict):
            vision_config = DINOv3ViTConfig(**{k: v for k, v in vision_config.items() if k != "model_type"})
        if text_config is None:
            text_config = LlamaConfig(**SMOLLM2_135M_DEFAULTS)
        elif isinstance(text_config, dict):
            text_model_type = text_config.get("model_type", "llama")
            text_config = AutoConfig.for_model(
                text_model_type, **{k: v for k, v in text_config.items() if k != "model_type"}
            )
        self.vision_config = vision_config
        self.text_config = text_config

        self.image_size = image_size
        self.num_frames = num_frames
        self.query_dim = query_dim
        self.latent_channels = latent_channels
        self.latent_size = latent_size
        self.lambda_coarse = lambda_coarse
        self.latent_loss_weight = latent_loss_weight
        self.text_loss_weight = text_loss_weight
        self.fine_passes = fine_passes
        self.deep_query = deep_query
        self.head_type = head_type
        self.head_channels = head_channels
        self.head_mlp_dim = head_mlp_dim
        self.head_residual = head_residual
        self.fixation_bias = fixation_bias
        self.fixation_mode = fixation_mode
        if fixation_init_spread <= 0:
            raise ValueError(f"fixation_init_spread must be > 0 (a sigma), got {fixation_init_spread}")
        self.fixation_init_spread = fixation_init_spread
        self.glimpse_position = glimpse_position
        self.aux_current_weight = aux_current_weight
        self.fine_entropy_weight = fine_entropy_weight
        if query_logit_scale is not None and query_logit_scale <= 0:
            raise ValueError(f"query_logit_scale must be > 0 (a factor on the logits) or None, got {query_logit_scale}")
        self.query_logit_scale = query_logit_scale
        self.token_dim = token_dim
        self.query_init_std = query_init_std
        self.mode_token_init_std = mode_token_init_std
        self.initializer_range = initializer_range
        self.target_vae = target_vae
        # A config.json with keys this class does not define still loads: transformers keeps unknown keys
        # as plain attributes, which the model never reads.
        super().__init__(**kwargs)
        self._validate()

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.vision_config.patch_size) ** 2

    def _validate(self):
        patch_size = self.vision_config.patch_size
        if self.image_size <= 0 or self.image_size % patch_size != 0:
            raise ValueError(
                f"image_size={self.image_size} must be a positive multiple of vision_config.patch_size={patch_size}"
            )
        if self.latent_size * 8 != self.image_size:
            raise ValueError(
                f"latent_size={self.latent_size} must be image_size / 8 = {self.image_size / 8} "
                "(the VAE downsamples 8x)"
            )
        if self.num_frames < 2:
            raise ValueError(f"num_frames={self.num_frames} must be >= 2: the model predicts frame t from frames < t")
        if self.fixation_mode not in FIXATION_MODES:
            raise ValueError(f"fixation_mode={self.fixation_mode!r} must be one of {FIXATION_MODES}")
        if self.fixation_mode == "saccade" and not self.fixation_bias:
            raise ValueError("fixation_mode='saccade' moves the query's fixation: it needs fixation_bias=True")
        if self.head_type not in HEAD_TYPES:
            raise ValueError(f"head_type={self.head_type!r} must be one of {HEAD_TYPES}")
        if self.latent_size % 2 != 0:
            raise ValueError(f"latent_size={self.latent_size} must be even (the head downsamples it by 2)")
        for name in ("query_dim", "latent_channels", "head_channels", "head_mlp_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        vision_width = self.vision_config.hidden_size
        if vision_width % self.vision_config.num_attention_heads != 0:
            raise ValueError(
                f"vision_config.hidden_size={vision_width} must be divisible by "
                f"vision_config.num_attention_heads={self.vision_config.num_attention_heads}"
            )
        if self.aux_current_weight < 0:
            raise ValueError(f"aux_current_weight={self.aux_current_weight} must be >= 0")
        for name in ("latent_loss_weight", "text_loss_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.latent_loss_weight == 0 and self.text_loss_weight == 0:
            raise ValueError("latent_loss_weight and text_loss_weight are both 0: the model would train on nothing")
        if self.fine_passes < 1:
            raise ValueError(f"fine_passes={self.fine_passes} must be >= 1 (1: the design's one fine pass)")
        if self.lambda_coarse < 0:
            raise ValueError(f"lambda_coarse={self.lambda_coarse} must be >= 0")
        if self.token_dim is not None and self.token_dim <= 0:
            raise ValueError(f"token_dim={self.token_dim} must be positive or None")
