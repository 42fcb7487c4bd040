"""Video captioning with a trained Foveated VLM: its three inference modes scored on held-out clips.

A model trained with text as a target (`--text_target caption`, docs/TRAINING.md) writes text after the frames and
`<video_end>`. It can read them three ways (`modeling_foveated.TEXT_MODES`):
    coarse          Pass 1 alone: the static query's tokens
    fine            coarse + fine: the last fine pass, reading with the queries of the pass before it (training's form)
    autoregressive  one fine stream that reads each frame with the query it wrote itself (the deployed form)

For each mode this scores every held-out clip's reference text (cross-entropy, nats per scored token, teacher-forced
through the mode's stream), writes a greedy caption and counts exact matches with the reference. "fine" against
"autoregressive" is the gap between the parallel training passes and deployment.

`--headroom [TRAIN EVAL]` measures instead what reading the clip is worth to the text
(`foveated_vlm.metrics.text_headroom`), with MODEL's tokenizer, on two precomputed splits (default: the ones the run
recorded).

Usage:
    python -m foveated_vlm.captioning outputs/text-run                      # the held-out split the run recorded
    python -m foveated_vlm.captioning MODEL --eval_dataset data/cued/arrow/eval/runs/<id> --max_new_tokens 16
    python -m foveated_vlm.captioning outputs/text-run --headroom           # its own training and held-out splits
"""

import argparse
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from transformers.utils.logging import tqdm

from foveated_vlm.data import (
    ANSWER_MARK,
    FoveatedVLMDataCollator,
    batch_to_device,
    load_precomputed,
    model_inputs,
    recorded_data_paths,
    target_tokens,
)
from foveated_vlm.metrics import text_headroom
from modeling_foveated import TEXT_MODES
from processing_foveated import FoveatedVLMProcessor

__all__ = ["CAPTIONING_FILE", "FoveatedVLMCaptioning", "evaluate_captioning", "main"]

# What the evaluation writes beside the model (or into the report folder).
CAPTIONING_FILE = "captioning.json"


@dataclass
class FoveatedVLMCaptioning:
    """Each mode's held-out text loss and greedy exact match (mode -> value), a few captions, and the gap between
    the parallel passes and the deployed stream."""

    num_clips: int
    text_loss: dict[str, float]  # mean over clips of each clip's nats per scored token
    exact_match: dict[str, float]  # share of clips whose greedy caption equals the reference, whitespace-trimmed
    examples: list[dict] = field(default_factory=list)  # {"reference", mode: caption} of the first clips

    @property
    def improvement_text(self) -> float:
        """(coarse − fine) / coarse of the text loss, Table 1's definition."""
        coarse, fine = self.text_loss["coarse"], self.text_loss["fine"]
        return (coarse - fine) / coarse if coarse > 0 else math.nan

    @property
    def autoregressive_gap(self) -> float:
        """How much worse the deployed stream's text loss is than the parallel passes': autoregressive / fine − 1."""
        return self.text_loss["autoregressive"] / self.text_loss["fine"] - 1

    def to_dict(self) -> dict:
        return {**asdict(self), "improvement_text": self.improvement_text, "autoregressive_gap": self.autoregressive_gap}


@torch.no_grad()
def evaluate_captioning(
    model, processor, dataset, batch_size: int = 16, max_new_tokens: int = 32, num_examples: int = 4, device="cpu"
) -> FoveatedVLMCaptioning:
    """Score the three modes on every clip of a precomputed split whose `caption` column holds the references."""
    model.eval()
    collator = FoveatedVLMDataCollator(processor.tokenizer, caption_as_target=True)
    tokenizer = processor.tokenizer
    losses = {mode: [] for mode in TEXT_MODES}
    matches = {mode: [] for mode in TEXT_MODES}
    examples = []
    for start in tqdm(range(0, len(dataset), batch_size), desc="captioning: held-out clips", unit="batch"):
        rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        batch = batch_to_device(collator(rows), device)
        inputs = model_inputs(batch, model)
        references = [row["caption"].strip() for row in rows]
        # A question's text (`question ANSWER_MARK answer`): the model reads the question, then writes the answer,
        # which is what is matched.
        asked = [ANSWER_MARK in reference for reference in references]
        prompt = {}
        if any(asked):
            if not all(asked):
                raise ValueError("a batch mixes questions and captions: score them as separate datasets")
            questions = [reference.partition(ANSWER_MARK)[0] + ANSWER_MARK for reference in references]
            references = [reference.partition(ANSWER_MARK)[2].strip() for reference in references]
            encoded = tokenizer(questions, add_special_tokens=False, padding=True, padding_side="left",
                                return_tensors="pt")  # fmt: skip
            prompt = {"prompt_ids": encoded["input_ids"].to(device), "prompt_mask": encoded["attention_mask"].to(device)}
        captions = {}
        for mode in TEXT_MODES:
            nll = model.score_text(inputs["pixel_values"], inputs["target_ids"], inputs["target_labels"], mode=mode)
            losses[mode].append(nll.float().cpu().numpy())
            written = model.generate_text(
                inputs["pixel_values"], mode=mode, max_new_tokens=max_new_tokens,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **prompt,
            )
            captions[mode] = [text.strip() for text in processor.batch_decode(written, skip_special_tokens=True)]
            matches[mode] += [caption == reference for caption, reference in zip(captions[mode], references)]
        for i in range(min(len(rows), num_examples - len(examples))):
            examples.append({"reference": references[i], **{mode: captions[mode][i] for mode in TEXT_MODES}})
    return FoveatedVLMCaptioning(
        num_clips=len(dataset),
        text_loss={mode: float(np.concatenate(parts).mean()) for mode, parts in losses.items()},
        exact_match={mode: float(np.mean(hits)) for mode, hits in matches.items()},
        examples=examples,
    )


