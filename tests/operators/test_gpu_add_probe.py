"""``gpuq gpu add`` probes the URL first (a GET). A service that answers 404 there says the path is wrong:
the command used to print a warning, register the GPU anyway and exit 0, so a script (the KEDA sidecar, a
deploy job) went on with a GPU that would refuse every job. Now it exits 2 with one line naming the URL and
the status, and registers nothing; ``--no-probe`` still registers without asking."""

from __future__ import annotations

from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler

import pytest

from tests.dispatcher.helpers import http_server


class _Service(BaseHTTPRequestHandler):
    """A GPU service whose only route is ``POST /infer``: GET /infer is 405, any other path 404."""

    def do_GET(self) -> None:
        self.send_response(405 if self.path == "/infer" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def service(gpuq) -> Iterator[str]:
    assert gpuq("db", "init").exit_code == 0
    with http_server(_Service) as url:
        yield url


@pytest.mark.slow  # 4 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_gpu_add_refuses_a_url_that_answers_404(gpuq, service: str) -> None:
    wrong = f"{service}/wrong-path"
    # WHEN a GPU is added with a path its service does not have
    res = gpuq("gpu", "add", "g9", wrong)
    # THEN the command fails with one line naming the URL and the status, and nothing is registered
    assert res.exit_code == 2, res
    assert res.stderr.count("\n") == 1 and wrong in res.stderr and "404" in res.stderr, res.stderr
    assert "g9" not in gpuq("gpu", "list").stdout
    # AND --no-probe registers it all the same (a service registered before it is deployed)
    assert gpuq("gpu", "add", "g9", wrong, "--no-probe").exit_code == 0
    assert "g9" in gpuq("gpu", "list").stdout


@pytest.mark.slow  # 3 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_gpu_add_registers_a_post_only_route(gpuq, service: str) -> None:
    res = gpuq("gpu", "add", "g8", f"{service}/infer")  # GET answered 405: a service is there
    assert res.exit_code == 0, res
    assert "g8" in gpuq("gpu", "list").stdout
