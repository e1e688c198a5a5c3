"""The serving endpoint under load, as the serving tests drive it: tiny models that say who
they are (and fail or answer slowly on request), and boto3 sagemaker-runtime clients that
invoke back to back, recording which model answered each request and how."""

from __future__ import annotations

import json
import tarfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import boto3
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from backends.local.serving import VERSION_HEADER

# A model that answers who it is; FAIL_EVERY n: all but one in n invocations raise (a 500);
# SLEEP: seconds each invocation takes.
HANDLERS = """
import itertools, json, time

ANSWER = json.dumps({{"model": "{label}"}}).encode()
FAIL_EVERY, SLEEP = {fail_every}, {sleep}
calls = itertools.count()

def model_fn(model_dir):
    return None

def input_fn(body, content_type):
    return body

def predict_fn(data, model):
    if FAIL_EVERY and next(calls) % FAIL_EVERY:
        raise RuntimeError("this model is broken")
    time.sleep(SLEEP)
    return None

def output_fn(prediction, accept):
    return ANSWER, "application/json"
"""


def make_model(directory: Path, label: str, fail_every: int = 0, sleep: float = 0.0) -> str:
    code = directory / label / "code"
    code.mkdir(parents=True)
    (code / "inference.py").write_text(HANDLERS.format(label=label, fail_every=fail_every,
                                                       sleep=sleep))
    archive = directory / label / "model.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(code, arcname="code")
    return archive.as_uri()


def runtime_client(url: str):
    """boto3's own client, unsigned like LocalEndpoints.runtime_client, without retries: every
    failed invocation is seen."""
    return boto3.session.Session().client(
        "sagemaker-runtime", endpoint_url=url, region_name="us-east-1",
        config=Config(signature_version=UNSIGNED, retries={"total_max_attempts": 1},
                      read_timeout=30))


@dataclass(frozen=True)
class Answer:
    started: float  # time.time()
    ended: float
    version: str | None  # the x-cifar10-model-version header
    ok: bool
    code: str | None = None  # the error code of a failed one
    body: dict | list | None = None
    content_type: str | None = None
    original_status: int | None = None


def invoke(client, name: str, body: bytes = b"[0]",
           content_type: str = "application/json") -> Answer:
    """One InvokeEndpoint, as it ended: answered, refused (the error boto3 raised), or lost."""
    started = time.time()
    try:
        response = client.invoke_endpoint(EndpointName=name, Body=body,
                                          ContentType=content_type, Accept="application/json")
        answer = json.loads(response["Body"].read())
        headers = response["ResponseMetadata"]["HTTPHeaders"]
        return Answer(started, time.time(), headers.get(VERSION_HEADER), True, body=answer,
                      content_type=response["ContentType"])
    except ClientError as e:
        headers = e.response["ResponseMetadata"].get("HTTPHeaders", {})
        return Answer(started, time.time(), headers.get(VERSION_HEADER), False,
                      e.response["Error"]["Code"],
                      original_status=e.response.get("OriginalStatusCode"))
    except BotoCoreError as e:  # no answer at all: a lost request
        return Answer(started, time.time(), None, False, type(e).__name__)


class Load:
    """Four clients invoking the serving endpoint back to back until the block ends."""

    def __init__(self, url: str, name: str, clients: int = 4, body: bytes = b"[0]",
                 content_type: str = "application/json") -> None:
        self.name, self.answers, self.stop = name, [], threading.Event()
        self.body, self.content_type = body, content_type
        self.clients = [runtime_client(url) for _ in range(clients)]
        self.threads = [threading.Thread(target=self.run, args=(c,)) for c in self.clients]

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)

    def run(self, client) -> None:
        while not self.stop.is_set():
            self.answers.append(invoke(client, self.name, self.body, self.content_type))


