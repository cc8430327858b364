"""EAGLE-3 heads: trained for seconds on a tiny random target, written in the layout SGLang and vLLM
load, loaded back, and drafting losslessly from the target's hidden states."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from conftest import save_tiny_llm
from verispec.cli.main import main
from verispec.config import SamplingParams, TrainConfig
from verispec.drafters.eagle import EagleDrafter
from verispec.eagle import data
from verispec.eagle.head import load, tokenizer_hash
from verispec.eagle.train import Trainer, unroll
from verispec.engine.generate import Engine, Sequence, step
from verispec.engine.request import Request
from verispec.errors import InvalidInputError, ModelLoadError
from verispec import tree
from verispec.llm import LLM

PROMPTS = ["the end", "stop the", "then the end", "a b c", "hello there", "it is the", "sto sto", "one two"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(target LLM, the folder of a head trained on its greedy answers for a few seconds, the trainer)."""
    root = tmp_path_factory.mktemp("eagle")
    llm = LLM(str(save_tiny_llm(root / "target", max_position_embeddings=1024, seed=3)))
    examples = data.answer(llm, [llm.encode(p) for p in PROMPTS], max_tokens=48)
    trainer = Trainer(llm, examples, TrainConfig(draft_vocab=64, minutes=0.08, batch_tokens=256, lr=3e-3,
                                                 evaluate_every_s=1.0), root / "head")
    trainer.run(progress=False)
    trainer.write("tiny", "test prompts")
    return llm, root / "head", trainer


def test_the_written_layout_is_eagle3s(trained):
    from safetensors.torch import load_file

    _, folder, trainer = trained
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["draft_vocab_size"] == 64
    assert config["eagle_aux_hidden_state_layer_ids"] == list(trainer.head.config.layers)
    tensors = load_file(str(folder / "model.safetensors"))
    assert tensors["fc.weight"].shape == (64, 3 * 64) and tensors["lm_head.weight"].shape == (64, 64)
    assert "embed_tokens.weight" not in tensors  # the target's embedding is shared, not stored
    draft_ids = torch.arange(64) + tensors["d2t"]
    assert torch.equal(tensors["t2d"].nonzero().flatten(), draft_ids)  # the two maps agree
    summary = json.loads((folder / "verispec.json").read_text())
    assert summary["tokenizer"] == tokenizer_hash(trained[0].tokenizer) and summary["curve"]


def test_loading_what_was_written_gives_identical_proposals(trained):
    llm, folder, trainer = trained
    loaded = load(folder, llm.target.config, llm.target.output_weights()[0])
    prompt = llm.encode("then the end")
    proposals = []
    for head in (trainer.head, loaded):
        drafter = EagleDrafter(head, 1024)
        engine = Engine(llm.target, drafter, 5)
        request = Request(prompt, SamplingParams(max_tokens=20, temperature=1.0, seed=5), llm.eos_ids, engine.capacity)
        seen = []
        drafter.propose = lambda context, k, d=drafter, seen=seen: seen.append(
            EagleDrafter.propose(d, context, k)) or seen[-1]
        engine.run(request)
        proposals.append([(p.token_ids, p.probs) for p in seen])
    assert len(proposals[0]) == len(proposals[1]) > 0
    for (ids_a, probs_a), (ids_b, probs_b) in zip(*proposals):
        assert ids_a == ids_b and torch.equal(probs_a, probs_b)


def test_the_unrolled_training_forward_computes_what_drafting_computes(trained):
    """Step j of training-time test at base t equals drafting j tokens past the context that ends at
    t + 1 with the true tokens fed: the same logits, so held-out acceptance measures drafting."""
    _, _, trainer = trained
    head, sample = trainer.head, trainer.samples[0]
    steps = unroll(head, sample, trainer.target_logp(sample), 4)
    ids, t = sample.ids, 6
    cache = head.new_cache(256)
    with torch.no_grad():
        h = head.step([(ids[1: t + 2], head.fuse(sample.f[: t + 1].float()), cache)])[0][-1:]
        for j, (logq, _, _) in enumerate(steps):
            assert torch.allclose(torch.log_softmax(head.logits(h), -1)[0], logq[t], atol=1e-5), j
            h = head.step([(ids[t + 2 + j: t + 3 + j], h, cache)])[0]


