"""Persona datasets: the public persona-vector layout, validation, and named-dataset lookup.

The format is the one the public pipelines (persona-subspace, assistant-axis) already use, so
a researcher points the service at folders they have today, unchanged:

    <dataset>/
      instructions/<persona>.json   persona files (or <persona>.json directly in the folder)
      questions.jsonl               shared questions, one {"question": ..., "id": ...} a line
                                    (any single *.jsonl, e.g. extraction_questions.jsonl)
      extract_scores/<persona>.json optional judge scores: sample key -> number | "REFUSAL"

The public release (safety-research/assistant-axis ``data/``) keeps the shared questions one
level up, beside ``traits/`` and ``roles/`` (``data/extraction_questions.jsonl``): when the
dataset folder has no questions file, ``../extraction_questions.jsonl`` (or
``../questions.jsonl``) is used, so ``datasets_root`` may point at a checkout's ``data/``.

A persona file holds ``instruction`` (a list of ``{"pos", "neg"}`` system-prompt pairs for
traits, ``{"pos"}`` for roles), optional ``questions`` and optional ``eval_prompt``. The shared
questions drive capture (the public ``1_generate.py``: 5 prompts x 240 questions); a file's own
``questions`` are its evaluation questions (rollout jobs), and drive capture only when the
dataset has no shared questions file. A persona named ``default`` holds neutral prompts
(``""`` means no system prompt at all; the release's ``default.json`` has only
``instruction``). ``{model_name}`` in a prompt is filled with the model's display name
(:func:`app.prompts.model_display_name`), as the public generator does; no other placeholder
is allowed.

The default persona is captured once per job: other personas' samples carry only their own
labels (pos, and neg for traits), and vectors against ``default`` pair them with the default
persona's samples of the same prompt and question index (:mod:`app.derive`).

Samples are keyed ``"{label}_p{prompt_index}_q{question_index}"`` exactly as the public
activation and score files are, so their ``extract_scores`` files line up with our artifacts.

Validation collects every problem (file, persona, field, what to do) before a job is queued.
Named datasets resolve under ``settings.datasets_root`` (a folder or ``s3://bucket/prefix``,
default: the samples shipped in ``app/samples``); names are single path segments.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from app.errors import DatasetInvalid, DatasetNotFound, SpecInvalid

log = logging.getLogger(__name__)

SAMPLES_DIR = Path(__file__).resolve().parent / "samples"
DEFAULT_PERSONA = "default"
LABELS = ("pos", "neg", "default")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
SHARED_QUESTIONS = "questions.jsonl"
PARENT_QUESTIONS = ("extraction_questions.jsonl", SHARED_QUESTIONS)  # one level up (release)
SCORES_DIR = "extract_scores"
# Named datasets `chatspace-jobs datasets pull` can fetch (app/release.py).
PULLABLE = ("traits_240", "roles_240")
PLACEHOLDER_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
PLACEHOLDERS = ("model_name",)


# ---------------------------------------------------------------------------------- model


@dataclass(frozen=True)
class Question:
    index: int  # position in the list: the q in sample keys (the public pipelines use it)
    id: int | str
    text: str


@dataclass(frozen=True)
class Persona:
    name: str
    instructions: list[dict]  # [{"pos": str, "neg": str}] (traits) or [{"pos": str}] (roles)
    questions: list[Question]  # capture: the dataset's shared questions, else the persona's own
    eval_prompt: str | None
    file: str  # path inside the dataset folder
    eval_questions: list[Question] = field(default_factory=list)  # the file's own questions


@dataclass(frozen=True)
class Sample:
    key: str
    label: str  # pos | neg | default
    prompt_index: int
    question_index: int
    system_prompt: str  # "" = no system prompt
    question: str


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset, precise enough to fix without reading our code."""

    file: str
    message: str
    persona: str | None = None
    field: str | None = None

    def __str__(self) -> str:
        where = self.file
        if self.persona:
            where += f": persona '{self.persona}'"
        if self.field:
            where += f": field '{self.field}'"
        return f"{where}: {self.message}"


@dataclass(frozen=True)
class DatasetSummary:
    name: str
    kind: str  # traits | roles | invalid
    personas: int
    samples: int  # what a capture job captures (the default persona once)
    root: str
    problems: int = 0
    questions: int = 0  # shared capture questions (0: personas carry their own)
    has_default: bool = False
    error: str | None = None  # first problem, for listings


