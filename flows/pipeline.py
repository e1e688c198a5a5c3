"""The CIFAR-10 pipeline as one Prefect flow:

download → preview → upload → fit (or reuse) → deploy → smoke-predict → delete endpoint →
register.

The endpoint is deleted in ``finally`` (success or failure) and again by the cancellation and
crash hooks, unless ``endpoint.keep`` is set; what a hard kill skips, the reaper catches later.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from prefect import Flow, State, flow
from prefect.client.schemas.objects import FlowRun
from prefect.runtime import flow_run as current_flow_run

from backends.base import (
    NAME_PREFIX,
    Backend,
    EndpointInfo,
    EndpointSpec,
    TrainingSpec,
    managed_tags,
)
from backends.settings import SOURCE_DIR
from flows.config import PipelineConfig, TrainingSettings, data_root, get_backend
from tasks.data import download_data, preview_data
from tasks.endpoint import AccuracyBelowFloor, delete_endpoint, deploy, smoke_predict
from tasks.lib.download import Dataset, display_url
from tasks.lib.lineage import cache_key, code_digest
from tasks.lib.summary import (
    DataSummary,
    EndpointSummary,
    RunSummary,
    SmokeTestResult,
    TrainingSummary,
    estimate_cost,
)
from tasks.registry import register_model
from tasks.reporting import logger
from tasks.retention import apply_retention
from tasks.run_summary import publish_summary
from tasks.training import fit, upload_data


class EndpointNotDeleted(RuntimeError):
    """The run's endpoint could not be deleted: it may still be running (and, on AWS, billing)
    until someone or the reaper deletes it. The message says so, and what to run."""


def resource_name(run_id: str) -> str:
    """Training job and endpoint name for a flow run: deterministic, so a retried task finds
    the job its first attempt started, and a hook in another process finds the endpoint."""
    return f"{NAME_PREFIX}{run_id.replace('-', '')[:12]}"


def _run_name() -> str:
    config = PipelineConfig.model_validate(current_flow_run.parameters.get("config") or {})
    return f"{config.backend}-{config.training.model}-{time.strftime('%Y%m%d-%H%M%S')}"


def teardown_endpoint(flow: Flow, flow_run: FlowRun, state: State) -> None:
    """Cancellation/crash hook: deletes this run's endpoint. It may run in another process
    (the runner), so everything is rebuilt from the run's parameters and id."""
    config = PipelineConfig.model_validate(flow_run.parameters.get("config") or {})
    teardown_run_endpoint(config, flow_run, state)


def teardown_run_endpoint(config: PipelineConfig, flow_run: FlowRun, state: State) -> None:
    """Deletes the endpoint a run of ``config`` created (if any), unless it is kept."""
    if config.endpoint.keep:
        return
    name = resource_name(str(flow_run.id))
    deleted = get_backend(config).endpoints.delete(name)
    logger().info("teardown hook (%s): endpoint %s %s", state.name, name,
                  "deleted" if deleted else "was already gone")


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


