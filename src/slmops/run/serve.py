"""`slmops serve`: registered models behind an OpenAI-compatible HTTP API (FastAPI on uvicorn).

Each model answers through its ChatRunner, as `model run` does: the registry's runtime or ORT GenAI, the checked
template, the same control-token neutralisation. Generation runs in worker threads. A model answers `parallel`
requests at once and keeps at most `max_queue` more waiting; past that a request gets 429 at once rather than a
hung connection. A client that goes away stops its generation at the next token; so does shutting down."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import datetime
import json
import os
import secrets
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from slmops import progress
from slmops.errors import SlmopsError
from slmops.plugin.roles import Registry
from slmops.run import adapters, structure, tools
from slmops.run.chat_session import ChatRunner

MAX_BODY_BYTES = 1 << 20  # a request larger than any context these models have
MAX_DEPTH = 32  # JSON nesting a chat request needs: 4 levels; deeper is refused before it can exhaust the stack
INT32_MAX = 2**31 - 1
DONE = object()


class ApiError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        param: str | None = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.kind = status, message, code, param, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# -- the request, as the OpenAI API defines it (the fields slmops honours; others are ignored) -----------------
class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class CalledFunction(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    name: str
    arguments: str


class ToolCall(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    id: str = ""
    type: Literal["function"] = "function"
    function: CalledFunction


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool result: the call it answers

    def plain(self) -> dict[str, Any]:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ApiError(400, f"a {self.role} message needs content", param="messages")
        content = self.content or ""
        text = content if isinstance(content, str) else "".join(p.text for p in content)
        plain: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": text}
        if self.tool_calls:
            plain["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        return plain


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    name: str = Field("response", max_length=64)
    schema_: dict[str, Any] = Field(default_factory=lambda: {"type": "object"}, alias="schema")
    strict: bool | None = None  # always strict here: the grammar engine admits nothing the schema does not


class ResponseFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def constraint(self) -> structure.Constraint | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return structure.JSON_OBJECT
        if self.json_schema is None:
            raise ApiError(400, "response_format.json_schema is missing; send {name, schema}", param="response_format")
        try:
            return structure.json_schema(self.json_schema.schema_, "response_format.json_schema.schema")
        except SlmopsError as e:
            raise ApiError(400, str(e), param="response_format") from None


class ChatRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    # bounded: the runtimes read these as 32-bit integers ("stoi" errors past that)
    max_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    stop: str | list[str] | None = Field(None, max_length=4)
    seed: int | None = Field(None, ge=-INT32_MAX - 1, le=INT32_MAX)
    n: int = Field(1, ge=1, le=1)
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None  # read by tools.ToolUse.of, which says what is wrong with them
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # true: several calls in one answer (default one: tools.ToolUse)

    def options(self, defaults: dict[str, Any]) -> dict[str, Any]:
        """The runtime options: the model's ModelConfig, overridden by what the request sets."""
        options = dict(defaults)
        for key, value in (
            ("temperature", self.temperature),
            ("top_p", self.top_p),
            ("seed", self.seed),
            ("stop", self.stop),
            ("max_new_tokens", self.max_completion_tokens or self.max_tokens),
            ("constraint", self.response_format and self.response_format.constraint()),
        ):
            if value is not None:
                options[key] = value
        return options


def parse_request(body: bytes) -> ChatRequest:
    try:
        data = json.loads(body)
    except ValueError as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None
    except RecursionError:
        data = None
    if data is None or depth(data) > MAX_DEPTH:
        raise ApiError(400, f"the request body nests JSON deeper than {MAX_DEPTH} levels")
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return ChatRequest.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ApiError(400, f"{where}: {first['msg']}", param=where) from None


def depth(data: Any) -> int:
    """How deep JSON nests (a scalar: 0), walked without recursion."""
    deepest, todo = 0, [(data, 1)]
    while todo:
        value, level = todo.pop()
        if isinstance(value, (dict, list)):
            deepest = max(deepest, level)
            todo += [(v, level + 1) for v in (value.values() if isinstance(value, dict) else value)]
    return deepest


