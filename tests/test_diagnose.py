"""diagnose on synthetic traces, one per bottleneck: the verdict names it and the first
recommendation is one the cost model predicts to help; bench end to end on a tiny model."""

from __future__ import annotations

import json
import random

import pytest

from verispec.cli.main import main
from verispec.engine.diagnose import diagnose, explain
from verispec.engine.trace import Trace


def synthetic(alpha, tau, draft_ms, growth, t1=40.0, cycles=400, seed=0, feed_ms=0.0, prompt=0):
    """A trace of cycles whose acceptance at position i is alpha(i), with T(k) = t1 (1 + growth (k - 1));
    a drafter that takes in `prompt` tokens before its first draft and one token a cycle after."""
    rng = random.Random(seed)
    lines = []
    for n in range(cycles):
        accepted = 0
        while accepted < tau and rng.random() < alpha(accepted):
            accepted += 1
        fed = prompt if n == 0 else 1 if feed_ms else 0
        lines.append({"type": "cycle", "request": 0, "cycle": n, "tau": tau, "drafted": tau, "accepted": accepted,
                      "fed": fed, "draft_ms_per_cycle": tau * draft_ms + fed * feed_ms,
                      "verify_ms_per_cycle": t1 * (1 + growth * tau), "tokens": [7] * (accepted + 1)})
    return Trace({"type": "run", "schema": 2, "target_step_ms": t1}, lines)


def check(report, verdict):
    assert any(verdict in v for v in report.verdicts), report.verdicts
    assert report.recommendations, "a bottleneck must come with a fix"
    assert report.recommendations[0].predicted_speedup > report.predicted_speedup
    return explain(report)


def test_the_production_failure_zero_to_one_accepted_per_cycle():
    """A draft model at c = 0.25, tau 8, most cycles keep 0-1 drafts: slower than plain decoding."""
    report = diagnose(synthetic(lambda i: 0.35 if i == 0 else 0.3, 8, 10.0, 0.06))
    assert report.measured_speedup < 1 and report.predicted_speedup < 1
    assert sum(report.accepted_histogram.get(k, 0) for k in (0, 1)) > 0.8 * report.cycles
    text = check(report, "low consecutive acceptance")
    assert "cannot pay for itself" in text and "slower than plain decoding" in text
    assert report.recommendations[0].predicted_speedup >= 1.0
    assert "tau 8 -> 1" in text and "turn speculation off" in text


def test_tokenizer_mismatch_signature():
    report = diagnose(synthetic(lambda i: 0.0, 4, 5.0, 0.05))
    check(report, "tokenizer or chat-template mismatch")


def test_a_drafter_too_slow_for_its_acceptance():
    report = diagnose(synthetic(lambda i: 0.85, 4, 30.0, 0.03))
    text = check(report, "drafter is too slow")
    assert "a cheaper drafter" in text


def test_tau_too_large_for_the_acceptance():
    report = diagnose(synthetic(lambda i: 0.55, 8, 0.1, 0.08))
    check(report, "too large for this acceptance")
    best = max(report.predicted_by_tau, key=report.predicted_by_tau.get)
    assert 0 < best < 8


def test_verification_not_parallel_enough():
    report = diagnose(synthetic(lambda i: 0.9, 6, 0.05, 0.5))
    check(report, "not parallel enough")


def test_predicted_speedup_matches_the_measured_one_on_a_consistent_trace():
    report = diagnose(synthetic(lambda i: 0.7, 4, 1.0, 0.05, cycles=3000))
    assert report.predicted_speedup == pytest.approx(report.measured_speedup, rel=0.03)


