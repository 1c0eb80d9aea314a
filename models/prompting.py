"""Turn dataset examples into requests: token ids with image placeholders, and pixel tensors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from models.dataset import Example, render_array
from models.tokenizer import SEP


@dataclass
class Request:
    """One encoded example: the prompt ids, its image (if any) and the expected answer ids."""

    example: Example
    input_ids: list[int]
    pixel_values: torch.Tensor | None  # (3, H, W), normalised
    answer_ids: list[int]


@dataclass
class PromptFormat:
    """How prompts look for one model: `<bos> question <image>×N <sep>` → `answer <eos>`.

    The question comes first so that, in a causal decoder, every image token can attend to it:
    with the image first, a small decoder trained from scratch stayed at chance on questions
    that bind a word to one object (measured: colour/shape/position flat over 1000 steps).
    """

    tokenizer: PreTrainedTokenizerBase
    image_token_id: int
    image_tokens: int
    image_size: int
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def _words(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _separator(self) -> list[int]:
        sep = self.tokenizer.convert_tokens_to_ids(SEP)
        if sep is None or sep == self.tokenizer.unk_token_id:
            return self._words(" Answer:")
        return [sep]

    def pixels(self, example: Example) -> torch.Tensor:
        array = render_array(example, self.image_size).astype(np.float32) / 255.0
        mean = np.asarray(self.image_mean, dtype=np.float32)
        std = np.asarray(self.image_std, dtype=np.float32)
        return torch.from_numpy(((array - mean) / std).transpose(2, 0, 1).copy())

    def encode(self, example: Example) -> Request:
        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        image = [self.image_token_id] * self.image_tokens if example.has_image else []
        ids = bos + self._words(example.question) + image + self._separator()
        eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        pixel_values = self.pixels(example) if example.has_image else None
        return Request(example, ids, pixel_values, self._words(example.answer) + eos)


def stack_pixels(requests: list[Request]) -> torch.Tensor | None:
    """Pixel values of the image-bearing requests, in order (LLaVA fills placeholders in order)."""
    images = [r.pixel_values for r in requests if r.pixel_values is not None]
    return torch.stack(images) if images else None
