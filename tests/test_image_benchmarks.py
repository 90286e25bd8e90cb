"""The image benchmarks (configs/office31.py, ...): variants, protocols, runs on generated folders.

The datasets are not shipped, so each test writes a small folder in the benchmark's layout (every
class, two or three tiny JPEG and PNG images, some greyscale) and runs the config on it with a
narrow ResNet-18 at 32x32.
"""

import importlib
import itertools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from configs import _image_benchmarks as benchmarks
from tljax import methods, optim, train, transfer, validate
from tljax.data import folders
from tljax.data.pipeline import host_batch
from tljax.models import make_classifier, torch_convert
from tljax.validate import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = benchmarks.CONFIG_FILES
# Images per class and domain (DomainNet: in its train split; its test split has one).
PER_CLASS = 2

# BUILD.md "Image benchmarks": DomainNet's official lists -> <domain>/{train,test}/<class>/ links.
DOMAINNET_SPLITS = """
import os, sys

source, splits = sys.argv[1], sys.argv[2]
for domain in ("clipart", "infograph", "painting", "quickdraw", "real", "sketch"):
    for split in ("train", "test"):
        lines = os.path.join(source, f"{domain}_{split}.txt")
        if not os.path.exists(lines):
            continue
        for line in open(lines):
            relative = line.rsplit(maxsplit=1)[0]  # clipart/aircraft_carrier/clipart_001_000018.jpg
            _, class_name, file_name = relative.split("/")
            folder = os.path.join(splits, domain, split, class_name)
            os.makedirs(folder, exist_ok=True)
            link = os.path.join(folder, file_name)
            if not os.path.lexists(link):
                os.symlink(os.path.abspath(os.path.join(source, relative)), link)
"""


def _module(name):
    return importlib.import_module(f"configs.{name}")


def _write_image(path, rng, index):
    """A 20x16 random image: JPEG or PNG, RGB or greyscale, so decoding converts formats."""
    if index % 3 == 2:
        Image.fromarray(rng.integers(0, 256, (16, 20), dtype=np.uint8), "L").save(f"{path}.png")
    else:
        colour = rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)
        Image.fromarray(colour).save(f"{path}.{'jpg' if index % 3 == 0 else 'png'}")


def write_domain(folder, classes, count, rng, start=0):
    """``count`` images of every class in ``folder/<class>/``; returns the files written."""
    written = []
    for number, name in enumerate(classes):
        os.makedirs(os.path.join(folder, name), exist_ok=True)
        for k in range(count):
            path = os.path.join(folder, name, f"{name}_{start + k:03d}")
            _write_image(path, rng, number + k)
            written += [p for p in (f"{path}.jpg", f"{path}.png") if os.path.exists(p)]
    return written


def write_domainnet(root, domains):
    """DomainNet as it is downloaded (``<domain>/<class>/`` and the official lists), split into
    ``root/<domain>/{train,test}/<class>/`` by BUILD.md's script.

    Returns:
      (the data root, {domain: {split: number of images}}).
    """
    source, splits = os.path.join(root, "download"), os.path.join(root, "splits")
    rng = np.random.default_rng(1)
    counts = {}
    for domain in domains:
        train = write_domain(os.path.join(source, domain), benchmarks.DOMAINNET_CLASSES, 2, rng)
        test = write_domain(
            os.path.join(source, domain), benchmarks.DOMAINNET_CLASSES, 1, rng, start=2
        )
        for split, files in (("train", train), ("test", test)):
            with open(os.path.join(source, f"{domain}_{split}.txt"), "w") as lines:
                for path in files:
                    label = benchmarks.DOMAINNET_CLASSES.index(
                        os.path.basename(os.path.dirname(path))
                    )
                    lines.write(f"{os.path.relpath(path, source)} {label}\n")
        counts[domain] = {"train": len(train), "test": len(test)}
    subprocess.run([sys.executable, "-c", DOMAINNET_SPLITS, source, splits], check=True)
    return splits, counts


def write_benchmark(root, benchmark, domains):
    """The benchmark's layout under ``root`` for ``domains``; returns the data root."""
    if benchmark is benchmarks.DOMAINNET:
        return write_domainnet(root, domains)[0]
    rng = np.random.default_rng(0)
    for domain in domains:
        write_domain(os.path.join(root, benchmark.folders[domain]), benchmark.classes, 2, rng)
    return str(root)


