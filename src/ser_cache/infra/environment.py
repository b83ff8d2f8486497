"""Checks on the Python environment that would otherwise fail far from their cause, and the
machine's memory (light to import: the CLI's --help shows the default memory budget)."""

from __future__ import annotations

import os


def physical_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_memory_budget_gb() -> float:
    """Half of the machine's physical memory: the rest is for torch, the batches and everyone else."""
    return physical_memory_bytes() / 2 / 1e9


def _major_minor(version: str) -> tuple[int, ...]:
    parts = []
    for p in version.split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def torchaudio_problem(torch_version: str | None = None, torchaudio_version: str | None = None) -> str | None:
    """One line describing a torchaudio that does not match torch, or None.

    transformers imports torchaudio whenever it is installed, and a torchaudio wheel built for
    another torch fails at import, taking `import transformers` down with it. ser-cache does not
    use torchaudio, so the fix is to remove it (or install the matching build).
    """
    from importlib import metadata

    try:
        ta = torchaudio_version or metadata.version("torchaudio")
    except metadata.PackageNotFoundError:
        return None
    try:
        tv = torch_version or metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None
    if _major_minor(ta) == _major_minor(tv):
        return None
    return (
        f"torchaudio {ta} is installed but torch is {tv}: this torchaudio was built for another torch and breaks "
        "`import transformers`; ser-cache does not need it, so run `pip uninstall torchaudio` "
        "(or install the torchaudio release that matches your torch)"
    )
