"""Saccade fixations and the search teacher (foveated_vlm/teacher.py): causal, stream = forward, branches = re-runs."""

import json
import math

import pytest
import torch
from test_modeling import assert_stream_equals_forward, make_batch, make_model

from foveated_vlm.teacher import (
    FoveatedVLMSearchTeacher,
    FoveatedVLMTeacherArguments,
    branch_states,
    cell_mass,
    later_moves,
    pass2_fixations,
)

SACCADE = dict(fixation_bias=True, fixation_mode="saccade", glimpse_position=True)


# ---- Saccade fixations ----


def test_saccade_needs_fixation_bias_and_names_the_field():
    with pytest.raises(ValueError, match="fixation_mode"):
        make_model(fixation_mode="saccade")
    with pytest.raises(ValueError, match="fixation_mode"):
        make_model(fixation_bias=True, fixation_mode="jump")


def test_saccade_centre_is_tanh_of_the_running_sum_of_moves():
    model = make_model(**SACCADE)
    queries = torch.randn(2, 4, model.config.query_dim)
    fixations, last = model.encoder.saccade_fixations(queries)
    moves = model.encoder.fixation_proj(queries)[..., :2]
    running = torch.zeros(2, 2)
    for t in range(4):
        running = running + moves[:, t]
        torch.testing.assert_close(fixations[:, t, :2], torch.tanh(running))
    torch.testing.assert_close(last, running)
    # Continuing from a running sum equals reading the whole sequence at once (what the stream does).
    first, position = model.encoder.saccade_fixations(queries[:, :2])
    rest, _ = model.encoder.saccade_fixations(queries[:, 2:], position)
    torch.testing.assert_close(torch.cat([first, rest], dim=1), fixations)


def test_saccade_fixations_keep_the_index_rule():
    """Changing frame t changes no Pass-2 glimpse of frames <= t (their moves come from frames < t) nor any
    prediction of targets <= t."""
    model = make_model(**SACCADE)
    pixel_values, vae_latents = make_batch(model.config)
    changed = 1
    other = pixel_values.clone()
    other[:, changed] = torch.randn_like(other[:, changed])
    with torch.no_grad():
        base, moved = model(pixel_values, vae_latents), model(other, vae_latents)
    torch.testing.assert_close(moved.pred_fine[:, : changed + 1], base.pred_fine[:, : changed + 1])
    # The glimpse of frame `changed + 1` follows a move written after the changed frame.
    assert not torch.allclose(moved.attn_fine[:, changed + 1 :], base.attn_fine[:, changed + 1 :])
    assert not torch.allclose(moved.pred_fine[:, changed + 1 :], base.pred_fine[:, changed + 1 :])


def test_saccade_differs_from_absolute_fixations():
    torch.manual_seed(0)
    saccade = make_model(**SACCADE)
    absolute = make_model(fixation_bias=True, glimpse_position=True)
    absolute.load_state_dict(saccade.state_dict())
    pixel_values, vae_latents = make_batch(saccade.config)
    with torch.no_grad():
        a, b = saccade(pixel_values, vae_latents), absolute(pixel_values, vae_latents)
    torch.testing.assert_close(a.attn_fine[:, 0], b.attn_fine[:, 0])  # q_init's first move is its place
    assert not torch.allclose(a.attn_fine[:, 1:], b.attn_fine[:, 1:])


def test_saccade_streaming_equals_the_parallel_forward():
    assert_stream_equals_forward(make_model(**SACCADE))


# ---- Several queries per frame (the teacher's candidates) ----


@pytest.mark.parametrize("deep_query", [True, False])
def test_m_queries_per_frame_equal_m_separate_reads(deep_query):
    model = make_model(fixation_bias=True, deep_query=deep_query)
    pixel_values, _ = make_batch(model.config)
    with torch.no_grad():
        cache = model.encoder.encode_patches(pixel_values.flatten(0, 1))  # N = B * T frames
        N = pixel_values.shape[0] * pixel_values.shape[1]
        queries = torch.randn(N, 3, model.config.query_dim)
        fixations = torch.cat([torch.rand(N, 3, 2) * 2 - 1, torch.full((N, 3, 1), -1.5)], dim=-1)
        for own_fixations in (None, fixations):
            tokens, attention = model.encoder.query(queries, cache, own_fixations)
            assert tokens.shape[:2] == attention.shape[:2] == (N, 3)
            for m in range(3):
                one = None if own_fixations is None else own_fixations[:, m]
                token, single = model.encoder.query(queries[:, m], cache, one)
                torch.testing.assert_close(tokens[:, m], token, atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(attention[:, m], single, atol=1e-6, rtol=1e-4)


# ---- The search teacher ----


def teacher(**overrides) -> FoveatedVLMSearchTeacher:
    return FoveatedVLMSearchTeacher(FoveatedVLMTeacherArguments(**{"teacher": True, "teacher_grid": 2, **overrides}))


def test_cell_mass_sums_blocks_of_patches():
    attention = torch.arange(16.0).view(1, 16)  # a 4 x 4 patch grid, row-major
    mass = cell_mass(attention, 2)
    assert mass.tolist() == [[0 + 1 + 4 + 5, 2 + 3 + 6 + 7, 8 + 9 + 12 + 13, 10 + 11 + 14 + 15]]


@pytest.mark.parametrize("with_text", [False, True])
def test_candidate_branches_equal_full_reruns_of_pass2(with_text):
    """A candidate's state equals Pass 2 re-run with its token in place of the token of its frame."""
    model = make_model(**SACCADE)
    pixel_values, vae_latents = make_batch(model.config)
    text = {}
    if with_text:
        text = dict(input_ids=torch.tensor([[5, 6, 7], [8, 9, 0]]), attention_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]))
    B, T = pixel_values.shape[:2]
    with torch.no_grad():
        outputs = model(pixel_values, vae_latents, output_patch_cache=True, **text)
        frames = torch.tensor([[0, 2], [1, 2]])
        candidates = torch.randn(B, 2, 3, model.config.text_config.hidden_size)
        states = branch_states(model, outputs.tokens_fine, candidates, frames, **text)
        text_embeds = model._embed_text(text.get("input_ids"), B)
        for b in range(B):
            for f in range(2):
                for m in range(3):
                    tokens = outputs.tokens_fine.clone()
                    tokens[b, frames[b, f]] = candidates[b, f, m]
                    hidden = model.run_language_model(model.fine_token, tokens, text_embeds, text.get("attention_mask"))
                    # The state right after frame t's token sits at index t + 1 of [<fine>, z_1..z_T].
                    torch.testing.assert_close(states[b, f, m], hidden[b, frames[b, f] + 1], atol=1e-5, rtol=1e-4)


