"""Self-taught learning (Raina et al. 2007) and self-taught clustering (Dai et al. 2008).

Three stages, each one trainer run (`config.self_taught.stage`):

* ``autoencoder``: a sparse autoencoder learns patch filters from unlabelled natural image
  patches (photographs shipped in scikit-learn / scikit-image; `tljax.self_taught.patches`),
  data that shares neither the digits' classes nor their distribution. Evaluated by its
  reconstruction of patches from held-out photos.
* ``classify``: a classifier trained on k labelled digits per class, on top of
  ``features=sae`` (the filters of a finished autoencoder run, `self_taught.encoder_workdir`,
  convolved over the digit and mean-pooled), ``pixels`` (raw pixels; both with a linear
  softmax classifier) or ``scratch`` (the DANN digit convnet trained from scratch on the
  same k labels). Evaluated on the digits' test split.
* ``cluster``: k-means of the unlabelled digit test split on ``sae`` or ``pixels``
  features, run by the trainer as gradient descent (one full-batch step of learning rate 1
  is one Lloyd iteration; `tljax.self_taught.clustering`). Evaluated by NMI and clustering
  accuracy against the true digits, which the clustering never sees.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from tljax import data, ops
from tljax.collapse import Classifier
from tljax.data.pipeline import Stream
from tljax.data.preprocess import to_float_images
from tljax.data.subsets import per_class_subset
from tljax.methods import Method
from tljax.models.digits import DigitFeatures, MLPHead
from tljax.self_taught import autoencoder, clustering, patches
from tljax.validate import Expectations

STAGES = ("autoencoder", "classify", "cluster")
FEATURES = {"classify": ("sae", "pixels", "scratch"), "cluster": ("sae", "pixels")}


def patch_data(settings: ml_collections.ConfigDict):
    """(train patches, held-out patches, whitening) described by a `self_taught.patches` block."""
    return patches.natural_patches(
        settings.size,
        settings.num_train,
        settings.num_heldout,
        settings.downscale,
        settings.zca_epsilon,
        settings.seed,
    )


def load_encoder(workdir: str) -> tuple[dict, patches.Whitening, ml_collections.ConfigDict]:
    """The encoder and patch whitening of a finished ``stage=autoencoder`` run.

    The whitening is not a parameter; it is recomputed (deterministically) from the patch
    settings recorded in the run's results.json.

    Args:
      workdir: the autoencoder run's workdir.

    Returns:
      (encoder params {'kernel', 'bias'}, whitening, that run's `self_taught` block).

    Raises:
      FileNotFoundError: no finished autoencoder run in `workdir`.
      ValueError: `workdir` holds a run of another method or stage.
    """
    results_path = os.path.join(os.fspath(workdir), "results.json")
    if not os.path.isfile(results_path):
        raise FileNotFoundError(
            f"{results_path} not found: self_taught.encoder_workdir must be the workdir of a "
            "finished run of --config=configs/self_taught.py:stage=autoencoder."
        )
    with open(results_path) as f:
        run_config = json.load(f)["config"]
    run_stage = run_config.get("self_taught", {}).get("stage")
    if run_config.get("method") != "self_taught" or run_stage != "autoencoder":
        raise ValueError(
            f"{workdir} holds a {run_config.get('method')} run (stage {run_stage}), not a "
            "self_taught stage=autoencoder run."
        )
    manager = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"))
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"{workdir}/checkpoints holds no checkpoint.")
    params = manager.restore(step)["params"]
    settings = ml_collections.ConfigDict(run_config["self_taught"])
    _, _, whitening = patch_data(settings.patches)
    return jax.device_get(params["encoder"]), whitening, settings


class FewLabelClassifier(nn.Module):
    """Linear softmax on feature vectors, or the DANN digit convnet on images.

    Params are {'feature': ..., 'head': ...} ('feature' only with `conv_features`).
    """

    num_classes: int
    conv_features: bool
    conv: ops.ModuleDef = nn.Conv
    pool: Callable[..., jax.Array] = nn.max_pool

    def setup(self):
        if self.conv_features:
            self.feature = DigitFeatures(self.conv, self.pool)
        hidden = (100,) if self.conv_features else ()
        self.head = MLPHead((*hidden, self.num_classes))

    def __call__(self, x: jax.Array) -> jax.Array:
        """Class logits of inputs `x` (images or feature vectors)."""
        return self.classify(self.features(x))

    def features(self, x: jax.Array) -> jax.Array:
        """The digit features of images, or the feature vectors `x` themselves."""
        return self.feature(x) if self.conv_features else x

    def classify(self, features: jax.Array) -> jax.Array:
        """Class logits of `features`."""
        return self.head(features)


def build(config: ml_collections.ConfigDict) -> Method:
    """The self-taught stage named by `config.self_taught.stage`.

    Args:
      config: experiment config with `data`, `model`, `self_taught` and `train` blocks.

    Returns:
      The stage's `Method`.

    Raises:
      ValueError: an unknown stage or feature kind.
    """
    stage = config.self_taught.stage
    if stage not in STAGES:
        raise ValueError(f"self_taught.stage={stage!r}; choose one of {STAGES}.")
    if stage == "autoencoder":
        return _autoencoder(config)
    if config.self_taught.features not in FEATURES[stage]:
        raise ValueError(
            f"self_taught.features={config.self_taught.features!r} with stage={stage}; "
            f"choose one of {FEATURES[stage]}."
        )
    return _classifier(config) if stage == "classify" else _clustering(config)


def _autoencoder(config: ml_collections.ConfigDict) -> Method:
    settings = config.self_taught
    train_patches, heldout_patches, _ = patch_data(settings.patches)
    model = autoencoder.SparseAutoencoder(settings.hidden, train_patches.shape[1])

    def init_params(rng):
        return model.init(rng, jnp.zeros((1, train_patches.shape[1])))["params"]

    def loss_fn(params, batch, rng, step):
        del rng, step
        return autoencoder.sparse_autoencoder_loss(
            model,
            params,
            batch["patches_patch"],
            settings.sparsity_target,
            settings.sparsity_weight,
            settings.weight_decay,
        )

    def eval_fn(params, batch):
        x, mask = batch["patch"], batch["mask"]
        reconstruction, hidden = model.apply({"params": params}, x)
        return {
            "squared_error": (0.5 * jnp.sum((reconstruction - x) ** 2, -1) * mask).sum(),
            "half_energy": (0.5 * jnp.sum(x**2, -1) * mask).sum(),
            "mean_activation": (hidden.mean(-1) * mask).sum(),
            "count": mask.sum(),
        }

    def summarize_eval(sums):
        count = float(sums["count"])
        return {
            "reconstruction": float(sums["squared_error"]) / count,
            # Fraction of the whitened patches' energy the autoencoder fails to reproduce.
            "relative_error": float(sums["squared_error"]) / float(sums["half_energy"]),
            "mean_activation": float(sums["mean_activation"]) / count,
        }

    stream = Stream("patches", {"patch": train_patches}, config.train.batch_size, ("patch",))
    return Method(
        init_params,
        loss_fn,
        eval_fn,
        (stream,),
        {"heldout_patches": {"patch": heldout_patches}},
        summarize_eval,
    )


def _digit_inputs(config, images: np.ndarray) -> np.ndarray:
    """What the classifier / clustering sees of `images` for `self_taught.features`."""
    kind = config.self_taught.features
    if kind == "scratch":
        return images
    if kind == "pixels":
        return images.reshape(len(images), -1).astype(np.float32) / 255.0
    if not config.self_taught.encoder_workdir:
        raise ValueError(
            "self_taught.features='sae' needs self_taught.encoder_workdir: the workdir of a "
            "finished --config=configs/self_taught.py:stage=autoencoder run."
        )
    encoder, whitening, trained = load_encoder(config.self_taught.encoder_workdir)
    return autoencoder.digit_features(encoder, whitening, images, trained.pool_grid)


def _classifier(config: ml_collections.ConfigDict) -> Method:
    load = lambda split: data.load_split(config.data.dataset, split, config.data.data_dir)
    train, test = load("train"), load("test")
    few = per_class_subset(train, config.self_taught.labels_per_class, config.seed)
    key = "image" if config.self_taught.features == "scratch" else "feature"
    labelled = {key: _digit_inputs(config, few["image"]), "label": few["label"]}
    test_set = {key: _digit_inputs(config, test["image"]), "label": test["label"]}
    num_classes = int(train["label"].max()) + 1
    conv_ops = ops.conv_from_config(config.model)
    model = FewLabelClassifier(num_classes, key == "image", conv_ops.conv, conv_ops.pool)
    if model.conv_features and conv_ops.microbatch:
        model = ops.MicrobatchedFeatures(model, conv_ops.microbatch)

    def preprocess(inputs):
        if key == "image":
            return to_float_images(inputs, inputs.shape[-1])
        return inputs

    def logits_of(params, inputs):
        return model.apply({"params": params}, preprocess(inputs))

    def init_params(rng):
        return model.init(rng, preprocess(jnp.asarray(labelled[key][:1])))["params"]

    def loss_fn(params, batch, rng, step):
        del rng, step
        logits, labels = logits_of(params, batch[f"labelled_{key}"]), batch["labelled_label"]
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, {"train_accuracy": (logits.argmax(-1) == labels).mean()}

    def eval_fn(params, batch):
        hit = logits_of(params, batch[key]).argmax(-1) == batch["label"]
        return {"accuracy": (hit * batch["mask"]).sum(), "count": batch["mask"].sum()}

    stream = Stream("labelled", labelled, config.train.batch_size, (key, "label"))
    # The classifier is sized from the data; the test digits must be among its classes.
    expects = Expectations(num_classes={"labelled": num_classes, "test": num_classes})
    # The trainer's 'loss' is this cross-entropy: the loss has no other term.
    classifier = Classifier("loss", "train_accuracy", num_classes)
    return Method(
        init_params,
        loss_fn,
        eval_fn,
        (stream,),
        {"test": test_set},
        expects=expects,
        classifiers=(classifier,),
    )


def _clustering(config: ml_collections.ConfigDict) -> Method:
    target = data.load_split(
        config.data.dataset, config.self_taught.cluster_split, config.data.data_dir
    )
    features = _digit_inputs(config, target["image"])
    num_clusters = config.self_taught.num_clusters
    num_classes = int(target["label"].max()) + 1
    initial = clustering.kmeans_plus_plus(features, num_clusters, config.seed)

    def init_params(rng):
        del rng  # k-means++ is seeded by config.seed.
        return {"centroids": jnp.asarray(initial)}

    def loss_fn(params, batch, rng, step):
        del rng, step
        loss, inertia = clustering.lloyd_loss(params["centroids"], batch["target_feature"])
        return loss, {"inertia": inertia}

    def eval_fn(params, batch):
        mask = batch["mask"]
        centroids = params["centroids"]
        clusters = clustering.assign(batch["feature"], centroids)
        in_cluster = jax.nn.one_hot(clusters, num_clusters) * mask[:, None]
        in_class = jax.nn.one_hot(batch["label"], num_classes)
        sq_distance = jnp.sum((batch["feature"] - centroids[clusters]) ** 2, -1)
        return {
            "contingency": in_cluster.T @ in_class,
            "inertia": (sq_distance * mask).sum(),
            "count": mask.sum(),
        }

    def summarize_eval(sums):
        table = np.rint(sums["contingency"]).astype(np.int64)
        return {
            "nmi": clustering.normalized_mutual_information(table),
            "cluster_accuracy": clustering.clustering_accuracy(table),
            "inertia": float(sums["inertia"]) / float(sums["count"]),
            "clusters_used": float(np.count_nonzero(table.sum(1))),
        }

    # The clustering sees the target's features only; labels are used to score it.
    stream = Stream("target", {"feature": features}, config.train.batch_size, ("feature",))
    eval_set = {"feature": features, "label": target["label"]}
    return Method(init_params, loss_fn, eval_fn, (stream,), {"target": eval_set}, summarize_eval)