@pytest.mark.parametrize("tau", [1, 4, 7])
def test_greedy_with_eagle_equals_plain_decoding(trained, tau):
    llm, folder, _ = trained
    eagle = LLM(str(llm.source.folder), drafter=f"eagle:{folder}", num_draft_tokens=tau)
    accepted = drafted = 0
    for prompt in PROMPTS[:4]:
        params = SamplingParams(max_tokens=40)
        out = eagle.generate(prompt, params)
        assert out.token_ids == llm.generate(prompt, params).token_ids, prompt
        accepted += out.stats.accepted
        drafted += out.stats.drafted
    assert 0 < accepted < drafted  # some drafts kept, some rejected: both paths of the verifier ran


def test_batched_eagle_drafting_equals_one_at_a_time(trained):
    """Several sequences in one step (the server's batches: one head pass for all) keep each one's
    output; their prompts prefill in the same forward."""
    llm, folder, _ = trained
    first = LLM.make_drafter(llm, f"eagle:{folder}")
    sequences = []
    for j, prompt in enumerate(PROMPTS[:4]):
        request = Request(llm.encode(prompt), SamplingParams(max_tokens=30), llm.eos_ids, 1024)
        sequences.append(Sequence(request, llm.target.new_cache(1024), first if j == 0 else first.fork(), 3))
    while running := [s for s in sequences if not s.request.finished]:
        step(llm.target, running)
        for seq in running:  # every committed token but the pending one has its features, in its own drafter
            assert seq.request.finished or seq.drafter._seen + seq.drafter.backlog([]) == seq.request.length - 1
    head = first.head
    for prompt, seq in zip(PROMPTS[:4], sequences):
        assert seq.request.output_ids == llm.generate(prompt, SamplingParams(max_tokens=30)).token_ids
        # the head cache holds this sequence's own pairs: keys from its features computed alone
        ids, seen = seq.request.prompt_ids + seq.request.output_ids, seq.drafter._seen
        features, _ = data.target_features(llm, ids, head.config.layers)
        with torch.no_grad():
            _, keys, _ = head.qkv(torch.tensor(ids[1: seen + 1]), head.fuse(features[:seen]), torch.arange(seen))
        assert torch.allclose(seq.drafter.cache.k[0][:, :seen].transpose(0, 1), keys, atol=1e-4)
    assert sum(seq.request.stats.accepted for seq in sequences) > 0


def first_token_counts(llm, folder, trials, wrong_q=False, kind="eagle"):
    prompt = llm.encode("the end")
    params = SamplingParams(max_tokens=2, temperature=1.0, top_k=8, ignore_eos=True)
    drafter = LLM.make_drafter(llm, f"{kind}:{folder}")
    if wrong_q:  # negative control: drafts drawn from the top-8 q, verified as if drawn from the head's
        real = EagleDrafter.propose_many  # q before the request's top-k (spread over the draft vocabulary)
        spread = drafter.head.t2d.float() / drafter.head.t2d.sum()

        def planted(jobs):
            proposals = real(jobs)
            for p in proposals:
                if p.probs is not None:
                    p.probs.copy_(spread.expand_as(p.probs))
            return proposals

        drafter.propose_many = planted
        drafter.propose = lambda context, k: planted([(drafter, context, k)])[0]
    engine = Engine(llm.target, drafter, 2 if kind == "eagle" else 6)
    logits = llm.target.forward(torch.tensor(prompt), torch.arange(len(prompt)), llm.target.new_cache())[-1:]
    p = Request(prompt, params, frozenset(), 1024).sampler.probs(logits, [])[0].numpy().astype(np.float64)
    counts = np.zeros(len(p), dtype=np.int64)
    for trial in range(trials):
        request = Request(prompt, SamplingParams(**{**params.__dict__, "seed": trial}), frozenset(), engine.capacity)
        engine.run(request)
        counts[request.output_ids[0]] += 1
    support = p > 0
    assert counts[~support].sum() == 0
    return chisquare(counts[support], p[support] / p[support].sum() * counts.sum()).pvalue


@pytest.mark.parametrize("kind", ["eagle", "eagle-tree"])
def test_sampled_first_token_through_eagle_follows_the_target(trained, kind):
    """RELIABILITY.md B: the first emitted token's law is the target's processed p (top-k 8), for a
    chain drawn from q and for a tree of deterministic top-k children."""
    llm, folder, _ = trained
    assert first_token_counts(llm, folder, 1500, kind=kind) > 1e-3