def test_candidate_losses_equal_the_model_loss_with_that_glimpse():
    """Scoring a candidate equals the loss of Pass 2 re-run with q_init and that fixation at the frame."""
    model = make_model(**SACCADE)
    pixel_values, vae_latents = make_batch(model.config)
    search = teacher()
    with torch.no_grad():
        outputs = model(pixel_values, vae_latents, output_patch_cache=True)
        cells = search.candidate_fixations(outputs.attn_fine.shape[-1], pixel_values.device)
        frames = torch.tensor([[1], [2]])
        losses = search.candidate_losses(model, outputs, vae_latents, None, None, frames, cells.expand(2, 1, 4, 3))
        B, T = pixel_values.shape[:2]
        cache = outputs.patch_cache
        for b in range(B):
            t = frames[b, 0].item()
            for k in range(4):
                token, attention = model.encoder.query(
                    model.q_init[None], type(cache)(**{n: _row(v, b * T + t) for n, v in cache.items()}), cells[k][None]
                )
                token, _ = model._tokens_to_llm(token, attention, 1, 1)
                tokens = outputs.tokens_fine[b : b + 1].clone()
                tokens[0, t] = token[0, 0]
                hidden = model.run_language_model(model.fine_token, tokens, model._embed_text(None, 1), None)
                prediction = model.prediction_head(hidden[:, t + 1], vae_latents[b : b + 1, t])
                expected = (prediction - vae_latents[b : b + 1, t + 1]).pow(2).mean()
                torch.testing.assert_close(losses[b, 0, k], expected, atol=1e-5, rtol=1e-4)


def _row(value, index):
    if isinstance(value, tuple):
        return tuple(v[index : index + 1] for v in value)
    return value[index : index + 1]


def test_the_teacher_never_changes_loss_fine():
    """The teacher adds terms beside the model's loss; `loss_fine` is Pass 2 with the policy's own queries."""
    model = make_model(**SACCADE).train()
    pixel_values, vae_latents = make_batch(model.config)
    torch.manual_seed(3)  # the same dropout draws in both calls
    plain = model(pixel_values, vae_latents)
    torch.manual_seed(3)
    with_cache = model(pixel_values, vae_latents, output_patch_cache=True)
    taught = teacher()(model, with_cache, vae_latents, progress=0.5)
    assert taught.loss is not None and taught.loss.item() > 0
    for name in ("loss", "loss_fine", "loss_coarse", "pred_fine", "attn_fine"):
        torch.testing.assert_close(getattr(with_cache, name), getattr(plain, name))


def test_the_teacher_reads_no_ground_truth():
    """The trainer hands the teacher the model inputs only: two batches that differ in their boxes give the same
    teacher loss and posterior, while the evaluation metric that reads the boxes tells them apart."""
    from foveated_vlm.metrics import teacher_metrics
    from foveated_vlm.trainer import teacher_inputs

    model = make_model(**SACCADE).train()
    pixel_values, vae_latents = make_batch(model.config)
    whole_frame = torch.tensor([0.0, 0.0, 1.0, 1.0]).expand(2, 4, 1, 4)
    top_left = torch.tensor([0.0, 0.0, 0.2, 0.2]).expand(2, 4, 1, 4)
    results = []
    for boxes in (whole_frame, top_left):
        batch = {"pixel_values": pixel_values, "vae_latents": vae_latents, "moving_boxes": boxes}
        torch.manual_seed(0)
        outputs = model(pixel_values, vae_latents, output_patch_cache=True)
        inputs = teacher_inputs(batch)
        assert set(inputs) <= {"vae_latents", "input_ids", "attention_mask"}
        taught = teacher()(model, outputs, **inputs, progress=0.2)
        results.append((taught, teacher_metrics(taught, batch, grid=2)))
    (first, first_metrics), (second, second_metrics) = results
    torch.testing.assert_close(first.loss, second.loss)
    torch.testing.assert_close(first.posterior, second.posterior)
    assert first_metrics["teacher/on_target"].tolist() == [1.0, 1.0]
    assert first_metrics["teacher/on_target_chance"].tolist() == [1.0, 1.0]
    assert second_metrics["teacher/on_target_chance"].tolist() == [0.25, 0.25]
    # The best cell's centre against the box's, |dy| + |dx|: every 2x2 cell centre is 1.0 from the frame's centre.
    torch.testing.assert_close(first_metrics["teacher/place_error"], torch.ones(2))
    centres = torch.tensor([[-0.5, -0.5], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.5]])
    best = centres[second.posterior.argmax(-1)]  # (B, F, 2)
    expected = (best - torch.tensor([-0.8, -0.8])).abs().sum(-1).mean(1)
    torch.testing.assert_close(second_metrics["teacher/place_error"], expected)


