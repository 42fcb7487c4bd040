"""foveated_vlm/report_text.py: the report's records read from a logged evaluation, and report.html from report.md with
the images beside it embedded."""

import base64
import math

import pytest
from matplotlib.figure import Figure
from tiny import LOGGED_EVAL

from foveated_vlm.report_text import FoveatedVLMHeldOut, markdown_to_html


def test_held_out_record_reads_the_logged_evaluation_and_derives_the_improvements():
    held_out = FoveatedVLMHeldOut.from_logged({"step": 4, **LOGGED_EVAL}, source="the logged evaluation")
    assert (held_out.source, held_out.step) == ("the logged evaluation", 4)
    assert held_out.loss_fine == LOGGED_EVAL["eval_loss/fine"] and held_out.loss_coarse == LOGGED_EVAL["eval_loss/coarse"]
    assert held_out.loss_copy_t2 == LOGGED_EVAL["eval_loss/copy_t2"]
    assert held_out.entropy_coarse == LOGGED_EVAL["eval_attention/entropy_coarse"]
    assert held_out.tracking_fine == LOGGED_EVAL["eval_tracking/fine"] and held_out.has_tracking
    # The log holds the losses, not the improvements: (coarse - fine) / coarse, on all targets and on t >= 2.
    coarse, fine = LOGGED_EVAL["eval_loss/coarse"], LOGGED_EVAL["eval_loss/fine"]
    assert held_out.improvement == pytest.approx((coarse - fine) / coarse)
    coarse_t2, fine_t2 = LOGGED_EVAL["eval_loss/coarse_t2"], LOGGED_EVAL["eval_loss/fine_t2"]
    assert held_out.improvement_t2 == pytest.approx((coarse_t2 - fine_t2) / coarse_t2)
    assert held_out.loss_text_fine is None and held_out.improvement_text is None  # not logged: absent, not 0
    # loss_fine is the mean over T targets: v_1's share is what the T - 1 later ones leave.
    assert held_out.first_target_share(4) == pytest.approx(1 - 3 / 4 * fine_t2 / fine)

    losses_only = FoveatedVLMHeldOut.from_logged({"eval_loss/fine": 0.5, "eval_loss/coarse": 0.4}, source="measured")
    assert losses_only.improvement == pytest.approx(-0.25) and losses_only.step is None
    assert not losses_only.has_tracking and losses_only.first_target_share(4) is None
    assert math.isnan(FoveatedVLMHeldOut(source="nothing logged").loss_fine)


def test_html_embeds_the_images_beside_the_report_and_renders_tables_and_code(tmp_path):
    figure = Figure(figsize=(1, 1))
    figure.subplots().plot([0, 1], [1, 0])
    figure.savefig(tmp_path / "fig1_losses.png")
    text = "\n".join([
        "# Report", "", "| metric | value |", "|---|---|", "| loss_fine | 0.9871 |", "",
        "![Figure 1](fig1_losses.png)", "", "![elsewhere](https://example.org/figure.png)", "",
        "```", "Pass 1 -> Pass 2", "```",
    ])  # fmt: skip
    page = markdown_to_html(text, tmp_path, title="Foveated VLM: report on A & B")
    embedded = base64.b64encode((tmp_path / "fig1_losses.png").read_bytes()).decode("ascii")
    assert f'src="data:image/png;base64,{embedded}"' in page and 'src="fig1_losses.png"' not in page
    assert 'src="https://example.org/figure.png"' in page  # only the images beside the report are embedded
    assert "<table>" in page and "<td>0.9871</td>" in page and "<pre><code>Pass 1 -&gt; Pass 2" in page
    assert page.startswith("<!DOCTYPE html>") and "<title>Foveated VLM: report on A &amp; B</title>" in page
