"""The run summary: one typed record of what a run did, which the flow returns and from which the
CLI's text, its ``--json`` and the summary artifact in the Prefect UI are all rendered."""

from __future__ import annotations

import datetime as dt
from typing import Any

from pydantic import BaseModel

from backends.base import CREATED, PROMOTED, ROLLED_BACK, TrainingResult, TrainingSpec
from tasks.lib.download import Dataset

# Approximate on-demand prices (USD per instance-hour, us-east-1, Linux), for an order of
# magnitude only: check https://aws.amazon.com/sagemaker/pricing/ for your region and date.
PRICES_PER_HOUR = {
    "ml.m5.large": 0.115, "ml.m5.xlarge": 0.23, "ml.m5.2xlarge": 0.461,
    "ml.m5.4xlarge": 0.922, "ml.c5.xlarge": 0.204, "ml.c5.2xlarge": 0.408,
    "ml.c5.4xlarge": 0.816, "ml.g4dn.xlarge": 0.736, "ml.g4dn.2xlarge": 0.94,
    "ml.g5.xlarge": 1.408, "ml.g5.2xlarge": 1.515, "ml.p3.2xlarge": 3.825,
    "ml.t2.medium": 0.056,
}


class SmokeTestResult(BaseModel):
    images: int
    accuracy: float
    accuracy_floor: float
    per_class: dict[str, float | None]  # class → accuracy on the sample (None: not sampled)
    requests: int
    seconds: float

    @property
    def passed(self) -> bool:
        return self.accuracy >= self.accuracy_floor


class DataSummary(BaseModel):
    url: str
    md5: str
    reused: bool  # a verified copy was already in place: nothing downloaded
    path: str
    uri: str  # the training channel in the backend's store

    @classmethod
    def of(cls, dataset: Dataset, uri: str) -> DataSummary:
        return cls(url=dataset.url, md5=dataset.md5, reused=dataset.reused, path=dataset.path,
                   uri=uri)


class TrainingSummary(BaseModel):
    job_name: str
    model_uri: str
    billable_seconds: int
    instance_type: str
    instance_count: int
    metrics: dict[str, Any]  # the entry script's metrics.json
    cached_from: str | None = None  # the earlier job reused instead of training

    @classmethod
    def of(cls, result: TrainingResult, spec: TrainingSpec) -> TrainingSummary:
        return cls(job_name=result.job_name, model_uri=result.model_uri,
                   billable_seconds=result.billable_seconds, instance_type=spec.instance_type,
                   instance_count=spec.instance_count, metrics=result.metrics,
                   cached_from=result.cached_from)


REUSED_NOTE = ", already registered: not registered again"


class RegistrySummary(BaseModel):
    group: str
    version: int
    status: str  # Approved | Rejected | PendingManualApproval
    reason: str
    champion_before: int | None  # the approved version this one was measured against
    # A cached model that was already registered: ``version`` is the existing one, and nothing
    # was registered (nor decided) by this run.
    reused: bool = False

    def line(self) -> str:
        """The registration in one line, for the CLI and the summary artifact."""
        again = REUSED_NOTE if self.reused else ""
        return f"{self.group} v{self.version}: {self.status} ({self.reason}){again}"


# How a promotion ended besides backends.base's outcomes (created, promoted, rolled_back,
# failed): the stage decided not to promote, and did nothing.
NOT_PROMOTED = "not_promoted"
PROMOTION_OK = (CREATED, PROMOTED, NOT_PROMOTED)


class PromotionStepRow(BaseModel):
    """One step of a promotion (``backends.base.PromotionStep``), for the table and --json."""

    at: dt.datetime
    action: str
    new_share: float  # 0.0-1.0
    error_rate: float | None = None
    p99_latency_ms: float | None = None
    invocations: int | None = None
    note: str = ""


