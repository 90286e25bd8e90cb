"""Every config loads; variants and overrides reach the trainer; launch.py works."""

import glob
import importlib
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from helpers import conv_operand_dtypes, shrink

from configs._image_benchmarks import CONFIG_FILES as IMAGE_BENCHMARKS
from tljax import methods, validate
from tljax.config_utils import parse_arg
from tljax.data.pipeline import host_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(
    os.path.basename(p)[:-3]
    for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
    if not os.path.basename(p).startswith("_")  # __init__.py, shared blocks (_common.py)
)
# The configs that run on the embedded digits; the image benchmarks read folders that are not
# shipped, and tests/test_image_benchmarks.py runs them on generated ones.
DIGIT_CONFIGS = [name for name in CONFIGS if name not in IMAGE_BENCHMARKS]


def _field(config, dotted: str):
    """config.a.b.c for 'a.b.c', as plain Python (ConfigDicts become dicts)."""
    value = config
    for name in dotted.split("."):
        value = value[name]
    return value.to_dict() if hasattr(value, "to_dict") else value


@pytest.mark.parametrize("name", DIGIT_CONFIGS)
def test_every_config_builds_its_method_optimizer_and_schedule(name, data_dir):
    """What launch.py does with every config before the first step: the method builds on the
    embedded data, its batches have train.batch_size rows (per domain for DANN), its params
    take the config's optimizer, and the learning rate starts at lr.base."""
    from tljax import optim

    config = shrink(importlib.import_module(f"configs.{name}").get_config(), data_dir, batch_size=8)
    validate.check_config(config)
    method = methods.build(config)
    validate.check_method_inputs(config, method)  # No false alarm on any shipped config.
    schedule = optim.make_schedule(config.lr, config.train.steps)
    optimizer = optim.make_optimizer(config.optimizer, schedule)
    params = jax.eval_shape(method.init_params, jax.random.key(config.seed))
    jax.eval_shape(optimizer.init, params)
    assert float(schedule(0)) == pytest.approx(config.lr.base)

    batch = host_batch(method.train_streams, seed=config.seed, step=0)
    adapting = (config.method == "dann" and config.dann.adversarial) or (
        config.method == "da" and config.da.terms
    )
    domains = 2 if adapting or config.method == "shot" else 1
    assert sum(len(v) for k, v in batch.items() if k.endswith(("_image", "_patch"))) == (
        domains * config.train.batch_size
    )
    assert method.eval_sets, f"configs/{name}.py evaluates nothing"
    for eval_set in method.eval_sets.values():
        assert len(next(iter(eval_set.values()))) > 0


