"""The sparse fine-tune: the per-head weight rule, the gradient re-weighting on a toy layer,
the error probe, and the cached fine-tune served by the `sparse_finetune` transform."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaAttention

from bench.configuration import TransformSpec
from core.errors import CompoundError
from models.checkpoint import load_trained
from models.dataset import make_examples
from models.generation import generate
from models.sparse_attention import flex_problem
from models.sparse_finetune import (
    SparseFinetuneRecipe,
    ensure_finetuned,
    finetuned_path,
    head_errors,
    head_weights,
    reweight_attention_gradients,
)
from optimizations.registry import apply_transforms

needs_flex = pytest.mark.skipif(
    flex_problem(torch.device("cpu")) is not None, reason="no FlexAttention here"
)


@pytest.fixture(scope="module")
def teacher(tiny_cache):
    return load_trained("tiny", tiny_cache)


def test_weights_are_errors_over_their_mean_clipped():
    errors = torch.tensor([[1.0, 2.0], [3.0, 2.0]])
    assert torch.allclose(head_weights(errors, 1.0), torch.tensor([[0.5, 1.0], [1.5, 1.0]]))
    assert torch.equal(head_weights(errors, 0.0), torch.ones(2, 2))
    squared = head_weights(errors, 2.0)
    assert squared[1, 0] == pytest.approx(2.25) and squared[0, 0] == pytest.approx(0.25)
    assert head_weights(torch.tensor([[100.0, 0.0, 0.0, 0.0]]), 1.0)[0, 0] == 4.0  # clipped
    assert torch.equal(head_weights(torch.zeros(2, 2), 1.0), torch.ones(2, 2))


def test_gradients_are_scaled_per_head_on_a_toy_layer():
    config = LlamaConfig(hidden_size=16, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    layer = LlamaAttention(config, layer_idx=0)
    weights = torch.tensor([1.0, 2.0, 0.5, 4.0])
    x = torch.randn(1, 5, 16)
    cos, sin = torch.ones(1, 5, 4), torch.zeros(1, 5, 4)

    def gradients() -> dict[str, torch.Tensor]:
        layer.zero_grad()
        layer(x, position_embeddings=(cos, sin), attention_mask=None)[0].pow(2).sum().backward()
        return {name: p.grad.clone() for name, p in layer.named_parameters()}

    plain = gradients()
    handles = reweight_attention_gradients(layer, weights)
    scaled = gradients()
    for handle in handles:
        handle.remove()
    rows = weights.repeat_interleave(4)  # head_dim 4
    kv_rows = torch.tensor([1.5, 2.25]).repeat_interleave(4)  # mean of each group of two
    assert torch.allclose(scaled["q_proj.weight"], plain["q_proj.weight"] * rows[:, None])
    assert torch.allclose(scaled["k_proj.weight"], plain["k_proj.weight"] * kv_rows[:, None])
    assert torch.allclose(scaled["v_proj.weight"], plain["v_proj.weight"] * kv_rows[:, None])
    assert torch.allclose(scaled["o_proj.weight"], plain["o_proj.weight"] * rows[None, :])
    assert torch.allclose(gradients()["q_proj.weight"], plain["q_proj.weight"])  # hooks gone


@needs_flex
def test_error_probe_sees_no_error_without_extra_sparsity(teacher):
    causal = head_errors(teacher, SparseFinetuneRecipe(pattern="causal", calibration_examples=4))
    local = head_errors(teacher, SparseFinetuneRecipe(window=2, calibration_examples=4))
    assert causal.shape == local.shape == (2, 4)  # tiny: 2 layers of 4 heads
    assert causal.max() < 1e-5
    assert (local > 1e-3).all()


@needs_flex
def test_fine_tune_is_cached_and_served(teacher):
    recipe = SparseFinetuneRecipe(window=2, steps=3)  # the transform's recipe for these params
    path, trained = ensure_finetuned(teacher, recipe, show_progress=False, validation_count=8)
    assert trained and path.name.startswith(f"{Path(teacher.source).name}-sparse-local-")
    assert path == finetuned_path(Path(teacher.source), recipe)
    again, trained_again = ensure_finetuned(teacher, recipe, show_progress=False)
    assert again == path and not trained_again
    with pytest.raises(CompoundError, match="no sparse fine-tune"):  # another recipe: not cached
        apply_transforms(teacher, (TransformSpec("sparse_finetune", {"window": 3}),))
    served = apply_transforms(
        teacher, (TransformSpec("sparse_finetune", {"window": 2, "steps": 3}),)
    )
    info = served.metadata["sparse_finetune"]
    assert len(info["head_weights"]) == 2 and "val_accuracy_masked_before" in info
    assert served.source == str(path)
    request = served.prompts.encode(make_examples(0, "test", 2, 1.0)[0])
    assert generate(served, request, 2).shape[1] == len(request.input_ids) + 2
    assert served.metadata["block_sparse"]["prefills"] >= 1
    changed = [
        name
        for name, tensor in served.model.state_dict().items()
        if not torch.equal(tensor, teacher.model.state_dict()[name])
    ]
    assert changed and not any("vision_tower" in name for name in changed)
    shutil.rmtree(path)
