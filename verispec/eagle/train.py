"""Train an EAGLE-3 head on this machine, on the target's own answers.

Training-time test (EAGLE-3): a sequence's pairs run through the head `unroll` times; step j feeds
every pair the head's own features of step j - 1 and the token j places further on, at positions
shifted by j, attending to the step-0 keys up to its base position and to its own keys of steps
1..j (what drafting j tokens past a committed context sees). Each step's loss is the cross-entropy
of the head's q against the target's distribution restricted to the draft vocabulary, weighted by
decay ** j, on the positions that predict answer tokens.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from verispec.config import TrainConfig
from verispec.eagle.data import Example, target_features
from verispec.eagle.head import Head, HeadConfig, save, summary_of, tokenizer_hash
from verispec.llm import LLM
from verispec.model import kernels

CHECKPOINT = "checkpoint.pt"
DATA = "data.json"


@dataclass
class Sample:
    """An example with its target features: ids [n], f [n, layers, H] and last [n, H] in fp16."""

    ids: torch.Tensor
    prompt_len: int
    f: torch.Tensor
    last: torch.Tensor


def draft_vocabulary(examples: list[Example], size: int, vocab: int) -> torch.Tensor:
    """The `size` tokens most frequent in the answers (then in the prompts, then by id), ascending."""
    answers = Counter(t for e in examples for t in e.ids[e.prompt_len:])
    prompts = Counter(t for e in examples for t in e.ids[: e.prompt_len])
    chosen = [t for t, _ in answers.most_common(size)]
    chosen += [t for t, _ in prompts.most_common() if t not in answers][: size - len(chosen)]
    taken = set(chosen)
    chosen += [t for t in range(vocab) if t not in taken][: size - len(chosen)]
    return torch.tensor(sorted(chosen))


def attend(q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
    """Training-time-test attention. q [m, heads, d] of step j = len(keys) - 1; keys, values [>= m,
    kv_heads, d] per step: query t sees step 0's keys 0..t and step i's key t for i = 1..j.
    Returns [m, heads * d]."""
    m, heads, d = q.shape
    group = heads // keys[0].shape[1]
    qh = q.transpose(0, 1)  # [heads, m, d]
    k0 = keys[0][:m].repeat_interleave(group, 1).transpose(0, 1)  # [heads, m, d]
    v0 = values[0][:m].repeat_interleave(group, 1).transpose(0, 1)
    scores = (qh @ k0.transpose(1, 2)) * d ** -0.5  # [heads, m, m]
    scores = scores.masked_fill(torch.ones(m, m, dtype=torch.bool).triu(1), float("-inf"))
    own = [(q * k[:m].repeat_interleave(group, 1)).sum(-1).t() * d ** -0.5 for k in keys[1:]]  # [heads, m] each
    weights = torch.softmax(torch.cat([scores] + [s.unsqueeze(-1) for s in own], dim=-1), dim=-1)
    out = weights[..., :m] @ v0  # [heads, m, d]
    for i, v in enumerate(values[1:]):
        out = out + weights[..., m + i].unsqueeze(-1) * v[:m].repeat_interleave(group, 1).transpose(0, 1)
    return out.transpose(0, 1).reshape(m, heads * d)


def unroll(head: Head, sample: Sample, target_logp: torch.Tensor, steps: int
           ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The head over one sample's pairs, `steps` times. target_logp [n, draft_vocab]: the target's
    log-distribution at each position. Returns per step (the head's log q [m, draft_vocab], the
    target's [m, draft_vocab], the answer mask [m]) for its m = n - 1 - j pairs."""
    ids, n = sample.ids, len(sample.ids)
    g = head.fuse(sample.f[: n - 1].float())
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    out = []
    for j in range(steps):
        m = n - 1 - j
        if m <= 0:
            break
        g = g[:m]
        q, k, v = head.qkv(ids[1 + j: 1 + j + m], g, torch.arange(m) + j)
        keys.append(k)
        values.append(v)
        h = head.finish(g, attend(q, keys, values))
        rows = torch.arange(1 + j, 1 + j + m)  # the target's distribution each pair predicts
        out.append((F.log_softmax(head.logits(h), dim=-1), target_logp[rows], rows >= sample.prompt_len - 1))
        g = h
    return out


