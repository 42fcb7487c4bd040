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
        "processing_foveated",
        "synthetic_videos",
        "data_foveated",
        "tiny_vae",
        "trainer_foveated",
        "report_foveated",
        "precompute_latents",
        "train_hf",
    ],
    install_requires=[
        "torch>=2.4",
        "transformers>=5.0,<6",
        "accelerate>=1.0",
        "datasets>=3.0",
        "diffusers>=0.30",
        "decord>=0.6",
        "av>=12",
        "safetensors>=0.4",
        "evaluate>=0.4",
        "huggingface_hub>=0.30",
        "matplotlib>=3.7",
        "tensorboard>=2.14",
        "pyyaml>=6",
        "gguf>=0.10",
    ],
    extras_require={"dev": ["pytest>=7"]},
)
