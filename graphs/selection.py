"""BTP token selection in torch with static counts (BTP.md section 2), batched over rows.

Every count is a plan constant, or (a `share` recipe, for families whose image-token count N0 follows the image's
size) integer arithmetic on N0 = a dim of the graph's input: the same code traces to a graph whose every shape is a
static number or an expression of the input shapes: TopK for the attention picks and the final ascending order, a
counted Loop for the greedy max-min fill, and nothing data-dependent (no NonZero).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Distances are in [0, 2]; these sit safely outside that range.
_FAR = 4.0
_CHOSEN = -1.0
# Shares are applied in integer arithmetic, in units of 1/SHARE_UNIT, so that eager torch and the exported graph
# (and the plan, and the runtime) compute the same counts from N0.
SHARE_UNIT = 10_000


def share_count(n, share: float):
    """`floor(n * share)` with `share` rounded to 1/SHARE_UNIT: an int, or an expression of a symbolic `n`."""
    return n * round(share * SHARE_UNIT) // SHARE_UNIT


def _max(a, b):
    return torch.sym_max(a, b) if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt) else max(a, b)


def _min(a, b):
    return torch.sym_min(a, b) if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt) else min(a, b)


def spatial_seeds(grid: int, count: int, metric: str = "manhattan") -> tuple[int, ...]:
    """Greedy farthest-point seeds on a `grid x grid` layout, starting at index 0; first index wins ties.

    Returns `count` distinct row-major indices in pick order.
    """
    if metric not in ("manhattan", "euclidean"):
        raise ValueError(f"metric must be 'manhattan' or 'euclidean', got {metric!r}")
    if not 0 <= count <= grid * grid:
        raise ValueError(f"cannot place {count} seeds on a {grid}x{grid} grid")
    if count == 0:
        return ()
    idx = torch.arange(grid * grid)
    rc = torch.stack((idx // grid, idx % grid), dim=1).double()  # [N,2]
    diff = rc[:, None, :] - rc[None, :, :]
    dist = diff.abs().sum(-1) if metric == "manhattan" else diff.pow(2).sum(-1).sqrt()  # [N,N]
    picks = [0]
    mind = dist[0].clone()
    mind[0] = -1.0
    for _ in range(count - 1):
        pick = int(torch.argmax(mind))  # argmax returns the first maximal index
        picks.append(pick)
        mind = torch.minimum(mind, dist[pick])
        mind[picks] = -1.0
    return tuple(picks)


@dataclass(frozen=True)
class Recipe:
    """Static selection recipe of one boundary: `alive` tokens in, `keep` out.

    `seeds` are spatial seed indices (first stage only), `attention` picks are taken from the top
    `candidates = ceil(rho * attention)` by score, the rest (`keep - len(seeds) - attention`) by diversity.
    `released`: the released BTP code's counts, `int(rho * attention)` candidates and a rebalance toward indices
    below `keep`. `union` (its first stage): seeds, attention picks over all tokens and `diversity` picks from
    scratch are made independently, their union is taken and filled by diversity to exactly `keep`.
    """

    alive: int
    keep: int
    seeds: tuple[int, ...] = ()
    attention: int = 0
    rho: float = 1.0
    rebalance: bool = False
    released: bool = False
    union: bool = False
    share: float | None = None  # a share recipe: keep = share_count(N0, share); the counts above are at nominal N0
    alive_share: float | None = None  # the share of N0 alive before it (None: all N0)

    def __post_init__(self):
        if not 0 <= self.keep <= self.alive:
            raise ValueError(f"keep must be in [0, {self.alive}], got {self.keep}")
        if len(self.seeds) + self.attention > self.keep:
            raise ValueError("seeds + attention exceed keep")
        if len(set(self.seeds)) != len(self.seeds) or any(not 0 <= s < self.alive for s in self.seeds):
            raise ValueError("seeds must be distinct indices inside the image span")
        room = self.alive if self.union else self.alive - len(self.seeds)
        if self.attention and self.candidates > room:
            raise ValueError(f"{self.candidates} attention candidates exceed the {room} tokens they rank")

    @property
    def candidates(self) -> int:
        # The tiny epsilon keeps ceil(3.7 * 10) at 37 (and int(1.2 * 5) at 6) despite binary floating point.
        if self.released:
            return max(self.attention, math.floor(self.rho * self.attention + 1e-9))
        return max(self.attention, math.ceil(self.rho * self.attention - 1e-9))

    @property
    def diversity(self) -> int:
        return self.keep - len(self.seeds) - self.attention

    def at(self, n0) -> Counts:
        """The counts at `n0` image tokens (an int, or a symbolic dim while exporting): this recipe's own counts
        unless it is a share recipe."""
        if self.share is None:
            return Counts(self.alive, self.keep, self.attention, self.candidates, self.diversity, self)
        alive = n0 if self.alive_share is None else share_count(n0, self.alive_share)
        keep = share_count(n0, self.share)
        attention = keep * self.attention // self.keep if self.keep else 0
        r = round(self.rho * SHARE_UNIT)  # rho >= 1, so both roundings give at least `attention` candidates
        # Non-negative operands only: ONNX's and TensorRT's integer Div truncates, Python's floors.
        candidates = (attention * r + (0 if self.released else SHARE_UNIT - 1)) // SHARE_UNIT
        # No-ops wherever the plan is valid (`check_image_range`), but they bound each TopK's K by the length it
        # ranks in a form the exporter can prove: floor-division chains of a symbolic N0 it cannot.
        keep = _min(keep, alive)
        attention = _min(attention, keep)
        candidates = _min(_max(candidates, attention), alive)
        return Counts(alive, keep, attention, candidates, keep - attention, self)


@dataclass(frozen=True)
class Counts:
    """A recipe's counts at one image-token count N0: ints, or expressions of a symbolic N0 while exporting. Every
    branch of the selection is taken on the `recipe`'s static facts, never on these."""

    alive: object
    keep: object
    attention: object
    candidates: object
    diversity: object
    recipe: Recipe

    @property
    def seeds(self) -> tuple[int, ...]:
        return self.recipe.seeds

    @property
    def same_candidates(self) -> bool:
        """Whether the candidates are the attention picks at every N0 (then there is nothing to rebalance)."""
        r = self.recipe
        return r.candidates == r.attention if r.share is None else round(r.rho * SHARE_UNIT) == SHARE_UNIT


