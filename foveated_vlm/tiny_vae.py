"""A tiny VAE with the SD VAE's geometry, fitted locally on synthetic frames: the offline default of configs/tiny.yaml.

    synthetic_fitting_frames -> build_tiny_vae (an exact 8x average-pool autoencoder) -> fit_tiny_vae -> save
    make_tiny_vae runs the four and reuses a folder that holds one made with the same settings.

The VAE is a `diffusers.AutoencoderKL` (8x downsampling, 4 latent channels, unit-std scaled latents), so everything
downstream treats it as the SD VAE.
"""

import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from transformers.utils.logging import tqdm

from foveated_vlm.metrics import psnr
from processing_foveated import frames_to_vae_pixel_values
from foveated_vlm.synthetic import DIFFICULTIES, generate_video


__all__ = ["build_tiny_vae", "fit_tiny_vae", "make_tiny_vae", "reconstruction_psnr", "synthetic_fitting_frames"]

logger = logging.getLogger(__name__)

# Bump when the build or the fit changes the weights: folders made before are then refitted.
TINY_VAE_VERSION = 2
SETTINGS_FILE = "tiny_vae_settings.json"  # written last: its presence marks a complete folder

# Architecture: the SD VAE's geometry at a fraction of its width.
TINY_VAE_WIDTH = 16  # channels at every level; equal widths keep every shortcut an identity
TINY_VAE_LEVELS = 4  # 3 stride-2 steps between 4 levels: 8x, as the SD VAE
LATENT_CHANNELS = 4  # as the SD VAE

# Fitting data. Videos use seeds from these offsets on: disjoint from synthetic_videos' train (seed + i) and eval
# (seed + EVAL_SEED_OFFSET + i) videos.
FIT_SEED_OFFSET = 2_000_000
HELD_OUT_SEED_OFFSET = 2_500_000
FRAMES_PER_FITTING_VIDEO = 8
# 32 frames of 4 videos: full-resolution passes dominate the time of make_tiny_vae after the fit itself.
NUM_HELD_OUT_FRAMES = 32
# Frames whose latents set the scaling factor: enough for a stable std, cheap at full resolution.
NUM_SCALING_FRAMES = 64

# Fitting. A low learning rate: the anchor channels amplify every weight that reads them, and a larger step first
# undoes the initialisation.
FIT_CROP = 64  # px; a fully convolutional VAE sees the same statistics on crops as on whole frames
FIT_BATCH_SIZE = 8
FIT_LEARNING_RATE = 1e-4
KL_WEIGHT = 1e-4  # per latent element: the posterior stays nearly deterministic, as the SD VAE's

# The pooling initialisation (see _init_as_pooling_autoencoder).
ANCHOR = 10.0  # a constant channel pair (+A, -A) that fixes the one-group norms' std
SILU_OFFSET = 10.0  # SiLU(x + 10) = x + 10 to 5e-4: the norm's SiLU passes the signal linearly
INITIAL_LOG_VARIANCE = -10.0  # a nearly deterministic posterior to start with


def synthetic_fitting_frames(first_seed: int, num_images: int, image_size: int) -> torch.Tensor:
    """(num_images, 3, S, S) VAE pixels in [-1, 1]: frames of synthetic videos of every mover difficulty in turn."""
    # The scenes with movers only, so that adding another scene does not change the VAE that runs on these fit.
    difficulties = sorted(name for name, spec in DIFFICULTIES.items() if spec.cue is None)
    num_videos = math.ceil(num_images / FRAMES_PER_FITTING_VIDEO)
    videos = [
        generate_video(
            first_seed + i,
            difficulties[i % len(difficulties)],
            image_size,
            num_video_frames=FRAMES_PER_FITTING_VIDEO,
            num_frames=FRAMES_PER_FITTING_VIDEO,  # every frame a sampled one: movers shift one side per frame
        )[0]
        for i in range(num_videos)
    ]
    return frames_to_vae_pixel_values(np.concatenate(videos)[:num_images])


