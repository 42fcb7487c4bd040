"""Train (or evaluate) a Foveated VLM: `python train_hf.py CONFIG.yaml [--key value ...]`, also under
`accelerate launch`. The code is foveated_vlm/train.py; installed, the same command is `foveated-train`."""

from foveated_vlm.train import main

if __name__ == "__main__":
    main()
