"""The verifier: deterministic cases (RELIABILITY.md A) and its law, statistically, with negative
controls that must fail the same test (B1, B2, B4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from verispec.config import SamplingParams
from verispec.sampling import probabilities, verify, verify_batch, verify_reference
from verispec.sampling import rejection as verify_module
from verispec.sampling.distribution import new_generator

V = 6


def one_hot(ids: list[int], vocab: int = V) -> torch.Tensor:
    return torch.zeros(len(ids), vocab).scatter_(1, torch.tensor(ids)[:, None], 1.0)


# --- A. deterministic cases, greedy (one-hot target rows) -----------------------------------------

def test_all_accepted_gives_k_plus_1_tokens_the_last_the_bonus_from_row_k():
    n, tokens = verify(torch.tensor([1, 2, 3]), None, one_hot([1, 2, 3, 4]))
    assert (n, tokens) == (3, [1, 2, 3, 4])


def test_first_rejected_gives_exactly_the_targets_token():
    assert verify(torch.tensor([1, 2, 3]), None, one_hot([5, 2, 3, 4])) == (0, [5])


@pytest.mark.parametrize("i", range(4))
def test_rejection_at_i_gives_i_plus_1_tokens_and_ignores_later_matches(i):
    target = [1, 2, 3, 4, 5]
    draft = target[:4].copy()
    draft[i] = 0  # later drafts still "match" the target rows: they must not be used
    n, tokens = verify(torch.tensor(draft), None, one_hot(target))
    assert n == i and tokens == target[: i + 1]


def test_ragged_batch_each_row_its_own_tau_including_zero():
    target = one_hot([1, 2, 3, 4]).expand(3, -1, -1)
    draft = torch.tensor([[1, 2, 3], [1, 9 % V, 3], [0, 0, 0]])
    accepted, tokens = verify_batch(draft, None, target, torch.zeros(3, 4), lengths=torch.tensor([3, 3, 0]))
    assert accepted.tolist() == [3, 1, 0]
    assert tokens.tolist() == [[1, 2, 3, 4], [1, 2, -1, -1], [1, -1, -1, -1]]


def test_p_equal_q_accepts_everything_without_nan():
    p = torch.softmax(torch.randn(5, V), -1)
    for seed in range(50):
        n, tokens = verify(torch.tensor([0, 1, 2, 3]), p[:4], p, new_generator(seed))
        assert n == 4 and all(0 <= t < V for t in tokens)


def test_p_zero_at_the_drafted_token_is_always_rejected():
    p = torch.softmax(torch.randn(2, V), -1)
    p[0, 3] = 0
    p = p / p.sum(-1, keepdim=True)
    q = torch.full((1, V), 1.0 / V)
    for seed in range(100):
        n, tokens = verify(torch.tensor([3]), q, p, new_generator(seed))
        assert n == 0 and tokens[0] != 3


def test_out_of_range_draft_ids_are_rejected_not_indexed():
    target = one_hot([1, 2, 3])
    for bad in (-1, V, 10**6):
        n, tokens = verify(torch.tensor([1, bad]), None, target)
        assert (n, tokens) == (1, [1, 2])


def test_fast_equals_reference_bit_for_bit_under_the_same_uniforms():
    g = torch.Generator().manual_seed(0)
    for trial in range(400):
        k = int(torch.randint(0, 5, (1,), generator=g))
        p = torch.softmax(torch.randn(k + 1, V, generator=g) * 2, -1)
        q = torch.softmax(torch.randn(k, V, generator=g) * 2, -1) if trial % 3 else None
        if trial % 5 == 0:  # exact zeros in p and q
            p = p * (torch.rand(k + 1, V, generator=g) > 0.3)
            p[:, 0] += 1e-3
            p = p / p.sum(-1, keepdim=True)
        draft = torch.randint(-1, V + 1, (k,), generator=g) if trial % 7 == 0 else torch.randint(0, V, (k,), generator=g)
        u = torch.rand(1, k + 1, generator=g)
        accepted, tokens = verify_batch(draft[None], None if q is None else q[None], p[None], u)
        n = int(accepted[0])
        assert (n, tokens[0, : n + 1].tolist()) == verify_reference(draft.tolist(), q, p, u[0].tolist())


# --- B. the law of the first emitted token --------------------------------------------------------

N = 100_000


def first_token_law(p_logits, q_logits, temperature, k, seed=0, q_for_verify=None, point_mass=False, params=None):
    """Draft k tokens a trial from q, verify against p -> (counts of the first emitted token, p, accepted).

    q_for_verify: the q handed to the verifier (default: the q drafts came from); point_mass: none (q=None);
    params: the sampling params shaping both (default: just the temperature).
    """
    params = params or SamplingParams(temperature=temperature)
    p = probabilities(p_logits[None], params)[0]
    q = probabilities(q_logits[None], params)[0]
    g = torch.Generator().manual_seed(seed)
    draft = torch.multinomial(q.expand(N, -1), k, replacement=True, generator=g)  # [N, k]
    q_given = q if q_for_verify is None else q_for_verify
    draft_probs = None if point_mass else q_given.expand(N, k, -1)
    accepted, tokens = verify_batch(draft, draft_probs, p.expand(N, k + 1, -1), torch.rand(N, k + 1, generator=g))
    counts = np.bincount(tokens[:, 0].numpy(), minlength=p.shape[0])
    return counts, p.numpy(), accepted


def fit(counts, p):
    p = p.astype(np.float64)
    support = p > 0
    assert counts[~support].sum() == 0, "a token outside the target's support was emitted"
    tv = 0.5 * np.abs(counts / counts.sum() - p).sum()
    pvalue = chisquare(counts[support], p[support] / p[support].sum() * counts.sum()).pvalue
    return pvalue, tv


@pytest.mark.parametrize("vocab", [10, 32])
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.5])
def test_first_token_follows_the_target_law(vocab, k, temperature):
    g = torch.Generator().manual_seed(vocab * 100 + k)
    p_logits, q_logits = torch.randn(vocab, generator=g) * 1.5, torch.randn(vocab, generator=g) * 1.5
    counts, p, _ = first_token_law(p_logits, q_logits, temperature, k, seed=k)
    pvalue, tv = fit(counts, p)
    assert pvalue > 1e-3 and tv < 0.01


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.8, top_k=4), SamplingParams(temperature=1.2, top_p=0.6),
                                    SamplingParams(temperature=1.0, min_p=0.1),
                                    SamplingParams(temperature=0.7, top_k=6, top_p=0.8, min_p=0.05)],
                         ids=["top-k", "top-p", "min-p", "all"])
def test_truncated_sampling_stays_in_the_allowed_set_and_follows_the_processed_target(params):
    """B5: the drafter's q and the target's p truncated alike; no token outside p's support."""
    g = torch.Generator().manual_seed(21)
    p_logits, q_logits = torch.randn(32, generator=g) * 1.5, torch.randn(32, generator=g) * 1.5
    counts, p, _ = first_token_law(p_logits, q_logits, None, 2, params=params)
    assert 1 < (p > 0).sum() < 32, "the filter must cut something for this test to mean anything"
    pvalue, tv = fit(counts, p)  # fit also asserts that nothing outside p's support was emitted
    assert pvalue > 1e-3 and tv < 0.01


