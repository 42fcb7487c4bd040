"""The research probes (foveated_vlm/probes.py): swapped readers, the model's class and checkpoint unchanged."""

import json

import pytest
import torch
from test_modeling import NO_GRADIENT, assert_stream_equals_forward, make_batch, make_model, without_gradient
from tiny import tiny_config

from foveated_vlm import train as train_hf
from foveated_vlm.data import model_inputs
from foveated_vlm.probes import (
    PROBES_FILE,
    FoveatedVLMProbes,
    apply_probes,
    cell_centres,
    corrupted_centres,
    from_pretrained_with_probes,
    glimpse_supervision,
    moving_box_centres,
    parameters_outside_loss,
    probes_of,
)
from modeling_foveated import FoveatedVLMFineReader, FoveatedVLMModel

SACCADE = dict(fixation_bias=True, fixation_mode="saccade", glimpse_position=True)
PROBES = {
    "mean_pool": FoveatedVLMProbes(coarse_reader="mean_pool"),
    "fixed": FoveatedVLMProbes(fine_queries="fixed"),
    "random": FoveatedVLMProbes(fine_queries="random"),
    "oracle": FoveatedVLMProbes(fine_queries="oracle"),
    "coarse_only": FoveatedVLMProbes(fine_loss_weight=0.0),
}


def make_probed(probes: FoveatedVLMProbes, seed=0, **overrides) -> FoveatedVLMModel:
    return apply_probes(make_model(seed, **overrides), probes)


def oracle_batch(config, batch_size=2) -> dict:
    """A box in the bottom-left quarter of every frame, as the collator gives `moving_boxes` (B, T, K, 4)."""
    boxes = -torch.ones(batch_size, config.num_frames, 4, 4)
    boxes[:, :, 0] = torch.tensor([0.0, 0.75, 0.25, 1.0])  # x0, y0, x1, y1: centre (y, x) = (0.75, -0.75)
    return {"moving_boxes": boxes}


def reader_inputs(model, batch: dict) -> dict:
    """The forward's `reader_kwargs` for `batch`, as the trainer makes them."""
    return {key: value for key, value in model_inputs(batch, model).items() if key == "reader_kwargs"}


# ---- Composition: the class, the weights and the checkpoint stay the model's ----


def test_probes_are_command_line_flags_and_build_a_probed_frozen_model():
    _, _, _, probes, _ = train_hf.parse_arguments(["configs/tiny.yaml", "--fine_queries", "oracle", "--fine_loss_weight", "0.5"])
    assert probes == FoveatedVLMProbes(fine_queries="oracle", fine_loss_weight=0.5) and probes.active
    model_args, data_args, _, default, _ = train_hf.parse_arguments(["configs/tiny.yaml"])
    assert not default.active and default == FoveatedVLMProbes()
    design = train_hf.build_model(model_args, data_args, (4, 16, 16), probes=default)
    assert probes_of(design) is None and type(design.fine_reader) is FoveatedVLMFineReader
    model_args, data_args, _, probes, _ = train_hf.parse_arguments(
        ["configs/tiny.yaml", "--fine_queries", "fixed", "--freeze_vision", "true"]
    )
    model = train_hf.build_model(model_args, data_args, (4, 16, 16), probes=probes)
    assert type(model) is FoveatedVLMModel and probes_of(model) == probes
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert {"query_head.weight", "query_head.bias", *NO_GRADIENT} <= frozen
    assert not any(p.requires_grad for p in model.encoder.backbone.parameters())


def test_applying_probes_keeps_the_class_and_the_weights():
    model = make_model()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    probed = apply_probes(model, PROBES["oracle"])
    assert probed is model and type(model) is FoveatedVLMModel
    assert not list(model.coarse_reader.parameters()) and not list(model.fine_reader.parameters())
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[name], value) for name, value in before.items())


class PassTwoReadsTwice(FoveatedVLMModel):
    """A subclass of the model, as a user might write one: probes must compose with it."""


def test_probes_compose_with_a_subclass_and_with_each_other():
    torch.manual_seed(0)
    model = apply_probes(PassTwoReadsTwice(tiny_config()).eval(), PROBES["fixed"])
    assert type(model) is PassTwoReadsTwice
    pixel_values, vae_latents = make_batch(model.config)
    with torch.no_grad():
        fixed = model(pixel_values, vae_latents)
        apply_probes(model, PROBES["mean_pool"])  # a second probe replaces the first, nothing is left of it
        pooled = model(pixel_values, vae_latents)
    assert probes_of(model) == PROBES["mean_pool"]
    torch.testing.assert_close(pooled.attn_coarse, torch.full_like(pooled.attn_coarse, 1 / 16))
    assert not torch.allclose(pooled.attn_fine, fixed.attn_fine)  # Pass 2 reads with the predicted queries again


