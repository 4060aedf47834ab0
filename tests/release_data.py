"""A synthetic release shaped like safety-research/assistant-axis ``data/`` (made-up text).

    data/extraction_questions.jsonl     shared questions {"question", "id"}
    data/traits/instructions/<t>.json   5 x {pos, neg}, own questions, eval_prompt
    data/traits/trait_list.json
    data/roles/instructions/<r>.json    5 x {pos}, own questions, eval_prompt
    data/roles/instructions/default.json  instruction only, one prompt uses {model_name}
    data/roles/role_list.json
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path


def write_release(root: Path, *, traits=("brave", "calm", "witty"),
                  roles=("pirate", "poet"), n_questions=6, n_own=4,
                  top="assistant-axis-synthetic") -> Path:
    """Write the release under ``root/top/data``; returns the ``data`` folder."""
    data = root / top / "data"
    (data / "traits" / "instructions").mkdir(parents=True)
    (data / "roles" / "instructions").mkdir(parents=True)
    (data / "extraction_questions.jsonl").write_text("".join(
        json.dumps({"question": f"Shared question number {i}?", "id": i}) + "\n"
        for i in range(n_questions)))
    for t in traits:
        (data / "traits" / "instructions" / f"{t}.json").write_text(json.dumps({
            "instruction": [{"pos": f"Be {t} ({i}).", "neg": f"Never be {t} ({i})."}
                            for i in range(5)],
            "questions": [f"Own {t} question {j}?" for j in range(n_own)],
            "eval_prompt": f"Is this {t}? {{question}} {{answer}}"}))
    (data / "traits" / "trait_list.json").write_text(json.dumps({t: f"{t} trait" for t in traits}))
    for r in roles:
        (data / "roles" / "instructions" / f"{r}.json").write_text(json.dumps({
            "instruction": [{"pos": f"You are a {r} ({i})."} for i in range(5)],
            "questions": [f"Own {r} question {j}?" for j in range(n_own)],
            "eval_prompt": f"Is this a {r}? {{question}} {{answer}}"}))
    (data / "roles" / "instructions" / "default.json").write_text(json.dumps({
        "instruction": [{"pos": ""}, {"pos": "You are an assistant."},
                        {"pos": "You are a model."}, {"pos": "You are {model_name}."},
                        {"pos": "Answer as yourself."}]}))
    (data / "roles" / "role_list.json").write_text(json.dumps({r: f"a {r}" for r in roles}))
    return data


def tarball(data: Path, out: Path) -> Path:
    """``data``'s repository folder as a .tar.gz, the way GitHub serves a commit."""
    with tarfile.open(out, "w:gz") as tar:
        tar.add(data.parent, arcname=data.parent.name)
    return out


def digests(data: Path) -> dict[str, str]:
    """sha256 of every file, keyed by its path under ``data/`` (the pinned-table shape)."""
    return {f.relative_to(data).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(data.rglob("*")) if f.is_file()}


def tar_bytes(data: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(data.parent, arcname=data.parent.name)
    return buf.getvalue()