def test_search_gain_is_zero_where_every_place_scores_alike_and_grows_with_the_best_places_lead():
    """`teacher/search_gain` = 1 - (best candidate's loss) / (mean candidate's loss), per clip, from the losses
    alone."""
    model = make_model(**SACCADE).eval()
    pixel_values, vae_latents = make_batch(model.config)
    outputs = model(pixel_values, vae_latents, output_patch_cache=True)
    search = teacher()
    F = model.config.num_frames - 1
    alike = torch.ones(4, F)  # clip 0: the 4 cells of the 2x2 grid score alike
    one_better = torch.tensor([0.5, 1.0, 1.0, 1.0])[:, None].expand(4, F)  # clip 1: one cell halves the loss
    search.stay_losses = lambda *args: torch.stack([alike, one_better])  # (B, K, T - 1)
    with torch.no_grad():
        gain = search(model, outputs, vae_latents, progress=1.0).metrics["teacher/search_gain"]
    torch.testing.assert_close(gain, torch.tensor([0.0, 1 - 0.5 / 0.875]))


def test_a_confident_share_distils_only_the_clips_whose_search_gain_is_highest():
    """`teacher_confident_share=0.5` on two clips: the distillation and first-glance terms keep the clip where one
    place beats the others (renormalised: twice its weight) and drop the clip where every place scores alike."""
    model = make_model(**SACCADE).train()
    pixel_values, vae_latents = make_batch(model.config)
    outputs = model(pixel_values, vae_latents, output_patch_cache=True)
    F = model.config.num_frames - 1
    one_better = torch.tensor([0.5, 1.0, 1.0, 1.0])[:, None].expand(4, F)
    alike = torch.ones(4, F)

    def terms(share):
        search = teacher(teacher_wta_weight=0.0, teacher_confident_share=share)
        search.stay_losses = lambda *args: torch.stack([one_better, alike])  # (B, K, T - 1)
        return search(model, outputs, vae_latents, progress=1.0).metrics

    every, confident = terms(1.0), terms(0.5)
    for name in ("teacher/distill", "teacher/first_glance"):
        assert every[name].min() > 0
        torch.testing.assert_close(confident[name], every[name] * torch.tensor([2.0, 0.0]))


def test_gradients_reach_the_query_head_through_the_distillation():
    model = make_model(**SACCADE).train()
    pixel_values, vae_latents = make_batch(model.config)
    outputs = model(pixel_values, vae_latents, output_patch_cache=True)
    taught = teacher(teacher_wta_weight=0.0, teacher_first_glance_weight=0.0)(model, outputs, vae_latents, progress=1.0)
    assert set(taught.metrics) >= {"teacher/distill", "teacher/loss_best"}
    taught.loss.backward()
    assert model.query_head.weight.grad.abs().sum() > 0
    assert model.q_coarse.grad.abs().sum() > 0  # through the Pass-1 LLM that emits the queries
    assert model.prediction_head.film[0].weight.grad is None  # distillation alone does not train the head


def test_the_move_cost_trains_the_later_saccades_and_leaves_the_first_free():
    """`teacher_move_weight`: the mean L1 size of the moves written after frames 1..T-2, read from the policy's own
    queries; the first move (written after frame 0) and the last query (which reads no frame) cost nothing."""
    model = make_model(**SACCADE).train()
    pixel_values, vae_latents = make_batch(model.config)
    outputs = model(pixel_values, vae_latents, output_patch_cache=True)
    only_moves = dict(teacher_wta_weight=0.0, teacher_distill_weight=0.0, teacher_first_glance_weight=0.0)
    taught = teacher(**only_moves, teacher_move_weight=2.0)(model, outputs, vae_latents, progress=1.0)
    moves = model.encoder.fixation_proj(outputs.queries.detach())[..., :2]  # (B, T, 2)
    expected = moves[:, 1:-1].abs().sum(-1).mean(1)  # (B,)
    torch.testing.assert_close(taught.metrics["teacher/move"], expected.detach())
    torch.testing.assert_close(taught.loss, 2.0 * expected.mean())
    taught.loss.backward()
    assert model.query_head.weight.grad.abs().sum() > 0  # the policy that writes the queries learns to stay
    assert model.prediction_head.film[0].weight.grad is None

    queries = outputs.queries.detach().requires_grad_(True)
    later_moves(model, queries).sum().backward()
    per_query = queries.grad.abs().sum(-1)  # (B, T)
    assert (per_query[:, 0] == 0).all() and (per_query[:, -1] == 0).all() and (per_query[:, 1:-1] > 0).all()
    assert "teacher/move" not in teacher(**only_moves)(model, outputs, vae_latents, progress=1.0).metrics


