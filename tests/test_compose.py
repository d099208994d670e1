"""docker-compose.yml, read without a Docker engine: every service, variable, file and dependency it
names exists, and the gateway's environment is a valid ``Settings``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

from catalog import load_catalogs
from gateway.devkit.devchain import Anvil, Deployment
from gateway.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
EXPECTED = {"gateway", "redis", "postgres", "anvil", "rest-upstream", "soap-warehouse", "devchain-init"}
ONE_SHOT = {"devchain-init"}
# Samples another change adds; remove a name once its module is in the tree.
MODULES_IN_PROGRESS = {"gateway.devkit.samples.soap_warehouse"}
_INTERPOLATION = re.compile(r"\$\{([A-Z0-9_]+)(?::?-([^}]*))?\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose["services"]
    return found


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    # Compose interpolation: ${NAME:-default} reads the host's environment; tests take the default.
    return {str(k): _INTERPOLATION.sub(lambda m: m.group(2) or "", str(v)) for k, v in env.items()}


def settings_env_names() -> set[str]:
    names: set[str] = set()
    prefix = Settings.model_config.get("env_prefix", "")
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        names.add(alias if isinstance(alias, str) else f"{prefix}{name}".upper())
    return names


def test_the_stack_has_every_service(compose: dict[str, Any]) -> None:
    assert set(services(compose)) == EXPECTED
    assert services(compose)["anvil"]["image"].startswith("ghcr.io/foundry-rs/foundry")
    anvil = services(compose)["anvil"]
    assert [*anvil["entrypoint"], *anvil["command"]] == ["anvil", "--host", "0.0.0.0", "--chain-id", "31337"]


def test_every_x402gw_variable_is_a_setting(compose: dict[str, Any]) -> None:
    known = settings_env_names()
    assert {"X402GW_DATABASE_URL", "X402GW_ADMIN_TOKEN", "X402_FACILITATOR_URL"} <= known
    for name, service in services(compose).items():
        for key in environment(service):
            if key.startswith(("X402GW_", "X402_")):
                assert key in known, f"{name}: {key} is not a field of gateway.settings.Settings"


def test_gateway_environment_is_valid_settings(compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    env = environment(services(compose)["gateway"])
    for key in settings_env_names():
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.host == "0.0.0.0" and settings.port == 8402
    assert settings.database_url.startswith("postgresql")
    assert settings.redis_url == "redis://redis:6379/0"
    assert settings.rpc_urls == {"eip155:31337": "http://anvil:8545"}
    assert settings.admin_token is not None and settings.admin_token.get_secret_value()
    assert settings.facilitator_url in (None, "")  # in-process facilitator by default
    assert settings.catalog == [Path("/var/x402gw/demo.yaml")]
    # The set-up job writes what the gateway reads, on the volume they share.
    init = environment(services(compose)["devchain-init"])
    assert init["X402GW_DEPLOYMENT_FILE"] == env["X402GW_DEPLOYMENT_FILE"]
    assert init["X402GW_CATALOG"] == env["X402GW_CATALOG"]


def test_dependencies_exist_and_wait_for_health(compose: dict[str, Any]) -> None:
    all_services = services(compose)
    for name, service in all_services.items():
        depends = service.get("depends_on") or {}
        if isinstance(depends, list):
            depends = {dep: {"condition": "service_started"} for dep in depends}
        for dep, spec in depends.items():
            assert dep in all_services, f"{name} depends on unknown service {dep}"
            condition = spec.get("condition", "service_started")
            if condition == "service_healthy":
                assert "healthcheck" in all_services[dep], f"{name} waits for {dep} to be healthy: it has no check"
            elif condition == "service_completed_successfully":
                assert dep in ONE_SHOT
    assert set(all_services["gateway"]["depends_on"]) == EXPECTED - {"gateway"}


def test_long_running_services_have_health_checks(compose: dict[str, Any]) -> None:
    for name, service in services(compose).items():
        if name in ONE_SHOT:
            assert service.get("restart") == "no"
            continue
        check = service.get("healthcheck")
        assert check and check.get("test"), f"{name} has no health check"
        assert check["test"][0] in ("CMD", "CMD-SHELL")


def test_builds_images_files_and_volumes_exist(compose: dict[str, Any]) -> None:
    declared_volumes = set(compose.get("volumes") or {})
    for name, service in services(compose).items():
        assert "image" in service or "build" in service, name
        if "build" in service:
            context = ROOT / service["build"]["context"]
            assert context.is_dir(), name
            assert (context / service["build"].get("dockerfile", "Dockerfile")).is_file(), name
        if "image" in service and "build" not in service:
            assert re.fullmatch(r"[a-z0-9./_-]+(:[A-Za-z0-9._-]+)?", service["image"]), service["image"]
        for volume in service.get("volumes") or []:
            source = str(volume).split(":", 1)[0]
            if not source.startswith((".", "/")):
                assert source in declared_volumes, f"{name}: volume {source} is not declared"
        command = service.get("command") or []
        if command[:2] == ["python", "-m"]:
            module = command[2]
            path = ROOT / (module.replace(".", "/") + ".py")
            assert path.is_file() or module in MODULES_IN_PROGRESS, f"{name}: no module {module}"
        elif command[:1] == ["python"]:
            assert (ROOT / command[1]).is_file(), f"{name}: no script {command[1]}"
    dockerfile = (ROOT / ".docker" / "Dockerfile").read_text(encoding="utf-8")
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), f"Dockerfile copies missing {source}"


def test_devchain_init_job_deploys_once_and_writes_the_catalog(tmp_path: Path) -> None:
    """The set-up job's script, run as compose runs it, against a fresh anvil."""
    with Anvil() as anvil:
        rpc_url = anvil.rpc_url
        env = {
            **os.environ, "ANVIL_RPC_URL": rpc_url, "REST_UPSTREAM_URL": "http://rest-upstream:9101",
            "X402GW_DEPLOYMENT_FILE": str(tmp_path / "devchain.json"), "X402GW_CATALOG": str(tmp_path / "demo.yaml"),
        }
        for _ in range(2):  # the second run finds the token deployed and keeps it
            done = subprocess.run([sys.executable, ".docker/devchain_init.py"], cwd=ROOT, env=env,
                                  capture_output=True, text=True, timeout=120, check=False)
            assert done.returncode == 0, done.stderr[-2000:]
    deployment = Deployment.read(tmp_path / "devchain.json")
    assert deployment.rpc_url == rpc_url and deployment.chain_id == 31337
    [catalog] = load_catalogs([tmp_path / "demo.yaml"]).catalogs
    assert {tool.upstream.base_url for tool in catalog.tools} == {"http://rest-upstream:9101"}
    assert {tool.payment.asset for tool in catalog.tools} == {deployment.token.address}
