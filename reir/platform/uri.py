"""Reading by URI: the one way ingestion, the localize stage and the image route read bytes.

A gallery entry's ``uri`` is a local path, ``file://``, ``http(s)://`` or any URI a pyarrow
filesystem understands (``s3://``, ``gs://``, ``hdfs://``), so encoder actors and Serve
replicas can run on any node of a Ray cluster: nothing assumes the files sit on a disk that
node shares. Every read has a size cap, and http(s) reads a total deadline, so one huge or
stalled image costs one failed item, never a hung actor or an exhausted replica.
"""

from __future__ import annotations

import http.client
import posixpath
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

DEFAULT_TIMEOUT_S = 30.0
DEFAULT_MAX_BYTES = 64 << 20  # far above any gallery photo, far below what hurts a worker's memory
HTTP_SCHEMES = frozenset({"http", "https"})
_CHUNK = 1 << 16


class UriReadError(OSError):
    """A URI could not be read: refused, missing, over the size cap, too slow, or an unknown scheme."""


def scheme_of(uri: str) -> str:
    """The lower-case scheme (``""`` for a plain local path)."""
    head, sep, _ = uri.partition("://")
    return head.lower() if sep and head.isascii() and head.replace("+", "").isalnum() else ""


def is_local(uri: str) -> bool:
    return scheme_of(uri) in ("", "file")


def read_uri(uri: str, *, timeout_s: float = DEFAULT_TIMEOUT_S, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The bytes behind ``uri``; :class:`UriReadError` says why not (a missing local file
    keeps its own ``FileNotFoundError``, which dead-letter records name)."""
    scheme = scheme_of(uri)
    if scheme in ("", "file"):
        path = Path(uri[len("file://") :] if scheme else uri)
        if path.stat().st_size > max_bytes:
            raise UriReadError(f"{uri}: {path.stat().st_size} bytes is over the limit of {max_bytes}")
        return path.read_bytes()
    if scheme in HTTP_SCHEMES:
        return _read_http(uri, timeout_s, max_bytes)
    return _read_filesystem(uri, max_bytes)


def _read_http(uri: str, timeout_s: float, max_bytes: int) -> bytes:
    """GET with a total deadline (urllib's timeout is per socket call, so a server that drips
    bytes would otherwise hold the reader forever) and the size cap checked as bytes arrive."""
    deadline = time.monotonic() + timeout_s
    request = urllib.request.Request(uri, headers={"User-Agent": "reir", "Accept": "image/*,*/*"})
    chunks: list[bytes] = []
    size = 0
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise UriReadError(f"{uri}: {declared} bytes is over the limit of {max_bytes}")
            while chunk := response.read1(_CHUNK):  # what has arrived, so the deadline is checked
                size += len(chunk)
                if size > max_bytes:
                    raise UriReadError(f"{uri}: more than the limit of {max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise UriReadError(f"{uri}: not read within {timeout_s:g} s")
                chunks.append(chunk)
    except urllib.error.HTTPError as exc:
        raise UriReadError(f"{uri}: HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        raise UriReadError(f"{uri}: {exc.reason}") from exc
    except (TimeoutError, http.client.HTTPException, ConnectionError) as exc:
        raise UriReadError(f"{uri}: {type(exc).__name__}: {exc}") from exc
    return b"".join(chunks)


def _read_filesystem(uri: str, max_bytes: int) -> bytes:
    """Through pyarrow (its S3/GCS clients bring their own retries and timeouts)."""
    fs, path = filesystem_for(uri)
    try:
        info = fs.get_file_info(path)
        if info.size is not None and info.size > max_bytes:
            raise UriReadError(f"{uri}: {info.size} bytes is over the limit of {max_bytes}")
        with fs.open_input_stream(path) as stream:
            data = bytes(stream.read(max_bytes + 1))
    except UriReadError:
        raise
    except (OSError, ValueError) as exc:  # pyarrow's errors are OSError / ArrowInvalid (a ValueError)
        raise UriReadError(f"{uri}: {exc}") from exc
    if len(data) > max_bytes:
        raise UriReadError(f"{uri}: more than the limit of {max_bytes} bytes")
    return data


def filesystem_for(uri: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[Any, str]:
    """(pyarrow filesystem, path in it) for a local path or URI; http(s) goes through fsspec's
    HTTP filesystem (a Ray Data dependency), so manifests may be fetched from a web server too."""
    from pyarrow import fs

    scheme = scheme_of(uri)
    if scheme in HTTP_SCHEMES:
        import aiohttp
        from fsspec.implementations.http import HTTPFileSystem

        client = {"timeout": aiohttp.ClientTimeout(total=timeout_s)}
        return fs.PyFileSystem(fs.FSSpecHandler(HTTPFileSystem(client_kwargs=client))), uri
    if scheme == "":
        return fs.LocalFileSystem(), str(Path(uri).resolve())
    try:
        return fs.FileSystem.from_uri(uri)
    except (OSError, ValueError) as exc:
        raise UriReadError(f"{uri}: no filesystem for scheme {scheme!r}: {exc}") from exc


def join_uri(base_uri: str, relative: str) -> str:
    """Resolve an entry of a listing file (manifest, annotations) against the listing's directory."""
    if scheme_of(relative) or relative.startswith("/"):
        return relative
    scheme = scheme_of(base_uri)
    if scheme in HTTP_SCHEMES:
        return urllib.parse.urljoin(base_uri, relative)
    if scheme:
        rest = base_uri.split("://", 1)[1]
        return f"{base_uri.split('://', 1)[0]}://{posixpath.join(posixpath.dirname(rest), relative)}"
    return str((Path(base_uri).resolve().parent / relative).resolve())
