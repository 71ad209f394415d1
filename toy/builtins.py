"""Builtin LLaVA models: seeded random weights with a real processor, or trained weights shipped here.

A builtin is an ordinary `LlavaForConditionalGeneration` and `LlavaProcessor` (a byte-level BPE tokenizer
trained here with `tokenizers`, with the image token and a chat template, and a CLIP image processor), so
nothing downstream can tell it from a downloaded checkpoint. A builtin with `weights` set (`toy-vlm`) loads
a `save_pretrained` directory of model and processor from the package data instead of building one.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass
from importlib import resources

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from btp.runtime.errors import ModelError

try:  # transformers >= 5 names the PIL image processor explicitly; the plain name wants torchvision there
    from transformers import CLIPImageProcessorPil as _CLIPImageProcessor
except ImportError:  # pragma: no cover - transformers 4.x
    from transformers import CLIPImageProcessor as _CLIPImageProcessor

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", IMAGE_TOKEN]

# LLaVA-1.5 conversation format: "USER: <image>\n{question} ASSISTANT:".
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}{{ item['text'] }}{% endfor %}{% endif %}</s>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def _corpus() -> list[str]:
    """A small deterministic English corpus about simple scenes, for training the builtin tokenizer."""
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white", "gray", "brown"]
    shapes = ["circle", "square", "triangle", "star", "cross", "ring", "line", "dot", "heart", "arrow"]
    places = ["top left", "top right", "bottom left", "bottom right", "center", "middle", "left", "right"]
    questions = [
        "What is shown in the image?",
        "Describe the image in detail.",
        "What colour is the {s}?",
        "Where is the {c} {s}?",
        "How many {s}s are there?",
        "Is there a {c} {s} left of the {s2}?",
    ]
    answers = ["There is a {c} {s} in the {p} of the image.", "The {s} is {c}.", "Yes.", "No.", "Two.", "Three."]
    lines = []
    for (c, s), p in zip(itertools.product(colours, shapes), itertools.cycle(places)):
        s2 = shapes[(shapes.index(s) + 3) % len(shapes)]
        for q in questions:
            lines.append("USER: " + q.format(c=c, s=s, s2=s2) + " ASSISTANT: ")
        for a in answers:
            lines.append(a.format(c=c, s=s, p=p))
    return lines


def build_tokenizer(vocab_size: int, corpus: list[str] | None = None) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `corpus` (default: the builtin one); BOS prepended, left padding, `<image>`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus() if corpus is None else corpus, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",
        model_max_length=4096,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


@dataclass(frozen=True)
class BuiltinSpec:
    """Sizes of one builtin model."""

    description: str
    image_size: int
    patch_size: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    max_positions: int
    init_range: float = 0.02
    seed: int = 0
    weights: str | None = None  # package-data directory of trained weights and processor; None: random weights


BUILTINS: dict[str, BuiltinSpec] = {
    "tiny-llava": BuiltinSpec(
        "runs in seconds on CPU: 8x8 = 64 image tokens, 8 text layers, GQA 4 heads / 2 KV heads",
        image_size=32, patch_size=4, vision_hidden=32, vision_layers=3, vision_heads=2,
        hidden=64, intermediate=128, layers=8, heads=4, kv_heads=2, vocab=512, max_positions=1024,
        init_range=0.05,
    ),
    "llava-bench": BuiltinSpec(
        "benchmark size: 24x24 = 576 image tokens at 336 px, Llama-like text model 1024 wide, 16 layers",
        image_size=336, patch_size=14, vision_hidden=384, vision_layers=7, vision_heads=6,
        hidden=1024, intermediate=2816, layers=16, heads=16, kv_heads=16, vocab=1024, max_positions=4096,
    ),
    "toy-vlm": BuiltinSpec(
        "trained on the toy shapes task (btp.toy.task): 9x9 = 81 image tokens at 72 px, 6 text layers",
        image_size=72, patch_size=8, vision_hidden=96, vision_layers=3, vision_heads=4,
        hidden=128, intermediate=384, layers=6, heads=4, kv_heads=2, vocab=512, max_positions=512,
        init_range=0.1, weights="data/toy-vlm",
    ),
}


def build_processor(spec: BuiltinSpec, tokenizer: PreTrainedTokenizerFast | None = None) -> LlavaProcessor:
    """The `LlavaProcessor` of `spec`: `tokenizer` (default: BPE on the builtin corpus) and a CLIP processor."""
    tokenizer = build_tokenizer(spec.vocab) if tokenizer is None else tokenizer
    image_processor = _CLIPImageProcessor(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )


def build_config(spec: BuiltinSpec, tokenizer: PreTrainedTokenizerFast) -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=4 * spec.vision_hidden,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden,
        initializer_range=spec.init_range,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=spec.max_positions,
        rms_norm_eps=1e-5,
        initializer_range=spec.init_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        pad_token_id=tokenizer.pad_token_id,
    )


def random_model(spec: BuiltinSpec, processor: LlavaProcessor) -> LlavaForConditionalGeneration:
    """Seeded random fp32 weights for `spec` around `processor`'s tokenizer (eval mode). Deterministic."""
    tokenizer = processor.tokenizer
    config = build_config(spec, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = LlavaForConditionalGeneration(config)
    seeded_init(model, spec.seed)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model.eval()


def seeded_init(model: LlavaForConditionalGeneration, seed: int) -> None:
    """Overwrite every parameter of `model` from one seeded generator, in parameter-name order, after the scheme
    of transformers' CLIP and Llama initialisers: norm scales 1, biases 0; in the vision tower the class
    embedding normal(0, d^-1/2), attention and MLP projections scaled by width and depth, other vision weights
    normal(0, range); everything else (text model, projector, head) normal(0, the text config's range).

    transformers' own initialisation changes between releases (5.6 and 5.24 give other weights for the same
    seed), so the random builtins would be other models on other versions; this gives the same weights on all.
    """
    vcfg, tcfg = model.config.vision_config, model.config.text_config
    d, depth, factor = vcfg.hidden_size, vcfg.num_hidden_layers, vcfg.initializer_factor
    in_std = d**-0.5 * (2 * depth) ** -0.5 * factor
    vision_std = {
        "class_embedding": d**-0.5 * factor,
        "self_attn.q_proj.weight": in_std, "self_attn.k_proj.weight": in_std, "self_attn.v_proj.weight": in_std,
        "self_attn.out_proj.weight": d**-0.5 * factor,
        "mlp.fc1.weight": (2 * d) ** -0.5 * factor, "mlp.fc2.weight": in_std,
    }
    norms = {name for name, m in model.named_modules()
             if isinstance(m, torch.nn.LayerNorm) or type(m).__name__.endswith("RMSNorm")}
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda item: item[0]):
            owner, _, leaf = name.rpartition(".")
            if leaf == "bias":
                p.zero_()
            elif owner in norms:
                p.fill_(1.0)
            else:
                if ".vision_tower." in f".{name}":
                    std = next((v for k, v in vision_std.items() if name.endswith(k)), vcfg.initializer_range * factor)
                else:
                    std = tcfg.initializer_range
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def weights_dir(name: str):
    """The package-data directory (a `Traversable`) holding builtin `name`'s trained weights and processor."""
    spec = BUILTINS[name]
    if spec.weights is None:
        raise ValueError(f"builtin {name!r} has random weights, not trained ones")
    return resources.files("btp.toy").joinpath(spec.weights)


def build_builtin(name: str) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Build builtin `name` (a key of `BUILTINS`) -> (fp32 model in eval mode, processor). Deterministic.

    A builtin with trained `weights` loads them offline from the package data with `from_pretrained`.
    """
    spec = BUILTINS[name]
    if spec.weights is None:
        processor = build_processor(spec)
        return random_model(spec, processor), processor
    with resources.as_file(weights_dir(name)) as path:
        if not (path / "config.json").is_file():
            raise ModelError(f"builtin:{name} has no trained weights in the package ({spec.weights}); "
                             f"train them with btp-train-toy --out <package>/{spec.weights}")
        with _no_progress_bars():  # a 6.5 MB model loads in well under a second: a bar would only be noise
            model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32, local_files_only=True)
            processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    return model.eval(), processor


@contextlib.contextmanager
def _no_progress_bars():
    """transformers' progress bars off inside the block, as they were after it."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()