@dataclass
class Dataset:
    name: str
    kind: str  # traits | roles
    personas: dict[str, Persona]
    questions: list[Question]  # shared questions; [] when personas carry their own
    root: str  # where the dataset lives (folder or s3:// URL), for messages and listings
    scores_dir: str | None = None
    _source: _Source | None = field(default=None, repr=False, compare=False)

    def persona(self, name: str) -> Persona:
        try:
            return self.personas[name]
        except KeyError:
            raise DatasetNotFound(
                f"persona '{name}' is not in dataset '{self.name}'", field="persona",
                hint=f"available: {', '.join(self.personas)}",
            ) from None

    def samples(self, persona: str, *, questions: int | None = None,
                model_name: str | None = None, purpose: str = "capture",
                max_samples: int | None = None,
                include_default: bool = False) -> list[Sample]:
        """The samples of one persona, in a fixed order (prompt, then question, then label).

        ``questions`` keeps the first N questions (the public ``--question_count``);
        ``purpose="eval"`` uses the persona file's own questions (rollout), else the shared
        capture questions. ``model_name`` fills ``{model_name}`` (the display name; required
        when a prompt has the placeholder). The default persona is captured once per job, so
        other personas carry no ``default`` samples unless ``include_default`` asks for them
        (kept adjacent to their pos/neg pair). ``max_samples`` truncates the list (a quick
        look; it drops whole questions of later prompts, so vectors then see fewer pairs).
        """
        p = self.persona(persona)
        default = self.personas.get(DEFAULT_PERSONA)
        sources: list[tuple[str, list[dict], str]] = []
        if persona == DEFAULT_PERSONA:
            sources.append(("default", p.instructions, "pos"))
        else:
            sources.append(("pos", p.instructions, "pos"))
            if self.kind == "traits":
                sources.append(("neg", p.instructions, "neg"))
            if include_default and default is not None:
                sources.append(("default", default.instructions, "pos"))
        qs = (p.eval_questions or p.questions) if purpose == "eval" else p.questions
        if questions is not None:
            qs = qs[:questions]
        n_prompts = max(len(instr) for _, instr, _ in sources)
        out: list[Sample] = []
        for pi in range(n_prompts):
            for q in qs:
                for label, instr, side in sources:
                    if pi >= len(instr):
                        continue
                    out.append(Sample(
                        key=f"{label}_p{pi}_q{q.index}", label=label, prompt_index=pi,
                        question_index=q.index,
                        system_prompt=fill_prompt(instr[pi][side], model_name),
                        question=q.text,
                    ))
                    if max_samples is not None and len(out) >= max_samples:
                        return out
        return out

    def sample_count(self, persona: str, *, questions: int | None = None) -> int:
        """Samples of one persona without building them (the counts ``datasets ls`` shows)."""
        p = self.persona(persona)
        n_q = len(p.questions) if questions is None else min(questions, len(p.questions))
        labels = 1 if persona == DEFAULT_PERSONA or self.kind == "roles" else 2
        return len(p.instructions) * n_q * labels

    def job_sample_count(self, *, personas: list[str] | None = None,
                         questions: int | None = None) -> int:
        """Samples a capture job over ``personas`` (default: all) captures: each persona's
        own, plus the default persona once when the dataset has one."""
        names = [n for n in (personas or self.personas) if n != DEFAULT_PERSONA]
        if DEFAULT_PERSONA in self.personas:
            names.append(DEFAULT_PERSONA)
        return sum(self.sample_count(n, questions=questions) for n in names)

    def read(self, relpath: str) -> bytes | None:
        """Raw bytes of a file inside the dataset, or None when it is absent."""
        return self._source.read(relpath) if self._source else None


# --------------------------------------------------------------------------------- sources


class _Source:
    """A dataset folder: local or under an S3 prefix. Paths are '/'-separated, relative."""

    location: str

    def files(self) -> list[str]:
        raise NotImplementedError

    def read(self, relpath: str) -> bytes | None:
        raise NotImplementedError

    def read_parent(self, filename: str) -> bytes | None:
        """A file beside the dataset folder (the release's shared questions), or None."""
        raise NotImplementedError


class _LocalSource(_Source):
    def __init__(self, path: Path):
        self.path = path
        self.location = str(path)

    def files(self) -> list[str]:
        found = []
        for sub in (self.path, self.path / "instructions", self.path / SCORES_DIR):
            if sub.is_dir():
                found += [f.relative_to(self.path).as_posix() for f in sub.iterdir() if f.is_file()]
        return sorted(found)

    def read(self, relpath: str) -> bytes | None:
        f = self.path / relpath
        return f.read_bytes() if f.is_file() else None

    def read_parent(self, filename: str) -> bytes | None:
        f = self.path.parent / filename
        return f.read_bytes() if f.is_file() else None


