"""Task and GPU states, the words operators read in the ``tasks`` and ``gpus`` tables.

A task's life::

    (in Redis, no row yet) ──► processing ──► finished
                                   │   ├────► failed        (final failure, or MAX_ATTEMPTS used up)
                                   │   └────► cancelled
                                   ▼
             retrying (backoff; run_after) ──► queued (back in Redis) ──► processing ...
    scheduled (not_before in the future) ──► queued ──► processing ...

A task holds a slot while it is ``processing`` (the seed's GPU-load query counts those rows), and a task
cancelled while running keeps its slot until its GPU confirms the stop (``db/cancels.py``).
"""

from __future__ import annotations

from enum import StrEnum


class TaskState(StrEnum):
    PROCESSING = "processing"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"
    RETRYING = "retrying"
    SCHEDULED = "scheduled"
    QUEUED = "queued"
    # Recorded on a busy slot, to take it when its holder ends (db/standby.py); waiting, not yet running.
    STANDBY = "standby"


TERMINAL = frozenset({TaskState.FINISHED, TaskState.FAILED, TaskState.CANCELLED})
#: States in which a copy of the job found in Redis may be dispatched (with the matching attempt count).
RUNNABLE = frozenset({TaskState.QUEUED, TaskState.RETRYING, TaskState.SCHEDULED})
#: States whose job waits in the database until ``run_after`` and is then put back in Redis.
DEFERRED = frozenset({TaskState.RETRYING, TaskState.SCHEDULED})


class GpuState(StrEnum):
    ACTIVE = "active"  # takes new work (when healthy)
    DRAINING = "draining"  # running jobs finish, no new ones


class Outcome(StrEnum):
    """How an attempt ended; stored in ``attempts.outcome``."""

    FINISHED = "finished"
    FAILED = "failed"  # final: the GPU said so, or answered 400/413/422
    FAILED_RETRY = "failed_retry"  # the attempt failed; the task may be tried again
    EXPIRED = "lease_expired"
    CANCELLED = "cancelled"
    GPU_REFUSED = "gpu_refused"  # 401/403/404/405/501...: about the GPU; waits again, no attempt used
    NOT_SENT = "not_sent"  # this process could not send it (out of file descriptors): no attempt used
    NEVER_SENT = "never_sent"  # its dispatcher died before sending it (sent_journal.py): no attempt used
