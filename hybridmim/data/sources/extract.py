"""Safe archive extraction (tar with any compression, zip).

Archives come from the internet or from a user's download folder, so every member is checked
before a byte of it is written: no absolute paths, no ``..`` escaping the target, no symlinks or
hard links (a link could later redirect a write outside the target), no devices or FIFOs. Every
member gets our path and link checks; tar members also pass the standard library's ``data``
extraction filter (zip has no such filter). Everything is written into a temporary sibling
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
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from hybridmim.data.layout import atomic_directory, read_json_or_none
from hybridmim.data.sources.download import check_free_space

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


def _tar_member_filter(archive: Path):
    """The standard library's ``data`` filter (no escape from the target, no device/FIFO, sane
    modes), with the refusals of zip members: absolute names (it would strip the ``/``), any
    ``..``, and links of any kind (the datasets have none; a link can redirect a later write)."""
    def check(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
        _safe_relative(member.name, archive)
        if member.issym() or member.islnk():
            link_kind = "symbolic" if member.issym() else "hard"
            raise UnsafeArchiveError(
                f"{archive}: member {member.name!r} is a {link_kind} link (to "
                f"{member.linkname!r}); links are refused because they can redirect writes "
                "outside the target folder.")
        try:
            checked = tarfile.data_filter(member, dest)
        except tarfile.SpecialFileError:
            raise UnsafeArchiveError(f"{archive}: member {member.name!r} is a device, FIFO or "
                                     "other special file; refusing to extract it.") from None
        except tarfile.FilterError as err:
            raise UnsafeArchiveError(f"{archive}: member {member.name!r} refused: {err}") from None
        return checked
    return check


def _extract_tar(archive: Path, into: Path) -> None:
    # Stream mode ("r|*"): one sequential pass, any compression, no seeking back through a
    # multi-GB gzip stream; the filter checks each member before its bytes are written.
    with tarfile.open(archive, mode="r|*") as tar:
        tar.extractall(into, filter=_tar_member_filter(archive))


def _extract_zip(archive: Path, into: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        # like tar members, each is checked before its bytes are written into the temporary folder
        for info in zf.infolist():
            rel = _safe_relative(info.filename, archive)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise UnsafeArchiveError(f"{archive}: member {info.filename!r} is a symbolic "
                                         "link; links are refused.")
            if mode and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)) and stat.S_IFMT(mode):
                raise UnsafeArchiveError(f"{archive}: member {info.filename!r} is a special file "
                                         "(device/FIFO); refusing to extract it.")
            if info.is_dir():
                (into / rel).mkdir(parents=True, exist_ok=True)
                continue
            (into / rel).parent.mkdir(parents=True, exist_ok=True)
            # reading to the end checks the member's CRC
            with zf.open(info) as source, open(into / rel, "wb") as out:
                shutil.copyfileobj(source, out, _COPY_BUFFER)


def safe_extract(archive: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Extract ``archive`` into ``target`` safely and atomically; return ``target``.

    Fails before writing when the target's file system lacks the space. Idempotent: a target
    holding the ``.complete`` marker of the same archive (same name and size) is returned as is.
    Anything else already at ``target`` is an unfinished earlier attempt and is replaced.
    """
    archive, target = Path(archive), Path(target)
    if not archive.is_file():
        raise ArchiveError(f"Archive {archive} does not exist.")
    record = {"archive": archive.name, "size": archive.stat().st_size}
    if read_json_or_none(target / COMPLETE_MARKER) == record:
        log.info("%s already extracted into %s", archive.name, target)
        return target
    if zipfile.is_zipfile(archive):
        extractor = _extract_zip
        with zipfile.ZipFile(archive) as zf:
            needed = sum(info.file_size for info in zf.infolist())
    elif tarfile.is_tarfile(archive):
        extractor = _extract_tar
        needed = archive.stat().st_size  # an uncompressed tar (MSD) is as large as its content
    else:
        raise ArchiveError(f"{archive} is neither a tar nor a zip archive (or it is truncated "
                           "before its first member). Delete it and download it again.")
    check_free_space(target.parent, needed, f"extracting {archive.name}")
    # Leftovers of an attempt that was killed (SIGKILL, power loss) before its cleanup ran.
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    with atomic_directory(target) as temp:
        log.info("Extracting %s into %s", archive, target)
        try:
            extractor(archive, temp)
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError,
                OSError) as err:
            if isinstance(err, OSError) and not _looks_like_corruption(err):
                raise
            raise ArchiveError(
                f"{archive} is truncated or corrupt ({type(err).__name__}: {err}); nothing was "
                "extracted. Delete it and download it again (a manual download may have been "
                "interrupted).") from None
        count = sum(path.is_file() for path in temp.rglob("*"))
        (temp / COMPLETE_MARKER).write_text(json.dumps(record))
    log.info("Extracted %d files from %s", count, archive.name)
    return target


def _looks_like_corruption(err: OSError) -> bool:
    """lzma/bz2/gzip report bad data as OSError subclasses; disk errors are not corruption."""
    return err.errno is None and type(err).__module__ in ("lzma", "_lzma", "_compression", "gzip",
                                                           "bz2", "builtins")
