"""Gradient-compensated fine-tuning after attention pruning (paper 2.2, "SparseFinetune").

A mask that skips attention weakens some heads more than others. Before fine-tuning we measure
how much: for each decoder head, the relative error its masked output makes against dense
causal attention on the same queries, keys and values, over a calibration batch of training
prompts. Each head's gradients (its rows of q_proj, its rows of the k/v head it reads, its
columns of o_proj) are then scaled by its error relative to the mean head's, raised to the
power `compensation` and clipped to [1/4, 4]; every other parameter keeps weight 1. Heads the
mask hurt most move most. The rule follows SquareHead (Kurtic et al. 2023, "Sparse Fine-tuning
for Inference Acceleration of Large Language Models", arXiv:2310.06927), which normalises each
layer's distillation loss by its own error so the layers sparsity weakened pull hardest; here
the same normalisation is applied per attention head, to the gradients.

The fine-tune trains the decoder (and the projector) on the training split's answer loss with
the mask active (through SDPA with the token mask: FlexAttention has no backward on a CPU), a
fixed small budget of steps; the vision tower, which the mask does not touch, stays frozen.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from core.errors import CompoundError
from models.bundle import ModelBundle
from models.checkpoint import check_cache_dir, load_model_dir, remove_stale_staging, save_checkpoint
from models.dataset import make_example
from models.evaluate import evaluate
from models.presets import get_preset
from models.sparse_attention import PATTERNS, BlockSparsePrefill, install
from models.students import teacher_dir_of
from models.train import answer_loss, collate, cosine_schedule, step_progress

WEIGHT_RANGE = (0.25, 4.0)


@dataclass(frozen=True)
class SparseFinetuneRecipe:
    """Everything that changes the fine-tuned weights; part of their cache key."""

    pattern: str = "local"
    window: int = 32
    block_size: int = 16
    steps: int = 150
    batch_size: int = 16
    learning_rate: float = 2e-4
    warmup_steps: int = 10
    compensation: float = 1.0  # 0: a plain fine-tune (every weight 1)
    calibration_examples: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if self.pattern not in PATTERNS:
            raise ValueError(f"unknown pattern {self.pattern!r}; known: {', '.join(PATTERNS)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def head_weights(errors: torch.Tensor, compensation: float) -> torch.Tensor:
    """Per-head gradient weights from per-head errors (layers, heads): (error / mean) ** c,
    clipped to `WEIGHT_RANGE`; all ones when no head has any error."""
    mean = errors.mean()
    if not bool(mean > 0):
        return torch.ones_like(errors)
    return (errors / mean).pow(compensation).clamp(*WEIGHT_RANGE)


def reweight_attention_gradients(attention: nn.Module, weights: torch.Tensor) -> list[Any]:
    """Scale one Llama-style attention layer's gradients per head by `weights` (heads,).

    q_proj rows and o_proj columns belong to one head; k/v rows to a key-value head shared by
    a group of query heads, which gets the group's mean weight. Returns the hook handles.
    """
    head_dim = attention.head_dim
    heads = weights.shape[0]
    groups = heads // (attention.k_proj.out_features // head_dim)  # query heads per kv head
    per_query_row = weights.repeat_interleave(head_dim)
    per_kv_row = weights.view(-1, groups).mean(dim=1).repeat_interleave(head_dim)
    scales = {
        attention.q_proj.weight: per_query_row[:, None],
        attention.k_proj.weight: per_kv_row[:, None],
        attention.v_proj.weight: per_kv_row[:, None],
        attention.o_proj.weight: per_query_row[None, :],
    }
    for projection, rows in (
        (attention.q_proj, per_query_row),
        (attention.k_proj, per_kv_row),
        (attention.v_proj, per_kv_row),
    ):
        if projection.bias is not None:
            scales[projection.bias] = rows
    return [
        parameter.register_hook(lambda grad, scale=scale: grad * scale.to(grad.dtype))
        for parameter, scale in scales.items()
    ]


def prefill_settings(bundle: ModelBundle, recipe: SparseFinetuneRecipe) -> dict[str, Any]:
    """`BlockSparsePrefill` arguments for serving `bundle` with the recipe's mask."""
    return {
        "image_token_id": bundle.model.config.image_token_id,
        "image_tokens": bundle.prompts.image_tokens,
        "pattern": recipe.pattern,
        "window": recipe.window,
        "block_size": recipe.block_size,
    }


