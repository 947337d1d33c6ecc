"""Prove the `sam build` artefact works on its own: `python tests/check_sam_build.py .aws-sam/build`.

Imports ``producer.handler.lambda_handler`` in a fresh interpreter whose only path besides the standard
library is the function's build folder (``python -I -S``: no site-packages, no PYTHON* variables, no
current directory), as Lambda would, then invokes it with Redis unreachable. It must answer, not raise.
This catches a package copied to the wrong place, a dependency missing from producer/requirements.txt,
a wheel built for the wrong platform, and settings read at import time.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

PROBE = r"""
import json, sys
build = sys.argv[1]
sys.path.insert(0, build)
from producer.handler import lambda_handler
import aws_lambda_powertools, pydantic, pydantic_core, redis, producer
strays = [m.__name__ for m in (producer, aws_lambda_powertools, pydantic, pydantic_core, redis)
          if not m.__file__.startswith(build)]
assert not strays, f"imported from outside the build folder: {strays}"
assert "boto3" not in sys.modules, "boto3 imported without REDIS_SECRET_ARN (it should be lazy)"
events = json.loads(sys.argv[2])
print(json.dumps([lambda_handler(event, None) for event in events]))
"""

EVENTS = [
    {"type": "start_transcribe", "data": {"s3_bucket": "b", "s3_key": "k.wav"}},  # direct, Redis down
    {"httpMethod": "POST", "requestContext": {"requestId": "r"}, "body": '{"type": "t"}'},  # API, Redis down
    {"something": "else"},  # unknown shape
]


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: check_sam_build.py .aws-sam/build", file=sys.stderr)
        return 2
    build = Path(sys.argv[1]).resolve() / "ProducerFunction"
    if not (build / "producer" / "handler.py").is_file():
        print(f"check_sam_build: {build}/producer/handler.py is missing", file=sys.stderr)
        return 1
    with socket.socket() as closed:  # bound, never listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        env = {
            "PATH": "/usr/bin:/bin",
            "REDIS_URL": f"redis://127.0.0.1:{closed.getsockname()[1]}/0",
            "TASK_QUEUES": "sam_check",
            "POWERTOOLS_LOG_LEVEL": "ERROR",
        }
        proc = subprocess.run(
            [sys.executable, "-I", "-S", "-c", PROBE, str(build), json.dumps(EVENTS)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    if proc.returncode != 0:
        print(f"check_sam_build: the built handler failed:\n{proc.stderr}", file=sys.stderr)
        return 1
    direct, api, unknown = json.loads(proc.stdout.strip().splitlines()[-1])
    problems = []
    if direct != {"error": "The job queue (Redis) is unreachable."}:
        problems.append(f"direct event with Redis down answered {direct}")
    if api.get("statusCode") != 503:
        problems.append(f"API event with Redis down answered {api}")
    if "no shape gpuq knows" not in unknown.get("error", ""):
        problems.append(f"unknown event answered {unknown}")
    for problem in problems:
        print(f"check_sam_build: {problem}", file=sys.stderr)
    if not problems:
        print(f"check_sam_build: OK - {build} imports alone and answers with Redis unreachable")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
