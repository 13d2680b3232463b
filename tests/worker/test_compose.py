"""compose.yaml parses and wires the five services as the design says."""

import os
import re
import shutil
import subprocess

import pytest
import yaml

from tests.worker.services import REPO

COMPOSE = REPO / "compose.yaml"
PASSWORDS = ("REDIS_PASSWORD", "POSTGRES_PASSWORD", "FLOWER_PASSWORD")


def required(variable: str) -> re.Pattern[str]:
    """`${VARIABLE:?message}`: compose stops when the variable is unset or empty."""
    return re.compile(rf"\$\{{{variable}:\?[^}}]+\}}")


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load(COMPOSE.read_text())


def test_services_and_dependencies(compose):
    services = compose["services"]
    assert set(services) == {"redis", "postgres", "migrate", "worker", "gateway", "flower"}
    assert services["migrate"]["command"] == ["pagedq", "migrate"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("worker", "gateway"):
        after = services[name]["depends_on"]
        assert after["migrate"]["condition"] == "service_completed_successfully"
        assert after["redis"]["condition"] == "service_healthy"
    assert services["gateway"]["command"][:2] == ["pagedq", "serve"]
    for name in ("redis", "postgres", "worker", "gateway", "flower"):
        assert services[name]["healthcheck"]["test"], name


def test_worker_reserves_its_tensor_parallel_gpus(compose):
    worker = compose["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    # One engine rank per reserved GPU, and the value a valid engine setting.
    tp = worker["environment"]["PAGEDQ_TENSOR_PARALLEL_SIZE"]
    assert devices[0]["count"] == int(tp) == 2
    from worker.settings import Settings

    assert Settings(tensor_parallel_size=tp).tensor_parallel_size == 2


def test_worker_gateway_and_flower_share_the_settings(compose):
    worker = compose["services"]["worker"]["environment"]
    for other in ("gateway", "flower"):
        environment = compose["services"][other]["environment"]
        for name in ("PAGEDQ_BROKER_URL", "PAGEDQ_DATABASE_URL", "PAGEDQ_MODEL"):
            assert worker[name] == environment[name], (other, name)
    assert worker["PAGEDQ_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert worker["PAGEDQ_METRICS_PORT"] == "9400"


def test_only_flower_and_the_gateway_publish_ports_on_loopback(compose):
    services = compose["services"]
    published = [name for name, service in services.items() if "ports" in service]
    assert sorted(published) == ["flower", "gateway"]
    for name in published:
        ports = services[name]["ports"]
        assert ports and all(port.startswith("127.0.0.1:") for port in ports), name
    flower = services["flower"]
    assert required("FLOWER_PASSWORD").fullmatch(flower["environment"]["PAGEDQ_FLOWER_PASSWORD"])


def test_redis_requires_a_password_its_clients_use(compose):
    redis = compose["services"]["redis"]
    command = redis["command"]
    assert required("REDIS_PASSWORD").fullmatch(command[command.index("--requirepass") + 1])
    # The healthcheck logs in (redis-cli reads REDISCLI_AUTH) and wants a PONG,
    # since redis-cli exits 0 on a NOAUTH error too.
    assert required("REDIS_PASSWORD").fullmatch(redis["environment"]["REDISCLI_AUTH"])
    assert "redis-cli ping" in redis["healthcheck"]["test"][1]
    assert "grep -q PONG" in redis["healthcheck"]["test"][1]
    broker = compose["services"]["worker"]["environment"]["PAGEDQ_BROKER_URL"]
    assert re.fullmatch(rf"redis://:{required('REDIS_PASSWORD').pattern}@redis:6379/\d+", broker)


def test_postgres_requires_a_password_its_clients_use(compose):
    postgres = compose["services"]["postgres"]
    assert required("POSTGRES_PASSWORD").fullmatch(postgres["environment"]["POSTGRES_PASSWORD"])
    url = compose["services"]["migrate"]["environment"]["PAGEDQ_DATABASE_URL"]
    assert required("POSTGRES_PASSWORD").search(url)


def test_no_password_has_a_default():
    # ${VAR:-default} or ${VAR-default} would start the stack with a known password.
    for variable in PASSWORDS:
        uses = re.findall(rf"\$\{{{variable}[^}}]*\}}", COMPOSE.read_text())
        assert uses, variable
        assert all(required(variable).fullmatch(use) for use in uses), uses


def test_the_worker_healthcheck_keeps_the_broker_password_out_of_argv(compose):
    check = compose["services"]["worker"]["healthcheck"]["test"][1]
    assert "-b " not in check and "--broker" not in check
    assert 'BROKER_URL="$$PAGEDQ_BROKER_URL" celery' in check


def _compose_cli() -> bool:
    if shutil.which("docker") is None:
        return False
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _compose_cli(), reason="docker compose is not installed")
def test_docker_compose_config():
    env = {**os.environ, **{variable: "test" for variable in PASSWORDS}}
    result = subprocess.run(["docker", "compose", "-f", str(COMPOSE), "config", "--quiet"],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