@pytest.fixture(scope="module")
def benchmark_roots(tmp_path_factory):
    """Each benchmark's default pair, written once: config name -> data root."""
    roots = {}
    for name in CONFIGS:
        benchmark = _module(name).BENCHMARK
        folder = tmp_path_factory.mktemp(name)
        roots[name] = write_benchmark(folder, benchmark, (benchmark.source, benchmark.target))
    return roots


def tiny(config, root, workers=0):
    """A config cut down to 2 steps of a narrow ResNet-18 at 32x32 on the folders in ``root``."""
    config.data.root = root
    config.data.folder.workers = workers
    config.model.name = "resnet18"
    config.model.width = 8
    config.model.image_size = (32, 32)
    config.model.conv_impl = "xla"  # Compiles fastest; the CPU lowerings have their own tests.
    config.train.steps = 2
    config.train.batch_size = 4
    config.train.log_every = 1
    config.eval.every = config.checkpoint.every = 2
    config.eval.batch_size = 64
    if "validator_examples" in config.eval:
        config.eval.validator_examples = 16
    return config


def build(config):
    """The method, read as the trainer reads it (folder options from the config)."""
    with folders.reading(folders.FolderOptions.from_config(config)):
        return methods.build(config)


def resnet_state_dict(num_classes=1000, width=8):
    """A torchvision-layout ResNet-18 state dict (an ImageNet-like 1000-way fc) of random values
    at the scales of a trained network, so activations stay finite through the frozen norms."""
    model = make_classifier(
        {"name": "resnet18", "num_classes": num_classes, "width": width, "dtype": "float32"}
        | {"conv_impl": "xla"}
    )
    shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
    rng = np.random.default_rng(0)
    draws = {
        "weight": lambda shape: rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[1:])), shape),
        "bias": lambda shape: rng.normal(0.0, 0.1, shape),
        "running_mean": lambda shape: rng.normal(0.0, 0.1, shape),
        "running_var": lambda shape: rng.uniform(0.5, 2.0, shape),
    }
    state_dict = {}
    for layer in torch_convert._template_layers(shapes["params"], ()):
        for key, (_, _, shape) in layer.expected_torch_shapes().items():
            field = key.rsplit(".", 1)[1]
            norm_weight = layer.kind == "norm" and field == "weight"
            value = rng.uniform(0.5, 1.5, shape) if norm_weight else draws[field](shape)
            state_dict[key] = value.astype(np.float32)
    return state_dict


# ------------------------------------------------------------------ variants ----


@pytest.mark.parametrize("name", CONFIGS)
def test_every_domain_pair_builds(name):
    from configs import da

    module = _module(name)
    benchmark = module.BENCHMARK
    for source, target in itertools.permutations(benchmark.folders, 2):
        config = module.get_config(f"source={source},target={target}")
        assert config.data.source == f"folder:{benchmark.folders[source]}"
        assert config.data.target == f"folder:{benchmark.folders[target]}"
        assert config.model.num_classes == benchmark.num_classes
        assert config.model.name == "resnet50" and config.model.image_size == (224, 224)
        assert config.da.recipe == da.RECOMMENDED[0]
        validate.check_config(config)


@pytest.mark.parametrize("name", CONFIGS)
def test_an_unknown_domain_is_a_config_error_listing_the_domains(name):
    module = _module(name)
    for arg in ("source=nowhere", "task=finetune,target=nowhere"):
        with pytest.raises(ConfigError, match="'nowhere'") as error:
            module.get_config(arg)
        for domain in module.BENCHMARK.folders:
            assert domain in str(error.value)


def test_tllib_task_codes_name_the_same_domains():
    from configs import domainnet, office31, office_home, visda2017

    assert office31.get_config("source=D,target=A") == office31.get_config(
        "source=dslr,target=amazon"
    )
    assert office_home.get_config("source=Rw").data.source == "folder:Real_World"
    assert visda2017.get_config("source=Synthetic,target=Real") == visda2017.get_config()
    assert domainnet.get_config("target=q").data.target == "folder:quickdraw"


