"""``datasets pull``: the public persona release, downloaded, verified file by file, unpacked.

The release is safety-research/assistant-axis ``data/`` at a pinned commit: the shared
``extraction_questions.jsonl``, ``traits/`` (240 traits) and ``roles/`` (275 roles and
``default.json``). Every file is checked against a sha256 table pinned for that commit
(``app/release_digests/<commit>.sha256``), so the same bytes verify whether they come from
GitHub, a mirror, a tarball or a local checkout. Another ``--ref`` needs its own table
(``digests=``) or ``trust=True`` (then the provenance says "unverified").

Unpacked as two named datasets under the datasets root (a folder or ``s3://``):

    traits_240/  instructions/<trait>.json, instructions/default.json (the release's neutral
                 prompts from roles/, so the default persona is captured once and pos_default
                 exists), trait_list.json, extraction_questions.jsonl, PROVENANCE.json
    roles_240/   instructions/<role>.json + default.json, role_list.json,
                 extraction_questions.jsonl, PROVENANCE.json

Nothing half-written on failure: everything is downloaded and checked in a temporary folder;
a local root gets each dataset by one ``rename`` from a staging folder inside the root (an
existing dataset is moved aside first and put back if the swap fails); an S3 root gets the
files under the final prefix with ``PROVENANCE.json`` last, and on any failure the keys just
written are deleted. An existing dataset is replaced only with ``force``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tarfile
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from app.errors import ChatspaceError, SpecInvalid

log = logging.getLogger(__name__)

REPO = "safety-research/assistant-axis"
PINNED = "a98961956072224eaf244eb289d6c01700b63795"
DIGESTS_DIR = Path(__file__).resolve().parent / "release_digests"
ARCHIVE_URL = "https://codeload.github.com/{repo}/tar.gz/{ref}"
QUESTIONS = "extraction_questions.jsonl"
PROVENANCE = "PROVENANCE.json"
NAMES = {"traits_240": "traits", "roles_240": "roles"}
TIMEOUT_S = 60.0


class PullError(ChatspaceError):
    """A pull that could not complete; nothing was left under the datasets root."""

    code = "pull_failed"
    http_status = 502


class ReleaseMismatch(PullError):
    """The files do not match the digest table: not the release asked for."""

    code = "release_mismatch"
    http_status = 422


@dataclass
class PullResult:
    name: str
    location: str
    files: int
    verified: bool
    replaced: bool


# ------------------------------------------------------------------------------ digests


def load_digests(path: Path) -> dict[str, str]:
    """A ``sha256sum``-format table (``<hex>  <path under data/>``; ``#`` comments)."""
    table = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        digest, _, rel = line.partition("  ")
        if len(digest) != 64 or not rel:
            raise SpecInvalid(f"{path}:{lineno}: expected '<sha256>  <path>'", field="digests")
        table[rel.strip().removeprefix("data/")] = digest.lower()
    return table


def pinned_digests(ref: str = PINNED) -> dict[str, str] | None:
    f = DIGESTS_DIR / f"{ref}.sha256"
    return load_digests(f) if f.is_file() else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


DEFAULT_FILE = "roles/instructions/default.json"  # traits_240 takes its default persona


def _used(rel: str, names) -> bool:
    return (rel == QUESTIONS or rel.split("/", 1)[0] in names
            or (rel == DEFAULT_FILE and "traits" in names))


def verify_data(data: Path, digests: dict[str, str], *, names=("traits", "roles")) -> list[str]:
    """Every problem of ``data/`` against the table, for the files the datasets use: one
    missing, different, or not in the table. Empty list = verified."""
    wanted = {rel: d for rel, d in digests.items() if _used(rel, names)}
    have = {rel: f for rel, f in ((f.relative_to(data).as_posix(), f)
                                  for f in sorted(data.rglob("*")) if f.is_file())
            if _used(rel, names)}
    problems = [f"{rel}: missing" for rel in sorted(set(wanted) - set(have))]
    problems += [f"{rel}: not in the digest table" for rel in sorted(set(have) - set(wanted))]
    for rel in sorted(set(wanted) & set(have)):
        got = _sha256(have[rel])
        if got != wanted[rel]:
            problems.append(f"{rel}: sha256 {got[:12]}… expected {wanted[rel][:12]}…")
    return problems


# ------------------------------------------------------------------------------ fetching


def _download(url: str, dest: Path, progress: Callable[[int, int | None], None]) -> None:
    """Stream ``url`` to ``dest``; a short body (the server's Content-Length not reached)
    or a connection failure is a PullError naming the URL."""
    import httpx

    got, total = 0, None
    try:
        with httpx.stream("GET", url, follow_redirects=True, timeout=TIMEOUT_S) as r:
            if r.status_code != 200:
                raise PullError(f"{url} answered HTTP {r.status_code}",
                                hint="check the URL, or --ref for the commit")
            total = int(r.headers["content-length"]) if "content-length" in r.headers else None
            with dest.open("wb") as f:
                for chunk in r.iter_raw(1 << 16):
                    f.write(chunk)
                    got += len(chunk)
                    progress(got, total)
    except httpx.TransportError as exc:  # refused, reset, timeout, short body
        if total is not None and got < total:
            raise PullError(f"download from {url} truncated: {got} of {total} bytes "
                            f"({exc.__class__.__name__})",
                            hint="try again; a mirror or local copy works too (--from)"
                            ) from None
        raise PullError(f"download from {url} failed: {exc.__class__.__name__}: {exc}",
                        hint="check the network or use --from with a mirror or a local copy"
                        ) from None
    if total is not None and got != total:
        raise PullError(f"download from {url} truncated: {got} of {total} bytes",
                        hint="try again; a mirror or local copy works too (--from)")


def _unpack(archive: Path, into: Path) -> Path:
    """Extract the regular files of a release tarball (no links, nothing outside ``into``);
    returns its ``data`` folder."""
    try:
        with tarfile.open(archive) as tar:
            members = []
            for m in tar.getmembers():
                parts = Path(m.name).parts
                if m.name.startswith("/") or ".." in parts:
                    raise PullError(f"unsafe path in the archive: {m.name!r}")
                if m.isfile() and "data" in parts:
                    members.append(m)
            tar.extractall(into, members=members, filter="data")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise PullError(f"{archive.name} is not a readable release archive "
                        f"({exc.__class__.__name__}: {exc})",
                        hint="a truncated download? try again") from None
    return _find_data(into)


def _find_data(root: Path) -> Path:
    """The release ``data/`` folder: ``root`` itself, ``root/data`` or ``root/*/data``."""
    for cand in (root, root / "data", *sorted(p / "data" for p in root.iterdir() if p.is_dir())):
        if (cand / QUESTIONS).is_file() and (cand / "traits").is_dir():
            return cand
    raise PullError(f"no release data/ folder (with {QUESTIONS} and traits/) in {root}",
                    hint="point --from at the repository, its data/ folder or its tarball")


def fetch(source: str | None, ref: str, work: Path,
          progress: Callable[[int, int | None], None]) -> tuple[Path, str]:
    """The release's ``data/`` folder under ``work`` and a description of where it came
    from. ``source``: None (GitHub at ``ref``), an http(s)/file URL of a tarball, a local
    tarball, or a local checkout / ``data`` folder (used in place, read only)."""
    if source is None:
        source = ARCHIVE_URL.format(repo=REPO, ref=ref)
    if source.startswith(("http://", "https://")):
        archive = work / "release.tar.gz"
        _download(source, archive, progress)
        return _unpack(archive, work / "unpacked"), source
    path = Path(source.removeprefix("file://")).expanduser()
    if path.is_dir():
        return _find_data(path), str(path.resolve())
    if path.is_file():
        return _unpack(path, work / "unpacked"), str(path.resolve())
    raise PullError(f"--from {source}: no such file or folder", hint="a URL, a tarball or a "
                    "checkout of the release")


# ------------------------------------------------------------------------------ staging


def _stage(data: Path, name: str, into: Path, provenance: dict) -> Path:
    """One dataset folder in the layout this service reads, from the release ``data/``."""
    part = NAMES[name]
    out = into / name
    (out / "instructions").mkdir(parents=True)
    for f in sorted((data / part / "instructions").glob("*.json")):
        shutil.copyfile(f, out / "instructions" / f.name)
    for f in sorted((data / part).glob("*.json")):  # trait_list.json / role_list.json
        shutil.copyfile(f, out / f.name)
    shutil.copyfile(data / QUESTIONS, out / QUESTIONS)
    default = data / "roles" / "instructions" / "default.json"
    copied_default = part == "traits" and default.is_file()
    if copied_default:
        shutil.copyfile(default, out / "instructions" / "default.json")
    files = {f.relative_to(out).as_posix(): _sha256(f) for f in sorted(out.rglob("*"))
             if f.is_file()}
    (out / PROVENANCE).write_text(json.dumps({
        **provenance, "dataset": name, "from_release": f"data/{part}",
        "default_from": "data/roles/instructions/default.json" if copied_default else None,
        "files": files}, indent=2, sort_keys=True))
    from app.datasets import load_dataset_at

    load_dataset_at(out)  # raises DatasetInvalid when the release does not read
    return out


# ------------------------------------------------------------------------------ installing


def _install_local(staged: Path, root: Path, *, force: bool) -> bool:
    """Move ``staged`` to ``root/<name>`` by rename; returns whether one was replaced."""
    target = root / staged.name
    aside = None
    if target.exists() or target.is_symlink():
        if not force:
            raise SpecInvalid(f"{target} exists", field="dataset",
                              hint="pass --force to replace it")
        aside = root / f".{staged.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(target, aside)
    try:
        os.rename(staged, target)
    except OSError:
        if aside is not None:
            os.rename(aside, target)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return aside is not None


def _install_s3(staged: Path, root: str, settings, *, force: bool) -> bool:
    from app.datasets import _client, _s3_list, _split_s3

    bucket, prefix = _split_s3(root)
    base = f"{prefix}/{staged.name}" if prefix else staged.name
    client = _client(settings)
    existing = list(_s3_list(client, bucket, base + "/"))
    if existing and not force:
        raise SpecInvalid(f"s3://{bucket}/{base} exists", field="dataset",
                          hint="pass --force to replace it")
    files = sorted((f for f in staged.rglob("*") if f.is_file()),
                   key=lambda f: f.name == PROVENANCE)  # provenance last: "complete"
    written = []
    try:
        for f in files:
            key = f"{base}/{f.relative_to(staged).as_posix()}"
            client.put_object(Bucket=bucket, Key=key, Body=f.read_bytes())
            written.append(key)
    except Exception:
        for key in written:
            try:
                client.delete_object(Bucket=bucket, Key=key)
            except Exception:  # noqa: BLE001 - best effort; the first error is the one to see
                log.warning("could not delete %s after a failed pull", key)
        raise
    stale = set(existing) - {f.relative_to(staged).as_posix() for f in files}
    for rel in stale:
        client.delete_object(Bucket=bucket, Key=f"{base}/{rel}")
    return bool(existing)


# ------------------------------------------------------------------------------ entry point


def pull(names: list[str], *, settings, source: str | None = None, ref: str = PINNED,
         digests_file: str | None = None, trust: bool = False, force: bool = False,
         progress: Callable[[int, int | None], None] = lambda done, total: None,
         ) -> list[PullResult]:
    """Download (or read), verify and unpack the named datasets under the datasets root."""
    from app.datasets import _root, check_name

    for n in names:
        check_name(n)
        if n not in NAMES:
            raise SpecInvalid(f"'{n}' is not a published dataset", field="dataset",
                              hint=f"one of {', '.join(NAMES)}")
    if digests_file:
        digests = load_digests(Path(digests_file))
    else:
        digests = pinned_digests(ref)
    if digests is None and not trust:
        raise SpecInvalid(f"no pinned digests for ref {ref}", field="ref",
                          hint=f"pass --digests FILE for that commit, --trust to skip the "
                               f"check, or use the pinned {PINNED[:7]}")
    root = _root(settings)
    local = not root.startswith("s3://")
    if local:
        Path(root).mkdir(parents=True, exist_ok=True)
        taken = [n for n in names if (Path(root) / n).exists() or (Path(root) / n).is_symlink()]
        if taken and not force:  # before any download: all or nothing
            raise SpecInvalid(f"{Path(root) / taken[0]} exists", field="dataset",
                              hint="pass --force to replace it")
    # the temporary folder sits inside a local root, so the final move is one rename
    with tempfile.TemporaryDirectory(prefix=".pull-", dir=root if local else None) as tmp:
        work = Path(tmp)
        data, origin = fetch(source, ref, work, progress)
        verified = False
        if digests is not None:
            problems = verify_data(data, digests, names=tuple(NAMES[n] for n in names))
            if problems and not trust:
                more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
                raise ReleaseMismatch(f"release files do not match the digests of {ref[:12]}: "
                                f"{problems[0]}{more}",
                                hint="a different commit? pass --ref with --digests, or "
                                     "--trust to accept it unverified")
            verified = not problems
        provenance = {"source": origin, "repository": REPO, "commit": ref,
                      "verified": verified, "digests": digests_file or (
                          f"app/release_digests/{ref}.sha256" if digests else None),
                      "pulled_at": datetime.now(UTC).isoformat(timespec="seconds")}
        staged = [_stage(data, n, work / "staged", provenance) for n in names]
        out = []
        for s in staged:
            n_files = sum(1 for f in s.rglob("*") if f.is_file())
            if local:
                replaced = _install_local(s, Path(root), force=force)
                where = str(Path(root) / s.name)
            else:
                replaced = _install_s3(s, root, settings, force=force)
                where = f"{root.rstrip('/')}/{s.name}"
            out.append(PullResult(s.name, where, n_files, verified, replaced))
        return out
