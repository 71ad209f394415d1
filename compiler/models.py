"""`load_model`: a LLaVA-style or Qwen2.5-VL checkpoint (local directory, hub id or builtin) -> `LoadedModel`."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, PreTrainedModel

from btp.runtime.errors import ModelError
from btp.toy.builtins import BUILTINS, build_builtin
from btp.toy.qwen import QWEN_BUILTINS, build_qwen_builtin

from .families import Family, family_for

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Config keys that describe how a checkpoint was saved or run, not what it computes.
_VOLATILE_KEYS = {
    "_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures", "_attn_implementation",
    "_attn_implementation_autoset", "_commit_hash", "use_cache", "output_attentions", "output_hidden_states",
    "return_dict", "torchscript", "_experts_implementation",
}


def _canonical(obj):
    if isinstance(obj, dict):
        return {k: _canonical(v) for k, v in sorted(obj.items()) if k not in _VOLATILE_KEYS}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    return obj


def config_fingerprint(config) -> str:
    """sha256 of the model config's canonical JSON, ignoring keys that only describe how it was saved."""
    text = json.dumps(_canonical(config.to_dict()), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class LoadedModel:
    """A loaded checkpoint: the Hugging Face model and processor, its family adapter and a summary."""

    name: str
    hf: PreTrainedModel  # the family's `model_class`
    processor: object
    family: Family
    dtype: torch.dtype

    @property
    def config(self):
        return self.hf.config

    @property
    def text_config(self):
        return self.hf.config.text_config

    @property
    def num_layers(self) -> int:
        return int(self.text_config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.text_config.hidden_size)

    @property
    def intermediate_size(self) -> int:
        return int(self.text_config.intermediate_size)

    @property
    def image_size(self) -> int:
        return self.family.geometry(self)[0]

    @property
    def grid(self) -> tuple[int, int]:
        """The image-token grid (a family whose count follows the image gives its largest square one)."""
        return self.family.geometry(self)[1]

    @property
    def image_tokens(self) -> int:
        rows, cols = self.grid
        return rows * cols

    @property
    def image_token_id(self) -> int:
        return int(getattr(self.config, "image_token_id", None) or self.config.image_token_index)

    @property
    def fingerprint(self) -> str:
        return config_fingerprint(self.config)

    def summary(self) -> dict:
        return {
            "name": self.name,
            "family": self.family.name,
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "image_tokens": self.image_tokens,
            "grid": list(self.grid),
            "dtype": str(self.dtype).removeprefix("torch."),
            "fingerprint": self.fingerprint,
        }


def _resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
    elif dtype in DTYPES:
        return DTYPES[dtype]
    raise ModelError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


def load_model(spec: str, dtype: str | torch.dtype = torch.float32) -> LoadedModel:
    """Load `spec` (a local Hugging Face directory, a hub id, or `builtin:NAME`) in `dtype`, eager attention.

    Raises `ModelError` with one line for a missing path, an unknown builtin or a non-LLaVA checkpoint.
    """
    torch_dtype = _resolve_dtype(dtype)
    if spec.startswith(BUILTIN_PREFIX):
        name = spec[len(BUILTIN_PREFIX):]
        if name not in BUILTINS and name not in QWEN_BUILTINS:
            raise ModelError(f"unknown builtin model {spec!r}; expected one of: "
                             + ", ".join(BUILTIN_PREFIX + n for n in (*BUILTINS, *QWEN_BUILTINS)))
        model, processor = build_builtin(name) if name in BUILTINS else build_qwen_builtin(name)
        family = family_for(model.config, spec)
    else:
        path = Path(spec).expanduser()
        looks_local = path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1
        if looks_local and not path.is_dir():
            raise ModelError(f"model not found: expected a Hugging Face checkpoint directory or a hub id, "
                             f"and {spec!r} is neither (no such directory)")
        source = str(path) if looks_local else spec
        try:
            config = AutoConfig.from_pretrained(source)
        except (OSError, ValueError) as err:
            raise ModelError(f"cannot read a model config from {spec!r}: {str(err).splitlines()[0]}") from err
        family = family_for(config, spec)
        try:
            model = family.model_class.from_pretrained(source, dtype=torch_dtype)
            processor = family.load_processor(source)
        except (OSError, ValueError) as err:
            raise ModelError(f"cannot load {spec!r}: {str(err).splitlines()[0]}") from err
    model = model.to(torch_dtype).eval()
    model.set_attn_implementation("eager")  # the reference Hugging Face run is the eager one
    if getattr(processor, "tokenizer", None) is not None:
        processor.tokenizer.padding_side = "left"
    family.check(model)
    log.info("loaded %s (%s, %d layers)", spec, family.name, model.config.text_config.num_hidden_layers)
    return LoadedModel(name=spec, hf=model, processor=processor, family=family, dtype=torch_dtype)
