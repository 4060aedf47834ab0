"""MiniLM classifier scoring: the classifier on synthetic embeddings (fast), and the packaged
all-MiniLM-L6-v2 itself on texts it must separate (slow: loads the real model offline)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from app.errors import SpecInvalid
from app.minilm import EMBED_DIM, Classifier, Rollout, score_dataset, train


def _clusters(n: int, shift: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    direction = np.zeros(EMBED_DIM)
    direction[0] = 1.0
    pos = rng.normal(size=(n, EMBED_DIM)) * 0.1 + shift * direction
    neg = rng.normal(size=(n, EMBED_DIM)) * 0.1 - shift * direction
    return pos, neg


def test_train_separates_and_scores_out_of_fold():
    from sklearn.linear_model import LogisticRegression

    pos, default = _clusters(30, 0.5, 0)
    clf, oof_pos, oof_def = train(pos, default, seed=0)
    assert clf.cv_auc == 1.0 and clf.cv_accuracy == 1.0 and clf.folds == 5
    assert oof_pos.min() > 0.5 > oof_def.max()
    ref = LogisticRegression(C=1.0, max_iter=2000).fit(
        np.concatenate([pos, default]), np.r_[np.ones(30), np.zeros(30)])
    probe = np.concatenate([pos[:3], default[:3]])
    np.testing.assert_allclose(clf.score(probe), ref.predict_proba(probe)[:, 1], rtol=1e-6)
    again = Classifier.from_dict(json.loads(json.dumps(clf.to_dict())))
    np.testing.assert_allclose(again.score(probe), clf.score(probe))


def test_out_of_fold_scores_are_not_in_sample():
    """On pure noise the in-sample fit looks perfect (384 dims, 20 rows); out of fold it is
    near chance -- the reason training rows are scored out of fold."""
    rng = np.random.default_rng(1)
    pos, default = rng.normal(size=(10, EMBED_DIM)), rng.normal(size=(10, EMBED_DIM))
    clf, _, _ = train(pos, default, seed=0)
    assert (clf.score(pos) > 0.5).all() and (clf.score(default) < 0.5).all()
    assert clf.cv_auc < 0.9


def test_too_few_responses_refused():
    pos, default = _clusters(5, 0.5, 2)
    with pytest.raises(SpecInvalid, match="at least 2 prompted and 2 unprompted"):
        train(pos, default[:1])


class _FakeEncoder:
    """The embedding edge only: texts 'P...' near +e0, 'D...' near -e0."""

    def encode(self, texts, **kw):
        pos, default = _clusters(len(texts), 0.5, 3)
        return np.stack([pos[i] if t.startswith("P") else default[i]
                         for i, t in enumerate(texts)])


def test_score_dataset_rows_and_persona_summary():
    rollouts = [Rollout(persona, f"{label}_p0_q{q}", label, f"{label[0].upper()}{q}")
                for persona in ("a", "b") for q in range(6)
                for label in ("pos", "default", "neg")]
    rollouts = [r if r.label != "neg" else Rollout(r.persona, r.key, r.label, "D" + r.text)
                for r in rollouts]
    out = score_dataset(rollouts, encoder=_FakeEncoder())
    rows = {(r["persona"], r["key"]): r for r in out["rollouts"]}
    assert len(rows) == 36
    assert all(r["held_out"] == (r["label"] != "neg") for r in rows.values())
    assert out["personas"]["a"]["n"] == {"pos": 6, "default": 6, "neg": 6}
    assert out["personas"]["a"]["auc_pos_vs_default"] == 1.0
    assert out["personas"]["b"]["mean_score"]["neg"] < 0.5 < out["personas"]["b"]["mean_score"]["pos"]
    assert out["classifier"]["n_pos"] == 12 and out["classifier"]["n_default"] == 12


@pytest.mark.slow
def test_packaged_minilm_separates_prompted_from_plain_answers():
    """The real packaged all-MiniLM-L6-v2, offline: pirate-voiced answers vs plain ones."""
    from app.minilm import embed, load_encoder

    enc = load_encoder()
    topics = ["the weather", "bread", "a good book", "the tides", "music", "a garden",
              "the stars", "a bicycle", "coffee", "the ocean"]
    pirate = [f"Arr matey, {t} be a fine treasure, says this old sea dog! Yo ho!"
              for t in topics]
    plain = [f"{t.capitalize()} is a common topic. Here is a short, neutral summary."
             for t in topics]
    vecs = embed(pirate[:2], encoder=enc)
    assert vecs.shape == (2, EMBED_DIM)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    rollouts = ([Rollout("pirate", f"pos_p0_q{i}", "pos", t) for i, t in enumerate(pirate)]
                + [Rollout("pirate", f"default_p0_q{i}", "default", t)
                   for i, t in enumerate(plain)])
    out = score_dataset(rollouts, encoder=enc)
    assert out["classifier"]["cv_auc"] > 0.9
    assert out["personas"]["pirate"]["auc_pos_vs_default"] > 0.9
