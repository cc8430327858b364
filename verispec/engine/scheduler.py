"""Many requests at once: one engine thread owns the models and steps every running sequence in one
batched forward; other threads submit requests and hear about each cycle through a listener.

Admission is first come, first served into a fixed number of slots (a cache, a drafter and a
controller each, made once); waiting requests queue up to a bound (free slots count as room),
beyond which `submit` refuses. A prompt is prefilled in chunks that share the step's forward with
the running sequences, so a long prompt delays them by at most `prefill_budget` rows a step. A step
that raises fails its own requests only; `drain` bounds how long a shutdown waits.
"""

from __future__ import annotations

import logging
import random
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from verispec.drafters.base import Drafter
from verispec.engine.controller import Controller
from verispec.engine.generate import Cycle, Sequence, step
from verispec.engine.load import BatchPlanner
from verispec.engine.monitor import Monitor
from verispec.engine.request import Request
from verispec.engine.score import logit_margin
from verispec.errors import VerispecError
from verispec.model.cache import KVCache
from verispec.model.transformer import Transformer

log = logging.getLogger("verispec")

PREFILL_BUDGET = 256  # prompt rows a step may add to the running sequences' verify rows

# Called on the engine thread after each cycle of the request, or once with the error that ended it.
Listener = Callable[[Cycle | BaseException], None]


class QueueFullError(VerispecError):
    """Every slot is busy and the queue is at its bound: try again later (HTTP 429)."""


class EngineUnavailableError(VerispecError):
    """The engine thread has stopped (shutting down, or it died): no new requests (HTTP 503)."""


@dataclass
class Ticket:
    request: Request
    listener: Listener
    cancelled: bool = False
    plain: bool = False  # decode without drafting (an audit)


@dataclass
class Audit:
    """Greedy speculative requests decoded again plainly, a sampled fraction of them, when nothing waits:
    greedy speculation must give the target's own tokens, so a difference is a bug (a verifier, the
    kernels' row invariance, a cache rollback). Counts read by /metrics."""

    rate: float = 0.01
    audited: int = 0
    mismatches: int = 0
    _draw: random.Random = field(default_factory=lambda: random.Random(0))

    def wants(self, request: Request) -> bool:
        return request.params.greedy and request.stats.drafted > 0 and self._draw.random() < self.rate

    def ticket(self, original: Request, target: Transformer) -> Ticket:
        again = Request(original.prompt_ids, original.params, original.eos_ids, original.capacity,
                        original.stop_check, grammar=None if original.grammar is None else original.grammar.fresh())

        def compare(event: Cycle | BaseException) -> None:
            if isinstance(event, BaseException) or not again.finished:
                return
            a, b = original.output_ids, again.output_ids
            if a != b:  # logged before it is counted: a reader of the counts finds the warning written
                at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                margin = logit_margin(target, original.prompt_ids + b[:at])
                log.warning("greedy speculation differs from plain decoding at output position %d: %s against "
                            "plain %s (%d and %d tokens; the target's logit margin there %g)", at, a[at: at + 1],
                            b[at: at + 1], len(a), len(b), margin)
                self.mismatches += 1
            self.audited += 1

        return Ticket(again, compare, plain=True)


@dataclass
class Slot:
    cache: KVCache
    drafter: Drafter | None
    controller: Controller | None
    ticket: Ticket | None = None
    sequence: Sequence | None = None


