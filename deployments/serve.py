"""Serve the deployments: the nightly pipeline, the hourly endpoint reaper, the on-demand
sweep and the manual promotion to the serving endpoint.

Registers them with the Prefect server at ``PREFECT_API_URL`` and runs their scheduled and
manually triggered runs as subprocesses of this process, until stopped (Ctrl-C; the schedules
are then paused, since nothing would run them). ``make serve`` runs it against the user's own
Prefect API (environment or active profile), else ``make ui``'s server::

    python -m deployments.serve [--timezone Europe/Berlin] [--cron '0 2 * * *']
                                [--reaper-cron '30 * * * *'] [--notify-block NAME] [--serving]
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from deployments.automations import (
    MISSED_HEARTBEATS,
    crash_detection,
    install,
    install_failure_notice_or_exit,
)
from deployments.definitions import (
    PIPELINE_CRON,
    REAPER_CRON,
    TIMEZONE_ENV,
    pipeline_deployment,
    pipeline_parameters,
    promote_deployment,
    reaper_deployment,
    schedule_timezone,
    sweep_deployment,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m deployments.serve",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--cron", default=PIPELINE_CRON,
                        help=f"the pipeline's schedule (default: {PIPELINE_CRON!r}, nightly)")
    parser.add_argument("--reaper-cron", default=REAPER_CRON,
                        help=f"the reaper's schedule (default: {REAPER_CRON!r}, hourly)")
    parser.add_argument("--timezone", default=schedule_timezone(),
                        help=f"IANA timezone both schedules are read in (default: "
                             f"${TIMEZONE_ENV}, else UTC)")
    parser.add_argument("--crash-after", type=int, default=None, metavar="SECONDS",
                        help=f"mark a run Crashed after this long without a heartbeat "
                             f"(default: {MISSED_HEARTBEATS} x PREFECT_FLOWS_HEARTBEAT_FREQUENCY)")
    parser.add_argument("--notify-block", metavar="NAME",
                        help="send failed, crashed and timed-out runs to this Prefect "
                             "notification block (make serve NOTIFY_BLOCK=NAME)")
    parser.add_argument("--serving", action="store_true",
                        help="nightly runs promote a new champion to the serving endpoint "
                             "(config.serving.enabled; off by default: the endpoint runs, and "
                             "on AWS bills, around the clock)")
    return parser.parse_args(argv)


def nightly_parameters(serving: bool) -> dict[str, Any] | None:
    """The nightly run's parameters: the defaults, with serving turned on if asked (None: the
    defaults as they are)."""
    if not serving:
        return None
    from flows.config import PipelineConfig

    return pipeline_parameters(PipelineConfig.model_validate({"serving": {"enabled": True}}))


def api_problem() -> str | None:
    """Why serving would not work here, or None. Without PREFECT_API_URL Prefect would start
    a temporary server, which runs no scheduler: the schedules would never fire."""
    from prefect.client.orchestration import get_client
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if not url:
        return ("PREFECT_API_URL is not set. Start the server with `make ui`, then use "
                "`make serve` (or export PREFECT_API_URL=http://127.0.0.1:4200/api).")
    with get_client(sync_client=True) as client:
        error = client.api_healthcheck()
    if error is not None:
        return (f"the Prefect API at {url} does not answer ({error}). Start that server "
                f"(`make ui` for this project's own, on http://127.0.0.1:4200/api).")
    return None


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        deployments = [pipeline_deployment(args.cron, args.timezone,
                                           nightly_parameters(args.serving)),
                       reaper_deployment(args.reaper_cron, args.timezone),
                       sweep_deployment(), promote_deployment()]
        # a bad cron string or timezone, or a window shorter than the heartbeat interval
        automation = crash_detection(args.crash_after)
    except ValueError as e:
        sys.exit(f"error: {e}")
    if problem := api_problem():
        sys.exit(f"error: {problem}")
    if automation is not None:
        install(automation)
    if args.notify_block:
        install_failure_notice_or_exit(args.notify_block)
        print(f"failed, crashed and timed-out runs are sent to {args.notify_block}")

    from prefect import serve

    serve(*deployments)


if __name__ == "__main__":
    main()
