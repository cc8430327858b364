"""verispec advise: its one target pass gives every prompt its own plain greedy output, its prices
follow the verify curve at each cycle's context, its answer in words follows the numbers, and the
command reads the prompt formats a team has (bench rows, chat conversations, logged requests)."""

from __future__ import annotations

import json

import pytest

from verispec.benchmark import advise as adv
from verispec.benchmark.prompts import load_prompts
from verispec.cli.main import main
from verispec.config import SamplingParams
from verispec.engine.cost import ContextCurve, CostModel, VerifyCurve
from verispec.errors import InvalidInputError

TEXTS = ["the end the end the end", "a b a b a b a", "the", "b the b the b the b the b the", "end a end a"]


def test_the_batched_target_pass_gives_each_prompt_its_plain_greedy_output(tiny_llm):
    """Three caches for five prompts of different lengths: sequences join as others finish."""
    ids = [tiny_llm.encode(t) for t in TEXTS]
    params = SamplingParams(max_tokens=30, temperature=0.0)
    outputs = adv.decode_all(tiny_llm, ids, params, batch=3, progress=False)
    assert outputs == [tiny_llm.generate(i, params, speculative=False).token_ids for i in ids]


def test_the_context_curve_is_linear_in_the_context_between_and_beyond_its_two_timings():
    curves = ContextCurve(VerifyCurve((1.0, 2.0)), 128, VerifyCurve((3.0, 6.0)), 1152)
    assert curves.at(128).ms == (1.0, 2.0) and curves.at(1152).ms == (3.0, 6.0)
    assert curves.at(640).ms == (2.0, 4.0) and curves.at(2176).ms == (5.0, 10.0)
    assert curves.at(655) is curves.at(640)  # to 16 below, made once


