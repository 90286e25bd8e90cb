"""Layer-transfer ablation (Yosinski et al. 2014): runs the sweep, writes its results page.

  python benchmarks/layer_transfer.py                 # 60 runs, ~35 min on 2 CPU cores
  python benchmarks/layer_transfer.py --variant=data=embedded_mnist_m
  python benchmarks/layer_transfer.py --variant=data=embedded_mnist_m,split=dissimilar,ns=1/3/5/7

Runs every unfinished point of `configs/layer_transfer.py:<variant>` as
`python launch.py --config=configs/layer_transfer.py:<variant> --workdir=<workdir> --sweep`
does (finished points are skipped, so a sweep already run that way only gets its page), then
writes the sweep's report (`tljax.report`: report.csv, report.md, report.png in the workdir)
and the results page docs/results/yosinski_<data>[_dissimilar].md with its figure.
"""

import os
import shutil
import sys

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import results_page  # noqa: E402

_VARIANT = flags.DEFINE_string("variant", "", "configs/layer_transfer.py variant (after ':').")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "The sweep's root (default runs/yosinski_<data>[_dissimilar])."
)
_PAGE = flags.DEFINE_string(
    "page", None, "Results page (default docs/results/yosinski_<data>[_dissimilar].md; '': none)."
)

# data= value -> the name used in workdirs and pages.
DATA_NAMES = {"embedded": "mnist", "embedded_mnist_m": "mnist_m", "cifar100": "cifar100"}


def sweep_name(variant: str) -> str:
    """yosinski_<data>[_dissimilar] for a configs/layer_transfer.py variant string."""
    items = dict(item.partition("=")[::2] for item in filter(None, variant.split(",")))
    name = "yosinski_" + DATA_NAMES.get(items.get("data", "embedded"), items.get("data", ""))
    return name + ("_dissimilar" if items.get("split") == "dissimilar" else "")


def main(argv):
    del argv
    from configs import layer_transfer
    from tljax import report, sweep

    name = sweep_name(_VARIANT.value)
    workdir = _WORKDIR.value or os.path.join("runs", name)
    page = results_page.default_page(name) if _PAGE.value is None else _PAGE.value
    spec = os.path.join(ROOT, "configs", "layer_transfer.py") + (
        f":{_VARIANT.value}" if _VARIANT.value else ""
    )
    results = sweep.run_sweep(spec, workdir)
    table = report.write_report(workdir)
    print("\n" + table)
    if not page:
        return
    figure = results_page.figure_path(page)
    shutil.copyfile(os.path.join(workdir, "report.png"), figure)
    items = dict(item.partition("=")[::2] for item in filter(None, _VARIANT.value.split(",")))
    dataset = layer_transfer.DATASETS[items.get("data", "embedded")][0]
    halves = {}
    for r in results.values():
        experiment = r.get("config", {}).get("experiment", {})
        if experiment.get("mode") == "base":
            halves[experiment["half"]] = list(experiment["classes"])
    split = "dissimilar" if "dissimilar" in name else "random"
    halves = ", ".join(f"{h} = {c}" for h, c in sorted(halves.items()))
    steps = sorted({r["steps"] for r in results.values()})
    variant_suffix = f":{_VARIANT.value}" if _VARIANT.value else ""
    batch = sorted({r["config"].get("train", {}).get("batch_size") for r in results.values()})
    results_page.write_page(
        page,
        f"How transferable are features? Layer transfer on {dataset}",
        table,
        figure=figure,
        settings=(
            f"The sweep of configs/layer_transfer.py{variant_suffix} "
            f"({len(results)} runs, {'/'.join(map(str, steps))} steps of "
            f"{'/'.join(map(str, batch))} each). The classes are split into halves A and B "
            f"({split} split: {halves}); baseA and baseB are "
            "ConvNet8 (5 conv + 3 dense layers) trained on each half. For each n, the first n "
            "layers are copied from baseB (BnB) or baseA (AnB) and frozen, or fine-tuned (+), "
            "the rest re-initialised and trained on B. Cells: top-1 accuracy on B's test set, "
            "mean ± std (ddof=0) over seeds (runs in brackets)."
        ),
        notes=(
            "Yosinski et al. (2014) find that AnB falls as n grows (upper-layer features are "
            "specific to their task), more so for dissimilar halves; that AnB+ beats the base "
            "network by 1.5–2 points; and that BnB dips at n = 4–5 (co-adapted middle layers). "
            "The sweep's report (CSV, table, figure) is also in the workdir: "
            "`python -m tljax.report <workdir>` rewrites it."
        ),
    )


if __name__ == "__main__":
    app.run(main)
