"""Run the producer's Lambda handler on one event from the shell (the seed had ``python producer.py``).

    python -m producer '{"type": "start_transcribe", "data": {"s3_key": "a.wav"}}'
    python -m producer --file tests/events/sqs_mixed.json

Settings come from the environment and ``./.env`` when present, as for the dispatcher. The answer is
printed on stdout (JSON); logs go to stderr. Exit status 0 when everything was enqueued, 1 when the answer
reports a failure, 2 for unusable input.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m producer", description="Enqueue the tasks of one event, as the Lambda would."
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("event", nargs="?", help='the event as JSON: a task, {"tasks": [...]}, an AWS event')
    source.add_argument("-f", "--file", help="read the event from this JSON file ('-' for stdin)")
    args = parser.parse_args(argv)

    try:
        text = _read(args.file) if args.file else args.event
        event = json.loads(text)
    except (OSError, ValueError) as exc:
        print(f"error: cannot read the event: {exc}", file=sys.stderr)
        return 2

    _load_dotenv()
    from producer import enqueue
    from producer.errors import GpuqError
    from producer.handler import lambda_handler, logger

    if isinstance(logger.registered_handler, logging.StreamHandler):
        logger.registered_handler.setStream(sys.stderr)
    try:
        answer = lambda_handler(event, None)
    except GpuqError as exc:  # the S3 route raises on purpose so that Lambda retries
        print(json.dumps({"error": exc.message}))
        return 1
    finally:
        enqueue.close_clients()
    print(json.dumps(answer))
    return 1 if _failed(answer) else 0


def _read(path: str) -> str:
    return sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")


def _load_dotenv() -> None:
    from dotenv import load_dotenv

    env = Path(".env")
    if env.is_file():
        load_dotenv(env, override=False)  # the real environment wins, as in pydantic-settings


def _failed(answer: dict[str, Any]) -> bool:
    return bool("error" in answer or answer.get("batchItemFailures") or answer.get("statusCode", 200) >= 400)


if __name__ == "__main__":
    sys.exit(main())
