"""Decoding a package end to end, and the store of decoded packages in the database.

A package is extracted into a scratch folder, its plugin loaded by :func:`daemon.manifest.load_plugin`
(the same checks as a plugin folder placed by hand), and, once every check has passed, its bytes,
its declaration and its READMEs are kept in the database under its unique identifier; the scratch
folder is removed. A daemon that runs the plugin extracts it again from those bytes
(:mod:`daemon.installs.runtimes`).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from daemon.installs import store
from daemon.management import listing
from daemon.manifest import ManifestError, load_plugin
from daemon.packages import archive, declaration
from daemon.packages.archive import Limits, PackageError
from daemon.packages.signature import Signature, refusal, trusted_keys, verify

if TYPE_CHECKING:
    from daemon.state import Database


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


def place_of(root: Path, identifier: str) -> Path:
    """``<root>/<author>/<name>/<version>@<checksum>``: where one package's files go below ``root``."""
    if not declaration.IDENTIFIER.match(identifier):
        raise PackageError(f"invalid plugin unique identifier {identifier!r}")
    plugin_id, _, rest = identifier.partition(":")
    return root.joinpath(*plugin_id.split("/"), rest)


class PackageStore:
    """Uploaded packages, kept in the database by unique identifier: the bytes (so any daemon on
    the database can install them), what Dify reads of them and the declaration the listings
    send. ``scratch`` (``<state dir>/packages``) only holds uploads being decoded."""

    CACHED = 64  # decoded packages kept in memory (they never change: an identifier is a checksum)

    def __init__(
        self,
        scratch: Path,
        limits: Limits,
        database: Database,
        keys: Sequence[RSAPublicKey] | None = None,
    ) -> None:
        self.scratch = scratch
        self.limits = limits
        self.database = database
        self.keys = keys  # trusted signature keys; None: the official key only
        self._cache: dict[str, Decoded] = {}
        # Scratch folders of uploads a previous run was stopped in the middle of.
        for stale in scratch.glob(".upload-*") if scratch.is_dir() else []:
            shutil.rmtree(stale, ignore_errors=True)

    def add(self, upload: IO[bytes], *, forced: bool, requested: bool = False) -> Decoded:
        """Decode ``upload`` and keep it unless the signature policy refuses it (``forced``:
        FORCE_VERIFYING_SIGNATURE; ``requested``: the caller's ``verify_signature``). Blocks:
        call it from a worker thread."""
        self.scratch.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=".upload-", dir=self.scratch))
        try:
            decoded = decode_into(upload, folder / "plugin", self.limits, self.keys)
            refused = refusal(decoded.signature, forced=forced, requested=requested)
            if refused is not None:
                raise PackageError(refused)
            listed = listing(folder / "plugin")
            upload.seek(0)
            data = upload.read()
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        record = _record(decoded)
        self.database.transaction(lambda c: store.keep_package(c, decoded.identifier, data, record, listed))
        return decoded

    async def get(self, identifier: str) -> Decoded | None:
        found = self._cache.get(identifier)
        if found is None:
            record = await self.database.run(lambda c: store.package_decoded(c, identifier))
            if record is None:
                return None
            found = Decoded(
                record["unique_identifier"],
                record["manifest"],
                record["readmes"],
                Signature(**record["signature"]),
            )
            if len(self._cache) >= self.CACHED:
                self._cache.pop(next(iter(self._cache)))
            self._cache[identifier] = found
        return found


def _record(decoded: Decoded) -> dict[str, Any]:
    return {
        "unique_identifier": decoded.identifier,
        "manifest": decoded.manifest,
        "readmes": decoded.readmes,
        "signature": decoded.signature.__dict__,
    }
