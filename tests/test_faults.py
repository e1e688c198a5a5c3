"""Teardown under faults, in-process: a failure injected at each stage after deploy starts, on
the local backend and on the AWS backend against moto's server (with the stand-in that serves
moto's endpoints locally). After each run: the final state names the injected cause, and no
endpoint, endpoint config, model or server process remains; where the flow cannot delete them
itself (its delete keeps failing), the reaper does, and that is counted.

Cancellation and SIGKILL need real processes and a real server: ``test_faults_live.py``. Every
scenario adds a row to the summary table printed at the end of the pytest run.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from botocore.exceptions import ClientError

from backends.aws.hosting import AwsEndpoints
from backends.base import Endpoints
from backends.local import LocalBackend
from backends.local.endpoints import LocalEndpoints
from backends.local.training import LocalTrainingJobs
from backends.reaper import reap_endpoints
from flows.config import PipelineConfig, get_backend
from flows.pipeline import cifar10_pipeline
from flows.run_context import resource_name
from flows.smoke_endpoint import EndpointNotDeleted
from tests.support.configs import aws_config, local_config
from tests.support.faults import NOT_APPLICABLE, aws_leaks, fault_table, local_leaks, short

pytestmark = pytest.mark.long_running

pytest_plugins = ["tests.support.aws_fixtures"]


@dataclass
class Injection:
    """One injected fault: ``active`` switches it off before the reaper runs (the fault was
    the flow's, not the reaper's); ``calls`` counts the calls it intercepted while active."""

    active: bool = True
    calls: int = 0
    created: list[Any] = field(default_factory=list)


@dataclass(frozen=True)
class Fault:
    id: str
    scenario: str  # as the summary table shows it
    inject: Callable[[pytest.MonkeyPatch, type[Endpoints], Injection], None]
    state: str  # the run's expected final state
    cause: type[BaseException] | None  # what state.result() raises
    message: str  # must appear in the final state's message
    reaper: bool = False  # the flow could not delete everything: the reaper must
    check: Callable[[Injection], None] | None = None


# --- the injections: each wraps a real step, so everything up to the fault really happens ---

def deploy_then_fail(mp: pytest.MonkeyPatch, endpoints: type[Endpoints], injection: Injection):
    original = endpoints.deploy

    def deploy(self, spec, on_log=None):
        injection.created.append(original(self, spec, on_log))
        raise TimeoutError("injected: endpoint created, then the wait timed out")

    mp.setattr(endpoints, "deploy", deploy)


def smoke_requests_fail(mp: pytest.MonkeyPatch, endpoints: type[Endpoints], injection: Injection):
    import tasks.endpoint

    def broken(*args, **kwargs):
        injection.calls += 1
        raise ConnectionError("injected: the endpoint stopped answering")

    mp.setattr(tasks.endpoint, "invoke_batch", broken)


def delete_fails(error: Callable[[], Exception], times: int | None = None):
    """Endpoints.delete raises ``error()`` on its first ``times`` calls (None: on every
    call while the injection is active), then deletes."""

    def inject(mp: pytest.MonkeyPatch, endpoints: type[Endpoints], injection: Injection):
        original = endpoints.delete

        def delete(self, name):
            if injection.active:
                injection.calls += 1
                if times is None or injection.calls <= times:
                    raise error()
            return original(self, name)

        mp.setattr(endpoints, "delete", delete)

    return inject


def without_retry_delays(mp: pytest.MonkeyPatch) -> None:
    """The delete task's own retries (3, after 2, 10 and 30 s), without the waiting."""
    import flows.smoke_endpoint

    mp.setattr(flows.smoke_endpoint, "delete_endpoint",
               flows.smoke_endpoint.delete_endpoint.with_options(retry_delay_seconds=0))


def smoke_and_delete_fail(mp: pytest.MonkeyPatch, endpoints: type[Endpoints],
                          injection: Injection):
    smoke_requests_fail(mp, endpoints, Injection())
    delete_fails(lambda: PermissionError("injected: access denied"))(mp, endpoints, injection)


def publish_summary_fails(mp: pytest.MonkeyPatch, endpoints: type[Endpoints], injection: Injection):
    import tasks.run_summary

    def broken(*args, **kwargs):
        raise OSError("injected: the artifact store is down")

    mp.setattr(tasks.run_summary, "publish_markdown", broken)


def attempts(expected: int) -> Callable[[Injection], None]:
    def check(injection: Injection) -> None:
        assert injection.calls == expected, f"{injection.calls} delete attempts"
    return check


def endpoint_was_up(injection: Injection) -> None:
    assert injection.created and injection.created[0].status == "InService"


STILL_UP = "could not be deleted"  # EndpointNotDeleted says so, and how to delete it

