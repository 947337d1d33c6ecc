"""GPU_ENDPOINTS and ``gpuq gpu add`` refuse a URL whose port is not a number (review of issue 14).

Before: ``g0=http://127.0.0.1:91OO/g0`` (letter O) was registered; every request to it then failed in the
HTTP client as a connection error, using up the attempts of the jobs placed there."""

from __future__ import annotations

import pytest

from dispatcher.settings import parse_gpu_endpoints


@pytest.mark.parametrize(
    "raw", ["g0=http://127.0.0.1:91OO/g0", "g0=http://127.0.0.1:99999/g0", "g0=http://:9100/g0"]
)
def test_a_url_with_a_bad_port_or_no_host_is_refused(raw):
    with pytest.raises(ValueError, match="is not an http"):
        parse_gpu_endpoints(raw)


def test_good_urls_still_parse():
    (a, b) = parse_gpu_endpoints("g0=http://127.0.0.1:9100/g0,embed:g1=https://gpu-1/embed")
    assert (a.url, b.pool, b.url) == ("http://127.0.0.1:9100/g0", "embed", "https://gpu-1/embed")


def test_gpu_add_refuses_a_bad_port(gpuq):
    res = gpuq("gpu", "add", "g9", "http://127.0.0.1:91OO/g9", "--no-probe")
    assert res.exit_code == 2 and "is not an http" in res.stderr, res
