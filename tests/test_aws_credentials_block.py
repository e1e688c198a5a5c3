"""AWS credentials the Prefect way: ``aws.credentials_block`` names an ``AwsCredentials`` block
(prefect-aws) saved on a live Prefect server (the session's harness), and every request the
AWS backend makes is signed with that block's keys, with no AWS key in the environment. moto's
server is AWS; each request's signing key is read from its Authorization header (botocore's
before-send event), which is what AWS itself authenticates."""

from __future__ import annotations

import logging
import os
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import boto3
import pytest
from prefect.blocks.system import Secret
from prefect_aws import AwsCredentials
from typer.testing import CliRunner

import backends.aws.session
from backends.aws.config import REGION_ENVS
from backends.base import ConfigurationError
from flows.aws_credentials import warn_unused_client_parameters
from flows.cli import app
from flows.config import AwsSettings, PipelineConfig, get_backend
from flows.pipeline import cifar10_pipeline
from flows.reaper import reap_endpoints_flow
from flows.run_context import resource_name
from flows.smoke_endpoint import teardown_run_endpoint
from tests.support.aws_fakes import ACCOUNT, BUCKET, REGION, ROLE_ARN, SageMakerStandIn
from tests.support.configs import local_config

pytest_plugins = ["tests.support.aws_fixtures"]
pytestmark = pytest.mark.usefixtures("no_network")  # loopback only, for every test here

BLOCK_KEY = "AKIAPREFECTBLOCK0001"  # what the block holds; the environment holds none
CALLER_ROLE = f"arn:aws:iam::{ACCOUNT}:role/cifar10-caller"
CREDENTIAL = re.compile(r"Credential=([A-Z0-9]+)/")


class SigningKeys:
    """The access key that signed each request of the sessions it is attached to, by
    service (``before-send``: the request as it leaves, signature included)."""

    def __init__(self) -> None:
        self.used: list[tuple[str, str]] = []  # (service, access key id)
        self._lock = threading.Lock()

    def attach(self, session: boto3.Session) -> None:
        session.events.register("before-send", self._record)

    def _record(self, request: Any, event_name: str, **kwargs: Any) -> None:
        match = CREDENTIAL.search(request.headers.get("Authorization", b"").decode())
        with self._lock:
            self.used.append((event_name.split(".")[1], match.group(1) if match else ""))

    def keys(self, service: str | None = None) -> set[str]:
        return {key for s, key in self.used if service in (None, s)}

    def services(self) -> set[str]:
        return {service for service, _ in self.used}


def on_block_sessions(monkeypatch: pytest.MonkeyPatch, attach: Callable[[Any], None]) -> None:
    """Calls ``attach`` on every session the backend makes from a session factory."""
    make = backends.aws.session.session_from_factory

    def session_with_hook(factory, region):
        session = make(factory, region)
        attach(session)
        return session

    monkeypatch.setattr(backends.aws.session, "session_from_factory", session_with_hook)


@pytest.fixture
def no_aws_keys(aws, monkeypatch) -> None:
    """The environment has no AWS keys and no region (the test account's clients got theirs
    when ``aws`` set it up): whatever signs a request must come from the block."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 *REGION_ENVS):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def signing_keys(monkeypatch) -> SigningKeys:
    keys = SigningKeys()
    on_block_sessions(monkeypatch, keys.attach)
    return keys


def save_block(**fields: Any) -> str:
    """An AwsCredentials block with ``fields`` saved on the Prefect server; its name."""
    name = f"aws-{uuid.uuid4().hex[:8]}"
    AwsCredentials(**fields).save(name)
    return name


@pytest.fixture
def key_block(prefect_harness) -> str:
    return save_block(aws_access_key_id=BLOCK_KEY, aws_secret_access_key="block-secret",
                      region_name=REGION)


def aws_config(**aws: Any) -> PipelineConfig:
    return PipelineConfig(backend="aws", aws=AwsSettings(role_arn=ROLE_ARN, bucket=BUCKET, **aws))


@pytest.fixture
def stand_in(aws, trained_model, tmp_path, monkeypatch) -> Iterator[SageMakerStandIn]:
    """The training container and model server moto lacks, on the block's sessions."""
    playing = SageMakerStandIn(aws, trained_model, tmp_path / "stand-in")
    on_block_sessions(monkeypatch, playing.attach)
    try:
        yield playing
    finally:
        playing.close()


