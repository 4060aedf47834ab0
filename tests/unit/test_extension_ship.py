"""Means crossing from the engine's worker to its caller: inline bytes by default, a /dev/shm
file from CHATSPACE_ENGINE_SHIP_MIN_BYTES on (workers/engine/extension.py ship / unpack /
unlink_shipped)."""

from __future__ import annotations

import os

import pytest
import torch

from workers.engine.extension import SHM_DIR, ship, sweep_shipped, unlink_shipped, unpack

pytestmark = pytest.mark.skipif(not SHM_DIR.is_dir(), reason="no /dev/shm")


def test_large_batches_go_through_one_file_and_come_back_exact(monkeypatch):
    monkeypatch.setenv("CHATSPACE_ENGINE_SHIP_MIN_BYTES", str(4 << 20))
    g = torch.Generator().manual_seed(0)
    parts = [(torch.randn(36, 4096, generator=g) * 5, 7), (torch.randn(3, 4096, generator=g), 1)]
    parts = parts * 8  # 4.9 MB: over the inline limit
    desc = ship(parts)
    assert {d["shm"] for d in desc} == {desc[0]["shm"]}, "one file for the whole batch"
    got = [unpack(d) for d in desc]
    unlink_shipped(desc)
    assert not os.path.exists(desc[0]["shm"])  # deleted; the mappings stay readable
    for (t, n), u in zip(parts, got):
        assert torch.equal(u, t / n)
    got[0] += 1  # copy-on-write: a caller may modify its tensor
    assert torch.equal(got[2], parts[2][0] / 7)


def test_small_batches_go_inline_and_a_lost_file_is_swept(monkeypatch):
    big = ship([(torch.ones(1024, 1024), 2)] * 2)  # 8 MB: inline by default
    assert all("data" in d for d in big)
    small = ship([(torch.ones(2, 3), 2)])
    assert "data" in small[0] and torch.equal(unpack(small[0]), torch.full((2, 3), 0.5))
    monkeypatch.setenv("CHATSPACE_ENGINE_SHIP_MIN_BYTES", "0")
    desc = ship([(torch.ones(2, 3), 2)])
    assert os.path.exists(desc[0]["shm"])
    sweep_shipped()  # the worker's next reset: an engine that died never took it
    assert not os.path.exists(desc[0]["shm"])