def test_teacher_settings_the_model_cannot_take_are_refused_by_name(tmp_path):
    """Before any data is read: a move cost without saccades, a fixation distilled from a model without fixations."""
    from foveated_vlm import train
    from foveated_vlm.arguments import DataArguments, FoveatedTrainingArguments, ModelArguments

    def build(model, **settings):
        train.build_trainer(model, None, None, ModelArguments(), DataArguments(),
                            FoveatedTrainingArguments(output_dir=str(tmp_path)),
                            FoveatedVLMTeacherArguments(teacher=True, **settings))  # fmt: skip

    with pytest.raises(ValueError, match="^teacher_move_weight=1.0 costs the saccades' moves.*'absolute'"):
        build(make_model(fixation_bias=True), teacher_move_weight=1.0)
    with pytest.raises(ValueError, match="^teacher_distill_target='fixation' distils .*fixation_bias=False"):
        build(make_model(), teacher_distill_target="fixation", teacher_distill_from_frame=1)


@pytest.mark.parametrize("search", ["stay", "frame"])
def test_distill_from_frame_1_leaves_q_inits_read_of_frame_0_out(search):
    """Pass 2 reads frame 0 with q_init, before anything is seen: with `teacher_distill_from_frame=1` its glimpse does
    not enter the distillation, and every glimpse the policy wrote still does."""
    model = make_model(**SACCADE).train()
    pixel_values, vae_latents = make_batch(model.config)
    outputs = model(pixel_values, vae_latents, output_patch_cache=True)
    terms = dict(teacher_search=search, teacher_wta_weight=0.0, teacher_first_glance_weight=0.0)

    def distill(attn_fine, **overrides):
        outputs.attn_fine = attn_fine
        torch.manual_seed(0)  # the same scored frames for a frame search
        return teacher(**terms, **overrides)(model, outputs, vae_latents).metrics["teacher/distill"]

    base = outputs.attn_fine.detach()
    frame_0_moved, frame_1_moved = base.clone(), base.clone()
    frame_0_moved[:, 0] = base[:, 0].flip(-1)
    frame_1_moved[:, 1] = base[:, 1].flip(-1)
    torch.testing.assert_close(distill(frame_0_moved, teacher_distill_from_frame=1),
                               distill(base, teacher_distill_from_frame=1))  # fmt: skip
    assert not torch.allclose(distill(frame_1_moved, teacher_distill_from_frame=1),
                              distill(base, teacher_distill_from_frame=1))  # fmt: skip
    assert not torch.allclose(distill(frame_0_moved), distill(base))  # the default distils frame 0 too
    with pytest.raises(ValueError, match="teacher_distill_from_frame"):
        teacher(teacher_distill_from_frame=2)


def test_a_frozen_scorer_searches_and_the_model_in_training_learns(tmp_path):
    """`teacher_scorer`: the posterior is the saved scorer's own (as if it taught itself), it stays frozen, and the
    distillation trains the model in training."""
    torch.manual_seed(0)
    scorer_model = make_model(**SACCADE)
    scorer_model.save_pretrained(tmp_path / "scorer")
    model = make_model(**SACCADE).train()
    pixel_values, vae_latents = make_batch(model.config)
    settings = dict(teacher_wta_weight=0.0, teacher_distill_target="position", teacher_distill_place="best")
    frozen = teacher(teacher_scorer=str(tmp_path / "scorer"), **settings)
    outputs = model(pixel_values, vae_latents, output_patch_cache=True)
    with pytest.raises(ValueError, match="scorer_inputs"):
        frozen(model, outputs, vae_latents)
    taught = frozen(model, outputs, vae_latents, scorer_inputs={"pixel_values": pixel_values, "vae_latents": vae_latents})
    with torch.no_grad():
        own = teacher(**settings)(scorer_model.eval(), scorer_model(pixel_values, vae_latents, output_patch_cache=True),
                                  vae_latents)  # fmt: skip
    torch.testing.assert_close(taught.posterior, own.posterior)
    assert not torch.allclose(taught.posterior, teacher(**settings)(model, outputs, vae_latents).posterior)
    taught.loss.backward()
    assert model.query_head.weight.grad.abs().sum() > 0
    assert all(not parameter.requires_grad for parameter in frozen.scorer.parameters())
    assert not frozen.scorer.training
    # It runs the head once per candidate: channels-last, as train_hf.py lays out the trained head.
    conv_weights = [weight for weight in frozen.scorer.prediction_head.parameters() if weight.dim() == 4]
    assert conv_weights and all(weight.is_contiguous(memory_format=torch.channels_last) for weight in conv_weights)
    assert not all(weight.is_contiguous() for weight in conv_weights)
    with pytest.raises(ValueError, match="teacher_scorer='nowhere'"):
        teacher(teacher_scorer="nowhere")
    with pytest.raises(ValueError, match="gumbel"):
        teacher(teacher_scorer=str(tmp_path / "scorer"), teacher_search="gumbel")


