"""Cache policies that see edits to the neurofm modules a step imports.

ZenML's cache key covers a step's own code and inputs, not helper modules; each step that wraps
neurofm code names those modules here so that editing them invalidates the cache.
"""

from __future__ import annotations

from pathlib import Path

from zenml.config.cache_policy import CachePolicy

PACKAGE = Path(__file__).resolve().parents[1] / "neurofm"


def depends_on(*modules: str) -> CachePolicy:
    """A CachePolicy hashing the source files of ``neurofm.<module>`` (files or packages)."""
    files: list[str] = [str(PACKAGE / "errors.py"), str(PACKAGE / "io.py"), str(PACKAGE / "keys.py")]
    for module in modules:
        path = PACKAGE / module.replace(".", "/")
        if path.is_dir():
            files.extend(str(p) for p in sorted(path.glob("*.py")))
        elif path.with_suffix(".py").is_file():
            files.append(str(path.with_suffix(".py")))
        else:  # a renamed module would otherwise fail only when a pipeline runs
            raise ValueError(f"depends_on: no module neurofm.{module}")
    return CachePolicy(file_dependencies=sorted(set(files)))
