"""A callback receiver standing in for the dispatcher: records every POST, answers with scripted statuses."""

from __future__ import annotations

import json
import threading
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Receiver:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.script: dict[str, list[int]] = defaultdict(list)  # task_id -> statuses to answer, then 200
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with receiver._lock:
                    receiver.calls.append({"auth": self.headers.get("Authorization"), "body": body})
                    queued = receiver.script[body.get("task_id", "")]
                    status = queued.pop(0) if queued and body.get("status") != "running" else 200
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/callback"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> Receiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def finals(self, task_id: str) -> list[dict[str, Any]]:
        with self._lock:
            return [
                c for c in self.calls if c["body"]["task_id"] == task_id and c["body"]["status"] != "running"
            ]

    def beats(self, task_id: str) -> int:
        with self._lock:
            return sum(
                1 for c in self.calls if c["body"]["task_id"] == task_id and c["body"]["status"] == "running"
            )
