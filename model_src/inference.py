"""The CIFAR-10 model's inference handlers: the SageMaker PyTorch serving contract.

SageMaker's PyTorch inference toolkit imports ``model_fn``, ``input_fn``, ``predict_fn`` and
``output_fn`` from ``code/inference.py`` of the model artifact (its default module, so no
``SAGEMAKER_PROGRAM`` is needed); the local backend's model server does the same. The model
takes float pixels in [0, 1] shaped N x 3 x 32 x 32 (what torchvision's ``ToTensor`` gives) or
uint8 pixels, and answers N x 10 logits; normalisation lives inside the model, so clients never
need to know the training statistics.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import torch

from contract import IMAGE_SHAPE, JSON, META_FILE, NPY, WEIGHTS_FILE
from hardware import choose_precision
from networks import ARCHITECTURES, LEGACY_OPTIONS, Classifier, build_model

SUPPORTED_TYPES = (NPY, JSON)
# How many images one request may carry (read per request, so the container's environment
# sets it): a 6 MiB payload of uint8 pixels holds 2048 images, and a batch's activations cost
# far more memory than its payload.
MAX_IMAGES_VARIABLE = "CIFAR10_MAX_IMAGES_PER_REQUEST"
DEFAULT_MAX_IMAGES = 1024

try:  # Inside SageMaker's inference toolkit, its error type sets the HTTP status of the reply.
    from sagemaker_inference.errors import BaseInferenceToolkitError as _ToolkitError
except ImportError:  # Anywhere else (our local server) the status_code attribute does the same.

    class _ToolkitError(Exception):  # type: ignore[no-redef]
        def __init__(self, status_code: int, message: str, phrase: str) -> None:
            super().__init__(status_code, message, phrase)
            self.status_code, self.message, self.phrase = status_code, message, phrase


class InferenceError(_ToolkitError):
    """A request the model cannot answer; ``status_code`` is the HTTP status to reply with."""

    status = 400

    def __init__(self, message: str) -> None:
        super().__init__(self.status, message, message)

    def __str__(self) -> str:
        return self.message


class InvalidPayload(InferenceError):
    status = 400


class UnsupportedMediaType(InferenceError):
    status = 415


class NotAcceptable(InferenceError):
    status = 406


class TooManyImages(InferenceError):
    status = 413


def model_fn(model_dir: str) -> Classifier:
    model_path = Path(model_dir)
    meta = json.loads((model_path / META_FILE).read_text())
    options = meta.get("network", LEGACY_OPTIONS.get(meta["architecture"]))
    model = build_model(meta["architecture"], meta["mean"], meta["std"], options)
    state = torch.load(model_path / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model.fold_normalisation()
    # A serving process holds one model, so this process-wide switch is the model's to set.
    onednn = ARCHITECTURES[meta["architecture"]].onednn_inference
    torch.backends.mkldnn.enabled = onednn
    model.channels_last = onednn
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # The training rule: bf16 only where this machine computes it natively. PyTorch's native
    # CPU kernels (used instead of oneDNN's, see Architecture.onednn_inference) gain nothing
    # from it.
    model.precision, why = choose_precision("auto", device)
    if device.type == "cpu" and not onednn:
        model.precision, why = "fp32", "native CPU kernels (oneDNN off for this network)"
    print(f"serving {meta['architecture']} on {device} in {model.precision} ({why})", flush=True)
    return model.to(device).eval()


def _media_type(header: str | None) -> str:
    """'application/json; charset=utf-8' → 'application/json'."""
    return (header or "").split(";")[0].strip().lower()


def input_fn(request_body: bytes | str, content_type: str) -> torch.Tensor:
    """Request body → float32 tensor N x 3 x 32 x 32 in [0, 1].

    ``application/x-npy``: ``numpy.save`` bytes, loaded without pickles; float16/32/64 pixels
    are taken as [0, 1], uint8 pixels as 0..255. ``application/json``: nested lists (or
    ``{"instances": [...]}``) of float pixels in [0, 1]. A single 3 x 32 x 32 image is taken as
    a batch of one.
    """
    media = _media_type(content_type)
    if isinstance(request_body, str):  # the SageMaker toolkit decodes JSON bodies to text
        request_body = request_body.encode()
    if media not in SUPPORTED_TYPES:
        raise UnsupportedMediaType(
            f"content type {content_type!r} is not supported; use one of {list(SUPPORTED_TYPES)}"
        )
    try:
        return _to_batch(_read_npy(request_body) if media == NPY else _read_json(request_body))
    except InferenceError:
        raise
    except (ValueError, TypeError, OverflowError, IndexError) as e:
        # Every byte of the body is the client's: whatever a check above missed and numpy
        # or torch then refuse is still a malformed payload (400), never a server error.
        raise InvalidPayload(f"malformed payload: {type(e).__name__}: {e}") from e


def _read_json(body: bytes) -> np.ndarray:
    try:
        decoded = json.loads(body)
        if isinstance(decoded, dict):
            decoded = decoded["instances"]
        return np.asarray(decoded, dtype=np.float32)
    except Exception as e:
        raise InvalidPayload(
            f"body is not a JSON array of numbers (or {{\"instances\": [...]}}): {e}"
        ) from e


# The header numpy.save writes for plain arrays. Matching it directly costs a tenth of numpy's
# own header parser (ast.literal_eval), which stays the fallback for any other header.
_NPY_HEADER = re.compile(
    rb"\x93NUMPY\x01\x00..\{'descr': '([<>|=]?[a-zA-Z]\d*)', 'fortran_order': (False|True), "
    rb"'shape': \((\d+(?:, \d+)*)?,?\), \} *\n", re.DOTALL)


# The .npy versions numpy reads (3.0 differs from 2.0 only in a header's non-ASCII text).
_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0,
                   (2, 0): np.lib.format.read_array_header_2_0,
                   (3, 0): np.lib.format.read_array_header_2_0}


def _npy_header(body: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran order, dtype, offset of the data) of a .npy body."""
    match = _NPY_HEADER.match(body)
    # The fast path trusts the header's text only where its declared length agrees (as
    # numpy's parser, which reads exactly that many bytes, would).
    if match and 10 + int.from_bytes(body[8:10], "little") == match.end():
        shape = tuple(int(n) for n in match.group(3).split(b", ")) if match.group(3) else ()
        return shape, match.group(2) == b"True", np.dtype(match.group(1).decode()), match.end()
    buffer = io.BytesIO(body)
    version = np.lib.format.read_magic(buffer)
    if version not in _HEADER_READERS:  # read_magic takes any version numbers
        raise ValueError(f"unsupported .npy format version {version}")
    shape, fortran_order, dtype = _HEADER_READERS[version](buffer)
    return shape, fortran_order, dtype, buffer.tell()


