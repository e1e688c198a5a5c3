"""Our model artifacts served by SageMaker's own PyTorch inference toolkit (the code inside AWS's
PyTorch serving containers) and by our local endpoint, which must answer alike: a model trained
now (handlers in code/inference.py, the toolkit's default: no SAGEMAKER_PROGRAM), and a model
trained before model_src/ was split (one script, served with SAGEMAKER_PROGRAM=cifar10.py as
the AWS backend deployed it then)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from backends.base import EndpointSpec, managed_tags
from backends.files import safe_extract
from backends.local.store import path_from_uri
from tests.support.payloads import npy
from tests.support.pipeline import REPO, sagemaker_env

pytestmark = pytest.mark.long_running

TOOLKIT_DRIVER = REPO / "tests" / "support" / "toolkit_serving.py"
LEGACY_SCRIPT = REPO / "tests" / "support" / "legacy" / "cifar10-e1c06ee.py.txt"
NPY, JSON = "application/x-npy", "application/json"


def images(cifar_dir: Path, n: int = 8) -> np.ndarray:
    import pickle

    with open(cifar_dir / "test_batch", "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    return batch[b"data"][:n].reshape(-1, 3, 32, 32)


def requests_for(pixels: np.ndarray) -> dict[str, tuple[bytes, str, str | None]]:
    """name → (body, Content-Type, Accept): good requests in both wire formats, and bad ones."""
    floats = pixels.astype(np.float32) / 255
    return {
        "npy in, npy out": (npy(floats), NPY, NPY),
        "json in, json out": (json.dumps(floats.tolist()).encode(), JSON, JSON),
        "uint8 npy in, default out": (npy(pixels), NPY, None),
        "not an npy body": (b"garbage", NPY, JSON),
        "wrong shape": (npy(floats[:, :, :16]), NPY, JSON),
        "unsupported content type": (b"1,2,3", "text/csv", JSON),
        "unanswerable accept": (npy(floats), NPY, "text/csv"),
    }


def through_toolkit(model_dir: Path, requests: dict, work: Path,
                    environment: dict[str, str]) -> dict[str, tuple[int, str, bytes]]:
    """name → (status, content type, body) from the toolkit's handler service."""
    work.mkdir(parents=True, exist_ok=True)
    listed = []
    for i, (body, content_type, accept) in enumerate(requests.values()):
        (work / f"request-{i}").write_bytes(body)
        listed.append({"body_file": str(work / f"request-{i}"), "content_type": content_type,
                       "accept": accept})
    (work / "requests.json").write_text(json.dumps(listed))
    # The container's set-up: code/ on the path, the model's environment, nothing of ours.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGEMAKER_")}
    env.update({"PYTHONPATH": str(model_dir / "code"), **environment})
    result = subprocess.run([sys.executable, str(TOOLKIT_DRIVER), str(model_dir),
                             str(work / "requests.json"), str(work / "answers.json")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    answers = json.loads((work / "answers.json").read_text())
    return {name: (a["status"], a["content_type"], Path(a["body_file"]).read_bytes())
            for name, a in zip(requests, answers, strict=True)}


def through_endpoint(url: str, requests: dict) -> dict[str, tuple[int, str, bytes]]:
    """name → (status, content type, body) from our local endpoint's /invocations."""
    answers = {}
    for name, (body, content_type, accept) in requests.items():
        headers = {"Content-Type": content_type, **({"Accept": accept} if accept else {})}
        request = urllib.request.Request(f"{url}/invocations", data=body, headers=headers,
                                         method="POST")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                answers[name] = (response.status, response.headers.get("Content-Type"),
                                 response.read())
        except urllib.error.HTTPError as e:
            answers[name] = (e.code, e.headers.get("Content-Type"), e.read())
    return answers


def logits(content_type: str, body: bytes) -> np.ndarray:
    if content_type.startswith(NPY):
        return np.load(io.BytesIO(body), allow_pickle=False)
    return np.asarray(json.loads(body), dtype=np.float32)


def extracted(archive: Path, dest: Path) -> Path:
    safe_extract(archive, dest)
    return dest


@pytest.fixture(scope="module")
def legacy_model(tmp_path_factory, cifar_dir) -> Path:
    """A model.tar.gz trained by the released one-file script, exactly as then."""
    root = tmp_path_factory.mktemp("legacy-opt-ml")
    script = root / "cifar10.py"
    script.write_bytes(LEGACY_SCRIPT.read_bytes())
    result = subprocess.run([sys.executable, str(script), "--epochs", "2", "--batch-size", "16",
                             "--lr", "0.02"], env=sagemaker_env(root, cifar_dir), cwd=root,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (root / "model" / "code").iterdir()) == ["cifar10.py"]
    archive = root / "model.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for item in sorted((root / "model").iterdir()):
            tar.add(item, arcname=item.name)
    return archive


@pytest.mark.parametrize("which", ["new", "legacy"])
def test_the_toolkit_and_our_endpoint_serve_our_models_alike(
        which, model_uri, legacy_model, local_backend, cifar_dir, tmp_path):
    archive = path_from_uri(model_uri) if which == "new" else legacy_model
    model_dir = extracted(archive, tmp_path / "model")
    # New models need no SAGEMAKER_PROGRAM: their handlers are in the toolkit's default module.
    environment = {} if which == "new" else {"SAGEMAKER_PROGRAM": "cifar10.py"}
    assert (model_dir / "code" / "inference.py").is_file() == (which == "new")
    pixels = images(cifar_dir)
    requests = requests_for(pixels)

    toolkit = through_toolkit(model_dir, requests, tmp_path / "toolkit", environment)
    name = f"toolkit-{which}"
    info = local_backend.endpoints.deploy(EndpointSpec(name=name, model_uri=archive.as_uri(),
                                                       tags=managed_tags("pytest")))
    try:
        ours = through_endpoint(info.url, requests)
    finally:
        local_backend.endpoints.delete(name)

    for request in ("npy in, npy out", "json in, json out", "uint8 npy in, default out"):
        (status, content_type, body), (our_status, our_type, our_body) = \
            toolkit[request], ours[request]
        assert status == our_status == 200, (request, body[:300])
        assert content_type.split(";")[0] == our_type.split(";")[0]
        theirs, mine = logits(content_type, body), logits(our_type, our_body)
        assert theirs.shape == mine.shape == (len(pixels), 10)
        np.testing.assert_allclose(theirs, mine, rtol=1e-5, atol=1e-5)
    # The uint8 and float requests are the same images: the same answer.
    np.testing.assert_allclose(logits(*toolkit["uint8 npy in, default out"][1:]),
                               logits(*toolkit["npy in, npy out"][1:]), rtol=1e-5, atol=1e-5)
    # Bad payloads get the same HTTP status through the toolkit as through our server.
    expected = {"not an npy body": 400, "wrong shape": 400, "unsupported content type": 415,
                "unanswerable accept": 406}
    for request, status in expected.items():
        assert toolkit[request][0] == ours[request][0] == status, (request, toolkit[request])
