"""Batching across requests: requests that arrive within `wait_s`, share sampling options and whose images have one
size once resized (one image-token count and vision feeds: Qwen2.5-VL's follow the image) are prefilled and decoded as
one batch on one worker thread (engine calls never block the event loop); the others wait for a following batch.
Each row finishes at its own EOS, limit or stop string and is answered at once, and a finished or cancelled row leaves
the batch."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from btp.runtime.errors import RequestError
from btp.runtime.pipeline import Detokenizer, Inputs, Pipeline

from .metrics import Metrics
from .protocol import ChatRequest

log = logging.getLogger(__name__)


@dataclass
class Result:
    """A finished answer: its text, why it ended (`stop` or `length`), token counts and the extensions."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    kept: dict[str, int]
    timings: dict[str, float]


@dataclass(eq=False)  # identity: jobs are compared while the queue is split
class Job:
    """One request in the queue: its parsed request, its prepared row (`Inputs` of batch 1) and the queue of
    events the worker sends it: ("start", None), ("delta", text), ("done", Result), ("error", exception)."""

    request: ChatRequest
    inputs: Inputs
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    enqueued: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    _drop: torch.Tensor | None = None
    _row: int = 0

    def emit(self, kind: str, payload=None) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))

    def cancel(self) -> None:
        """Drop this request: skipped if still queued, cut out of its batch if running."""
        self.cancelled = True
        if self._drop is not None:
            self._drop[self._row] = True


def same_image_size(a: Inputs, b: Inputs) -> bool:
    """Whether two prepared rows may share a batch: one image-token count, pixel layout and vision feeds (the
    vision graph takes one set of those per batch)."""
    return (a.image_tokens == b.image_tokens and a.pixel_values.shape[1:] == b.pixel_values.shape[1:]
            and a.vision.keys() == b.vision.keys() and all(torch.equal(v, b.vision[k]) for k, v in a.vision.items()))