def captioning_markdown(captioning: FoveatedVLMCaptioning) -> str:
    """The three modes as a Markdown table, with the gap and a few captions."""
    rows = [f"| {mode} | {captioning.text_loss[mode]:.4f} | {captioning.exact_match[mode]:.1%} |" for mode in TEXT_MODES]
    lines = [
        f"Captioning, {captioning.num_clips} held-out clips (greedy captions against the reference text):",
        "",
        "| mode | text loss (nats per token) | exact match |",
        "|---|---|---|",
        *rows,
        "",
        f"improvement_text (coarse − fine) / coarse: {captioning.improvement_text:+.2%}; the deployed stream's "
        f"text loss against the parallel passes' (autoregressive / fine − 1): {captioning.autoregressive_gap:+.2%}.",
    ]
    for example in captioning.examples:
        lines.append("")
        lines += [f"- {name}: {text!r}" for name, text in example.items()]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None):
    from transformers import AutoModel

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="A trained model: a run's output_dir, a checkpoint folder or a Hub id.")
    parser.add_argument("--eval_dataset", help="A precomputed split (default: the one the run recorded).")
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", help=f"Where to write the results as JSON (default: MODEL/{CAPTIONING_FILE}).")
    parser.add_argument("--headroom", nargs="*", metavar="SPLIT",
                        help="Measure the text headroom instead, on TRAIN and EVAL (default: the run's own splits).")
    args = parser.parse_args(argv)
    model_dir = Path(args.model)
    if args.headroom is not None:
        if len(args.headroom) not in (0, 2):
            parser.error(f"--headroom takes two splits, TRAIN and EVAL, or none; got {args.headroom}")
        recorded = recorded_data_paths(model_dir)
        splits = args.headroom or [recorded.get("train_dataset"), recorded.get("eval_dataset")]
        if None in splits:
            parser.error(f"{args.model} records no training split (data_paths.json): pass --headroom TRAIN EVAL")
        tokenizer = FoveatedVLMProcessor.from_pretrained(args.model, trust_remote_code=True).tokenizer
        targets = []  # per split, each caption's target tokens as the collator makes them
        for split in splits:
            captions = list(load_precomputed(split)["caption"])
            _, labels = target_tokens(tokenizer, captions, max_length=10**6)
            targets.append([row[row != -100].tolist() for row in labels])
        measured = text_headroom(*targets)
        print(json.dumps(measured, indent=1))
        return measured
    eval_dataset = args.eval_dataset or recorded_data_paths(model_dir).get("eval_dataset")
    if eval_dataset is None:
        parser.error(f"{args.model} records no held-out split: pass --eval_dataset")
    model = AutoModel.from_pretrained(args.model, trust_remote_code=True).to(args.device)
    if model.config.text_loss_weight == 0:
        parser.error(f"{args.model} was not trained with text as a target (text_loss_weight 0): it writes no text")
    processor = FoveatedVLMProcessor.from_pretrained(args.model, trust_remote_code=True)
    captioning = evaluate_captioning(
        model, processor, load_precomputed(eval_dataset), args.batch_size, args.max_new_tokens, device=args.device
    )
    print(captioning_markdown(captioning))
    output = Path(args.output) if args.output else (model_dir / CAPTIONING_FILE if model_dir.is_dir() else None)
    if output is not None:
        output.write_text(json.dumps(captioning.to_dict(), indent=1))
        print(f"\nWritten: {output}")
    return captioning


def cli() -> None:
    """The `foveated-caption` command: `main` without its return value, which a console script would print."""
    main()


if __name__ == "__main__":
    main()
