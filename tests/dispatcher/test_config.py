"""A missing or malformed setting stops the dispatcher at start with one clear line naming the variable."""

from __future__ import annotations

import pytest

from dispatcher.settings import DispatcherSettings
from dispatcher.testing import DispatcherProcess
from producer.errors import ConfigError
from producer.settings import load

GOOD = {"CALLBACK_SECRET": "0123456789abcdef" * 2, "DATABASE_URL": "sqlite:///:memory:"}


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"CALLBACK_SECRET": ""}, "CALLBACK_SECRET"),
        ({"CALLBACK_SECRET": "short"}, "CALLBACK_SECRET"),
        ({"CALLBACK_SECRET": " " * 20}, "does not look random"),  # an outside trial's; anyone could sign
        ({"CALLBACK_SECRET": "a" * 16}, "does not look random"),
        ({"CALLBACK_SECRET": "abc" * 8}, "does not look random"),
        ({"API_TOKEN": "short"}, "API_TOKEN must be a random string"),  # an outside trial's, taken as it was
        ({"API_TOKEN": "x" * 32}, "API_TOKEN must be a random string"),
        # an outside trial: tokens that passed but no request could send; every client got 401
        ({"API_TOKEN": "0123456789abcdef "}, "API_TOKEN begins or ends with whitespace"),
        ({"API_TOKEN": " 0123456789abcdef"}, "API_TOKEN begins or ends with whitespace"),
        ({"API_TOKEN": "0123456789\nabcdef"}, "API_TOKEN holds '\\n'"),
        ({"API_TOKEN": "0123456789abcdéf"}, "API_TOKEN holds 'é'"),
        ({"API_TOKEN": "abcd" + " " * 8 + "efgh"}, "API_TOKEN must be a random string"),
        ({"CALLBACK_SECRET": "abcd" + " " * 12}, "does not look random"),  # 4 characters and padding
        ({"GPU_ENDPOINTS": "g0=ftp://x"}, "GPU_ENDPOINTS"),
        ({"GPU_ENDPOINTS": "g0=http://a:1,g0=http://b:2"}, "GPU_ENDPOINTS"),
        ({"GPU_ENDPOINTS": "g0=http://a:1/g0;g1=http://a:1/g1"}, "GPU_ENDPOINTS"),  # issue 14
        ({"GPU_ENDPOINTS": "g0=http://a:1/g0 g1=http://a:1/g1"}, "GPU_ENDPOINTS"),
        ({"DATABASE_URL": "mysql://root@127.0.0.1/db"}, "mysql+pymysql"),
        ({"SLOTS_PER_GPU": "zero"}, "SLOTS_PER_GPU"),
        ({"TASK_QUEUES": "bad queue!"}, "TASK_QUEUES"),
        ({"TASK_ROUTES": "embed"}, "TASK_ROUTES"),
        ({"TASK_ROUTES": "embed=my pool"}, "TASK_ROUTES"),  # a pool is a queue name
        (
            {"TASK_QUEUES": "task_queue_1", "TASK_ROUTES": "embed={task_queue_1}"},
            "TASK_ROUTES",
        ),  # shared keys
        ({"DATABASE_URL": "postgres://x"}, "DATABASE_URL"),
        ({"REDIS_URL": "http://x"}, "REDIS_URL"),
        # redis-py reads a path that is not a number as database 0: a dispatcher waited on the wrong db
        ({"REDIS_URL": "redis://127.0.0.1:6379/11x"}, "a database number"),
        ({"REDIS_URL": "redis://127.0.0.1:6379/0/extra"}, "REDIS_URL"),
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
        # Durations are added to datetimes: inf or an absurd one would dead-letter every job, not stop the start
        ({"TASK_TIMEOUT_SECONDS": "inf"}, "TASK_TIMEOUT_SECONDS"),
        ({"TASK_TIMEOUT_SECONDS": "1e300"}, "TASK_TIMEOUT_SECONDS"),
        ({"RETRY_BACKOFF_SECONDS": "nan"}, "RETRY_BACKOFF_SECONDS"),
        ({"RESULT_TTL_SECONDS": "1e12"}, "RESULT_TTL_SECONDS"),
        ({"SHUTDOWN_GRACE_SECONDS": "inf"}, "SHUTDOWN_GRACE_SECONDS"),
        ({"IDLE_POLL_SECONDS": "0.000001"}, "IDLE_POLL_SECONDS"),  # an idle dispatcher would spin
        ({"LOG_LEVEL": "verbose"}, "LOG_LEVEL"),
        ({"REDIS_WAIT_TIMEOUT_SECONDS": "nan"}, "REDIS_WAIT_TIMEOUT_SECONDS"),
        # the cap won without a word (a trial): 600 s asked, 300 s waited
        ({"RETRY_BACKOFF_SECONDS": "600"}, "RETRY_BACKOFF_MAX_SECONDS"),
        ({"RETRY_BACKOFF_SECONDS": "5", "RETRY_BACKOFF_MAX_SECONDS": "1"}, "above RETRY_BACKOFF_MAX_SECONDS"),
    ],
)
def test_bad_setting_names_the_variable(monkeypatch, env, names):
    for name, value in {**GOOD, **env}.items():
        monkeypatch.setenv(name, value)
    if env.get("CALLBACK_SECRET") == "":
        monkeypatch.delenv("CALLBACK_SECRET")
    with pytest.raises(ConfigError) as err:
        load(DispatcherSettings, _env_file=None)
    assert names in err.value.message
    assert "\n" not in err.value.message