@pytest.mark.parametrize("search, frames", [("stay", 0), ("frame", 0), ("frame", 2)])
def test_a_frozen_scorer_searches_each_clip_once(tmp_path, search, frames):
    """The frozen scorer's losses depend on the clip alone: a clip it has searched is looked up, not searched again,
    with the same posterior as a fresh search, in any batch order and beside clips it has not seen; a frame search
    that draws a few frames reads them from the clip's search of every frame."""
    torch.manual_seed(0)
    make_model(**SACCADE).save_pretrained(tmp_path / "scorer")
    model = make_model(**SACCADE).eval()
    pixel_values, vae_latents = make_batch(model.config)  # B = 2
    settings = dict(teacher_scorer=str(tmp_path / "scorer"), teacher_wta_weight=0.0, teacher_search=search,
                    teacher_frames=frames)
    cached = teacher(**settings)
    calls = []
    cached.scorer.register_forward_hook(lambda module, args, kwargs, output: calls.append(kwargs["vae_latents"].shape[0]),
                                        with_kwargs=True)  # fmt: skip

    def search_once(scorer_teacher, pixels, latents):
        torch.manual_seed(1)  # the frame search's draw of frames
        with torch.no_grad():
            outputs = model(pixels, latents, output_patch_cache=True)
        return scorer_teacher(model, outputs, latents, scorer_inputs={"pixel_values": pixels, "vae_latents": latents})

    first = search_once(cached, pixel_values, vae_latents)
    assert calls == [2] and len(cached.scored_clips) == 2
    again = search_once(cached, pixel_values, vae_latents)
    assert calls == [2]  # looked up
    fresh = search_once(teacher(**settings), pixel_values, vae_latents)
    for taught in (first, again):
        torch.testing.assert_close(taught.posterior, fresh.posterior)
        torch.testing.assert_close(taught.frames, fresh.frames)
    # Reordered, with a clip it has not seen: only the new clip is searched, and each clip keeps its own losses.
    other_pixels, other_latents = make_batch(model.config, seed=2)
    mixed_pixels = torch.stack([other_pixels[0], pixel_values[1], pixel_values[0]])
    mixed_latents = torch.stack([other_latents[0], vae_latents[1], vae_latents[0]])
    mixed = search_once(cached, mixed_pixels, mixed_latents)
    assert calls == [2, 1] and len(cached.scored_clips) == 3
    alone = search_once(teacher(**settings), mixed_pixels, mixed_latents)
    torch.testing.assert_close(mixed.posterior, alone.posterior)
    if frames == 0:
        torch.testing.assert_close(mixed.posterior[1:], first.posterior.flip(0))


def test_gumbel_reads_the_drawn_cell_and_trains_the_policy_through_the_draw():
    """`teacher_search="gumbel"`: the term's value is the scored loss of the one cell drawn, and its gradient reaches
    the query head (straight through the draw) and the head."""
    model = make_model(**SACCADE).train()
    pixel_values, vae_latents = make_batch(model.config)
    outputs = model(pixel_values, vae_latents, output_patch_cache=True)
    gumbel = teacher(teacher_search="gumbel")
    cells = gumbel.candidate_fixations(outputs.attn_fine.shape[-1], "cpu")
    frames = torch.tensor([[0, 2], [1, 2]])
    inputs = (model, outputs, vae_latents, None, None)
    torch.manual_seed(5)
    drawn = gumbel.gumbel_losses(inputs, cells, frames, temperature=1.0)  # (B, F)
    with torch.no_grad():
        every = gumbel.candidate_losses(*inputs, frames, cells.expand(2, 2, 4, 3))  # (B, F, K)
    # Each drawn loss is one of the four candidates' (the forward draw is one-hot).
    assert ((every - drawn.detach()[..., None]).abs().min(-1).values < 1e-5).all()
    drawn.sum().backward()
    assert model.query_head.weight.grad.abs().sum() > 0
    assert model.prediction_head.film[0].weight.grad.abs().sum() > 0

    model.zero_grad()
    taught = gumbel(model, model(pixel_values, vae_latents, output_patch_cache=True), vae_latents, progress=0.5)
    assert set(taught.metrics) >= {"teacher/wta", "teacher/loss_policy"} and "teacher/distill" not in taught.metrics
    torch.testing.assert_close(taught.posterior.sum(-1), torch.ones_like(taught.posterior[..., 0]))  # the policy's mass


def test_pass2_fixations_are_those_pass2_reads_with():
    """`pass2_fixations` works out the fixations exactly as the fine reader does: Pass 2's forward with them imposed
    equals the plain forward, and a change in them changes Pass 2."""
    for overrides in (SACCADE, dict(fixation_bias=True)):
        model = make_model(**overrides).eval()
        pixel_values, vae_latents = make_batch(model.config)
        with torch.no_grad():
            plain = model(pixel_values, vae_latents)
            fixations = pass2_fixations(model, plain.queries)  # (B, T, 3)
            moved = model(pixel_values, vae_latents, reader_kwargs={"fixations": fixations + 0.3})
            imposed = model(pixel_values, vae_latents, reader_kwargs={"fixations": fixations})
        assert fixations.shape == (*plain.queries.shape[:2], 3)
        torch.testing.assert_close(imposed.attn_fine, plain.attn_fine)
        assert not torch.allclose(moved.attn_fine, plain.attn_fine)


@pytest.mark.parametrize("search", ["frame", "stay"])
def test_fixation_distillation_pulls_the_written_fixation_towards_the_teachers_candidate(search):
    """`teacher_distill_target="fixation"`: the L1 distance of each fixation the policy writes for frames >= 1 (centre
    and log sigma) from the teacher's best candidate; its gradient reaches the query head but not the prediction
    head."""
    model = make_model(**SACCADE).train()
    pixel_values, vae_latents = make_batch(model.config)
    outputs = model(pixel_values, vae_latents, output_patch_cache=True)
    settings = dict(teacher_distill_target="fixation", teacher_distill_distance="absolute",
                    teacher_distill_place="best", teacher_distill_from_frame=1, teacher_search=search)  # fmt: skip
    search_teacher = teacher(**settings, teacher_wta_weight=0.0, teacher_first_glance_weight=0.0)
    taught = search_teacher(model, outputs, vae_latents, progress=1.0)
    cells = search_teacher.candidate_fixations(outputs.attn_fine.shape[-1], "cpu")  # (K, 3)
    written = pass2_fixations(model, outputs.queries).detach()  # (B, T, 3)
    best = cells[taught.posterior.argmax(-1)]  # (B, F, 3)
    if search == "stay":
        expected = (written[:, 1:] - best).abs().sum(-1).mean(1)
    else:
        at_frames = written.gather(1, taught.frames[..., None].expand(-1, -1, 3))
        per_frame, keep = (at_frames - best).abs().sum(-1), (taught.frames >= 1).float()
        expected = (per_frame * keep).sum(1) / keep.sum(1).clamp_min(1)
    torch.testing.assert_close(taught.metrics["teacher/distill"], expected)
    taught.loss.backward()
    assert model.query_head.weight.grad.abs().sum() > 0
    assert model.prediction_head.film[0].weight.grad is None
    with pytest.raises(ValueError, match="teacher_distill_from_frame=1"):
        FoveatedVLMTeacherArguments(teacher_distill_target="fixation")


