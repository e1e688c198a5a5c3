"""Crash detection: a Prefect automation that marks a pipeline (or reaper) run Crashed when it
stops sending heartbeats.

A run whose process is killed outright (SIGKILL, out-of-memory killer, a machine that loses
power) cannot report anything. When a runner (``make serve``) or a worker started the process,
it sees the exit and reports Crashed; a run nobody supervises (``make run`` against ``make ui``,
or the runner itself killed) would stay Running forever on a self-hosted server: Prefect Cloud
has a managed automation for this, the open-source server has none. Flow runs send a heartbeat
event every ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` seconds (default 180, at least 30); this
automation expects the next one, or a final state, within a few heartbeats, and otherwise
marks the run Crashed with a message that says why. The endpoint such a run left is deleted by
the reaper (``cifar10-endpoint-reaper``) once it is older than its TTL.

``make serve`` installs it (``deployments/serve.py``), ``make deploy`` too; by hand::

    python -m deployments.automations [--crash-after SECONDS]
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys

from prefect.automations import Automation
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification

CRASH_DETECTION = "cifar10-pipeline: mark runs that stopped sending heartbeats Crashed"
FLOWS = ["cifar10-pipeline", "cifar10-endpoint-reaper"]  # only this project's runs
MISSED_HEARTBEATS = 3  # one late heartbeat (a busy machine) is not a crash
# What ends a run's silence legitimately. Cancelling: the runner stops the process and then
# reports Cancelled itself.
FINAL_EVENTS = {f"prefect.flow-run.{s}"
                for s in ("Completed", "Failed", "Cancelled", "Cancelling", "Crashed")}
HEARTBEAT = "prefect.flow-run.heartbeat"


def heartbeat_seconds() -> int | None:
    """How often flow runs started with the current settings send heartbeats (None: never)."""
    from prefect.settings import get_current_settings

    return get_current_settings().flows.heartbeat_frequency


def default_silence() -> int | None:
    beat = heartbeat_seconds()
    return None if beat is None else MISSED_HEARTBEATS * beat


def crash_detection_automation(silence_seconds: int) -> Automation:
    """After a run's heartbeat, expect another heartbeat or a final state within
    ``silence_seconds``; when neither comes, set the run Crashed."""
    beat = heartbeat_seconds()
    if beat is not None and silence_seconds <= beat:
        raise ValueError(f"crash detection after {silence_seconds}s of silence would crash "
                         f"healthy runs: they send a heartbeat only every {beat}s "
                         f"(PREFECT_FLOWS_HEARTBEAT_FREQUENCY)")
    message = (f"No heartbeat for {silence_seconds}s: the flow run's process died without "
               f"reporting (killed, out of memory, or its machine stopped). Pipeline-owned "
               f"endpoints it left running are deleted by the endpoint reaper "
               f"(cifar10-pipeline endpoints reap).")
    return Automation(
        name=CRASH_DETECTION,
        description="Marks this project's flow runs Crashed when their process stops sending "
                    "heartbeats (a run that was killed outright cannot report it).",
        trigger=EventTrigger(
            posture=Posture.Proactive,
            after={HEARTBEAT},
            expect={HEARTBEAT, *FINAL_EVENTS},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            match_related=ResourceSpecification({"prefect.resource.role": "flow",
                                                 "prefect.resource.name": FLOWS}),
            for_each={"prefect.resource.id"},
            threshold=1,
            within=dt.timedelta(seconds=silence_seconds),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED, message=message)],
    )


def crash_detection(silence_seconds: int | None = None) -> Automation | None:
    """The automation for a window of ``silence_seconds`` (default: MISSED_HEARTBEATS
    heartbeats); None when flow runs send no heartbeats, so nothing could be detected."""
    silence = silence_seconds if silence_seconds is not None else default_silence()
    return None if silence is None else crash_detection_automation(silence)


def install(automation: Automation) -> Automation:
    """Creates the automation, or updates it in place when one of its name exists (running
    this again, with another window, leaves exactly one)."""
    try:
        existing = Automation.read(name=automation.name)
    except ValueError:  # not found
        return automation.create()
    automation.id = existing.id
    automation.update()
    return automation


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m deployments.automations",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--crash-after", type=int, default=None, metavar="SECONDS",
                        help=f"silence after which a run is marked Crashed (default: "
                             f"{MISSED_HEARTBEATS} heartbeats)")
    args = parser.parse_args(argv)
    try:
        automation = crash_detection(args.crash_after)
    except ValueError as e:
        sys.exit(f"error: {e}")
    if automation is None:
        print("flow run heartbeats are off (PREFECT_FLOWS_HEARTBEAT_FREQUENCY): "
              "no crash detection installed")
        return
    install(automation)
    print(f"installed automation {automation.name!r} "
          f"({automation.trigger.within.total_seconds():.0f}s of silence)")


if __name__ == "__main__":
    main()