@pytest.mark.slow  # 7 s on a loaded 2-core machine (make test-fast stays under a minute)
def test_daemon_exits_2_with_one_line(tmp_path):
    # no CALLBACK_SECRET: the inherited environment's is dropped with every other dispatcher variable
    settings = {"DATABASE_URL": "sqlite:///:memory:", "GPU_ENDPOINTS": "g0=nope"}
    run = DispatcherProcess(settings, workdir=tmp_path).run()
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1, run.stderr
    assert run.stderr.startswith("gpuq dispatcher: ")
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize("level", ["warn", "WARNING", "debug", "fatal", "NOTSET"])
def test_python_log_level_names_are_accepted(monkeypatch, level):
    for name, value in GOOD.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("LOG_LEVEL", level)
    assert load(DispatcherSettings, _env_file=None).log_level == level.upper()


@pytest.mark.parametrize(
    ("env", "warned"),
    [
        ({"STANDBY_JOBS": "true", "HANDOFF_BUFFER": "0"}, True),  # asked for, cannot be: said at start
        ({"HANDOFF_BUFFER": "0"}, False),  # hand-off turned off, standbys on only by default: nothing to say
        ({"STANDBY_JOBS": "true", "HANDOFF_BUFFER": "8"}, False),
    ],
)
def test_standby_jobs_asked_for_without_a_buffer_is_said_at_start(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], warned: bool
) -> None:
    for name, value in (GOOD | env).items():
        monkeypatch.setenv(name, value)
    warning = load(DispatcherSettings).standby_warning()
    assert (warning is not None) == warned
    if warned:
        assert warning is not None and "HANDOFF_BUFFER=0" in warning and "STANDBY_JOBS" in warning


@pytest.mark.parametrize(
    ("env", "warned"),
    [
        ({"TASK_TIMEOUT_SECONDS": "0.05"}, True),  # an outside trial: 9 jobs on a 4-slot GPU
        ({"TASK_TIMEOUT_SECONDS": "10", "GPU_REQUEST_TIMEOUT_SECONDS": "11"}, True),
        ({"TASK_TIMEOUT_SECONDS": "30", "GPU_REQUEST_TIMEOUT_SECONDS": "30"}, False),
        ({}, False),  # the defaults: 900 s leases, 30 s requests
    ],
)
def test_a_lease_shorter_than_a_request_is_said_at_start(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], warned: bool
) -> None:
    for name, value in (GOOD | env).items():
        monkeypatch.setenv(name, value)
    warning = load(DispatcherSettings).lease_warning()
    assert (warning is not None) == warned
    if warned:
        assert (
            warning is not None
            and "TASK_TIMEOUT_SECONDS=" in warning
            and "more jobs than its slots" in warning
        )


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("0.0.0.0", "http://127.0.0.1:8000/callback"),
        ("::", "http://[::1]:8000/callback"),  # IPv6 only, as asyncio binds "::": 127.0.0.1 reached nothing
        ("::1", "http://[::1]:8000/callback"),
        ("[::1]", "http://[::1]:8000/callback"),  # written as in a URL: the start stopped on it (a trial)
        ("gpu-host", "http://gpu-host:8000/callback"),
    ],
)
def test_the_default_callback_url_reaches_the_listening_socket(
    monkeypatch: pytest.MonkeyPatch, host: str, url: str
) -> None:
    for name, value in (GOOD | {"CALLBACK_HOST": host}).items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("CALLBACK_URL", raising=False)
    assert load(DispatcherSettings).public_callback_url == url
