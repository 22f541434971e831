"""What every converter shares: junk-file filtering, hard-link-or-copy, folder search and the
atomic publication (the package docstring says why)."""
from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable

from hybridmim.data.layout import LAYOUT_DIRS, NIFTI_SUFFIXES, atomic_directory

log = logging.getLogger("hybridmim.data.sources.convert")

Verify = Callable[[Path], None]


class ConversionError(ValueError):
    """The source does not look like the dataset it should be; the message names what is wrong."""


def is_junk(path: Path | str) -> bool:
    """macOS resource forks (``._name``), ``.DS_Store``, ``__MACOSX/`` and other hidden files."""
    parts = Path(path).parts
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError as err:
        if err.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
        shutil.copy2(src, dst)


def find_dirs(root: Path, accept: Callable[[Path], bool], max_depth: int = 5) -> list[Path]:
    """Folders under ``root`` (``root`` included) accepted by ``accept``, shallowest first; hidden
    and ``__MACOSX`` folders are skipped."""
    found, level = [], [Path(root)]
    for _ in range(max_depth + 1):
        next_level = []
        for folder in level:
            if accept(folder):
                found.append(folder)
                continue
            try:
                children = sorted(p for p in folder.iterdir() if p.is_dir() and not is_junk(p.name))
            except OSError:
                continue
            next_level.extend(children)
        level = next_level
    return found


def publish(out_dir: Path, build: Callable[[Path], None], verify: Verify) -> Path:
    """Run ``build(temp)`` on a temporary folder holding the empty layout folders, then
    ``verify(temp)``; only then rename ``temp`` onto ``out_dir``."""
    with atomic_directory(Path(out_dir)) as temp:
        for sub in LAYOUT_DIRS:
            (temp / sub).mkdir()
        build(temp)
        verify(temp)
    return Path(out_dir)


def find_nifti(folder: Path, stem: str) -> Path | None:
    """``folder/stem.nii.gz`` or ``folder/stem.nii``, whichever exists."""
    return next((folder / f"{stem}{ext}" for ext in NIFTI_SUFFIXES
                 if (folder / f"{stem}{ext}").is_file()), None)


def nifti_files(folder: Path) -> Iterable[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not is_junk(p.name) and p.name.endswith((".nii", ".nii.gz")))
