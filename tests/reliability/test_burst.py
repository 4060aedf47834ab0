"""50 tiny jobs submitted at once from parallel clients to one worker.

All complete, none runs twice, and the status API keeps answering while the worker is busy
(its p99 goes in the report). Each job is 1 persona × 1 sample × 2 tokens, so the run
measures the service (submit, enqueue, claim, store, manifest), not the model.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.reliability.checks import StatusPoller, verify_jobs, wait_jobs
from tests.reliability.conftest import TOKEN

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]
N_JOBS, CLIENTS = 50, 10


def test_burst_of_50_jobs_all_complete_once(stack):
    stack.start_worker("rel-burst")
    ids: list[str] = []
    with StatusPoller(stack.http, ids, period_s=0.05) as poll:
        def client(n: int) -> list[str]:
            with httpx.Client(base_url=stack.api_url, timeout=60,
                              headers={"Authorization": f"Bearer {TOKEN}"}) as http:
                return [stack.submit(dataset="one_persona", client=http, max_samples=1,
                                     batch_size=1, max_tokens=2) for _ in range(n)]

        t0 = time.monotonic()
        with ThreadPoolExecutor(CLIENTS) as pool:
            for batch in pool.map(client, [N_JOBS // CLIENTS] * CLIENTS):
                ids.extend(batch)
        wait_jobs(ids, timeout=360, logs=stack.log_tail)
        took = time.monotonic() - t0
    assert len(set(ids)) == N_JOBS
    fig = verify_jobs(ids, scenario=f"burst of {N_JOBS} jobs, {CLIENTS} clients")
    assert fig.personas_expected == N_JOBS
    assert len(poll.latencies) > 20 and not poll.errors, (len(poll.latencies), poll.errors[:5])
    fig.recovery_s, fig.p99_ms = round(took, 1), poll.p99_ms()
    fig.notes.append(f"all {N_JOBS} done in {took:.0f}s; {len(poll.latencies)} status calls")
    fig.record()
    assert fig.lost == 0 and fig.duplicates == 0, fig
