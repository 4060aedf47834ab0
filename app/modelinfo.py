"""A model's shape (layers, hidden size) for submit-time checks, without torch or vLLM.

The API must refuse ``layers: [40]`` for a 28-layer model before the job is queued, but it
starts in a second on a machine with no GPU and never imports the engine. So the shape comes
from cheap sources, best first:

1. what a worker that loaded the model reported (``Worker.model_info``) — the truth for the
   weights actually served;
2. ``tiny:<family>`` models, generated locally by the workers with a fixed shape;
3. a ``config.json`` next to the weights: a local model folder, the settings' models folder,
   or the Hugging Face hub cache.

Unknown models give ``None``: the checks that need the shape are skipped at submit time and
the engine validates again when it loads (it raises a ``SpecInvalid`` naming the field).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from jobspec.tiny import TINY_HIDDEN, TINY_LAYERS, TINY_PREFIX

log = logging.getLogger(__name__)


# Multimodal configs nest the language model's fields (Gemma 3, Llava-style checkpoints).
_NESTED = ("text_config", "language_config", "llm_config")


@dataclass(frozen=True)
class ModelInfo:
    num_layers: int
    hidden_size: int
    source: str  # where the figures came from, for messages

    def as_dict(self) -> dict:
        return {"num_layers": self.num_layers, "hidden_size": self.hidden_size,
                "source": self.source}


def model_slug(model: str) -> str:
    """A model name as one path segment: ``Qwen/Qwen3-32B`` -> ``Qwen--Qwen3-32B``,
    ``tiny:qwen3`` -> ``tiny_qwen3`` (artifact keys, the models folder)."""
    return model.replace("/", "--").replace(":", "_")


def from_config(config: dict, *, source: str) -> ModelInfo | None:
    """The shape from an HF ``config.json`` dict, or None when it lacks the fields."""
    for key in _NESTED:
        if isinstance(config.get(key), dict):
            nested = from_config(config[key], source=source)
            if nested is not None:
                return nested
    layers = config.get("num_hidden_layers", config.get("n_layer"))
    hidden = config.get("hidden_size", config.get("n_embd"))
    if isinstance(layers, int) and isinstance(hidden, int) and layers > 0 and hidden > 0:
        return ModelInfo(layers, hidden, source)
    return None


def from_worker_report(report: dict | None, *, source: str) -> ModelInfo | None:
    if not isinstance(report, dict):
        return None
    try:
        layers, hidden = int(report["num_layers"]), int(report["hidden_size"])
    except (KeyError, TypeError, ValueError):
        return None
    return ModelInfo(layers, hidden, source) if layers > 0 and hidden > 0 else None


def _read_config(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _hub_cache_dirs() -> list[Path]:
    env = os.environ
    dirs = []
    if env.get("HF_HUB_CACHE"):
        dirs.append(Path(env["HF_HUB_CACHE"]))
    if env.get("HF_HOME"):
        dirs.append(Path(env["HF_HOME"]) / "hub")
    dirs.append(Path.home() / ".cache" / "huggingface" / "hub")
    return dirs


def _config_candidates(model: str, settings) -> list[Path]:
    out = []
    if model.startswith(("/", ".", "~")):
        out.append(Path(model).expanduser() / "config.json")
    models_dir = getattr(settings, "models_dir", None) if settings is not None else None
    if models_dir is not None:
        slug = model_slug(model)
        out += [Path(models_dir) / slug / "config.json", Path(models_dir) / model / "config.json"]
    if "/" in model and not model.startswith(("/", ".", "~")):
        repo = "models--" + model.replace("/", "--")
        for cache in _hub_cache_dirs():
            snaps = cache / repo / "snapshots"
            if snaps.is_dir():
                out += sorted(snaps.glob("*/config.json"))
    return out


def reported_by_workers(session, model: str) -> ModelInfo | None:
    """The shape a worker reported for ``model`` (any worker, newest heartbeat first)."""
    try:
        from sqlalchemy import select

        from app.models import Worker
    except ImportError:  # the models module is not available: no reports to read
        return None
    rows = session.execute(select(Worker).where(Worker.model == model)).scalars().all()
    rows.sort(key=lambda w: str(getattr(w, "last_heartbeat", "") or ""), reverse=True)
    for w in rows:
        info = from_worker_report(getattr(w, "model_info", None), source=f"worker {w.name}")
        if info is not None:
            return info
    return None


def resolve(model: str, *, settings=None, session=None) -> ModelInfo | None:
    """(num_layers, hidden_size) of ``model`` when some cheap source knows it, else None."""
    if session is not None:
        info = reported_by_workers(session, model)
        if info is not None:
            return info
    if model.startswith(TINY_PREFIX):
        return ModelInfo(TINY_LAYERS, TINY_HIDDEN, "tiny model")
    for path in _config_candidates(model, settings):
        if path.is_file():
            config = _read_config(path)
            info = from_config(config, source=str(path)) if config else None
            if info is not None:
                return info
    log.debug("no shape known for model %s; layer checks wait for the worker", model)
    return None


def config_provenance(model: str, settings=None) -> dict:
    """What identifies the weights a job ran on, for its manifest: the sha256 of the model's
    ``config.json`` and, from a Hugging Face cache snapshot, its revision (the commit the
    snapshot folder is named after). Empty fields when no config is on this machine."""
    import hashlib

    candidates = _config_candidates(model, settings)
    models_dir = getattr(settings, "models_dir", None)
    if model.startswith(TINY_PREFIX) and models_dir is not None:  # built as tiny-<family>
        candidates.insert(0, Path(models_dir) / f"tiny-{model[len(TINY_PREFIX):]}" / "config.json")
    for path in candidates:
        if path.is_file():
            data = path.read_bytes()
            parts = path.parts
            revision = parts[-2] if len(parts) > 2 and parts[-3] == "snapshots" else None
            return {"config_sha256": hashlib.sha256(data).hexdigest(), "revision": revision,
                    "config_path": str(path)}
    return {"config_sha256": None, "revision": None, "config_path": None}


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
_tokenizers: dict[str, object] = {}


def local_tokenizer(model: str, *, settings=None):
    """The model's tokenizer when its files are on this machine (the folders
    :func:`resolve` reads configs from), else None; never downloads. Cached per folder."""
    for path in _config_candidates(model, settings):
        folder = path.parent
        if not any((folder / f).is_file() for f in _TOKENIZER_FILES):
            continue
        key = str(folder)
        if key not in _tokenizers:
            from transformers import AutoTokenizer

            _tokenizers[key] = AutoTokenizer.from_pretrained(key, local_files_only=True)
        return _tokenizers[key]
    return None