class PromotionSummary(BaseModel):
    """What the promote stage did: the version it promoted (or not, and why), how it ended,
    and which version serves on the endpoint afterwards."""

    endpoint: str
    group: str
    version: int | None  # the version promoted (asked for); None: none was chosen
    outcome: str  # created | promoted | rolled_back | failed | not_promoted
    reason: str
    shift: str  # "canary 10%", "linear 20% steps", "all at once"
    status: str | None = None  # the endpoint's status afterwards
    serving_version: int | None = None  # the version serving afterwards
    serving_before: int | None = None
    steps: list[PromotionStepRow] = []

    @property
    def ok(self) -> bool:
        """False when the promotion was tried and the new version does not serve."""
        return self.outcome in PROMOTION_OK

    def line(self) -> str:
        """The promotion in one line, for the CLI, the summary and the run's failure."""
        serving = (f"; v{self.serving_version} serves" if self.serving_version is not None
                   else "; nothing of this group serves")
        if self.outcome == NOT_PROMOTED:
            return f"not promoted: {self.reason}"
        if self.outcome in (CREATED, PROMOTED):
            before = f", replacing v{self.serving_before}" if self.serving_before else ""
            return (f"{self.group} v{self.version} {self.outcome} on {self.endpoint} "
                    f"({self.shift}{before})")
        what = "ROLLED BACK" if self.outcome == ROLLED_BACK else "FAILED"
        status = f"; the endpoint is {self.status}" if self.status else ""
        return (f"promotion of {self.group} v{self.version} to {self.endpoint} {what} "
                f"({self.shift}): {self.reason}{serving}{status}")

    def text(self) -> str:
        """The CLI's closing lines for `serving promote` / `serving rollback`."""
        lines = ["", self.line()]
        lines += [f"  {s.at:%H:%M:%S}  {s.action:<22} new {s.new_share:>4.0%}  "
                  f"errors {_maybe(s.error_rate, '.3f')}  p99 "
                  f"{_maybe(s.p99_latency_ms, '.0f')} ms  {s.note}".rstrip()
                  for s in self.steps]
        return "\n".join(lines)


