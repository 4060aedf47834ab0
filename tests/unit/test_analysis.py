"""The analysis numbers against plain readings of the public definitions, and its plots.

PCA: safety-research/assistant-axis ``assistant_axis/pca.py`` ``compute_pca`` (lines 130-187:
the ``MeanScaler`` of lines 30-75 subtracts the mean over samples, then
``sklearn.decomposition.PCA().fit_transform``). Read here as the covariance eigenproblem of
the mean-centred rows. Projection: ``assistant_axis/axis.py`` ``project`` (lines 58-88:
``ax = ax / (ax.norm() + 1e-8)``; ``act @ ax``). Cosine: ``cosine_similarity_per_layer``
(lines 119-143: ``v / (v.norm() + 1e-8)``, then dot products).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from app import analysis


def _vectors(n_personas=5, n_layers=3, hidden=16, seed=0):
    rng = np.random.default_rng(seed)
    return {f"p{i}": rng.normal(size=(n_layers, hidden)).astype(np.float32)
            for i in range(n_personas)}


def _plain_pca(rows: np.ndarray):
    """Covariance eigenvectors of the centred rows, largest first (no sklearn)."""
    x = rows.astype(np.float64)
    centred = x - x.mean(axis=0)
    cov = centred.T @ centred / (len(x) - 1)
    w, v = np.linalg.eigh(cov)
    order = np.argsort(w)[::-1]
    w, v = w[order], v[:, order]
    return w / w.sum(), centred @ v, v.T


def test_pca_matches_the_public_compute_pca_reading():
    vecs = _vectors()
    layers = [0, 5, 9]
    summary, arrays = analysis.analyze_vectors(vecs, layers)
    personas = sorted(vecs)
    assert summary["personas"] == personas and summary["layers"] == layers
    for i, layer in enumerate(layers):
        rows = np.stack([vecs[p][i] for p in personas])
        ratio, coords, comps = _plain_pca(rows)
        entry = summary["per_layer"][i]
        got = np.array(entry["explained_variance_ratio"])
        k = len(personas) - 1  # centred rank: the remaining ratios are ~0
        np.testing.assert_allclose(got[:k], ratio[:k], rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(got[k:], 0, atol=1e-9)
        for c in range(k):  # each component up to its sign
            sign = np.sign(comps[c] @ arrays[f"layer{layer}.components"][c])
            np.testing.assert_allclose(arrays[f"layer{layer}.components"][c], sign * comps[c],
                                       rtol=1e-4, atol=1e-5)
            got_coords = np.array([entry["coordinates"][p][c] for p in personas])
            np.testing.assert_allclose(got_coords, sign * coords[:, c], rtol=1e-5, atol=1e-6)
        for j, p in enumerate(personas):
            assert entry["norms"][p] == pytest.approx(math.sqrt(float((rows[j] ** 2).sum())),
                                                      rel=1e-6)


def test_cosine_and_axis_projection_match_plain_loops():
    vecs = _vectors(n_personas=4, n_layers=2, hidden=8, seed=1)
    axis = np.random.default_rng(2).normal(size=(2, 8))
    summary, _ = analysis.analyze_vectors(vecs, [3, 7], axis=axis)
    personas = sorted(vecs)
    assert summary["has_axis"]
    for i, entry in enumerate(summary["per_layer"]):
        a = axis[i]
        a_norm = math.sqrt(sum(float(x) * float(x) for x in a))
        for j, p in enumerate(personas):
            v = vecs[p][i].astype(np.float64)
            plain = sum(float(v[d]) * float(a[d]) for d in range(len(a))) / (a_norm + 1e-8)
            assert entry["axis_projection"][p] == pytest.approx(plain, rel=1e-9, abs=1e-12)
            for k, q in enumerate(personas):
                w = vecs[q][i].astype(np.float64)
                nv = math.sqrt(float(v @ v)) + 1e-8
                nw = math.sqrt(float(w @ w)) + 1e-8
                plain_cos = sum(float(v[d] / nv) * float(w[d] / nw) for d in range(len(v)))
                assert entry["cosine"][j][k] == pytest.approx(plain_cos, abs=1e-9)
        assert -1.0 <= entry["pc1_axis_cosine"] <= 1.0


def test_axis_rows_follow_the_axis_layers_not_positions():
    vecs = _vectors(n_personas=3, n_layers=2, hidden=4)
    axis = np.eye(4)[:3] * 2.0  # axis for model layers 0, 1, 2
    summary, _ = analysis.analyze_vectors(vecs, [1, 2], axis=axis, axis_layers=[0, 1, 2])
    first = summary["per_layer"][0]  # model layer 1 -> axis row 1 = e1
    for p in sorted(vecs):
        assert first["axis_projection"][p] == pytest.approx(float(vecs[p][0][1]), rel=1e-6)


def test_bad_inputs_are_named():
    with pytest.raises(analysis.AnalysisUnavailable, match="at least 2 personas"):
        analysis.analyze_vectors(_vectors(n_personas=1), [0, 1, 2])
    with pytest.raises(Exception, match="axis shape"):
        analysis.analyze_vectors(_vectors(), [0, 1, 2], axis=np.zeros((2, 16)))


def test_plots_are_pngs_for_a_few_layers():
    vecs = _vectors(n_personas=4, n_layers=10, hidden=8)
    summary, _ = analysis.analyze_vectors(vecs, list(range(10)), axis=np.ones((10, 8)))
    plots = analysis.render_plots(summary, vector="pos_neg", title="t")
    shown = analysis.plotted_layers(list(range(10)))
    assert len(shown) == analysis.MAX_PLOTTED_LAYERS and 9 in shown and 0 in shown
    expected = {"norms.png", "explained_variance.png", "axis_projection.png"}
    expected |= {f"pca_layer{x}.png" for x in shown} | {f"cosine_layer{x}.png" for x in shown}
    assert set(plots) == expected
    assert all(data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000 for data in plots.values())


def test_read_axis_takes_the_axis_tensor_and_its_layers():
    import json

    from safetensors.numpy import save

    axis = np.arange(12, dtype=np.float32).reshape(3, 4)
    data = save({"axis": axis}, metadata={"chatspace": json.dumps({"layers": [2, 4, 6]})})
    got, layers = analysis.read_axis(data)
    np.testing.assert_array_equal(got, axis)
    assert layers == [2, 4, 6]
    with pytest.raises(Exception, match="no 'axis' tensor"):
        analysis.read_axis(save({"other": axis}))


def test_the_axis_is_found_in_the_job_level_vectors_file_or_an_axis_file():
    from safetensors.numpy import save

    axis = np.ones((2, 4), dtype=np.float32)
    files = {"j/job_vectors.safetensors": save({"curious.pos_default": axis}),  # traits: none
             "j/roles.safetensors": save({"axis": axis * 3, "default_mean": axis})}
    traits = {"artifacts": [{"key": "j/job_vectors.safetensors", "kind": "safetensors"}]}
    assert analysis.find_axis(files.__getitem__, traits) is None
    assert analysis.job_level_vectors(files.__getitem__, traits).keys() == {"curious.pos_default"}
    files["j/job_vectors.safetensors"] = files["j/roles.safetensors"]
    got, _, key = analysis.find_axis(files.__getitem__, traits)
    assert key == "j/job_vectors.safetensors" and float(got[0, 0]) == 3.0
    files["j/axis_v2.safetensors"] = save({"axis": axis * 5})
    got, _, key = analysis.find_axis(files.__getitem__, {"artifacts": []},
                                     ["j/axis_v2.safetensors", "j/x.safetensors"])
    assert key == "j/axis_v2.safetensors" and float(got[1, 3]) == 5.0
