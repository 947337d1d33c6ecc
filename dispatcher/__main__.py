"""``python -m dispatcher``: the dispatcher process (dispatcher/serve.py), with a Ctrl-C honoured from its
first instruction.

Two things made an early Ctrl-C misbehave (an outside trial). Imported here, the ~0.8 s of imports (FastAPI,
pydantic, SQLAlchemy, redis-py) answered one with a traceback from deep inside a library. And a process
started in the background of a script (``python -m dispatcher &``, no job control) inherits SIGINT ignored:
Python then leaves it ignored, so a SIGINT before uvicorn installed its handlers was lost and the dispatcher
started anyway, while the same SIGINT a second later stopped it. So SIGINT gets Python's own handler before
anything is imported, and one line says what happened.
"""

from __future__ import annotations

import signal
import sys


def interruptible() -> int:
    """``serve.main``, with a Ctrl-C before the server runs (uvicorn owns the signals then) said in one line,
    not a traceback from wherever the start was (the imports, preflight, the schema check). Nothing was
    taken from the queues yet: jobs are taken once the server serves."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        from dispatcher.serve import main

        return main()
    except KeyboardInterrupt:
        sys.stderr.write("gpuq dispatcher: interrupted while starting; no job was taken\n")
        return 130


if __name__ == "__main__":
    sys.exit(interruptible())
