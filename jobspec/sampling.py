"""Sampling defaults, defined once: the job params' defaults and the engine's
``SamplingOptions`` defaults are these names."""

MAX_TOKENS = 64
TEMPERATURE = 0.0  # greedy
TOP_P = 1.0
# Samples of a persona in flight in the engine at once: a memory cap, not the batch vLLM runs.
# The persona streams into vLLM's scheduler, which runs up to engine.max_num_seqs sequences at
# a time and refills them as they finish; the cap bounds what waits around them (requests
# queued in the scheduler, results on the host, capture sums of a chunked call on the device).
# None: twice the engine's max_num_seqs, so the scheduler always has samples waiting. A fixed
# 16 (the first default) ran 5.7x slower than 200 on an H200 (issue #14); the OOM policy
# halves the cap.
BATCH_SIZE: int | None = None
