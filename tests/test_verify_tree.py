"""Lossless acceptance on draft trees: greedy follows the target's choice; deterministic and sampled
children keep the target's law (RELIABILITY.md B, on a Markov toy target, trees of depth 3 and width
3), with negative controls that must fail the same test; the fast verifier equals the reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from verispec import tree
from verispec.sampling import (verify_greedy, verify_reference, verify_tree, verify_tree_greedy,
                               verify_tree_reference)
from verispec.sampling import rejection as verify_module

V = 4
WIDTH, DEPTH = 3, 3


def full_tree(width: int, depth: int) -> list[int]:
    """Parents of the complete tree, breadth first: every node above `depth` has `width` children."""
    parents, level = [], [0]
    for _ in range(depth):
        nxt = []
        for node in level:
            for _ in range(width):
                parents.append(node)
                nxt.append(len(parents))
        level = nxt
    return parents


PARENTS = full_tree(WIDTH, DEPTH)  # 39 nodes


def random_tree(g: torch.Generator, n: int) -> list[int]:
    return [int(torch.randint(0, j, (1,), generator=g)) for j in range(1, n + 1)]


# --- deterministic cases ------------------------------------------------------------------------------

def test_greedy_follows_the_child_equal_to_the_targets_choice_as_deep_as_it_goes():
    draft = [5, 7, 8, 9, 3]  # root -> 5 (node 1), 7 (node 2); 5 -> 8 (node 3), 9 (node 4); 9 -> 3 (node 5)
    parents = [0, 0, 1, 1, 4]
    target = [7, 1, 9, 1, 2, 6]  # the choice after each node, the root first
    assert verify_tree_greedy(draft, parents, target) == ([2], [7, 9])
    assert verify_tree_greedy(draft, parents, [5, 9, 0, 0, 3, 6]) == ([1, 4, 5], [5, 9, 3, 6])
    assert verify_tree_greedy(draft, parents, [4, 9, 0, 0, 3, 6]) == ([], [4])


def test_on_a_chain_the_tree_verifiers_are_the_chain_verifiers():
    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        k = int(torch.randint(0, 5, (1,), generator=g))
        p = torch.softmax(torch.randn(k + 1, V, generator=g) * 2, -1)
        q = torch.softmax(torch.randn(k, V, generator=g) * 2, -1) if trial % 2 else None
        draft = torch.randint(-1, V + 1, (k,), generator=g).tolist()
        u = torch.rand(k + 1, generator=g).tolist()
        path, tokens = verify_tree(draft, tree.chain(k), q, p, u)
        assert (len(path), tokens) == verify_reference(draft, q, p, u)
        assert path == list(range(1, len(path) + 1))
        ids = p.argmax(-1).tolist()
        path, tokens = verify_tree_greedy(draft, tree.chain(k), ids)
        assert (len(path), tokens) == verify_greedy(draft, ids)


def test_fast_equals_reference_on_random_trees():
    g = torch.Generator().manual_seed(1)
    for trial in range(300):
        n = int(torch.randint(0, 12, (1,), generator=g))
        parents = random_tree(g, n)
        p = torch.softmax(torch.randn(n + 1, V, generator=g) * 2, -1)
        if trial % 4 == 0:  # exact zeros in p
            p = p * (torch.rand(n + 1, V, generator=g) > 0.4)
            p[:, 0] += 1e-3
            p = p / p.sum(-1, keepdim=True)
        q = torch.softmax(torch.randn(n, V, generator=g) * 2, -1) if trial % 2 else None
        draft = torch.randint(-1 if trial % 5 == 0 else 0, V, (n,), generator=g).tolist()
        u = torch.rand(n + 1, generator=g).tolist()
        assert verify_tree(draft, parents, q, p, u) == verify_tree_reference(draft, parents, q, p, u)


def test_a_child_the_target_gives_no_mass_is_never_accepted_and_never_emitted():
    p = torch.tensor([[0.0, 0.5, 0.5, 0.0]] + [[0.25] * 4] * 2)
    for seed in range(50):
        u = torch.rand(3, generator=torch.Generator().manual_seed(seed)).tolist()
        path, tokens = verify_tree([0, 3], [0, 0], None, p, u)
        assert path == [] and tokens[0] in (1, 2)


# --- the law of the first emitted tokens, on a Markov toy target ----------------------------------

N = 40_000
LENGTH = 3  # the joint law of the first 3 tokens: the tree's depth, so deep acceptances are seen


def markov(seed: int, sharp: float) -> torch.Tensor:
    """[V, V]: row a, the law of the token after a."""
    return torch.softmax(torch.randn(V, V, generator=torch.Generator().manual_seed(seed)) * sharp, -1)


P, Q = markov(1, 1.5), markov(2, 1.5)


def draft_trees(g: torch.Generator, children: str) -> tuple[torch.Tensor, torch.Tensor]:
    """N trees shaped like PARENTS: tokens [N, n + 1] (the root's is 0) and q_rows [N, n, V], the q each
    node was drafted from (its parent's row of Q): "sampled" from it with replacement, or "top", the
    WIDTH likeliest in order (deterministic; siblings are consecutive nodes)."""
    tokens = torch.zeros(N, len(PARENTS) + 1, dtype=torch.long)
    ranked = Q.argsort(-1, descending=True)  # [V, V]
    for j, parent in enumerate(PARENTS, start=1):
        after = tokens[:, parent]
        if children == "sampled":
            tokens[:, j] = torch.multinomial(Q[after], 1, generator=g)[:, 0]
        else:
            tokens[:, j] = ranked[after, (j - 1) % WIDTH]
    return tokens, Q[tokens[:, torch.tensor(PARENTS)]]


def law(children: str, seed: int = 0, q_for_verify: str = "drafted") -> np.ndarray:
    """Counts [V ** LENGTH] of the first LENGTH tokens after the root: a tree cycle, then plain sampling
    from the target where the cycle emitted fewer (the right law given what it emitted, if it is right)."""
    g = torch.Generator().manual_seed(seed)
    tokens, q_rows = draft_trees(g, children)
    targets = P[tokens]  # [N, n + 1, V]: the target's row after each node
    uniforms = torch.rand(N, len(PARENTS) + 1, generator=g).tolist()
    later = torch.rand(N, LENGTH, generator=g).numpy()
    cdf = P.double().cumsum(-1).numpy()
    counts = np.zeros(V ** LENGTH, dtype=np.int64)
    with_q = children == "sampled" or q_for_verify == "q"
    for trial in range(N):
        drafts = tokens[trial, 1:].tolist()
        _, out = verify_tree(drafts, PARENTS, q_rows[trial] if with_q else None, targets[trial], uniforms[trial])
        while len(out) < LENGTH:
            out.append(min(int(np.searchsorted(cdf[out[-1]], later[trial, len(out)] * cdf[out[-1], -1],
                                               side="right")), V - 1))
        counts[int(np.ravel_multi_index(out[:LENGTH], (V,) * LENGTH))] += 1
    return counts


def exact_law() -> np.ndarray:
    """[V ** LENGTH]: the target's own law of the first LENGTH tokens after the root's 0."""
    p = P.double().numpy()
    return np.einsum("a,ab,bc->abc", p[0], p, p).ravel()


def pvalue(counts: np.ndarray) -> float:
    expected = exact_law()
    return chisquare(counts, expected / expected.sum() * counts.sum()).pvalue


@pytest.mark.parametrize("children", ["top", "sampled"])
def test_tree_cycles_keep_the_targets_joint_law(children):
    counts = law(children)
    assert pvalue(counts) > 1e-3
    first = counts.reshape(V, -1).sum(1) / N
    assert 0.5 * np.abs(first - P[0].numpy()).sum() < 0.01


@pytest.mark.parametrize("bug", ["min-p-over-q-on-top-k-children", "no-renormalising-after-a-rejected-child"])
def test_negative_controls_fail_the_same_test(monkeypatch, bug):
    if bug == "min-p-over-q-on-top-k-children":  # deterministic children verified as if drawn from q
        counts = law("top", q_for_verify="q")
    else:
        monkeypatch.setattr(verify_module, "_normalised", lambda weights: weights)
        counts = law("sampled")
    assert pvalue(counts) < 1e-10


# --- the target rows of a tree ------------------------------------------------------------------------

def test_a_tree_rows_penalties_and_min_tokens_see_its_own_path():
    """Row j of a tree is processed as a row whose history is the output plus the drafts on j's path."""
    from verispec.config import SamplingParams
    from verispec.sampling import Sampler

    params = SamplingParams(temperature=0.8, repetition_penalty=1.4, frequency_penalty=0.3, presence_penalty=0.2,
                            min_tokens=4)
    sampler = Sampler(params, [1, 2], stop_ids=[3])
    g = torch.Generator().manual_seed(5)
    parents = [0, 0, 1, 1, 3, 2]
    drafts = [3, 5, 5, 2, 3, 7]
    history = [5, 1]
    logits = torch.randn(len(parents) + 1, 8, generator=g)
    got = sampler.probs(logits, history, drafts, parents)
    for j in range(len(parents) + 1):
        path = [drafts[node - 1] for node in tree.path(parents, j)]
        assert torch.equal(got[j], sampler.probs(logits[j: j + 1], history + path)[0]), f"row {j}"
    chain = sampler.probs(logits, history, drafts)
    assert torch.equal(chain, sampler.probs(logits, history, drafts, tree.chain(len(drafts))))
