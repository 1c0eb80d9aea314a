"""`compound wrap`: a Llama-family LM, unchanged, behind a random vision tower, as a checkpoint
the harness loads, serves and transforms; and every refusal as one line."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from tokenizers import AddedToken
from transformers import LlamaConfig, LlamaForCausalLM, SiglipVisionConfig

from bench.cli import parse
from bench.configuration import TransformSpec
from models.checkpoint import METADATA_FILE, load_model_dir
from models.dataset import make_examples
from models.generation import generate
from models.tokenizer import build_tokenizer
from models.wrap import _wrapped_config
from optimizations.registry import apply_transforms
from tests.test_cli import assert_one_line_error, run_cli

VOCAB = 100  # above our word tokenizer's 63 ids, so they and the image token (99) are distinct


def tiny_llama_config(**overrides) -> LlamaConfig:
    shape = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return LlamaConfig(**(shape | overrides))


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied+tokenizer"])
def llama_dir(request, tmp_path_factory) -> tuple[Path, LlamaForCausalLM]:
    """A random Llama LM on disk; the tied variant also ships its own tokenizer (with a token
    ours lacks, to tell it apart)."""
    torch.manual_seed(1)
    model = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=request.param)).eval()
    path = tmp_path_factory.mktemp("llama") / "tiny-llama"
    model.save_pretrained(path)
    if request.param:
        tokenizer = build_tokenizer()
        tokenizer.add_tokens([AddedToken("zebra")])
        tokenizer.save_pretrained(path)
    return path, model


def language_model_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A causal LM's or a LLaVA's decoder and lm_head weights, under the causal LM's names."""
    state = model.state_dict()
    if "lm_head.weight" in state and not any(k.startswith("model.language_model.") for k in state):
        return state
    return {
        key.replace("model.language_model.", "model.", 1): value
        for key, value in state.items()
        if key.startswith(("model.language_model.", "lm_head."))
    }


def test_wrap_keeps_the_language_model_and_serves(llama_dir, tmp_path, capsys):
    source, lm = llama_dir
    tied = lm.config.tie_word_embeddings
    out = tmp_path / "wrapped"
    code, stdout, _ = run_cli(
        capsys, "wrap", str(source), "--out", str(out), "--vision-from", "tiny", "--json"
    )
    assert code == 0
    report = json.loads(stdout)
    assert report["image_token_id"] == VOCAB - 1 and report["trained"] is False
    assert (report["tokenizer"] == "source") if tied else report["tokenizer"].startswith("compound")

    recorded = json.loads((out / METADATA_FILE).read_text())
    assert recorded["trained"] is False and recorded["vision_from"] == "tiny"
    assert recorded["wrapped_from"] == str(source.resolve())

    bundle = load_model_dir(out)
    assert bundle.trained is False and bundle.metadata["vision_from"] == "tiny"
    expected, got = language_model_weights(lm), language_model_weights(bundle.model)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[key], got[key]) for key in expected)
    assert (bundle.lm_head.weight is bundle.language_model.embed_tokens.weight) == tied
    assert bundle.vision_encoder.config.model_type == "clip_vision_model"
    assert bundle.model.config.image_token_id == VOCAB - 1
    assert ("zebra" in bundle.prompts.tokenizer.get_vocab()) == tied

    examples = make_examples(0, "test", 4)
    assert {e.has_image for e in examples} == {True, False}
    requests = [bundle.prompts.encode(e) for e in examples]
    outputs = [generate(bundle, r, 3) for r in requests]
    for request, output in zip(requests, outputs, strict=True):
        assert output.shape == (1, len(request.input_ids) + 3)

    fused = apply_transforms(bundle, (TransformSpec("fused_qkv"),))
    assert hasattr(fused.attention(0), "qkv_proj") and hasattr(fused.mlp(0), "gate_up_proj")
    for request, output in zip(requests, outputs, strict=True):
        assert torch.equal(generate(fused, request, 3), output)