def test_the_protocols_are_tllibs():
    from configs import domainnet, office31, visda2017

    office = office31.get_config()
    assert (office.data.folder.split, office.data.eval_split) == ("all", "all")
    assert office.data.folder.augment == "random_resized_crop,flip"
    assert visda2017.get_config().data.folder.augment == "flip"  # TLlib's cen.crop.
    net = domainnet.get_config()
    assert (net.data.folder.split, net.data.eval_split) == ("auto", "test")
    assert (office.train.steps, visda2017.get_config().train.steps, net.train.steps) == (
        20000,
        30000,
        75000,
    )
    assert office.train.batch_size == 32
    assert dict(office.optimizer) == dict(
        name="sgd", momentum=0.9, nesterov=True, weight_decay=1e-3
    )
    assert office.transfer.init_from is None  # ImageNet weights: the user's converted file.
    assert office.transfer.copy == ("stem", "stage*")
    assert dict(office.transfer.lr_mults) == {"stem": 0.1, "stage*": 0.1}


def test_the_learning_rate_anneals_as_tllibs_per_iteration():
    from configs import domainnet, office31

    for config in (office31.get_config(), domainnet.get_config()):
        schedule = optim.make_schedule(config.lr, config.train.steps)
        for i in (0, 1000, 12345, config.train.steps - 1):
            assert float(schedule(i)) == pytest.approx(0.01 * (1 + 0.001 * i) ** -0.75, rel=1e-5)


def test_recipe_settings_come_from_configs_da():
    from configs import da, pacs

    for recipe in ("dann", "cdan_e", "mcd", "bsp"):
        config, digits = (
            pacs.get_config(f"method={recipe},scale=0.5"),
            da.get_config(f"method={recipe},scale=0.5"),
        )
        assert (config.method, config.da.terms) == (digits.method, digits.da.terms)
        assert config.cdan == digits.cdan and config.mcd == digits.mcd
        assert config.da.discriminator_widths == (1024, 1024)
    shot = pacs.get_config("method=shot")
    assert (shot.method, shot.shot.head) == ("shot", "head")
    with pytest.raises(ConfigError, match="--sweep"):
        pacs.get_config("method=all")


@pytest.mark.parametrize(
    "arg, message",
    [
        ("task=transfer", "task='transfer'; choose one of da, finetune"),
        ("variant=l2sp", "task=da does not take variant"),
        ("task=finetune,method=dann", "task=finetune does not take method"),
        ("task=finetune,source=amazon", "task=finetune does not take source"),
        ("task=finetune,variant=output", "variant='output'; task=finetune takes"),
        ("method=dan_n", "method='dan_n'; choose one of"),
    ],
)
def test_bad_variants_are_named(arg, message):
    from configs import office31

    with pytest.raises(ConfigError, match=message):
        office31.get_config(arg)


def test_the_sweep_points_are_variants_of_the_same_pair():
    from configs import office_home

    points = office_home.get_sweep("source=Pr,target=Rw,seeds=1,scales=1")
    assert {p["name"] for p in points} >= {"dann_x1_seed0", "source_only_x1_seed0"}
    for point in points:
        config = office_home.get_config(point["arg"])
        assert (config.data.source, config.data.target) == ("folder:Product", "folder:Real_World")
    with pytest.raises(ConfigError, match="no sweep"):
        office_home.get_sweep("task=finetune")


def test_finetune_variants_reuse_configs_finetune():
    from configs import finetune, office31

    config = office31.get_config("task=finetune,target=dslr,variant=l2sp,shots=3,seed=2")
    reference = finetune.get_config("variant=l2sp,shots=3,seed=2")
    assert config.method == "classifier" and config.conservative == reference.conservative
    assert config.data.train == "folder:dslr/images"
    assert dict(config.data.eval_sets) == {"target_test": "folder:dslr/images"}
    assert (config.data.shots_per_class, config.data.shots_seed) == (3, 2)
    assert (config.data.folder.split, config.data.eval_split) == ("auto", "test")
    assert config.transfer.copy == ("stem", "stage*") and config.transfer.init_from is None
    assert config.model.num_classes == 31 and config.model.norm == "affine"
    frozen = office31.get_config("task=finetune,variant=freeze,layers=4")
    assert frozen.transfer.freeze == ("first:4",) and frozen.transfer.copy == ("stem", "stage*")
    scratch = office31.get_config("task=finetune,variant=scratch")
    assert scratch.model.norm == "group" and not scratch.transfer.lr_mults


