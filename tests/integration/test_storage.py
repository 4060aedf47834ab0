"""The ArtifactStore contract, run against the S3 test server (moto) and the local folder.

Both adapters must behave the same: the pipeline and the API never branch on which one they
got. S3-only failure modes (unreachable endpoint, missing bucket, transient 5xx, wrong
credentials) follow the contract tests.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import httpx
import pytest

from app.errors import ArtifactNotFound, ChecksumMismatch, StorageError
from app.settings import S3Settings, Settings, get_settings
from app.storage import LocalStore, S3Store, get_store
from tests.conftest import free_port


@pytest.fixture(params=["local", "s3"])
def store(request, monkeypatch):
    monkeypatch.setenv("CHATSPACE_S3_MULTIPART_THRESHOLD_MB", "5")
    monkeypatch.setenv("CHATSPACE_S3_UPLOAD_RETRY_S", "5")
    if request.param == "s3":
        request.getfixturevalue("s3_bucket")
    get_settings.cache_clear()
    st = get_store()
    assert isinstance(st, S3Store if request.param == "s3" else LocalStore)
    return st


def corrupt(store, key: str, data: bytes) -> None:
    """Replace the raw object behind the store's back, keeping its recorded metadata, so only
    a check of the content itself can notice."""
    if isinstance(store, S3Store):
        head = store.client.head_object(Bucket=store.bucket, Key=key)
        store.client.put_object(Bucket=store.bucket, Key=key, Body=data,
                                Metadata=head["Metadata"])
    else:
        (store.root / key).write_bytes(data)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_round_trip_with_checksum(store, tmp_path):
    data = b"activations" * 1000
    obj = store.put_bytes("m/d/f32/1/persona.safetensors", data, meta={"Persona": "pirate"},
                          content_type="application/x-safetensors")
    assert (obj.key, obj.size, obj.sha256) == ("m/d/f32/1/persona.safetensors", len(data), sha(data))
    head = store.head(obj.key)
    assert (head.size, head.sha256, head.meta) == (len(data), sha(data), {"persona": "pirate"})
    assert store.get_bytes(obj.key) == data
    assert store.get_bytes(obj.key, expect_sha256=sha(data)) == data
    with pytest.raises(ChecksumMismatch, match="persona.safetensors"):
        store.get_bytes(obj.key, expect_sha256=sha(b"other"))
    assert store.exists(obj.key) and store.verify(obj.key, sha(data))
    assert not store.verify(obj.key, sha(b"other"))
    out = tmp_path / "dl" / "p.safetensors"
    store.download_file(obj.key, out, expect_sha256=sha(data))
    assert out.read_bytes() == data

    store.delete(obj.key)
    assert store.head(obj.key) is None and not store.exists(obj.key)
    assert not store.verify(obj.key, sha(data))
    with pytest.raises(ArtifactNotFound):
        store.get_bytes(obj.key)
    store.delete(obj.key)  # deleting a missing key is not an error


def test_corrupted_object_is_detected(store, tmp_path):
    data = b"x" * 4096
    store.put_bytes("job/p.bin", data)
    corrupt(store, "job/p.bin", b"y" * 4096)
    assert store.head("job/p.bin").sha256 == sha(data)  # the record still claims the old content
    with pytest.raises(ChecksumMismatch, match="'job/p.bin'"):
        store.get_bytes("job/p.bin")
    assert not store.verify("job/p.bin", sha(data))
    out = tmp_path / "dl" / "p.bin"
    with pytest.raises(ChecksumMismatch):
        store.download_file("job/p.bin", out)
    assert list(out.parent.iterdir()) == []  # neither the file nor a partial one


def test_listing_by_prefix_and_folders(store):
    for key in ("job/a/x.bin", "job/a/y.bin", "job/b/z.bin", "jobs2/q.bin", "top.bin"):
        store.put_bytes(key, key.encode())
    keys = lambda objs: [o.key for o in objs]
    assert keys(store.list("job/")) == ["job/a/x.bin", "job/a/y.bin", "job/b/z.bin"]
    assert keys(store.list("job")) == ["job/a/x.bin", "job/a/y.bin", "job/b/z.bin", "jobs2/q.bin"]
    assert keys(store.list("job/a/", recursive=False)) == ["job/a/x.bin", "job/a/y.bin"]
    assert keys(store.list("", recursive=False)) == ["top.bin"]
    assert len(store.list()) == 5
    assert {o.key: o.size for o in store.list("job/a/")} == {"job/a/x.bin": 11, "job/a/y.bin": 11}
    assert store.folders() == ["job/", "jobs2/"]
    assert store.folders("job/") == ["job/a/", "job/b/"]
    assert store.list("nothing/") == [] and store.folders("nothing/") == []
    store.delete("job/b/z.bin")
    assert store.folders("job/") == ["job/a/"]


def test_overwrite_protection(store, tmp_path):
    first = store.put_bytes("k/v.bin", b"one")
    again = store.put_bytes("k/v.bin", b"one")  # same content: no-op, the existing object
    assert again.sha256 == first.sha256
    with pytest.raises(StorageError, match="already exists") as err:
        store.put_bytes("k/v.bin", b"two")
    assert "'k/v.bin'" in str(err.value)
    assert store.get_bytes("k/v.bin") == b"one"
    src = tmp_path / "two.bin"
    src.write_bytes(b"two")
    with pytest.raises(StorageError, match="already exists"):
        store.put_file("k/v.bin", src)
    assert store.get_bytes("k/v.bin") == b"one"
    assert store.put_file("k/v.bin", src, overwrite=True).sha256 == sha(b"two")
    assert store.get_bytes("k/v.bin") == b"two"
    assert store.head("k/v.bin").sha256 == sha(b"two")


@pytest.mark.parametrize("bad", ["../x", "/abs", "a//b", "a/./b", "a/../b", "",
                                 ".chatspace-meta/x"])
def test_bad_keys_rejected(store, bad):
    with pytest.raises(StorageError):
        store.put_bytes(bad, b"x")


def test_manifest_written_last_and_read(store):
    prefix = "m/ds/f32/job-7"
    a = store.put_bytes(f"{prefix}/a.safetensors", b"aaa")
    b = store.put_bytes(f"{prefix}/b.safetensors", b"bbbb")
    assert store.read_manifest(prefix) is None
    store.write_manifest(prefix, {"job_id": 7, "artifacts": [
        {"key": a.key, "shape": [2, 3]}, {"key": b.key, "sha256": b.sha256}]})
    got = store.read_manifest(prefix + "/")
    assert got["job_id"] == 7
    assert [(e["key"], e["size"], e["sha256"]) for e in got["artifacts"]] == [
        (a.key, 3, sha(b"aaa")), (b.key, 4, sha(b"bbbb"))]
    assert got["artifacts"][0]["shape"] == [2, 3]
    assert store.exists(f"{prefix}/manifest.json")

    with pytest.raises(StorageError, match="not in"):
        store.write_manifest("other", {"artifacts": [{"key": "other/missing.bin"}]})
    assert store.read_manifest("other") is None
    with pytest.raises(ChecksumMismatch):
        store.write_manifest("m2", {"artifacts": [{"key": a.key, "sha256": sha(b"zzz")}]})

    store.put_bytes("auto/x.bin", b"x")  # no artifacts list: everything under the prefix
    store.write_manifest("auto", {"job_id": 8})
    assert [e["key"] for e in store.read_manifest("auto")["artifacts"]] == ["auto/x.bin"]


def test_large_file_in_parts(store, tmp_path):
    src = tmp_path / "big.bin"
    block = os.urandom(1024 * 1024)
    with open(src, "wb") as f:  # 12 MiB over a 5 MiB threshold: three parts on S3
        f.writelines(bytes([i]) + block[1:] for i in range(12))
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    obj = store.put_file("big/acts.safetensors", src)
    assert (obj.size, obj.sha256) == (src.stat().st_size, digest)
    if isinstance(store, S3Store):
        assert store.head(obj.key).etag.endswith("-3")  # a multipart ETag, not an MD5
    out = tmp_path / "back.bin"
    store.download_file(obj.key, out)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == digest
    assert store.verify(obj.key, digest)
    assert sha(store.get_bytes(obj.key)) == digest


def test_url_downloads_the_object(store):
    store.put_bytes("u/p.bin", b"payload")
    url = store.url("u/p.bin", expires_s=60)
    if isinstance(store, S3Store):
        resp = httpx.get(url)
        assert resp.status_code == 200 and resp.content == b"payload"
    else:
        assert url.startswith("file://")
        assert Path(url2pathname(urlparse(url).path)).read_bytes() == b"payload"
    with pytest.raises(ArtifactNotFound):
        store.url("u/missing.bin")


def test_check_passes_and_leaves_nothing(store):
    store.check()
    assert store.list() == [] and store.folders() == []


# -- S3 failure modes ----------------------------------------------------------------------

def _s3(endpoint: str, bucket: str, **kw) -> S3Store:
    settings = S3Settings(endpoint_url=endpoint, bucket=bucket, access_key_id="test",
                          secret_access_key="test", upload_retry_s=kw.pop("retry", 0.5),
                          max_attempts=1, connect_timeout_s=0.5, **kw)
    return get_store(Settings(s3=settings))


@pytest.mark.parametrize("op", ["check", "put", "get", "exists", "list"])
def test_unreachable_endpoint_names_endpoint_and_bucket(op):
    endpoint = f"http://127.0.0.1:{free_port()}"
    store = _s3(endpoint, "cs-nowhere")
    started = time.monotonic()
    with pytest.raises(StorageError) as err:
        {"check": store.check, "put": lambda: store.put_bytes("a/b", b"x"),
         "get": lambda: store.get_bytes("a/b"), "exists": lambda: store.exists("a/b"),
         "list": store.list}[op]()
    text = str(err.value)
    assert endpoint in text and "'cs-nowhere'" in text and "unreachable" in text
    assert "CHATSPACE_S3_ENDPOINT_URL" in text
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("op", ["check", "put", "get", "exists"])
def test_missing_bucket_names_endpoint_and_bucket(s3_endpoint, op):
    store = _s3(s3_endpoint, "cs-does-not-exist")
    started = time.monotonic()
    with pytest.raises(StorageError) as err:
        {"check": store.check, "put": lambda: store.put_bytes("a/b", b"x"),
         "get": lambda: store.get_bytes("a/b"), "exists": lambda: store.exists("a/b")}[op]()
    text = str(err.value)
    assert s3_endpoint in text and "'cs-does-not-exist'" in text and "does not exist" in text
    assert "CHATSPACE_S3_BUCKET" in text
    assert time.monotonic() - started < 5


def _stubbed(retry: float):
    from botocore.stub import Stubber

    store = _s3("http://s3.invalid:9000", "cs-stub", retry=retry)
    stub = Stubber(store.client)
    stub.add_response("head_bucket", {}, {"Bucket": "cs-stub"})
    return store, stub


def test_transient_errors_are_retried():
    store, stub = _stubbed(retry=10)
    stub.add_client_error("head_object", "404", http_status_code=404)
    stub.add_client_error("put_object", "SlowDown", http_status_code=503)
    stub.add_client_error("put_object", "InternalError", http_status_code=500)
    stub.add_response("put_object", {"ETag": '"e"'})
    stub.add_response("head_object", {"ContentLength": 1, "ETag": '"e"',
                                      "Metadata": {"sha256": sha(b"x")}})
    with stub:
        obj = store.put_bytes("a/b", b"x")
    stub.assert_no_pending_responses()
    assert obj.sha256 == sha(b"x") and obj.etag == "e"


def test_persistent_5xx_gives_storage_error_naming_endpoint_and_bucket():
    store, stub = _stubbed(retry=0.5)
    stub.add_client_error("head_object", "404", http_status_code=404)
    for _ in range(20):
        stub.add_client_error("put_object", "ServiceUnavailable", http_status_code=503)
    with stub, pytest.raises(StorageError) as err:
        store.put_bytes("a/b", b"x")
    assert "http://s3.invalid:9000" in str(err.value) and "'cs-stub'" in str(err.value)


def test_wrong_credentials_named():
    from botocore.stub import Stubber

    store = _s3("http://s3.invalid:9000", "cs-stub")
    stub = Stubber(store.client)
    stub.add_client_error("head_bucket", "403", http_status_code=403)
    with stub, pytest.raises(StorageError) as err:
        store.check()
    text = str(err.value)
    assert "credentials" in text and "CHATSPACE_S3_SECRET_ACCESS_KEY" in text
    assert "'cs-stub'" in text and "http://s3.invalid:9000" in text
