"""Block-sparse attention over a vision-language prompt, run by FlexAttention.

A prompt's layout (which positions are padding, which are image tokens and of which image)
decides a token-level mask (`allowed_mask`); the mask is cut into square blocks, and a
FlexAttention `BlockMask` lists per query block the key blocks that are entirely allowed
("full": no mask evaluated) and those only partly allowed (the token mask is looked up). Key
blocks that are entirely masked are never computed: that is the saved work.

Patterns (every one is causal and ignores padded keys):
- "causal": nothing more; the dense reference with 0% extra sparsity.
- "per_image": an image token attends to the text before it and to its own image only
  (image-to-image attention is block-diagonal per image); text tokens attend to everything.
- "local": as "per_image", but within its image an image token sees only the `window` image
  tokens up to and including itself (a sliding window in raster order: `window` = 32 is two
  rows of a 16 × 16 patch grid). Text tokens stay global: they attend to every earlier token,
  and every token attends to them.

The block mask is built from the token mask with plain tensor ops (no vmap over a mask
function), and cached per layout, since a served workload repeats a few prompt layouts.
"""

from __future__ import annotations

import math
import shutil
from collections import OrderedDict
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
from torch.nn import functional as F

from models.bundle import ModelBundle

PATTERNS = ("causal", "per_image", "local")
ATTENTION_NAME = "compound_block_sparse"  # our entry in transformers' AttentionInterface


@dataclass(frozen=True)
class PromptLayout:
    """Per row of a batch: which positions hold real tokens and which image each token is in."""

    valid: torch.Tensor  # (rows, S) bool: not padding
    image_id: torch.Tensor  # (rows, S) long: index of the image a token belongs to, -1 for text
    image_offset: torch.Tensor  # (rows, S) long: position within its image, 0 for text

    @property
    def length(self) -> int:
        return self.valid.shape[1]

    @classmethod
    def from_ids(
        cls,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        image_token_id: int,
        image_tokens: int,
    ) -> PromptLayout:
        """Image tokens run in groups of `image_tokens` per image, in order along each row."""
        ids = input_ids.cpu()
        valid = (
            torch.ones_like(ids, dtype=torch.bool)
            if attention_mask is None
            else attention_mask.cpu().to(torch.bool)
        )
        is_image = ids == image_token_id
        rank = torch.cumsum(is_image.long(), dim=1) - 1  # running index among image tokens
        image_id = torch.where(is_image, torch.div(rank, image_tokens, rounding_mode="floor"), -1)
        image_offset = torch.where(is_image, rank % image_tokens, 0)
        return cls(valid, image_id, image_offset)

    def key(self) -> tuple[Any, ...]:
        """What the mask depends on, hashable (for the block-mask cache)."""
        return (
            tuple(self.valid.shape),
            self.valid.numpy().tobytes(),
            self.image_id.numpy().tobytes(),
        )


def allowed_mask(layout: PromptLayout, pattern: str, window: int) -> torch.Tensor:
    """(rows, S, S) bool: may query q attend to key k? Padded query rows allow nothing."""
    if pattern not in PATTERNS:
        raise ValueError(f"unknown pattern {pattern!r}; known: {', '.join(PATTERNS)}")
    length = layout.length
    position = torch.arange(length)
    causal = position[None, :, None] >= position[None, None, :]
    valid = layout.valid
    allowed = causal & valid[:, None, :] & valid[:, :, None]
    if pattern == "causal":
        return allowed
    image_q = layout.image_id[:, :, None]
    image_k = layout.image_id[:, None, :]
    text_involved = (image_q < 0) | (image_k < 0)
    image_rule = image_q == image_k
    if pattern == "local":
        distance = layout.image_offset[:, :, None] - layout.image_offset[:, None, :]
        image_rule = image_rule & (distance < window)
    return allowed & (text_involved | image_rule)


@dataclass(frozen=True)
class BlockStats:
    """How much of the attention a block mask computes, in FlexAttention's terms and ours."""

    block_size: int
    blocks: int  # every (query block, key block) pair of the padded S × S grid, all rows
    active_blocks: int  # pairs computed (full or partial)
    causal_blocks: int  # pairs a dense causal kernel computes for the same prompts
    allowed_pairs: int  # (query, key) token pairs the mask allows
    causal_pairs: int  # token pairs plain causal attention over the real tokens allows

    @property
    def sparsity(self) -> float:
        """Fraction of all blocks skipped (FlexAttention's `BlockMask.sparsity()` / 100)."""
        return 1.0 - self.active_blocks / self.blocks

    @property
    def work_fraction(self) -> float:
        """Blocks computed / blocks a dense causal block kernel computes (1 = no saving)."""
        return self.active_blocks / self.causal_blocks

    def attention_flops(self, heads: int, head_dim: int) -> dict[str, int]:
        """Matmul FLOPs of QKᵀ and PV (2 · 2 · d per query-key pair and head), counted for
        the blocks the sparse kernel runs, the blocks a dense causal block kernel runs, and
        the full square torch's flop counter charges a dense SDPA call."""
        per_pair = 4 * heads * head_dim
        block_pairs = self.block_size * self.block_size
        return {
            "block_sparse": per_pair * block_pairs * self.active_blocks,
            "causal_blocks": per_pair * block_pairs * self.causal_blocks,
            "dense_square": per_pair * block_pairs * self.blocks,
            "allowed_pairs": per_pair * self.allowed_pairs,
        }


