"""The artifact's `processor/` directory: a Hugging Face processor saved and loaded back, also where a part of it
cannot be (Qwen2.5-VL's video processor needs torchvision, which images alone never use).

A processor whose video part is unset (`btp.toy.qwen.make_processor` on a machine without torchvision) is saved as
its parts: the image processor, the tokenizer, the chat template and `PARTS` naming the classes to assemble them
into. Loading reads `PARTS` where it exists and is Hugging Face's `AutoProcessor` otherwise. Transformers is
imported inside the functions: `btp.artifact` itself loads without model code.
"""

from __future__ import annotations

import json
from pathlib import Path

from btp.runtime.errors import ArtifactError

PARTS = "btp_processor.json"  # {"processor_class": ..., "image_processor_class": ...}: classes of transformers
CHAT_TEMPLATE = "chat_template.jinja"


def save_processor(processor, path: str | Path) -> None:
    """`processor.save_pretrained(path)`, or, for a processor whose video part is unset, its parts and `PARTS`."""
    path = Path(path)
    if "video_processor" not in vars(processor) or processor.video_processor is not None:
        processor.save_pretrained(str(path))
        return
    path.mkdir(parents=True, exist_ok=True)
    processor.image_processor.save_pretrained(str(path))
    processor.tokenizer.save_pretrained(str(path))
    if processor.chat_template:
        (path / CHAT_TEMPLATE).write_text(processor.chat_template)
    parts = {"processor_class": type(processor).__name__,
             "image_processor_class": type(processor.image_processor).__name__}
    (path / PARTS).write_text(json.dumps(parts, indent=2) + "\n")


def _transformers_class(name, base, what: str, path: Path):
    import transformers

    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ArtifactError(f"{path / PARTS}: {what} must name a {base.__name__} class of transformers, found "
                            f"{name!r}")
    return cls


def load_processor(path: str | Path):
    """The processor saved at `path` by `save_processor` (or by `save_pretrained`); `ArtifactError` when it
    cannot be read."""
    path = Path(path)
    if not (path / PARTS).is_file():
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(str(path))
    from transformers import AutoTokenizer
    from transformers.image_processing_utils import BaseImageProcessor
    from transformers.processing_utils import ProcessorMixin

    try:
        parts = json.loads((path / PARTS).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArtifactError(f"{path / PARTS}: unreadable ({err})") from err
    if not isinstance(parts, dict):
        raise ArtifactError(f"{path / PARTS}: expected a JSON object, found {type(parts).__name__}")
    cls = _transformers_class(parts.get("processor_class"), ProcessorMixin, "processor_class", path)
    image_cls = _transformers_class(parts.get("image_processor_class"), BaseImageProcessor, "image_processor_class",
                                    path)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    template = (path / CHAT_TEMPLATE).read_text() if (path / CHAT_TEMPLATE).is_file() else None
    return assemble(cls, image_cls.from_pretrained(str(path)), tokenizer, template)


def assemble(cls, image_processor, tokenizer, chat_template: str | None):
    """`cls(image_processor, tokenizer)` with its video part unset, as `btp.toy.qwen.make_processor` makes it:
    its `__call__` and chat template are Hugging Face's own, and videos raise."""
    proc = cls.__new__(cls)
    proc.chat_template, proc.image_processor, proc.tokenizer, proc.video_processor = (
        chat_template, image_processor, tokenizer, None)
    proc.image_token, proc.video_token = tokenizer.image_token, tokenizer.video_token
    proc.image_token_id, proc.video_token_id = tokenizer.image_token_id, tokenizer.video_token_id
    return proc
