"""``datasets pull`` against a real HTTP server on 127.0.0.1 serving a synthetic release-shaped
tarball (the test writes it): success, wrong checksum, truncated download, server down, an
existing dataset, an S3 root; and the pinned digest table against the release's own files
when they are on this machine. After every failure nothing is left under the datasets root."""

from __future__ import annotations

import http.server
import json
import os
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from app import release
from app.datasets import list_datasets, load_dataset
from app.errors import SpecInvalid
from app.settings import Settings, get_settings
from tests.conftest import free_port
from tests.release_data import digests, tar_bytes, write_release

RELEASE = Path(os.environ.get("CHATSPACE_RELEASE_DATA",
                              "/work/shared/data/assistant-axis-a989619/data"))


class Server:
    """Serves ``body`` at any path; ``truncate`` announces more bytes than it sends."""

    def __init__(self, body: bytes, *, truncate: bool = False):
        outer = self
        self.body, self.truncate, self.hits = body, truncate, 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.hits += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/x-gzip")
                extra = 10_000 if outer.truncate else 0
                self.send_header("Content-Length", str(len(outer.body) + extra))
                self.end_headers()
                self.wfile.write(outer.body[: len(outer.body) // 2] if outer.truncate
                                 else outer.body)
                self.wfile.flush()
                self.close_connection = True

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/release.tar.gz"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def rel(tmp_path):
    data = write_release(tmp_path / "src")
    table = tmp_path / "digests.sha256"
    table.write_text("".join(f"{d}  data/{p}\n" for p, d in digests(data).items()))
    return data, table, tar_bytes(data)


@pytest.fixture
def root(tmp_path, monkeypatch):
    r = tmp_path / "datasets"
    monkeypatch.setenv("CHATSPACE_DATASETS_ROOT", str(r))
    get_settings.cache_clear()
    return r


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_pull_success_from_http_then_read_and_ls(rel, root):
    data, table, body = rel
    with Server(body) as srv:
        seen = []
        out = release.pull(["traits_240", "roles_240"], settings=get_settings(),
                           source=srv.url, ref="synthetic", digests_file=str(table),
                           progress=lambda d, t: seen.append((d, t)))
    assert [r.name for r in out] == ["traits_240", "roles_240"] and all(r.verified for r in out)
    assert seen[-1] == (len(body), len(body))
    assert leftovers(root) == ["roles_240", "traits_240"]
    traits = load_dataset("traits_240")
    assert traits.kind == "traits" and len(traits.questions) == 6
    assert "default" in traits.personas  # the release's neutral prompts, once per job
    prov = json.loads((root / "traits_240" / release.PROVENANCE).read_text())
    assert prov["source"] == srv.url and prov["commit"] == "synthetic" and prov["verified"]
    assert prov["files"]["extraction_questions.jsonl"] == digests(data)[
        "extraction_questions.jsonl"]
    roles = load_dataset("roles_240")
    assert roles.kind == "roles" and roles.job_sample_count() == 2 * 5 * 6 + 5 * 6
    names = {d.name: d for d in list_datasets()}
    assert names["traits_240"].samples == 3 * 5 * 6 * 2 + 5 * 6


def test_wrong_checksum_leaves_nothing(rel, root, tmp_path):
    _, table, body = rel
    lines = table.read_text().splitlines()
    i = next(i for i, line in enumerate(lines) if "data/traits/instructions/" in line)
    lines[i] = "0" * 64 + lines[i][64:]
    table.write_text("\n".join(lines) + "\n")
    with Server(body) as srv, pytest.raises(release.ReleaseMismatch) as e:
        release.pull(["traits_240"], settings=get_settings(), source=srv.url, ref="synthetic",
                     digests_file=str(table))
    assert "sha256" in str(e.value) and "--trust" in str(e.value)
    assert leftovers(root) == []


def test_truncated_download_leaves_nothing(rel, root):
    _, table, body = rel
    with Server(body, truncate=True) as srv, pytest.raises(release.PullError) as e:
        release.pull(["roles_240"], settings=get_settings(), source=srv.url, ref="synthetic",
                     digests_file=str(table))
    assert "truncated" in str(e.value)
    assert leftovers(root) == []


def test_server_down_leaves_nothing(rel, root):
    _, table, _ = rel
    url = f"http://127.0.0.1:{free_port()}/release.tar.gz"  # nothing listens there
    with pytest.raises(release.PullError) as e:
        release.pull(["traits_240"], settings=get_settings(), source=url, ref="synthetic",
                     digests_file=str(table))
    assert url in str(e.value) and "ConnectError" in str(e.value)
    assert leftovers(root) == []


def test_other_ref_needs_digests_or_trust_and_existing_needs_force(rel, root):
    data, _, _ = rel
    with pytest.raises(SpecInvalid, match="no pinned digests"):
        release.pull(["traits_240"], settings=get_settings(), source=str(data), ref="abc")
    out = release.pull(["traits_240"], settings=get_settings(), source=str(data), ref="abc",
                       trust=True)
    assert not out[0].verified
    before = sorted(p.name for p in (root / "traits_240" / "instructions").iterdir())
    with pytest.raises(SpecInvalid, match="--force"):
        release.pull(["traits_240"], settings=get_settings(), source=str(data), ref="abc",
                     trust=True)
    assert sorted(p.name for p in (root / "traits_240" / "instructions").iterdir()) == before
    again = release.pull(["traits_240"], settings=get_settings(), source=str(data), ref="abc",
                         trust=True, force=True)
    assert again[0].replaced and leftovers(root) == ["traits_240"]


def test_cli_pull_then_submit_missing_names_the_command(rel, root, tmp_path):
    from cli.main import cli

    _, table, body = rel
    r = CliRunner().invoke(cli, ["submit", "traits_240"])
    assert r.exit_code == 2
    assert "chatspace-jobs datasets pull traits_240" in r.output
    with Server(body) as srv:
        r = CliRunner().invoke(cli, ["datasets", "pull", "traits_240", "--from", srv.url,
                                     "--ref", "synthetic", "--digests", str(table)])
    assert r.exit_code == 0, r.output
    assert "traits_240: " in r.output and "verified" in r.output
    r = CliRunner().invoke(cli, ["datasets", "validate", "traits_240"])
    assert r.exit_code == 0 and "valid traits" in r.output, r.output


def test_pull_into_s3_root(rel, s3_bucket, monkeypatch):
    data, table, _ = rel
    monkeypatch.setenv("CHATSPACE_DATASETS_ROOT", f"s3://{s3_bucket}/datasets")
    get_settings.cache_clear()
    release.pull(["roles_240"], settings=get_settings(), source=str(data), ref="synthetic",
                 digests_file=str(table))
    ds = load_dataset("roles_240")
    assert ds.kind == "roles" and "default" in ds.personas and len(ds.questions) == 6
    with pytest.raises(SpecInvalid, match="--force"):
        release.pull(["roles_240"], settings=get_settings(), source=str(data),
                     ref="synthetic", digests_file=str(table))


@pytest.mark.skipif(not RELEASE.is_dir(), reason="the release's data/ folder is not here")
def test_pinned_digests_match_the_release_as_published(tmp_path):
    table = release.pinned_digests()
    assert table["extraction_questions.jsonl"].startswith("31650b9a")
    assert len(table) == 519
    assert release.verify_data(RELEASE, table) == []
    out = release.pull(["traits_240", "roles_240"],
                       settings=Settings(datasets_root=str(tmp_path / "d")),
                       source=str(RELEASE.parent))
    assert all(r.verified for r in out)
    ds = load_dataset("traits_240", settings=Settings(datasets_root=str(tmp_path / "d")))
    assert len(ds.personas) == 241 and ds.sample_count("default") == 1200
