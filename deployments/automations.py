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

Someone is told: with a Prefect notification block named (``NOTIFY_BLOCK=NAME`` for ``make
serve`` / ``make deploy``, or ``cifar10-pipeline notify install --block NAME``), a second
automation sends every Failed, Crashed or TimedOut run of this project's deployments to it:
which run, what failed, its UI link, and the endpoint that may still be up.

``make serve`` installs them (``deployments/serve.py``), ``make deploy`` too; by hand::

    python -m deployments.automations [--crash-after SECONDS] [--notify-block NAME]
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from uuid import UUID

from prefect.automations import Automation
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState, SendNotification
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


# --- someone is told ------------------------------------------------------------------------

FAILURE_NOTICE = "cifar10-pipeline: tell someone when a run fails"
# cifar10-promote too: a promotion that rolled back or failed leaves the old model serving.
NOTIFY_FLOWS = ["cifar10-pipeline", "cifar10-sweep", "cifar10-endpoint-reaper", "cifar10-promote"]
FAILURE_EVENTS = {f"prefect.flow-run.{s}" for s in ("Failed", "Crashed", "TimedOut")}
# The flows that host an endpoint, named after the run as flows.run_context.resource_name names it
# (NAME_PREFIX + the run id's first 12 hex digits): the template computes the same name.
ENDPOINT_FLOWS = ["cifar10-pipeline", "cifar10-sweep"]
NOTICE_SUBJECT = "{{ flow.name }} run {{ flow_run.name }} ended {{ flow_run.state.name }}"
NOTICE_BODY = """\
Flow run {{ flow_run.name }} of {{ flow.name }}\
{% if deployment %} (deployment {{ flow.name }}/{{ deployment.name }}){% endif %} \
ended {{ flow_run.state.name }}.
What failed: {{ flow_run.state.message or "no message: see the run's logs" }}
Open it: {{ flow_run|ui_url or "flow run " ~ flow_run.id ~ " in the Prefect UI (this \
server has no PREFECT_UI_URL to link to)" }}
{% if flow.name in %(endpoint_flows)s %}\
The endpoint cifar10-{{ (flow_run.id|string|replace("-", ""))[:12] }} may still be up: \
a failed run deletes it on its way out, a crashed one cannot; the endpoint reaper \
(cifar10-endpoint-reaper) deletes it once it is older than its TTL. \
See `cifar10-pipeline endpoints list`; delete it now with \
`cifar10-pipeline endpoints delete cifar10-{{ (flow_run.id|string|replace("-", ""))[:12] }}`.
{% else %}\
This flow hosts no endpoint of its own; `cifar10-pipeline endpoints list` shows what is up.
{% endif %}""".replace("%(endpoint_flows)s", repr(ENDPOINT_FLOWS))


def failure_notice_automation(block_document_id: UUID) -> Automation:
    """Every Failed, Crashed or TimedOut run of a deployment of this project's flows, sent to
    the notification block (once per run: each such state is entered once)."""
    return Automation(
        name=FAILURE_NOTICE,
        description="Sends this project's failed, crashed and timed-out deployment runs to a "
                    "notification block: which run, what failed, the UI link and the "
                    "endpoint that may still be up.",
        trigger=EventTrigger(
            posture=Posture.Reactive,
            expect=FAILURE_EVENTS,
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            # Both must match: one of this project's flows, run by a deployment (the nightly
            # schedule, the work-pool route, a manual `prefect deployment run`), not an
            # interactive `make run`, whose failure its user is watching.
            match_related=[
                ResourceSpecification({"prefect.resource.role": "flow",
                                       "prefect.resource.name": NOTIFY_FLOWS}),
                ResourceSpecification({"prefect.resource.role": "deployment"}),
            ],
            threshold=1,
        ),
        actions=[SendNotification(block_document_id=block_document_id,
                                  subject=NOTICE_SUBJECT, body=NOTICE_BODY)],
    )


class NoSuchBlock(ValueError):
    """The named notification block does not exist (or is ambiguous); says what to do."""


