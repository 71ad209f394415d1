"""The graphs' I/O names as the runtime knows them: one module of constants, pinned to the graph specs by
`tests/runtime/test_names.py` (graphs import nothing from runtime, so they spell the names themselves)."""

from __future__ import annotations

# Graph names (stage{j} and prune{j} come from the chain spec).
VISION, EMBED, HEAD = "vision", "embed", "head"

PIXEL_VALUES = "pixel_values"  # vision in
# Qwen2.5-VL's vision graph also takes, per image size (host-computed from the grid, as Hugging Face does):
VISION_POSITION_IDS, WINDOW_IDS = "vision_position_ids", "window_ids"
WINDOW_INDEX, WINDOW_INVERSE = "window_index", "window_inverse"
IMAGE_FEATURES = "image_features"  # vision out, embed in
INPUT_IDS = "input_ids"  # embed in
INPUTS_EMBEDS = "inputs_embeds"  # embed out, stage in
POSITION_IDS = "position_ids"
ATTENTION_MASK = "attention_mask"
HIDDEN_STATES = "hidden_states"  # stage out, prune and head in
SCORES = "scores"  # a stage's ranking of the tokens, for the prune after it
IMAGE_START = "image_start"
# Prune graphs of plans whose keeps are shares of the image tokens take `image_span [image_tokens]` int64
# (arange(N0) of the batch's image): only its length is read, and every count of the prune follows from it.
IMAGE_SPAN = "image_span"
PRUNED_HIDDEN_STATES = "pruned_hidden_states"
PRUNED_POSITION_IDS = "pruned_position_ids"
PRUNED_ATTENTION_MASK = "pruned_attention_mask"
KEEP_INDICES = "keep_indices"
LOGITS = "logits"

PAST, PRESENT = "past_key_values.", "present."  # + "{layer}.{key|value}", layer global
KV_KINDS = ("key", "value")

ALL = frozenset({PIXEL_VALUES, VISION_POSITION_IDS, WINDOW_INDEX, WINDOW_INVERSE, WINDOW_IDS, IMAGE_FEATURES, INPUT_IDS,
                 INPUTS_EMBEDS, POSITION_IDS, ATTENTION_MASK, HIDDEN_STATES, SCORES, IMAGE_START, IMAGE_SPAN,
                 PRUNED_HIDDEN_STATES, PRUNED_POSITION_IDS, PRUNED_ATTENTION_MASK, KEEP_INDICES, LOGITS})


def past(layer: int, kind: str) -> str:
    return f"{PAST}{layer}.{kind}"


def as_past(present_name: str) -> str:
    """`present.{i}.{kind}` (a stage's output) -> `past_key_values.{i}.{kind}` (its next step's input)."""
    return PAST + present_name.removeprefix(PRESENT)


def as_present(past_name: str) -> str:
    return PRESENT + past_name.removeprefix(PAST)
