"""The suffix drafter: its tree against counts taken by scanning the text, the speculation tree's
invariants, eviction and flat memory, the per-request opt-out, and greedy equality end to end."""

from __future__ import annotations

import math
import random

import pytest

from verispec.config import SamplingParams
from verispec.drafters.suffix import START, History, SuffixDrafter
from verispec.drafters.suffix_tree import Node, SuffixTree
from verispec.errors import InvalidInputError
from verispec.sampling import Sampler


def counts_by_scan(sequences: list[list[int]], depth: int) -> dict[tuple[int, ...], int]:
    """Every substring of at most `depth` tokens and its number of occurrences, by brute force."""
    counts: dict[tuple[int, ...], int] = {}
    for seq in sequences:
        for start in range(len(seq)):
            for end in range(start + 1, min(start + depth, len(seq)) + 1):
                key = tuple(seq[start:end])
                counts[key] = counts.get(key, 0) + 1
    return counts


def counts_in_tree(tree: SuffixTree) -> dict[tuple[int, ...], int]:
    out: dict[tuple[int, ...], int] = {}
    stack = [((), tree.root)]
    while stack:
        path, place = stack.pop()
        for token, child in tree.children(place):
            out[path + (token,)] = tree.count(child)
            stack.append((path + (token,), child))
    return out


def speculation_by_scan(sequences, context, depth, max_match, factor, floor, own):
    """The match length and every path with probability >= floor under it, from scanned counts
    (no size limit), as {path: probability}; and the size limit."""
    counts = counts_by_scan(sequences, depth)
    match = 0
    for m in range(min(max_match, len(context), depth - 1), 0, -1):
        key = tuple(context[len(context) - m:])
        if counts.get(key, 0) > own and any(k[:-1] == key for k in counts if len(k) == m + 1):
            match = m
            break
    if match == 0:
        return 0, {}, 0
    paths: dict[tuple[int, ...], float] = {}
    base = tuple(context[len(context) - match:])
    frontier = [((), 1.0, counts[base] - own)]
    while frontier:
        path, p, denominator = frontier.pop()
        for key, c in counts.items():
            if len(key) == len(base) + len(path) + 1 and key[:-1] == base + path:
                q = p * c / denominator
                if q >= floor:
                    paths[path + (key[-1],)] = q
                    frontier.append((path + (key[-1],), q, c))
    return match, paths, math.ceil(factor * match)


def grown(sequences: list[list[int]], depth: int) -> SuffixTree:
    tree = SuffixTree(depth)
    for seq in sequences:
        held: list[int] = []
        for token in seq:
            held.append(token)
            tree.append(held)
        tree.close(held)
    return tree


def random_text(rng: random.Random, n: int, vocab: int) -> list[int]:
    """Repetitive text: random copies of earlier spans mixed with fresh tokens."""
    out: list[int] = []
    while len(out) < n:
        if out and rng.random() < 0.6:
            start = rng.randrange(len(out))
            out += out[start: start + rng.randint(1, 12)]
        else:
            out.append(rng.randrange(vocab))
    return out[:n]


@pytest.mark.parametrize("seed", range(12))
def test_tree_counts_equal_counts_by_scanning_the_text(seed):
    rng = random.Random(seed)
    depth = rng.choice([2, 3, 5, 8])
    sequences = [random_text(rng, rng.randint(1, 60), rng.choice([2, 3, 6])) for _ in range(rng.randint(1, 4))]
    assert counts_in_tree(grown(sequences, depth)) == counts_by_scan(sequences, depth)


def test_counts_stay_right_while_a_sequence_grows():
    """Suffixes inside their own tail grow with the sequence; a later split must not lose them."""
    rng = random.Random(5)
    text = random_text(rng, 80, 3)
    tree, held = SuffixTree(6), []
    for token in text:
        held.append(token)
        tree.append(held)
        assert counts_in_tree(tree) == counts_by_scan([held], 6)


