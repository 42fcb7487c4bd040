"""Text as a target in the model (modeling_foveated.py): the text losses of both passes, multi-fine passes, text
through the streams, greedy and sampled captions."""

import pytest
import torch
from test_modeling import make_batch, make_model
from tiny import TEXT_ONLY

from modeling_foveated import TEXT_MODES

def make_targets(B=2, L=5, vocabulary=128, seed=2):
    """Right-padded targets: the second clip's last two tokens are padding, not scored."""
    generator = torch.Generator().manual_seed(seed)
    target_ids = torch.randint(3, vocabulary, (B, L), generator=generator)
    target_labels = target_ids.clone()
    target_ids[1, -2:] = 0
    target_labels[1, -2:] = -100
    return target_ids, target_labels


def text_states(model, method, *args, **kwargs):
    """Run `method` and return the states `text_nll` was called with, one per call."""
    seen = []
    original = model.text_nll

    def recording(states, *rest, **kw):
        seen.append(states)
        return original(states, *rest, **kw)

    model.text_nll = recording
    try:
        method(*args, **kwargs)
    finally:
        del model.text_nll
    return seen


def test_text_losses_are_the_cross_entropy_of_the_scored_tokens_in_each_pass():
    model = make_model(**TEXT_ONLY)
    pixel_values, vae_latents = make_batch(model.config)
    target_ids, target_labels = make_targets()
    with torch.no_grad():
        output = model(pixel_values, vae_latents, target_ids=target_ids, target_labels=target_labels)
        states = text_states(model, model, pixel_values, vae_latents, target_ids=target_ids,
                             target_labels=target_labels)
    assert output.text_nll_fine.shape == output.text_nll_coarse.shape == (2,)
    coarse_states, fine_states = states
    for nll, hidden in ((output.text_nll_coarse, coarse_states), (output.text_nll_fine, fine_states)):
        log_probs = model.text_logits(hidden).log_softmax(-1)  # (B, L, V)
        expected = [-log_probs[0].gather(-1, target_ids[0, :, None]).mean(),
                    -log_probs[1, :3].gather(-1, target_ids[1, :3, None]).mean()]  # the padding is not scored
        torch.testing.assert_close(nll, torch.stack(expected))
    # The LM head is the language model's own: tied to its input embeddings.
    assert model.lm_head is None
    torch.testing.assert_close(model.text_logits(fine_states[:, :1]),
                               fine_states[:, :1] @ model.language_model.get_input_embeddings().weight.T)
    # Text only: the loss names the text terms alone (aux and entropy weights are 0 in the design).
    torch.testing.assert_close(output.loss, output.loss_text_fine + model.config.lambda_coarse * output.loss_text_coarse)
    torch.testing.assert_close(output.loss_text_fine, output.text_nll_fine.mean())


def test_objectives_weigh_their_terms_and_text_only_needs_targets():
    pixel_values, vae_latents = make_batch(make_model().config)
    target_ids, _ = make_targets()
    joint = make_model(text_loss_weight=0.5, latent_loss_weight=2.0, lambda_coarse=0.3)
    with torch.no_grad():
        output = joint(pixel_values, vae_latents, target_ids=target_ids)
    expected = 2.0 * (output.loss_fine + 0.3 * output.loss_coarse) + 0.5 * (
        output.loss_text_fine + 0.3 * output.loss_text_coarse)
    torch.testing.assert_close(output.loss, expected)
    # Latent only (the default) measures the text when it is given, without training on it.
    latent = make_model()
    with torch.no_grad():
        output = latent(pixel_values, vae_latents, target_ids=target_ids)
    torch.testing.assert_close(output.loss, output.loss_fine + output.loss_coarse)
    assert output.loss_text_fine is not None
    text_only = make_model(**TEXT_ONLY)
    with torch.no_grad():  # evaluated on clips without text, it measures the latents alone
        assert text_only(pixel_values, vae_latents).loss_text_fine is None
    with pytest.raises(ValueError, match="text_loss_weight=1.0 .* target_ids"):
        text_only.train()(pixel_values, vae_latents)
    with pytest.raises(ValueError, match="both 0"):
        make_model(text_loss_weight=0.0, latent_loss_weight=0.0)
    with pytest.raises(ValueError, match="target_labels needs target_ids"):
        latent(pixel_values, vae_latents, target_labels=target_ids)


