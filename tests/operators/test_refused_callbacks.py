"""A callback refused for its token is logged (``dispatcher/http/refusals.py``): an outside trial ran a
dispatcher with another CALLBACK_SECRET than its peers; 29 callbacks were refused with no log line, and its
tasks ended "no callback before the lease ran out" although the callbacks had come."""

from __future__ import annotations

import json

import pytest

from dispatcher.gpus.tokens import make_token
from dispatcher.http.refusals import Refusals
from tests.dispatcher.helpers import wait_for


def _refusals(d) -> list[dict]:
    lines = [json.loads(x) for x in d.log_path.read_text().splitlines() if x.startswith("{")]
    return [r for r in lines if r.get("action") == "callback_refused"]


@pytest.mark.slow  # a dispatcher process
def test_callbacks_signed_with_another_secret_are_logged_once_per_interval(stack):
    fleet = stack.fleet(gpus=1, service_time="0")
    d = stack.dispatcher(fleet)
    peer_token = make_token(b"the-secret-of-another-dispatcher", "t-1", 1)
    # GIVEN callbacks signed under another secret, one with no token, one with a token of another shape
    for _ in range(5):
        assert d.post_callback({"task_id": "t-1", "status": "finished"}, peer_token).status_code == 401
    # THEN one warning says why, naming the setting; the next ones within the interval add no line
    wait_for(lambda: _refusals(d), 10, what="a callback_refused line")
    (line,) = _refusals(d)
    assert line["level"] == "warning" and "CALLBACK_SECRET" in line["reason"] and line["refused"] == 1, line
    assert peer_token not in d.log_path.read_text()  # the token itself is never logged


def test_a_line_per_interval_counts_the_refusals_since_and_every_reason(caplog, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("dispatcher.http.refusals.time.monotonic", lambda: clock[0])
    r = Refusals(every=10)
    with caplog.at_level("WARNING", logger="gpuq.http"):
        r.note(None)
        for _ in range(6):
            r.note("1.abc")
        clock[0] += 10
        r.note(None)  # one tokenless request at the interval's start does not hide the six before it
    lines = [rec for rec in caplog.records if getattr(rec, "action", None) == "callback_refused"]
    assert [(x.refused, x.reason) for x in lines] == [(1, "no bearer token"), (7, "no bearer token")]
    assert lines[1].reasons == {"not a gpuq callback token": 6, "no bearer token": 1}


def test_a_forged_task_id_cannot_write_a_line_of_its_own(caplog):
    """A refused callback's task id is the sender's text: escaped, so a text log gets no second line."""
    with caplog.at_level("WARNING", logger="gpuq.http"):
        Refusals().note(None, "x\ninfo    gpuq.dispatcher: all clear" + "y" * 500)
    (line,) = [rec for rec in caplog.records if getattr(rec, "action", None) == "callback_refused"]
    assert "\n" not in line.task_id and "\\n" in line.task_id and len(line.task_id) < 120
