"""benchmarks/backbone_speed.py and its PyTorch peers: same networks on both sides, a tiny run."""

import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip(
    "torch",
    reason="torch is an optional test dependency: pip install -r benchmarks/requirements.txt",
)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))

import backbone_speed as bench  # noqa: E402
import finetune_step  # noqa: E402
import torch_backbones  # noqa: E402
from absl import app, flags  # noqa: E402

import tljax.data  # noqa: E402
from tljax.models import classifiers, converters  # noqa: E402

SIDE = 32


def test_peers_have_torchvision_and_timm_parameter_counts():
    # torchvision's resnet50 and timm's vit_small_patch16_224 with 1000 classes.
    assert torch_backbones.num_params(torch_backbones.build("resnet50", 1000, SIDE)) == 25_557_032
    assert torch_backbones.num_params(torch_backbones.build("vit_s16", 1000, 224)) == 22_050_664
    with pytest.raises(ValueError, match="No PyTorch peer for model 'vgg16'"):
        torch_backbones.build("vgg16", 10, SIDE)


def test_resnet_batch_norm_stays_frozen_while_its_affine_params_train():
    model = torch_backbones.build("resnet18", 10, SIDE)
    norm = model.layer1[0].bn1
    mean, weight = norm.running_mean.clone(), norm.weight.detach().clone()
    assert not norm.training and model.training
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, SIDE, SIDE, 3), dtype=np.uint8)
    optimizer = torch_backbones.make_optimizer(model)
    ms, times = torch_backbones.time_steps(model, optimizer, images, np.arange(4) % 10, 2)
    assert len(times) == 2 and ms > 0
    torch.testing.assert_close(norm.running_mean, mean, rtol=0, atol=0)
    assert not torch.allclose(norm.weight, weight)


def _converted(name: str, torch_model):
    """tljax params of ``name`` at SIDE from the PyTorch model's state_dict, and its config."""
    config = finetune_step.finetune_config(name, SIDE, 2)
    model = classifiers.make_classifier(config.model)
    images = jax.ShapeDtypeStruct((1, SIDE, SIDE, 3), np.float32)
    template = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
    state_dict = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    convert, _ = converters.converter_for(name)
    return convert(state_dict, template), config.model


@pytest.mark.parametrize("name", ["resnet18", "vit_s16"])
def test_check_passes_the_same_network_and_stops_another(name):
    torch_model = torch_backbones.build(name, 10, SIDE)
    params, model_config = _converted(name, torch_model)
    error = bench.logit_error(torch_model, params, model_config)
    assert error < 1e-4
    bench.check_same_network(name, error, 1e-3)

    with torch.no_grad():  # One layer changed: no longer the network tljax computes.
        last = (
            torch_model.layer4[-1].conv2 if name == "resnet18" else torch_model.blocks[-1].mlp.fc2
        )
        last.weight.mul_(1.5)
    error = bench.logit_error(torch_model, params, model_config)
    with pytest.raises(RuntimeError, match="would not time the same network"):
        bench.check_same_network(name, error, 1e-3)
    with pytest.raises(RuntimeError, match="differ from PyTorch's by nan"):
        bench.check_same_network(name, float("nan"), 1e-3)


@pytest.fixture
def parsed_flags():
    """Parses benchmark flags in-process and resets them afterwards."""

    def parse(*args):
        flags.FLAGS(["backbone_speed.py", *args])

    yield parse
    flags.FLAGS.unparse_flags()


def test_unknown_model_is_refused_naming_the_flag(parsed_flags):
    parsed_flags("--models=resnet50,convnext_t")
    with pytest.raises(app.UsageError, match=r"--models: no PyTorch peer for \['convnext_t'\]"):
        bench.check_flags()


def _row(page: str, model: str, framework: str) -> list[str]:
    pattern = rf"^\| {model} \| [\d.]+M \| {framework}[^|]* \|(.*)\|$"
    match = re.search(pattern, page, re.MULTILINE)
    assert match, f"no row for {model} / {framework}"
    return [cell.strip() for cell in match.group(1).split("|")]


def _ms(rounds: str) -> list[float]:
    return [float(v) for v in rounds.split(" / ")]


@pytest.mark.slow
def test_tiny_run_writes_a_page_with_both_sides_and_their_ratio(
    parsed_flags, tmp_path, monkeypatch
):
    """The whole benchmark on 32x32 images, 1 step per round: ~15 s, mostly two compiles."""
    # The benchmark replaces tljax.data.load_split with random images for its process.
    monkeypatch.setattr(tljax.data, "load_split", tljax.data.load_split)
    page = tmp_path / "speed.md"
    parsed_flags(
        "--models=resnet18,vit_s16",
        f"--image_size={SIDE}",
        "--batch=4",
        "--steps=1",
        "--rounds=2",
        "--warmup=1",
        f"--page={page}",
    )
    bench.main([])
    text = page.read_text()
    assert (tmp_path / "speed.png").stat().st_size > 0
    assert "load average (1, 5, 15 min)" in text and "when the benchmark started" in text
    for model in ("resnet18", "vit_s16"):
        ms, rate, rounds, ratio, best_ratio = _row(text, model, "tljax")
        torch_ms, torch_rate, torch_rounds, torch_ratio, torch_best = _row(text, model, "PyTorch")
        ours, theirs = _ms(rounds), _ms(torch_rounds)
        assert len(ours) == len(theirs) == 2
        assert (torch_ratio, torch_best) == ("1.00x", "1.00x")
        assert float(ratio[:-1]) == pytest.approx(float(rate) / float(torch_rate), abs=0.011)
        assert float(best_ratio[:-1]) == pytest.approx(min(theirs) / min(ours), rel=0.02, abs=0.006)
        # images/s is the batch of 4 over the median of the rounds.
        assert float(rate) == pytest.approx(4e3 / np.median(ours), rel=0.02)
        assert float(ms.rstrip(" †")) == pytest.approx(np.median(ours), rel=0.005, abs=0.2)
        # The check table: the logits agreed before anything was timed.
        check = re.search(rf"^\| {model} \| ([\d.e+-]+) \| [\d.]+ \|$", text, re.MULTILINE)
        assert check and float(check.group(1)) < 1e-3


@pytest.mark.slow
def test_gpu_throughput_command_runs_on_cpu_with_tiny_flags(tmp_path):
    """benchmarks/finetune_throughput.py (gpu_suite.sh runs it for ViT-B/16), tiny, on CPU."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    page = tmp_path / "throughput.md"
    command = [
        sys.executable,
        os.path.join(root, "benchmarks", "finetune_throughput.py"),
        "--models=vit_b16",
        "--dtypes=float32,bfloat16",
        "--image_size=32",
        "--batch=2",
        "--steps=1",
        "--warmup=1",
        f"--page={page}",
    ]
    proc = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = page.read_text()
    for dtype in ("float32", "bfloat16"):
        row = re.search(rf"^\| vit_b16 \| {dtype} \| ([\d.]+) \| (\d+) \| (\d+) \|", text, re.M)
        assert row, f"no {dtype} row"
        ms, rate, gflop = float(row.group(1)), int(row.group(2)), int(row.group(3))
        assert rate == pytest.approx(2e3 / ms, abs=1) and gflop > 0
