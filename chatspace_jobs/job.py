"""One job's results: status, persona vectors, activations, responses, the assistant axis,
the analysis, and a whole-job download."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property


@dataclass
class Activations:
    """One persona's per-sample response means: ``tensor[i]`` is sample ``keys[i]``
    (``"{pos|neg|default}_p{prompt}_q{question}"``), rows of dim 1 are ``layers``."""

    tensor: object  # torch.Tensor (n_samples, n_layers, hidden)
    keys: list[str]
    layers: list[int]
    metadata: dict = field(default_factory=dict, repr=False)

    def __getitem__(self, key: str):
        """The ``(n_layers, hidden)`` means of one sample, by key."""
        return self.tensor[self.keys.index(key)]

    def to_pt_dict(self) -> dict:
        """``{key: tensor(n_layers, hidden)}``: the layout the public pipeline scripts load."""
        return {k: self.tensor[i] for i, k in enumerate(self.keys)}


def _torch(array):
    import numpy as np
    import torch

    return torch.from_numpy(np.array(array))


class Job:
    """A job as read from one source. ``info`` is the JSON the API returns for it at the
    time it was read; :meth:`status` reads it again."""

    def __init__(self, source, info: dict):
        self.source = source
        self.info = info
        self.id: str = info["id"]
        self._artifacts: dict[str, object] = {}

    def __repr__(self) -> str:
        p = self.info.get("progress") or {}
        return (f"<Job {self.id} {self.info['kind']} {self.info['dataset']} "
                f"{self.info['model']} {self.info['state']} "
                f"{p.get('items_done', 0)}/{p.get('items_total', 0)} personas>")

    # -- state ---------------------------------------------------------------------------------
    def status(self) -> dict:
        """The job now: ``state``, ``failure_kind``, ``last_error``, ``progress`` (per persona)."""
        self.info = self.source.job(self.id)
        return self.info

    def events(self) -> list[dict]:
        return self.source.events(self.id)

    @cached_property
    def manifest(self) -> dict:
        """The job's manifest (every file with its sha256); an error until the job is done."""
        from app.results import manifest

        return manifest(self.source, self.status())

    def _entries(self, kind: str = "persona") -> dict[str, dict]:
        return {e["persona"]: e for e in self.manifest.get("artifacts", [])
                if e.get("kind") == kind and e.get("persona")}

    @property
    def personas(self) -> list[str]:
        return sorted(self._entries())

    # -- tensors -------------------------------------------------------------------------------
    def artifact(self, persona: str):
        """The persona's artifact (:class:`app.artifacts.PersonaArtifact`, numpy arrays),
        read once and checked against the manifest's sha256."""
        from app.artifacts import read_persona_artifact

        if persona not in self._artifacts:
            entry = self._entry(persona)
            if not entry["key"].endswith(".safetensors"):
                raise ValueError(f"persona {persona!r} of this {self.info['kind']} job has no "
                                 "activation artifact (a rollout without capture?)")
            self._artifacts[persona] = read_persona_artifact(
                self.source.read(entry["key"], sha256=entry["sha256"]))
        return self._artifacts[persona]

    def _entry(self, persona: str) -> dict:
        entries = self._entries()
        if persona not in entries:
            raise KeyError(f"job {self.id} has no persona {persona!r}; it has "
                           f"{', '.join(sorted(entries)) or 'none'}")
        return entries[persona]

    def vector_names(self) -> list[str]:
        """The vector names stored for at least one persona (``pos_neg``, ``pos_all``, ...)."""
        names = {k.split(".", 1)[1] for k in self._job_level}
        for e in self._entries().values():
            names |= {k[len("vectors."):] for k in (e.get("shapes") or {})
                      if k.startswith("vectors.")}
        return sorted(names)

    @cached_property
    def _job_level(self) -> dict:
        from app.analysis import job_level_vectors

        return job_level_vectors(self.source.read, self.manifest)

    def vectors(self, name: str = "pos_neg", layer: int | None = None) -> dict:
        """``{persona: tensor(n_layers, hidden)}`` of vector ``name`` (personas lacking it are
        left out); with ``layer`` (a model layer number), ``{persona: tensor(hidden)}``.
        Vectors finished at the job's end (``job_vectors.safetensors``) are included."""
        out = {}
        for persona in self.personas:
            art = self.artifact(persona)
            vec = art.vectors.get(name, self._job_level.get(f"{persona}.{name}"))
            if vec is None:
                continue
            if layer is not None:
                vec = vec[self._row(art, layer)]
            out[persona] = _torch(vec)
        if not out:
            raise KeyError(f"no persona of job {self.id} has a {name!r} vector; stored: "
                           f"{', '.join(self.vector_names()) or 'none'}")
        return out

    @staticmethod
    def _row(art, layer: int) -> int:
        layers = [int(x) for x in art.metadata["layers"]]
        if layer not in layers:
            raise KeyError(f"layer {layer} was not captured; layers: {layers}")
        return layers.index(layer)

    def activations(self, persona: str) -> Activations:
        art = self.artifact(persona)
        return Activations(_torch(art.activations), list(art.keys),
                           [int(x) for x in art.metadata["layers"]], art.metadata)

    def responses(self, persona: str) -> list[dict]:
        """The generated responses of ``persona``: ``key``, ``response``, and for a rollout
        job the prompt, question and steering used (one JSONL line each)."""
        entry = self._entry(persona)
        if entry["key"].endswith(".jsonl"):
            data = self.source.read(entry["key"], sha256=entry["sha256"]).decode()
            return [json.loads(line) for line in data.splitlines() if line.strip()]
        meta = self.artifact(persona).metadata
        tokens = meta.get("response_tokens") or [None] * len(meta["keys"])
        return [{"persona": persona, "key": k, "response": r, "response_tokens": t}
                for k, r, t in zip(meta["keys"], meta.get("responses") or [], tokens)]

    def axis(self):
        """The assistant axis ``(n_layers, hidden)`` stored with this job (a roles job's
        job-level vectors, or an axis artifact), or the one of the roles job named in its
        ``axis_from`` param. A clear error when there is none."""
        from app.analysis import find_axis

        found = find_axis(self.source.read, self.manifest, self._listing())
        other = (self.info.get("params") or {}).get("axis_from")
        if found is None and other:
            src = Job(self.source, self.source.job(str(other)))
            found = find_axis(self.source.read, src.manifest, src._listing())
        if found is None:
            raise LookupError(f"job {self.id} has no assistant-axis artifact (an 'axis' tensor "
                              "in job_vectors.safetensors or an axis*.safetensors under the "
                              "job); a roles capture job derives it")
        return _torch(found[0])

    def _listing(self) -> list[str]:
        return [o["key"] for o in self.source.list(self.info["artifact_prefix"].rstrip("/") + "/")]

    # -- analysis and files --------------------------------------------------------------------
    def analysis(self, vector: str = "pos_neg", *, compute: bool = True) -> dict:
        """Per-layer PCA, cosine matrices and axis projections of ``vector``: the stored
        result, or computed and stored now (``compute=True``)."""
        from app.errors import ArtifactNotFound, NotFound

        prefix = self.info["artifact_prefix"].rstrip("/")
        try:
            return json.loads(self.source.read(f"{prefix}/analysis/{vector}/analysis.json"))
        except (ArtifactNotFound, NotFound):
            if not compute:
                raise
        return self.source.analyze(self.id, vector=vector)

    def plot(self, name: str, vector: str = "pos_neg") -> bytes:
        """A stored analysis plot as PNG bytes (``IPython.display.Image(job.plot(...))``)."""
        files = self.analysis(vector)["files"]
        return self.source.read(files[name])

    def download(self, dest, *, progress: bool = False):
        """Every file of the job under ``dest`` (resumable, each checked against the
        manifest's sha256); returns :class:`app.results.DownloadReport`."""
        from app.results import download_job

        bar = None
        if progress:
            from app.progress import RichProgress

            bar = RichProgress()
        try:
            return download_job(self.source, self.id, dest, progress=bar)
        finally:
            if bar is not None:
                bar.close()