def build_tiny_vae(image_size: int):
    """An `AutoencoderKL` with the SD VAE's geometry that starts as an exact 8x average-pool autoencoder. Its random
    parts draw from torch's global generator: seed it (or fork it) first."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * TINY_VAE_LEVELS,
        up_block_types=("UpDecoderBlock2D",) * TINY_VAE_LEVELS,
        block_out_channels=(TINY_VAE_WIDTH,) * TINY_VAE_LEVELS,
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=1,  # see _init_as_pooling_autoencoder
        sample_size=image_size,
        mid_block_add_attention=False,  # attention adds nothing on these scenes and costs time at this size
    )
    _init_as_pooling_autoencoder(vae)
    return vae


@torch.no_grad()
def _init_as_pooling_autoencoder(vae) -> None:
    """Make `vae` an exact autoencoder before any training: the encoder averages RGB over 8x8 cells into latent
    channels 0-2, the decoder repeats each cell (nearest-neighbour upsampling).

    From random weights a small AutoencoderKL needs thousands of steps to beat a frame's mean colour; from here a
    few hundred steps improve on a reconstruction that is already recognisable. Each ResNet block starts as the
    identity (its last conv zeroed). The output GroupNorms (one group) would erase each image's colour level, so
    every feature map carries the channels [+rgb, -rgb, +A, -A, 0...]: the group mean is 0 and the large anchor A
    fixes its std, so those norms become fixed scalings (exact to E[rgb^2] / A^2 ~ 3 %).
    """
    from diffusers.models.resnet import ResnetBlock2D

    C = vae.config.block_out_channels[0]
    L = vae.config.latent_channels
    group_std = math.sqrt(2 * ANCHOR**2 / C)

    def set_conv(conv, taps: list[tuple[int, int, float]], channel_map: list[tuple[int, int, float]]) -> None:
        conv.weight.zero_()
        conv.bias.zero_()
        for out_channel, in_channel, sign in channel_map:
            for y, x, weight in taps:
                conv.weight[out_channel, in_channel, y, x] = sign * weight

    def centre(conv) -> list[tuple[int, int, float]]:
        return [(conv.kernel_size[0] // 2, conv.kernel_size[1] // 2, 1.0)]

    identity = [(c, c, 1.0) for c in range(C)]
    rgb_and_negated = [(c, c, 1.0) for c in range(3)] + [(3 + c, c, -1.0) for c in range(3)]
    for module in vae.modules():
        if isinstance(module, ResnetBlock2D):
            module.conv2.weight.zero_()
            module.conv2.bias.zero_()
    for conv_in in (vae.encoder.conv_in, vae.decoder.conv_in):
        set_conv(conv_in, centre(conv_in), rgb_and_negated)
        conv_in.bias[6], conv_in.bias[7] = ANCHOR, -ANCHOR
    # diffusers pads stride-2 convs on the right and bottom only: taps (0..1, 0..1) average each aligned 2x2 cell.
    average_2x2 = [(y, x, 0.25) for y in (0, 1) for x in (0, 1)]
    for block in vae.encoder.down_blocks:
        for downsampler in block.downsamplers or []:
            set_conv(downsampler.conv, average_2x2, identity)
    for block in vae.decoder.up_blocks:
        for upsampler in block.upsamplers or []:  # nearest 2x, then this conv
            set_conv(upsampler.conv, centre(upsampler.conv), identity)
    for norm in (vae.encoder.conv_norm_out, vae.decoder.conv_norm_out):
        norm.weight.zero_()
        norm.bias.zero_()
        norm.weight[:3], norm.bias[:3] = group_std, SILU_OFFSET
    for conv_out in (vae.encoder.conv_out, vae.decoder.conv_out):  # encoder: L means then L log-variances
        set_conv(conv_out, centre(conv_out), [(c, c, 1.0) for c in range(3)])
        conv_out.bias[:3] = -SILU_OFFSET
    vae.encoder.conv_out.bias[L:] = INITIAL_LOG_VARIANCE
    set_conv(vae.quant_conv, centre(vae.quant_conv), [(c, c, 1.0) for c in range(2 * L)])
    set_conv(vae.post_quant_conv, centre(vae.post_quant_conv), [(c, c, 1.0) for c in range(L)])


def fit_tiny_vae(vae, pixels: torch.Tensor, steps: int, seed: int) -> None:
    """MSE + a small KL on random FIT_CROP px crops on the latent grid (a quarter of the cost of whole frames at
    128 px); then sets the SD convention's `scaling_factor` (scaled latents of about unit std, which the prediction
    head assumes). The crops come from a generator seeded by `seed`; the posterior samples from torch's global one."""
    N, _, S, _ = pixels.shape
    crop, grid = min(FIT_CROP, S), 2 ** (len(vae.config.block_out_channels) - 1)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=FIT_LEARNING_RATE, weight_decay=0.0)
    vae.train()
    for _ in tqdm(range(steps), desc="fitting the tiny VAE", unit="step"):
        index = torch.randint(N, (FIT_BATCH_SIZE,), generator=generator)
        top, left = (grid * torch.randint((S - crop) // grid + 1, (2,), generator=generator)).tolist()
        batch = pixels[index, :, top : top + crop, left : left + crop]  # (B, 3, crop, crop)
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        kl_per_element = posterior.kl().mean() / posterior.mean[0].numel()
        loss = torch.nn.functional.mse_loss(reconstruction, batch) + KL_WEIGHT * kl_per_element
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    vae.eval()
    with torch.no_grad():
        latents = vae.encode(pixels[:NUM_SCALING_FRAMES]).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))


