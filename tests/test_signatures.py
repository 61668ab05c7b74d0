"""Package signatures: signing with an operator key, verifying as Dify's daemon does, refusing
unsigned, tampered and foreign-signed packages through the upload route and the CLI."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import stat
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from daemon.packages import Limits, PackageError, build, decode_into
from daemon.packages.signature import (
    VERIFICATION_FILE,
    Signature,
    official_key,
    refusal,
    sign,
    trusted_keys,
)
from daemon.testing import PLUGINS, REPO, Daemon, start_daemon

TENANT = "tenant-s"
# sha256 of the DER (PKCS#1) of the key langgenius/dify-plugin-daemon publishes in
# pkg/license/public_key/PUBLIC_KEY.pem: the shipped copy must be exactly that key.
OFFICIAL_KEY_SHA256 = "e274cc2d025b1dbaa8b09b29a1bcff74d9298454f9786a72dc9d00981a674873"


def _pem(key: rsa.RSAPrivateKey, folder: Path, name: str) -> tuple[Path, Path]:
    private = folder / f"{name}.private.pem"
    public = folder / f"{name}.public.pem"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1)
    )
    return private, public


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, rsa.RSAPrivateKey]:
    # 2048 bits keep the tests quick; the format does not depend on the size (keygen makes 4096).
    return {
        name: rsa.generate_private_key(public_exponent=65537, key_size=2048) for name in ("ours", "other")
    }


@pytest.fixture(scope="module")
def key_files(
    keys: dict[str, rsa.RSAPrivateKey], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("keys")
    found: dict[str, Path] = {}
    for name, key in keys.items():
        found[f"{name}.private"], found[f"{name}.public"] = _pem(key, folder, name)
    return found


@pytest.fixture(scope="module")
def signed(keys: dict[str, rsa.RSAPrivateKey], tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The notes plugin: signed with our key, with the other key, and unsigned."""
    out = tmp_path_factory.mktemp("signed")
    return {
        "ours": build(PLUGINS / "notes", out / "ours.difypkg", key=keys["ours"])[0].read_bytes(),
        "partner": build(PLUGINS / "notes", out / "p.difypkg", key=keys["ours"], category="partner")[
            0
        ].read_bytes(),
        "other": build(PLUGINS / "notes", out / "other.difypkg", key=keys["other"])[0].read_bytes(),
        "unsigned": build(PLUGINS / "notes", out / "unsigned.difypkg")[0].read_bytes(),
    }


def rezipped(
    data: bytes,
    change: Callable[[list[tuple[str, bytes]]], list[tuple[str, bytes]]] = lambda e: e,
    comment: Callable[[bytes], bytes] = lambda c: c,
    folder: str | None = None,
) -> bytes:
    """``data`` with its files changed by ``change`` and its comment by ``comment``."""
    source = zipfile.ZipFile(io.BytesIO(data))
    entries = change([(info.filename, source.read(info)) for info in source.infolist()])
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as out:
        if folder is not None:
            out.writestr(zipfile.ZipInfo(folder), b"")
        for name, content in entries:
            out.writestr(name, content)
        out.comment = comment(source.comment)
    return buffer.getvalue()


def _with_signature(transform: Callable[[bytes], bytes]) -> Callable[[bytes], bytes]:
    def edit(comment: bytes) -> bytes:
        fields = json.loads(comment)
        fields["signature"] = base64.b64encode(transform(base64.b64decode(fields["signature"]))).decode()
        return json.dumps(fields).encode()

    return edit


def _flip(raw: bytes) -> bytes:
    return raw[:20] + bytes([raw[20] ^ 1]) + raw[21:]


TAMPERED: dict[str, Callable[[bytes], bytes]] = {
    "file changed": lambda d: rezipped(d, lambda e: [(n, c + b"\n" if n == "main.py" else c) for n, c in e]),
    "file added": lambda d: rezipped(d, lambda e: [*e, ("tools/extra.py", b"print('hello')\n")]),
    "file removed": lambda d: rezipped(d, lambda e: [(n, c) for n, c in e if n != "README.md"]),
    "files reordered": lambda d: rezipped(d, lambda e: e[1:] + e[:1]),
    "category changed": lambda d: rezipped(
        d,
        lambda e: [
            (n, b'{"authorized_category":"langgenius"}' if n == VERIFICATION_FILE else c) for n, c in e
        ],
    ),
    "signature bytes changed": lambda d: rezipped(d, comment=_with_signature(_flip)),
    "signature truncated": lambda d: rezipped(d, comment=_with_signature(lambda raw: raw[:-1])),
    "signing time changed": lambda d: rezipped(
        d, comment=lambda c: json.dumps({**json.loads(c), "time": json.loads(c)["time"] + 1}).encode()
    ),
}


