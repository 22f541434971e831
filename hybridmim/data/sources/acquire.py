"""Registry entry → ``data/raw/<dataset>`` in the canonical layout, idempotently.

    url (MSD)       download (resume, md5) → safe_extract → convert_msd
    manual (BTCV)   manual archive/folder, or SYNAPSE_AUTH_TOKEN → Synapse REST download
    manual (BraTS)  manual archive (zip) or folder (official release or Kaggle mirror)
    folder          a user's canonical folder, checked and hard-linked
    generated       the demo generator

Every path ends with the integrity check on the temporary folder, so only a dataset that passed
it is ever published. The published folder holds ``.acquired.json`` (hidden: the data hash skips
it) recording the source and its checksum; a later run whose source matches does nothing.

The registry's ``manual`` entries do not carry everything a precise "please download" message or
a Synapse download needs, so ``MANUAL_SOURCES`` below holds those facts per dataset.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from hybridmim.data.integrity import assert_dataset_ok
from hybridmim.data.sources.convert import convert_folder, convert_msd, get_converter
from hybridmim.data.sources.download import (SYNAPSE_REPO_ENDPOINT, check_free_space, download,
                                             synapse_download)
from hybridmim.data.sources.extract import safe_extract
from hybridmim.hashing import md5_file

log = logging.getLogger("hybridmim.data.sources.acquire")

MARKER = ".acquired.json"
MARKER_FORMAT = 1
SYNAPSE_TOKEN_ENV = "SYNAPSE_AUTH_TOKEN"


class ManualDownloadRequired(RuntimeError):
    """The dataset needs a registration; the message says what to get, where, where to put it."""


@dataclass(frozen=True)
class ManualSource:
    title: str
    archive_names: tuple[str, ...]  # accepted file names in the downloads folder
    folder_names: tuple[str, ...]  # accepted already-extracted folder names there
    how_to_get: str
    checksum_note: str
    reported_md5: str | None = None  # third-party value: warn on difference, never fail
    synapse_file_id: str | None = None


MANUAL_SOURCES: dict[str, ManualSource] = {
    "btcv": ManualSource(
        title="BTCV (Multi-Atlas Labeling Beyond the Cranial Vault, abdomen)",
        archive_names=("RawData.zip",), folder_names=("RawData",),
        how_to_get=(
            "  (a) automatically: create a Synapse personal access token (synapse.org → Account "
            "Settings → Personal Access Tokens, 'download' scope) for an account that has joined "
            "the challenge and accepted its terms, and set it in the environment variable "
            f"{SYNAPSE_TOKEN_ENV}; or\n"
            "  (b) by hand: sign in at https://www.synapse.org/#!Synapse:syn3193805/wiki/217789, "
            "join the challenge, open Files → Abdomen and download RawData.zip (file entity "
            "syn3379050)."),
        checksum_note=(
            "The challenge publishes no checksum. With a token, Synapse's own md5 of the file is "
            "verified; a third-party script records md5 e8e3fc9604eadc34c47067e2332f8ea1 "
            "(unconfirmed: a different md5 only gives a warning). The md5 of the file you use is "
            "recorded in the dataset's .acquired.json."),
        reported_md5="e8e3fc9604eadc34c47067e2332f8ea1", synapse_file_id="syn3379050"),
    "brats2020": ManualSource(
        title="BraTS 2020 training data",
        archive_names=("MICCAI_BraTS2020_TrainingData.zip",
                       "brats20-dataset-training-validation.zip"),
        folder_names=("MICCAI_BraTS2020_TrainingData", "BraTS2020_TrainingData"),
        how_to_get=(
            "  (a) the official release: register at "
            "https://www.med.upenn.edu/cbica/brats2020/registration.html; the approval e-mail "
            "links to MICCAI_BraTS2020_TrainingData.zip (369 case folders); or\n"
            "  (b) the Kaggle mirror (dataset 'awsaf49/brats20-dataset-training-validation', "
            "needs a Kaggle account): `kaggle datasets download "
            "awsaf49/brats20-dataset-training-validation` gives "
            "brats20-dataset-training-validation.zip (BraTS2020_TrainingData/"
            "MICCAI_BraTS2020_TrainingData/...). An extracted folder works as well."),
        checksum_note=(
            "No official checksum is known to this project, so none is enforced; the md5 of the "
            "archive you use is recorded in the dataset's .acquired.json.")),
}


def _get(spec: Any, key: str) -> Any:
    return spec[key] if isinstance(spec, Mapping) else getattr(spec, key)


def _manual_error(name: str, info: ManualSource, downloads_dir: Path) -> ManualDownloadRequired:
    places = "\n".join(f"      {downloads_dir / n}" for n in info.archive_names)
    return ManualDownloadRequired(
        f"Dataset {name!r} ({info.title}) needs a registration and is not on this machine yet. "
        f"Get it one of these ways:\n{info.how_to_get}\nThen put the archive (keep its name) at\n"
        f"{places}\n  or point the dataset's manual path (config: the dataset's 'manual_path', "
        f"API: acquire(..., manual_paths={{{name!r}: PATH}})) at the archive or at the folder "
        f"you extracted it to, and run again.\n  Checksum: {info.checksum_note}")


def _read_marker(raw_dir: Path) -> dict | None:
    try:
        return json.loads((raw_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _file_identity(path: Path, previous: dict | None) -> dict:
    """name, size, mtime and md5 of a manual archive; the md5 is reused from ``previous`` when
    size and mtime are unchanged (hashing 40 GB on every no-op run would be absurd)."""
    stat = path.stat()
    identity = {"file": path.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if previous and all(previous.get(k) == v for k, v in identity.items()) and previous.get("md5"):
        return dict(previous)
    identity["md5"] = md5_file(path)
    return identity


def _folder_identity(folder: Path) -> dict:
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue  # our own marker (and macOS debris) must not change the identity
        stat = path.stat()
        digest.update(f"{path.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return {"folder": str(folder.resolve()), "listing_sha256": digest.hexdigest()}


def _extract_with_space_check(archive: Path, target: Path) -> Path:
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            needed = sum(info.file_size for info in zf.infolist())
    else:
        needed = archive.stat().st_size  # an uncompressed tar (MSD) is as large as its content
    check_free_space(target.parent, needed, f"extracting {archive.name}")
    return safe_extract(archive, target)


def acquire(spec: Any, raw_root: str | os.PathLike, downloads_dir: str | os.PathLike,
            manual_paths: Mapping[str, str | os.PathLike] | None = None, *,
            keep_extracted: bool = False, progress: bool = True, workers: int = 1,
            converter_options: Mapping[str, Any] | None = None,
            environ: Mapping[str, str] | None = None) -> Path:
    """Make ``raw_root/<name>`` hold the dataset of registry entry ``spec``; return its path.

    ``manual_paths`` maps dataset names to a manually downloaded archive or extracted folder.
    ``keep_extracted`` keeps ``downloads_dir/extracted/<name>`` after conversion (the raw folder
    hard-links the files, so deleting it frees no space on the same file system, but clutter).
    ``converter_options`` go to the converter (e.g. ``expect_all_cases=False`` for a subset);
    ``workers``: processes for BraTS channel stacking. ``environ`` (default ``os.environ``) is
    where ``SYNAPSE_AUTH_TOKEN`` (and, for a private mirror, ``SYNAPSE_REPO_ENDPOINT``) are read.
    """
    name = _get(spec, "name")
    source = dict(_get(spec, "source") or {})
    labels, channels = _get(spec, "labels"), _get(spec, "channels")
    raw_dir = Path(raw_root) / name
    downloads = Path(downloads_dir)
    environ = os.environ if environ is None else environ
    manual = Path(manual_paths[name]) if manual_paths and name in manual_paths else None
    kind = source.get("kind")
    previous = _read_marker(raw_dir)

    # What the integrity check accepted the data against: a changed label map or channel list
    # must check the data again.
    checked_against = {"labels": sorted(int(k) for k in labels), "channels": list(channels)}

    def finish(identity: dict) -> dict:
        return {"format": MARKER_FORMAT, "dataset": name, "source_kind": kind,
                "source": identity, "checked_against": checked_against}

    user_dataset = kind == "folder"
    declared_by = (f"the config block of dataset {name!r}" if user_dataset
                   else f"the registry entry {name!r}")

    def checked_writer(identity: dict, shown_as: Path | str | None = None):
        # The check runs on a temporary copy that is deleted on failure: name what the user has.
        shown_as = shown_as or f"{raw_dir} (as converted from {kind} source)"

        def verify(folder: Path) -> None:
            assert_dataset_ok(folder, labels, channels, shown_as=shown_as,
                              declared_by=declared_by)
            (folder / MARKER).write_text(json.dumps(finish(identity), indent=2) + "\n")
        return verify

    if previous and previous.get("format") == MARKER_FORMAT and previous.get(
            "source_kind") == kind and previous.get("checked_against") in (None, checked_against):
        done = previous.get("source", {})
        if kind == "url" and "url" in done and done.get("md5") == source.get("md5") and done.get(
                "url") == source.get("url"):
            log.info("%s already acquired from %s", name, source.get("url"))
            return raw_dir
        configured = Path(source["path"]) if kind == "folder" and source.get("path") else None
        if (kind in ("manual", "folder") or "folder" in done) and _unchanged_manual(
                done, manual or configured, downloads, name, source):
            log.info("%s already acquired (source unchanged)", name)
            return raw_dir

    if kind == "generated":
        from hybridmim.data.demo import generate_demo

        out = generate_demo(source.get("generator", name), raw_dir,
                            num_cases=int(source.get("num_cases", 10)),
                            num_test=int(source.get("num_test", 2)),
                            seed=int(source.get("seed", 0)))
        assert_dataset_ok(out, labels, channels)
        return out

    if kind == "folder":
        folder = Path(source["path"]) if manual is None else manual
        _require_folder(folder, name)
        identity = _folder_identity(folder)
        convert_folder(folder, raw_dir, verify=checked_writer(identity, shown_as=folder))
        return raw_dir

    if kind == "url" and manual is not None and manual.is_dir():
        # The user extracted the published archive already (e.g. downloaded elsewhere).
        convert_msd(manual, raw_dir, archive_root=source.get("archive_root"),
                    verify=checked_writer(_folder_identity(manual),
                                          shown_as=f"{raw_dir} (as converted from {manual})"))
        return raw_dir

    if kind == "url":
        archive_name = source.get("archive") or source["url"].rsplit("/", 1)[-1]
        if manual is not None and manual.is_file():
            # A copy the user fetched by other means must still be the published file.
            archive = manual
            if source.get("md5") and md5_file(archive) != source["md5"]:
                raise ManualDownloadRequired(
                    f"{archive}: md5 differs from the published {source['md5']} of "
                    f"{source['url']}; the copy is incomplete or a different release. Delete it "
                    "(or drop the manual path) to let the download fetch it.")
        else:
            archive = downloads / archive_name
            download(source["url"], archive, md5=source.get("md5"), size=source.get("size"),
                     progress=progress)
        extracted = _extract_with_space_check(archive, downloads / "extracted" / name)
        identity = {"url": source["url"], "md5": source.get("md5"), "file": archive.name}
        convert_msd(extracted, raw_dir, archive_root=source.get("archive_root"),
                    verify=checked_writer(identity))
        _cleanup(extracted, keep_extracted)
        return raw_dir

    if kind == "manual":
        info = MANUAL_SOURCES.get(name)
        converter_name = source.get("converter", name)
        # A manual path that does not exist yet (config/paper.yaml names one for BTCV) must not
        # hide the token: the download then lands at that path.
        location = manual if manual is not None and manual.exists() else _find_manual(
            downloads, name, source, info)
        if location is None and info and info.synapse_file_id and environ.get(SYNAPSE_TOKEN_ENV):
            location = (manual if manual is not None and manual.suffix == ".zip"
                        else downloads / info.archive_names[0])
            log.info("Downloading %s from Synapse (%s) with the token in %s", name,
                     info.synapse_file_id, SYNAPSE_TOKEN_ENV)
            synapse_download(info.synapse_file_id, location, environ[SYNAPSE_TOKEN_ENV],
                             endpoint=environ.get("SYNAPSE_REPO_ENDPOINT", SYNAPSE_REPO_ENDPOINT),
                             progress=progress)
        if location is None or not location.exists():
            if info is None:
                raise ManualDownloadRequired(
                    f"Dataset {name!r} must be downloaded by hand: {source.get('instructions')} "
                    f"Put {source.get('archive')} in {downloads} or set its manual path.")
            if manual is not None:
                raise ManualDownloadRequired(
                    f"The manual path {manual} for {name!r} does not exist.\n"
                    + str(_manual_error(name, info, downloads)))
            raise _manual_error(name, info, downloads)
        extracted = None
        if location.is_file():
            identity = _file_identity(location, previous.get("source") if previous else None)
            expected = source.get("md5")
            if expected and identity["md5"] != expected:
                raise ManualDownloadRequired(
                    f"{location}: md5 {identity['md5']} differs from the expected {expected}; "
                    "the file is incomplete or a different release. Download it again.")
            if info and info.reported_md5 and identity["md5"] != info.reported_md5:
                log.warning("%s: md5 %s differs from the md5 reported elsewhere (%s); continuing "
                            "— the conversion and integrity checks decide", location,
                            identity["md5"], info.reported_md5)
            extracted = _extract_with_space_check(location, downloads / "extracted" / name)
            convert_from = extracted
        else:
            identity = _folder_identity(location)
            convert_from = location
        converter = get_converter(converter_name)
        kwargs = {"workers": workers} if converter_name == "brats2020" else {}
        kwargs.update(converter_options or {})
        converter(convert_from, raw_dir, verify=checked_writer(identity), **kwargs)
        if extracted is not None:
            _cleanup(extracted, keep_extracted)
        return raw_dir

    raise ValueError(f"dataset {name!r}: unknown source kind {kind!r} (expected url, manual, "
                     "folder or generated)")


def _require_folder(folder: Path, name: str) -> None:
    """A user's dataset folder must exist and be a folder (not the archive it came in)."""
    where = f"datasets.{name}.folder"
    if folder.is_file():
        raise NotADirectoryError(f"{folder} ({where}) is a file, not a folder: extract the "
                                 f"archive and point '{where}' at the folder that holds "
                                 f"imagesTr/, labelsTr/ and dataset.json")
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} ({where}): no such folder; point '{where}' at the "
                                f"folder that holds imagesTr/, labelsTr/ and dataset.json")


def _find_manual(downloads: Path, name: str, source: dict,
                 info: ManualSource | None) -> Path | None:
    names = list(info.archive_names + info.folder_names) if info else []
    if source.get("archive") and source["archive"] not in names:
        names.insert(0, source["archive"])
    for candidate in names:
        path = downloads / candidate
        if path.is_file() or path.is_dir():
            return path
    return None


def _unchanged_manual(done: dict, manual: Path | None, downloads: Path, name: str,
                      source: dict) -> bool:
    """True when the recorded source is still what we would use now (or is gone: the raw data
    stays valid after the user deletes the archive to free space)."""
    if "folder" in done:
        folder = Path(done["folder"])
        if manual is not None and manual.resolve() != folder:
            return False
        return not folder.exists() or _folder_identity(folder) == done
    location = manual or _find_manual(downloads, name, source, MANUAL_SOURCES.get(name))
    if location is None or not location.is_file():
        return manual is None
    stat = location.stat()
    return (location.name, stat.st_size, stat.st_mtime_ns) == (done.get("file"), done.get("size"),
                                                               done.get("mtime_ns"))


def _cleanup(extracted: Path, keep: bool) -> None:
    if not keep:
        shutil.rmtree(extracted, ignore_errors=True)
