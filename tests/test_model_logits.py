"""Our transformer reproduces transformers' logits on the same weights, for every architecture."""

from __future__ import annotations

import pytest
import torch

from conftest import EXACT_BACKENDS, backend_args
from verispec.model.load import ModelSource, load_model
from verispec.model.segment import Segment

ARCHS = ["llama", "qwen2", "qwen3", "gemma3"]




def ours_and_expected(hf_folder, architecture, n, seed, backend):
    """Our model of a tiny random checkpoint, n random ids, and transformers' logits for them."""
    folder, hf = hf_folder(architecture)
    ours = load_model(ModelSource.of(folder), 256, torch.device("cpu"), *backend_args(backend))
    ids = torch.randint(0, 96, (n,), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return ours, ids, hf(ids[None]).logits[0]


@pytest.mark.parametrize("backend", EXACT_BACKENDS)
@pytest.mark.parametrize("architecture", ARCHS)
def test_logits_match_transformers(hf_folder, architecture, backend):
    ours, ids, expected = ours_and_expected(hf_folder, architecture, 40, 1, backend)
    got = ours.forward(ids, torch.arange(40), ours.new_cache())
    assert (got - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("backend", EXACT_BACKENDS)
@pytest.mark.parametrize("architecture", ARCHS)
def test_incremental_decode_matches_transformers(hf_folder, architecture, backend):
    """Prefill then one token at a time (sliding windows included) equals one full pass of transformers."""
    ours, ids, expected = ours_and_expected(hf_folder, architecture, 30, 2, backend)
    cache = ours.new_cache()
    rows = [ours.forward(ids[:10], torch.arange(10), cache)]
    rows += [ours.forward(ids[p:p + 1], torch.tensor([p]), cache) for p in range(10, 30)]
    assert (torch.cat(rows) - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("backend", EXACT_BACKENDS)
@pytest.mark.parametrize("architecture", ARCHS)
def test_captured_features_match_transformers(hf_folder, architecture, backend):
    """A forward that captures hands back the residual stream entering each asked layer: transformers'
    hidden_states[i] (its last one has the final norm applied, ours is taken before it), for every
    row of a prefill chunk and of a batch beside a segment that captures nothing."""
    folder, hf = hf_folder(architecture)
    ours = load_model(ModelSource.of(folder), 256, torch.device("cpu"), *backend_args(backend))
    ids = torch.randint(0, 96, (24,), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = hf(ids[None], output_hidden_states=True).hidden_states
    layers = ours.config.num_layers
    cache, other = ours.new_cache(), ours.new_cache()
    first = Segment(ids[:16], cache, "none", capture=(0, 1, layers))
    ours.forward_many([first])
    rest = Segment(ids[16:], cache, "all", capture=(0, 1, layers))
    ours.forward_many([Segment(ids[:5], other, "all"), rest])
    got = torch.cat([first.features, rest.features])  # [24, 3, hidden]
    assert got.shape == (24, 3, ours.config.hidden_size)
    for c, layer in enumerate((0, 1)):
        assert (got[:, c] - expected[layer][0]).abs().max().item() < 1e-4
    with torch.no_grad():
        final = hf.model.norm(got[:, 2])
    assert (final - expected[layers][0]).abs().max().item() < 1e-4