def decoded_signature(data: bytes, tmp_path: Path, keys: tuple[rsa.RSAPublicKey, ...]) -> Signature:
    return decode_into(io.BytesIO(data), tmp_path / "out", Limits(), keys).signature


# --- verification -------------------------------------------------------------------------------


def test_the_shipped_official_key_is_upstreams() -> None:
    der = official_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    assert official_key().key_size == 4096
    assert hashlib.sha256(der).hexdigest() == OFFICIAL_KEY_SHA256


def test_a_package_signed_with_a_trusted_key_verifies_and_claims_its_category(
    signed: dict[str, bytes], keys: dict[str, rsa.RSAPrivateKey], tmp_path: Path
) -> None:
    trusted = (*trusted_keys(), keys["ours"].public_key())
    decoded = decode_into(io.BytesIO(signed["ours"]), tmp_path / "a", Limits(), trusted)
    assert decoded.signature.verified and decoded.signature.authorized_category == "community"
    assert decoded.manifest["verified"] is True
    partner = decode_into(io.BytesIO(signed["partner"]), tmp_path / "b", Limits(), trusted)
    assert partner.signature.authorized_category == "partner"
    # Only the official key: the same package is signed but not verified.
    alone = decode_into(io.BytesIO(signed["ours"]), tmp_path / "c", Limits())
    assert alone.signature.signed and not alone.signature.verified
    assert "does not match its files" in str(alone.signature.problem)
    assert alone.manifest["verified"] is False


def test_signing_replaces_a_claim_left_in_the_folder_and_puts_it_last(
    keys: dict[str, rsa.RSAPrivateKey], tmp_path: Path
) -> None:
    import shutil

    root = tmp_path / "notes"
    shutil.copytree(PLUGINS / "notes", root, ignore=shutil.ignore_patterns(".venv", "__pycache__"))
    (root / VERIFICATION_FILE).write_text('{"authorized_category":"langgenius"}')
    path, decoded = build(root, tmp_path / "x.difypkg", key=keys["ours"], category="partner")
    names = zipfile.ZipFile(path).namelist()
    assert names.count(VERIFICATION_FILE) == 1 and names[-1] == VERIFICATION_FILE
    assert decoded.signature.verified and decoded.signature.authorized_category == "partner"


@pytest.mark.parametrize("case", sorted(TAMPERED))
def test_a_tampered_package_does_not_verify(
    case: str, signed: dict[str, bytes], keys: dict[str, rsa.RSAPrivateKey], tmp_path: Path
) -> None:
    trusted = (*trusted_keys(), keys["ours"].public_key())
    assert decoded_signature(signed["ours"], tmp_path / "good", trusted).verified
    signature = decoded_signature(TAMPERED[case](signed["ours"]), tmp_path / "bad", trusted)
    assert signature.signed and not signature.verified
    assert "does not match its files" in signature.problem


@pytest.mark.parametrize(
    ("comment", "problem"),
    [
        (b"", "is not signed"),
        (b"made with zip", "is not signed"),
        (b'{"time": 1}', "is not signed"),
        (b'{"signature": "", "time": 1}', "is not signed"),
        (b'{"signature": "AAAA", "time": "1"}', "without a valid signing time"),
        (b'{"signature": "AAAA", "time": 1.5}', "without a valid signing time"),
        (b'{"signature": "AAAA", "time": 99999999999999999999}', "without a valid signing time"),
        (b'{"signature": "not base64!", "time": 1}', "not base64"),
        (b"[" * 60_000, "is not signed"),
        (b'{"signature": "AAAA", "time": null}', "does not match"),
        (b'{"signature": "AAAA"}', "does not match"),
    ],
)
def test_a_comment_that_is_no_signature_says_why(
    comment: bytes, problem: str, signed: dict[str, bytes], tmp_path: Path
) -> None:
    signature = decoded_signature(
        rezipped(signed["unsigned"], comment=lambda _: comment), tmp_path, trusted_keys()
    )
    assert not signature.verified and problem in signature.problem


