"""Local endpoints for real: a server process per endpoint on a loopback port, reached with
boto3's sagemaker-runtime client and with plain HTTP."""

from __future__ import annotations

import io
import json
import pickle
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import boto3
import numpy as np
import pytest

from backends.base import EndpointExists, EndpointFailed, EndpointSpec
from backends.local.server import MAX_PAYLOAD_BYTES
from tests.support.payloads import npy


def sample_images(cifar_dir, n: int = 64) -> tuple[np.ndarray, np.ndarray]:
    with open(cifar_dir / "test_batch", "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    images = batch[b"data"][:n].reshape(-1, 3, 32, 32).astype(np.float32) / 255
    return images, np.array(batch[b"labels"][:n])


def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def ping(url: str) -> int:
    with urllib.request.urlopen(f"{url}/ping", timeout=10) as response:
        return response.status


def test_boto3_invoke_endpoint_returns_correct_predictions(local_backend, endpoint, cifar_dir):
    images, labels = sample_images(cifar_dir)
    client = local_backend.endpoints.runtime_client(endpoint.name)
    response = client.invoke_endpoint(EndpointName=endpoint.name, Body=npy(images),
                                      ContentType="application/x-npy", Accept="application/x-npy")
    assert response["ContentType"] == "application/x-npy"
    assert response["InvokedProductionVariant"] == "AllTraffic"
    logits = np.load(io.BytesIO(response["Body"].read()), allow_pickle=False)
    assert logits.shape == (len(images), 10)
    assert (logits.argmax(1) == labels).mean() > 0.5
    # The same logits as the model computes in this process from the same artifact.
    from tests.support.pipeline import import_handlers

    model_dir = local_backend.endpoints.records.endpoint_dir(endpoint.name) / "model"
    handlers = import_handlers(model_dir / "code")
    expected = handlers.predict_fn(handlers.input_fn(npy(images), "application/x-npy"),
                                   handlers.model_fn(str(model_dir)))
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def test_sagemaker_sdk_serializer_bytes_work_unchanged(local_backend, endpoint, cifar_dir):
    from sagemaker.core.deserializers import NumpyDeserializer
    from sagemaker.core.serializers import NumpySerializer

    images, _ = sample_images(cifar_dir, 8)
    serializer, deserializer = NumpySerializer(), NumpyDeserializer()
    # An unconfigured boto3 client, pointed at the server the way a user would.
    client = boto3.client("sagemaker-runtime", endpoint_url=endpoint.url, region_name="us-east-1",
                          aws_access_key_id="dummy", aws_secret_access_key="dummy")
    response = client.invoke_endpoint(EndpointName=endpoint.name,
                                      Body=serializer.serialize(images),
                                      ContentType=serializer.CONTENT_TYPE,
                                      Accept=deserializer.ACCEPT[0])
    logits = deserializer.deserialize(response["Body"], response["ContentType"])
    assert logits.shape == (8, 10)
    json_response = client.invoke_endpoint(EndpointName=endpoint.name,
                                           Body=json.dumps(images.tolist()),
                                           ContentType="application/json")
    assert json_response["ContentType"] == "application/json"
    np.testing.assert_allclose(np.array(json.loads(json_response["Body"].read())), logits,
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("body, headers, status, message", [
    (b"x", {"Content-Type": "text/csv"}, 415, "not supported"),
    (b"not npy", {"Content-Type": "application/x-npy"}, 400, "not a valid .npy"),
    (b"[[1]]", {"Content-Type": "application/json"}, 400, "N x 3 x 32 x 32"),
    (b"", {"Content-Type": "application/x-npy"}, 400, "empty request body"),
    (b"x" * (MAX_PAYLOAD_BYTES + 1), {"Content-Type": "application/x-npy"}, 413, "limit"),
    (npy(np.zeros((1, 3, 32, 32), np.float32)),
     {"Content-Type": "application/x-npy", "Accept": "text/csv"}, 406, "cannot answer"),
])
def test_container_errors_are_json_and_server_keeps_serving(endpoint, body, headers, status,
                                                            message):
    code, response_headers, payload = post(f"{endpoint.url}/invocations", body, headers)
    assert code == status
    assert response_headers["content-type"] == "application/json"
    assert message in json.loads(payload)["message"]
    assert ping(endpoint.url) == 200
    ok, _, _ = post(f"{endpoint.url}/invocations", npy(np.zeros((1, 3, 32, 32), np.float32)),
                    {"Content-Type": "application/x-npy"})
    assert ok == 200


def test_runtime_api_reports_container_errors_as_model_error(local_backend, endpoint):
    client = local_backend.endpoints.runtime_client(endpoint.name)
    with pytest.raises(client.exceptions.ModelError) as err:
        client.invoke_endpoint(EndpointName=endpoint.name, Body=b"{}",
                               ContentType="text/plain")
    assert err.value.response["OriginalStatusCode"] == 415
    assert "not supported" in err.value.response["OriginalMessage"]
    with pytest.raises(client.exceptions.ClientError) as err:
        client.invoke_endpoint(EndpointName="some-other-endpoint", Body=b"[]",
                               ContentType="application/json")
    assert err.value.response["Error"]["Code"] == "ValidationError"


def test_declared_oversized_body_is_refused_before_reading(endpoint):
    host, port = endpoint.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-npy\r\n"
                  b"Content-Length: 99999999999\r\n\r\n")
        reply = s.recv(4096).decode()
    assert reply.startswith("HTTP/1.1 413")
    assert ping(endpoint.url) == 200


def test_endpoint_is_listed_with_owner_and_creation_time(local_backend, endpoint):
    listed = {e.name: e for e in local_backend.endpoints.list()}
    assert listed[endpoint.name].status == "InService"
    assert listed[endpoint.name].tags["owner"] == "pytest"
    assert listed[endpoint.name].created.tzinfo is not None


def test_deploying_an_existing_name_is_refused(local_backend, endpoint, model_uri):
    with pytest.raises(EndpointExists):
        local_backend.endpoints.deploy(EndpointSpec(name=endpoint.name, model_uri=model_uri))
    assert ping(endpoint.url) == 200


def test_endpoint_outlives_its_deployer_and_is_deleted_from_another_process(
        local_backend, model_uri):
    root = str(local_backend.root)
    deploy = (
        "import sys; from backends.local import LocalBackend; "
        "from backends.base import EndpointSpec, managed_tags; "
        "info = LocalBackend(root=sys.argv[1]).endpoints.deploy(EndpointSpec(name='survivor', "
        "model_uri=sys.argv[2], tags=managed_tags('child'))); print(info.url)"
    )
    url = subprocess.run([sys.executable, "-c", deploy, root, model_uri], capture_output=True,
                         text=True, check=True, timeout=120).stdout.strip()
    # The deploying process has exited; the endpoint still answers.
    assert ping(url) == 200
    info = local_backend.endpoints.describe("survivor")
    assert info.status == "InService" and info.url == url
    pid = info.extra["pid"]

    delete = ("import sys; from backends.local import LocalBackend; "
              "print(LocalBackend(root=sys.argv[1]).endpoints.delete('survivor'))")
    out = subprocess.run([sys.executable, "-c", delete, root], capture_output=True, text=True,
                         check=True, timeout=60).stdout.strip()
    assert out == "True"
    assert local_backend.endpoints.describe("survivor") is None
    from backends.local import processes

    assert processes.start_time(pid) is None, "server process still running"
    host, port = url.removeprefix("http://").split(":")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, int(port)), timeout=5).close()


