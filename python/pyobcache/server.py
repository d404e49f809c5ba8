"""An OpenAI-compatible HTTP server over one model (``pip install "pyobcache[server]"``).

    python -m pyobcache serve -m smollm2-135m --kv-budget 512 --port 8080

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions``,
``POST /v1/chat/completions`` (``"stream": true`` sends server-sent events), and llama-server's
``POST /tokenize`` and ``POST /detokenize``. A request may bound its own KV cache with an extra
body field ``"kv": {"method": "obc-k+snapkv", "budget": 256, ...}`` (the fields of
:class:`pyobcache.KVConfig`), a spec string such as ``"obc-k+snapkv,budget=256"``, or ``"full"``, and ``usage`` reports the KV bytes used. A request
whose prompt extends an earlier request's whole sequence (a chat client sending its history again)
continues that conversation's cache and prefills only the new tokens (``cache_prompt``, as in
llama-server; ``usage.prompt_tokens_details.cached_tokens`` says how many were reused).

Concurrency: ``parallel`` requests run at once (default 1), each in its own engine context; the
others wait in arrival order. A client that disconnects in the middle of a stream stops its
generation at the next token. Bad requests get OpenAI-style error bodies with a 4xx status.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Dict, List, Optional, Union

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette.sse import EventSourceResponse

from .compat import Llama
from .kv import KVConfig

__all__ = ["create_app", "serve"]


class _Request(BaseModel):
    # Clients send fields this server does not use (user, stream_options, ...): ignore them.
    model_config = ConfigDict(extra="ignore")
    model: Optional[str] = None
    max_tokens: Optional[int] = None
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: Optional[Union[str, List[str]]] = None
    seed: Optional[int] = None
    stream: bool = False
    n: int = 1
    kv: Optional[Union[str, Dict[str, Any]]] = None
    cache_prompt: bool = True     # llama-server's name: continue a cached conversation when the prompt extends it


class CompletionRequest(_Request):
    prompt: Union[str, List[int], List[str]]
    max_tokens: Optional[int] = 16
    logprobs: Optional[int] = Field(default=None, ge=0, le=20)
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: Union[str, List[Dict[str, Any]], None] = None


class ChatRequest(_Request):
    messages: List[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = None
    temperature: float = 0.2     # llama-cpp-python's chat default
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=20)
    response_format: Optional[Dict[str, Any]] = None


class TokenizeRequest(BaseModel):
    content: str
    add_special: bool = False
    parse_special: bool = True


class DetokenizeRequest(BaseModel):
    tokens: List[int]


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param


def _error(status: int, message: str, type_: str = "invalid_request_error", param: Optional[str] = None) -> JSONResponse:
    return JSONResponse(status_code=status,
                        content={"error": {"message": message, "type": type_, "param": param, "code": None}})


def _kv(spec) -> Optional[KVConfig]:
    if spec is None:
        return None
    try:
        # "full", a spec string ("snapkv,budget=256") or an object of KVConfig fields.
        return KVConfig.from_spec(spec) if isinstance(spec, str) else KVConfig(**spec)
    except (TypeError, ValueError) as e:
        raise ApiError(400, f"kv: {e}", param="kv") from None


def create_app(llama: Llama, model_name: str, api_key: Optional[str] = None, parallel: int = 1) -> FastAPI:
    """The FastAPI app serving ``llama`` under the model id ``model_name``."""
    if parallel < 1:
        raise ValueError("parallel must be at least 1")
    app = FastAPI(title="pyobcache", description="An OpenAI-compatible server with a bounded, OBCache-evicted KV cache")
    slots = asyncio.Semaphore(parallel)
    busy = [0]   # requests holding a slot, for /health
    created = int(time.time())

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        if request.headers.get("authorization", "") != f"Bearer {api_key}":
            raise ApiError(401, "invalid or missing API key (Authorization: Bearer ...)", "authentication_error")

    @app.exception_handler(ApiError)
    async def _api_error(_request, e: ApiError):
        return _error(e.status, e.message, e.type, e.param)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(400, f"{where}: {first.get('msg', 'invalid request')}" if where else "invalid request body",
                      param=where or None)

    @app.get("/health")
    async def health():
        # llama-server's slot counts: a client can see when a stopped stream has freed its slot.
        return {"status": "ok", "slots_idle": parallel - busy[0], "slots_processing": busy[0]}

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "pyobcache"}]}

    def common(req: _Request) -> dict:
        if req.n != 1:
            raise ApiError(400, "only n=1 is supported", param="n")
        return dict(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
                    repeat_penalty=req.repeat_penalty, presence_penalty=req.presence_penalty,
                    frequency_penalty=req.frequency_penalty, stop=req.stop, seed=req.seed, model=model_name,
                    kv=_kv(req.kv), cache_prompt=req.cache_prompt)

    async def respond(request: Request, make, stream: bool):
        """Runs ``make()`` (a llama call) in a worker thread once a slot is free."""
        await slots.acquire()
        busy[0] += 1
        released = [False]

        def release():
            if not released[0]:
                released[0] = True
                busy[0] -= 1
                slots.release()

        try:
            result = await anyio.to_thread.run_sync(_call, make)
        except BaseException:
            release()
            raise
        if not stream:
            release()
            return result

        async def cleanup():
            # A closed generator frees its engine context, so the generation stops, and the
            # slot is free again; shielded, since this also runs when the client went away.
            with anyio.CancelScope(shield=True):
                try:
                    await anyio.to_thread.run_sync(result.close)
                finally:
                    release()

        async def events():
            while not await request.is_disconnected():
                try:
                    chunk = await anyio.to_thread.run_sync(next, result, None)
                except Exception as e:   # after the 200: tell the client in the stream, then end it
                    yield {"data": json.dumps({"error": {"message": str(e), "type": "server_error",
                                                         "param": None, "code": None}})}
                    break
                if chunk is None:
                    break
                yield {"data": json.dumps(chunk)}
            yield {"data": "[DONE]"}

        return _Stream(events(), cleanup)

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(req: CompletionRequest, request: Request):
        kw = common(req)
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ApiError(400, "only one prompt per request is supported", param="prompt")
            prompt = prompt[0]
        return await respond(request, lambda: llama.create_completion(
            prompt, max_tokens=req.max_tokens, logprobs=req.logprobs, echo=req.echo, stream=req.stream, **kw),
            req.stream)

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat(req: ChatRequest, request: Request):
        kw = common(req)
        messages = [m.model_dump() for m in req.messages]
        for m in messages:
            if m["content"] is None:
                m["content"] = ""
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        return await respond(request, lambda: llama.create_chat_completion(
            messages, max_tokens=max_tokens, logprobs=req.logprobs, top_logprobs=req.top_logprobs,
            response_format=req.response_format, stream=req.stream, **kw), req.stream)

    @app.post("/tokenize", dependencies=[Depends(check_key)])
    async def tokenize(req: TokenizeRequest):
        return {"tokens": llama.model.tokenize(req.content, add_special=req.add_special,
                                               parse_special=req.parse_special)}

    @app.post("/detokenize", dependencies=[Depends(check_key)])
    async def detokenize(req: DetokenizeRequest):
        try:
            return {"content": llama.model.detokenize(req.tokens)}
        except ValueError as e:
            raise ApiError(400, str(e), param="tokens") from None

    return app


class _Stream(EventSourceResponse):
    """An SSE response that runs its cleanup however the response ends: finished, cancelled
    by a disconnect, or failed before its body ever started."""

    def __init__(self, body, cleanup):
        super().__init__(body, ping=15)
        self._cleanup = cleanup

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._cleanup()


def _call(make):
    try:
        return make()
    except (ValueError, TypeError) as e:
        raise ApiError(400, str(e)) from None


def serve(llama: Llama, model_name: str, host: str = "127.0.0.1", port: int = 8080, api_key: Optional[str] = None,
          parallel: int = 1) -> None:
    """Serves until interrupted (uvicorn)."""
    import uvicorn

    uvicorn.run(create_app(llama, model_name, api_key, parallel), host=host, port=port, log_level="info")