def test_cli_diagnose_json_and_bad_file(tmp_path, capsys):
    trace = synthetic(lambda i: 0.6, 4, 1.0, 0.05, cycles=50)
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in [trace.run] + trace.cycles))
    assert main(["diagnose", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["cycles"] == 50
    assert main(["diagnose", str(tmp_path / "missing.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_bench_end_to_end_on_a_tiny_model(tiny_llm_folder, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"category": c, "turns": [t]}) for c, t in
                                 [("copy", "the end the end the end"), ("copy", "stop the stop the"),
                                  ("free", "hello there")]))
    out = tmp_path / "out"
    assert main(["bench", "--model", str(tiny_llm_folder), "--prompts", str(prompts), "--num-draft-tokens", "2,auto",
                 "--max-tokens", "16", "--rounds", "2", "--output", str(out)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    result = json.loads(printed[-1])
    rows = result["categories"]["overall"]
    assert set(rows) == {"plain", "ngram/2", "ngram/auto"}
    assert rows["ngram/2"]["prompts"] == 3 and rows["ngram/2"]["runs"] == 6
    assert rows["ngram/2"]["identical"] == 6 and not result["divergences"]
    for measure, rating in result["controller"]["overall"]["ngram"].items():
        best = max(1.0, rows["ngram/2"][measure])  # plain decoding is the fixed tau 0
        assert rating["best_fixed"] == best and rating["ratio"] == round(rows["ngram/auto"][measure] / best, 3)
    assert rows["plain"]["workload_speedup"] == 1.0
    assert any(line.startswith("overall         ngram/auto speedup") for line in printed)
    assert rows["ngram/2"]["predicted_speedup"] > 0 and 0 <= rows["ngram/2"]["acceptance"] <= 1
    for name in ("speedup_vs_tau.png", "position_acceptance.png", "time_split.png", "result.json"):
        assert (out / name).stat().st_size > 1000
    traces = list((out / "traces").glob("*.jsonl"))
    assert traces and all(diagnose_file(t) for t in traces)


def test_sampled_bench_times_speculation_without_comparing_tokens(tiny_llm_folder, tmp_path, capsys):
    """--temperature samples (a seed per prompt and round): speed is reported, tokens are not compared
    (sampled outputs differ by design), and greedy baselines are refused beside it."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"category": "copy", "turns": ["the end the end the end"]}))
    assert main(["bench", "--model", str(tiny_llm_folder), "--prompts", str(prompts), "--num-draft-tokens", "2",
                 "--max-tokens", "12", "--temperature", "0.7"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["temperature"] == 0.7 and result["divergences"] == []
    assert result["categories"]["overall"]["ngram/2"]["identical"] is None
    assert main(["bench", "--model", str(tiny_llm_folder), "--temperature", "0.7", "--baselines", "plain,transformers"]) == 2
    assert "decode greedily" in capsys.readouterr().err


def diagnose_file(path):
    from verispec.engine.trace import read_trace

    return diagnose(read_trace(path)).cycles > 0


@pytest.mark.parametrize("args,message", [(["--num-draft-tokens", "0"], "num_draft_tokens='0' is not allowed"),
                                          (["--prompts", "/no/file"], "prompts='/no/file' is not allowed"),
                                          (["--categories", "poetry"], "categories ['poetry'] are not in"),
                                          (["--baselines", "vllm"], "baselines='vllm' is not allowed"),
                                          (["--rounds", "0"], "rounds=0 is not allowed"),
                                          (["--temperature", "-1"], "temperature=-1.0 is not allowed")])
def test_bench_bad_input_exits_2(tiny_llm_folder, capsys, args, message):
    assert main(["bench", "--model", str(tiny_llm_folder), *args]) == 2
    assert message in capsys.readouterr().err


def test_a_draft_models_prompt_intake_is_priced_per_token_fed_not_per_draft():
    """700 prompt tokens fed once must not make each draft look dear (trace schema 2 records `fed`)."""
    report = diagnose(synthetic(lambda i: 0.8, 4, 2.0, 0.05, cycles=200, feed_ms=0.5, prompt=700))
    assert report.draft_ms_per_token == pytest.approx(2.0, rel=0.02)
    assert report.feed_ms_per_token == pytest.approx(0.5, rel=0.02)


def test_mean_accepted_length_is_vllms_and_tokens_per_cycle_counts_plain_cycles_too():
    trace = synthetic(lambda i: 0.7, 4, 1.0, 0.05, cycles=100)
    for c in trace.cycles[::2]:  # every other cycle a plain step
        c.update(tau=0, drafted=0, accepted=0, tokens=[7])
    report = diagnose(trace)
    accepted = sum(c["accepted"] for c in trace.cycles)
    assert report.mean_accepted_length == pytest.approx(1 + accepted / 50, abs=1e-3)
    assert report.tokens_per_cycle == pytest.approx(1 + accepted / 100, abs=1e-3)


@pytest.mark.parametrize("skew", [1.0, 1.5], ids=["uniform", "skewed"])
def test_diagnose_judges_exactness_from_the_monitors_u_values(skew):
    """u-values uniform (what a lossless verifier gives) pass; u = U^1.5, as a sampler drawing too
    many low-ranked tokens gives, is called not lossless."""
    trace = synthetic(lambda i: 0.6, 3, 0.5, 0.05, cycles=1000)
    rng = random.Random(1)
    for c in trace.cycles:
        c["u"] = [rng.random() ** skew for _ in c["tokens"]]
    report = diagnose(trace)
    assert report.sampled_tokens == sum(len(c["tokens"]) for c in trace.cycles) > 1000
    words = explain(report)
    if skew == 1.0:
        assert report.exactness_p_value > 1e-3 and "Exact? consistent with it" in words
    else:
        assert report.exactness_p_value < 1e-6 and "Exact? NO." in words
    assert "no sampled tokens" in explain(diagnose(synthetic(lambda i: 0.6, 3, 0.5, 0.05)))
