"""A package's signature, checked as Dify's own daemon checks it, and the policy that keeps or
refuses a package by it.

The signed bytes are, for every file in the order of the zip's central directory, the sha256 of
its contents, followed by the signing time as a decimal string; the signature is RSA PKCS#1 v1.5
over their sha256. The zip comment carries ``{"signature": base64, "time": unix seconds}``.
``.verification.dify.json`` (``{"authorized_category": ...}``) is an ordinary file among the
signed ones, so its claim is only believed once the signature holds. File names are not signed
(the package checksum, which is, covers them); that is upstream's format, kept so that packages
signed for Dify verify here and packages signed here have the form Dify checks.

Trusted keys: Dify's official key (``keys/langgenius.public.pem``), plus the operator's when
``THIRD_PARTY_SIGNATURE_VERIFICATION_ENABLED`` is true. Verification costs one pass over the
files, which extraction makes anyway (and which the archive limits bound), and one RSA check per
trusted key.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

VERIFICATION_FILE = ".verification.dify.json"
CATEGORIES = ("langgenius", "partner", "community")
DEFAULT_CATEGORY = "langgenius"  # what upstream reports for a verified package without a claim
OFFICIAL_KEY_FILE = Path(__file__).with_name("keys") / "langgenius.public.pem"
_INT64 = 2**63


class KeyFileError(ValueError):
    """A key file the daemon cannot use; the message names the file and says why."""


@dataclass(frozen=True)
class Signature:
    signed: bool  # the zip comment carries a signature
    verified: bool  # it holds for the package's files under a trusted key
    authorized_category: str | None = None  # upstream's ``verification``, once verified
    problem: str | None = None  # why it is not verified


def _load(path: Path, kind: str, load: Callable[[bytes], object]) -> Any:
    """The RSA key of ``kind`` ("public" or "private") in the PEM file at ``path``."""
    try:
        key = load(path.read_bytes())
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read the {kind} key ({exc.strerror})") from None
    except TypeError:  # a password is needed
        raise KeyFileError(f"{path}: the {kind} key is encrypted; give an unencrypted one") from None
    except (ValueError, UnsupportedAlgorithm):
        raise KeyFileError(f"{path}: not a PEM {kind} key") from None
    if not isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey):
        raise KeyFileError(f"{path}: not an RSA key (package signatures are RSA)")
    return key


def load_public_key(path: Path) -> rsa.RSAPublicKey:
    """An RSA public key from a PEM file: PKCS#1 (``RSA PUBLIC KEY``, what upstream's tools
    write) or SubjectPublicKeyInfo (``PUBLIC KEY``, what ``openssl rsa -pubout`` writes)."""
    return _load(path, "public", serialization.load_pem_public_key)


def load_private_key(path: Path) -> rsa.RSAPrivateKey:
    """An unencrypted RSA private key from a PEM file (PKCS#1 or PKCS#8)."""
    return _load(path, "private", lambda data: serialization.load_pem_private_key(data, password=None))


@functools.cache
def official_key() -> rsa.RSAPublicKey:
    return load_public_key(OFFICIAL_KEY_FILE)


def trusted_keys(operator_key_files: Sequence[Path] = ()) -> tuple[rsa.RSAPublicKey, ...]:
    """The official key, then the operator's (read now, so a bad file fails at start-up)."""
    return (official_key(), *(load_public_key(path) for path in operator_key_files))


def key_files(setting: str) -> list[Path]:
    """``THIRD_PARTY_SIGNATURE_VERIFICATION_PUBLIC_KEYS``: comma-separated paths, spaces trimmed."""
    return [Path(part.strip()) for part in setting.split(",") if part.strip()]


def signed_bytes(file_hashes: Iterable[bytes], time: int) -> bytes:
    return b"".join(file_hashes) + str(time).encode()


def sign(key: rsa.RSAPrivateKey, file_hashes: Iterable[bytes], time: int) -> bytes:
    """The zip comment that signs files of these sha256 digests (in archive order) at ``time``."""
    raw = key.sign(signed_bytes(file_hashes, time), padding.PKCS1v15(), hashes.SHA256())
    return json.dumps(
        {"signature": base64.b64encode(raw).decode(), "time": time}, separators=(",", ":")
    ).encode()


def claim_bytes(category: str) -> bytes:
    """The contents of ``.verification.dify.json`` claiming ``category``."""
    return json.dumps({"authorized_category": category}, separators=(",", ":")).encode()


def _comment(comment: bytes) -> tuple[bytes, int] | str:
    """The signature and signing time from a zip comment, or why there is none."""
    try:
        found = json.loads(comment) if comment else None
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser goes
        found = None
    if not isinstance(found, dict):
        return "is not signed"
    # Upstream reads the comment with Go's JSON decoding, which matches field names in any case.
    fields = {str(name).lower(): value for name, value in found.items()}
    encoded, time = fields.get("signature"), fields.get("time")
    time = 0 if time is None else time  # Go leaves a missing or null time at zero
    if not isinstance(encoded, str) or not encoded:
        return "is not signed"
    if isinstance(time, bool) or not isinstance(time, int) or not -_INT64 <= time < _INT64:
        return "has a signature without a valid signing time"
    try:
        raw = base64.b64decode(encoded.replace("\r", "").replace("\n", ""), validate=True)
    except (binascii.Error, ValueError):
        return "has a signature that is not base64"
    return raw, time


def _claim(folder: Path, names: Iterable[str]) -> str | None:
    """The category ``.verification.dify.json`` claims ("" for ``null``), None without the file;
    ValueError (or RecursionError) if it is not what upstream can read."""
    if VERIFICATION_FILE not in names:
        return None
    claim = json.loads((folder / VERIFICATION_FILE).read_bytes())
    if claim is None:
        return ""
    if not isinstance(claim, dict):
        raise ValueError("not a JSON object")
    fields = {str(name).lower(): value for name, value in claim.items()}
    category = fields.get("authorized_category", "")
    if not isinstance(category, str):
        raise ValueError("authorized_category is not a string")
    return category


def verify(
    comment: bytes,
    file_hashes: dict[str, bytes],
    *,
    folders: bool,
    extracted: Path,
    keys: Sequence[rsa.RSAPublicKey],
) -> Signature:
    """Check the package's signature. ``file_hashes``: each file's sha256 by name, in archive
    order; ``folders``: the archive has folder entries; ``extracted``: where its files are."""
    found = _comment(comment)
    if isinstance(found, str):
        return Signature(signed=found != "is not signed", verified=False, problem=found)
    raw, time = found

    def unverified(problem: str) -> Signature:
        return Signature(signed=True, verified=False, problem=problem)

    if folders:
        # Upstream reads every entry as a file, so it verifies no package with folder entries;
        # its signer never writes one.
        return unverified("has folder entries, which a signed package never holds")
    try:
        category = _claim(extracted, file_hashes)
    except RecursionError:
        return unverified(f"has an unreadable {VERIFICATION_FILE} (nested too deep)")
    except (ValueError, OSError) as exc:
        return unverified(f"has an unreadable {VERIFICATION_FILE} ({exc})")
    data = signed_bytes(file_hashes.values(), time)
    for key in keys:
        try:
            key.verify(raw, data, padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            continue
        return Signature(
            signed=True, verified=True, authorized_category=DEFAULT_CATEGORY if category is None else category
        )
    return unverified(
        "has a signature that does not match its files under any trusted key: it was changed "
        "after it was signed, or signed with a key this daemon does not trust"
    )


def refusal(signature: Signature, *, forced: bool, requested: bool) -> str | None:
    """Why the package is refused under the policy, or None to keep it."""
    if signature.verified or not (forced or requested):
        return None
    switch = (
        "verify_signature was requested" if requested and not forced else "FORCE_VERIFYING_SIGNATURE is true"
    )
    remedy = "set FORCE_VERIFYING_SIGNATURE=false to accept unverified packages"
    if signature.signed:
        remedy = (
            "trust its signer's public key with THIRD_PARTY_SIGNATURE_VERIFICATION_ENABLED=true and "
            f"THIRD_PARTY_SIGNATURE_VERIFICATION_PUBLIC_KEYS, or {remedy}"
        )
    # Upstream's sentence first, so callers matching it still do; then what is wrong.
    return (
        f"plugin verification has been enabled ({switch}), and the plugin you want to install "
        f"has a bad signature: the package {signature.problem or 'is not signed'}; {remedy}"
    )
