"""Resumable, verified HTTP downloads.

``download`` streams a URL into ``<dest>.part`` in chunks, resumes a partial file with an HTTP Range
request (and restarts cleanly when the server ignores Range), retries transient network errors with
bounded timeouts, verifies size and checksums, and only then renames the file onto ``dest``. A file
that fails verification is deleted, so a bad download never looks like a good one.

Secrets: request headers (e.g. ``Authorization: Bearer``) are never logged, and the query string
of a URL (pre-signed cloud URLs carry their signature there) is stripped from every message.
"""
from __future__ import annotations

import errno
import http.client
import json
import logging
import os
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from hybridmim.hashing import md5_file, sha256_file
from hybridmim.progress import StepProgress

log = logging.getLogger("hybridmim.data.sources.download")

CHUNK_BYTES = 1 << 20
# Headroom kept free beyond the download itself: a full disk corrupts more than the download.
FREE_SPACE_MARGIN_BYTES = 256 << 20
RETRYABLE_HTTP_STATUS = {408, 429, 500, 502, 503, 504}


class DownloadError(RuntimeError):
    """A download that failed for good (after retries) or did not verify."""


def redact_url(url: str) -> str:
    """The URL without query string or credentials, safe to print."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def open_url(url: str, headers: dict[str, str], timeout: float):
    """Open a URL, following redirects; raises urllib errors unchanged.

    urllib copies every header to a redirect target except the "unredirected" ones, so the
    Authorization header is added as one: a bearer token must not leak to, say, the cloud bucket a
    pre-signed URL points at (which would also reject the second auth mechanism)."""
    request = urllib.request.Request(url)
    for key, value in headers.items():
        if key.lower() == "authorization":
            request.add_unredirected_header(key, value)
        else:
            request.add_header(key, value)
    return urllib.request.urlopen(request, timeout=timeout)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024


def check_free_space(folder: Path, needed_bytes: int, what: str) -> None:
    """Fail before writing when ``folder``'s file system cannot hold ``needed_bytes`` more."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if needed_bytes + FREE_SPACE_MARGIN_BYTES > free:
        raise DownloadError(
            f"Not enough disk space for {what}: it needs {_human(needed_bytes)} (plus "
            f"{_human(FREE_SPACE_MARGIN_BYTES)} headroom) in {folder}, but only {_human(free)} is "
            "free. Free some space or point the download/data folder at a larger disk.")


def _verify(path: Path, url: str, md5: str | None, sha256: str | None, size: int | None) -> None:
    """Raise DownloadError (and delete ``path``) unless size and checksums match."""
    problems = []
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        problems.append(f"size {actual_size} bytes, expected {size}")
    for kind, expected, digest in (("md5", md5, md5_file), ("sha256", sha256, sha256_file)):
        if expected and not problems and (got := digest(path)).lower() != expected.lower():
            problems.append(f"{kind} {got}, expected {expected}")
    if problems:
        path.unlink(missing_ok=True)
        raise DownloadError(
            f"Download of {redact_url(url)} did not verify ({'; '.join(problems)}); the file was "
            "deleted. Run the command again to retry; if it fails the same way, the source has "
            "changed or is corrupt — check the URL and the expected checksum in the registry.")


