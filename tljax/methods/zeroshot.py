"""Zero-shot learning: DAP, attribute embedding, ConSE and closed-form ESZSL.

Seen classes have labelled training examples; unseen classes only their descriptions
(binary attributes for DAP, semantic embeddings for the others; see `tljax.zeroshot`).
`config.zeroshot.model` picks the model:

* ``dap`` (Lampert et al. 2009): one sigmoid output per attribute, trained with binary
  cross-entropy on the seen classes' signatures; a class z scores
  sum_m log p(a_m^z | x) - log p(a_m^z) (`scoring.dap_log_scores`).
* ``embedding``: the network maps x into the class-embedding space; class z scores
  cos(g(x), s_z); trained with softmax cross-entropy over the seen classes' cosines times
  `zeroshot.embedding_scale`, so that unseen classes are scored by the same rule. (An
  unnormalised dot product fits the seen classes as well but, free to use the length of
  g(x), transfers to unseen digits at chance level: 0.34 vs 0.62 ZSL top-1 on split 0.)
* ``conse`` (Norouzi et al. 2014): a softmax classifier over the seen classes; f(x) is the
  probability-weighted mean of the top-T seen-class embeddings, class z scores cos(f(x), s_z).
* ``eszsl`` (Romera-Paredes & Torr 2015): the closed-form linear map of the input features
  (raw pixels for digits) into the embedding space; nothing is trained (train.steps=0).

Every model is evaluated on the GZSL test set (test images of seen and unseen classes):
zero-shot top-1 restricted to the unseen classes, GZSL seen / unseen accuracy over all
classes and their harmonic mean, all per-class means (`Method.summarize_eval`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from tljax import ops
from tljax.collapse import Classifier
from tljax.data.pipeline import Stream
from tljax.data.preprocess import to_float_images
from tljax.methods import Method
from tljax.models.digits import DigitFeatures, MLPHead
from tljax.validate import Expectations
from tljax.zeroshot import data as zsl_data
from tljax.zeroshot import proposed_split, scoring

MODELS = ("dap", "embedding", "conse", "eszsl")


class ZeroShotNet(nn.Module):
    """Optional digit conv features, then a dense head of `out_dim` float32 outputs.

    Params are {'feature': ..., 'head': ...} ('feature' only with `conv_features`).
    """

    out_dim: int
    hidden: tuple[int, ...] = (100,)
    conv_features: bool = True
    conv: ops.ModuleDef = nn.Conv
    pool: Callable[..., jax.Array] = nn.max_pool
    dtype: Any = None

    def setup(self):
        if self.conv_features:
            self.feature = DigitFeatures(self.conv, self.pool, self.dtype)
        self.head = MLPHead((*self.hidden, self.out_dim), dtype=self.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """The head's float32 outputs for inputs `x` (images or feature vectors)."""
        return self.classify(self.features(x))

    def features(self, x: jax.Array) -> jax.Array:
        """The digit features of images, or the feature vectors `x` themselves."""
        return self.feature(x) if self.conv_features else x

    def classify(self, features: jax.Array) -> jax.Array:
        """The head's outputs, in float32."""
        return self.head(features).astype(jnp.float32)


def load_data(config: ml_collections.ConfigDict) -> zsl_data.ZeroShotData:
    """The zero-shot dataset named by `config.data.dataset`.

    Args:
      config: experiment config; `data.dataset` is a proposed-split name (awa2, cub, sun,
        awa1, apy; read from `data.zsl_root`) or a tfds digit dataset (split by
        `data.split` into seen and `data.num_unseen` unseen digits).

    Returns:
      The `ZeroShotData`.

    Raises:
      ValueError: a proposed-split dataset without `data.zsl_root`.
    """
    name = config.data.dataset
    if name in proposed_split.DATASET_FOLDERS:
        if not config.data.zsl_root:
            folder = proposed_split.DATASET_FOLDERS[name]
            raise ValueError(
                f"data.dataset={name!r} reads {proposed_split.FEATURE_FILE} and "
                f"{proposed_split.SPLIT_FILE} from <zsl_root>/{folder}/; set "
                "--config.data.zsl_root (see BUILD.md)."
            )
        return proposed_split.load(config.data.zsl_root, name)
    return zsl_data.digits(name, config.data.split, config.data.num_unseen, config.data.data_dir)


def _flat_inputs(inputs: np.ndarray) -> np.ndarray:
    """Inputs as float32 rows: images scaled to [0, 1] and flattened, features as they are."""
    flat = np.asarray(inputs).reshape(len(inputs), -1).astype(np.float32)
    return flat / 255.0 if np.asarray(inputs).dtype == np.uint8 else flat


