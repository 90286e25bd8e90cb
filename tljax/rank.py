"""Rank trained source models for a target task before fine-tuning any of them.

  python -m tljax.rank --target=embedded_digits/mnist_m --shots=10 \\
      --candidates=runs/pretrain,runs/pretrain_0-4 [--split=train] [--data_dir=DIR] \\
      [--score=all|logme|leep|nce|hscore] [--out=ranking.json]

Each candidate is the workdir of a finished classifier run (``method: classifier``, e.g.
``python launch.py --config=configs/pretrain.py --workdir=DIR``). Its recorded ``config.json``
rebuilds the network (`tljax.models.make_classifier`) and its newest checkpoint gives the params
(`tljax.transfer.load_pretrained`, what ``transfer.init_from`` reads). On the labelled target
examples (``--shots`` K per class drawn as configs/finetune.py draws them, seeded by
``--shots_seed``, or the whole ``--split``) it computes the penultimate features
(``features``) and the source-class softmax (``classify``), and from them the scores of
`tljax.ranking`: LogME and H-score on the features, LEEP on the softmax, NCE on its argmax.
LEEP and NCE work in the source label space, so a candidate may have another number of classes
than the target. Higher scores predict better transfer.

Prints a table, one row per candidate sorted by the first score (LogME for ``--score=all``),
and which candidate each score picks; ``--out`` also writes it as JSON. A missing candidate
directory, a run without a checkpoint, a run that is not a classifier, images the network does
not take, or a target that cannot be loaded end in one ``Error: ...`` line and exit status 2
before any network runs.

Papers and reference code: see `tljax.ranking`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from absl import app, flags

from tljax import cli, ranking, validate

# name -> score of (penultimate features, source-class probabilities, target labels).
SCORES: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray], float]] = {
    "logme": lambda features, probs, labels: ranking.logme(features, labels),
    "leep": lambda features, probs, labels: ranking.leep(probs, labels),
    "nce": lambda features, probs, labels: ranking.negative_conditional_entropy(
        probs.argmax(axis=1), labels
    ),
    "hscore": lambda features, probs, labels: ranking.h_score(features, labels),
}


# Scores are compared at this precision: closer values are ties (see `comparable`).
SIGNIFICANT_DIGITS = 6


class RankInputError(validate.InputError):
    """A candidate or target that cannot be ranked; the message says which and why."""


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A trained classifier run to score.

    Attributes:
      name: the workdir as given on the command line (the table's row label).
      workdir: its absolute path.
      config: the run's recorded config.
    """

    name: str
    workdir: str
    config: Any


def parse_scores(text: str) -> tuple[str, ...]:
    """``'all'`` or comma-separated score names -> the scores, in `SCORES` order.

    Raises:
      RankInputError: an unknown score name.
    """
    if text == "all":
        return tuple(SCORES)
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in SCORES]
    if unknown or not names:
        raise RankInputError(f"--score={text}: choose 'all' or any of {', '.join(SCORES)}.")
    return tuple(name for name in SCORES if name in names)


def check_candidate(path: str) -> Candidate:
    """The candidate run at ``path``, checked without loading its params.

    Args:
      path: a finished classifier run's workdir.

    Returns:
      The `Candidate`.

    Raises:
      RankInputError: no such directory, no recorded config, not a classifier run, or no
        checkpoint.
    """
    import ml_collections

    from tljax import transfer
    from tljax import workdir as workdirs
    from tljax.models import CLASSIFIERS

    where = f"Candidate {path}"
    if not os.path.isdir(path):
        raise RankInputError(f"{where} is not a directory; expected a finished run's workdir.")
    recorded, _ = workdirs.recorded_config(path)
    if recorded is None:
        raise RankInputError(
            f"{where} has no config.json or results.json: not a tljax run's workdir."
        )
    method = recorded.get("method")
    model_name = (recorded.get("model") or {}).get("name", "digits")
    if method != "classifier" or model_name not in CLASSIFIERS:
        raise RankInputError(
            f"{where} is a {method!r} run with model {model_name!r}; tljax.rank ranks classifier "
            "runs (method 'classifier', e.g. configs/pretrain.py or configs/finetune.py)."
        )
    try:
        transfer.checkpoint_directory(path)
    except FileNotFoundError:
        raise RankInputError(
            f"{where} holds no checkpoint (checkpoints/<step>/): has the run finished?"
        ) from None
    return Candidate(path, os.path.abspath(path), ml_collections.ConfigDict(recorded))


