"""What every stage of one flow run shares: its config, its backend, its id (which names its
training job and endpoint), the tags that mark what it creates, and its stage timings."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property

from prefect.runtime import flow_run as current_flow_run

from backends.base import NAME_PREFIX, Backend, managed_tags
from backends.settings import SOURCE_DIR
from flows.config import PipelineConfig
from tasks.lib.lineage import code_digest
from tasks.retention import apply_retention


def resource_name(run_id: str) -> str:
    """Training job and endpoint name for a flow run: deterministic, so a retried task finds
    the job its first attempt started, and a hook in another process finds the endpoint."""
    return f"{NAME_PREFIX}{run_id.replace('-', '')[:12]}"


@dataclass
class RunContext:
    config: PipelineConfig
    backend: Backend
    run_id: str
    timings: dict[str, float] = field(default_factory=dict)  # stage → seconds, in run order

    @property
    def name(self) -> str:
        return resource_name(self.run_id)

    @property
    def owner(self) -> str:
        return f"prefect-flow-run/{self.run_id}"

    @property
    def tags(self) -> dict[str, str]:
        return managed_tags(owner=self.owner)

    @property
    def hosting_instance(self) -> str:
        return self.config.instance_types()[1]

    @cached_property
    def code(self) -> str:
        """The digest of ``model_src/``: part of every training's cache key and lineage."""
        return code_digest(SOURCE_DIR)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Times the stage into ``timings`` (also when it fails)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(time.perf_counter() - started, 3)


def start_run(config: PipelineConfig, backend: Backend) -> RunContext:
    """Readies the backend (while the data downloads) and prunes what earlier runs left past
    the retention limits, or a kill left; the run's id names what it creates."""
    backend.prepare()
    apply_retention(backend)
    return RunContext(config, backend, str(current_flow_run.id or uuid.uuid4()))
