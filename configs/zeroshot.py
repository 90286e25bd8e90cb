"""Zero-shot learning: DAP, attribute embedding, ConSE, ESZSL (tljax/methods/zeroshot.py).

  python launch.py --config=configs/zeroshot.py --workdir=runs/zsl_dap
  python launch.py --config=configs/zeroshot.py:model=conse,split=1 --workdir=runs/zsl_conse_1
  python launch.py --config=configs/zeroshot.py:data=awa2,model=eszsl \
      --config.data.zsl_root=/data/xlsa17/data --workdir=runs/awa2_eszsl

Variants (after ':', comma separated):
  data=digits (default)   the offline embedded MNIST digits described by the seven-segment
                          attribute table (tljax/zeroshot/attributes.py); `split=N` seeds
                          which 3 of the 10 digits are unseen.
  data=awa2|cub|sun|awa1|apy  Xian et al.'s "proposed split" ResNet-101 features read from
                          <data.zsl_root>/<AWA2|CUB|SUN|...>/{res101,att_splits}.mat (BUILD.md).
  model=dap|embedding|conse|eszsl   (eszsl is closed form: train.steps=0)
  split=N, seed=N, zsl_root=PATH

Reproduces (digits, 400 steps, mean over splits 0-2; docs/results/zeroshot.md): ZSL top-1
over the 3 unseen digits 0.551 (embedding), 0.431 (DAP), 0.347 (ConSE) and 0.344 (ESZSL on
pixels); chance is 1/3.
"""

import ml_collections
from ml_collections.config_dict import FieldReference

from configs._common import train_block
from tljax.config_utils import parse_arg
from tljax.methods.zeroshot import MODELS
from tljax.zeroshot.proposed_split import DATASET_FOLDERS

DIGITS = "embedded_digits/mnist"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Zero-shot config; `arg` picks a variant, e.g. 'model=conse,split=2'."""
    arg = parse_arg(arg, data="digits", model="dap", split=0, seed=0, zsl_root="")
    if arg["data"] != "digits" and arg["data"] not in DATASET_FOLDERS:
        raise ValueError(f"data={arg['data']!r}; choose digits or one of {list(DATASET_FOLDERS)}.")
    if arg["model"] not in MODELS:
        raise ValueError(f"model={arg['model']!r}; choose one of {MODELS}.")
    on_digits = arg["data"] == "digits"
    config = ml_collections.ConfigDict()
    config.method = "zeroshot"
    config.seed = arg["seed"]

    config.data = ml_collections.ConfigDict(
        dict(
            dataset=DIGITS if on_digits else arg["data"],
            # Digits: which digits are unseen is seeded by `split`.
            split=arg["split"],
            num_unseen=3,
            data_dir=FieldReference(None, field_type=str),
            # Proposed split: the folder holding AWA2/, CUB/, SUN/ (BUILD.md).
            zsl_root=FieldReference(arg["zsl_root"] or None, field_type=str),
        )
    )
    # Digits: the DANN conv features + a 100-unit hidden layer; features: a linear head.
    # conv_operands='bfloat16': bf16 conv matmul operands, fp32 accumulation (docs/experiments.md).
    config.model = ml_collections.ConfigDict(
        dict(
            hidden=(100,) if on_digits else (),
            conv_impl="auto",
            conv_operands="float32",
            dtype="float32",
        )
    )
    config.zeroshot = ml_collections.ConfigDict(
        dict(
            model=arg["model"],
            # Inverse temperature of the embedding model's softmax over cosines.
            embedding_scale=10.0,
            conse_top_t=10,  # Norouzi et al.'s T; capped at the number of seen classes.
            dap_prob_floor=1e-3,
            eszsl_gamma=1.0,
            eszsl_lambda=1.0,
        )
    )
    steps = 0 if arg["model"] == "eszsl" else (400 if on_digits else 3000)
    config.train = train_block(steps, 64 if on_digits else 256)
    config.optimizer = ml_collections.ConfigDict(dict(name="adamw", weight_decay=1e-4))
    config.lr = ml_collections.ConfigDict(dict(schedule="cosine", base=1e-3, warmup_steps=0))
    config.eval = ml_collections.ConfigDict(dict(every=200, batch_size=500))
    config.checkpoint = ml_collections.ConfigDict(dict(every=1000, max_to_keep=1))
    return config
