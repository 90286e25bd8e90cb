"""Sweeps (expansion, order, resume, commands) and reports (aggregation, table, figure)."""

import json
import os

import pytest

from configs import layer_transfer
from tljax import report, sweep

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
LAYER_TRANSFER = os.path.join(CONFIG, "layer_transfer.py")


def test_layer_transfer_sweep_expands_with_dependencies_first():
    _, points = sweep.expand(f"{LAYER_TRANSFER}:num_seeds=3")
    assert len(points) == 3 * (2 + 7 * 4)
    position = {p.name: i for i, p in enumerate(points)}
    for point in points:
        assert all(position[d] < position[point.name] for d in point.depends_on)
    anb = next(p for p in points if p.name == "AnB_n3_seed1")
    assert anb.depends_on == ("baseA_seed1",) and "init_from={root}/baseA_seed1" in anb.arg
    assert "mode=BnB+" in next(p for p in points if p.name == "BnBplus_n7_seed2").arg


def test_order_points_validates():
    with pytest.raises(ValueError, match="unique; repeated: \\['a'\\]"):
        sweep.order_points([dict(name="a", arg=""), dict(name="a", arg="")])
    with pytest.raises(ValueError, match="unknown points: \\['c'\\]"):
        sweep.order_points([dict(name="a", arg="", depends_on=("c",))])
    with pytest.raises(ValueError, match="cycle"):
        sweep.order_points(
            [dict(name="a", arg="", depends_on=("b",)), dict(name="b", arg="", depends_on=("a",))]
        )
    ordered = sweep.order_points(
        [dict(name="x", arg="", depends_on=("y",)), dict(name="y", arg=""), dict(name="z", arg="")]
    )
    assert [p.name for p in ordered] == ["y", "z", "x"]


def test_run_sweep_resumes_and_fills_in_root(tmp_path):
    calls = []

    def fake_train(config, workdir):
        calls.append((os.path.basename(workdir), config))
        results = {"final": {"test/accuracy": 0.5}, "config": config.to_dict()}
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(results, f)
        return results

    spec = f"{LAYER_TRANSFER}:num_seeds=1,ns=2"
    lines = []
    sweep.run_sweep(spec, str(tmp_path), {"train.steps": 7}, fake_train, lines.append)
    assert [name for name, _ in calls][:2] == ["baseA_seed0", "baseB_seed0"]
    assert len(calls) == 6 and all(config.train.steps == 7 for _, config in calls)
    anb = dict(calls)["AnB_n2_seed0"]
    assert anb.transfer.init_from == os.path.join(str(tmp_path), "baseA_seed0")
    assert lines[0].startswith("[1/6] baseA_seed0: test/accuracy=0.5000")
    # Interrupted: one point lost its results; only that one runs again.
    os.remove(tmp_path / "AnBplus_n2_seed0" / "results.json")
    calls.clear()
    lines.clear()
    sweep.run_sweep(spec, str(tmp_path), {}, fake_train, lines.append)
    assert [name for name, _ in calls] == ["AnBplus_n2_seed0"]
    assert sum("skipped" in line for line in lines) == 5


def test_sweep_commands_name_each_point_and_its_dependencies(tmp_path):
    lines = sweep.sweep_commands(f"{LAYER_TRANSFER}:num_seeds=1,ns=1", str(tmp_path), {"a.b": 1})
    assert len(lines) == 6
    assert lines[0].startswith("python launch.py --config=") and "--config.a.b=1" in lines[0]
    assert lines[-1].endswith("# after: baseA_seed0")
    assert f"--workdir={tmp_path}/AnBplus_n1_seed0" in lines[-1]


def test_config_without_sweep_is_refused():
    with pytest.raises(ValueError, match="defines no get_sweep"):
        sweep.expand(os.path.join(CONFIG, "dann.py"))


def _fake_result(root, name, mode, n, half, accuracy, seed):
    os.makedirs(root / name)
    results = {
        "seed": seed,
        "final": {"test/accuracy": accuracy, "train/loss": 0.1},
        "config": {"experiment": {"mode": mode, "n": n, "half": half}},
    }
    (root / name / "results.json").write_text(json.dumps(results))


def test_report_aggregates_over_seeds(tmp_path):
    for seed, offset in enumerate((0.0, 0.1)):
        _fake_result(tmp_path, f"baseA_seed{seed}", "base", 0, "A", 0.1, seed)
        _fake_result(tmp_path, f"baseB_seed{seed}", "base", 0, "B", 0.8 + offset, seed)
        _fake_result(tmp_path, f"AnB_n1_seed{seed}", "AnB", 1, "B", 0.6 + offset, seed)
        _fake_result(tmp_path, f"AnB_n2_seed{seed}", "AnB", 2, "B", 0.4, seed)
    table = report.write_report(str(tmp_path), str(tmp_path / "out"))
    lines = table.splitlines()
    assert lines[0] == "| test/accuracy | n=1 | n=2 |"
    assert lines[2].startswith("| base (n/a) | 0.8500 ± 0.0500 (2)")  # baseA is not the reference
    assert lines[3] == "| AnB | 0.6500 ± 0.0500 (2) | 0.4000 ± 0.0000 (2) |"
    assert (tmp_path / "out" / "report.png").stat().st_size > 10_000
    csv_text = (tmp_path / "out" / "report.csv").read_text()
    assert csv_text.splitlines()[0].startswith("name,seed,experiment.mode")
    assert len(csv_text.splitlines()) == 1 + 8


def test_report_without_results_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="has the sweep run"):
        report.collect(str(tmp_path))


@pytest.mark.slow
def test_micro_sweep_end_to_end(data_dir, tmp_path):
    overrides = {
        "data.data_dir": data_dir,
        "train.steps": 2,
        "train.batch_size": 8,
        "eval.every": 2,
        "eval.batch_size": 500,
        "checkpoint.every": 2,
    }
    results = sweep.run_sweep(
        f"{LAYER_TRANSFER}:num_seeds=1,ns=1/6", str(tmp_path), overrides, log=lambda _: None
    )
    assert len(results) == 10
    frozen = results["AnB_n6_seed0"]["num_frozen_params"]
    assert 0 < frozen < results["AnB_n6_seed0"]["num_params"]
    assert results["AnBplus_n6_seed0"]["num_frozen_params"] == 0
    table = report.write_report(str(tmp_path))
    assert "| AnB+ |" in table and "n=6" in table
    assert os.path.exists(tmp_path / "report.png")
    classes_b = layer_transfer.class_halves("embedded", "random", 0)[1]
    assert tuple(results["BnB_n1_seed0"]["config"]["experiment"]["classes"]) == classes_b


def test_layer_transfer_variants():
    cifar = layer_transfer.get_config("data=cifar100,mode=AnB,n=2,init_from=/runs/baseA")
    assert cifar.data.train == "cifar100" and cifar.model.image_size == (32, 32)
    assert len(cifar.data.classes) == cifar.model.num_classes == 50
    assert cifar.transfer.copy == ("first:2",) and cifar.transfer.freeze == ("first:2",)
    halves = layer_transfer.class_halves("cifar100", "random", 0)
    assert sorted(halves[0] + halves[1]) == list(range(100))
    with pytest.raises(ValueError, match="No dissimilar split is defined for data=cifar100"):
        layer_transfer.get_config("data=cifar100,split=dissimilar")
    with pytest.raises(ValueError, match="set init_from"):
        layer_transfer.get_config("mode=BnB,n=3")
