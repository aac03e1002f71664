"""The one shape of a progress report, from checkpoint loading to the editor's `$/progress`."""

from __future__ import annotations

from collections.abc import Callable

# progress(done, total, what): `done` of `total` steps of the phase `what` describes.
Progress = Callable[[int, int, str], None]
