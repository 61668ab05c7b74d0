"""Decoding a package end to end, and the store of decoded packages in the state directory.

A package is extracted into a scratch folder, its plugin loaded by :func:`daemon.manifest.load_plugin`
(the same checks as a plugin folder placed by hand), and, once every check has passed, the
package, its extracted folder and its declaration are moved under
``<state dir>/packages/<author>/<name>/<version>@<checksum>`` together.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from daemon.manifest import ManifestError, load_plugin
from daemon.packages import archive, declaration
from daemon.packages.archive import Limits, PackageError
from daemon.packages.signature import Signature, refusal, trusted_keys, verify


@dataclass(frozen=True)
class Decoded:
    identifier: str
    manifest: dict[str, Any]  # upstream's declaration, ``verified`` included
    readmes: dict[str, str]
    signature: Signature


def decode_into(
    source: IO[bytes] | Path, folder: Path, limits: Limits, keys: Sequence[RSAPublicKey] | None = None
) -> Decoded:
    """Check and extract ``source`` into ``folder`` (new, empty); what it declares. Its signature
    is checked against ``keys`` (default: the official key only)."""
    with archive.open_zip(source, limits) as zipped:
        found = archive.entries(zipped, limits)
        hashes = archive.extract(zipped, found, folder, limits)
        folders = len(found) < len(zipped.infolist())
        comment = zipped.comment
    checksum = archive.checksum(hashes)
    trusted = trusted_keys() if keys is None else keys
    signature = verify(comment, hashes, folders=folders, extracted=folder, keys=trusted)
    if not (folder / "manifest.yaml").is_file():
        raise PackageError("refused: the package has no manifest.yaml at its top level")
    try:
        load_plugin(folder)
        manifest = declaration.declaration(folder)
        readmes = declaration.readmes(folder)
    except ManifestError as exc:
        raise PackageError(f"bad manifest: {_relative(str(exc), folder)}") from None
    manifest["verified"] = signature.verified
    return Decoded(declaration.identity(manifest, checksum), manifest, readmes, signature)


def _relative(message: str, folder: Path) -> str:
    """Errors name files inside the package, never the scratch folder they were read from."""
    return message.replace(f"{folder.resolve()}/", "").replace(f"{folder}/", "")


class PackageStore:
    """Decoded packages by unique identifier, under ``root`` (``<state dir>/packages``)."""

    def __init__(self, root: Path, limits: Limits, keys: Sequence[RSAPublicKey] | None = None) -> None:
        self.root = root
        self.limits = limits
        self.keys = keys  # trusted signature keys; None: the official key only
        # Scratch folders of uploads a previous run was stopped in the middle of.
        for stale in root.glob(".upload-*") if root.is_dir() else []:
            shutil.rmtree(stale, ignore_errors=True)

    def place(self, identifier: str) -> Path:
        if not declaration.IDENTIFIER.match(identifier):
            raise PackageError(f"invalid plugin unique identifier {identifier!r}")
        plugin_id, _, rest = identifier.partition(":")
        return self.root.joinpath(*plugin_id.split("/"), rest)

    def add(self, upload: IO[bytes], *, forced: bool, requested: bool = False) -> Decoded:
        """Decode ``upload`` and keep it unless the signature policy refuses it (``forced``:
        FORCE_VERIFYING_SIGNATURE; ``requested``: the caller's ``verify_signature``)."""
        self.root.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".upload-", dir=self.root))
        try:
            decoded = decode_into(upload, scratch / "plugin", self.limits, self.keys)
            refused = refusal(decoded.signature, forced=forced, requested=requested)
            if refused is not None:
                raise PackageError(refused)
            place = self.place(decoded.identifier)
            if (place / "declaration.json").is_file():
                return decoded
            upload.seek(0)
            with open(scratch / "package.difypkg", "wb") as out:
                shutil.copyfileobj(upload, out)
            _write_json(scratch / "declaration.json", _record(decoded))
            place.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(OSError):  # a concurrent upload of the same package won
                os.rename(scratch, place)
                scratch = None  # type: ignore[assignment]
            return decoded
        finally:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)

    def get(self, identifier: str) -> Decoded | None:
        try:
            record = json.loads((self.place(identifier) / "declaration.json").read_text())
        except (OSError, ValueError):
            return None
        return Decoded(
            record["unique_identifier"],
            record["manifest"],
            record["readmes"],
            Signature(**record["signature"]),
        )


def _record(decoded: Decoded) -> dict[str, Any]:
    return {
        "unique_identifier": decoded.identifier,
        "manifest": decoded.manifest,
        "readmes": decoded.readmes,
        "signature": decoded.signature.__dict__,
    }


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False))
