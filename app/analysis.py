"""What researchers computed in notebooks after every capture job, computed once and stored
beside the job: per layer, PCA of the persona vectors, their cosine similarities, their
norms, and their projections on the assistant axis when the job has one.

Definitions follow safety-research/assistant-axis:
  PCA          ``assistant_axis/pca.py`` ``compute_pca`` with ``MeanScaler``: subtract the
               mean over personas, then ``sklearn.decomposition.PCA()``; the explained
               variance ratio, the first components and every persona's coordinates.
  projection   ``assistant_axis/axis.py`` ``project``: ``v · (a / (|a| + 1e-8))`` with the
               axis ``a`` at that layer (higher = more assistant-like).
  cosine       ``assistant_axis/axis.py`` ``cosine_similarity_per_layer``: each vector
               divided by ``|v| + 1e-8``, then dot products.

Stored under ``<job prefix>/analysis/<vector>/``: ``analysis.json`` (every number, per
layer), ``analysis.safetensors`` (components, coordinates, cosine matrices as arrays), PNG
plots, and a ``manifest.json`` written last with every file's sha256 (the whole-job
download checks them). Computed on demand (API route, ``chatspace-jobs analyze``), not yet
as a worker-side stage: it reads only the persona vectors, so it runs where the API runs.
"""

from __future__ import annotations

import io
import json
import logging

import numpy as np

from app.errors import ChatspaceError, SpecInvalid, StorageError

log = logging.getLogger(__name__)

DEFAULT_VECTOR = "pos_neg"
N_COMPONENTS = 5  # components stored per layer (all ratios are stored)
MAX_PLOTTED_LAYERS = 4  # PCA scatter / cosine heatmap for this many layers (evenly spaced)
EPS = 1e-8  # as in assistant_axis/axis.py
SCHEMA = "chatspace.analysis"


class AnalysisUnavailable(ChatspaceError):
    http_status = 409
    code = "analysis_unavailable"


def pca(x: np.ndarray, n_components: int = N_COMPONENTS):
    """(explained variance ratio (all), components (k, hidden), coordinates (n, k)) of the
    rows of ``x``, mean-centred first (MeanScaler) as the public ``compute_pca`` does."""
    from sklearn.decomposition import PCA

    x = np.asarray(x, dtype=np.float64)
    centred = x - x.mean(axis=0)
    model = PCA()
    coords = model.fit_transform(centred)
    k = min(n_components, model.components_.shape[0])
    return model.explained_variance_ratio_, model.components_[:k], coords[:, :k]


