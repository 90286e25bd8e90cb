"""Progressive neural networks: a sequence of three digit tasks, one column each.

  for k in 0 1 2; do
    python launch.py --config=configs/progressive.py:task=$k \
        --workdir=runs/progressive/progressive/task$k
  done

Task k's run starts from task k-1's workdir (`init_from`, default
runs/progressive/<variant>/task<k-1>): columns 0..k-1 are copied and frozen (transfer.freeze),
column k and its lateral adapters are new. Every run reports the test accuracy of every task so
far; with variant=progressive or independent the earlier tasks' numbers stay exactly the same.

The sequence (data=embedded, no download): `digits04` (embedded MNIST digits 0-4) ->
`digits59` (digits 5-9) -> `mnist_m` (all ten digits as MNIST-M-style images). data=full uses
tfds `mnist` and `mnist_m` (BUILD.md).

Variants (after ':', comma separated):
  task=K             which task of the sequence this run trains (0, 1, 2)
  variant=progressive (default)  new column with lateral adapters from every earlier column
          independent            new column without adapters (no transfer, no forgetting)
          finetune               one trunk fine-tuned on each task, a new head per task
                                 (transfer, but earlier tasks are forgotten)
  init_from=DIR      the previous task's workdir (default runs/progressive/<variant>/task<K-1>)
  data=embedded|full, seed=N

Reproduces (benchmarks/progressive_digits.py: 200 steps per task, seeds 0-1;
docs/results/progressive.md): progressive and independent columns keep digits04 at 0.973 and
digits59 at 0.966 / 0.969 exactly through task 2; fine-tuning reaches 0.851 on mnist_m
(progressive 0.668, independent 0.674) but drops digits04 to 0.892 and digits59 to 0.900.
"""

import ml_collections
from ml_collections.config_dict import FieldReference

from configs._common import add_folder_fields, add_training_blocks, transfer_block
from tljax.config_utils import parse_arg

VARIANTS = ("progressive", "independent", "finetune")
SEQUENCE = ("digits04", "digits59", "mnist_m")
DATASETS = {
    "embedded": ("embedded_digits/mnist", "embedded_digits/mnist_m"),
    "full": ("mnist", "mnist_m"),
}


def task_transfer(variant: str, task: int, init_from: str | None) -> ml_collections.ConfigDict:
    """What task `task`'s run takes from the previous run and what it keeps frozen.

    Args:
      variant: one of VARIANTS.
      task: index of the task trained by this run.
      init_from: the previous task's workdir (unused for task 0).

    Returns:
      The `transfer` block: nothing for task 0; for progressive / independent columns, copy and
      freeze columns 0..task-1; for fine-tuning, copy everything but the new head, freeze nothing.
    """
    if task == 0:
        return transfer_block()
    earlier = tuple(f"column_{k}" for k in range(task))
    if variant == "finetune":
        return transfer_block(init_from, reinit=(f"column_0/head_{task}",))
    return transfer_block(init_from, copy=earlier, freeze=earlier)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Progressive-network config; `arg` picks a variant, e.g. 'task=1,variant=finetune'."""
    arg = parse_arg(arg, task=0, variant="progressive", init_from="", data="embedded", seed=0)
    if arg["variant"] not in VARIANTS:
        raise ValueError(f"variant={arg['variant']!r}; choose one of {VARIANTS}.")
    if arg["data"] not in DATASETS:
        raise ValueError(f"data={arg['data']!r}; choose one of {sorted(DATASETS)}.")
    task = arg["task"]
    if not 0 <= task < len(SEQUENCE):
        raise ValueError(f"task={task}; the sequence {SEQUENCE} has tasks 0..{len(SEQUENCE) - 1}.")
    init_from = arg["init_from"] or f"runs/progressive/{arg['variant']}/task{task - 1}"
    mnist, mnist_m = DATASETS[arg["data"]]

    config = ml_collections.ConfigDict()
    config.method = "progressive"
    config.seed = arg["seed"]
    config.data = ml_collections.ConfigDict(
        dict(train_split="train", eval_split="test", data_dir=FieldReference(None, field_type=str))
    )
    add_folder_fields(config.data)
    config.tasks = ml_collections.ConfigDict(
        dict(
            digits04=dict(dataset=mnist, classes=(0, 1, 2, 3, 4)),
            digits59=dict(dataset=mnist, classes=(5, 6, 7, 8, 9)),
            mnist_m=dict(dataset=mnist_m, classes=None),
        )
    )
    config.progressive = ml_collections.ConfigDict(
        dict(
            sequence=SEQUENCE,
            task=task,
            mode=arg["variant"],
            adapter_reduction=4,  # V maps a lateral input to 1/4 of its channels / units.
            adapter_alpha_init=0.1,  # alpha starts uniform in [0, 0.1): Rusu's "small random".
        )
    )
    config.model = ml_collections.ConfigDict(
        dict(
            image_size=(28, 28),
            channels=3,
            conv_widths=(32, 48),
            dense_widths=(100, 100),
            conv_impl="auto",
            # 'bfloat16': bf16 conv matmul operands, fp32 accumulation (docs/experiments.md).
            conv_operands="float32",
            dtype="float32",
        )
    )
    add_training_blocks(config, steps=600, batch_size=64, eval_every=600)
    config.transfer = task_transfer(arg["variant"], task, init_from)
    return config
