"""Vision-embedding cache (paper 3.1's storage-level reuse, as serving stacks do it). Lossless.

The vision tower + projector output of every image is kept, keyed by a hash of its pixels,
in a bounded least-recently-used cache (`models.vision_cache`); a repeated image skips both
modules. Exactly the features the tower would compute again, so outputs are identical. What it
saves depends on how often images repeat: `compound run --image-reuse FRACTION` sets that share
of the workload's image requests. The cache starts empty in every measured block (each block
is the same fresh stream) and reports its hit rate and evictions per block. Hashing costs a
pass over each image's pixel bytes (and a copy to the host when the model is on a GPU).
"""

from __future__ import annotations

from models.bundle import ModelBundle
from models.vision_cache import VisionCache, install
from optimizations.base import Figure, Transform, register
from optimizations.params import Param

HIT_RATE = Figure("vision_cache_hit_rate", "images found in the cache", "fraction", "value")
EVICTIONS = Figure("vision_cache_evictions", "entries evicted per block", "count", "value")
MIB = 2**20


@register
class VisionEmbeddingCache(Transform):
    name = "vision_cache"
    description = (
        "vision-embedding cache (paper 3.1, as vLLM's encoder cache): a repeated image's "
        "encoder + projector output comes from a bounded LRU cache keyed by its pixels"
    )
    targets = ("vision_encoder", "projector")
    lossless = True
    tolerance = 0.0
    figures = (HIT_RATE, EVICTIONS)
    params = (
        Param("max_entries", int, 256, "images kept at most", low=1, high=1_000_000),
        Param("max_mib", int, 256, "MiB of features kept at most", low=1, high=1_000_000),
    )

    def apply_in_place(self, bundle: ModelBundle) -> None:
        cache = VisionCache(self.values["max_entries"], self.values["max_mib"] * MIB, bundle.events)
        install(bundle.model.model, cache)
        bundle.block_states.append(cache)
