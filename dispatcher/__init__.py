"""gpuq dispatcher: places jobs on free GPU slots, tracks them in MySQL, takes callbacks.

Code map, one room per concern: ``loop/`` is the dispatch loop and its parts (``core.py`` builds them around
one ``Runtime``; placing, slot hand-offs, GPU requests, ending attempts, housekeeping, cancels, pull agents'
hub); ``queues/`` is the one room that talks to Redis (taking and settling jobs, heartbeats and sweeps, the
wake-up and task-event channels, dead letters, the queue views); ``db/`` holds the schema and every store
function (MySQL/MariaDB or SQLite); ``gpus/`` talks to GPU services (the HTTP client, per-attempt callback
tokens, pull GPUs' names and agent tokens); ``http/`` is the FastAPI edge (callbacks, ``/tasks``, ``/gpus``,
health, metrics, the OpenAI route, the agents' long poll, the dashboard) and turns errors into answers;
``cli/`` is ``gpuq``, the operator CLI. At the top sit what every room shares: ``settings``, ``states``,
``errors``, ``limits``, ``logs``, ``metrics``, ``serve`` (the process: ``python -m dispatcher``),
``preflight`` (its start-up checks) and ``testing`` (a dispatcher in-process or as a process, for tests,
demo and bench) with ``inproc`` (the whole daemon in a thread of a test). The shared core of jobs and
Redis keys is ``producer/`` (see its docstring).
"""
