"""How transferable are features? (Yosinski et al. 2014): AnB / BnB(+) layer-transfer sweeps.

  python launch.py --config=configs/layer_transfer.py --workdir=runs/yosinski --sweep
  python -m tljax.report runs/yosinski

The classes are split into halves A and B. baseA / baseB are the 8-layer ConvNet8 trained on
each half. For n = 1..7 (its transferable layers, in forward order):
  BnB   first n layers copied from baseB and frozen, the rest re-initialised, trained on B
  BnB+  the same with every layer fine-tuned
  AnB   first n layers copied from baseA and frozen, the rest re-initialised, trained on B
  AnB+  the same with every layer fine-tuned
Every network is evaluated on B's test set ('test/accuracy').

Variants of a single run (after ':', comma separated):
  mode=base|BnB|BnB+|AnB|AnB+  (default base), half=A|B (base only), n=N, seed=N,
  init_from=DIR (the base run to copy from), data=embedded|embedded_mnist_m|cifar100,
  split=random|dissimilar, split_seed=N (the random split's seed)
Sweep-only: num_seeds=N (default 2), ns=1-7 (the n values: a range a-b or a list 1/4/7).

data=embedded (default) splits the 10 embedded MNIST digits 5/5; data=embedded_mnist_m the
same digits on photo backgrounds (harder, so the curves separate more); data=cifar100 splits
tfds cifar100 50/50 (needs the dataset, BUILD.md). split=dissimilar uses the class groups in
DISSIMILAR_SPLITS (digits: curved vs straight-stroked, a stand-in for the paper's natural vs
man-made ImageNet halves).

Reproduces (2 seeds; python benchmarks/layer_transfer.py, docs/results/yosinski_mnist.md):
baseB 0.978; AnB falls from 0.980 (n=1) to 0.932 (n=7); AnB+ (0.977-0.985) and BnB(+)
(0.977-0.983) stay around baseB (no co-adaptation dip on this small net).
data=embedded_mnist_m (docs/results/yosinski_mnist_m.md): baseB 0.927; AnB falls from 0.917
(n=1) to 0.859 (n=7); AnB+ 0.909-0.923.
"""

import ml_collections
import numpy as np

from configs import pretrain
from tljax.config_utils import parse_arg

DATASETS = {
    "embedded": ("embedded_digits/mnist", 10, (28, 28)),
    "embedded_mnist_m": ("embedded_digits/mnist_m", 10, (28, 28)),
    "cifar100": ("cifar100", 100, (32, 32)),
}
_CURVED_VS_STRAIGHT = ((0, 3, 6, 8, 9), (1, 2, 4, 5, 7))
DISSIMILAR_SPLITS = {"embedded": _CURVED_VS_STRAIGHT, "embedded_mnist_m": _CURVED_VS_STRAIGHT}
MODES = ("base", "BnB", "BnB+", "AnB", "AnB+")
TRANSFERABLE_LAYERS = 7  # ConvNet8 has 8 layers; the last is the new classifier.


def class_halves(data: str, split: str, split_seed: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Classes of halves A and B.

    Args:
      data: a key of DATASETS.
      split: 'random' (seeded by split_seed) or 'dissimilar' (DISSIMILAR_SPLITS).
      split_seed: seed of the random split.

    Returns:
      (A classes, B classes), each sorted.

    Raises:
      ValueError: an unknown split, or no dissimilar split defined for `data`.
    """
    num_classes = DATASETS[data][1]
    if split == "random":
        order = np.random.default_rng(split_seed).permutation(num_classes)
        half = num_classes // 2
        return tuple(sorted(order[:half].tolist())), tuple(sorted(order[half:].tolist()))
    if split == "dissimilar":
        if data not in DISSIMILAR_SPLITS:
            raise ValueError(
                f"No dissimilar split is defined for data={data}; add one to "
                "configs/layer_transfer.py DISSIMILAR_SPLITS."
            )
        return DISSIMILAR_SPLITS[data]
    raise ValueError(f"split={split!r}; use random or dissimilar.")


def _parse(arg):
    return parse_arg(
        arg,
        mode="base",
        half="A",
        n=0,
        seed=0,
        init_from="",
        data="embedded",
        split="random",
        split_seed=0,
        num_seeds=2,
        ns=f"1-{TRANSFERABLE_LAYERS}",
    )


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """One point of the ablation; `arg` e.g. 'mode=AnB,n=3,init_from=runs/yosinski/baseA_seed0'."""
    arg = _parse(arg)
    mode, n = arg["mode"], arg["n"]
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; choose one of {MODES}.")
    if arg["data"] not in DATASETS:
        raise ValueError(f"data={arg['data']!r}; choose one of {sorted(DATASETS)}.")
    if mode != "base" and not 1 <= n <= TRANSFERABLE_LAYERS:
        raise ValueError(f"mode={mode} needs 1 <= n <= {TRANSFERABLE_LAYERS}, got n={n}.")
    if mode != "base" and not arg["init_from"]:
        raise ValueError(f"mode={mode} copies from a base run: set init_from=<its workdir>.")
    if arg["half"] not in ("A", "B"):
        raise ValueError(f"half={arg['half']!r}; use A or B.")
    dataset, _, image_size = DATASETS[arg["data"]]
    halves = dict(
        zip("AB", class_halves(arg["data"], arg["split"], arg["split_seed"]), strict=True)
    )
    trained_half = arg["half"] if mode == "base" else "B"

    config = pretrain.classifier_config(dataset, dataset, halves[trained_half], arg["seed"])
    config.data.eval_sets = {"test": dataset}
    config.model.name = "convnet8"
    config.model.image_size = image_size
    config.train.steps = 500
    config.eval.every = 500
    config.checkpoint.every = 500
    config.lr.base = 0.02
    if mode != "base":
        config.transfer.init_from = arg["init_from"]
        config.transfer.copy = (f"first:{n}",)
        if not mode.endswith("+"):
            config.transfer.freeze = (f"first:{n}",)
    # Recorded in results.json for tljax.report: which curve and which n this run belongs to.
    config.experiment = ml_collections.ConfigDict(
        dict(mode=mode, n=n, half=trained_half, classes=halves[trained_half])
    )
    return config


def get_sweep(arg: str | None = None) -> list[dict]:
    """baseA and baseB, then BnB, BnB+, AnB, AnB+ for n = 1..7, for each seed.

    Args:
      arg: the same variant string as get_config (data, split, split_seed, num_seeds).

    Returns:
      Sweep points (see tljax/sweep.py); transfer points depend on their base run.
    """
    parsed = _parse(arg)
    common = f"data={parsed['data']},split={parsed['split']},split_seed={parsed['split_seed']}"
    points = []
    for seed in range(parsed["num_seeds"]):
        for half in "AB":
            points.append(
                dict(name=f"base{half}_seed{seed}", arg=f"{common},half={half},seed={seed}")
            )
        for n in pretrain.parse_classes(parsed["ns"]):
            for mode in MODES[1:]:
                base = f"base{mode[0]}_seed{seed}"
                points.append(
                    dict(
                        name=f"{mode.replace('+', 'plus')}_n{n}_seed{seed}",
                        arg=f"{common},mode={mode},n={n},seed={seed},init_from={{root}}/{base}",
                        depends_on=(base,),
                    )
                )
    return points
