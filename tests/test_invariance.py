"""Row invariance: a position's logits and cache entries do not depend on how many rows the forward
carries. This is what makes greedy speculation exactly equal to plain decoding (docs/numerics.md)."""

from __future__ import annotations

import pytest
import torch

from verispec.model.load import ModelSource, load_model
from verispec.model.transformer import Segment


from conftest import BACKENDS


@pytest.fixture(scope="module", params=[(arch, backend) for arch in ("llama", "qwen2", "qwen3", "gemma3")
                                        for backend in BACKENDS], ids=lambda p: "-".join(p))
def model(request, tmp_path_factory):
    from conftest import backend_args, tiny_hf_model

    arch, backend = request.param
    folder = tmp_path_factory.mktemp(arch)
    tiny_hf_model(arch, hidden_size=96, num_attention_heads=6, num_key_value_heads=2).save_pretrained(folder)
    return load_model(ModelSource.of(folder), 512, torch.device("cpu"), *backend_args(backend))


def test_verify_rows_equal_decode_rows_bitwise(model):
    ids = torch.randint(0, 96, (150,), generator=torch.Generator().manual_seed(3))
    cache = model.new_cache()
    prompt = 70  # crosses a 64-position attention block while decoding
    model.forward(ids[:prompt], torch.arange(prompt), cache)
    decoded = torch.cat([model.forward(ids[p:p + 1], torch.tensor([p]), cache) for p in range(prompt, 150)])
    for k in (2, 3, 5, 8, 16, 17, 40):
        cache.truncate(prompt)
        pos = prompt
        rows = []
        while pos < 150:
            n = min(k, 150 - pos)
            rows.append(model.forward(ids[pos:pos + n], torch.arange(pos, pos + n), cache))
            pos += n
        assert torch.equal(torch.cat(rows), decoded), f"rows differ when verifying {k} at a time"


def test_prefill_in_one_pass_equals_token_by_token_bitwise(model):
    ids = torch.randint(0, 96, (100,), generator=torch.Generator().manual_seed(4))
    whole = model.forward(ids, torch.arange(100), model.new_cache())
    cache = model.new_cache()
    single = torch.cat([model.forward(ids[p:p + 1], torch.tensor([p]), cache) for p in range(100)])
    assert torch.equal(whole, single)


def test_truncate_then_forward_equals_fresh_prefill(model):
    ids = torch.randint(0, 96, (80,), generator=torch.Generator().manual_seed(5))
    other = torch.randint(0, 96, (20,), generator=torch.Generator().manual_seed(6))
    cache = model.new_cache()
    model.forward(ids[:60], torch.arange(60), cache)
    model.forward(other, torch.arange(60, 80), cache)  # a rejected draft: written, then rolled back
    cache.truncate(60)
    rolled = model.forward(ids[60:], torch.arange(60, 80), cache)
    fresh = model.forward(ids, torch.arange(80), model.new_cache())[60:]
    assert torch.equal(rolled, fresh)
    assert cache.length == 80


def test_batched_forward_equals_each_sequence_alone_bitwise(model):
    """Several sequences in one forward (ragged: 1, 3, 17 and 40 new tokens, over caches of different
    lengths, some rows wanted, some not) give each the logits and cache of a forward alone."""
    gen = torch.Generator().manual_seed(7)
    histories = [torch.randint(0, 96, (n,), generator=gen) for n in (5, 70, 1, 33)]
    news = [torch.randint(0, 96, (n,), generator=gen) for n in (1, 3, 17, 40)]
    wants = ["all", "last", "none", "all"]
    alone, batched = [], []
    for history in histories:
        for caches in (alone, batched):
            cache = model.new_cache()
            model.forward(history, torch.arange(len(history)), cache)
            caches.append(cache)
    expected = []
    for new, cache, want in zip(news, alone, wants):
        logits = model.forward(new, torch.arange(cache.length, cache.length + len(new)), cache)
        expected.append(None if want == "none" else logits[-1:] if want == "last" else logits)
    got = model.forward_many([Segment(new, cache, want) for new, cache, want in zip(news, batched, wants)])
    for i, (e, g) in enumerate(zip(expected, got)):
        assert (e is None and g is None) or torch.equal(e, g), f"sequence {i} differs in a batch"
    for a, b in zip(alone, batched):
        assert a.length == b.length
        assert torch.equal(a.k[:, :, : a.length], b.k[:, :, : b.length])
        assert torch.equal(a.v[:, :, : a.length], b.v[:, :, : b.length])
