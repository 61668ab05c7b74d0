"""Reading a ``.difypkg``: a zip of a plugin folder, untrusted, checked before a byte is written.

Every entry is checked from the central directory first (count, names, types, declared
sizes, compression ratio), then extracted into a fresh directory with the sizes enforced
again on the bytes actually inflated (a header can lie; :mod:`zipfile` stops at the declared
size and checks the CRC). The checksum is upstream's (``CalculateChecksum`` in
langgenius/dify-plugin-daemon ``pkg/plugin_packager/decoder``): sha256 over, for every file
in name order, sha256 of its path then sha256 of its bytes; hex.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import stat
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO

# A file's type lives in the high 16 bits of ``external_attr`` when made on a Unix system.
_TYPE_SHIFT = 16
_CHUNK = 64 * 1024
# What any filesystem takes: a name of 255 bytes; a whole path well inside PATH_MAX (4096) once
# below the folder it is extracted into.
_NAME_BYTES = 255
_PATH_BYTES = 1024


class PackageError(ValueError):
    """A package the daemon refuses; the message says what is wrong with it."""


@dataclass(frozen=True)
class Limits:
    """What a package may hold. ``package_bytes`` is upstream's ``MAX_PLUGIN_PACKAGE_SIZE``."""

    package_bytes: int = 50 * 1024 * 1024
    unpacked_bytes: int = 50 * 1024 * 1024  # upstream checks the uncompressed total against the same limit
    file_bytes: int = 20 * 1024 * 1024
    files: int = 10_000
    ratio: int = 200  # uncompressed / compressed, for entries large enough to matter
    ratio_floor: int = 1024 * 1024  # entries smaller than this are not ratio-checked


@dataclass(frozen=True)
class Entry:
    name: str  # normalised, relative, ``/``-separated
    info: zipfile.ZipInfo


def _clean(raw: str) -> str:
    """The entry's path inside the plugin folder, or a refusal if it could leave it."""
    if not raw or "\\" in raw or "\x00" in raw:
        raise PackageError(f"refused: unsafe path {raw!r} in the package")
    if raw.startswith("/") or (len(raw) > 1 and raw[1] == ":"):
        raise PackageError(f"refused: absolute path {raw!r} in the package")
    if ".." in raw.split("/"):
        raise PackageError(f"refused: path {raw!r} leads outside the plugin folder")
    name = posixpath.normpath(raw)
    if name in (".", "") or name.startswith("../"):
        raise PackageError(f"refused: unsafe path {raw!r} in the package")
    encoded = name.encode(errors="surrogateescape")
    if len(encoded) > _PATH_BYTES or any(len(part) > _NAME_BYTES for part in encoded.split(b"/")):
        raise PackageError(
            f"refused: path too long in the package ({raw[:80]!r}...): at most {_NAME_BYTES} bytes"
            f" a name and {_PATH_BYTES} in all"
        )
    return name


def _check_type(info: zipfile.ZipInfo, name: str) -> None:
    mode = info.external_attr >> _TYPE_SHIFT
    kind = stat.S_IFMT(mode)
    if kind == stat.S_IFLNK:
        raise PackageError(f"refused: {name} is a symbolic link")
    if kind == stat.S_IFDIR and not info.is_dir():
        raise PackageError(f"refused: {name} is a folder entry without a trailing '/'")
    if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
        raise PackageError(f"refused: {name} is not a regular file or directory")
    if info.flag_bits & 0x1:
        raise PackageError(f"refused: {name} is encrypted")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise PackageError(
            f"refused: {name} uses compression method {info.compress_type} (stored or deflate only)"
        )


def entries(archive: zipfile.ZipFile, limits: Limits) -> list[Entry]:
    """The package's entries, each checked against ``limits`` from what the zip declares."""
    infos = archive.infolist()
    if len(infos) > limits.files:
        raise PackageError(f"refused: {len(infos)} entries, more than {limits.files}")
    seen: set[str] = set()
    found: list[Entry] = []
    total = 0
    for info in infos:
        name = _clean(info.filename)
        if name in seen:
            raise PackageError(f"refused: {name} appears more than once in the package")
        seen.add(name)
        _check_type(info, name)
        if info.is_dir():
            continue
        if info.file_size > limits.file_bytes:
            raise PackageError(
                f"refused: {name} unpacks to {info.file_size} bytes, more than {limits.file_bytes}"
            )
        total += info.file_size
        if total > limits.unpacked_bytes:
            raise PackageError(f"refused: the package unpacks to more than {limits.unpacked_bytes} bytes")
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size >= limits.ratio_floor and ratio > limits.ratio:
            raise PackageError(f"refused: {name} is compressed {ratio:.0f}:1, more than {limits.ratio}:1")
        found.append(Entry(name, info))
    # A file and a folder of the same name cannot both exist once extracted.
    files = {entry.name for entry in found}
    for entry in found:
        parent = posixpath.dirname(entry.name)
        while parent:
            if parent in files:
                raise PackageError(f"refused: {parent} is both a file and a folder in the package")
            parent = posixpath.dirname(parent)
    return found


def open_zip(source: IO[bytes] | Path, limits: Limits) -> zipfile.ZipFile:
    if isinstance(source, Path):
        size = source.stat().st_size
    else:
        source.seek(0, os.SEEK_END)
        size = source.tell()
        source.seek(0)
    if size > limits.package_bytes:
        raise PackageError(f"refused: the package is {size} bytes, more than {limits.package_bytes}")
    try:
        return zipfile.ZipFile(source)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError) as exc:
        raise PackageError(f"not a difypkg (zip) file: {exc}") from None


def extract(archive: zipfile.ZipFile, found: list[Entry], dest: Path, limits: Limits) -> dict[str, bytes]:
    """Write every file under ``dest`` (which must be new and empty); each file's sha256 by name,
    in archive order (what :func:`checksum` and the signature are computed from)."""
    hashes: dict[str, bytes] = {}
    written = 0
    for entry in found:
        target = dest.joinpath(*entry.name.split("/"))
        digest = hashlib.sha256()
        size = 0
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            raise PackageError(f"refused: {entry.name} cannot be extracted ({exc.strerror})") from None
        try:
            with os.fdopen(fd, "wb") as out, archive.open(entry.info) as stream:
                while chunk := stream.read(_CHUNK):
                    size += len(chunk)
                    written += len(chunk)
                    if size > limits.file_bytes or written > limits.unpacked_bytes:
                        raise PackageError(f"refused: {entry.name} unpacks to more than its limit")
                    digest.update(chunk)
                    out.write(chunk)
        except PackageError:
            raise
        except (zipfile.BadZipFile, EOFError, OSError, RuntimeError, ValueError) as exc:
            raise PackageError(f"refused: {entry.name} is corrupt ({exc})") from None
        except zlib.error as exc:
            raise PackageError(f"refused: {entry.name} is corrupt ({exc})") from None
        hashes[entry.name] = digest.digest()
    return hashes


def checksum(hashes: dict[str, bytes]) -> str:
    """Upstream's package checksum from each file's sha256, keyed by its path."""
    total = hashlib.sha256()
    for name in sorted(hashes):
        total.update(hashlib.sha256(name.encode()).digest())
        total.update(hashes[name])
    return total.hexdigest()
