""".example.env lists every setting the producer and the dispatcher read, and its defaults load cleanly."""

from __future__ import annotations

from pathlib import Path

from dispatcher.settings import DispatcherSettings
from producer.settings import ProducerSettings

EXAMPLE = Path(__file__).resolve().parents[1] / ".example.env"


def _variables() -> dict[str, str]:
    out = {}
    for line in EXAMPLE.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            out[name] = value
    return out


def test_every_setting_is_documented():
    documented = set(_variables())
    fields = {name.upper() for name in {*DispatcherSettings.model_fields, *ProducerSettings.model_fields}}
    assert fields - documented == set(), "settings missing from .example.env"
    assert documented - fields == set(), ".example.env lists variables nobody reads"


def test_example_values_load(monkeypatch):
    for name, value in _variables().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("CALLBACK_SECRET", "0123456789abcdef" * 2)
    s = DispatcherSettings(_env_file=None)  # type: ignore[call-arg]
    assert s.slots_per_gpu == 4
    assert s.db_url() == "sqlite:///.gpuq/gpuq.db"
    assert s.public_callback_url == "http://127.0.0.1:8000/callback"
    p = ProducerSettings()
    assert p.queues == ["task_queue_1"]
