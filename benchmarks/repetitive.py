"""Writes verispec/data/repetitive.jsonl: a multi-request workload whose answers repeat each other,
where Spec-Bench's prompts are independent. Synthetic and deterministic (a fixed seed, no outside data):

- `extraction-json`: 40 passages about invented companies, each asking for the same JSON shape;
- `agent-edit`: 20 steps of an agent loop, each giving the whole current plan and one edit to apply,
  and asking for the whole updated plan (the previous step's answer with one line changed).

    python benchmarks/repetitive.py            # rewrites the file; commit both
    verispec bench --prompts repetitive --drafter ngram,suffix --num-draft-tokens 4,auto

Bench runs the prompts in file order, so the suffix drafter's global tree learns as it goes.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "verispec" / "data" / "repetitive.jsonl"
SEED = 14

SYLLABLES = ["ka", "lo", "mi", "ra", "ven", "tor", "sel", "bri", "no", "dax", "quin", "par", "ul", "zen"]
CITIES = ["Lisbon", "Osaka", "Denver", "Tallinn", "Nairobi", "Porto Alegre", "Lyon", "Perth", "Quebec", "Bergen"]
PRODUCTS = ["water filters", "bicycle frames", "weather sensors", "solar roof tiles", "field microscopes",
            "acoustic panels", "cargo drones", "soil probes", "hearing aids", "ceramic valves"]
FIRST = ["Ada", "Bruno", "Chiara", "Dmitri", "Esme", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Keiko", "Luis"]
LAST = ["Okafor", "Lindqvist", "Moreau", "Tanaka", "Reyes", "Novak", "Haddad", "Schmidt", "Costa", "Byrne"]
KEYS = ["name", "founded", "city", "employees", "product", "ceo"]

PLAN = ["Read the open support tickets and group them by product.",
        "Reply to every ticket older than two days with a status update.",
        "Escalate tickets that mention data loss to the on-call engineer.",
        "Draft a weekly summary with the number of tickets per group.",
        "Send the summary to the support lead before Friday noon.",
        "Archive tickets that have been resolved for more than a week.",
        "Update the known-issues page with any new recurring problem.",
        "Schedule a review of the three oldest open tickets."]
EDITS = ["before noon on Thursday", "with a short apology", "and to the product manager",
         "sorted by the number of tickets", "older than three days", "with a link to the changelog",
         "for the two largest customers", "and note the expected fix date"]


def name(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize() + rng.choice(
        [" Labs", " Works", " Systems", " Industries", " & Co."])


def extraction(rng: random.Random, number: int) -> dict:
    company = {"name": name(rng), "founded": rng.randint(1950, 2022), "city": rng.choice(CITIES),
               "employees": rng.randint(12, 9000), "product": rng.choice(PRODUCTS),
               "ceo": f"{rng.choice(FIRST)} {rng.choice(LAST)}"}
    sentences = [f"{company['name']} was founded in {company['founded']} in {company['city']}.",
                 f"Today it employs {company['employees']} people and is best known for its {company['product']}.",
                 f"The company is led by {company['ceo']}, who joined as chief executive "
                 f"{rng.randint(1, 12)} years ago.",
                 f"Last year it opened a second office and {rng.choice(['doubled', 'tripled', 'grew'])} "
                 f"its sales of {company['product']}."]
    rng.shuffle(sentences)
    prompt = ("Extract the facts from the passage below as one JSON object with exactly these keys, in "
              f"this order: {', '.join(KEYS)}. Use a number for founded and employees. Answer with the "
              f"JSON object only.\n\nPassage: {' '.join(sentences)}")
    return {"question_id": f"extraction-{number:02d}", "category": "extraction-json", "turns": [prompt]}


def agent_steps(rng: random.Random, steps: int) -> list[dict]:
    plan = list(PLAN)
    out = []
    for number in range(steps):
        line = rng.randrange(len(plan))
        edit = rng.choice(EDITS)
        numbered = "\n".join(f"{i + 1}. {step}" for i, step in enumerate(plan))
        prompt = (f"You are an assistant that keeps a task plan up to date. The current plan is:\n\n{numbered}\n\n"
                  f"Edit: step {line + 1} should now end with \"{edit}\". Reply with the complete updated plan, "
                  "every step numbered as before, and nothing else.")
        out.append({"question_id": f"agent-{number:02d}", "category": "agent-edit", "turns": [prompt]})
        plan[line] = plan[line].rstrip(".").split(" (")[0] + f" ({edit})."  # what the next step starts from
    return out


def main() -> None:
    rng = random.Random(SEED)
    rows = [extraction(rng, n) for n in range(40)] + agent_steps(rng, 20)
    OUT.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"wrote {len(rows)} prompts to {OUT}")


if __name__ == "__main__":
    main()
