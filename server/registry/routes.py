"""Admin API for the model registry: versions, BOMs, verification, evaluation, promotion and rollback.

Promotion and rollback are privileged (`models:promote`, MFA step-up) and audited; they move the active
alias, and every replica hot-swaps its engine to it (`server.engine.swap`; this one at once, the others
within a second). The registry is an installation resource: reading it (stored paths, provenance, signers,
evaluation detail, BOMs) needs `registry:read`; the served models' names, versions and digests are public
to any `models:read` caller through `GET /v1/models`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from sqlalchemy.orm import Session
from starlette.responses import Response

from server.api.body import read_body
from server.api.protocol import StrictModel, parse_request
from server.audit.service import Actor
from server.errors import Conflict, InvalidRequest, NotFound
from server.identity.authn import client_addr, principal_of
from server.identity.authz import requires

router = APIRouter(prefix="/v1/admin/models")
T = TypeVar("T")


class EvaluationRun(StrictModel):
    # After human review: accept drift against the active version past the suite's threshold (recorded).
    accept_drift: bool = False


async def _registry(request: Request, work: Callable[[Session, Actor], T]) -> T:
    actor = principal_of(request).actor(client_addr(request))

    def run() -> T:
        with request.app.state.db.session() as session:
            return work(session, actor)

    return await _in_thread(run)


async def _in_thread(run: Callable[[], T]) -> T:
    """Run blocking registry work off the event loop and render its refusals as API errors."""
    from server.registry.catalog import InvalidTransition, RegistryError, UnknownModel
    from server.registry.signing import VerificationFailed

    try:
        return await asyncio.to_thread(run)
    except UnknownModel as exc:
        raise NotFound(str(exc)) from None
    except InvalidTransition as exc:
        raise Conflict(str(exc)) from None
    except VerificationFailed as exc:
        raise InvalidRequest(f"verification failed: {exc.reason}", code="verification_failed") from None
    except RegistryError as exc:
        raise Conflict(exc.reason) from None


def _store(request: Request) -> Any:
    from server.registry.store import BlobStore

    return BlobStore(request.app.state.settings.data_dir)


@router.get("", dependencies=[requires("registry:read")])
async def list_models(request: Request) -> dict[str, Any]:
    from server.registry import catalog

    return {"object": "list", "data": await _registry(request, lambda s, a: catalog.list_models(s))}


@router.get("/{name}", dependencies=[requires("registry:read")])
async def show_model(name: str, request: Request) -> dict[str, Any]:
    from server.registry import catalog

    return await _registry(request, lambda s, a: catalog.show(s, name))


@router.get("/{name}/versions/{version}/bom", dependencies=[requires("registry:read")])
async def version_bom(name: str, version: str, request: Request) -> Response:
    from server.registry import catalog

    view = await _registry(request, lambda s, a: catalog.show(s, name))
    match = next((v for v in view["versions"] if v["version"] == version), None)
    if match is None:
        raise NotFound(f"{name} has no version {version!r}.")
    data = await asyncio.to_thread(_store(request).read_meta, match["digest"], "bom.json")
    return Response(data, media_type="application/vnd.cyclonedx+json")


@router.post("/{name}/verify", dependencies=[requires("models:write")])
async def verify_model(name: str, request: Request) -> dict[str, Any]:
    from server.registry import catalog
    from server.registry.loader import trust

    version = request.query_params.get("version")
    settings = request.app.state.settings
    manifest = await _registry(
        request, lambda s, a: catalog.verify_version(s, _store(request), name, version, trust=trust(settings), actor=a)
    )
    return {"name": name, "verified": True, "digest": manifest.root, "signer": manifest.signer}


@router.post("/{name}/versions/{version}/evaluate", dependencies=[requires("models:write")])
async def evaluate_version(name: str, version: str, request: Request) -> dict[str, Any]:
    """Run the pre-promotion suite on the version's verified stored bytes and record it (blocks a thread)."""
    from server.registry import evaluation
    from server.registry.loader import trust

    body = parse_request(EvaluationRun, await read_body(request, 4096, allow_empty=True))
    settings, actor = request.app.state.settings, principal_of(request).actor(client_addr(request))
    lock = _evaluation_lock(request)
    if lock.locked():
        raise Conflict("An evaluation is already running on this replica; retry when it has finished.")
    async with lock:
        return await _in_thread(
            lambda: evaluation.evaluate_version(
                request.app.state.db,
                _store(request),
                name,
                version,
                trust=trust(settings),
                settings=settings.registry.evaluation,
                actor=actor,
                accept_drift=body.accept_drift,
            )
        )


def _evaluation_lock(request: Request) -> asyncio.Lock:
    """One evaluation at a time per replica: each one holds whole models in memory."""
    state = request.app.state
    lock = getattr(state, "registry_evaluation_lock", None)
    if lock is None:
        lock = state.registry_evaluation_lock = asyncio.Lock()
    return lock


@router.post("/{name}/versions/{version}/promote", dependencies=[requires("models:promote")])
async def promote_version(name: str, version: str, request: Request) -> dict[str, Any]:
    from server.registry import catalog

    view = await _registry(request, lambda s, a: catalog.promote(s, name, version, a))
    _poke_swapper(request)
    return view


@router.post("/{name}/rollback", dependencies=[requires("models:promote")])
async def rollback_model(name: str, request: Request) -> dict[str, Any]:
    from server.registry import catalog

    view = await _registry(request, lambda s, a: catalog.rollback(s, name, a))
    _poke_swapper(request)
    return view


def _poke_swapper(request: Request) -> None:
    """This replica swaps its engine at once; the others within their next poll (a second)."""
    swapper = getattr(request.app.state, "swapper", None)
    if swapper is not None:
        swapper.poke()
