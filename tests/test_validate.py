"""Bad input fails before any training, in one line naming the field, split or file."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import dann, multitask, zeroshot
from tljax import cli, methods, train, validate
from tljax.data import exported, synthetic
from tljax.data.pipeline import Stream
from tljax.validate import ConfigError, DataError, Expectations

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _digits(n=40, size=(28, 28), channels=3, labels=None, dtype=np.uint8):
    arrays = synthetic.random_labelled_images(n, (*size, channels), num_classes=10)
    arrays["image"] = arrays["image"].astype(dtype)
    if labels is not None:
        arrays["label"] = np.asarray(labels)
    return arrays


def _method(train=None, evals=None, label_keys=("image", "label"), expects=None):
    """A Method with one training stream and eval sets; its functions are never called."""
    stream = Stream("source", _digits() if train is None else train, 8, label_keys)
    eval_sets = {"target_test": _digits()} if evals is None else evals
    return methods.Method(None, None, None, (stream,), eval_sets, expects=expects)


# ----------------------------------------------------------------- config ----


def test_the_shipped_dann_config_passes():
    validate.check_config(dann.get_config())


@pytest.mark.parametrize(
    "block, field, value, message",
    [
        ("train", "steps", -1, "train.steps=-1 must be >= 0."),
        ("train", "batch_size", 0, "train.batch_size=0 must be positive."),
        ("train", "batch_size", -8, "train.batch_size=-8 must be positive."),
        ("train", "log_every", 0, "train.log_every=0 must be positive."),
        ("eval", "every", 0, "eval.every=0 must be positive."),
        ("eval", "batch_size", 0, "eval.batch_size=0 must be positive."),
        ("checkpoint", "every", 0, "checkpoint.every=0 must be positive."),
        ("train", "log_every_secs", 0.0, "train.log_every_secs=0.0 must be positive."),
    ],
)
def test_non_positive_counts_and_intervals_are_named(block, field, value, message):
    config = dann.get_config()
    config[block][field] = value
    with pytest.raises(ConfigError) as caught:
        validate.check_config(config)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    "path, value, message",
    [
        (("train", "steps"), "100", "train.steps='100' must be an integer, got str."),
        (("train", "batch_size"), 6.5, "train.batch_size=6.5 must be an integer, got float."),
        (("seed",), "abc", "seed='abc' must be an integer, got str."),
        (("eval", "every"), True, "eval.every=True must be an integer, got bool."),
    ],
)
def test_mistyped_values_are_named(path, value, message):
    config = dann.get_config()
    block = config if len(path) == 1 else config[path[0]]
    with block.ignore_type():
        block[path[-1]] = value
    with pytest.raises(ConfigError) as caught:
        validate.check_config(config)
    assert str(caught.value) == message


def test_a_missing_field_is_named_with_close_matches():
    config = dann.get_config()
    del config.eval["every"]
    config.eval.evry = 5
    with pytest.raises(ConfigError, match=r"^eval.every is missing: .*did you mean 'evry'\?$"):
        validate.check_config(config)


def test_a_data_dir_that_does_not_exist_is_named_not_created(tmp_path):
    config = dann.get_config()
    config.data.data_dir = str(tmp_path / "tfds_typo")
    with pytest.raises(ConfigError, match=r"^data.data_dir='.*tfds_typo' does not exist"):
        validate.check_config(config)
    assert not (tmp_path / "tfds_typo").exists()
    (tmp_path / "file").write_text("")
    config.data.data_dir = str(tmp_path / "file")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        validate.check_config(config)
    config.data.data_dir = "gs://bucket/tfds"  # Read by tfds; nothing local to check.
    validate.check_config(config)


def test_zero_steps_only_for_closed_form_methods():
    validate.check_steps(0, Expectations(trains=False))
    with pytest.raises(ConfigError, match=r"^train.steps=0 must be positive"):
        validate.check_steps(0, Expectations())
    with pytest.raises(ConfigError, match="closed form; set train.steps=0"):
        validate.check_steps(5, Expectations(trains=False))


def test_variant_values_are_config_errors_naming_the_key():
    with pytest.raises(ConfigError, match=r"^Config variant seed='abc' is not an int\.$"):
        dann.get_config("seed=abc")


# ------------------------------------------------------------------ data ----


def test_the_default_layout_passes():
    validate.check_method_inputs(dann.get_config(), _method())


@pytest.mark.parametrize(
    "train, evals, message",
    [
        (
            _digits(labels=np.r_[-1, np.zeros(39, np.int32)]),
            None,
            "Training stream 'source': label -1 is negative; expected class indices 0, 1, ...; "
            "1 of 40 labels are negative.",
        ),
        (
            _digits(labels=np.r_[10, 12, np.zeros(38, np.int32)]),
            None,
            "Training stream 'source': label 12 is outside [0, 10) for 10 classes "
            "(model.num_classes=10); 2 of 40 labels are out of range.",
        ),
        (
            None,
            {"target_test": _digits(labels=np.full(40, 0.0))},
            "Eval set 'target_test': labels of dtype float64; expected integers.",
        ),
        (
            _digits(n=0),
            None,
            "Training stream 'source' is empty: expected at least one example.",
        ),
        (
            None,
            {"target_test": _digits(n=0)},
            "Eval set 'target_test' is empty: expected at least one example.",
        ),
        (
            None,
            {"target_test": _digits(size=(32, 32))},
            "Eval set 'target_test': images are 32x32, expected 28x28 (model.image_size); "
            "resize the data or set model.image_size.",
        ),
        (
            _digits(channels=4),
            None,
            "Training stream 'source': images have 4 channels; the model takes 3 "
            "(model.channels), from images of 1 or 3 channels.",
        ),
        (
            _digits(dtype=np.int64),
            None,
            "Training stream 'source': images of dtype int64; expected uint8 or floats.",
        ),
    ],
    ids=[
        "negative",
        "too_large",
        "float_labels",
        "empty_train",
        "empty_eval",
        "size",
        "rgba",
        "int",
    ],
)
def test_bad_splits_are_named(train, evals, message):
    with pytest.raises(DataError) as caught:
        validate.check_method_inputs(dann.get_config(), _method(train, evals))
    assert str(caught.value) == message


def test_grey_and_float_images_pass():
    method = _method(_digits(channels=1), {"t": _digits(dtype=np.float32)})
    validate.check_method_inputs(dann.get_config(), method)


def test_unlabelled_streams_need_no_labels_in_range():
    """The DANN target stream leaves its labels out of the batch, so they are not checked."""
    target = _digits(labels=np.full(40, 99))
    stream = Stream("target", target, 8, ("image",))
    method = methods.Method(None, None, None, (stream,), {"target_test": _digits()})
    validate.check_method_inputs(dann.get_config(), method)


def test_a_method_s_own_expectations_replace_the_model_block():
    """Multi-task resizes images and gives each task its own classes."""
    expects = Expectations(channels=3, num_classes={"source": 10, "target_test": 5})
    five = {"target_test": _digits(labels=np.arange(40) % 5)}
    resized = _method(_digits(size=(32, 32)), five, expects=expects)
    validate.check_method_inputs(dann.get_config(), resized)
    labels = np.r_[5, np.zeros(39, int)]
    too_many = _method(evals={"target_test": _digits(labels=labels)}, expects=expects)
    with pytest.raises(DataError, match=r"^Eval set 'target_test': label 5 is outside \[0, 5\) "):
        validate.check_method_inputs(dann.get_config(), too_many)


def test_a_stream_of_a_loaded_split_is_named_by_its_file(tmp_path):
    from tljax import data

    path = exported.save_split(tmp_path, "digits", "train", _digits(channels=4))
    rgba = data.load_split("digits", "train", str(tmp_path))
    with pytest.raises(DataError, match=f"^Training stream 'source' \\({path}\\): images have 4"):
        validate.check_method_inputs(dann.get_config(), _method(rgba))


def test_an_empty_exported_split_is_named_by_its_file(tmp_path):
    from tljax import data

    empty = {"image": np.zeros((0, 28, 28, 1), np.uint8), "label": np.zeros(0, np.int32)}
    path = exported.save_split(tmp_path, "embedded_digits/mnist", "test", empty)
    with pytest.raises(DataError) as caught:
        data.load_split("embedded_digits/mnist", "test", str(tmp_path))
    assert str(caught.value) == f"{path} is empty: expected at least one example."


def test_a_random_file_as_exported_split_is_named(tmp_path):
    from tljax import data

    path = exported.split_file(tmp_path, "embedded_digits/mnist", "train")
    os.makedirs(os.path.dirname(path))
    with open(path, "wb") as f:
        f.write(np.random.default_rng(0).bytes(1024))
    with pytest.raises(DataError, match=f"^{path} is not an exported split: it is not an .npz"):
        data.load_split("embedded_digits/mnist", "train", str(tmp_path))


def _patch_load_split(monkeypatch, arrays_of):
    import tljax.data

    def load_split(name, split, data_dir=None):
        del data_dir
        return arrays_of(name, split)

    monkeypatch.setattr(tljax.data, "load_split", load_split)


def test_the_trainer_stops_before_compiling_and_writes_nothing(monkeypatch, tmp_path):
    """Labels >= num_classes used to surface as a NaN at step 0 with advice on the lr."""
    monkeypatch.setattr(train, "compile_train_step", _fail_if_called)
    bad = _digits(labels=np.r_[np.arange(10), np.full(30, 10)])
    _patch_load_split(monkeypatch, lambda name, split: bad if split == "test" else _digits())
    with pytest.raises(DataError, match=r"^Eval set 'source_test': label 10 is outside \[0, 10\)"):
        train.train_and_evaluate(dann.get_config(), str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_the_trainer_checks_the_config_before_loading_data(monkeypatch, tmp_path):
    _patch_load_split(monkeypatch, _fail_if_called)
    config = dann.get_config()
    config.checkpoint.every = 0
    with pytest.raises(ConfigError, match=r"^checkpoint.every=0 must be positive\.$"):
        train.train_and_evaluate(config, str(tmp_path))


def _fail_if_called(*args, **kwargs):
    raise AssertionError("reached past validation")


def test_multitask_checks_each_task_against_its_own_classes(monkeypatch):
    def arrays_of(name, split):
        if name.endswith("mnist_m") and split == "test":
            return _digits(size=(32, 32), labels=np.r_[11, np.arange(10), np.zeros(29, int)])
        return _digits(size=(32, 32) if name.endswith("mnist_m") else (28, 28))

    _patch_load_split(monkeypatch, arrays_of)
    config = multitask.get_config()
    method = methods.build(config)
    with pytest.raises(DataError, match=r"^Eval set 'mnist_m_test': label 11 is outside \[0, 10\)"):
        validate.check_method_inputs(config, method)


@pytest.mark.parametrize("model, steps, ok", [("eszsl", 0, True), ("dap", 0, False)])
def test_zero_steps_pass_for_closed_form_zero_shot_only(monkeypatch, model, steps, ok):
    _patch_load_split(monkeypatch, lambda name, split: _digits(n=200, channels=1))
    config = zeroshot.get_config(f"model={model}")
    config.train.steps = steps
    method = methods.build(config)
    if ok:
        validate.check_method_inputs(config, method)
    else:
        with pytest.raises(ConfigError, match="train.steps=0 must be positive"):
            validate.check_method_inputs(config, method)


# ----------------------------------------------------------------- files ----


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_a_random_state_dict_file_is_named(tmp_path, suffix):
    path = tmp_path / f"resnet{suffix}"
    path.write_bytes(np.random.default_rng(0).bytes(1024))
    with pytest.raises(DataError) as caught:
        validate.read_state_dict(str(path))
    message = str(caught.value)
    problem = "is not an .npz (zip) archive" if suffix == ".npz" else "cannot be read (Safetensor"
    assert message.startswith(f"transfer.init_from={str(path)!r} {problem}")
    assert "expected a PyTorch state_dict" in message and "\n" not in message


def test_an_empty_or_non_numeric_state_dict_is_named(tmp_path):
    np.savez(tmp_path / "empty.npz")
    with pytest.raises(DataError, match="empty.npz' holds no tensors"):
        validate.read_state_dict(str(tmp_path / "empty.npz"))
    np.savez(tmp_path / "text.npz", names=np.array(["conv1.weight"]))
    with pytest.raises(DataError, match=r"\['names'\] are not numeric tensors"):
        validate.read_state_dict(str(tmp_path / "text.npz"))


def test_init_from_a_file_that_does_not_fit_names_it(tmp_path):
    import jax

    from tljax import transfer
    from tljax.methods import image_model_fns
    from tljax.models import make_classifier

    path = tmp_path / "weights.npz"
    np.savez(path, weight=np.zeros(3, np.float32))
    config = dann.get_config()
    config.transfer = {"init_from": str(path)}
    _, init_params = image_model_fns(make_classifier(config.model), config.model)
    with pytest.raises(DataError, match=f"^transfer.init_from={str(path)!r} does not fit"):
        transfer.make_plan(config, init_params, jax.random.key(0))


# ------------------------------------------------------------ command line ----


@pytest.fixture
def parse(monkeypatch, capsys):
    """Runs launch.py's flags parser here; returns (exit code, stderr) of a failed parse."""
    from absl import flags

    import launch  # noqa: F401  (defines the flags)

    monkeypatch.chdir(ROOT)

    def run(*args):
        argv = ["launch.py", *args, "--workdir=unused"]
        monkeypatch.setattr(sys, "argv", argv)  # config_flags reads sys.argv.
        with pytest.raises(SystemExit) as caught:
            cli.flags_parser("config")(argv)
        return caught.value.code, capsys.readouterr().err

    yield run
    flags.FLAGS.unparse_flags()


