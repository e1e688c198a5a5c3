"""The private third-party API the product uses, one adapter module per library: each test
fails, saying which upgrade broke what, when a library changes under its adapter."""

from __future__ import annotations

import inspect
from importlib.metadata import version

import pytest


def broke(library: str, what: str, adapter: str, change: str) -> str:
    return (f"{library} {version(library)} changed {what}: {change}. {adapter} relies on it; "
            f"adapt {adapter} (or pin {library} below this version).")


def parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def test_sagemaker_sdk_private_api_is_still_there():
    from sagemaker.train import ModelTrainer

    from backends.aws.sdk_adapter import staging_in_own_bucket

    adapter = "backends/aws/sdk_adapter.py"
    build = getattr(ModelTrainer, "_create_training_job_args", None)
    assert callable(build), broke("sagemaker", "ModelTrainer._create_training_job_args",
                                  adapter, "it is gone")
    assert {"input_data_config", "boto3"} <= set(parameters(build)), broke(
        "sagemaker", "ModelTrainer._create_training_job_args", adapter,
        f"its parameters are now {parameters(build)}")
    resolve = getattr(ModelTrainer, "_resolve_staging_bucket", None)
    assert callable(resolve), broke("sagemaker", "ModelTrainer._resolve_staging_bucket",
                                    adapter, "it is gone, so the override stages nothing")
    assert parameters(resolve) == ["self"], broke(
        "sagemaker", "ModelTrainer._resolve_staging_bucket", adapter,
        f"its parameters are now {parameters(resolve)}")
    assert issubclass(staging_in_own_bucket(), ModelTrainer)


def test_prefect_private_api_is_still_there():
    from prefect.server.api.server import SubprocessASGIServer

    adapter = "flows/prefect_adapter.py"
    what = "SubprocessASGIServer (the temporary API server)"
    run = getattr(SubprocessASGIServer, "_run_uvicorn_command", None)
    assert callable(run), broke("prefect", what, adapter, "_run_uvicorn_command is gone")
    assert parameters(run) == ["self"], broke(
        "prefect", what, adapter, f"_run_uvicorn_command takes {parameters(run)}")
    for method in ("find_available_port", "stop"):
        assert callable(getattr(SubprocessASGIServer, method, None)), broke(
            "prefect", what, adapter, f"{method}() is gone")
    server = SubprocessASGIServer(port=1)  # built, never started: port 1 is never bound
    for attribute in ("port", "server_process", "running"):
        assert hasattr(server, attribute), broke("prefect", what, adapter,
                                                 f"its {attribute!r} attribute is gone")


def test_boto3_private_api_is_still_there():
    import boto3
    import botocore.session

    from backends.aws.boto_adapter import botocore_session_of

    core = botocore_session_of(boto3.Session(region_name="us-east-1"))
    assert isinstance(core, botocore.session.Session), broke(
        "boto3", "Session._session", "backends/aws/boto_adapter.py",
        f"it is now a {type(core).__name__}, not the botocore session")


@pytest.mark.parametrize("probe", ["ops.mkldnn._is_mkldnn_bf16_supported",
                                   "cpu._is_amx_tile_supported",
                                   "cpu._is_avx512_bf16_supported"])
def test_torch_private_hardware_probes_are_still_there(probe):
    """model_src/hardware.py is torch's adapter (model_src ships flat, without the project's
    packages): without these probes, --precision auto would silently stop choosing bf16."""
    import torch

    found = torch
    for part in probe.split("."):
        found = getattr(found, part, None)
    assert callable(found), broke("torch", f"torch.{probe}", "model_src/hardware.py",
                                  "it is gone")
    assert isinstance(found(), bool), broke("torch", f"torch.{probe}", "model_src/hardware.py",
                                            "it no longer answers True or False")
