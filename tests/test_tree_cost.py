"""Trees in the cost model, the controller and diagnose: a tree cycle is priced by the nodes it
verifies, T(nodes + 1), and commits 1 + the kept path's depth; the controller picks the node budget
that maximises tokens per second (0 when no tree pays), on a simulated best-first tree drafter with a
fake clock; diagnose reports node counts and explains a tree run by them."""

from __future__ import annotations

import heapq
import random

import pytest

from verispec import tree
from verispec.engine.controller import Controller, ControllerConfig, TreeAcceptance
from verispec.engine.cost import CostModel, VerifyCurve, budget_tokens, tree_tokens
from verispec.engine.diagnose import diagnose, explain
from verispec.engine.trace import Trace

T1 = 10.0
CURVE = VerifyCurve(tuple(T1 * (1 + 0.08 * (k - 1)) for k in range(1, 18)))
MAX_NODES = 16


def test_a_tree_cycle_is_priced_by_its_nodes_not_its_depth():
    """12 nodes of depth 4: the forward verifies 13 rows and the drafter made 12 tokens."""
    model = CostModel(CURVE, draft_ms=0.5)
    alphas = [0.8, 0.7, 0.5, 0.4]  # α_j at budget 12, the kept path's depth at most 4
    by_budget = [[0.0] * min(n, 4) for n in range(1, 12)] + [alphas]
    tokens = 1 + 0.8 + 0.8 * 0.7 + 0.8 * 0.7 * 0.5 + 0.8 * 0.7 * 0.5 * 0.4
    assert tree_tokens(alphas) == pytest.approx(tokens)
    assert model.tree_speedup(by_budget, 12) == pytest.approx(tokens * T1 / (12 * 0.5 + CURVE(13)))
    # asked for 12, it proposed all 12 in half the cycles and none in the others: T(1) or T(13)
    half = [0.5] * 12
    assert model.tree_speedup(by_budget, 12, half) == pytest.approx(tokens * T1 / (0.5 * T1 + 0.5 * (6 + CURVE(13))))


def test_a_bigger_budget_never_commits_less():
    """The first n nodes of a tree are a subtree of its first n + 1: a measured dip is noise."""
    assert budget_tokens([[0.5], [0.6, 0.2], [0.4, 0.1, 0.0]]) == pytest.approx([1.5, 1.72, 1.72])


def test_per_budget_estimates_from_kept_paths_count_for_every_smaller_budget():
    """A cycle of budget 4 whose kept path is nodes 1 and 3 kept depth 1 within nodes 1..2 and depth 2
    within 1..3 or 1..4; E(n) = 1 + the mean depth kept at n."""
    acceptance = TreeAcceptance(4, prior_alpha=0.5, prior_weight=1e-9, decay=1.0)
    acceptance.observe(4, 2, [1, 3])
    acceptance.observe(4, 0, [])
    assert budget_tokens(acceptance.by_budget()) == pytest.approx([1.5, 1.5, 2.0, 2.0])
    only_own = TreeAcceptance(4, prior_alpha=0.5, prior_weight=1e-9, decay=1.0)
    only_own.observe(4, 2)  # no path: what smaller budgets would have kept is unknown
    assert budget_tokens(only_own.by_budget())[:3] == pytest.approx([1.5, 1.75, 1.875])
    assert budget_tokens(only_own.by_budget())[3] == pytest.approx(3.0)


def best_first(ranks: tuple[float, ...], size: int) -> tuple[list[int], list[float]]:
    """The `size` likeliest nodes of a tree whose child of rank r is the target's token with chance
    ranks[r] (siblings in rank order): their parents and path probabilities, likeliest first."""
    parents: list[int] = []
    probs: list[float] = []
    heap = [(-p, 0, r) for r, p in enumerate(ranks)]
    heapq.heapify(heap)
    while len(parents) < size:
        neg, parent, _ = heapq.heappop(heap)
        parents.append(parent)
        probs.append(-neg)
        for r, p in enumerate(ranks):
            heapq.heappush(heap, (neg * p, len(parents), r))
    return parents, probs


def true_speedups(ranks, d, rows_of=lambda nodes, depth: nodes):
    """Per budget n, the exact speedup: E(n) = 1 + Σ path probabilities of the first n nodes (each
    node is on the kept path with its path probability), the cycle n·d + T(rows + 1). rows_of says
    which rows are priced (the nodes; a planted 'by depth' reads the depth)."""
    parents, probs = best_first(ranks, MAX_NODES)
    out = {0: 1.0}
    for n in range(1, MAX_NODES + 1):
        rows = rows_of(n, max(tree.depths(parents[:n])))
        out[n] = (1 + sum(probs[:n])) * T1 / (rows * d + CURVE(rows + 1))
    return out