def cosine_matrix(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    unit = x / (np.linalg.norm(x, axis=1, keepdims=True) + EPS)
    return unit @ unit.T


def project(x: np.ndarray, axis: np.ndarray) -> np.ndarray:
    """Rows of ``x`` projected on the unit ``axis`` (one layer)."""
    a = np.asarray(axis, dtype=np.float64)
    return np.asarray(x, dtype=np.float64) @ (a / (np.linalg.norm(a) + EPS))


def analyze_vectors(vectors: dict[str, np.ndarray], layers: list[int], *,
                    axis: np.ndarray | None = None, axis_layers: list[int] | None = None,
                    n_components: int = N_COMPONENTS) -> tuple[dict, dict[str, np.ndarray]]:
    """Per layer: PCA, cosine matrix, norms, axis projections. ``vectors`` maps persona ->
    ``(n_layers, hidden)`` with rows for ``layers``; ``axis`` is ``(n_axis_layers, hidden)``
    with rows for ``axis_layers`` (default: the same layers). Returns (JSON-able summary,
    arrays for safetensors)."""
    personas = sorted(vectors)
    if len(personas) < 2:
        raise AnalysisUnavailable(f"analysis needs at least 2 personas with the vector; "
                                  f"found {len(personas)}", field="vector")
    stack = np.stack([np.asarray(vectors[p], dtype=np.float64) for p in personas])
    if stack.shape[1] != len(layers):
        raise SpecInvalid(f"vectors have {stack.shape[1]} rows but {len(layers)} layers")
    axis_rows = {}
    if axis is not None:
        axis = np.asarray(axis, dtype=np.float64)
        axis_layers = list(axis_layers if axis_layers is not None else layers)
        if axis.shape[0] != len(axis_layers) or axis.shape[1] != stack.shape[2]:
            raise SpecInvalid(f"axis shape {axis.shape} does not fit {len(axis_layers)} layers "
                              f"x hidden {stack.shape[2]}", field="axis")
        axis_rows = {lay: axis[i] for i, lay in enumerate(axis_layers)}
    out_layers, arrays = [], {}
    for i, layer in enumerate(layers):
        x = stack[:, i, :]
        ratio, comps, coords = pca(x, n_components)
        cos = cosine_matrix(x)
        entry = {"layer": int(layer), "explained_variance_ratio": ratio.tolist(),
                 "coordinates": {p: coords[j].tolist() for j, p in enumerate(personas)},
                 "norms": {p: float(np.linalg.norm(x[j])) for j, p in enumerate(personas)},
                 "cosine": cos.tolist()}
        arrays[f"layer{layer}.components"] = comps.astype(np.float32)
        arrays[f"layer{layer}.coordinates"] = coords.astype(np.float32)
        arrays[f"layer{layer}.cosine"] = cos.astype(np.float32)
        if layer in axis_rows:
            proj = project(x, axis_rows[layer])
            entry["axis_projection"] = {p: float(proj[j]) for j, p in enumerate(personas)}
            entry["pc1_axis_cosine"] = float(cosine_matrix(
                np.stack([comps[0], axis_rows[layer]]))[0, 1]) if len(comps) else None
            arrays[f"layer{layer}.axis_projection"] = proj.astype(np.float32)
        out_layers.append(entry)
    summary = {"schema": SCHEMA, "personas": personas, "layers": [int(x) for x in layers],
               "hidden": int(stack.shape[2]), "n_components": int(n_components),
               "has_axis": bool(axis_rows), "per_layer": out_layers}
    return summary, arrays


# -- plots ----------------------------------------------------------------------------------
def plotted_layers(layers: list[int], n: int = MAX_PLOTTED_LAYERS) -> list[int]:
    """Up to ``n`` layers, evenly spaced from the first to the last."""
    if len(layers) <= n:
        return list(layers)
    idx = sorted({round(i * (len(layers) - 1) / (n - 1)) for i in range(n)})
    return [layers[i] for i in idx]


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def render_plots(summary: dict, *, vector: str, title: str = "") -> dict[str, bytes]:
    """PNG name -> bytes: norms and explained variance across layers, a PCA scatter and a
    cosine heatmap for a few layers, axis projections across layers when there is an axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    personas, per_layer = summary["personas"], summary["per_layer"]
    layers = [e["layer"] for e in per_layer]
    head = f"{title} · {vector}" if title else vector
    out = {}

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for p in personas:
        ax.plot(layers, [e["norms"][p] for e in per_layer], marker="o", ms=3, label=p)
    ax.set(xlabel="layer", ylabel="L2 norm", title=f"{head}: vector norm per layer")
    ax.legend(fontsize=7, ncol=2) if len(personas) <= 12 else None
    out["norms.png"] = _png(fig)

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    k = min(3, min(len(e["explained_variance_ratio"]) for e in per_layer))
    for c in range(k):
        ax.plot(layers, [e["explained_variance_ratio"][c] for e in per_layer], marker="o",
                ms=3, label=f"PC{c + 1}")
    ax.set(xlabel="layer", ylabel="explained variance ratio", ylim=(0, 1.05),
           title=f"{head}: PCA explained variance")
    ax.legend(fontsize=8)
    out["explained_variance.png"] = _png(fig)

    by_layer = {e["layer"]: e for e in per_layer}
    for layer in plotted_layers(layers):
        e = by_layer[layer]
        fig, ax = plt.subplots(figsize=(4.8, 4.2))
        xs = [e["coordinates"][p][0] for p in personas]
        ys = [(e["coordinates"][p][1] if len(e["coordinates"][p]) > 1 else 0.0)
              for p in personas]
        ax.scatter(xs, ys, s=24)
        for p, x, y in zip(personas, xs, ys):
            ax.annotate(p, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        r = e["explained_variance_ratio"]
        ax.set(xlabel=f"PC1 ({r[0]:.0%})",
               ylabel=f"PC2 ({r[1]:.0%})" if len(r) > 1 else "PC2",
               title=f"{head}: PCA, layer {layer}")
        out[f"pca_layer{layer}.png"] = _png(fig)

        fig, ax = plt.subplots(figsize=(4.8, 4.2))
        im = ax.imshow(np.array(e["cosine"]), vmin=-1, vmax=1, cmap="RdBu_r")
        ticks = range(len(personas))
        ax.set_xticks(list(ticks), personas, rotation=90, fontsize=7)
        ax.set_yticks(list(ticks), personas, fontsize=7)
        fig.colorbar(im, ax=ax, shrink=0.8)
        ax.set_title(f"{head}: cosine, layer {layer}")
        out[f"cosine_layer{layer}.png"] = _png(fig)

    if summary.get("has_axis"):
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        rows = [e for e in per_layer if "axis_projection" in e]
        for p in personas:
            ax.plot([e["layer"] for e in rows], [e["axis_projection"][p] for e in rows],
                    marker="o", ms=3, label=p)
        ax.set(xlabel="layer", ylabel="projection on the assistant axis",
               title=f"{head}: assistant-axis projection")
        ax.legend(fontsize=7, ncol=2) if len(personas) <= 12 else None
        out["axis_projection.png"] = _png(fig)
    return out


# -- reading a job and storing the result ---------------------------------------------------
def analysis_prefix(job_prefix: str, vector: str) -> str:
    return f"{job_prefix.rstrip('/')}/analysis/{vector}"


JOB_VECTORS = "job_vectors.safetensors"  # job-level vectors and the axis (job end, #10)


def axis_keys(manifest: dict | None, listing: list[str] = ()) -> list[str]:
    """Where a job's assistant axis may be, best first: manifest entries of kind ``axis``,
    the job-level vectors file (it holds ``axis`` for a roles job), then any
    ``axis*.safetensors`` under the job."""
    entries = [str(e.get("key", "")) for e in (manifest or {}).get("artifacts", [])]
    kinds = {str(e.get("key", "")): e.get("kind") for e in (manifest or {}).get("artifacts", [])}
    keys = [k for k in entries if kinds[k] == "axis" and k.endswith(".safetensors")]
    keys += [k for k in entries if k.endswith("/" + JOB_VECTORS)]
    keys += [k for k in listing if k.rsplit("/", 1)[-1].startswith("axis")
             and k.endswith(".safetensors")]
    return list(dict.fromkeys(keys))


def find_axis(read, manifest: dict | None, listing: list[str] = ()
              ) -> tuple[np.ndarray, list[int] | None, str] | None:
    """(axis ``(n_layers, hidden)``, its layers or None, key) of the first candidate that
    holds an ``axis`` tensor; ``read(key)`` returns the bytes. None when the job has none."""
    for key in axis_keys(manifest, listing):
        found = read_axis(read(key), required=False)
        if found is not None:
            return found[0], found[1], key
    return None


def read_axis(data: bytes, *, required: bool = True):
    """(axis, layers or None) from a safetensors file with an ``axis`` tensor; None (or an
    error when ``required``) when the file has none."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        tensors = load(data)
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8:8 + header_len]).get("__metadata__") or {}
    except (SafetensorError, ValueError) as e:
        raise StorageError(f"unreadable axis artifact: {e}") from e
    if "axis" not in tensors:
        if not required:
            return None
        raise StorageError(f"axis artifact has no 'axis' tensor (has {sorted(tensors)})",
                           hint="was it written by an axis job?")
    layers = None
    for value in meta.values():
        try:
            parsed = json.loads(value)
        except (TypeError, ValueError):
            continue
        if isinstance(parsed, dict) and isinstance(parsed.get("layers"), list):
            layers = [int(x) for x in parsed["layers"]]
        elif isinstance(parsed, list) and all(isinstance(x, int) for x in parsed):
            layers = parsed
    return tensors["axis"], layers


