"""Sampling defaults, defined once: the job params' defaults and the engine's
``SamplingOptions`` defaults are these names."""

MAX_TOKENS = 64
TEMPERATURE = 0.0  # greedy
TOP_P = 1.0
BATCH_SIZE = 16  # prompts per engine batch (the OOM policy halves it)