def collate(rows: list[Inputs], pad_id: int) -> Inputs:
    """One left-padded batch of single-row `Inputs` of one image size (`same_image_size`): `input_ids`/
    `attention_mask [B,T]` with T the longest row, `pixel_values [B,...]`, `image_start [B]` shifted by each row's
    padding, M-RoPE `position_ids [3,B,T]` (where the family has them) with 0 at the padding, as `prepare` gives
    them, and the rows' shared vision feeds."""
    t = max(r.input_ids.shape[1] for r in rows)
    if not all(same_image_size(rows[0], r) for r in rows[1:]):
        raise ValueError("collate takes rows of one image size; group them with same_image_size")

    def left(x: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(x, (t - x.shape[-1], 0), value=value)

    positions = None if rows[0].position_ids is None else torch.cat([left(r.position_ids, 0) for r in rows], dim=1)
    return Inputs(torch.cat([left(r.input_ids, pad_id) for r in rows]),
                  torch.cat([left(r.attention_mask, 0) for r in rows]),
                  torch.cat([r.pixel_values for r in rows]),
                  torch.cat([r.image_start + t - r.input_ids.shape[1] for r in rows]),
                  positions, rows[0].vision, rows[0].image_tokens)


class _Row:
    """One row of a running batch: turns its tokens into text deltas, ends it at EOS, its limit or a stop
    string, and sends its job the events."""

    def __init__(self, job: Job, tokenizer, eos: set[int], batch: int):
        self.job, self.req, self.eos = job, job.request, eos
        self.detok = Detokenizer(tokenizer)
        self.text, self.sent, self.count, self.batch = "", 0, 0, batch
        self.finished, self.reason = False, ""
        self.first: float | None = None

    def add(self, token: int) -> None:
        self.count += 1
        if self.first is None:
            self.first = time.perf_counter()
        if token in self.eos:
            return self.finish("stop")
        if self._advance(self.detok.add(token)):
            return None
        if self.count >= self.req.max_tokens:
            self.finish("length")

    def _advance(self, piece: str, final: bool = False) -> bool:
        """Add `piece`, send what no stop string can still claim; True when a stop string ended the row."""
        if not self.text:
            piece = piece.lstrip()  # the answer's first token usually carries the space after "ASSISTANT:"
        self.text += piece
        stops = self.req.stop
        longest = max((len(s) for s in stops), default=0)
        start = max(0, self.sent - longest)
        cut = min((i for s in stops if (i := self.text.find(s, start)) >= 0), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            self.finish("stop", flushed=True)
            return True
        hold = 0 if final else max((k for s in stops for k in range(1, len(s)) if self.text.endswith(s[:k])),
                                   default=0)
        self._send(len(self.text) - hold)
        return False

    def _send(self, upto: int) -> None:
        if upto > self.sent and self.req.stream:
            self.job.emit("delta", self.text[self.sent:upto])
        self.sent = max(self.sent, upto)

    def finish(self, reason: str, flushed: bool = False) -> None:
        if self.finished:
            return
        if not flushed and self._advance(self.detok.flush(), final=True):
            return
        self._send(len(self.text))
        self.finished = True
        self.reason = reason


class Batcher:
    """The queue and the one worker thread. `submit` from the event loop; `run` is the scheduler task."""

    def __init__(self, pipe: Pipeline, metrics: Metrics, max_batch: int, wait_s: float, max_queue: int):
        self.pipe, self.metrics = pipe, metrics
        self.max_batch, self.wait_s, self.max_queue = max_batch, wait_s, max_queue
        self._pending: list[Job] = []
        self._wake = asyncio.Event()
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="btp-batch")
        self.running = 0  # rows in the batch now running

    def submit(self, job: Job) -> None:
        """Queue `job`; `RequestError` 429 when `max_queue` requests already wait."""
        if len(self._pending) >= self.max_queue:
            raise RequestError(f"the server is busy: {len(self._pending)} requests queued (btp-serve --max-queue "
                               f"{self.max_queue}); retry later", status=429, code="queue_full")
        self._pending.append(job)
        self.metrics.queue_depth.set(len(self._pending))
        self._wake.set()

    @property
    def idle(self) -> bool:
        return not self._pending and not self.running

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._pending = [j for j in self._pending if not j.cancelled]
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            first = self._pending[0]
            deadline = first.enqueued + self.wait_s

            def fits(job: Job, first: Job = first) -> bool:  # same options and image size as the oldest request
                return job.request.batch_key == first.request.batch_key and same_image_size(job.inputs, first.inputs)

            while (len([j for j in self._pending if fits(j)]) < self.max_batch
                   and (left := deadline - time.perf_counter()) > 0):
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), left)
                except asyncio.TimeoutError:
                    break
            jobs = [j for j in self._pending if fits(j) and not j.cancelled][: self.max_batch]
            taken = {id(j) for j in jobs}
            self._pending = [j for j in self._pending if id(j) not in taken]
            self.metrics.queue_depth.set(len(self._pending))
            if not jobs:
                continue
            self.running = len(jobs)
            try:
                await loop.run_in_executor(self._worker, self._generate, jobs)
            finally:
                self.running = 0

    def close(self) -> None:
        self._worker.shutdown(wait=True)

    def _generate(self, jobs: list[Job]) -> None:
        """Run one batch to the end on the worker thread, sending every job its events."""
        jobs = [j for j in jobs if not j.cancelled]  # timed out or gone while the batch waited for the worker
        if not jobs:
            return
        pipe, req = self.pipe, jobs[0].request
        drop = torch.tensor([j.cancelled for j in jobs])
        for i, job in enumerate(jobs):
            job._drop, job._row = drop, i
            job.emit("start")
        eos = set(pipe.spec.eos_token_ids)
        rows = [_Row(j, pipe.processor.tokenizer, eos, len(jobs)) for j in jobs]
        self.metrics.batch_size.observe(len(jobs))
        started = time.perf_counter()
        timings: dict[str, float] = {}
        kept: dict[str, int] = {}
        try:
            inp = collate([j.inputs for j in jobs], pipe.spec.pad_token_id)
            limit = max(j.request.max_tokens for j in jobs)
            steps = pipe.steps(inp, limit, do_sample=req.temperature > 0, temperature=req.temperature or 1.0,
                               top_p=req.top_p, seed=req.seed, min_new_tokens=req.min_tokens, drop=drop, compact=True)
            for step in steps:
                if step.index == 0:
                    kept = {s.prune: k.shape[1] for s, k in zip(pipe.spec.prunes, step.kept)}
                    self.metrics.observe_kept(kept)
                timings = step.timings
                for r, token in zip(step.rows.tolist(), step.token.tolist()):
                    row = rows[r]
                    if not (row.finished or row.job.cancelled):
                        row.add(token)
                        if row.finished:
                            drop[r] = True
                            self._answer(row, kept, timings, started)
                if all(row.finished or row.job.cancelled for row in rows):
                    break
        except Exception as err:  # noqa: BLE001 - a failing batch answers its requests, the server goes on
            log.exception("batch of %d failed", len(jobs))
            for row in rows:
                if not row.finished:
                    row.finished = True
                    row.job.emit("error", err)
            return
        for row in rows:
            if row.job.cancelled and not row.finished:
                self.metrics.dropped.inc()
            elif not row.finished:  # cannot happen: steps ends every row; answer rather than hang the client
                row.finish("length")
                self._answer(row, kept, timings, started)

    def _answer(self, row: _Row, kept: dict[str, int], timings: dict[str, float], started: float) -> None:
        now = time.perf_counter()
        job = row.job
        ttft = (row.first or now) - job.enqueued
        per_token = (now - row.first) / (row.count - 1) if row.first and row.count > 1 else None
        self.metrics.observe_answer(ttft, per_token, row.count)
        times = {"queue_ms": (started - job.enqueued) * 1e3, "ttft_ms": ttft * 1e3,
                 "total_ms": (now - job.enqueued) * 1e3, **{f"batch_{k}": v for k, v in timings.items()}}
        prompt_tokens = int(job.inputs.attention_mask.sum())
        job.emit("done", Result(row.text, row.reason, prompt_tokens, row.count, dict(kept),
                                {k: round(v, 3) for k, v in times.items()} | {"batch_size": row.batch}))