class Trainer:
    def __init__(self, llm: LLM, examples: list[Example], config: TrainConfig, folder: Path) -> None:
        self.llm, self.config, self.folder = llm, config, folder
        target = llm.target
        rng = random.Random(config.seed)
        order = list(range(len(examples)))
        rng.shuffle(order)
        held = max(1, round(len(examples) * config.held_out)) if len(examples) > 1 else 0
        self.held_out_ids, self.train_ids = order[:held], order[held:] or order
        embed, lm_head, self.final_norm = target.output_weights()
        self.head_config = HeadConfig.for_target(target.config, config.draft_vocab)
        torch.manual_seed(config.seed)
        self.head = Head(self.head_config, embed)
        self.head.set_vocabulary(draft_vocabulary([examples[i] for i in self.train_ids], self.head_config.draft_vocab,
                                                  target.config.vocab_size))
        self.lm_rows = lm_head[self.head.draft_ids]  # [draft_vocab, H]: the target's logits there
        self.samples = [self._sample(e) for e in tqdm(examples, desc="features", leave=False)]
        self.optimizer = torch.optim.AdamW([p for p in self.head.parameters() if p.requires_grad], lr=config.lr,
                                           weight_decay=0.0)
        self.step, self.elapsed, self.curve = 0, 0.0, []
        self.examples = examples

    def _sample(self, e: Example) -> Sample:
        f, last = target_features(self.llm, e.ids, self.head_config.layers)
        return Sample(torch.tensor(e.ids), e.prompt_len, f.half(), last.half())

    def target_logp(self, sample: Sample) -> torch.Tensor:
        """[n, draft_vocab]: the target's distribution at each position, restricted and renormalised."""
        c = self.llm.target.config
        logits = kernels.rms_norm(sample.last.float(), self.final_norm, c.rms_norm_eps) @ self.lm_rows.t()
        if c.final_logit_softcap:
            logits = torch.tanh(logits / c.final_logit_softcap) * c.final_logit_softcap
        return F.log_softmax(logits, dim=-1)

    def loss(self, sample: Sample) -> tuple[torch.Tensor, int]:
        """The sample's weighted loss over the unrolled steps, and the answer positions of step 0."""
        steps = unroll(self.head, sample, self.target_logp(sample), self.config.unroll)
        total = torch.zeros(())
        for j, (logq, logp, mask) in enumerate(steps):
            if mask.any():
                total = total + self.config.decay ** j * -(logp[mask].exp() * logq[mask]).sum(-1).mean()
        return total, int(steps[0][2].sum()) if steps else 0

    @torch.no_grad()
    def acceptance(self) -> dict:
        """On the held-out examples (greedy answers, so each next token is the target's greedy choice):
        per position, the share of chains whose first i + 1 drafts the target keeps, and the mean
        accepted length (1 + kept drafts) of chains of `chain`, over the bases inside the answers."""
        chain, bases, by_position = self.config.chain, 0, [0] * self.config.chain
        for i in self.held_out_ids:
            sample = self.samples[i]
            m = len(sample.ids) - 1 - chain  # bases whose every draft has a real next token
            if m <= 0:
                continue
            steps = unroll(self.head, sample, self.target_logp(sample), chain)
            alive = steps[0][2][:m].clone()
            base_count = int(alive.sum())
            for j, (logq, _, _) in enumerate(steps):
                alive &= self.head.draft_ids[logq[:m].argmax(-1)] == sample.ids[2 + j: 2 + j + m]
                by_position[j] += int(alive.sum())
            bases += base_count
        if bases == 0:
            return {"mean_accepted_length": None, "by_position": []}
        return {"mean_accepted_length": round(1 + sum(by_position) / bases, 4),  # the kept drafts, summed
                "by_position": [round(x / bases, 4) for x in by_position]}

    def run(self, progress: bool = True) -> dict:
        c = self.config
        budget = c.minutes * 60
        rng = random.Random(c.seed + self.step)
        last_eval = -math.inf
        with tqdm(total=round(budget), initial=min(round(self.elapsed), round(budget)), unit="s", desc="train",
                  disable=not progress) as bar:
            while self.elapsed < budget:
                start = time.perf_counter()
                self.optimizer.zero_grad()
                tokens, losses = 0, []
                while tokens < c.batch_tokens:
                    loss, n = self.loss(self.samples[rng.choice(self.train_ids)])
                    if n:
                        (loss * n / c.batch_tokens).backward()
                        losses.append(float(loss.detach()))
                    tokens += max(n, 1)
                torch.nn.utils.clip_grad_norm_(self.head.parameters(), 1.0)
                self.optimizer.step()
                self.step += 1
                spent = time.perf_counter() - start
                self.elapsed += spent
                bar.update(min(round(self.elapsed), round(budget)) - bar.n)
                postfix = {"loss": f"{sum(losses) / max(len(losses), 1):.3f}"}
                if self.elapsed - last_eval >= c.evaluate_every_s or self.elapsed >= budget:
                    last_eval = self.elapsed
                    held = self.acceptance()
                    self.curve.append({"minutes": round(self.elapsed / 60, 3), "step": self.step, **held})
                    self.checkpoint()
                postfix["accepted_length"] = self.curve[-1]["mean_accepted_length"] if self.curve else None
                bar.set_postfix(postfix)
        return self.curve[-1] if self.curve else {}

    def checkpoint(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        torch.save({"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step,
                    "elapsed": self.elapsed, "curve": self.curve, "config": asdict(self.config)},
                   self.folder / CHECKPOINT)

    def resume(self) -> bool:
        path = self.folder / CHECKPOINT
        if not path.is_file():
            return False
        state = torch.load(path, weights_only=False)
        self.head.load_state_dict(state["head"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.elapsed, self.curve = state["step"], state["elapsed"], state["curve"]
        return True

    def write(self, target_name: str, prompts_source: str) -> None:
        """The head as SGLang and vLLM load it (weights rounded to fp16, the same numbers drafting
        here uses), with verispec.json."""
        with torch.no_grad():
            for p in self.head.parameters():
                p.copy_(p.half().float())
        answers = sum(len(e.ids) - e.prompt_len for e in self.examples)
        save(self.head, self.folder, summary_of(
            self.head_config, target=target_name, tokenizer=tokenizer_hash(self.llm.tokenizer),
            data={"prompts": prompts_source, "examples": len(self.examples), "answer_tokens": answers,
                  "held_out_examples": len(self.held_out_ids)},
            training={**asdict(self.config), "steps": self.step, "minutes": round(self.elapsed / 60, 2)},
            held_out=self.curve[-1] if self.curve else None, curve=self.curve))


def save_examples(folder: Path, examples: list[Example], source: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / DATA).write_text(json.dumps({"prompts": source, "examples": [asdict(e) for e in examples]}))


def load_examples(folder: Path) -> tuple[list[Example], str] | None:
    path = folder / DATA
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return [Example(**e) for e in data["examples"]], data["prompts"]
