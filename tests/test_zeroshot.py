"""Zero-shot learning: attribute table, scoring rules, metrics, .mat loader, end-to-end runs."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.io

from configs import zeroshot as zeroshot_config
from tljax import train
from tljax.zeroshot import attributes, proposed_split, scoring


def test_attribute_table_is_binary_and_tells_every_digit_apart():
    table = attributes.digit_attribute_table()
    assert table.shape == (10, len(attributes.DIGIT_ATTRIBUTE_NAMES))
    assert set(np.unique(table)) == {0.0, 1.0}
    assert len({tuple(row) for row in table}) == 10
    # Every attribute is present for some digit and absent for another.
    assert np.all(table.min(0) == 0) and np.all(table.max(0) == 1)
    # The lit-segment counts of a seven-segment display.
    segments = table[:, : len(attributes.SEGMENT_ATTRIBUTES)]
    np.testing.assert_array_equal(segments.sum(1), [6, 2, 5, 5, 4, 5, 6, 3, 7, 6])


def test_signed_unit_embeddings_have_equal_norms():
    embeddings = attributes.signed_unit_embeddings(attributes.digit_attribute_table())
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-6)


def test_seen_unseen_split_is_a_seeded_partition():
    seen, unseen = attributes.seen_unseen_split(10, 3, split=4)
    assert len(unseen) == 3 and sorted([*seen, *unseen]) == list(range(10))
    again = attributes.seen_unseen_split(10, 3, split=4)
    np.testing.assert_array_equal(unseen, again[1])
    splits = {tuple(attributes.seen_unseen_split(10, 3, s)[1]) for s in range(5)}
    assert len(splits) > 1
    with pytest.raises(ValueError, match="num_unseen=10"):
        attributes.seen_unseen_split(10, 10, 0)


def test_dap_log_score_matches_a_hand_computation():
    # One image, two attributes with p(a=1|x) = 0.8 and 0.3; priors 0.5 and 0.25.
    logits = jnp.log(jnp.array([[0.8 / 0.2, 0.3 / 0.7]]))
    classes = jnp.array([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    prior = jnp.array([0.5, 0.25])
    scores = scoring.dap_log_scores(logits, classes, prior, prob_floor=1e-6)
    by_hand = [
        np.log((0.8 / 0.5) * (0.7 / 0.75)),
        np.log((0.8 / 0.5) * (0.3 / 0.25)),
        np.log((0.2 / 0.5) * (0.3 / 0.25)),
    ]
    np.testing.assert_allclose(scores[0], by_hand, rtol=1e-5)
    # A masked attribute no longer contributes; the floor caps a confident classifier.
    masked = scoring.dap_log_scores(logits, classes, prior, 1e-6, jnp.array([1.0, 0.0]))
    np.testing.assert_allclose(masked[0], np.log([1.6, 1.6, 0.4]), rtol=1e-5)
    floored = scoring.dap_log_scores(jnp.array([[-50.0, 0.0]]), classes, prior, 0.01)
    np.testing.assert_allclose(floored[0, 0], np.log(0.01 / 0.5) + np.log(0.5 / 0.75), rtol=1e-5)


def test_conse_on_a_hand_made_three_class_example():
    seen_embeddings = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    probs = jnp.array([[0.6, 0.3, 0.1]])
    combined = scoring.conse_embeddings(probs, seen_embeddings, top_t=2)
    np.testing.assert_allclose(combined[0], [0.6 / 0.9, 0.3 / 0.9, 0.0], rtol=1e-6)
    # T larger than the number of seen classes uses them all.
    np.testing.assert_allclose(
        scoring.conse_embeddings(probs, seen_embeddings, 10)[0], [0.6, 0.3, 0.1], rtol=1e-6
    )
    unseen = jnp.array([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0], [1.0, 0.0, 1.0]])
    cosines = scoring.cosine_scores(combined, unseen)
    expected = np.array([0.9, 0.3, 0.6]) / 0.9 / np.sqrt(2) / np.linalg.norm([2 / 3, 1 / 3])
    np.testing.assert_allclose(cosines[0], expected, rtol=1e-5)
    assert int(cosines.argmax()) == 0


def test_harmonic_mean_and_per_class_accuracy():
    assert scoring.harmonic_mean(0.5, 0.5) == pytest.approx(0.5)
    assert scoring.harmonic_mean(0.8, 0.4) == pytest.approx(2 * 0.32 / 1.2)
    assert scoring.harmonic_mean(1.0, 0.0) == 0.0 and scoring.harmonic_mean(0.0, 0.0) == 0.0
    correct, count = np.array([9, 1, 0, 0]), np.array([10, 10, 0, 5])
    # Per-class mean, not pooled: (0.9 + 0.1) / 2; class 2 has no test examples.
    assert scoring.mean_class_accuracy(correct, count, [0, 1, 2]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="No test examples"):
        scoring.mean_class_accuracy(correct, count, [2])


def test_restrict_to_limits_the_argmax_to_candidates():
    scores = jnp.array([[5.0, 1.0, 2.0]])
    assert int(scoring.restrict_to(scores, jnp.array([0, 1, 1])).argmax()) == 2


def test_eszsl_projection_minimises_its_objective():
    rng = np.random.default_rng(0)
    x, s = rng.normal(size=(40, 6)), rng.normal(size=(4, 3))
    labels = rng.integers(0, 4, 40)
    gamma, lam = 0.7, 1.3
    v = scoring.eszsl_projection(x, labels, s, gamma, lam)
    y = -np.ones((40, 4))
    y[np.arange(40), labels] = 1.0

    def objective(v):
        vs = v @ s.T
        return (
            jnp.sum((x @ vs - y) ** 2)
            + gamma * jnp.sum(vs**2)
            + lam * jnp.sum((x @ v) ** 2)
            + gamma * lam * jnp.sum(v**2)
        )

    with jax.enable_x64():
        grad = jax.grad(objective)(jnp.asarray(v, jnp.float64))
    assert np.abs(np.asarray(grad)).max() < 1e-3 * np.abs(v).max() * len(x)


def _write_proposed_split(root, num_dims=16, per_class=12, seed=0):
    """A tiny AWA2-format dataset: 5 classes (0-2 seen, 3-4 unseen), features that follow
    the class attributes through a fixed linear map plus noise."""
    rng = np.random.default_rng(seed)
    num_classes, num_attrs = 5, 6
    original = rng.uniform(0, 100, size=(num_attrs, num_classes))
    att = original / np.linalg.norm(original, axis=0, keepdims=True)
    mixing = rng.normal(size=(num_dims, num_attrs))
    labels = np.repeat(np.arange(num_classes), per_class)
    features = mixing @ att[:, labels] + 0.01 * rng.normal(size=(num_dims, len(labels)))
    positions = np.arange(len(labels))
    seen = labels < 3
    trainval = positions[seen][::2]
    test_seen = positions[seen][1::2]
    test_unseen = positions[~seen]
    folder = root / "AWA2"
    folder.mkdir(parents=True)
    scipy.io.savemat(folder / "res101.mat", {"features": features, "labels": (labels + 1)[:, None]})
    names = np.empty((num_classes, 1), dtype=object)
    for c in range(num_classes):
        names[c, 0] = np.array([f"animal_{c}"])
    scipy.io.savemat(
        folder / "att_splits.mat",
        {
            "att": att,
            "original_att": original,
            "trainval_loc": (trainval + 1)[:, None],
            "test_seen_loc": (test_seen + 1)[:, None],
            "test_unseen_loc": (test_unseen + 1)[:, None],
            "allclasses_names": names,
        },
    )
    return labels, original


def test_proposed_split_loader_reads_the_mat_format(tmp_path):
    labels, original = _write_proposed_split(tmp_path)
    zsd = proposed_split.load(str(tmp_path), "awa2")
    assert zsd.input_key == "feature"
    assert zsd.train["feature"].shape == (18, 16) and zsd.train["feature"].dtype == np.float32
    assert set(zsd.train["label"].tolist()) == {0, 1, 2}
    assert len(zsd.test["label"]) == 18 + 24
    np.testing.assert_array_equal(zsd.seen_classes, [0, 1, 2])
    np.testing.assert_array_equal(zsd.unseen_classes, [3, 4])
    np.testing.assert_allclose(np.linalg.norm(zsd.class_embeddings, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(
        zsd.class_attributes, (original.T - original.T.mean(0) > 0).astype(np.float32)
    )
    assert zsd.class_names == tuple(f"animal_{c}" for c in range(5))


def test_proposed_split_loader_names_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"CUB/res101\.mat not found.*att_splits\.mat"):
        proposed_split.load(str(tmp_path), "cub")
    with pytest.raises(ValueError, match="Unknown proposed-split dataset 'imagenet'"):
        proposed_split.load(str(tmp_path), "imagenet")


def test_proposed_split_loader_rejects_out_of_range_indices(tmp_path):
    _write_proposed_split(tmp_path)
    path = tmp_path / "AWA2" / "att_splits.mat"
    contents = scipy.io.loadmat(path)
    contents["test_unseen_loc"] = np.array([[0], [1]])  # 0 is not a 1-based index.
    scipy.io.savemat(path, {k: v for k, v in contents.items() if not k.startswith("__")})
    with pytest.raises(ValueError, match="test_unseen_loc must hold 1-based image indices"):
        proposed_split.load(str(tmp_path), "awa2")


def _tiny(config, steps, batch_size=16):
    config.train.steps = steps
    config.train.batch_size = batch_size
    config.train.log_every = max(steps, 1)
    config.eval.every = max(steps, 1)
    config.eval.batch_size = 500
    config.checkpoint.every = max(steps, 1)
    return config


def _check_metrics(results):
    for key in ("zsl_accuracy", "gzsl_seen_accuracy", "gzsl_unseen_accuracy", "seen_accuracy"):
        assert 0.0 <= results["final"][f"test/{key}"] <= 1.0, key


@pytest.mark.slow
def test_dap_digits_end_to_end(data_dir, tmp_path):
    config = _tiny(zeroshot_config.get_config("model=dap,split=1"), steps=4)
    config.data.data_dir = data_dir
    results = train.train_and_evaluate(config, str(tmp_path))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["final"] == pytest.approx(results["final"])
    _check_metrics(results)
    assert np.isfinite(results["final"]["train/attribute_accuracy"])


def test_eszsl_digits_is_closed_form_and_beats_chance(data_dir, tmp_path):
    config = _tiny(zeroshot_config.get_config("model=eszsl"), steps=0)
    config.data.data_dir = data_dir
    results = train.train_and_evaluate(config, str(tmp_path))
    _check_metrics(results)
    assert results["final"]["test/seen_accuracy"] > 0.5
    config.train.steps = 3
    with pytest.raises(ValueError, match="closed form: set train.steps=0"):
        train.train_and_evaluate(config, str(tmp_path / "bad"))


# eszsl is closed form (no training steps); the others train 40 steps.
@pytest.mark.parametrize(
    "model",
    [
        "eszsl",
        pytest.param("conse", marks=pytest.mark.slow),
        pytest.param("embedding", marks=pytest.mark.slow),
    ],
)
def test_proposed_split_variant_end_to_end(tmp_path, model):
    _write_proposed_split(tmp_path / "xlsa17")
    config = zeroshot_config.get_config(f"data=awa2,model={model},zsl_root={tmp_path / 'xlsa17'}")
    config = _tiny(config, steps=0 if model == "eszsl" else 40, batch_size=8)
    config.lr.base = 0.05
    results = train.train_and_evaluate(config, str(tmp_path / "run"))
    _check_metrics(results)
    if model == "eszsl":
        # Features are a noisy linear map of the attributes: the unseen classes are findable.
        assert results["final"]["test/zsl_accuracy"] > 0.9


def test_proposed_split_without_root_is_a_clear_error():
    config = zeroshot_config.get_config("data=sun")
    from tljax.methods import zeroshot

    with pytest.raises(ValueError, match=r"<zsl_root>/SUN/; set --config.data.zsl_root"):
        zeroshot.build(config)


def test_proposed_split_loader_rejects_unreadable_files(tmp_path):
    folder = tmp_path / "CUB"
    folder.mkdir()
    (folder / "res101.mat").write_bytes(b"not a matlab file at all" * 10)
    (folder / "att_splits.mat").write_bytes(b"not a matlab file at all" * 10)
    with pytest.raises(ValueError, match=r"res101\.mat is not a MATLAB file scipy can read"):
        proposed_split.load(str(tmp_path), "cub")
    # MATLAB v7.3 files start with this header (they are HDF5 underneath).
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64".ljust(116) + b"\0" * 8 + b"\x00\x02IM"
    (folder / "res101.mat").write_bytes(header + b"\0" * 512)
    with pytest.raises(ValueError, match="v7.3 \\(HDF5\\)"):
        proposed_split.load(str(tmp_path), "cub")
