"""What a simulated GPU does: service-time distributions, fault specs, and the SimConfig they live in.

Each setting has one textual form, shared by the CLI, ``POST /_control`` and ``SimFleet.configure``:

    service time   0 | S | fixed:S | uniform:A,B | exp:MEAN | lognormal:MU,SIGMA       (seconds)
    fault          NAME[:PARAM][@PROBABILITY]     http_500@0.2, slow_answer:2, heartbeat:0.05, down

Settings that change at run time (slots, service time, mode, faults) form a ``Behaviour``; each GPU holds
its own, so one GPU can fail while the others work.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, cast

Mode = Literal["async", "sync"]
MODES: tuple[Mode, ...] = ("async", "sync")

# fault name -> whether it takes a PARAM (seconds)
FAULTS: dict[str, bool] = {
    "http_500": False,
    "http_400": False,
    "http_429": False,
    "hang": False,
    "close": False,
    "slow_answer": True,
    "lost_callback": False,
    "duplicate_callback": False,
    "fail": False,
    "fail_retry": False,
    "heartbeat": True,
    "down": False,
}


class ConfigError(ValueError):
    """A simulator setting is malformed; the message names the setting and the bad value."""


def _number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{what}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise ConfigError(f"{what}: {text!r} is not a finite number")
    return value


@dataclass(frozen=True, slots=True)
class ServiceTime:
    """How long a job takes, drawn per job from the GPU's seeded RNG."""

    kind: Literal["fixed", "uniform", "exp", "lognormal"] = "fixed"
    a: float = 0.0
    b: float = 0.0

    @classmethod
    def parse(cls, spec: str) -> ServiceTime:
        what = f"service time {spec!r}"
        kind, _, args = spec.strip().partition(":")
        if not args:  # a bare number is a fixed time; "0" means immediate
            value = _number(kind, what)
            if value < 0:
                raise ConfigError(f"{what}: must be >= 0")
            return cls("fixed", value)
        params = [_number(part, what) for part in args.split(",")]
        arity = {"fixed": 1, "uniform": 2, "exp": 1, "lognormal": 2}.get(kind)
        if arity is None:
            raise ConfigError(f"{what}: unknown distribution {kind!r} (fixed, uniform, exp, lognormal)")
        if len(params) != arity:
            raise ConfigError(f"{what}: {kind} takes {arity} parameter(s)")
        a, b = params[0], params[1] if arity == 2 else 0.0
        if kind != "lognormal" and min(a, b) < 0:
            raise ConfigError(f"{what}: times must be >= 0")
        if (kind == "uniform" and b < a) or (kind == "lognormal" and b < 0):
            raise ConfigError(f"{what}: second parameter too small")
        return cls(cast(Any, kind), a, b)

    def sample(self, rng: random.Random) -> float:
        if self.kind == "fixed":
            return self.a
        if self.kind == "uniform":
            return rng.uniform(self.a, self.b)
        if self.kind == "exp":
            return rng.expovariate(1.0 / self.a) if self.a > 0 else 0.0
        return rng.lognormvariate(self.a, self.b)

    def __str__(self) -> str:
        return f"{self.kind}:{self.a:g}" + (f",{self.b:g}" if self.kind in ("uniform", "lognormal") else "")


IMMEDIATE = ServiceTime()


@dataclass(frozen=True, slots=True)
class Fault:
    name: str
    param: float = 0.0
    prob: float = 1.0

    @classmethod
    def parse(cls, spec: str) -> Fault:
        what = f"fault {spec!r}"
        head, at, prob_text = spec.strip().partition("@")
        name, colon, param_text = head.partition(":")
        if name not in FAULTS:
            raise ConfigError(f"{what}: unknown fault {name!r} (one of {', '.join(FAULTS)})")
        if FAULTS[name] != bool(colon):
            raise ConfigError(f"{what}: {name} " + ("needs :SECONDS" if FAULTS[name] else "takes no :PARAM"))
        param = _number(param_text, what) if colon else 0.0
        if colon and param <= 0:
            raise ConfigError(f"{what}: seconds must be > 0")
        prob = _number(prob_text, what) if at else 1.0
        if not 0.0 <= prob <= 1.0:
            raise ConfigError(f"{what}: probability must be within 0..1")
        if name == "down" and at:
            raise ConfigError(f"{what}: down is a state, not a probability; set it and clear it")
        return cls(name, param, prob)

    def __str__(self) -> str:
        param = f":{self.param:g}" if FAULTS[self.name] else ""
        return self.name + param + (f"@{self.prob:g}" if self.prob < 1.0 else "")


def parse_faults(value: object) -> tuple[Fault, ...]:
    if isinstance(value, str):
        value = [part for part in value.split(",") if part.strip()]
    if not isinstance(value, Sequence) or isinstance(value, bytes):
        raise ConfigError(f"faults: expected a list of fault specs, got {value!r}")
    return tuple(item if isinstance(item, Fault) else Fault.parse(_text(item, "faults")) for item in value)


