"""``python -m reference --port 9200``: load the model, then serve it until SIGTERM or SIGINT.

BEARER_TOKEN="$BEARER_TOKEN" python -m reference --port 9200
# then register it with gpuq: GPU_ENDPOINTS="g0=http://<this host>:9200/embed"

GPUQ_AGENT_TOKEN="$(gpuq gpu add g7 --pull)" python -m reference --pull http://dispatcher:8000 --gpu-id g7
# a pull agent (SPEC §9): it listens on nothing and long-polls the dispatcher for g7's jobs (agent.py)

The model is loaded before the port opens, so anything that can connect can be served, and the dispatcher's
probe sees the GPU as healthy only once it really is.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

import uvicorn

from reference.embed_service import ServiceSettings, create_app


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m reference", description="Serve sentence embeddings to gpuq.")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=9200)
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when available, else cpu)")
    p.add_argument("--slots", type=int, default=4, help="concurrent jobs, = the dispatcher's SLOTS_PER_GPU")
    p.add_argument(
        "--heartbeat-seconds",
        type=float,
        default=10.0,
        help="send running heartbeats this often during a job (default 10; below TASK_TIMEOUT_SECONDS)",
    )
    p.add_argument("--max-inputs", type=int, default=256, help="texts per job at most (default 256)")
    p.add_argument("--sync", action="store_true", help="answer with the result instead of calling back")
    p.add_argument(
        "--max-hold-seconds",
        type=float,
        default=0.0,
        help="let a job ask, with data.hold_seconds, to keep its slot at least that long, heartbeating "
        "(to try leases on fast hardware; default 0: no holds)",
    )
    p.add_argument(
        "--token",
        default=os.environ.get("BEARER_TOKEN", ""),
        help="bearer token requests must carry (default $BEARER_TOKEN)",
    )
    p.add_argument("--pull", metavar="URL", help="run as a pull agent of the dispatcher at URL (no port)")
    p.add_argument("--gpu-id", help="with --pull: the pull GPU's name (gpuq gpu add NAME --pull)")
    p.add_argument(
        "--agent-token",
        default=os.environ.get("GPUQ_AGENT_TOKEN", ""),
        help="with --pull: its agent token (default $GPUQ_AGENT_TOKEN)",
    )
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p.parse_args(argv)


async def run_agent(model: object, settings: ServiceSettings, args: argparse.Namespace) -> int:
    """Pull mode: poll until SIGTERM/SIGINT, then let running jobs finish and call back."""
    from reference.agent import AgentRefused, PullAgent
    from reference.callback import Callbacks
    from reference.embed_service import EmbedService

    service = EmbedService(model, settings, Callbacks())  # type: ignore[arg-type]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    agent = PullAgent(service, args.pull, args.gpu_id, args.agent_token)
    try:
        await agent.run(stop)
    except AgentRefused as exc:
        print(f"reference: error: {exc}", file=sys.stderr)
        return 2
    finally:
        await service.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.pull and (not args.gpu_id or not args.agent_token):
        print(
            "reference: error: --pull needs --gpu-id and an agent token (--agent-token or $GPUQ_AGENT_TOKEN)",
            file=sys.stderr,
        )
        return 2
    if not args.token and not args.pull:
        print("reference: error: set BEARER_TOKEN (or --token); the service never runs open", file=sys.stderr)
        return 2
    if args.slots < 1 or args.heartbeat_seconds <= 0 or args.max_inputs < 1 or args.max_hold_seconds < 0:
        print(
            "reference: error: --slots, --heartbeat-seconds and --max-inputs must be > 0, "
            "--max-hold-seconds >= 0",
            file=sys.stderr,
        )
        return 2
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per callback otherwise; ours say more

    from reference.model import Embedder  # torch's import is slow: only once the arguments are known good

    settings = ServiceSettings(
        bearer_token=args.token,
        slots=args.slots,
        heartbeat_seconds=args.heartbeat_seconds,
        max_inputs=args.max_inputs,
        sync=args.sync,
        max_hold_seconds=args.max_hold_seconds,
        pull=bool(args.pull),
    )
    model = Embedder(device=args.device)
    if args.pull:
        return asyncio.run(run_agent(model, settings, args))
    app = create_app(model, settings)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level.lower(), access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
