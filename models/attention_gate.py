"""Gated dynamic attention pruning (paper 2.2): a small learned gate per decoder layer predicts
which key blocks will receive almost no attention, and those blocks are never computed.

The gate follows SeerAttention (Gao et al. 2024, "SeerAttention: Learning Intrinsic Sparse
Attention in Your LLMs", arXiv:2410.13276): queries are average-pooled per block, keys pooled
per block by average, max and min; one linear map each projects them to a small space where
their scaled dot products, softmaxed over the causal key blocks, predict each query block's
attention mass per key block. It is trained on the training split against the frozen model's
own attention (the mass each key block gets, averaged over the block's queries), by KL
divergence; the model's weights never change.

While serving, a key block whose predicted mass is below `threshold` is skipped for that query
block and head; the diagonal block is always kept, so every query sees at least itself. The
skipped blocks become a per-head FlexAttention BlockMask: pruned weights turn into saved work
only through it (the same kernel as `block_sparse_attention`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from core.errors import CompoundError
from models.bundle import ModelBundle
from models.checkpoint import check_cache_dir
from models.dataset import make_example
from models.sparse_attention import (
    BlockSparsePrefill,
    block_mask_from_grids,
    compiled_flex_attention,
    install,
    padded_mask,
    token_block_grids,
)
from models.students import teacher_dir_of
from models.train import collate, step_progress


class AttentionGate(nn.Module):
    """Block-level attention predictor for one layer (shared by its heads)."""

    def __init__(self, head_dim: int, gate_dim: int = 32) -> None:
        super().__init__()
        self.query = nn.Linear(head_dim, gate_dim)
        self.key = nn.Linear(3 * head_dim, gate_dim)
        self.gate_dim = gate_dim

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, block_size: int, causal_blocks: torch.Tensor
    ) -> torch.Tensor:
        """Log-probabilities (batch, heads, nq, nk) over key blocks for each query block.

        query (batch, heads, S, d) and key (batch, kv_heads, S, d), S a whole number of blocks;
        `causal_blocks` (batch, nq, nk) bool: blocks holding any allowed pair.
        """
        batch, heads, length, dim = query.shape
        blocks = length // block_size
        pooled_q = query.view(batch, heads, blocks, block_size, dim).mean(dim=3)
        grouped = key.view(batch, key.shape[1], blocks, block_size, dim)
        pooled_k = torch.cat(
            [grouped.mean(dim=3), grouped.amax(dim=3), grouped.amin(dim=3)], dim=-1
        )
        pooled_k = pooled_k.repeat_interleave(heads // key.shape[1], dim=1)
        scores = self.query(pooled_q) @ self.key(pooled_k).transpose(-1, -2)
        scores = scores / math.sqrt(self.gate_dim)
        scores = scores.masked_fill(~causal_blocks[:, None], -math.inf)
        return scores.float().log_softmax(dim=-1)


def block_attention_mass(
    query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor, block_size: int, scaling: float
) -> torch.Tensor:
    """(batch, heads, nq, nk): the true attention mass each key block gets, averaged over the
    real queries of each query block (the gate's target). S must be whole blocks."""
    heads = query.shape[1]
    key = key.repeat_interleave(heads // key.shape[1], dim=1)
    scores = (query @ key.transpose(-1, -2)).float() * scaling
    scores = scores.masked_fill(~mask[:, None], -math.inf)
    real = mask.any(dim=-1)  # (batch, S): query rows that attend anything
    probabilities = torch.nan_to_num(scores.softmax(dim=-1)) * real[:, None, :, None]
    batch, _, length, _ = probabilities.shape
    blocks = length // block_size
    mass = probabilities.view(batch, heads, blocks, block_size, blocks, block_size).sum(dim=5)
    queries = real.view(batch, 1, blocks, block_size, 1).sum(dim=3).clamp_min(1)
    return mass.sum(dim=3) / queries


def keep_blocks(
    log_mass: torch.Tensor, threshold: float, causal_blocks: torch.Tensor
) -> torch.Tensor:
    """(batch, heads, nq, nk) bool: causal blocks predicted at or above `threshold`, plus the
    diagonal."""
    blocks = log_mass.shape[-1]
    diagonal = torch.eye(blocks, dtype=torch.bool, device=log_mass.device)
    keep = (log_mass.exp() >= threshold) | diagonal
    return keep & causal_blocks[:, None]


class _GateState(BlockSparsePrefill):
    """A prefill state holding the prompt's causal token mask and one gate per layer."""

    def __init__(self, gates: nn.ModuleList, block_size: int) -> None:
        super().__init__(
            image_token_id=-1, image_tokens=1, pattern="causal", window=1, block_size=block_size
        )
        self.gates = gates

    def padded_prefill(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """Query, key and value of the prompt padded to whole blocks, the padded token mask,
        and its block grids (any pair allowed, all pairs allowed)."""
        length = self.length
        mask = padded_mask(self.current_mask, self.block_size)
        extra = (0, 0, 0, mask.shape[-1] - length)
        query, key, value = (F.pad(t[:, :, :length], extra) for t in (query, key, value))
        return (query, key, value, mask, *token_block_grids(mask, self.block_size))


class GatedPrefill(_GateState):
    """The prefill state of gated pruning: the prompt's causal token mask, and per layer a gate
    that decides from that layer's queries and keys which key blocks to compute."""

    def __init__(
        self, gates: nn.ModuleList, threshold: float, block_size: int, events: Any = None
    ) -> None:
        super().__init__(gates, block_size)
        self.threshold = threshold
        self.events = events
        self.blocks_causal = 0  # (query block, key block, head) triples dense causal computes
        self.blocks_pruned = 0  # of which the gate skipped

    def attend_module(
        self,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scaling: float | None,
    ) -> torch.Tensor:
        if torch.is_grad_enabled() and query.requires_grad:
            raise RuntimeError("gated attention pruning serves a frozen model; it has no backward")
        query, key, value, mask, active, full = self.padded_prefill(query, key, value)
        log_mass = self.gates[module.layer_idx](query, key, self.block_size, active)
        keep = keep_blocks(log_mass, self.threshold, active)
        causal = int(active.sum()) * query.shape[1]
        pruned = causal - int(keep.sum())
        self.blocks_causal += causal
        self.blocks_pruned += pruned
        if self.events is not None:
            self.events.value(PRUNED_METRIC, pruned / causal, "fraction")
        block_mask = block_mask_from_grids(
            keep & ~full[:, None], keep & full[:, None], mask, self.block_size
        )
        output = compiled_flex_attention()(
            query,
            key,
            value,
            block_mask=block_mask,
            scale=scaling,
            enable_gqa=query.shape[1] != key.shape[1],
        )
        return output[:, :, : self.length].transpose(1, 2).contiguous()


PRUNED_METRIC = "gate_pruned_fraction"


class _GateTeacher(_GateState):
    """Serves the frozen model densely while each layer's gate learns its attention mass."""

    def __init__(self, gates: nn.ModuleList, block_size: int) -> None:
        super().__init__(gates, block_size)
        self.losses: list[torch.Tensor] = []

    def attend_module(
        self,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scaling: float | None,
    ) -> torch.Tensor:
        padded_q, padded_k, _, mask, active, _ = self.padded_prefill(query, key, value)
        key, value = key[:, :, : self.length], value[:, :, : self.length]
        target = block_attention_mass(padded_q, padded_k, mask, self.block_size, scaling)
        with torch.enable_grad():
            log_mass = self.gates[module.layer_idx](padded_q, padded_k, self.block_size, active)
            rows = active.any(dim=-1)[:, None].expand_as(log_mass[..., 0])  # real query blocks
            log_mass = log_mass.masked_fill(~active[:, None], 0.0)
            divergence = F.kl_div(log_mass, target, reduction="none").sum(dim=-1)
            self.losses.append(divergence[rows].mean())
        output = F.scaled_dot_product_attention(
            query, key, value, is_causal=True, scale=scaling, enable_gqa=True
        )
        return output.transpose(1, 2).contiguous()


def build_gates(bundle: ModelBundle, gate_dim: int = 32) -> nn.ModuleList:
    head_dim = bundle.attention(0).head_dim
    return nn.ModuleList(AttentionGate(head_dim, gate_dim) for _ in bundle.decoder_layers)


def train_gates(
    teacher: ModelBundle,
    *,
    block_size: int,
    steps: int,
    batch_size: int = 8,
    learning_rate: float = 3e-3,
    seed: int = 0,
    show_progress: bool = True,
) -> tuple[nn.ModuleList, float]:
    """Gates for every decoder layer, trained on training-split image prompts against the
    frozen model's block attention mass (KL); the final loss."""
    torch.manual_seed(seed)
    frozen = teacher.clone()
    gates = build_gates(frozen)
    state = _GateTeacher(gates, block_size)
    install(frozen, state)
    optimizer = torch.optim.AdamW(gates.parameters(), lr=learning_rate)
    pad = frozen.prompts.tokenizer.pad_token_id
    loss_value = float("nan")
    progress = step_progress("training attention gates", show_progress)
    with progress:
        task = progress.add_task("gates", total=steps, loss="-")
        for step in range(steps):
            examples = [
                make_example(seed + 4, "train", i, "image")
                for i in range(step * batch_size, (step + 1) * batch_size)
            ]
            batch = collate([frozen.prompts.encode(e) for e in examples], pad)
            state.losses.clear()
            with torch.no_grad():
                frozen.model(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"],
                )
            loss = torch.stack(state.losses).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_value = float(loss.detach())
            progress.update(task, advance=1, loss=f"{loss_value:.4f}")
    return gates, loss_value


# --- the trained gates in the cache, beside the teacher ----------------------------------------
GATE_FILE = "gates.safetensors"
INFO_FILE = "gate.json"


def gate_path(teacher_dir: Path, settings: dict[str, Any]) -> Path:
    """`<teacher dir>-gate-<key>`; the key hashes the teacher's name and the gate's training."""
    data = {"teacher": teacher_dir.name, **settings}
    key = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]
    return teacher_dir.parent / f"{teacher_dir.name}-gate-{key}"


def find_gates(teacher: ModelBundle, settings: dict[str, Any]) -> Path:
    """The cached gates' directory, or one line saying how to make them."""
    path = gate_path(teacher_dir_of(teacher, "gated attention pruning"), settings)
    if not (path / GATE_FILE).is_file():
        raise CompoundError(
            f"no attention gates of {teacher.preset} for these settings in {path.parent}; run "
            "`compound run --train-students` with them (it trains what a run needs) first"
        )
    return path


def ensure_gates(
    teacher: ModelBundle, settings: dict[str, Any], *, show_progress: bool = True
) -> tuple[Path, bool]:
    """The gates' directory, and whether they were trained just now."""
    path = gate_path(teacher_dir_of(teacher, "gated attention pruning"), settings)
    if (path / GATE_FILE).is_file():
        return path, False
    check_cache_dir(path.parent.parent, writable=True)
    started = time.perf_counter()
    gates, final_loss = train_gates(teacher, show_progress=show_progress, **settings)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-pid{os.getpid()}-", dir=path.parent))
    try:
        save_file(gates.state_dict(), str(staging / GATE_FILE))
        info = {
            **settings,
            "teacher": str(teacher.source),
            "final_kl": final_loss,
            "seconds": round(time.perf_counter() - started, 1),
            "torch_threads": torch.get_num_threads(),
        }
        (staging / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        if path.exists():
            shutil.rmtree(path)
        os.replace(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path, True


def load_gates(bundle: ModelBundle, path: Path) -> tuple[nn.ModuleList, dict[str, Any]]:
    """Gates for `bundle`'s layers from `path`, on its device and dtype, and their record."""
    gates = build_gates(bundle)
    try:
        gates.load_state_dict(load_file(str(path / GATE_FILE)))
        info = json.loads((path / INFO_FILE).read_text())
    except (OSError, RuntimeError, ValueError) as error:
        raise CompoundError(f"cannot load attention gates from {path}: {error}") from None
    return gates.to(bundle.device, bundle.dtype).eval().requires_grad_(False), info
