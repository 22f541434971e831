"""Decathlon task folders (``convert_msd``) and a user's folder that already has the canonical
layout (``convert_folder``) → the canonical layout, hard-linking unchanged NIfTI files."""
from __future__ import annotations

import json
from pathlib import Path

from hybridmim.data.layout import (LayoutError, listed_files, read_index, unlisted_files,
                                   write_json)
from hybridmim.data.sources.convert.common import (ConversionError, Verify, find_dirs,
                                                   link_or_copy, log, publish)


def _relative_entry(path: str) -> str:
    return "./" + path.replace("\\", "/").removeprefix("./")


# ---------------------------------------------------------------------------------------------
# Medical Segmentation Decathlon
def find_msd_root(extracted: Path, archive_root: str | None = None) -> Path:
    """The task folder (``TaskXX_Name/`` with dataset.json and imagesTr/) inside ``extracted``."""
    def is_task(folder: Path) -> bool:
        return (folder / "dataset.json").is_file() and (folder / "imagesTr").is_dir()

    candidates = find_dirs(Path(extracted), is_task)
    if archive_root:
        named = [c for c in candidates if c.name == archive_root]
        candidates = named or candidates
    if len(candidates) != 1:
        raise ConversionError(
            f"{extracted}: expected exactly one Decathlon task folder "
            f"({archive_root or 'TaskXX_Name'}/ with dataset.json and imagesTr/), found "
            f"{[str(c) for c in candidates] or 'none'}. Is this the right archive?")
    return candidates[0]


def convert_msd(source: Path, out_dir: Path, archive_root: str | None = None,
                *, verify: Verify) -> Path:
    """An extracted Decathlon task → canonical layout. The task is already in this layout, so this
    keeps exactly the files its dataset.json lists (which drops the macOS ``._*`` resource forks
    some copies of the tars carry) and fails, naming them, if listed files are missing."""
    root = find_msd_root(Path(source), archive_root)
    index_path = root / "dataset.json"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConversionError(f"{index_path}: unreadable ({err}); the archive is corrupt — delete "
                              "it and download again.") from None
    training = index.get("training")
    if not isinstance(training, list) or not training:
        raise ConversionError(f"{index_path}: has no 'training' list; not a Decathlon task.")
    test = [t if isinstance(t, str) else t["image"] for t in index.get("test", [])]
    listed = [e["image"] for e in training] + [e["label"] for e in training] + test
    missing = [p for p in listed if not (root / p).is_file()]
    if missing:
        raise ConversionError(
            f"{root}: {len(missing)} file(s) listed in dataset.json are missing from the archive, "
            f"e.g. {missing[:5]}. The download is incomplete or corrupt: delete it and run again.")
    unlisted = unlisted_files(root, listed)
    if unlisted:
        log.warning("%s: %d file(s) not listed in dataset.json are left out, e.g. %s", root,
                    len(unlisted), unlisted[:3])

    def build(temp: Path) -> None:
        for rel in listed:
            link_or_copy(root / rel, temp / rel.removeprefix("./"))
        out = dict(index)
        out["training"] = [{"image": _relative_entry(e["image"]),
                            "label": _relative_entry(e["label"])} for e in training]
        out["test"] = [_relative_entry(t) for t in test]
        out["numTraining"], out["numTest"] = len(out["training"]), len(out["test"])
        write_json(temp / "dataset.json", out)

    log.info("Converting Decathlon task %s (%d labelled, %d test cases) into %s", root.name,
             len(training), len(test), out_dir)
    return publish(out_dir, build, verify)


# ---------------------------------------------------------------------------------------------
# A user's own folder, already canonical
def convert_folder(folder: Path, out_dir: Path, verify: Verify) -> Path:
    """A folder that already has the canonical layout → ``out_dir`` (hard links). When ``folder``
    is ``out_dir`` itself it is only checked."""
    folder, out_dir = Path(folder), Path(out_dir)
    try:
        index = read_index(folder)
    except LayoutError as err:
        raise ConversionError(f"{err}. A dataset of your own must be a folder with imagesTr/, "
                              "labelsTr/ (and optionally imagesTs/) and dataset.json in the "
                              "Medical Segmentation Decathlon layout.") from None
    files = listed_files(index)
    absolute = [p for p in files if Path(p).is_absolute() or ".." in Path(p).parts]
    if absolute:
        raise ConversionError(f"{folder / 'dataset.json'}: paths must be relative to the folder "
                              f"and stay inside it; offending entries: {absolute[:5]}")
    if folder.resolve() == out_dir.resolve():
        verify(folder)
        return out_dir

    def build(temp: Path) -> None:
        for rel in files:
            # A missing file is not linked; the integrity check then reports it with its case,
            # together with every other problem.
            if (folder / rel).is_file():
                link_or_copy(folder / rel, temp / rel.removeprefix("./"))
        write_json(temp / "dataset.json", index)

    return publish(out_dir, build, verify)
