# The two set-up commands of the README: `make demo` and `make test`. Everything installs into .venv
# with constraints.txt, which pins the CPU build of torch; the install compiles the native kernels
# (setup.py), again whenever their sources change.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
VERISPEC := $(VENV)/bin/verispec
MODEL ?= smollm2-135m-instruct
# The demo summarizes a news article bundled with the Spec-Bench prompts (verispec/data/NOTICE.md): a
# grounded answer of 140 tokens, where n-gram drafting has the article's own phrases to copy.
ARTICLE ?= 284
DEMO_PROMPT = $(PY) -c 'import json; r = next(r for r in map(json.loads, open("verispec/data/spec_bench.jsonl")) \
	if r["question_id"] == $(ARTICLE)); print("Summarize this article in about 150 words, reusing its own wording.\n\n" \
	+ r["turns"][0].removeprefix("Summarize: "))'
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test bench clean

NATIVE_SOURCES := setup.py $(wildcard verispec/model/native/csrc/*) $(wildcard verispec/sampling/csrc/*)

$(VENV)/.base: pyproject.toml constraints.txt $(NATIVE_SOURCES)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e .
	touch $@

$(VENV)/.dev: $(VENV)/.base
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

demo: $(VENV)/.base
	$(VERISPEC) models fetch $(MODEL)
	$(VERISPEC) generate --model $(MODEL) --chat --max-tokens 140 --drafter ngram --compare --prompt "$$($(DEMO_PROMPT))"

test: $(VENV)/.dev
	$(VERISPEC) models fetch smollm2-135m-instruct
	$(PY) -m pytest -q -ra

bench: $(VENV)/.dev
	$(VERISPEC) models fetch $(MODEL)
	$(VERISPEC) bench --model $(MODEL) --drafter ngram --per-category 1 --num-draft-tokens 1,2,4,8,auto

clean:
	rm -rf $(VENV) build *.egg-info
