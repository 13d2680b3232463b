"""Settings come from PAGEDQ_* variables; a bad one is named in the error."""

import pytest

from worker.settings import SettingsError, load_settings


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
