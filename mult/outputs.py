"""Writing results for people and tools: strict JSON, number formatting, matplotlib set-up.

Every report, table and plot in the package goes through these, so a NaN is written the same
way everywhere and matplotlib is set up (headless) in one place.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

MISSING = "–"  # how a table shows a value that does not exist or is not finite


def json_safe(obj: Any) -> Any:
    """NaN/inf -> None, tuples -> lists, dataclasses -> dicts, numpy scalars -> numbers,
    recursively: strict JSON that other tools read."""
    if hasattr(obj, "item") and not isinstance(obj, (list, tuple, dict)) and getattr(obj, "ndim", 0) == 0:
        obj = obj.item()  # numpy / torch scalars
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return json_safe(dataclasses.asdict(obj))
    return obj


def fmt(value: float | int | None, spec: str = ".4g", missing: str = MISSING) -> str:
    """A number for a table: ``format(value, spec)``, or ``missing`` for None, NaN and inf."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return missing
    return format(value, spec)


def pyplot():
    """matplotlib's pyplot on the headless Agg backend (imported on first use)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Lay out, write (atomically: readers never see half a PNG) and close a matplotlib figure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=dpi)
    pyplot().close(fig)
    os.replace(tmp, path)
    return path
