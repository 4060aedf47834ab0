"""Local-folder adapter specifics (no services): atomic writes, sidecars, races, selection.

The behaviour shared with S3 is covered by tests/integration/test_storage.py.
"""

from __future__ import annotations

import hashlib
import os
import threading

import pytest

from app.errors import ArtifactNotFound, ChecksumMismatch, StorageError
from app.settings import S3Settings, Settings, get_settings
from app.storage import LocalStore, S3Store, get_store, s3_client
from app.storage.local import META_DIR, TMP_DIR


@pytest.fixture
def store(tmp_path):
    return LocalStore(tmp_path / "artifacts")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_get_store_picks_adapter_from_settings(monkeypatch, tmp_path):
    st = get_store()
    assert isinstance(st, LocalStore) and st.root == get_settings().artifacts_dir.resolve()
    monkeypatch.setenv("CHATSPACE_S3_BUCKET", "cs-bucket")
    monkeypatch.setenv("CHATSPACE_S3_ENDPOINT_URL", "http://minio.invalid:9000")
    get_settings.cache_clear()
    st = get_store()
    assert isinstance(st, S3Store) and st.bucket == "cs-bucket"
    assert st.endpoint == "http://minio.invalid:9000"


def test_s3_client_is_configured_for_s3_compatible_servers():
    settings = S3Settings(endpoint_url="http://minio.invalid:9000", bucket="b", region="eu-west-1",
                          access_key_id="AK", secret_access_key="SK", max_attempts=3,
                          connect_timeout_s=2.5)
    client = s3_client(Settings(s3=settings))  # Settings or S3Settings both work
    cfg = client.meta.config
    assert cfg.request_checksum_calculation == "when_required"
    assert cfg.response_checksum_validation == "when_required"
    assert cfg.s3["addressing_style"] == "path"
    assert cfg.retries["total_max_attempts"] == 3 and cfg.connect_timeout == 2.5
    assert client.meta.region_name == "eu-west-1"
    assert client.meta.endpoint_url == "http://minio.invalid:9000"
    creds = client._request_signer._credentials
    assert (creds.access_key, creds.secret_key) == ("AK", "SK")
    url = client.generate_presigned_url("get_object", Params={"Bucket": "b", "Key": "k"})
    assert url.startswith("http://minio.invalid:9000/b/k?")  # path-style


def test_sidecar_records_checksum_and_is_hidden(store):
    store.put_bytes("a/b.bin", b"data", meta={"layer": 3})
    side = store.root / META_DIR / "a/b.bin.json"
    assert sha(b"data") in side.read_text()
    assert [o.key for o in store.list()] == ["a/b.bin"]
    assert store.folders() == ["a/"]
    assert store.head("a/b.bin").meta == {"layer": "3"}


def test_writes_leave_no_temp_files(store, tmp_path):
    store.put_bytes("x/1.bin", b"1")
    src = tmp_path / "f.bin"
    src.write_bytes(b"2")
    store.put_file("x/2.bin", src)
    assert list((store.root / TMP_DIR).iterdir()) == []


def test_failed_write_leaves_key_absent(store, monkeypatch):
    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "link", boom)
    with pytest.raises(StorageError, match="No space left") as err:
        store.put_bytes("x/1.bin", b"1")
    assert "CHATSPACE_DATA_DIR" in str(err.value)
    monkeypatch.undo()
    assert not store.exists("x/1.bin")
    assert list((store.root / TMP_DIR).iterdir()) == []


def test_racing_writers_never_clobber(store):
    """Eight writers race for one key with different content: exactly one wins, the others
    get StorageError, and the stored bytes match the winner's recorded checksum."""
    results, barrier = {}, threading.Barrier(8)

    def write(i):
        barrier.wait()
        try:
            results[i] = store.put_bytes("race/k.bin", f"writer {i}".encode())
        except StorageError as exc:
            results[i] = exc

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, r in results.items() if not isinstance(r, Exception)]
    assert len(winners) == 1
    assert store.get_bytes("race/k.bin") == f"writer {winners[0]}".encode()


def test_same_content_from_many_writers_is_fine(store):
    barrier = threading.Barrier(4)
    errors = []

    def write():
        barrier.wait()
        try:
            store.put_bytes("same/k.bin", b"identical")
        except StorageError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and store.get_bytes("same/k.bin") == b"identical"


def test_delete_prunes_empty_folders(store):
    store.put_bytes("job/a/x.bin", b"x")
    store.put_bytes("job/b/y.bin", b"y")
    store.delete("job/a/x.bin")
    assert not (store.root / "job/a").exists()
    assert not (store.root / META_DIR / "job/a").exists()
    assert store.folders("job/") == ["job/b/"]


def test_object_without_sidecar(store):
    """A file placed by hand has no recorded checksum: readable, but not verifiable, and
    overwrite protection compares its actual content."""
    path = store.root / "hand/made.bin"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"hand")
    assert store.head("hand/made.bin").sha256 is None
    assert store.get_bytes("hand/made.bin") == b"hand"
    with pytest.raises(ChecksumMismatch):
        store.get_bytes("hand/made.bin", expect_sha256=sha(b"other"))
    assert not store.verify("hand/made.bin", sha(b"hand"))
    assert store.put_bytes("hand/made.bin", b"hand").key == "hand/made.bin"
    with pytest.raises(StorageError, match="already exists"):
        store.put_bytes("hand/made.bin", b"different")


def test_key_that_is_a_folder_is_refused(store):
    store.put_bytes("a/b", b"x")
    with pytest.raises(StorageError, match="folder"):
        store.put_bytes("a", b"y")
    with pytest.raises(StorageError, match="parent"):
        store.put_bytes("a/b/c", b"z")
    assert store.head("a") is None and store.get_bytes("a/b") == b"x"


def test_unusable_root_gives_clear_error(tmp_path):
    root = tmp_path / "file"
    root.write_text("not a folder")
    with pytest.raises(StorageError) as err:
        LocalStore(root).check()
    assert str(root) in str(err.value) and "CHATSPACE_DATA_DIR" in str(err.value)


def test_missing_key_errors(store, tmp_path):
    with pytest.raises(ArtifactNotFound):
        store.get_bytes("no/such.bin")
    with pytest.raises(ArtifactNotFound):
        store.download_file("no/such.bin", tmp_path / "out.bin")
    assert not (tmp_path / "out.bin").exists()
    assert store.read_manifest("no") is None