class _S3Source(_Source):
    def __init__(self, client, bucket: str, prefix: str):
        self.client, self.bucket, self.prefix = client, bucket, prefix.strip("/")
        self.location = f"s3://{bucket}/{self.prefix}"

    @cached_property
    def _keys(self) -> list[str]:
        return sorted(_s3_list(self.client, self.bucket, self.prefix + "/"))

    def files(self) -> list[str]:
        return [k for k in self._keys if k.count("/") <= 1]

    def read(self, relpath: str) -> bytes | None:
        from botocore.exceptions import ClientError

        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=f"{self.prefix}/{relpath}")
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        return obj["Body"].read()

    def read_parent(self, filename: str) -> bytes | None:
        parent = self.prefix.rsplit("/", 1)[0] if "/" in self.prefix else ""
        key = f"{parent}/{filename}" if parent else filename
        return self._top(key)

    def _top(self, key: str) -> bytes | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise


def _s3_list(client, bucket: str, prefix: str, *, dirs: bool = False) -> Iterator[str]:
    """Keys (or, with ``dirs``, immediate sub-folder names) under ``prefix``, relative."""
    kw = {"Bucket": bucket, "Prefix": prefix}
    if dirs:
        kw["Delimiter"] = "/"
    for page in client.get_paginator("list_objects_v2").paginate(**kw):
        if dirs:
            for cp in page.get("CommonPrefixes", []):
                yield cp["Prefix"][len(prefix):].rstrip("/")
        else:
            for obj in page.get("Contents", []):
                yield obj["Key"][len(prefix):]


def _split_s3(url: str) -> tuple[str, str]:
    rest = url[len("s3://"):]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise SpecInvalid(f"'{url}' names no bucket", field="datasets_root",
                          hint="use s3://bucket/prefix")
    return bucket, prefix.strip("/")


def _settings(settings):
    if settings is None:
        from app.settings import get_settings

        settings = get_settings()
    return settings


def _client(settings):
    from app.storage import s3_client

    return s3_client(settings.s3)


def check_name(name: str, what: str = "dataset") -> str:
    """Refuse names that could leave the datasets root (``..``, separators, absolute paths)."""
    if not isinstance(name, str) or not name:
        raise SpecInvalid(f"{what} name is empty", field=what, hint="give a name like traits_240")
    if len(name) > 128 or not NAME_RE.match(name) or ".." in name:
        raise SpecInvalid(
            f"{what} name '{name[:80]}' is not allowed", field=what,
            hint="use one path segment of letters, digits, '_', '-' or '.', at most 128 "
                 "characters, no '..'",
        )
    return name


def fill_prompt(text: str, model_name: str | None) -> str:
    """``{model_name}`` filled as the public generator does (``str.replace``; the release's
    other braces stay as written). Without a name, a prompt that needs one is refused."""
    if "{model_name}" not in text:
        return text
    if not model_name:
        raise SpecInvalid("a prompt contains {model_name} but no model display name was given",
                          field="params.model_name", hint="pass the model's display name")
    return text.replace("{model_name}", model_name)


def _root(settings) -> str:
    """Where ``pull`` writes and the first place names are looked up."""
    return settings.datasets_root or str(Path(settings.data_dir) / "datasets")


def _roots(settings) -> list[str]:
    """Roots searched for a name: the configured one; with none configured, the local
    datasets folder under ``data_dir`` (where ``pull`` writes) and then the shipped samples."""
    if settings.datasets_root:
        return [settings.datasets_root]
    return [_root(settings), str(SAMPLES_DIR)]


def pull_command(name: str) -> str:
    return f"chatspace-jobs datasets pull {name}"


def _names_under(root: str, settings) -> list[str]:
    if root.startswith("s3://"):
        bucket, prefix = _split_s3(root)
        names = _s3_list(_client(settings), bucket, f"{prefix}/" if prefix else "", dirs=True)
    else:
        base = Path(root)
        try:
            names = [p.name for p in base.iterdir() if p.is_dir()] if base.is_dir() else []
        except OSError as e:  # an unreadable root lists nothing rather than failing
            log.warning("cannot list datasets under %s: %s", root, e)
            names = []
    return sorted(n for n in names if NAME_RE.match(n) and ".." not in n)


