"""Unsupervised domain adaptation: the catalogue of methods on any two datasets.

  python launch.py --config=configs/da.py --workdir=runs/da
  python launch.py --config=configs/da.py:method=cdan_e --workdir=runs/cdan_e \\
      --config.data.source=S --config.data.target=T --config.data.data_dir=D
  python launch.py --config=configs/da.py:method=all --workdir=runs/da_all --sweep
  python -m tljax.select runs/da_all

S and T are tfds names or exported arrays (``D/<name>/<split>.npz`` holding uint8 ``image``
[N,H,W,C] and int32 ``label``, splits ``train`` and ``test``; docs/experiments.md). The default
pair is the offline MNIST -> MNIST-M shipped inside packages; ``source=`` / ``target=`` also
take the other offline digit domains by short name (mnist, mnist_m, optdigits, syn_digits).

Variants (after ':', comma separated):
  method=NAME   one recipe of RECIPES (a list of `tljax.methods.da` terms with weights, or
                SHOT); ``recommended`` (default) is RECOMMENDED; ``all`` is the sweep of every
                recipe over SCALES and seeds (with --sweep).
  scale=X       multiplies every term weight of the recipe (the sweep's hyper-parameter grid).
  source=, target=  dataset names (see above).
  seed=N, seeds=N (the sweep's seed count), scales=0.3+1 (the sweep's weights).

Every evaluation scores the label-free validators (`tljax.validators`: source_accuracy on the
source test split, entropy, im, snd, bnm, dev on 1,000 unlabelled target training images) and
``eval.select_by`` (RECOMMENDED's validator for every recipe) keeps the checkpoint its
validator ranks best (results.json ``selected``). Target labels are used only to report
``target_test/accuracy``.
"""

import ml_collections
from ml_collections.config_dict import FieldReference

from configs._common import add_folder_fields, digit_model_block, train_block
from tljax.config_utils import parse_arg
from tljax.methods import da
from tljax.validate import ConfigError

# Short names of the offline digit domains (tljax/data/embedded.py).
EMBEDDED = ("mnist", "mnist_m", "optdigits", "syn_digits")