# ------------------------------------------------------- built on folders ----


@pytest.mark.parametrize("name", CONFIGS)
def test_every_benchmark_builds_its_method_optimizer_and_schedule(name, benchmark_roots):
    """What launch.py does before the first step, on the generated folders: the streams hold 4
    source and 4 target images, the transfer block's patterns match the ResNet, and the
    learning rate starts at 0.01."""
    config = tiny(_module(name).get_config(), benchmark_roots[name])
    validate.check_config(config)
    method = build(config)
    validate.check_method_inputs(config, method)
    plan = transfer.make_plan(config, method.init_params, jax.random.key(0))
    labels = dict(zip(*_leaf_paths(plan.labels), strict=True))
    assert labels["stem/conv/kernel"] == "lr_x0.1" and labels["head/kernel"] == "trained"
    schedule = optim.make_schedule(config.lr, config.train.steps)
    assert float(schedule(0)) == pytest.approx(0.01)
    batch = host_batch(method.train_streams, seed=0, step=0)
    assert batch["source_image"].shape == batch["target_image"].shape == (4, 32, 32, 3)
    assert "target_label" not in batch


def test_every_recipe_builds_on_the_resnet(benchmark_roots):
    """Every recipe of configs/da.py (SHOT's head pattern too) traces its loss on the ResNet."""
    from configs import da, office31

    for recipe in da.RECIPES:
        config = tiny(office31.get_config(f"method={recipe}"), benchmark_roots["office31"])
        method = build(config)
        params = jax.eval_shape(method.init_params, jax.random.key(0))
        batch = host_batch(method.train_streams, seed=0, step=0)
        loss, metrics = jax.eval_shape(
            lambda p, b, m=method: m.loss_fn(p, b, jax.random.key(1), 0), params, batch
        )
        assert loss.shape == () and "class_loss" in metrics, recipe


@pytest.mark.parametrize("backbone", ["vit_s16", "convnext_t", "vgg16"])
@pytest.mark.parametrize("task", ["da", "finetune"])
def test_every_backbone_transfers_all_but_its_head(backbone, task, benchmark_roots):
    """backbone= sets the model, its statistics and the transferred layers (0.1x lr)."""
    from configs import _image_benchmarks, office31

    shots = ",shots=1" if task == "finetune" else ""
    config = office31.get_config(f"task={task},backbone={backbone}{shots}")
    assert config.model.name == backbone
    assert config.model.normalize == _image_benchmarks.BACKBONES[backbone][1]
    config.data.root = benchmark_roots["office31"]
    config.data.folder.workers = 0
    config.model.image_size = (32, 32)
    method = build(config)
    plan = transfer.make_plan(config, method.init_params, jax.random.key(0))
    labels = dict(zip(*_leaf_paths(plan.labels), strict=True))
    assert {label for path, label in labels.items() if path.startswith("head/")} == {"trained"}
    body = {label for path, label in labels.items() if not path.startswith(("head/", "domain/"))}
    assert body == {"lr_x0.1"}


def _leaf_paths(tree):
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return ["/".join(k.key for k in path) for path, _ in flat], [leaf for _, leaf in flat]


def test_office_trains_and_evaluates_on_every_image(benchmark_roots):
    from configs import office31

    config = tiny(office31.get_config(), benchmark_roots["office31"])
    method = build(config)
    every = 31 * PER_CLASS
    source, target = method.train_streams
    assert source.num_examples == target.num_examples == every
    assert {k: len(v["label"]) for k, v in method.eval_sets.items()} == {
        "source_test": every,
        "target_test": every,
    }


def test_domainnet_evaluates_the_target_test_split(tmp_path):
    from configs import domainnet

    root, counts = write_domainnet(tmp_path, ("clipart", "sketch"))
    config = tiny(domainnet.get_config("source=c,target=s"), root)
    method = build(config)
    source, target = method.train_streams
    assert source.num_examples == counts["clipart"]["train"] == 345 * 2
    assert target.num_examples == counts["sketch"]["train"]
    target_test = method.eval_sets["target_test"]
    assert len(target_test["label"]) == counts["sketch"]["test"] == 345
    files = target_test["image"].files
    assert all(name.startswith(b"test/") for name in files.names.tolist())
    assert files.classes == tuple(sorted(benchmarks.DOMAINNET_CLASSES))
    assert os.path.islink(files.path(0))  # The split is links to the downloaded files.