def job_level_vectors(read, manifest: dict) -> dict[str, np.ndarray]:
    """``<persona>.<vector>`` tensors of the job-level vectors file, when the job has one
    (vectors finished at the job's end, e.g. against the default persona)."""
    from safetensors.numpy import load

    key = next((str(e["key"]) for e in manifest.get("artifacts", [])
                if str(e.get("key", "")).endswith("/" + JOB_VECTORS)), None)
    if key is None:
        return {}
    return {k: v for k, v in load(read(key)).items() if "." in k}


def persona_vectors(read, manifest: dict, vector: str) -> tuple[dict[str, np.ndarray],
                                                                list[int], list[str]]:
    """(persona -> vector, layers, personas lacking it) from the job's persona artifacts
    and its job-level vectors file; ``read(key, sha256)`` returns checked bytes."""
    from app.artifacts import read_persona_artifact

    job_level = job_level_vectors(lambda k: read(k, None), manifest)
    out, layers, missing = {}, None, []
    for entry in manifest.get("artifacts", []):
        if entry.get("kind") != "persona" or not entry["key"].endswith(".safetensors"):
            continue
        art = read_persona_artifact(read(entry["key"], entry.get("sha256")))
        layers = [int(x) for x in art.metadata["layers"]]
        vec = art.vectors.get(vector, job_level.get(f"{entry['persona']}.{vector}"))
        if vec is None:
            missing.append(entry["persona"])
            continue
        out[entry["persona"]] = vec
    return out, layers or [], missing


