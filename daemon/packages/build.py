"""``plugin-daemon package DIR``: a plugin folder as a ``.difypkg``.

Files are taken as upstream's packager takes them: every regular file under the folder except
what ``.difyignore`` (or, without one, ``.gitignore``) excludes, in gitignore syntax; a
plugin's virtualenv and bytecode (``.venv``, ``__pycache__``, ``*.pyc``) are never packed. A
symbolic link is refused rather than followed. The archive is deterministic (sorted names,
fixed timestamps), so the same folder always gives the same bytes, and it is decoded again
before it is written, so a folder the daemon would refuse is never packaged.
"""

from __future__ import annotations

import io
import os
import stat
import tempfile
import zipfile
from pathlib import Path

import pathspec

from daemon.packages.archive import Limits, PackageError
from daemon.packages.decode import Decoded, decode_into

ALWAYS_EXCLUDED = (".venv/", "__pycache__/", "*.pyc", ".git/", ".DS_Store")
_EPOCH = (1980, 1, 1, 0, 0, 0)


def _rules(root: Path) -> pathspec.GitIgnoreSpec:
    lines = list(ALWAYS_EXCLUDED)
    for name in (".difyignore", ".gitignore"):
        path = root / name
        if path.is_file() and not path.is_symlink():
            lines += path.read_text(encoding="utf-8", errors="replace").splitlines()
            break
    return pathspec.GitIgnoreSpec.from_lines(lines)


def files(root: Path) -> list[str]:
    """The ``/``-separated paths packed from ``root``, sorted."""
    rules = _rules(root)
    found: list[str] = []
    for folder, dirs, names in os.walk(root):
        here = Path(folder).relative_to(root).as_posix()
        prefix = "" if here == "." else f"{here}/"
        kept = []
        for name in sorted(dirs):
            if rules.match_file(f"{prefix}{name}/"):
                continue
            if os.path.islink(Path(folder, name)):
                raise PackageError(
                    f"refused: {prefix}{name} is a symbolic link; packages hold regular files only"
                )
            kept.append(name)
        dirs[:] = kept
        for name in names:
            relative = f"{prefix}{name}"
            if rules.match_file(relative):
                continue
            mode = os.lstat(Path(folder, name)).st_mode
            if stat.S_ISLNK(mode):
                raise PackageError(
                    f"refused: {relative} is a symbolic link; packages hold regular files only"
                )
            if not stat.S_ISREG(mode):
                raise PackageError(f"refused: {relative} is not a regular file")
            found.append(relative)
    return sorted(found)


def pack(root: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in files(root):
            info = zipfile.ZipInfo(name, _EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            archive.writestr(info, (root / name).read_bytes())
    return buffer.getvalue()


def build(root: Path, out: Path | None = None, limits: Limits | None = None) -> tuple[Path, Decoded]:
    """Package ``root`` into ``out`` (default ``<name>-<version>.difypkg`` beside it)."""
    root = root.resolve()
    if not (root / "manifest.yaml").is_file():
        raise PackageError(f"{root} has no manifest.yaml: not a plugin folder")
    data = pack(root)
    with tempfile.TemporaryDirectory() as scratch:
        decoded = decode_into(io.BytesIO(data), Path(scratch) / "plugin", limits or Limits())
    if out is None:
        manifest = decoded.manifest
        out = root.parent / f"{manifest['name']}-{manifest['version']}.difypkg"
    partial = out.with_name(f".{out.name}.partial")
    partial.write_bytes(data)
    partial.replace(out)
    return out, decoded
