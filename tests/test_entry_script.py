"""The SageMaker entry script, run the way SageMaker runs it: a subprocess with the SageMaker
environment and ``--key value`` hyperparameters."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.support.pipeline import (
    ENTRY_SCRIPT,
    MODEL_SRC,
    import_handlers,
    run_entry_script,
    sagemaker_env,
)

sys.path.insert(0, str(MODEL_SRC))  # model_src's modules import each other flat
import hardware
import networks
import train

sys.path.remove(str(MODEL_SRC))

pytestmark = pytest.mark.long_running


def train_and_read_metrics(root: Path, data_dir: Path, args: list[str]):
    """Runs a training that must succeed, with /opt/ml at ``root``: its result and metrics."""
    result = run_entry_script(args, sagemaker_env(root, data_dir), root)
    assert result.returncode == 0, result.stderr
    return result, json.loads((root / "output/data/metrics.json").read_text())


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cifar_dir):
    """One tutorial-network training run, shared by the tests below."""
    root = tmp_path_factory.mktemp("opt_ml")
    env = sagemaker_env(root, cifar_dir.parent)
    result = run_entry_script(["--epochs", "2", "--batch-size", "16", "--lr", "0.02"], env, root)
    return root, result


def test_training_produces_a_hostable_model(trained, cifar_dir):
    root, result = trained
    assert result.returncode == 0, result.stderr
    model_dir = root / "model"
    assert (model_dir / "model.pth").is_file()
    meta = json.loads((model_dir / "model_meta.json").read_text())
    assert meta["architecture"] == "tutorial"
    assert meta["classes"][:2] == ["plane", "car"]
    assert len(meta["mean"]) == len(meta["std"]) == 3
    # The inference code travels inside the artifact and loads the model by itself.
    handlers = import_handlers(model_dir / "code")
    model = handlers.model_fn(str(model_dir))
    assert not model.training
    if not torch.cuda.is_available():
        assert model.precision == "fp32"  # served by PyTorch's native CPU kernels, not oneDNN's
    import pickle

    with open(cifar_dir / "test_batch", "rb") as f:
        test = pickle.load(f, encoding="bytes")
    images = test[b"data"].reshape(-1, 3, 32, 32).astype(np.float32) / 255
    logits = handlers.predict_fn(handlers.input_fn(_npy(images), "application/x-npy"), model)
    assert logits.shape == (len(images), 10)
    accuracy = (logits.argmax(1) == np.array(test[b"labels"])).mean()
    assert accuracy > 0.5  # the generated classes are easy; chance is 0.1


def test_metrics_are_scrapable_and_saved(trained):
    root, result = trained
    # SageMaker metric definitions scrape name=value; pairs from the log.
    losses = re.findall(r"train_loss=([0-9.]+);", result.stdout)
    assert len(losses) == 2
    assert re.search(r"test_accuracy=([0-9.]+);", result.stdout)
    metrics = json.loads((root / "output/data/metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert metrics["history"][1]["train_loss"] < metrics["history"][0]["train_loss"]
    assert 0.5 < metrics["test_accuracy"] <= 1.0
    assert metrics["batch_size"] == 16 and metrics["lr"] == 0.02


def test_fractional_epochs_end_the_last_pass_early(tmp_path, cifar_dir):
    """--epochs 1.5 trains one full pass, then half of a second (in whole batches)."""
    result, metrics = train_and_read_metrics(
        tmp_path, cifar_dir, ["--epochs", "1.5", "--batch-size", "16", "--lr", "0.02"])
    # 500 training images: 32 steps per pass, 48 in all, so the second pass stops after 16.
    assert metrics["epochs"] == 1.5
    assert [(h["epoch"], h["images"]) for h in metrics["history"]] == [(1, 500), (2, 256)]
    assert len(re.findall(r"^epoch=\d+; images=\d+;", result.stdout, re.M)) == 2
    # The fit task's progress bar follows this log: the plan line, then one line per epoch.
    from tasks.training import TrainingProgress

    progress = TrainingProgress()
    updates = [u for line in result.stdout.splitlines() if (u := progress.read(line))]
    assert [(round(percent, 1), text.split(", train loss")[0]) for percent, text in updates] == [
        (66.7, "epoch 1, step 32/48"), (100.0, "epoch 2, step 48/48")]


def parse_in_process(argv: list[str], environment: dict[str, str], monkeypatch,
                     capsys) -> tuple[int, str, str]:
    """The entry script's argument parsing as its process would run it, in this one (the
    script exits before training: a process of its own would only add importing torch):
    its exit status, stdout and stderr, under exactly ``environment``."""
    for name in os.environ.keys() - environment.keys():
        monkeypatch.delenv(name)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exit:
        train.parse_args(argv)
    out, err = capsys.readouterr()
    return exit.value.code, out, err


@pytest.mark.parametrize("epochs", ["0", "-1", "inf", "nan"])
def test_epochs_must_be_positive_and_finite(tmp_path, cifar_dir, epochs, monkeypatch, capsys):
    returncode, _, stderr = parse_in_process(
        ["--epochs", epochs], sagemaker_env(tmp_path, cifar_dir), monkeypatch, capsys)
    assert returncode == 2
    assert "--epochs must be > 0" in stderr


def native_bf16_as_torch_reports() -> bool:
    """Whether this CPU computes bf16 natively, from torch's own reports (cpuinfo's instruction
    flags and oneDNN's bf16 support), independently of the entry script's rule."""
    if platform.system() == "Darwin":
        return False
    if platform.machine().lower() in ("aarch64", "arm64"):  # cpuinfo's Arm BF16 flag
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    flags = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return bool(flags and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def test_auto_precision_is_what_this_machine_supports_natively(trained):
    """The default (auto) run in CI: bf16 only where torch reports native bf16."""
    root, result = trained
    metrics = json.loads((root / "output/data/metrics.json").read_text())
    expected = "bf16" if native_bf16_as_torch_reports() else "fp32"
    assert metrics["precision"] == expected, metrics["precision_reason"]
    plan = re.search(r"^precision=(\w+); \((.+)\)$", result.stdout, re.MULTILINE)
    assert plan and plan.group(1) == expected and plan.group(2) == metrics["precision_reason"]
    # "cpu: native bf16 (AVX512-BF16)" or "cpu: no native bf16 (AVX2)"
    assert plan.group(2).startswith("cpu: native bf16" if expected == "bf16"
                                    else "cpu: no native bf16")


def test_fp32_path_trains_as_well(tmp_path, cifar_dir):
    """The path every CPU without native bf16 takes, whatever this machine has."""
    result, metrics = train_and_read_metrics(
        tmp_path, cifar_dir, ["--epochs", "2", "--batch-size", "16", "--lr", "0.02",
                              "--precision", "fp32"])
    assert metrics["precision"] == "fp32"
    assert "precision=fp32; (--precision fp32)" in result.stdout
    assert 0.5 < metrics["test_accuracy"] <= 1.0


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="ONEDNN_MAX_CPU_ISA names x86 instruction sets")
@pytest.mark.parametrize("isa", ["AVX2", "AVX512_CORE"])
def test_auto_takes_fp32_where_onednn_would_emulate_bf16(tmp_path, isa):
    """ONEDNN_MAX_CPU_ISA caps oneDNN at an AVX2 laptop's or an ml.m5's instruction set: no
    native bf16 there, so auto must pick fp32 (bf16 runs several times slower emulated)."""
    probe = (f"import sys; sys.path.insert(0, {str(ENTRY_SCRIPT.parent)!r}); import torch; "
             "from hardware import choose_precision; "
             "print(*choose_precision('auto', torch.device('cpu')), sep='|')")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": isa}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == f"fp32|cpu: no native bf16 (oneDNN limited to {isa} by ONEDNN_MAX_CPU_ISA)"


def test_precision_rule_on_reported_capabilities(monkeypatch):
    """The rule itself, on the capabilities torch could report (CPU flags, CUDA devices)."""
    cpu = torch.device("cpu")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(hardware.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(hardware.platform, "system", lambda: "Linux")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    for avx512_bf16, amx, expected in [(False, False, "fp32"), (True, False, "bf16"),
                                       (False, True, "bf16")]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert hardware.choose_precision("auto", cpu)[0] == expected
    # oneDNN without bf16 support at all (an AVX2 CPU): fp32 whatever the flags say.
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert hardware.choose_precision("auto", cpu)[0] == "fp32"
    # Asked for explicitly, either precision is used as asked.
    assert hardware.choose_precision("bf16", cpu) == ("bf16", "--precision bf16")
    assert hardware.choose_precision("fp32", cpu) == ("fp32", "--precision fp32")
    # CUDA: bf16 where the device has it natively (Ampere and later), fp32 on older GPUs.
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert hardware.choose_precision("auto", gpu) == ("fp32", "cuda: Tesla T4 has no native bf16")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert hardware.choose_precision("auto", gpu)[0] == "bf16"


def test_stronger_preset_trains(tmp_path, cifar_dir):
    result, metrics = train_and_read_metrics(
        tmp_path, cifar_dir, ["--model", "airbench", "--epochs", "2", "--batch-size", "128"])
    assert metrics["model"] == "airbench" and len(metrics["history"]) == 2
    # No GPU here: the preset picks its CPU recipe, and the plan line says which and why.
    assert metrics["recipe"] == "airbench-cpu"
    assert "recipe=airbench-cpu; (cpu: no GPU" in result.stdout
    handlers = import_handlers(tmp_path / "model" / "code")
    model = handlers.model_fn(str(tmp_path / "model"))
    meta = json.loads((tmp_path / "model" / "model_meta.json").read_text())
    assert meta["network"] == train.RECIPES["airbench"]["cpu"].network
    assert model.tta_level == 2  # mirror and translate
    # Serving follows the training rule on this machine (this network runs on oneDNN).
    assert model.precision == ("bf16" if native_bf16_as_torch_reports() else "fp32")
    # The whitening stem is set from the data in +/- pairs and stays frozen during training.
    stem = model.body.stem.weight
    torch.testing.assert_close(stem[:12], -stem[12:])


def test_gpu_recipe_runs_on_the_cpu(tmp_path, cifar_dir):
    """airbench94's recipe, forced onto the CPU with the same functions the GPU runs (its
    network, Lookahead, alternating flips, the whitening bias frozen after 3 epochs, 6-view
    test-time augmentation), for a few steps: so that it cannot rot where no GPU is lent.
    In fp32: fp16 on a CPU is emulated, some 20 times slower (its loss scale is checked
    below). On 128 training images: the network is airbench94's, four times the CPU's."""
    from bench.generated_data import make_cifar_dir

    small = make_cifar_dir(tmp_path / "data", train_batches=1, per_batch=128, test=20)
    result, metrics = train_and_read_metrics(tmp_path / "opt_ml", small.parent, [
        "--model", "airbench", "--recipe", "cuda", "--precision", "fp32", "--epochs", "3.5",
        "--batch-size", "32"])
    tmp_path = tmp_path / "opt_ml"
    assert metrics["recipe"] == "airbench94" and metrics["precision"] == "fp32"
    assert "recipe=airbench94; (--recipe cuda: airbench94's recipe" in result.stdout
    assert metrics["history"][-1]["steps"] == 14  # 4 steps of 32 an epoch
    losses = [epoch["train_loss"] for epoch in metrics["history"]]
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0]
    state = torch.load(tmp_path / "model" / "model.pth", weights_only=True)
    assert state["body.blocks.2.4.weight"].shape[0] == 256  # airbench94's widths
    meta = json.loads((tmp_path / "model" / "model_meta.json").read_text())
    assert meta["network"] == {"widths": [64, 256, 256], "tta_level": 2}


def test_fp16_loss_scale_is_divided_out():
    """In fp16 the loss is scaled by the batch size before the backward pass (so that small
    gradients do not underflow) and the optimiser divides the scale out: the step is the
    unscaled one."""
    torch.manual_seed(0)
    steps = []
    for scale in (1.0, 256.0):
        torch.manual_seed(0)
        model = networks.build_model("airbench", [0.5] * 3, [0.25] * 3, {"widths": [8, 16, 16]})
        optimizer = train.SGD(train.parameter_groups(model, train.RECIPES["airbench"]["cuda"]),
                              0.85, nesterov=True)
        x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
        for _ in range(2):
            (torch.nn.functional.cross_entropy(model(x), y) * scale).backward()
            optimizer.step(0.1, grad_scale=scale)
        steps.append([p.detach().clone() for p in model.parameters()])
    for unscaled, scaled in zip(*steps, strict=True):
        torch.testing.assert_close(scaled, unscaled, rtol=1e-4, atol=1e-6)


def test_recipes_are_chosen_by_hardware(monkeypatch):
    """The same --model gives the GPU recipe on CUDA and the CPU recipe elsewhere, says why,
    and --recipe forces either. airbench94 trains in fp16 on any GPU (bf16 is Ampere and
    later); the tutorial recipe keeps the hardware rule there."""
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    recipe, why = train.choose_recipe("airbench", "auto", gpu)
    assert recipe.name == "airbench94" and why.startswith("cuda: airbench94's recipe")
    recipe, why = train.choose_recipe("airbench", "auto", cpu)
    assert recipe.name == "airbench-cpu" and why.startswith("cpu: no GPU")
    assert train.choose_recipe("airbench", "cpu", gpu)[0].name == "airbench-cpu"
    assert train.choose_recipe("tutorial", "cuda", cpu)[0].name == "tutorial"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    airbench94, tutorial = train.RECIPES["airbench"]["cuda"], train.RECIPES["tutorial"]["any"]
    assert train.training_precision("auto", airbench94, gpu)[0] == "fp16"
    assert train.training_precision("fp32", airbench94, gpu)[0] == "fp32"
    assert train.training_precision("auto", tutorial, gpu)[0] == "fp32"
    assert train.training_precision("auto", airbench94, cpu) == \
        hardware.choose_precision("auto", cpu)
    # fp16 forced onto a CPU is honoured, and the plan line says what it costs there.
    assert "emulates fp16" in train.training_precision("fp16", airbench94, cpu)[1]


def test_airbench_hyperparameters_convert_exactly():
    """airbench's decoupled lr and weight decay (per 1024 summed examples) become the same
    step on a mean loss: lr x weight decay per step is airbench's, whatever the batch."""
    momentum, kilostep = 0.85, 1024 * (1 + 1 / (1 - 0.85))
    for batch in (1024, 128):
        sgd = train.airbench_sgd(lr=11.5, weight_decay=0.0153, momentum=momentum,
                                 batch_size=batch)
        # airbench: SGD(lr=11.5 / kilostep, weight_decay=0.0153 * batch / kilostep / lr) on a sum
        torch_lr = 11.5 / kilostep
        assert sgd["lr"] == pytest.approx(torch_lr * batch)
        assert sgd["lr"] * sgd["weight_decay"] == pytest.approx(0.0153 * batch / kilostep)