class _ErrorProbe(BlockSparsePrefill):
    """The prefill state, also summing each head's masked-vs-causal output error per layer."""

    def __init__(self, layers: int, heads: int, **settings: Any) -> None:
        super().__init__(**settings)
        self.squared_error = torch.zeros(layers, heads)
        self.squared_norm = torch.zeros(layers, heads)

    def attend_module(
        self,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scaling: float | None,
    ) -> torch.Tensor:
        output = self.attend(query, key, value, scaling)
        length = self.length
        dense = F.scaled_dot_product_attention(
            query,
            key[:, :, :length],
            value[:, :, :length],
            is_causal=True,
            scale=scaling,
            enable_gqa=True,
        ).transpose(1, 2)
        real = self.current_mask.any(dim=-1)  # (rows, S): not padding
        difference = (output - dense)[real]  # (tokens, heads, head_dim)
        self.squared_error[module.layer_idx] += difference.pow(2).sum(dim=(0, 2)).float()
        self.squared_norm[module.layer_idx] += dense[real].pow(2).sum(dim=(0, 2)).float()
        return output


@torch.inference_mode()
def head_errors(teacher: ModelBundle, recipe: SparseFinetuneRecipe) -> torch.Tensor:
    """(layers, heads): relative error ‖masked − causal‖ / ‖causal‖ of each head's attention
    output on the first `calibration_examples` training image prompts (the mask changes only
    those). Runs on a clone, so the teacher is untouched."""
    probe_bundle = teacher.clone()
    config = probe_bundle.language_model.config
    probe = _ErrorProbe(
        len(probe_bundle.decoder_layers),
        config.num_attention_heads,
        **prefill_settings(probe_bundle, recipe),
    )
    install(probe_bundle, probe)
    examples = [
        make_example(recipe.seed + 2, "train", i, "image")
        for i in range(recipe.calibration_examples)
    ]
    requests = [probe_bundle.prompts.encode(e) for e in examples]
    pad = probe_bundle.prompts.tokenizer.pad_token_id
    for start in range(0, len(requests), 8):
        batch = collate(requests[start : start + 8], pad)
        probe_bundle.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
        )
    return (probe.squared_error / probe.squared_norm.clamp_min(1e-30)).sqrt()


@dataclass
class FinetuneResult:
    seconds: float
    final_loss: float
    errors: list[list[float]]  # per layer, per head, before fine-tuning
    weights: list[list[float]]


def sparse_finetune(
    teacher: ModelBundle,
    recipe: SparseFinetuneRecipe,
    kind_weights: dict[str, float],
    image_fraction: float,
    *,
    show_progress: bool = True,
) -> tuple[ModelBundle, FinetuneResult]:
    """A fine-tuned copy of `teacher` (plain attention installed, weights changed) and how it went.

    The copy is trained with the recipe's mask active; the returned bundle is a fresh clone of
    the teacher carrying the trained weights, so it saves and loads like any checkpoint.
    """
    started = time.perf_counter()
    torch.manual_seed(recipe.seed)
    errors = head_errors(teacher, recipe)
    weights = head_weights(errors, recipe.compensation)
    student = masked(teacher, recipe)
    for parameter in student.vision_encoder.parameters():
        parameter.requires_grad_(False)
    hooks = [
        handle
        for layer in range(len(student.decoder_layers))
        for handle in reweight_attention_gradients(student.attention(layer), weights[layer])
    ]
    trainable = [p for p in student.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=recipe.learning_rate, weight_decay=0.0)
    pad = student.prompts.tokenizer.pad_token_id
    image_count = round(recipe.batch_size * image_fraction)
    counts = {"image": image_count, "text": recipe.batch_size - image_count}
    next_index = {"image": 0, "text": 0}
    loss_value = float("nan")
    student.model.train()
    progress = step_progress(f"sparse fine-tune ({recipe.pattern})", show_progress)
    with progress:
        task = progress.add_task("finetune", total=recipe.steps, loss="-")
        for step in range(recipe.steps):
            for group in optimizer.param_groups:
                group["lr"] = cosine_schedule(
                    recipe.learning_rate, recipe.warmup_steps, recipe.steps, step
                )
            total, tokens = torch.zeros(()), 0
            for modality, count in counts.items():
                if count == 0:
                    continue
                first = next_index[modality]
                next_index[modality] += count
                requests = [
                    student.prompts.encode(
                        make_example(recipe.seed + 3, "train", i, modality, kind_weights)
                    )
                    for i in range(first, first + count)
                ]
                loss, scored = answer_loss(student, collate(requests, pad))
                total, tokens = total + loss, tokens + scored
            mean = total / max(1, tokens)
            optimizer.zero_grad(set_to_none=True)
            mean.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            loss_value = float(mean.detach())
            progress.update(task, advance=1, loss=f"{loss_value:.3f}")
    for handle in hooks:
        handle.remove()
    result = teacher.clone()
    result.model.load_state_dict(student.model.state_dict())
    result.model.eval()
    return result, FinetuneResult(
        seconds=time.perf_counter() - started,
        final_loss=loss_value,
        errors=errors.tolist(),
        weights=weights.tolist(),
    )


