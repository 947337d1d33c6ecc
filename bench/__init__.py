"""``make bench``: gpuq against the baseline a user would otherwise pick (Celery), side by side (SPEC §8).

bench/
  __main__.py    the CLI: workloads, order of runs, where the results go
  workloads.py   what one run is (GPUs, slots, service time, jobs) and the full / smoke sets
  stores.py      a Redis db and a MariaDB database of the benchmark's own, emptied between runs
  procs.py       the processes a run starts (simulator, dispatcher, Celery worker) and /proc readings
  runner.py      one workload through one system: live or backlog start, waiting, collecting
  gpuq_run.py    gpuq: the Lambda handler, Redis, MariaDB and ``python -m dispatcher``
  celery_app.py  the Celery baseline's app and task (the module the Celery worker imports)
  celery_run.py  Celery (Redis broker) calling the simulated GPUs synchronously
  analysis.py    latencies reconstructed from the simulator's job log, makespan, throughput
  report.py      the table on stdout, the JSON file, the Markdown summary
  plot.py        the PNG (matplotlib, Agg)
  profile.py     py-spy on the dispatcher: where its CPU goes

Every figure comes from the simulated GPUs' own clocks (``GET /_stats``: per job ``received_mono``,
``callback_sent_mono`` or ``answered_mono``, ``callback_answered_mono``) and the driver's enqueue times, on
the machine-wide monotonic clock; see ``bench/RESULTS.md`` for the exact definitions.

(``soak.py`` beside them is ``make soak``, a fault-injection run, not part of ``make bench``.)
"""
