"""Multi-task learning: digit classes in two domains with one partly shared network.

  python launch.py --config=configs/multitask.py --workdir=runs/mtl_fixed
  python launch.py --config=configs/multitask.py:balancing=pcgrad,shots=20 --workdir=runs/mtl_pcgrad

Each step trains on one batch slice per task (sizes from the tasks' `mix` ratios, summing to
train.batch_size) and reports every task's test accuracy (`<task>_test/accuracy`), per-task train
losses, weights and the cosine between the tasks' gradients on the shared layers.

Variants (after ':', comma separated):
  data=embedded (default)  tasks `mnist` (embedded MNIST digits) and `mnist_m` (the same digits as
                           MNIST-M-style images): no download.
  data=full                tfds `mnist` and `svhn_cropped` (SVHN resized to 28x28 on device;
                           needs the datasets, BUILD.md).
  tasks=a/b                the tasks to train ('/'-separated; one task is a single-task baseline
                           with the same network and budget).
  sharing=lower (default)  shared conv trunk ('feature'), task-specific MLP and head;
          middle           task-specific input conv, shared conv_1 + dense_0 + dense_1,
                           task-specific head;
          none             nothing shared (independent networks trained side by side).
  balancing=fixed (default) | uncertainty | gradnorm | pcgrad
  shots=K                  K labelled examples per class for the second task (mnist_m or svhn),
                           which then borrows from the first; 0 (default) uses every example.
  seed=N

Any sharing pattern can be given directly: --config.multitask.shared='("first:2",)'.

Reproduces (benchmarks/multitask_digits.py: 400 steps, shots=20, seeds 0-1;
docs/results/multitask.md): mnist_m test accuracy 0.653 single-task -> 0.694 fixed, 0.708
GradNorm, 0.692 PCGrad, 0.634 uncertainty weighting; mnist stays at 0.966-0.968 in every case.
"""

import ml_collections
from ml_collections.config_dict import FieldReference

from configs._common import add_folder_fields, add_training_blocks, transfer_block
from tljax.config_utils import parse_arg

TASKS = {
    "embedded": {"mnist": "embedded_digits/mnist", "mnist_m": "embedded_digits/mnist_m"},
    "full": {"mnist": "mnist", "svhn": "svhn_cropped"},
}
SHARING = {
    "lower": ("feature",),
    "middle": ("feature/conv_1", "label/dense_0", "label/dense_1"),
    "none": (),
}
BALANCING = ("fixed", "uncertainty", "gradnorm", "pcgrad")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Multi-task config; `arg` picks a variant, e.g. 'balancing=gradnorm,sharing=middle'."""
    arg = parse_arg(
        arg, data="embedded", tasks="", sharing="lower", balancing="fixed", shots=0, seed=0
    )
    if arg["data"] not in TASKS:
        raise ValueError(f"data={arg['data']!r}; choose one of {sorted(TASKS)}.")
    if arg["sharing"] not in SHARING:
        raise ValueError(f"sharing={arg['sharing']!r}; choose one of {sorted(SHARING)}.")
    if arg["balancing"] not in BALANCING:
        raise ValueError(f"balancing={arg['balancing']!r}; choose one of {BALANCING}.")
    catalogue = TASKS[arg["data"]]
    names = arg["tasks"].split("/") if arg["tasks"] else list(catalogue)
    unknown = [name for name in names if name not in catalogue]
    if unknown:
        raise ValueError(f"tasks {unknown} unknown for data={arg['data']}; use {list(catalogue)}.")
    scarce_task = list(catalogue)[1]

    config = ml_collections.ConfigDict()
    config.method = "multitask"
    config.seed = arg["seed"]
    config.data = ml_collections.ConfigDict(
        dict(
            train_split="train",
            eval_split="test",
            data_dir=FieldReference(None, field_type=str),
        )
    )
    add_folder_fields(config.data)
    # One entry per task (ordered by name): its dataset, optional class subset (relabelled
    # 0..n-1), labelled examples per class (0: all), share of each batch, and fixed loss weight.
    config.tasks = ml_collections.ConfigDict(
        {
            name: dict(
                dataset=catalogue[name],
                classes=None,
                shots_per_class=arg["shots"] if name == scarce_task else 0,
                mix=1.0,
                weight=1.0,
            )
            for name in names
        }
    )
    config.multitask = ml_collections.ConfigDict(
        dict(
            shared=SHARING[arg["sharing"]],
            balancing=arg["balancing"],
            gradnorm_alpha=1.5,  # Chen et al. 2018's restoring force; 0 equalises grad norms.
            gradnorm_layer="",  # '': the last shared layer.
            initial_log_var=0.0,
        )
    )
    config.model = ml_collections.ConfigDict(
        dict(
            name="digits",
            image_size=(28, 28),
            channels=3,
            label_widths=(100, 100),
            conv_impl="auto",
            # 'bfloat16': bf16 conv matmul operands, fp32 accumulation (docs/experiments.md).
            conv_operands="float32",
            dtype="float32",
        )
    )
    # batch_size counts all tasks' slices together (32 + 32 by default).
    add_training_blocks(config, steps=1500, batch_size=64, eval_every=500)
    # The learned balancing parameters (log-variances, GradNorm logits) move 10x faster than
    # the network, so the weights settle within a short run.
    lr_mults = {"balance": 10.0} if arg["balancing"] in ("uncertainty", "gradnorm") else {}
    config.transfer = transfer_block(lr_mults=lr_mults)
    return config
