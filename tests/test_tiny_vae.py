"""foveated_vlm/tiny_vae.py: the tiny VAE fitted on synthetic frames, reused from a folder made with the same settings."""

from pathlib import Path

import torch
from diffusers import AutoencoderKL

from foveated_vlm.tiny_vae import make_tiny_vae


def test_make_tiny_vae_reuses_a_folder_with_the_same_settings(tmp_path, caplog, capsys):
    caplog.set_level("INFO", logger="foveated_vlm.tiny_vae")
    torch.manual_seed(7)
    expected_draw = torch.rand(3)
    torch.manual_seed(7)
    path = make_tiny_vae(tmp_path / "vae", image_size=32, num_train_frames=8, steps=2)
    assert "held-out PSNR" in caplog.text
    assert "fitting the tiny VAE: 100%" in capsys.readouterr().err  # a progress bar: fitting takes a minute
    # Fitting drew from its own seeded generator: the caller's random state is where it was.
    assert torch.equal(torch.rand(3), expected_draw)
    caplog.clear()
    vae = AutoencoderKL.from_pretrained(path)
    assert vae.config.latent_channels == 4 and len(vae.config.block_out_channels) == 4  # 8x downsampling
    weights = Path(path) / "diffusion_pytorch_model.safetensors"
    written = weights.stat().st_mtime_ns
    assert make_tiny_vae(tmp_path / "vae", image_size=32, num_train_frames=8, steps=2) == path
    assert weights.stat().st_mtime_ns == written and "held-out PSNR" not in caplog.text
    make_tiny_vae(tmp_path / "vae", image_size=32, num_train_frames=8, steps=3)
    assert weights.stat().st_mtime_ns != written
