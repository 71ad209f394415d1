"""`Pipeline`: the backend-independent engine chain (docs/architecture.md). Prefill: vision -> embed -> stage0 ->
prune1 -> stage1 -> ... -> head. Decode: embed -> every stage with its own KV cache -> head, one token at a time,
positions continuing from the unpruned prompt length. Engines only need `run(feeds) -> outputs`; all per-call state
lives in local variables, so one Pipeline can serve concurrent `generate` calls."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from . import names as n
from . import qwen
from .batches import listed, merge, sub_batches
from .chain import ChainSpec, Engine, StageLayout
from .errors import InputError
from .inputs import Inputs, check_image_size, check_prompt_text, to_rgb
from .sampling import check_sampling, next_tokens

log = logging.getLogger(__name__)
FAMILY_INPUTS = {"qwen2_5_vl": qwen}  # families whose inputs `prepare` hands to their module (LLaVA's: its own)


@dataclass
class GenerateOutput:
    """What `generate` returns. `kept_indices[row][p]` are the grid positions of the row's own image (0..N0-1,
    ascending) kept at the p-th prune stage; `logits` (when asked for) holds one fp32 `[B,V]` tensor per step."""

    texts: list[str]
    token_ids: list[list[int]]
    prompt_ids: list[list[int]]
    kept_indices: list[list[list[int]]]
    timings: dict[str, float]
    logits: list[torch.Tensor] = field(default_factory=list)


@dataclass
class _StageState:
    """One stage's decode state: its layers' KV (grown by the stage graph's present outputs) and its attention
    mask, preallocated for all new tokens."""

    layout: StageLayout
    cache: dict[str, torch.Tensor]
    mask: torch.Tensor  # [B, T_s + max_new] int64
    length: int  # valid columns of `mask`


@dataclass
class Prefill:
    """The state right after prefill: first-step `logits [B,V]`, per-stage KV caches keyed by stage name
    (`past_key_values.{i}.key/value [B,Hkv,T_s,Dh]`) and kept grid indices `[B,k]` per prune stage."""

    logits: torch.Tensor
    caches: dict[str, dict[str, torch.Tensor]]
    kept: list[torch.Tensor]
    timings: dict[str, float]


# Called after every graph runs with its name, feeds and outputs (name-keyed tensors): how checks and calibration
# see inside the chain without patching engines.
GraphObserver = Callable[[str, Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]], None]


@dataclass
class Step:
    """One step of generation: the next token of every row `[B]` (pad for rows already finished), the fp32-or-
    model-dtype logits `[B,V]` it was chosen from, the kept grid indices per prune stage (`[B0,k]` over the
    batch's first rows, fixed after prefill), the call's running timings and `rows [B]`: which of the first rows
    these are (all of them unless `steps(compact=True)` has dropped finished rows)."""

    index: int
    token: torch.Tensor
    logits: torch.Tensor
    kept: list[torch.Tensor]
    timings: dict[str, float]
    rows: torch.Tensor | None = None


@dataclass
class _Call:
    """Per-call state threaded through the graphs: timings and the observer."""

    times: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    on_graph: GraphObserver | None = None
    timed: bool = True  # prefill graphs are timed one by one; decode steps as a whole


class TextStream:
    """Iterate for the pieces of one streamed answer; `kept_indices` (per prune stage, grid positions) and
    `timings` are filled once prefill has run."""

    def __init__(self, pipe: Pipeline, steps: Iterator[Step]):
        self.timings, self.token_ids, self._kept = {}, [], []  # timings and kept: filled by prefill
        self._pipe, self._steps = pipe, steps

    @property
    def kept_indices(self) -> list[list[int]]:
        return [k[0].tolist() for k in self._kept]

    def _tokens(self) -> Iterator[torch.Tensor]:
        for step in self._steps:
            self._kept, self.timings = step.kept, step.timings
            yield step.token

    def __iter__(self) -> Iterator[str]:
        eos = self._pipe.spec.eos_token_ids
        text = Detokenizer(self._pipe.processor.tokenizer)
        for token in self._tokens():
            t = int(token[0])
            self.token_ids.append(t)
            if piece := text.add(t):
                yield piece
            if t in eos:
                break
        if rest := text.flush():
            yield rest


class Detokenizer:
    """Text pieces of one answer as its token ids arrive: decodes a window that restarts after each newline (each
    token costs the line, not the answer) and holds back an incomplete UTF-8 character; `flush` gives the rest."""

    def __init__(self, tokenizer):
        self._tok, self._window, self._shown, self._text = tokenizer, [], "", ""

    def add(self, token_id: int) -> str:
        self._window.append(token_id)
        self._text = text = self._tok.decode(self._window, skip_special_tokens=True)
        piece = text[len(self._shown):] if len(text) > len(self._shown) and not text.endswith("\ufffd") else ""
        if piece:
            self._shown = text
        if self._shown.endswith("\n"):
            self._window, self._shown, self._text = [], "", ""
        return piece

    def flush(self) -> str:
        piece, self._shown = self._text[len(self._shown):], self._text
        return piece


class Pipeline:
    """Chains `engines` (keyed by graph name: vision, embed, stage*, prune*, head) per `spec`.

    `processor` is a LLaVA-style processor: callable on `images=`, `text=`, with a `tokenizer` and
    (optionally) `apply_chat_template`.
    """

    def __init__(self, engines: Mapping[str, Engine], spec: ChainSpec, processor, device: str | torch.device = "cpu"):
        needed = [n.VISION, n.EMBED, n.HEAD] + [s.name for s in spec.stages] + [p.prune for p in spec.prunes]
        missing = [g for g in needed if g not in engines]
        if missing:
            raise ValueError(f"engines missing for graphs {missing}")
        self.engines, self.spec, self.processor = dict(engines), spec, processor
        self.device = torch.device(device)
        self.manifest = None  # set when loaded from an artifact directory
        self.image_token = processor.tokenizer.convert_ids_to_tokens(spec.image_token_id)
        # No token spells more characters than the vocabulary's longest: a prompt longer than max_prompt times that
        # cannot fit, and is refused before the tokenizer spends time proportional to it.
        vocab = processor.tokenizer.get_vocab() if hasattr(processor.tokenizer, "get_vocab") else {}
        self._max_token_chars = max((len(t) for t in vocab), default=0) or None

    # ----------------------------------------------------------------------------------------- inputs
    def prompt_text(self, prompt: str) -> str:
        """The full prompt for one image: the chat template around `prompt`, unless it already holds the
        image token (then it is used as written)."""
        if self.image_token in prompt:
            return prompt
        template = getattr(self.processor, "chat_template", None)
        if not template:
            return f"{self.image_token}\n{prompt}"
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    def prepare(self, images: Sequence, prompts: Sequence[str]) -> Inputs:
        """Tokenize and preprocess one image per prompt as the chain's family does (`spec.family`); raise
        `InputError` on what the model cannot take."""
        if (family := FAMILY_INPUTS.get(self.spec.family)) is not None:
            return family.prepare(self, images, prompts)
        enc = self.encode(images, prompts)
        ids, mask = enc["input_ids"].to(torch.int64), enc["attention_mask"].to(torch.int64)
        start = self.image_span(ids, self.spec.image_tokens)
        pixels = enc["pixel_values"]
        want = (ids.shape[0], 3, self.spec.image_size, self.spec.image_size)
        if tuple(pixels.shape) != want:
            raise InputError(f"expected pixel_values of shape {want}, got {tuple(pixels.shape)}")
        dev = self.device
        return Inputs(ids.to(dev), mask.to(dev), pixels.to(dev, self.spec.torch_dtype), start.to(dev),
                      image_tokens=self.spec.image_tokens)

    def encode(self, images: Sequence, prompts: Sequence[str]):
        """The processor's output (`input_ids`, `attention_mask` `[B,T]`, the image tensors) for one image per
        prompt, after the checks that need no knowledge of the model family; `InputError` otherwise."""
        images, prompts = listed(images, prompts)
        texts = []
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise InputError(f"prompt {i}: expected a string, got {type(p).__name__}")
            check_prompt_text(p, f"prompt {i}")
            limit = self.spec.max_prompt and self._max_token_chars and self.spec.max_prompt * self._max_token_chars
            if limit and len(p) > limit:
                raise InputError(f"prompt {i} too long: {len(p)} characters cannot fit in the artifact's "
                                 f"{self.spec.max_prompt} tokens (at most {self._max_token_chars} characters a token)")
            text = self.prompt_text(p)
            found = text.count(self.image_token)
            if found != 1:
                raise InputError(f"prompt {i}: expected exactly one {self.image_token} placeholder, found {found}")
            texts.append(text)
        for i, image in enumerate(images):
            w, h = getattr(image, "width", None), getattr(image, "height", None)  # PIL images; arrays go on
            if isinstance(w, int) and isinstance(h, int):
                check_image_size((w, h), f"image {i}")
                if isinstance(getattr(image, "mode", None), str):  # the processor's convert saturates 16-bit gray
                    images[i] = to_rgb(image)
        try:
            enc = self.processor(images=images, text=texts, padding=True, return_tensors="pt")
        except Exception as err:  # the processor is third-party code: any failure here is about the input
            first = (str(err).strip().splitlines() or [""])[0][:200]
            raise InputError(f"cannot preprocess the images: {type(err).__name__}: {first}") from err
        ids, mask, spec = enc["input_ids"], enc["attention_mask"], self.spec
        if spec.max_batch is not None and ids.shape[0] > spec.max_batch:
            raise InputError(f"batch of {ids.shape[0]} prompts exceeds the artifact's max batch {spec.max_batch}")
        if spec.max_prompt is not None and ids.shape[1] > spec.max_prompt:
            raise InputError(f"prompt too long: {ids.shape[1]} tokens (image included), the artifact was built for "
                             f"at most {spec.max_prompt} (btp-compile --max-prompt)")
        if ids.shape[0] > 1 and bool((mask[:, -1] == 0).any()):
            raise InputError("the tokenizer pads on the right; the pipeline needs left padding")
        return enc

    def image_span(self, ids: torch.Tensor, n0: int) -> torch.Tensor:
        """`image_start [B]` of the one contiguous span of `n0` image tokens in each row of `ids [B,T]`, followed
        by text; `InputError` otherwise."""
        is_image = ids == self.spec.image_token_id
        counts = is_image.sum(1)
        if bool((counts != n0).any()):
            raise InputError(f"expected {n0} image tokens per prompt, found {counts.tolist()}")
        start = torch.argmax(is_image.to(torch.int64), dim=1)
        span = start[:, None] + torch.arange(n0)[None, :]
        if not bool(is_image.gather(1, span.clamp(max=ids.shape[1] - 1)).all()):
            raise InputError("the image tokens of a prompt must form one contiguous span")
        if bool((start + n0 >= ids.shape[1]).any()):
            # The last prompt token ranks the image tokens and yields the first answer token: it must be text.
            raise InputError("expected text after the image placeholder, found the prompt ending with the image")
        return start

    # ----------------------------------------------------------------------------------------- running
    def _run(self, name: str, feeds: dict[str, torch.Tensor], call: _Call) -> dict:
        engine = self.engines[name]
        t0 = time.perf_counter()
        feeds = {k: feeds[k] for k in engine.input_names}
        out = engine.run(feeds)
        if call.timed:
            if self.device.type == "cuda":  # the graph's time, not its enqueue time
                torch.cuda.synchronize(self.device)
            call.times[name] += (time.perf_counter() - t0) * 1e3
        if call.on_graph is not None:
            call.on_graph(name, feeds, out)
        return out

    def _empty_past(self, layers: Sequence[int], batch: int) -> dict[str, torch.Tensor]:
        shape = (batch, self.spec.num_kv_heads, 0, self.spec.head_dim)
        empty = torch.zeros(shape, dtype=self.spec.torch_dtype, device=self.device)
        return {n.past(i, kind): empty for i in layers for kind in n.KV_KINDS}

    def _prefill(self, inp: Inputs, max_new: int, call: _Call):
        """Run the prefill chain -> (logits [B,V], per-stage states, kept grid indices per prune)."""
        spec, b = self.spec, inp.input_ids.shape[0]
        feats = self._run(n.VISION, {n.PIXEL_VALUES: inp.pixel_values, **inp.vision}, call)[n.IMAGE_FEATURES]
        h = self._run(n.EMBED, {n.INPUT_IDS: inp.input_ids, n.IMAGE_FEATURES: feats}, call)[n.INPUTS_EMBEDS]
        mask = inp.attention_mask
        pos = (mask.cumsum(-1) - 1).clamp_min(0) if inp.position_ids is None else inp.position_ids  # pads get 0
        last_position = pos[..., -1]  # [B] or [3,B]: decode continues from the unpruned prompt's last position
        span = torch.arange(inp.image_tokens or spec.image_tokens, device=self.device)  # [N0]: this batch's image
        grid = span[None].expand(b, -1)  # [B,N0] grid ids
        kept, states, scores = [], [], None
        for layout in spec.stages:
            if layout.prune is not None:
                feeds = {n.HIDDEN_STATES: h, n.POSITION_IDS: pos, n.ATTENTION_MASK: mask,
                         n.SCORES: scores, n.IMAGE_START: inp.image_start, n.IMAGE_SPAN: span}
                out = self._run(layout.prune, feeds, call)
                h, pos, mask = out[n.PRUNED_HIDDEN_STATES], out[n.PRUNED_POSITION_IDS], out[n.PRUNED_ATTENTION_MASK]
                grid = grid.gather(1, out[n.KEEP_INDICES])
                kept.append(grid)
            feeds = {n.INPUTS_EMBEDS: h, n.POSITION_IDS: pos, n.ATTENTION_MASK: mask,
                     **self._empty_past(layout.layers, b)}
            out = self._run(layout.name, feeds, call)
            h, scores = out[n.HIDDEN_STATES], out.get(n.SCORES)
            cache = {n.as_past(k): v for k, v in out.items() if k.startswith(n.PRESENT)}
            stage_mask = torch.ones((b, mask.shape[1] + max_new), dtype=torch.int64, device=self.device)
            stage_mask[:, : mask.shape[1]] = mask
            states.append(_StageState(layout, cache, stage_mask, mask.shape[1]))
        logits = self._run(n.HEAD, {n.HIDDEN_STATES: h}, call)[n.LOGITS]
        return logits, states, kept, last_position

    def prefill(self, images: Sequence, prompts: Sequence[str], on_graph: GraphObserver | None = None) -> Prefill:
        """Run only the prefill chain (for inspection and checks); `on_graph` sees every graph's feeds and
        outputs."""
        call = _Call(on_graph=on_graph)
        logits, states, kept, _ = self._prefill(self.prepare(images, prompts), 0, call)
        return Prefill(logits, {st.layout.name: st.cache for st in states}, kept, dict(call.times))

    def _decode_step(self, token: torch.Tensor, position: torch.Tensor, states: list[_StageState],
                     no_image: torch.Tensor, call: _Call) -> torch.Tensor:
        """One token for every row: `token [B]`, `position [B]` or `[3,B]` -> logits `[B,V]`; caches grow by one."""
        h = self._run(n.EMBED, {n.INPUT_IDS: token[:, None], n.IMAGE_FEATURES: no_image}, call)[n.INPUTS_EMBEDS]
        pos = position[..., None]
        for st in states:
            st.length += 1
            feeds = {n.INPUTS_EMBEDS: h, n.POSITION_IDS: pos, n.ATTENTION_MASK: st.mask[:, : st.length], **st.cache}
            out = self._run(st.layout.name, feeds, call)
            h = out[n.HIDDEN_STATES]
            for k in st.cache:
                st.cache[k] = out[n.as_present(k)]
        return self._run(n.HEAD, {n.HIDDEN_STATES: h}, call)[n.LOGITS]

    def check(self, inp: Inputs, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0) -> None:
        """`InputError` for generation options or a prompt length that `inp` cannot run with."""
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if self.manifest is not None and max_new_tokens > self.manifest.build.max_new_tokens:
            raise InputError(f"max_new_tokens {max_new_tokens} exceeds the artifact's bound "
                             f"{self.manifest.build.max_new_tokens} (btp-compile --max-new-tokens)")
        length = inp.input_ids.shape[1]
        if length + max_new_tokens > self.spec.max_positions:
            raise InputError(f"prompt too long: {length} prompt tokens + {max_new_tokens} new tokens exceed the "
                             f"{self.spec.max_positions} positions the model was built for")
        check_sampling(temperature, top_p)

    def steps(
        self, inp: Inputs, max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
        top_p: float = 1.0, seed: int = 0, min_new_tokens: int = 0, on_graph: GraphObserver | None = None,
        drop: torch.Tensor | None = None, compact: bool = False,
    ) -> Iterator[Step]:
        """The one generation loop: prefill, then a `Step` per new token until every row has hit EOS or
        `max_new_tokens`. `inp` comes from `prepare`; `generate` and `stream` consume this. A server ends rows
        early by setting them in `drop` (bool `[B]`, read after every step); with `compact`, finished rows leave
        the batch (their KV is cut out) so that the rest decode at the smaller batch."""
        self.check(inp, max_new_tokens, temperature, top_p)
        gen = torch.Generator(device=self.device).manual_seed(seed) if do_sample else None
        spec = self.spec
        eos = torch.tensor(spec.eos_token_ids or [-1], device=self.device)
        call = _Call(on_graph=on_graph)
        times = call.times
        t0 = time.perf_counter()
        logits, states, kept, last_pos = self._prefill(inp, max_new_tokens, call)
        call.timed = False
        b = logits.shape[0]
        done = torch.zeros(b, dtype=torch.bool, device=self.device)
        no_image = torch.zeros((b, 0, spec.hidden_size), dtype=spec.torch_dtype, device=self.device)
        position, rows = last_pos, torch.arange(b, device=self.device)
        for step in range(max_new_tokens):
            scored = logits
            if step < min_new_tokens and spec.eos_token_ids:  # EOS may not end the answer yet
                logits = logits.index_fill(1, eos, float("-inf"))
            token = next_tokens(logits, do_sample, temperature, top_p, gen)
            token = torch.where(done, torch.full_like(token, spec.pad_token_id), token)
            if step == 0:
                times["ttft_ms"] = (time.perf_counter() - t0) * 1e3
                t_decode = time.perf_counter()
            yield Step(step, token, scored, kept, times, rows)
            done = done | torch.isin(token, eos)
            if drop is not None:
                done = done | drop[rows]
            if step + 1 == max_new_tokens or bool(done.all()):
                break
            if compact and bool(done.any()):
                live = (~done).nonzero()[:, 0]
                token, position, rows, done = token[live], position[..., live], rows[live], done[live]
                no_image = no_image[live]
                for st in states:
                    st.mask, st.cache = st.mask[live], {k: v[live] for k, v in st.cache.items()}
            position = position + 1
            logits = self._decode_step(token, position, states, no_image, call)
        steps = step  # decode steps actually run after the first token
        elapsed = time.perf_counter() - t_decode
        times["decode_tokens_per_s"] = steps * b / elapsed if steps and elapsed > 0 else 0.0

    def generate(self, images: Sequence, prompts: Sequence[str], max_new_tokens: int = 32, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, output_logits: bool = False,
                 min_new_tokens: int = 0, on_graph: GraphObserver | None = None) -> GenerateOutput:
        """Answer one prompt per image. Greedy by default; `do_sample` draws with `temperature`/`top_p`
        from a generator seeded with `seed`. Rows stop at EOS (the EOS id is kept in `token_ids`), but not
        before `min_new_tokens` tokens (EOS is masked until then, as in Hugging Face's `generate`).
        `on_graph(name, feeds, outputs)` sees every graph run, prefill and decode. Images resized to different
        sizes, and batches over the artifact's `max_batch`, run as sub-batches (`batches.merge`: the output)."""
        images, prompts = listed(images, prompts)
        family = FAMILY_INPUTS.get(self.spec.family)
        parts = sub_batches(family.image_grids(self, images) if family else [0] * len(images), self.spec.max_batch)
        batches = [self.prepare([images[i] for i in p], [prompts[i] for i in p]) for p in parts]
        for inp in batches:  # every sub-batch checked before any runs
            self.check(inp, max_new_tokens, temperature, top_p)
        args = (max_new_tokens, do_sample, temperature, top_p, seed, min_new_tokens, on_graph)
        outs = [self._generate(inp, output_logits, args) for inp in batches]
        return outs[0] if len(outs) == 1 else merge(outs, parts)

    def _generate(self, inp: Inputs, output_logits: bool, args: tuple) -> GenerateOutput:
        """`generate` of one prepared batch; `args`: the arguments of `steps` after `inp`."""
        logits, kept, times = [], [], {}
        b = inp.input_ids.shape[0]
        rows: list[list[int]] = [[] for _ in range(b)]
        finished = [False] * b
        eos = set(self.spec.eos_token_ids)
        for step in self.steps(inp, *args):
            kept, times = step.kept, step.timings
            if output_logits:
                logits.append(step.logits)
            for r, t in enumerate(step.token.tolist()):
                if not finished[r]:
                    rows[r].append(t)
                    finished[r] = t in eos
        prompt_ids = [ids[m.bool()].tolist() for ids, m in zip(inp.input_ids, inp.attention_mask)]
        kept_rows = [[k[r].tolist() for k in kept] for r in range(b)]
        return GenerateOutput([self.processor.tokenizer.decode(r, skip_special_tokens=True) for r in rows], rows,
                              prompt_ids, kept_rows, dict(times), logits)

    def stream(self, image, prompt: str, max_new_tokens: int = 32, do_sample: bool = False,
               temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
               on_graph: GraphObserver | None = None) -> TextStream:
        """Stream the answer to one prompt piece by piece as tokens arrive (same arguments as `generate`).

        The input is checked here, before the first token; the returned `TextStream` is iterated for text and
        holds `kept_indices` and `timings` once prefill has run."""
        inp = self.prepare([image], [prompt])
        self.check(inp, max_new_tokens, temperature, top_p)
        return TextStream(self, self.steps(inp, max_new_tokens, do_sample, temperature, top_p, seed,
                                           on_graph=on_graph))

    @classmethod
    def load(cls, path, backend: str = "auto", device: str = "cpu", threads: int = 0, optimization: str = "all",
             verify: bool = True) -> Pipeline:
        """Load an artifact directory written by `btp-compile`. `backend` is `auto` (TensorRT engines where
        present and importable, else ONNX Runtime) or `onnxruntime`; `threads` and `optimization` set the
        ONNX Runtime session options. Raises `ArtifactError` naming the file that is missing, tampered with,
        of an unknown format, or whose graph I/O disagrees with the manifest."""
        from btp.artifact.loading import load_pipeline

        return load_pipeline(cls, path, backend=backend, device=device, threads=threads,
                             optimization=optimization, verify=verify)
