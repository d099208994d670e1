"""docker-compose.yml and .docker/Dockerfile, checked without a Docker engine (none runs here).

The compose file is validated against the Compose Specification's JSON schema, the copy vendored
in the ``check-jsonschema`` package (``check_jsonschema/builtin_schemas/vendor/compose-spec.json``,
from github.com/compose-spec/compose-spec, Apache-2.0; its licence ships beside it). The Dockerfile
is parsed with ``dockerfile-parse``: a base image, the command runs ``x402gw``, and every file it
copies exists and is let through by its ``.dockerignore``.
"""

from __future__ import annotations

import copy
import json
import re
import tomllib
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml  # type: ignore[import-untyped]
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / ".docker" / "Dockerfile"
DOCKERIGNORE = ROOT / ".docker" / "Dockerfile.dockerignore"
VENDOR = "check_jsonschema.builtin_schemas.vendor"


@cache
def compose_schema() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads(resources.files(VENDOR).joinpath("compose-spec.json").read_text(encoding="utf-8"))
    return schema


def compose_errors(document: Any) -> list[str]:
    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


def load_compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def test_the_vendored_schema_is_the_compose_specification_under_its_licence() -> None:
    schema = compose_schema()
    assert schema["$id"] == "compose_spec.json" and "services" in schema["properties"]
    licence = resources.files(VENDOR).joinpath("licenses", "LICENSE.compose-spec").read_text(encoding="utf-8")
    assert "Apache License" in licence


def test_docker_compose_yml_follows_the_compose_specification() -> None:
    assert compose_errors(load_compose()) == []


@pytest.mark.parametrize(
    "break_it",
    [
        lambda d: d["services"]["gateway"].__setitem__("depends_on", {"redis": {"condition": "when_ready"}}),
        lambda d: d["services"]["redis"]["healthcheck"].__setitem__("retries", [20]),
        lambda d: d["services"]["gateway"].__setitem__("port", ["8402:8402"]),
        lambda d: d.__setitem__("service", d.pop("services")),
    ],
    ids=["unknown-condition", "retries-a-list", "misspelt-ports", "misspelt-services"],
)
def test_the_schema_check_catches_a_broken_compose_file(break_it: Any) -> None:
    broken = copy.deepcopy(load_compose())
    break_it(broken)
    assert compose_errors(broken), "a broken compose file passed the schema"


def dockerfile() -> DockerfileParser:
    return DockerfileParser(path=str(DOCKERFILE))


def instructions(name: str) -> list[str]:
    return [item["value"] for item in dockerfile().structure if item["instruction"] == name]


def test_dockerfile_starts_from_a_pinned_python_base_image() -> None:
    first = next(i for i in dockerfile().structure if i["instruction"] not in ("COMMENT", "ARG"))
    assert first["instruction"] == "FROM"
    assert re.fullmatch(r"python:3\.1[1-9][\w.-]*", dockerfile().baseimage), dockerfile().baseimage


def test_dockerfile_command_runs_x402gw() -> None:
    [command] = instructions("CMD")
    assert not instructions("ENTRYPOINT")
    argv = json.loads(command)  # exec form: signals reach x402gw, not a shell
    assert argv[0] == "x402gw" and argv[1] == "serve"
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    assert scripts["x402gw"] == "gateway.cli:main"


def _ignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    patterns = []
    for raw in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keep = line.startswith("!")
        glob = line.lstrip("!").strip("/")
        regex = "".join(
            ".*" if part == "**" else re.escape(part) if part not in ("*", "?") else "[^/]*" if part == "*" else "[^/]"
            for part in re.split(r"(\*\*|\*|\?)", glob)
        )
        patterns.append((keep, re.compile(regex)))
    return patterns


def sent_to_docker(relative: str) -> bool:
    """Whether the build context holds this file: the last .dockerignore pattern matching it or
    one of its parent folders decides (``!`` lets it through)."""
    parts = relative.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    sent = True
    for keep, pattern in _ignore_patterns():
        if any(pattern.fullmatch(c) for c in candidates):
            sent = keep
    return sent


def test_the_dockerignore_matcher_reads_the_file_as_docker_does() -> None:
    assert sent_to_docker("gateway/app.py") and sent_to_docker("pyproject.toml")
    assert not sent_to_docker("tests/conftest.py") and not sent_to_docker(".venv/bin/python")
    assert not sent_to_docker("gateway/__pycache__/app.cpython-311.pyc")


def test_every_copy_source_exists_and_reaches_the_build() -> None:
    copies = instructions("COPY")
    assert copies
    for value in copies:
        words = [w for w in value.split() if not w.startswith("--")]
        assert len(words) >= 2, value
        for source in words[:-1]:
            path = ROOT / source
            assert path.exists(), f"Dockerfile copies {source}, which is not in the repository"
            files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
            assert files, source
            for file in files:
                relative = file.relative_to(ROOT).as_posix()
                assert sent_to_docker(relative), f"{relative} is copied but .dockerignore keeps it out of the build"


def test_the_image_gets_what_the_devchain_set_up_job_deploys() -> None:
    """The compose set-up job deploys the test token from the package's own artifacts."""
    for artifact in ("TestUSDC.json", "BatchSettler.json"):
        relative = f"gateway/devkit/contracts/{artifact}"
        assert (ROOT / relative).is_file() and sent_to_docker(relative)
