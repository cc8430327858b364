"""The live losslessness monitor (verispec/engine/monitor.py): its p-value is scipy's chi-square; a
correct verifier passes at 100k tokens; each planted verifier bug drives it below the alarm
(RELIABILITY.md B: negative controls that must fail)."""

from __future__ import annotations

import logging

import pytest
import torch
from scipy.stats import chisquare

from verispec.engine import monitor as monitor_module
from verispec.engine.monitor import ALARM, BINS, Monitor, chi_square_p, uniforms
from verispec.sampling import verify_batch
from verispec.sampling.distribution import inverse_cdf

V, K, CYCLES = 8, 3, 1000  # toy vocabulary, draft length, cycles per batch


def target_rows(g: torch.Generator) -> torch.Tensor:
    """[CYCLES, K + 1, V]: random rows, row i of a cycle leaning to token i as a model's rows lean to
    their context (with rows independent of their position, a token drawn from the wrong row would
    look like any other draw)."""
    lean = 3.0 * torch.eye(V)[: K + 1]
    return torch.softmax(torch.randn(CYCLES, K + 1, V, generator=g) * 2.0 + lean, -1)


def cycles(g: torch.Generator, bug: str | None) -> tuple[torch.Tensor, list[int]]:
    """CYCLES speculative cycles with the product's verifier, or with one bug planted -> (the target
    rows the committed tokens came from [n, V], the tokens [n])."""
    p = target_rows(g)
    logits = p[:, :K].log() + torch.randn(CYCLES, K, V, generator=g)  # a drafter near the target
    q = torch.softmax(logits, -1)  # what the drafter draws from
    draft = inverse_cdf(q.reshape(-1, V), torch.rand(CYCLES * K, generator=g)).reshape(CYCLES, K)
    told = torch.softmax(logits / 0.5, -1) if bug == "q at the wrong temperature" else q
    u = torch.rand(CYCLES, K + 1, generator=g)
    accepted, tokens = verify_batch(draft, told, p, u)
    every = torch.arange(CYCLES)
    if bug == "accept everything":
        accepted = torch.full((CYCLES,), K)
        tokens = torch.cat([draft, inverse_cdf(p[:, K], u[:, K])[:, None]], 1)
    elif bug == "bonus from the wrong row":
        full = accepted == K
        tokens[full, K] = inverse_cdf(p[full, K - 1], u[full, K])
    elif bug == "residual not renormalised":
        rejected = accepted < K
        at = accepted.clamp(max=K - 1)
        residual = (p[every, at] - q[every, at]).clamp_min(0)  # drawn as if its mass were 1
        cdf = residual.cumsum(-1)
        drawn = torch.searchsorted(cdf, u[:, K, None].contiguous(), right=True)[:, 0].clamp(max=V - 1)
        tokens[rejected, accepted[rejected]] = drawn[rejected]
    out_rows, out_tokens = [], []
    for c in range(CYCLES):
        n = int(accepted[c]) + 1
        out_rows.append(p[c, :n])
        out_tokens += tokens[c, :n].tolist()
    return torch.cat(out_rows), out_tokens


def test_the_p_value_is_the_chi_square_tests():
    for counts in ([50] * BINS, [40 + i for i in range(BINS)], [100] + [10] * (BINS - 1)):
        assert chi_square_p(counts) == pytest.approx(chisquare(counts).pvalue, rel=1e-9, abs=1e-300)
    assert chi_square_p([1] * BINS) is None  # too few tokens to say


def test_u_is_the_randomised_cdf_of_the_token():
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    g = torch.Generator().manual_seed(0)
    for x, below in ((0, 0.0), (2, 0.3), (3, 0.6)):
        u = float(uniforms(p, [x], g)[0])
        assert below <= u <= below + float(p[0, x])


def test_a_correct_verifier_passes_at_100k_tokens():
    g, watch = torch.Generator().manual_seed(1), Monitor(seed=2)
    while watch.report("toy")["tokens"] < 100_000:
        watch.observe("toy", *cycles(g, None))
    report = watch.report("toy")
    assert report["p_value"] > 1e-3 and report["window_p_value"] > 1e-3, report


@pytest.mark.parametrize("bug", ["accept everything", "bonus from the wrong row", "residual not renormalised",
                                 "q at the wrong temperature"])
def test_a_planted_verifier_bug_drives_the_p_value_below_the_alarm(bug, caplog):
    """Until the window's warning names the drafter; the tokens it took are printed (pytest -s)."""
    g, watch = torch.Generator().manual_seed(3), Monitor(seed=4)
    warned = lambda: any("drafter toy" in r.getMessage() for r in caplog.records)
    with caplog.at_level(logging.WARNING, logger=monitor_module.__name__):
        while watch.report("toy")["tokens"] < 100_000 and not warned():
            watch.observe("toy", *cycles(g, bug))
    report = watch.report("toy")
    print(f"{bug}: warned after {report['tokens']} tokens, p = {report['p_value']:.1e}")
    assert warned() and report["p_value"] < ALARM, report
