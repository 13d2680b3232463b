"""compose.yaml parses and wires the five services as the design says."""

import os
import shutil
import subprocess

import pytest
import yaml

from tests.worker.services import REPO

COMPOSE = REPO / "compose.yaml"


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load(COMPOSE.read_text())


def test_services_and_dependencies(compose):
    services = compose["services"]
    assert set(services) == {"redis", "postgres", "migrate", "worker", "flower"}
    assert services["migrate"]["command"] == ["pagedq", "migrate"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    worker = services["worker"]
    assert worker["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    for name in ("redis", "postgres", "worker", "flower"):
        assert services[name]["healthcheck"]["test"], name


def test_worker_reserves_a_gpu(compose):
    devices = compose["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]


def test_worker_and_flower_share_the_settings(compose):
    worker = compose["services"]["worker"]["environment"]
    flower = compose["services"]["flower"]["environment"]
    for name in ("PAGEDQ_BROKER_URL", "PAGEDQ_DATABASE_URL", "PAGEDQ_MODEL"):
        assert worker[name] == flower[name]
    assert worker["PAGEDQ_DATABASE_URL"].startswith("postgresql+psycopg://")


def test_flower_is_published_on_loopback_only_with_a_password(compose):
    flower = compose["services"]["flower"]
    assert all(port.startswith("127.0.0.1:") for port in flower["ports"])
    assert "FLOWER_PASSWORD" in flower["environment"]["PAGEDQ_FLOWER_PASSWORD"]


def _compose_cli() -> bool:
    if shutil.which("docker") is None:
        return False
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _compose_cli(), reason="docker compose is not installed")
def test_docker_compose_config():
    env = {**os.environ, "FLOWER_PASSWORD": "test"}
    result = subprocess.run(["docker", "compose", "-f", str(COMPOSE), "config", "--quiet"],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
