"""Model presets: the trained ones we ship recipes for, and real-scale shapes for cost-only runs.

Every preset is a LLaVA-style model built from transformers classes: a CLIP or SigLIP vision
tower, a two-layer MLP projector and a Llama-family decoder. Transforms written against these
also apply to real LLaVA-family checkpoints.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, SiglipVisionConfig

from core.errors import CompoundError
from models.tokenizer import IMAGE, build_tokenizer


@dataclass(frozen=True)
class TrainingSettings:
    """Everything that changes the trained weights; part of the checkpoint's cache key."""

    steps: int
    batch_size: int
    learning_rate: float
    warmup_steps: int
    weight_decay: float = 0.01
    image_fraction: float = 0.5
    # The randomly initialised vision tower collapses at the decoder's learning rate (measured:
    # loss stays at chance), so it learns more slowly, as in LLaVA's own recipe.
    vision_lr_scale: float = 0.1
    # Steps of vision-tower pretraining (per-cell shape and colour classification) before the
    # VLM stage, standing in for the pretrained CLIP a real LLaVA starts from.
    vision_pretrain_steps: int = 300
    # Relative weights of question kinds in the training stream (a kind left out weighs 1;
    # empty: uniform, as in evaluation). Lets training dwell on the kinds that learn slowest.
    kind_weights: tuple[tuple[str, float], ...] = ()
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    vision_family: Literal["clip", "siglip"]
    vision: dict[str, Any]
    text: dict[str, Any]
    vision_feature_layer: int = -1
    # Cost-only presets have random weights and a foreign vocabulary size; they are never trained.
    training: TrainingSettings | None = None
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def cost_only(self) -> bool:
        return self.training is None

    @property
    def image_tokens(self) -> int:
        """Visual tokens per image the decoder sees (LLaVA's "default" strategy drops CLS)."""
        return (self.vision["image_size"] // self.vision["patch_size"]) ** 2

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["cost_only"] = self.cost_only
        data["image_tokens"] = self.image_tokens
        return data


SMALL = Preset(
    name="small",
    description="the embedded default: trained here on generated data, 64 visual tokens",
    vision_family="clip",
    vision=dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=64,
        patch_size=8,
    ),
    text=dict(
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    training=TrainingSettings(
        steps=1800,
        batch_size=48,
        learning_rate=1.5e-3,
        warmup_steps=100,
        image_fraction=0.65,
        # Position questions (the slowest kind to learn: 79% on test with uniform kinds)
        # make up half of the image questions; larger/smaller two thirds of the text ones.
        kind_weights=(("larger", 2.0), ("position", 3.0), ("smaller", 2.0)),
        seed=0,
    ),
)
PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="tiny",
            description="for tests: trains in well under a minute",
            vision_family="clip",
            vision=dict(
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                image_size=32,
                patch_size=8,
            ),
            text=dict(
                hidden_size=64,
                intermediate_size=192,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
            ),
            training=TrainingSettings(
                steps=400,
                batch_size=32,
                learning_rate=3e-3,
                warmup_steps=20,
                vision_pretrain_steps=150,
                seed=0,
            ),
        ),
        SMALL,
        # the same model and recipe at 4x the pixels: 256 visual tokens per image
        replace(
            SMALL,
            name="small-hd",
            description="long context for sparse attention: small at 4x the pixels, 256 visual "
            "tokens per image (training opt-in: over 10 minutes on 2 CPU cores)",
            vision={**SMALL.vision, "image_size": 128},
        ),
        Preset(
            name="smolvlm-256m",
            description="cost-only: SigLIP-B/16-like tower + SmolLM2-135M-like decoder",
            vision_family="siglip",
            vision=dict(
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                image_size=256,
                patch_size=16,
            ),
            text=dict(
                hidden_size=576,
                intermediate_size=1536,
                num_hidden_layers=30,
                num_attention_heads=9,
                num_key_value_heads=3,
                vocab_size=49152,
                tie_word_embeddings=True,
                rope_theta=100000.0,
            ),
            notes="SmolVLM-256M itself pixel-shuffles 512px tiles to 64 tokens; this LLaVA-style "
            "shape feeds all 256 patch tokens of a 256px image to the decoder",
        ),
        Preset(
            name="llava-1.5-7b",
            description="cost-only: CLIP ViT-L/14-336 + Llama-2-7B shapes",
            vision_family="clip",
            vision=dict(
                hidden_size=1024,
                intermediate_size=4096,
                num_hidden_layers=24,
                num_attention_heads=16,
                image_size=336,
                patch_size=14,
                projection_dim=768,
            ),
            text=dict(
                hidden_size=4096,
                intermediate_size=11008,
                num_hidden_layers=32,
                num_attention_heads=32,
                num_key_value_heads=32,
                vocab_size=32064,
            ),
            vision_feature_layer=-2,
        ),
    )
}

DEFAULT_PRESET = "small"


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        known = ", ".join(PRESETS)
        raise CompoundError(f"unknown preset {name!r}; known presets: {known}") from None


def llava_config(preset: Preset) -> LlavaConfig:
    """The transformers config for a preset; trained presets use our tokenizer's vocabulary."""
    tokenizer = build_tokenizer()
    text = dict(preset.text)
    if not preset.cost_only:
        text["vocab_size"] = len(tokenizer)
    text.setdefault("max_position_embeddings", 4096)
    text_config = LlamaConfig(
        pad_token_id=tokenizer.pad_token_id if not preset.cost_only else None, **text
    )
    vision_cls = CLIPVisionConfig if preset.vision_family == "clip" else SiglipVisionConfig
    vision_config = vision_cls(**preset.vision)
    # Our own image token for trained presets; for cost-only shapes the last vocabulary id.
    image_token = (
        tokenizer.convert_tokens_to_ids(IMAGE) if not preset.cost_only else text["vocab_size"] - 1
    )
    # SigLIP has no CLS token, so "full" keeps exactly the patch tokens there too.
    strategy = "default" if preset.vision_family == "clip" else "full"
    return LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=image_token,
        image_seq_length=preset.image_tokens,
        vision_feature_select_strategy=strategy,
        vision_feature_layer=preset.vision_feature_layer,
        projector_hidden_act="gelu",
        tie_word_embeddings=bool(text.get("tie_word_embeddings", False)),
    )
