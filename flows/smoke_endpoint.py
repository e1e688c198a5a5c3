"""Hosting a model for its smoke test, and tearing its endpoint down.

``SmokeTestEndpoint`` deploys on entry and deletes on exit (success or failure) unless
``endpoint.keep`` is set; the flows' cancellation and crash hooks delete again
(``teardown_run_endpoint``), and what a hard kill skips, the reaper catches later.
"""

from __future__ import annotations

from types import TracebackType

from prefect import State
from prefect.client.schemas.objects import FlowRun

from backends.base import Backend, EndpointInfo, EndpointSpec, managed_tags
from flows.config import PipelineConfig, get_backend
from flows.run_context import RunContext, resource_name
from tasks.endpoint import AccuracyBelowFloor, delete_endpoint, deploy, smoke_predict
from tasks.lib.download import Dataset
from tasks.lib.summary import EndpointSummary, SmokeTestResult
from tasks.reporting import logger


class EndpointNotDeleted(RuntimeError):
    """The run's endpoint could not be deleted: it may still be running (and, on AWS, billing)
    until someone or the reaper deletes it. The message says so, and what to run."""


class SmokeTestEndpoint:
    """``with SmokeTestEndpoint(run, model_uri) as endpoint: endpoint.smoke_test(dataset)``.

    A model that was smoke-tested (passed, or below the floor) leaves the block normally, so
    that it can be registered; its failures are raised afterwards by ``raise_failure``.
    Anything else that breaks inside is raised once the endpoint is deleted."""

    def __init__(self, run: RunContext, model_uri: str) -> None:
        self.run = run
        keep = run.config.endpoint.keep
        self.spec = EndpointSpec(
            name=run.name, model_uri=model_uri, instance_type=run.hosting_instance,
            instance_count=run.config.endpoint.instance_count,
            tags=managed_tags(owner=run.owner, kept=keep))  # a kept endpoint is never reaped
        self.info: EndpointInfo | None = None
        self.smoke: SmokeTestResult | None = None
        self.smoke_failure: AccuracyBelowFloor | None = None
        self.teardown_failure: EndpointNotDeleted | None = None

    def __enter__(self) -> SmokeTestEndpoint:
        try:
            with self.run.stage("deploy"):
                self.info = deploy(self.run.backend, self.spec)
        except BaseException as e:
            self.__exit__(type(e), e, e.__traceback__)  # a half-made endpoint goes too
            raise
        return self

    def smoke_test(self, dataset: Dataset) -> SmokeTestResult:
        """The smoke test; one under the accuracy floor is kept, to be registered as such."""
        settings = self.run.config.smoke_test
        with self.run.stage("smoke_predict"):
            try:
                self.smoke = smoke_predict(self.run.backend, self.spec.name, dataset,
                                           settings.images, settings.accuracy_floor)
            except AccuracyBelowFloor as e:
                self.smoke, self.smoke_failure = e.result, e
        return self.smoke

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if self.run.config.endpoint.keep:
            return
        with self.run.stage("delete_endpoint"):
            try:
                delete_run_endpoint(self.run.backend, self.run.config, self.spec.name,
                                    exc or self.smoke_failure)
            except EndpointNotDeleted as e:
                if exc is not None:
                    raise  # deploy or smoke-predict broke: there is nothing to register
                self.teardown_failure = e  # the model was tested: register it, then fail

    def raise_failure(self) -> None:
        """After registration: the failed delete first (something may be billing), else the
        smoke test under its floor."""
        if self.teardown_failure is not None:
            raise self.teardown_failure
        if self.smoke_failure is not None:
            raise self.smoke_failure

    def summary(self) -> EndpointSummary:
        config, timings = self.run.config, self.run.timings
        assert self.info is not None, "summary() of an endpoint that was never deployed"
        return EndpointSummary(
            name=self.info.name, url=self.info.url, instance_type=self.spec.instance_type,
            instance_count=config.endpoint.instance_count, kept=config.endpoint.keep,
            uptime_seconds=None if config.endpoint.keep else round(
                timings["deploy"] + timings["smoke_predict"] + timings["delete_endpoint"], 1))


def delete_run_endpoint(backend: Backend, config: PipelineConfig, name: str,
                        failure: BaseException | None) -> None:
    """The delete task, and when it fails for good, an error that says the endpoint may still
    be up, how to delete it, and what had failed before (its own error would hide that)."""
    try:
        delete_endpoint(backend, name)
    except Exception as e:
        if failure is not None and not isinstance(failure, Exception):
            # Cancelled or interrupted: keep that as the run's outcome (its hooks and the
            # reaper try the delete again); the delete task's own failure is in the logs.
            return
        command = f"cifar10-pipeline endpoints delete {name}" + (
            " --backend aws" if config.backend == "aws" else "")
        before = f"; the run had already failed: {type(failure).__name__}: {failure}" \
            if failure is not None else ""
        raise EndpointNotDeleted(
            f"endpoint {name} could not be deleted ({type(e).__name__}: {e}); it may still "
            f"be running: delete it with `{command}` (the endpoint reaper deletes it once it "
            f"is older than its TTL){before}") from e


def teardown_run_endpoint(config: PipelineConfig, flow_run: FlowRun, state: State) -> None:
    """For the flows' cancellation and crash hooks, which may run in another process (the
    runner): deletes the endpoint a run of ``config`` created (if any), unless it is kept."""
    if config.endpoint.keep:
        return
    name = resource_name(str(flow_run.id))
    deleted = get_backend(config).endpoints.delete(name)
    logger().info("teardown hook (%s): endpoint %s %s", state.name, name,
                  "deleted" if deleted else "was already gone")