# -- models and their turns -------------------------------------------------------------------------------------
class ServedModel:
    """One model and its admission control: `parallel` requests generate, `max_queue` wait, the rest get 429."""

    def __init__(self, runner: ChatRunner, parallel: int, max_queue: int):
        self.runner, self.name, self.parallel, self.max_queue = runner, runner.entry.name, parallel, max_queue
        self.active = self.waiting = 0
        self.pieces_sent = 0  # text pieces handed to clients so far: /health shows that a generation has stopped
        self.free = asyncio.Semaphore(parallel)  # binds to the server's event loop at first use

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        if self.active + self.waiting >= self.parallel + self.max_queue:
            raise ApiError(
                429,
                f"{self.name} is busy ({self.active} answering, {self.waiting} waiting); retry shortly",
                code="rate_limit_exceeded",
                kind="rate_limit_error",
            )
        self.waiting += 1
        try:
            await self.free.acquire()
        finally:
            self.waiting -= 1
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1
            self.free.release()

    def describe(self, adapter: str | None = None) -> dict[str, Any]:
        e = self.runner.entry
        created = int(datetime.datetime.fromisoformat(e.registered_at).timestamp()) if e.registered_at else 0
        return {
            "id": f"{self.name}:{adapter}" if adapter else self.name,
            "object": "model",
            "created": created,
            "owned_by": "slmops",
            "family": e.family,
            "precision": e.precision,
            "engine": self.runner.engine,
            **({"adapter": adapter} if adapter else {}),
        }

    def listed(self) -> list[dict[str, Any]]:
        """This model, and itself with each adapter its folder holds now (base:adapter)."""
        return [self.describe(), *(self.describe(name) for name in adapters.find(self.runner.model_dir))]


@dataclass
class ServeSettings:
    parallel: int = 1
    max_queue: int = 16
    api_key: str | None = None