def simulate_tree(controller, ranks, d, cycles, rng):
    """A best-first tree drafter that fills its budget: at every depth the target's token is the child
    of rank r with chance ranks[r]; the kept path goes on while that child is among the first n nodes."""
    parents, _ = best_first(ranks, MAX_NODES)
    kids = tree.children(parents)
    chosen = []
    for _ in range(cycles):
        n = controller.choose()
        node, path = 0, []
        while True:
            u, rank = rng.random(), 0
            while rank < len(ranks) and u >= ranks[rank]:
                u, rank = u - ranks[rank], rank + 1
            present = [c for c in kids[node] if c <= n]
            if rank >= len(present):
                break
            node = present[rank]
            path.append(node)
        depth = max(tree.depths(parents[:n])) if n else 0
        controller.observe(n, depth, len(path), n * d, CURVE(n + 1), 0, n, path)
        chosen.append(n)
    return chosen


@pytest.mark.parametrize("ranks,d", [((0.6, 0.25, 0.1), 0.1), ((0.5, 0.3, 0.1), 0.3), ((0.7, 0.2), 0.2)])
def test_the_controller_picks_the_node_budget_that_maximises_tokens_per_second(ranks, d):
    """Acceptance saturates with the budget while T(nodes + 1) grows, so the best budget is inside the
    range; priced by depth a budget would look nearly free and the biggest tree would be bought."""
    truth = true_speedups(ranks, d)
    best_n = max(truth, key=truth.get)
    by_depth = true_speedups(ranks, d, rows_of=lambda nodes, depth: depth)
    assert 0 < best_n < MAX_NODES and truth[max(by_depth, key=by_depth.get)] < 0.93 * truth[best_n]
    controller = Controller(config=ControllerConfig(max_tau=MAX_NODES))
    chosen = simulate_tree(controller, ranks, d, 600, random.Random(1))
    late = chosen[300:]
    achieved = sum(truth[n] for n in late) / len(late)
    assert controller.tree and achieved >= 0.95 * truth[best_n], f"chose {sorted(set(late))} for budget {best_n}"
    assert controller.last["tokens_by_budget"][best_n - 1] > 1


def test_a_tree_that_never_pays_is_switched_off():
    config = ControllerConfig(max_tau=MAX_NODES)
    truth = true_speedups((0.05, 0.03), 0.2)
    assert max(truth, key=truth.get) == 0
    chosen = simulate_tree(Controller(config=config), (0.05, 0.03), 0.2, 800, random.Random(2))
    late = chosen[100:]
    assert sum(n > 0 for n in late) / len(late) <= 1 / config.probe_interval
    assert sum(truth[n] for n in late) / len(late) >= 0.97


def tree_trace(ranks, budget, d, growth=0.08, cycles=300, seed=0, path=True):
    """Cycles of a best-first tree drafter at a fixed budget, timed by T(k) = t1 (1 + growth (k - 1))."""
    rng = random.Random(seed)
    parents, _ = best_first(ranks, budget)
    kids = tree.children(parents)
    depth = max(tree.depths(parents))
    lines = []
    for n in range(cycles):
        node, kept = 0, []
        while True:
            u, rank = rng.random(), 0
            while rank < len(ranks) and u >= ranks[rank]:
                u, rank = u - ranks[rank], rank + 1
            if rank >= len(kids[node]):
                break
            node = kids[node][rank]
            kept.append(node)
        line = {"type": "cycle", "request": 0, "cycle": n, "tau": budget, "drafted": depth, "accepted": len(kept),
                "nodes": budget, "fed": 0, "draft_ms_per_cycle": budget * d,
                "verify_ms_per_cycle": T1 * (1 + growth * budget), "tokens": [7] * (len(kept) + 1),
                "parents": parents}
        lines.append(line | ({"path": kept} if path else {}))
    return Trace({"type": "run", "schema": 2, "target_step_ms": T1}, lines)


def test_diagnose_prices_a_tree_run_by_its_nodes_and_says_so():
    trace = tree_trace((0.6, 0.25, 0.1), 12, 0.1)
    report = diagnose(trace)
    assert report.tree and report.mean_nodes == 12 and report.tau == 12
    committed = sum(len(c["tokens"]) for c in trace.cycles)
    ms = sum(c["draft_ms_per_cycle"] + c["verify_ms_per_cycle"] for c in trace.cycles)
    assert report.predicted_speedup == pytest.approx(committed * T1 / ms, rel=0.02), "a consistent trace"
    assert report.tokens_by_budget == {12: pytest.approx(committed / len(trace.cycles), abs=1e-3)}
    # a smaller budget, read off the kept paths, pays more here; it is recommended
    best = max(report.predicted_by_tau, key=report.predicted_by_tau.get)
    assert 0 < best < 12 and report.recommendations[0].action.startswith(f"tau 12 -> {best}")
    text = explain(report)
    assert "verifies 12.00 draft nodes" in text and "T(1 + nodes)" in text and "node budget" in text


def test_diagnose_of_a_tree_trace_without_paths_prices_the_budget_run():
    report = diagnose(tree_trace((0.6, 0.25, 0.1), 12, 0.1, path=False))
    with_paths = diagnose(tree_trace((0.6, 0.25, 0.1), 12, 0.1))
    assert report.predicted_speedup == with_paths.predicted_speedup
    assert report.tree and report.mean_nodes == 12
