"""Drafters that propose trees: ngram merges several earlier occurrences' continuations into a trie
(held to a brute-force count of their prefixes), suffix proposes its speculation tree; both are
lossless through the engine (greedy == plain decoding) and a tree never loses its chain's path."""

from __future__ import annotations

import random

import pytest

from verispec import tree
from verispec.config import RuntimeConfig, SamplingParams
from verispec.drafters import NgramDrafter, SuffixDrafter
from verispec.drafters.ngram import MATCHES
from verispec.engine.generate import Engine
from verispec.engine.request import Request


def brute_force_tree(context: list[int], n: int, k: int) -> list[tuple[tuple[int, ...], int]]:
    """(path, weight) of the k heaviest prefixes of what followed the latest MATCHES occurrences of
    context's last n tokens, by scanning the context: weight = occurrences whose continuation starts
    with the path; of equals the shorter, then the one seen first (most recent occurrence first)."""
    key = context[-n:]
    follows = [i + n for i in range(len(context) - n) if context[i: i + n] == key][-MATCHES:][::-1]
    continuations = [tuple(context[f: f + k]) for f in follows]
    first_seen: dict[tuple[int, ...], int] = {}
    for c in continuations:
        for length in range(1, len(c) + 1):
            first_seen.setdefault(c[:length], len(first_seen))
    weight = {p: sum(c[: len(p)] == p for c in continuations) for p in first_seen}
    return sorted(weight.items(), key=lambda pw: (-pw[1], len(pw[0]), first_seen[pw[0]]))[:k]


def paths(token_ids: list[int], parents: list[int]) -> list[tuple[int, ...]]:
    return [tuple(token_ids[v - 1] for v in tree.path(parents, node)) for node in range(1, len(parents) + 1)]


@pytest.mark.parametrize("seed", range(30))
def test_an_ngram_tree_is_the_heaviest_prefixes_of_earlier_continuations(seed):
    rng = random.Random(seed)
    context = [rng.randrange(4) for _ in range(rng.randrange(20, 120))]  # a small vocabulary repeats often
    k = rng.randrange(1, 16)
    proposal = NgramDrafter(min_n=2, max_n=3, tree=True).propose(context, k)
    n = next((n for n in (3, 2) if any(context[i: i + n] == context[-n:] for i in range(len(context) - n))), None)
    if n is None:
        assert proposal.token_ids == []
        return
    want = brute_force_tree(context, n, k)
    assert paths(proposal.token_ids, proposal.parents or list(range(len(proposal.token_ids)))) == [p for p, _ in want]


def test_an_ngram_tree_holds_the_chain_and_makes_siblings_where_continuations_part():
    context = [1, 2, 3, 4, 9, 1, 2, 5, 6, 9, 1, 2, 3, 4, 9, 1, 2]  # [1, 2] was followed by 3, 5, 3
    chain = NgramDrafter(2, 2).propose(context, 4)
    t = NgramDrafter(2, 2, tree=True).propose(context, 6)
    assert chain.token_ids == [3, 4, 9, 1] and chain.parents is None  # the latest occurrence's continuation
    assert t.token_ids == [3, 4, 9, 1, 2, 5] and t.parents == [0, 1, 2, 3, 4, 0], "twice 3 4 9 1 2, once 5"


def test_the_suffix_tree_proposal_is_its_speculation_tree():
    context = [7, 1, 2, 3, 4, 7, 1, 2, 3, 4, 7, 1, 2, 3, 5, 7, 1, 2, 3]  # 7 1 2 3 then 4, 4, 5
    drafter = SuffixDrafter(factor=2.0, tree=True)
    proposal = drafter.propose(context, 8)
    s = drafter.speculate(context, 8)
    assert (proposal.token_ids, proposal.parents) == (s.token_ids, s.parents) and len(s.token_ids) == 8
    assert proposal.token_ids[0] == 4 and proposal.token_ids[5] == 5 and proposal.parents[5] == 0, "5 beside 4"
    chain = SuffixDrafter(factor=2.0).propose(context, 8).token_ids
    assert tuple(chain) in paths(proposal.token_ids, proposal.parents), "the chain is the tree's best path"


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    from conftest import save_tiny_llm
    from verispec.llm import LLM

    return LLM(str(save_tiny_llm(tmp_path_factory.mktemp("tree-drafters"), max_position_embeddings=1024, seed=5)),
               RuntimeConfig())


@pytest.mark.parametrize("name", ["ngram-tree", "suffix-tree"])
def test_greedy_with_a_tree_drafter_equals_plain_decoding(llm, name):
    params = SamplingParams(max_tokens=150, ignore_eos=True)
    drafter = llm.make_drafter(name)
    for text in ("the end the end the stop the end", "a b c a b d a b c a b"):
        prompt = llm.encode(text)
        plain = Request(prompt, params, llm.eos_ids, llm.engine.capacity)
        Engine(llm.target).run(plain, speculative=False)
        spec = Request(prompt, params, llm.eos_ids, llm.engine.capacity)
        stats = Engine(llm.target, drafter, 8).run(spec)
        assert spec.output_ids == plain.output_ids
        assert stats.accepted > 0, "the tree drafted something the target kept"