def build(config: ml_collections.ConfigDict) -> Method:
    """A zero-shot model (`config.zeroshot.model`) on `config.data`'s dataset.

    Args:
      config: experiment config with `data`, `model`, `zeroshot` and `train` blocks.

    Returns:
      The `Method`: one labelled stream of seen-class examples; one eval set 'test'
      (seen and unseen classes) summarised into ZSL / GZSL per-class accuracies.

    Raises:
      ValueError: an unknown model, or train.steps != 0 for the closed-form ESZSL.
    """
    kind = config.zeroshot.model
    if kind not in MODELS:
        raise ValueError(f"zeroshot.model={kind!r}; choose one of {MODELS}.")
    if kind == "eszsl" and config.train.steps != 0:
        raise ValueError("zeroshot.model='eszsl' is closed form: set train.steps=0.")
    zsd = load_data(config)
    key = zsd.input_key
    seen, unseen = zsd.seen_classes, zsd.unseen_classes
    attrs = jnp.asarray(zsd.class_attributes)
    embeddings = jnp.asarray(zsd.class_embeddings, jnp.float32)
    seen_index = np.full(zsd.num_classes, -1, np.int32)
    seen_index[seen] = np.arange(len(seen))
    seen_index = jnp.asarray(seen_index)
    seen_attrs = zsd.class_attributes[seen]
    # An attribute with one value over every seen class has nothing to learn from.
    learnable = jnp.asarray((seen_attrs.min(0) != seen_attrs.max(0)).astype(np.float32))
    prior = jnp.asarray(seen_attrs.mean(0))

    out_dim = {"dap": attrs.shape[1], "embedding": embeddings.shape[1], "conse": len(seen)}
    conv_ops = ops.conv_from_config(config.model)
    model = ZeroShotNet(
        out_dim=out_dim.get(kind, 1),
        hidden=tuple(config.model.hidden),
        conv_features=key == "image",
        conv=conv_ops.conv,
        pool=conv_ops.pool,
        dtype=jnp.dtype(config.model.dtype),
    )
    if model.conv_features and conv_ops.microbatch:
        model = ops.MicrobatchedFeatures(model, conv_ops.microbatch)
    example = zsd.train[key][:1]

    def preprocess(inputs):
        if key == "image":
            return to_float_images(inputs, inputs.shape[-1], jnp.dtype(config.model.dtype))
        return inputs.astype(jnp.float32)

    if kind == "eszsl":
        projection = scoring.eszsl_projection(
            _flat_inputs(zsd.train[key]),
            np.asarray(seen_index)[zsd.train["label"]],
            zsd.class_embeddings[seen],
            config.zeroshot.eszsl_gamma,
            config.zeroshot.eszsl_lambda,
        )
        init_params = lambda rng: {"projection": jnp.asarray(projection)}
    else:
        init_params = lambda rng: model.init(rng, preprocess(jnp.asarray(example)))["params"]

    def outputs(params, inputs):
        return model.apply({"params": params}, preprocess(inputs))

    def loss_fn(params, batch, rng, step):
        del rng, step  # Deterministic network, constant objective.
        if kind == "eszsl":
            raise AssertionError("ESZSL has no training steps.")
        out, labels = outputs(params, batch[f"seen_{key}"]), batch["seen_label"]
        if kind == "dap":
            targets = attrs[labels]
            loss = optax.sigmoid_binary_cross_entropy(out, targets).mean()
            return loss, {"attribute_accuracy": ((out > 0) == (targets > 0.5)).mean()}
        if kind == "embedding":
            logits = config.zeroshot.embedding_scale * scoring.cosine_scores(out, embeddings[seen])
        else:
            logits = out
        targets = seen_index[labels]
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
        return loss, {"seen_train_accuracy": (logits.argmax(-1) == targets).mean()}

    def scores(params, inputs):
        if kind == "eszsl":
            flat = preprocess(inputs).reshape(len(inputs), -1)
            return flat @ params["projection"] @ embeddings.T
        out = outputs(params, inputs)
        if kind == "dap":
            return scoring.dap_log_scores(
                out, attrs, prior, config.zeroshot.dap_prob_floor, learnable
            )
        if kind == "embedding":
            return scoring.cosine_scores(out, embeddings)
        combined = scoring.conse_embeddings(
            jax.nn.softmax(out), embeddings[seen], config.zeroshot.conse_top_t
        )
        return scoring.cosine_scores(combined, embeddings)

    candidates = {
        "zsl": np.isin(np.arange(zsd.num_classes), unseen),
        "gzsl": np.ones(zsd.num_classes, bool),
        "seen": np.isin(np.arange(zsd.num_classes), seen),
    }

    def eval_fn(params, batch):
        class_scores, labels = scores(params, batch[key]), batch["label"]
        in_class = jax.nn.one_hot(labels, zsd.num_classes) * batch["mask"][:, None]
        sums = {"count_per_class": in_class.sum(0), "count": batch["mask"].sum()}
        for name, allowed in candidates.items():
            hit = scoring.restrict_to(class_scores, allowed).argmax(-1) == labels
            sums[f"{name}_correct"] = (hit[:, None] * in_class).sum(0)
        return sums

    def summarize_eval(sums):
        count = sums["count_per_class"]
        accuracy = lambda name, classes: scoring.mean_class_accuracy(
            sums[f"{name}_correct"], count, classes
        )
        gzsl_seen, gzsl_unseen = accuracy("gzsl", seen), accuracy("gzsl", unseen)
        return {
            "zsl_accuracy": accuracy("zsl", unseen),
            "gzsl_seen_accuracy": gzsl_seen,
            "gzsl_unseen_accuracy": gzsl_unseen,
            "gzsl_harmonic_mean": scoring.harmonic_mean(gzsl_seen, gzsl_unseen),
            "seen_accuracy": accuracy("seen", seen),
        }

    stream = Stream("seen", zsd.train, config.train.batch_size, (key, "label"))
    # The network is sized from the data (any image size and channels); labels are class ids.
    expects = Expectations(
        num_classes={"seen": zsd.num_classes, "test": zsd.num_classes}, trains=kind != "eszsl"
    )
    return Method(
        init_params,
        loss_fn,
        eval_fn,
        (stream,),
        {"test": zsd.test},
        summarize_eval,
        expects=expects,
        # The seen-class softmax models; DAP's binary attribute losses have no such chance level.
        classifiers=(Classifier("loss", "seen_train_accuracy", len(seen)),)
        if kind in ("embedding", "conse")
        else (),
    )
