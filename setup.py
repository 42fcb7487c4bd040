from setuptools import setup

setup(
    name="foveated-vlm",
    version="0.1.0",
    description="Foveated video model: one visual token per frame, the LLM decides where to look next.",
    python_requires=">=3.10",
    # Flat top-level modules: the three *_foveated.py files are also the remote code a Hub checkpoint carries.
    py_modules=[
        "configuration_foveated",
        "modeling_foveated",
        "probes_foveated",
        "teacher_foveated",
        "captioning_foveated",
        "processing_foveated",
        "synthetic_videos",
        "data_foveated",
        "tiny_vae",
        "metrics_foveated",
        "card_foveated",
        "figures_foveated",
        "trainer_foveated",
        "report_foveated",
        "precompute_latents",
        "train_hf",
    ],
    install_requires=[
        "torch>=2.4",
        "transformers>=5.24,<6",
        "accelerate>=1.0",
        "datasets>=3.0",
        "diffusers>=0.30",
        # Video decoding: processing_foveated takes the first installed of decord, torchcodec and PyAV. decord 0.6
        # has no wheel for macOS on Apple silicon, so there PyAV decodes (the same frames, tests/test_processing.py).
        # torchvision is not required: transformers' BaseVideoProcessor ops need it, but no torchvision wheel works
        # with the CPU build of torch (the PyPI wheels link libtorch_cuda.so), so the video processor runs on torch.
        'decord>=0.6; platform_system != "Darwin" or platform_machine != "arm64"',
        "av>=12",
        "safetensors>=0.4",
        "evaluate>=0.4",
        "huggingface_hub>=0.30",
        "matplotlib>=3.7",
        "markdown>=3.4",  # report.html from report.md (report_foveated.py)
        "tensorboard>=2.14",
        "pyyaml>=6",
        "gguf>=0.10",
    ],
    extras_require={"dev": ["pytest>=7"]},
)