def test_verifying_against_the_wrong_q_fails_the_law(trained):
    llm, folder, _ = trained
    assert first_token_counts(llm, folder, 1500, wrong_q=True) < 1e-6


def test_a_head_for_another_model_is_refused_naming_the_difference(trained, tmp_path):
    import shutil

    llm, folder, _ = trained
    embed = llm.target.output_weights()[0]
    for field, value, message in (("hidden_size", 128, "hidden=128, the target 64"),
                                  ("vocab_size", 50, "vocab=50, the target 96")):
        other = tmp_path / field
        shutil.copytree(folder, other)
        config = json.loads((other / "config.json").read_text())
        config[field] = value
        (other / "config.json").write_text(json.dumps(config))
        with pytest.raises(ModelLoadError, match=message):
            load(other, llm.target.config, embed)
    other = tmp_path / "tokenizer"
    shutil.copytree(folder, other)
    summary = json.loads((other / "verispec.json").read_text())
    (other / "verispec.json").write_text(json.dumps({**summary, "tokenizer": "0123456789abcdef"}))
    with pytest.raises(ModelLoadError, match="trained with tokenizer 0123456789abcdef"):
        LLM(str(llm.source.folder), drafter=f"eagle:{other}")


def test_training_refuses_spec_bench_and_bad_settings(trained):
    llm, _, _ = trained
    with pytest.raises(InvalidInputError, match="evaluation data"):
        data.file_prompts(llm, "spec-bench")
    with pytest.raises(InvalidInputError, match="draft_vocab=1"):
        TrainConfig(draft_vocab=1)
    with pytest.raises(InvalidInputError, match="drafter='eagle:'"):
        LLM(str(llm.source.folder), drafter="eagle:")


def test_the_target_writes_distinct_prompts_of_its_own(trained):
    llm, _, _ = trained
    prompts = data.own_prompts(llm, 6, seed=1, max_tokens=16)
    assert 3 <= len(prompts) <= 6 and len({tuple(p) for p in prompts}) == len(prompts)  # seeds differ
    prefix = data.user_prefix(llm)
    assert all(p[: len(prefix)] == prefix for p in prompts)  # each is a user turn under the template