@pytest.mark.parametrize("seed", range(8))
def test_removing_sequences_leaves_the_tree_of_the_others(seed):
    rng = random.Random(seed)
    depth = rng.choice([3, 6])
    sequences = [random_text(rng, rng.randint(1, 40), 3) for _ in range(5)]
    tree = SuffixTree(depth)
    held = []
    for seq in sequences:
        held.append([])
        for token in seq:
            held[-1].append(token)
            tree.append(held[-1])
        tree.close(held[-1])
    for gone in (held[0], held[3]):
        tree.remove(gone)
    assert counts_in_tree(tree) == counts_by_scan([held[1], held[2], held[4]], depth)


@pytest.mark.parametrize("seed", range(16))
def test_speculation_matches_scanned_counts_and_keeps_its_invariants(seed):
    rng = random.Random(seed)
    depth, factor, floor = rng.choice([6, 8, 12]), rng.choice([0.5, 1.0, 3.0]), rng.choice([0.0, 0.05, 0.3])
    text = random_text(rng, rng.randint(5, 120), rng.choice([2, 4]))
    tree = grown([text], depth)
    max_match = depth // 2
    match, paths, _ = speculation_by_scan([text], text, depth, max_match, factor, floor, own=1)
    assert paths, "the test must see a match"
    # 1. no size limit: exactly the paths above the floor, with their probabilities
    spec = tree.speculate(text, max_match, 10_000, floor, limit=10_000, own=1)
    assert spec.match == match
    found = {}
    for node, (token, parent) in enumerate(zip(spec.token_ids, spec.parents), 1):
        assert parent < node  # parents precede children
        found[node] = (found[parent][0] if parent else ()) + (token,), spec.scores[node - 1]
    assert {p: pytest.approx(s) for p, s in found.values()} == {p: pytest.approx(s) for p, s in paths.items()}
    # 2. a small limit: the most probable nodes, a tree, none below the floor
    small = tree.speculate(text, max_match, factor, floor, limit=3, own=1)
    assert len(small.token_ids) <= min(3, math.ceil(factor * small.match))
    assert all(s >= floor for s in small.scores)
    if small.token_ids:
        excluded = sorted(paths.values(), reverse=True)[len(small.token_ids):]
        assert not excluded or min(small.scores) >= max(excluded) - 1e-12
    # 3. the drafter proposes the best path of the tree
    drafter = SuffixDrafter(depth=depth, factor=factor, floor=floor)
    best = drafter.speculate(text)
    assert len(best.token_ids) <= math.ceil(factor * best.match)
    assert drafter.propose(text, 5).token_ids == best.best_path()[:5]


