-- gpuq operator queries (MySQL / MariaDB). Run one with `gpuq sql NAME`, list them with `gpuq sql --list`.
--
-- Each block starts with `-- name: NAME`; the comment lines right after it describe the query, and a line
-- `-- params: NAME=DEFAULT, ...` gives defaults for its `:NAME` parameters (`gpuq sql NAME -p minutes=60`);
-- `NAME=DEFAULT (LOW..HIGH)` also gives the whole numbers it may take (gpuq refuses others: MySQL would
-- answer a negative or overflowing window with wrong rows, not an error).
-- All timestamps are naive UTC, hence UTC_TIMESTAMP() rather than NOW().
--
-- Task states: processing (holds a slot), finished, failed, cancelled (final), retrying (waits for its
-- backoff, run_after), scheduled (waits for its not_before, run_after), queued (back in Redis).
-- Attempt outcomes: finished, failed, failed_retry, lease_expired, cancelled, gpu_refused, not_sent, never_sent.

-- name: gpu_load
-- Running tasks per GPU: the seed system's load query, unchanged.
SELECT gpu_id, COUNT(*) AS active_tasks FROM tasks WHERE state = 'processing' GROUP BY gpu_id;

-- name: gpu_slots
-- Slots held per GPU, from the slots table (what placement uses): unlike gpu_load it also counts a cancelled
-- attempt whose GPU has not confirmed the stop yet (cancel_pending). `slots` is the GPU's slot count (after
-- `gpuq gpu set --slots` the table may keep rows beyond it for a while; busy ones still count in `busy`).
SELECT s.gpu_id, COUNT(s.task_id) AS busy, g.slots AS slots,
       SUM(CASE WHEN t.state = 'cancelled' THEN 1 ELSE 0 END) AS cancel_pending
FROM slots s JOIN gpus g ON g.gpu_id = s.gpu_id LEFT JOIN tasks t ON t.task_id = s.task_id
GROUP BY s.gpu_id, g.slots
ORDER BY s.gpu_id;

-- name: running_by_age
-- Tasks holding a slot, longest running first: the top rows are the ones to look at when a GPU hangs.
SELECT task_id, type, queue, gpu_id, slot_index, attempt, started_at,
       ROUND(TIMESTAMPDIFF(MICROSECOND, started_at, UTC_TIMESTAMP(6)) / 1000000, 1) AS running_seconds
FROM tasks
WHERE state = 'processing'
ORDER BY started_at
LIMIT 100;

-- name: failures_last_hour
-- Attempts that did not finish in the last hour, grouped by how they ended and why.
SELECT outcome, LEFT(COALESCE(error, ''), 120) AS reason, COUNT(*) AS attempts,
       COUNT(DISTINCT task_id) AS tasks, COUNT(DISTINCT gpu_id) AS gpus, MAX(ended_at) AS last_seen
FROM attempts
WHERE outcome <> 'finished' AND ended_at >= UTC_TIMESTAMP(6) - INTERVAL 1 HOUR
GROUP BY outcome, reason
ORDER BY attempts DESC, last_seen DESC;

-- name: gpu_utilisation
-- Share of each GPU's slot time spent on jobs over the last :minutes minutes (ended and running attempts);
-- minutes from 1 to 5256000 (10 years).
-- params: minutes=60 (1..5256000)
SELECT g.gpu_id, g.pool, g.slots, COALESCE(b.attempts, 0) AS attempts,
       ROUND(COALESCE(b.busy_us, 0) / 1000000, 1) AS busy_seconds,
       ROUND(100 * COALESCE(b.busy_us, 0) / 1000000 / (g.slots * :minutes * 60), 1) AS utilisation_pct
FROM gpus g
LEFT JOIN (
    SELECT u.gpu_id, SUM(u.ended) AS attempts, SUM(u.busy_us) AS busy_us
    FROM (
        SELECT a.gpu_id, 1 AS ended,
               TIMESTAMPDIFF(MICROSECOND, GREATEST(a.started_at, w.since), a.ended_at) AS busy_us
        FROM attempts a
        JOIN (SELECT UTC_TIMESTAMP(6) - INTERVAL :minutes MINUTE AS since) w ON a.ended_at >= w.since
        WHERE a.started_at IS NOT NULL AND a.gpu_id IS NOT NULL
        UNION ALL
        SELECT s.gpu_id, 0 AS ended,
               TIMESTAMPDIFF(MICROSECOND, GREATEST(s.claimed_at, w.since), UTC_TIMESTAMP(6)) AS busy_us
        FROM slots s
        JOIN (SELECT UTC_TIMESTAMP(6) - INTERVAL :minutes MINUTE AS since) w ON s.task_id IS NOT NULL
    ) u
    GROUP BY u.gpu_id
) b ON b.gpu_id = g.gpu_id
ORDER BY g.pool, g.gpu_id;

-- name: slowest_tasks
-- The longest successful attempts of the last 24 hours.
SELECT a.task_id, t.type, a.gpu_id, a.attempt, a.started_at, a.ended_at,
       ROUND(TIMESTAMPDIFF(MICROSECOND, a.started_at, a.ended_at) / 1000000, 3) AS run_seconds
FROM attempts a
JOIN tasks t ON t.task_id = a.task_id
WHERE a.outcome = 'finished' AND a.started_at IS NOT NULL AND a.ended_at >= UTC_TIMESTAMP(6) - INTERVAL 1 DAY
ORDER BY run_seconds DESC
LIMIT 20;

-- name: waiting_retries
-- Tasks waiting in the database for their next attempt (retrying) or their start time (scheduled), soonest
-- first; a due one is back in Redis within a second while a dispatcher runs.
SELECT task_id, type, queue, state, attempt, max_attempts, run_after, LEFT(COALESCE(error, ''), 120) AS last_error
FROM tasks
WHERE state IN ('retrying', 'scheduled')
ORDER BY run_after
LIMIT 100;
