"""Safe archive extraction (tar with any compression, zip).

Archives come from the internet or from a user's download folder, so every member is checked
before a byte of it is written: no absolute paths, no ``..`` escaping the target, no symlinks or
hard links (a link could later redirect a write outside the target), no devices or FIFOs. Tar
members pass the standard library's ``data`` extraction filter plus two stricter refusals; zip has
no such filter, so its members are checked here. Everything is written into a temporary sibling
folder that is renamed onto the target only after the whole archive was read without error and a
``.complete`` marker was written inside it. A truncated or corrupt archive leaves nothing behind.
"""
from __future__ import annotations

import json
import logging
import lzma
import os
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

log = logging.getLogger("hybridmim.data.sources.extract")

COMPLETE_MARKER = ".complete"
_COPY_BUFFER = 1 << 20


class UnsafeArchiveError(ValueError):
    """An archive member that would escape the target or is not a plain file/folder."""


class ArchiveError(RuntimeError):
    """An archive that cannot be read to the end (truncated, corrupt, unknown format)."""


def _safe_relative(name: str, archive: Path) -> PurePosixPath:
    """The member's path relative to the target, or UnsafeArchiveError naming the member."""
    clean = name.replace("\\", "/")
    if clean.startswith("/") or (len(clean) > 1 and clean[1] == ":"):
        raise UnsafeArchiveError(f"{archive}: member {name!r} has an absolute path; refusing to "
                                 "extract this archive (it may be malicious or corrupt).")
    parts = [p for p in PurePosixPath(clean).parts if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(f"{archive}: member {name!r} contains '..' and would escape the "
                                 "target folder; refusing to extract this archive.")
    return PurePosixPath(*parts) if parts else PurePosixPath(".")


def _copy_stream(src, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "wb") as out:
        shutil.copyfileobj(src, out, _COPY_BUFFER)


def _tar_member_filter(archive: Path, counter: list[int]):
    """The standard library's ``data`` filter (no escape from the target, no device/FIFO, sane
    modes), with two refusals stricter than it: absolute names (it would strip the ``/``) and
    links of any kind (the datasets have none; a link can redirect a later write)."""
    def check(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
        if PurePosixPath(member.name.replace("\\", "/")).is_absolute() or member.name[1:2] == ":":
            raise UnsafeArchiveError(f"{archive}: member {member.name!r} has an absolute path; "
                                     "refusing to extract this archive (it may be malicious or "
                                     "corrupt).")
        if member.issym() or member.islnk():
            link_kind = "symbolic" if member.issym() else "hard"
            raise UnsafeArchiveError(
                f"{archive}: member {member.name!r} is a {link_kind} link (to "
                f"{member.linkname!r}); links are refused because they can redirect writes "
                "outside the target folder.")
        try:
            checked = tarfile.data_filter(member, dest)
        except tarfile.OutsideDestinationError:
            raise UnsafeArchiveError(f"{archive}: member {member.name!r} contains '..' and would "
                                     "escape the target folder; refusing to extract this "
                                     "archive.") from None
        except tarfile.SpecialFileError:
            raise UnsafeArchiveError(f"{archive}: member {member.name!r} is a device, FIFO or "
                                     "other special file; refusing to extract it.") from None
        except tarfile.FilterError as err:
            raise UnsafeArchiveError(f"{archive}: member {member.name!r} refused: {err}") from None
        counter[0] += checked.isfile()
        return checked
    return check


def _extract_tar(archive: Path, into: Path) -> int:
    counter = [0]
    # Stream mode ("r|*"): one sequential pass, any compression, no seeking back through a
    # multi-GB gzip stream; the filter checks each member before its bytes are written.
    with tarfile.open(archive, mode="r|*") as tar:
        tar.extractall(into, filter=_tar_member_filter(archive, counter))
    return counter[0]


def _extract_zip(archive: Path, into: Path) -> int:
    count = 0
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        # The central directory lists everything up front: refuse before writing anything.
        for info in infos:
            _safe_relative(info.filename, archive)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise UnsafeArchiveError(f"{archive}: member {info.filename!r} is a symbolic "
                                         "link; links are refused.")
            if mode and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)) and stat.S_IFMT(mode):
                raise UnsafeArchiveError(f"{archive}: member {info.filename!r} is a special file "
                                         "(device/FIFO); refusing to extract it.")
        for info in infos:
            rel = _safe_relative(info.filename, archive)
            if info.is_dir():
                (into / rel).mkdir(parents=True, exist_ok=True)
                continue
            with zf.open(info) as source:  # reading to the end checks the member's CRC
                _copy_stream(source, into / rel)
            count += 1
    return count


def is_complete(folder: str | os.PathLike) -> bool:
    return (Path(folder) / COMPLETE_MARKER).is_file()


def safe_extract(archive: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Extract ``archive`` into ``target`` safely and atomically; return ``target``.

    Idempotent: a target holding the ``.complete`` marker of the same archive (same name and size)
    is returned as is. Anything else already at ``target`` is an unfinished earlier attempt and is
    replaced.
    """
    archive, target = Path(archive), Path(target)
    if not archive.is_file():
        raise ArchiveError(f"Archive {archive} does not exist.")
    record = {"archive": archive.name, "size": archive.stat().st_size}
    marker = target / COMPLETE_MARKER
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == record:
                log.info("%s already extracted into %s", archive.name, target)
                return target
        except json.JSONDecodeError:
            pass
    if zipfile.is_zipfile(archive):
        extractor = _extract_zip
    elif tarfile.is_tarfile(archive):
        extractor = _extract_tar
    else:
        raise ArchiveError(f"{archive} is neither a tar nor a zip archive (or it is truncated "
                           "before its first member). Delete it and download it again.")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Leftovers of an attempt that was killed (SIGKILL, power loss) before its cleanup ran.
    for stale in target.parent.glob(f".{target.name}.extracting-*"):
        shutil.rmtree(stale, ignore_errors=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{target.name}.extracting-", dir=target.parent))
    try:
        log.info("Extracting %s into %s", archive, target)
        try:
            count = extractor(archive, temp)
        except UnsafeArchiveError:
            raise
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError,
                OSError) as err:
            if isinstance(err, OSError) and not _looks_like_corruption(err):
                raise
            raise ArchiveError(
                f"{archive} is truncated or corrupt ({type(err).__name__}: {err}); nothing was "
                "extracted. Delete it and download it again (a manual download may have been "
                "interrupted).") from None
        (temp / COMPLETE_MARKER).write_text(json.dumps(record))
        if target.exists():
            shutil.rmtree(target)
        os.replace(temp, target)
        log.info("Extracted %d files from %s", count, archive.name)
        return target
    finally:
        if temp.exists():
            shutil.rmtree(temp, ignore_errors=True)


def _looks_like_corruption(err: OSError) -> bool:
    """lzma/bz2/gzip report bad data as OSError subclasses; disk errors are not corruption."""
    return err.errno is None and type(err).__module__ in ("lzma", "_lzma", "_compression", "gzip",
                                                           "bz2", "builtins")