def load_target(
    name: str, split: str, data_dir: str | None, shots: int | None, shots_seed: int
) -> dict[str, np.ndarray]:
    """The labelled target examples: a split, or ``shots`` per class drawn from it.

    Args:
      name: tfds name, ``folder:<path>`` or exported name (``<data_dir>/<name>/<split>.npz``).
      split: split spec.
      data_dir: exported splits or tfds data directory; None: tfds's default.
      shots: examples per class (`tljax.data.subsets.per_class_subset`), or None for all.
      shots_seed: the draw's seed (configs/finetune.py uses the run's seed).

    Returns:
      ``{'image', 'label'}`` arrays.

    Raises:
      RankInputError: the split cannot be loaded, or a class has fewer than ``shots`` examples.
    """
    from tljax import data
    from tljax.data.subsets import per_class_subset

    if data_dir is not None and not os.path.isdir(data_dir):
        raise RankInputError(f"--data_dir={data_dir} is not a directory.")
    try:
        arrays = data.load_split(name, split, data_dir)
    except (data.DatasetUnavailableError, ValueError) as error:
        raise RankInputError(f"--target={name} split {split!r} cannot be loaded: {error}") from None
    if shots is not None:
        try:
            arrays = per_class_subset(arrays, shots, shots_seed)
        except ValueError as error:
            raise RankInputError(f"--target={name} --shots={shots}: {error}") from None
    # Folder images are decoded here, once (the scores run over them several times).
    return {key: np.asarray(value) for key, value in arrays.items()}


def check_images(candidate: Candidate, images: np.ndarray) -> None:
    """Refuses target images the candidate's network does not take (size, channels).

    Raises:
      RankInputError: with both layouts.
    """
    model = candidate.config.model
    height, width, channels = images.shape[1:]
    if (height, width) != tuple(model.image_size) or channels not in (1, model.channels):
        raise RankInputError(
            f"Candidate {candidate.name} takes {'x'.join(map(str, model.image_size))} images "
            f"of 1 or {model.channels} channels; the target's are {height}x{width}x{channels}."
        )


def restore_params(candidate: Candidate, shapes: Any) -> Any:
    """The candidate's params from its newest checkpoint, as `transfer.init_from` reads them.

    Args:
      candidate: a checked candidate.
      shapes: the params shapes of the network its config describes.

    Returns:
      The params (host arrays).

    Raises:
      RankInputError: the checkpoint holds no params, or not this network's.
    """
    from flax import traverse_util

    from tljax import transfer

    try:
        params = transfer.load_pretrained(candidate.workdir)
    except ValueError as error:
        raise RankInputError(f"Candidate {candidate.name}: {error}") from None
    found = traverse_util.flatten_dict(params, sep="/")
    wanted = traverse_util.flatten_dict(shapes, sep="/")
    differing = sorted(
        path
        for path in found.keys() | wanted.keys()
        if path not in found or path not in wanted or found[path].shape != wanted[path].shape
    )
    if differing:
        path = differing[0]
        saw = found[path].shape if path in found else "absent"
        want = wanted[path].shape if path in wanted else "absent"
        raise RankInputError(
            f"Candidate {candidate.name}'s checkpoint does not hold the params of the network its "
            f"config.json describes: {len(differing)} arrays differ, e.g. {path} (checkpoint "
            f"{saw}, network {want})."
        )
    return params


@functools.lru_cache(maxsize=8)
def _network(model_block: str) -> tuple[Callable, Any]:
    """(jitted (params, uint8 images) -> (features, softmax), params shapes) of a model block.

    Cached by the block's JSON (`_model_key`), so networks of one architecture share one
    compiled program.
    """
    import jax
    import ml_collections

    from tljax.methods import image_model_fns
    from tljax.models import make_classifier

    model_config = ml_collections.ConfigDict(json.loads(model_block))
    model = make_classifier(model_config, for_eval=True)
    preprocess, init_params = image_model_fns(model, model_config)

    @jax.jit
    def forward(params, images):
        features = model.apply({"params": params}, preprocess(images), method="features")
        logits = model.apply({"params": params}, features, method="classify")
        return features, jax.nn.softmax(logits)

    return forward, jax.eval_shape(init_params, jax.random.key(0))