def test_lookahead_ends_on_its_average():
    """Lookahead pulls the weights to its average every few steps and hands the average over
    at the end; BatchNorm's running statistics are averaged too."""
    torch.manual_seed(0)
    model = networks.build_model("airbench", [0.5] * 3, [0.25] * 3, {"widths": [8, 16, 16]})
    lookahead = train.Lookahead(model)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for value in model.state_dict().values():
            if value.is_floating_point():
                value.add_(1.0)
    lookahead.update(model, decay=0.75)  # a quarter of the way to the new weights
    for name, value in model.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, start[name] + 0.25)
    assert train.Lookahead.decay_at(0, 100) == 0.0
    assert train.Lookahead.decay_at(100, 100) == pytest.approx(0.95 ** 5)


def test_missing_data_fails_with_reason(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    env = sagemaker_env(tmp_path, empty)
    result = run_entry_script(["--epochs", "1"], env, tmp_path)
    assert result.returncode != 0
    reason = (tmp_path / "output" / "failure").read_text()
    assert reason.startswith("FileNotFoundError: no CIFAR-10 batches")
    assert not (tmp_path / "model" / "model.pth").exists()


def test_failure_file_beside_model_dir_without_sagemaker(tmp_path, cifar_dir):
    corrupt = tmp_path / "data"
    corrupt.mkdir()
    (corrupt / "data_batch_1").write_bytes(b"not a pickle")
    (corrupt / "test_batch").write_bytes(b"not a pickle")
    env = {k: v for k, v in sagemaker_env(tmp_path, corrupt).items()
           if not k.startswith("SM_")}
    result = run_entry_script(["--data-dir", str(corrupt), "--model-dir",
                               str(tmp_path / "run" / "model")], env, tmp_path)
    assert result.returncode == 1
    reason = (tmp_path / "run" / "failure").read_text()
    assert "not a CIFAR-10 python batch file" in reason


def test_batch_files_cannot_run_code(tmp_path):
    """A tampered batch file with a pickled callable is refused, not executed."""
    import pickle

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    data = tmp_path / "data"
    data.mkdir()
    for name in ("data_batch_1", "test_batch"):
        (data / name).write_bytes(pickle.dumps({b"data": Exploit(), b"labels": [0]}))
    with pytest.raises(ValueError, match="refusing to load"):
        train.load_cifar10(data)
    assert not (tmp_path / "pwned").exists()


def test_help_runs_without_sagemaker_environment(monkeypatch, capsys):
    returncode, stdout, _ = parse_in_process(["--help"], {"PATH": "/usr/bin:/bin"},
                                             monkeypatch, capsys)
    assert returncode == 0
    for option in ("--epochs", "--batch-size", "--lr", "--momentum", "--model", "--seed",
                   "--workers", "--dist-backend", "--hosts", "--current-host", "--num-gpus"):
        assert option in stdout


def test_reads_any_well_formed_batch_directory(tmp_path):
    """Not only the official md5-identical files: the batch dir may sit one level down."""
    from bench.generated_data import make_cifar_dir

    batch_dir = make_cifar_dir(tmp_path / "nested", train_batches=3, per_batch=20, test=10)
    data = train.load_cifar10(batch_dir.parent)
    assert data["train_x"].shape == (60, 3, 32, 32) and data["train_x"].dtype == torch.uint8
    assert data["test_y"].shape == (10,) and data["test_y"].dtype == torch.int64


def _npy(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_hand_written_sgd_matches_torch_optim():
    """The entry script's SGD (written out to avoid torch.optim's import of torch._dynamo) makes
    exactly torch.optim.SGD's updates with airbench's two parameter groups (BatchNorm shifts
    at 64x the learning rate, a 64th of the weight decay). Both get the very same gradients
    (computed once), so the exact comparison rests on the update arithmetic alone, the same
    element-wise operations in the same order, and not on the forward and backward passes of
    two models giving identical bits. A frozen parameter stays as it is."""
    recipe = train.RECIPES["airbench"]["cuda"]
    for nesterov, decay in [(False, 0.0), (True, 5e-4)]:
        torch.manual_seed(0)
        ours = networks.build_model("airbench", [0.5] * 3, [0.25] * 3, {"widths": [8, 16, 16]})
        theirs = networks.build_model("airbench", [0.5] * 3, [0.25] * 3, {"widths": [8, 16, 16]})
        theirs.load_state_dict(ours.state_dict())
        groups = train.parameter_groups(ours, dataclasses.replace(recipe, weight_decay=decay))
        assert [len(params) for params, _, _ in groups] == [9, 6]  # 6 BatchNorm shifts
        mine = train.SGD(groups, 0.9, nesterov)
        mine.freeze(ours.body.stem.bias)
        by_id = dict(zip(map(id, ours.parameters()), theirs.parameters(), strict=True))
        reference = torch.optim.SGD(
            [{"params": [by_id[id(p)] for p in params if p is not ours.body.stem.bias],
              "lr": 0.05 * scale, "weight_decay": group_decay}
             for params, scale, group_decay in groups],
            lr=0.05, momentum=0.9, nesterov=nesterov)
        stem_bias = ours.body.stem.bias.detach().clone()
        for _ in range(3):
            x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
            torch.nn.functional.cross_entropy(ours(x), y).backward()
            for mine_param, their_param in zip(ours.parameters(), theirs.parameters(),
                                               strict=True):
                their_param.grad = None if mine_param.grad is None else mine_param.grad.clone()
            mine.step(0.05)
            reference.step()
            reference.zero_grad()
        for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert torch.equal(ours.body.stem.bias, stem_bias)


@pytest.mark.parametrize("architecture", ["tutorial", "airbench"])
def test_normalising_inside_the_input_conv_keeps_values_and_gradients(architecture):
    """The Classifier normalises by rescaling its input convolution's weights (cheaper than
    normalising every pixel); the logits and every parameter's gradient must equal those of
    the network run on normalised pixels."""
    torch.manual_seed(0)
    model = networks.build_model(architecture, [0.49, 0.48, 0.45], [0.25, 0.24, 0.26])
    model.body.requires_grad_(True)  # airbench's frozen stem too: its gradient is checked
    x, y = torch.rand(16, 3, 32, 32), torch.randint(0, 10, (16,))
    results = []
    for logits_of in (model, lambda x: model.body((x - model.mean) / model.std)):
        model.zero_grad()
        logits = logits_of(x)
        torch.nn.functional.cross_entropy(logits, y).backward()
        results.append((logits.detach(), [p.grad.clone() for p in model.parameters()]))
    (folded, folded_grads), (plain, plain_grads) = results
    torch.testing.assert_close(folded, plain, rtol=1e-4, atol=1e-5)
    for a, b in zip(folded_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_tutorial_channels_last_padding_keeps_values_and_gradients():
    """Training runs the tutorial network channels-last, where conv1 gets two zero filters
    (a faster max-pool); its outputs and gradients must equal the plain NCHW network's."""
    torch.manual_seed(0)
    net = networks.TutorialNet()
    x, y = torch.rand(16, 3, 32, 32), torch.randint(0, 10, (16,))
    results = []
    for layout in (torch.contiguous_format, torch.channels_last):
        net.zero_grad()
        logits = net(x.contiguous(memory_format=layout))
        torch.nn.functional.cross_entropy(logits, y).backward()
        results.append((logits.detach(), [p.grad.clone() for p in net.parameters()]))
    (plain, plain_grads), (padded, padded_grads) = results
    assert padded.shape == (16, 10)
    torch.testing.assert_close(padded, plain, rtol=1e-5, atol=1e-5)
    for a, b in zip(padded_grads, plain_grads, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def larger_data(tmp_path_factory) -> Path:
    """Enough images for an epoch to take a moment: a kill lands inside the training."""
    from bench.generated_data import make_cifar_dir

    return make_cifar_dir(tmp_path_factory.mktemp("larger"), train_batches=3, per_batch=1000)


def test_an_interrupted_job_resumes_from_its_checkpoint_to_the_same_result(tmp_path,
                                                                           larger_data):
    """A spot interruption: SageMaker starts the job again with its checkpoint directory
    restored. Killed after its first epoch, the job resumes there and ends with exactly the
    weights of a run that was never interrupted."""
    args = ["--epochs", "3", "--batch-size", "16", "--lr", "0.02", "--precision", "fp32"]
    _, whole = train_and_read_metrics(tmp_path / "whole", larger_data, args)
    assert whole["resumed_after_epoch"] is None

    root, checkpoints = tmp_path / "interrupted", tmp_path / "checkpoints"
    env = {**sagemaker_env(root, larger_data), "CIFAR10_CHECKPOINT_DIR": str(checkpoints)}
    process = subprocess.Popen([sys.executable, str(ENTRY_SCRIPT), *args], env=env, cwd=root,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        if line.startswith("epoch=1;"):
            process.kill()  # SIGKILL: nothing is flushed or cleaned up
            break
    process.wait(timeout=60)
    process.stdout.close()
    assert process.returncode == -9
    assert (checkpoints / "checkpoint.pt").is_file()
    assert not (root / "output/data/metrics.json").exists()

    result = run_entry_script(args, env, root)  # started again, checkpoints restored
    assert result.returncode == 0, result.stderr
    resumed = json.loads((root / "output/data/metrics.json").read_text())
    assert re.search(r"^resuming after epoch [12] ", result.stdout, re.MULTILINE)
    assert resumed["resumed_after_epoch"] in (1, 2)
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    assert resumed["weights_sha256"] == whole["weights_sha256"]
    assert resumed["test_accuracy"] == whole["test_accuracy"]


def test_a_checkpoint_of_another_plan_is_not_resumed(tmp_path, cifar_dir):
    checkpoints = tmp_path / "checkpoints"
    env_args = ["--epochs", "1", "--batch-size", "16", "--lr", "0.02",
                "--checkpoint-dir", str(checkpoints)]
    train_and_read_metrics(tmp_path / "first", cifar_dir, env_args)
    assert (checkpoints / "checkpoint.pt").is_file()
    result, metrics = train_and_read_metrics(tmp_path / "second", cifar_dir,
                                             [*env_args[:-2], "--lr", "0.03",
                                              "--checkpoint-dir", str(checkpoints)])
    assert "ignoring the checkpoint" in result.stdout
    assert metrics["resumed_after_epoch"] is None