def _text(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{what}: expected a string, got {value!r}")
    return value


def _positive_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what}: expected an integer >= 1, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class Behaviour:
    """The run-time-changeable part of one GPU's configuration."""

    slots: int = 4
    service_time: ServiceTime = IMMEDIATE
    mode: Mode = "async"
    faults: tuple[Fault, ...] = ()

    KEYS = frozenset({"slots", "service_time", "mode", "faults"})

    @property
    def down(self) -> bool:
        return any(fault.name == "down" for fault in self.faults)

    def updated(self, changes: Mapping[str, object]) -> Behaviour:
        """A copy with ``changes`` applied; values may be in their textual form (as JSON carries them)."""
        unknown = set(changes) - self.KEYS
        if unknown:
            raise ConfigError(f"unknown setting(s) {sorted(unknown)} (known: {sorted(self.KEYS)})")
        new = self
        if "slots" in changes:
            new = replace(new, slots=_positive_int(changes["slots"], "slots"))
        if "service_time" in changes:
            value = changes["service_time"]
            if isinstance(value, int | float) and not isinstance(value, bool):
                value = str(value)
            parsed = (
                value if isinstance(value, ServiceTime) else ServiceTime.parse(_text(value, "service_time"))
            )
            new = replace(new, service_time=parsed)
        if "mode" in changes:
            mode = changes["mode"]
            if mode not in MODES:
                raise ConfigError(f"mode: expected one of {MODES}, got {mode!r}")
            new = replace(new, mode=mode)
        if "faults" in changes:
            new = replace(new, faults=parse_faults(changes["faults"]))
        return new

    def describe(self) -> dict[str, Any]:
        return {
            "slots": self.slots,
            "service_time": str(self.service_time),
            "mode": self.mode,
            "faults": [str(fault) for fault in self.faults],
        }


@dataclass(frozen=True, slots=True)
class SimConfig:
    """Everything one simulator process needs. ``from_options`` accepts the textual forms."""

    gpus: int = 4
    host: str = "127.0.0.1"
    port: int = 0  # 0: an ephemeral port
    gpu_ports: int | None = None  # None: GPUs are paths /g0.. on `port`; else GPU i listens on gpu_ports+i
    token: str | None = None  # the bearer token GPU requests must carry; None: no check
    seed: int | None = None
    behaviour: Behaviour = Behaviour()
    gpu_faults: Mapping[str, tuple[Fault, ...]] = field(default_factory=dict)  # extra faults per GPU
    callback_tries: int = 8
    callback_timeout: float = 5.0  # per attempt
    callback_backoff: float = 0.1  # first retry delay, doubled per try
    callback_deadline: float = 30.0  # no retry starts later than this after the first try
    # At each GPU's first job, open one keep-alive callback connection per slot (callbacks.py: expect)
    warm_callbacks: bool = True
    pull: str | None = None  # the dispatcher's base URL: the GPUs are pull agents polling it (agent.py)
    agents: Mapping[str, str] = field(default_factory=dict)  # pull mode: GPU name -> its agent token

    def __post_init__(self) -> None:
        _positive_int(self.gpus, "gpus")
        _positive_int(self.callback_tries, "callback_tries")
        if self.pull is not None and not self.agents:
            raise ConfigError("pull mode needs at least one agent: --agent NAME=TOKEN")
        unknown = set(self.gpu_faults) - set(self.gpu_names)
        if unknown:
            raise ConfigError(f"faults for unknown GPU(s) {sorted(unknown)}; GPUs are g0..g{self.gpus - 1}")

    @property
    def gpu_names(self) -> list[str]:
        """g0, g1, ...; in pull mode the agents' names (the dispatcher's names for them)."""
        if self.agents:
            return list(self.agents)
        return [f"g{i}" for i in range(self.gpus)]

    def gpu_behaviour(self, name: str) -> Behaviour:
        extra = self.gpu_faults.get(name, ())
        return replace(self.behaviour, faults=self.behaviour.faults + extra) if extra else self.behaviour

    @classmethod
    def from_options(cls, base: SimConfig | None = None, **options: Any) -> SimConfig:
        """``SimConfig.from_options(gpus=2, service_time="exp:0.1", faults=["http_500@0.1"])``."""
        base = base or cls()
        behaviour = base.behaviour.updated({k: options.pop(k) for k in Behaviour.KEYS & set(options)})
        if "gpu_faults" in options:
            options["gpu_faults"] = {gpu: parse_faults(f) for gpu, f in options["gpu_faults"].items()}
        try:
            return replace(base, behaviour=behaviour, **options)
        except TypeError as exc:
            raise ConfigError(str(exc)) from None
