"""infra/: the files checked for what would break a deploy: compose.yaml against the Compose Specification's
JSON schema (as vendored by check-jsonschema) plus health and start order, every COPY source of the
Dockerfile present, and the systemd unit's restart and stop settings. `make test-docker`
(infra/test-docker.sh) builds and runs the stack itself."""

from __future__ import annotations

import configparser
import json
import re
import shlex
import subprocess
import sys
import tomllib
from importlib.resources import files
from pathlib import Path

import jsonschema
import pytest
import yaml

from dispatcher.settings import DispatcherSettings
from tests.dispatcher.harness import ROOT

INFRA = ROOT / "infra"
DEFAULT_GRACE = DispatcherSettings.model_fields["shutdown_grace_seconds"].default


def compose() -> dict:
    return yaml.safe_load((INFRA / "compose.yaml").read_text())


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", (INFRA / "Dockerfile").read_text())
    out = []
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(s|m)?", value)
    assert match, value
    return float(match[1]) * (60 if match[2] == "m" else 1)


def test_compose_file_is_valid_by_the_compose_spec_schema():
    schema = json.loads(
        files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text()
    )
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = sorted(validator.iter_errors(compose()), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)
    # and the schema does catch mistakes
    typo = compose()
    typo["services"]["redis"]["healthcheck"]["intervall"] = "5s"
    assert any("intervall" in e.message for e in validator.iter_errors(typo))
    wrong = compose()
    wrong["services"]["dispatcher"]["depends_on"]["redis"]["condition"] = "service_ready"
    assert list(validator.iter_errors(wrong))


def test_compose_services_are_healthchecked_and_start_in_order():
    services = compose()["services"]
    assert set(services) == {"redis", "mysql", "simgpu", "dispatcher", "dispatcher-2"}
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    redis_cmd = services["redis"]["command"]
    assert redis_cmd[redis_cmd.index("--appendonly") + 1] == "yes", "Redis must persist its queues"
    assert services["simgpu"]["command"][:3] == ["python", "-m", "simgpu"]
    for name in ("dispatcher", "dispatcher-2"):
        assert services[name]["depends_on"] == {
            dep: {"condition": "service_healthy"} for dep in ("redis", "mysql", "simgpu")
        }
        env = services[name]["environment"]
        endpoints = env["GPU_ENDPOINTS"].split(",")
        assert len(endpoints) == 4 and all("simgpu:9100" in e for e in endpoints)
        assert env["CALLBACK_URL"] == f"http://{name}:8000/callback"
        assert env["CALLBACK_SECRET"].startswith("${CALLBACK_SECRET:?"), "no default secret in a shipped file"
        # the dispatcher listens beyond loopback here: /tasks and /gpus need a token, chosen by the user
        assert env["API_TOKEN"].startswith("${API_TOKEN:?"), "no default API token in a shipped file"
        grace = float(env["SHUTDOWN_GRACE_SECONDS"])
        assert seconds(services[name]["stop_grace_period"]) > 3 * grace + 1
    for name in ("dispatcher", "dispatcher-2", "simgpu"):
        build = services[name]["build"]
        assert (INFRA / build["context"] / build["dockerfile"]).resolve() == INFRA / "Dockerfile"


def test_dockerfile_builds_from_files_that_exist_and_runs_unprivileged():
    steps = dockerfile()
    # the tag infra/local-images/build-bases.sh gives its stand-in where no registry is reachable
    assert steps[0] == ("FROM", "python:3.11-slim-bookworm")
    assert "PYTHON_TAG=python:3.11-slim-bookworm" in (INFRA / "local-images" / "build-bases.sh").read_text()
    context = ROOT  # compose and the README build with the repository root as context
    ignored = [
        p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and p[0] != "#"
    ]
    copied = []
    for word, args in steps:
        if word in ("COPY", "ADD"):
            *sources, _dest = shlex.split(args)
            for source in sources:
                assert not source.startswith("--"), "no --from/--chown needed; keep COPY plain"
                assert (context / source).exists(), f"COPY source {source} does not exist"
                top = source.rstrip("/").split("/")[0]
                assert top not in ignored, f"{source} is excluded by .dockerignore"
                copied.append(source.rstrip("/"))
    # what `pip install .` needs is in the image: the packages and pyproject's readme
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert {
        "requirements.txt",
        "pyproject.toml",
        project["readme"],
        "producer",
        "dispatcher",
        "simgpu",
        "sql",
    } <= set(copied)
    users = [args for word, args in steps if word == "USER"]
    assert users and users[-1] not in ("root", "0")
    words = [w for w, _ in steps]
    assert words.index("USER") < words.index("CMD")
    assert json.loads(dict(steps)["CMD"]) == ["python", "-m", "dispatcher"]
    assert "/healthz" in dict(steps)["HEALTHCHECK"]
    env = " ".join(args for word, args in steps if word == "ENV")
    workdirs = [args for word, args in steps if word == "WORKDIR"]
    assert f"GPUQ_SQL_DIR={workdirs[0]}/sql" in env, "the CLI finds sql/queries.sql where the image put it"