def source_outputs(
    candidate: Candidate, images: np.ndarray, batch_size: int = 500
) -> tuple[np.ndarray, np.ndarray]:
    """The candidate network's penultimate features and source-class softmax on ``images``.

    Args:
      candidate: a checked candidate.
      images: uint8 [N, H, W, C] target images.
      batch_size: images per forward pass.

    Returns:
      (features [N, D], probabilities [N, num_classes of the candidate]) as float32 arrays.

    Raises:
      RankInputError: the checkpoint does not hold this network's params.
    """
    _, params_shapes = _network(_model_key(candidate.config.model))
    params = restore_params(candidate, params_shapes)
    return network_outputs(candidate.config.model, params, images, batch_size)


def network_outputs(
    model_config: Any, params: Any, images: np.ndarray, batch_size: int = 500
) -> tuple[np.ndarray, np.ndarray]:
    """Penultimate features and softmax of the network a ``model`` config block describes.

    Args:
      model_config: a config's ``model`` block (`tljax.models.make_classifier`).
      params: the network's params (e.g. a fresh initialisation, for a from-scratch reference).
      images: uint8 [N, H, W, C] images.
      batch_size: images per forward pass.

    Returns:
      (features [N, D], probabilities [N, num_classes]) as float32 arrays.
    """
    import jax

    forward, _ = _network(_model_key(model_config))
    batch_size = min(batch_size, len(images))
    features, probs = [], []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        # The last batch is padded to the others' shape so the forward pass compiles once.
        padded = np.concatenate([batch, np.zeros_like(images[: batch_size - len(batch)])])
        f, p = jax.device_get(forward(params, padded))
        features.append(f[: len(batch)])
        probs.append(p[: len(batch)])
    return np.concatenate(features), np.concatenate(probs)


def _model_key(model_config: Any) -> str:
    as_dict = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
    return json.dumps(as_dict, sort_keys=True, default=str)


def score_outputs(
    features: np.ndarray, probs: np.ndarray, labels: np.ndarray, scores: Sequence[str]
) -> dict[str, float]:
    """``scores`` of one candidate from its outputs on the labelled target examples.

    Args:
      features: [N, D] penultimate features.
      probs: [N, Cs] source-class probabilities.
      labels: [N] target labels.
      scores: names of `SCORES`.

    Returns:
      score name -> value.
    """
    return {name: SCORES[name](features, probs, labels) for name in scores}


def rank(
    candidates: Sequence[Candidate],
    target: dict[str, np.ndarray],
    scores: Sequence[str],
    batch_size: int = 500,
) -> list[dict[str, Any]]:
    """One row per candidate, ``{'candidate': name, <score>: value, ...}``, best first.

    Rows are sorted by the first of ``scores`` (descending).

    Args:
      candidates: checked candidates.
      target: the labelled target examples.
      scores: names of `SCORES`.
      batch_size: images per forward pass.

    Returns:
      The rows.
    """
    for candidate in candidates:
        check_images(candidate, target["image"])
    rows = []
    for candidate in candidates:
        features, probs = source_outputs(candidate, target["image"], batch_size)
        values = score_outputs(features, probs, target["label"], scores)
        rows.append({"candidate": candidate.name} | values)
    return sorted(rows, key=lambda row: -row[scores[0]])


def comparable(values: Sequence[float]) -> np.ndarray:
    """``values`` at `SIGNIFICANT_DIGITS` significant digits, so float noise makes ties.

    Scores equal up to rounding do not order candidates: e.g. the H-score is C - 1 for every
    network when there are no more examples than feature dimensions (`tljax.ranking.h_score`).
    """
    return np.array([float(f"{value:.{SIGNIFICANT_DIGITS}g}") for value in values])


