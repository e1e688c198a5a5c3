"""``cifar10-pipeline``: run the pipeline, and manage the endpoints it owns."""

from __future__ import annotations

import datetime as dt
import json
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:  # imported lazily below: --help must not pay for torch and Prefect
    from backends.base import Backend
    from flows.config import PipelineConfig

app = typer.Typer(
    help="Train a CNN on CIFAR-10 and host it as a SageMaker endpoint, orchestrated by Prefect. "
         "Runs on this machine by default (no AWS account, no Docker); --backend aws uses "
         "Amazon SageMaker.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
endpoints_app = typer.Typer(help="List, delete and reap endpoints this pipeline created "
                                 "(tagged managed-by=cifar10-pipeline).",
                            no_args_is_help=True)
app.add_typer(endpoints_app, name="endpoints")
models_app = typer.Typer(help="The model registry: every trained model is a version, approved "
                              "or rejected by the promotion gate (or by you).",
                         no_args_is_help=True)
app.add_typer(models_app, name="models")
notify_app = typer.Typer(help="Tell someone when a run fails: a Prefect automation that sends "
                              "failed, crashed and timed-out deployment runs to a notification "
                              "block (Slack, Teams, a webhook, PagerDuty...).",
                         no_args_is_help=True)
app.add_typer(notify_app, name="notify")
serving_app = typer.Typer(help="The serving endpoint: a long-lived endpoint that holds the "
                               "registry's champion, updated blue/green (all at once, canary "
                               "or linear traffic shifting) and rolled back automatically when "
                               "its alarms fire.",
                          no_args_is_help=True)
app.add_typer(serving_app, name="serving")

# Each option is declared once, here, and shared by the commands that take it. A parameter's
# name is then free to change: the option keeps the name written here.
BackendOption = Annotated[str, typer.Option("--backend", help="local or aws")]
Region = Annotated[str | None, typer.Option("--region", help="AWS region (aws)")]
RoleArn = Annotated[str | None, typer.Option("--role-arn", help="SageMaker execution role (aws)")]
Bucket = Annotated[str | None, typer.Option("--bucket", help="S3 bucket (aws)")]
CredentialsBlock = Annotated[str | None, typer.Option(
    "--aws-credentials-block", metavar="NAME",
    help="Prefect AwsCredentials block to take AWS credentials, assumed role and region from "
         "(aws; default: boto3's chain)")]
DataUrl = Annotated[str | None, typer.Option(
    "--data-url", help="CIFAR-10 python archive URL (https://, http://, file://)")]
DataMd5 = Annotated[str | None, typer.Option(
    "--data-md5", help="its md5 (required for mirrors; 'none' skips the check)")]
Precision = Annotated[str, typer.Option(
    "--precision", help="auto (bf16 only where the hardware computes it natively, else fp32; "
                        "fp16 for airbench on a GPU), fp32, bf16 or fp16")]
InstanceType = Annotated[str | None, typer.Option("--instance-type",
                                                  help="training instance (aws)")]
InstanceCount = Annotated[int, typer.Option("--instance-count",
                                            help="training hosts per job, data-parallel")]
EndpointInstanceType = Annotated[str | None, typer.Option("--endpoint-instance-type",
                                                          help="hosting instance (aws)")]
SmokeImages = Annotated[int, typer.Option("--smoke-images",
                                          help="test images sent to the endpoint")]
AccuracyFloor = Annotated[float, typer.Option("--accuracy-floor",
                                              help="fail under this smoke-test accuracy")]
KeepEndpoint = Annotated[bool, typer.Option("--keep-endpoint/--no-keep-endpoint",
                                            help="leave the endpoint running")]
Cache = Annotated[bool, typer.Option(
    "--cache/--no-cache", help="reuse a completed training with the same data, code, "
                               "hyperparameters and instances (--no-cache trains anew)")]
Promote = Annotated[bool, typer.Option(
    "--promote/--no-promote", help="after registration, promote a new champion to the serving "
                                   "endpoint (serving.enabled; see `serving --help`)")]
JsonSummary = Annotated[bool, typer.Option("--json", help="print the summary as one JSON object "
                                                          "on stdout")]
JsonRows = Annotated[bool, typer.Option("--json", help="one JSON array on stdout")]
Group = Annotated[str, typer.Option("--group", help="model package group")]
ServingName = Annotated[str | None, typer.Option(
    "--name", help="the serving endpoint (default: the config's serving.endpoint_name, "
                   "cifar10-serving)")]
Strategy = Annotated[str | None, typer.Option(
    "--strategy", help="all_at_once, canary or linear (default: the config's, canary)")]
Percent = Annotated[int | None, typer.Option(
    "--percent", help="canary size (at most 50) or linear step (10-50), % of capacity")]
WaitSeconds = Annotated[int | None, typer.Option(
    "--wait-seconds", help="watch each traffic step this long (0-3600)")]
BakingSeconds = Annotated[int | None, typer.Option(
    "--baking-seconds", help="watch all traffic on the new fleet this long (0-3600)")]
RollbackStrategy = Annotated[str, typer.Option(
    "--strategy", help="all_at_once (the default: a rollback is urgent), canary or linear")]


def _fail(message: str, code: int = 1) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _backend(name: str, region: str | None = None,
             credentials_block: str | None = None) -> Backend:
    """The backend for an ``endpoints`` or ``models`` command; use it inside
    ``_backend_errors()``. A named credentials block is read from the Prefect API now, as a
    run reads it."""
    from flows.config import PipelineConfig, get_backend

    if name not in ("local", "aws"):
        _fail(f"unknown backend {name!r}; choose local or aws", 2)
    with _invalid_options():
        config = PipelineConfig.model_validate({"backend": name, "aws": _aws_settings(
            region=region, credentials_block=credentials_block)})
    if config.backend != "aws" or config.aws.credentials_block is None:
        return get_backend(config)
    with _prefect_api():
        return get_backend(config)


def _aws_settings(region: str | None = None, role_arn: str | None = None,
                  bucket: str | None = None,
                  credentials_block: str | None = None) -> dict[str, str]:
    """The config's aws section with the options given (the others keep its defaults)."""
    given = {"region": region, "role_arn": role_arn, "bucket": bucket,
             "credentials_block": credentials_block}
    return {key: value for key, value in given.items() if value}


@contextmanager
def _backend_errors() -> Iterator[None]:
    """A backend's errors (missing AWS credentials, region or role, access denied...), which
    surface on first use, as one clear line instead of a traceback."""
    from backends.base import BackendError

    try:
        yield
    except BackendError as e:
        _fail(str(e))


@app.command()
def run(
    backend: BackendOption = "local",
    data_url: DataUrl = None,
    data_md5: DataMd5 = None,
    model: Annotated[str, typer.Option(help="tutorial (fast) or airbench (stronger; its "
                                            "recipe follows the hardware)")] = "tutorial",
    epochs: Annotated[float | None, typer.Option(help="passes over the training set, "
                                                    "fractions allowed; default: the "
                                                    "model preset's")] = None,
    batch_size: Annotated[int | None, typer.Option(help="default: the model preset's")] = None,
    lr: Annotated[float | None, typer.Option(help="default: the model preset's")] = None,
    precision: Precision = "auto",
    instance_type: InstanceType = None,
    instance_count: InstanceCount = 1,
    endpoint_instance_type: EndpointInstanceType = None,
    smoke_images: SmokeImages = 64,
    accuracy_floor: AccuracyFloor = 0.4,
    keep_endpoint: KeepEndpoint = False,
    cache: Cache = True,
    promote: Promote = False,
    region: Region = None,
    role_arn: RoleArn = None,
    bucket: Bucket = None,
    aws_credentials_block: CredentialsBlock = None,
    as_json: JsonSummary = False,
) -> None:
    """Run the whole pipeline: download, preview, upload, fit, deploy, smoke-predict, delete.

    The endpoint is deleted at the end, also when a stage fails, unless --keep-endpoint.
    Examples:

    cifar10-pipeline run --data-url file:///data/cifar-10-python.tar.gz --data-md5 HEX

    cifar10-pipeline run --model airbench --instance-count 2 --json > summary.json

    cifar10-pipeline run --backend aws --region us-east-1 --role-arn ARN --bucket NAME

    cifar10-pipeline run --backend aws --aws-credentials-block my-aws --role-arn ARN
    """
    options = PipelineOptions(
        backend=backend, data_url=data_url, data_md5=data_md5, precision=precision,
        instance_type=instance_type, instance_count=instance_count,
        endpoint_instance_type=endpoint_instance_type, smoke_images=smoke_images,
        accuracy_floor=accuracy_floor, keep_endpoint=keep_endpoint, cache=cache,
        promote=promote, region=region, role_arn=role_arn, bucket=bucket,
        aws_credentials_block=aws_credentials_block)
    with _invalid_options():
        config = options.config(model=model, epochs=epochs, batch_size=batch_size,
                                learning_rate=lr)
    from flows.pipeline import cifar10_pipeline

    _run_flow(cifar10_pipeline, config, as_json)


@contextmanager
def _prefect_api() -> Iterator[None]:
    """The Prefect API for a command that is not a run (the user's, else `make ui`'s, else a
    temporary server); none, or an untrusted one, is one line, not a traceback."""
    from flows.prefect_api import PrefectUnavailable, api_for_commands

    try:
        with api_for_commands(on_status=lambda line: typer.echo(line, err=True)):
            yield
    except PrefectUnavailable as e:
        _fail(str(e))


@contextmanager
def _invalid_options() -> Iterator[None]:
    """The config's validation errors as one usage error (exit 2), not a traceback."""
    from pydantic import ValidationError

    try:
        yield
    except ValidationError as e:
        _fail("invalid options:\n" + "\n".join(
            f"  {'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()), 2)


def _run_flow(flow: Any, config: Any, as_json: bool, **parameters: Any) -> None:
    """Runs ``flow(config, **parameters)`` against the user's Prefect API (else a temporary
    server) and prints its summary, or fails with the run's error in one line."""
    from flows.prefect_api import PrefectUnavailable, connect

    try:
        connect(on_status=lambda line: typer.echo(line, err=True))
    except PrefectUnavailable as e:
        _fail(str(e))
    state = flow(config=config, **parameters, return_state=True)
    if not state.is_completed():
        try:
            state.result()
        except Exception as e:
            _fail(f"run {state.name.lower()}: {e}")
        _fail(f"run ended {state.name}: {state.message}")
    summary = state.result()
    if as_json:
        sys.stdout.write(summary.model_dump_json() + "\n")
    else:
        typer.echo(summary.text())


def parse_list(text: str | None, kind: type) -> list[Any]:
    """'0.02,0.05,0.1' → [0.02, 0.05, 0.1]; None → []."""
    if text is None:
        return []
    try:
        return [kind(item.strip()) for item in text.split(",") if item.strip()]
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a comma-separated list of "
                                 f"{kind.__name__} values") from None


@app.command()
def sweep(
    lr: Annotated[str | None, typer.Option(help="learning rates to try, e.g. 0.02,0.05,0.1 "
                                                "(default: 0.025,0.05,0.1 when nothing else "
                                                "is swept)")] = None,
    epochs: Annotated[str | None, typer.Option(help="epochs to try, e.g. 1,2,4")] = None,
    model: Annotated[str | None, typer.Option(help="networks to try: tutorial,airbench")] = None,
    batch_size: Annotated[str | None, typer.Option(help="global batch sizes to try")] = None,
    seed: Annotated[str | None, typer.Option(help="seeds to try (the spread of one "
                                                  "recipe)")] = None,
    max_parallel: Annotated[int | None, typer.Option(help="training jobs at once (default: "
                                                          "local, one per CPU core; aws, "
                                                          "4)")] = None,
    backend: BackendOption = "local",
    data_url: DataUrl = None,
    data_md5: DataMd5 = None,
    precision: Precision = "auto",
    instance_type: InstanceType = None,
    instance_count: InstanceCount = 1,
    endpoint_instance_type: EndpointInstanceType = None,
    smoke_images: SmokeImages = 64,
    accuracy_floor: AccuracyFloor = 0.4,
    keep_endpoint: KeepEndpoint = False,
    cache: Cache = True,
    promote: Promote = False,
    region: Region = None,
    role_arn: RoleArn = None,
    bucket: Bucket = None,
    aws_credentials_block: CredentialsBlock = None,
    as_json: JsonSummary = False,
) -> None:
    """Train one model per combination of the listed values, in parallel; host and
    smoke-test only the best (by test accuracy), then delete its endpoint; register every
    point. Points that fail are reported; the sweep fails only when all of them do.

    Examples:

    cifar10-pipeline sweep --lr 0.02,0.05,0.1 --max-parallel 2

    cifar10-pipeline sweep --model tutorial --epochs 1,2 --lr 0.03,0.05 --json
    """
    from flows.config import SweepConfig

    grid = _grid(lr=lr, epochs=epochs, model=model, batch_size=batch_size, seed=seed)
    options = PipelineOptions(
        backend=backend, data_url=data_url, data_md5=data_md5, precision=precision,
        instance_type=instance_type, instance_count=instance_count,
        endpoint_instance_type=endpoint_instance_type, smoke_images=smoke_images,
        accuracy_floor=accuracy_floor, keep_endpoint=keep_endpoint, cache=cache,
        promote=promote, region=region, role_arn=role_arn, bucket=bucket,
        aws_credentials_block=aws_credentials_block)
    with _invalid_options():
        base = options.config(model=grid["model"][0] if grid["model"] else "tutorial")
        config = SweepConfig.model_validate({
            "base": base.model_dump(),
            "grid": grid if any(grid.values()) else {},
            "max_parallel": max_parallel})
    from flows.sweep import cifar10_sweep

    _run_flow(cifar10_sweep, config, as_json)


def _grid(*, lr: str | None, epochs: str | None, model: str | None, batch_size: str | None,
          seed: str | None) -> dict[str, list[Any]]:
    """The sweep's grid from its comma-separated lists (an unswept field: [])."""
    return {"learning_rate": parse_list(lr, float), "epochs": parse_list(epochs, float),
            "model": parse_list(model, str), "batch_size": parse_list(batch_size, int),
            "seed": parse_list(seed, int)}


@dataclass(frozen=True, kw_only=True)
class PipelineOptions:
    """The options ``run`` and ``sweep`` share, as given on the command line."""

    backend: str
    data_url: str | None
    data_md5: str | None
    precision: str
    instance_type: str | None
    instance_count: int
    endpoint_instance_type: str | None
    smoke_images: int
    accuracy_floor: float
    keep_endpoint: bool
    cache: bool
    promote: bool
    region: str | None
    role_arn: str | None
    bucket: str | None
    aws_credentials_block: str | None

    def config(self, *, model: str, epochs: float | None = None, batch_size: int | None = None,
               learning_rate: float | None = None) -> PipelineConfig:
        """The pipeline's config: these options, the training's (unset: the model preset's),
        and the config's defaults for the rest. Raises pydantic's ValidationError."""
        from flows.config import PipelineConfig

        data: dict[str, Any] = {}
        if self.data_url:
            data["url"] = self.data_url
        if self.data_md5:
            data["md5"] = None if self.data_md5.lower() == "none" else self.data_md5
        training = {"model": model, "epochs": epochs, "batch_size": batch_size,
                    "learning_rate": learning_rate, "precision": self.precision,
                    "instance_count": self.instance_count, "cache": self.cache}
        if self.instance_type:
            training["instance_type"] = self.instance_type
        endpoint: dict[str, Any] = {"keep": self.keep_endpoint}
        if self.endpoint_instance_type:
            endpoint["instance_type"] = self.endpoint_instance_type
        return PipelineConfig.model_validate({
            "backend": self.backend, "data": data, "training": training,
            "endpoint": endpoint,
            "aws": _aws_settings(region=self.region, role_arn=self.role_arn, bucket=self.bucket,
                                 credentials_block=self.aws_credentials_block),
            "smoke_test": {"images": self.smoke_images, "accuracy_floor": self.accuracy_floor},
            "serving": {"enabled": self.promote},
        })


DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")


def parse_duration(text: str) -> dt.timedelta:
    """'90s', '30m', '2h', '1d' → timedelta."""
    match = DURATION.match(text.strip().lower())
    if not match:
        raise typer.BadParameter(f"{text!r} is not a duration like 30m, 2h or 1d")
    value, unit = float(match.group(1)), match.group(2)
    return dt.timedelta(**{{"s": "seconds", "m": "minutes", "h": "hours",
                            "d": "days"}[unit]: value})


@endpoints_app.command("list")
def list_endpoints(
    backend: BackendOption = "local",
    region: Region = None,
    aws_credentials_block: CredentialsBlock = None,
    as_json: JsonRows = False,
) -> None:
    """Pipeline-owned endpoints with their status, age and owner; "kept" marks those kept with
    --keep-endpoint, which the reaper never deletes."""
    with _backend_errors():
        endpoints = _backend(backend, region, aws_credentials_block).endpoints.list()
    now = dt.datetime.now(dt.UTC)
    rows = [{"name": e.name, "status": e.status, "created": e.created.isoformat(),
             "age_minutes": round((now - e.created).total_seconds() / 60, 1),
             "owner": e.tags.get("owner", ""), "kept": e.kept, "url": e.url}
            for e in endpoints]
    if as_json:
        typer.echo(json.dumps(rows))
        return
    if not rows:
        typer.echo("no pipeline-owned endpoints")
        return
    for row in rows:
        typer.echo(f"{row['name']:<24} {row['status']:<10} {row['age_minutes']:>8.1f} min  "
                   f"{'kept  ' if row['kept'] else ''}{row['owner']}  {row['url'] or ''}")
    for e in endpoints:
        if "unreadable" in e.extra:  # a damaged local record: say how to get rid of it
            typer.secho(f"warning: endpoint {e.name}: {e.extra['unreadable']} (`cifar10-pipeline "
                        f"endpoints delete {e.name}` removes the endpoint)",
                        fg=typer.colors.YELLOW, err=True)


@endpoints_app.command("delete")
def delete(
    name: Annotated[str, typer.Argument(help="endpoint name")],
    backend: BackendOption = "local",
    region: Region = None,
    aws_credentials_block: CredentialsBlock = None,
) -> None:
    """Delete an endpoint with its config and model, kept or not (a missing one is not an
    error)."""
    with _backend_errors():
        deleted = _backend(backend, region, aws_credentials_block).endpoints.delete(name)
    typer.echo(f"{name}: {'deleted' if deleted else 'not found (nothing to delete)'}")


@endpoints_app.command()
def reap(
    older_than: Annotated[str, typer.Option(help="age, e.g. 30m, 2h, 1d")],
    backend: BackendOption = "local",
    region: Region = None,
    aws_credentials_block: CredentialsBlock = None,
    dry_run: Annotated[bool, typer.Option(help="only say what would be deleted")] = False,
) -> None:
    """Delete pipeline-owned endpoints older than a TTL (what a crashed run left behind);
    endpoints kept with --keep-endpoint are left alone."""
    from backends.reaper import reap_endpoints

    ttl = parse_duration(older_than)
    with _backend_errors():
        report = reap_endpoints(_backend(backend, region, aws_credentials_block), ttl,
                                dry_run=dry_run)
    verb = "would delete" if dry_run else "deleted"
    for name in report.deleted:
        typer.echo(f"{verb} {name}")
    kept = f", {len(report.kept_by_user)} kept by choice" if report.kept_by_user else ""
    kept += f", {len(report.serving)} serving (never reaped)" if report.serving else ""
    typer.echo(f"{len(report.deleted)} {verb}, {len(report.younger)} younger than {older_than} "
               f"kept{kept}")
    for error in report.errors:  # the others were reaped all the same
        typer.secho(f"error: could not delete {error}", fg=typer.colors.RED, err=True)
    if report.errors:
        raise typer.Exit(1)


def _versions_table(versions: list, champion_version: int | None) -> list[dict[str, Any]]:
    from tasks.lib.promotion import deployment_tag

    return [{"version": v.version, "status": v.status, "champion": v.version == champion_version,
             "serving": deployment_tag(v.deployment), "deployment": v.deployment,
             "test_accuracy": v.metrics.get("test_accuracy"),
             "smoke_accuracy": v.metrics.get("smoke_accuracy"),
             "data_md5": v.lineage.get("data_md5", ""),
             "code_digest": v.lineage.get("code_digest", ""),
             "created": v.created.isoformat(timespec="seconds"),
             "training_job": v.training_job, "reason": v.reason} for v in versions]


@models_app.command("list")
def list_models(
    backend: BackendOption = "local",
    group: Group = "cifar10-pipeline",
    region: Region = None,
    aws_credentials_block: CredentialsBlock = None,
    as_json: JsonRows = False,
) -> None:
    """The registered versions, oldest first, with their lineage; * marks the champion (the
    newest approved version); "serving" the version on the serving endpoint, "rolled back" one
    its alarms refused, "replaced" one that served before."""
    from backends.base import champion

    with _backend_errors():
        versions = _backend(backend, region, aws_credentials_block).registry.versions(group)
    best = champion(versions)
    rows = _versions_table(versions, best.version if best else None)
    if as_json:
        typer.echo(json.dumps(rows))
        return
    if not rows:
        typer.echo(f"no versions in {group}")
        return
    typer.echo(f"{'':1} {'version':>7}  {'status':<21} {'serving':<11} {'test acc':>8} "
               f"{'smoke':>6}  {'data md5':<10} {'code':<10} {'created':<25} "
               f"{'training job':<24} reason")
    for row in rows:
        typer.echo(f"{'*' if row['champion'] else ' '} {row['version']:>7}  "
                   f"{row['status']:<21} {row['serving']:<11} {row['test_accuracy'] or 0:>8.4f} "
                   f"{_smoke(row['smoke_accuracy']):>6}  {row['data_md5'][:10]:<10} "
                   f"{row['code_digest'][:10]:<10} {row['created']:<25} "
                   f"{row['training_job']:<24} {row['reason']}")


def _smoke(accuracy: float | None) -> str:
    return "-" if accuracy is None else f"{accuracy:.3f}"


def _decide(backend: str, group: str, version: int, status: str, reason: str,
            region: str | None, aws_credentials_block: str | None) -> None:
    with _backend_errors():
        registry = _backend(backend, region, aws_credentials_block).registry
        updated = registry.set_status(group, version, status, reason)
    typer.echo(f"{group} v{updated.version}: {updated.status} ({updated.reason})")


@models_app.command()
def approve(
    version: Annotated[int, typer.Argument(help="version number")],
    backend: BackendOption = "local",
    group: Group = "cifar10-pipeline",
    reason: Annotated[str, typer.Option(help="why")] = "approved by hand",
    region: Region = None,
    aws_credentials_block: CredentialsBlock = None,
) -> None:
    """Approve a version (it becomes the champion if it is the newest approved)."""
    from backends.base import APPROVED

    _decide(backend, group, version, APPROVED, reason, region, aws_credentials_block)


@models_app.command()
def reject(
    version: Annotated[int, typer.Argument(help="version number")],
    backend: BackendOption = "local",
    group: Group = "cifar10-pipeline",
    reason: Annotated[str, typer.Option(help="why")] = "rejected by hand",
    region: Region = None,
    aws_credentials_block: CredentialsBlock = None,
) -> None:
    """Reject a version."""
    from backends.base import REJECTED

    _decide(backend, group, version, REJECTED, reason, region, aws_credentials_block)


def _serving_config(backend: str, group: str, region: str | None,
                    credentials_block: str | None, **serving: Any) -> PipelineConfig:
    """The config a `serving` command runs with: these options, the defaults for the rest
    (``serving``: the serving section's fields given, None for the config's default)."""
    from flows.config import PipelineConfig

    if backend not in ("local", "aws"):
        _fail(f"unknown backend {backend!r}; choose local or aws", 2)
    with _invalid_options():
        return PipelineConfig.model_validate({
            "backend": backend, "registry": {"group": group},
            "aws": _aws_settings(region=region, credentials_block=credentials_block),
            "serving": {k: v for k, v in serving.items() if v is not None}})


@serving_app.command("status")
def serving_status(
    name: ServingName = None,
    backend: BackendOption = "local",
    group: Group = "cifar10-pipeline",
    region: Region = None,
    aws_credentials_block: CredentialsBlock = None,
    as_json: JsonSummary = False,
) -> None:
    """What the serving endpoint serves.

    Its status, the registry version and its model, where it listens (local), its last
    deployment."""
    import dataclasses

    endpoint = _serving_config(backend, group, region, aws_credentials_block,
                               endpoint_name=name).serving.endpoint_name
    with _backend_errors():
        target = _backend(backend, region, aws_credentials_block)
        status = target.serving.describe(endpoint)
        versions = target.registry.versions(group) if status and status.group == group else []
    record = next((v for v in versions if status and v.version == status.version), None)
    registry = None if record is None else {"status": record.status, "reason": record.reason,
                                            "deployment": record.deployment}
    if as_json:
        typer.echo(json.dumps(None if status is None else {**dataclasses.asdict(status),
                                                           "registry": registry}, default=str))
        return
    if status is None:
        typer.echo(f"no serving endpoint {endpoint} (create it: `cifar10-pipeline serving "
                   f"promote VERSION`)")
        return
    serving = "nothing serves" if status.version is None else (
        f"{status.group} v{status.version}" + (f" ({record.status})" if record else ""))
    typer.echo(f"{status.name}  {status.status}  {serving}  {status.url or ''}".rstrip())
    typer.echo(f"  model            {status.model_uri}")
    typer.echo(f"  last deployment  {status.last_deployment or '-'}")


@serving_app.command("promote")
def serving_promote(
    version: Annotated[int, typer.Argument(help="the registry version (it must be Approved)")],
    name: ServingName = None,
    strategy: Strategy = None,
    percent: Percent = None,
    wait_seconds: WaitSeconds = None,
    baking_seconds: BakingSeconds = None,
    backend: BackendOption = "local",
    group: Group = "cifar10-pipeline",
    region: Region = None,
    aws_credentials_block: CredentialsBlock = None,
    as_json: JsonSummary = False,
) -> None:
    """Put an Approved version on the serving endpoint, blue/green.

    Created at the first promotion, then updated blue/green (the new fleet starts, traffic
    shifts to it as --strategy says, the alarms watch each step and the baking period, the
    old fleet stops), or rolled back automatically, the old version still serving. Runs the
    cifar10-promote flow: its steps and a plot are on the run's page. Exit 1 when it rolled
    back or failed.

    cifar10-pipeline serving promote 4 --strategy linear --percent 25
    """
    config = _serving_config(backend, group, region, aws_credentials_block, endpoint_name=name,
                             strategy=strategy, percent=percent, wait_seconds=wait_seconds,
                             baking_seconds=baking_seconds)
    from flows.promote import cifar10_promote

    _run_flow(cifar10_promote, config, as_json, version=version)


@serving_app.command("rollback")
def serving_rollback(
    name: ServingName = None,
    strategy: RollbackStrategy = "all_at_once",
    backend: BackendOption = "local",
    group: Group = "cifar10-pipeline",
    region: Region = None,
    aws_credentials_block: CredentialsBlock = None,
    as_json: JsonSummary = False,
) -> None:
    """Put the previous champion back on the serving endpoint.

    The previous champion: the version the serving one replaced (marked "replaced by vN" in
    `models list`) if it is still Approved, else the newest Approved version older than the
    serving one. The version taken off is marked "rolled back", and nightly runs do not
    promote it again (`serving promote` does)."""
    from tasks.lib.promotion import rollback_target

    config = _serving_config(backend, group, region, aws_credentials_block, endpoint_name=name,
                             strategy=strategy)
    endpoint = config.serving.endpoint_name
    with _backend_errors():
        target = _backend(backend, region, aws_credentials_block)
        status = target.serving.describe(endpoint)
        versions = target.registry.versions(group)
    if status is None or status.version is None or status.group != group:
        _fail(f"{endpoint} serves no version of {group}: nothing to roll back")
    found = rollback_target(versions, status.version)
    if found is None:
        _fail(f"{group} has no Approved version older than v{status.version} to roll back to")
    previous, why = found
    typer.echo(f"rolling {endpoint} back from v{status.version} to v{previous.version} "
               f"({why})", err=True)
    from flows.promote import cifar10_promote

    _run_flow(cifar10_promote, config, as_json, version=previous.version)


@serving_app.command("delete")
def serving_delete(
    name: ServingName = None,
    backend: BackendOption = "local",
    group: Group = "cifar10-pipeline",
    region: Region = None,
    aws_credentials_block: CredentialsBlock = None,
) -> None:
    """Delete the serving endpoint with its fleets, alarms and scaling.

    On AWS it bills around the clock until deleted. With serving.enabled, the next pipeline
    run whose version is the champion creates it again."""
    endpoint = _serving_config(backend, group, region, aws_credentials_block,
                               endpoint_name=name).serving.endpoint_name
    from tasks.lib.promotion import serving_on

    with _backend_errors():
        target = _backend(backend, region, aws_credentials_block)
        deleted = target.serving.delete(endpoint)
        for version in target.registry.versions(group):
            if version.deployment == serving_on(endpoint):  # it serves nowhere now
                target.registry.set_deployment(group, version.version, None)
    typer.echo(f"{endpoint}: {'deleted' if deleted else 'not found (nothing to delete)'}")


BlockName = Annotated[str, typer.Option("--block", help="the notification block's name (or "
                                                         "TYPE/NAME, e.g. slack-webhook/ops)")]


@contextmanager
def _notify_errors() -> Iterator[None]:
    """No Prefect API, an untrusted one, or no such block: one line, no traceback."""
    from deployments.automations import NoSuchBlock

    try:
        with _prefect_api():
            yield
    except NoSuchBlock as e:
        _fail(str(e))


@notify_app.command("install")
def notify_install(block: BlockName) -> None:
    """Create (or update: never a second one) the automation that sends every Failed, Crashed
    or TimedOut run of this project's deployments to BLOCK: which run, what failed, its UI
    link, and the endpoint that may still be up."""
    from deployments.automations import FAILURE_NOTICE, install_failure_notice

    with _notify_errors():
        install_failure_notice(block)
    typer.echo(f"installed automation {FAILURE_NOTICE!r}: failed, crashed and timed-out "
               f"deployment runs are sent to {block}")


@notify_app.command("test")
def notify_test(block: Annotated[str | None, typer.Option(
        "--block", help="the block's name or TYPE/NAME (default: the one the installed "
                        "automation sends to)")] = None) -> None:
    """Send one test message through a notification block."""
    from deployments.automations import send_test_notice

    with _notify_errors():
        sent_to = send_test_notice(block)
    typer.echo(f"sent a test message through {sent_to}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
