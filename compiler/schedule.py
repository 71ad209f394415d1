"""From a per-layer drift profile to a BTP plan's stages: the calibration rule of `btp-calibrate` (BTP.md section 4).

Pure functions over plain numbers (no torch): `interpolate_profile` -> `boundaries_from_drift` -> `stage_keeps`
-> `stage_recipes`, whose dicts are `Stage(**d)` of a `Plan`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from fractions import Fraction

_EPS = 1e-9


def _round(x: float | Fraction) -> int:
    """Round half up (deterministic, unlike Python's banker's rounding)."""
    return math.floor(x + Fraction(1, 2)) if isinstance(x, Fraction) else math.floor(x + 0.5)


def interpolate_profile(points: dict[int, float], num_layers: int) -> list[float]:
    """Per-layer values from `points` keyed by 1-based layer: linear between points, constant outside.

    Returns `num_layers` values indexed by 0-based layer.
    """
    if not points:
        raise ValueError("interpolate_profile: no points given")
    if num_layers < 1:
        raise ValueError(f"interpolate_profile: num_layers must be at least 1, got {num_layers}")
    xs = sorted(points)
    out = []
    for layer in range(1, num_layers + 1):
        if layer <= xs[0]:
            out.append(float(points[xs[0]]))
        elif layer >= xs[-1]:
            out.append(float(points[xs[-1]]))
        else:
            hi = next(i for i, x in enumerate(xs) if x >= layer)
            x0, x1 = xs[hi - 1], xs[hi]
            y0, y1 = points[x0], points[x1]
            out.append(float(y0 + (y1 - y0) * (layer - x0) / (x1 - x0)))
    return out


def major_shifts(drift: Sequence[float], level: float = 0.45) -> list[tuple[int, int]]:
    """Maximal runs `(first, last)` (0-based, inclusive) of layers with drift >= `level * max(drift)`."""
    top = max(drift, default=0.0)
    if top <= 0:
        return []
    runs: list[tuple[int, int]] = []
    start = None
    for i, d in enumerate(list(drift) + [-math.inf]):
        if d >= level * top and start is None:
            start = i
        elif d < level * top and start is not None:
            runs.append((start, i - 1))
            start = None
    return runs


def _cuts(start: Fraction, die: Fraction, stages: int) -> list[Fraction]:
    """Anchors at the shift start and die-out, plus evenly spaced cuts in the prefix and the middle span."""
    if stages == 1:
        return [die]
    extra = stages - 2
    p, q = (extra + 1) // 2, extra // 2
    prefix = [start * j / (p + 1) for j in range(1, p + 1)]
    middle = [start + (die - start) * j / (q + 1) for j in range(1, q + 1)]
    return [*prefix, start, *middle, die]


def boundaries_from_drift(drift: Sequence[float], stages: int = 4) -> list[int]:
    """First-reduced layers (0-based, strictly increasing, in [1, L-1]) for `stages` stages.

    Rule (prune right before and after the major shifts, never inside one, last cut where drift died out):
    M = max drift, shifts = `major_shifts(drift)`; `start` = first layer of the first shift (cut right before it);
    `die` = first layer after the last shift with drift < 0.10*M (L-1 if none). Four stages give
    `[round(start/2), start, round((start+die)/2), die]`; other counts keep the anchors and halve the prefix and
    middle spans with ceil/floor of (stages-2)/2 evenly spaced cuts (one stage: `[die]`). A cut strictly inside a
    shift moves to its end+1 or its start, whichever is nearer (ties: end+1; start when end+1 is past L-1).
    Then cuts are made strictly increasing in [1, L-1] by bumping forward; a bump landing inside a shift skips
    to its end+1 when that is in range. When cuts are bumped past L-1 (a shift in the last layers of a shallow
    model, as on a 6-layer model whose only shift is its last layer), all cuts are packed back from L-1 onto
    the latest free layers at or before each, layers strictly inside a shift left out while enough others
    remain (else they are used too); ValueError only when L-1 < stages. A flat profile (M <= 0 or
    max-min <= 0.05*M) has no shift: anchors at depth 6/32 and 22/32 (4 stages: 3, 6, 14, 22 of 32).
    Rounding is half up; the result depends only on `drift` and `stages`.
    """
    n = len(drift)
    if stages < 1:
        raise ValueError(f"boundaries_from_drift: stages must be at least 1, got {stages}")
    if n - 1 < stages:
        raise ValueError(f"boundaries_from_drift: {n} layers cannot hold {stages} boundaries in [1, {n - 1}]")
    top = max(drift)
    runs = [] if top <= 0 or top - min(drift) <= 0.05 * top else major_shifts(drift)
    if runs:
        start = runs[0][0]
        after = runs[-1][1] + 1
        die = next((i for i in range(after, n) if drift[i] < 0.10 * top), n - 1)
        raw = [_round(c) for c in _cuts(Fraction(start), Fraction(die), stages)]
    else:
        raw = [_round(c) for c in _cuts(Fraction(6 * n, 32), Fraction(22 * n, 32), stages)]

    def inside(b: int) -> tuple[int, int] | None:
        return next(((s, e) for s, e in runs if s < b <= e), None)

    moved = []
    for b in raw:
        run = inside(b)
        if run is not None:
            s, e = run
            b = e + 1 if (e + 1 - b <= b - s and e + 1 <= n - 1) else s
        moved.append(b)
    out: list[int] = []
    for b in moved:
        b = max(b, out[-1] + 1 if out else 1)
        run = inside(b)
        if run is not None and run[1] + 1 <= n - 1:
            b = run[1] + 1
        out.append(b)
    if out[-1] > n - 1:  # pack back from the last layer, on layers outside the shifts while there are enough
        free = [b for b in range(1, n) if inside(b) is None]
        slots = free if len(free) >= stages else list(range(1, n))  # n - 1 >= stages: this always fits
        for i in reversed(range(len(out))):
            limit = min(out[i], n - 1 if i == len(out) - 1 else out[i + 1] - 1)
            out[i] = max(b for b in slots if b <= limit)
    return out


def _layer_tokens(n0: int, layers: list[int], keeps: list[int], num_layers: int) -> list[int]:
    counts, alive, s = [], n0, 0
    for layer in range(num_layers):
        if s < len(layers) and layers[s] == layer:
            alive, s = keeps[s], s + 1
        counts.append(alive)
    return counts


def last_keep(n0: int, layers: Sequence[int], keeps: Sequence[int], num_layers: int, target_tokens: float) -> int:
    """The keep of the last stage (at `layers[-1]`, after stages keeping `keeps`, one fewer than `layers`) that
    brings the layer-averaged image tokens nearest `target_tokens`; unclamped. The one keep solver of presets
    and calibration."""
    fixed = sum(_layer_tokens(n0, list(layers), [*keeps, 0], num_layers))
    return _round((target_tokens * num_layers - fixed) / (num_layers - layers[-1]))


def stage_keeps(n0: int, layers: list[int], num_layers: int, *, ratio: float = 0.5, target_tokens: float | None = None,
                floor: int = 0, cost: Callable[[list[int]], float] | None = None,
                target_cost: float | None = None) -> list[int]:
    """Image tokens kept per stage, strictly decreasing, each in [0, n0).

    `round(n0 * ratio**(s+1))` for every stage but the last; the last keeps `floor`, or is solved (integer, in
    [floor, previous keep - 1]) so the layer-averaged image tokens come closest to `target_tokens`, or so that
    `cost(per_layer_tokens)` (monotonic in tokens) comes closest to `target_cost`. ValueError when unreachable.
    """
    if not layers or any(b <= a for a, b in zip(layers, layers[1:])) or layers[0] < 0 or layers[-1] >= num_layers:
        raise ValueError(f"stage_keeps: layers {layers} must be non-empty, strictly increasing, in [0, {num_layers})")
    if not 0 < ratio < 1:
        raise ValueError(f"stage_keeps: ratio must be in (0, 1), got {ratio}")
    if target_tokens is not None and (cost is not None or target_cost is not None):
        raise ValueError("stage_keeps: give target_tokens or cost/target_cost, not both")
    if (cost is None) != (target_cost is None):
        raise ValueError("stage_keeps: cost and target_cost go together")
    keeps = [_round(n0 * ratio ** (s + 1)) for s in range(len(layers) - 1)]
    lo, hi = floor, (keeps[-1] if keeps else n0) - 1
    if any(b >= a for a, b in zip([n0, *keeps], keeps)) or floor < 0 or lo > hi:
        raise ValueError(f"stage_keeps: {n0} image tokens cannot give {len(layers)} strictly decreasing keeps "
                         f"at ratio {ratio} with floor {floor}")

    def tokens(k: int) -> list[int]:
        return _layer_tokens(n0, layers, [*keeps, k], num_layers)

    if target_tokens is not None:
        avg_lo, avg_hi = (sum(tokens(k)) / num_layers for k in (lo, hi))
        if not avg_lo - _EPS <= target_tokens <= avg_hi + _EPS:
            raise ValueError(f"stage_keeps: target_tokens {target_tokens:g} is unreachable: the layer average "
                             f"ranges from {avg_lo:g} to {avg_hi:g} (last keep {lo}..{hi})")
        last = last_keep(n0, layers, keeps, num_layers, target_tokens)
        return [*keeps, min(hi, max(lo, last))]
    if cost is not None:
        c_lo, c_hi = cost(tokens(lo)), cost(tokens(hi))
        tol = _EPS * max(abs(c_lo), abs(c_hi), 1.0)
        if not c_lo - tol <= target_cost <= c_hi + tol:
            raise ValueError(f"stage_keeps: target_cost {target_cost:g} is unreachable: the cost ranges from "
                             f"{c_lo:g} to {c_hi:g} (last keep {lo}..{hi})")
        a, b = lo, hi  # smallest k with cost(k) >= target_cost
        while a < b:
            mid = (a + b) // 2
            a, b = (mid + 1, b) if cost(tokens(mid)) < target_cost else (a, mid)
        if a > lo and target_cost - cost(tokens(a - 1)) < cost(tokens(a)) - target_cost:
            a -= 1
        return [*keeps, a]
    return [*keeps, floor]


def stage_recipes(keeps: list[int], layers: list[int], n0: int, square: bool, lambda_start: float = 0.6,
                  rhos: Sequence[float] = (3.7, 1.5, 1.2), attention_from: int = 1) -> list[dict]:
    """One Plan `Stage` dict per stage (keys layer, keep, spatial, attention, rho, rebalance, lambda).

    `lambda` rises linearly from `lambda_start` (first stage) to 1.0 (last stage keeping tokens; a lone one gets
    `lambda_start`); keep-0 stages get no picks and lambda None. spatial = keep // 2 at the first stage on a square
    grid; attention = floor(lambda * (keep - spatial)); rho from `rhos` (last repeated), lowered so that
    ceil(rho * attention) <= alive - spatial (1.0 without attention). A first stage at layer 0 is diversity-only
    (spatial = attention = 0, lambda 0); so is any stage before layer `attention_from` (where the last prompt
    token's attention has not yet concentrated, `focus_layer`), keeping its spatial seeds.
    """
    if len(keeps) != len(layers):
        raise ValueError(f"stage_recipes: {len(keeps)} keeps for {len(layers)} layers")
    if not 0 <= lambda_start <= 1 or not rhos:
        raise ValueError(f"stage_recipes: lambda_start must be in [0, 1] and rhos non-empty, got {lambda_start}")
    live = sum(1 for k in keeps if k > 0)
    out, alive = [], n0
    for s, (layer, keep) in enumerate(zip(layers, keeps)):
        if keep == 0:
            lam, spatial, attention = None, 0, 0
        elif s == 0 and layer == 0:
            lam, spatial, attention = 0.0, 0, 0
        else:
            lam = round(lambda_start + (1.0 - lambda_start) * s / (live - 1), 6) if live > 1 else lambda_start
            spatial = keep // 2 if s == 0 and square else 0
            attention = math.floor(lam * (keep - spatial) + _EPS) if layer >= attention_from else 0
        rho = 1.0
        if attention:
            rho = max(1.0, float(rhos[min(s, len(rhos) - 1)]))
            room = alive - spatial
            if math.ceil(rho * attention - _EPS) > room:
                rho = max(1.0, math.floor(room / attention * 1e4) / 1e4)
        out.append({"layer": layer, "keep": keep, "spatial": spatial, "attention": attention, "rho": rho,
                    "rebalance": attention > 0, "lambda": lam})
        alive = keep
    return out


def focus_layer(concentration: Sequence[float], uniform: float) -> int:
    """The first layer from which the last prompt token's attention stays concentrated on few image tokens: every
    layer from it on holds at least halfway between `uniform` (the share a uniform attention gives) and the peak
    share of its top tokens (`concentration[l]`, 0-based layer). A cut at layer `b` ranks by layer `b-1`'s
    attention, so attention picks help from `focus_layer + 1` on. `len(concentration)` when none does."""
    if not concentration:
        return 0
    level = (uniform + max(concentration)) / 2
    first = len(concentration)
    for layer in range(len(concentration) - 1, -1, -1):
        if concentration[layer] < level:
            break
        first = layer
    return first


def fit_keeps(n0: int, layers: Sequence[int], weights: Sequence[float], depth: int,
              measure: Callable[[list[int]], float], target: float, floor: int = 0) -> list[int]:
    """Per-stage keeps, jointly solved so that `measure(per_layer_tokens)` (non-decreasing in every keep) comes
    nearest `target`: `round(c * weights[i])` for one scale `c`, clamped strictly decreasing below `n0` with the
    last positive-weight stage at least `floor` (a weight of 0 keeps 0), then single keeps moved by one while
    that brings the measure nearer. `measure` takes the `[depth]` per-layer image tokens. ValueError when
    the weights leave no room for strictly decreasing keeps."""
    s_count = len(layers)
    if s_count != len(weights) or not s_count:
        raise ValueError(f"fit_keeps: {len(weights)} weights for {s_count} layers")
    live = [i for i, w in enumerate(weights) if w > 0]
    low = {i: floor + sum(1 for j in live if j > i) for i in live}
    if live and (low[live[0]] >= n0 or any(weights[j] > 0 for j in range(live[-1] + 1, s_count))):
        raise ValueError(f"fit_keeps: no strictly decreasing keeps below {n0} with floor {floor}")

    def fit(c: float) -> list[int]:
        out, prev = [], n0
        for i, w in enumerate(weights):
            k = 0 if w <= 0 else max(low[i], min(prev - 1, _round(c * w)))
            out.append(k)
            prev = k
        return out

    def gap(keeps: list[int]) -> float:
        return abs(measure(_layer_tokens(n0, list(layers), keeps, depth)) - target)

    lo, hi = 0.0, 2.0 * n0 / min((w for w in weights if w > 0), default=1.0)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if measure(_layer_tokens(n0, list(layers), fit(mid), depth)) < target else (lo, mid)
    best = min((fit(lo), fit(hi)), key=gap)
    for _ in range(4 * s_count):  # single-keep moves by one, while the gap shrinks
        moves = []
        for i in live:
            for step in (-1, 1):
                k = [*best]
                k[i] += step
                prev = [n0, *k][: i + 1][-1]
                nxt = k[i + 1] if i + 1 < s_count else -1
                if low[i] <= k[i] < prev and k[i] > nxt:
                    moves.append(k)
        cand = min(moves, key=gap, default=best)
        if gap(cand) >= gap(best) - _EPS:
            break
        best = cand
    return best

