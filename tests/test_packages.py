"""``.difypkg`` packages: building the bundled plugins, decoding them, refusing hostile zips,
and the upload/decode/fetch routes through a real daemon over HTTP."""

from __future__ import annotations

import hashlib
import io
import shutil
import stat
import subprocess
import sys
import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from daemon.packages import Limits, PackageError, build, decode_into
from daemon.packages.build import files
from daemon.testing import PLUGINS, REPO, Daemon, start_daemon
from tests import dify_client

BUNDLED = sorted(p.name for p in PLUGINS.iterdir() if (p / "manifest.yaml").is_file())
TENANT = "tenant-a"
SMALL_LIMIT = 2 * 1024 * 1024  # the daemons' MAX_PLUGIN_PACKAGE_SIZE, so "too large" stays cheap


def folder_checksum(root: Path, names: list[str]) -> str:
    """The package checksum as upstream defines it, computed from the folder's own files."""
    outer = hashlib.sha256()
    for name in sorted(names):
        outer.update(hashlib.sha256(name.encode()).digest())
        outer.update(hashlib.sha256((root / name).read_bytes()).digest())
    return outer.hexdigest()


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("difypkg")
    return {name: build(PLUGINS / name, out / f"{name}.difypkg")[0] for name in BUNDLED}


# --- building and decoding --------------------------------------------------------------


@pytest.mark.parametrize("name", BUNDLED)
def test_each_bundled_plugin_round_trips_with_the_same_manifest_and_identifier(
    name: str, packages: dict[str, Path], tmp_path: Path
) -> None:
    root = PLUGINS / name
    decoded = decode_into(packages[name], tmp_path / "out", Limits())
    manifest = yaml.safe_load((root / "manifest.yaml").read_text())
    expected = (
        f"{manifest['author']}/{manifest['name']}:{manifest['version']}@{folder_checksum(root, files(root))}"
    )
    assert decoded.identifier == expected
    for key in ("author", "name", "version", "plugins"):
        assert decoded.manifest[key] == manifest[key]
    assert decoded.manifest["verified"] is False
    for packed in files(root):
        assert (tmp_path / "out" / packed).read_bytes() == (root / packed).read_bytes()


def test_packaging_is_deterministic_and_leaves_out_venvs_bytecode_and_difyignored_files(
    tmp_path: Path,
) -> None:
    root = tmp_path / "notes"
    shutil.copytree(PLUGINS / "notes", root, ignore=shutil.ignore_patterns(".venv", "__pycache__"))
    (root / ".venv" / "bin").mkdir(parents=True)
    (root / ".venv" / "bin" / "python").write_text("x")
    (root / "tools" / "__pycache__").mkdir()
    (root / "tools" / "__pycache__" / "x.cpython-313.pyc").write_bytes(b"\0")
    (root / "secrets.env").write_text("TOKEN=1")
    (root / "notes.log").write_text("log")
    (root / ".difyignore").write_text("# local files\nsecrets.env\n*.log\n")
    first, decoded = build(root, tmp_path / "a.difypkg")
    second, _ = build(root, tmp_path / "b.difypkg")
    assert first.read_bytes() == second.read_bytes()
    names = zipfile.ZipFile(first).namelist()
    assert "manifest.yaml" in names and ".difyignore" in names
    assert not [n for n in names if ".venv" in n or "__pycache__" in n or n in ("secrets.env", "notes.log")]
    assert decoded.identifier.endswith("@" + folder_checksum(root, names))


def test_packaging_refuses_a_symlink_in_the_plugin_folder(tmp_path: Path) -> None:
    root = tmp_path / "notes"
    shutil.copytree(PLUGINS / "notes", root, ignore=shutil.ignore_patterns(".venv", "__pycache__"))
    (root / "tools" / "passwd.yaml").symlink_to("/etc/passwd")
    with pytest.raises(PackageError, match="symbolic link"):
        build(root, tmp_path / "x.difypkg")
    assert not (tmp_path / "x.difypkg").exists()


