"""Builtin Qwen2.5-VL models: a `Qwen2_5_VLForConditionalGeneration` built from a `Qwen2_5_VLConfig` with seeded
random weights, and a `Qwen2_5_VLProcessor` (a PIL `Qwen2VLImageProcessorPil` with small pixel bounds, and a
byte-level BPE tokenizer trained here with the Qwen chat template and vision special tokens)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessorPil,
)

from .builtins import _corpus

PAD, EOS = "<|endoftext|>", "<|im_end|>"
VISION = {"vision_start": "<|vision_start|>", "vision_end": "<|vision_end|>", "image": "<|image_pad|>",
          "video": "<|video_pad|>"}
SPECIAL_TOKENS = [PAD, "<|im_start|>", EOS, "<|vision_pad|>", *VISION.values()]

# Qwen2.5-VL-Instruct's chat template (without the video and vision-id branches).
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class QwenSpec:
    """Sizes of one builtin Qwen2.5-VL model."""

    description: str
    min_tokens: int  # image tokens of the smallest and largest image the processor makes (28x28 pixels each)
    max_tokens: int
    vision_hidden: int
    vision_depth: int
    vision_heads: int
    fullatt_blocks: tuple[int, ...]
    window_size: int  # pixels; windows of window_size // 28 merged tokens a side
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    mrope_section: tuple[int, int, int]  # sums to the text head dim / 2
    vocab: int = 512
    max_positions: int = 1024
    init_range: float = 0.05
    seed: int = 0


QWEN_BUILTINS: dict[str, QwenSpec] = {
    "tiny-qwen2.5-vl": QwenSpec(
        "runs in seconds on CPU: 4..64 image tokens, 4 ViT blocks (1 and 3 full), 8 text layers (every preset's "
        "stages fit), GQA 4/2, M-RoPE",
        min_tokens=4, max_tokens=64, vision_hidden=32, vision_depth=4, vision_heads=2, fullatt_blocks=(1, 3),
        window_size=84, hidden=64, intermediate=128, layers=8, heads=4, kv_heads=2, mrope_section=(2, 3, 3),
    ),
}


def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE on the builtin corpus with Qwen's special tokens; no BOS, left padding."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=PAD, padding_side="left", model_max_length=4096,
        extra_special_tokens={f"{k}_token": v for k, v in VISION.items()},
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_processor(image_processor, tokenizer, chat_template: str | None) -> Qwen2_5_VLProcessor:
    """`Qwen2_5_VLProcessor(image_processor, tokenizer)`, without a video processor where torchvision is missing.

    transformers 5.x asks every Qwen-VL processor for a video processor, which needs torchvision, even for images
    alone (huggingface/transformers#48558). Without torchvision the same class is assembled with its video part
    unset: its `__call__` and chat template are Hugging Face's own, and videos raise."""
    try:
        return Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template)
    except (AttributeError, TypeError, ValueError):
        from transformers.utils import is_torchvision_available

        if is_torchvision_available():
            raise
    from btp.artifact.processor import assemble  # the one place that assembles a processor without its video part

    return assemble(Qwen2_5_VLProcessor, image_processor, tokenizer, chat_template)


def build_processor(spec: QwenSpec) -> Qwen2_5_VLProcessor:
    """The processor of `spec`: images resized to `min_tokens..max_tokens` 28x28 cells, the trained tokenizer."""
    image_processor = Qwen2VLImageProcessorPil(min_pixels=spec.min_tokens * 28 * 28,
                                               max_pixels=spec.max_tokens * 28 * 28)
    return make_processor(image_processor, build_tokenizer(spec.vocab), CHAT_TEMPLATE)


def build_config(spec: QwenSpec, tokenizer: PreTrainedTokenizerFast) -> Qwen2_5_VLConfig:
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in VISION.items()}
    text = dict(
        vocab_size=len(tokenizer), hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
        max_position_embeddings=spec.max_positions, rms_norm_eps=1e-6, initializer_range=spec.init_range,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": list(spec.mrope_section)},
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    vision = dict(
        depth=spec.vision_depth, hidden_size=spec.vision_hidden, intermediate_size=2 * spec.vision_hidden,
        num_heads=spec.vision_heads, out_hidden_size=spec.hidden, window_size=spec.window_size,
        fullatt_block_indexes=list(spec.fullatt_blocks), patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
        initializer_range=spec.init_range,
    )
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["image"],
                            video_token_id=ids["video"], vision_start_token_id=ids["vision_start"],
                            vision_end_token_id=ids["vision_end"], tie_word_embeddings=False)


def build_qwen_builtin(name: str) -> tuple[Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor]:
    """Build builtin `name` (a key of `QWEN_BUILTINS`) -> (fp32 model in eval mode, processor). Deterministic:
    every parameter is drawn from one seeded generator in name order (norm scales 1, the rest normal(0, range),
    biases included), so the weights do not change with transformers' initialisers."""
    spec = QWEN_BUILTINS[name]
    processor = build_processor(spec)
    tok = processor.tokenizer
    model = Qwen2_5_VLForConditionalGeneration(build_config(spec, tok))
    gen = torch.Generator().manual_seed(spec.seed)
    with torch.no_grad():
        for pname, p in sorted(model.named_parameters(), key=lambda item: item[0]):
            if pname.endswith(("norm.weight", "norm1.weight", "norm2.weight", "ln_q.weight")):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * spec.init_range)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model.eval(), processor


def save_processor(processor: Qwen2_5_VLProcessor, path) -> None:
    """`processor.save_pretrained(path)`; a processor without its video part (no torchvision, see
    `make_processor`) saves its image processor and tokenizer, which `load_model` reads back the same way."""
    if processor.video_processor is not None:
        processor.save_pretrained(path)
        return
    processor.image_processor.save_pretrained(path)
    processor.tokenizer.save_pretrained(path)
