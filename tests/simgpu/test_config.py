"""The textual forms of service times and faults, and what they draw."""

from __future__ import annotations

import random
import statistics

import pytest

from simgpu import ConfigError, Fault, ServiceTime, SimConfig
from simgpu.plan import draw_plan


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("0", ServiceTime("fixed", 0.0)),
        ("0.25", ServiceTime("fixed", 0.25)),
        ("fixed:0.1", ServiceTime("fixed", 0.1)),
        ("uniform:0.05,0.2", ServiceTime("uniform", 0.05, 0.2)),
        ("exp:0.1", ServiceTime("exp", 0.1)),
        ("lognormal:-2,0.5", ServiceTime("lognormal", -2.0, 0.5)),
    ],
)
def test_service_time_specs(spec: str, expected: ServiceTime) -> None:
    parsed = ServiceTime.parse(spec)

    assert parsed == expected
    assert ServiceTime.parse(str(parsed)) == parsed


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("soon", "not a number"),
        ("-1", ">= 0"),
        ("gamma:1", "unknown distribution"),
        ("uniform:0.1", "2 parameter"),
        ("uniform:0.3,0.1", "too small"),
        ("exp:nan", "finite"),
        ("fixed:-0.1", ">= 0"),
    ],
)
def test_bad_service_times_are_named(spec: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says) as caught:
        ServiceTime.parse(spec)
    assert repr(spec) in str(caught.value)


def test_service_times_are_drawn_from_their_distribution() -> None:
    rng = random.Random(1)

    uniform = [ServiceTime.parse("uniform:0.05,0.2").sample(rng) for _ in range(2000)]
    exp = [ServiceTime.parse("exp:0.1").sample(rng) for _ in range(4000)]
    lognormal = [ServiceTime.parse("lognormal:-2,0.5").sample(rng) for _ in range(4000)]

    assert min(uniform) >= 0.05 and max(uniform) <= 0.2
    assert 0.09 < statistics.mean(exp) < 0.11
    assert min(lognormal) > 0
    assert 0.12 < statistics.median(lognormal) < 0.15  # e^-2
    assert ServiceTime.parse("0").sample(rng) == 0.0


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("http_500", Fault("http_500")),
        ("http_429@0.25", Fault("http_429", prob=0.25)),
        ("slow_answer:2", Fault("slow_answer", 2.0)),
        ("heartbeat:0.05@0.5", Fault("heartbeat", 0.05, 0.5)),
        ("down", Fault("down")),
    ],
)
def test_fault_specs(spec: str, expected: Fault) -> None:
    assert Fault.parse(spec) == expected
    assert str(Fault.parse(spec)) == spec


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("boom", "unknown fault 'boom'"),
        ("slow_answer", "needs :SECONDS"),
        ("http_500:3", "takes no :PARAM"),
        ("heartbeat:0", "> 0"),
        ("fail@1.5", "within 0..1"),
        ("down@0.5", "a state"),
    ],
)
def test_bad_faults_are_named(spec: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        Fault.parse(spec)


def test_the_first_fault_of_a_kind_wins_and_the_others_combine() -> None:
    faults = tuple(
        Fault.parse(s)
        for s in ["close", "http_500", "fail_retry", "fail", "slow_answer:1", "duplicate_callback"]
    )

    plan = draw_plan(faults, random.Random(0))

    assert (plan.refusal, plan.outcome, plan.delay, plan.duplicate) == ("close", "retry", 1.0, True)


def test_config_from_textual_options() -> None:
    config = SimConfig.from_options(gpus=2, slots=2, service_time="exp:0.1", faults="fail@0.1,hang@0.2")

    assert config.behaviour.slots == 2
    assert config.behaviour.faults == (Fault("fail", prob=0.1), Fault("hang", prob=0.2))
    with pytest.raises(ConfigError, match="unknown GPU"):
        SimConfig.from_options(gpus=2, gpu_faults={"g5": ["down"]})
    with pytest.raises(ConfigError, match="mode"):
        SimConfig.from_options(mode="batch")
    with pytest.raises(ConfigError, match="gpus"):
        SimConfig.from_options(gpus=0)
    with pytest.raises(ConfigError, match="colour"):
        SimConfig.from_options(colour="red")
