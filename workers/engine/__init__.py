"""The steering engine: per-request steering and activation capture on vLLM.

Imports nothing of ``app/`` or Celery, so it can be tested, benchmarked and reused alone.
Public names: :mod:`.spec` (what a request asks for and what it gets back),
:mod:`.ops` (pure torch steering ops), :mod:`.engine` (``SteeringEngine`` owning ``vllm.LLM``),
:mod:`.hf` (the transformers reference backend), :mod:`.tiny` (tiny random test models).
"""
