"""lm-evaluation-harness against a live server: its `local-completions` model runs a small
multiple-choice task (loglikelihoods: echo, logprobs, prompts as token ids, in batches) and a
generation task built from local JSON, and every score and answer is identical with speculation
on and off."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import save_tiny_llm
from test_server import KEY, MODEL, Server

lm_eval = pytest.importorskip("lm_eval")

QUESTIONS = [("the end of the", ["end", "stop", "the", "x"]), ("stop the stop the", ["stop", "end", "a", "b"]),
             ("a b c a b", ["c", "a", "the", "end"]), ("the quick brown", ["fox", "end", "stop", "dog"]),
             ("x y z x y", ["z", "x", "a", "the"]), ("one two one two", ["one", "two", "three", "the"])] * 3
TASKS = """
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: {kind}
doc_to_text: "{{{{question}}}}"
{rest}
"""
MULTIPLE_CHOICE = """doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list:
  - metric: acc
"""
GENERATION = """doc_to_target: "{{target}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 24
  do_sample: false
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tasks")
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": [" " + c for c in cs], "answer": i % 4,
                                        "target": cs[0]}) + "\n" for i, (q, cs) in enumerate(QUESTIONS)))
    (folder / "mc.yaml").write_text(TASKS.format(name="verispec_mc", data=data, kind="multiple_choice",
                                                 rest=MULTIPLE_CHOICE))
    (folder / "gen.yaml").write_text(TASKS.format(name="verispec_gen", data=data, kind="generate_until",
                                                  rest=GENERATION))
    return folder


def evaluate(server: Server, folder: Path, tasks: Path) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OPENAI_API_KEY=KEY)
    args = (f"model={MODEL},base_url={server.url}/v1/completions,tokenizer_backend=huggingface,"
            f"tokenizer={folder},num_concurrent=1,max_retries=1,batch_size=8")
    result = simple_evaluate(model="local-completions", model_args=args, tasks=["verispec_mc", "verispec_gen"],
                             task_manager=TaskManager(include_path=str(tasks)), log_samples=True)
    return {name: [(s["doc_id"], s["resps"]) for s in samples] for name, samples in result["samples"].items()} | {
        "results": result["results"]}


def test_lm_eval_scores_are_identical_with_speculation_on_and_off(tmp_path, tasks):
    folder = save_tiny_llm(tmp_path / "model", max_position_embeddings=512)
    outcomes = []
    for flags in (("--drafter", "ngram", "--num-draft-tokens", "4"), ("--drafter", "none")):
        server = Server(folder, *flags, "--api-key", KEY)
        try:
            outcomes.append(evaluate(server, folder, tasks))
            drafted = server.metrics().get("verispec_spec_decode_num_draft_tokens_total", 0)
        finally:
            server.stop()
        assert (drafted > 0) == (flags[1] != "none"), "the generation task was verified speculatively"
    spec, plain = outcomes
    assert spec == plain
    assert len(spec["verispec_mc"]) == len(QUESTIONS) and len(spec["verispec_gen"]) == len(QUESTIONS)
    assert "acc,none" in spec["results"]["verispec_mc"] and "exact_match,none" in spec["results"]["verispec_gen"]
    assert any(r[1][0][0] for r in spec["verispec_gen"]), "the generation task generated text"