def _maybe(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


class EndpointSummary(BaseModel):
    name: str
    url: str | None  # where a local endpoint listens
    instance_type: str
    instance_count: int
    kept: bool
    uptime_seconds: float | None  # None: kept, still running


class CostEstimate(BaseModel):
    usd: float
    note: str


class RunSummary(BaseModel):
    flow_run_id: str
    backend: str
    stages: dict[str, float]  # stage → seconds, in the order they ran
    data: DataSummary
    training: TrainingSummary
    smoke_test: SmokeTestResult
    endpoint: EndpointSummary
    cost: CostEstimate
    registry: RegistrySummary | None = None
    promotion: PromotionSummary | None = None  # None: serving is off (config.serving)

    def text(self) -> str:
        """The CLI's closing lines."""
        metrics, smoke, endpoint = self.training.metrics, self.smoke_test, self.endpoint
        return "\n".join([
            "",
            f"run {self.flow_run_id} completed on {self.backend}",
            f"  data            {self.data.uri}",
            f"  model           {self.training.model_uri}",
            f"  test accuracy   {metrics.get('test_accuracy', 0):.4f} "
            f"({metrics.get('model')} network, {metrics.get('epochs')} epochs, "
            f"{metrics.get('precision', '?')})",
            f"  smoke test      {smoke.accuracy:.3f} on {smoke.images} images "
            f"(floor {smoke.accuracy_floor})",
            f"  endpoint        {endpoint.name} "
            f"({'kept at ' + str(endpoint.url) if endpoint.kept else 'deleted'})",
            *([f"  training        cached from job {self.training.cached_from}"]
              if self.training.cached_from else []),
            *([f"  registry        {self.registry.line()}"] if self.registry else []),
            *([f"  serving         {self.promotion.line()}"] if self.promotion else []),
            f"  billable        {self.training.billable_seconds} training seconds, "
            f"estimated ${self.cost.usd:.4f}",
            "  stages          " + ", ".join(f"{k} {v:.1f}s" for k, v in self.stages.items()),
        ])

    def markdown(self) -> str:
        """The summary artifact on the run's page."""
        data, training, smoke = self.data, self.training, self.smoke_test
        endpoint, metrics, cost = self.endpoint, self.training.metrics, self.cost
        uptime = endpoint.uptime_seconds
        rows = [
            ("data", f"`{data.uri}` (md5 `{data.md5}`"
                     f"{', reused a verified copy' if data.reused else ''})"),
            ("model artifact", f"`{training.model_uri}`"),
            ("training job", (f"cached from `{training.cached_from}` (nothing trained): "
                              if training.cached_from else "")
             + f"`{training.job_name}`: {metrics.get('model', '?')} network, "
                             f"{metrics.get('epochs', '?')} epochs in "
                             f"{metrics.get('precision', '?')}, test accuracy "
                             f"**{metrics.get('test_accuracy', 0):.2%}**"),
            ("billable training seconds", f"{training.billable_seconds} "
                                          f"({training.instance_count} x "
                                          f"{training.instance_type})"),
            ("endpoint", f"`{endpoint.name}`" + (f" at {endpoint.url}" if endpoint.url else "")
             + (" (kept)" if endpoint.kept else " (deleted)")),
            ("endpoint uptime", "still running" if uptime is None else f"{uptime:.0f} s"),
            ("smoke test", f"{smoke.accuracy:.1%} on {smoke.images} images "
                           f"(floor {smoke.accuracy_floor:.0%})"),
            ("estimated cost", f"${cost.usd:.4f} ({cost.note})"),
        ]
        if self.registry:
            registry = self.registry
            again = REUSED_NOTE if registry.reused else ""
            rows.append(("model registry", f"`{registry.group}` v{registry.version}: "
                                           f"**{registry.status}** ({registry.reason}){again}"))
        if self.promotion:
            rows.append(("serving endpoint", promotion_markdown(self.promotion)))
        table = "\n".join(f"| {label} | {value} |" for label, value in rows)
        stages = "\n".join(f"| {name} | {seconds:.1f} |" for name, seconds in self.stages.items())
        return (f"## CIFAR-10 pipeline run on `{self.backend}`\n\n| what | value |\n|---|---|\n"
                f"{table}\n\n| stage | seconds |\n|---|---|\n{stages}\n")


def promotion_markdown(promotion: PromotionSummary) -> str:
    """The promotion in a table cell: a rollback or a failure in bold, so nobody misses it."""
    line = promotion.line()
    return line if promotion.ok else f"**{line}**"


def estimate_cost(backend: str, trainings: list[TrainingSummary],
                  endpoint: EndpointSummary | None) -> CostEstimate:
    """Training is billed per instance-second (every job of a sweep), hosting per
    instance-second of uptime."""
    if backend == "local":
        return CostEstimate(usd=0.0, note="local backend: no AWS charges")
    usd, unknown = 0.0, set()
    for training in trainings:
        if (price := PRICES_PER_HOUR.get(training.instance_type)) is None:
            unknown.add(training.instance_type)
        else:
            usd += training.billable_seconds / 3600 * price
    if endpoint is not None:
        if (host_price := PRICES_PER_HOUR.get(endpoint.instance_type)) is None:
            unknown.add(endpoint.instance_type)
        elif endpoint.uptime_seconds is not None:
            usd += endpoint.uptime_seconds / 3600 * host_price * endpoint.instance_count
    note = "approximate on-demand list prices (us-east-1); excludes S3, CloudWatch, transfer"
    if unknown:
        note += f"; no price known for {', '.join(sorted(unknown))}"
    if endpoint is not None and endpoint.uptime_seconds is None:
        note += "; the kept endpoint keeps costing until deleted"
    return CostEstimate(usd=round(usd, 4), note=note)


class SweepPoint(BaseModel):
    """One grid point: one training job."""

    index: int  # 1-based, in grid order
    values: dict[str, Any]  # the swept settings of this point (e.g. {"learning_rate": 0.05})
    hyperparameters: dict[str, Any]  # everything the entry script received
    job_name: str
    status: str  # Completed | Cached | Failed
    test_accuracy: float | None = None
    seconds: float | None = None  # wall-clock of the fit task
    started: str | None = None  # ISO time the fit task started and ended (concurrency)
    ended: str | None = None
    error: str | None = None  # why it failed
    training: TrainingSummary | None = None
    registry: RegistrySummary | None = None
    winner: bool = False
    quota_wait_seconds: float = 0.0  # waited for the AWS account's quota to let its job start
    quota_refused: bool = False  # failed: the quota never made room

    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.values.items()) or "base"


