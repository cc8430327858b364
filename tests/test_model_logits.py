"""Our transformer reproduces transformers' logits on the same weights, for every architecture."""

from __future__ import annotations

import pytest
import torch

from conftest import EXACT_BACKENDS, backend_args
from verispec.model.load import ModelSource, load_model

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
