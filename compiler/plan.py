"""The BTP plan: a versioned, validated JSON document (ARCHITECTURE section 4).

Every invalid document raises `PlanError` with one line naming the field and the broken rule.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator

from btp.graphs.selection import share_count
from btp.runtime.errors import PlanError

from .cost import decoder_flops

FORMAT = "btp-plan/1"
MAX_PLAN_BYTES = 1 << 20  # a plan of a thousand stages is a few hundred KiB


class Stage(BaseModel):
    """One boundary: `layer` is the first decoder layer that sees the reduced set of `keep` image tokens.

    Picks: `spatial` grid seeds (first stage only), `attention` by score (from the top `ceil(rho*attention)`,
    rebalanced toward the first half of the span), and `keep - spatial - attention` by diversity.
    `selection` "released" is the released BTP code's form (BTP.md section 2): `int(rho*attention)` candidates,
    rebalance toward indices below `keep`, and at the first stage the union of seeds, attention picks over all
    tokens and a from-scratch diversity pick, filled by diversity to `keep`. `lambda` is always the attention
    share of the non-spatial picks, `attention / (keep - spatial)`, whatever a document stored (None at keep 0).

    `share` (plans of families whose image-token count N follows the image's size): the keep at N is
    `share_count(N, share)` = N * round(share * 10^4) // 10^4, and the attention picks `keep(N) * attention // keep`;
    `keep` and `attention` are then the counts at the plan's nominal `model.image_tokens`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    layer: int = Field(ge=0)
    keep: int = Field(ge=0)
    spatial: int = Field(0, ge=0)
    attention: int = Field(0, ge=0)
    rho: float = Field(1.0, ge=1.0, allow_inf_nan=False)
    rebalance: bool = False
    lambda_: float | None = Field(None, alias="lambda", ge=0.0, le=1.0)
    selection: Literal["exclusive", "released"] = "exclusive"
    share: float | None = Field(None, ge=0.0, lt=1.0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _derived_lambda(self) -> Stage:
        share = round(self.attention / (self.keep - self.spatial), 6) if self.keep > self.spatial else None
        object.__setattr__(self, "lambda_", share)  # frozen model: derived once, here
        return self

    @property
    def diversity(self) -> int:
        return self.keep - self.spatial - self.attention

    @property
    def candidates(self) -> int:
        if self.selection == "released":
            return max(self.attention, math.floor(self.rho * self.attention + 1e-9))
        return max(self.attention, math.ceil(self.rho * self.attention - 1e-9))

    def counts(self, n: int) -> tuple[int, int]:
        """(keep, attention) at `n` image tokens: the stored counts, or for a `share` stage its counts at `n`."""
        if self.share is None:
            return self.keep, self.attention
        keep = share_count(n, self.share)
        return keep, (keep * self.attention // self.keep if self.keep else 0)


class ModelInfo(BaseModel):
    """The model a plan was made for."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    family: str
    num_layers: int = Field(ge=1)
    image_tokens: int = Field(ge=1)
    grid: tuple[PositiveInt, PositiveInt]
    fingerprint: str
    # The image-token count follows the image's size (Qwen2.5-VL): `image_tokens` and `grid` are nominal (the
    # largest square image) and every stage states its keep as a `share`.
    dynamic: bool = False

    @model_validator(mode="after")
    def _grid_matches(self) -> ModelInfo:
        if self.grid[0] * self.grid[1] != self.image_tokens:
            rows, cols = self.grid
            raise ValueError(f"model.grid: {rows}x{cols} does not hold {self.image_tokens} image tokens")
        return self


class Plan(BaseModel):
    """A BTP plan. Construct with `Plan.load`, `Plan.parse` or `resolve_plan`; save with `plan.save`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: str
    model: ModelInfo
    score: Literal["logits", "probs"] = "logits"
    spatial_metric: Literal["manhattan", "euclidean"] = "manhattan"
    stages: tuple[Stage, ...] = ()
    calibration: dict | None = None

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        if value != FORMAT:
            raise ValueError(f"format: expected {FORMAT!r}, found {value!r}")
        return value

    @model_validator(mode="after")
    def _rules(self) -> Plan:
        m = self.model
        alive = m.image_tokens
        for i, s in enumerate(self.stages):
            at = f"stages[{i}]"
            if s.layer >= m.num_layers:
                raise ValueError(f"{at}.layer: must be below the model's {m.num_layers} layers, got {s.layer}")
            if i and s.layer <= self.stages[i - 1].layer:
                raise ValueError(f"{at}.layer: layers must strictly increase, got {s.layer} after "
                                 f"{self.stages[i - 1].layer}")
            if s.keep > alive:
                raise ValueError(f"{at}.keep: {s.keep} is above the {alive} image tokens alive before it")
            if s.keep == alive:
                raise ValueError(f"{at}.keep: must decrease below the {alive} image tokens alive before it, "
                                 f"got {s.keep}")
            if s.spatial + s.attention > s.keep:
                raise ValueError(f"{at}: spatial + attention ({s.spatial} + {s.attention}) exceeds keep ({s.keep})")
            if m.dynamic and s.share is None:
                raise ValueError(f"{at}.share: the model's image-token count follows the image's size, so every "
                                 "stage states its keep as a share of the image tokens; found none")
            if not m.dynamic and s.share is not None:
                raise ValueError(f"{at}.share: the model has a fixed {m.image_tokens} image tokens; expected a keep "
                                 f"count without a share, found share {s.share}")
            if s.share is not None and s.keep != share_count(m.image_tokens, s.share):
                raise ValueError(f"{at}.keep: share {s.share} keeps {share_count(m.image_tokens, s.share)} of "
                                 f"{m.image_tokens} image tokens, but keep says {s.keep}")
            if s.share is not None and s.spatial:
                raise ValueError(f"{at}.spatial: spatial seeds need a fixed square grid; a share stage has none")
            if s.spatial and i:
                raise ValueError(f"{at}.spatial: spatial seeds are only allowed at the first stage")
            if s.spatial and m.grid[0] != m.grid[1]:
                raise ValueError(f"{at}.spatial: spatial seeds need a square grid, the model's is "
                                 f"{m.grid[0]}x{m.grid[1]}")
            if s.layer == 0 and s.attention:
                raise ValueError(f"{at}.attention: there is no attention before layer 0, so only spatial seeds and "
                                 f"diversity may sit there (attention must be 0)")
            union = s.selection == "released" and i == 0  # the released first stage ranks over all tokens
            room = alive if union else alive - s.spatial
            if s.attention and s.candidates > room:
                rounding = "int" if s.selection == "released" else "ceil"
                raise ValueError(f"{at}.rho: {rounding}(rho * attention) = {s.candidates} candidates exceed the "
                                 f"{room} tokens " + ("alive" if union else "left after the spatial seeds"))
            alive = s.keep
        return self

    # ------------------------------------------------------------------------------------ documents
    @classmethod
    def parse(cls, data: dict | str, source: str = "plan") -> Plan:
        """Validate a JSON string or dict -> `Plan`, or `PlanError` naming the first broken field."""
        try:
            if isinstance(data, str):
                data = json.loads(data)
            return cls.model_validate(data)
        except json.JSONDecodeError as err:
            raise PlanError(f"{source}: not valid JSON: {err}") from err
        except RecursionError as err:
            raise PlanError(f"{source}: expected a plan document, found JSON nested too deeply") from err
        except ValidationError as err:
            raise PlanError(f"{source}: {_first_error(err)}") from err

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        p = Path(path)
        try:
            if p.is_file() and p.stat().st_size > MAX_PLAN_BYTES:
                raise PlanError(f"{p}: {p.stat().st_size} bytes, more than a plan's {MAX_PLAN_BYTES}; not a plan")
            text = p.read_text(encoding="utf-8")
        except OSError as err:
            raise PlanError(f"cannot read plan {str(p)!r}: {err.strerror or err}") from err
        except UnicodeDecodeError as err:
            raise PlanError(f"{p}: not a UTF-8 JSON text ({err.reason} at byte {err.start})") from err
        return cls.parse(text, source=str(p))

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json", by_alias=True, exclude_none=True), indent=2) + "\n"

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    # ------------------------------------------------------------------------------------ numbers
    @property
    def dynamic(self) -> bool:
        return self.model.dynamic

    def stage_counts(self, n: int) -> list[tuple[int, int]]:
        """Per stage, (keep, attention) at `n` image tokens (a fixed-size plan: its counts, whatever `n`)."""
        return [s.counts(n) for s in self.stages]

    def layer_tokens(self) -> list[int]:
        """Image tokens alive in each decoder layer, `[num_layers]`."""
        counts, alive, stages = [], self.model.image_tokens, list(self.stages)
        for layer in range(self.model.num_layers):
            while stages and stages[0].layer == layer:
                alive = stages.pop(0).keep
            counts.append(alive)
        return counts

    def average_image_tokens(self) -> float:
        """Layer-averaged image tokens (BTP.md: 129 for the published LLaVA-1.5-7B schedule)."""
        counts = self.layer_tokens()
        return sum(counts) / len(counts)

    def flops(self, hidden_size: int, intermediate_size: int, text_tokens: int = 0) -> float:
        """Prefill FLOPs of the decoder over image tokens plus `text_tokens` (BTP.md section 5)."""
        return sum(decoder_flops(n + text_tokens, hidden_size, intermediate_size) for n in self.layer_tokens())

    def check_model(self, info: ModelInfo) -> None:
        """Raise `PlanError` when this plan was made for another model than `info`."""
        for field in ("family", "num_layers", "image_tokens", "grid", "dynamic"):
            mine, theirs = getattr(self.model, field), getattr(info, field)
            if mine != theirs:
                raise PlanError(f"model.{field}: the plan is for {mine!r}, the model has {theirs!r}")
        if self.model.fingerprint != info.fingerprint:
            raise PlanError(f"model.fingerprint: the plan was made for model {self.model.fingerprint}, "
                            f"this model is {info.fingerprint}")


def _first_error(err: ValidationError) -> str:
    e = err.errors()[0]
    loc = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in e["loc"]).replace(".[", "[")
    msg = e["msg"].removeprefix("Value error, ")
    if not loc:
        return msg
    if msg.startswith(loc.split("[")[0]):  # our own messages already start with the field
        return msg
    return f"{loc}: {msg}"
