"""Print rich tables so nothing essential is cut: on a terminal, long cells wrap (fold)
instead of ending in '…'; piped, a table is printed at its natural width (no wrapping at
80 columns), so ids and keys stay whole for grep and cut."""

from __future__ import annotations


def _fold(renderable) -> None:
    from rich.console import Group
    from rich.table import Table

    if isinstance(renderable, Table):
        for col in renderable.columns:
            col.overflow = "fold"
            col.no_wrap = False
    elif isinstance(renderable, Group):
        for r in renderable.renderables:
            _fold(r)


def show(renderable, *, console=None) -> None:
    from rich.console import Console

    console = console or Console()
    _fold(renderable)
    if not console.is_terminal:
        width = console.measure(renderable, options=console.options.update_width(100000))
        console = Console(file=console.file, width=max(80, width.maximum), force_terminal=False)
    console.print(renderable, crop=False)