def test_text_trains_the_embeddings_the_video_end_token_and_the_queries():
    model = make_model(**TEXT_ONLY, fixation_bias=True).train()
    pixel_values, vae_latents = make_batch(model.config)
    target_ids, target_labels = make_targets()
    model(pixel_values, vae_latents, target_ids=target_ids, target_labels=target_labels).loss.backward()
    for parameter in (model.video_end_token, model.language_model.get_input_embeddings().weight,
                      model.query_head.weight, model.q_coarse):
        assert parameter.grad.abs().sum() > 0
    assert model.prediction_head.film[0].weight.grad.abs().sum() == 0  # the latent head is weighed 0


@pytest.mark.parametrize("fine_passes", [1, 2, 3])
def test_every_fine_pass_keeps_the_index_rule(fine_passes):
    """Fine pass k of a model with fine_passes = N is the last pass of the same weights with fine_passes = k: checking
    the last pass for N = 1, 2, 3 checks every pass. A frame changed at t leaves every prediction before it alone."""
    model = make_model(fine_passes=fine_passes, fixation_bias=True, glimpse_position=True)
    pixel_values, vae_latents = make_batch(model.config)
    with torch.no_grad():
        reference = model(pixel_values, vae_latents)
        for t in range(model.config.num_frames - 1):  # the last frame predicts nothing
            changed = pixel_values.clone()
            changed[:, t] = torch.randn_like(changed[:, t])
            output = model(changed, vae_latents)
            torch.testing.assert_close(output.pred_fine[:, : t + 1], reference.pred_fine[:, : t + 1])
            torch.testing.assert_close(output.pred_coarse[:, : t + 1], reference.pred_coarse[:, : t + 1])
            assert not torch.allclose(output.pred_fine[:, t + 1 :], reference.pred_fine[:, t + 1 :])
    assert reference.loss_fine_passes.shape == (fine_passes,)
    torch.testing.assert_close(reference.loss_fine, reference.loss_fine_passes[-1])


def test_the_second_fine_pass_reads_with_the_first_fine_pass_queries():
    one, two = make_model(fixation_bias=True), make_model(fixation_bias=True, fine_passes=2)
    two.load_state_dict(one.state_dict())
    pixel_values, vae_latents = make_batch(one.config)
    with torch.no_grad():
        first, second = one(pixel_values, vae_latents), two(pixel_values, vae_latents)
    torch.testing.assert_close(second.loss_fine_passes[0], first.loss_fine)
    torch.testing.assert_close(second.pred_coarse, first.pred_coarse)
    torch.testing.assert_close(second.attn_fine[:, 0], first.attn_fine[:, 0])  # frame 1: q_init in every pass
    assert not torch.allclose(second.attn_fine[:, 1:], first.attn_fine[:, 1:])
    torch.testing.assert_close(second.loss, second.loss_fine_passes.sum() + second.loss_coarse)


@pytest.mark.parametrize("options", [{}, dict(fine_passes=2), dict(fixation_bias=True, fixation_mode="saccade")])
@pytest.mark.parametrize("with_prompt", [False, True])
def test_text_through_the_streams_equals_the_parallel_forward(options, with_prompt):
    model = make_model(**options)
    pixel_values, _ = make_batch(model.config)
    target_ids, target_labels = make_targets()
    prompt = {}
    if with_prompt:
        prompt = dict(input_ids=torch.tensor([[5, 6, 7], [8, 9, 0]]), attention_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]))
    with torch.no_grad():
        parallel = model(pixel_values, target_ids=target_ids, target_labels=target_labels, **prompt)
        for mode, expected in (("coarse", parallel.text_nll_coarse), ("fine", parallel.text_nll_fine)):
            streamed = model.score_text(pixel_values, target_ids, target_labels, mode=mode, **prompt)
            torch.testing.assert_close(streamed, expected, atol=1e-5, rtol=1e-4, msg=mode)
        autoregressive = model.score_text(pixel_values, target_ids, target_labels, mode="autoregressive", **prompt)
    assert autoregressive.shape == (2,) and not torch.allclose(autoregressive, parallel.text_nll_fine)


