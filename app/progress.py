"""A rich progress bar for whole-job downloads, shared by the CLI and the Python API (it
implements :class:`app.results.Progress`). Drawn on stderr, so piped output stays clean."""

from __future__ import annotations


class RichProgress:
    def __init__(self, console=None):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                  DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
                                  console=console or Console(stderr=True), transient=False)
        self._task = None
        self._done = 0
        self._files = 0

    def start(self, total_bytes: int, files: int) -> None:
        self._files = files
        self._progress.start()
        self._task = self._progress.add_task(f"0/{files} files", total=total_bytes or None)

    def advance(self, n: int) -> None:
        self._progress.update(self._task, advance=n)

    def file(self, key: str, skipped: bool) -> None:
        self._done += 1
        self._progress.update(self._task, description=f"{self._done}/{self._files} files")

    def close(self) -> None:
        self._progress.stop()