def test_flags_name_a_variant_value_with_its_key_and_type(parse):
    code, err = parse("--config=configs/dann.py:seed=abc")
    assert code == cli.EXIT_BAD_INPUT
    assert (
        err
        == "Error: --config=configs/dann.py:seed=abc: Config variant seed='abc' is not an int.\n"
    )


def test_flags_name_an_unknown_override_with_close_matches(parse):
    code, err = parse("--config=configs/dann.py", "--config.train.stesp=2")
    assert code == cli.EXIT_BAD_INPUT
    assert err == (
        "Error: Unknown config field --config.train.stesp: train has no field 'stesp'; "
        "did you mean 'steps'?\n"
    )
    _, err = parse("--config=configs/dann.py", "--config.trian.steps=2")
    assert "the config has no field 'trian'; did you mean 'train'?" in err


def test_flags_name_a_missing_config_file(parse):
    code, err = parse("--config=configs/dan.py:seed=1", "--config.train.steps=2")
    assert code == cli.EXIT_BAD_INPUT
    assert err.startswith("Error: --config=configs/dan.py:seed=1: config file 'configs/dan.py' ")
    assert err.count("\n") == 1


def test_a_bug_in_a_config_file_keeps_its_traceback(parse, tmp_path):
    buggy = tmp_path / "buggy.py"
    buggy.write_text("def get_config(arg=None):\n    return 1 + 'a'\n")
    code, err = parse(f"--config={buggy}")
    assert code == 1
    assert "Traceback" in err and "TypeError: unsupported operand" in err