def _planted(monkeypatch, bug):
    if bug == "accept-all":
        monkeypatch.setattr(verify_module, "_accepts", lambda p_x, q_x, u: torch.ones_like(p_x, dtype=torch.bool))
    elif bug == "resample-from-p":
        monkeypatch.setattr(verify_module, "_residual", lambda p, q: p)
    elif bug == "softmax-residual":
        monkeypatch.setattr(verify_module, "_residual", lambda p, q: torch.softmax((p - q).clamp_min(0), -1))


@pytest.mark.parametrize("bug", ["accept-all", "resample-from-p", "softmax-residual", "q-wrong-temperature",
                                 "one-hot-q-with-sampled-drafts"])
def test_negative_controls_fail_the_same_test(monkeypatch, bug):
    g = torch.Generator().manual_seed(11)
    p_logits, q_logits = torch.randn(10, generator=g) * 1.5, torch.randn(10, generator=g) * 1.5
    _planted(monkeypatch, bug)
    kwargs = {}
    if bug == "q-wrong-temperature":
        kwargs["q_for_verify"] = probabilities(q_logits[None], SamplingParams(temperature=2.0))[0]
    if bug == "one-hot-q-with-sampled-drafts":  # the greedy q (argmax) given while drafts were sampled
        kwargs["q_for_verify"] = torch.zeros(10).index_fill_(0, q_logits.argmax(), 1.0)
    counts, p, _ = first_token_law(p_logits, q_logits, 1.0, 2, **kwargs)
    pvalue, tv = fit(counts, p)
    assert pvalue < 1e-10 and tv >= 0.02


