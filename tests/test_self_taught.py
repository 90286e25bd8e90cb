"""Self-taught learning: patches, whitening, sparse autoencoder, features, clustering, runs."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.metrics import normalized_mutual_info_score

from configs import self_taught as self_taught_config
from tljax import train
from tljax.methods import self_taught
from tljax.self_taught import autoencoder, clustering, filters, patches


def test_natural_patches_are_whitened_and_deterministic():
    train_a, heldout, whitening = patches.natural_patches(6, 3000, 200, 2, 1e-7, seed=0)
    train_b, _, _ = patches.natural_patches(6, 3000, 200, 2, 1e-7, seed=0)
    np.testing.assert_array_equal(train_a, train_b)
    assert train_a.shape == (3000, 36) and heldout.shape == (200, 36)
    # Brightness removal leaves 35 directions; a tiny epsilon whitens their variances to 1.
    eigenvalues = np.linalg.eigvalsh(np.cov(train_a, rowvar=False))
    assert eigenvalues[0] < 1e-3
    np.testing.assert_allclose(eigenvalues[1:], 1.0, atol=0.1)
    # The folded linear map is the two-step computation.
    raw = np.random.default_rng(0).uniform(size=(5, 36)).astype(np.float32)
    two_step = (raw - raw.mean(1, keepdims=True) - whitening.center) @ whitening.zca.T
    np.testing.assert_allclose(whitening(raw), two_step, rtol=1e-4, atol=1e-4)


def test_kl_sparsity_is_zero_only_at_the_target():
    assert float(autoencoder.kl_sparsity(0.05, jnp.full(4, 0.05))) == pytest.approx(0, abs=1e-6)
    assert float(autoencoder.kl_sparsity(0.05, jnp.array([0.05, 0.5]))) > 0.1


def test_sparse_autoencoder_loss_decreases_on_a_fixed_batch():
    batch = jax.random.normal(jax.random.key(0), (64, 16))
    model = autoencoder.SparseAutoencoder(hidden=8, visible=16)
    params = model.init(jax.random.key(1), batch)["params"]
    loss_of = lambda p: autoencoder.sparse_autoencoder_loss(model, p, batch, 0.05, 3.0, 1e-3)
    optimizer = optax.adam(1e-2)
    state = optimizer.init(params)
    first, _ = loss_of(params)

    @jax.jit
    def step(params, state):
        grads = jax.grad(lambda p: loss_of(p)[0])(params)
        updates, state = optimizer.update(grads, state)
        return optax.apply_updates(params, updates), state

    for _ in range(50):
        params, state = step(params, state)
    last, metrics = loss_of(params)
    assert float(last) < 0.8 * float(first)
    assert set(metrics) == {"reconstruction", "sparsity", "mean_activation"}


def test_digit_features_equal_explicit_patchwise_encoding():
    rng = np.random.default_rng(0)
    size, hidden = 5, 3
    whitening = patches.fit_whitening(rng.uniform(size=(500, size * size)), 0.1)
    encoder = {
        "kernel": rng.normal(size=(size * size, hidden)).astype(np.float32),
        "bias": rng.normal(size=hidden).astype(np.float32),
    }
    images = rng.integers(0, 256, size=(2, 12, 12, 1), dtype=np.uint8)
    features = autoencoder.digit_features(encoder, whitening, images, pool_grid=2)
    # By hand: whiten every 5x5 patch, encode, sigmoid, average over 2x2 blocks of 4x4.
    pixels = images[..., 0] / 255.0
    maps = np.empty((2, 8, 8, hidden))
    for i in range(8):
        for j in range(8):
            patch = pixels[:, i : i + size, j : j + size].reshape(2, -1)
            pre = whitening(patch) @ encoder["kernel"] + encoder["bias"]
            maps[:, i, j] = 1 / (1 + np.exp(-pre))
    pooled = maps.reshape(2, 2, 4, 2, 4, hidden).mean(axis=(2, 4)).reshape(2, -1)
    np.testing.assert_allclose(features, pooled, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="does not split into 3"):
        autoencoder.digit_features(encoder, whitening, images, pool_grid=3)


def test_clustering_metrics_on_known_assignments():
    labels = np.repeat(np.arange(3), 4)
    relabelled = (labels + 1) % 3  # The same partition under other names.
    table = clustering.contingency(relabelled, labels, 3, 3)
    assert clustering.normalized_mutual_information(table) == pytest.approx(1.0)
    assert clustering.clustering_accuracy(table) == pytest.approx(1.0)
    # Hungarian matching: clusters {0: 3 of class 0, 1 of class 1}, {1: 2 of class 1}.
    assert clustering.clustering_accuracy(np.array([[3, 1], [0, 2]])) == pytest.approx(5 / 6)
    # Each cluster holds every class equally: no information.
    independent = np.full((2, 3), 4)
    assert clustering.normalized_mutual_information(independent) == pytest.approx(0.0)
    rng = np.random.default_rng(0)
    clusters, classes = rng.integers(0, 4, 200), rng.integers(0, 3, 200)
    nmi = clustering.normalized_mutual_information(clustering.contingency(clusters, classes, 4, 3))
    expected = normalized_mutual_info_score(classes, clusters, average_method="geometric")
    assert nmi == pytest.approx(expected, rel=1e-9)


def test_lloyd_loss_gradient_step_of_one_is_a_lloyd_iteration():
    points = jnp.array([[0.0, 0.0], [0.0, 2.0], [10.0, 0.0], [12.0, 0.0], [11.0, 3.0]])
    centroids = jnp.array([[1.0, 1.0], [9.0, 1.0], [100.0, 100.0]])  # The third stays empty.
    grads = jax.grad(lambda c: clustering.lloyd_loss(c, points)[0])(centroids)
    stepped = centroids - grads
    np.testing.assert_allclose(stepped, [[0.0, 1.0], [11.0, 1.0], [100.0, 100.0]], atol=1e-6)
    _, inertia = clustering.lloyd_loss(centroids, points)
    assert float(inertia) == pytest.approx((2 + 2 + 2 + 10 + 8) / 5)


def test_kmeans_plus_plus_picks_distinct_data_points():
    points = np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32)
    centroids = clustering.kmeans_plus_plus(points, 5, seed=1)
    assert centroids.shape == (5, 3) and len({tuple(c) for c in centroids}) == 5
    assert all(any(np.array_equal(c, p) for p in points) for c in centroids)
    np.testing.assert_array_equal(centroids, clustering.kmeans_plus_plus(points, 5, seed=1))


def test_filter_grid_png(tmp_path):
    grid = filters.filter_grid(np.arange(5 * 16, dtype=float).reshape(5, 16))
    # 5 tiles of 4x4 in 3 columns and 2 rows, 1-pixel borders.
    assert grid.shape == (2 * 5 + 1, 3 * 5 + 1) and grid.min() == 0.0 and grid.max() == 1.0
    path = tmp_path / "filters.png"
    filters.save_filter_grid(np.random.default_rng(0).normal(size=(9, 64)), str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _tiny(config, steps, batch_size):
    config.train.update(steps=steps, batch_size=batch_size, log_every=steps)
    config.eval.update(every=steps, batch_size=500)
    config.checkpoint.every = steps
    return config


@pytest.fixture(scope="module")
def autoencoder_run(tmp_path_factory):
    """A few-step stage=autoencoder run on a small patch set."""
    workdir = tmp_path_factory.mktemp("sae")
    config = _tiny(self_taught_config.get_config(), steps=20, batch_size=100)
    config.self_taught.patches.update(num_train=2000, num_heldout=300)
    results = train.train_and_evaluate(config, str(workdir))
    return workdir, results


@pytest.mark.slow
def test_autoencoder_stage_end_to_end(autoencoder_run):
    workdir, results = autoencoder_run
    final = results["final"]
    assert 0 < final["heldout_patches/relative_error"] < 2
    assert 0 < final["heldout_patches/mean_activation"] < 1
    encoder, whitening, settings = self_taught.load_encoder(str(workdir))
    assert np.asarray(encoder["kernel"]).shape == (64, settings.hidden)
    assert whitening.zca.shape == (64, 64)


@pytest.mark.slow
@pytest.mark.parametrize("features", ["sae", "pixels"])
def test_classify_and_cluster_stages_end_to_end(autoencoder_run, data_dir, tmp_path, features):
    encoder_dir = autoencoder_run[0]
    variant = f"features={features},k=2,encoder={encoder_dir}"
    config = _tiny(self_taught_config.get_config(f"stage=classify,{variant}"), 4, 8)
    config.data.data_dir = data_dir
    accuracy = train.train_and_evaluate(config, str(tmp_path / "cls"))["final"]["test/accuracy"]
    assert 0 <= accuracy <= 1
    config = _tiny(self_taught_config.get_config(f"stage=cluster,{variant}"), 3, 1000)
    config.data.data_dir = data_dir
    final = train.train_and_evaluate(config, str(tmp_path / "clu"))["final"]
    assert 0 < final["target/nmi"] <= 1 and 0.1 <= final["target/cluster_accuracy"] <= 1
    # Lloyd iterations never increase the k-means inertia.
    assert final["target/inertia"] <= final["train/inertia"] + 1e-3


@pytest.mark.slow
def test_scratch_classifier_end_to_end(data_dir, tmp_path):
    config = _tiny(self_taught_config.get_config("stage=classify,features=scratch,k=2"), 3, 8)
    config.data.data_dir = data_dir
    results = train.train_and_evaluate(config, str(tmp_path))
    assert 0 <= results["final"]["test/accuracy"] <= 1


def test_sae_features_need_a_finished_autoencoder_run(data_dir, tmp_path):
    config = self_taught_config.get_config("stage=classify,features=sae")
    config.data.data_dir = data_dir
    with pytest.raises(ValueError, match="needs self_taught.encoder_workdir"):
        self_taught.build(config)
    config.self_taught.encoder_workdir = str(tmp_path)
    with pytest.raises(FileNotFoundError, match="results.json not found"):
        self_taught.build(config)
