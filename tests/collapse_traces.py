"""Records the train metrics of full-length healthy runs of the digit configs, for test_collapse.py.

  python tests/collapse_traces.py --out=tests/data/healthy_train_metrics.json --workdir=/tmp/traces

Runs the default variant of every config in configs/ but the image benchmarks (which read
folders that are not shipped), and the variants a config needs to run at all (finetune and
progressive start from the runs before them, self_taught's classifier from pixels), for its full
number of steps on the embedded data, one after the other, and writes, for each run, the metrics
the collapse monitor reads at every log step (its classifiers' loss and accuracy), the run's
status and steps. It also records a forced collapse (DANN with dann.domain_weight=10, 300 steps,
stop=False so that it runs to the end). The runs go through `tljax.train.train_and_evaluate`,
monitor included: a false alarm would show as a status other than 'ok'. Takes about 7 minutes on
2 CPU cores.
"""

import json
import os
import sys

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import dann  # noqa: E402
from tljax import collapse, sweep, train  # noqa: E402

_OUT = flags.DEFINE_string("out", "tests/data/healthy_train_metrics.json", "JSON file to write.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the runs go (new directories).")
_ONLY = flags.DEFINE_list(
    "only", None, "Record only these runs (workdir names) and keep the others from --out."
)
flags.mark_flag_as_required("workdir")

# (config spec, workdir name); '{<name>}' in a spec is that run's workdir.
RUNS = (
    ("da", "da"),
    ("dann", "dann"),
    ("source_only", "source_only"),
    ("target_only", "target_only"),
    ("pretrain", "pretrain"),
    ("finetune:init_from={pretrain}", "finetune"),
    ("finetune:variant=scratch,shots=1", "finetune_scratch_1"),
    ("finetune:variant=l2sp,shots=1,init_from={pretrain}", "finetune_l2sp_1"),
    ("layer_transfer", "layer_transfer_baseA"),
    ("layer_transfer:mode=AnB,n=3,init_from={layer_transfer_baseA}", "layer_transfer_AnB3"),
    ("multitask", "multitask"),
    ("multitask:shots=20,balancing=gradnorm", "multitask_gradnorm_20"),
    ("progressive:task=0", "progressive0"),
    ("progressive:task=1,init_from={progressive0}", "progressive1"),
    ("progressive:task=2,init_from={progressive1}", "progressive2"),
    ("self_taught:stage=classify,features=pixels,k=5", "self_taught_pixels_5"),
    ("self_taught:stage=classify,features=scratch,k=5", "self_taught_scratch_5"),
    ("zeroshot:model=embedding", "zeroshot_embedding"),
    ("zeroshot:model=conse", "zeroshot_conse"),
)


class _Recorder:
    """Wraps `collapse.Monitor.observe` to keep what every monitor is shown."""

    def __init__(self):
        self.intervals: list = []
        self.classifiers: tuple = ()
        self._observe = collapse.Monitor.observe

    def __enter__(self):
        recorder = self

        def observe(monitor, step, metrics):
            recorder.classifiers = monitor.classifiers
            watched = {
                f"train/{name}": metrics[f"train/{name}"]
                for c in monitor.classifiers
                for name in (c.loss, c.accuracy)
            }
            recorder.intervals.append((step, watched))
            return recorder._observe(monitor, step, metrics)

        collapse.Monitor.observe = observe
        return self

    def __exit__(self, *exc):
        collapse.Monitor.observe = self._observe


def _record(config, workdir: str, spec: str) -> dict:
    with _Recorder() as recorder:
        results = train.train_and_evaluate(config, workdir)
    logging.info("%s: %s, %d intervals", spec, results["status"], len(recorder.intervals))
    return {
        "config": spec,
        "steps": config.train.steps,
        "status": results["status"],
        "classifiers": [vars(c) for c in recorder.classifiers],
        "intervals": recorder.intervals,
    }


def main(argv):
    del argv
    workdirs = {name: os.path.join(_WORKDIR.value, name) for _, name in RUNS}
    kept = {}
    if _ONLY.value:
        with open(_OUT.value) as f:
            recorded = json.load(f)
        kept = {trace["config"]: trace for trace in recorded["runs"]}
    runs = []
    for spec, name in RUNS:
        if _ONLY.value and name not in _ONLY.value and spec in kept:
            runs.append(kept[spec])
            continue
        config_file, _, arg = spec.format(**workdirs).partition(":")
        module = sweep.load_config_module(os.path.join("configs", f"{config_file}.py"))
        config = module.get_config(arg or None)
        runs.append(_record(config, workdirs[name], spec))
    if _ONLY.value:
        with open(_OUT.value, "w") as f:
            json.dump({"runs": runs, "collapsed": recorded["collapsed"]}, f, indent=1)
        return
    forced = dann.get_config()
    forced.train.update(steps=300, log_every=25)
    forced.eval.every = forced.checkpoint.every = 100
    forced.dann.domain_weight = 10.0
    forced.train.collapse.stop = False
    collapsed = _record(forced, os.path.join(_WORKDIR.value, "forced_collapse"), "dann (forced)")
    with open(_OUT.value, "w") as f:
        json.dump({"runs": runs, "collapsed": collapsed}, f, indent=1)


if __name__ == "__main__":
    app.run(main)
