"""NVML readings in a background thread: utilisation, SM clock and board power.

Clock and power are here because a benchmark's ratio can move with the card's clock: a run
whose activations toggle more bits draws more power and may be clocked down under the power
cap, which looks like a slower kernel but is not one. Off-GPU (no NVML) nothing is sampled
and every summary is ``None``.
"""

from __future__ import annotations

import os
import statistics
import threading
import time

FIELDS = ("util", "sm_mhz", "power_w")


class GpuSampler:
    """NVML readings every ``period`` s, with timestamps; nothing off-GPU."""

    def __init__(self, index: int = 0, period: float = 0.2):
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._stop = threading.Event()
        self.handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(int(visible) if visible.isdigit()
                                                            else index)
            self.name = pynvml.nvmlDeviceGetName(self.handle)
            self.name = self.name.decode() if isinstance(self.name, bytes) else self.name
        except Exception:  # noqa: BLE001 - no NVML, no GPU: nothing to sample
            self.handle, self.name = None, "cpu"
        self.period = period
        if self.handle is not None:
            threading.Thread(target=self._run, daemon=True, name="nvml").start()

    def _read(self) -> dict[str, float]:
        import pynvml

        out = {"util": float(pynvml.nvmlDeviceGetUtilizationRates(self.handle).gpu)}
        try:  # clock and power are extras: a card that will not say still gives utilisation
            out["sm_mhz"] = float(pynvml.nvmlDeviceGetClockInfo(self.handle,
                                                                pynvml.NVML_CLOCK_SM))
            out["power_w"] = pynvml.nvmlDeviceGetPowerUsage(self.handle) / 1000.0
        except Exception:  # noqa: BLE001, S110 - see above
            pass
        return out

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                reading = self._read()
            except Exception:  # noqa: BLE001, S112 - a missed reading is no reading
                continue
            self.samples.append((time.time(), reading))

    def mean(self, t0: float, t1: float, field: str = "util") -> float | None:
        vals = [r[field] for t, r in self.samples if t0 <= t <= t1 and field in r]
        return statistics.mean(vals) if vals else None

    def summary(self, t0: float, t1: float) -> dict[str, float | None]:
        """Mean of each field between ``t0`` and ``t1`` (wall-clock, as ``time.time()``)."""
        return {f: self.mean(t0, t1, f) for f in FIELDS}

    def stop(self) -> None:
        self._stop.set()
