"""PyTorch Deep Learning Container images, looked up with the SageMaker SDK.

The SDK ships the table of DLC image URIs per region, version, Python and CPU/GPU; no AWS call
is made. Importing it takes seconds, so it happens on first use, never when the backend is
built.
"""

from __future__ import annotations

import functools
from typing import Literal

from backends.base import ConfigurationError


@functools.lru_cache(maxsize=32)
def pytorch_image(scope: Literal["training", "inference"], region: str, version: str,
                  py_version: str, instance_type: str) -> str:
    """The PyTorch DLC image for ``scope`` (CPU or GPU flavour from the instance type)."""
    from sagemaker.core import image_uris

    try:
        return image_uris.retrieve(framework="pytorch", region=region, version=version,
                                   py_version=py_version, instance_type=instance_type,
                                   image_scope=scope)
    except ValueError as e:  # unknown version, Python version, region or instance type
        raise ConfigurationError(
            f"no PyTorch {scope} image for version {version} / {py_version} on "
            f"{instance_type} in {region}: {e}") from e
