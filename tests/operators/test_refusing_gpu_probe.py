"""A GPU whose URL answers GET but refuses POST (405: a GET-only route such as a health or stats page) must
stay out of rotation once its refusals took it out (review of issue 14).

Now a GPU that refuses POST with 405/501 is held out until an operator activates it (or sets its URL).
Before: the probe (a GET) counted the 200 as "there", so the GPU came back every GPU_PROBE_SECONDS, took new
jobs, refused them (405) and went down again, forever: each cycle more refused attempts, each one refunded
(``max_attempts + 1``), so a job in a pool with only that GPU bounced without end.
"""

from __future__ import annotations

import pytest
from sqlalchemy import text

from dispatcher.db.engine import transaction, utcnow
from dispatcher.db.gpus import set_gpu_state
from dispatcher.states import GpuState
from tests.dispatcher.harness import reconcile
from tests.operators.wrong_gpu import STANDBY_GIVEN_BACK, beside_a_wrong_g9, log_records


@pytest.mark.slow  # 5 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_gpu_refusing_post_but_answering_get_is_not_probed_back(stack):
    # GIVEN two working GPUs and g9 registered at the simulator's stats page: GET answers 200, POST 405
    # THEN every job finishes on g0/g1
    d, ids = beside_a_wrong_g9(stack, "/_stats", 120, "fixed:0.1", timeout=90)
    lines = log_records(d)
    downs = [r for r in lines if r.get("action") == "gpu_down" and r.get("gpu_id") == "g9"]
    # g9 went out of rotation once and was not probed back in to refuse more jobs
    assert len(downs) == 1, [r.get("msg") for r in lines if r.get("gpu_id") == "g9"]
    with stack.engine.connect() as conn:
        refused = conn.execute(
            text(
                "SELECT COUNT(*) FROM attempts WHERE outcome = 'gpu_refused' AND gpu_id = 'g9' AND error <> :given"
            ),
            {"given": STANDBY_GIVEN_BACK},
        ).scalar_one()
        healthy = conn.execute(text("SELECT healthy FROM gpus WHERE gpu_id = 'g9'")).scalar_one()
    # Refusals before it went down (g9's answers; standbys given back unsent are not its refusals): its 4 slots in flight, plus jobs placed on slots its first refusals freed
    # before the threshold's commit (5 on a loaded machine). The bug made a new round every probe (0.2 s) for
    # the whole run; the one gpu_down above is what tells them apart.
    assert refused <= 8 and not healthy
    # AND an operator's word brings it back (after fixing its URL): activate clears the health record
    with stack.engine.begin() as conn:
        assert conn.execute(text("SELECT down_until FROM gpus WHERE gpu_id = 'g9'")).scalar_one() is None
    assert transaction(stack.engine, set_gpu_state, gpu_id="g9", state=GpuState.ACTIVE, now=utcnow())
    with stack.engine.connect() as conn:
        assert conn.execute(text("SELECT healthy FROM gpus WHERE gpu_id = 'g9'")).scalar_one()
    reconcile(stack.engine, stack.rds, stack.prefix, stack.queues, ids)
