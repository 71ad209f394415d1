"""BTP token selection in torch with static counts (BTP.md section 2), batched over rows.

Every count is a plan constant, so the same code traces to a static-shape graph: TopK for the attention
picks and the final ascending order, a fixed trip count for the greedy max-min fill.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Distances are in [0, 2]; these sit safely outside that range.
_FAR = 4.0
_CHOSEN = -1.0


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


def attention_picks(scores: torch.Tensor, chosen: torch.Tensor, recipe: Recipe) -> torch.Tensor:
    """Rebalanced top-k by score among unchosen tokens.

    `scores [B,N]` fp32, `chosen [B,N]` bool -> `[B,attention]` int64 indices. Takes the top
    `candidates` in score order, then keeps `attention` of them preferring indices `< N/2`.
    """
    # Non-finite scores (fp16 overflow) are clamped so that chosen tokens always rank below every other.
    big = 1.0e30
    clean = torch.nan_to_num(scores.float(), nan=-big, posinf=big, neginf=-big).clamp(-big, big)
    masked = torch.where(chosen, torch.full_like(clean, -2 * big), clean)
    cand = top_candidates(masked, recipe.candidates)  # [B,C]
    if not recipe.rebalance or recipe.candidates == recipe.attention:
        return cand[:, : recipe.attention]
    c = recipe.candidates
    rank = torch.arange(c, device=scores.device, dtype=torch.float32)[None, :]  # [1,C]
    # ours: the second half of the current span; the released code: indices at or past the stage budget
    late = (cand >= recipe.keep if recipe.released else cand * 2 >= recipe.alive).float()
    order = torch.topk(-(rank + late * c), recipe.attention, dim=1, largest=True, sorted=True).indices
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


def farthest_point_fill(dist: torch.Tensor, chosen: torch.Tensor, picks: int, seeded: bool) -> torch.Tensor:
    """Greedy max-min fill: add `picks` tokens to `chosen`, each maximising its distance to the chosen set.

    `dist [B,N,N]` fp32 symmetric, `chosen [B,N]` bool -> `chosen [B,N]` bool. O(N) per pick through the
    running minimum `mind[j] = min over chosen c of dist[c, j]`. With `seeded=False` (nothing chosen yet)
    the first pick is the token whose nearest neighbour is farthest. Ties go to the first index.
    """
    n = dist.shape[1]
    ar = torch.arange(n, device=dist.device)
    if picks <= 0:
        return chosen
    if not seeded:
        eye = (ar[:, None] == ar[None, :])[None]  # [1,N,N]
        nearest = torch.where(eye, torch.full_like(dist, _FAR), dist).amin(dim=2)  # [B,N]
        chosen = chosen | (ar[None, :] == torch.argmax(nearest, dim=1)[:, None])
        picks -= 1
    return seeded_fill(dist, chosen, picks) if picks > 0 else chosen


def fill_to(dist: torch.Tensor, chosen: torch.Tensor, keep: int, trips: int) -> torch.Tensor:
    """Greedy max-min picks added to `chosen` until each row holds `keep`: `dist [B,N,N]` fp32, `chosen [B,N]`
    bool with at least `keep - trips` set per row -> `[B,N]` bool with exactly `keep` set. Rows start with
    different counts (a union of overlapping picks), so every one of the `trips` steps picks only in the rows
    still short: a constant trip count, no data-dependent shape."""
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


def _union_select(hidden: torch.Tensor, scores: torch.Tensor | None, recipe: Recipe,
                  seeds: torch.Tensor) -> torch.Tensor:
    """The released code's first stage: `seeds [B,N]` bool | attention picks over all tokens | `diversity`
    picks from scratch, filled by diversity to `keep` -> chosen `[B,N]` bool."""
    b, n = seeds.shape
    dist = cosine_distance(hidden)  # [B,N,N]
    chosen = seeds
    if recipe.attention:
        if scores is None:
            raise ValueError("this recipe has attention picks and needs scores")
        picks = attention_picks(scores, torch.zeros_like(seeds), recipe)  # [B,A], may overlap the seeds
        chosen = chosen | (torch.arange(n, device=hidden.device)[None, None, :] == picks[:, :, None]).any(1)
    if recipe.diversity:
        chosen = chosen | farthest_point_fill(dist, torch.zeros_like(seeds), recipe.diversity, seeded=False)
    smallest = max(len(recipe.seeds), recipe.attention, recipe.diversity)  # each part alone is duplicate-free
    return fill_to(dist, chosen, recipe.keep, recipe.keep - smallest)


def ascending_indices(chosen: torch.Tensor, k: int) -> torch.Tensor:
    """`chosen [B,N]` bool with exactly `k` set per row -> their indices ascending, `[B,k]` int64."""
    n = chosen.shape[1]
    rank = (n - torch.arange(n, device=chosen.device)).float()  # earlier index, larger key
    key = torch.where(chosen, rank[None, :], torch.zeros_like(rank)[None, :])
    return torch.topk(key, k, dim=1, largest=True, sorted=True).indices


def select(hidden: torch.Tensor, scores: torch.Tensor | None, recipe: Recipe) -> torch.Tensor:
    """BTP selection at one boundary: `hidden [B,N,D]`, `scores [B,N]` fp32 (None when
    `recipe.attention == 0`) -> kept indices `[B,keep]` int64, ascending, unique, inside `[0,N)`."""
    b, n = hidden.shape[0], hidden.shape[1]
    if n != recipe.alive:
        raise ValueError(f"expected {recipe.alive} image tokens, got {n}")
    if recipe.keep == 0:
        return torch.zeros((b, 0), dtype=torch.int64, device=hidden.device)
    seed_mask = torch.zeros(n, dtype=torch.bool, device=hidden.device)
    if recipe.seeds:
        seed_mask[list(recipe.seeds)] = True
    chosen = seed_mask[None, :].expand(b, n)
    if recipe.union:
        return ascending_indices(_union_select(hidden, scores, recipe, chosen), recipe.keep)
    if recipe.attention:
        if scores is None:
            raise ValueError("this recipe has attention picks and needs scores")
        picks = attention_picks(scores, chosen, recipe)
        chosen = chosen | (torch.arange(n, device=hidden.device)[None, None, :] == picks[:, :, None]).any(1)
    if recipe.diversity:
        seeded = bool(recipe.seeds) or recipe.attention > 0
        chosen = farthest_point_fill(cosine_distance(hidden), chosen, recipe.diversity, seeded)
    return ascending_indices(chosen, recipe.keep)
