"""The sweep's report in the Prefect UI: a table with one row per point (the winner marked),
accuracy plotted against the swept value, and the sweep's summary."""

from __future__ import annotations

from prefect import task

from tasks.lib.plots import sweep_plot
from tasks.lib.summary import SweepSummary
from tasks.reporting import markdown_image, publish_markdown, publish_table


@task(name="publish_sweep", task_run_name="publish sweep report")
def publish_sweep(summary: SweepSummary) -> None:
    publish_table("cifar10-sweep-points", summary.rows(),
                  description="One row per grid point: its settings, test accuracy, seconds, "
                              "billable seconds and status; the winner is marked")
    markdown = summary.markdown()
    if png := sweep_accuracy_plot(summary):
        markdown += "\n" + markdown_image(png, "test accuracy against the swept value") + "\n"
    publish_markdown("cifar10-sweep-summary", markdown,
                     description="What the sweep did, and accuracy against the swept value")


def sweep_accuracy_plot(summary: SweepSummary) -> bytes | None:
    """Accuracy against the first swept setting, one line per combination of the others;
    None when nothing was swept or no point completed."""
    done = [p for p in summary.points if p.test_accuracy is not None]
    if not done or not done[0].values:
        return None
    x_name, *others = list(done[0].values)
    return sweep_plot(
        [(p.values[x_name], p.test_accuracy, ", ".join(f"{k}={p.values[k]}" for k in others),
          p.winner) for p in done],
        x_label=x_name.replace("_", " "),
        title=f"{len(summary.points)}-point sweep: test accuracy by {x_name.replace('_', ' ')}")