def test_the_default_vision_is_smolvlm_siglip_and_the_image_token_is_the_last_id():
    args = parse(["wrap", "lm", "--out", "x"])
    assert args.vision_from == "smolvlm-256m" and args.seed == 0
    config = _wrapped_config(tiny_llama_config(vocab_size=49152), args.vision_from)
    assert isinstance(config.vision_config, SiglipVisionConfig)
    assert config.vision_config.hidden_size == 768 and config.image_seq_length == 256
    assert config.vision_feature_select_strategy == "full"
    assert config.image_token_id == 49151
    assert config.text_config.hidden_size == 32  # the source's own text config


def test_the_seed_sets_the_random_vision_weights(llama_dir, tmp_path, capsys):
    source, _ = llama_dir
    towers = []
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        argv = ["wrap", str(source), "--out", str(tmp_path / name), "--vision-from", "tiny"]
        assert run_cli(capsys, *argv, "--seed", seed)[0] == 0
        towers.append(load_model_dir(tmp_path / name).vision_encoder.state_dict())
    same = [all(torch.equal(t[k], towers[0][k]) for k in towers[0]) for t in towers]
    assert same == [True, True, False]


def test_eval_of_a_bare_llama_dir_says_to_wrap_it(llama_dir, capsys):
    source, _ = llama_dir
    code, _, err = run_cli(capsys, "eval", "--model", str(source))
    assert_one_line_error(code, err, f"compound wrap {source} --out DIR")


def test_wrap_refuses_to_overwrite(llama_dir, tmp_path, capsys):
    source, _ = llama_dir
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli(capsys, "wrap", str(source), "--out", str(out), "--vision-from", "tiny")
    assert_one_line_error(code, err, "already exists and is not empty")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, _ = run_cli(capsys, "wrap", str(source), "--out", str(empty), "--vision-from", "tiny")
    assert code == 0 and (empty / METADATA_FILE).exists()


@pytest.mark.parametrize("model_type", ["bert", "gpt2"])
def test_wrap_refuses_a_model_that_is_not_llama_shaped(model_type, tmp_path, capsys):
    source = tmp_path / model_type
    source.mkdir()
    (source / "config.json").write_text(json.dumps({"model_type": model_type}))
    code, _, err = run_cli(capsys, "wrap", str(source), "--out", str(tmp_path / "out"))
    assert_one_line_error(code, err, "not a Llama-family decoder")
    assert not (tmp_path / "out").exists()


def test_wrap_refuses_other_sources_in_one_line(tmp_path, capsys):
    def refused(source: Path, fragment: str, *extra: str) -> None:
        out = str(tmp_path / "out")
        code, _, err = run_cli(capsys, "wrap", str(source), "--out", out, *extra)
        assert_one_line_error(code, err, fragment)

    refused(tmp_path / "nowhere", "not a directory or a .gguf file")
    refused(tmp_path, "model config is missing")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))
    refused(tmp_path / "odd", "cannot read the model config")
    llava = tmp_path / "llava"
    llava.mkdir()
    (llava / "config.json").write_text(json.dumps({"model_type": "llava"}))
    refused(llava, "already a LLaVA checkpoint")
    small = tmp_path / "small-vocab"
    LlamaForCausalLM(tiny_llama_config(vocab_size=40)).save_pretrained(small)
    refused(small, "too small for compound-bench's word tokenizer")
    refused(small, "unknown preset 'nope'", "--vision-from", "nope")


def test_a_gguf_file_without_its_packages_says_what_to_install(tmp_path, capsys, monkeypatch):
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args):
        return None if name == "gguf" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    source = tmp_path / "model.gguf"
    source.write_bytes(b"GGUF")
    code, _, err = run_cli(capsys, "wrap", str(source), "--out", str(tmp_path / "out"))
    assert_one_line_error(code, err, "pip install gguf")
