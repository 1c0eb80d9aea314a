"""Transforms that exist only for tests: one needs CUDA, one clashes, one lies about being
lossless, one targets nothing. `install_fakes` registers them for one test."""

from __future__ import annotations

import pytest
import torch

from models.bundle import ModelBundle
from optimizations import registry
from optimizations.base import Transform


class _NeedsCuda(Transform):
    name = "test_needs_cuda"
    description = "test only"
    targets = ("lm_head",)
    lossless = True
    tolerance = 0.0
    requires = frozenset({"cuda"})

    def apply_in_place(self, bundle: ModelBundle) -> None:
        pass


class _ClashesWithFused(_NeedsCuda):
    name = "test_clash"
    requires = frozenset()
    conflicts_with = frozenset({"fused_qkv"})


class _Broken(_NeedsCuda):
    """Claims to be lossless but zeroes one projection: the lossless check must catch it."""

    name = "test_broken"
    requires = frozenset()

    def apply_in_place(self, bundle: ModelBundle) -> None:
        with torch.no_grad():
            bundle.attention(0).v_proj.weight.zero_()


class _TargetsNothing(_NeedsCuda):
    name = "test_targets_nothing"
    requires = frozenset()
    targets = ("layers.*.cross_attention",)


def install_fakes(monkeypatch: pytest.MonkeyPatch) -> None:
    registry.transform_classes()  # discover the real ones first
    for cls in (_NeedsCuda, _ClashesWithFused, _Broken, _TargetsNothing):
        monkeypatch.setitem(registry.TRANSFORMS, cls.name, cls)