FAULTS = [
    # Prefect reports any TimeoutError escaping a flow as TimedOut (a Failed type), as if the
    # flow's own timeout had struck (it has none); the message still names the cause.
    Fault("deploy", "deploy fails after the endpoint is InService", deploy_then_fail,
          "TimedOut", TimeoutError, "TimeoutError('injected: endpoint created",
          check=endpoint_was_up),
    Fault("smoke", "smoke-predict: the endpoint stops answering", smoke_requests_fail,
          "Failed", ConnectionError, "ConnectionError: injected"),
    Fault("delete-once", "delete fails once (transient), the task's retry deletes",
          delete_fails(lambda: ConnectionError("injected: connection reset"), times=1),
          "Completed", None, "", check=attempts(2)),
    Fault("delete-transient", "delete fails on every retry (transient), then the reaper",
          delete_fails(lambda: ConnectionError("injected: throttled, connection reset")),
          "Failed", EndpointNotDeleted, STILL_UP,
          reaper=True, check=attempts(4)),
    Fault("delete-permanent", "delete fails permanently (not retried), then the reaper",
          delete_fails(lambda: PermissionError("injected: access denied")),
          "Failed", EndpointNotDeleted, STILL_UP, reaper=True, check=attempts(1)),
    Fault("smoke-and-delete", "smoke-predict fails, then delete fails; then the reaper",
          smoke_and_delete_fail, "Failed", EndpointNotDeleted,
          "the run had already failed: ConnectionError: injected", reaper=True),
    Fault("summary", "publish_summary fails (after the delete)", publish_summary_fails,
          "Failed", OSError, "OSError: injected"),
]


def run_with_fault(fault: Fault, endpoints_cls: type[Endpoints], config: PipelineConfig,
                   monkeypatch: pytest.MonkeyPatch):
    """Runs the flow with ``fault`` injected; returns (state, injection, reaper report)."""
    injection = Injection()
    without_retry_delays(monkeypatch)
    fault.inject(monkeypatch, endpoints_cls, injection)
    state = cifar10_pipeline(config, return_state=True)
    injection.active = False  # the backend works again: the reaper's turn
    reaped = (reap_endpoints(get_backend(config), dt.timedelta(0)).deleted
              if fault.reaper else [])
    return state, injection, reaped


def assert_state(fault: Fault, state) -> None:
    assert state.name == fault.state, state
    assert fault.message in (state.message or ""), state.message
    if fault.cause is not None:
        with pytest.raises(fault.cause):
            state.result()


# --- local backend -------------------------------------------------------------------------

@pytest.fixture
def session_model(monkeypatch, session_training) -> None:
    """Training is not under test here: every run's fit gets the session's trained model at
    once (the faults come after deploy starts; test_flow trains for real)."""
    monkeypatch.setattr(LocalTrainingJobs, "run", lambda self, spec, on_log=None:
                        dataclasses.replace(session_training, job_name=spec.job_name))


def add_fault_row(backend: str, fault: Fault, state: Any, reaped: list[str], leaks: dict,
                  started: float) -> None:
    fault_table().add(backend=backend, scenario=fault.scenario, **{
        "final state": state.name, "cause (state message)": short(state.message),
        "reaper deleted": len(reaped) if fault.reaper else "-",
        "seconds": time.monotonic() - started}, **leaks)


@pytest.mark.usefixtures("session_model")
@pytest.mark.parametrize("fault", FAULTS, ids=[f.id for f in FAULTS])
def test_local_teardown_under_fault(fault, prefect_harness, http_server, cifar_tarball,
                                    tmp_path, monkeypatch):
    started = time.monotonic()
    root = tmp_path / "state"  # this run's own: what is left in it is this run's
    monkeypatch.setenv("CIFAR10_PIPELINE_HOME", str(root))
    state, injection, reaped = run_with_fault(
        fault, LocalEndpoints, local_config(http_server, cifar_tarball), monkeypatch)
    leaks = local_leaks(root)
    add_fault_row("local", fault, state, reaped, leaks, started)

    assert_state(fault, state)
    if fault.check:
        fault.check(injection)
    assert reaped == ([resource_name(str(state.state_details.flow_run_id))]
                      if fault.reaper else [])
    assert leaks == {"endpoints": 0, "configs": NOT_APPLICABLE, "models": NOT_APPLICABLE,
                     "processes": 0}
    assert LocalBackend(root=root).endpoints.list() == []


# --- AWS backend against moto --------------------------------------------------------------

def aws_call_fails(operation: str, code: str, message: str, times: int | None = None):
    """The SageMaker call ``operation`` fails as AWS would fail it (a ClientError with
    ``code``) on its first ``times`` calls (None: on every call) while the injection is
    active. Hooked on the backend's boto3 sessions, below every layer of our code."""

    def inject(mp: pytest.MonkeyPatch, endpoints: type[Endpoints], injection: Injection):
        import backends.aws.session

        make = backends.aws.session.new_boto_session  # already wrapped by the stand-in

        def fail(**kwargs):
            if injection.active:
                injection.calls += 1
                if times is None or injection.calls <= times:
                    raise ClientError({"Error": {"Code": code, "Message": message}},
                                      operation)

        def session_with_fault(region):
            session = make(region)
            session.events.register(f"before-call.sagemaker.{operation}", fail)
            return session

        mp.setattr(backends.aws.session, "new_boto_session", session_with_fault)

    return inject


