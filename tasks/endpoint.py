"""Hosting stages: deploy the model to an endpoint, smoke-test it through the SageMaker Runtime
API, and delete it."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from backends.base import Backend, EndpointInfo, EndpointSpec
from model_src.contract import CLASSES, NPY, read_batch
from tasks.lib.download import Dataset
from tasks.lib.plots import image_grid
from tasks.lib.summary import SmokeTestResult
from tasks.reporting import logger, markdown_image, publish_markdown, publish_table
from tasks.retries import retry_transient

IMAGES_PER_REQUEST = 256  # 256 float32 images are 3 MiB, well inside the 6 MiB payload limit


class AccuracyBelowFloor(RuntimeError):
    """The endpoint answered, but worse than the configured accuracy floor; ``result`` holds
    the smoke test's figures (a failed smoke test is still registered, as such)."""

    def __init__(self, message: str, result: SmokeTestResult | None = None) -> None:
        super().__init__(message)
        self.result = result

    def __reduce__(self):  # Prefect pickles a failed task's exception into its state
        return type(self), (str(self), self.result)


class BadPrediction(RuntimeError):
    """The endpoint's answer is not what the model contract promises."""


@task(name="deploy", task_run_name="deploy {spec.name}", cache_policy=NO_CACHE)
def deploy(backend: Backend, spec: EndpointSpec) -> EndpointInfo:
    """Creates model, endpoint config and endpoint; returns once it is InService."""
    log = logger()
    log.info("deploying %s to endpoint %s (%d x %s)", spec.model_uri, spec.name,
             spec.instance_count, spec.instance_type)
    started = time.monotonic()
    info = backend.endpoints.deploy(spec, on_log=log.info)
    log.info("endpoint %s is %s after %.1fs%s", info.name, info.status,
             time.monotonic() - started, f" at {info.url}" if info.url else "")
    return info


def invoke_batch(backend: Backend, endpoint_name: str, images: np.ndarray) -> np.ndarray:
    """float32 images → logits, through boto3's sagemaker-runtime ``invoke_endpoint``."""
    buffer = io.BytesIO()
    np.save(buffer, images.astype(np.float32), allow_pickle=False)
    answer = backend.endpoints.invoke(endpoint_name, buffer.getvalue(), content_type=NPY,
                                      accept=NPY)
    if answer.content_type.split(";")[0].strip() != NPY:
        raise BadPrediction(f"endpoint answered {answer.content_type!r}, asked for {NPY}")
    try:
        logits = np.load(io.BytesIO(answer.body), allow_pickle=False)
    except ValueError as e:
        raise BadPrediction(f"endpoint answer is not a .npy array: {e}") from e
    if logits.shape != (len(images), len(CLASSES)):
        raise BadPrediction(f"expected logits shaped {(len(images), len(CLASSES))}, "
                            f"got {logits.shape}")
    return logits


@task(name="smoke_predict", task_run_name="smoke-predict {endpoint_name}", cache_policy=NO_CACHE)
def smoke_predict(backend: Backend, endpoint_name: str, dataset: Dataset, images: int = 64,
                  accuracy_floor: float = 0.4) -> SmokeTestResult:
    """Sends the first ``images`` test images to the endpoint as float32 ``application/x-npy``
    (the SageMaker SDK's default wire format), checks the answer's shape, and fails when the
    accuracy on the sample is under ``accuracy_floor``."""
    log = logger()
    test_x, test_y = read_batch(Path(dataset.path) / "test_batch")
    count = min(images, len(test_x))
    pixels, labels = test_x[:count], test_y[:count]
    started = time.monotonic()
    logits = [invoke_batch(backend, endpoint_name, pixels[i:i + IMAGES_PER_REQUEST] / 255.0)
              for i in range(0, count, IMAGES_PER_REQUEST)]
    predicted = np.concatenate(logits).argmax(axis=1)
    seconds = time.monotonic() - started

    # The seed notebook's lines.
    shown = min(4, count)
    print("GroundTruth: ", " ".join(f"{CLASSES[labels[j]]:>4s}" for j in range(shown)))
    print("Predicted: ", " ".join(f"{CLASSES[predicted[j]]:>4s}" for j in range(shown)))

    correct = predicted == labels
    accuracy = float(correct.mean())
    per_class = {
        name: (float(correct[labels == k].mean()) if (labels == k).any() else None)
        for k, name in enumerate(CLASSES)
    }
    result = SmokeTestResult(images=count, accuracy=accuracy, accuracy_floor=accuracy_floor,
                         per_class=per_class, requests=len(logits), seconds=seconds)
    _publish(result, pixels, labels, predicted, endpoint_name)
    log.info("smoke test of %s: %d/%d correct (accuracy %.3f, floor %.3f) in %d requests, "
             "%.2fs", endpoint_name, int(correct.sum()), count, accuracy, accuracy_floor,
             result.requests, seconds)
    if not result.passed:
        raise AccuracyBelowFloor(f"endpoint {endpoint_name} scored {accuracy:.3f} on {count} "
                                 f"test images, under the accuracy floor {accuracy_floor:.3f}",
                                 result)
    return result


def _publish(result: SmokeTestResult, pixels: np.ndarray, labels: np.ndarray,
             predicted: np.ndarray, endpoint_name: str, shown: int = 32) -> None:
    shown = min(shown, len(pixels))
    captions = [f"{CLASSES[t]}→{CLASSES[p]}" if t != p else CLASSES[t]
                for t, p in zip(labels[:shown], predicted[:shown], strict=True)]
    colors = ["green" if t == p else "red"
              for t, p in zip(labels[:shown], predicted[:shown], strict=True)]
    grid = image_grid(pixels[:shown], captions, colors,
                     title="true label (green: predicted right; red: true→predicted)")
    publish_markdown(
        "cifar10-predictions",
        f"## Predictions from `{endpoint_name}`\n\n{markdown_image(grid, 'predictions')}\n\n"
        f"Accuracy on {result.images} test images: **{result.accuracy:.1%}** "
        f"(floor {result.accuracy_floor:.0%}).",
        description="Test images with true and predicted labels",
    )
    publish_table(
        "cifar10-per-class-accuracy",
        [{"class": name, "images": int((labels == k).sum()),
          "accuracy": None if result.per_class[name] is None else round(result.per_class[name], 3)}
         for k, name in enumerate(CLASSES)],
        description=f"Per-class accuracy of {endpoint_name} on the smoke-test sample",
    )


@task(name="delete_endpoint", task_run_name="delete endpoint {name}", cache_policy=NO_CACHE,
      retries=3, retry_delay_seconds=[2, 10, 30], retry_condition_fn=retry_transient)
def delete_endpoint(backend: Backend, name: str) -> bool:
    """Deletes endpoint, endpoint config and model. A missing endpoint is success."""
    deleted = backend.endpoints.delete(name)
    logger().info("endpoint %s %s", name, "deleted" if deleted else "was already gone")
    return deleted
