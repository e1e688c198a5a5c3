"""Fixtures for the AWS backend's tests (a pytest plugin: ``pytest_plugins`` in the modules
that use them). The fakes they set up, and the moto gaps they cover, are in ``aws_fakes``."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from backends.local.store import path_from_uri
from tests.support.aws_fakes import (
    LOOPBACK,
    REGION,
    CallRecorder,
    MotoAccount,
    SageMakerStandIn,
    TrainedModel,
    fresh_account,
    isolate_aws_environment,
)


@pytest.fixture(scope="module")
def no_network() -> Iterator[None]:
    """Name resolution for anything but loopback fails: a test that would reach AWS errors
    at once instead of hanging or, worse, succeeding against a real account."""
    real = socket.getaddrinfo

    def loopback_only(host, *args, **kwargs):
        name = host.decode() if isinstance(host, bytes) else host
        if name not in LOOPBACK:
            raise socket.gaierror(f"tests may not reach {name}: loopback only")
        return real(host, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket, "getaddrinfo", loopback_only)
        yield


@pytest.fixture(scope="module")
def moto_server(no_network) -> Iterator[str]:
    """moto's server on a free loopback port; the environment points every boto3 client at
    it, with dummy credentials and a region. Yields its URL."""
    from moto.server import ThreadedMotoServer
    from sagemaker.core.helper import session_helper

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    try:
        with pytest.MonkeyPatch.context() as mp:
            isolate_aws_environment(mp)
            mp.setenv("AWS_ENDPOINT_URL", url)
            mp.setenv("AWS_ACCESS_KEY_ID", "testing")
            mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
            mp.setenv("AWS_REGION", REGION)
            mp.setenv("AWS_DEFAULT_REGION", REGION)
            mp.setattr(session_helper, "sts_regional_endpoint", lambda region: url)
            yield url
    finally:
        server.stop()


@pytest.fixture
def aws(moto_server) -> MotoAccount:
    """A clean moto account with the pipeline's bucket and execution role."""
    return fresh_account(moto_server)


def attach_to_new_sessions(monkeypatch, attach: Callable[[Any], None]) -> None:
    """Calls ``attach`` on every boto3 session the backend makes from now on."""
    import backends.aws.session

    make = backends.aws.session.new_boto_session

    def session_with_hook(region):
        session = make(region)
        attach(session)
        return session

    monkeypatch.setattr(backends.aws.session, "new_boto_session", session_with_hook)


@pytest.fixture
def sagemaker_calls(monkeypatch) -> CallRecorder:
    """Records the calls of every boto3 session the backend makes from now on."""
    recorder = CallRecorder()
    attach_to_new_sessions(monkeypatch, recorder.attach)
    return recorder


@pytest.fixture(scope="session")
def trained_model(session_training) -> TrainedModel:
    """What a SageMaker training job of the pipeline leaves: the session's local training's
    model.tar.gz, metrics and log."""
    log = Path(session_training.log_location).read_text().splitlines()
    return TrainedModel(path_from_uri(session_training.model_uri).read_bytes(),
                        session_training.metrics, log)


@pytest.fixture
def sagemaker_stand_in(aws, trained_model, tmp_path, monkeypatch) -> Iterator[SageMakerStandIn]:
    """Hooks the stand-in onto every boto3 session the backend makes from now on."""
    stand_in = SageMakerStandIn(aws, trained_model, tmp_path / "stand-in")
    attach_to_new_sessions(monkeypatch, stand_in.attach)
    try:
        yield stand_in
    finally:
        stand_in.close()


@pytest.fixture
def on_new_sessions(monkeypatch) -> Callable[[Callable[[Any], None]], None]:
    """``on_new_sessions(attach)``: ``attach`` hooks every boto3 session the backend makes
    from now on (botocore event handlers: faults as AWS would produce them)."""
    return lambda attach: attach_to_new_sessions(monkeypatch, attach)


@pytest.fixture
def request_validator(monkeypatch):
    """Checks every request the backend's boto3 sessions make from now on against botocore's
    service models, as strictly as the real APIs do (``aws_validation``)."""
    from tests.support.aws_validation import RequestValidator

    validator = RequestValidator()
    attach_to_new_sessions(monkeypatch, validator.attach)
    return validator
