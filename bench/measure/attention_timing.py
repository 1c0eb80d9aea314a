"""Time the attention kernel alone: dense causal SDPA against block-sparse FlexAttention.

A suite times whole attention modules (projections included) inside the model; this isolates
the part block sparsity changes, at a preset's own head shapes and prompt layouts: the question
of a real test example, then `images` images of the preset's visual tokens, then the separator.
Random queries and keys (the kernel's time does not depend on their values).

Rounds interleave the two kernels in a shuffled order, so drift on a shared machine falls on
both; each round's figure is the mean of `calls` calls. Reported: the median per call of each,
and the median of the per-round ratios with a bootstrap interval over rounds. All of it is in
one process: machine-to-machine and process-to-process spread (1-4% here) is not in the
interval, so read differences under 5% as none.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from bench.measure.interleaved import interleaved_rounds, median_ratio
from models.dataset import make_example
from models.presets import Preset, llava_config
from models.prompting import PromptFormat
from models.sparse_attention import (
    BlockSparsePrefill,
    PromptLayout,
    allowed_mask,
    block_stats,
    build_block_mask,
)
from models.tokenizer import build_tokenizer


@dataclass(frozen=True)
class KernelTiming:
    """One prompt length: both kernels' times, their ratio and the sparse kernel's work."""

    images: int
    prompt_tokens: int
    dense_ms: float
    sparse_ms: float
    speedup: float  # dense / sparse, median over rounds
    speedup_low: float  # 95% bootstrap interval over rounds
    speedup_high: float
    block_sparsity: float
    work_fraction: float
    flops: dict[str, int]
    compile_s: float  # the sparse kernel's first call at this shape (compilation included)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def prompt_ids(preset: Preset, images: int) -> tuple[list[int], int]:
    """A real test question's prompt with `images` images, and the image token id."""
    config = llava_config(preset)
    prompts = PromptFormat(
        build_tokenizer(),
        config.image_token_id,
        preset.image_tokens,
        preset.vision["image_size"],
    )
    example = make_example(0, "test", 0, "image")
    single = prompts.encode(example).input_ids
    first = single.index(config.image_token_id)
    image = single[first : first + preset.image_tokens]
    return single[:first] + image * images + single[first + preset.image_tokens :], int(
        config.image_token_id
    )


def _time_calls(function: Callable[[], Any], calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        function()
    return (time.perf_counter() - started) / calls


def time_kernels(
    preset: Preset,
    images: int,
    *,
    pattern: str,
    window: int,
    block_size: int,
    rounds: int,
    calls: int,
    seed: int = 0,
) -> KernelTiming:
    """Dense vs block-sparse attention for one prompt of `images` images (batch 1)."""
    text = preset.text
    heads = text["num_attention_heads"]
    kv_heads = text.get("num_key_value_heads", heads)
    head_dim = text["hidden_size"] // heads
    ids, image_token = prompt_ids(preset, images)
    layout = PromptLayout.from_ids(torch.tensor([ids]), None, image_token, preset.image_tokens)
    mask = allowed_mask(layout, pattern, window)
    stats_ = block_stats(mask, layout, block_size)
    state = BlockSparsePrefill(image_token, preset.image_tokens, pattern, window, block_size)
    state.current, state.length = build_block_mask(mask, block_size, torch.device("cpu")), len(ids)
    generator = torch.Generator().manual_seed(seed)
    length = len(ids)
    q = torch.randn(1, heads, length, head_dim, generator=generator)
    k = torch.randn(1, kv_heads, length, head_dim, generator=generator)
    v = torch.randn(1, kv_heads, length, head_dim, generator=generator)
    scale = head_dim**-0.5

    def dense() -> torch.Tensor:  # as transformers' SDPA path runs a prefill without padding
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        return out.transpose(1, 2).contiguous()

    def sparse() -> torch.Tensor:
        return state.attend(q, k, v, scale)

    with torch.inference_mode():
        started = time.perf_counter()
        sparse()
        compile_s = time.perf_counter() - started
        per_round = interleaved_rounds(
            {"dense": dense, "sparse": sparse}, _time_calls, calls, rounds, seed
        )
    dense_s, sparse_s = per_round["dense"], per_round["sparse"]
    speedup, low, high = median_ratio(dense_s / sparse_s)
    return KernelTiming(
        images=images,
        prompt_tokens=length,
        dense_ms=float(np.median(dense_s)) * 1e3,
        sparse_ms=float(np.median(sparse_s)) * 1e3,
        speedup=speedup,
        speedup_low=low,
        speedup_high=high,
        block_sparsity=stats_.sparsity,
        work_fraction=stats_.work_fraction,
        flops=stats_.attention_flops(heads, head_dim),
        compile_s=compile_s,
    )