@pytest.mark.parametrize(
    "settings, field",
    [
        (dict(coarse_reader="max_pool"), "coarse_reader"),
        (dict(fine_queries="learned"), "fine_queries"),
        (dict(fine_loss_weight=-1.0), "fine_loss_weight"),
        (dict(supervise_fixations=-1.0), "supervise_fixations"),
        (dict(supervise_fixations=1.0, supervise_noise=2.0), "supervise_noise"),
        (dict(supervise_distance="huber"), "supervise_distance"),
    ],
)
def test_bad_probes_name_the_field(settings, field):
    with pytest.raises(ValueError, match=field):
        FoveatedVLMProbes(**settings)


@pytest.mark.parametrize("name", ["mean_pool", "fixed", "coarse_only"])
def test_streaming_follows_the_probes(name):
    assert_stream_equals_forward(make_probed(PROBES[name]))


@pytest.mark.parametrize("name", PROBES)
def test_probe_shapes_and_gradients(name):
    model = make_probed(PROBES[name], aux_current_weight=0.5).train()
    pixel_values, vae_latents = make_batch(model.config)
    output = model(pixel_values, vae_latents, **reader_inputs(model, oracle_batch(model.config)))
    B, T, P = 2, 4, model.config.num_patches
    assert output.pred_fine.shape == output.pred_coarse.shape == vae_latents.shape
    assert output.attn_coarse.shape == output.attn_fine.shape == (B, T, P)
    output.loss.backward()
    outside = parameters_outside_loss(PROBES[name])
    assert outside and all(model.get_parameter(n).grad is None for n in outside)
    assert without_gradient(model) == sorted(NO_GRADIENT + outside, key=list(dict(model.named_parameters())).index)
    train_hf.freeze_for_training(model)
    assert without_gradient(model) == []


def test_the_design_probes_leave_the_design():
    model = make_model(aux_current_weight=0.5)
    pixel_values, vae_latents = make_batch(model.config)
    with torch.no_grad():
        expected = model(pixel_values, vae_latents)
        probed = apply_probes(model, FoveatedVLMProbes())(pixel_values, vae_latents)
    for name in ("loss", "loss_aux", "pred_fine", "queries", "attn_fine"):
        assert torch.equal(probed[name], expected[name]), name
    assert probes_of(model) is None and parameters_outside_loss(FoveatedVLMProbes()) == []
    assert model_inputs({"pixel_values": pixel_values}, model).keys() == {"pixel_values"}


def test_mean_pool_coarse_reader_averages_the_patches():
    model = make_probed(PROBES["mean_pool"])
    pixel_values, vae_latents = make_batch(model.config)
    with torch.no_grad():
        base = model(pixel_values, vae_latents)
        torch.testing.assert_close(base.attn_coarse, torch.full_like(base.attn_coarse, 1 / 16))
        model.q_coarse.normal_()  # Pass 1 no longer reads with it
        assert torch.equal(model(pixel_values, vae_latents).pred_coarse, base.pred_coarse)
        cache = model.encoder.encode_patches(pixel_values.flatten(0, 1))
        tokens, _ = model.read_coarse(cache, 2, 4)
    torch.testing.assert_close(tokens, model.dino_to_llm(cache.patch_features.mean(1)).view(2, 4, -1))


@pytest.mark.parametrize("name", ["fixed", "random"])
def test_pass2_query_probes_cut_the_llm_out_of_the_glimpse(name):
    model = make_probed(PROBES[name])
    pixel_values, vae_latents = make_batch(model.config)
    read_with = []  # what the encoder's query path reads with: Pass 1's queries, then Pass 2's
    model.encoder.query_in_proj.register_forward_pre_hook(lambda module, args: read_with.append(args[0]))
    torch.manual_seed(3)
    with torch.no_grad():
        base = model(pixel_values, vae_latents)
        model.query_head.weight.normal_()  # changes the predicted queries, not what Pass 2 reads with
        torch.manual_seed(3)
        changed = model(pixel_values, vae_latents)
        again = model(pixel_values, vae_latents)  # fresh random queries, or the same fixed ones
    assert not torch.allclose(changed.queries, base.queries)
    pass2 = read_with[3]  # (B*T, Q) of the second call
    if name == "fixed":  # every frame read with q_init
        torch.testing.assert_close(pass2, model.q_init.expand_as(pass2))
        assert torch.equal(again.attn_fine, changed.attn_fine)
        torch.testing.assert_close(changed.attn_fine, base.attn_fine)
    else:  # fresh Gaussian queries each call, as large as the predicted ones
        assert not torch.allclose(again.attn_fine, changed.attn_fine)
        rms = changed.queries.pow(2).mean().sqrt()
        torch.testing.assert_close(pass2.pow(2).mean().sqrt(), rms, rtol=0.3, atol=0)


