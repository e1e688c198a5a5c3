"""A hyperparameter sweep as one Prefect flow:

download → upload → fit every grid point (concurrent training jobs, at most ``max_parallel``
at once) → pick the best test accuracy → deploy, smoke-test and delete the winner's endpoint
→ register every point → promote the winner (when ``serving.enabled``, as the pipeline does).

Points that fail are reported and do not fail the sweep, unless all of them fail. Only the
winner is ever hosted, and its endpoint is deleted as in the pipeline (``finally``, then the
cancellation and crash hooks, then the reaper).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from typing import Any

from prefect import Flow, State, flow
from prefect.client.schemas.objects import FlowRun
from prefect.futures import PrefectFuture, as_completed
from prefect.runtime import flow_run as current_flow_run

from backends.base import Backend, QuotaExceeded, TrainingResult
from backends.settings import usable_cpus
from flows.config import (
    AWS_DEFAULT_PARALLEL_JOBS,
    SweepConfig,
    TrainingSettings,
    data_root,
    get_backend,
)
from flows.promote import promote_stage, raise_unless_served
from flows.run_context import RunContext, resource_name, start_run
from flows.smoke_endpoint import SmokeTestEndpoint, teardown_run_endpoint
from flows.training_jobs import PlannedJob, plan_training_job
from tasks.data import download_data
from tasks.lib.summary import (
    DataSummary,
    SmokeTestResult,
    SweepPoint,
    SweepSummary,
    TrainingSummary,
    estimate_cost,
    quota_note,
)
from tasks.registry import register_model
from tasks.reporting import logger
from tasks.sweep import publish_sweep
from tasks.training import fit, upload_data

# SageMaker's quotas for training instances start low on new accounts (0 for most GPU types, a
# few for CPU types): past this many instances at once, a sweep says the quota may be its limit.
FEW_TRAINING_INSTANCES = AWS_DEFAULT_PARALLEL_JOBS


class SweepFailed(RuntimeError):
    """Every point of the sweep failed: there is no model to host."""


def _run_name() -> str:
    config = SweepConfig.model_validate(current_flow_run.parameters.get("config") or {})
    return (f"{config.base.backend}-sweep-{len(config.points())}-points-"
            f"{time.strftime('%Y%m%d-%H%M%S')}")


def teardown_sweep(flow: Flow, flow_run: FlowRun, state: State) -> None:
    """Cancellation/crash hook (possibly in another process: the runner): stops the points'
    training jobs still running, deletes the winner's endpoint if it got that far."""
    config = SweepConfig.model_validate(flow_run.parameters.get("config") or {})
    run_id = str(flow_run.id)
    stop_trainings(get_backend(config.base), [point_job_name(run_id, i + 1)
                                              for i in range(len(config.points()))])
    teardown_run_endpoint(config.base, flow_run, state)


def stop_trainings(backend: Backend, job_names: list[str]) -> None:
    """Stops those of ``job_names`` still running: a cancelled sweep must not leave training
    jobs running (on AWS, billing) in worker threads nobody waits for."""
    log = logger()
    for name in job_names:
        try:
            if backend.jobs.stop(name):
                log.info("stopped training job %s", name)
        except Exception as e:  # best effort: the next job still gets its stop
            log.warning("could not stop training job %s: %s", name, e)


def point_job_name(run_id: str, index: int) -> str:
    """Each point's training job: the run's name and the point's number."""
    return f"{resource_name(run_id)}-p{index}"


def quota_warning(config: SweepConfig, parallel: int) -> str | None:
    """A warning when a sweep on AWS asks for more training instances at once than new
    accounts' quotas usually allow; None otherwise."""
    training = config.base.training
    instances = parallel * training.instance_count
    if config.base.backend != "aws" or instances <= FEW_TRAINING_INSTANCES:
        return None
    return (f"this sweep runs up to {instances} {training.instance_type} training instances "
            f"at once ({parallel} jobs x {training.instance_count}); the AWS account's "
            f"SageMaker quota '{training.instance_type} for training job usage' is often lower "
            f"on new accounts (0 for most GPU types): check it in Service Quotas. Points it "
            f"refuses wait for room (aws quota_wait_seconds), then fail")