@pytest.mark.parametrize("search", ["frame", "stay"])
def test_position_distillation_pulls_the_glimpse_towards_the_posteriors_place(search):
    model = make_model(**SACCADE).train()
    pixel_values, vae_latents = make_batch(model.config)
    outputs = model(pixel_values, vae_latents, output_patch_cache=True)
    search_teacher = teacher(teacher_distill_target="position", teacher_wta_weight=0.0, teacher_search=search)
    taught = search_teacher(model, outputs, vae_latents, progress=1.0)
    taught.loss.backward()
    assert model.query_head.weight.grad.abs().sum() > 0
    # The distance is the glimpse position's from the posterior-weighted cell centre: zero on a glimpse centred there.
    cells = search_teacher.candidate_fixations(outputs.attn_fine.shape[-1], "cpu")
    match = search_teacher._glimpse_match(model, cells)
    side = math.isqrt(outputs.attn_fine.shape[-1])
    on_cells = torch.zeros(2, side, side)
    on_cells[0, :side // 2, :side // 2] = 1  # cell 0 of a 2 x 2 grid
    on_cells[1, side // 2:, :] = 1  # cells 2 and 3
    attention = on_cells.flatten(1) / on_cells.flatten(1).sum(-1, keepdim=True)
    posterior = torch.tensor([[1.0, 0, 0, 0], [0, 0, 0.5, 0.5]])
    torch.testing.assert_close(match(posterior, attention), torch.zeros(2), atol=1e-6, rtol=0)
    assert match(posterior.flip(0), attention).min() > 0.2
    # The absolute distance: |dy| + |dx| from the same place.
    absolute = teacher(teacher_distill_target="position", teacher_distill_distance="absolute")
    where = model.glimpse_summary(attention)[:, :2]
    place = posterior.flip(0) @ cells[:, :2]
    torch.testing.assert_close(absolute._glimpse_match(model, cells)(posterior.flip(0), attention),
                               (where - place).abs().sum(-1))  # fmt: skip
    # The best place: the most probable cell's centre, not the mean (cell 2 for the second clip's tie, argmax's first).
    best = teacher(teacher_distill_target="position", teacher_distill_place="best")
    torch.testing.assert_close(best._glimpse_match(model, cells)(posterior, attention)[0], torch.tensor(0.0))
    assert best._glimpse_match(model, cells)(posterior, attention)[1] > 0.2  # the glimpse spans cells 2 and 3
    on_cell_2 = torch.zeros(side, side)
    on_cell_2[side // 2:, :side // 2] = 1
    on_cell_2 = on_cell_2.flatten()[None] / on_cell_2.sum()
    torch.testing.assert_close(best._glimpse_match(model, cells)(posterior[1:], on_cell_2), torch.zeros(1), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="teacher_distill_target"):
        teacher(teacher_distill_target="box")


def test_the_wta_term_trains_the_head_and_the_first_glance_term_q_coarse():
    model = make_model(**SACCADE).train()
    pixel_values, vae_latents = make_batch(model.config)
    outputs = model(pixel_values, vae_latents, output_patch_cache=True)
    teacher(teacher_distill_weight=0.0, teacher_first_glance_weight=0.0)(model, outputs, vae_latents).loss.backward()
    assert model.prediction_head.film[0].weight.grad.abs().sum() > 0
    assert model.query_head.weight.grad is None  # the candidates read with q_init, not the policy's queries
    model.zero_grad()
    outputs = model(pixel_values, vae_latents, output_patch_cache=True)
    teacher(teacher_wta_weight=0.0, teacher_distill_weight=0.0)(model, outputs, vae_latents).loss.backward()
    assert model.q_coarse.grad.abs().sum() > 0


def test_teacher_wta_until_stops_the_candidate_training_after_that_share_of_training():
    model = make_model(**SACCADE).train()
    pixel_values, vae_latents = make_batch(model.config)
    outputs = model(pixel_values, vae_latents, output_patch_cache=True)
    search = teacher(teacher_wta_until=0.5)
    torch.manual_seed(0)
    before = search(model, outputs, vae_latents, progress=0.4)
    after = search(model, outputs, vae_latents, progress=0.5)
    assert "teacher/wta" in before.metrics and "teacher/wta" not in after.metrics
    without = teacher(teacher_wta_weight=0.0)(model, outputs, vae_latents, progress=0.5)
    torch.testing.assert_close(after.loss, without.loss)  # what is left: distillation and first glance
    with pytest.raises(ValueError, match="teacher_wta_until"):
        teacher(teacher_wta_until=1.5)


def test_temperature_anneals_from_start_to_end_and_sharpens_the_posterior():
    search = teacher(teacher_temperature_start=1.0, teacher_temperature_end=0.01, teacher_scores="relative")
    assert search.temperature(0.0) == pytest.approx(1.0)
    assert search.temperature(1.0) == pytest.approx(0.01)
    assert search.temperature(0.5) == pytest.approx(0.1)
    losses = torch.tensor([[1.0, 0.9, 1.1, 1.0]])
    broad, sharp = search.posterior(losses, 1.0), search.posterior(losses, 0.01)
    assert broad.argmax().item() == sharp.argmax().item() == 1
    assert broad.max() < 0.3 and sharp.max() > 0.99
    # Relative to the mean: the same posterior whatever the loss's scale.
    torch.testing.assert_close(search.posterior(losses * 100, 0.1), search.posterior(losses, 0.1))
    # Standardised: nor does it depend on how far apart the candidates are.
    standardized = teacher(teacher_scores="standardized")
    close = 1 + (losses - 1) / 100
    torch.testing.assert_close(standardized.posterior(close, 1.0), standardized.posterior(losses, 1.0))
    assert search.posterior(close, 1.0).max() < standardized.posterior(close, 1.0).max()


def test_outside_training_the_teacher_searches_and_adds_no_loss():
    model = make_model(**SACCADE)
    pixel_values, vae_latents = make_batch(model.config)
    with torch.no_grad():
        outputs = model(pixel_values, vae_latents, output_patch_cache=True)
        taught = teacher()(model, outputs, vae_latents, progress=1.0)
    assert taught.loss is None
    assert taught.posterior.shape == (2, 3, 4)  # B, the T - 1 frames with a next latent, K = 2 x 2 cells
    torch.testing.assert_close(taught.posterior.sum(-1), torch.ones(2, 3))


def test_teacher_frames_draws_a_subset_of_frames_in_order():
    search = teacher(teacher_frames=2)
    frames = search._scored_frames(3, 6, "cpu")
    assert frames.shape == (3, 2)
    assert (frames[:, 1] > frames[:, 0]).all() and (frames <= 4).all()


@pytest.mark.parametrize("field,value", [("teacher_grid", 0), ("teacher_frames", -1), ("teacher_temperature_end", 0.0),
                                         ("teacher_distill_distance", "huber"), ("teacher_distill_place", "mode"),
                                         ("teacher_confident_share", 0.0)])
def test_bad_teacher_settings_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        FoveatedVLMTeacherArguments(**{field: value})


def test_a_grid_that_does_not_divide_the_patches_is_refused_by_name():
    model = make_model(**SACCADE)
    pixel_values, vae_latents = make_batch(model.config)
    with torch.no_grad():
        outputs = model(pixel_values, vae_latents, output_patch_cache=True)
    with pytest.raises(ValueError, match="teacher_grid=3"):
        teacher(teacher_grid=3)(model, outputs, vae_latents)


def test_the_written_out_loss_names_the_teacher_terms():
    from foveated_vlm.card import architecture_rows, loss_formula

    config = make_model(**SACCADE).config
    settings = FoveatedVLMTeacherArguments(teacher=True, teacher_first_glance_weight=0.0).to_dict()
    assert loss_formula(config, teacher=settings).endswith("+ 1 · teacher/wta + 1 · teacher/distill")
    rows = architecture_rows(config, teacher=settings)
    assert rows["Fixations"].startswith("saccades") and rows["Policy training"].startswith("search teacher")
    assert architecture_rows(config)["Policy training"] == "backpropagation through the glimpses only"
    gumbel = FoveatedVLMTeacherArguments(teacher=True, teacher_search="gumbel").to_dict()
    assert loss_formula(config, teacher=gumbel).endswith("loss_coarse + 1 · teacher/wta")
    early = FoveatedVLMTeacherArguments(teacher=True, teacher_wta_until=0.5).to_dict()
    assert "1 · teacher/wta (the first 50% of the steps) + 1 · teacher/distill" in loss_formula(config, teacher=early)
    assert architecture_rows(config, teacher=gumbel)["Policy training"].startswith("straight-through Gumbel-softmax")
    assert "2 candidates per clip trained by soft winner-takes-all" in rows["Policy training"]
    four = {**settings, "teacher_samples": 4, "teacher_search": "frame"}
    assert "4 candidates per scored frame trained by" in architecture_rows(config, teacher=four)["Policy training"]
    frozen = {**settings, "teacher_scorer": "outputs/stage-1", "teacher_wta_weight": 0.0}
    frozen_row = architecture_rows(config, teacher=frozen)["Policy training"]
    assert "scored by the next-latent loss of the frozen model `outputs/stage-1`" in frozen_row
    assert "winner-takes-all" not in frozen_row  # no candidate term to name
    assert "search gain" not in frozen_row
    confident = architecture_rows(config, teacher={**frozen, "teacher_confident_share": 0.5})["Policy training"]
    assert "on the 50% of each batch's clips with the highest search gain" in confident
    moving = {**frozen, "teacher_move_weight": 0.5}
    assert loss_formula(config, teacher=moving).endswith("+ 1 · teacher/distill + 0.5 · teacher/move")
    assert "an L1 cost on the saccades' later moves" in architecture_rows(config, teacher=moving)["Policy training"]
    assert "later moves" not in frozen_row
    assert "distilled (attention mass per cell) into Pass 2's glimpse and Pass 1's glimpse of the frame" in frozen_row
    fixation = {**frozen, "teacher_distill_target": "fixation"}
    assert "distilled into the fixations the policy writes (centre and spread) and, by glimpse position, into Pass 1's" \
        in architecture_rows(config, teacher=fixation)["Policy training"]


def test_a_teacher_json_written_before_the_rename_names_its_terms_today(tmp_path):
    from foveated_vlm.card import loss_formula
    from foveated_vlm.teacher import load_teacher_settings

    old = {**FoveatedVLMTeacherArguments(teacher=True).to_dict(), "teacher_static_weight": 0.5}
    del old["teacher_first_glance_weight"]
    (tmp_path / "teacher.json").write_text(json.dumps(old))
    settings = load_teacher_settings(tmp_path / "teacher.json")
    assert settings["teacher_first_glance_weight"] == 0.5 and "teacher_static_weight" not in settings
    assert loss_formula(make_model(**SACCADE).config, teacher=settings).endswith("+ 0.5 · teacher/first_glance")


def test_stay_candidates_equal_pass2_rerun_with_the_fixation_held():
    """`teacher_search="stay"`: a candidate's losses equal Pass 2 re-run with q_init and that fixation held in every
    frame."""
    model = make_model(**SACCADE)
    pixel_values, vae_latents = make_batch(model.config)
    text = dict(input_ids=torch.tensor([[5, 6, 7], [8, 9, 0]]), attention_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]))
    search = teacher(teacher_search="stay")
    B, T = pixel_values.shape[:2]
    with torch.no_grad():
        outputs = model(pixel_values, vae_latents, output_patch_cache=True, **text)
        cells = search.candidate_fixations(outputs.attn_fine.shape[-1], "cpu")  # (4, 3)
        losses = search.stay_losses(model, outputs, vae_latents, text["input_ids"], text["attention_mask"],
                                    cells.expand(B, 4, 3))
        assert losses.shape == (B, 4, T - 1)
        for k in range(4):
            tokens, _ = model._read_frames(model.q_init.expand(B, T, -1), outputs.patch_cache, B, T,
                                           cells[k].expand(B, T, 3))
            hidden = model.run_language_model(model.fine_token, tokens, model._embed_text(text["input_ids"], B),
                                              text["attention_mask"])
            prediction = model.predict_latents(hidden[:, :T], model.previous_latents(vae_latents))
            expected = (prediction[:, 1:] - vae_latents[:, 1:]).pow(2).flatten(2).mean(-1)  # (B, T - 1)
            torch.testing.assert_close(losses[:, k], expected, atol=1e-5, rtol=1e-4)


def test_stay_search_trains_every_term_with_one_posterior_per_clip():
    model = make_model(**SACCADE).train()
    pixel_values, vae_latents = make_batch(model.config)
    outputs = model(pixel_values, vae_latents, output_patch_cache=True)
    taught = teacher(teacher_search="stay")(model, outputs, vae_latents, progress=0.5)
    assert taught.posterior.shape == (2, 3, 4)
    torch.testing.assert_close(taught.posterior[:, 1:], taught.posterior[:, :1].expand(-1, 2, -1))
    assert {"teacher/wta", "teacher/distill", "teacher/first_glance"} <= set(taught.metrics)
    taught.loss.backward()
    for parameter in (model.query_head.weight, model.q_coarse, model.prediction_head.film[0].weight):
        assert parameter.grad.abs().sum() > 0


@pytest.mark.parametrize("search", ["frame", "stay"])
@pytest.mark.parametrize("sampling", ["uniform", "posterior", "held_out"])
def test_every_candidate_sampling_trains_the_head(search, sampling):
    model = make_model(**SACCADE).train()
    pixel_values, vae_latents = make_batch(model.config)
    outputs = model(pixel_values, vae_latents, output_patch_cache=True)
    search_teacher = teacher(teacher_search=search, teacher_wta_sampling=sampling, teacher_samples=3,
                             teacher_distill_weight=0.0, teacher_first_glance_weight=0.0)
    taught = search_teacher(model, outputs, vae_latents, progress=0.5)
    assert torch.isfinite(taught.loss)
    taught.loss.backward()
    assert model.prediction_head.film[0].weight.grad.abs().sum() > 0


def test_held_out_stay_sampling_trains_each_draw_on_the_other_half_of_the_targets():
    """With per-frame losses that favour cell 0 on even targets and cell 3 on odd ones, the draws chosen on the even
    targets (cell 0) train on the odd ones and vice versa."""
    search = teacher(teacher_search="stay", teacher_wta_sampling="held_out", teacher_samples=2,
                     teacher_scores="standardized")
    losses = torch.ones(1, 4, 4)  # (B, F, K)
    losses[:, 0::2, 0] = 0.0
    losses[:, 1::2, 3] = 0.0
    seen = {}

    def stay_losses(*args):
        picked = args[-1]  # (B, S, 3)
        seen["cells"] = picked
        return torch.arange(4.0).expand(1, 2, 4).clone()  # draw s, target f -> f

    search.stay_losses = stay_losses
    cells = search.candidate_fixations(16, "cpu")
    trained = search._candidate_training((None,) * 5, cells, None, losses, None, 0.01)
    torch.testing.assert_close(seen["cells"][0, 0], cells[0])  # chosen on the even targets
    torch.testing.assert_close(seen["cells"][0, 1], cells[3])  # chosen on the odd targets
    # Draw 0 trains on targets 1 and 3, draw 1 on targets 0 and 2: mean (1 + 3 + 0 + 2) / 4.
    assert trained.item() == pytest.approx(1.5)