# ---- Ground truth travels with the inputs ----


def test_oracle_fixations_are_the_moving_box_centres():
    boxes = torch.full((1, 2, 4, 4), -1.0)
    boxes[0, 0, 0] = torch.tensor([0.0, 0.5, 0.5, 1.0])  # x0, y0, x1, y1: centre x 0.25, y 0.75
    centres = moving_box_centres(boxes)
    torch.testing.assert_close(centres, torch.tensor([[[0.5, -0.5], [0.0, 0.0]]]))  # (y, x); no box -> centre
    model = apply_probes(FoveatedVLMModel(tiny_config()), FoveatedVLMProbes(fine_queries="oracle"))
    inputs = model_inputs({"frames": torch.zeros(1, 2, 8, 8, 3, dtype=torch.uint8), "moving_boxes": boxes}, model)
    assert set(inputs) == {"pixel_values", "reader_kwargs"}
    torch.testing.assert_close(inputs["reader_kwargs"]["oracle_fixations"], centres)


def test_oracle_fixations_steer_pass2_only():
    model = make_probed(PROBES["oracle"])
    pixel_values, vae_latents = make_batch(model.config)
    inputs = reader_inputs(model, oracle_batch(model.config))
    with torch.no_grad():
        output = model(pixel_values, vae_latents, **inputs)
    coords = model.encoder.patch_coordinates(16, "cpu")  # (P, 2) as (y, x)
    dynamic_centre, static_centre = output.attn_fine @ coords, output.attn_coarse @ coords  # (B, T, 2)
    assert (dynamic_centre[..., 0] > 0.4).all() and (dynamic_centre[..., 1] < -0.4).all(), dynamic_centre
    assert static_centre.abs().max() < 0.4  # Pass 1 is untouched
    with pytest.raises(ValueError, match="oracle_fixations"):
        model(pixel_values, vae_latents)
    with pytest.raises(ValueError, match="oracle_fixations must have shape"):
        model(pixel_values, vae_latents, reader_kwargs={"oracle_fixations": torch.zeros(2, 3, 2)})
    with pytest.raises(ValueError, match="moving_boxes"):
        model_inputs({}, model)
    with pytest.raises(TypeError, match="vae_latent"):
        model(pixel_values, vae_latent=vae_latents, **inputs)
    with pytest.raises(TypeError, match="oracle_fixations"):
        make_model()(pixel_values, vae_latents, **inputs["reader_kwargs"])
    with pytest.raises(ValueError, match="stream"):
        next(model.stream(pixel_values.unbind(1)))


def test_oracle_first_tells_pass1_where_the_target_is_in_frame_1_only():
    probes = FoveatedVLMProbes(coarse_reader="oracle_first")
    assert probes.needs_oracle and not FoveatedVLMProbes().needs_oracle
    model = make_probed(probes, fixation_bias=True, glimpse_position=True)
    plain = make_model(fixation_bias=True, glimpse_position=True)
    pixel_values, vae_latents = make_batch(model.config)
    inputs = reader_inputs(model, oracle_batch(model.config))
    with torch.no_grad():
        output, design = model(pixel_values, vae_latents, **inputs), plain(pixel_values, vae_latents)
    coords = model.encoder.patch_coordinates(16, "cpu")  # (P, 2) as (y, x)
    first_centre = output.attn_coarse[:, 0] @ coords  # (B, 2)
    assert (first_centre[:, 0] > 0.4).all() and (first_centre[:, 1] < -0.4).all(), first_centre
    # Frames 2..T are read as the design reads them, and Pass 2 keeps its predicted queries.
    torch.testing.assert_close(output.attn_coarse[:, 1:], design.attn_coarse[:, 1:])
    assert not torch.allclose(output.queries, design.queries)  # the LLM read where frame 1's glimpse landed
    model.train()
    model(pixel_values, vae_latents, **inputs).loss.backward()
    assert model.query_head.weight.grad.abs().sum() > 0 and model.q_coarse.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="stream"):  # a stream has no ground truth to read frame 1 with
        next(model.stream(pixel_values.unbind(1)))
    with pytest.raises(ValueError, match="fixation_bias"):
        unsteerable = make_probed(probes)
        unsteerable(pixel_values, vae_latents, **reader_inputs(unsteerable, oracle_batch(model.config)))