def _source_for(name: str, settings) -> _Source:
    check_name(name)
    available: list[str] = []
    for root in _roots(settings):
        here = _names_under(root, settings)
        if name in here:
            return _open(name, root, settings)
        available += [n for n in here if n not in available]
    where = " or ".join(_roots(settings))
    hint = f"available: {', '.join(available) or 'none'}"
    if name in PULLABLE:
        hint = f"get it with `{pull_command(name)}`; {hint}"
    raise DatasetNotFound(f"dataset '{name}' not found under {where}", field="dataset",
                          hint=hint)


def _open(name: str, root: str, settings) -> _Source:
    if root.startswith("s3://"):
        bucket, prefix = _split_s3(root)
        return _S3Source(_client(settings), bucket, f"{prefix}/{name}" if prefix else name)
    base = Path(root).resolve()
    path = (base / name).resolve()
    if not path.is_relative_to(base):  # a symlink pointing outside the root
        raise SpecInvalid(f"dataset '{name}' points outside {root}", field="dataset")
    return _LocalSource(path)


def _source_at(location: str | Path, settings=None) -> _Source:
    if isinstance(location, str) and location.startswith("s3://"):
        bucket, prefix = _split_s3(location)
        return _S3Source(_client(_settings(settings)), bucket, prefix)
    path = Path(location)
    if not path.is_dir():
        raise DatasetNotFound(f"no dataset folder at {location}", field="dataset")
    return _LocalSource(path.resolve())


# ------------------------------------------------------------------------------- public API


def load_dataset(name: str, *, settings=None) -> Dataset:
    """Load the named dataset from the datasets root; raises ``DatasetInvalid`` on problems."""
    settings = _settings(settings)
    return _load(name, _source_for(name, settings))


def load_dataset_at(location: str | Path, *, settings=None) -> Dataset:
    """Load a dataset from a folder or ``s3://`` prefix given directly (CLI checks, tests)."""
    src = _source_at(location, settings)
    return _load(Path(str(location).rstrip("/")).name or "dataset", src)


def validate_dataset(path_or_name: str | Path, *, settings=None) -> list[Problem]:
    """Every problem in a dataset (empty list = valid). Takes a folder, an s3:// URL or a name."""
    if isinstance(path_or_name, Path) or (
        isinstance(path_or_name, str) and (path_or_name.startswith("s3://") or "/" in path_or_name)
    ):
        src = _source_at(path_or_name, settings)
        name = Path(str(path_or_name).rstrip("/")).name
    else:
        src = _source_for(path_or_name, _settings(settings))
        name = path_or_name
    return _parse(name, src)[1]


def list_datasets(*, settings=None) -> list[DatasetSummary]:
    """What is under the datasets root(s), with persona counts and the samples a capture job
    would take (the default persona once). A folder that cannot be opened or parsed (a
    symlink out of the root, unreadable files, bad JSON) is listed as invalid with its first
    problem; it never hides the others."""
    settings = _settings(settings)
    out, seen = [], set()
    for root in _roots(settings):
        for name in _names_under(root, settings):
            if name in seen:  # an earlier root shadows this one, as lookups do
                continue
            seen.add(name)
            try:
                ds, problems = _parse(name, _open(name, root, settings))
            except Exception as e:  # noqa: BLE001 - one broken folder must not hide the rest
                msg = getattr(e, "message", None) or f"{e.__class__.__name__}: {e}"
                out.append(DatasetSummary(name, "invalid", 0, 0, root, 1, error=msg))
                continue
            if problems or ds is None:
                out.append(DatasetSummary(name, "invalid", 0, 0, root, len(problems),
                                          error=str(problems[0]) if problems else None))
                continue
            out.append(DatasetSummary(
                name, ds.kind, len(ds.personas), ds.job_sample_count(), ds.root,
                questions=len(ds.questions), has_default=DEFAULT_PERSONA in ds.personas))
    return out


def load_scores(dataset: Dataset, persona: str) -> dict[str, float | str] | None:
    """Judge scores of one persona (``extract_scores/<persona>.json``), or None when absent.

    Values are numbers (0-100 for traits, 0-3 for roles) or the string "REFUSAL".
    """
    dataset.persona(persona)
    relpath = f"{SCORES_DIR}/{persona}.json"
    raw = dataset.read(relpath)
    if raw is None:
        return None
    problems: list[Problem] = []
    data = _decode_json(raw, relpath, persona, problems)
    if data is not None and not isinstance(data, dict):
        problems.append(Problem(relpath, "must be a JSON object of sample key -> score",
                                persona, "(root)"))
    scores: dict[str, float | str] = {}
    for key, value in (data or {}).items() if isinstance(data, dict) else ():
        if value == "REFUSAL":
            scores[key] = "REFUSAL"
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            scores[key] = float(value)
        else:
            problems.append(Problem(relpath, f"score {value!r} is neither a number nor "
                                    "\"REFUSAL\"", persona, key))
    _raise(dataset.name, problems)
    return scores