def test_the_cli_packages_a_folder_and_reports_the_identifier(tmp_path: Path) -> None:
    out = tmp_path / "fastproto.difypkg"
    done = subprocess.run(
        [sys.executable, "-m", "daemon", "package", str(PLUGINS / "fastproto"), "-o", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith(f"{out}: demo/fastproto:0.1.0@")
    bad = subprocess.run(
        [sys.executable, "-m", "daemon", "package", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 1 and "no manifest.yaml" in bad.stderr


# --- hostile packages -------------------------------------------------------------------


def plugin_files() -> dict[str, bytes]:
    root = PLUGINS / "notes"
    return {name: (root / name).read_bytes() for name in files(root)}


def zipped(entries: list[tuple[zipfile.ZipInfo | str, bytes]], comment: bytes = b"") -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name, on purpose here
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for info, data in entries:
                archive.writestr(info, data)
            archive.comment = comment
    return buffer.getvalue()


def with_extra(name_or_info: zipfile.ZipInfo | str, data: bytes) -> bytes:
    return zipped([*plugin_files().items(), (name_or_info, data)])


def special(name: str, kind: int, data: bytes = b"") -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = (kind | 0o777) << 16
    return info


def replaced(name: str, data: bytes) -> bytes:
    return zipped([(n, data if n == name else d) for n, d in plugin_files().items()])


LAUGHS = b"a: &a [x, x, x, x, x, x, x, x, x]\n" + b"".join(
    b"%c: &%c [*%c, *%c, *%c, *%c, *%c, *%c, *%c, *%c, *%c]\n" % ((98 + i, 98 + i) + (97 + i,) * 9)
    for i in range(8)
)

HOSTILE: dict[str, tuple[Callable[[], bytes], str]] = {
    "zip bomb": (lambda: with_extra("big.bin", b"\0" * (6 * 1024 * 1024)), "refused"),
    "parent path": (lambda: with_extra("../evil.py", b"x"), "leads outside"),
    "nested parent path": (lambda: with_extra("tools/../../evil.py", b"x"), "leads outside"),
    "absolute path": (lambda: with_extra("/etc/cron.d/evil", b"x"), "absolute path"),
    "backslash path": (lambda: with_extra("..\\evil.py", b"x"), "unsafe path"),
    "symlink": (lambda: with_extra(special("tools/link", stat.S_IFLNK), b"/etc/passwd"), "symbolic link"),
    "fifo": (lambda: with_extra(special("tools/pipe", stat.S_IFIFO), b""), "not a regular file"),
    "duplicate name": (lambda: with_extra("manifest.yaml", b"author: other\n"), "more than once"),
    "too many files": (
        lambda: zipped([*plugin_files().items(), *((f"f/{i}", b"") for i in range(10_001))]),
        "entries",
    ),
    "file and folder": (lambda: with_extra("main.py/x", b"x"), "both a file and a folder"),
    "name too long for the filesystem": (lambda: with_extra("a" * 300 + "/x.py", b"x"), "path too long"),
    "path too deep for the filesystem": (lambda: with_extra("d/" * 3000 + "x.py", b"x"), "path too long"),
    "not a zip": (lambda: b"PK\x03\x04 this is not really a zip" * 10, "not a difypkg"),
    "no manifest": (
        lambda: zipped([(n, d) for n, d in plugin_files().items() if n != "manifest.yaml"]),
        "no manifest",
    ),
    "bad manifest yaml": (lambda: replaced("manifest.yaml", b"author: [unclosed\n"), "bad manifest"),
    "billion laughs": (lambda: replaced("provider/notes.yaml", LAUGHS), "YAML nodes"),
    "upper-case author": (
        lambda: replaced(
            "manifest.yaml",
            (PLUGINS / "notes" / "manifest.yaml").read_bytes().replace(b"author: demo", b"author: Demo"),
        ),
        "not a valid plugin identity",
    ),
    "uuid author": (
        lambda: replaced(
            "manifest.yaml",
            (PLUGINS / "notes" / "manifest.yaml")
            .read_bytes()
            .replace(b"author: demo", b"author: 0b1e8a7c-5c4f-4a8e-9b1d-2f3c4d5e6f70"),
        ),
        "cannot be a UUID",
    ),
    "header smaller than the data": (lambda: lying(shrink=True), "corrupt"),
    "header larger than the data": (lambda: lying(shrink=False), "corrupt"),
}


def lying(*, shrink: bool) -> bytes:
    """A stored entry whose local and central headers both declare a size its bytes do not have."""
    data = bytearray(zipped([*plugin_files().items(), (zipfile.ZipInfo("blob.bin"), b"A" * 1000)]))
    info = zipfile.ZipFile(io.BytesIO(bytes(data))).getinfo("blob.bin")
    assert info.compress_type == zipfile.ZIP_STORED
    told = (10 if shrink else 2000).to_bytes(4, "little")
    local = info.header_offset
    data[local + 18 : local + 26] = told + told  # its compressed and uncompressed sizes
    central = bytes(data).rindex(b"blob.bin") - 46  # the last entry's central record is the last one
    data[central + 20 : central + 28] = told + told
    return bytes(data)


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_package_is_refused_and_nothing_is_left_behind(case: str, tmp_path: Path) -> None:
    make, reason = HOSTILE[case]
    dest = tmp_path / "out"
    with pytest.raises(PackageError, match=reason):
        decode_into(io.BytesIO(make()), dest, Limits())
    outside = [p for p in tmp_path.rglob("*") if not p.is_relative_to(dest)]
    assert outside == []


def test_a_highly_compressed_entry_is_refused_before_it_is_inflated(tmp_path: Path) -> None:
    with pytest.raises(PackageError, match=r"compressed \d+:1"):
        decode_into(io.BytesIO(HOSTILE["zip bomb"][0]()), tmp_path / "out", Limits())
    assert not (tmp_path / "out" / "big.bin").exists()


def test_the_real_checksum_of_a_package_counts_every_byte(tmp_path: Path) -> None:
    base = decode_into(io.BytesIO(zipped(list(plugin_files().items()))), tmp_path / "a", Limits())
    changed = decode_into(
        io.BytesIO(replaced("main.py", plugin_files()["main.py"] + b"\n")), tmp_path / "b", Limits()
    )
    renamed = zipped([("README.txt" if n == "README.md" else n, d) for n, d in plugin_files().items()])
    moved = decode_into(io.BytesIO(renamed), tmp_path / "c", Limits())
    assert len({base.identifier, changed.identifier, moved.identifier}) == 3


def test_the_store_keeps_a_package_once_in_the_database_and_clears_scratch_left_by_a_stopped_run(
    tmp_path: Path,
) -> None:
    import anyio

    from daemon.installs import store as tables
    from daemon.packages import PackageStore
    from daemon.state import Database

    database = Database.sqlite(tmp_path / "state.sqlite3")
    database.migrate()
    stale = tmp_path / "packages" / ".upload-left-behind"
    (stale / "plugin").mkdir(parents=True)
    store = PackageStore(tmp_path / "packages", Limits(), database)
    assert not stale.exists()
    data = zipped(list(plugin_files().items()))
    with pytest.raises(PackageError, match="not signed"):
        store.add(io.BytesIO(data), forced=True)
    first = store.add(io.BytesIO(data), forced=False)
    again = store.add(io.BytesIO(data), forced=False)

    async def read_back() -> Any:
        return await store.get(first.identifier), await PackageStore(tmp_path / "b", Limits(), database).get(
            first.identifier
        )

    cached, fresh = anyio.run(read_back)
    assert first.identifier == again.identifier and cached == first and fresh == first
    assert database.transaction(lambda c: tables.package_bytes(c, first.identifier)) == data
    assert database.transaction(lambda c: c.execute(tables.PACKAGES.select()).all()).__len__() == 1
    assert list((tmp_path / "packages").iterdir()) == []  # nothing left on disk
    database.close()


# --- routes through a real daemon ---------------------------------------------------------


@pytest.fixture(scope="module")
def daemons(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Daemon]]:
    """One daemon that accepts unsigned packages, one with upstream's default policy."""
    started: dict[str, Daemon] = {}
    try:
        for name, force in (("open", "false"), ("strict", None)):
            tmp = tmp_path_factory.mktemp(name)
            (tmp / "plugins").mkdir()
            env: dict[str, Any] = {"max_plugin_package_size": SMALL_LIMIT}
            if force is not None:
                env["force_verifying_signature"] = force
            started[name] = start_daemon(tmp / "plugins", tmp / "state", tmp / "daemon.log", **env)
        yield started
    finally:
        for daemon in started.values():
            daemon.stop()


def upload(daemon: Daemon, data: bytes, *, key: str | None = None, **fields: str) -> httpx.Response:
    return httpx.post(
        f"{daemon.url}/plugin/{TENANT}/management/install/upload/package",
        headers={"X-Api-Key": key or daemon.key},
        files={"dify_pkg": ("plugin.difypkg", data, "application/octet-stream")},
        data=fields,
        timeout=60,
    )


def get(daemon: Daemon, route: str, **params: str) -> httpx.Response:
    return httpx.get(
        f"{daemon.url}/plugin/{TENANT}/management/{route}",
        headers={"X-Api-Key": daemon.key},
        params=params,
        timeout=30,
    )


def refusal(response: httpx.Response, status: int) -> str:
    import json

    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == -status and body["data"] is None
    return json.loads(body["message"])["message"]


@pytest.mark.parametrize("name", BUNDLED)
def test_upload_decode_and_fetch_each_bundled_package(
    name: str, packages: dict[str, Path], daemons: dict[str, Daemon]
) -> None:
    daemon = daemons["open"]
    data = packages[name].read_bytes()
    first = upload(daemon, data)
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["code"] == 0 and body["message"] == "success"
    answer = body["data"]
    manifest = yaml.safe_load((PLUGINS / name / "manifest.yaml").read_text())
    identifier = answer["unique_identifier"]
    assert identifier.startswith(f"{manifest['author']}/{manifest['name']}:{manifest['version']}@")
    assert identifier.endswith("@" + folder_checksum(PLUGINS / name, files(PLUGINS / name)))
    assert answer["manifest"]["name"] == manifest["name"] and answer["manifest"]["verified"] is False
    assert answer["verification"] is None
    assert upload(daemon, data).json()["data"]["unique_identifier"] == identifier  # idempotent

    decoded = get(daemon, "decode/from_identifier", plugin_unique_identifier=identifier)
    assert decoded.status_code == 200 and decoded.json()["data"] == answer
    fetched = get(daemon, "fetch/manifest", plugin_unique_identifier=identifier)
    assert fetched.status_code == 200 and fetched.json()["data"] == answer["manifest"]
    readme = get(daemon, "fetch/readme", plugin_unique_identifier=identifier, language="ja_JP")
    if (PLUGINS / name / "README.md").is_file():
        assert readme.json()["data"] == {
            "content": (PLUGINS / name / "README.md").read_text(),
            "language": "en_US",
        }
    else:
        assert "no readme" in refusal(readme, 404)


def test_the_declaration_inlines_provider_and_tool_files(
    packages: dict[str, Path], daemons: dict[str, Daemon]
) -> None:
    answer = upload(daemons["open"], packages["notes"].read_bytes()).json()["data"]
    tool = answer["manifest"]["tool"]
    assert tool["identity"]["name"] == "notes"
    assert {t["identity"]["name"] for t in tool["tools"]} == {"save_note", "read_note", "delete_note"}
    assert answer["manifest"]["category"] == "tool"
    models = upload(daemons["open"], packages["echo_models"].read_bytes()).json()["data"]["manifest"]
    on_disk = {
        yaml.safe_load(p.read_text())["model"] for p in (PLUGINS / "echo_models" / "models").rglob("*.yaml")
    }
    assert models["category"] == "model" and {m["model"] for m in models["model"]["models"]} == on_disk
    agent = upload(daemons["open"], packages["echo_agent"].read_bytes()).json()["data"]["manifest"]
    assert agent["category"] == "agent-strategy" and agent["agent_strategy"]["strategies"]


def test_datasource_and_trigger_packages_inline_their_datasources_and_events(
    daemons: dict[str, Daemon], tmp_path: Path
) -> None:
    """A trigger provider names its event files under ``events``, a datasource provider its
    datasource files under ``datasources``: both come back read, as upstream inlines them."""
    test_plugins = REPO / "tests" / "plugins"
    manifests = {
        name: upload(
            daemons["open"], build(test_plugins / name, tmp_path / f"{name}.difypkg")[0].read_bytes()
        ).json()["data"]["manifest"]
        for name in ("web_pages", "webhook_events")
    }
    datasource = manifests["web_pages"]
    assert datasource["category"] == "datasource"
    assert [d["identity"]["name"] for d in datasource["datasource"]["datasources"]] == ["crawl"]
    trigger = manifests["webhook_events"]
    assert trigger["category"] == "trigger"
    assert [e["identity"]["name"] for e in trigger["trigger"]["events"]] == ["received"]


def test_an_unsigned_package_is_refused_by_default_and_when_verification_is_requested(
    packages: dict[str, Path], daemons: dict[str, Daemon]
) -> None:
    data = packages["notes"].read_bytes()
    message = refusal(upload(daemons["strict"], data), 400)
    assert "not signed" in message and "FORCE_VERIFYING_SIGNATURE" in message
    requested = refusal(upload(daemons["open"], data, verify_signature="true"), 400)
    assert "verify_signature was requested" in requested
    signed_looking = zipped(list(plugin_files().items()), comment=b'{"signature":"AAAA","time":1}')
    assert "does not match its files" in refusal(upload(daemons["strict"], signed_looking), 400)
    identifier = build(PLUGINS / "notes", packages["notes"].with_name("again.difypkg"))[1].identifier
    # Nothing refused was kept.
    assert "not found" in refusal(
        get(daemons["strict"], "fetch/manifest", plugin_unique_identifier=identifier), 404
    )


def test_dify_reads_the_upload_answer_and_the_reason_of_a_refusal(
    packages: dict[str, Path], daemons: dict[str, Daemon]
) -> None:
    url = f"/plugin/{TENANT}/management/install/upload/package"
    form = {"files": {"dify_pkg": ("dify_pkg", packages["notes"].read_bytes(), "application/octet-stream")}}
    with httpx.Client(timeout=60) as client:
        data = dify_client.request(
            client,
            "POST",
            daemons["open"].url + url,
            {"X-Api-Key": daemons["open"].key},
            **form,
            data={"verify_signature": "false"},
        )
        assert data["unique_identifier"].startswith("demo/notes:0.1.0@") and data["verification"] is None
        with pytest.raises(dify_client.PluginDaemonClientSideError, match="not signed"):
            dify_client.request(
                client, "POST", daemons["strict"].url + url, {"X-Api-Key": daemons["strict"].key}, **form
            )
    assert "package upload for tenant tenant-a refused" in daemons["strict"].log()


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_upload_is_refused_with_a_clear_400_and_the_daemon_stays_healthy(
    case: str, packages: dict[str, Path], daemons: dict[str, Daemon]
) -> None:
    daemon = daemons["open"]
    make, reason = HOSTILE[case]
    message = refusal(upload(daemon, make()), 400)
    assert reason in message or "refused" in message, message
    assert httpx.get(f"{daemon.url}/health/check", timeout=10).status_code == 200
    assert upload(daemon, packages["fastproto"].read_bytes()).status_code == 200
    state = Path(daemon.log_path).parent / "state" / "packages"
    assert not [p for p in state.iterdir() if p.name.startswith(".upload-")]


def test_upload_limits_and_bad_requests(daemons: dict[str, Daemon]) -> None:
    daemon = daemons["open"]
    too_large = upload(daemon, b"\0" * (SMALL_LIMIT + 128 * 1024))
    assert too_large.status_code == 413
    just_over = upload(daemon, b"\0" * (SMALL_LIMIT + 1))
    assert "exceeds the maximum" in refusal(just_over, 400)
    assert refusal(upload(daemon, b"x", key="wrong"), 401)
    missing = httpx.post(
        f"{daemon.url}/plugin/{TENANT}/management/install/upload/package",
        headers={"X-Api-Key": daemon.key},
        data={"other": "1"},
        timeout=30,
    )
    assert "dify_pkg" in refusal(missing, 400)
    assert "not valid" in refusal(
        get(daemon, "fetch/manifest", plugin_unique_identifier="../../etc/passwd"), 400
    )
    assert "required" in refusal(get(daemon, "decode/from_identifier"), 400)
    unknown = "demo/notes:0.1.0@" + "0" * 64
    assert "not found" in refusal(
        get(daemon, "decode/from_identifier", plugin_unique_identifier=unknown), 404
    )
