"""Every figure neurofm draws, one function each.

Each function takes plain data (arrays, DataFrames, AnnData), draws one figure, writes it atomically
as PNG to ``path`` and returns the path. Matplotlib runs headless (Agg).
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from neurofm.io import atomic_path  # noqa: E402


def save_figure(figure: plt.Figure, path: str | os.PathLike, dpi: int = 130) -> Path:
    """Save ``figure`` to ``path`` atomically as PNG and close it."""
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    plt.close(figure)
    return path