def test_upstreams_comment_field_names_match_in_any_case(
    signed: dict[str, bytes], keys: dict[str, rsa.RSAPrivateKey], tmp_path: Path
) -> None:
    trusted = (keys["ours"].public_key(),)
    upper = rezipped(
        signed["ours"],
        comment=lambda c: json.dumps({k.upper(): v for k, v in json.loads(c).items()}).encode(),
    )
    assert decoded_signature(upper, tmp_path, trusted).verified


def resigned(
    data: bytes,
    key: rsa.RSAPrivateKey,
    change: Callable[[list[tuple[str, bytes]]], list[tuple[str, bytes]]],
    **kw: str,
) -> bytes:
    """``data`` changed by ``change``, then signed again over what it now holds."""
    changed = rezipped(data, change, **kw)  # type: ignore[arg-type]
    files = [
        (i.filename, zipfile.ZipFile(io.BytesIO(changed)).read(i))
        for i in zipfile.ZipFile(io.BytesIO(changed)).infolist()
    ]
    digests = (hashlib.sha256(content).digest() for name, content in files if not name.endswith("/"))
    return rezipped(changed, comment=lambda _: sign(key, digests, 1_700_000_000))


def test_folder_entries_or_an_unreadable_claim_leave_a_signed_package_unverified(
    signed: dict[str, bytes], keys: dict[str, rsa.RSAPrivateKey], tmp_path: Path
) -> None:
    """Upstream verifies neither (it reads a folder entry as a file and fails; it fails on a claim
    it cannot parse), even where the signature itself holds."""
    trusted = (keys["ours"].public_key(),)
    same = resigned(signed["ours"], keys["ours"], lambda e: e)
    assert decoded_signature(same, tmp_path / "same", trusted).verified
    folders = resigned(signed["ours"], keys["ours"], lambda e: e, folder="tools/")
    signature = decoded_signature(folders, tmp_path / "a", trusted)
    assert not signature.verified and "folder entries" in signature.problem
    for claim, why in (
        (b"[" * 200_000, "nested too deep"),
        (b"{not json", "Expecting"),
        (b"[]", "not a JSON object"),
        (b'{"authorized_category": 1}', "not a string"),
    ):
        bad = resigned(
            signed["ours"],
            keys["ours"],
            lambda e, c=claim: [(n, c if n == VERIFICATION_FILE else d) for n, d in e],
        )
        signature = decoded_signature(bad, tmp_path / why.replace(" ", "-"), trusted)
        assert not signature.verified
        assert f"unreadable {VERIFICATION_FILE}" in signature.problem and why in signature.problem
    # A ``null`` claim is read as upstream reads it: verified, with an empty category.
    empty = resigned(
        signed["ours"], keys["ours"], lambda e: [(n, b"null" if n == VERIFICATION_FILE else d) for n, d in e]
    )
    signature = decoded_signature(empty, tmp_path / "null", trusted)
    assert signature.verified and signature.authorized_category == ""


def test_a_hostile_package_with_a_signature_is_refused_by_the_archive_limits_first(
    signed: dict[str, bytes], tmp_path: Path
) -> None:
    """Verification hashes the files extraction already hashes: what the limits refuse is never
    verified, so a hostile package costs what the limits allow and no more."""
    comment = lambda _: zipfile.ZipFile(io.BytesIO(signed["ours"])).comment  # noqa: E731
    bomb = rezipped(signed["ours"], lambda e: [*e, ("big.bin", b"\0" * (6 * 1024 * 1024))], comment)
    with pytest.raises(PackageError, match=r"compressed \d+:1"):
        decode_into(io.BytesIO(bomb), tmp_path / "a", Limits())
    many = rezipped(signed["ours"], lambda e: [*e, *((f"f/{i}", b"") for i in range(60))], comment)
    with pytest.raises(PackageError, match="entries, more than 50"):
        decode_into(io.BytesIO(many), tmp_path / "b", Limits(files=50))
    # The largest comment a zip can carry: one RSA check per key, refused, no hang.
    huge = json.dumps({"signature": base64.b64encode(b"\1" * 48_000).decode(), "time": 1}).encode()
    assert len(huge) < 65_536
    many_keys = trusted_keys() * 8
    signature = decoded_signature(rezipped(signed["ours"], comment=lambda _: huge), tmp_path / "c", many_keys)
    assert signature.signed and not signature.verified


