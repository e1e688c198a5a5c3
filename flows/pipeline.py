"""The CIFAR-10 pipeline as one Prefect flow:

download → preview → upload → fit (or reuse) → deploy → smoke-predict → delete endpoint →
register → promote (when ``serving.enabled``: a new champion goes to the serving endpoint).

The endpoint is deleted when the hosting block ends (success or failure) and again by the
cancellation and crash hooks, unless ``endpoint.keep`` is set; what a hard kill skips, the
reaper catches later (``flows/smoke_endpoint.py``).
"""

from __future__ import annotations

import time

from prefect import Flow, State, flow
from prefect.client.schemas.objects import FlowRun
from prefect.runtime import flow_run as current_flow_run

from flows.config import PipelineConfig, data_root, get_backend
from flows.promote import promote_stage, raise_unless_served
from flows.run_context import start_run
from flows.smoke_endpoint import SmokeTestEndpoint, teardown_run_endpoint
from flows.training_jobs import plan_training_job
from tasks.data import download_data, preview_data
from tasks.lib.summary import DataSummary, RunSummary, TrainingSummary, estimate_cost
from tasks.registry import register_model
from tasks.run_summary import publish_summary
from tasks.training import fit, upload_data


def _run_name() -> str:
    config = PipelineConfig.model_validate(current_flow_run.parameters.get("config") or {})
    return f"{config.backend}-{config.training.model}-{time.strftime('%Y%m%d-%H%M%S')}"


def teardown_endpoint(flow: Flow, flow_run: FlowRun, state: State) -> None:
    """Cancellation/crash hook: deletes this run's endpoint. It may run in another process
    (the runner), so everything is rebuilt from the run's parameters and id."""
    config = PipelineConfig.model_validate(flow_run.parameters.get("config") or {})
    teardown_run_endpoint(config, flow_run, state)


@flow(name="cifar10-pipeline", flow_run_name=_run_name, log_prints=True,
      on_cancellation=[teardown_endpoint], on_crashed=[teardown_endpoint])
def cifar10_pipeline(config: PipelineConfig = PipelineConfig()) -> RunSummary:  # noqa: B008
    """Train a CNN on CIFAR-10, host it as a SageMaker endpoint, smoke-test it, tear it down;
    with config.serving.enabled, promote a new champion to the serving endpoint."""
    run = start_run(config, get_backend(config))

    with run.stage("download"):
        dataset = download_data(config.data.url, config.data.md5, data_root(),
                                max_bytes=config.data.max_bytes,
                                deadline_minutes=config.data.deadline_minutes)
    with run.stage("preview"):
        preview_data(dataset, config.data.preview_images)
    with run.stage("upload"):
        data_uri = upload_data(run.backend, dataset)
    job = plan_training_job(run, config.training, run.name, dataset, data_uri)
    with run.stage("fit"):
        training = fit(run.backend, job.spec, registry_group=config.registry.group
                       if config.training.cache else None, cache_key=job.cache_key)

    with SmokeTestEndpoint(run, training.model_uri) as endpoint:
        smoke = endpoint.smoke_test(dataset)
    with run.stage("register"):
        registration = register_model(run.backend, job.candidate(run, training, smoke),
                                      training, smoke, config.registry.gate_policy())
    endpoint.raise_failure()
    promotion = promote_stage(run, registration)

    training_summary = TrainingSummary.of(training, job.spec)
    endpoint_summary = endpoint.summary()
    summary = RunSummary(
        flow_run_id=run.run_id, backend=run.backend.name, stages=run.timings,
        data=DataSummary.of(dataset, data_uri),
        training=training_summary, smoke_test=smoke, endpoint=endpoint_summary,
        cost=estimate_cost(run.backend.name, [training_summary], endpoint_summary),
        registry=registration, promotion=promotion)
    publish_summary(summary)
    raise_unless_served(promotion)  # after the summary: it says what rolled back, and why
    return summary
