"""The context object every ``precision-lab`` command receives (click's ``make_pass_decorator``).

The group builds one `LabContext`; a command takes it with ``@pass_lab``. Consoles print
to the streams current when they print, so click's test runner captures them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import click
from rich.console import Console


@dataclass
class LabContext:
    """What commands share: a console for results (stdout) and one for progress (stderr)."""

    console: Console = field(default_factory=Console)
    progress_console: Console = field(default_factory=lambda: Console(stderr=True))


pass_lab = click.make_pass_decorator(LabContext, ensure=True)