def _fetch_into_part(url: str, part: Path, headers: dict[str, str], timeout: float,
                     size: int | None, progress: bool, name: str) -> None:
    """One attempt: continue ``part`` from its current length; raise on any interruption."""
    have = part.stat().st_size if part.exists() else 0
    request_headers = dict(headers)
    if have:
        request_headers["Range"] = f"bytes={have}-"
    try:
        response = open_url(url, request_headers, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:
            # Our partial file is as long as (or longer than) the resource: start over.
            log.warning("Server refused to resume %s (HTTP 416); restarting from zero", name)
            part.unlink(missing_ok=True)
            raise ConnectionError("range not satisfiable; restarting") from err
        raise
    with response:
        status = response.status
        if have and status == 206:
            content_range = response.headers.get("Content-Range", "")
            start = content_range.split(" ", 1)[-1].split("-", 1)[0]
            if start.strip() != str(have):
                raise DownloadError(f"Server answered a resume of {redact_url(url)} with an "
                                    f"unexpected Content-Range {content_range!r}")
            mode = "ab"
        else:
            if have:
                log.warning("Server ignored the Range request for %s; restarting from zero", name)
            have, mode = 0, "wb"
        length = response.headers.get("Content-Length")
        expected_total = have + int(length) if length is not None else size
        if expected_total is not None:
            check_free_space(part.parent, expected_total - have, f"downloading {name}")
        # one line every 30 s in logs (Snakemake, SLURM): a download can take hours
        bar = StepProgress(expected_total, name, start=have, every_s=30, enabled=progress,
                           unit="B")
        received = 0
        try:
            with open(part, mode) as fh:
                while True:
                    block = response.read(CHUNK_BYTES)
                    if not block:
                        break
                    fh.write(block)
                    received += len(block)
                    bar.update(have + received)
                fh.flush()
                os.fsync(fh.fileno())
        finally:
            bar.close()
        if length is not None and received < int(length):
            raise http.client.IncompleteRead(b"", int(length) - received)


def download(url: str, dest: str | os.PathLike, md5: str | None = None, sha256: str | None = None,
             size: int | None = None, headers: dict[str, str] | None = None, progress: bool = True,
             timeout: float = 60.0, retries: int = 5, backoff_s: float = 2.0) -> Path:
    """Download ``url`` to ``dest`` (resuming ``dest.part``), verify it, rename it into place.

    A ``dest`` that already exists and verifies is kept (no network). ``timeout`` bounds every
    socket operation; ``retries`` bounds the attempts after a transient failure (connection reset,
    timeout, truncated body, HTTP 5xx/429), each resuming where the previous one stopped.
    """
    dest = Path(dest)
    name = dest.name
    if dest.exists():
        if md5 or sha256 or size is not None:
            try:
                _verify(dest, url, md5, sha256, size)
                log.info("%s already downloaded and verified", dest)
                return dest
            except DownloadError:
                log.warning("Existing %s did not verify; downloading it again", dest)
        else:
            log.info("%s already exists (no checksum to verify it against)", dest)
            return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    if size is not None:
        have = part.stat().st_size if part.exists() else 0
        if have > size:
            part.unlink()
            have = 0
        check_free_space(dest.parent, size - have, f"downloading {name}")
    log.info("Downloading %s -> %s", redact_url(url), dest)
    attempt = 0
    while True:
        try:
            _fetch_into_part(url, part, headers or {}, timeout, size, progress, name)
            break
        except urllib.error.HTTPError as err:
            if err.code not in RETRYABLE_HTTP_STATUS or attempt >= retries:
                hint = (" — the credentials were refused or the terms of use not accepted"
                        if err.code in (401, 403) else "")
                raise DownloadError(f"Downloading {redact_url(url)} failed: HTTP {err.code} "
                                    f"{err.reason}{hint}. The partial file {part} is kept "
                                    "so that a later run resumes it.") from None
            reason = f"HTTP {err.code}"
        except (OSError, http.client.HTTPException) as err:
            # OSError covers URLError, connection resets and socket timeouts.
            if isinstance(err, OSError) and err.errno == errno.ENOSPC:
                part.unlink(missing_ok=True)
                raise DownloadError(f"Disk full while downloading {name} into {dest.parent}; the "
                                    "partial file was deleted. Free space and run again.") from None
            if attempt >= retries:
                raise DownloadError(
                    f"Downloading {redact_url(url)} failed after {attempt + 1} attempts "
                    f"({type(err).__name__}: {err}). The partial file {part} is kept, so running "
                    "the command again resumes it; check the network or proxy settings.") from None
            reason = f"{type(err).__name__}: {err}"
        attempt += 1
        wait = backoff_s * (2 ** (attempt - 1))
        log.warning("Download of %s interrupted (%s); retry %d/%d in %.1f s", name, reason,
                    attempt, retries, wait)
        time.sleep(wait)
    _verify(part, url, md5, sha256, size)
    os.replace(part, dest)
    log.info("Downloaded %s (%s)", dest, _human(dest.stat().st_size))
    return dest


SYNAPSE_REPO_ENDPOINT = "https://repo-prod.prod.sagebase.org/repo/v1"


def _synapse_json(url: str, token: str, timeout: float):
    try:
        with open_url(url, {"Authorization": f"Bearer {token}", "Accept": "application/json"},
                      timeout=timeout) as response:
            return json.loads(response.read().decode())
    except urllib.error.HTTPError as err:
        raise DownloadError(
            f"Synapse refused {redact_url(url)}: HTTP {err.code} {err.reason}. Check that the "
            "access token in SYNAPSE_AUTH_TOKEN is valid (scope 'download') and that this "
            "account has accepted the dataset's terms of use on synapse.org.") from None


def synapse_download(entity_id: str, dest: str | os.PathLike, token: str,
                     endpoint: str = SYNAPSE_REPO_ENDPOINT, progress: bool = True,
                     timeout: float = 60.0) -> Path:
    """Download the file of Synapse entity ``entity_id`` with a personal access token.

    Uses the Synapse REST API: the entity's file handle gives the expected md5 and size, and
    ``/entity/{id}/file?redirect=false`` a short-lived pre-signed URL that is downloaded WITHOUT
    the token (it carries its own signature). The token is only ever put in a request header.
    """
    base = endpoint.rstrip("/")
    handles = _synapse_json(f"{base}/entity/{entity_id}/filehandles", token, timeout)
    entity = _synapse_json(f"{base}/entity/{entity_id}", token, timeout)
    handle_id = str(entity.get("dataFileHandleId", ""))
    handle = next((h for h in handles.get("list", []) if str(h.get("id")) == handle_id), None)
    if handle is None:
        raise DownloadError(f"Synapse entity {entity_id} has no downloadable file "
                            "(is it a folder or project? give the id of the file entity).")
    md5, size = handle.get("contentMd5"), handle.get("contentSize")
    try:
        with open_url(f"{base}/entity/{entity_id}/file?redirect=false",
                      {"Authorization": f"Bearer {token}"}, timeout=timeout) as response:
            presigned = response.read().decode().strip()
    except urllib.error.HTTPError as err:
        raise DownloadError(f"Synapse refused the download URL of {entity_id}: HTTP {err.code} "
                            f"{err.reason}. Accept the dataset's terms of use on synapse.org with "
                            "this account, then run again.") from None
    return download(presigned, dest, md5=md5, size=int(size) if size is not None else None,
                    progress=progress, timeout=timeout)
