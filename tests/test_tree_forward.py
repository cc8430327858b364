"""Draft trees in one forward: a node's logits are those of its path verified as a chain, bit for bit,
on every backend, alone or batched with chains and prefill chunks; after the kept path's keys and
values move into place, the cache is that of a sequence that only ever saw the kept tokens."""

from __future__ import annotations

import pytest
import torch

from verispec import tree
from verispec.model.load import ModelSource, load_model
from verispec.model.transformer import Segment

from conftest import BACKENDS

# a tree of depth 3 and width 3 with the paths of different lengths side by side
PARENTS = [0, 0, 0, 1, 1, 2, 4, 4, 6, 3]


@pytest.fixture(scope="module", params=[(arch, backend) for arch in ("llama", "gemma3") for backend in BACKENDS],
                ids=lambda p: "-".join(p))
def model(request, tmp_path_factory):
    from conftest import backend_args, tiny_hf_model

    arch, backend = request.param
    folder = tmp_path_factory.mktemp(arch)
    tiny_hf_model(arch, hidden_size=96, num_attention_heads=6, num_key_value_heads=2).save_pretrained(folder)
    return load_model(ModelSource.of(folder), 512, torch.device("cpu"), *backend_args(backend))


def prefilled(model, history):
    cache = model.new_cache()
    model.forward(history, torch.arange(len(history)), cache)
    return cache


def chain_logits(model, history, tokens):
    """Each node's row when its path (root included) is verified as a chain after `history`."""
    rows = [None] * len(tokens)
    leaves = [node for node, below in enumerate(tree.children(PARENTS)) if not below]
    for leaf in leaves:  # a leaf's chain gives the rows of every node on its path
        path = [0] + tree.path(PARENTS, leaf)
        cache = prefilled(model, history)
        logits = model.forward(tokens[path], torch.arange(len(history), len(history) + len(path)), cache)
        for node, row in zip(path, logits):
            rows[node] = row
    return torch.stack(rows)


@pytest.mark.parametrize("prefix", [5, 62, 70])  # the tree inside one attention block, across one, after one
def test_a_nodes_logits_equal_its_path_verified_as_a_chain_bitwise(model, prefix):
    gen = torch.Generator().manual_seed(prefix)
    history = torch.randint(0, 96, (prefix,), generator=gen)
    tokens = torch.randint(0, 96, (len(PARENTS) + 1,), generator=gen)
    got = model.forward_many([Segment(tokens, prefilled(model, history), "all", PARENTS)])[0]
    assert torch.equal(got, chain_logits(model, history, tokens))


def test_a_node_that_sees_a_sibling_differs(model):
    """The planted bug: node 2 read as the child of node 1 (its sibling) no longer matches its path."""
    gen = torch.Generator().manual_seed(1)
    history = torch.randint(0, 96, (20,), generator=gen)
    tokens = torch.randint(0, 96, (len(PARENTS) + 1,), generator=gen)
    wrong = [0, 1] + PARENTS[2:]
    got = model.forward_many([Segment(tokens, prefilled(model, history), "all", wrong)])[0]
    assert not torch.equal(got[2], chain_logits(model, history, tokens)[2])


def test_trees_in_a_batch_with_chains_and_prefill_give_each_what_it_gets_alone(model):
    gen = torch.Generator().manual_seed(2)
    histories = [torch.randint(0, 96, (n,), generator=gen) for n in (30, 7, 66, 12)]
    parents = [PARENTS, None, [0, 0, 1], None]
    news = [torch.randint(0, 96, (n,), generator=gen) for n in (len(PARENTS) + 1, 3, 4, 20)]
    wants = ["all", "all", "all", "none"]
    segments_alone = [Segment(new, prefilled(model, h), want, p) for h, p, new, want in zip(histories, parents, news, wants)]
    alone = [model.forward_many([seg])[0] for seg in segments_alone]
    batch = [Segment(new, prefilled(model, h), want, p) for h, p, new, want in zip(histories, parents, news, wants)]
    got = model.forward_many(batch)
    for i, (a, g) in enumerate(zip(alone, got)):
        assert (a is None and g is None) or torch.equal(a, g), f"sequence {i} differs in a batch"
    for a, b in zip(segments_alone, batch):
        assert torch.equal(a.cache.k[:, :, : a.cache.length], b.cache.k[:, :, : b.cache.length])


def test_after_moving_the_kept_path_the_next_forward_is_that_of_the_kept_tokens(model):
    gen = torch.Generator().manual_seed(3)
    history = torch.randint(0, 96, (40,), generator=gen)
    tokens = torch.randint(0, 96, (len(PARENTS) + 1,), generator=gen)
    following = torch.randint(0, 96, (3,), generator=gen)
    kept = [0] + tree.path(PARENTS, 9)  # nodes 0, 2, 6, 9: slots move to 40..43
    cache = prefilled(model, history)
    model.forward_many([Segment(tokens, cache, "all", PARENTS)])
    cache.keep(len(history), kept)
    assert cache.length == len(history) + len(kept)
    seen = torch.cat([history, tokens[kept]])
    fresh = prefilled(model, seen)
    n = len(seen)
    assert torch.equal(model.forward(following, torch.arange(n, n + 3), cache),
                       model.forward(following, torch.arange(n, n + 3), fresh))


def test_parents_that_do_not_precede_their_children_are_refused(model):
    from verispec.errors import DraftProposalError

    with pytest.raises(DraftProposalError, match=r"parents\[1\] = 2"):
        model.forward_many([Segment(torch.tensor([1, 2, 3]), model.new_cache(), "all", [0, 2])])


@pytest.mark.real
@pytest.mark.parametrize("backend", BACKENDS)
def test_on_the_real_model_a_nodes_logits_equal_its_path_as_a_chain_bitwise(backend):
    from conftest import backend_args
    from verispec import hub

    if not hub.is_fetched("smollm2-135m-instruct"):
        pytest.skip("run `verispec models fetch smollm2-135m-instruct`")
    real = load_model(hub.resolve("smollm2-135m-instruct"), 256, torch.device("cpu"), *backend_args(backend))
    gen = torch.Generator().manual_seed(4)
    history = torch.randint(0, 49152, (60,), generator=gen)  # the tree crosses the first attention block
    tokens = torch.randint(0, 49152, (len(PARENTS) + 1,), generator=gen)
    got = real.forward_many([Segment(tokens, prefilled(real, history), "all", PARENTS)])[0]
    assert torch.equal(got, chain_logits(real, history, tokens))
