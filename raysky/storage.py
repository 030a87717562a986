"""One way to read and write bytes at a local path or an ``s3://`` URI.

Everything in raysky that touches storage goes through this module, so local folders and S3
behave the same. The S3 endpoint, region and credentials come from the standard AWS
environment variables (``AWS_ENDPOINT_URL``, ``AWS_REGION``, ``AWS_ACCESS_KEY_ID`` ...), which is
how moto, MinIO and real S3 are all reached without code changes.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import random
import re
import time
from functools import lru_cache
from urllib.parse import urlparse

import pyarrow.fs as pafs


def is_s3(uri: str) -> bool:
    """Return True when ``uri`` names an S3 object or prefix (``s3://bucket/key``)."""
    return str(uri).startswith("s3://")


S3_REQUEST_TIMEOUT_S = 60.0
"""How long one S3 request may go without a byte before it fails. The AWS SDK's own default
(3 s) fails a listing page of a large prefix on a busy server, which would end a run that
lists millions of objects; reads and listings are retried after a failure anyway."""


@lru_cache(maxsize=8)
def _s3_filesystem(endpoint: str | None, region: str | None) -> pafs.S3FileSystem:
    kwargs: dict = {"request_timeout": S3_REQUEST_TIMEOUT_S, "connect_timeout": 10.0}
    if endpoint:
        parsed = urlparse(endpoint)
        # pyarrow wants the host:port without the scheme, plus the scheme on its own.
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    kwargs["region"] = region or "us-east-1"
    return pafs.S3FileSystem(**kwargs)


def s3_filesystem() -> pafs.S3FileSystem:
    """Return a pyarrow S3 filesystem configured from the AWS environment variables.

    ``AWS_ENDPOINT_URL_S3`` wins over ``AWS_ENDPOINT_URL``, matching boto3's precedence, so a
    local S3 server such as moto is picked up without any raysky-specific setting.
    """
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    return _s3_filesystem(endpoint, region)


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Split ``uri`` into a pyarrow filesystem and the path that filesystem understands."""
    uri = str(uri)
    if is_s3(uri):
        return s3_filesystem(), uri[len("s3://") :].rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def join(base: str, *parts: str) -> str:
    """Join path segments onto a local path or S3 URI without losing the ``s3://`` scheme."""
    base = str(base)
    if is_s3(base):
        return "s3://" + posixpath.join(base[len("s3://") :].rstrip("/"), *parts)
    return os.path.join(base, *parts)


# Letters and digits (any script), space and punctuation that means nothing to a path, a URI or
# S3: no '/', '\\', ':', control characters or wildcards.
_SAFE_COMPONENT = re.compile(r"[\w .\-+=@,()~#&!%]+")
MAX_NAME_CHARS = 200
"""Longest name component; leaves room for suffixes under the usual 255-byte file name limit."""


def name_problem(name: str, nested: bool = True) -> str | None:
    """Why ``name`` is not a safe relative file name, or None when it is.

    A safe name is one or more components joined by ``/`` (one only, when ``nested`` is False),
    each made of letters, digits, spaces and ``._-+=@,()~#&!%``, none empty and none starting
    with ``.``. Such a name, joined onto any base, stays inside that base: no absolute paths,
    no ``..``, no hidden files, nothing that a shell, a URI or S3 would read differently.
    """
    if not isinstance(name, str) or not name:
        return "is empty"
    parts = name.split("/")
    if not nested and len(parts) > 1:
        return "contains '/'"
    for part in parts:
        if not part:
            return "has an empty path component (a leading, trailing or double '/')"
        if part.startswith("."):
            return "has a component that starts with '.' ('.', '..' or a hidden name)"
        if len(part) > MAX_NAME_CHARS:
            return f"has a component longer than {MAX_NAME_CHARS} characters"
        if not _SAFE_COMPONENT.fullmatch(part):
            bad = sorted({c for c in part if not _SAFE_COMPONENT.fullmatch(c)})
            return f"has characters that are not allowed in a file name ({''.join(bad)!r})"
    return None


def check_name(name: str, what: str = "name", nested: bool = True) -> str:
    """Return ``name`` when :func:`name_problem` finds nothing, else raise ``ValueError``."""
    problem = name_problem(name, nested)
    if problem:
        raise ValueError(f"unsafe {what} {name!r}: it {problem}")
    return name


def safe_join(base: str, name: str, suffix: str = "", what: str = "name") -> str:
    """``join(base, name + suffix)`` for a ``name`` checked with :func:`check_name`.

    This is the one way raysky turns data (image ids, run names) into paths, so a crafted id
    can never write outside ``base`` (or, on S3, into another bucket).
    """
    check_name(name, what)
    path = join(base, name + suffix)
    # Belt and braces: the checked name cannot climb out, and the normalised path proves it.
    _fs, root = resolve(base)
    _fs, target = resolve(path)
    if posixpath.commonpath([root, posixpath.normpath(target)]) != root:
        raise ValueError(f"unsafe {what} {name!r}: {path} is outside {base}")
    return path


def exists(uri: str) -> bool:
    """Return True when a file or directory exists at ``uri``."""
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    """Return True when ``uri`` is a directory (or a non-empty S3 prefix)."""
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        return True
    if is_s3(uri) and info.type == pafs.FileType.NotFound:
        return bool(list_files(uri, limit=1))
    return False


READ_ATTEMPTS = 4
"""Tries per object read before an ``OSError`` is given up as transient (S3 throttling, a
timeout, a dropped connection)."""
READ_BACKOFF_S = 0.25
"""First wait between tries; it doubles each time, with jitter (0.25 s, 0.5 s, 1 s)."""
# Another try cannot make these readable.
_PERMANENT = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def read_bytes(uri: str, limit: int | None = None, attempts: int = READ_ATTEMPTS) -> bytes:
    """Read a whole object, or at most ``limit + 1`` bytes of it when ``limit`` is given.

    An absent object raises ``FileNotFoundError`` naming ``uri`` at once; any other
    ``OSError`` is retried, up to ``attempts`` tries in all with jittered exponential backoff,
    and raised when the last try fails too. Every raysky read of data (images, masks, CSVs,
    checkpoints) comes through here, so a throttled bucket slows a job instead of failing it.
    """
    fs, path = resolve(uri)
    for attempt in range(attempts):
        try:
            with fs.open_input_stream(path) as stream:
                return stream.read() if limit is None else stream.read(limit + 1)
        except _PERMANENT as exc:
            if isinstance(exc, FileNotFoundError):
                raise FileNotFoundError(f"{uri}: no such file or object") from exc
            raise
        except OSError as exc:
            # S3 reports a missing key as a plain OSError: ask once whether the object exists.
            missing = False
            with contextlib.suppress(OSError):
                missing = fs.get_file_info(path).type == pafs.FileType.NotFound
            if missing:
                raise FileNotFoundError(f"{uri}: no such file or object") from exc
            if attempt + 1 >= attempts:
                raise
            # Jitter keeps the readers that were throttled together from retrying together.
            time.sleep(READ_BACKOFF_S * 2 ** attempt * random.uniform(0.5, 1.5))
    raise AssertionError("unreachable: the last attempt returns or raises")


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri``, creating parent directories for local paths."""
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with fs.open_output_stream(path) as stream:
        stream.write(data)


def upload_directory(local_dir: str, uri: str) -> int:
    """Copy every file under the local folder ``local_dir`` to the prefix ``uri``; returns the
    file count.

    A folder that does not exist, is not a folder or holds no file is an error naming it:
    copying nothing would only move the failure to whatever reads ``uri`` next, where the
    message could no longer say which folder was wrong.
    """
    if not os.path.exists(local_dir):
        raise FileNotFoundError(f"{local_dir}: no such folder")
    if not os.path.isdir(local_dir):
        raise NotADirectoryError(f"{local_dir}: not a folder")
    count = 0
    for root, _dirs, files in os.walk(local_dir):
        for name in sorted(files):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, local_dir).replace(os.sep, "/")
            with open(path, "rb") as handle:
                write_bytes(join(uri, rel), handle.read())
            count += 1
    if not count:
        raise FileNotFoundError(f"{local_dir}: the folder holds no file to upload")
    return count


def makedirs(uri: str) -> None:
    """Create a directory (a no-op for S3, where prefixes need no creation)."""
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(path, exist_ok=True)


def list_files(uri: str, suffixes: tuple[str, ...] | None = None, limit: int | None = None,
               attempts: int = READ_ATTEMPTS) -> list[str]:
    """List files under ``uri`` recursively, as URIs of the same kind, sorted by name.

    ``suffixes`` filters by case-insensitive extension (for example ``(".jpg", ".png")``). A
    listing that fails with an ``OSError`` (a timeout, throttling) is tried again, up to
    ``attempts`` tries with backoff, as reads are.
    """
    fs, path = resolve(uri)
    selector = pafs.FileSelector(path, recursive=True, allow_not_found=True)
    for attempt in range(attempts):
        try:
            infos = fs.get_file_info(selector)
            break
        except _PERMANENT:
            raise
        except OSError:
            if attempt + 1 >= attempts:
                raise
            time.sleep(READ_BACKOFF_S * 2 ** attempt * random.uniform(0.5, 1.5))
    out: list[str] = []
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        if suffixes and not info.path.lower().endswith(suffixes):
            continue
        out.append(("s3://" + info.path) if is_s3(uri) else info.path)
    del infos  # a FileInfo per object: let it go before the caller builds on the list
    out.sort()
    return out[:limit] if limit is not None else out


def delete(uri: str) -> None:
    """Delete a file or a whole directory/prefix; missing targets are ignored."""
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        fs.delete_file(path)
    elif info.type == pafs.FileType.Directory or is_s3(uri):
        with contextlib.suppress(FileNotFoundError, OSError):
            fs.delete_dir(path)
