"""One vLLM run shared by two streams: the next persona's samples enter the engine while the
last persona's are still in it, so vLLM's scheduler never runs short at a persona's tail.

:class:`SharedStream` offers :meth:`SteeringEngine.stream`'s contract (``stream(items,
options, reread=..., max_in_flight=...)``) to several threads at once; each call is a *lane*.
One driver thread is the only one that touches vLLM: it pulls every lane's items as room frees,
adds them (and each re-read the moment its generation finishes) to one ``_Run`` of the engine
(so the engine's rule — one run open at a time — holds), steps it and hands each finished
sample to its lane's iterator. It stops, closing the run, when no lane is open.

Room: a lane adds a sample while its own samples in flight are below its ``max_in_flight`` and
all lanes' together are below it too, so two lanes hold no more than one lane did alone (the
cap is a memory cap); the older lane is served first.

Errors: what belongs to one lane — its items iterator, its re-read callback, its requests'
validation and hook results, its requests' admission — ends that lane only (its requests are
aborted). What belongs to the run — ``step`` raising, out of memory above all — ends every
lane: the run is aborted whole and each lane raises its own copy (an out-of-memory one as
:class:`EngineOOMError` with that lane's cap as ``batch_size``), so each caller's OOM policy
halves and re-streams its own unfinished samples exactly as it would alone. A lane closed
early by its caller (cancel, an error) has its requests aborted; the other lane goes on.

``on_fed`` (per :meth:`view`) is called, on the driver thread, the moment a lane's items are
all in the engine (items are pulled one ahead, so this is known when the last one goes in):
the job loop claims the next persona then (:mod:`workers.jobloop`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from workers.engine.engine import (
    EngineError,
    EngineOOMError,
    SteeringEngine,
    _Flight,
    _reread_spec,
    _Run,
)
from workers.engine.spec import SamplingOptions, StreamItem, StreamResult
from workers.engine.stream import RereadFn

log = logging.getLogger(__name__)

_DONE = object()
_END = object()


@dataclass(eq=False)
class _Lane:
    items: Iterator[StreamItem]
    options: SamplingOptions
    reread: RereadFn | None
    cap: int
    on_fed: Callable[[], None] | None
    timing: dict | None  # first_in / last_out (epoch seconds), for the job's record
    out: queue.Queue = field(default_factory=queue.Queue)
    uids: set[str] = field(default_factory=set)
    seen: dict = field(default_factory=dict)  # steering tuples validated (engine._validate_one)
    head: object = None  # the next item, pulled ahead (_END: none left)
    live: int = 0  # samples in flight (generating or being re-read)
    n: int = 0
    fed: bool = False
    closed: bool = False  # the caller stopped reading: abort what it has in vLLM
    ended: bool = False  # the driver sent its end (done or an error)


class SharedStream:
    """Several concurrent ``stream`` calls over one :class:`SteeringEngine`, merged into one
    vLLM run by a driver thread (see the module docstring)."""

    def __init__(self, engine: SteeringEngine):
        self.engine = engine
        self._lock = threading.Condition()
        self._lanes: list[_Lane] = []
        self._driver: threading.Thread | None = None
        self._run: _Run | None = None

    @staticmethod
    def supports(engine) -> bool:
        """Only the vLLM engine's runs can be shared (the reference backend streams in
        chunks: :func:`workers.engine.stream.sequential_stream`)."""
        return isinstance(engine, SteeringEngine)

    def view(self, *, on_fed: Callable[[], None] | None = None) -> LaneView:
        """The engine as one caller sees it: every attribute of the engine, with ``stream``
        going through this shared run; ``timing`` spans all its streams."""
        return LaneView(self, on_fed)

    def stream(self, items: Iterable[StreamItem], options: SamplingOptions | None = None, *,
               reread: RereadFn | None = None, max_in_flight: int | None = None,
               on_fed: Callable[[], None] | None = None,
               timing: dict | None = None) -> Iterator[list[StreamResult]]:
        """:meth:`SteeringEngine.stream`'s contract, callable from several threads at once."""
        cap = max(1, int(max_in_flight or 2 * self.engine.max_num_seqs))
        lane = _Lane(iter(items), options or SamplingOptions(), reread, cap, on_fed, timing)
        self._open(lane)
        try:
            while True:
                got = lane.out.get()
                if got is _DONE:
                    return
                if isinstance(got, BaseException):
                    raise got
                yield got
        finally:
            self._close(lane)

    def join(self, timeout: float | None = None) -> bool:
        """Wait until the driver has closed the run (call it with no stream open: before the
        engine's ``generate``, a cleanup or a restart). True when it has."""
        with self._lock:
            driver = self._driver
        if driver is not None:
            driver.join(timeout)
            return not driver.is_alive()
        return True

    # ---- the callers' side ----------------------------------------------------------------
    def _open(self, lane: _Lane) -> None:
        with self._lock:
            self._lanes.append(lane)
            if self._driver is None:
                self._driver = threading.Thread(target=self._drive, name="engine-lanes",
                                                daemon=True)
                self._driver.start()
            self._lock.notify_all()

    def _close(self, lane: _Lane) -> None:
        with self._lock:
            lane.closed = True
            self._lock.notify_all()

    # ---- the driver: the only thread that touches vLLM ------------------------------------
    def _drive(self) -> None:
        try:
            while True:
                with self._lock:
                    if not self._cycle():
                        return
        except Exception as exc:  # a bug here must not leave a caller waiting forever
            log.exception("the shared stream's driver failed")
            with self._lock:
                for lane in list(self._lanes):
                    self._end(lane, EngineError(f"the shared stream failed: {exc!r}"))
                self._stop()
                self._driver = None

    def _cycle(self) -> bool:
        """One round under the lock: drop closed lanes, fill, step, route. False: no lane is
        open, the run is closed and the driver ends (a lane opened later starts another)."""
        for lane in [x for x in self._lanes if x.closed]:
            self._drop(lane)
        if not self._lanes:
            self._stop()
            self._driver = None
            return False
        if self._run is None:
            self._run = _Run(self.engine, size=max(x.cap for x in self._lanes))
        run = self._run
        for lane in list(self._lanes):
            self._fill(lane)
        for lane in [x for x in self._lanes if x.fed and not x.live]:
            self._end(lane, _DONE)
        if not any(x.live for x in self._lanes):
            if not self._lanes:
                return True  # every lane ended: the next round closes the run
            self._lock.wait(0.05)  # lanes waiting for nothing yet: cannot happen, but never spin
            return True
        run.size = max(x.cap for x in self._lanes)
        self._lock.release()  # callers may open and close lanes while vLLM steps
        try:
            finished, per_rank = run.step()
        except Exception as exc:  # noqa: BLE001 - handed to every lane in the run
            self._lock.acquire()
            self._fail_all(exc)
            self._stop()
            return True
        self._lock.acquire()
        self._route(finished, per_rank or [{}])
        return True

    def _fill(self, lane: _Lane) -> None:
        total = sum(x.live for x in self._lanes)
        try:
            while lane.live < lane.cap and total < lane.cap:
                item = self._peek(lane)
                if item is _END:
                    break
                lane.head = None
                self.engine._validate_one(item.spec, f"items[{lane.n}]", lane.seen)
                self._add(lane, _Flight(item, item.spec), item.prompt, lane.options)
                lane.n += 1
                lane.live += 1
                total += 1
            self._peek(lane)  # one item ahead: the lane is fed the moment its last is in
            self._run.flush()
        except Exception as exc:  # noqa: BLE001 - handed to the lane it belongs to
            self._lane_failed(lane, exc)

    @staticmethod
    def _peek(lane: _Lane):
        """The lane's next item, pulled ahead of room for it (a lane whose samples are a
        multiple of its cap would otherwise learn it is fed only when room frees, and its
        successor would start after its tail)."""
        if lane.head is None:
            lane.head = next(lane.items, _END)
            if lane.head is _END and not lane.fed:
                lane.fed = True
                if lane.on_fed is not None:
                    lane.on_fed()
        return lane.head

    def _add(self, lane: _Lane, flight: _Flight, prompt, options, **kw) -> None:
        self._run.add(flight, prompt, options, **kw)
        lane.uids.add(flight.uid)
        if lane.timing is not None:
            lane.timing.setdefault("first_in", time.time())

    def _route(self, finished, per_rank: list[dict]) -> None:
        by_lane: dict[int, list] = {}
        owner = {}
        for fl, out in finished:
            lane = next((x for x in self._lanes if fl.uid in x.uids), None)
            if lane is None or lane.closed:
                continue
            lane.uids.discard(fl.uid)
            owner[id(lane)] = lane
            by_lane.setdefault(id(lane), []).append((fl, out))
        with self.engine._readout(per_rank):  # one readout of the step, for every lane
            for key, done in by_lane.items():
                self._finish(owner[key], done, per_rank)

    def _finish(self, lane: _Lane, done: list, per_rank: list[dict]) -> None:
        uids = {fl.uid for fl, _ in done}
        mine = [{u: g for u, g in rank.items() if u in uids} for rank in per_rank]
        try:
            gens = self.engine._results_of([o for _, o in done], [fl.spec for fl, _ in done],
                                           [fl.uid for fl, _ in done], mine)
            batch = []
            reread_options = SamplingOptions(max_tokens=1)
            for (fl, _), res in zip(done, gens):
                if fl.gen is not None:  # its re-read finished: the sample is done
                    batch.append(StreamResult(fl.item.tag, fl.gen, res.capture))
                    lane.live -= 1
                    continue
                again = lane.reread(fl.item, res) if lane.reread is not None else None
                if again is None:
                    batch.append(StreamResult(fl.item.tag, res))
                    lane.live -= 1
                    continue
                spec = _reread_spec(again.spec)
                self.engine._validate_one(spec, f"reread of {fl.item.tag!r}", lane.seen)
                self._add(lane, _Flight(fl.item, spec, gen=res), list(again.sequence),
                          reread_options, max_tokens=1, prompt_len=again.prompt_len)
            self._run.flush()
        except Exception as exc:  # noqa: BLE001 - handed to the lane it belongs to
            self._lane_failed(lane, exc)
            return
        if batch:
            if lane.timing is not None:
                lane.timing["last_out"] = time.time()
            lane.out.put(batch)

    def _lane_failed(self, lane: _Lane, exc: BaseException) -> None:
        self._abort(lane)
        self._end(lane, exc)

    def _fail_all(self, exc: BaseException) -> None:
        """The run failed: every lane with samples in it ends with its own copy of the error
        (a lane opened while vLLM stepped, with nothing in the run yet, goes on in a new run)."""
        for lane in [x for x in self._lanes if x.uids or x.live]:
            if isinstance(exc, EngineOOMError):
                err: BaseException = EngineOOMError(
                    f"out of memory with up to {lane.cap} of this stream's samples in flight "
                    f"(run shared by {len(self._lanes)} streams): {exc}",
                    batch_size=lane.cap, memory=exc.memory)
            else:
                err = EngineError(f"the shared engine run failed: {type(exc).__name__}: {exc}")
            err.__cause__ = exc
            self._end(lane, err)

    def _abort(self, lane: _Lane) -> None:
        """Abort a lane's requests and free what the extension holds for them (the run may
        stay open for the other lane a long time: its reset comes only when the run closes)."""
        uids, lane.uids, lane.live = list(lane.uids), set(), 0
        if not uids or self._run is None:
            return
        self._run.abort(uids)
        try:
            with self.engine._readout(self.engine._rpc("steering_collect", uids, None)):
                pass  # nobody reads them
        except Exception:
            log.warning("freeing %d aborted requests' capture state failed", len(uids),
                        exc_info=True)

    def _drop(self, lane: _Lane) -> None:
        self._abort(lane)
        self._lanes.remove(lane)

    def _end(self, lane: _Lane, what) -> None:
        lane.ended = True
        lane.out.put(what)
        if lane in self._lanes:
            self._lanes.remove(lane)

    def _stop(self) -> None:
        run, self._run = self._run, None
        for lane in self._lanes:
            lane.uids.clear()
            lane.live = 0
        if run is not None:
            run.close()


class LaneView:
    """The engine for one caller (a persona): attributes from the engine, ``stream`` through
    the shared run. ``timing`` holds when its first sample entered the engine (``first_in``)
    and when its last finished (``last_out``), epoch seconds, over all its streams."""

    def __init__(self, shared: SharedStream, on_fed: Callable[[], None] | None):
        self._shared, self._on_fed = shared, on_fed
        self.timing: dict = {}

    def stream(self, items: Iterable[StreamItem], options: SamplingOptions | None = None, *,
               reread: RereadFn | None = None,
               max_in_flight: int | None = None) -> Iterator[list[StreamResult]]:
        return self._shared.stream(items, options, reread=reread, max_in_flight=max_in_flight,
                                   on_fed=self._on_fed, timing=self.timing)

    def __getattr__(self, name: str):
        return getattr(self._shared.engine, name)
