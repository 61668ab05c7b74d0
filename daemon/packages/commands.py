"""Package commands of ``plugin-daemon``: ``package`` (optionally signed), ``keygen``, ``verify``.

Keys are what upstream's ``dify signature generate`` writes (RSA-4096, PKCS#1 PEM), so a key pair
made here signs packages Dify's daemon verifies, and the other way round.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from daemon.packages.archive import Limits, PackageError
from daemon.packages.build import build
from daemon.packages.decode import decode_into
from daemon.packages.signature import CATEGORIES, KeyFileError, load_private_key, trusted_keys

COMMANDS = ("package", "keygen", "verify")
KEY_BITS = 4096  # upstream's


def add_signing(package: argparse.ArgumentParser) -> None:
    package.add_argument(
        "--sign", metavar="KEY.pem", help="sign with this RSA private key (see keygen); unsigned without"
    )
    package.add_argument(
        "--authorized-category",
        choices=CATEGORIES,
        default="community",
        help="the category the signed package claims in .verification.dify.json (default: community)",
    )


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    keygen = sub.add_parser(
        "keygen",
        help="make an RSA key pair for signing packages",
        description="Write NAME.private.pem (mode 0600) and NAME.public.pem: an RSA-4096 pair in "
        "the PKCS#1 PEM form Dify's daemon reads. Sign with the private one (package --sign); trust "
        "the public one with THIRD_PARTY_SIGNATURE_VERIFICATION_PUBLIC_KEYS.",
    )
    keygen.add_argument("name", metavar="NAME", help="path and name of the pair, without .private.pem")
    verify = sub.add_parser(
        "verify",
        help="check a .difypkg and its signature",
        description="Decode a .difypkg with every check an upload gets and verify its signature "
        "against Dify's official key and the keys given; exit 1 if it is refused or not verified.",
    )
    verify.add_argument("package", metavar="FILE", help="the .difypkg")
    verify.add_argument(
        "--public-key", action="append", default=[], metavar="PEM", help="also trust this key (repeatable)"
    )


def run(args: argparse.Namespace) -> int:
    try:
        if args.command == "keygen":
            return _keygen(Path(args.name))
        if args.command == "verify":
            return _verify(Path(args.package), [Path(p) for p in args.public_key])
        return _package(args)
    except (PackageError, KeyFileError, OSError) as exc:
        print(f"plugin-daemon: {exc}", file=sys.stderr)
        return 1


def _package(args: argparse.Namespace) -> int:
    folder = Path(args.folder)
    key = load_private_key(Path(args.sign)) if args.sign else None
    try:
        path, decoded = build(
            folder, Path(args.output) if args.output else None, key=key, category=args.authorized_category
        )
    except (PackageError, OSError) as exc:
        raise PackageError(f"{folder}: {exc}") from None
    signed = f" (signed, {decoded.signature.authorized_category})" if key is not None else ""
    print(f"{path}: {decoded.identifier}{signed}")
    return 0


def _keygen(name: Path) -> int:
    private_path = name.with_name(f"{name.name}.private.pem")
    public_path = name.with_name(f"{name.name}.public.pem")
    for path in (private_path, public_path):
        if path.exists():
            raise KeyFileError(f"{path} exists; not overwriting a key")
    key = rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(private)
    public_path.write_bytes(public)
    print(f"{private_path}: private key (keep it secret)\n{public_path}: public key")
    return 0


def _verify(package: Path, key_files: list[Path]) -> int:
    keys = trusted_keys(key_files)
    with tempfile.TemporaryDirectory() as scratch:
        try:
            decoded = decode_into(package, Path(scratch) / "plugin", Limits(), keys)
        except PackageError as exc:
            raise PackageError(f"{package}: {exc}") from None
    signature = decoded.signature
    if not signature.verified:
        print(f"plugin-daemon: {package}: not verified: the package {signature.problem}", file=sys.stderr)
        return 1
    print(f"{package}: verified ({signature.authorized_category}): {decoded.identifier}")
    return 0
