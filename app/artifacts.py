"""The per-persona artifact: one safetensors file plus JSON metadata, and a ``.pt`` export.

safetensors because artifacts are shared between people and machines and a pickle (``.pt``)
runs code on load; the file carries its own metadata (under the header's ``__metadata__``
``"chatspace"`` entry) so it stays meaningful when copied away from the job's manifest.

Tensors (float32, whatever dtype the model ran in; ``metadata["dtype"]`` records that):
  ``activations``        (n_samples, n_layers, hidden): mean over each response, row i is
                         ``metadata["keys"][i]``
  ``vectors.<name>``     (n_layers, hidden): derived vectors (app.vectors)
  ``contrast``           (n_layers, hidden): persona minus control, when derivable
  ``spans.<name>``       (n_samples, n_layers, hidden): optional extra per-sample reductions
                         (e.g. ``prompt_mean``, ``last_prompt``)

``to_pt`` writes the older layout researchers' notebooks load: ``{"activations": {key:
tensor(n_layers, hidden)}, "contrast": tensor | None, "metadata": dict, "vectors": {...}}``.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

import numpy as np

from app.errors import StorageError
from app.modelinfo import model_slug


def job_prefix(settings, *, model: str, dataset: str, dtype: str, job_id: str) -> str:
    """Where a job's artifacts live: ``<artifacts_prefix>/<model>/<dataset>/<dtype>/<job_id>``
    (model '/' and ':' kept readable as '--' and '_' so the key stays one folder per model).
    Recorded on the job at submit, so the API and CLI can list a job's artifacts before its
    manifest exists, and used by the workers when they write them."""
    return "/".join(p.strip("/") for p in (settings.artifacts_prefix, model_slug(model), dataset,
                                            dtype, str(job_id)) if p)


def recorded_prefix(job, settings) -> str:
    """The artifact prefix recorded on the job at submit (what the API lists); computed from
    ``settings`` only for a row written without one (jobs created below the submit path)."""
    return job.artifact_prefix or job_prefix(settings, model=job.model, dataset=job.dataset,
                                             dtype=job.dtype, job_id=str(job.id))

SCHEMA = "chatspace.persona"
SCHEMA_VERSION = 1
_META_KEY = "chatspace"


@dataclass
class PersonaArtifact:
    activations: np.ndarray
    keys: list[str]
    vectors: dict[str, np.ndarray]
    contrast: np.ndarray | None
    spans: dict[str, np.ndarray] = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)


def build_persona_artifact(*, activations: np.ndarray, keys: list[str], vectors, layers: list[int],
                           model: str, dtype: str, dataset: str, persona: str,
                           extra_spans: dict | None = None, counts: dict | None = None,
                           contrast: np.ndarray | None = None, contrast_of: str | None = None,
                           extra_metadata: dict | None = None) -> tuple[bytes, dict]:
    """Serialize one persona's results; returns (safetensors bytes, metadata dict).

    ``vectors`` is a dict name -> array or an ``app.vectors.VectorSet`` (whose counts,
    contrast and contrast_of are used unless given here).
    """
    from safetensors.numpy import save

    params = {}
    if hasattr(vectors, "vectors"):  # a VectorSet
        counts = vectors.counts if counts is None else counts
        if contrast is None:
            contrast, contrast_of = vectors.contrast, vectors.contrast_of
        params = dict(vectors.params)
        vectors = vectors.vectors
    acts = np.ascontiguousarray(activations, dtype=np.float32)
    keys = list(keys)
    layers = [int(x) for x in layers]
    if acts.ndim != 3 or acts.shape[:2] != (len(keys), len(layers)):
        raise ValueError(f"activations must be (n_samples={len(keys)}, n_layers={len(layers)}, "
                         f"hidden); got {acts.shape}")
    if len(set(keys)) != len(keys):
        raise ValueError("sample keys are not unique")
    vec_shape = acts.shape[1:]
    tensors = {"activations": acts}
    for name, v in vectors.items():
        tensors[f"vectors.{name}"] = _check(v, vec_shape, f"vector {name!r}")
    if contrast is not None:
        tensors["contrast"] = _check(contrast, vec_shape, "contrast")
    for name, v in (extra_spans or {}).items():
        tensors[f"spans.{name}"] = _check(v, acts.shape, f"span {name!r}")
    meta = {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION,
        "model": model, "dtype": dtype, "dataset": dataset, "persona": persona,
        "layers": layers, "keys": keys, "n_samples": len(keys),
        "n_layers": len(layers), "hidden": int(acts.shape[2]),
        "vectors": sorted(vectors), "contrast_of": contrast_of if contrast is not None else None,
        "spans": sorted(extra_spans or {}), "counts": {k: int(v) for k, v in (counts or {}).items()},
        "vector_params": params, "storage_dtype": "float32",
        "shapes": {k: list(v.shape) for k, v in tensors.items()},
        **(extra_metadata or {}),
    }
    data = save(tensors, metadata={_META_KEY: json.dumps(meta, sort_keys=True)})
    return data, meta


def _check(v, shape, what) -> np.ndarray:
    arr = np.ascontiguousarray(v, dtype=np.float32)
    if arr.shape != tuple(shape):
        raise ValueError(f"{what} must have shape {tuple(shape)}, got {arr.shape}")
    return arr


def read_header(data: bytes) -> dict:
    """The JSON metadata of an artifact without decoding its tensors (cheap listings)."""
    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
        meta = json.loads(header["__metadata__"][_META_KEY])
    except (struct.error, ValueError, KeyError, TypeError) as e:
        raise StorageError(f"not a chatspace persona artifact ({e.__class__.__name__}: {e})",
                           hint="was the object written by a chatspace capture job?") from e
    if meta.get("schema") != SCHEMA or meta.get("schema_version", 0) > SCHEMA_VERSION:
        raise StorageError(f"unsupported artifact schema {meta.get('schema')!r} version "
                           f"{meta.get('schema_version')!r}", hint="upgrade chatspace-jobs")
    return meta


def read_persona_artifact(data: bytes) -> PersonaArtifact:
    from safetensors import SafetensorError
    from safetensors.numpy import load

    meta = read_header(data)
    try:
        tensors = load(data)
    except SafetensorError as e:
        raise StorageError(f"corrupt persona artifact: {e}") from e
    acts = tensors["activations"]
    if acts.shape[0] != len(meta["keys"]):
        raise StorageError("artifact keys do not match its activations")
    return PersonaArtifact(
        activations=acts, keys=list(meta["keys"]),
        vectors={n[len("vectors."):]: t for n, t in tensors.items() if n.startswith("vectors.")},
        contrast=tensors.get("contrast"),
        spans={n[len("spans."):]: t for n, t in tensors.items() if n.startswith("spans.")},
        metadata=meta,
    )


SIDECAR_SCHEMA = "chatspace.persona_vectors"


def build_vector_sidecar(vectors, *, persona: str, kind: str, layers: list[int],
                         scores: dict | None = None, extra_metadata: dict | None = None) -> bytes:
    """A persona's vectors and the persona side of its vectors against ``default``
    (``app.vectors.Pending``), small enough for the job's end to read every persona's
    without downloading their activations."""
    from safetensors.numpy import save

    tensors = {f"vectors.{n}": np.ascontiguousarray(v, dtype=np.float32)
               for n, v in vectors.vectors.items()}
    pending = {}
    for name, p in vectors.pending.items():
        if p.persona_mean is not None:
            tensors[f"pending.{name}"] = np.ascontiguousarray(p.persona_mean, dtype=np.float32)
        pending[name] = {"kind": p.kind, "default_keys": p.default_keys,
                         "min_count": p.min_count}
    meta = {"schema": SIDECAR_SCHEMA, "persona": persona, "kind": kind, "layers": layers,
            "counts": vectors.counts, "pending": pending, "scores": scores or {},
            "params": vectors.params, **(extra_metadata or {})}
    if not tensors:  # safetensors needs one tensor; an empty marker keeps the file valid
        tensors["empty"] = np.zeros((0,), np.float32)
    return save(tensors, metadata={_META_KEY: json.dumps(meta, sort_keys=True, default=str)})


def read_vector_sidecar(data: bytes):
    """(VectorSet with vectors and pending, metadata) from :func:`build_vector_sidecar`."""
    from safetensors.numpy import load

    from app.vectors import Pending, VectorSet

    (n,) = struct.unpack("<Q", data[:8])
    meta = json.loads(json.loads(data[8:8 + n])["__metadata__"][_META_KEY])
    if meta.get("schema") != SIDECAR_SCHEMA:
        raise StorageError("not a persona vectors file")
    tensors = load(data)
    vs = VectorSet(
        vectors={k[len("vectors."):]: v for k, v in tensors.items() if k.startswith("vectors.")},
        counts=meta.get("counts", {}), params=meta.get("params", {}),
        pending={name: Pending(p["kind"], list(p["default_keys"]),
                               tensors.get(f"pending.{name}"), int(p.get("min_count", 1)))
                 for name, p in meta.get("pending", {}).items()})
    return vs, meta


def to_pt(artifact: PersonaArtifact) -> bytes:
    """The older ``.pt`` layout (a pickle: export only, loadable with ``weights_only=True``)."""
    import io

    import torch

    payload = {
        "activations": {k: torch.from_numpy(np.array(artifact.activations[i]))
                        for i, k in enumerate(artifact.keys)},
        "contrast": None if artifact.contrast is None else torch.from_numpy(
            np.array(artifact.contrast)),
        "metadata": artifact.metadata,
        "vectors": {n: torch.from_numpy(np.array(v)) for n, v in artifact.vectors.items()},
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    return buf.getvalue()
