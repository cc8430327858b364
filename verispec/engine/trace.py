"""Traces: one JSON line per cycle, after one line that describes the run (schema: docs/trace.md).

bench, diagnose and the controller read the same numbers that a run writes here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from verispec.errors import InvalidInputError

SCHEMA = 2
CYCLE_FIELDS = ("tau", "drafted", "accepted", "draft_ms_per_cycle", "verify_ms_per_cycle")
# schema 1 named a cycle's times draft_ms and verify_ms and did not record `fed`
SCHEMA_1_NAMES = {"draft_ms": "draft_ms_per_cycle", "verify_ms": "verify_ms_per_cycle"}


class TraceWriter:
    """Writes a run line, then a cycle line per cycle; `request` numbers the requests of a run."""

    def __init__(self, file: TextIO, **run: Any) -> None:
        self.file = file
        self.request = 0
        self._cycle = 0
        self._write({"type": "run", "schema": SCHEMA, **run})

    def next_request(self) -> None:
        self.request += 1
        self._cycle = 0

    def cycle(self, **fields: Any) -> None:
        self._write({"type": "cycle", "request": self.request, "cycle": self._cycle,
                     **{k: round(v, 4) if isinstance(v, float) else v for k, v in fields.items()}})
        self._cycle += 1

    def _write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()


@dataclass
class Trace:
    run: dict[str, Any]
    cycles: list[dict[str, Any]] = field(default_factory=list)


def read_trace(path: str | Path) -> Trace:
    """Parse and check a trace file; a bad file is an InvalidInputError naming the line and the problem."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"trace {str(path)!r} does not exist or is not a file")
    return parse_trace(path.read_text().splitlines(), str(path))


def parse_trace(lines: Iterable[str], path: str = "<trace>") -> Trace:
    trace: Trace | None = None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidInputError(f"trace {path}, line {number}: not JSON ({e.msg})") from None
        kind = record.get("type") if isinstance(record, dict) else None
        if trace is None:
            if kind != "run":
                raise InvalidInputError(f"trace {path}, line {number}: the first line must be the run line "
                                        f'{{"type": "run", ...}}, got {line[:80]!r}')
            if record.get("schema", SCHEMA) not in (1, SCHEMA):
                raise InvalidInputError(f"trace {path}, line {number}: schema {record['schema']!r} is not one this "
                                        f"version reads (1 or {SCHEMA})")
            trace = Trace(record)
            continue
        if kind != "cycle":
            raise InvalidInputError(f"trace {path}, line {number}: type must be 'cycle', got {kind!r}")
        if trace.run.get("schema", SCHEMA) == 1:
            record = {SCHEMA_1_NAMES.get(k, k): v for k, v in record.items()}
        missing = [f for f in CYCLE_FIELDS if not isinstance(record.get(f), (int, float))]
        if missing:
            raise InvalidInputError(f"trace {path}, line {number}: cycle lacks numeric field(s) {', '.join(missing)}")
        if not isinstance(record.setdefault("fed", 0), int) or record["fed"] < 0:
            raise InvalidInputError(f"trace {path}, line {number}: fed={record['fed']!r} must be an integer >= 0")
        nodes = record.setdefault("nodes", record["drafted"])  # a chain's nodes are its drafts
        if not isinstance(nodes, (int, float)) or nodes < record["drafted"]:
            raise InvalidInputError(f"trace {path}, line {number}: nodes={nodes!r} must be a number >= "
                                    f"drafted={record['drafted']} (a tree's node count, at least its depth)")
        if not 0 <= record["accepted"] <= record["drafted"]:
            raise InvalidInputError(f"trace {path}, line {number}: accepted={record['accepted']} must be in "
                                    f"[0, drafted={record['drafted']}]")
        trace.cycles.append(record)
    if trace is None:
        raise InvalidInputError(f"trace {path} is empty: it needs a run line and cycle lines (docs/trace.md)")
    return trace