# ----------------------------------------------------------------------------- parsing


def _load(name: str, src: _Source) -> Dataset:
    ds, problems = _parse(name, src)
    _raise(name, problems)
    assert ds is not None
    return ds


def _raise(name: str, problems: list[Problem]) -> None:
    if not problems:
        return
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    err = DatasetInvalid(f"dataset '{name}': {problems[0]}{more}", field=problems[0].field,
                         hint="fix the file named above; validate_dataset() lists every problem")
    err.problems = problems
    raise err


def _decode_json(raw: bytes, file: str, persona: str | None, problems: list[Problem]):
    text = _decode_text(raw, file, persona, problems)
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        problems.append(Problem(file, f"invalid JSON at line {e.lineno} column {e.colno}: "
                                f"{e.msg}", persona))
        return None


def _decode_text(raw: bytes, file: str, persona: str | None, problems: list[Problem]):
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        problems.append(Problem(file, f"not UTF-8: byte 0x{raw[e.start]:02x} at line {line} "
                                f"(offset {e.start}); save the file as UTF-8", persona))
        return None


def _parse(name: str, src: _Source) -> tuple[Dataset | None, list[Problem]]:
    problems: list[Problem] = []
    files = src.files()
    shared, shared_file = _shared_questions(src, files, problems)
    in_sub = [f for f in files if f.startswith("instructions/") and f.endswith(".json")]
    persona_files = in_sub or [f for f in files if "/" not in f and f.endswith(".json")]
    if not persona_files:
        problems.append(Problem(".", "no persona files: put <persona>.json files in "
                                "instructions/ or in the dataset folder"))
    personas: dict[str, Persona] = {}
    for f in persona_files:
        pname = f.rsplit("/", 1)[-1][: -len(".json")]
        if not NAME_RE.match(pname) or ".." in pname:
            problems.append(Problem(f, "persona file name must be letters, digits, '_', '-', "
                                    "'.' (it becomes part of artifact keys)", pname))
            continue
        p = _parse_persona(pname, f, src.read(f) or b"", shared, shared_file, problems)
        if p is not None:
            personas[pname] = p
    kinds = {("traits" if "neg" in p.instructions[0] else "roles")
             for n, p in personas.items() if n != DEFAULT_PERSONA and p.instructions}
    if len(kinds) > 1:
        problems.append(Problem(".", "some personas have {pos, neg} pairs (traits) and others "
                                "only {pos} (roles); a dataset must be one kind"))
    if problems:
        return None, problems
    kind = kinds.pop() if kinds else "roles"
    scores_dir = f"{src.location}/{SCORES_DIR}" if any(
        f.startswith(SCORES_DIR + "/") for f in files) else None
    return Dataset(name=name, kind=kind, personas=dict(sorted(personas.items())),
                   questions=shared, root=src.location, scores_dir=scores_dir,
                   _source=src), []