AWS_FAULTS = [
    *FAULTS,
    Fault("delete-config-throttled-once",
          "DeleteEndpointConfig throttled once, the task's retry deletes",
          aws_call_fails("DeleteEndpointConfig", "ThrottlingException", "Rate exceeded",
                         times=1),
          "Completed", None, "", check=attempts(2)),
    Fault("delete-endpoint-denied", "DeleteEndpoint denied (IAM), then the reaper",
          aws_call_fails("DeleteEndpoint", "AccessDeniedException",
                         "not authorized to perform: sagemaker:DeleteEndpoint"),
          "Failed", EndpointNotDeleted, "sagemaker:DeleteEndpoint", reaper=True,
          check=attempts(1)),
    # The endpoint is gone but its config and model are not: nothing lists them as an
    # endpoint any more, so the reaper must find them by their own tags.
    Fault("delete-config-denied",
          "DeleteEndpointConfig denied after the endpoint was deleted, then the reaper",
          aws_call_fails("DeleteEndpointConfig", "AccessDeniedException",
                         "not authorized to perform: sagemaker:DeleteEndpointConfig"),
          "Failed", EndpointNotDeleted, "sagemaker:DeleteEndpointConfig", reaper=True,
          check=attempts(1)),
]


TEARDOWN_ORDER = ("DeleteEndpoint", "DeleteEndpointConfig", "DeleteModel")


def assert_deleted_in_order(recorder) -> None:
    """Whoever deleted (the flow, its retry, the reaper), the flow's teardown went endpoint
    (what bills) → endpoint config → model (what the config refers to), and no hosting call
    came after the model's delete.
    A denied endpoint delete does not stop the pass: the config and the model are still
    deleted; the reaper's pass later deletes the endpoint. (Registry calls come after: the
    model version is registered once the endpoint is gone.)"""
    names = [n for n in recorder.names() if "ModelPackage" not in n]
    deletes = [n for n in names if n in TEARDOWN_ORDER]
    assert deletes[:3] == list(TEARDOWN_ORDER), names  # the flow's own pass tried all three
    assert names[-1] == "DeleteModel", names


@pytest.mark.usefixtures("no_network")
@pytest.mark.parametrize("fault", AWS_FAULTS, ids=[f.id for f in AWS_FAULTS])
def test_aws_teardown_under_fault(fault, prefect_harness, http_server, cifar_tarball, aws,
                                  sagemaker_calls, sagemaker_stand_in, tmp_path, monkeypatch):
    started = time.monotonic()
    monkeypatch.setenv("CIFAR10_PIPELINE_HOME", str(tmp_path / "state"))
    state, injection, reaped = run_with_fault(
        fault, AwsEndpoints, aws_config(http_server, cifar_tarball), monkeypatch)
    leaks = aws_leaks(aws, sagemaker_stand_in)
    add_fault_row("aws (moto)", fault, state, reaped, leaks, started)

    assert_state(fault, state)
    if fault.check:
        fault.check(injection)
    assert sagemaker_stand_in.served == [resource_name(str(state.state_details.flow_run_id))]
    if fault.reaper:
        assert reaped == sagemaker_stand_in.served
    assert_deleted_in_order(sagemaker_calls)
    assert leaks == {"endpoints": 0, "configs": 0, "models": 0, "processes": 0}
    if fault.cause is EndpointNotDeleted and "already failed" not in fault.message:
        # The model had passed its smoke test: registered before the run failed.
        assert "CreateModelPackage" in sagemaker_calls.names()


# --- the teardown's own failure, without a flow ------------------------------------------

@pytest.mark.parametrize("failure", [None, ConnectionError("the smoke test failed")])
def test_a_failed_delete_says_the_endpoint_may_still_be_up(failure, monkeypatch):
    import flows.smoke_endpoint

    def delete_endpoint(backend, name):
        raise PermissionError("access denied")

    monkeypatch.setattr(flows.smoke_endpoint, "delete_endpoint", delete_endpoint)
    config = PipelineConfig(backend="aws")
    with pytest.raises(EndpointNotDeleted) as raised:
        flows.smoke_endpoint.delete_run_endpoint(None, config, "cifar10-abc", failure)
    message = str(raised.value)
    assert message.startswith("endpoint cifar10-abc could not be deleted (PermissionError: "
                              "access denied); it may still be running: delete it with "
                              "`cifar10-pipeline endpoints delete cifar10-abc --backend aws`")
    assert message.endswith("; the run had already failed: ConnectionError: the smoke test "
                            "failed") == (failure is not None)
    assert isinstance(raised.value.__cause__, PermissionError)


def test_a_failed_delete_does_not_replace_a_cancellation(monkeypatch, pipeline_home):
    """A cancelled or interrupted run stays that (its hooks and the reaper delete later):
    an EndpointNotDeleted would turn the runner's cancellation into a plain failure."""
    import flows.smoke_endpoint

    def delete_endpoint(backend, name):
        raise PermissionError("access denied")

    monkeypatch.setattr(flows.smoke_endpoint, "delete_endpoint", delete_endpoint)
    flows.smoke_endpoint.delete_run_endpoint(None, PipelineConfig(), "cifar10-abc",
                                             KeyboardInterrupt())
