"""The in-graph op's own cost on the GPU: one step's calls (one per layer) replayed from a CUDA
graph, per mode, against a plain step of the same graph with the op doing nothing.

Why: at the 8B shape steering at all layers runs 0.86-0.93x plain compiled vLLM while capture
of all layers runs 0.96x, and the op's memory traffic alone would explain ~0.15 ms of a
~26 ms step. This isolates the op from vLLM: if the steering rows cost far more than the
bytes they move (register spills, the dependent loads of the op loop, too few programs to fill
the card), it shows here; if they don't, the bench's gap comes from outside the op.

Each mode is timed as a CUDA graph of ``--layers`` op calls at ``--tokens`` rows (decode: one
row per request; a prefill chunk: thousands), replayed ``--iters`` times between CUDA events;
``--reps`` repetitions interleaved, median and spread printed. Baselines in the same run:
``none`` (every row plain: the op's early exit) and ``torch_add`` (``delta += vec`` per layer
with torch: the least traffic an add can move). Results JSON under bench/results/.

    python bench/ingraph_kernel.py --hidden 4096 --layers 36 --tokens 288,1024,16384
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

MODES = ("none", "torch_add", "steer_add", "steer_add_zero", "steer_cap", "capture",
         "steer_add_capture")


def _state(mode: str, n: int, layers: int, hidden: int, dtype, device):
    """The op's buffers for ``n`` rows, every row in ``mode`` (one request per row)."""
    import torch

    from workers.engine import ingraph_op as iop

    i32 = {"dtype": torch.int32, "device": device}
    g = torch.Generator(device="cpu").manual_seed(0)
    delta = (torch.randn(n, hidden, generator=g) * 0.5).to(dtype).to(device)
    res = (torch.randn(n, hidden, generator=g) * 2.0).to(dtype).to(device)
    srow = torch.zeros(n, **i32)
    pslot = torch.zeros(n, **i32)
    cslot = torch.zeros(n, iop.NCOL, **i32)
    start = torch.zeros(layers, 2, **i32)
    nops = torch.zeros(layers, 2, **i32)
    pool_vec = torch.zeros(layers + 1, hidden, dtype=torch.float32, device=device)
    pool_scal = torch.zeros(layers + 1, iop.NSCAL, dtype=torch.float32, device=device)
    pool_scal[:, 3], pool_scal[:, 4] = -float("inf"), float("inf")
    steer = mode.startswith("steer")
    if steer:
        srow.fill_(1)
        start[:, 1] = torch.arange(1, layers + 1, dtype=torch.int32)
        nops[:, 1] = 1
        v = torch.randn(layers, hidden, generator=g) * 0.05
        if mode == "steer_cap":  # a projection cap: unit vector, the reduction branch
            pool_vec[1:] = (v / v.norm(dim=1, keepdim=True)).to(device)
            pool_scal[1:, 1], pool_scal[1:, 3], pool_scal[1:, 4] = 1.0, -1.0, 1.0
        else:
            pool_vec[1:] = (v * (0.0 if mode == "steer_add_zero" else 1.0)).to(device)
            pool_scal[1:, 0] = 1.0
    slots = 1
    if "capture" in mode:  # decode-like: each row its own request, response column only
        slots = n
        cslot[:, 1] = torch.arange(1, n + 1, dtype=torch.int32)
        pslot[:] = torch.arange(1, n + 1, dtype=torch.int32)
    acc = torch.zeros(slots + 1, layers, hidden, dtype=torch.float32, device=device)
    hits = torch.zeros(n + 1, dtype=torch.int32, device=device)
    pend = torch.zeros(1, layers, hidden, dtype=torch.float32, device=device)
    return (delta, res, srow, pslot, cslot, start, nops, pool_vec, pool_scal, acc, hits, pend)


def _graph(mode: str, bufs, layers: int):
    import torch

    from workers.engine import ingraph_op as iop

    def step():
        for layer in range(layers):
            if mode == "torch_add":
                bufs[0].add_(bufs[7][layer + 1].to(bufs[0].dtype))
            else:
                iop.triton_impl(*bufs, layer, 8)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # compile the kernel outside the capture
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


def _time(graph, iters: int) -> float:
    """Microseconds per replay (one step: every layer's call)."""
    import torch

    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        graph.replay()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) * 1000.0 / iters


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--layers", type=int, default=36)
    p.add_argument("--tokens", default="288,1024,16384", help="rows per step, comma-separated")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench/ingraph_kernel.py times the Triton kernel: it needs a CUDA GPU")
    dtype = getattr(torch, args.dtype)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise SystemExit(f"--modes: unknown {bad}; choose from {', '.join(MODES)}")
    rows = []
    for n in [int(x) for x in args.tokens.split(",")]:
        graphs = {}
        for m in modes:
            bufs = _state(m, n, args.layers, args.hidden, dtype, torch.device("cuda"))
            graphs[m] = (_graph(m, bufs, args.layers), bufs)
        times: dict[str, list[float]] = {m: [] for m in modes}
        for _ in range(args.reps):  # interleaved: drift hits every mode alike
            for m in modes:
                times[m].append(_time(graphs[m][0], args.iters))
        base = statistics.median(times["none"]) if "none" in times else None
        for m in modes:
            med = statistics.median(times[m])
            moved = _bytes(m, n, args.hidden, dtype) * args.layers
            rows.append({"tokens": n, "mode": m, "us_per_step": times[m], "median_us": med,
                         "spread": (max(times[m]) - min(times[m])) / med,
                         "over_none_us": med - base if base is not None else None,
                         "bytes_per_step": moved, "gb_s": moved / med / 1e3})
        del graphs
        torch.cuda.empty_cache()
    info = {"device": torch.cuda.get_device_name(0), "hidden": args.hidden,
            "layers": args.layers, "dtype": args.dtype, "iters": args.iters, "reps": args.reps,
            "triton": __import__("triton").__version__, "torch": torch.__version__}
    print(f"# {info}")
    print(f"{'rows':>6} {'mode':<20}{'us/step':>10}{'spread':>8}{'over none':>11}{'GB/s':>8}")
    for r in rows:
        over = f"{r['over_none_us']:.1f}" if r["over_none_us"] is not None else "-"
        print(f"{r['tokens']:>6} {r['mode']:<20}{r['median_us']:>10.1f}{r['spread']:>7.0%} "
              f"{over:>11}{r['gb_s']:>8.0f}")
    result = {"info": info, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


def _bytes(mode: str, n: int, hidden: int, dtype) -> int:
    """Least bytes a mode must move per layer call (what GB/s is measured against)."""
    import torch

    e = torch.empty((), dtype=dtype).element_size()
    if mode == "none":
        return n * 4 * 7  # the per-row maps
    if mode == "torch_add":
        return n * hidden * e * 2 + hidden * 4
    move = n * hidden * e * 2  # delta and residual read
    if mode.startswith("steer"):
        move += n * hidden * e + hidden * 4  # delta written, the vector read (cached)
    if "capture" in mode:
        move += n * hidden * 4 * 2  # the fp32 accumulator row, read and written
    return move


if __name__ == "__main__":
    main()
