"""Tinker-compatible REST surface, session half (``/api/v1``): sessions, models and futures.

What ``tinker checkpoint download`` needs from a "training" service: sessions, heartbeats,
create-via-load, get_info, ``save_weights_external`` (a PEFT export job) and the ``retrieve_future``
long-poll.

Training itself (forward/backward, optimizer steps, sampling, saving from a live model) is out of
scope: those endpoints answer 400 ``unsupported`` at once, a status the SDK does not retry. A
heartbeat for a finished session raises ``SessionFinished``, which the error table answers 410.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from weightstore.errors import Unsupported
from weightstore.tinker import sessions as tinker_sessions

from ..deps import CtxDep, CurrentPrincipal, SessionDep, WriterPrincipal
from .tinker_schemas import (
    CreateSessionBody,
    CreateSessionPublic,
    FinishBody,
    FuturePublic,
    GetInfoPublic,
    LoadWeightsBody,
    ModelDataPublic,
    ModelIdBody,
    RetrieveFutureBody,
    SaveExternalBody,
    SessionIdBody,
)

router = APIRouter(prefix="/api/v1", tags=["tinker-sessions"])

LONG_POLL_SECONDS = 20.0
"""How long ``retrieve_future`` holds a poll open before answering ``try_again``: the SDK re-polls
at once, so a long hold saves round trips; it must stay under the SDK's 45 s request timeout."""
POLL_INTERVAL_SECONDS = 0.2


@router.post("/create_session", operation_id="tinker_create_session", response_model=CreateSessionPublic)
def create_session(body: CreateSessionBody, principal: CurrentPrincipal, ctx: CtxDep, session: SessionDep) -> CreateSessionPublic:
    sid = tinker_sessions.create_session(
        session, principal, now=ctx.clock.now(), user_metadata=body.user_metadata, tags=body.tags, project_id=body.project_id
    )
    return CreateSessionPublic(
        session_id=sid, info_message="weightstore: storage and export only; training and sampling are not available"
    )


@router.post("/session_heartbeat", operation_id="tinker_session_heartbeat")
def session_heartbeat(body: SessionIdBody, principal: CurrentPrincipal, session: SessionDep) -> JSONResponse:
    tinker_sessions.heartbeat(session, principal, body.session_id)
    return JSONResponse({"type": "session_heartbeat"})


@router.post("/sessions/{session_id}/finish", operation_id="tinker_finish_session")
def finish_session(
    session_id: str, principal: CurrentPrincipal, ctx: CtxDep, session: SessionDep, body: FinishBody | None = None
) -> dict[str, str]:
    reason = (body.reason or {}).get("type") if body is not None else None
    tinker_sessions.finish_session(session, principal, session_id, str(reason) if reason else None, now=ctx.clock.now())
    return {"status": "finished"}


@router.post("/load_weights", operation_id="tinker_load_weights", response_model=FuturePublic)
def load_weights(body: LoadWeightsBody, principal: WriterPrincipal, ctx: CtxDep, session: SessionDep) -> FuturePublic:
    """Create-via-load only (``session_id`` + ``model_seq_id``): loading into a live model is training."""
    if body.session_id is None or body.model_seq_id is None:
        raise Unsupported("loading weights into an existing model is training, which weightstore does not do")
    request_id, model_id = tinker_sessions.load_weights(
        session,
        principal,
        now=ctx.clock.now(),
        session_id=body.session_id,
        model_seq_id=body.model_seq_id,
        path=body.path,
        base_model=body.base_model,
        user_metadata=body.user_metadata,
    )
    return FuturePublic(request_id=request_id, model_id=model_id)


@router.post("/get_info", operation_id="tinker_get_info", response_model=GetInfoPublic)
def get_info(body: ModelIdBody, principal: CurrentPrincipal, session: SessionDep) -> GetInfoPublic:
    info = tinker_sessions.get_info(session, principal, body.model_id)
    return GetInfoPublic(
        model_data=ModelDataPublic(model_name=info.base_model, tokenizer_id=info.base_model),
        model_id=info.model_id,
        is_lora=True,
        lora_rank=info.lora_rank,
        model_name=info.base_model,
    )


@router.post("/save_weights_external", operation_id="tinker_save_weights_external", response_model=FuturePublic)
def save_weights_external(body: SaveExternalBody, principal: WriterPrincipal, ctx: CtxDep) -> FuturePublic:
    request_id = tinker_sessions.save_weights_external(
        ctx,
        principal,
        model_id=body.model_id,
        name=body.path,
        ttl_seconds=body.ttl_seconds,
        age_recipients=body.age_encryption_recipients,
    )
    return FuturePublic(request_id=request_id, model_id=body.model_id)


@router.post("/retrieve_future", operation_id="tinker_retrieve_future")
def retrieve_future(body: RetrieveFutureBody, principal: CurrentPrincipal, ctx: CtxDep) -> JSONResponse:
    """The final result, ``{"error", "category"}`` for a failed job, or — after holding the poll
    for up to ``LONG_POLL_SECONDS`` — ``{"type": "try_again"}`` while the export job runs."""
    result = tinker_sessions.wait_for_future(
        ctx, principal, body.request_id, timeout_seconds=LONG_POLL_SECONDS, interval_seconds=POLL_INTERVAL_SECONDS
    )
    if result is None:
        return JSONResponse({"type": "try_again", "request_id": body.request_id, "queue_state": "active"})
    return JSONResponse(result)


def _unsupported(what: str) -> None:
    raise Unsupported(
        f"{what} is not supported: weightstore stores and exports checkpoints, it does not "
        "train or sample (use a Tinker service for that)"
    )


# Training and sampling endpoints of the SDK: a clear, non-retried 400 instead of a 404 or a hang.
for _path, _what in [
    ("/create_model", "creating a model"),
    ("/forward_backward", "forward_backward"),
    ("/forward", "forward"),
    ("/optim_step", "optim_step"),
    ("/save_weights", "save_state"),
    ("/save_weights_for_sampler", "save_weights_for_sampler"),
    ("/asample", "sampling"),
    ("/create_sampling_session", "sampling"),
    ("/join_sampling_session", "sampling"),
    ("/create_custom_loss", "custom losses"),
    ("/unload_model", "unload_model"),
    ("/retrieve_futures", "batched retrieve_futures"),
]:

    def _handler(principal: CurrentPrincipal, _what: str = _what) -> None:
        _unsupported(_what)

    router.add_api_route(
        _path,
        _handler,
        methods=["POST"],
        operation_id="tinker_unsupported" + _path.replace("/", "_"),
        responses={400: {"description": "Unsupported here"}},
        include_in_schema=True,
    )

__all__ = ["router"]
