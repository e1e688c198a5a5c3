"""The endpoint reaper: deletes pipeline-owned endpoints older than a TTL on any backend,
catching what a hard-killed run could not tear down."""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field

from backends.base import SERVING_KEY, Backend, EndpointInfo

log = logging.getLogger(__name__)


@dataclass
class ReapReport:
    deleted: list[str] = field(default_factory=list)  # or, in a dry run, would be deleted
    younger: list[str] = field(default_factory=list)  # than the TTL: left for now
    kept_by_user: list[str] = field(default_factory=list)  # tagged kept: never reaped
    serving: list[str] = field(default_factory=list)  # the serving endpoint's: never reaped
    errors: list[str] = field(default_factory=list)  # "name: why" for each delete that failed
    dry_run: bool = False


def reap_endpoints(backend: Backend, older_than: dt.timedelta, dry_run: bool = False,
                   now: dt.datetime | None = None) -> ReapReport:
    """Deletes the backend's pipeline-owned endpoints created more than ``older_than`` ago,
    and the remains of deleted ones (an endpoint config or model left behind), except the
    endpoints the user chose to keep (tagged kept=true) and the serving endpoint with its parts
    (tagged serving=true: it runs around the clock, and the fleet, config or model of an
    update in progress may look like an orphan). Resources without the managed-by tag are
    never listed, so never touched. A delete that fails is reported in ``errors`` and the
    others are still reaped: one stuck endpoint must not keep the rest running."""
    now = now or dt.datetime.now(dt.UTC)
    report = ReapReport(dry_run=dry_run)
    for endpoint in [*backend.endpoints.list(), *backend.endpoints.orphans()]:
        if not endpoint.managed:
            continue
        if endpoint.tags.get(SERVING_KEY) == "true":
            report.serving.append(endpoint.name)
        elif endpoint.kept:
            report.kept_by_user.append(endpoint.name)
        elif now - endpoint.created >= older_than:
            _reap(backend, endpoint, report)
        else:
            report.younger.append(endpoint.name)
    return report


def _reap(backend: Backend, endpoint: EndpointInfo, report: ReapReport) -> None:
    if not report.dry_run:
        try:
            backend.endpoints.delete(endpoint.name)
        except Exception as e:  # any failure: report it and go on with the others
            log.warning("could not delete endpoint %s: %s: %s", endpoint.name,
                        type(e).__name__, e)
            report.errors.append(f"{endpoint.name}: {type(e).__name__}: {e}")
            return
    report.deleted.append(endpoint.name)
