"""``plugin-daemon package DIR``: a plugin folder as a ``.difypkg``.

Files are taken as upstream's packager takes them: every regular file under the folder except
what ``.difyignore`` (or, without one, ``.gitignore``) excludes, in gitignore syntax; a
plugin's virtualenv and bytecode (``.venv``, ``__pycache__``, ``*.pyc``) are never packed. A
symbolic link is refused rather than followed. The archive is deterministic (sorted names,
fixed timestamps), so the same folder always gives the same bytes, and it is decoded again
before it is written, so a folder the daemon would refuse is never packaged.

Signed (``--sign KEY.pem``), the package is what upstream's signer makes: the files, then a
fresh ``.verification.dify.json`` with the authorized category as the last entry (one in the
folder is left out), and the signature over them all in the zip comment.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tempfile
import time
import zipfile
from pathlib import Path

import pathspec
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

from daemon.packages.archive import Limits, PackageError
from daemon.packages.decode import Decoded, decode_into
from daemon.packages.signature import VERIFICATION_FILE, claim_bytes, sign, trusted_keys

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


def pack(root: Path, key: RSAPrivateKey | None = None, category: str = "community") -> bytes:
    """The package's bytes; signed with ``key``, claiming ``category``, when one is given."""
    contents = [(name, (root / name).read_bytes()) for name in files(root)]
    if key is not None:
        contents = [(name, data) for name, data in contents if name != VERIFICATION_FILE]
        contents.append((VERIFICATION_FILE, claim_bytes(category)))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in contents:
            info = zipfile.ZipInfo(name, _EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            archive.writestr(info, data)
        if key is not None:
            digests = (hashlib.sha256(data).digest() for _, data in contents)
            archive.comment = sign(key, digests, int(time.time()))
    return buffer.getvalue()


def build(
    root: Path,
    out: Path | None = None,
    limits: Limits | None = None,
    *,
    key: RSAPrivateKey | None = None,
    category: str = "community",
) -> tuple[Path, Decoded]:
    """Package ``root`` into ``out`` (default ``<name>-<version>.difypkg`` beside it), signed
    with ``key`` if given (and then checked to verify under its public key)."""
    root = root.resolve()
    if not (root / "manifest.yaml").is_file():
        raise PackageError(f"{root} has no manifest.yaml: not a plugin folder")
    data = pack(root, key, category)
    keys = (*trusted_keys(), key.public_key()) if key is not None else None
    with tempfile.TemporaryDirectory() as scratch:
        decoded = decode_into(io.BytesIO(data), Path(scratch) / "plugin", limits or Limits(), keys)
    if key is not None and not decoded.signature.verified:
        raise PackageError(f"the signed package does not verify: it {decoded.signature.problem}")
    if out is None:
        manifest = decoded.manifest
        out = root.parent / f"{manifest['name']}-{manifest['version']}.difypkg"
    partial = out.with_name(f".{out.name}.partial")
    partial.write_bytes(data)
    partial.replace(out)
    return out, decoded
