"""A simulated GPU inference service honouring the gpuq request/callback contract (SPEC §4).

simgpu/
  config.py     SimConfig, Behaviour, service-time and fault specs (one textual form for CLI/JSON/API)
  plan.py       the fate of one request, drawn from the faults on arrival
  jobs.py       a job parsed from the dispatcher's request, and its log record
  gpu.py        one GPU: slot accounting, counters, a job's life from arrival to callback
  callbacks.py  the shared callback client (pooled keep-alive session, retries on errors/5xx only)
  server.py     the HTTP endpoints and where they listen (one port with paths, or a port per GPU)
  control.py    /_control, /_stats, /_reset
  threaded.py   a service on its own loop in a background thread
  fleet.py      SimFleet: the fleet in a thread, for tests and benchmarks
  testing.py    CallbackReceiver and poll_until, for tests
  __main__.py   the CLI (python -m simgpu / gpuq-simgpu)
  loadtest.py   how many jobs/s one simulator process sustains
"""

from simgpu.config import Behaviour, ConfigError, Fault, ServiceTime, SimConfig
from simgpu.fleet import SimFleet
from simgpu.testing import CallbackReceiver, poll_until

__all__ = [
    "Behaviour",
    "CallbackReceiver",
    "ConfigError",
    "Fault",
    "ServiceTime",
    "SimConfig",
    "SimFleet",
    "poll_until",
]