class Server:
    """The served models and the generations running for them."""

    def __init__(self, models: dict[str, ServedModel], settings: ServeSettings):
        self.models, self.settings = models, settings
        self.stopping = threading.Event()
        self.executor = ThreadPoolExecutor(
            max_workers=sum(m.parallel for m in models.values()) + 1, thread_name_prefix="slmops-generate"
        )

    def model(self, name: str) -> ServedModel:
        self.drop_removed()
        if name not in self.models:
            raise ApiError(
                404,
                f"the model {name!r} is not served here; models: {', '.join(self.models)}",
                code="model_not_found",
                param="model",
            )
        return self.models[name]

    def route(self, name: str) -> tuple[ServedModel, str | None]:
        """The served model a request's `model` names, and the adapter it asks for: "base:sales" is the model base
        answering with its adapter sales (found in its folder at this request: one added since serving began is
        served too), "base:none" the base without any."""
        base, _, adapter = name.partition(":")
        model = self.model(base if adapter else name)
        if adapter and adapter != "none" and adapter not in adapters.find(model.runner.model_dir):
            have = ", ".join(adapters.find(model.runner.model_dir)) or "none"
            raise ApiError(
                404,
                f"{model.name} has no adapter {adapter!r} (it has: {have})",
                code="model_not_found",
                param="model",
            )
        if adapter and model.runner.engine == "registry":
            raise ApiError(400, f"{model.name} runs in {model.runner.registry.name}, which cannot switch adapters")
        return model, adapter or None

    def drop_removed(self) -> None:
        """Stop serving models whose folder is gone (`slmops cache rm` while serving): 404 from then on."""
        for name, model in list(self.models.items()):
            folder = model.runner.entry.path
            if folder and not (Path(folder) / "genai_config.json").is_file():
                del self.models[name]
                print(f"slmops serve: {name} was removed from the registry; it is no longer served", file=sys.stderr)

    async def generate(
        self,
        model: ServedModel,
        messages: list[dict[str, str]],
        options: dict[str, Any],
        usage: dict[str, Any],
        cancel: threading.Event,
    ) -> AsyncIterator[str]:
        """The answer's pieces as the worker thread makes them; cancel (or shutdown) stops it at the next token."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def put(item: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening any more
                loop.call_soon_threadsafe(queue.put_nowait, item)

        def produce() -> None:
            pieces = model.runner.generate(messages, options, usage)  # the turn was checked before the answer began
            try:
                for piece in pieces:
                    if cancel.is_set() or self.stopping.is_set():
                        break
                    model.pieces_sent += 1
                    put(piece)
            except Exception as e:  # handed to the request, which answers it as an API error
                put(e)
            finally:
                pieces.close()
                put(DONE)

        worker = loop.run_in_executor(self.executor, produce)
        try:
            while (item := await queue.get()) is not DONE:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            cancel.set()
            with contextlib.suppress(Exception):
                await asyncio.shield(worker)  # the model's slot is free only once its thread has stopped


def create_app(server: Server) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        server.stopping.set()
        server.executor.shutdown(wait=True)

    app = FastAPI(title="slmops", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        code = "not_found" if e.status_code == 404 else "method_not_allowed" if e.status_code == 405 else None
        return JSONResponse(
            ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", code).body(),
            status_code=e.status_code,
        )

    async def require_key(request: Request) -> None:
        key = server.settings.api_key
        if key and not secrets.compare_digest(
            request.headers.get("authorization", "").encode(), f"Bearer {key}".encode()
        ):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", "invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "models": [
                {
                    "id": m.name,
                    "engine": m.runner.engine,
                    "answering": m.active,
                    "waiting": m.waiting,
                    "pieces_sent": m.pieces_sent,
                }
                for m in server.models.values()
            ],
        }

    @v1.get("/models")
    async def list_models() -> dict[str, Any]:
        server.drop_removed()
        return {"object": "list", "data": [row for m in server.models.values() for row in m.listed()]}

    @v1.get("/models/{name}")
    async def one_model(name: str) -> dict[str, Any]:
        model, adapter = server.route(name)
        return model.describe(adapter)

    @v1.post("/chat/completions")
    async def chat_completions(request: Request) -> Any:
        try:
            return await answer(request)
        except (ApiError, HTTPException):
            raise
        except Exception as e:  # a bug: a JSON 500 and one log line, never a traceback per request
            print(f"slmops serve: error: {type(e).__name__}: {e}", file=sys.stderr)
            raise ApiError(500, f"{type(e).__name__}: {e}", kind="server_error") from None

    async def answer(request: Request) -> Any:
        body = await read_body(request)
        req = parse_request(body)
        model, adapter = server.route(req.model)
        options = req.options(model.runner.options)
        if adapter:
            options["adapter"] = adapter
        try:
            family = model.runner.chosen.family
            use = tools.ToolUse.of(req.tools, req.tool_choice, family.tools, req.parallel_tool_calls is True)
            if use is not None and options.get("constraint") is not None:
                raise ApiError(400, "response_format with tools is not supported; send one of them", param="tools")
            messages = model.runner.with_tools([m.plain() for m in req.messages], use, options)
        except structure.ConstraintError as e:
            raise ApiError(400, str(e), param="tool_choice" if "tool_choice" in str(e) else "tools") from None
        try:  # before any status line goes out: a prompt no runtime can answer is the client's error
            prompt_tokens = await asyncio.to_thread(model.runner.check_turn, messages, options)
        except SlmopsError as e:
            code = "context_length_exceeded" if "context" in str(e) else None
            tool_error = use is not None and isinstance(e, structure.ConstraintError)
            param = (
                "tools" if tool_error else "response_format" if isinstance(e, structure.ConstraintError) else "messages"
            )
            raise ApiError(400, str(e), code=code, param=param) from None
        cancel = threading.Event()
        watcher = asyncio.create_task(watch_disconnect(request, cancel))
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            turn = model.turn()
            await turn.__aenter__()  # a 429 is still answered as JSON, before the stream starts
            events = stream_events(
                server, model, messages, options, cancel, completion_id, created, include_usage, prompt_tokens, use,
                req.model,
            )  # fmt: skip
            return StreamingResponse(
                finish_after(events, turn, watcher),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            async with model.turn():
                usage: dict[str, Any] = {}
                try:
                    text = "".join([p async for p in server.generate(model, messages, options, usage, cancel)])
                except SlmopsError as e:
                    raise ApiError(500, str(e), kind="server_error") from None
        finally:
            watcher.cancel()
        message: dict[str, Any] = {"role": "assistant", "content": text}
        finish = usage.get("finish_reason", "stop")
        if use is not None:
            message["content"], calls = use.parse(text)
            if calls:
                message["tool_calls"], finish = calls, "tool_calls"
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": req.model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
            "usage": usage_body(usage, prompt_tokens),
        }

    app.include_router(v1)
    return app


async def read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ApiError(
            413, f"the request is {int(declared)} bytes, more than {MAX_BODY_BYTES}", code="request_too_large"
        )
    body = b""
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                raise ApiError(413, f"the request is more than {MAX_BODY_BYTES} bytes", code="request_too_large")
    except ClientDisconnect:  # the client hung up before its body was whole: nobody to answer, nothing to log
        raise ApiError(400, "the client closed the connection before sending the whole request") from None
    return body


async def watch_disconnect(request: Request, cancel: threading.Event) -> None:
    """Set cancel when the client goes away (the body is read by then, so the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            cancel.set()
            return


def usage_body(usage: dict[str, Any], prompt_tokens: int) -> dict[str, int]:
    """OpenAI's usage object; prompt_tokens: slmops's own count, for a runtime that reports none."""
    prompt, completion = usage.get("prompt_tokens", prompt_tokens), usage.get("completion_tokens", 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def stream_events(
    server: Server,
    model: ServedModel,
    messages: list[dict[str, str]],
    options: dict[str, Any],
    cancel: threading.Event,
    completion_id: str,
    created: int,
    include_usage: bool,
    prompt_tokens: int,
    use: tools.ToolUse | None = None,
    name: str | None = None,
) -> AsyncIterator[str]:
    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        return sse(
            {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": name or model.name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
                **extra,
            }
        )

    usage: dict[str, Any] = {}
    watcher = tools.CallWatcher(use) if use is not None else None
    yield chunk({"role": "assistant", "content": ""})
    try:
        async for piece in server.generate(model, messages, options, usage, cancel):
            if text := watcher.push(piece) if watcher else piece:
                yield chunk({"content": text})
    except SlmopsError as e:  # the status line is gone: OpenAI clients read an "error" object in the stream
        yield sse(ApiError(500, str(e), kind="server_error").body())
        yield "data: [DONE]\n\n"
        return
    finish = usage.get("finish_reason", "stop")
    if watcher is not None:
        text, calls = watcher.finish()
        if text:
            yield chunk({"content": text})
        for i, call in enumerate(calls):  # each call: its name first, then its arguments, as OpenAI streams them
            named = {"name": call["function"]["name"], "arguments": ""}
            yield chunk({"tool_calls": [{"index": i, "id": call["id"], "type": "function", "function": named}]})
            yield chunk({"tool_calls": [{"index": i, "function": {"arguments": call["function"]["arguments"]}}]})
        finish = "tool_calls" if calls else finish
    yield chunk({}, finish)
    if include_usage:
        yield sse(
            {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model.name,
                "choices": [],
                "usage": usage_body(usage, prompt_tokens),
            }
        )
    yield "data: [DONE]\n\n"


async def finish_after(events: AsyncIterator[str], turn: Any, watcher: asyncio.Task) -> AsyncIterator[str]:
    """The stream, then the model's slot freed and the disconnect watcher stopped, however the stream ends."""
    try:
        async for event in events:
            yield event
    finally:
        watcher.cancel()
        with contextlib.suppress(Exception):
            await events.aclose()
        await turn.__aexit__(None, None, None)


# -- starting it ---------------------------------------------------------------------------------------------------
def limit_malloc_arenas(count: int = 1) -> None:
    """Keep glibc to one malloc arena (unless MALLOC_ARENA_MAX says otherwise), so memory one request frees is what
    the next one reuses. By default each thread may get its own arena (8 per core) and keep what it freed: the server
    grew in steps of a few hundred MB, and two arenas still held two of those steps; with one it stays flat, and
    parallel generations are as fast (docs/architecture.md, "The measurements behind the constants")."""
    if sys.platform.startswith("linux") and "MALLOC_ARENA_MAX" not in os.environ:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").mallopt(-8, count)  # -8: M_ARENA_MAX


def open_models(registry: Registry, names: list[str], engine: str, settings: ServeSettings) -> dict[str, ServedModel]:
    """Load the named registered models (all of them when names is empty), each once."""
    limit_malloc_arenas()  # before the runtimes start their threads
    names = names or sorted(e.name for e in registry.list())
    if not names:
        raise SlmopsError(
            f"no models are registered in {registry.name} at {registry.root}; deploy one with `slmops deploy`"
        )
    models = {}
    for name in dict.fromkeys(names):
        runner = ChatRunner(registry, name, engine, {})
        with progress.step(f"Loading {runner.entry.name}"):
            runner.load()
        # Foundry Local's in-process runtime is not known to be safe with requests in parallel on one model.
        parallel = settings.parallel if runner.engine == "ort-genai" else 1
        models[runner.entry.name] = ServedModel(runner, parallel, settings.max_queue)
    return models


def bind(host: str, port: int) -> socket.socket:
    """The listening socket (port 0: any free port), so a port in use is a clear error before anything starts."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as e:
        raise SlmopsError(f"cannot listen on {host!r}: {e.strerror}; pass an address such as 127.0.0.1") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise SlmopsError(f"cannot listen on {host}:{port}: {e.strerror}; pick another port with --port") from None
    sock.listen(128)
    return sock


def run(server: Server, sock: socket.socket) -> None:
    """Serve until Ctrl-C or SIGTERM: then generations stop at their next token, open streams end with [DONE]
    and the server exits."""
    import uvicorn

    class Uvicorn(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            server.stopping.set()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        create_app(server), log_level="warning", access_log=False, timeout_graceful_shutdown=5, lifespan="on"
    )
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn raises the signal again once it has shut down
        Uvicorn(config).run(sockets=[sock])


def is_loopback(host: str) -> bool:
    return host in ("localhost", "127.0.0.1", "::1") or host.startswith("127.")
