"""Downloads and safe extraction against a loopback HTTP server (no network ever).

The server (http.server on 127.0.0.1, port chosen by the OS) serves bytes the test builds, honours
Range requests (or ignores them when told), can drop the connection part-way through a body, and
mimics the three Synapse REST calls the BTCV download makes. It records every request so the tests
can assert what the client sent and how many body bytes went over the wire.
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import logging
import os
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from hybridmim.data.sources.acquire import acquire
from hybridmim.data.sources.download import DownloadError, download, synapse_download
from hybridmim.data.sources.extract import ArchiveError, UnsafeArchiveError, safe_extract
from hybridmim.dataset_catalog import get_dataset


class LoopbackServer:
    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.drop_after: dict[str, int] = {}  # path -> body bytes sent before hanging up (once)
        self.ignore_range = False
        self.requests: list[tuple[str, dict]] = []
        self.body_bytes_sent = 0
        self.json: dict[str, object] = {}  # path (with query) -> JSON body
        self.text: dict[str, str] = {}
        self.redirects: dict[str, str] = {}
        self.require_bearer: str | None = None
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                with server.lock:
                    server.requests.append((self.path, dict(self.headers)))
                path = self.path.split("?", 1)[0]
                if self.path in server.redirects:
                    self.send_response(302)
                    self.send_header("Location", server.redirects[self.path])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if self.path in server.json or self.path in server.text:
                    if server.require_bearer and self.headers.get(
                            "Authorization") != f"Bearer {server.require_bearer}":
                        self.send_error(401, "bad token")
                        return
                    body = (json.dumps(server.json[self.path]) if self.path in server.json
                            else server.text[self.path]).encode()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                if path not in server.files:
                    self.send_error(404)
                    return
                data = server.files[path]
                start = 0
                ranged = self.headers.get("Range")
                if ranged and not server.ignore_range:
                    start = int(ranged.split("=", 1)[1].split("-", 1)[0])
                    if start >= len(data):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                body = data[start:]
                cut = server.drop_after.pop(path, None)
                if cut is not None:
                    body = body[:cut]
                    self.close_connection = True
                self.wfile.write(body)
                with server.lock:
                    server.body_bytes_sent += len(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    srv = LoopbackServer()
    yield srv
    srv.close()


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# --------------------------------------------------------------------------------------------
# download()
def test_interrupted_download_resumes_from_partial_file(server, tmp_path):
    data = os.urandom(300_000)
    server.files["/big.bin"] = data
    server.drop_after["/big.bin"] = 120_000
    dest = tmp_path / "big.bin"
    download(server.url("/big.bin"), dest, md5=_md5(data), size=len(data), backoff_s=0,
             progress=False)
    assert dest.read_bytes() == data
    assert not (tmp_path / "big.bin.part").exists()
    assert len(server.requests) == 2
    assert "Range" not in server.requests[0][1]
    assert server.requests[1][1]["Range"] == "bytes=120000-"
    assert server.body_bytes_sent == len(data)  # nothing was sent twice


def test_partial_file_from_an_earlier_run_is_resumed(server, tmp_path):
    data = os.urandom(50_000)
    server.files["/f.bin"] = data
    (tmp_path / "f.bin.part").write_bytes(data[:20_000])
    download(server.url("/f.bin"), tmp_path / "f.bin", md5=_md5(data), progress=False)
    assert (tmp_path / "f.bin").read_bytes() == data
    assert server.requests[0][1]["Range"] == "bytes=20000-"
    assert server.body_bytes_sent == 30_000


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    data = os.urandom(40_000)
    server.files["/f.bin"] = data
    server.ignore_range = True
    (tmp_path / "f.bin.part").write_bytes(b"stale bytes of another version" * 100)
    download(server.url("/f.bin"), tmp_path / "f.bin", sha256=hashlib.sha256(data).hexdigest(),
             progress=False)
    assert (tmp_path / "f.bin").read_bytes() == data


def test_checksum_mismatch_is_a_clear_error_and_leaves_no_file(server, tmp_path):
    server.files["/f.bin"] = b"x" * 1000
    with pytest.raises(DownloadError, match=r"md5 .* expected 0123456789abcdef") as info:
        download(server.url("/f.bin"), tmp_path / "f.bin", md5="0123456789abcdef",
                 progress=False)
    assert "deleted" in str(info.value)
    assert _leftovers(tmp_path) == []


def test_verified_file_is_not_downloaded_again(server, tmp_path):
    data = b"payload" * 100
    server.files["/f.bin"] = data
    download(server.url("/f.bin"), tmp_path / "f.bin", md5=_md5(data), progress=False)
    download(server.url("/f.bin"), tmp_path / "f.bin", md5=_md5(data), progress=False)
    assert len(server.requests) == 1


def test_missing_file_fails_without_retrying_and_leaves_nothing(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(server.url("/nope.tar"), tmp_path / "nope.tar", backoff_s=0, progress=False)
    assert len(server.requests) == 1
    assert _leftovers(tmp_path) == []


def test_persistent_drops_give_up_after_bounded_retries_keeping_the_part(server, tmp_path):
    server.files["/f.bin"] = os.urandom(10_000)

    class AlwaysDrop(dict):  # every request hangs up after 1000 bytes
        def pop(self, key, default=None):
            return 1000

    server.drop_after = AlwaysDrop()
    with pytest.raises(DownloadError, match="after 3 attempts.*resumes"):
        download(server.url("/f.bin"), tmp_path / "f.bin", retries=2, backoff_s=0,
                 progress=False)
    assert len(server.requests) == 3
    assert (tmp_path / "f.bin.part").stat().st_size == 3000  # each attempt continued the last
    assert not (tmp_path / "f.bin").exists()


def test_not_enough_disk_space_fails_before_any_request(server, tmp_path):
    server.files["/f.bin"] = b"x"
    with pytest.raises(DownloadError, match="Not enough disk space"):
        download(server.url("/f.bin"), tmp_path / "f.bin", size=1 << 60, progress=False)
    assert server.requests == []


def test_bearer_token_is_never_forwarded_across_hosts_nor_logged(server, tmp_path, caplog):
    data = b"z" * 5000
    server.files["/bucket/f.bin"] = data
    # localhost and 127.0.0.1 are different hosts to the redirect policy
    server.redirects["/api/f.bin"] = server.url("/bucket/f.bin?X-Signature=abc")
    caplog.set_level(logging.DEBUG)
    download(server.url("/api/f.bin", host="localhost"), tmp_path / "f.bin", md5=_md5(data),
             headers={"Authorization": "Bearer s3cr3t-token"}, progress=False)
    first, second = server.requests
    assert first[1]["Authorization"] == "Bearer s3cr3t-token"
    assert "Authorization" not in second[1]
    assert "s3cr3t-token" not in caplog.text and "X-Signature" not in caplog.text


def _fake_synapse(server: LoopbackServer, data: bytes, token: str, entity: str = "syn3379050"):
    server.require_bearer = token
    server.files["/s3/RawData.zip"] = data
    server.json[f"/repo/v1/entity/{entity}"] = {"id": entity, "name": "RawData.zip",
                                                "dataFileHandleId": "77"}
    server.json[f"/repo/v1/entity/{entity}/filehandles"] = {"list": [
        {"id": "77", "fileName": "RawData.zip", "contentMd5": _md5(data),
         "contentSize": len(data)}]}
    server.text[f"/repo/v1/entity/{entity}/file?redirect=false"] = server.url(
        "/s3/RawData.zip?X-Amz-Signature=sig")
    return server.url("/repo/v1")


def test_synapse_download_uses_the_token_only_for_the_api(server, tmp_path, caplog):
    data = os.urandom(20_000)
    endpoint = _fake_synapse(server, data, "tok-123")
    caplog.set_level(logging.DEBUG)
    path = synapse_download("syn3379050", tmp_path / "RawData.zip", "tok-123", endpoint=endpoint,
                            progress=False)
    assert path.read_bytes() == data
    api = [h for p, h in server.requests if p.startswith("/repo/")]
    s3 = [h for p, h in server.requests if p.startswith("/s3/")]
    assert api and all(h["Authorization"] == "Bearer tok-123" for h in api)
    assert s3 and all("Authorization" not in h for h in s3)
    assert "tok-123" not in caplog.text


def test_synapse_bad_token_is_a_clear_error(server, tmp_path):
    endpoint = _fake_synapse(server, b"x", "right")
    with pytest.raises(DownloadError, match="SYNAPSE_AUTH_TOKEN.*terms of use") as info:
        synapse_download("syn3379050", tmp_path / "RawData.zip", "wrong", endpoint=endpoint)
    assert "wrong" not in str(info.value)
    assert _leftovers(tmp_path) == []


# --------------------------------------------------------------------------------------------
# safe_extract()
def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]], mode: str = "w") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return buffer.getvalue()


def _file(name: str) -> tarfile.TarInfo:
    return tarfile.TarInfo(name)


def _special(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


@pytest.mark.parametrize("mode", ["w", "w:gz", "w:bz2", "w:xz"])
def test_extracts_tar_of_any_compression_atomically(tmp_path, mode):
    archive = tmp_path / "a.tar"
    archive.write_bytes(_tar([(_file("Task/imagesTr/a.nii.gz"), b"aaa"),
                              (_file("./Task/dataset.json"), b"{}")], mode))
    target = safe_extract(archive, tmp_path / "out")
    assert (target / "Task/imagesTr/a.nii.gz").read_bytes() == b"aaa"
    assert (target / ".complete").is_file()  # the marker of a finished extraction
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar", "out"]
    stamp = (target / ".complete").stat().st_mtime_ns
    safe_extract(archive, tmp_path / "out")  # second call: nothing to do
    assert (target / ".complete").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("bad, needle", [
    (_file("Task/../../evil.txt"), "'..'"),
    (_file("/etc/evil.txt"), "absolute path"),
    (_special("Task/link", tarfile.SYMTYPE, "/etc/passwd"), "symbolic link"),
    (_special("Task/hard", tarfile.LNKTYPE, "Task/a"), "hard link"),
    (_special("Task/fifo", tarfile.FIFOTYPE), "device, FIFO"),
    (_special("Task/dev", tarfile.CHRTYPE), "device, FIFO"),
])
def test_unsafe_tar_members_are_refused_and_nothing_is_left(tmp_path, bad, needle):
    members = [(_file("Task/a"), b"fine"), (bad, b"evil" if bad.type == tarfile.REGTYPE else None)]
    archive = tmp_path / "bad.tar"
    archive.write_bytes(_tar(members))
    with pytest.raises(UnsafeArchiveError, match=needle) as info:
        safe_extract(archive, tmp_path / "out")
    assert bad.name in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tar"]
    assert not (tmp_path.parent / "evil.txt").exists()


def test_unsafe_zip_members_are_refused(tmp_path):
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("RawData/ok.txt", "ok")
        zf.writestr("../escape.txt", "evil")
    with pytest.raises(UnsafeArchiveError, match=r"'\.\./escape\.txt'"):
        safe_extract(archive, tmp_path / "out")
    link = tmp_path / "link.zip"
    with zipfile.ZipFile(link, "w") as zf:
        info = zipfile.ZipInfo("RawData/link")
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(UnsafeArchiveError, match="symbolic link"):
        safe_extract(link, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.zip", "link.zip"]


@pytest.mark.parametrize("mode", ["w", "w:gz", "zip"])
def test_truncated_archive_is_a_clear_error_and_leaves_nothing(tmp_path, mode):
    payload = os.urandom(200_000)
    if mode == "zip":
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as zf:
            zf.writestr("RawData/a.bin", payload)
        data = buffer.getvalue()
    else:
        data = _tar([(_file("Task/a.bin"), payload), (_file("Task/b.bin"), payload)], mode)
    archive = tmp_path / "cut.bin"
    archive.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ArchiveError, match="truncated|neither a tar nor a zip"):
        safe_extract(archive, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.bin"]


# --------------------------------------------------------------------------------------------
# acquire() through the loopback server: MSD tar and BTCV via Synapse
def _nifti_bytes(array: np.ndarray, affine: np.ndarray) -> bytes:
    image = nib.Nifti1Image(array, affine)
    return image.to_bytes()


def _msd_task_tar(rng) -> bytes:
    affine = np.diag([-1.5, -1.5, 2.0, 1.0])
    members, training = [], []
    for number in (1, 2, 3):
        image = rng.integers(-1000, 1000, size=(10, 9, 6)).astype(np.int16)
        label = (rng.random((10, 9, 6)) > 0.7).astype(np.uint8)
        name = f"spleen_{number}.nii"
        members += [(_file(f"Task09_Spleen/imagesTr/{name}"), _nifti_bytes(image, affine)),
                    (_file(f"Task09_Spleen/labelsTr/{name}"), _nifti_bytes(label, affine)),
                    (_file(f"Task09_Spleen/imagesTr/._{name}"), b"\x00\x05\x16\x07 AppleDouble")]
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    test_image = rng.integers(-1000, 1000, size=(10, 9, 6)).astype(np.int16)
    members.append((_file("Task09_Spleen/imagesTs/spleen_9.nii"), _nifti_bytes(test_image, affine)))
    index = {"name": "Spleen", "description": "fake", "reference": "test",
             "licence": "CC-BY-SA 4.0",
             "release": "1.0", "tensorImageSize": "3D", "modality": {"0": "CT"},
             "labels": {"0": "background", "1": "spleen"}, "numTraining": 3, "numTest": 1,
             "training": training, "test": ["./imagesTs/spleen_9.nii"]}
    members.append((_file("Task09_Spleen/dataset.json"), json.dumps(index).encode()))
    members.append((_file("._Task09_Spleen"), b"resource fork"))
    return _tar(members)


def test_acquire_msd_downloads_resumes_extracts_converts_and_is_idempotent(server, tmp_path):
    archive = _msd_task_tar(np.random.default_rng(0))
    server.files["/Task09_Spleen.tar"] = archive
    server.drop_after["/Task09_Spleen.tar"] = len(archive) // 2
    registry_spec = get_dataset("msd_spleen")
    spec = dataclasses.replace(registry_spec, source={
        **registry_spec.source, "url": server.url("/Task09_Spleen.tar"), "md5": _md5(archive)})
    raw = acquire(spec, tmp_path / "raw", tmp_path / "downloads", progress=False)
    assert raw == tmp_path / "raw" / "msd_spleen"
    assert sorted(p.name for p in (raw / "imagesTr").iterdir()) == [
        "spleen_1.nii", "spleen_2.nii", "spleen_3.nii"]  # the ._ resource forks are gone
    index = json.loads((raw / "dataset.json").read_text())
    assert index["numTraining"] == 3 and index["test"] == ["./imagesTs/spleen_9.nii"]
    assert json.loads((raw / ".acquired.json").read_text())["source"]["md5"] == _md5(archive)
    assert server.requests[1][1]["Range"] == f"bytes={len(archive) // 2}-"
    assert server.body_bytes_sent == len(archive)
    assert not (tmp_path / "downloads" / "extracted" / "msd_spleen").exists()
    requests = len(server.requests)
    assert acquire(spec, tmp_path / "raw", tmp_path / "downloads", progress=False) == raw
    assert len(server.requests) == requests  # done: no network, no work


@pytest.mark.parametrize("manual", [False, True])
def test_acquire_btcv_with_a_synapse_token(server, tmp_path, caplog, manual):
    """The token is used also when a manual path is configured but missing (config/paper.yaml
    names one); the archive is then downloaded to that path."""
    rng = np.random.default_rng(1)
    buffer = io.BytesIO()
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    with zipfile.ZipFile(buffer, "w") as zf:
        for number in (1, 2):
            image = rng.integers(-1000, 1000, size=(8, 8, 5)).astype(np.int16)
            label = rng.integers(0, 14, size=(8, 8, 5)).astype(np.uint8)
            zf.writestr(f"RawData/Training/img/img{number:04d}.nii.gz",
                        gzip.compress(_nifti_bytes(image, affine)))
            zf.writestr(f"RawData/Training/label/label{number:04d}.nii.gz",
                        gzip.compress(_nifti_bytes(label, affine)))
    endpoint = _fake_synapse(server, buffer.getvalue(), "tok-xyz")
    caplog.set_level(logging.DEBUG)
    target = tmp_path / "downloads" / ("manual" if manual else "") / "RawData.zip"
    raw = acquire(get_dataset("btcv"), tmp_path / "raw", tmp_path / "downloads", progress=False,
                  manual_paths={"btcv": target} if manual else None,
                  converter_options={"expect_all_cases": False},
                  environ={"SYNAPSE_AUTH_TOKEN": "tok-xyz", "SYNAPSE_REPO_ENDPOINT": endpoint})
    index = json.loads((raw / "dataset.json").read_text())
    assert [e["case"] for e in index["training"]] == ["img0001", "img0002"]
    assert target.is_file()
    assert "tok-xyz" not in caplog.text
    assert "tok-xyz" not in (raw / ".acquired.json").read_text()


def test_acquire_with_a_corrupt_download_publishes_nothing(server, tmp_path):
    archive = _msd_task_tar(np.random.default_rng(2))
    middle = len(archive) // 2
    damaged = archive[:middle] + bytes([archive[middle] ^ 0xFF]) + archive[middle + 1:]
    server.files["/Task09_Spleen.tar"] = damaged  # one byte flipped in transit
    registry_spec = get_dataset("msd_spleen")
    spec = dataclasses.replace(registry_spec, source={
        **registry_spec.source, "url": server.url("/Task09_Spleen.tar"), "md5": _md5(archive)})
    with pytest.raises(DownloadError, match="did not verify"):
        acquire(spec, tmp_path / "raw", tmp_path / "downloads", progress=False)
    assert _leftovers(tmp_path / "downloads") == [] and _leftovers(tmp_path / "raw") == []
