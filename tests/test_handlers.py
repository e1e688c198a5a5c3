"""The inference handlers: wire formats in and out, and the errors bad payloads raise."""

from __future__ import annotations

import io
import json
import pickle
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.support.npy_crafting import crafted_npy, crafted_npy_cases
from tests.support.payloads import npy
from tests.support.pipeline import MODEL_SRC

sys.path.insert(0, str(MODEL_SRC))  # model_src's modules import each other flat
import contract
import inference
import networks
import train

sys.path.remove(str(MODEL_SRC))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A freshly initialised tutorial model saved the way training saves it."""
    directory = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    model = networks.build_model("tutorial", [0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    train.save_model(model, directory, "tutorial", {}, [0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    return directory


@pytest.fixture(scope="module")
def model(model_dir):
    return inference.model_fn(str(model_dir))


IMAGES = np.random.default_rng(0).random((4, 3, 32, 32), dtype=np.float32)


def test_npy_round_trip(model):
    batch = inference.input_fn(npy(IMAGES), "application/x-npy")
    assert batch.dtype == torch.float32 and batch.shape == (4, 3, 32, 32)
    logits = inference.predict_fn(batch, model)
    body, content_type = inference.output_fn(logits, "application/x-npy")
    assert content_type == "application/x-npy"
    decoded = np.load(io.BytesIO(body), allow_pickle=False)
    assert decoded.shape == (4, 10) and decoded.dtype == np.float32
    np.testing.assert_allclose(decoded, logits)


def test_json_round_trip_matches_npy(model):
    via_npy = inference.predict_fn(inference.input_fn(npy(IMAGES), "application/x-npy"), model)
    # The SageMaker toolkit hands JSON bodies over as text.
    batch = inference.input_fn(json.dumps(IMAGES.tolist()), "application/json; charset=utf-8")
    logits = inference.predict_fn(batch, model)
    body, content_type = inference.output_fn(logits, "application/json")
    assert content_type == "application/json"
    np.testing.assert_allclose(np.array(json.loads(body)), via_npy, rtol=1e-5, atol=1e-5)
    wrapped = inference.input_fn(json.dumps({"instances": IMAGES.tolist()}), "application/json")
    assert torch.equal(wrapped, batch)


def test_uint8_pixels_and_single_images(model):
    pixels = (IMAGES * 255).round().astype(np.uint8)
    batch = inference.input_fn(npy(pixels), "application/x-npy")
    np.testing.assert_allclose(batch.numpy(), pixels / 255, atol=1e-6)
    single = inference.input_fn(npy(IMAGES[0]), "application/x-npy")
    assert single.shape == (1, 3, 32, 32)
    float64 = inference.input_fn(npy(IMAGES.astype(np.float64)), "application/x-npy")
    assert float64.dtype == torch.float32


def test_predict_is_eval_mode_without_grad(model):
    model.train()
    logits = inference.predict_fn(torch.from_numpy(IMAGES), model)
    assert not model.training
    assert isinstance(logits, np.ndarray)
    again = inference.predict_fn(torch.from_numpy(IMAGES), model)
    np.testing.assert_array_equal(logits, again)


def test_served_predictions_match_the_seed_formulation(model_dir, model):
    """Serving folds the normalisation into conv1, runs NCHW, applies ReLU after pooling and
    calls the layers functionally; training runs channels-last. Both must agree with the
    seed's network computed here from the saved weights: normalise, pool(relu(conv)) twice,
    then the three linear layers."""
    images = torch.from_numpy(IMAGES)
    assert not model.channels_last  # tutorial serving uses PyTorch's native kernels
    assert not model.normalise  # model_fn folded the normalisation into conv1
    served = inference.predict_fn(images, model)
    model.channels_last = True
    try:
        channels_last = inference.predict_fn(images, model)
    finally:
        model.channels_last = False
    state = torch.load(model_dir / contract.WEIGHTS_FILE, weights_only=True)
    w = {name.removeprefix("body."): tensor for name, tensor in state.items()}
    meta = json.loads((model_dir / contract.META_FILE).read_text())
    x = (images - torch.tensor(meta["mean"]).view(1, 3, 1, 1)) / torch.tensor(
        meta["std"]).view(1, 3, 1, 1)
    x = F.max_pool2d(F.relu(F.conv2d(x, w["conv1.weight"], w["conv1.bias"])), 2)
    x = F.max_pool2d(F.relu(F.conv2d(x, w["conv2.weight"], w["conv2.bias"])), 2).flatten(1)
    x = F.relu(F.linear(x, w["fc1.weight"], w["fc1.bias"]))
    x = F.relu(F.linear(x, w["fc2.weight"], w["fc2.bias"]))
    seed = F.linear(x, w["fc3.weight"], w["fc3.bias"]).numpy()
    np.testing.assert_allclose(served, channels_last, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(served, seed, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("architecture", ["tutorial", "airbench"])
def test_folding_the_normalisation_keeps_the_logits(architecture):
    torch.manual_seed(0)
    model = networks.build_model(architecture, [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]).eval()
    images = torch.from_numpy(IMAGES)
    with torch.no_grad():
        before = model(images)
        model.fold_normalisation()
        after = model(images)
    assert not model.normalise
    # Relative to the logits' own size: an untrained airbench answers within 1e-4 of zero, so
    # a fixed atol would accept any answer near zero.
    scale = before.abs().max()
    assert scale > 0
    assert (after - before).abs().max() <= 1e-3 * scale


@pytest.mark.parametrize("level", [1, 2])
def test_test_time_augmentation_averages_its_views(level):
    """The Classifier's test-time augmentation, all views in one batch, gives the weighted
    average of the views' logits one by one: the image and its mirror image (level 1), and
    also both shifted one pixel up-left and down-right with reflected borders (level 2)."""
    torch.manual_seed(0)
    model = networks.build_model("airbench", [0.49, 0.48, 0.45], [0.25, 0.24, 0.26],
                                 {"widths": [8, 16, 16], "tta_level": level}).eval()
    images = torch.from_numpy(IMAGES)
    padded = F.pad(images, (1, 1, 1, 1), mode="reflect")
    views = [images, images.flip(-1)]
    weights = [0.5, 0.5]
    if level == 2:
        up_left, down_right = padded[..., :32, :32], padded[..., 2:, 2:]
        assert torch.equal(up_left[..., 1:, 1:], images[..., :31, :31])  # shifted, really
        views += [up_left, up_left.flip(-1), down_right, down_right.flip(-1)]
        weights = [0.25, 0.25] + [0.125] * 4
    with torch.no_grad():
        model.tta_level = 0
        one_by_one = sum(w * model(v) for w, v in zip(weights, views, strict=True))
        model.tta_level = level
        batched = model(images)
    scale = one_by_one.abs().max()
    assert (batched - one_by_one).abs().max() <= 1e-4 * scale


def test_airbench_models_saved_before_their_options_still_serve(tmp_path):
    """model_meta.json of airbench models trained before the network's options were recorded
    has no "network": such a model is built as it was trained (32/64/128 channels,
    PyTorch's BatchNorm epsilon, mirror averaging), loads its weights and answers."""
    torch.manual_seed(0)
    legacy = networks.LEGACY_OPTIONS["airbench"]
    model = networks.build_model("airbench", [0.5] * 3, [0.25] * 3, legacy)
    train.save_model(model, tmp_path, "airbench", {}, [0.5] * 3, [0.25] * 3)
    meta = json.loads((tmp_path / contract.META_FILE).read_text())
    del meta["network"]
    (tmp_path / contract.META_FILE).write_text(json.dumps(meta))
    served = inference.model_fn(str(tmp_path))
    assert served.tta_level == 1 and served.body.head.in_features == 128
    assert served.body.blocks[0][2].eps == 1e-5
    with torch.no_grad():
        expected = model.eval()(torch.from_numpy(IMAGES))
        answer = served(torch.from_numpy(IMAGES))
    assert (answer - expected).abs().max() <= 1e-3 * expected.abs().max()


def test_folding_refuses_a_padded_input_convolution():
    model = networks.build_model("tutorial", [0.5] * 3, [0.25] * 3)
    model.body.conv1.padding = (1, 1)
    with pytest.raises(ValueError, match="unpadded"):
        model.fold_normalisation()


@pytest.mark.parametrize("accept, expected", [
    (None, "application/json"),
    ("*/*", "application/json"),
    ("application/x-npy, application/json", "application/x-npy"),
    ("text/csv, application/json;q=0.9", "application/json"),
])
def test_accept_negotiation(accept, expected):
    _, content_type = inference.output_fn(np.zeros((1, 10), np.float32), accept)
    assert content_type == expected


def test_unanswerable_accept_is_406():
    with pytest.raises(inference.NotAcceptable) as err:
        inference.output_fn(np.zeros((1, 10), np.float32), "text/csv")
    assert err.value.status_code == 406


@pytest.mark.parametrize("body, content_type, message", [
    (npy(IMAGES), "text/csv", "not supported"),
    (npy(IMAGES), "", "not supported"),
    (b"\x00garbage", "application/x-npy", "not a valid .npy"),
    (npy(np.array([{"a": 1}], dtype=object), allow_pickle=True), "application/x-npy",
     "pickled Python objects"),
    (npy(np.zeros((2, 32, 32, 3), np.float32)), "application/x-npy", "N x 3 x 32 x 32"),
    (npy(np.zeros((0, 3, 32, 32), np.float32)), "application/x-npy", "N >= 1"),
    (npy(np.zeros((1, 3, 32, 32), np.int64)), "application/x-npy", "dtype int64"),
    (npy(np.zeros((1, 3, 32, 32), np.complex64)), "application/x-npy", "dtype complex64"),
    (npy(np.full((1, 3, 32, 32), np.nan, np.float32)), "application/x-npy", "NaN or infinite"),
    (npy(np.full((1, 3, 32, 32), np.inf, np.float32)), "application/x-npy", "NaN or infinite"),
    (b"{not json", "application/json", "not a JSON array"),
    (b'{"wrong": []}', "application/json", "not a JSON array"),
    (b'[["a"]]', "application/json", "not a JSON array"),
    (b"[[1, 2], [3]]", "application/json", "not a JSON array"),
    (json.dumps([[1.0] * 10]).encode(), "application/json", "N x 3 x 32 x 32"),
])
def test_bad_payloads_raise_clear_errors(body, content_type, message):
    with pytest.raises(inference.InferenceError) as err:
        inference.input_fn(body, content_type)
    assert message in str(err.value)
    assert err.value.status_code == (415 if "not supported" in message else 400)


def test_pickled_npy_payload_never_runs_code(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    body = npy(np.array([Exploit()], dtype=object), allow_pickle=True)
    with pytest.raises(inference.InvalidPayload):
        inference.input_fn(body, "application/x-npy")
    assert not (tmp_path / "pwned").exists()


# torch warns that the hand-made pickle uses protocol 4; the pickle is the point here.
@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_model_fn_refuses_pickled_code_in_weights(tmp_path, model_dir):
    """weights_only=True: a model.pth that smuggles a callable is rejected, not executed."""
    import shutil

    tampered = tmp_path / "model"
    shutil.copytree(model_dir, tampered)

    class Exploit:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    with open(tampered / "model.pth", "wb") as f:
        pickle.dump({"weights": Exploit()}, f)
    with pytest.raises(pickle.UnpicklingError):
        inference.model_fn(str(tampered))
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("array", [
    np.zeros((1, 3, 32, 32), np.float32), np.ones((5, 3, 32, 32), np.float64),
    np.arange(3 * 32 * 32, dtype=np.uint8).reshape(3, 32, 32),
    np.asfortranarray(np.random.default_rng(0).random((2, 3, 32, 32)).astype(np.float16)),
    np.zeros((0, 3, 32, 32), ">f4"), np.zeros((), np.float32),
])
def test_fast_npy_header_parser_agrees_with_numpy(array):
    body = npy(array)
    buffer = io.BytesIO(body)
    np.lib.format.read_magic(buffer)
    expected = np.lib.format.read_array_header_1_0(buffer)
    assert inference._NPY_HEADER.match(body), "numpy's own header should take the fast path"
    shape, fortran_order, dtype, offset = inference._npy_header(body)
    assert (shape, fortran_order, dtype) == expected and offset == buffer.tell()


def test_unusual_npy_headers_fall_back_to_numpys_parser():
    body = npy(np.zeros((1, 3, 32, 32), np.float32))
    header_end = body.index(b"\n") + 1
    # Same header, keys in another order (valid .npy; not numpy's own spelling).
    reordered = (b"{'shape': (1, 3, 32, 32), 'fortran_order': False, 'descr': '<f4', }"
                 .ljust(header_end - 10 - 1) + b"\n")
    body2 = body[:10] + reordered + body[header_end:]
    assert not inference._NPY_HEADER.match(body2)
    assert inference.input_fn(body2, "application/x-npy").shape == (1, 3, 32, 32)


# -- crafted .npy headers: every malformed one is a 400 (or 413), never a server error --------

NPY = "application/x-npy"
@pytest.mark.parametrize("descr, shape, kwargs", [
    ("|V0", (1, 3, 32, 32), {}),  # zero-size dtype: answered 500 before
    ("|V0", (2**62, 3, 32, 32), {}),
    ("|V8", (1, 3, 32, 32), {}),
    ("<U0", (1, 3, 32, 32), {}),
    ("|S0", (1, 3, 32, 32), {}),
    ([("r", "|u1"), ("g", "|u1"), ("b", "|u1")], (1, 3, 32, 32), {}),
    ([("", "|V0")], (1, 3, 32, 32), {}),
    ("<f4", (2**62, 3, 32, 32), {}),
    ("<f4", (10**30, 3, 32, 32), {}),
    ("<f4", (0, 3, 32, 32), {}),
    ("<f4", (1, 0, 32, 32), {}),
    ("<f4", (1, 3, 32, 32), {"length_delta": 1}),
    ("<f4", (1, 3, 32, 32), {"length_delta": -100}),  # cuts into the dict
    ("<f4", (1, 3, 32, 32), {"length_delta": 10**6}),
    ("<f4", (1, 3, 32, 32), {"data": b""}),
    ("<f4", (1, 3, 32, 32), {"fortran": "yes"}),
    ("<f4", (1, 3, 32, 32), {"version": (9, 9)}),
], ids=lambda v: repr(v)[:40])
def test_crafted_npy_headers_are_400(descr, shape, kwargs):
    with pytest.raises(inference.InvalidPayload) as err:
        inference.input_fn(crafted_npy(descr, shape, **kwargs), NPY)
    assert err.value.status_code == 400


def test_too_many_images_is_413_with_the_limit(monkeypatch):
    body = npy(np.zeros((1025, 3, 32, 32), np.uint8))
    with pytest.raises(inference.TooManyImages) as err:
        inference.input_fn(body, NPY)
    assert err.value.status_code == 413 and "limit of 1024" in str(err.value)
    monkeypatch.setenv(inference.MAX_IMAGES_VARIABLE, "2000")
    assert inference.input_fn(body, NPY).shape == (1025, 3, 32, 32)


# numpy's header parser warns about headers that look as if Python 2 wrote them.
@pytest.mark.filterwarnings("ignore:Reading `.npy` or `.npz` file required:UserWarning")
def test_fuzzed_npy_headers_are_refused_with_4xx_or_read_as_numpy_reads_them():
    """The property: for any header, input_fn either refuses it with InvalidPayload (400) or
    TooManyImages (413), or returns exactly the pixels numpy's own reader finds in the body;
    never another exception (which the server answers 500)."""
    accepted, refused = 0, 0
    for description, body in crafted_npy_cases(np.random.default_rng(20260323), 3000):
        try:
            batch = inference.input_fn(body, NPY)
        except inference.InferenceError as e:
            assert e.status_code in (400, 413), description
            refused += 1
            continue
        except Exception as e:  # what the server would answer 500
            pytest.fail(f"{description}: {type(e).__name__}: {e}")
        expected = np.load(io.BytesIO(body), allow_pickle=False).reshape(-1, 3, 32, 32)
        if expected.dtype == np.uint8:
            expected = expected.astype(np.float32) / 255
        np.testing.assert_array_equal(batch.numpy(), expected.astype(np.float32), description)
        accepted += 1
    assert accepted > 200 and refused > 2000, (accepted, refused)