@pytest.mark.slow
def test_a_run_with_a_credentials_block_signs_every_request_with_its_keys(
        no_aws_keys, key_block, signing_keys, stand_in, http_server, cifar_tarball,
        pipeline_home):
    config = local_config(
        http_server, cifar_tarball, backend="aws",
        smoke_test={"images": 50, "accuracy_floor": 0.0},
        aws={"role_arn": ROLE_ARN, "bucket": BUCKET, "credentials_block": key_block})

    state = cifar10_pipeline(config, return_state=True)

    assert state.is_completed(), state.message
    assert not any(os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"))
    # SageMaker (the SDK's ModelTrainer included), S3, CloudWatch Logs and the runtime: every
    # request carried the block's key, and the block's region was used (no region was set).
    assert {"sagemaker", "s3", "cloudwatch-logs", "sagemaker-runtime"} <= signing_keys.services()
    assert signing_keys.keys() == {BLOCK_KEY}
    assert stand_in.trained == [resource_name(str(state.state_details.flow_run_id))]


def test_the_backend_rebuilt_by_teardown_hooks_and_the_reaper_uses_the_block(
        no_aws_keys, key_block, signing_keys, prefect_harness):
    """The cancellation/crash hook and the reaper flow rebuild the backend from the config
    in another process: the block comes with it."""
    run = SimpleNamespace(id=uuid.uuid4())
    teardown_run_endpoint(aws_config(credentials_block=key_block), run,
                          SimpleNamespace(name="Crashed"))
    report = reap_endpoints_flow(backend="aws", older_than_minutes=60,
                                 aws=AwsSettings(credentials_block=key_block))
    assert report["errors"] == []
    assert signing_keys.services() == {"sagemaker"}
    assert signing_keys.keys() == {BLOCK_KEY}


def test_an_assumed_role_is_assumed_with_the_block_keys_and_renewed(
        no_aws_keys, signing_keys, prefect_harness, monkeypatch):
    """The block's role is assumed with its keys, and its temporary credentials are renewed
    before they expire (botocore renews them 15 minutes ahead: these last 15 minutes, so
    every request renews them), where prefect-aws's get_boto3_session() assumes it once."""
    name = save_block(aws_access_key_id=BLOCK_KEY, aws_secret_access_key="block-secret",
                      region_name=REGION, assume_role_arn=CALLER_ROLE,
                      assume_role_kwargs={"DurationSeconds": 900})
    source_session = AwsCredentials.get_boto3_session  # the block's keys: they call STS

    def observed(block):
        session = source_session(block)
        signing_keys.attach(session)
        return session

    monkeypatch.setattr(AwsCredentials, "get_boto3_session", observed)
    backend = get_backend(aws_config(credentials_block=name))
    for _ in range(3):
        backend.endpoints.list()

    assert signing_keys.keys("sts") == {BLOCK_KEY}
    role_keys = [key for service, key in signing_keys.used if service == "sagemaker"]
    assert len(role_keys) == 3 and BLOCK_KEY not in role_keys
    assert len(set(role_keys)) == 3, "the role's credentials were not renewed"
    assert len([s for s, _ in signing_keys.used if s == "sts"]) == 3


def test_the_config_region_wins_over_the_block_and_the_block_over_the_machine(
        prefect_harness, monkeypatch):
    name = save_block(aws_access_key_id=BLOCK_KEY, aws_secret_access_key="s",
                      region_name="eu-west-1")
    monkeypatch.setenv("AWS_REGION", "ap-southeast-2")
    assert get_backend(aws_config(credentials_block=name)).aws.region == "eu-west-1"
    assert get_backend(aws_config(credentials_block=name,
                                  region="us-west-2")).aws.region == "us-west-2"
    keys_only = save_block(aws_access_key_id=BLOCK_KEY, aws_secret_access_key="s")
    assert get_backend(aws_config(credentials_block=keys_only)).aws.region == "ap-southeast-2"


def test_a_missing_block_fails_the_run_at_once_in_one_line(prefect_harness):
    result = CliRunner().invoke(app, ["run", "--backend", "aws", "--data-url",
                                      "http://127.0.0.1:9/never-fetched.tar.gz",
                                      "--aws-credentials-block", "no-such-block"])
    assert result.exit_code == 1
    error = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error) == 1, result.output
    assert "no AwsCredentials block named 'no-such-block'" in error[0]
    assert "never-fetched" not in result.output  # nothing was downloaded first


def test_a_block_of_another_type_is_named_as_such(prefect_harness):
    name = f"not-aws-{uuid.uuid4().hex[:6]}"
    Secret(value="x").save(name)
    with pytest.raises(ConfigurationError, match=r"of that name is of type secret, not aws-"):
        get_backend(aws_config(credentials_block=name))
    with pytest.raises(ConfigurationError, match=r"is a Secret block, not AWS credentials"):
        get_backend(aws_config(credentials_block=f"secret/{name}"))


def test_without_prefect_aws_the_error_says_to_install_it(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "prefect_aws", None)  # import fails
    with pytest.raises(ConfigurationError, match=r"prefect-aws is not installed here"):
        get_backend(aws_config(credentials_block="my-aws"))


def test_client_parameters_the_pipeline_does_not_use_are_named(caplog):
    """prefect-aws applies them only to its own get_client(): saying so beats ignoring them."""
    block = AwsCredentials(aws_client_parameters={"endpoint_url": "http://127.0.0.1:1"})
    with caplog.at_level(logging.WARNING, logger="cifar10_pipeline"):
        warn_unused_client_parameters(AwsCredentials(), "plain")
        assert caplog.text == ""
        warn_unused_client_parameters(block, "with-endpoint")
    assert "'with-endpoint': its aws_client_parameters (endpoint_url) are not used" in caplog.text


def test_without_a_block_the_default_chain_is_used_and_prefect_is_not_asked(monkeypatch):
    def forbidden(name):
        raise AssertionError("no block was named")

    monkeypatch.setattr("flows.aws_credentials.load_credentials_block", forbidden)
    backend = get_backend(aws_config())
    assert backend.aws._factory is None


def test_sweep_passes_the_block_on(monkeypatch):
    ran: list[Any] = []
    monkeypatch.setattr("flows.cli._run_flow", lambda flow, config, as_json: ran.append(config))
    result = CliRunner().invoke(app, ["sweep", "--backend", "aws",
                                      "--aws-credentials-block", "team-aws"])
    assert result.exit_code == 0, result.output
    assert ran[0].base.aws.credentials_block == "team-aws"
    bad = CliRunner().invoke(app, ["run", "--aws-credentials-block", "Not A Name"])
    assert bad.exit_code == 2 and "aws.credentials_block" in bad.output
