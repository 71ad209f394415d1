"""Model families as small adapters in a registry: each knows where a family keeps its modules and how to
build the `graphs` modules from them. LLaVA (CLIP + projector + Llama/Mistral text model) and Qwen2.5-VL
(`qwen2_5_vl.py`)."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn
from transformers import AutoProcessor, LlavaForConditionalGeneration

from btp.graphs import DecoderLayer, EmbedGraph, HeadGraph, RMSNorm, RotaryTable, VisionGraph
from btp.runtime.errors import ModelError

from .qwen2_5_vl import Qwen25VLFamily


class Family(Protocol):
    """What the rest of the compiler asks of a model family."""

    name: str
    model_class: type  # the Hugging Face class its checkpoints load with

    def accepts(self, config) -> bool: ...

    def check(self, model: nn.Module) -> None: ...

    def load_processor(self, source: str): ...

    def geometry(self, model) -> tuple[int, tuple[int, int]]: ...

    def image_token_range(self, model) -> tuple[int, int] | None: ...

    def bounded_processor(self, model, lo: int, hi: int): ...

    def input_fields(self, config) -> dict: ...

    def vision(self, model: nn.Module, dtype: torch.dtype) -> VisionGraph: ...

    def embed(self, model: nn.Module, dtype: torch.dtype) -> EmbedGraph: ...

    def decoder_layers(self, model: nn.Module) -> list[DecoderLayer]: ...

    def rotary(self, model: nn.Module, max_positions: int | None = None) -> RotaryTable: ...

    def head(self, model: nn.Module, dtype: torch.dtype) -> HeadGraph: ...


class LlavaFamily:
    """`LlavaForConditionalGeneration`: CLIP vision tower, 2-layer projector, Llama-style text model."""

    name = "llava"
    model_class = LlavaForConditionalGeneration
    text_types = ("llama", "mistral", "qwen2")
    vision_types = ("clip_vision_model",)
    unsupported_rope = ("dynamic", "longrope")

    def accepts(self, config) -> bool:
        return getattr(config, "model_type", None) == "llava"

    def check(self, model: nn.Module) -> None:
        cfg = model.config
        text, vision = cfg.text_config, cfg.vision_config
        if text.model_type not in self.text_types:
            raise ModelError(f"text model {text.model_type!r} is not supported; expected one of {self.text_types}")
        if vision.model_type not in self.vision_types:
            raise ModelError(f"vision tower {vision.model_type!r} is not supported; expected {self.vision_types}")
        if cfg.vision_feature_select_strategy != "default":
            raise ModelError(f"vision_feature_select_strategy {cfg.vision_feature_select_strategy!r} keeps the CLS "
                             "token beside the patch grid; expected 'default'")
        if not isinstance(cfg.vision_feature_layer, int):
            raise ModelError(f"vision_feature_layer must be one layer index, got {cfg.vision_feature_layer!r}")
        rope = (getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}).get("rope_type")
        if rope in self.unsupported_rope:
            raise ModelError(f"rope type {rope!r} changes with sequence length and cannot be tabulated")
        if getattr(text, "sliding_window", None):
            raise ModelError("sliding-window attention is not supported; expected sliding_window = null")
        if vision.image_size % vision.patch_size:
            raise ModelError(f"image size {vision.image_size} is not a multiple of patch size {vision.patch_size}")

    def load_processor(self, source: str):
        return AutoProcessor.from_pretrained(source)

    def geometry(self, model) -> tuple[int, tuple[int, int]]:
        """(image side in pixels, patch grid) of a `LoadedModel`: fixed by the vision config."""
        vision = model.config.vision_config
        side = vision.image_size // vision.patch_size
        return int(vision.image_size), (side, side)

    def image_token_range(self, model) -> None:
        """None: every image has the vision config's fixed token count."""
        return None

    def bounded_processor(self, model, lo: int, hi: int):
        raise ModelError(f"{self.name} has a fixed {model.image_tokens} image tokens per image; an image-token "
                         f"range ({lo}..{hi}) applies only to families whose count follows the image's size")

    def input_fields(self, config) -> dict:
        """The `ChainSpec` fields of its input preparation: none beyond `family`."""
        return {}

    @staticmethod
    def _text(model):
        return model.model.language_model

    def vision(self, model, dtype):
        cfg = model.config
        vcfg = cfg.vision_config
        tower = model.model.vision_tower
        tower = getattr(tower, "vision_model", tower)  # transformers <= 5.7 nest the CLIP transformer one level down
        n_layers = vcfg.num_hidden_layers
        layer = cfg.vision_feature_layer
        feature_layers = layer if layer >= 0 else n_layers + 1 + layer  # hidden_states[0] is the embedding
        side = vcfg.image_size // vcfg.patch_size
        return VisionGraph(
            tower, model.model.multi_modal_projector, feature_layers, vcfg.num_attention_heads,
            drop_cls=cfg.vision_feature_select_strategy == "default", image_size=vcfg.image_size,
            image_tokens=side * side, hidden_size=cfg.text_config.hidden_size, dtype=dtype,
        )

    def embed(self, model, dtype):
        cfg = model.config
        image_token = getattr(cfg, "image_token_id", None) or cfg.image_token_index
        return EmbedGraph(self._text(model).embed_tokens, image_token, dtype)

    def decoder_layers(self, model):
        t = model.config.text_config
        head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
        return [
            DecoderLayer(layer, t.num_attention_heads, t.num_key_value_heads, head_dim, t.rms_norm_eps)
            for layer in self._text(model).layers
        ]

    def rotary(self, model, max_positions=None):
        hf = self._text(model).rotary_emb
        limit = max_positions or model.config.text_config.max_position_embeddings
        return RotaryTable(hf.inv_freq, limit, float(getattr(hf, "attention_scaling", 1.0)))

    def head(self, model, dtype):
        text = self._text(model)
        return HeadGraph(RMSNorm(text.norm.weight, model.config.text_config.rms_norm_eps), model.lm_head, dtype)


FAMILIES: dict[str, Family] = {"llava": LlavaFamily(), "qwen2_5_vl": Qwen25VLFamily()}


def family_for(config, spec: str = "") -> Family:
    """The registered family that accepts `config`, or a `ModelError` naming what was found."""
    for family in FAMILIES.values():
        if family.accepts(config):
            return family
    found = getattr(config, "model_type", None) or type(config).__name__
    raise ModelError(f"{spec or 'model'} is not a LLaVA-style checkpoint: expected model_type one of "
                     f"{sorted(FAMILIES)}, found {found!r}")
