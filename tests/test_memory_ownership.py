"""A transform that replaces weights frees the weights it replaced.

transformers loads safetensors weights as views of one file mapping; while any of them lives,
the mapping stays, and so do its touched pages in RSS. `load_model_dir` copies the weights out
(`_own_weights`), so fusing q/k/v and gate/up leaves peak RSS where it was. Without the copy a
serving block's peak rose by the size of the fused weights (269 MiB on a 228M-parameter model).
Each side runs in a fresh process, so its RSS is its own.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import LlavaForConditionalGeneration

from models.bundle import ModelBundle, prompt_format_for
from models.checkpoint import save_checkpoint
from models.presets import get_preset, llava_config

ROOT = Path(__file__).resolve().parent.parent
MIB = 2**20

# The tiny preset's vision tower and our vocabulary, with a decoder of about 100 MB (fp32):
# 8 layers × 3.2M parameters, of which q/k/v and gate/up (fused by fused_qkv) are 2.2M.
DECODER = dict(
    hidden_size=512,
    intermediate_size=1408,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=8,
)

# Peak RSS of the fused process may exceed the baseline's by at most this share of the fused
# weights' bytes. The leak it guards against keeps all of those bytes resident a second time
# (a share of 1.0); allocator and activation noise is a few MiB, well under the half.
SLACK_SHARE = 0.5

SERVE = """
import gc, json, sys
import torch
from bench.configuration import TransformSpec
from bench.measure.trackers.memory import peak_rss_bytes, reset_peak_rss, tensor_bytes
from models.checkpoint import load_model_dir
from models.dataset import make_examples
from models.generation import generate
from optimizations.registry import apply_transforms

torch.set_num_threads(1)
bundle = load_model_dir(sys.argv[1])
if sys.argv[2] == "fused":
    apply_transforms(bundle, (TransformSpec("fused_qkv"),), copy=False)
request = bundle.prompts.encode(next(e for e in make_examples(0, "test", 8) if e.has_image))
gc.collect()
assert reset_peak_rss(), "cannot reset VmHWM"
generate(bundle, request, 4)
peak = peak_rss_bytes()
sizes = tensor_bytes(bundle.model)
print(json.dumps({"peak_rss": peak, "tensor_bytes": sizes["param_bytes"] + sizes["buffer_bytes"]}))
"""


def _fused_bytes(layers: int, hidden: int, kv_width: int, intermediate: int) -> int:
    """fp32 bytes of the weights fused_qkv replaces: q, k, v, gate and up of every layer."""
    per_layer = hidden * (hidden + 2 * kv_width) + 2 * intermediate * hidden
    return 4 * layers * per_layer


@pytest.fixture(scope="module")
def mid_checkpoint(tmp_path_factory) -> Path:
    """A random LLaVA checkpoint with a ~100 MB decoder, saved as our checkpoints are."""
    preset = dataclasses.replace(get_preset("tiny"), name="memory-test", text=DECODER)
    model = LlavaForConditionalGeneration._from_config(llava_config(preset)).eval()
    bundle = ModelBundle(model, prompt_format_for(model), preset.name, trained=False, source="test")
    path = tmp_path_factory.mktemp("memory") / "checkpoint"
    save_checkpoint(bundle, path, {})
    return path


def serve_in_fresh_processes(checkpoint: Path) -> dict[str, dict[str, int]]:
    """Peak RSS and tensor bytes of one served request, unfused and fused, each in its own
    process (run side by side: RSS is per process, and the wall time halves)."""
    running = {
        side: subprocess.Popen(
            [sys.executable, "-c", SERVE, str(checkpoint), side],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for side in ("baseline", "fused")
    }
    figures = {}
    for side, process in running.items():
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, f"{side}: {err[-2000:]}"
        figures[side] = json.loads(out.strip().splitlines()[-1])
    return figures


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM reset is Linux-only")
def test_fused_qkv_frees_the_weights_it_replaces(mid_checkpoint):
    figures = serve_in_fresh_processes(mid_checkpoint)
    base, fused = figures["baseline"], figures["fused"]
    kv_width = DECODER["hidden_size"] // DECODER["num_attention_heads"]
    kv_width *= DECODER["num_key_value_heads"]
    fused_bytes = _fused_bytes(
        DECODER["num_hidden_layers"],
        DECODER["hidden_size"],
        kv_width,
        DECODER["intermediate_size"],
    )
    rise = fused["peak_rss"] - base["peak_rss"]
    summary = (
        f"peak RSS baseline {base['peak_rss'] / MIB:.1f} MiB, fused {fused['peak_rss'] / MIB:.1f} "
        f"MiB (rise {rise / MIB:+.1f} MiB, slack {SLACK_SHARE * fused_bytes / MIB:.1f} MiB of "
        f"{fused_bytes / MIB:.1f} MiB fused weights); tensor bytes baseline "
        f"{base['tensor_bytes'] / MIB:.1f} MiB, fused {fused['tensor_bytes'] / MIB:.1f} MiB"
    )
    print(summary)
    assert fused["tensor_bytes"] <= base["tensor_bytes"], summary
    assert rise <= SLACK_SHARE * fused_bytes, summary
