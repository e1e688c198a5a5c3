"""PyTorch Deep Learning Container images, looked up with the SageMaker SDK.

The SDK ships the table of DLC image URIs per region, version, Python and CPU/GPU; no AWS call
is made. Importing it takes seconds, so it happens on first use, never when the backend is
built.
"""

from __future__ import annotations

import functools
import re
from typing import Literal

from backends.base import ConfigurationError

# Graviton (arm64) instance families: ml.c7g, ml.m6gd, ml.r7g, ml.t4g... Their PyTorch images
# are other repositories (pytorch-inference-arm64) than the x86 ones the execution role may pull
# (docs/iam/execution-role-policy.json), and the pipeline is not tested on arm64.
GRAVITON = re.compile(r"^ml\.[a-z]+\d+g[a-z]*\.")


def check_x86(instance_type: str) -> None:
    """A ``ConfigurationError`` for a Graviton (arm64) instance type, saying what to use."""
    if GRAVITON.match(instance_type):
        raise ConfigurationError(
            f"{instance_type} is a Graviton (arm64) instance type: the pipeline runs on x86 "
            f"instances only (its execution role may pull the x86 PyTorch images); use e.g. "
            f"ml.m5.large, ml.c5.xlarge or a GPU type such as ml.g4dn.xlarge")


@functools.lru_cache(maxsize=32)
def pytorch_image(scope: Literal["training", "inference"], region: str, version: str,
                  py_version: str, instance_type: str) -> str:
    """The PyTorch DLC image for ``scope`` (CPU or GPU flavour from the instance type)."""
    check_x86(instance_type)
    from sagemaker.core import image_uris

    try:
        return image_uris.retrieve(framework="pytorch", region=region, version=version,
                                   py_version=py_version, instance_type=instance_type,
                                   image_scope=scope)
    except ValueError as e:  # unknown version, Python version, region or instance type
        raise ConfigurationError(
            f"no PyTorch {scope} image for version {version} / {py_version} on "
            f"{instance_type} in {region}: {e}") from e
