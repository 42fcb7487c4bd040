"""Tiny random configurations shared by the tests (widths 32-64, 2 layers), as transformers' own tests do."""

from configuration_foveated import FoveatedVLMConfig

TINY_VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=16,
    num_register_tokens=2,
)
TINY_TEXT = dict(
    model_type="llama", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
)


def tiny_config(**overrides) -> FoveatedVLMConfig:
    """64 px frames (16 patches), latents 4x8x8, T = 4."""
    settings = dict(
        vision_config=dict(TINY_VISION), text_config=dict(TINY_TEXT), image_size=64, latent_size=8,
        num_frames=4, query_dim=16, head_channels=16, head_mlp_dim=32,
    )
    settings.update(overrides)
    return FoveatedVLMConfig(**settings)


# A model trained on text alone (`--text_target caption`, docs/TRAINING.md): the latent loss weighs 0.
TEXT_ONLY = dict(text_loss_weight=1.0, latent_loss_weight=0.0)


def save_tiny_vae(path, sample_size: int) -> str:
    """A random AutoencoderKL with the SD VAE's geometry (8x downsampling, 4 latent channels), 8 channels wide."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=sample_size,
        mid_block_add_attention=False,
    )
    vae.save_pretrained(str(path))
    return str(path)


def tiny_tokenizer(words=("where", "does", "the", "square", "move", "?")):
    """A word-level tokenizer built offline (no Hub download in the tests): [PAD] 0, [UNK] 1, then `words` in order,
    then the end of text [EOS]."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(["[PAD]", "[UNK]", *words, "[EOS]"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")


def save_tiny_tokenizer(folder) -> str:
    """`tiny_tokenizer()` saved as a folder, for `--tokenizer` in training runs of tiny models (vocabulary 128)."""
    tiny_tokenizer().save_pretrained(str(folder))
    return str(folder)


def numbered_tokenizer(vocab_size: int):
    """A word-level tokenizer that covers a tiny LLM's whole vocabulary, built offline: <unk> 0, <pad> 1, then the
    words w2 .. w{vocab_size - 1}."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<pad>": 1, **{f"w{i}": i for i in range(2, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>")


# ---- A run's log history, as the trainer writes it ----

# A final evaluation as the trainer logs it (values chosen to be recognisable in the text, not measured).
LOGGED_EVAL = {
    "eval_loss": 2.0,
    "eval_loss/fine": 0.9871,
    "eval_loss/coarse": 1.0123,
    "eval_loss/fine_t2": 0.9512,
    "eval_loss/coarse_t2": 0.9634,
    "eval_loss/copy_t2": 1.8765,
    "eval_improvement_se": 0.0031,
    "eval_attention/entropy_coarse": 2.701,
    "eval_attention/entropy_fine": 2.689,
    "eval_diag/state_contribution_fine": 0.0123,
    "eval_tracking/fine": 0.2346,
    "eval_tracking/coarse": 0.1876,
    "eval_tracking/chance": 0.1567,
}


def trainer_state(with_eval: bool = True) -> dict:
    log = [
        {"step": 2, "loss": 2.2, "learning_rate": 1e-3, "loss/fine": 1.10, "loss/coarse": 1.12},
        {"step": 4, "loss": 2.0, "learning_rate": 5e-4, "loss/fine": 0.98, "loss/coarse": 1.02},
        {"step": 4, "train_runtime": 3.0, "train_loss": 2.1},
    ]
    if with_eval:
        log.insert(2, {"step": 4, **LOGGED_EVAL})
    return {"global_step": 4, "max_steps": 4, "train_batch_size": 2, "log_history": log}
