"""Package routes of ``management`` with upstream's paths and answers: upload (decode, check,
keep by unique identifier), decode from identifier, the manifest and the README of a kept package.

Decoding runs in a worker thread, a few at a time, so a large upload never stalls the event
loop that relays plugin streams.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from multipart.exceptions import MultipartParseError
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from daemon.dispatch import BadRequest, check_key, tenant_id
from daemon.management import success
from daemon.packages.archive import Limits, PackageError
from daemon.packages.declaration import IDENTIFIER
from daemon.packages.decode import Decoded, PackageStore

log = logging.getLogger(__name__)
UPLOAD_SUFFIX = "/management/install/upload/package"
UPLOAD_PATH = "/plugin/{tenant_id}" + UPLOAD_SUFFIX
FORM_OVERHEAD = 64 * 1024  # multipart framing and the small fields around the package
_DECODERS = anyio.CapacityLimiter(2)


def store(request: Request) -> PackageStore:
    """The app's package store, made on first use from the daemon's settings."""
    found: PackageStore | None = getattr(request.app.state, "packages", None)
    if found is None:
        settings = request.app.state.daemon.settings
        limits = Limits(
            package_bytes=settings.max_plugin_package_size, unpacked_bytes=settings.max_plugin_package_size
        )
        root = settings.state_dir / "packages"
        found = request.app.state.packages = PackageStore(root, limits, settings.signature_keys)
    return found


def _answer(decoded: Decoded) -> dict[str, Any]:
    verification = (
        {"authorized_category": decoded.signature.authorized_category} if decoded.signature.verified else None
    )
    return {
        "unique_identifier": decoded.identifier,
        "manifest": decoded.manifest,
        "verification": verification,
    }


def _refused(exc: BadRequest) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


def _checked(request: Request) -> None:
    check_key(request, request.app.state.daemon.server_key)
    tenant_id(request)


def _identifier(request: Request) -> str:
    identifier = request.query_params.get("plugin_unique_identifier", "").replace("$", ":")
    if not identifier:
        raise BadRequest(400, "plugin_unique_identifier is required")
    if not IDENTIFIER.match(identifier):
        raise BadRequest(400, f"plugin_unique_identifier is not valid: {identifier[:300]}")
    return identifier


def _kept(request: Request) -> Decoded:
    decoded = store(request).get(_identifier(request))
    if decoded is None:
        raise BadRequest(404, "plugin package not found: upload it first (install/upload/package)")
    return decoded


async def upload_package(request: Request) -> Response:
    """Multipart ``dify_pkg`` (and ``verify_signature``): the identifier and manifest, as upstream."""
    try:
        _checked(request)
        try:
            form = await request.form(max_files=1, max_fields=8, max_part_size=FORM_OVERHEAD)
        except (MultiPartException, MultipartParseError) as exc:
            raise BadRequest(400, f"the upload is not a readable multipart form: {exc}") from None
        except ClientDisconnect:
            raise BadRequest(400, "the upload was cut off") from None
        try:
            decoded = await _decode(request, form)
        finally:
            await form.close()  # the spooled upload's temporary file
    except BadRequest as exc:
        return _refused(exc)
    return success(_answer(decoded))


async def _decode(request: Request, form: FormData) -> Decoded:
    settings = request.app.state.daemon.settings
    upload = form.get("dify_pkg")
    if not isinstance(upload, UploadFile):
        raise BadRequest(400, "dify_pkg (the .difypkg file) is required in the multipart form")
    if upload.size is not None and upload.size > settings.max_plugin_package_size:
        raise BadRequest(
            400, f"file size exceeds the maximum limit ({settings.max_plugin_package_size} bytes)"
        )
    requested = form.get("verify_signature") == "true"
    packages = store(request)

    def add() -> Decoded:
        return packages.add(upload.file, forced=settings.force_verifying_signature, requested=requested)

    try:
        return await anyio.to_thread.run_sync(add, limiter=_DECODERS)
    except PackageError as exc:
        log.warning("package upload for tenant %s refused: %s", request.path_params.get("tenant_id"), exc)
        raise BadRequest(400, str(exc)) from None


def _about_kept(answer: Callable[[Decoded, Request], Any]) -> Callable[[Request], Awaitable[Response]]:
    """A read-only route about a kept package: checks, the package, then ``answer``'s data."""

    async def endpoint(request: Request) -> Response:
        try:
            _checked(request)
            data = answer(_kept(request), request)
        except BadRequest as exc:
            return _refused(exc)
        return success(data)

    return endpoint


def _readme(decoded: Decoded, request: Request) -> dict[str, str]:
    """One README: the language asked for, else en_US, else any (upstream's order)."""
    readmes = decoded.readmes
    if not readmes:
        raise BadRequest(404, "no readme content available for this plugin")
    language = request.query_params.get("language", "")
    if language not in readmes:
        language = "en_US" if "en_US" in readmes else sorted(readmes)[0]
    return {"content": readmes[language], "language": language}


decode_from_identifier = _about_kept(lambda decoded, _: _answer(decoded))
fetch_manifest = _about_kept(lambda decoded, _: decoded.manifest)
fetch_readme = _about_kept(_readme)