@dataclass
class Scheduler:
    target: Transformer
    new_drafter: Callable[[], Drafter | None]
    num_draft_tokens: int  # used when new_controller gives None
    new_controller: Callable[[], Controller | None]
    max_batch: int = 8
    max_queue: int = 64
    prefill_budget: int = PREFILL_BUDGET
    audit: Audit = field(default_factory=Audit)
    planner: BatchPlanner | None = None  # caps the batch's τ by the step's goodput (engine/load.py)
    monitor: Monitor = field(default_factory=Monitor, init=False)  # every slot's sampled tokens
    error: BaseException | None = field(default=None, init=False)
    _slots: list[Slot] = field(default_factory=list, init=False)
    _waiting: deque[Ticket] = field(default_factory=deque, init=False)
    _wake: threading.Condition = field(default_factory=threading.Condition, init=False)
    _stopping: bool = field(default=False, init=False)
    _thread: threading.Thread | None = field(default=None, init=False)

    # --- any thread -------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="verispec-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    def submit(self, request: Request, listener: Listener) -> Ticket:
        with self._wake:
            if not self.alive or self._stopping:
                raise EngineUnavailableError("the engine is not running" + (f": {self.error!r}" if self.error else ""))
            # the waiting requests that free slots are about to take do not count against the queue
            if len(self._waiting) >= self.max_queue + self.max_batch - self.running:
                raise QueueFullError(f"{self.running} requests are running (max_concurrency={self.max_batch}) and "
                                     f"{len(self._waiting)} waiting, the most this server holds "
                                     f"(max_queue={self.max_queue}); retry later")
            ticket = Ticket(request, listener)
            self._waiting.append(ticket)
            self._wake.notify()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """The client is gone: its slot is freed before the next step."""
        with self._wake:
            ticket.cancelled = True
            self._wake.notify()

    def drain(self, timeout: float) -> None:
        """Refuse new requests now; those still running or queued after `timeout` seconds fail with
        EngineUnavailableError (a shutdown that waits for no request longer than that)."""
        self._stopping = True  # no lock: this may run in a signal handler, on a thread that holds it
        timer = threading.Timer(timeout, self._abort, [EngineUnavailableError(
            f"the server shut down before this request finished (it waits {timeout:g} s for open requests)")])
        timer.daemon = True
        timer.start()

    def _abort(self, error: EngineUnavailableError) -> None:
        with self._wake:
            tickets = self._open()
            for ticket in tickets:
                ticket.cancelled = True  # the engine frees their slots before its next step
            self._wake.notify()
        for ticket in tickets:
            ticket.listener(error)

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new requests, finish every admitted and queued one, then end the engine thread."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def running(self) -> int:
        return sum(slot.ticket is not None for slot in self._slots)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def _open(self) -> list[Ticket]:
        """Every running and queued ticket (with the lock held)."""
        return [slot.ticket for slot in self._slots if slot.ticket is not None] + list(self._waiting)

    # --- the engine thread ------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while self._admit():
                self._step([slot for slot in self._slots if slot.sequence is not None])
        except BaseException as e:  # noqa: BLE001: every waiting client must hear why, then /health says so
            self.error = e
            with self._wake:
                tickets = self._open()
                self._waiting.clear()
            for ticket in tickets:
                ticket.listener(e)
            log.exception("the engine thread died; every request in it failed")

    def _step(self, busy: list[Slot]) -> None:
        """One step of the running sequences. If it raises (a drafter, the forward, NaN logits), the
        requests of this step fail with the error and their slots are freed; the next Sequence resets
        the cache and the drafter, so the engine goes on serving the queue."""
        owners = {id(slot.sequence): slot.ticket for slot in busy}
        try:
            cycles = step(self.target, [slot.sequence for slot in busy], self.prefill_budget, self.planner)
        except Exception as e:  # noqa: BLE001: one bad step must not take the engine down
            log.exception("a step failed; its %d request(s) failed with it", len(busy))
            for slot in busy:
                ticket, slot.ticket, slot.sequence = slot.ticket, None, None
                ticket.listener(e)
            return
        for cycle in cycles:
            owners[id(cycle.sequence)].listener(cycle)
        for slot in busy:
            if slot.sequence.request.finished:
                ticket, slot.ticket, slot.sequence = slot.ticket, None, None
                with self._wake:
                    if not ticket.plain and not self._waiting and self.audit.wants(ticket.request):
                        try:
                            self._waiting.append(self.audit.ticket(ticket.request, self.target))
                        except Exception:  # noqa: BLE001: an audit that cannot start must not end the engine
                            log.exception("an audit could not start")

    def _admit(self) -> bool:
        """Drop cancelled requests, fill free slots from the queue; block while there is nothing to
        do. False when stopping with nothing left."""
        with self._wake:
            while True:
                self._waiting = deque(t for t in self._waiting if not t.cancelled)
                for slot in self._slots:
                    if slot.ticket is not None and slot.ticket.cancelled:
                        slot.ticket = slot.sequence = None
                while self._waiting and (slot := self._free_slot()) is not None:
                    ticket = self._waiting.popleft()
                    try:  # a drafter that cannot reset for this request fails the request, not the engine
                        slot.sequence = Sequence(ticket.request, slot.cache, None if ticket.plain else slot.drafter,
                                                 self.num_draft_tokens, slot.controller, monitor=self.monitor,
                                                 prefix_from=self._same_prompt(ticket.request))
                    except Exception as e:  # noqa: BLE001
                        log.exception("a request could not start")
                        ticket.listener(e)
                        continue
                    slot.ticket = ticket
                if self.running:
                    return True
                if self._stopping:
                    return False
                self._wake.wait()

    def _same_prompt(self, request: Request) -> Sequence | None:
        """A running sequence with this request's prompt (n choices of one prompt, or a repeated
        prompt), whose prefill the new one copies rather than repeats."""
        for slot in self._slots:
            if slot.sequence is not None and slot.sequence.request.prompt_ids == request.prompt_ids:
                return slot.sequence
        return None

    def _free_slot(self) -> Slot | None:
        for slot in self._slots:
            if slot.ticket is None:
                return slot
        if len(self._slots) < self.max_batch:  # caches are allocated on first need, then kept
            self._slots.append(Slot(self.target.new_cache(), self.new_drafter(), self.new_controller()))
            return self._slots[-1]
        return None