@pytest.mark.parametrize("mode", TEXT_MODES)
def test_greedy_captions_are_the_argmax_of_each_mode_and_sampling_is_seeded(mode):
    model = make_model(fine_passes=2, fixation_bias=True)
    pixel_values, _ = make_batch(model.config)
    never = -1  # no end-of-text: every row writes max_new_tokens
    with torch.no_grad():
        written = model.generate_text(pixel_values, mode=mode, max_new_tokens=6, eos_token_id=never)
        assert written.shape == (2, 6)
        # Teacher-forced through the same stream, each written token is the argmax of the state before it.
        (states,) = text_states(model, model.score_text, pixel_values, written, mode=mode)
        torch.testing.assert_close(model.text_logits(states).argmax(-1), written)
        torch.manual_seed(0)
        sampled = model.generate_text(pixel_values, mode=mode, max_new_tokens=6, eos_token_id=never, do_sample=True,
                                      temperature=0.7, top_p=0.9)
        torch.manual_seed(0)
        again = model.generate_text(pixel_values, mode=mode, max_new_tokens=6, eos_token_id=never, do_sample=True,
                                    temperature=0.7, top_p=0.9)
        assert torch.equal(sampled, again) and sampled.max() < model.config.text_config.vocab_size
        # A near-zero temperature samples the argmax.
        cold = model.generate_text(pixel_values, mode=mode, max_new_tokens=6, eos_token_id=never, do_sample=True,
                                   temperature=1e-4)
        assert torch.equal(cold, written)


def test_captions_stop_at_the_end_of_text_and_pad_after_it():
    model = make_model()
    pixel_values, _ = make_batch(model.config)
    with torch.no_grad():
        free = model.generate_text(pixel_values, max_new_tokens=4, eos_token_id=-1)
        stop = int(free[0, 0])  # make clip 0's first token the end of text
        written = model.generate_text(pixel_values, max_new_tokens=4, eos_token_id=stop, pad_token_id=7)
    for row, free_row in zip(written, free):
        # Each clip writes what it wrote freely up to its first end of text, then padding.
        end = (free_row == stop).nonzero()
        end = int(end[0]) + 1 if len(end) else len(free_row)
        assert torch.equal(row[:end], free_row[:end]) and (row[end:] == 7).all()
    assert written.shape[1] == 4 or (written == stop).any(1).all()  # it stops early only when every clip is done
    with pytest.raises(ValueError, match="mode='both' must be one of"):
        model.generate_text(pixel_values, mode="both")


@pytest.mark.parametrize("mode", TEXT_MODES)
def test_an_answer_is_written_after_its_left_padded_question(mode):
    """With a prompt (a question), each clip's answer is what the model writes after reading that clip's question
    alone: left padding changes nothing, and the written tokens are the argmax after question + answer so far."""
    model = make_model(fine_passes=2)
    pixel_values, _ = make_batch(model.config)
    questions = [[11, 12, 13], [21, 22]]  # clip 1's question is shorter: one pad on its left
    prompt_ids = torch.tensor([[11, 12, 13], [0, 21, 22]])
    prompt_mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    never = -1
    with torch.no_grad():
        batched = model.generate_text(pixel_values, mode=mode, max_new_tokens=4, eos_token_id=never,
                                      prompt_ids=prompt_ids, prompt_mask=prompt_mask)  # fmt: skip
        for b, question in enumerate(questions):
            alone = model.generate_text(pixel_values[b : b + 1], mode=mode, max_new_tokens=4, eos_token_id=never,
                                        prompt_ids=torch.tensor([question]))  # fmt: skip
            assert torch.equal(batched[b], alone[0])
            (states,) = text_states(model, model.score_text, pixel_values[b : b + 1],
                                    torch.tensor([question + batched[b].tolist()]), mode=mode)  # fmt: skip
            assert torch.equal(model.text_logits(states[:, len(question) :]).argmax(-1), batched[b : b + 1])
        assert not torch.equal(batched, model.generate_text(pixel_values, mode=mode, max_new_tokens=4, eos_token_id=never))
    with pytest.raises(ValueError, match="left-padded"):
        model.generate_text(pixel_values, prompt_ids=prompt_ids, prompt_mask=prompt_mask.flip(1))
