"""Properties of the static BTP selection (BTP.md section 2)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from btp.graphs import PruneGraph, Recipe, select, spatial_seeds
from btp.graphs.selection import cosine_distance, farthest_point_fill


@st.composite
def cases(draw):
    """A random recipe and inputs: B rows of N image tokens with D features and scores."""
    n = draw(st.integers(2, 40))
    keep = draw(st.integers(0, n))
    grid = math.isqrt(n)
    square = grid * grid == n
    seeds_n = draw(st.integers(0, keep)) if square else 0
    attention = draw(st.integers(0, min(keep - seeds_n, n - seeds_n)))
    left = n - seeds_n
    rho = draw(st.floats(1.0, max(1.0, left / attention) if attention else 1.0))
    recipe = Recipe(alive=n, keep=keep, seeds=spatial_seeds(grid, seeds_n) if seeds_n else (),
                    attention=attention, rho=rho, rebalance=draw(st.booleans()))
    b = draw(st.integers(1, 3))
    d = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, n, d, generator=g)
    scores = torch.randn(b, n, generator=g)
    return recipe, hidden, scores


def slow_farthest_point(dist, chosen, picks):
    """The obvious greedy max-min: recompute every candidate's distance to the chosen set each pick."""
    n = len(dist)
    chosen = list(chosen)
    if not chosen and picks:
        nearest = [min(dist[j][i] for i in range(n) if i != j) if n > 1 else 4.0 for j in range(n)]
        chosen.append(max(range(n), key=lambda j: (nearest[j], -j)))
        picks -= 1
    for _ in range(picks):
        best, best_d = None, None
        for j in range(n):
            if j in chosen:
                continue
            dj = min(dist[c][j] for c in chosen)
            if best_d is None or dj > best_d:
                best, best_d = j, dj
        chosen.append(best)
    return sorted(chosen)


@settings(max_examples=150, deadline=None)
@given(cases())
def test_exactly_k_unique_ascending_and_seeds_kept(case):
    recipe, hidden, scores = case
    keep = select(hidden, scores, recipe)
    assert keep.shape == (hidden.shape[0], recipe.keep)
    for row in keep.tolist():
        assert row == sorted(set(row)), "indices must be unique and ascending"
        assert all(0 <= i < recipe.alive for i in row)
        assert set(recipe.seeds) <= set(row)


@settings(max_examples=150, deadline=None)
@given(cases())
def test_attention_picks_are_the_rebalanced_top_ones(case):
    recipe, hidden, scores = case
    if not recipe.attention:
        return
    keep = select(hidden, scores, recipe)
    for r in range(hidden.shape[0]):
        s = scores[r].tolist()
        free = [i for i in range(recipe.alive) if i not in recipe.seeds]
        cands = sorted(free, key=lambda i: -s[i])[: recipe.candidates]
        if recipe.rebalance:
            cands = [i for i in cands if 2 * i < recipe.alive] + [i for i in cands if 2 * i >= recipe.alive]
        expected = set(cands[: recipe.attention])
        assert expected <= set(keep[r].tolist())


