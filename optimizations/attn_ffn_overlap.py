"""Asynchronous attention/FFN pipelining (paper 3.3) on two CUDA streams. Lossless.

Each decoder layer serves its batch as two micro-batches and runs one's attention while the
other's feed-forward network runs (`models.overlap`: the two-micro-batch schedule of SGLang's
two-batch overlap, inside one GPU, ordered by CUDA events). Needs CUDA, a batch of at least two
(a batch of one is served unsplit: nothing to overlap) and the static engine (the micro-batches
write their rows of one static KV cache in place). The same outputs as the unsplit batch,
within float rounding of the narrower GEMMs.

Reported per model call: each stream's busy time and the call's wall time, from CUDA events,
and busy/wall (1.0: nothing overlapped; 2.0: the streams ran fully side by side). The timing
events and their read-back add a synchronisation per call; `report_overlap=false` drops them.
"""

from __future__ import annotations

from core.errors import CompoundError
from models.bundle import ModelBundle
from models.overlap import CudaLanes, OverlapState, install
from optimizations.base import Figure, Transform, register
from optimizations.params import Param

RATIO = Figure("overlap_busy_over_wall", "stream busy time / wall time", "ratio", "value")
ATTENTION_BUSY = Figure("overlap_attention_busy_s", "attention stream busy", "s", "value")
FFN_BUSY = Figure("overlap_ffn_busy_s", "FFN stream busy", "s", "value")
WALL = Figure("overlap_wall_s", "decoder wall time", "s", "value")
_LAYER_PARTS = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")


@register
class AttnFfnOverlap(Transform):
    name = "attn_ffn_overlap"
    description = (
        "asynchronous pipelining (paper 3.3): two micro-batches per decoder layer, one's "
        "attention beside the other's FFN on two CUDA streams (batch >= 2, static engine)"
    )
    targets = ("layers.*.attention", "layers.*.mlp")
    lossless = True
    tolerance = 1e-4  # float32 |logit| difference: half-batch GEMMs may sum in another order
    requires = frozenset({"cuda"})
    engines = frozenset({"static"})
    engine_reason = (
        "the two micro-batches write their rows of one static KV cache in place (a dynamic "
        "cache grows by concatenating the whole batch; CUDA graphs capture one stream)"
    )
    conflicts_with = frozenset({"block_sparse_attention", "gated_attention_pruning"})
    figures = (RATIO, ATTENTION_BUSY, FFN_BUSY, WALL)
    params = (
        Param(
            "report_overlap",
            bool,
            True,
            "time each stream with CUDA events (one synchronisation per model call)",
        ),
    )

    def validate_for(self, bundle: ModelBundle) -> None:
        super().validate_for(bundle)
        for index, layer in enumerate(bundle.decoder_layers):
            missing = [part for part in _LAYER_PARTS if not hasattr(layer, part)]
            if missing:
                raise CompoundError(
                    f"transform {self.name}: decoder layer {index} is not Llama-style "
                    f"(no {', '.join(missing)})"
                )
        implementation = getattr(bundle.language_model.config, "_attn_implementation", None)
        if implementation not in ("sdpa", "eager"):
            raise CompoundError(
                f"transform {self.name}: needs the decoder on sdpa or eager attention, not "
                f"{implementation!r}"
            )

    def apply_in_place(self, bundle: ModelBundle) -> None:
        events = bundle.events
        units = {figure.metric: figure.unit for figure in self.figures}

        def report(figures: dict[str, float]) -> None:
            for metric, value in figures.items():
                events.value(metric, value, units[metric])

        lanes = CudaLanes(bundle.device, timed=self.values["report_overlap"])
        install(bundle.language_model, bundle.decoder_layers, OverlapState(lanes, report=report))