def picked(n: int, picks: torch.Tensor) -> torch.Tensor:
    """`picks [B,A]` indices -> `[B,N]` bool mask of them. A sum, not an any: with a share recipe A may be 0, and
    ONNX's ReduceMax (what an any exports to) of an empty set is the type's lowest value, which casts to True."""
    return (torch.arange(n, device=picks.device)[None, None, :] == picks[:, :, None]).sum(1) > 0


def cosine_distance(hidden: torch.Tensor) -> torch.Tensor:
    """`hidden [B,N,D]` -> fp32 `1 - cos(h_i, h_j)` `[B,N,N]`."""
    h = hidden.float()
    h = h / h.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return 1.0 - torch.matmul(h, h.transpose(1, 2))


def top_candidates(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the `k` largest of `values [B,N]` in descending order, equal values by ascending index.

    That tie rule is ONNX TopK's (sorted=1); eager torch.topk leaves ties unordered, so eager runs use a stable
    sort while exported graphs use TopK, and both pick the same tokens.
    """
    if torch.compiler.is_exporting():
        return torch.topk(values, k, dim=1, largest=True, sorted=True).indices
    return torch.sort(values, dim=1, descending=True, stable=True).indices[:, :k]


def attention_picks(scores: torch.Tensor, chosen: torch.Tensor, counts: Counts) -> torch.Tensor:
    """Rebalanced top-k by score among unchosen tokens.

    `scores [B,N]` fp32, `chosen [B,N]` bool -> `[B,attention]` int64 indices. Takes the top
    `candidates` in score order, then keeps `attention` of them preferring indices `< N/2`.
    """
    recipe = counts.recipe
    # Non-finite scores (fp16 overflow) are clamped so that chosen tokens always rank below every other.
    big = 1.0e30
    clean = torch.nan_to_num(scores.float(), nan=-big, posinf=big, neginf=-big).clamp(-big, big)
    masked = torch.where(chosen, torch.full_like(clean, -2 * big), clean)
    cand = top_candidates(masked, counts.candidates)  # [B,C]
    if not recipe.rebalance or counts.same_candidates:
        return cand[:, : counts.attention]
    c = counts.candidates
    rank = torch.arange(c, device=scores.device).float()[None, :]  # [1,C]
    # ours: the second half of the current span; the released code: indices at or past the stage budget
    late = (cand >= counts.keep if recipe.released else cand * 2 >= counts.alive).float()
    order = torch.topk(-(rank + late * c), counts.attention, dim=1, largest=True, sorted=True).indices
    return cand.gather(1, order)


@torch.library.custom_op("btp::farthest_point_fill", mutates_args=())
def seeded_fill(dist: torch.Tensor, chosen: torch.Tensor, picks: int) -> torch.Tensor:
    """`picks` greedy max-min picks from a non-empty chosen set: `dist [B,N,N]` fp32, `chosen [B,N]` bool ->
    `chosen [B,N]` bool. One op, so that the exporter can emit it as an ONNX Loop with a constant trip count
    (measured faster than the unrolled picks on ONNX Runtime); this is its PyTorch implementation."""
    b, n, _ = dist.shape
    ar = torch.arange(n, device=dist.device)
    mind = torch.where(chosen[:, :, None], dist, torch.full_like(dist, _FAR)).amin(dim=1)  # [B,N]
    for _ in range(picks):
        pick = torch.argmax(torch.where(chosen, torch.full_like(mind, _CHOSEN), mind), dim=1)  # [B]
        chosen = chosen | (ar[None, :] == pick[:, None])
        row = dist.gather(1, pick[:, None, None].expand(b, 1, n)).squeeze(1)  # [B,N]
        mind = torch.minimum(mind, row)
    return chosen


@seeded_fill.register_fake
def _(dist: torch.Tensor, chosen: torch.Tensor, picks: int) -> torch.Tensor:
    return torch.empty_like(chosen)


def farthest_point_fill(dist: torch.Tensor, chosen: torch.Tensor, picks, seeded: bool) -> torch.Tensor:
    """Greedy max-min fill: add `picks` tokens to `chosen`, each maximising its distance to the chosen set.

    `dist [B,N,N]` fp32 symmetric, `chosen [B,N]` bool -> `chosen [B,N]` bool. O(N) per pick through the
    running minimum `mind[j] = min over chosen c of dist[c, j]`. With `seeded=False` (nothing chosen yet)
    the first pick is the token whose nearest neighbour is farthest (it is made even where a share recipe's
    `picks` come to 0, which only happens where its keep does too). Ties go to the first index.
    """
    n = dist.shape[1]
    ar = torch.arange(n, device=dist.device)
    if isinstance(picks, int) and picks <= 0:
        return chosen
    if not seeded:
        eye = (ar[:, None] == ar[None, :])[None]  # [1,N,N]
        nearest = torch.where(eye, torch.full_like(dist, _FAR), dist).amin(dim=2)  # [B,N]
        chosen = chosen | (ar[None, :] == torch.argmax(nearest, dim=1)[:, None])
        picks = _max(picks - 1, 0)
    return chosen if isinstance(picks, int) and picks == 0 else seeded_fill(dist, chosen, picks)


def _fill_to(dist: torch.Tensor, chosen: torch.Tensor, keep, trips) -> torch.Tensor:
    b, n, _ = dist.shape
    ar = torch.arange(n, device=dist.device)
    mind = torch.where(chosen[:, :, None], dist, torch.full_like(dist, _FAR)).amin(dim=1)  # [B,N]
    for _ in range(trips):
        short = chosen.sum(dim=1, keepdim=True) < keep  # [B,1]
        pick = torch.argmax(torch.where(chosen, torch.full_like(mind, _CHOSEN), mind), dim=1)  # [B]
        chosen = chosen | ((ar[None, :] == pick[:, None]) & short)
        row = dist.gather(1, pick[:, None, None].expand(b, 1, n)).squeeze(1)  # [B,N]
        mind = torch.minimum(mind, row)
    return chosen


@torch.library.custom_op("btp::fill_to", mutates_args=())
def counted_fill(dist: torch.Tensor, chosen: torch.Tensor, keep: int, trips: int) -> torch.Tensor:
    """`fill_to` as one op for counts that are expressions of N0 (exported as a Loop whose trip count and target
    follow the input shapes); this is its PyTorch implementation."""
    return _fill_to(dist, chosen, keep, trips)


@counted_fill.register_fake
def _(dist: torch.Tensor, chosen: torch.Tensor, keep: int, trips: int) -> torch.Tensor:
    return torch.empty_like(chosen)


def fill_to(dist: torch.Tensor, chosen: torch.Tensor, keep, trips) -> torch.Tensor:
    """Greedy max-min picks added to `chosen` until each row holds `keep`: `dist [B,N,N]` fp32, `chosen [B,N]`
    bool with at least `keep - trips` set per row -> `[B,N]` bool with exactly `keep` set. Rows start with
    different counts (a union of overlapping picks), so every one of the `trips` steps picks only in the rows
    still short: a constant trip count (or one that follows N0), no data-dependent shape."""
    if isinstance(keep, int) and isinstance(trips, int):
        return _fill_to(dist, chosen, keep, trips)  # unrolled: a handful of picks
    return counted_fill(dist, chosen, keep, trips)


def _union_select(hidden: torch.Tensor, scores: torch.Tensor | None, counts: Counts,
                  seeds: torch.Tensor) -> torch.Tensor:
    """The released code's first stage: `seeds [B,N]` bool | attention picks over all tokens | `diversity`
    picks from scratch, filled by diversity to `keep` -> chosen `[B,N]` bool."""
    b, n = seeds.shape
    recipe = counts.recipe
    dist = cosine_distance(hidden)  # [B,N,N]
    chosen = seeds
    if recipe.attention:
        if scores is None:
            raise ValueError("this recipe has attention picks and needs scores")
        picks = attention_picks(scores, torch.zeros_like(seeds), counts)  # [B,A], may overlap the seeds
        chosen = chosen | picked(n, picks)
    if recipe.diversity:
        chosen = chosen | farthest_point_fill(dist, torch.zeros_like(seeds), counts.diversity, seeded=False)
    # each part alone is duplicate-free
    smallest = _max(_max(len(recipe.seeds), counts.attention), counts.diversity)
    return fill_to(dist, chosen, counts.keep, counts.keep - smallest)


def ascending_indices(chosen: torch.Tensor, k: int) -> torch.Tensor:
    """`chosen [B,N]` bool with exactly `k` set per row -> their indices ascending, `[B,k]` int64."""
    n = chosen.shape[1]
    rank = (n - torch.arange(n, device=chosen.device)).float()  # earlier index, larger key
    key = torch.where(chosen, rank[None, :], torch.zeros_like(rank)[None, :])
    return torch.topk(key, k, dim=1, largest=True, sorted=True).indices


def select(hidden: torch.Tensor, scores: torch.Tensor | None, recipe: Recipe, n0=None) -> torch.Tensor:
    """BTP selection at one boundary: `hidden [B,N,D]`, `scores [B,N]` fp32 (None when the recipe has no
    attention picks) -> kept indices `[B,keep]` int64, ascending, unique, inside `[0,N)`. A share recipe's
    counts are taken at `n0` image tokens (the image's, not the `N` alive here)."""
    b, n = hidden.shape[0], hidden.shape[1]
    counts = recipe.at(n0)
    if recipe.share is None and n != recipe.alive:
        raise ValueError(f"expected {recipe.alive} image tokens, got {n}")
    if recipe.keep == 0:
        return torch.zeros((b, 0), dtype=torch.int64, device=hidden.device)
    seed_mask = torch.zeros(n, dtype=torch.bool, device=hidden.device)
    if recipe.seeds:
        seed_mask[list(recipe.seeds)] = True
    chosen = seed_mask[None, :].expand(b, n)
    if recipe.union:
        return ascending_indices(_union_select(hidden, scores, counts, chosen), counts.keep)
    if recipe.attention:
        if scores is None:
            raise ValueError("this recipe has attention picks and needs scores")
        picks = attention_picks(scores, chosen, counts)
        chosen = chosen | picked(n, picks)
    if recipe.diversity:
        seeded = bool(recipe.seeds) or recipe.attention > 0
        chosen = farthest_point_fill(cosine_distance(hidden), chosen, counts.diversity, seeded)
    return ascending_indices(chosen, counts.keep)