@settings(max_examples=150, deadline=None)
@given(cases())
def test_diversity_only_equals_slow_farthest_point(case):
    _, hidden, _ = case
    n = hidden.shape[1]
    k = max(1, n // 3)
    recipe = Recipe(alive=n, keep=k)
    keep = select(hidden, None, recipe)
    dist = cosine_distance(hidden)
    for r in range(hidden.shape[0]):
        assert keep[r].tolist() == slow_farthest_point(dist[r].tolist(), [], k)


@settings(max_examples=100, deadline=None)
@given(cases())
def test_seeded_fill_equals_slow_farthest_point(case):
    recipe, hidden, scores = case
    if not recipe.diversity or not (recipe.seeds or recipe.attention):
        return
    keep = select(hidden, scores, recipe)
    dist = cosine_distance(hidden)
    without = Recipe(alive=recipe.alive, keep=recipe.keep - recipe.diversity, seeds=recipe.seeds,
                     attention=recipe.attention, rho=recipe.rho, rebalance=recipe.rebalance)
    base = select(hidden, scores, without)
    for r in range(hidden.shape[0]):
        assert keep[r].tolist() == slow_farthest_point(dist[r].tolist(), base[r].tolist(), recipe.diversity)


@settings(max_examples=60, deadline=None)
@given(cases())
def test_rows_are_independent(case):
    recipe, hidden, scores = case
    together = select(hidden, scores, recipe)
    for r in range(hidden.shape[0]):
        alone = select(hidden[r : r + 1], scores[r : r + 1], recipe)
        assert torch.equal(alone[0], together[r])


def test_cosine_distance_matches_definition():
    h = torch.randn(2, 7, 5, dtype=torch.float64)
    ref = 1 - torch.nn.functional.cosine_similarity(h[:, :, None, :], h[:, None, :, :], dim=-1)
    assert torch.allclose(cosine_distance(h).double(), ref, atol=1e-6)


def test_unseeded_first_pick_is_the_most_isolated_token():
    # Tokens 0-2 point the same way, token 3 stands alone: it is picked first.
    h = torch.tensor([[[1.0, 0.0], [1.0, 0.01], [1.0, -0.01], [0.0, 1.0]]])
    chosen = farthest_point_fill(cosine_distance(h), torch.zeros(1, 4, dtype=torch.bool), 1, seeded=False)
    assert chosen[0].tolist() == [False, False, False, True]


@pytest.mark.parametrize(
    ("metric", "expected"),
    # After 0 and 15, index 3 wins a tie with 12; under Manhattan the last pick then ties at 3 between 9 and
    # 12 and the first index (9) wins, under Euclidean 12 is strictly farther (why the appendix prefers it).
    [("manhattan", (0, 15, 3, 9)), ("euclidean", (0, 15, 3, 12))],
)
def test_spatial_seeds_spread_over_the_grid(metric, expected):
    assert spatial_seeds(4, 4, metric) == expected
    assert len(set(spatial_seeds(24, 144, metric))) == 144


def test_spatial_seeds_first_index_wins_ties():
    # From 0 on a 3x3 grid, Manhattan: index 8 (2,2) is farthest; then 2 (0,2) and 6 (2,0) tie at 2: 2 wins.
    assert spatial_seeds(3, 3, "manhattan") == (0, 8, 2)


def test_prune_graph_gathers_prefix_kept_and_text_per_row():
    n, keep, d = 8, 3, 4
    recipe = Recipe(alive=n, keep=keep, attention=keep)
    graph = PruneGraph("prune1", recipe, d, torch.float32)
    t = 14
    starts = torch.tensor([2, 4])
    hidden = torch.arange(2 * t * d, dtype=torch.float32).view(2, t, d)
    pos = torch.arange(t)[None].repeat(2, 1)
    mask = torch.ones(2, t, dtype=torch.int64)
    scores = torch.zeros(2, t)
    scores[0, 2 + torch.tensor([1, 5, 6])] = 1.0  # row 0 keeps span indices 1, 5, 6
    scores[1, 4 + torch.tensor([0, 2, 7])] = 1.0
    h, p, m, k = graph(hidden, pos, mask, scores, starts)
    assert k.tolist() == [[1, 5, 6], [0, 2, 7]]
    assert p[0].tolist() == [0, 1, 3, 7, 8, 10, 11, 12, 13]
    assert p[1].tolist() == [0, 1, 2, 3, 4, 6, 11, 12, 13]
    assert torch.equal(h[1], hidden[1, p[1]])
    assert h.shape == (2, t - n + keep, d) and m.shape == (2, t - n + keep)
    assert graph.spec().outputs[0].shape == ("batch", "seq - 5", d)


def test_non_finite_scores_still_give_exactly_k_ascending():
    n = 16
    recipe = Recipe(alive=n, keep=8, seeds=spatial_seeds(4, 4), attention=4, rho=2.0, rebalance=True)
    scores = torch.full((1, n), float("-inf"))
    scores[0, 5] = float("nan")
    scores[0, 6] = float("inf")
    keep = select(torch.randn(1, n, 3), scores, recipe)[0].tolist()
    assert keep == sorted(set(keep)) and len(keep) == 8
    assert 6 in keep  # +inf is the top score


def test_equal_scores_rank_by_index_like_onnx_topk():
    n = 12
    recipe = Recipe(alive=n, keep=3, attention=3)
    keep = select(torch.randn(2, n, 3), torch.zeros(2, n), recipe)
    assert keep.tolist() == [[0, 1, 2], [0, 1, 2]]


def _angles(degrees):
    """One unit vector per token at the given angle: cosine distances are `1 - cos(angle difference)`."""
    t = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack((t.cos(), t.sin()), dim=-1)[None].float()  # [1,N,2]


def test_released_first_stage_by_hand():
    """The released code's first stage on a 3x3 grid, keep 6: 2 spatial seeds, 3 attention picks from
    int(1.4 * 3) = 4 candidates over all tokens rebalanced toward indices below keep, 1 diversity pick from
    scratch, their union filled by diversity.

    Tokens sit at angles 0, 4, 8, 60, 170, 190, 200, 12, 16 degrees (token i at the i-th angle).
    - seeds: farthest-point on the grid from 0 (Manhattan): 0, then 8 (distance 4).
    - attention: scores rank 8 (0.9), 5 (0.8), 2 (0.7), 7 (0.65); the top 4 of all tokens are [8, 5, 2, 7];
      indices below keep=6 first: 5, 2, then 8 -> {2, 5, 8}; 8 overlaps a seed.
    - diversity from scratch, 1 pick: the token whose nearest neighbour is farthest: 3 (44 degrees to 8).
    - union {0, 2, 3, 5, 8}: 5 tokens, one short of keep.
    - fill: distance to the union: 1 -> 4, 4 -> 20 (to 5), 6 -> 10 (to 5), 7 -> 4 degrees: pick 4.
    Kept: 0, 2, 3, 4, 5, 8.
    Ours (exclusive) on the same counts: ceil(4.2) = 5 candidates among the 7 unseeded tokens, 5, 2, 7, 1 and
    then 3 (the first zero score); indices below N/2 = 4.5 first: 2, 1, 3; the fill then picks 6 (140 degrees
    from its nearest chosen token, 3; 5 is 130 and 4 is 110 from 3): kept 0, 1, 2, 3, 6, 8.
    """
    hidden = _angles([0, 4, 8, 60, 170, 190, 200, 12, 16])
    scores = torch.tensor([[0.1, 0.6, 0.7, 0.0, 0.0, 0.8, 0.0, 0.65, 0.9]])
    seeds = spatial_seeds(3, 2)
    assert seeds == (0, 8)
    released = Recipe(alive=9, keep=6, seeds=seeds, attention=3, rho=1.4, rebalance=True, released=True, union=True)
    assert released.candidates == 4 and released.diversity == 1
    assert select(hidden, scores, released).tolist() == [[0, 2, 3, 4, 5, 8]]
    ours = Recipe(alive=9, keep=6, seeds=seeds, attention=3, rho=1.4, rebalance=True)
    assert ours.candidates == 5
    assert select(hidden, scores, ours).tolist() == [[0, 1, 2, 3, 6, 8]]
    # released counts and threshold without the union (a later stage): attention among unchosen, then the fill
    later = Recipe(alive=9, keep=4, attention=2, rho=1.6, rebalance=True, released=True)
    assert later.candidates == 3  # int(3.2); ceil would rank 4
    # top 3: 8, 5, 2; below keep=4 first: 2, then 8 (5 is late); the fill's farthest from {2, 8}: 5 (174 degrees
    # to 16; 6: 168 to 8, 4: 154 to 16), then from {2, 5, 8}: 3 (44 to 8; 4: 20, 6: 10, the rest 8 or less)
    assert select(hidden, scores, later).tolist() == [[2, 3, 5, 8]]


def test_union_fill_reaches_keep_in_every_row():
    """Rows whose picks overlap differently still end with exactly `keep` distinct tokens (a constant trip count)."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 16, 4, generator=g)
    scores = torch.randn(3, 16, generator=g)
    recipe = Recipe(alive=16, keep=9, seeds=spatial_seeds(4, 4), attention=3, rho=2.0, rebalance=True,
                    released=True, union=True)
    keep = select(hidden, scores, recipe)
    assert keep.shape == (3, 9)
    for row in keep.tolist():
        assert row == sorted(set(row)) and {0, 15} <= set(row)
