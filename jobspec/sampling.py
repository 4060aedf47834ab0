"""Sampling defaults, defined once: the job params' defaults and the engine's
``SamplingOptions`` defaults are these names."""

MAX_TOKENS = 64
TEMPERATURE = 0.0  # greedy
TOP_P = 1.0
# Samples handed to the engine in one call: a memory cap, not the batch vLLM runs. vLLM's
# scheduler batches what it is given (up to engine.max_num_seqs sequences at a time, refilling
# as they finish), so the cap only bounds what one call holds at once: the capture sums on the
# device (n_layers x hidden fp32 per sample and span) and the results on the host. 256 fills
# the default max_num_seqs; 16 (the old default) ran 5.7x slower than 200 on an H200 (issue
# #14). The OOM policy halves it.
BATCH_SIZE = 256
