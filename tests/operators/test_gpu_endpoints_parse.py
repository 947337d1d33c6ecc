"""GPU_ENDPOINTS and ``gpuq gpu add`` refuse a URL whose port is not a number (review of issue 14).

Before: ``g0=http://127.0.0.1:91OO/g0`` (letter O) was registered; every request to it then failed in the
HTTP client as a connection error, using up the attempts of the jobs placed there."""

from __future__ import annotations

import pytest

from dispatcher.gpus.endpoints import parse_gpu_endpoints


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


@pytest.mark.parametrize(
    "raw",
    [
        "g0=http://gpu-1:9100/infer,g1=http://gpu-1:9100/infer",
        "g0=http://GPU-1:9100/infer,g1=HTTP://gpu-1:9100/infer/",  # case of scheme and host, a trailing slash
        "embed:g0=http://gpu-1/infer,embed:g1=http://gpu-1:80/infer",  # the default port
    ],
)
def test_one_service_under_two_names_is_refused(raw):
    # An outside trial: GPU_ENDPOINTS='gA=URL,gB=URL' started without a word, and the service behind URL got
    # the jobs of both GPUs: 8 at once on its 4 slots.
    with pytest.raises(ValueError, match=r"GPU g1: .* is GPU g0.s URL"):
        parse_gpu_endpoints(raw)


def test_one_service_may_serve_two_pools():
    # its slots split between two names, each in its pool (the service routes by job type): a review of the
    # first version, which refused it
    eps = parse_gpu_endpoints("embed:g0=http://h:8000/v1,chat:g1=http://h:8000/v1")
    assert [(e.pool, e.gpu_id) for e in eps] == [("embed", "g0"), ("chat", "g1")]


def test_other_paths_ports_and_pull_gpus_are_other_services():
    eps = parse_gpu_endpoints(
        "g0=http://gpu-1:9100/a,g1=http://gpu-1:9100/b,g2=http://gpu-1:9101/a,g3=https://gpu-1:9100/a,pull:g4,pull:g5"
    )
    assert [e.gpu_id for e in eps] == ["g0", "g1", "g2", "g3", "g4", "g5"]


def test_gpu_add_and_set_refuse_another_gpus_url(gpuq):
    assert gpuq("db", "init").exit_code == 0
    assert gpuq("gpu", "add", "g0", "http://127.0.0.1:9/g0", "--no-probe").exit_code == 0
    assert gpuq("gpu", "add", "g1", "http://127.0.0.1:9/g1", "--no-probe").exit_code == 0
    added = gpuq("gpu", "add", "g2", "http://127.0.0.1:9/g1/", "--no-probe")
    assert added.exit_code == 2 and "is GPU g1's URL" in added.stderr and "--slots" in added.stderr, added
    moved = gpuq("gpu", "set", "g0", "--url", "http://127.0.0.1:9/g1")
    assert moved.exit_code == 2 and "is GPU g1's URL" in moved.stderr, moved
    # the same GPU again at its own URL is no conflict (every dispatcher registers at start)
    assert gpuq("gpu", "add", "g1", "http://127.0.0.1:9/g1", "--no-probe", "--slots", "8").exit_code == 0
    listed = gpuq("gpu", "list", "--json")
    assert '"g2"' not in listed.stdout and "http://127.0.0.1:9/g0" in listed.stdout


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("gpu", "add", 'q"u\\o\nte', "http://127.0.0.1:9/q"), "GPU name 'q\"u\\\\o\\nte': not a name"),
        (("gpu", "add", "p,x=1", "http://127.0.0.1:9/p", "--pool", "po ol"), "GPU name 'p,x=1': not a name"),
        (("gpu", "add", "p", "http://127.0.0.1:9/p", "--pool", "po ol"), "pool 'po ol': not a name"),
        (("gpu", "add", "a:b", "http://127.0.0.1:9/p"), "GPU name 'a:b': not a name (':')"),
        (("gpu", "add", "p", "--pull", "--pool", "x\ty"), "pool 'x\\ty': not a name"),
    ],
)
def test_gpu_add_refuses_names_gpu_endpoints_cannot_hold(gpuq, args, says):
    # An outside trial: names with quotes, a backslash or a newline were registered (no GPU_ENDPOINTS can
    # name them), and a comma in a name gave an error about a GPU nobody typed ('po ol:p').
    assert gpuq("db", "init").exit_code == 0
    res = gpuq(*args, "--no-probe") if "--pull" not in args else gpuq(*args)
    assert res.exit_code == 2 and says in res.stderr, res
    assert gpuq("gpu", "list", "--json").stdout.strip() == "[]"


def test_gpu_endpoints_refuse_the_same_names():
    with pytest.raises(ValueError, match="GPU name 'a b': not a name"):
        parse_gpu_endpoints("a b=http://h:1/x")
    assert [e.gpu_id for e in parse_gpu_endpoints("gpu:a100:g-0.1=http://h:1/x,pod@2=http://h:1/y")] == [
        "g-0.1",
        "pod@2",
    ]


def test_a_pair_registered_before_the_rule_keeps_working(gpuq, gpuq_env):
    # A database holding two names for one URL from before: each GPU can still be added again and changed.
    from sqlalchemy import create_engine, text

    assert gpuq("db", "init").exit_code == 0
    assert gpuq("gpu", "add", "g0", "http://127.0.0.1:9/shared", "--no-probe").exit_code == 0
    assert gpuq("gpu", "add", "g1", "http://127.0.0.1:9/g1", "--no-probe").exit_code == 0
    engine = create_engine(gpuq_env["DATABASE_URL"])
    with engine.begin() as conn:  # as an older gpuq let it be registered
        conn.execute(text("UPDATE gpus SET url = 'http://127.0.0.1:9/shared' WHERE gpu_id = 'g1'"))
    engine.dispose()
    again = gpuq("gpu", "add", "g1", "http://127.0.0.1:9/shared", "--no-probe", "--slots", "2")
    assert again.exit_code == 0, again
    assert gpuq("gpu", "set", "g1", "--slots", "3").exit_code == 0
    moved = gpuq("gpu", "set", "g1", "--url", "http://127.0.0.1:9/g1")
    assert moved.exit_code == 0, moved
    back = gpuq("gpu", "set", "g1", "--url", "http://127.0.0.1:9/shared")  # a new pair is refused
    assert back.exit_code == 2 and "is GPU g0's URL in the same pool" in back.stderr, back


def test_gpu_set_refuses_a_pool_gpu_endpoints_cannot_hold(gpuq):
    assert gpuq("db", "init").exit_code == 0
    assert gpuq("gpu", "add", "g0", "http://127.0.0.1:9/g0", "--no-probe").exit_code == 0
    res = gpuq("gpu", "set", "g0", "--pool", "a,b")
    assert res.exit_code == 2 and "pool 'a,b': not a name" in res.stderr, res
    assert '"pool": "default"' in gpuq("gpu", "list", "--json").stdout