def sweep_point(index: int, future: PrefectFuture, job: PlannedJob, values: dict[str, Any],
                started: dt.datetime) -> tuple[SweepPoint, TrainingResult | None]:
    """A finished point's row, and its training when it completed."""
    spec = job.spec
    state = future.state
    ended = state.timestamp or dt.datetime.now(dt.UTC)
    point = SweepPoint(index=index, values=values, hyperparameters=spec.hyperparameters,
                       job_name=spec.job_name, status="Failed", started=started.isoformat(),
                       ended=ended.isoformat(), seconds=round((ended - started).total_seconds(), 1))
    if state.is_completed():
        result = future.result()
        point.status = "Cached" if result.cached_from else "Completed"
        point.job_name = spec.job_name if result.cached_from else result.job_name  # -rN
        point.test_accuracy = float(result.metrics.get("test_accuracy", 0.0))
        point.training = TrainingSummary.of(result, spec)
        point.quota_wait_seconds = result.quota_wait_seconds
        return point, result
    error = future.result(raise_on_failure=False)
    point.error = (f"{type(error).__name__}: {error}" if isinstance(error, BaseException)
                   else state.message or state.name)
    point.job_name = getattr(error, "job_name", None) or spec.job_name
    if isinstance(error, QuotaExceeded):
        point.quota_refused, point.quota_wait_seconds = True, error.waited_seconds
    logger().warning("point %d (%s) failed: %s", index, point.label(), point.error)
    return point, None


def collect_points(futures: list[PrefectFuture], jobs: list[PlannedJob],
                   points: list[TrainingSettings], swept: dict[str, list[Any]],
                   submitted: dict[int, dt.datetime]
                   ) -> tuple[list[SweepPoint], dict[int, TrainingResult]]:
    """Every point's row, in grid order, and the trainings that completed, by index."""
    results: list[SweepPoint] = []
    trained: dict[int, TrainingResult] = {}
    for i, future in enumerate(futures):
        values = {name: getattr(points[i], name) for name in swept}
        point, result = sweep_point(i + 1, future, jobs[i], values, submitted[i])
        results.append(point)
        if result is not None:
            trained[i] = result
    return results, trained


def run_bounded(submit: Callable[[int], PrefectFuture], count: int,
                limit: int) -> list[PrefectFuture]:
    """Submits ``submit(0..count-1)`` with at most ``limit`` unfinished at any time; returns
    every future, in submission order, once all have finished."""
    futures: list[PrefectFuture] = []
    running: list[PrefectFuture] = []
    for index in range(count):
        while len(running) >= limit:
            finished = next(as_completed(running))
            running.remove(finished)
        future = submit(index)
        futures.append(future)
        running.append(future)
    for future in futures:
        future.wait()
    return futures


def fit_points(run: RunContext, jobs: list[PlannedJob], points: list[TrainingSettings],
               parallel: int) -> tuple[list[PrefectFuture], dict[int, dt.datetime]]:
    """Every point's fit, at most ``parallel`` at once: the futures, and when each started.
    Cancelled or interrupted while points train in other threads, it stops their jobs."""
    submitted: dict[int, dt.datetime] = {}

    def submit(index: int) -> PrefectFuture:
        # Submitted only once a slot is free, to a pool with more threads than slots: the
        # point starts now.
        submitted[index] = dt.datetime.now(dt.UTC)
        job = jobs[index]
        return fit.submit(run.backend, job.spec, registry_group=run.config.registry.group
                          if points[index].cache else None, cache_key=job.cache_key)

    try:
        return run_bounded(submit, len(points), parallel), submitted
    except BaseException:
        stop_trainings(run.backend, [job.spec.job_name for job in jobs])
        raise