# Each config's documented variants (its docstring) and what they set.
DOCUMENTED_VARIANTS = [
    (
        "da",
        "method=cdan_e,source=syn_digits,target=mnist",
        {
            "method": "da",
            "da.terms": "cdan:1",
            "cdan.entropy": True,
            "data.source": "embedded_digits/syn_digits",
            "data.target": "embedded_digits/mnist",
        },
    ),
    ("da", "method=dann,scale=0.3,seed=2", {"da.terms": "dann:0.3", "seed": 2}),
    ("da", "method=shot", {"method": "shot", "da.terms": "", "shot.pseudo_weight": 0.1}),
    ("dann", "data=full", {"data.source": "mnist", "data.target": "mnist_m"}),
    ("dann", "adversarial=False,seed=3", {"dann.adversarial": False, "seed": 3}),
    ("source_only", "data=full,seed=3", {"dann.adversarial": False, "data.source": "mnist"}),
    ("target_only", "data=full", {"data.source": "mnist_m", "data.target": "mnist_m"}),
    ("pretrain", "classes=0-4", {"data.classes": (0, 1, 2, 3, 4), "model.num_classes": 5}),
    ("pretrain", "classes=1/3/5,seed=2", {"data.classes": (1, 3, 5), "seed": 2}),
    (
        "finetune",
        "variant=freeze,layers=1,shots=1",
        {
            "transfer.init_from": "runs/pretrain",
            "transfer.copy": ("*",),
            "transfer.freeze": ("first:1",),
            "data.shots_per_class": 1,
        },
    ),
    ("finetune", "variant=scratch", {"transfer.init_from": None, "data.shots_per_class": 10}),
    ("finetune", "variant=copy", {"transfer.copy": ("first:2",), "transfer.freeze": ()}),
    (
        "finetune",
        "variant=l2sp,init_from=/runs/p",
        {
            "conservative.l2sp_alpha": 0.1,
            "conservative.l2sp_beta": 0.01,
            "transfer.init_from": "/runs/p",
        },
    ),
    ("finetune", "variant=output", {"conservative.output_weight": 1.0}),
    ("finetune", "variant=feature", {"conservative.feature_weight": 0.01}),
    ("finetune", "data=full", {"data.train": "mnist_m", "data.eval_sets.source_test": "mnist"}),
    (
        "layer_transfer",
        "mode=AnB,n=3,init_from=/runs/baseA",
        {
            "transfer.init_from": "/runs/baseA",
            "transfer.copy": ("first:3",),
            "transfer.freeze": ("first:3",),
            "experiment.half": "B",
        },
    ),
    ("layer_transfer", "mode=AnB+,n=7,init_from=/r", {"transfer.freeze": ()}),
    ("layer_transfer", "data=embedded_mnist_m", {"data.train": "embedded_digits/mnist_m"}),
    ("layer_transfer", "split=dissimilar", {"data.classes": (0, 3, 6, 8, 9)}),
    ("layer_transfer", "split=dissimilar,half=B", {"data.classes": (1, 2, 4, 5, 7)}),
    ("multitask", "data=full", {"tasks.svhn.dataset": "svhn_cropped"}),
    ("multitask", "sharing=none", {"multitask.shared": ()}),
    (
        "multitask",
        "sharing=middle,balancing=gradnorm",
        {
            "multitask.shared": ("feature/conv_1", "label/dense_0", "label/dense_1"),
            "multitask.balancing": "gradnorm",
            "transfer.lr_mults": {"balance": 10.0},
        },
    ),
    (
        "multitask",
        "shots=20",
        {"tasks.mnist_m.shots_per_class": 20, "tasks.mnist.shots_per_class": 0},
    ),
    (
        "progressive",
        "task=1,variant=finetune",
        {
            "transfer.init_from": "runs/progressive/finetune/task0",
            "transfer.reinit": ("column_0/head_1",),
            "transfer.freeze": (),
        },
    ),
    (
        "progressive",
        "task=2",
        {
            "transfer.copy": ("column_0", "column_1"),
            "transfer.freeze": ("column_0", "column_1"),
        },
    ),
    ("progressive", "data=full", {"tasks.digits04.dataset": "mnist"}),
    (
        "self_taught",
        "stage=classify,features=pixels,k=5",
        {"self_taught.features": "pixels", "self_taught.labels_per_class": 5},
    ),
    (
        "self_taught",
        "stage=cluster,encoder=runs/sae",
        {"self_taught.encoder_workdir": "runs/sae", "lr.schedule": "constant"},
    ),
    (
        "office31",
        "source=amazon,target=webcam,method=cdan",
        {
            "data.source": "folder:amazon/images",
            "data.target": "folder:webcam/images",
            "da.terms": "cdan:1",
            "model.num_classes": 31,
        },
    ),
    (
        "office31",
        "task=finetune,target=webcam,variant=l2sp,shots=3",
        {"data.train": "folder:webcam/images", "data.shots_per_class": 3},
    ),
    ("office_home", "source=Ar,target=Rw", {"data.target": "folder:Real_World"}),
    ("visda2017", "method=mcc,seed=1", {"data.source": "folder:train", "seed": 1}),
    (
        "domainnet",
        "source=real,target=sketch,method=dann",
        {"data.target": "folder:sketch", "data.eval_split": "test", "model.num_classes": 345},
    ),
    ("pacs", "source=photo,target=sketch", {"data.target": "folder:sketch"}),
    ("zeroshot", "model=eszsl", {"zeroshot.model": "eszsl", "train.steps": 0}),
    ("zeroshot", "model=conse,split=2", {"zeroshot.model": "conse", "data.split": 2}),
    (
        "zeroshot",
        "data=awa2,zsl_root=/data/xlsa17",
        {"data.dataset": "awa2", "data.zsl_root": "/data/xlsa17", "model.hidden": ()},
    ),
]