def test_coarse_only_trains_pass1_and_still_reports_loss_fine():
    model = make_probed(PROBES["coarse_only"], aux_current_weight=0.5).train()
    pixel_values, vae_latents = make_batch(model.config)
    output = model(pixel_values, vae_latents)
    assert not output.state_fine.requires_grad and output.loss_fine > 0
    torch.testing.assert_close(output.loss, output.loss_coarse + 0.5 * output.loss_aux)


def test_a_probed_model_saves_a_plain_checkpoint_and_loads_back_with_probes_json(tmp_path):
    model = make_probed(PROBES["oracle"])
    model.save_pretrained(tmp_path)
    assert not (tmp_path / PROBES_FILE).exists()  # the trainer writes it beside its checkpoints, not the model
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["FoveatedVLMModel"]
    assert config["auto_map"]["AutoModel"] == "modeling_foveated.FoveatedVLMModel"
    assert not (tmp_path / "probes.py").exists()
    plain = FoveatedVLMModel.from_pretrained(tmp_path)
    assert probes_of(plain) is None
    for name, value in model.state_dict().items():
        assert torch.equal(plain.state_dict()[name], value), name
    (tmp_path / PROBES_FILE).write_text(json.dumps(PROBES["oracle"].to_dict()))
    assert probes_of(from_pretrained_with_probes(tmp_path)) == PROBES["oracle"]


# ---- The calibration probes (ground truth, never a recipe) ----


@pytest.mark.parametrize("distance", ["squared", "absolute"])
@pytest.mark.parametrize("name", ["supervise_fixations", "supervise_first_glance"])
def test_glimpse_supervision_is_the_distance_to_the_target(name, distance):
    torch.manual_seed(0)
    probes = FoveatedVLMProbes(**{name: 2.0}, supervise_distance=distance)
    model = apply_probes(make_model(**SACCADE), probes).train()
    pixel_values, vae_latents = make_batch(model.config)
    centres = torch.rand(2, 4, 2) * 2 - 1
    outputs = model(pixel_values, vae_latents, reader_kwargs={"oracle_fixations": centres})
    attention = outputs.attn_coarse[:, :1] if name == "supervise_first_glance" else outputs.attn_fine[:, 1:]
    target = centres[:, :1] if name == "supervise_first_glance" else centres[:, 1:]
    coords = model.encoder.patch_coordinates(attention.shape[-1], "cpu")
    difference = (attention @ coords) - target
    expected = 2.0 * (difference.pow(2) if distance == "squared" else difference.abs()).sum(-1).mean()
    torch.testing.assert_close(glimpse_supervision(model, outputs, centres, probes), expected)
    glimpse_supervision(model, outputs, centres, probes).backward()
    trained = model.q_coarse if name == "supervise_first_glance" else model.query_head.weight  # what aims the glimpse
    assert trained.grad.abs().sum() > 0


def test_supervise_noise_moves_the_place_of_that_share_of_clips_to_a_cell_centre():
    centres = torch.rand(400, 4, 2) * 2 - 1
    torch.manual_seed(0)
    corrupted = corrupted_centres(centres, 0.25)
    moved = (corrupted != centres).any(-1).any(-1)  # (B,)
    assert 0.15 < moved.float().mean() < 0.35
    torch.testing.assert_close(corrupted[~moved], centres[~moved])
    wrong = corrupted[moved]
    assert (wrong == wrong[:, :1]).all()  # held in every frame
    assert set(wrong[:, 0].flatten().tolist()) <= {-0.75, -0.25, 0.25, 0.75}
    with pytest.raises(ValueError, match="supervise_noise"):
        FoveatedVLMProbes(supervise_noise=0.5)  # nothing supervised to corrupt


