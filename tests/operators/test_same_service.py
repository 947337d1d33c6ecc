"""Two spellings of one GPU service's URL are one service (``dispatcher/gpus/same_service.py``): registered
under two names in one pool, it got the jobs of both. An outside trial registered ``http://localhost:P/g0``
beside g0 at ``http://127.0.0.1:P/g0`` and saw 8 jobs at once on its 4 slots; ``127.1``, an IPv4-mapped IPv6
address and ``/./g0`` got through the same way."""

from __future__ import annotations

import pytest

from dispatcher.gpus.same_service import same_service

G0 = "http://127.0.0.1:19100/g0"


@pytest.mark.parametrize(
    "alias",
    [
        "http://localhost:19100/g0",
        "http://LOCALHOST.:19100/g0",
        "http://127.1:19100/g0",
        "http://2130706433:19100/g0",
        "http://0x7f.1:19100/g0",
        "http://[::ffff:127.0.0.1]:19100/g0",
        "http://127.0.0.1:19100/./g0",
        "http://127.0.0.1:19100/x/../g0",
        "http://127.0.0.1:19100//g0/",
        "http://127.0.0.1:19100/%67%30",
        "HTTP://127.0.0.1:19100/g0#fragment",
        # a review's: Linux connects 0.0.0.0 to the local host; clients fold fullwidth forms and IDNA
        "http://0:19100/g0",
        "http://0.0.0.0:19100/g0",
        "http://\uff4c\uff4f\uff43\uff41\uff4c\uff48\uff4f\uff53\uff54:19100/g0",  # fullwidth localhost
        "http://\uff11\uff12\uff17.\uff10.\uff10.\uff11:19100/g0",  # fullwidth digits
        "http://127\u30020\u30020\u30021:19100/g0",  # ideographic full stops
    ],
)
def test_spellings_of_one_url_are_one_service(alias: str) -> None:
    assert same_service(G0, alias)
    assert same_service(alias, G0)


@pytest.mark.parametrize(
    "other",
    [
        "http://127.0.0.1:19100/g1",
        "http://127.0.0.1:19100/G0",  # paths are case-sensitive
        "http://127.0.0.1:19100/g0%2F",  # an escaped slash is not a separator
        "http://127.0.0.1:19100/g0?device=1",  # a service may route on its query
        "http://127.0.0.2:19100/g0",  # another loopback address, maybe another process
        "http://[::1]:19100/g0",
        "http://127.0.0.1:19101/g0",
        "http://gpu-a.internal:19100/g0",  # names are not resolved: virtual hosts of one ingress differ
        "pull:g0",
    ],
)
def test_other_urls_are_other_services(other: str) -> None:
    assert not same_service(G0, other)


def test_names_are_compared_not_resolved() -> None:
    assert same_service("http://GPU-A.internal/infer", "http://gpu-a.internal:80/infer/")
    assert not same_service("http://gpu-a.internal/infer", "http://gpu-b.internal/infer")


def test_an_idna_name_and_its_ascii_form_are_one_name() -> None:
    assert same_service("http://b\u00fccher.example/x", "http://xn--bcher-kva.example/x")


def test_a_stored_url_that_no_longer_parses_is_compared_as_written() -> None:
    """A row an older version stored; comparing it must not raise (the registration's caller catches only
    UrlTaken): it is the same as itself only."""
    for odd in ("http://[garbage]/g0", "http://[::1/g0", "http://h\u2100/g0"):
        assert same_service(odd, odd)
        assert not same_service(odd, G0)