def test_cli_trains_and_resumes(tmp_path, trained, capsys):
    llm, _, _ = trained
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:4]))
    args = ["train-drafter", "--model", str(llm.source.folder), "--out", str(tmp_path / "head"), "--prompts",
            str(prompts), "--max-tokens", "16", "--draft-vocab", "32", "--minutes", "0.01", "--batch-tokens", "64"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (tmp_path / "head" / "checkpoint.pt").is_file() and first["steps"] >= 1
    assert main(args[:-4] + ["--minutes", "0.02", "--batch-tokens", "64"]) == 0
    out = capsys.readouterr().out
    assert "resuming at step" in out and json.loads(out.strip().splitlines()[-1])["steps"] > first["steps"]
    assert main(["generate", "--model", str(llm.source.folder), "--drafter", f"eagle:{tmp_path / 'head'}",
                 "--prompt", "the end", "--max-tokens", "8"]) == 0


def test_calibration_prices_eagle_drafting_from_the_targets_features(trained):
    """calibrate hands the head the target's features of its context: a proposal drafts, proposing
    again after the same context drafts the same tokens (no pair to take in), and both costs are
    measured."""
    llm, folder, _ = trained
    eagle = LLM(str(llm.source.folder), drafter=f"eagle:{folder}", num_draft_tokens=4)
    per_draft, per_fed = eagle.drafter_costs(eagle.engine.drafter, repeats=2)
    assert per_draft > 0 and per_fed >= 0
    drafter, context = eagle.engine.drafter, eagle.encode("the end of it")
    drafter.reset(Request(context, SamplingParams(), eagle.eos_ids, 64).sampler)
    assert drafter.propose(context, 4).token_ids == []  # no features yet: no drafts
    features = eagle.target.features(context[:-1], drafter.feature_layers)
    drafter.features(features)
    first = drafter.propose(context, 4)
    again = drafter.propose(context, 4)
    assert len(first.token_ids) == 4 and again.token_ids == first.token_ids
    assert first.fed == len(context) - 1 and again.fed == 0


def test_replay_of_eagle_runs_the_cycles_the_engine_ran(trained):
    """advise replays a head over the target's greedy output with the target's features of it (one
    prefill): its cycles are those of a real run, draft for draft."""
    from verispec.benchmark.replay import replay
    from verispec.engine.cost import CostModel, VerifyCurve

    llm, folder, _ = trained
    eagle = LLM(str(llm.source.folder), drafter=f"eagle:{folder}", num_draft_tokens=3)
    drafter = eagle.engine.drafter
    for prompt in PROMPTS[:3]:
        out = eagle.generate(prompt, SamplingParams(max_tokens=30))
        ids = out.prompt_token_ids
        sampler = Request(ids, SamplingParams(), llm.eos_ids, 1024).sampler
        features = llm.target.features(ids + out.token_ids, drafter.feature_layers)
        replayed = replay(drafter, sampler, ids, out.token_ids, 3, CostModel(VerifyCurve((1.0, 1.1, 1.2, 1.3)), 0.1),
                          features=features)
        assert (replayed.drafted, replayed.accepted) == (out.stats.drafted, out.stats.accepted), prompt
        assert replayed.accepted > 0 or prompt != PROMPTS[0]


def test_drafting_on_the_native_kernels_computes_the_heads_forward(trained):
    """Head.use_native fuses q k v and gate up into Q8_0 matrices: the same forward, to Q8_0's rounding."""
    from verispec.model import native

    if native.unavailable():
        pytest.skip(native.unavailable())
    llm, folder, trainer = trained
    embed = llm.target.output_weights()[0]
    plain, fast = load(folder, llm.target.config, embed), load(folder, llm.target.config, embed)
    fast.use_native()
    sample = trainer.samples[1]
    n = len(sample.ids) - 1
    outs = []
    for head in (plain, fast):
        with torch.no_grad():
            h = head.step([(sample.ids[1:], head.fuse(sample.f[:n].float()), head.new_cache(512))])[0]
            outs.append(torch.log_softmax(head.logits(h), -1))
    assert fast._native and not plain._native
    assert (outs[0] - outs[1]).abs().max() < 0.05
    # where the plain forward's top two are further apart than the paths differ, both pick the same token
    # (a head trained for seconds has near ties, which the AVX2 kernels' rounding may flip)
    top2 = outs[1].topk(2, -1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * (outs[0] - outs[1]).abs().max()
    assert clear.sum() >= 5 and (outs[0].argmax(-1) == outs[1].argmax(-1))[clear].all()


def test_the_built_in_head_is_for_the_default_model_only(trained):
    """drafter='eagle' names the head shipped for SmolLM2: another target is refused naming why
    (no head shipped, or the head's sizes against the target's)."""
    llm, _, _ = trained
    with pytest.raises((InvalidInputError, ModelLoadError), match="train-drafter|hidden=576, the target 64"):
        LLM(str(llm.source.folder), drafter="eagle")


def test_a_head_trained_elsewhere_loads(trained, tmp_path):
    """What other trainers write: bf16 weights, the target's embedding stored beside them, and over
    the whole vocabulary no d2t/t2d; no verispec.json."""
    from safetensors.torch import load_file, save_file

    llm, folder, trainer = trained
    c = trainer.head.config
    config = json.loads((folder / "config.json").read_text())
    config["draft_vocab_size"] = c.vocab
    tensors = {k: v.bfloat16() if v.is_floating_point() else v
               for k, v in load_file(str(folder / "model.safetensors")).items() if k not in ("d2t", "t2d")}
    tensors["lm_head.weight"] = torch.randn(c.vocab, c.hidden).bfloat16()
    tensors["embed_tokens.weight"] = torch.randn(c.vocab, c.hidden).bfloat16()
    other = tmp_path / "elsewhere"
    other.mkdir()
    save_file(tensors, str(other / "model.safetensors"))
    (other / "config.json").write_text(json.dumps(config))
    head = load(other, llm.target.config, llm.target.output_weights()[0])
    assert torch.equal(head.draft_ids, torch.arange(c.vocab)) and head.t2d.all()
    assert torch.equal(head.fc.weight, tensors["fc.weight"].float())
    eagle = LLM(str(llm.source.folder), drafter=f"eagle:{other}", num_draft_tokens=3)
    params = SamplingParams(max_tokens=20)
    assert eagle.generate("the end", params).token_ids == llm.generate("the end", params).token_ids


def test_the_server_speculates_with_eagle_and_keeps_greedy_outputs(trained):
    """Concurrent requests through the OpenAI endpoint, batched by the scheduler with one head."""
    from concurrent.futures import ThreadPoolExecutor

    from fastapi.testclient import TestClient

    from verispec.config import ServeConfig
    from verispec.server.app import create_app

    llm, folder, _ = trained
    eagle = LLM(str(llm.source.folder), drafter=f"eagle:{folder}", num_draft_tokens=3)
    scheduler = eagle.scheduler(4, 8)
    client = TestClient(create_app(eagle, scheduler, ServeConfig(), "tiny"))
    try:
        def ask(prompt):
            return client.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 24,
                                                         "temperature": 0}).json()

        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(ask, PROMPTS[:4]))
    finally:
        scheduler.stop(10)
    for prompt, answer in zip(PROMPTS[:4], answers):
        assert answer["choices"][0]["text"] == llm.generate(prompt, SamplingParams(max_tokens=24)).text
    assert sum(a["usage"]["speculation"]["accepted"] for a in answers) > 0