@pytest.mark.parametrize("seed", range(8))
def test_speculation_from_past_responses_matches_scanned_counts(seed):
    """The global tree: several closed sequences, a context that is not among them (own = 0)."""
    rng = random.Random(100 + seed)
    depth, floor = rng.choice([6, 8]), rng.choice([0.0, 0.2])
    responses = [random_text(rng, rng.randint(5, 50), 3) for _ in range(4)]
    context = random_text(rng, 12, 3)
    match, paths, _ = speculation_by_scan(responses, context, depth, depth // 2, 1.0, floor, own=0)
    assert paths, "the test must see a match"
    spec = grown(responses, depth).speculate(context, depth // 2, 10_000, floor, limit=10_000)
    assert spec.match == match
    found = {}
    for node, (token, parent) in enumerate(zip(spec.token_ids, spec.parents), 1):
        found[node] = (found[parent][0] if parent else ()) + (token,), spec.scores[node - 1]
    assert {p: pytest.approx(s) for p, s in found.values()} == {p: pytest.approx(s) for p, s in paths.items()}


def test_best_path_follows_the_most_probable_child():
    from verispec.drafters.suffix_tree import Speculation

    spec = Speculation([7, 8, 9, 4, 5], [0, 0, 2, 2, 3], [0.3, 0.5, 0.2, 0.25, 0.1])
    assert spec.best_path() == [8, 4]


def test_a_repeated_phrase_is_proposed_with_a_draft_as_long_as_the_match():
    phrase = [5, 6, 7, 8, 9, 10, 11, 12]
    context = [1, 2] + phrase + [3] + phrase[:4]
    drafter = SuffixDrafter(factor=1.0)
    assert drafter.propose(context, 8).token_ids == phrase[4:]  # 4 matched -> 4 drafted
    assert drafter.propose(context, 2).token_ids == phrase[4:6]


def test_of_equally_likely_continuations_the_latest_is_proposed():
    assert SuffixDrafter().propose([1, 2, 3, 1, 2, 4, 1, 2], 2).token_ids == [4, 1]
    assert SuffixDrafter().propose([1, 2, 4, 1, 2, 3, 1, 2], 2).token_ids == [3, 1]
    # counted nodes too: 3 and 4 follow "1 2" three times each, 3 last
    context = [7, 1, 2, 3, 8, 1, 2, 3, 9, 1, 2, 4, 10, 1, 2, 4, 11, 1, 2, 4, 12, 1, 2, 3, 13, 1, 2]
    assert SuffixDrafter().propose(context, 1).token_ids == [3]


def test_appending_is_incremental_and_a_new_context_restarts():
    drafter = SuffixDrafter()
    context = [1, 2, 3, 4, 1, 2]
    drafter.propose(context, 4)
    tree = drafter._tree
    drafter.propose(context + [3], 4)
    assert drafter._tree is tree and drafter._context == context + [3]
    assert drafter.propose([9, 8, 7, 9, 8], 4).token_ids[0] == 7
    assert drafter._tree is not tree and drafter._context == [9, 8, 7, 9, 8]


def test_the_global_tree_learns_from_finished_requests_and_forks_share_it():
    history = History()
    drafter = SuffixDrafter(history)
    other = drafter.fork()
    answer = [40, 41, 42, 43, 44, 45, 46, 47, 48, 49]
    drafter.reset(Sampler(SamplingParams(), [1], frozenset()))
    drafter.finish(answer)
    other.reset(Sampler(SamplingParams(), [1], frozenset()))
    assert other.propose([7, 40, 41, 42, 43], 4).token_ids == [44, 45, 46, 47]


def test_a_request_with_the_global_tree_off_drafts_as_a_drafter_without_history():
    rng = random.Random(1)
    history = History()
    shared = SuffixDrafter(history)
    for _ in range(20):
        shared.reset(Sampler(SamplingParams(), [1], frozenset()))
        shared.finish(random_text(rng, 50, 5))
    tokens = history.tokens
    off = shared.fork()
    off.reset(Sampler(SamplingParams(suffix_global=False), [1], frozenset()))
    fresh = SuffixDrafter()
    saw_history = False
    context = random_text(rng, 10, 5)
    for token in random_text(rng, 60, 5):
        context.append(token)
        assert off.propose(context, 6) == fresh.propose(context, 6)
        on = shared.fork()
        on.reset(Sampler(SamplingParams(), [1], frozenset()))
        saw_history |= on.propose(context, 6) != fresh.propose(context, 6)
    off.finish(context)
    assert history.tokens == tokens, "an opted-out request must not feed the global tree"
    assert saw_history, "the test must see the global tree change drafts"


def test_memory_stays_flat_over_ten_thousand_requests():
    rng = random.Random(2)
    history = History(budget=600)
    drafter = SuffixDrafter(history)
    sizes = []
    for n in range(10_000):
        drafter.finish(random_text(rng, rng.randint(1, 40), 50))
        assert history.tokens <= 600
        if n % 1000 == 999:
            sizes.append(tree_size(history.tree))
    assert max(sizes) <= 1.5 * min(sizes), sizes
    assert max(sizes) <= 600 * history.tree.depth  # and no more than the budget's worth


def tree_size(tree: SuffixTree) -> int:
    """Explicit nodes and tails."""
    count, stack = 0, [tree.root]
    while stack:
        node = stack.pop()
        for child in node.children.values():
            count += 1
            if type(child) is Node:
                stack.append(child)
    return count


def test_eviction_drops_the_oldest_whole_responses():
    history = History(budget=11)
    for response in ([1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]):
        history.add(response)  # START and the response: 5 tokens each
    assert history.tokens == 10
    assert counts_in_tree(history.tree) == counts_by_scan([[START, 5, 6, 7, 8], [START, 9, 10, 11, 12]],
                                                          history.tree.depth)
    history.add(list(range(100, 130)))  # longer than the budget: its last 11 tokens, without START
    assert history.tokens == 11
    assert counts_in_tree(history.tree) == counts_by_scan([list(range(119, 130))], history.tree.depth)


def test_a_response_is_drafted_from_its_first_token_on_from_how_past_responses_began():
    history = History()
    drafter = SuffixDrafter(history, factor=1.0)
    for n in range(3):
        drafter.reset(Sampler(SamplingParams(), [n, 1, 2], frozenset()))
        drafter.finish([50, 51, 52, 53, 60 + n])
    drafter.reset(Sampler(SamplingParams(), [9, 8, 7], frozenset()))
    assert drafter.propose([9, 8, 7], 3).token_ids == [50]  # START matched: 1 token earns 1 draft
    assert drafter.propose([9, 8, 7, 50, 51], 2).token_ids == [52, 53]
    assert START not in drafter.speculate([9, 8, 7, 50, 51, 52, 53]).token_ids


@pytest.mark.parametrize("bad", [dict(depth=1), dict(factor=0), dict(floor=1.5), dict(depth="8")])
def test_bad_settings_are_refused(bad):
    with pytest.raises(InvalidInputError, match=next(iter(bad))):
        SuffixDrafter(**bad)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_a_bad_budget_is_refused(bad):
    with pytest.raises(InvalidInputError, match="budget"):
        History(budget=bad)


def test_a_bad_suffix_global_is_refused():
    with pytest.raises(InvalidInputError, match="suffix_global"):
        SamplingParams(suffix_global="no")


# --- end to end -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def long_llm(tmp_path_factory):
    from conftest import save_tiny_tokenizer, tiny_hf_model
    from verispec.llm import LLM

    folder = tmp_path_factory.mktemp("tiny-suffix")
    tiny_hf_model("llama", max_position_embeddings=2048, seed=3).save_pretrained(folder)
    save_tiny_tokenizer(folder)
    return LLM(str(folder), drafter="suffix")


PROMPTS = ["the stop the end the stop", "a b c a b c", "the end the end", "stop the stop", "x y x y x"]


def run(llm, engine, prompt, params):
    from verispec.engine.request import Request

    request = Request(llm.encode(prompt), params, llm.eos_ids, engine.capacity)
    stats = engine.run(request)
    return request.output_ids, stats


@pytest.mark.parametrize("tau", [1, 3, 8])
def test_greedy_with_the_suffix_drafter_equals_plain_request_after_request(long_llm, tau):
    """C1: every request of a run equals plain decoding, while the global tree learns from the
    earlier ones (the engine calls finish when a request ends)."""
    from verispec.engine.generate import Engine

    drafter = long_llm.make_drafter("suffix")
    engine = Engine(long_llm.target, drafter, tau)
    params = SamplingParams(max_tokens=300, ignore_eos=True)
    accepted = drafted = 0
    for n, prompt in enumerate(PROMPTS):
        spec, stats = run(long_llm, engine, prompt, params)
        plain = long_llm.generate(prompt, params, speculative=False).token_ids
        assert spec == plain, f"request {n} diverged at tau {tau}"
        accepted, drafted = accepted + stats.accepted, drafted + stats.drafted
        assert drafter.history.tokens == 301 * (n + 1)  # START + each output
    assert 0 < accepted < drafted, "the test must see accepted and rejected drafts"


def test_the_scheduler_feeds_finished_requests_not_cancelled_ones_and_stays_exact(long_llm):
    import threading

    from verispec.engine.request import Request

    scheduler = long_llm.scheduler(max_batch=3)
    drafter = long_llm.engine.drafter
    try:
        params = SamplingParams(max_tokens=80, ignore_eos=True)
        requests = [Request(long_llm.encode(p), params, long_llm.eos_ids, long_llm.engine.capacity) for p in PROMPTS]
        done = [threading.Event() for _ in requests]
        for request, event in zip(requests, done):
            scheduler.submit(request, lambda c, e=event: e.set() if isinstance(c, BaseException)
                             or c.sequence.request.finished else None)
        assert all(e.wait(60) for e in done)
        for request, prompt in zip(requests, PROMPTS):
            assert request.output_ids == long_llm.generate(prompt, params, speculative=False).token_ids
        assert drafter.history.tokens == 81 * len(PROMPTS), "the slots' forks share one global tree"
        heard = threading.Event()
        long = Request(long_llm.encode("the"), SamplingParams(max_tokens=1500, ignore_eos=True), long_llm.eos_ids,
                       long_llm.engine.capacity)
        ticket = scheduler.submit(long, lambda c: heard.set())
        assert heard.wait(30)
        scheduler.cancel(ticket)
    finally:
        scheduler.stop(30)
    assert not long.finished and drafter.history.tokens == 81 * len(PROMPTS), "a cancelled request is not learned"


def test_cli_generate_with_the_suffix_drafter_and_the_global_tree_off(long_llm, capsys):
    import json

    from verispec.cli.main import main

    folder = str(long_llm.source.folder)
    assert main(["generate", "--model", folder, "--prompt", "the end the end", "--max-tokens", "40", "--ignore-eos",
                 "--drafter", "suffix", "--suffix-global", "off", "--num-draft-tokens", "3", "--compare",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["token_ids"] == out["plain"]["token_ids"] and out["stats"]["drafted"] > 0
    with pytest.raises(SystemExit, match="2"):
        main(["generate", "--model", folder, "--prompt", "x", "--suffix-global", "maybe"])
    assert "'maybe' is not allowed: use on or off" in capsys.readouterr().err


def test_llm_suffix_global_off_makes_drafters_without_history(long_llm):
    from verispec.llm import LLM

    assert long_llm.make_drafter("suffix").history is not None
    with pytest.raises(InvalidInputError, match="suffix_global"):
        LLM(str(long_llm.source.folder), suffix_global="off")
    with pytest.raises(InvalidInputError, match="budget=0"):
        LLM(str(long_llm.source.folder), suffix_budget=0)
    small = LLM(str(long_llm.source.folder), drafter="suffix", suffix_budget=50)
    assert small.make_drafter("suffix").history.budget == 50
    assert LLM(str(long_llm.source.folder), suffix_global=False).make_drafter("suffix").history is None


def test_bench_gives_each_config_and_round_its_own_global_tree(long_llm, monkeypatch):
    """No config may draft from the answer another config (or round, or the warm-up) gave to the
    same prompt: each sees the outputs of the prompts before this one only."""
    from verispec.benchmark.prompts import BenchPrompt
    from verispec.benchmark.runner import run_bench
    from verispec.drafters import SuffixDrafter

    made = []
    original = SuffixDrafter.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(SuffixDrafter, "__init__", spy)
    prompts = [BenchPrompt("a", str(n), p) for n, p in enumerate(PROMPTS[:3])]
    result = run_bench(long_llm, prompts, ["suffix"], [2, 4], 12, progress=False, rounds=2)
    assert not result["divergences"]
    learned = sorted(d.history.tokens for d in made if d.history is not None and d.history.tokens)
    # two configs x two rounds learned all three prompts; the warm-up's two learned one 8-token answer
    assert learned == [1 + 8] * 2 + [3 * (1 + 12)] * 4, learned


REAL = pytest.mark.skipif(not __import__("verispec.hub", fromlist=["hub"]).is_fetched("smollm2-135m-instruct"),
                          reason="SmolLM2 not fetched")


@pytest.mark.real
@REAL
def test_real_smollm2_greedy_with_the_suffix_drafter_equals_plain():
    from verispec.engine.generate import Engine
    from verispec.llm import LLM

    llm = LLM("smollm2-135m-instruct", drafter="suffix", num_draft_tokens=4)
    engine = Engine(llm.target, llm.make_drafter("suffix"), 4)
    params = SamplingParams(max_tokens=120, min_tokens=120)
    accepted = 0
    for passage in ("Ada Novak founded Kalo Labs in Lisbon in 1990.", "Bruno Costa founded Mira Works in Perth in 2004."):
        prompt = f"Return JSON with keys name, company, city, year for: {passage}"
        from verispec.engine.request import Request

        request = Request(llm.encode(prompt, chat=True), params, llm.eos_ids, engine.capacity)
        stats = engine.run(request)
        plain = llm.generate(prompt, params, chat=True, speculative=False).token_ids
        assert request.output_ids == plain
        accepted += stats.accepted
    assert accepted > 0


def test_the_repetitive_workload_is_bundled_in_order_and_its_script_writes_it_again(tmp_path, monkeypatch):
    import importlib.util
    from pathlib import Path

    from verispec.benchmark.prompts import load_prompts

    prompts = load_prompts("repetitive")
    assert [p.category for p in prompts] == ["extraction-json"] * 40 + ["agent-edit"] * 20
    assert [p.question_id for p in prompts[:2]] == ["extraction-00", "extraction-01"]
    assert len({p.text for p in prompts}) == 60, "different passages, the same question"
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "repetitive.py"
    spec = importlib.util.spec_from_file_location("repetitive", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "OUT", tmp_path / "again.jsonl")
    module.main()
    bundled = Path(__file__).resolve().parent.parent / "verispec" / "data" / "repetitive.jsonl"
    assert (tmp_path / "again.jsonl").read_text() == bundled.read_text(), "run benchmarks/repetitive.py and commit"


def test_cli_bench_runs_every_prompt_of_a_bundled_workload_with_the_suffix_drafter(long_llm, capsys):
    import json

    from verispec.cli.main import main

    assert main(["bench", "--model", str(long_llm.source.folder), "--prompts", "repetitive", "--categories",
                 "agent-edit", "--drafter", "suffix", "--num-draft-tokens", "2", "--max-tokens", "3",
                 "--suffix-global", "off"]) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["categories"]["overall"]
    assert rows["suffix/2"]["prompts"] == 20 and rows["suffix/2"]["identical"] == 20


def test_a_one_token_match_earns_no_draft_but_at_a_response_start():
    """One token's continuation is weak evidence (MIN_MATCH = 2); the start of a response, matched
    in the global tree, is not a one-token match but the whole query."""
    assert SuffixDrafter().propose([1, 2, 3, 4, 1], 4).token_ids == []  # "1" -> "2" once: no draft
    assert SuffixDrafter().propose([1, 2, 3, 4, 1, 2], 4).token_ids[:2] == [3, 4]
    history = History()
    drafter = SuffixDrafter(history)
    drafter.reset(Sampler(SamplingParams(), [9], frozenset()))
    drafter.finish([50, 51, 52])
    drafter.reset(Sampler(SamplingParams(), [7], frozenset()))
    assert drafter.propose([7], 2).token_ids == [50, 51]
