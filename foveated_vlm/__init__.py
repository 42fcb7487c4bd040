"""foveated-vlm: the training, data, evaluation and report side of the Foveated VLM.

The model itself is three top-level modules, the remote code every checkpoint carries (`configuration_foveated`,
`modeling_foveated`, `processing_foveated`). This package holds the rest, one module per job:

- `train`: the training script (`train_hf.py`, `foveated-train`, `foveated-evaluate`);
- `data`: videos to Arrow (frames, VAE latents, boxes), the data collator; `precompute`: its sharded command;
- `synthetic`: generated clips with ground truth; `tiny_vae`: a small VAE fitted to them, for CPUs;
- `trainer`: the Trainer subclass and its callbacks; `metrics`: every metric, defined once;
- `probes`, `teacher`: research probes and the search teacher (training only);
- `report`, `figures`, `card`, `captioning`: the analysis report, its figures, the model card, text inference.
"""
