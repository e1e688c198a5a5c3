"""Every request checked against botocore's service models the way the real API checks it.

botocore validates types, required members and minimums before sending; AWS also rejects values
over a maximum length or size, outside an enum, or not matching a member's pattern (names,
ARNs, tags, S3 keys). moto accepts nearly anything, so a request the real service would refuse
could pass every offline test: this validator records each such violation instead.
"""

from __future__ import annotations

import datetime as dt
import threading
from dataclasses import dataclass, field
from typing import Any

import regex  # AWS's patterns use \p{...} classes, which re lacks
from botocore.model import Shape

SERVICES = ("sagemaker", "sagemaker-runtime", "s3", "logs")


@dataclass
class RequestValidator:
    checked: list[str] = field(default_factory=list)  # "service.Operation" of every call
    violations: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def attach(self, session: Any) -> None:
        for service in SERVICES:
            session.events.register(f"before-parameter-build.{service}", self._check(service))

    def _check(self, service: str):
        def handler(model, params, **kwargs):
            problems: list[str] = []
            if model.input_shape is not None:
                _walk(model.input_shape, params, model.name, problems)
            with self._lock:
                self.checked.append(f"{service}.{model.name}")
                self.violations += [f"{service}.{p}" for p in problems]
        return handler


def _walk(shape: Shape, value: Any, path: str, problems: list[str]) -> None:
    meta = shape.metadata
    kind = shape.type_name
    if kind == "structure":
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a structure, got {type(value).__name__}")
            return
        for name in getattr(shape, "required_members", []):
            if name not in value:
                problems.append(f"{path}: missing required {name}")
        for name, member in value.items():
            if name not in shape.members:
                problems.append(f"{path}: unknown member {name}")
            else:
                _walk(shape.members[name], member, f"{path}.{name}", problems)
    elif kind == "list":
        _bounds(len(value), meta, path, "items", problems)
        for i, item in enumerate(value):
            _walk(shape.member, item, f"{path}[{i}]", problems)
    elif kind == "map":
        _bounds(len(value), meta, path, "entries", problems)
        for key, item in value.items():
            _walk(shape.key, key, f"{path}<key {key!r}>", problems)
            _walk(shape.value, item, f"{path}[{key!r}]", problems)
    elif kind == "string":
        if not isinstance(value, str):
            return  # botocore's own validation reports the type
        _bounds(len(value), meta, path, "characters", problems)
        if "enum" in shape.metadata and value not in shape.enum:
            problems.append(f"{path}: {value!r} is not one of {shape.enum}")
        pattern = meta.get("pattern")
        if pattern and not regex.search(pattern, value):
            problems.append(f"{path}: {value!r} does not match {pattern}")
    elif kind in ("integer", "long", "float", "double") and isinstance(value, int | float):
        if "min" in meta and value < meta["min"]:
            problems.append(f"{path}: {value} is under the minimum {meta['min']}")
        if "max" in meta and value > meta["max"]:
            problems.append(f"{path}: {value} is over the maximum {meta['max']}")
    elif kind == "blob" and isinstance(value, bytes | bytearray):
        _bounds(len(value), meta, path, "bytes", problems)
    elif kind == "timestamp" and not isinstance(value, dt.datetime | str | int | float):
        problems.append(f"{path}: not a timestamp: {value!r}")


def _bounds(size: int, meta: dict, path: str, unit: str, problems: list[str]) -> None:
    if "min" in meta and size < meta["min"]:
        problems.append(f"{path}: {size} {unit}, under the minimum {meta['min']}")
    if "max" in meta and size > meta["max"]:
        problems.append(f"{path}: {size} {unit}, over the maximum {meta['max']}")