def test_flag_value_reads_both_spellings():
    assert cli.flag_value(["p", "--config=a.py:x=1", "--config.b=2"], "config") == "a.py:x=1"
    assert cli.flag_value(["p", "--config", "a.py"], "config") == "a.py"
    assert cli.flag_value(["p", "--", "--config=a.py"], "config") is None


def test_report_on_runs_that_are_not_a_sweep_writes_nothing(tmp_path):
    from tljax import report

    (tmp_path / "dann").mkdir()
    results = {"config": {"method": "dann"}, "final": {"target_test/accuracy": 0.6}}
    (tmp_path / "dann" / "results.json").write_text(json.dumps(results))
    with pytest.raises(DataError, match="no config.experiment.mode / .n to group by: expected"):
        report.write_report(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["dann"]


def _run(*args, timeout=120):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--config=configs/no_such.py"],
            "Error: --config=configs/no_such.py: config file 'configs/no_such.py' does not exist",
        ),
        (["--config=configs/dann.py", "--config.train.batch_size=0"], "Error: train.batch_size=0"),
        (
            ["--config=configs/dann.py", "--config.train.stesp=2"],
            "Error: Unknown config field --config.train.stesp",
        ),
    ],
    ids=["missing_file", "batch_size", "unknown_field"],
)
def test_launch_prints_one_line_and_creates_no_workdir(tmp_path, flags, message):
    proc = _run("launch.py", *flags, f"--workdir={tmp_path / 'run'}")
    assert proc.returncode == cli.EXIT_BAD_INPUT
    assert proc.stderr.startswith(message) and proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_launch_names_a_split_of_the_wrong_size_before_training(tmp_path):
    arrays = tmp_path / "arrays"
    for name in ("embedded_digits/mnist", "embedded_digits/mnist_m"):
        for split in ("train", "test"):
            size = (32, 32) if (name, split) == ("embedded_digits/mnist_m", "test") else (28, 28)
            exported.save_split(arrays, name, split, _digits(size=size))
    proc = _run(
        "launch.py",
        "--config=configs/dann.py",
        f"--config.data.data_dir={arrays}",
        f"--workdir={tmp_path / 'run'}",
        timeout=300,
    )
    assert proc.returncode == cli.EXIT_BAD_INPUT, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    test_file = exported.split_file(arrays, "embedded_digits/mnist_m", "test")
    assert last == (
        f"Error: Eval set 'target_test' ({test_file}): images are 32x32, expected 28x28 "
        "(model.image_size); resize the data or set model.image_size."
    )
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


@pytest.mark.slow
def test_report_cli_prints_one_line(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text(json.dumps({"final": {}}))
    proc = _run("-m", "tljax.report", str(tmp_path))
    assert proc.returncode == cli.EXIT_BAD_INPUT
    assert proc.stderr.startswith("Error: Run run has no config.experiment.mode")
    assert not (tmp_path / "report.csv").exists()