# recipe -> (terms with weights, settings that differ from the terms' defaults, method module).
RECIPES = {
    "source_only": ("", {}, "da"),
    "dann": ("dann:1", {}, "da"),
    "cdan": ("cdan:1", {}, "da"),
    "cdan_e": ("cdan:1", {"cdan.entropy": True}, "da"),
    "mdd": ("mdd:1", {}, "da"),
    # TLlib's digit values for the discrepancy and class-balance entropy.
    "mcd": ("mcd:1", {"mcd.discrepancy_weight": 0.3, "mcd.entropy_weight": 0.03}, "da"),
    "dan": ("dan:1", {}, "da"),
    "jan": ("jan:1", {}, "da"),
    "coral": ("coral:1", {}, "da"),
    "mcc": ("mcc:1", {}, "da"),
    "entropy": ("entropy:0.1", {}, "da"),
    "bsp": ("cdan:1,bsp:0.0001", {}, "da"),
    # HAFN (R=25): the stepwise SAFN of TLlib's digit recipe (delta 0.3, + entropy 0.03)
    # doubles the norms of these unnormalised conv features every few steps and collapses by
    # step 400; TLlib applies it after a BatchNorm bottleneck this network does not have.
    "afn": ("afn:0.05", {"afn.mode": "hard"}, "da"),
    "fixmatch": ("fixmatch:1", {}, "da"),
    "dann_mcc": ("dann:1,mcc:1", {}, "da"),
    # The authors' digit settings: the last classifier layer frozen, pseudo-label weight 0.1.
    "shot": ("", {"shot.pseudo_weight": 0.1, "shot.head": "label/dense_2"}, "shot"),
}
# The recipe and validator a user who knows nothing else should run (docs/results/
# domain_adaptation.md: chosen across pairs without target labels).
RECOMMENDED = ("mcc", "im")
SCALES = "0.3+1"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Domain-adaptation config; `arg` picks a recipe, e.g. 'method=cdan_e,seed=1'."""
    arg = _parse(arg)
    method = arg["method"]
    if method == "all":
        raise ConfigError(
            "method=all is the sweep of every recipe: add --sweep (or --sweep_commands)."
        )
    if method == "recommended":
        method = RECOMMENDED[0]
    if method not in RECIPES:
        raise ConfigError(
            f"method={method!r}; choose one of {', '.join(RECIPES)}, recommended or all."
        )
    terms, settings, module = RECIPES[method]

    config = ml_collections.ConfigDict()
    config.method = module
    config.seed = arg["seed"]
    config.data = ml_collections.ConfigDict(
        dict(
            source=_dataset(arg["source"]),
            target=_dataset(arg["target"]),
            eval_split="test",
            # The labelled source split the validators score (None: eval_split).
            source_val_split=FieldReference(None, field_type=str),
            data_dir=FieldReference(None, field_type=str),
        )
    )
    add_folder_fields(config.data)
    config.model = digit_model_block()
    config.model.name = "digits"
    config.da = ml_collections.ConfigDict(
        dict(
            recipe=method,
            terms=_scaled(terms, arg["scale"]),
            grl_gamma=10.0,
            discriminator_widths=(100,),
            auxiliary_widths=(100, 100),
        )
    )
    config.update(da.term_settings())
    if module != "da":
        config[module] = ml_collections.ConfigDict(da.method_settings(module))
    for path, value in settings.items():
        block, field = path.split(".")
        config[block][field] = value

    # batch_size is per domain: 64 source + 64 target images per step. The budget of
    # benchmarks/domain_adaptation.py, where the recommendation was chosen.
    config.train = train_block(steps=1000, batch_size=64)
    config.optimizer = ml_collections.ConfigDict(
        dict(name="sgd", momentum=0.9, nesterov=False, weight_decay=0.0)
    )
    config.lr = ml_collections.ConfigDict(dict(schedule="dann", base=0.01, alpha=10.0, beta=0.75))
    config.eval = ml_collections.ConfigDict(
        dict(
            every=200,
            batch_size=500,
            validators=True,
            validator_examples=1000,
            select_by=FieldReference(RECOMMENDED[1], field_type=str),
        )
    )
    config.checkpoint = ml_collections.ConfigDict(dict(every=1000, max_to_keep=1))
    return config


def get_sweep(arg: str | None = None) -> list[dict]:
    """Every recipe (or the one named) over the weight scales and seeds.

    Args:
      arg: the same variant string as get_config; ``method`` defaults to ``all``.

    Returns:
      Sweep points (see tljax/sweep.py), named ``<recipe>_x<scale>_seed<seed>``.
    """
    arg = _parse(arg, method="all")
    recipes = list(RECIPES) if arg["method"] == "all" else [arg["method"]]
    common = f"source={arg['source']},target={arg['target']}"
    points = []
    for recipe in recipes:
        # Without terms there is no weight to scale.
        scales = ["1"] if not RECIPES[recipe][0] else arg["scales"].split("+")
        for scale in scales:
            for seed in range(arg["seeds"]):
                points.append(
                    dict(
                        name=f"{recipe}_x{scale}_seed{seed}",
                        arg=f"{common},method={recipe},scale={scale},seed={seed}",
                    )
                )
    return points


def _parse(arg: str | None, method: str = "recommended") -> dict:
    return parse_arg(
        arg,
        method=method,
        scale=1.0,
        source="mnist",
        target="mnist_m",
        seed=0,
        seeds=3,
        scales=SCALES,
    )


def _dataset(name: str) -> str:
    return f"embedded_digits/{name}" if name in EMBEDDED else name


def _scaled(terms: str, scale: float) -> str:
    pairs = da.parse_terms(terms)
    return ",".join(f"{name}:{weight * scale:g}" for name, weight in pairs)