def test_supervise_misses_clip_misses_the_same_clips_at_the_same_place_every_time():
    centres = torch.rand(400, 4, 2) * 2 - 1
    torch.manual_seed(0)
    first = corrupted_centres(centres, 0.25, per_clip=True)
    torch.manual_seed(1)
    again = corrupted_centres(centres, 0.25, per_clip=True)
    torch.testing.assert_close(first, again)
    moved = (first != centres).any(-1).any(-1)
    assert 0.15 < moved.float().mean() < 0.35
    assert len(set(first[moved][:, 0].flatten().tolist())) == 4  # the wrong places spread over the grid's centres
    torch.testing.assert_close(corrupted_centres(centres[:200], 0.25, per_clip=True), first[:200])  # per clip


def test_supervise_place_cell_takes_the_centre_of_the_targets_grid_cell():
    centres = torch.tensor([[-0.9, 0.1], [0.49, 0.51], [1.0, -1.0]])
    torch.testing.assert_close(cell_centres(centres), torch.tensor([[-0.75, 0.25], [0.25, 0.75], [0.75, -0.75]]))
    probes = FoveatedVLMProbes(supervise_fixations=1.0, supervise_place="cell")
    model = apply_probes(make_model(**SACCADE), probes).train()
    pixel_values, vae_latents = make_batch(model.config)
    exact = torch.rand(2, 4, 2) * 2 - 1
    outputs = model(pixel_values, vae_latents, reader_kwargs={"oracle_fixations": exact})
    exact_probes = FoveatedVLMProbes(supervise_fixations=1.0)
    torch.testing.assert_close(glimpse_supervision(model, outputs, exact, probes),
                               glimpse_supervision(model, outputs, cell_centres(exact), exact_probes))
    with pytest.raises(ValueError, match="supervise_place"):
        FoveatedVLMProbes(supervise_place="box")


def test_the_trainer_adds_the_calibration_terms_and_writes_probes_json(tmp_path):
    from runs import tiny_arrow_dataset
    from test_trainer import training_arguments

    from foveated_vlm.data import FoveatedVLMDataCollator
    from foveated_vlm.trainer import FoveatedVLMTrainer

    probes = FoveatedVLMProbes(supervise_fixations=1.0)
    torch.manual_seed(0)
    model = apply_probes(FoveatedVLMModel(tiny_config(**SACCADE)), probes)
    trainer = FoveatedVLMTrainer(model=model, args=training_arguments(tmp_path),
                                 data_collator=FoveatedVLMDataCollator(normalize_frames=False))  # fmt: skip
    batch = trainer.data_collator([tiny_arrow_dataset(2)[i] for i in range(2)])
    model.eval()  # no dropout: the same forward twice
    with torch.no_grad():
        plain = model(**model_inputs(batch, model))
        centres = model_inputs(batch, model)["reader_kwargs"]["oracle_fixations"]
        assert torch.equal(trainer.compute_loss(model, batch), plain.loss)  # evaluation: the model's loss alone
        model.train()
        expected = plain.loss + glimpse_supervision(model, plain, centres, probes)
        torch.testing.assert_close(trainer.compute_loss(model, batch), expected)
    trainer.save_model(str(tmp_path / "saved"))
    assert json.loads((tmp_path / "saved" / PROBES_FILE).read_text()) == probes.to_dict()
    assert probes_of(from_pretrained_with_probes(str(tmp_path / "saved"))) == probes


def test_a_probed_run_draws_its_figures(tmp_path):
    """The figure callback moves the batch, then asks the readers for their inputs: an oracle run draws as any."""
    from runs import tiny_arrow_dataset
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from test_trainer import training_arguments

    from foveated_vlm.data import FoveatedVLMDataCollator
    from foveated_vlm.trainer import FoveatedVLMFigureCallback, FoveatedVLMTrainer

    clips, collator = tiny_arrow_dataset(2), FoveatedVLMDataCollator()
    model = apply_probes(FoveatedVLMModel(tiny_config()), PROBES["oracle"])
    trainer = FoveatedVLMTrainer(model=model, args=training_arguments(tmp_path, report_to="tensorboard"),
                                 eval_dataset=clips, data_collator=collator)  # fmt: skip
    trainer.add_callback(FoveatedVLMFigureCallback(clips, collator, None, 2, trainer.callback_handler))
    trainer.evaluate()
    (run,) = {path.parent for path in (tmp_path / "runs").rglob("events.out.tfevents.*")}
    assert "attention/clip_0" in EventAccumulator(str(run), size_guidance={"images": 0}).Reload().Tags()["images"]