def test_systemd_unit_restarts_and_drains():
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.optionxform = str
    unit.read_string((INFRA / "gpuq-dispatcher.service").read_text())
    service = unit["Service"]
    assert service["Restart"] == "always"
    assert service["RestartPreventExitStatus"] == "2"  # a bad setting: restarting cannot help
    assert service["EnvironmentFile"].startswith("/etc/")
    assert service["KillSignal"] == "SIGTERM"
    assert seconds(service["TimeoutStopSec"]) > 3 * DEFAULT_GRACE + 1
    assert service["User"] not in ("root", "0")
    assert service["ExecStart"].endswith("python -m dispatcher")
    assert unit["Install"]["WantedBy"] == "multi-user.target"


@pytest.mark.parametrize(
    "script",
    [
        "ensure-chromium.sh",
        "ensure-services.sh",
        "sam-check.sh",
        "test-docker.sh",
        "local-images/build-bases.sh",
        "local-images/mariadb-entrypoint.sh",
        "local-images/mariadb-healthcheck.sh",
    ],
)
def test_shell_scripts_parse(script):
    subprocess.run(["bash", "-n", str(INFRA / script)], check=True)


def test_local_images_override_only_the_registry_images():
    """compose.local-images.yaml swaps the Redis and MariaDB images and nothing else, and names the tags
    build-bases.sh builds; `make test` runs `make test-docker`."""
    override = yaml.safe_load((INFRA / "compose.local-images.yaml").read_text())
    assert {name: set(svc) for name, svc in override["services"].items()} == {
        "redis": {"image"},
        "mysql": {"image"},
    }
    bases = (INFRA / "local-images" / "build-bases.sh").read_text()
    assert f"REDIS_TAG={override['services']['redis']['image']}" in bases
    assert f"MARIADB_TAG={override['services']['mysql']['image']}" in bases
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^test-docker:\n\ttimeout \d+ bash infra/test-docker\.sh$", makefile, re.M)
    assert re.search(r"^test:.*(\n\t.*)*\n\t\$\(MAKE\) test-docker$", makefile, re.M)


def test_make_schema_sql_regenerates_the_file(tmp_path):
    out = tmp_path / "schema.sql"
    subprocess.run([sys.executable, "-m", "dispatcher.db.ddl", str(out)], check=True, cwd=ROOT)
    assert out.read_text() == (ROOT / "sql" / "schema.sql").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^schema-sql:.*\n\t.*-m dispatcher\.db\.ddl sql/schema\.sql", makefile, re.M)
    assert re.search(r"^test:.*(\n\t.*)*\n\tbash infra/ensure-chromium\.sh", makefile, re.M)


def test_paths_used_by_the_files_exist():
    for path in (
        "requirements.txt",
        "sql/queries.sql",
        "sql/schema.sql",
        "dispatcher/http/dashboard/page.html",
    ):
        assert Path(ROOT / path).is_file(), path


def test_systemd_install_steps_create_their_directories():
    """The unit's install steps run as written on a fresh machine: /etc/gpuq does not exist yet (issue 14)."""
    steps = [line[1:].strip() for line in (INFRA / "gpuq-dispatcher.service").read_text().splitlines()]
    installs = [s for s in steps if s.startswith("install ") and "/etc/" in s]
    assert installs and all(" -D " in s for s in installs), installs
    assert not any(s.startswith("cp ") and "/etc/" in s for s in steps)
