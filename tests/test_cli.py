"""The `cifar10-pipeline` command line: run (with --json), option errors, and the endpoint
commands on the local backend."""

from __future__ import annotations

import json
from contextlib import contextmanager

import pytest
from typer.testing import CliRunner

from backends.base import EndpointSpec, managed_tags
from backends.local import LocalBackend
from flows.cli import app, parse_duration
from flows.config import TrainingSettings

runner = CliRunner()


def test_help_lists_the_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "run" in result.stdout and "endpoints" in result.stdout
    assert "serving" in result.stdout
    result = runner.invoke(app, ["endpoints", "reap", "--help"])
    assert "--older-than" in result.stdout and "--dry-run" in result.stdout


# `run --json` end to end: test_prefect_api.py (a fresh Prefect home, in a real process).


@pytest.mark.parametrize("args, message", [
    (["--epochs", "0"], "training.epochs"),
    (["--accuracy-floor", "1.5"], "smoke_test.accuracy_floor"),
    (["--backend", "gcp"], "backend"),
    (["--data-md5", "xyz"], "data.md5"),
])
def test_bad_options_are_refused_before_anything_runs(args, message):
    result = runner.invoke(app, ["run", *args])
    assert result.exit_code == 2
    assert "invalid options" in result.output and message in result.output


@pytest.mark.parametrize("epochs, passed", [(2.0, 2), (1.5, 1.5), (None, None)])
def test_epochs_reach_the_entry_script_as_written(epochs, passed):
    """The command line reads --epochs as a float; a whole number still goes to the training
    job as "2" (not "2.0"), a fraction as is, and unset leaves the preset's value."""
    hyperparameters = TrainingSettings(epochs=epochs).hyperparameters()
    assert hyperparameters.get("epochs") == passed
    assert type(hyperparameters.get("epochs")) is type(passed)


def test_endpoint_commands_list_delete_and_reap(model_uri, pipeline_home):
    backend = LocalBackend()
    names = ("cli-old", "cli-young", "cli-kept")
    for name in names:
        backend.endpoints.deploy(EndpointSpec(name=name, model_uri=model_uri,
                                              tags=managed_tags("pytest", kept=name == "cli-kept")))
    try:
        listed = json.loads(runner.invoke(app, ["endpoints", "list", "--json"]).stdout)
        assert {row["name"] for row in listed} >= set(names)
        assert all(row["status"] == "InService" for row in listed)
        assert {row["name"]: row["kept"] for row in listed if row["name"] in names} == {
            "cli-old": False, "cli-young": False, "cli-kept": True}
        assert "kept" in next(line for line in runner.invoke(
            app, ["endpoints", "list"]).stdout.splitlines() if line.startswith("cli-kept"))

        dry = runner.invoke(app, ["endpoints", "reap", "--older-than", "0s", "--dry-run"])
        assert "would delete cli-old" in dry.stdout and "cli-kept" not in dry.stdout
        assert backend.endpoints.describe("cli-old") is not None

        assert "cli-old: deleted" in runner.invoke(app, ["endpoints", "delete", "cli-old"]).stdout
        again = runner.invoke(app, ["endpoints", "delete", "cli-old"])
        assert again.exit_code == 0 and "not found" in again.stdout

        kept = runner.invoke(app, ["endpoints", "reap", "--older-than", "1h"])
        assert "0 deleted, 1 younger than 1h kept, 1 kept by choice" in kept.stdout
        reaped = runner.invoke(app, ["endpoints", "reap", "--older-than", "0s"])
        assert "deleted cli-young" in reaped.stdout
        # A kept endpoint outlives any TTL; deleting it by name still works.
        assert [e.name for e in backend.endpoints.list()] == ["cli-kept"]
        assert "cli-kept: deleted" in runner.invoke(
            app, ["endpoints", "delete", "cli-kept"]).stdout
        assert backend.endpoints.list() == []
    finally:
        for name in names:
            backend.endpoints.delete(name)


MANAGEMENT_COMMANDS = [["endpoints", "list"], ["endpoints", "delete", "some-endpoint"],
                       ["endpoints", "reap", "--older-than", "1h"], ["models", "list"],
                       ["models", "approve", "3"], ["models", "reject", "3"],
                       ["serving", "status"], ["serving", "rollback"], ["serving", "delete"]]


@pytest.fixture
def built_backends(monkeypatch):
    """The configs the commands build their backend from (the build stops there), and how
    often they asked for the Prefect API."""
    from backends.base import BackendError

    seen: dict[str, list] = {"configs": [], "apis": []}

    def get_backend(config, concurrent_jobs=1):
        seen["configs"].append(config)
        raise BackendError("stopped before any AWS call")

    @contextmanager
    def api_for_commands(on_status=print):
        seen["apis"].append("entered")
        yield "http://prefect.test/api"

    monkeypatch.setattr("flows.config.get_backend", get_backend)
    monkeypatch.setattr("flows.prefect_api.api_for_commands", api_for_commands)
    return seen


@pytest.mark.parametrize("command", MANAGEMENT_COMMANDS, ids=" ".join)
def test_management_commands_pass_the_credentials_block_on(built_backends, command):
    """--aws-credentials-block reaches the config the backend is built from, as `run`'s does,
    and the block is read through the Prefect API the commands share."""
    result = runner.invoke(app, [*command, "--backend", "aws", "--region", "eu-west-1",
                                 "--aws-credentials-block", "team-aws"])
    assert result.exit_code == 1 and "error: stopped before any AWS call" in result.output
    [config] = built_backends["configs"]
    assert config.backend == "aws"
    assert (config.aws.credentials_block, config.aws.region) == ("team-aws", "eu-west-1")
    assert built_backends["apis"] == ["entered"]


def test_management_commands_without_a_block_need_no_prefect_api(built_backends):
    result = runner.invoke(app, ["endpoints", "list", "--backend", "aws"])
    assert result.exit_code == 1
    [config] = built_backends["configs"]
    assert config.aws.credentials_block is None and config.aws.region is None
    assert built_backends["apis"] == []
    bad = runner.invoke(app, ["models", "list", "--aws-credentials-block", "Not A Name"])
    assert bad.exit_code == 2 and "aws.credentials_block" in bad.output
    assert len(built_backends["configs"]) == 1  # refused before a backend was built


def test_durations():
    assert parse_duration("90s").total_seconds() == 90
    assert parse_duration("2h").total_seconds() == 7200
    assert parse_duration("1.5d").total_seconds() == 129600
    with pytest.raises(Exception, match="not a duration"):
        parse_duration("soon")


def test_the_cli_and_make_run_share_the_checkouts_state(monkeypatch, tmp_path):
    """Run from a checkout, `cifar10-pipeline models list` must see what `make run` (which sets
    CIFAR10_PIPELINE_HOME to the checkout's .state/) registered."""
    from backends import settings

    monkeypatch.delenv(settings.STATE_DIR_ENV, raising=False)
    assert settings.state_dir() == settings.PROJECT_ROOT / ".state"
    monkeypatch.setenv(settings.STATE_DIR_ENV, str(tmp_path))
    assert settings.state_dir() == tmp_path.resolve()
    monkeypatch.delenv(settings.STATE_DIR_ENV, raising=False)
    monkeypatch.setattr(settings, "PROJECT_ROOT", tmp_path)  # an installed package
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert settings.state_dir() == (tmp_path / "home" / ".cifar10-pipeline").resolve()