class SweepSummary(BaseModel):
    """What a sweep did: every point, the winner, its smoke test and endpoint, the total cost."""

    flow_run_id: str
    backend: str
    max_parallel: int
    stages: dict[str, float]
    data: DataSummary
    points: list[SweepPoint]
    smoke_test: SmokeTestResult
    endpoint: EndpointSummary
    cost: CostEstimate
    quota_note: str | None = None  # the AWS account's quota, not max_parallel, was the limit
    promotion: PromotionSummary | None = None  # None: serving is off (config.serving)

    @property
    def winner(self) -> SweepPoint:
        return next(p for p in self.points if p.winner)

    def rows(self) -> list[dict[str, Any]]:
        """The table artifact and the CLI's table: one row per point."""
        return [{"point": p.index, **p.values,
                 "test_accuracy": None if p.test_accuracy is None else round(p.test_accuracy, 4),
                 "seconds": p.seconds,
                 "billable_seconds": p.training.billable_seconds if p.training else 0,
                 "status": p.status + (" (winner)" if p.winner else ""),
                 "job": p.job_name, "registry": (f"v{p.registry.version} {p.registry.status}"
                                                 + (" (existing)" if p.registry.reused else "")
                                                 if p.registry else ""),
                 "error": p.error or ""} for p in self.points]

    def text(self) -> str:
        """The CLI's closing lines."""
        winner, failed = self.winner, [p for p in self.points if p.status == "Failed"]
        lines = ["", f"sweep {self.flow_run_id} completed on {self.backend}: "
                     f"{len(self.points)} points, {len(failed)} failed, "
                     f"at most {self.max_parallel} at once"]
        for p in self.points:
            accuracy = "   -  " if p.test_accuracy is None else f"{p.test_accuracy:.4f}"
            lines.append(f"  {'*' if p.winner else ' '} {p.index:>2}  {p.label():<40} "
                         f"{accuracy}  {p.status:<9} {p.seconds or 0:>7.1f}s  "
                         f"{p.error or p.job_name}")
        billable = sum(p.training.billable_seconds for p in self.points if p.training)
        lines += [
            f"  winner          point {winner.index} ({winner.label()}): test accuracy "
            f"{winner.test_accuracy or 0:.4f}",
            f"  smoke test      {self.smoke_test.accuracy:.3f} on {self.smoke_test.images} "
            f"images (floor {self.smoke_test.accuracy_floor})",
            f"  endpoint        {self.endpoint.name} "
            f"({'kept at ' + str(self.endpoint.url) if self.endpoint.kept else 'deleted'})",
            f"  billable        {billable} training seconds, "
            f"estimated ${self.cost.usd:.4f} in all",
            "  stages          " + ", ".join(f"{k} {v:.1f}s" for k, v in self.stages.items()),
        ]
        if self.quota_note:
            lines.append(f"  quota           {self.quota_note}")
        if self.promotion:
            lines.append(f"  serving         {self.promotion.line()}")
        return "\n".join(lines)

    def markdown(self) -> str:
        """The sweep's summary artifact."""
        winner = self.winner
        return (f"## CIFAR-10 sweep on `{self.backend}`\n\n"
                f"{len(self.points)} points, at most {self.max_parallel} training jobs at once. "
                f"Winner: point {winner.index} (`{winner.label()}`), test accuracy "
                f"**{winner.test_accuracy:.2%}**, smoke test {self.smoke_test.accuracy:.1%} on "
                f"{self.smoke_test.images} images; endpoint `{self.endpoint.name}` "
                f"{'kept' if self.endpoint.kept else 'deleted'}.\n\n"
                f"Estimated cost ${self.cost.usd:.4f} ({self.cost.note}).\n"
                + (f"\n**Quota.** {self.quota_note}\n" if self.quota_note else "")
                + (f"\nServing endpoint: {promotion_markdown(self.promotion)}\n"
                   if self.promotion else ""))


def quota_note(points: list[SweepPoint], instance_type: str) -> str | None:
    """What the account's quota did to a sweep: which points waited for it, which it refused
    for good; None when it never got in the way."""
    waited = [p for p in points if p.quota_wait_seconds and not p.quota_refused]
    refused = [p for p in points if p.quota_refused]
    if not waited and not refused:
        return None
    said = []
    if waited:
        said.append(f"point{'s' * (len(waited) > 1)} {', '.join(str(p.index) for p in waited)} "
                    f"waited {sum(p.quota_wait_seconds for p in waited):.0f}s in all for it to "
                    f"let {'their jobs' if len(waited) > 1 else 'its job'} start")
    if refused:
        said.append(f"point{'s' * (len(refused) > 1)} {', '.join(str(p.index) for p in refused)} "
                    f"failed: it never made room")
    return (f"the AWS account's SageMaker quota for {instance_type} training instances, not "
            f"max_parallel, was the limit: {'; '.join(said)}. Raise it in Service Quotas "
            f"(Amazon SageMaker, '{instance_type} for training job usage') to run more at once.")
