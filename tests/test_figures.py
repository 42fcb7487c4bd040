"""foveated_vlm/figures.py: the attention maps of a clip, and figures 1 and 2 drawn from a run's log history."""

import numpy as np
import pytest
from matplotlib.patches import Rectangle

from foveated_vlm.figures import plot_attention_maps, plot_losses, plot_ratio


def test_attention_maps_share_one_colour_scale_and_outline_the_present_boxes():
    T, S, grid = 3, 32, 4
    frames = np.random.default_rng(0).integers(0, 256, (T, S, S, 3), dtype=np.uint8)
    attn_coarse = np.full((T, grid * grid), 1 / grid**2)  # uniform
    attn_fine = np.zeros((T, grid * grid))
    attn_fine[:, 6] = 1.0  # all on the patch of row 1, column 2
    boxes = np.full((T, 2, 4), -1.0)  # normalised x0, y0, x1, y1; negative rows are absent
    boxes[0, 0] = [0.25, 0.5, 0.5, 1.0]
    boxes[2] = [[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]
    figure = plot_attention_maps(frames, attn_coarse, attn_fine, boxes)
    axes = np.array(figure.axes).reshape(2, T)  # rows static, dynamic; one column per frame
    for row, attention in enumerate((attn_coarse, attn_fine)):
        for t in range(T):
            frame, heatmap = axes[row, t].get_images()
            np.testing.assert_array_equal(np.asarray(frame.get_array()), frames[t])
            np.testing.assert_allclose(np.asarray(heatmap.get_array()), attention[t].reshape(grid, grid))
            # One scale for both rows, from 0: the uniform row stays flat instead of being stretched.
            assert heatmap.get_clim() == (0.0, 1.0)
            outlines = [patch for patch in axes[row, t].patches if isinstance(patch, Rectangle)]
            assert len(outlines) == [1, 0, 2][t], (row, t)
    (outline,) = axes[1, 0].patches
    assert (outline.get_x(), outline.get_y(), outline.get_width(), outline.get_height()) == (8, 16, 8, 16)  # in px
    with pytest.raises(ValueError, match="square number"):
        plot_attention_maps(frames, attn_coarse[:, :15], attn_fine[:, :15])


def test_ratio_is_coarse_over_fine_and_an_empty_log_is_noted():
    train = {"step": np.array([1, 2, 3]), "fine": np.array([1.0, 0.8, 0.5]), "coarse": np.array([1.0, 1.0, 1.0])}
    evaluation = {"step": np.array([3]), "fine": np.array([0.4]), "coarse": np.array([0.6])}
    (ax,) = plot_ratio(train, evaluation).axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    np.testing.assert_allclose(lines["train"].get_ydata(), [1.0, 1.25, 2.0])
    np.testing.assert_allclose(lines["eval"].get_ydata(), [1.5])
    np.testing.assert_allclose(lines["1.0 (no effect)"].get_ydata(), [1.0, 1.0])

    (ax,) = plot_losses(train, evaluation).axes
    assert ax.get_yscale() == "log"
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"train loss/fine", "train loss/coarse", "eval loss/fine", "eval loss/coarse"}
    np.testing.assert_allclose(lines["eval loss/coarse"].get_ydata(), [0.6])
    empty = {"step": np.array([]), "fine": np.array([]), "coarse": np.array([])}
    for plot in (plot_losses, plot_ratio):
        (ax,) = plot(empty, empty).axes
        assert [line.get_label() for line in ax.get_lines()] in ([], ["1.0 (no effect)"])
        assert [text.get_text() for text in ax.texts] == ["no fine/coarse losses in the log history"]