@contextmanager
def stage(timings: dict[str, float], name: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = round(time.perf_counter() - started, 3)


@dataclass
class Hosted:
    """What hosting a model for its smoke test left: the endpoint (deleted unless kept), the
    smoke test, and the failures that are raised once the model is registered."""

    endpoint: EndpointInfo
    smoke: SmokeTestResult
    smoke_failure: AccuracyBelowFloor | None
    teardown_failure: EndpointNotDeleted | None

    def raise_failure(self) -> None:
        if self.teardown_failure is not None:
            raise self.teardown_failure
        if self.smoke_failure is not None:
            raise self.smoke_failure

    def summary(self, config: PipelineConfig, instance_type: str,
                timings: dict[str, float]) -> EndpointSummary:
        return EndpointSummary(
            name=self.endpoint.name, url=self.endpoint.url, instance_type=instance_type,
            instance_count=config.endpoint.instance_count, kept=config.endpoint.keep,
            uptime_seconds=None if config.endpoint.keep else round(
                timings["deploy"] + timings["smoke_predict"] + timings["delete_endpoint"], 1))


def host_and_smoke_test(backend: Backend, config: PipelineConfig, name: str, model_uri: str,
                        dataset: Dataset, instance_type: str, run_id: str,
                        timings: dict[str, float]) -> Hosted:
    """deploy → smoke-predict → delete endpoint, the delete in ``finally`` (unless kept).
    A model that was smoke-tested (passed or below the floor) comes back, to be registered,
    with its failures; anything else that breaks is raised after the delete."""
    # A kept endpoint is marked, so that the reaper never deletes it.
    tags = managed_tags(owner=f"prefect-flow-run/{run_id}", kept=config.endpoint.keep)
    failure: BaseException | None = None
    smoke_failure: AccuracyBelowFloor | None = None
    teardown_failure: EndpointNotDeleted | None = None
    try:
        with stage(timings, "deploy"):
            endpoint = deploy(backend, EndpointSpec(
                name=name, model_uri=model_uri, instance_type=instance_type,
                instance_count=config.endpoint.instance_count, tags=tags))
        with stage(timings, "smoke_predict"):
            try:
                smoke = smoke_predict(backend, name, dataset, config.smoke_test.images,
                                      config.smoke_test.accuracy_floor)
            except AccuracyBelowFloor as e:
                # Registered all the same, as rejected; the run fails after that.
                smoke, smoke_failure = e.result, e
                failure = e
    except BaseException as e:
        failure = e
        raise
    finally:
        if not config.endpoint.keep:
            with stage(timings, "delete_endpoint"):
                try:
                    delete_run_endpoint(backend, config, name, failure)
                except EndpointNotDeleted as e:
                    if failure is not None and failure is not smoke_failure:
                        raise  # deploy or smoke-predict broke: nothing to register
                    # The model was tested: register it all the same, then fail the run.
                    teardown_failure = e
    return Hosted(endpoint, smoke, smoke_failure, teardown_failure)


def training_job(config: PipelineConfig, training: TrainingSettings, name: str, data_uri: str,
                 dataset: Dataset, code: str, tags: dict[str, str],
                 backend: Backend) -> tuple[TrainingSpec, str]:
    """The training job for ``training`` (the config's, or a sweep point's), and its cache
    key: the same data, code, hyperparameters, instances and backend train the same model."""
    instance_type, _ = config.instance_types()
    hyperparameters = training.hyperparameters()
    spec = TrainingSpec(job_name=name, data_uri=data_uri, hyperparameters=hyperparameters,
                        instance_type=instance_type, instance_count=training.instance_count,
                        max_runtime_seconds=training.max_runtime_minutes * 60, tags=tags)
    key = cache_key(data_md5=dataset.md5, code=code, hyperparameters=hyperparameters,
                    instance_type=instance_type, instance_count=training.instance_count,
                    backend=backend.name)
    return spec, key


def lineage_of(dataset: Dataset, code: str, spec: TrainingSpec, run_id: str,
               backend: Backend) -> dict[str, str]:
    """The registry's customer metadata for a model: what made it."""
    return {"data_url": display_url(dataset.url), "data_md5": dataset.md5,
            "code_digest": code, "hyperparameters": " ".join(
                f"{k}={v}" for k, v in sorted(spec.hyperparameters.items())),
            "flow_run_id": run_id, "backend": backend.name,
            "instance_type": spec.instance_type, "instance_count": str(spec.instance_count)}


@flow(name="cifar10-pipeline", flow_run_name=_run_name, log_prints=True,
      on_cancellation=[teardown_endpoint], on_crashed=[teardown_endpoint])
def cifar10_pipeline(config: PipelineConfig = PipelineConfig()) -> RunSummary:  # noqa: B008
    """Train a CNN on CIFAR-10, host it as a SageMaker endpoint, smoke-test it, tear it down."""
    backend = get_backend(config)
    backend.prepare()  # while the data downloads
    apply_retention(backend)  # what earlier runs left past the limits, or a kill
    run_id = str(current_flow_run.id or uuid.uuid4())
    name = resource_name(run_id)
    tags = managed_tags(owner=f"prefect-flow-run/{run_id}")
    timings: dict[str, float] = {}
    _, hosting_instance = config.instance_types()

    with stage(timings, "download"):
        dataset = download_data(config.data.url, config.data.md5, data_root(),
                                max_bytes=config.data.max_bytes,
                                deadline_minutes=config.data.deadline_minutes)
    with stage(timings, "preview"):
        preview_data(dataset, config.data.preview_images)
    with stage(timings, "upload"):
        data_uri = upload_data(backend, dataset)
    code = code_digest(SOURCE_DIR)
    spec, key = training_job(config, config.training, name, data_uri, dataset, code, tags,
                             backend)
    with stage(timings, "fit"):
        training = fit(backend, spec, registry_group=config.registry.group
                       if config.training.cache else None, cache_key=key)

    hosted = host_and_smoke_test(backend, config, name, training.model_uri, dataset,
                                 hosting_instance, run_id, timings)
    with stage(timings, "register"):
        registration = register_model(
            backend, config.registry.group, training, hosted.smoke,
            lineage=lineage_of(dataset, code, spec, run_id, backend),
            cache_key=key, hosting_instance=hosting_instance, tags=tags,
            tolerance=config.registry.tolerance, auto_approve=config.registry.auto_approve)
    hosted.raise_failure()

    training_summary = TrainingSummary.of(training, spec)
    endpoint_summary = hosted.summary(config, hosting_instance, timings)
    summary = RunSummary(
        flow_run_id=run_id, backend=backend.name, stages=timings,
        data=DataSummary.of(dataset, data_uri),
        training=training_summary, smoke_test=hosted.smoke, endpoint=endpoint_summary,
        cost=estimate_cost(backend.name, [training_summary], endpoint_summary),
        registry=registration)
    publish_summary(summary)
    return summary
