"""Capture artifacts as the files the public pipelines load, so their scripts run unchanged.

``assistant-axis`` (safety-research/assistant-axis ``pipeline/``; the folders its README uses
for a model's outputs):
  ``activations/<persona>.pt``  ``{f"{label}_p{prompt_index}_q{question_index}": tensor(n_layers,
                            hidden)}``, the flat dict ``2_activations.py`` saves (line 171).
                            Roles hold their pos samples; ``default.pt`` holds the default
                            persona's samples labelled ``pos``, as ``1_generate`` labels every
                            role's responses (``assistant_axis/generation.py`` line 434).
                            Traits hold pos, neg and the default persona's ``default_*``
                            samples, as persona-subspace trait files do (its
                            ``traits/5_vectors.py`` reads the three labels from one file).
  ``vectors/<persona>.pt``  ``{"vector", "type", "role"}`` as ``4_vectors.py`` saves (roles
                            with a ``pos_3``, type "pos_3"; default, type "mean").
  ``axis.pt``               the axis tensor ``(n_layers, hidden)``, as ``5_axis.py`` saves it
                            at the pinned commit a989619 (line 92), when the job has an axis.
Tensors are float32 (what the artifact stores); the public scripts save the model's dtype.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path


def _persona_keys(keys: list[str]) -> dict[str, str]:
    out = {}
    for k in keys:
        name = k.rsplit("/", 1)[-1]
        if (name.endswith(".safetensors") and not name.endswith(".vectors.safetensors")
                and not name.endswith(".activations.safetensors")
                and name != "job_vectors.safetensors"):
            out[name[: -len(".safetensors")]] = k
    return out


def export_assistant_axis(keys: list[str], *, fetch: Callable[[str], bytes], out: Path,
                          dataset: str = "") -> list[str]:
    """Write the files for a job whose stored object keys are ``keys``; returns the paths."""
    import torch

    from app.artifacts import read_persona_artifact

    personas = _persona_keys(keys)
    if not personas:
        from app.errors import NotFound

        raise NotFound("the job has no persona artifacts to export",
                       hint="export takes a capture job that stored activations")
    arts = {p: read_persona_artifact(fetch(k)) for p, k in sorted(personas.items())}
    traits = any(k.startswith("neg_") for a in arts.values() for k in a.keys)
    default = arts.get("default")
    written = []
    (out / "vectors").mkdir(parents=True, exist_ok=True)
    (out / "activations").mkdir(parents=True, exist_ok=True)
    for persona, art in arts.items():
        flat = {}
        for i, key in enumerate(art.keys):
            label = "pos" if persona == "default" and not traits else None
            flat[(label + key[key.index("_"):]) if label else key] = torch.from_numpy(
                art.activations[i].copy())
        if traits:
            if persona == "default":
                continue  # its samples go into every trait's file
            if default is not None:
                for i, key in enumerate(default.keys):
                    flat[key] = torch.from_numpy(default.activations[i].copy())
        path = out / "activations" / f"{persona}.pt"
        torch.save(flat, path)
        written.append(str(path))
        if not traits:
            vec, vtype = ((art.vectors.get("mean"), "mean") if persona == "default"
                          else (art.vectors.get("pos_3"), "pos_3"))
            if vec is not None:
                vpath = out / "vectors" / f"{persona}.pt"
                torch.save({"vector": torch.from_numpy(vec.copy()), "type": vtype,
                            "role": persona}, vpath)
                written.append(str(vpath))
    axis_key = next((k for k in keys if k.endswith("/job_vectors.safetensors")), None)
    report_key = next((k for k in keys if k.endswith("/axis.json")), None)
    if axis_key and report_key:
        from safetensors.numpy import load

        tensors = load(fetch(axis_key))
        report = json.loads(fetch(report_key))
        if "axis" in tensors and report.get("axis"):
            path = out / "axis.pt"
            torch.save(torch.from_numpy(tensors["axis"].copy()), path)
            written.append(str(path))
    return written