def _read_npy(body: bytes) -> np.ndarray:
    """Parses a .npy body without pickles, checking the header (dtype, shape, length) before
    touching the array data, which is then viewed in place rather than copied."""
    try:
        shape, fortran_order, dtype, offset = _npy_header(body)
    except Exception as e:
        raise InvalidPayload(f"body is not a valid .npy array: {e}") from e
    if dtype.hasobject:
        raise InvalidPayload("the .npy array holds pickled Python objects, which are refused")
    _check_dtype(dtype)
    _check_shape(shape)
    expected = math.prod(shape) * dtype.itemsize
    data = memoryview(body)[offset:]
    if len(data) < expected:
        raise InvalidPayload(f".npy body is truncated: {len(data)} of {expected} data bytes")
    array = np.frombuffer(data[:expected], dtype=dtype)
    return array.reshape(shape, order="F" if fortran_order else "C")


def _check_dtype(dtype: np.dtype) -> None:
    """Plain float or uint8 pixels only, refused before any data is read: zero-size ('|V0',
    '<U0'), structured, sub-array and every other dtype would otherwise reach numpy calls
    that raise on them (frombuffer of an itemsize-0 type) or reinterpret the data."""
    plain = dtype.fields is None and dtype.subdtype is None and dtype.itemsize > 0
    if not plain or not (dtype.kind == "f" or dtype == np.uint8):
        raise InvalidPayload(
            f"expected float pixels in [0, 1] or uint8 pixels, got dtype {dtype} ({dtype.str})"
        )


def _check_shape(shape: tuple[int, ...]) -> None:
    if len(shape) == 3:
        shape = (1, *shape)
    if len(shape) != 4 or tuple(shape[1:]) != IMAGE_SHAPE or shape[0] == 0:
        raise InvalidPayload(f"expected images shaped N x 3 x 32 x 32 (N >= 1), got {shape}")


def _check_count(images: int) -> None:
    """Checked once the body is known to hold them: a header that claims more images than
    its data holds is malformed (400), not too large."""
    limit = max_images()
    if images > limit:
        raise TooManyImages(f"{images} images in one request is over the limit of {limit} "
                            f"({MAX_IMAGES_VARIABLE}); send them in several requests")


def max_images() -> int:
    """The images-per-request limit: the environment's, else the default."""
    value = os.environ.get(MAX_IMAGES_VARIABLE, "")
    return int(value) if value.isdigit() and int(value) > 0 else DEFAULT_MAX_IMAGES


def _to_batch(array: np.ndarray) -> torch.Tensor:
    _check_shape(tuple(array.shape))
    if array.ndim == 3:
        array = array[None]
    _check_count(len(array))
    if array.dtype == np.uint8:
        return torch.from_numpy(array.astype(np.float32) / 255)
    if array.dtype.kind != "f":
        raise InvalidPayload(
            f"expected float pixels in [0, 1] or uint8 pixels, got dtype {array.dtype}"
        )
    with np.errstate(over="ignore", invalid="ignore"):  # out of float32's range: inf, refused
        array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise InvalidPayload("images contain NaN or infinite values")
    return torch.from_numpy(array)


def predict_fn(input_data: torch.Tensor, model: Classifier) -> np.ndarray:
    """Logits N x 10, computed in eval mode without gradients."""
    if model.training:
        model.eval()
    device = model.mean.device  # next(model.parameters()) would walk every submodule
    # no_grad rather than inference_mode: entering inference_mode costs a sizeable share of
    # a small request's whole forward pass.
    with torch.no_grad():
        if model.precision == "bf16":
            with torch.autocast(device.type, dtype=torch.bfloat16):
                return model(input_data.to(device)).float().cpu().numpy()
        return model(input_data.to(device)).float().cpu().numpy()


def output_fn(prediction: np.ndarray, accept: str | None) -> tuple[bytes, str]:
    """Encodes the logits in the first supported type listed in ``Accept`` (default JSON)."""
    for media in (accept or JSON).split(","):
        media = _media_type(media)
        if media in ("*/*", "application/*", "", JSON):
            return json.dumps(prediction.tolist()).encode(), JSON
        if media == NPY:
            buffer = io.BytesIO()
            np.save(buffer, prediction.astype(np.float32), allow_pickle=False)
            return buffer.getvalue(), NPY
    raise NotAcceptable(f"cannot answer in {accept!r}; accepted: {list(SUPPORTED_TYPES)}")