def pick_winner(results: list[SweepPoint], trained: dict[int, TrainingResult]) -> int:
    """The trained point with the best test accuracy (the first of equals), marked winner."""
    if not trained:
        raise SweepFailed(f"all {len(results)} points failed; the first: {results[0].error}")
    best = max(trained, key=lambda i: (results[i].test_accuracy or 0.0, -i))
    results[best].winner = True
    winner = results[best]
    logger().info("winner: point %d (%s), test accuracy %.4f", winner.index, winner.label(),
                  winner.test_accuracy)
    return best


def register_points(run: RunContext, jobs: list[PlannedJob], results: list[SweepPoint],
                    trained: dict[int, TrainingResult], best: int,
                    smoke: SmokeTestResult) -> None:
    """Registers every trained point, the winner first: its version number follows the
    champion's it was measured against. The others are rejected as passed over."""
    winner = results[best]
    for i, result in sorted(trained.items(), key=lambda item: item[0] != best):
        hosted = smoke if i == best else None
        results[i].registry = register_model(
            run.backend, jobs[i].candidate(run, result, hosted), result, hosted,
            run.config.registry.gate_policy(),
            passed_over=f"sweep point {i + 1}: test accuracy "
                        f"{results[i].test_accuracy:.4f} < the winner's "
                        f"{winner.test_accuracy:.4f} (point {winner.index})")


def log_plan(config: SweepConfig, parallel: int) -> None:
    log = logger()
    log.info("sweep of %d points over %s, at most %d training jobs at once",
             len(config.points()), ", ".join(config.grid.swept()) or "nothing (the base config)",
             parallel)
    if warning := quota_warning(config, parallel):
        log.warning(warning)


@flow(name="cifar10-sweep", flow_run_name=_run_name, log_prints=True,
      on_cancellation=[teardown_sweep], on_crashed=[teardown_sweep])
def cifar10_sweep(config: SweepConfig = SweepConfig()) -> SweepSummary:  # noqa: B008
    """Train one model per grid point in parallel, host and smoke-test the best, register all."""
    base, points = config.base, config.points()
    parallel = config.parallel_jobs(usable_cpus())
    run = start_run(base, get_backend(base, concurrent_jobs=parallel))
    log_plan(config, parallel)

    with run.stage("download"):
        dataset = download_data(base.data.url, base.data.md5, data_root(),
                                max_bytes=base.data.max_bytes,
                                deadline_minutes=base.data.deadline_minutes)
    with run.stage("upload"):
        data_uri = upload_data(run.backend, dataset)
    jobs = [plan_training_job(run, training, point_job_name(run.run_id, i + 1), dataset,
                              data_uri) for i, training in enumerate(points)]
    with run.stage("fit"):
        futures, submitted = fit_points(run, jobs, points, parallel)
    results, trained = collect_points(futures, jobs, points, config.grid.swept(), submitted)
    # A point marked Failed leaves no job running: the backend stops a job it gives up on,
    # and this asks again in case that stop failed too (AWS unreachable at that moment).
    stop_trainings(run.backend, [jobs[i].spec.job_name for i, p in enumerate(results)
                                 if p.status == "Failed"])
    best = pick_winner(results, trained)

    with SmokeTestEndpoint(run, trained[best].model_uri) as endpoint:
        smoke = endpoint.smoke_test(dataset)
    with run.stage("register"):
        register_points(run, jobs, results, trained, best, smoke)
    endpoint.raise_failure()
    promotion = promote_stage(run, results[best].registry)

    hosting = endpoint.summary()
    summary = SweepSummary(
        flow_run_id=run.run_id, backend=run.backend.name, max_parallel=parallel,
        stages=run.timings, data=DataSummary.of(dataset, data_uri), points=results,
        smoke_test=smoke, endpoint=hosting,
        quota_note=quota_note(results, base.training.instance_type),
        cost=estimate_cost(run.backend.name, [p.training for p in results if p.training],
                           hosting), promotion=promotion)
    publish_sweep(summary)
    raise_unless_served(promotion)  # after the report: it says what rolled back, and why
    return summary
