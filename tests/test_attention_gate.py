"""Gated attention pruning: the gate's target, the keep rule and its threshold, and the
transform on the trained tiny model with gates trained for a few steps."""

from __future__ import annotations

import shutil

import pytest
import torch

from bench.configuration import TransformSpec
from core.errors import CompoundError
from models.attention_gate import block_attention_mass, ensure_gates, keep_blocks
from models.checkpoint import load_trained
from models.dataset import make_examples
from models.generation import model_inputs
from models.sparse_attention import flex_problem
from optimizations.registry import apply_transforms

needs_flex = pytest.mark.skipif(
    flex_problem(torch.device("cpu")) is not None, reason="no FlexAttention here"
)
SETTINGS = {"block_size": 16, "steps": 4}


def test_block_mass_of_uniform_attention():
    # equal keys give every allowed key the same weight: query i spreads 1/(i+1) over 0..i
    length, block = 32, 16
    query = torch.randn(1, 2, length, 8)
    key = torch.ones(1, 1, length, 8)
    mask = torch.ones(length, length, dtype=torch.bool).tril()[None]
    mass = block_attention_mass(query, key, mask, block, scaling=1.0)
    assert mass.shape == (1, 2, 2, 2)
    expected_10 = torch.tensor([16 / (i + 1) for i in range(16, 32)]).mean()
    assert mass[0, 0, 1, 0].item() == pytest.approx(expected_10.item(), rel=1e-5)
    assert mass[0, 0, 0].tolist() == pytest.approx([1.0, 0.0])
    assert mass.sum(dim=-1).flatten().tolist() == pytest.approx([1.0] * 4)


def test_keep_rule_follows_the_threshold():
    causal = torch.ones(3, 3, dtype=torch.bool).tril()[None]
    mass = torch.tensor([[[[1.0, 0, 0], [0.7, 0.3, 0], [0.05, 0.15, 0.8]]]]).clamp_min(1e-9)
    kept = [int(keep_blocks(mass.log(), t, causal).sum()) for t in (0.0, 0.1, 0.2, 0.5, 1.0)]
    assert kept == [6, 5, 4, 4, 3]  # causal blocks at 0; the diagonal always stays
    assert not keep_blocks(mass.log(), 0.0, causal)[0, 0].triu(1).any()


@pytest.fixture(scope="module")
def teacher(tiny_cache):
    return load_trained("tiny", tiny_cache)


@pytest.fixture(scope="module")
def gates(teacher):
    path, trained = ensure_gates(teacher, SETTINGS, show_progress=False)
    assert trained and (path / "gate.json").is_file()
    yield path
    shutil.rmtree(path)


def _logits(bundle, requests):
    with torch.inference_mode():
        return bundle.model(**model_inputs(bundle, requests)).logits


@needs_flex
def test_threshold_zero_is_dense_attention(teacher, gates):
    requests = [teacher.prompts.encode(e) for e in make_examples(0, "test", 4, 0.5)]
    params = {**SETTINGS, "threshold": 0.0}
    gated = apply_transforms(teacher, (TransformSpec("gated_attention_pruning", params),))
    for request in requests:
        assert torch.allclose(_logits(gated, [request]), _logits(teacher, [request]), atol=1e-5)
    assert gated.metadata["gated_pruning"]["gate"]["steps"] == SETTINGS["steps"]


@needs_flex
def test_pruned_fraction_grows_with_the_threshold(teacher, gates):
    requests = [teacher.prompts.encode(e) for e in make_examples(0, "test", 6, 1.0)]
    fractions = []
    for threshold in (0.0, 0.2, 0.5, 0.9):
        params = {**SETTINGS, "threshold": threshold}
        gated = apply_transforms(teacher, (TransformSpec("gated_attention_pruning", params),))
        state = gated.attention(0).block_sparse
        _logits(gated, requests)
        fractions.append(state.blocks_pruned / state.blocks_causal)
    assert fractions[0] == 0.0
    assert fractions == sorted(fractions) and fractions[-1] > 0


def test_untrained_gates_say_how_to_train_them(teacher):
    spec = TransformSpec("gated_attention_pruning", {"steps": 7})
    with pytest.raises(CompoundError, match="no attention gates.*--train-students"):
        apply_transforms(teacher, (spec,))