def padded_mask(mask: torch.Tensor, block_size: int) -> torch.Tensor:
    """A (rows, S, S) token mask padded with False to whole blocks."""
    length = mask.shape[-1]
    extra = math.ceil(length / block_size) * block_size - length
    return F.pad(mask, (0, extra, 0, extra), value=False) if extra else mask


def token_block_grids(mask: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, nq, nk) bool grids of a padded mask: blocks with any allowed pair, blocks with
    all pairs allowed."""
    rows, length, _ = mask.shape
    blocks = length // block_size
    grid = mask.view(rows, blocks, block_size, blocks, block_size)
    return grid.any(dim=(2, 4)), grid.all(dim=(2, 4))


def block_stats(mask: torch.Tensor, layout: PromptLayout, block_size: int) -> BlockStats:
    """Counts for a token mask built on `layout` (see `BlockStats`)."""
    active, _ = token_block_grids(padded_mask(mask, block_size), block_size)
    causal = allowed_mask(layout, "causal", 0)
    causal_active, _ = token_block_grids(padded_mask(causal, block_size), block_size)
    return BlockStats(
        block_size=block_size,
        blocks=active.numel(),
        active_blocks=int(active.sum()),
        causal_blocks=int(causal_active.sum()),
        allowed_pairs=int(mask.sum()),
        causal_pairs=int(causal.sum()),
    )


def block_mask_from_grids(
    partial: torch.Tensor, full: torch.Tensor, token_mask: torch.Tensor, block_size: int
) -> Any:
    """A FlexAttention BlockMask from block grids (rows, heads or 1, nq, nk): `partial` blocks
    look the padded (rows, S, S) `token_mask` up, `full` blocks are computed whole."""
    from torch.nn.attention.flex_attention import BlockMask

    device = token_mask.device

    def listing(grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        counts = grid.sum(dim=-1, dtype=torch.int32)
        order = torch.argsort(grid.to(torch.int8), dim=-1, descending=True, stable=True)
        return counts.to(device), order.to(torch.int32).to(device)

    def mask_mod(batch: Any, head: Any, query: Any, key: Any) -> Any:
        return token_mask[batch, query, key]

    kv_num, kv_index = listing(partial)
    full_num, full_index = listing(full)
    return BlockMask.from_kv_blocks(
        kv_num,
        kv_index,
        full_num,
        full_index,
        BLOCK_SIZE=block_size,
        mask_mod=mask_mod,
        seq_lengths=(token_mask.shape[1], token_mask.shape[2]),
    )


def build_block_mask(mask: torch.Tensor, block_size: int, device: torch.device) -> Any:
    """A FlexAttention BlockMask for a (rows, S, S) token mask, S padded to whole blocks."""
    padded = padded_mask(mask, block_size).to(device)
    active, full = token_block_grids(padded, block_size)
    return block_mask_from_grids((active & ~full)[:, None], full[:, None], padded, block_size)


def flex_problem(device: torch.device) -> str | None:
    """Why FlexAttention cannot run compiled on `device` here, or None."""
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return f"needs FlexAttention (torch {torch.__version__} does not have it)"
    if device.type == "cpu":
        compiler = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
        if compiler is None:
            return "needs a C++ compiler for torch.compile on a CPU (no g++, c++ or clang++)"
        return None
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "needs Triton for torch.compile on CUDA"
    return f"FlexAttention is not compiled for {device.type} devices here"


# Shapes (batch, padded length, dtype, grad mode) compiled per process before dynamo gives up
# and runs FlexAttention uncompiled. Each new shape is its own specialisation: compiling with
# dynamic shapes failed in the C++ compiler on a CPU (torch 2.13, measured), and an evaluation
# pass over prompts of a dozen lengths in batches of 64 and their remainders needs dozens.
COMPILED_SHAPES = 128


@cache
def compiled_flex_attention() -> Any:
    """FlexAttention compiled once per process: uncompiled it materialises the whole score
    matrix and is far slower than dense attention."""
    from torch._dynamo import config
    from torch.nn.attention.flex_attention import flex_attention

    config.recompile_limit = max(config.recompile_limit, COMPILED_SHAPES)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, COMPILED_SHAPES)
    return torch.compile(flex_attention, dynamic=False)


class BlockSparsePrefill:
    """The block mask for the prompt being prefilled, and the attention that uses it.

    `on_model_call` is a forward pre-hook on the whole model: a call with an empty cache and a
    prompt of two or more tokens is a prefill (or a training forward), whose layout gives the
    block mask; any later call (a decode step) leaves attention to SDPA.
    """

    CACHED_MASKS = 64

    def __init__(
        self, image_token_id: int, image_tokens: int, pattern: str, window: int, block_size: int
    ) -> None:
        self.image_token_id = image_token_id
        self.image_tokens = image_tokens
        self.pattern = pattern
        self.window = window
        self.block_size = block_size
        self.current: Any = None  # the BlockMask of this prefill, or None outside one
        self.current_mask: torch.Tensor | None = None  # its token mask (rows, S, S)
        self.current_stats: BlockStats | None = None
        self.length = 0
        self.masks: OrderedDict[tuple[Any, ...], tuple[Any, torch.Tensor, BlockStats]] = (
            OrderedDict()
        )

    def on_model_call(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        cache_object = kwargs.get("cache", kwargs.get("past_key_values"))
        past = cache_object.get_seq_length() if cache_object is not None else 0
        self.current, self.current_mask, self.current_stats = None, None, None
        if ids is None or past > 0 or ids.shape[1] < 2:
            return
        layout = PromptLayout.from_ids(
            ids, kwargs.get("attention_mask"), self.image_token_id, self.image_tokens
        )
        self.current, self.current_mask, self.current_stats = self._mask_for(layout, ids.device)
        self.length = layout.length

    def _mask_for(
        self, layout: PromptLayout, device: torch.device
    ) -> tuple[Any, torch.Tensor, BlockStats]:
        key = layout.key()
        if key in self.masks:
            self.masks.move_to_end(key)
            return self.masks[key]
        mask = allowed_mask(layout, self.pattern, self.window)
        entry = (
            build_block_mask(mask, self.block_size, device),
            mask.to(device),
            block_stats(mask, layout, self.block_size),
        )
        self.masks[key] = entry
        if len(self.masks) > self.CACHED_MASKS:
            self.masks.popitem(last=False)
        return entry

    def applies(self, query: torch.Tensor, key: torch.Tensor) -> bool:
        """A prefill of the prompt whose mask we hold (a static cache's keys run longer)."""
        return (
            self.current is not None
            and query.shape[2] == self.length
            and key.shape[2] >= self.length
        )

    def attend_module(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scaling: float | None,
    ) -> torch.Tensor:
        """The prefill attention of one layer (`module`); the same mask for every layer."""
        return self.attend(query, key, value, scaling)

    def attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None
    ) -> torch.Tensor:
        """(batch, S, heads, head_dim) output, laid out as transformers' SDPA path returns it.

        FlexAttention has no backward pass on a CPU, so a forward that needs gradients (the
        sparse fine-tune) computes the same masked attention densely with SDPA instead.
        """
        length = self.length
        if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad):
            return self._attend_dense(query, key[:, :, :length], value[:, :, :length], scaling)
        padded = self.current.seq_lengths[0]
        key, value = key[:, :, :length], value[:, :, :length]
        extra = (0, 0, 0, padded - length)
        query, key, value = (F.pad(t, extra) for t in (query, key, value))
        output = compiled_flex_attention()(
            query,
            key,
            value,
            block_mask=self.current,
            scale=scaling,
            enable_gqa=query.shape[1] != key.shape[1],
        )
        return output[:, :, :length].transpose(1, 2).contiguous()

    def _attend_dense(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None
    ) -> torch.Tensor:
        mask = self.current_mask
        # a padded query row allows no key, which SDPA turns into NaN (and NaN gradients):
        # let it see itself; no loss reads its output
        empty = ~mask.any(dim=-1, keepdim=True)
        mask = mask | (empty & torch.eye(mask.shape[-1], dtype=torch.bool, device=mask.device))
        output = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask[:, None], scale=scaling, enable_gqa=True
        )
        return output.transpose(1, 2).contiguous()


def block_sparse_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: block-sparse in a prefill of a layer that
    carries a `BlockSparsePrefill` (`module.block_sparse`), SDPA everywhere else."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    state: BlockSparsePrefill | None = getattr(module, "block_sparse", None)
    if state is None or not state.applies(query, key):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    return state.attend_module(module, query, key, value, scaling), None


def install(bundle: ModelBundle, state: BlockSparsePrefill) -> None:
    """Route every decoder attention layer of `bundle` through `state` (in place)."""
    bundle.language_model.config._attn_implementation = register_attention()
    for index in range(len(bundle.decoder_layers)):
        bundle.attention(index).block_sparse = state
    bundle.model.register_forward_pre_hook(state.on_model_call, with_kwargs=True)


@cache
def register_attention() -> str:
    """Make our attention function (and SDPA's mask for it) known to transformers."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, block_sparse_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)
    return ATTENTION_NAME
