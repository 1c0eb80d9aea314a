"""A bounded cache of vision-encoder + projector outputs, keyed by image content.

Serving stacks keep the encoder outputs of images they have seen (vLLM's encoder cache), so a
repeated image skips the vision tower and the projector. Here the LLaVA model's
`get_image_features` (which transformers' generate() and forward() both call) looks each image
of a batch up by a hash of its pixel bytes, encodes only the misses, in one call, and returns
the features in the batch's order. The key depends on the pixels alone, not on the question.

Bounded by entries and by bytes; the least recently used entry is evicted first. Per stream
(a measured block) it counts lookups and hits; `end_block` reports the hit rate and clears
the cache, so every block starts cold (`models.bundle.BlockState`).
"""

from __future__ import annotations

import hashlib
import types
from collections import OrderedDict
from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from models.events import Events


def image_key(pixels: torch.Tensor) -> str:
    """A digest of one image's pixel values (its dtype and shape included)."""
    data = pixels.detach().contiguous().cpu()
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{data.dtype}:{tuple(data.shape)}".encode())
    digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class VisionCache:
    """Image key → that image's projected features, least recently used evicted first."""

    def __init__(self, max_entries: int, max_bytes: int, events: Events) -> None:
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self.events = events
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.lookups = self.hits = self.evictions = 0
        self.form: type | None = None  # what the uncached call returns, learnt on the first

    def get(self, key: str) -> torch.Tensor | None:
        self.lookups += 1
        features = self.entries.get(key)
        if features is not None:
            self.hits += 1
            self.entries.move_to_end(key)
        return features

    def put(self, key: str, features: torch.Tensor) -> None:
        """Keep `features` (a detached view is enough: nothing writes to them), evicting the
        least recently used entries until both bounds hold; one entry above `max_bytes` is
        not kept at all."""
        size = features.numel() * features.element_size()
        if size > self.max_bytes or key in self.entries:
            return
        while self.entries and (
            len(self.entries) >= self.max_entries or self.bytes + size > self.max_bytes
        ):
            _, evicted = self.entries.popitem(last=False)
            self.bytes -= evicted.numel() * evicted.element_size()
            self.evictions += 1
        self.entries[key] = features.detach()
        self.bytes += size

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0
        self.lookups = self.hits = self.evictions = 0

    def begin_block(self) -> None:
        self.clear()

    def end_block(self) -> None:
        """Report this stream's hit rate and evictions; the next stream starts empty."""
        if self.lookups:
            self.events.value("vision_cache_hit_rate", self.hits / self.lookups, "fraction")
            self.events.value("vision_cache_evictions", self.evictions, "count")
        self.clear()


def _per_image(features: Any) -> list[torch.Tensor]:
    """The per-image feature list from whatever `get_image_features` returned: a
    ModelOutput whose `pooler_output` holds them (transformers 5.2x), a list or a tensor."""
    if isinstance(features, BaseModelOutputWithPooling):
        features = features.pooler_output
    return list(features)


def cached_image_features(
    self: torch.nn.Module, pixel_values: torch.Tensor, *args: Any, **kwargs: Any
) -> Any:
    """`LlavaModel.get_image_features` through `self.vision_cache`: the misses encoded in one
    call, every image's features returned in order, in the form the original returns."""
    cache: VisionCache = self.vision_cache
    keys = [image_key(image) for image in pixel_values]
    found = [cache.get(key) for key in keys]
    missing = [i for i, features in enumerate(found) if features is None]
    if missing:
        computed = self.uncached_image_features(pixel_values[missing], *args, **kwargs)
        cache.form = type(computed)
        for i, features in zip(missing, _per_image(computed), strict=True):
            cache.put(keys[i], features)
            found[i] = features
    if cache.form is not None and issubclass(cache.form, torch.Tensor):
        return torch.stack(found)
    if cache.form is not None and issubclass(cache.form, list | tuple):
        return found
    return BaseModelOutputWithPooling(pooler_output=found)


def install(llava_model: torch.nn.Module, cache: VisionCache) -> None:
    """Route `llava_model.get_image_features` (a LlavaModel) through `cache`, in place."""
    llava_model.vision_cache = cache
    llava_model.uncached_image_features = llava_model.get_image_features
    llava_model.get_image_features = types.MethodType(cached_image_features, llava_model)