def find_notification_block(name: str) -> tuple[UUID, str]:
    """(block document id, ``type-slug/name``) of the notification block called ``name``
    (or ``type-slug/name``) on the current Prefect API."""
    from prefect.client.orchestration import get_client

    slug, _, block_name = name.rpartition("/")
    body: dict = {"block_documents": {"name": {"any_": [block_name]},
                                      "is_anonymous": {"eq_": False}},
                  "block_schemas": {"block_capabilities": {"all_": ["notify"]}}}
    if slug:
        body["block_types"] = {"slug": {"any_": [slug]}}
    with get_client(sync_client=True) as client:
        found = client.request("POST", "/block_documents/filter", json=body).json()
    if not found:
        raise NoSuchBlock(
            f"no notification block named {name!r} on this Prefect API: create one in the UI "
            f"(Blocks, +: Slack Webhook, Microsoft Teams Webhook, Custom Webhook, PagerDuty...) "
            f"or in Python, e.g. SlackWebhook(url=...).save({block_name!r})")
    if len(found) > 1:
        choices = ", ".join(f"{b['block_type']['slug']}/{block_name}" for b in found)
        raise NoSuchBlock(f"several notification blocks are named {block_name!r}: name one "
                          f"as TYPE/NAME ({choices})")
    [block] = found
    return UUID(block["id"]), f"{block['block_type']['slug']}/{block_name}"


def install_failure_notice(block_name: str) -> Automation:
    """Creates (or updates in place) the automation that tells the named block."""
    block_id, _ = find_notification_block(block_name)
    return install(failure_notice_automation(block_id))


def install_failure_notice_or_exit(block_name: str) -> None:
    """``install_failure_notice`` for the command-line entry points: a block that is not
    there ends the command with one line."""
    try:
        install_failure_notice(block_name)
    except NoSuchBlock as e:
        sys.exit(f"error: {e}")


def installed_notice_block() -> str:
    """``type-slug/name`` of the block the installed failure notice sends to."""
    from prefect.client.orchestration import get_client

    try:
        automation = Automation.read(name=FAILURE_NOTICE)
    except ValueError:
        raise NoSuchBlock("no failure notice is installed yet: name the block (--block NAME), "
                          "or install it with `cifar10-pipeline notify install --block NAME`"
                          ) from None
    [action] = automation.actions
    with get_client(sync_client=True) as client:
        document = client.read_block_document(action.block_document_id)
    return f"{document.block_type.slug}/{document.name}"


def send_test_notice(block_name: str | None = None) -> str:
    """Sends one message through the named block (default: the one the installed failure
    notice sends to); returns its ``type-slug/name``."""
    from prefect.blocks.core import Block

    if block_name is None:
        full_name = installed_notice_block()
    else:
        _, full_name = find_notification_block(block_name)
    block = Block.load(full_name)
    block.notify(subject="cifar10-pipeline: a test notification",
                 body="This is a test from `cifar10-pipeline notify test`: failed, crashed and "
                      "timed-out runs of this project's deployments are sent here once "
                      "`cifar10-pipeline notify install` (or NOTIFY_BLOCK=... for make serve / "
                      "make deploy) has installed the automation.")
    return full_name


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
    parser.add_argument("--notify-block", metavar="NAME",
                        help="also send failed, crashed and timed-out runs to this Prefect "
                             "notification block")
    args = parser.parse_args(argv)
    try:
        automation = crash_detection(args.crash_after)
    except ValueError as e:
        sys.exit(f"error: {e}")
    if automation is None:
        print("flow run heartbeats are off (PREFECT_FLOWS_HEARTBEAT_FREQUENCY): "
              "no crash detection installed")
    else:
        install(automation)
        print(f"installed automation {automation.name!r} "
              f"({automation.trigger.within.total_seconds():.0f}s of silence)")
    if args.notify_block:
        install_failure_notice_or_exit(args.notify_block)
        print(f"installed automation {FAILURE_NOTICE!r} (to {args.notify_block})")

if __name__ == "__main__":
    main()