def test_the_refusal_leads_with_upstreams_sentence_and_says_what_to_do() -> None:
    unsigned = refusal(
        Signature(signed=False, verified=False, problem="is not signed"), forced=True, requested=False
    )
    assert unsigned is not None
    assert unsigned.startswith(
        "plugin verification has been enabled (FORCE_VERIFYING_SIGNATURE is true), and the plugin"
    )
    assert "is not signed" in unsigned and "FORCE_VERIFYING_SIGNATURE=false" in unsigned
    foreign = refusal(Signature(signed=True, verified=False, problem="x"), forced=False, requested=True)
    assert foreign is not None and "verify_signature was requested" in foreign
    assert "THIRD_PARTY_SIGNATURE_VERIFICATION_PUBLIC_KEYS" in foreign
    assert refusal(Signature(signed=True, verified=True), forced=True, requested=True) is None
    assert refusal(Signature(signed=False, verified=False), forced=False, requested=False) is None


# --- the upload route -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def daemons(
    key_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Daemon]]:
    """Upstream's default policy trusting our key; the key listed but not enabled; no policy."""
    settings = {
        "trusting": {
            "third_party_signature_verification_enabled": "true",
            "third_party_signature_verification_public_keys": f" {key_files['ours.public']} ",
        },
        "disabled": {"third_party_signature_verification_public_keys": str(key_files["ours.public"])},
        "open": {"force_verifying_signature": "false"},
    }
    started: dict[str, Daemon] = {}
    try:
        for name, env in settings.items():
            tmp = tmp_path_factory.mktemp(name)
            (tmp / "plugins").mkdir()
            env = {"force_verifying_signature": "true", **env}
            started[name] = start_daemon(tmp / "plugins", tmp / "state", tmp / "daemon.log", **env)
        yield started
    finally:
        for daemon in started.values():
            daemon.stop()


def upload(daemon: Daemon, data: bytes, **fields: str) -> httpx.Response:
    return httpx.post(
        f"{daemon.url}/plugin/{TENANT}/management/install/upload/package",
        headers={"X-Api-Key": daemon.key},
        files={"dify_pkg": ("plugin.difypkg", data, "application/octet-stream")},
        data=fields,
        timeout=60,
    )


def refused(response: httpx.Response) -> str:
    """The reason of a 400 in upstream's envelope."""
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["code"] == -400 and body["data"] is None
    inner = json.loads(body["message"])
    assert inner["error_type"] == "PluginDaemonBadRequestError"
    return str(inner["message"])


def test_a_package_signed_with_the_operators_key_is_accepted_by_the_strict_daemon(
    signed: dict[str, bytes], daemons: dict[str, Daemon]
) -> None:
    answer = upload(daemons["trusting"], signed["ours"])
    assert answer.status_code == 200, answer.text
    data = answer.json()["data"]
    assert data["manifest"]["verified"] is True
    assert data["verification"] == {"authorized_category": "community"}
    decoded = httpx.get(
        f"{daemons['trusting'].url}/plugin/{TENANT}/management/decode/from_identifier",
        headers={"X-Api-Key": daemons["trusting"].key},
        params={"plugin_unique_identifier": data["unique_identifier"]},
        timeout=30,
    )
    assert decoded.json()["data"] == data
    partner = upload(daemons["trusting"], signed["partner"], verify_signature="true").json()["data"]
    assert partner["verification"] == {"authorized_category": "partner"}


@pytest.mark.parametrize("case", ["unsigned", "other", *sorted(TAMPERED)])
def test_unsigned_foreign_and_tampered_packages_are_refused_with_the_reason(
    case: str, signed: dict[str, bytes], daemons: dict[str, Daemon]
) -> None:
    data = signed[case] if case in signed else TAMPERED[case](signed["ours"])
    message = refused(upload(daemons["trusting"], data))
    assert message.startswith("plugin verification has been enabled (FORCE_VERIFYING_SIGNATURE is true)")
    if case == "unsigned":
        assert "the package is not signed" in message and "FORCE_VERIFYING_SIGNATURE=false" in message
    else:
        assert "does not match its files under any trusted key" in message
        assert "THIRD_PARTY_SIGNATURE_VERIFICATION_PUBLIC_KEYS" in message
    assert "package upload for tenant tenant-s refused" in daemons["trusting"].log()