def test_documented_variants_cover_every_config():
    assert {name for name, _, _ in DOCUMENTED_VARIANTS} == set(CONFIGS)


@pytest.mark.parametrize("name, variant, expected", DOCUMENTED_VARIANTS)
def test_documented_variants_set_what_they_say(name, variant, expected):
    module = importlib.import_module(f"configs.{name}")
    config, default = module.get_config(variant), module.get_config()
    for field, value in expected.items():
        assert _field(config, field) == value, f"configs/{name}.py:{variant} {field}"
    assert config != default, f"configs/{name}.py:{variant} changes nothing"


@pytest.mark.parametrize(
    "name, variant, check",
    [
        # classes=0-4 trains a 5-way head on digits 0-4, relabelled 0..4.
        (
            "pretrain",
            "classes=0-4",
            lambda method, params: (
                params["label"]["dense_2"]["kernel"].shape[-1] == 5
                and set(method.train_streams[0].arrays["label"].tolist()) == set(range(5))
            ),
        ),
        # shots=1: one labelled example per class.
        (
            "finetune",
            "variant=scratch,shots=1",
            lambda method, params: method.train_streams[0].num_examples == 10,
        ),
        # tasks=mnist: a single-task baseline.
        (
            "multitask",
            "tasks=mnist",
            lambda method, params: [s.name for s in method.train_streams] == ["mnist"],
        ),
    ],
)
def test_variants_reach_the_built_method(name, variant, check, data_dir):
    config = shrink(importlib.import_module(f"configs.{name}").get_config(variant), data_dir)
    method = methods.build(config)
    assert check(method, jax.eval_shape(method.init_params, jax.random.key(0)))


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_names_an_unknown_variant_key(name):
    module = importlib.import_module(f"configs.{name}")
    with pytest.raises(ValueError, match="Unknown config variant key 'colour'; accepted: "):
        module.get_config("colour=red")
    with pytest.raises(ValueError, match="seed='one' is not an int"):
        module.get_config("seed=one")


