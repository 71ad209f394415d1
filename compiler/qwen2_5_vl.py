"""The Qwen2.5-VL family adapter: `Qwen2_5_VLForConditionalGeneration` (windowed ViT with 2D rotary, patch merger,
Qwen2 text model with M-RoPE) -> the `graphs` modules, and the host-side input preparation its chain needs."""

from __future__ import annotations

import math
from pathlib import Path

from torch import nn
from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

from btp.artifact.processor import PARTS, assemble, load_processor
from btp.graphs import DecoderLayer, EmbedGraph, HeadGraph, RMSNorm
from btp.graphs.layers import MRotaryTable
from btp.graphs.qwen_vision import QwenVisionGraph
from btp.runtime.errors import ModelError

# Image-token bounds of the vision graph's declared dims: the processor's defaults (56*56 .. 28*28*1280 pixels).
IMAGE_TOKENS = (4, 1280)


class Qwen25VLFamily:
    """`Qwen2_5_VLForConditionalGeneration`: images of any size within the processor's pixel bounds."""

    name = "qwen2_5_vl"
    model_class = Qwen2_5_VLForConditionalGeneration
    dynamic = True  # the image-token count follows the image's size: plans state keeps as shares

    def accepts(self, config) -> bool:
        return getattr(config, "model_type", None) == "qwen2_5_vl"

    def check(self, model: nn.Module) -> None:
        text, vision = model.config.text_config, model.config.vision_config
        if getattr(text, "use_sliding_window", False):
            raise ModelError("sliding-window attention is not supported; expected use_sliding_window = false")
        rope = text.rope_parameters or {}
        if rope.get("rope_type", "default") != "default":
            raise ModelError(f"rope type {rope.get('rope_type')!r} is not supported with M-RoPE; expected 'default'")
        half = text.hidden_size // text.num_attention_heads // 2
        if sum(rope.get("mrope_section", ())) != half:
            raise ModelError(f"mrope_section {rope.get('mrope_section')} must sum to half the head dim, {half}")
        if vision.window_size % (vision.spatial_merge_size * vision.patch_size):
            raise ModelError(f"window_size {vision.window_size} is not a multiple of "
                             f"{vision.spatial_merge_size * vision.patch_size} pixels")

    def load_processor(self, source: str):
        """The checkpoint's processor; without torchvision, its image processor and tokenizer assembled into the
        same `Qwen2_5_VLProcessor` (see `btp.toy.qwen.make_processor`); an artifact's, as `btp.artifact` saved it."""
        if (Path(source) / PARTS).is_file():
            return load_processor(source)
        try:
            return AutoProcessor.from_pretrained(source)
        except (ImportError, AttributeError, TypeError):
            from transformers.utils import is_torchvision_available

            if is_torchvision_available():
                raise
        from btp.toy.qwen import make_processor

        tokenizer = AutoTokenizer.from_pretrained(source)
        return make_processor(AutoImageProcessor.from_pretrained(source), tokenizer, tokenizer.chat_template)

    def geometry(self, model) -> tuple[int, tuple[int, int]]:
        """(image side in pixels, grid) of the largest square image the processor makes: a nominal size, since
        the image-token count follows the image."""
        ip = model.processor.image_processor
        cell = ip.patch_size * ip.merge_size
        side = math.isqrt(ip.size["longest_edge"] // (cell * cell))
        return side * cell, (side, side)

    def image_token_range(self, model) -> tuple[int, int]:
        """(min, max) image tokens of one image under the processor's pixel bounds (`size`, transformers 5: its
        `shortest_edge` and `longest_edge` are the least and most pixels), one token a `cell x cell` square."""
        ip = model.processor.image_processor
        cell = ip.patch_size * ip.merge_size
        return -(-ip.size["shortest_edge"] // (cell * cell)), ip.size["longest_edge"] // (cell * cell)

    def bounded_processor(self, model, lo: int, hi: int):
        """The model's processor with an image processor that resizes every image to `lo..hi` image tokens."""
        proc = model.processor
        ip = proc.image_processor
        cell = ip.patch_size * ip.merge_size
        size = {"shortest_edge": lo * cell * cell, "longest_edge": hi * cell * cell}
        bounded = type(ip).from_dict({**ip.to_dict(), "size": size})
        return assemble(type(proc), bounded, proc.tokenizer, proc.chat_template) if proc.video_processor is None \
            else type(proc)(image_processor=bounded, tokenizer=proc.tokenizer, video_processor=proc.video_processor,
                            chat_template=proc.chat_template)

    def input_fields(self, config) -> dict:
        """The `ChainSpec` fields of its input preparation (`btp.runtime.qwen`): merge and window sizes."""
        v = config.vision_config
        window = v.window_size // v.spatial_merge_size // v.patch_size  # pixels -> image tokens
        return {"spatial_merge": v.spatial_merge_size, "window_tokens": window}

    @staticmethod
    def _text(model):
        return model.model.language_model

    def vision(self, model, dtype):
        return QwenVisionGraph(model.model.visual, dtype, model.config.text_config.hidden_size, IMAGE_TOKENS)

    def embed(self, model, dtype):
        return EmbedGraph(self._text(model).embed_tokens, model.config.image_token_id, dtype)

    def decoder_layers(self, model):
        t = model.config.text_config
        head_dim = t.hidden_size // t.num_attention_heads
        return [DecoderLayer(layer, t.num_attention_heads, t.num_key_value_heads, head_dim, t.rms_norm_eps)
                for layer in self._text(model).layers]

    def rotary(self, model, max_positions=None):
        hf = self._text(model).rotary_emb
        limit = max_positions or model.config.text_config.max_position_embeddings
        return MRotaryTable(hf.inv_freq, limit, hf.mrope_section, float(getattr(hf, "attention_scaling", 1.0)))

    def head(self, model, dtype):
        text = self._text(model)
        return HeadGraph(RMSNorm(text.norm.weight, model.config.text_config.rms_norm_eps), model.lm_head, dtype)
