"""Promotion to the serving endpoint, without Prefect: what to put there (``ServingPlan``),
which version may go (the pipeline's rule, a person's request, a rollback's target), and how
the registry records where each version stands (``ModelVersion.deployment``)."""

from __future__ import annotations

from dataclasses import dataclass

from backends.base import (
    IN_SERVICE,
    SERVING_KEY,
    Autoscaling,
    ModelVersion,
    RollbackAlarms,
    ServingSpec,
    ServingStatus,
    TrafficShift,
    champion,
    managed_tags,
)

# The registry's words for where a version stands on the serving endpoint.
SERVING_ON, REPLACED_BY, ROLLED_BACK_PREFIX, FAILED_PREFIX = (
    "serving on ", "replaced by v", "rolled back: ", "promotion failed: ")


class PromotionRefused(ValueError):
    """A person asked to promote a version that cannot be promoted (missing, not Approved);
    the message says why and what to do. A ValueError: retrying cannot help."""


@dataclass(frozen=True)
class ServingPlan:
    """Where and how a promotion puts a model: the serving endpoint, its instances, how
    traffic shifts, what rolls it back, how it scales (``flows/config.py`` builds it)."""

    endpoint: str
    instance_type: str
    instance_count: int
    shift: TrafficShift
    alarms: RollbackAlarms
    autoscaling: Autoscaling | None = None

    def spec(self, version: ModelVersion, owner: str) -> ServingSpec:
        """The request for ``version``: kept and marked serving, so no reaper touches it."""
        return ServingSpec(
            name=self.endpoint, model_uri=version.model_uri, group=version.group,
            version=version.version, instance_type=self.instance_type,
            instance_count=self.instance_count, shift=self.shift, alarms=self.alarms,
            autoscaling=self.autoscaling,
            tags={**managed_tags(owner, kept=True), SERVING_KEY: "true"})

    def describe_shift(self) -> str:
        """"canary 10%", "linear 20% steps", "all at once"."""
        shift = self.shift
        if shift.strategy == "canary":
            return f"canary {shift.percent}%"
        if shift.strategy == "linear":
            return f"linear {shift.percent}% steps"
        return "all at once"


def serving_on(endpoint: str) -> str:
    return f"{SERVING_ON}{endpoint}"


def rolled_back(reason: str) -> str:
    return f"{ROLLED_BACK_PREFIX}{reason}"


def was_rolled_back(version: ModelVersion) -> bool:
    return (version.deployment or "").startswith(ROLLED_BACK_PREFIX)


def deployment_tag(deployment: str | None) -> str:
    """A version's place on the serving endpoint in a word, for listings: "serving",
    "replaced", "rolled back", "failed", "" (never promoted)."""
    text = deployment or ""
    for prefix, tag in ((SERVING_ON, "serving"), (REPLACED_BY, "replaced"),
                        (ROLLED_BACK_PREFIX, "rolled back"), (FAILED_PREFIX, "failed")):
        if text.startswith(prefix):
            return tag
    return text[:12]


def serves(status: ServingStatus | None, group: str, version: int) -> bool:
    """Whether the endpoint serves ``group`` ``version`` now, and is healthy."""
    return (status is not None and status.status == IN_SERVICE and status.group == group
            and status.version == version)


def why_not_auto_promoted(version: ModelVersion, versions: list[ModelVersion],
                          status: ServingStatus | None, endpoint: str) -> str | None:
    """Why a pipeline run does not promote the version it registered (None: it does). Only
    the champion goes; not one that already serves; not one that was rolled back before (the
    nightly run would otherwise retry a model the alarms refused every night: a person decides,
    with `serving promote`)."""
    if not version.approved:
        return f"v{version.version} is {version.status} ({version.reason})"
    best = champion(versions)
    if best is None or best.version != version.version:
        return (f"v{version.version} is approved but v{best.version if best else '?'} is the "
                f"champion (the newest approved version)")
    if serves(status, version.group, version.version):
        return f"v{version.version} already serves on {endpoint}"
    if was_rolled_back(version):
        return (f"v{version.version} was {version.deployment}; promote it by hand with "
                f"`cifar10-pipeline serving promote {version.version}`")
    return None


def chosen_version(versions: list[ModelVersion], group: str,
                   number: int | None) -> ModelVersion:
    """The version a person asked for (None: the champion); ``PromotionRefused`` unless it
    exists and is Approved."""
    if number is None:
        best = champion(versions)
        if best is None:
            raise PromotionRefused(f"{group} has no Approved version to promote (approve one "
                                   f"with `cifar10-pipeline models approve VERSION`)")
        return best
    found = [v for v in versions if v.version == number]
    if not found:
        known = ", ".join(f"v{v.version}" for v in versions) or "none"
        raise PromotionRefused(f"{group} has no version {number} (versions: {known})")
    version = found[0]
    if not version.approved:
        raise PromotionRefused(
            f"{group} v{number} is {version.status} ({version.reason}): only an Approved "
            f"version can be promoted; approve it first with `cifar10-pipeline models approve "
            f"{number}`")
    return version


def rollback_target(versions: list[ModelVersion],
                    serving: int) -> tuple[ModelVersion, str] | None:
    """What `serving rollback` puts back in place of version ``serving``, and why that one:
    the version ``serving`` replaced (marked "replaced by v<serving>"), if it is still
    Approved; else the newest Approved version older than ``serving``. None: there is none."""
    replaced = [v for v in versions if v.approved and v.deployment == f"{REPLACED_BY}{serving}"]
    if replaced:
        return (max(replaced, key=lambda v: v.version),
                f"the version v{serving} replaced")
    older = [v for v in versions if v.approved and v.version < serving]
    if older:
        return (max(older, key=lambda v: v.version),
                f"the newest Approved version before v{serving}: none is marked replaced by "
                f"v{serving}")
    return None


def notes_after(versions: list[ModelVersion], endpoint: str, promoted: ModelVersion,
                serving_before: int | None, serving_version: int | None,
                outcome_note: str) -> dict[int, str]:
    """The registry notes a promotion of ``promoted`` leaves (version → deployment), given the
    versions serving before and after (``serving_before``, ``serving_version``: the endpoint's
    word, None: none of this group) and, when ``promoted`` does not serve afterwards, what
    happened to it (``outcome_note``: "rolled back: ..." or "promotion failed: ..."). Every
    other version that served, by the endpoint's word or the registry's, is now "replaced by"
    the one that serves (or "rolled back", when an older version was put back): the notes
    follow the endpoint, even after a run that died before writing them."""
    notes: dict[int, str] = {}
    if serving_version != promoted.version:
        notes[promoted.version] = outcome_note
    if serving_version is None:
        return notes
    notes[serving_version] = serving_on(endpoint)
    for v in versions:
        served = v.deployment == serving_on(endpoint) or v.version == serving_before
        if served and v.version not in (serving_version, promoted.version):
            notes[v.version] = (f"{REPLACED_BY}{serving_version}" if v.version < serving_version
                                else rolled_back(f"v{serving_version} promoted back in its "
                                                 f"place"))
    return notes
