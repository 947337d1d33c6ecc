"""The fate of one request, drawn once on arrival from the GPU's faults and seeded RNG.

Every fault with a probability is rolled independently, in the order given. Faults of one kind exclude each
other and the first that fires wins: the answer (http_500, http_400, http_429, hang, close, else accepted)
and the outcome (lost_callback, fail, fail_retry, else finished). slow_answer, duplicate_callback and
heartbeat combine with anything. ``down`` is not drawn: it is the GPU's state (see GpuSim.down).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from simgpu.config import Fault

Outcome = Literal["finished", "failed", "retry", "lost"]

REFUSALS = frozenset({"http_500", "http_400", "http_429", "hang", "close"})
OUTCOMES: dict[str, Outcome] = {"lost_callback": "lost", "fail": "failed", "fail_retry": "retry"}


@dataclass(frozen=True, slots=True)
class Plan:
    refusal: str | None = None  # the fault deciding the answer; None: the job is accepted
    delay: float = 0.0  # seconds before answering
    outcome: Outcome = "finished"
    duplicate: bool = False
    heartbeat: float = 0.0  # seconds between running heartbeats; 0: none


NO_FAULTS = Plan()


def draw_plan(faults: tuple[Fault, ...], rng: random.Random) -> Plan:
    if not faults:
        return NO_FAULTS
    refusal: str | None = None
    delay = heartbeat = 0.0
    outcome: Outcome = "finished"
    duplicate = False
    for fault in faults:
        # A certain fault draws no number, so adding one does not shift the RNG sequence of the others.
        if fault.prob < 1.0 and rng.random() >= fault.prob:
            continue
        name = fault.name
        if name in REFUSALS:
            refusal = refusal or name
        elif name in OUTCOMES:
            outcome = OUTCOMES[name] if outcome == "finished" else outcome
        elif name == "slow_answer":
            delay = delay or fault.param
        elif name == "heartbeat":
            heartbeat = heartbeat or fault.param
        elif name == "duplicate_callback":
            duplicate = True
    return Plan(refusal, delay, outcome, duplicate, heartbeat)
