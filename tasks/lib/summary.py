"""The run summary: one typed record of what a run did, which the flow returns and from which the
CLI's text, its ``--json`` and the summary artifact in the Prefect UI are all rendered."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

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


class DataSummary(BaseModel):
    url: str
    md5: str
    reused: bool  # a verified copy was already in place: nothing downloaded
    path: str
    uri: str  # the training channel in the backend's store


class TrainingSummary(BaseModel):
    job_name: str
    model_uri: str
    billable_seconds: int
    instance_type: str
    instance_count: int
    metrics: dict[str, Any]  # the entry script's metrics.json


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
            ("training job", f"`{training.job_name}`: {metrics.get('model', '?')} network, "
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
        table = "\n".join(f"| {label} | {value} |" for label, value in rows)
        stages = "\n".join(f"| {name} | {seconds:.1f} |" for name, seconds in self.stages.items())
        return (f"## CIFAR-10 pipeline run on `{self.backend}`\n\n| what | value |\n|---|---|\n"
                f"{table}\n\n| stage | seconds |\n|---|---|\n{stages}\n")


def estimate_cost(backend: str, training: TrainingSummary,
                  endpoint: EndpointSummary) -> CostEstimate:
    """Training is billed per instance-second, hosting per instance-second of uptime."""
    if backend == "local":
        return CostEstimate(usd=0.0, note="local backend: no AWS charges")
    train_price = PRICES_PER_HOUR.get(training.instance_type)
    host_price = PRICES_PER_HOUR.get(endpoint.instance_type)
    unknown = [t for t, p in ((training.instance_type, train_price),
                              (endpoint.instance_type, host_price)) if p is None]
    usd = 0.0
    if train_price is not None:
        usd += training.billable_seconds / 3600 * train_price
    if host_price is not None and endpoint.uptime_seconds is not None:
        usd += endpoint.uptime_seconds / 3600 * host_price * endpoint.instance_count
    note = "approximate on-demand list prices (us-east-1); excludes S3, CloudWatch, transfer"
    if unknown:
        note += f"; no price known for {', '.join(unknown)}"
    if endpoint.uptime_seconds is None:
        note += "; the kept endpoint keeps costing until deleted"
    return CostEstimate(usd=round(usd, 4), note=note)