def test_sampled_drafts_verified_as_point_masses_are_lossless_too():
    g = torch.Generator().manual_seed(3)
    counts, p, _ = first_token_law(torch.randn(10, generator=g), torch.randn(10, generator=g), 1.0, 2, point_mass=True)
    pvalue, tv = fit(counts, p)
    assert pvalue > 1e-3 and tv < 0.01


def test_acceptance_at_the_first_position_is_sum_of_min_p_q():
    g = torch.Generator().manual_seed(5)
    p_logits, q_logits = torch.randn(10, generator=g), torch.randn(10, generator=g)
    _, p, accepted = first_token_law(p_logits, q_logits, 1.0, 1)
    q = probabilities(q_logits[None], SamplingParams(temperature=1.0))[0].numpy()
    alpha = np.minimum(p, q).sum()
    rate = accepted.float().mean().item()
    assert abs(rate - alpha) < 5 * np.sqrt(alpha * (1 - alpha) / N)


def test_drafter_equal_to_target_accepts_everything():
    logits = torch.randn(10)
    _, _, accepted = first_token_law(logits, logits, 1.0, 4)
    assert accepted.min().item() == 4


def test_greedy_verification_equals_verify_on_point_masses():
    """verify_greedy is verify for greedy targets: every row the one-hot of its id, drafts as point
    masses (n-gram) or one-hot q (a greedy draft model), out-of-range drafts included (A6)."""
    from verispec.sampling import verify_greedy

    gen = torch.Generator().manual_seed(11)
    vocab = 6
    for _ in range(400):
        k = int(torch.randint(0, 5, (1,), generator=gen))
        target = torch.randint(0, vocab, (k + 1,), generator=gen).tolist()
        # drafts that follow the target for a while, then anything, sometimes out of range
        draft = [t if torch.rand(1, generator=gen) < 0.6 else int(torch.randint(-1, vocab + 1, (1,), generator=gen))
                 for t in target[:k]]
        p = torch.zeros(k + 1, vocab).scatter_(1, torch.tensor(target)[:, None], 1.0)
        q = torch.zeros(k, vocab).scatter_(1, torch.tensor(draft).clamp(0, vocab - 1)[:, None], 1.0)
        expected = verify(torch.tensor(draft, dtype=torch.long), None, p, torch.Generator().manual_seed(1))
        assert verify_greedy(draft, target) == expected, (draft, target)
        if all(0 <= x < vocab for x in draft):
            assert verify(torch.tensor(draft, dtype=torch.long), q, p, torch.Generator().manual_seed(2)) == expected


def test_a_samplers_greedy_choice_is_where_its_greedy_distribution_puts_its_mass():
    from verispec.sampling import Sampler

    params = SamplingParams(max_tokens=8, min_tokens=3, repetition_penalty=1.7, frequency_penalty=0.5,
                            presence_penalty=0.3)
    sampler = Sampler(params, prompt_ids=[1, 2, 3], stop_ids=[0, 4])
    logits = torch.randn(5, 10, generator=torch.Generator().manual_seed(12))
    logits[:, 0] = 10.0  # a stop id on top: masked while min_tokens is not reached
    history, drafts = [2, 5], [5, 0, 7, 7]
    assert sampler.greedy(logits, history, drafts) == sampler.probs(logits, history, drafts).argmax(-1).tolist()