@pytest.mark.parametrize("tau", [4, 9])
def test_greedy_with_eagle_trees_equals_plain_decoding(trained, tau):
    llm, folder, _ = trained
    eagle = LLM(str(llm.source.folder), drafter=f"eagle-tree:{folder}", num_draft_tokens=tau)
    accepted = 0
    for prompt in PROMPTS[:4]:
        params = SamplingParams(max_tokens=40)
        out = eagle.generate(prompt, params)
        assert out.token_ids == llm.generate(prompt, params).token_ids, prompt
        accepted += out.stats.accepted
    assert accepted > 0


def test_an_eagle_tree_grows_each_nodes_likeliest_children_as_its_chain_would(trained):
    """EAGLE-2: a node's m children are the m likeliest tokens of the head's q after the node's path
    computed as a chain (so a node in the tree sees its ancestors and nothing else, at its depth)."""
    from verispec.drafters.eagle import WIDTH

    llm, folder, _ = trained
    tree_drafter = LLM.make_drafter(llm, f"eagle-tree:{folder}")
    chain_drafter = tree_drafter.fork()
    chain_drafter.tree = False
    context = llm.encode("then the end of it")
    features = llm.target.features(context[:-1], tree_drafter.feature_layers)
    for d in (tree_drafter, chain_drafter):
        d.reset(Request(context, SamplingParams(), llm.eos_ids, 64).sampler)
        d.features(features)
    proposal = tree_drafter.propose(context, 12)
    assert len(proposal.token_ids) == 12 and proposal.probs is None and proposal.parents is not None
    assert max(tree.depths(proposal.parents)) >= 3
    head = chain_drafter.head
    tokens, g = chain_drafter._catch_up(context)
    root = head.step([(tokens, g, chain_drafter.cache)])[0][-1:]
    base = chain_drafter.cache.length
    below = tree.children(proposal.parents)
    for node in range(13):
        if not below[node]:
            continue
        chain_drafter.cache.truncate(base)
        h = root
        for step_node in tree.path(proposal.parents, node):  # the drafts from the root down to node
            h = head.step([(torch.tensor([proposal.token_ids[step_node - 1]]), h, chain_drafter.cache)])[0]
        best = set(head.draft_ids[head.logits(h)[0].topk(len(below[node])).indices].tolist())
        assert len(below[node]) <= WIDTH and {proposal.token_ids[child - 1] for child in below[node]} == best, node


def test_greedy_drafts_under_min_tokens_skip_the_stop_ids_without_a_vocabulary_row(trained):
    """bench forces lengths with min_tokens: the argmax path still drafts (no [V] row, probs None),
    hiding the stop ids while min_tokens holds, as the sampler's mask would."""
    llm, folder, _ = trained
    drafter = LLM.make_drafter(llm, f"eagle:{folder}")
    context = llm.encode("the end")
    features = llm.target.features(context[:-1], drafter.feature_layers)

    def propose(stops, min_tokens):
        drafter.reset(Request(context, SamplingParams(max_tokens=100, min_tokens=min_tokens), stops, 64).sampler)
        drafter.features(features)
        return drafter.propose(context, 8)

    first = propose(frozenset(), 0).token_ids[0]  # make the head's first choice a stop id
    assert propose(frozenset({first}), 0).token_ids == [first]  # a drafted stop id ends the draft
    held = propose(frozenset({first}), 100)
    assert held.probs is None and len(held.token_ids) == 8 and first not in held.token_ids
