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

import functools
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

from hybridmim.data.integrity import assert_dataset_ok
from hybridmim.data.layout import read_json_or_none
from hybridmim.data.sources.convert import convert_folder, convert_msd, get_converter
from hybridmim.data.sources.download import SYNAPSE_REPO_ENDPOINT, download, synapse_download
from hybridmim.data.sources.extract import safe_extract
from hybridmim.dataset_catalog import DatasetSpec
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


def _manual_error(name: str, info: ManualSource, downloads_dir: Path) -> ManualDownloadRequired:
    places = "\n".join(f"      {downloads_dir / n}" for n in info.archive_names)
    return ManualDownloadRequired(
        f"Dataset {name!r} ({info.title}) needs a registration and is not on this machine yet. "
        f"Get it one of these ways:\n{info.how_to_get}\nThen put the archive (keep its name) at\n"
        f"{places}\n  or point the dataset's manual path (config: the dataset's 'manual_path', "
        f"API: acquire(..., manual_paths={{{name!r}: PATH}})) at the archive or at the folder "
        f"you extracted it to, and run again.\n  Checksum: {info.checksum_note}")


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
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue  # our own marker (and macOS debris) must not change the identity
        stat = path.stat()
        digest.update(f"{path.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return {"folder": str(folder.resolve()), "listing_sha256": digest.hexdigest()}


def acquire(spec: DatasetSpec, raw_root: str | os.PathLike, downloads_dir: str | os.PathLike,
            manual_paths: Mapping[str, str | os.PathLike] | None = None, *, progress: bool = True,
            converter_options: Mapping[str, Any] | None = None,
            environ: Mapping[str, str] | None = None) -> Path:
    """Make ``raw_root/<name>`` hold the dataset of registry entry ``spec``; return its path.

    ``manual_paths`` maps dataset names to a manually downloaded archive or extracted folder.
    ``converter_options`` go to the converter (e.g. ``expect_all_cases=False`` for a subset,
    ``workers`` for BraTS channel stacking). ``environ`` (default ``os.environ``) is where
    ``SYNAPSE_AUTH_TOKEN`` (and, for a private mirror, ``SYNAPSE_REPO_ENDPOINT``) are read.
    """
    name, labels, channels = spec.name, spec.labels, spec.channels
    source = dict(spec.source or {})
    raw_dir = Path(raw_root) / name
    downloads = Path(downloads_dir)
    manual = Path(manual_paths[name]) if manual_paths and name in manual_paths else None
    kind = source.get("kind")
    previous = read_json_or_none(raw_dir / MARKER)

    # What the integrity check accepted the data against: a changed label map or channel list
    # must check the data again.
    checked_against = {"labels": sorted(int(k) for k in labels), "channels": list(channels)}
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

        log.info("generating demo dataset %s (%s) into %s", name, source.get("generator", name),
                 raw_dir)
        out = generate_demo(source.get("generator", name), raw_dir, **{
            key: int(source[key]) for key in ("num_cases", "num_test", "seed") if key in source})
        assert_dataset_ok(out, labels, channels)
        return out
    if kind not in _SOURCES:
        raise ValueError(f"dataset {name!r}: unknown source kind {kind!r} (expected url, "
                         "manual, folder or generated)")
    located = _SOURCES[kind](_Request(
        name, source, raw_dir, downloads, manual, previous.get("source") if previous else None,
        progress, dict(converter_options or {}),
        os.environ if environ is None else environ))

    marker = {"format": MARKER_FORMAT, "dataset": name, "source_kind": kind,
              "source": located.identity, "checked_against": checked_against}
    # The check runs on a temporary copy that is deleted on failure: name what the user has.
    shown_as = located.shown_as or f"{raw_dir} (as converted from {kind} source)"
    declared_by = (f"the config block of dataset {name!r}" if kind == "folder"
                   else f"the registry entry {name!r}")

    def verify(folder: Path) -> None:
        assert_dataset_ok(folder, labels, channels, shown_as=shown_as, declared_by=declared_by)
        (folder / MARKER).write_text(json.dumps(marker, indent=2) + "\n")

    located.convert(located.folder, raw_dir, verify=verify)
    if located.extracted is not None:  # the raw folder holds (hard links to) what it needs
        shutil.rmtree(located.extracted, ignore_errors=True)
    return raw_dir


@dataclass(frozen=True)
class _Request:
    """What a source kind's handler needs to find (download, extract) the data."""
    name: str
    source: dict
    raw_dir: Path
    downloads: Path
    manual: Path | None
    previous: dict | None  # the source identity the last acquisition recorded
    progress: bool
    converter_options: dict
    environ: Mapping[str, str]


class _Located(NamedTuple):
    """A source on this machine, ready to convert into the canonical layout."""
    folder: Path  # what the converter reads
    identity: dict  # recorded as the marker's "source": a later run compares against it
    convert: Callable[..., Path]  # convert(folder, raw_dir, verify=...)
    shown_as: Path | str | None = None  # how the integrity check names the data
    extracted: Path | None = None  # an extraction to delete after the conversion


def _from_folder(r: _Request) -> _Located:
    """A user's folder that already has the canonical layout."""
    folder = Path(r.source["path"]) if r.manual is None else r.manual
    _require_folder(folder, r.name)
    return _Located(folder, _folder_identity(folder), convert_folder, shown_as=folder)


def _from_url(r: _Request) -> _Located:
    """A published archive (MSD): downloaded, or a copy of it the user got by other means."""
    convert = functools.partial(convert_msd, archive_root=r.source.get("archive_root"))
    if r.manual is not None and r.manual.is_dir():
        # The user extracted the published archive already (e.g. downloaded elsewhere).
        return _Located(r.manual, _folder_identity(r.manual), convert,
                        shown_as=f"{r.raw_dir} (as converted from {r.manual})")
    url, md5 = r.source["url"], r.source.get("md5")
    if r.manual is not None and r.manual.is_file():
        # A copy the user fetched by other means must still be the published file.
        archive = r.manual
        if md5 and md5_file(archive) != md5:
            raise ManualDownloadRequired(
                f"{archive}: md5 differs from the published {md5} of {url}; the copy is "
                "incomplete or a different release. Delete it (or drop the manual path) to let "
                "the download fetch it.")
    else:
        archive = r.downloads / (r.source.get("archive") or url.rsplit("/", 1)[-1])
        download(url, archive, md5=md5, size=r.source.get("size"), progress=r.progress)
    extracted = safe_extract(archive, r.downloads / "extracted" / r.name)
    return _Located(extracted, {"url": url, "md5": md5, "file": archive.name}, convert,
                    extracted=extracted)


def _from_manual(r: _Request) -> _Located:
    """An archive or folder behind a registration (BTCV, BraTS): in the downloads folder, at the
    manual path, or (BTCV) fetched from Synapse with the user's token."""
    info = MANUAL_SOURCES.get(r.name)
    convert = functools.partial(get_converter(r.source.get("converter", r.name)),
                                **r.converter_options)
    location = _locate_manual(r, info)
    if location.is_dir():
        return _Located(location, _folder_identity(location), convert)
    identity = _file_identity(location, r.previous)
    expected = r.source.get("md5")
    if expected and identity["md5"] != expected:
        raise ManualDownloadRequired(
            f"{location}: md5 {identity['md5']} differs from the expected {expected}; "
            "the file is incomplete or a different release. Download it again.")
    if info and info.reported_md5 and identity["md5"] != info.reported_md5:
        log.warning("%s: md5 %s differs from the md5 reported elsewhere (%s); continuing "
                    "— the conversion and integrity checks decide", location,
                    identity["md5"], info.reported_md5)
    extracted = safe_extract(location, r.downloads / "extracted" / r.name)
    return _Located(extracted, identity, convert, extracted=extracted)


_SOURCES: dict[str, Callable[[_Request], _Located]] = {
    "folder": _from_folder, "url": _from_url, "manual": _from_manual}


def _locate_manual(r: _Request, info: ManualSource | None) -> Path:
    """The manual archive or folder; with a Synapse token (BTCV) it is downloaded first."""
    # A manual path that does not exist yet (config/paper.yaml names one for BTCV) must not
    # hide the token: the download then lands at that path.
    manual = r.manual
    location = manual if manual is not None and manual.exists() else _find_manual(
        r.downloads, r.name, r.source, info)
    if location is None and info and info.synapse_file_id and r.environ.get(SYNAPSE_TOKEN_ENV):
        location = (manual if manual is not None and manual.suffix == ".zip"
                    else r.downloads / info.archive_names[0])
        log.info("Downloading %s from Synapse (%s) with the token in %s", r.name,
                 info.synapse_file_id, SYNAPSE_TOKEN_ENV)
        synapse_download(info.synapse_file_id, location, r.environ[SYNAPSE_TOKEN_ENV],
                         endpoint=r.environ.get("SYNAPSE_REPO_ENDPOINT", SYNAPSE_REPO_ENDPOINT),
                         progress=r.progress)
    if location is not None and location.exists():
        return location
    if info is None:
        raise ManualDownloadRequired(
            f"Dataset {r.name!r} must be downloaded by hand: {r.source.get('instructions')} "
            f"Put {r.source.get('archive')} in {r.downloads} or set its manual path.")
    if manual is not None:
        raise ManualDownloadRequired(f"The manual path {manual} for {r.name!r} does not exist.\n"
                                     + str(_manual_error(r.name, info, r.downloads)))
    raise _manual_error(r.name, info, r.downloads)


def _require_folder(folder: Path, name: str) -> None:
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
    names = [source["archive"]] if source.get("archive") else []
    names += list(info.archive_names + info.folder_names) if info else []
    return next((downloads / n for n in names if (downloads / n).exists()), None)


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