def picks(rows: Sequence[dict[str, Any]], scores: Sequence[str]) -> dict[str, str | None]:
    """score name -> the candidate with the highest value, or None when every candidate ties.

    Args:
      rows: ``{'candidate': name, <score>: value, ...}`` per candidate.
      scores: the score names to pick by.

    Returns:
      The picks; values are compared by `comparable`.
    """
    chosen = {}
    for name in scores:
        values = comparable([row[name] for row in rows])
        tied = len(rows) > 1 and bool(np.all(values == values[0]))
        chosen[name] = None if tied else rows[int(np.argmax(values))]["candidate"]
    return chosen


def format_table(rows: Sequence[dict[str, Any]], scores: Sequence[str]) -> str:
    """The rows as a markdown table, then one line per score naming its pick."""
    lines = [
        "| candidate | " + " | ".join(scores) + " |",
        "|---|" + "---:|" * len(scores),
    ]
    for row in rows:
        lines.append(
            f"| {row['candidate']} | " + " | ".join(f"{row[s]:.4f}" for s in scores) + " |"
        )
    lines.append("")
    for name, pick in picks(rows, scores).items():
        lines.append(
            f"{name} picks {pick}" if pick else f"{name} ties for every candidate: no pick"
        )
    return "\n".join(lines)


def define_flags() -> None:
    """The command line's flags; defined only when this module runs as the program, so that
    importing it (benchmarks do) leaves absl's global flags to the importer."""
    flags.DEFINE_string("target", None, "Target dataset: tfds name or exported name.")
    flags.DEFINE_list("candidates", None, "Workdirs of finished classifier runs.")
    flags.DEFINE_integer("shots", None, "Labelled target examples per class (default: all).")
    flags.DEFINE_integer("shots_seed", 0, "Seed of the --shots draw.")
    flags.DEFINE_string("split", "train", "Target split holding the labelled examples.")
    flags.DEFINE_string("data_dir", None, "Exported splits or tfds data directory.")
    flags.DEFINE_string("score", "all", "'all' or comma-separated: logme,leep,nce,hscore.")
    flags.DEFINE_string("out", None, "Also write the ranking to this JSON file.")
    flags.DEFINE_integer("batch_size", 500, "Images per forward pass.")


def check_flags(args) -> tuple[str, ...]:
    """The flags' mistakes as `RankInputError`s, before anything loads; returns the scores.

    Args:
      args: the parsed flags (``absl.flags.FLAGS``).
    """
    if not args.target:
        raise RankInputError("--target is required: a tfds name or an exported name.")
    if not args.candidates:
        raise RankInputError("--candidates is required: comma-separated run workdirs.")
    if len(set(args.candidates)) != len(args.candidates):
        raise RankInputError(f"--candidates names a run twice: {','.join(args.candidates)}.")
    if args.shots is not None and args.shots < 1:
        raise RankInputError(f"--shots={args.shots}: give at least 1 example per class.")
    if args.batch_size < 1:
        raise RankInputError(f"--batch_size={args.batch_size} must be positive.")
    if args.out and os.path.isdir(args.out):
        raise RankInputError(f"--out={args.out} is a directory; give a .json file path.")
    return parse_scores(args.score)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    args = flags.FLAGS
    scores = check_flags(args)
    if args.verbosity < 1:
        # As launch.py: TensorFlow's C++ INFO lines (tfds loads), then Orbax's and tfds's INFO.
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
        from tljax import run_log

        run_log.quiet_library_logs()
    candidates = [check_candidate(path) for path in args.candidates]
    from tljax.data import folders

    # A folder target is read at the (first) candidate's image size and channels.
    with folders.reading(folders.FolderOptions.from_config(candidates[0].config)):
        target = load_target(args.target, args.split, args.data_dir, args.shots, args.shots_seed)
    rows = rank(candidates, target, scores, args.batch_size)
    shots = f"{args.shots} per class (seed {args.shots_seed})" if args.shots else "all"
    print(
        f"{args.target} {args.split}: {len(target['label'])} labelled examples, {shots}, "
        f"{len(np.unique(target['label']))} classes\n"
    )
    print(format_table(rows, scores))
    if args.out:
        report = dict(
            target=args.target,
            split=args.split,
            shots=args.shots,
            shots_seed=args.shots_seed,
            examples=len(target["label"]),
            scores=list(scores),
            candidates=rows,
            picks=picks(rows, scores),
        )
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"\nWrote {args.out}")


if __name__ == "__main__":
    define_flags()
    app.run(cli.exit_cleanly(main))