# --- the fine-tuned weights in the cache, beside the teacher -----------------------------------
def finetuned_path(teacher_dir: Path, recipe: SparseFinetuneRecipe) -> Path:
    """`<teacher dir>-sparse-<pattern>-<key>`; the key hashes the teacher's name and recipe."""
    data = {"teacher": teacher_dir.name, **recipe.to_dict()}
    key = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]
    return teacher_dir.parent / f"{teacher_dir.name}-sparse-{recipe.pattern}-{key}"


def find_finetuned(teacher: ModelBundle, recipe: SparseFinetuneRecipe) -> Path:
    """The cached fine-tuned directory, or one line saying how to make it."""
    path = finetuned_path(teacher_dir_of(teacher, "sparse fine-tuning"), recipe)
    if not path.is_dir():
        raise CompoundError(
            f"no sparse fine-tune of {teacher.preset} for this recipe in {path.parent}; run "
            "`compound run --train-students` with it (it trains what a run needs) first"
        )
    return path


def ensure_finetuned(
    teacher: ModelBundle,
    recipe: SparseFinetuneRecipe,
    *,
    show_progress: bool = True,
    validation_count: int = 2000,
) -> tuple[Path, bool]:
    """The fine-tuned checkpoint's directory, and whether it was trained just now.

    Its compound.json records the recipe, the per-head errors and weights, and accuracy on
    `validation_count` validation questions of the masked teacher before and of the masked
    fine-tuned model after."""
    path = finetuned_path(teacher_dir_of(teacher, "sparse fine-tuning"), recipe)
    if path.is_dir():
        return path, False
    check_cache_dir(path.parent.parent, writable=True)
    remove_stale_staging(path.parent, path.name)
    preset = get_preset(teacher.preset)
    settings = preset.training
    kind_weights = dict(settings.kind_weights) if settings else {}
    image_fraction = settings.image_fraction if settings else 0.5
    before = evaluate(masked(teacher, recipe), split="val", count=validation_count).accuracy
    tuned, result = sparse_finetune(
        teacher, recipe, kind_weights, image_fraction, show_progress=show_progress
    )
    after = evaluate(masked(tuned, recipe), split="val", count=validation_count).accuracy
    info = {
        "sparse_finetune": {
            **recipe.to_dict(),
            "teacher": str(teacher.source),
            "head_errors": result.errors,
            "head_weights": result.weights,
            "seconds": round(result.seconds, 1),
            "final_loss": result.final_loss,
            "val_accuracy_masked_before": before,
        },
        "val_accuracy": after,
        "val_examples": validation_count,
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "params": tuned.param_count(),
    }
    save_checkpoint(tuned, path, info)
    return path, True


def masked(bundle: ModelBundle, recipe: SparseFinetuneRecipe) -> ModelBundle:
    """A clone of `bundle` serving with the recipe's block-sparse attention."""
    copy = bundle.clone()
    install(copy, BlockSparsePrefill(**prefill_settings(copy, recipe)))
    return copy


def load_finetuned(path: Path, **kwargs: Any) -> ModelBundle:
    return load_model_dir(path, **kwargs)