def analyze_job(session, store, *, job_id: str, vector: str = DEFAULT_VECTOR) -> dict:
    """Compute and store the analysis of a succeeded capture job; returns its summary plus
    ``files`` (name -> key). Refused (409) for other kinds or unfinished jobs."""
    from app import jobs

    job = jobs.get_job(session, job_id=job_id)
    if job.kind != "capture":
        raise AnalysisUnavailable(f"job {job_id} is a {job.kind} job; analysis reads the "
                                  "persona vectors of a capture job", field="job_id")
    if job.state != "succeeded" or not job.artifact_prefix:
        raise AnalysisUnavailable(f"job {job_id} is {job.state}; analysis needs a succeeded "
                                  "capture job", field="job_id",
                                  hint="wait for it: `chatspace-jobs status JOB --watch`")
    manifest = store.read_manifest(job.artifact_prefix)
    if manifest is None:
        raise AnalysisUnavailable(f"job {job_id} has no manifest", field="job_id")
    def read(key, sha256=None):
        return store.get_bytes(key, expect_sha256=sha256)

    vectors, layers, missing = persona_vectors(read, manifest, vector)
    if not vectors:
        raise AnalysisUnavailable(f"no persona of job {job_id} has a {vector!r} vector",
                                  field="vector", hint="traits jobs have pos_neg, roles jobs "
                                  "pos_all; `job.vectors()` lists what is stored")
    listing = [o.key for o in store.list(job.artifact_prefix.rstrip("/") + "/")]
    axis = find_axis(read, manifest, listing)
    other = (job.params or {}).get("axis_from")  # a roles job whose axis this job uses
    if axis is None and other:
        src = jobs.get_job(session, job_id=str(other))
        if src.artifact_prefix:
            axis = find_axis(read, store.read_manifest(src.artifact_prefix),
                             [o.key for o in store.list(src.artifact_prefix.rstrip("/") + "/")])
    summary, arrays = analyze_vectors(vectors, layers, axis=axis[0] if axis else None,
                                      axis_layers=axis[1] if axis else None)
    summary.update({"job_id": job_id, "vector": vector, "model": job.model,
                    "dataset": job.dataset, "dtype": job.dtype, "missing": missing,
                    "axis_key": axis[2] if axis else None})
    return store_analysis(store, job.artifact_prefix, vector, summary, arrays,
                          title=f"{job.dataset} · {job.model}")


def store_analysis(store, job_prefix: str, vector: str, summary: dict,
                   arrays: dict[str, np.ndarray], *, title: str = "") -> dict:
    """Write the analysis files (replacing an earlier analysis of the same vector: it is
    derived, recomputable data), then its manifest last."""
    from safetensors.numpy import save

    base = analysis_prefix(job_prefix, vector)
    plots = render_plots(summary, vector=vector, title=title)
    files = {"analysis.safetensors": (save(arrays), "application/octet-stream")}
    files.update({name: (data, "image/png") for name, data in plots.items()})
    keys = {name: f"{base}/{name}" for name in ["analysis.json", *files]}
    summary = {**summary, "files": keys, "plots": sorted(plots)}
    files["analysis.json"] = (json.dumps(summary, indent=2, sort_keys=True).encode(),
                              "application/json")
    entries = []
    for name, (data, ctype) in files.items():
        obj = store.put_bytes(keys[name], data, content_type=ctype, overwrite=True)
        entries.append({"key": obj.key, "sha256": obj.sha256, "size": obj.size,
                        "kind": "analysis"})
    store.write_manifest(base, {"schema": SCHEMA, "vector": vector, "artifacts": entries},
                         overwrite=True)
    return summary


def load_analysis(store, job_prefix: str, vector: str = DEFAULT_VECTOR) -> dict | None:
    """The stored analysis summary, or None when none was computed (or it is incomplete)."""
    from app.errors import ArtifactNotFound

    base = analysis_prefix(job_prefix, vector)
    if store.read_manifest(base) is None:
        return None
    try:
        return json.loads(store.get_bytes(f"{base}/analysis.json"))
    except ArtifactNotFound:
        return None


def stored_vectors(store, job_prefix: str) -> list[str]:
    """Vector names that have a stored analysis under the job."""
    folders = store.folders(f"{job_prefix.rstrip('/')}/analysis/")
    return sorted(f.rstrip("/").rsplit("/", 1)[-1] for f in folders)
