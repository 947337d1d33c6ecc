"""``make demo`` (``python -m demo``): the whole pipeline on one machine, on embedded defaults.

    Lambda handler (API Gateway + SQS events) ─► Redis ─► python -m dispatcher ─► simulated GPUs
                                                             │  SQLite in a temp dir  ▲ callbacks

What it starts, it stops (dispatcher first, so running jobs finish; then the fleet; then redis-server),
also on Ctrl-C, SIGTERM or failure. It lives outside the three packages because it uses all of them.

- ``services``: Redis (found or started), the dispatcher process, free ports.
- ``submit``: API Gateway- and SQS-shaped events through ``producer.handler.lambda_handler``.
- ``watch``: the live view (rich) and the database reads behind it and behind the report.
- ``report``: the tables and figures printed at the end.
"""
