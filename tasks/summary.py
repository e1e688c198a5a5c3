"""The run summary: what ran, how long each stage took, what it cost, as a markdown artifact."""

from __future__ import annotations

from typing import Any

from prefect import task

from tasks.reporting import publish_markdown

# Approximate on-demand prices (USD per instance-hour, us-east-1, Linux), for an order of
# magnitude only: check https://aws.amazon.com/sagemaker/pricing/ for your region and date.
PRICES_PER_HOUR = {
    "ml.m5.large": 0.115, "ml.m5.xlarge": 0.23, "ml.m5.2xlarge": 0.461,
    "ml.m5.4xlarge": 0.922, "ml.c5.xlarge": 0.204, "ml.c5.2xlarge": 0.408,
    "ml.c5.4xlarge": 0.816, "ml.g4dn.xlarge": 0.736, "ml.g4dn.2xlarge": 0.94,
    "ml.g5.xlarge": 1.408, "ml.g5.2xlarge": 1.515, "ml.p3.2xlarge": 3.825,
    "ml.t2.medium": 0.056,
}


def estimate_cost(backend: str, training: dict[str, Any], endpoint: dict[str, Any]) -> dict:
    """Training is billed per instance-second, hosting per instance-second of uptime."""
    if backend == "local":
        return {"usd": 0.0, "note": "local backend: no AWS charges"}
    train_price = PRICES_PER_HOUR.get(training["instance_type"])
    host_price = PRICES_PER_HOUR.get(endpoint["instance_type"])
    unknown = [t for t, p in ((training["instance_type"], train_price),
                              (endpoint["instance_type"], host_price)) if p is None]
    usd = 0.0
    if train_price is not None:
        usd += training["billable_seconds"] / 3600 * train_price
    if host_price is not None and endpoint.get("uptime_seconds") is not None:
        usd += endpoint["uptime_seconds"] / 3600 * host_price * endpoint["instance_count"]
    note = "approximate on-demand list prices (us-east-1); excludes S3, CloudWatch, transfer"
    if unknown:
        note += f"; no price known for {', '.join(unknown)}"
    if endpoint.get("uptime_seconds") is None:
        note += "; the kept endpoint keeps costing until deleted"
    return {"usd": round(usd, 4), "note": note}


@task(name="publish_summary", task_run_name="publish run summary")
def publish_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """Adds the cost estimate and publishes the summary as a markdown artifact."""
    summary = {**summary, "cost": estimate_cost(summary["backend"], summary["training"],
                                                summary["endpoint"])}
    publish_markdown("cifar10-run-summary", summary_markdown(summary),
                     description="What this run did")
    return summary


def summary_markdown(summary: dict[str, Any]) -> str:
    data, training, smoke = summary["data"], summary["training"], summary["smoke_test"]
    endpoint, metrics, cost = summary["endpoint"], summary["training"]["metrics"], summary["cost"]
    uptime = endpoint["uptime_seconds"]
    rows = [
        ("data", f"`{data['uri']}` (md5 `{data['md5']}`"
                 f"{', reused a verified copy' if data['reused'] else ''})"),
        ("model artifact", f"`{training['model_uri']}`"),
        ("training job", f"`{training['job_name']}`: {metrics.get('model', '?')} network, "
                         f"{metrics.get('epochs', '?')} epochs, test accuracy "
                         f"**{metrics.get('test_accuracy', 0):.2%}**"),
        ("billable training seconds", f"{training['billable_seconds']} "
                                      f"({training['instance_count']} x "
                                      f"{training['instance_type']})"),
        ("endpoint", f"`{endpoint['name']}`" + (f" at {endpoint['url']}" if endpoint["url"]
                                                else "")
         + (" (kept)" if endpoint["kept"] else " (deleted)")),
        ("endpoint uptime", "still running" if uptime is None else f"{uptime:.0f} s"),
        ("smoke test", f"{smoke['accuracy']:.1%} on {smoke['images']} images "
                       f"(floor {smoke['accuracy_floor']:.0%})"),
        ("estimated cost", f"${cost['usd']:.4f} ({cost['note']})"),
    ]
    table = "\n".join(f"| {label} | {value} |" for label, value in rows)
    stages = "\n".join(f"| {name} | {seconds:.1f} |"
                       for name, seconds in summary["stages"].items())
    return (f"## CIFAR-10 pipeline run on `{summary['backend']}`\n\n| what | value |\n|---|---|\n"
            f"{table}\n\n| stage | seconds |\n|---|---|\n{stages}\n")