def test_deleting_a_missing_endpoint_succeeds(local_backend):
    assert local_backend.endpoints.delete("never-existed") is False


def test_broken_model_fails_deploy_with_the_servers_error(local_backend, tmp_path):
    import tarfile

    archive = tmp_path / "model.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        readme = tmp_path / "README"
        readme.write_text("no code here")
        tar.add(readme, arcname="README")
    with pytest.raises(EndpointFailed) as err:
        local_backend.endpoints.deploy(EndpointSpec(name="broken", model_uri=archive.as_uri()))
    assert "inference code inference.py not found" in str(err.value)
    assert local_backend.endpoints.describe("broken") is None  # cleaned up


def test_model_archive_with_path_traversal_is_refused(local_backend, tmp_path):
    import tarfile

    archive = tmp_path / "evil.tar.gz"
    payload = tmp_path / "payload"
    payload.write_text("x")
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(payload, arcname="../../escaped")
    with pytest.raises(EndpointFailed, match="outside"):
        local_backend.endpoints.deploy(EndpointSpec(name="evil", model_uri=archive.as_uri()))
    assert not (local_backend.root / "escaped").exists()


def test_a_proxy_in_the_environment_does_not_intercept_loopback(local_backend, endpoint,
                                                                cifar_dir, monkeypatch):
    """Machines behind a corporate proxy set http_proxy; local endpoints listen on loopback
    and must be reached directly, by the backend's own checks and by boto3 alike."""
    from backends.local import LocalBackend

    for key in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(key, raising=False)
    for key in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.setenv(key, "http://127.0.0.1:9")  # nothing listens there
    backend = LocalBackend(root=local_backend.root)
    assert ping(endpoint.url) == 200
    images, _ = sample_images(cifar_dir, 8)
    answer = backend.endpoints.invoke(endpoint.name, npy(images), "application/x-npy")
    assert answer.content_type == "application/json" and len(json.loads(answer.body)) == 8