def test_a_domain_without_some_class_folders_is_refused(tmp_path):
    from configs import pacs

    root = write_benchmark(tmp_path, benchmarks.PACS, ("photo", "art_painting"))
    for image in os.listdir(tmp_path / "photo" / "horse"):
        os.remove(tmp_path / "photo" / "horse" / image)
    os.rmdir(tmp_path / "photo" / "horse")
    with pytest.raises(validate.DataError, match=r"only in data.target .*\['horse'\]"):
        build(tiny(pacs.get_config(), root))


def test_finetune_copies_the_backbone_of_a_converted_checkpoint(benchmark_roots, tmp_path):
    """The ImageNet checkpoint's 1000-way fc is left out, its backbone copied, at 0.1x lr."""
    from configs import office31

    state_dict = resnet_state_dict()
    weights = tmp_path / "resnet18.npz"
    np.savez(weights, **state_dict)
    config = tiny(
        office31.get_config("task=finetune,target=webcam,variant=l2sp,shots=1"),
        benchmark_roots["office31"],
    )
    config.transfer.init_from = str(weights)
    method = build(config)
    assert method.train_streams[0].num_examples == 31  # One shot of each class.
    assert len(method.eval_sets["target_test"]["label"]) == 31  # The other image of each.
    plan = transfer.make_plan(config, method.init_params, jax.random.key(0))
    np.testing.assert_allclose(
        plan.pretrained["stem"]["conv"]["kernel"],
        state_dict["conv1.weight"].transpose(2, 3, 1, 0),
    )
    assert not plan.copied["head"]["kernel"] and plan.copied["stage4"]["block1"]["conv2"]["kernel"]


# ---------------------------------------------------------------- end to end ----


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in CONFIGS if n != "office31"])
def test_two_steps_of_each_benchmark_train_and_evaluate(name, benchmark_roots, tmp_path):
    config = tiny(_module(name).get_config(), benchmark_roots[name])
    results = train.train_and_evaluate(config, str(tmp_path / "run"), devices=jax.devices()[:1])
    assert results["steps"] == 2 and results["status"] == "ok"
    for key in ("target_test/accuracy", "source_test/accuracy", "train/loss", "validator/im"):
        assert np.isfinite(results["final"][key]), key


@pytest.mark.slow
def test_the_documented_command_runs_with_worker_processes(benchmark_roots, tmp_path):
    """launch.py with the variant and --config.data.root, as the docstring shows; one spawned
    worker process decodes and augments the training images."""
    workdir = tmp_path / "run"
    cmd = [
        sys.executable,
        "launch.py",
        "--config=configs/office31.py:source=amazon,target=webcam,method=dann",
        f"--config.data.root={benchmark_roots['office31']}",
        "--config.data.folder.workers=1",
        "--config.model.name=resnet18",
        "--config.model.width=8",
        "--config.model.image_size=(32, 32)",
        "--config.model.conv_impl=xla",
        "--config.train.steps=2",
        "--config.train.batch_size=4",
        "--config.eval.every=2",
        "--config.checkpoint.every=2",
        "--config.eval.batch_size=64",
        "--config.eval.validator_examples=16",
        f"--workdir={workdir}",
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "streamed from files by 1 worker process(es), augmented" in proc.stderr
    results = json.loads((workdir / "results.json").read_text())
    assert results["config"]["data"]["source"] == "folder:amazon/images"
    assert results["steps"] == 2 and np.isfinite(results["final"]["train/domain_loss"])


@pytest.mark.slow
def test_finetuning_from_a_converted_checkpoint_trains(benchmark_roots, tmp_path):
    from configs import visda2017

    weights = tmp_path / "resnet18.npz"
    np.savez(weights, **resnet_state_dict())
    config = visda2017.get_config("task=finetune,target=Real,variant=l2sp,shots=1")
    config = tiny(config, benchmark_roots["visda2017"])
    config.transfer.init_from = str(weights)
    results = train.train_and_evaluate(config, str(tmp_path / "run"), devices=jax.devices()[:1])
    assert results["steps"] == 2
    assert np.isfinite(results["final"]["target_test/accuracy"])
    assert results["final"]["train/l2sp_drift"] >= 0.0