def test_listed_keys_are_trusted_only_when_third_party_verification_is_enabled(
    signed: dict[str, bytes], daemons: dict[str, Daemon]
) -> None:
    assert "does not match its files" in refused(upload(daemons["disabled"], signed["ours"]))


def test_without_the_policy_unverified_packages_are_kept_and_say_so(
    signed: dict[str, bytes], daemons: dict[str, Daemon]
) -> None:
    for case in ("unsigned", "other"):
        answer = upload(daemons["open"], signed[case])
        assert answer.status_code == 200, answer.text
        data = answer.json()["data"]
        assert data["manifest"]["verified"] is False and data["verification"] is None
    asked = refused(upload(daemons["open"], signed["other"], verify_signature="true"))
    assert "verify_signature was requested" in asked and "does not match" in asked


def test_a_bad_key_file_stops_the_daemon_at_start_with_its_name(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key")
    environ = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("SERVER_", "PLUGIN_"))},
        "PLUGINS_DIR": str(tmp_path),
        "STATE_DIR": str(tmp_path / "state"),
        "SERVER_PORT": "0",
        "THIRD_PARTY_SIGNATURE_VERIFICATION_ENABLED": "true",
        "THIRD_PARTY_SIGNATURE_VERIFICATION_PUBLIC_KEYS": f"{bad},{tmp_path / 'missing.pem'}",
    }
    done = subprocess.run(
        [sys.executable, "-m", "daemon", "serve"],
        cwd=REPO,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert (
        "THIRD_PARTY_SIGNATURE_VERIFICATION_PUBLIC_KEYS" in done.stderr and f"{bad}: not a PEM" in done.stderr
    )


# --- the command line ---------------------------------------------------------------------------


def cli(*args: str | Path, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "daemon", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_keygen_package_sign_and_verify_from_the_command_line(tmp_path: Path) -> None:
    made = cli("keygen", tmp_path / "operator")
    assert made.returncode == 0, made.stderr
    private, public = tmp_path / "operator.private.pem", tmp_path / "operator.public.pem"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    # The PKCS#1 PEM forms upstream's tools read and write.
    assert private.read_text().startswith("-----BEGIN RSA PRIVATE KEY-----")
    assert public.read_text().startswith("-----BEGIN RSA PUBLIC KEY-----")
    again = cli("keygen", tmp_path / "operator")
    assert again.returncode == 1 and "not overwriting" in again.stderr

    out = tmp_path / "notes.difypkg"
    packed = cli(
        "package", PLUGINS / "notes", "-o", out, "--sign", private, "--authorized-category", "partner"
    )
    assert packed.returncode == 0, packed.stderr
    assert "(signed, partner)" in packed.stdout

    good = cli("verify", out, "--public-key", public)
    assert good.returncode == 0, good.stderr
    assert good.stdout.startswith(f"{out}: verified (partner): demo/notes:0.1.0@")
    untrusted = cli("verify", out)
    assert untrusted.returncode == 1 and "not verified" in untrusted.stderr
    assert "does not match its files" in untrusted.stderr

    tampered = tmp_path / "tampered.difypkg"
    tampered.write_bytes(TAMPERED["file added"](out.read_bytes()))
    bad = cli("verify", tampered, "--public-key", public)
    assert bad.returncode == 1 and "does not match its files" in bad.stderr
    unsigned = tmp_path / "unsigned.difypkg"
    assert cli("package", PLUGINS / "notes", "-o", unsigned).returncode == 0
    plain = cli("verify", unsigned, "--public-key", public)
    assert plain.returncode == 1 and "the package is not signed" in plain.stderr


def test_signing_refuses_unusable_keys_with_their_name(tmp_path: Path, key_files: dict[str, Path]) -> None:
    encrypted = tmp_path / "encrypted.pem"
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    for path, reason in (
        (encrypted, "encrypted"),
        (key_files["ours.public"], "not a PEM private key"),
        (tmp_path / "missing.pem", "cannot read"),
    ):
        done = cli("package", PLUGINS / "notes", "-o", tmp_path / "x.difypkg", "--sign", path)
        assert done.returncode == 1 and f"{path}: " in done.stderr and reason in done.stderr
    assert not (tmp_path / "x.difypkg").exists()
    wrong = cli("verify", tmp_path / "nothing.difypkg", "--public-key", key_files["ours.private"])
    assert wrong.returncode == 1 and "not a PEM public key" in wrong.stderr
