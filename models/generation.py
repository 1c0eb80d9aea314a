"""Running a bundle on requests: keyword inputs for one request or a padded batch, and greedy
generation of a fixed length under one of three execution engines.

Engines (a run setting, the same for every configuration):
- `eager`: transformers' generate() with its default dynamic KV cache, nothing compiled.
- `static`: a static KV cache of one fixed length (`cache_length`, a bucket every request of the
  workload fits), still uncompiled: no allocation grows during decoding.
- `graphs`: the static cache with the decode step compiled by torch.compile in
  "reduce-overhead" mode, which captures it in CUDA graphs (transformers' own compile path);
  the prefill stays eager. CUDA only: on a CPU there are no graphs to capture.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import LogitsProcessorList
from transformers.generation import CompileConfig

from core.errors import CompoundError
from models.bundle import ModelBundle
from models.prompting import Request, stack_pixels

ENGINES = ("eager", "static", "graphs")
DTYPES = ("float32", "bfloat16", "float16")


def model_inputs(bundle: ModelBundle, requests: Sequence[Request]) -> dict[str, torch.Tensor]:
    """Keyword inputs for forward/generate; prompts of unequal length are padded on the left
    (pad token, attention mask 0), so every row's last prompt token sits in the last column
    where generation continues. Equal lengths need no padding and get none.

    `pixel_values` is left out entirely for text-only batches: generate() treats a present-but-None
    key as an image to encode. LLaVA fills image placeholders in order, row by row, so a batch
    may mix image and text requests.
    """
    longest = max(len(r.input_ids) for r in requests)
    pad = bundle.prompts.tokenizer.pad_token_id
    if pad is None and any(len(r.input_ids) != longest for r in requests):
        raise CompoundError("prompts of unequal length need a pad token to be batched")
    rows = [[pad] * (longest - len(r.input_ids)) + list(r.input_ids) for r in requests]
    masks = [[0] * (longest - len(r.input_ids)) + [1] * len(r.input_ids) for r in requests]
    inputs = {
        "input_ids": torch.tensor(rows, device=bundle.device),
        "attention_mask": torch.tensor(masks, device=bundle.device),
    }
    pixels = stack_pixels(list(requests))
    if pixels is not None:
        inputs["pixel_values"] = pixels.to(bundle.device, bundle.dtype)
    return inputs


def engine_options(engine: str, cache_length: int | None = None) -> dict[str, Any]:
    """generate() keyword arguments that select `engine`; `cache_length` fixes the static
    cache's length, so requests of different lengths share one cache (and one graph)."""
    if engine == "eager":
        return {}
    if engine not in ENGINES:
        raise CompoundError(f"unknown engine {engine!r}; known: {', '.join(ENGINES)}")
    options: dict[str, Any] = {"cache_implementation": "static"}
    if cache_length is not None:
        options["max_cache_len"] = cache_length
    if engine == "static":
        options["disable_compile"] = True  # transformers would otherwise compile it on CUDA
    else:
        options["compile_config"] = CompileConfig(mode="reduce-overhead", fullgraph=False)
    return options


def check_engine(engine: str, device: torch.device | str) -> None:
    """One line when `engine` cannot run on `device` (graphs need CUDA)."""
    if engine not in ENGINES:
        raise CompoundError(f"unknown engine {engine!r}; known: {', '.join(ENGINES)}")
    if engine == "graphs" and torch.device(device).type != "cuda":
        raise CompoundError(
            "--engine graphs captures CUDA graphs and needs a CUDA device; use --engine eager "
            "or static on a CPU"
        )


@torch.inference_mode()
def generate(
    bundle: ModelBundle,
    requests: Request | Sequence[Request],
    new_tokens: int,
    processors: LogitsProcessorList | None = None,
    *,
    engine: str = "eager",
    cache_length: int | None = None,
) -> torch.Tensor:
    """Greedy generation of exactly `new_tokens` tokens per request (end-of-sequence suppressed
    until then), so every configuration serving a request does the same work. A list of
    requests is served as one batch; the output rows are left-padded prompts + new tokens."""
    batch = [requests] if isinstance(requests, Request) else list(requests)
    tokenizer = bundle.prompts.tokenizer
    return bundle.model.generate(
        **model_inputs(bundle, batch),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        logits_processor=processors,
        **engine_options(engine, cache_length),
    )