def _shared_questions(src: _Source, files: list[str], problems: list[Problem]):
    candidates = [f for f in files if "/" not in f and f.endswith(".jsonl")]
    if SHARED_QUESTIONS in candidates:
        candidates = [SHARED_QUESTIONS]
    raw = None
    if not candidates:  # the release layout: data/extraction_questions.jsonl beside traits/
        for name in PARENT_QUESTIONS:
            raw = src.read_parent(name)
            if raw is not None:
                candidates = [f"../{name}"]
                break
        if raw is None:
            return [], None
    if len(candidates) > 1:
        problems.append(Problem(".", f"several questions files ({', '.join(candidates)}); "
                                f"name the one to use {SHARED_QUESTIONS}"))
        return [], None
    file = candidates[0]
    if raw is None:
        raw = src.read(file) or b""
    text = _decode_text(raw, file, None, problems)
    if text is None:
        return [], file
    questions: list[Question] = []
    seen: dict[int | str, int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(Problem(file, f"invalid JSON at line {lineno} column {e.colno}: "
                                    f"{e.msg}"))
            continue
        where = f"line {lineno}"
        if not isinstance(row, dict):
            problems.append(Problem(file, f"{where}: expected an object with \"question\""))
            continue
        q, qid = row.get("question"), row.get("id", len(questions))
        if not isinstance(q, str) or not q.strip():
            problems.append(Problem(file, f"{where}: \"question\" must be a non-empty string",
                                    field="question"))
            continue
        if isinstance(qid, bool) or not isinstance(qid, (int, str)):
            problems.append(Problem(file, f"{where}: \"id\" must be an integer or a string, "
                                    f"not {type(qid).__name__}", field="id"))
            continue
        if qid in seen:
            problems.append(Problem(file, f"{where}: duplicate id {qid!r} (first on line "
                                    f"{seen[qid]})", field="id"))
            continue
        seen[qid] = lineno
        questions.append(Question(len(questions), qid, q))
    if not questions and not any(p.file == file for p in problems):
        problems.append(Problem(file, "empty questions file: add lines like "
                                "{\"question\": \"...\", \"id\": 0}", field="questions"))
    return questions, file


def _parse_persona(name: str, file: str, raw: bytes, shared: list[Question],
                   shared_file: str | None, problems: list[Problem]) -> Persona | None:
    before = len(problems)
    data = _decode_json(raw, file, name, problems)
    if data is None:
        return None
    if not isinstance(data, dict):
        problems.append(Problem(file, "must be a JSON object", name, "(root)"))
        return None
    instr = data.get("instruction")
    if instr is None:
        problems.append(Problem(file, "missing: add \"instruction\": [{\"pos\": ..., "
                                "\"neg\": ...}, ...]", name, "instruction"))
    elif not isinstance(instr, list) or not instr:
        problems.append(Problem(file, "must be a non-empty list of {pos, neg} or {pos} "
                                "objects", name, "instruction"))
    else:
        has_neg = isinstance(instr[0], dict) and "neg" in instr[0]
        for i, item in enumerate(instr):
            f = f"instruction[{i}]"
            if not isinstance(item, dict):
                problems.append(Problem(file, f"must be an object, not {type(item).__name__}",
                                        name, f))
                continue
            sides = ("pos", "neg") if has_neg else ("pos",)
            for side in sides:
                v = item.get(side)
                if v is None:
                    problems.append(Problem(file, "missing instruction", name, f"{f}.{side}"))
                elif not isinstance(v, str):
                    problems.append(Problem(file, f"must be a string, not {type(v).__name__}",
                                            name, f"{f}.{side}"))
                elif not v.strip() and name != DEFAULT_PERSONA:
                    problems.append(Problem(file, "empty instruction (only the default persona "
                                            "may use \"\" for no system prompt)", name,
                                            f"{f}.{side}"))
                else:
                    unknown = [m for m in PLACEHOLDER_RE.findall(v) if m not in PLACEHOLDERS]
                    if unknown:
                        problems.append(Problem(
                            file, f"unknown placeholder {{{unknown[0]}}}: only {{model_name}} "
                            "is filled in; write the text out", name, f"{f}.{side}"))
            if not has_neg and "neg" in item:
                problems.append(Problem(file, "has \"neg\" but instruction[0] does not: give "
                                        "every entry a neg (traits) or none (roles)", name,
                                        f"{f}.neg"))
    eval_prompt = data.get("eval_prompt")
    if eval_prompt is not None and not isinstance(eval_prompt, str):
        problems.append(Problem(file, "must be a string", name, "eval_prompt"))
    questions = shared
    own = data.get("questions")
    eval_questions: list[Question] = []
    if own is not None and (not isinstance(own, list) or not all(
            isinstance(q, str) and q.strip() for q in own)):
        bad = next((i for i, q in enumerate(own) if not (isinstance(q, str) and q.strip())),
                   None) if isinstance(own, list) else None
        problems.append(Problem(file, "must be a list of non-empty strings", name,
                                "questions" if bad is None else f"questions[{bad}]"))
    else:
        eval_questions = [Question(i, i, q) for i, q in enumerate(own or [])]
        if not shared and shared_file is None:
            if not own:
                problems.append(Problem(file, "empty questions: add \"questions\" here or a "
                                        f"shared {SHARED_QUESTIONS}", name, "questions"))
            else:
                questions = eval_questions
    if len(problems) > before:
        return None
    return Persona(name=name, instructions=[dict(i) for i in instr], questions=questions,
                   eval_prompt=eval_prompt, file=file, eval_questions=eval_questions)
