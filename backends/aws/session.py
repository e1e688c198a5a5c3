"""The boto3 session and clients the AWS backend uses, built on first use.

Building an ``AwsBackend`` must stay cheap and offline (the CLI builds one to list endpoints,
the flow builds one per run), so nothing here touches AWS, the credential chain or the
SageMaker SDK until a client is first asked for.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import boto3
import botocore.loaders
import botocore.session
from botocore.config import Config
from botocore.exceptions import ProfileNotFound

from backends.aws.boto_adapter import botocore_session_of
from backends.aws.errors import CREDENTIALS_HELP, REGION_HELP
from backends.base import ConfigurationError

# Standard retry mode backs off on throttling (ListTags per endpoint in the reaper, log polls).
CLIENT_CONFIG = Config(retries={"mode": "standard", "max_attempts": 5})
# InvokeEndpoint waits up to 60 s for the container; a model error must not be retried 5 times.
RUNTIME_CONFIG = Config(read_timeout=80, retries={"mode": "standard", "max_attempts": 2})


# botocore reads each service's API model (SageMaker's is megabytes of JSON) once per session;
# a backend is built per flow run and per teardown hook, so the sessions share one loader and
# its cache.
_MODEL_LOADER = botocore.loaders.create_loader()


# Makes the boto3 session for a region (None: the source's own): how credentials that are not
# boto3's default chain reach the backend, e.g. a Prefect AwsCredentials block, which flows/
# loads (backends never import Prefect). A factory rather than a session: it runs on first use
# in whichever process builds the backend, and may hand out refreshing credentials.
SessionFactory = Callable[[str | None], boto3.Session]


def new_boto_session(region: str | None) -> boto3.Session:
    """A boto3 session on the default credential chain (environment, profile, SSO, instance
    role). The one place sessions are made: tests replace it to observe every call."""
    core = botocore.session.get_session()
    core.register_component("data_loader", _MODEL_LOADER)
    return boto3.Session(botocore_session=core, region_name=region)


def session_from_factory(factory: SessionFactory, region: str | None) -> boto3.Session:
    """A session made by ``factory`` (a credentials block's), sharing the service-model cache.
    The one place such sessions are made: tests replace it to observe every call."""
    session = factory(region)
    # Nothing is loaded yet: the loader still takes effect.
    botocore_session_of(session).register_component("data_loader", _MODEL_LOADER)
    return session


class AwsSession:
    """One boto3 session and its clients, created on first use and checked for a region and
    credentials so that a missing one is a ``ConfigurationError`` that says what to set."""

    def __init__(self, region: str | None = None,
                 boto_session: boto3.Session | None = None,
                 session_factory: SessionFactory | None = None) -> None:
        self._region = region
        self._session = boto_session
        self._handed_in = boto_session is not None  # its owner made it: never remade here
        self._factory = session_factory
        self._checked = False
        self._clients: dict[str, Any] = {}
        self._lock = threading.Lock()

    @property
    def session(self) -> boto3.Session:
        with self._lock:
            if self._session is None:
                try:
                    self._session = (session_from_factory(self._factory, self._region)
                                     if self._factory else new_boto_session(self._region))
                except ProfileNotFound as e:
                    raise ConfigurationError(f"{e}; fix AWS_PROFILE or ~/.aws/config") from e
            if not self._checked:
                if not self._session.region_name:
                    raise ConfigurationError(REGION_HELP)
                if self._session.get_credentials() is None:
                    raise ConfigurationError(CREDENTIALS_HELP)
                self._checked = True
            return self._session

    def renew(self) -> bool:
        """Forgets the session and its clients, so that the next call makes them again: with
        credentials the chain (or the factory) has refreshed since, e.g. after an SSO login
        or a key rotation. False, and nothing changes, for a session that was handed in."""
        with self._lock:
            if self._handed_in:
                return False
            self._session = None
            self._checked = False
            self._clients.clear()
            return True

    @property
    def region(self) -> str:
        return self.session.region_name

    def client(self, service: str) -> Any:
        """A shared client (boto3 clients are thread-safe; sessions are not)."""
        session = self.session
        with self._lock:
            if service not in self._clients:
                config = RUNTIME_CONFIG if service == "sagemaker-runtime" else CLIENT_CONFIG
                self._clients[service] = session.client(service, config=config)
            return self._clients[service]

    @property
    def sagemaker(self) -> Any:
        return self.client("sagemaker")

    @property
    def s3(self) -> Any:
        return self.client("s3")

    @property
    def logs(self) -> Any:
        return self.client("logs")

    @property
    def runtime(self) -> Any:
        return self.client("sagemaker-runtime")

    @property
    def cloudwatch(self) -> Any:
        return self.client("cloudwatch")

    @property
    def app_autoscaling(self) -> Any:
        return self.client("application-autoscaling")
