"""foveated_vlm/card.py: the model card of a run folder, its model-index from the logged evaluation, its licences, the
VAE and Hub id it names, and the loss it writes out term by term."""

import dataclasses

import pytest
from huggingface_hub import ModelCard
from transformers import TrainerState, TrainingArguments

from foveated_vlm.card import FoveatedVLMModelCardInfo, hub_namespace, logged_means, loss_formula, write_model_card
from tiny import LOGGED_EVAL, tiny_config, trainer_state


def card_for(tmp_path, config, log_history, info=None, **training_args) -> ModelCard:
    folder = tmp_path / "card"
    folder.mkdir(parents=True)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", **training_args)
    state = TrainerState(global_step=4, log_history=log_history)
    write_model_card(folder, config, args, state, info)
    return ModelCard.load(folder / "README.md")


def test_model_card_model_index_carries_the_logged_results(tmp_path):
    info = FoveatedVLMModelCardInfo(data_description="Synthetic clips.", eval_dataset_name="5 held-out clips",
                                    frozen=["vision"], init_from="outputs/stage-1")
    card = card_for(tmp_path, tiny_config(), trainer_state()["log_history"], info)
    results = {result.metric_type: result.metric_value for result in card.data.eval_results}
    coarse, fine = LOGGED_EVAL["eval_loss/coarse"], LOGGED_EVAL["eval_loss/fine"]
    assert results["loss_fine"] == fine and results["loss_coarse"] == coarse
    assert results["improvement"] == pytest.approx((coarse - fine) / coarse)
    t2 = (LOGGED_EVAL["eval_loss/coarse_t2"] - LOGGED_EVAL["eval_loss/fine_t2"]) / LOGGED_EVAL["eval_loss/coarse_t2"]
    assert results["improvement_t2"] == pytest.approx(t2)
    assert {result.dataset_name for result in card.data.eval_results} == {"5 held-out clips"}
    assert "0.9871" in card.text  # Table 1 in the text as well
    assert "Pass 2's policy was trained by backpropagation through the glimpses only." in card.text
    assert "| Frozen in training | vision |" in card.text and "< 0% foveation hurts" in card.text
    assert "| Started from | `outputs/stage-1` |" in card.text  # a run continued from another names it
    reset = dataclasses.replace(info, init_reset_fixations=True)
    card = card_for(tmp_path / "reset", tiny_config(), trainer_state()["log_history"], reset)
    assert "| Started from | `outputs/stage-1`, its fixation writer reset |" in card.text


def test_model_card_names_the_licences_the_vae_and_the_hub_id(tmp_path, monkeypatch):
    """DINOv3's licence where its weights are in the model (else the package's), every named part's licence, the
    VAE of the targets, the repo id from hub_model_id, and no pipeline tag (no pipeline can call the model)."""
    info = FoveatedVLMModelCardInfo(
        data_description="LLaVA clips.", datasets=["lmms-lab/LLaVA-Video-178K"],
        base_models=["facebook/dinov3-vits16-pretrain-lvd1689m", "HuggingFaceTB/SmolLM2-135M-Instruct"],
    )
    config = tiny_config(target_vae="stabilityai/sd-vae-ft-mse")
    card = card_for(tmp_path, config, [], info, hub_model_id="someone/fvlm")
    assert card.data.license == "other" and card.data.license_name == "dinov3-license"
    assert card.data.license_link.startswith("https://ai.meta.com/") and card.data.pipeline_tag is None
    assert '"someone/fvlm", trust_remote_code=True' in card.text
    for line in ("- `HuggingFaceTB/SmolLM2-135M-Instruct`: apache-2.0", "- `stabilityai/sd-vae-ft-mse`: mit",
                 "- `lmms-lab/LLaVA-Video-178K`: apache-2.0", "latents of `stabilityai/sd-vae-ft-mse`"):
        assert line in card.text, line
    # Random backbones, no hub_model_id, no token: the package's licence and the Trainer's default id as a placeholder.
    monkeypatch.setenv("HF_TOKEN", "")
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    hub_namespace.cache_clear()
    card = card_for(tmp_path / "random", tiny_config(), [])
    assert card.data.license == "apache-2.0" and '"<namespace>/card", trust_remote_code=True' in card.text


def test_model_card_without_evaluation_has_no_model_index(tmp_path):
    card = card_for(tmp_path, tiny_config(), trainer_state(with_eval=False)["log_history"])
    assert not card.data.eval_results and "Not evaluated yet" in card.text


@pytest.mark.parametrize("aux", [0.0, 0.5])
def test_card_states_every_trained_loss_term(tmp_path, aux):
    config = tiny_config(aux_current_weight=aux, lambda_coarse=0.25)
    formula = loss_formula(config)
    assert ("0.5 · loss_aux" in formula) == (aux > 0) and "0.25 · loss_coarse" in formula
    card = card_for(tmp_path, config, [])
    assert formula in card.text
    # A probe that reweights loss_fine (probes.json) is part of what was trained.
    assert loss_formula(config, {"fine_loss_weight": 0.0}).startswith("0 · loss_fine + 0.25 · loss_coarse")


def test_logs_written_before_the_rename_read_under_todays_metric_names():
    old = {"eval_tracking/dynamic": 0.3, "eval_tracking/static_first": 0.2, "eval_attention/entropy_static": 2.5}
    assert logged_means(old) == {"tracking/fine": 0.3, "tracking/coarse_first": 0.2, "attention/entropy_coarse": 2.5}
