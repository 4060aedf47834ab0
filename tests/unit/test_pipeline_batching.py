"""The per-persona batch policy: OOM halving down to the floor, the fault hook, cancel."""

from __future__ import annotations

import pytest

from app.errors import EngineOOM
from workers import batching
from workers.batching import BatchPolicy, JobCancelled


@pytest.fixture(autouse=True)
def _reset_faults():
    batching._fault_counts.clear()
    yield
    batching._fault_counts.clear()


class FakeOOM(RuntimeError):
    pass


def oom_when_larger_than(limit, calls):
    def fn(batch):
        calls.append(len(batch))
        if len(batch) > limit:
            raise FakeOOM("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [x * 10 for x in batch]
    return fn


def test_oom_halves_and_keeps_done_samples():
    calls, events, freed = [], [], []
    policy = BatchPolicy(persona="p", batch_size=8, min_batch=1,
                         on_event=lambda k, d: events.append((k, d)),
                         free_memory=lambda: freed.append(1))
    out = policy.run(list(range(10)), oom_when_larger_than(2, calls))
    assert out == [x * 10 for x in range(10)]
    assert calls[:3] == [8, 4, 2]  # halved on the same batch
    assert policy.batch_size == 2 and policy.failed_sizes == [8, 4]
    assert [k for k, _ in events] == ["oom_retry", "oom_retry"]
    assert events[0][1]["batch_size"] == 8 and events[0][1]["next_batch_size"] == 4
    assert len(freed) == 2


def test_oom_at_floor_raises_with_figures():
    events = []
    policy = BatchPolicy(persona="p", batch_size=4, min_batch=2,
                         on_event=lambda k, d: events.append((k, d)), free_memory=lambda: None)
    with pytest.raises(EngineOOM) as err:
        policy.run(list(range(6)), oom_when_larger_than(1, []))
    assert err.value.batch_size == 2
    assert err.value.memory["failed_sizes"] == [4, 2]
    assert events[-1][0] == "oom_failed"


def test_non_oom_errors_propagate_unchanged():
    def fn(batch):
        raise KeyError("boom")
    with pytest.raises(KeyError):
        BatchPolicy(persona="p", batch_size=4).run([1, 2], fn)


def test_fault_hook_injects_n_times_for_one_persona(monkeypatch):
    monkeypatch.setenv(batching.FAULT_OOM_ENV, "alpha:1,beta:0")
    calls = []
    policy = BatchPolicy(persona="alpha", batch_size=4, free_memory=lambda: None)
    assert policy.run([1, 2, 3, 4], oom_when_larger_than(99, calls)) == [10, 20, 30, 40]
    assert policy.failed_sizes == [4] and calls == [2, 2]
    other = BatchPolicy(persona="gamma", batch_size=4, free_memory=lambda: None)
    other.run([1, 2, 3, 4], oom_when_larger_than(99, []))
    assert other.failed_sizes == []


def test_bad_fault_spec_names_the_variable(monkeypatch):
    monkeypatch.setenv(batching.FAULT_OOM_ENV, "alpha:lots")
    with pytest.raises(ValueError, match="CHATSPACE_FAULT_OOM"):
        BatchPolicy(persona="alpha", batch_size=1).run([1], lambda b: b)


def test_cancel_between_batches():
    seen = []
    policy = BatchPolicy(persona="p", batch_size=2, should_cancel=lambda: len(seen) >= 2)
    with pytest.raises(JobCancelled):
        policy.run([1, 2, 3, 4, 5], lambda b: seen.extend(b) or list(b))
    assert seen == [1, 2]
