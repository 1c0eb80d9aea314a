"""Running a bundle on requests: its keyword inputs, and greedy generation of a fixed length."""

from __future__ import annotations

import torch
from transformers import LogitsProcessorList

from models.bundle import ModelBundle
from models.prompting import Request, stack_pixels


def model_inputs(bundle: ModelBundle, requests: list[Request]) -> dict[str, torch.Tensor]:
    """Keyword inputs for forward/generate on equal-length prompts.

    `pixel_values` is left out entirely for text-only batches: generate() treats a present-but-None
    key as an image to encode.
    """
    inputs = {"input_ids": torch.tensor([r.input_ids for r in requests], device=bundle.device)}
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    pixels = stack_pixels(requests)
    if pixels is not None:
        inputs["pixel_values"] = pixels.to(bundle.device, bundle.dtype)
    return inputs


@torch.inference_mode()
def generate(
    bundle: ModelBundle,
    request: Request,
    new_tokens: int,
    processors: LogitsProcessorList | None = None,
) -> torch.Tensor:
    """Greedy generation of exactly `new_tokens` tokens (end-of-sequence suppressed until then),
    so every configuration serving a request does the same work."""
    tokenizer = bundle.prompts.tokenizer
    return bundle.model.generate(
        **model_inputs(bundle, [request]),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        logits_processor=processors,
    )