def test_replayed_prices_use_each_cycles_context(tiny_llm):
    """With a curve that does not depend on the context the replay's plain decoding costs T(1) per
    token; with one that grows, every token costs T(1) at its own context, so plain decoding of the
    same output costs more after a longer prompt."""
    ids = [tiny_llm.encode(TEXTS[0]), tiny_llm.encode(" ".join([TEXTS[0]] * 20))]
    params = SamplingParams(max_tokens=20, ignore_eos=True, temperature=0.0)
    outputs = adv.decode_all(tiny_llm, ids, params, progress=False)
    short = VerifyCurve((2.0, 3.0, 4.0, 5.0, 6.0))
    model = CostModel(short, draft_ms=0.01)
    make = adv.Drafters(tiny_llm)
    flat = adv.price(tiny_llm, make, "ngram", [3], model, ContextCurve(short, 0, short, 1000), ids, outputs)[0]
    assert [r.plain_ms for r in flat.replays] == [pytest.approx(2.0 * len(o)) for o in outputs]
    growing = ContextCurve(short, 0, VerifyCurve(tuple(2 * x for x in short.ms)), 100)
    priced = adv.price(tiny_llm, make, "ngram", [3], model, growing, ids, outputs)[0]
    for ids_, out, r in zip(ids, outputs, priced.replays):
        low, high = (2.0 * (1 + (len(ids_) + i) // 16 * 16 / 100) for i in (0, len(out)))
        assert low * len(out) - 1e-9 <= r.plain_ms <= high * len(out) + 1e-9
    assert priced.replays[1].plain_ms > priced.replays[0].plain_ms
    assert [r.cycles for r in priced.replays] == [r.cycles for r in flat.replays]  # prices change, cycles not


def result_with(predicted: float, measured: float | None, categories: dict[str, float] | None = None) -> dict:
    best = {"config": "ngram/4", "drafter": "ngram", "tau": 4, "predicted": predicted,
            "by_category": categories or {"all": predicted}}
    facts = {"best_tau": 4, "predicted": predicted, "acceptance": 0.5, "alpha_by_position": [0.6, 0.5],
             "drafting_cycles": 0.4, "break_even_alpha": 0.2, "alpha_for_aim": None, "leader": None,
             "alpha_to_lead": None}
    return {"configs": [best], "prompts": 10, "sample": ["1", "2"], "drafter_facts": {"ngram": facts},
            "measured": {} if measured is None else {"ngram/4": {"predicted": predicted, "measured": measured,
                                                                  "identical": 4, "runs": 4}}}


@pytest.mark.parametrize("predicted,measured,answer", [
    (1.02, None, "Do not speculate on this traffic: the best configuration, ngram/4, is predicted 1.02x"),
    (1.30, 0.95, "Do not speculate on this traffic: ngram/4 is predicted 1.30x, but measured 0.95x"),
    (1.30, 1.25, "Speculate with ngram, tau 4: predicted 1.30x"),
])
def test_the_answer_in_words_follows_the_prediction_and_the_measurement(predicted, measured, answer):
    lines = adv.verdict(result_with(predicted, measured))
    assert lines[0].startswith(answer)
    assert any("cannot reach 1.5x at any alpha" in line for line in lines)


def test_a_category_that_does_not_pay_is_named():
    lines = adv.verdict(result_with(1.3, 1.3, {"qa": 1.5, "translation": 0.97}))
    assert any("does not pay on 'translation' (0.97x)" in line for line in lines)


def traffic(tmp_path):
    path = tmp_path / "traffic.jsonl"
    rows = [{"prompt": TEXTS[0], "category": "a"},
            {"messages": [{"role": "user", "content": TEXTS[1]}], "category": "b"},
            {"model": "x", "messages": [{"role": "user", "content": TEXTS[3]}], "max_tokens": 50, "temperature": 0},
            {"turns": [TEXTS[4]], "category": "a", "question_id": "q4"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_prompts_may_be_bench_rows_conversations_or_logged_request_bodies(tmp_path):
    prompts = load_prompts(str(traffic(tmp_path)))
    assert [p.category for p in prompts] == ["a", "b", "all", "a"]
    assert [p.chat for p in prompts] == [False, True, True, True]  # a completion's prompt is not chat-wrapped
    assert prompts[1].text == [{"role": "user", "content": TEXTS[1]}] and prompts[3].question_id == "q4"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"messages": []}\n')
    with pytest.raises(InvalidInputError, match="bad.jsonl, line 2: need a JSON object with 'turns', 'prompt' or 'messages'"):
        load_prompts(str(bad))


def test_cli_advise_ranks_measures_and_answers(tiny_llm_folder, tmp_path, capsys):
    assert main(["advise", "--model", str(tiny_llm_folder), "--prompts", str(traffic(tmp_path)), "--drafters",
                 "ngram,suffix", "--max-tokens", "24", "--measure", "2", "--rounds", "1",
                 "--output", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    predicted = [c["predicted"] for c in result["configs"]]
    assert predicted == sorted(predicted, reverse=True)
    assert {c["config"] for c in result["configs"]} == {f"{d}/{t}" for d in ("ngram", "suffix") for t in adv.TAUS}
    assert list(result["measured"]) == [c["config"] for c in result["configs"][:2]]
    assert all(m["identical"] == m["runs"] == 2 for m in result["measured"].values())  # greedy: the target's own
    assert ("Speculate with" in out) != ("Do not speculate" in out)
    facts = result["drafter_facts"]
    other = next(d for d in facts if d != result["configs"][0]["drafter"])
    assert facts[other]["leader"] == result["configs"][0]["config"] and f"match {facts[other]['leader']}" in out
    assert (tmp_path / "out" / "advise.png").stat().st_size > 0
    assert json.loads((tmp_path / "out" / "advise.json").read_text())["configs"] == result["configs"]


@pytest.mark.parametrize("args,message", [
    (["--prompts", "/no/such.jsonl"], "prompts='/no/such.jsonl' is not allowed"),
    (["--drafters", "none"], "drafters='none' is not allowed here"),
    (["--drafters", "oracle"], "drafter='oracle' is not allowed"),
    (["--measure", "-1"], "measure=-1"),
    (["--max-tokens", "0"], "max_tokens=0 is not allowed"),
])
def test_cli_advise_bad_input_exits_2_with_a_message(tiny_llm_folder, tmp_path, capsys, args, message):
    argv = ["advise", "--model", str(tiny_llm_folder), "--prompts", str(traffic(tmp_path)), *args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