@pytest.mark.parametrize(
    "name, variant, message",
    [
        ("dann", "data=ful", "data='ful'; choose one of"),
        ("dann", "adversarial=maybe", "adversarial='maybe' is not a boolean"),
        ("source_only", "data=ful", "data='ful'; choose one of"),
        ("pretrain", "data=svhn", "data='svhn'; choose one of"),
        ("finetune", "variant=frozen", "variant='frozen'; choose one of"),
        ("layer_transfer", "mode=AnA", "mode='AnA'; choose one of"),
        ("layer_transfer", "mode=AnB,n=9,init_from=/r", "n=9"),
        ("layer_transfer", "mode=AnB,n=2", "set init_from="),
        ("layer_transfer", "split=halves", "split='halves'; use random or dissimilar"),
        ("multitask", "balancing=magic", "balancing='magic'; choose one of"),
        ("multitask", "sharing=all", "sharing='all'; choose one of"),
        ("progressive", "task=3", "task=3; the sequence"),
        ("self_taught", "stage=finetune", "stage='finetune'; choose one of"),
        ("self_taught", "stage=cluster,features=scratch", "features='scratch'; stage=cluster"),
        ("zeroshot", "model=knn", "model='knn'; choose one of"),
        ("zeroshot", "data=imagenet", "data='imagenet'; choose digits or one of"),
        ("office31", "source=amazone", "source='amazone': Office-31 has domains amazon, dslr"),
        ("pacs", "task=finetune,variant=output", "variant='output'; task=finetune takes"),
    ],
)
def test_bad_variant_values_are_named(name, variant, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        importlib.import_module(f"configs.{name}").get_config(variant)


def test_malformed_variants_are_named():
    with pytest.raises(ValueError, match="Unknown config variant key 'dta'"):
        parse_arg("dta=full", data="embedded")
    with pytest.raises(ValueError, match="'full' is not of the form key=value"):
        parse_arg("full", data="embedded")
    with pytest.raises(ValueError, match="lr='fast' is not a number"):
        parse_arg("lr=fast", lr=0.1)
    assert parse_arg("seed=3,adversarial=0,lr=2", seed=0, adversarial=True, lr=0.1) == {
        "seed": 3,
        "adversarial": False,
        "lr": 2.0,
    }


# Runs launch.py (argv[1:] are its flags) with the modules in argv[0] made unimportable.
_LAUNCH_WITHOUT = """
import runpy, sys
sys.path.insert(0, ".")
for name in sys.argv[1].split(","):
    sys.modules[name] = None  # Importing it now raises ImportError.
sys.argv = ["launch.py", *sys.argv[2:]]
runpy.run_path("launch.py", run_name="__main__")
"""


def _launch_tiny_dann(workdir, data_dir, *flags, config="configs/dann.py", env=None, without=()):
    """Runs launch.py on `config` (a DANN config) for 2 steps of 8 + 8 images.

    Args:
      without: modules the run cannot import (as if not installed).

    Returns:
      (the run's stderr, its results.json).
    """
    launch = ["-c", _LAUNCH_WITHOUT, ",".join(without)] if without else ["launch.py"]
    cmd = [
        sys.executable,
        *launch,
        f"--config={config}",  # Before the --config.* overrides.
        "--config.train.steps=2",
        "--config.train.batch_size=8",
        "--config.eval.batch_size=500",
        f"--config.data.data_dir={data_dir}",
        f"--workdir={workdir}",
        *flags,
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
    proc = subprocess.run(
        cmd, cwd=ROOT, check=True, env=env, capture_output=True, text=True, timeout=300
    )
    return proc.stderr, json.loads((workdir / "results.json").read_text())


@pytest.mark.slow
def test_launch_runs_a_variant_with_overrides(data_dir, tmp_path):
    _, results = _launch_tiny_dann(tmp_path / "run", data_dir, config="configs/dann.py:seed=2")
    assert results["seed"] == 2 and results["steps"] == 2
    assert results["config"]["train"]["batch_size"] == 8


@pytest.mark.slow
def test_launch_trains_on_exported_splits_without_tensorflow(data_dir, tmp_path):
    """An accelerator image without TensorFlow, tfds or clu runs the same experiment on splits
    exported where tfds works, and logs its metrics instead of writing TensorBoard events."""
    from configs import dann
    from tljax.data import exported

    config = dann.get_config()
    config.data.data_dir = data_dir
    arrays = tmp_path / "arrays"
    exported.export_splits(config, str(arrays))

    _, with_tfds = _launch_tiny_dann(tmp_path / "tfds", data_dir)
    log, without_tf = _launch_tiny_dann(
        tmp_path / "arrays_run",
        arrays,
        without=("tensorflow", "tensorflow_datasets", "clu"),
    )
    assert without_tf["final"] == with_tfds["final"]
    assert "No TensorBoard events for this run" in log
    assert "target_test/accuracy=" in log
    assert not glob.glob(str(tmp_path / "arrays_run" / "events.out.tfevents.*"))


@pytest.mark.slow
def test_launch_rejects_unknown_config_field(tmp_path):
    cmd = [
        sys.executable,
        "launch.py",
        "--config=configs/dann.py",
        "--config.train.stesp=2",
        f"--workdir={tmp_path}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "stesp" in proc.stderr


@pytest.fixture
def launch_flags(monkeypatch):
    """Parses launch.py's flags in this process, as `python launch.py ARGS` would; resets them
    afterwards."""
    from absl import flags

    import launch

    monkeypatch.chdir(ROOT)
    # The TensorFlow device and library-logging set-up are for a fresh process; not here.
    monkeypatch.setattr(launch, "_hide_accelerators_from_tensorflow", lambda quiet: None)
    monkeypatch.setattr("tljax.run_log.quiet_library_logs", lambda: None)

    def parse(*args):
        monkeypatch.setattr(sys, "argv", ["launch.py", *args])  # config_flags reads sys.argv.
        return flags.FLAGS(sys.argv)

    yield launch, parse
    flags.FLAGS.unparse_flags()


def test_launch_hands_the_variant_and_overrides_to_the_trainer(launch_flags, tmp_path, monkeypatch):
    launch, parse = launch_flags
    from tljax import train

    calls = []
    monkeypatch.setattr(
        train, "train_and_evaluate", lambda *args, **kwargs: calls.append((*args, kwargs))
    )
    workdir = tmp_path / "run"
    argv = parse(
        "--config=configs/dann.py:seed=2,adversarial=False",
        "--config.train.batch_size=8",
        "--config.model.conv_impl=xla",
        f"--workdir={workdir}",
    )
    launch.main(argv)
    [(config, got_workdir, options)] = calls
    assert (config.seed, config.dann.adversarial) == (2, False)
    assert (config.train.batch_size, config.model.conv_impl) == (8, "xla")
    assert config.train.steps == 3000  # Everything else as configs/dann.py has it.
    assert got_workdir == str(workdir) and workdir.is_dir()
    assert options == {"allow_config_change": False}


def test_launch_names_an_unknown_config_field(launch_flags):
    _, parse = launch_flags
    with pytest.raises(AttributeError, match='Did you mean "steps" instead of "stesp"'):
        parse("--config=configs/dann.py", "--config.train.stesp=2", "--workdir=unused")


@pytest.mark.slow
def test_a_second_run_loads_the_train_step_from_the_compilation_cache(data_dir, tmp_path):
    cache = tmp_path / "cache"
    # --compilation_cache wins over the tests' JAX_COMPILATION_CACHE_DIR. Cache even this tiny
    # step (it compiles in under the default 1 s threshold), and log hits.
    env = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_LOG_COMPILES": "1"}
    flags = (f"--compilation_cache={cache}",)
    first_log, first = _launch_tiny_dann(tmp_path / "first", data_dir, *flags, env=env)
    assert "cache hit for 'jit_train_step'" not in first_log
    assert any(p.name.startswith("jit_train_step-") for p in cache.iterdir())
    second_log, second = _launch_tiny_dann(tmp_path / "second", data_dir, *flags, env=env)
    assert "Persistent compilation cache hit for 'jit_train_step'" in second_log
    assert second["final"] == first["final"]


def test_compilation_cache_dir_resolution(monkeypatch):
    from launch import DEFAULT_COMPILATION_CACHE, compilation_cache_dir

    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    assert compilation_cache_dir(None) == os.path.expanduser(DEFAULT_COMPILATION_CACHE)
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/tmp/from_env")
    assert compilation_cache_dir(None) == "/tmp/from_env"
    assert compilation_cache_dir("~/c") == os.path.expanduser("~/c")
    assert compilation_cache_dir("") is None


# Every config variant that trains a convnet on the embedded digits.
CONVNET_VARIANTS = [
    ("da", None),
    ("da", "method=fixmatch"),
    ("da", "method=shot"),
    ("dann", None),
    ("source_only", None),
    ("target_only", None),
    ("pretrain", None),
    ("finetune", None),
    ("layer_transfer", None),
    ("multitask", None),
    ("progressive", None),
    ("self_taught", "stage=classify,features=scratch"),
    ("zeroshot", None),
]


def test_convnet_variants_cover_every_config():
    assert {name for name, _ in CONVNET_VARIANTS} == set(DIGIT_CONFIGS)


@pytest.mark.parametrize("name, variant", CONVNET_VARIANTS)
def test_model_conv_operands_reaches_every_convolution(name, variant, data_dir):
    """--config.model.conv_operands=bfloat16 gives every conv of the method's loss bf16 operands."""
    config = importlib.import_module(f"configs.{name}").get_config(variant)
    config = shrink(config, data_dir, batch_size=8)
    # 'xla' keeps one conv primitive per layer, whose operand dtype the jaxpr shows.
    config.model.conv_impl = "xla"
    config.model.conv_operands = "bfloat16"
    method = methods.build(config)
    params = method.init_params(jax.random.key(0))
    batch = host_batch(method.train_streams, seed=0, step=0)
    jaxpr = jax.make_jaxpr(method.loss_fn)(params, batch, jax.random.key(1), 0).jaxpr
    dtypes = conv_operand_dtypes(jaxpr)
    assert dtypes, f"configs/{name}.py: no convolution in the loss"
    assert set(dtypes) == {jnp.dtype(jnp.bfloat16)}, dtypes


@pytest.mark.parametrize("field, value", [("conv_impl", "cudnn"), ("conv_operands", "float16")])
def test_unknown_conv_setting_fails_when_the_method_is_built(field, value, data_dir):
    from configs import multitask

    config = shrink(multitask.get_config(), data_dir)
    config.model[field] = value
    with pytest.raises(ValueError, match=f"{field}={value!r}"):
        methods.build(config)