@torch.no_grad()
def reconstruction_psnr(vae, pixels: torch.Tensor) -> float:
    """PSNR in dB of the VAE's reconstruction (posterior mean) of pixels in [-1, 1]."""
    reconstruction = vae.decode(vae.encode(pixels).latent_dist.mean).sample.clamp(-1, 1)
    return psnr((reconstruction + 1) / 2, (pixels + 1) / 2)


def make_tiny_vae(
    output_dir: str | os.PathLike, image_size: int = 128, num_train_frames: int = 512, steps: int = 300, seed: int = 0
) -> str:
    """Build, fit and save a tiny VAE into `output_dir`, or reuse the one there made with the same settings.

    Leaves torch's global random state as it found it, so what a caller draws next does not depend on whether the
    folder was already there.

    Returns:
        `output_dir` as a string, loadable with `AutoencoderKL.from_pretrained`.
    """
    output_dir = Path(output_dir)
    settings = dict(
        image_size=image_size, num_train_frames=num_train_frames, steps=steps, seed=seed, version=TINY_VAE_VERSION
    )
    settings_path = output_dir / SETTINGS_FILE
    if settings_path.is_file() and json.loads(settings_path.read_text()) == settings:
        return str(output_dir)

    start = time.perf_counter()
    train_pixels = synthetic_fitting_frames(FIT_SEED_OFFSET + seed * num_train_frames, num_train_frames, image_size)
    held_out_pixels = synthetic_fitting_frames(
        HELD_OUT_SEED_OFFSET + seed * NUM_HELD_OUT_FRAMES, NUM_HELD_OUT_FRAMES, image_size
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = build_tiny_vae(image_size)
        initial_psnr = reconstruction_psnr(vae, held_out_pixels)
        fit_tiny_vae(vae, train_pixels, steps, seed)

    mean_colour = held_out_pixels.mean(dim=(2, 3), keepdim=True).expand_as(held_out_pixels)
    logger.info(
        "make_tiny_vae: held-out PSNR %.1f dB after %d steps (%.1f dB at the average-pool start; each frame's mean "
        "colour: %.1f dB), scaling_factor %.2f, %.0fs -> %s",
        reconstruction_psnr(vae, held_out_pixels), steps, initial_psnr, psnr((mean_colour + 1) / 2, (held_out_pixels + 1) / 2),
        vae.config.scaling_factor, time.perf_counter() - start, output_dir,
    )  # fmt: skip
    vae.save_pretrained(output_dir)
    settings_path.write_text(json.dumps(settings))
    return str(output_dir)
