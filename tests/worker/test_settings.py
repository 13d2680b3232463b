"""Settings come from PAGEDQ_* variables; a bad one is named in the error."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from engine.config import EngineConfig
from worker.settings import Settings, SettingsError, load_settings

REPO = Path(__file__).resolve().parents[2]
# The engine knobs a worker deliberately does not offer (see worker/settings.py).
NOT_WORKER_KNOBS = {"share_blocks"}


def test_defaults_are_the_embedded_setup(monkeypatch):
    for name in ("PAGEDQ_DATABASE_URL", "PAGEDQ_MODEL", "PAGEDQ_MAX_NUM_SEQS"):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings()
    assert settings.database_url == "sqlite:///pagedq.db"
    assert settings.model == "smollm2-135m"
    assert settings.concurrency == settings.max_num_seqs == 256


def test_environment_variables_are_read(monkeypatch):
    monkeypatch.setenv("PAGEDQ_MAX_NUM_SEQS", "32")
    monkeypatch.setenv("PAGEDQ_DATABASE_URL", "postgresql://u@db/jobs")
    settings = load_settings()
    assert settings.max_num_seqs == 32 and settings.concurrency == 32
    # psycopg 3 is the driver that is installed.
    assert settings.database_url == "postgresql+psycopg://u@db/jobs"
    assert settings.engine_kwargs()["max_num_seqs"] == 32


@pytest.mark.parametrize(("name", "value"), [
    ("PAGEDQ_MAX_NUM_SEQS", "0"),
    ("PAGEDQ_BLOCK_SIZE", "12"),
    ("PAGEDQ_GPU_MEMORY_UTILIZATION", "1.5"),
    ("PAGEDQ_SWAP_SPACE_GIB", "nan"),
    ("PAGEDQ_DTYPE", "int8"),
    ("PAGEDQ_PREEMPTION_MODE", "drop"),
    ("PAGEDQ_JOB_DEADLINE_S", "soon"),
    ("PAGEDQ_REPUBLISH_AFTER_S", "0"),
    ("PAGEDQ_SWEEP_INTERVAL_S", "-1"),
])
def test_bad_value_names_the_variable(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=name):
        load_settings()


def test_defaults_recover_a_killed_workers_jobs_within_a_minute(monkeypatch):
    for name in ("PAGEDQ_REPUBLISH_AFTER_S", "PAGEDQ_SWEEP_INTERVAL_S", "PAGEDQ_LEASE_S",
                 "PAGEDQ_VISIBILITY_TIMEOUT_S"):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings()
    # Running jobs come back within lease + sweep; messages taken but not yet
    # claimed, within the visibility timeout.
    assert settings.lease_s == 30 and settings.sweep_interval == 15
    assert settings.visibility_timeout_s == 60
    assert settings.republish_after_s == 3600
    monkeypatch.setenv("PAGEDQ_REPUBLISH_AFTER_S", "120")
    monkeypatch.setenv("PAGEDQ_LEASE_S", "600")
    settings = load_settings()
    assert (settings.republish_after_s, settings.sweep_interval) == (120, 12)


def test_sweep_interval_must_not_exceed_the_threshold(monkeypatch):
    monkeypatch.setenv("PAGEDQ_REPUBLISH_AFTER_S", "30")
    monkeypatch.setenv("PAGEDQ_SWEEP_INTERVAL_S", "60")
    with pytest.raises(SettingsError, match="PAGEDQ_SWEEP_INTERVAL_S"):
        load_settings()


def test_cli_reports_bad_settings(monkeypatch, capsys):
    from worker.cli import main

    monkeypatch.setenv("PAGEDQ_MAX_ATTEMPTS", "-1")
    assert main(["migrate"]) == 2
    assert "PAGEDQ_MAX_ATTEMPTS" in capsys.readouterr().err


def _engine_knobs() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(EngineConfig) if f.name not in NOT_WORKER_KNOBS]


def test_every_engine_knob_is_a_setting_with_its_default(monkeypatch):
    # A knob added to EngineConfig shows up here without anyone writing it down twice.
    for f in dataclasses.fields(EngineConfig):
        monkeypatch.delenv(f"PAGEDQ_{f.name.upper()}", raising=False)
    for f in _engine_knobs():
        assert f.name in Settings.model_fields, f.name
        assert Settings.model_fields[f.name].default == f.default, f.name
    assert load_settings().engine_kwargs() == {f.name: f.default for f in _engine_knobs()}


def test_every_engine_knob_is_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("PAGEDQ_GPU_MEMORY_UTILIZATION", "0.5")
    monkeypatch.setenv("PAGEDQ_ENFORCE_EAGER", "true")
    kwargs = load_settings().engine_kwargs()
    assert kwargs["gpu_memory_utilization"] == 0.5 and kwargs["enforce_eager"] is True
    assert EngineConfig(**kwargs).enforce_eager


@pytest.mark.parametrize(("name", "value", "message"), [
    ("PAGEDQ_BLOCK_SIZE", "12", "block_size must be a power of two, got 12"),
    ("PAGEDQ_GPU_MEMORY_UTILIZATION", "1.5", "gpu_memory_utilization must be in (0, 1], got 1.5"),
])
def test_engine_rules_name_the_variable(monkeypatch, name, value, message):
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as exc:
        load_settings()
    assert f"{name}: {message}" in str(exc.value)


@pytest.mark.parametrize("module", ["worker.settings", "engine.config"])
def test_importing_does_not_import_torch(module):
    code = f"import sys, {module}; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
