"""A package's signature, and the policy that decides whether an unverified package is kept.

Upstream signs the sha256 of every file, the signing time and ``.verification.dify.json``
with RSA, and carries ``{"signature", "time"}`` as JSON in the zip comment; it verifies with
the public key built into its binary plus ``THIRD_PARTY_SIGNATURE_VERIFICATION_PUBLIC_KEYS``.
This daemon does not carry upstream's key and does not verify signatures: every package is
unverified, so ``FORCE_VERIFYING_SIGNATURE`` (true by default, as upstream) refuses every
package until the operator sets it to false.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass

VERIFICATION_FILE = ".verification.dify.json"


@dataclass(frozen=True)
class Signature:
    signed: bool  # the zip comment carries a signature
    verified: bool  # it was checked against a trusted key (never, here)
    authorized_category: str | None = None  # from .verification.dify.json, as the package claims


def read_signature(archive: zipfile.ZipFile) -> Signature:
    try:
        comment = json.loads(archive.comment or b"null")
    except ValueError:
        comment = None
    signed = isinstance(comment, dict) and bool(comment.get("signature"))
    category = None
    if VERIFICATION_FILE in archive.namelist():
        try:
            with archive.open(VERIFICATION_FILE) as f:
                claim = json.loads(f.read(4096))
            category = str(claim.get("authorized_category")) if isinstance(claim, dict) else None
        except (ValueError, OSError, zipfile.BadZipFile):
            category = None
    return Signature(signed=signed, verified=False, authorized_category=category)


def refusal(signature: Signature, *, forced: bool, requested: bool) -> str | None:
    """Why the package is refused under the policy, or None to keep it."""
    if signature.verified or not (forced or requested):
        return None
    why = "is signed, but this daemon cannot verify signatures" if signature.signed else "is not signed"
    switch = (
        "verify_signature was requested" if requested and not forced else "FORCE_VERIFYING_SIGNATURE is true"
    )
    return (
        f"plugin verification is enabled ({switch}) and the package {why}; "
        "set FORCE_VERIFYING_SIGNATURE=false to accept unverified packages"
    )
