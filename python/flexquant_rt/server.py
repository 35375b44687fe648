"""An OpenAI-compatible HTTP server: `flexquant-rt serve MODEL`.

Routes: GET /health, GET /v1/models, GET /v1/models/{id}, POST /v1/completions and
POST /v1/chat/completions (JSON, or server-sent events with "stream": true). Needs the `serve`
extra (FastAPI + uvicorn); nothing else in the package imports this module.

Concurrency: one Engine, owned by one worker thread; requests wait in a bounded FIFO queue
(--max-queue; a full queue answers 503). With an engine of one sequence (the default) they run one
at a time; before each request the worker resets the KV cache and the bit mask and applies the
request's own sampler and precision controller. With `--batch N` (an engine of n_seq = N) up to N
requests decode together (continuous batching, flexquant_rt.batch): each step is one pass in which
every weight is read once for all of them, each request has its own KV cache, sampler and a copy
of its controller, the step runs at the elementwise maximum of their masks, and a finished
request's slot takes the next queued one at once. The input_aware policy (engine-wide in-step
rules) is refused there with a 400. Cancellation: every request has a flag that
a watcher task sets when the client disconnects; the worker checks it before every forward pass
(through the controller hook, which runs before each step) and abandons the generation, so a
client that goes away stops costing compute within one token. A queued request whose client left
is skipped.

The `flexquant` extension field chooses the precision policy per request (docs/server.md):
    {"policy": "static", "bits": 6}
    {"policy": "flexquant" | "layerwise" | "linearwise" | "input_aware", "budget_bits": 5.0}
and every response carries "flexquant": {..., "mean_bits": ..., "bytes_read": ...}.

Errors use OpenAI's body {"error": {"message", "type", "param", "code"}}: 400 for a malformed
body, a wrong type, an out-of-range value, an unsupported feature (n > 1, logprobs, tools, ...),
an unrecognized argument (as OpenAI does) and a context overflow (code context_length_exceeded);
404 for an unknown model or route; 503 when the queue is full; 500 if the engine fails.
"""
from __future__ import annotations

import asyncio
import copy
import json
import math
import queue
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Literal, Optional, Union

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, ValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as _e:
    raise ImportError(f"the server needs FastAPI and uvicorn ({_e.name} is missing); install them with: "
                      f"pip install 'flexquant_rt[serve]'") from None

from .controller import POLICIES, make_controller
from .batch import Batch
from .engine import Engine, GenerationStats

MAX_BODY_BYTES = 8 << 20
MAX_STOP = 4


# ----------------------------------------------------------------------------------------------
# Request schemas (strict types; unknown top-level fields are rejected, as OpenAI does)
# ----------------------------------------------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class FlexquantOptions(_Strict):
    policy: Optional[Literal[POLICIES]] = None  # type: ignore[valid-type]
    bits: Optional[int] = None
    budget_bits: Optional[float] = None
    levels: Optional[list[int]] = None
    sink_protect: bool = False


class StreamOptions(_Strict):
    include_usage: Optional[bool] = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: str
    text: Optional[str] = None


class ChatMessage(BaseModel):
    # lenient about extra keys: clients echo back assistant messages with "refusal", "audio", ...
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[ContentPart], None] = None
    name: Optional[str] = None


class _Sampling(_Strict):
    model: str
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    n: Optional[int] = None
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[str] = None
    # extensions (the names vLLM and llama.cpp use)
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    ignore_eos: Optional[bool] = None
    flexquant: Optional[FlexquantOptions] = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    response_format: Optional[dict] = None
    tools: Optional[list] = None
    tool_choice: Union[str, dict, None] = None
    parallel_tool_calls: Optional[bool] = None
    metadata: Optional[dict] = None
    store: Optional[bool] = None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: Optional[int] = None
    echo: Optional[bool] = None
    suffix: Optional[str] = None
    best_of: Optional[int] = None


class ApiError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _validation_error(e: ValidationError) -> ApiError:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"])
    if err["type"] == "extra_forbidden":
        return ApiError(400, f"Unrecognized request argument supplied: {loc}", loc)
    if err["type"] == "missing":
        return ApiError(400, f"Missing required parameter: '{loc}'.", loc)
    return ApiError(400, f"Invalid value for '{loc}': {err['msg']}", loc, "invalid_value")


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, message, param, "invalid_value")


def parse_request(raw: bytes, schema: type[_Sampling]) -> _Sampling:
    if len(raw) > MAX_BODY_BYTES:
        raise ApiError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
    try:
        obj = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise ApiError(400, "We could not parse the JSON body of your request. (HINT: This likely means you "
                            "aren't using your HTTP library correctly. The OpenAI API expects a JSON payload.)")
    if not isinstance(obj, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return schema.model_validate(obj)
    except ValidationError as e:
        raise _validation_error(e) from None


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


# ----------------------------------------------------------------------------------------------
# Request -> generation settings
# ----------------------------------------------------------------------------------------------

class GenSpec:
    """One request's generation settings, checked; what the worker runs."""

    def __init__(self, *, prompt=None, messages=None, max_tokens, sampling: dict, stop, fq: dict):
        self.prompt, self.messages, self.max_tokens = prompt, messages, max_tokens
        self.sampling, self.stop, self.fq = sampling, stop, fq


def _check_range(req, name: str, lo: float, hi: float) -> None:
    v = getattr(req, name)
    if v is not None and not (math.isfinite(v) and lo <= v <= hi):
        raise _bad(name, f"{name} must be between {lo} and {hi}, got {v}")


def build_spec(req: _Sampling, default_fq: dict, vocab: int) -> GenSpec:
    """Check the values an OpenAI client may send and turn them into Engine.generate settings."""
    _check_range(req, "temperature", 0.0, 2.0)
    _check_range(req, "top_p", 0.0, 1.0)
    _check_range(req, "min_p", 0.0, 1.0)
    _check_range(req, "repetition_penalty", 0.01, 10.0)
    for name in ("presence_penalty", "frequency_penalty"):
        _check_range(req, name, -2.0, 2.0)
        if getattr(req, name):
            raise _bad(name, f"{name} is not supported by this server (only 0); see repetition_penalty")
    if req.n is not None and req.n != 1:
        raise _bad("n", f"n = {req.n}: this server returns one choice per request (n must be 1)")
    if req.logit_bias:
        raise _bad("logit_bias", "logit_bias is not supported by this server")
    if req.top_k is not None and req.top_k < -1:
        raise _bad("top_k", f"top_k must be >= 0 (or -1 for off), got {req.top_k}")
    stop = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    if len(stop) > MAX_STOP:
        raise _bad("stop", f"stop takes at most {MAX_STOP} sequences, got {len(stop)}")
    if any(s == "" for s in stop):
        raise _bad("stop", "stop sequences must be non-empty strings")
    max_tokens = req.max_tokens
    if isinstance(req, ChatRequest):
        if req.max_completion_tokens is not None:
            max_tokens = req.max_completion_tokens
        if req.logprobs or req.top_logprobs:
            raise _bad("logprobs", "logprobs are not supported by this server")
        if req.tools:
            raise _bad("tools", "tools (function calling) are not supported by this server")
        if req.response_format is not None and req.response_format.get("type") != "text":
            raise _bad("response_format", "only response_format {\"type\": \"text\"} is supported")
        messages = [_message(i, m) for i, m in enumerate(req.messages)]
        if not messages:
            raise _bad("messages", "messages must be a non-empty list")
        source = dict(messages=messages)
    else:
        if req.logprobs:
            raise _bad("logprobs", "logprobs are not supported by this server")
        if req.echo:
            raise _bad("echo", "echo is not supported by this server")
        if req.suffix:
            raise _bad("suffix", "suffix (insertion) is not supported by this server")
        if req.best_of is not None and req.best_of != 1:
            raise _bad("best_of", "best_of must be 1")
        source = dict(prompt=_prompt(req.prompt, vocab))
        if max_tokens is None:
            max_tokens = 16  # the OpenAI default for /v1/completions
    if max_tokens is not None and max_tokens < 1:
        raise _bad("max_tokens", f"max_tokens must be at least 1, got {max_tokens}")
    seed = req.seed
    sampling = dict(temperature=1.0 if req.temperature is None else float(req.temperature),
                    top_p=1.0 if req.top_p is None else max(float(req.top_p), 1e-6),
                    top_k=max(req.top_k or 0, 0), min_p=float(req.min_p or 0.0),
                    repetition_penalty=1.0 if req.repetition_penalty is None else float(req.repetition_penalty),
                    seed=None if seed is None else seed % (1 << 64), ignore_eos=bool(req.ignore_eos))
    fq = default_fq if req.flexquant is None else req.flexquant.model_dump()
    return GenSpec(max_tokens=max_tokens, sampling=sampling, stop=stop, fq=fq, **source)


def _message(i: int, m: ChatMessage) -> dict:
    content = m.content
    if isinstance(content, list):
        parts = []
        for part in content:
            if part.type != "text" or part.text is None:
                raise _bad(f"messages.{i}.content", f"only text content parts are supported, got {part.type!r}")
            parts.append(part.text)
        content = "".join(parts)
    role = "system" if m.role == "developer" else m.role
    return {"role": role, "content": content or ""}


def _prompt(p, vocab: int):
    if isinstance(p, list) and p and isinstance(p[0], (str, list)):
        if len(p) != 1:
            raise _bad("prompt", f"one prompt per request (got a batch of {len(p)})")
        p = p[0]
    if isinstance(p, list):
        if not p:
            raise _bad("prompt", "the prompt is empty")
        if any(not 0 <= t < vocab for t in p):
            raise _bad("prompt", f"token ids must be in 0..{vocab - 1}")
    return p


def policy_name(fq: dict) -> str:
    return fq.get("policy") or "static"


# ----------------------------------------------------------------------------------------------
# The worker: one thread owns the engine
# ----------------------------------------------------------------------------------------------

class _Cancelled(Exception):
    pass


class _Cancellable:
    """A controller that delegates to `inner` and raises _Cancelled before the next step once
    `flag` is set (the engine calls mask() before every forward pass)."""

    def __init__(self, inner, flag: threading.Event):
        self.inner, self.flag = inner, flag

    def attach(self, engine) -> None:
        if hasattr(self.inner, "attach"):
            self.inner.attach(engine)

    def detach(self) -> None:
        if hasattr(self.inner, "detach"):
            self.inner.detach()

    def reset(self) -> None:
        if hasattr(self.inner, "reset"):
            self.inner.reset()

    def mask(self, info):
        if self.flag.is_set():
            raise _Cancelled
        return self.inner.mask(info)


class Job:
    """One request in flight: the worker posts events ("start", n_prompt) ("text", piece)
    ("done", stats) or ("error", ApiError) to the request's asyncio queue."""

    def __init__(self, spec: GenSpec, loop: asyncio.AbstractEventLoop):
        self.spec = spec
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancel = threading.Event()

    def post(self, kind: str, value=None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            self.cancel.set()


class Worker:
    """Runs jobs on the engine in FIFO order from a bounded queue: one at a time, or with an engine
    of n_seq > 1 up to n_seq at once (continuous batching)."""

    def __init__(self, engine: Engine, max_queue: int = 64, controller_cache: int = 32):
        self.engine = engine
        self.jobs: queue.Queue = queue.Queue(maxsize=max_queue)
        self.current: Job | None = None
        self.running: dict[Job, GenerationStats] = {}  # batched mode: the requests decoding now
        self._controllers: OrderedDict = OrderedDict()
        self._cache_size = controller_cache
        self._thread = threading.Thread(target=self._main, name="flexquant-engine", daemon=True)
        self._stopping = False
        self.counts = {"completed": 0, "cancelled": 0, "rejected": 0, "failed": 0}

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        job = self.current
        if job is not None:
            job.cancel.set()
        for job in list(self.running):
            job.cancel.set()
        while True:  # cancel whatever still waits
            try:
                j = self.jobs.get_nowait()
            except queue.Empty:
                break
            if j is not None:
                j.cancel.set()
                j.post("error", ApiError(503, "the server is shutting down", type="server_error"))
        try:
            self.jobs.put_nowait(None)
        except queue.Full:
            pass
        self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        if self._stopping:
            raise ApiError(503, "the server is shutting down", type="server_error")
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise ApiError(503, f"the server is overloaded ({self.jobs.maxsize} requests waiting); retry later",
                           type="server_error", code="overloaded") from None

    @property
    def depth(self) -> int:
        return self.jobs.qsize()

    @property
    def busy(self) -> bool:
        return self.current is not None or bool(self.running)

    def _main(self) -> None:
        if self.engine.n_seq > 1:
            return self._main_batched()
        while True:
            job = self.jobs.get()
            if job is None or self._stopping:
                if job is not None:
                    job.post("error", ApiError(503, "the server is shutting down", type="server_error"))
                return
            if job.cancel.is_set():
                self.counts["cancelled"] += 1
                continue
            self.current = job
            try:
                self._run(job)
            except BaseException as e:  # never let one request take the worker down
                self._end(job, "failed", "error",
                          ApiError(500, f"internal error: {type(e).__name__}: {e}", type="server_error"))
            finally:
                self.current = None

    def _end(self, job: Job, outcome: str, kind: str | None = None, value=None) -> None:
        """Count what became of a request, then post its last event (if any): a client that has its
        answer finds it counted in /health."""
        self.counts[outcome] += 1
        if kind is not None:
            job.post(kind, value)

    def _main_batched(self) -> None:
        eng = self.engine
        eng.set_layer_bits(eng.max_bits, lm_head_bits=eng.max_bits)  # the mask of a request without one
        batch = Batch(eng)
        running = self.running
        while True:
            while batch.free:  # admit: wait for work only when nothing is decoding
                try:
                    job = self.jobs.get(block=not running)
                except queue.Empty:
                    break
                if job is None or self._stopping:
                    if job is not None:
                        job.post("error", ApiError(503, "the server is shutting down", type="server_error"))
                    for j in list(running):
                        batch.cancel(j)
                    running.clear()
                    return
                if job.cancel.is_set():
                    self.counts["cancelled"] += 1
                    continue
                self._admit(batch, job)
            for job in [j for j in running if j.cancel.is_set()]:  # clients gone: free their slots now
                batch.cancel(job)
                del running[job]
                self.counts["cancelled"] += 1
            if not running:
                continue
            try:
                events = batch.step()
            except BaseException as e:  # never let a failed step take the worker down
                for job in list(running):
                    batch.cancel(job)
                    self._end(job, "failed", "error",
                              ApiError(500, f"internal error: {type(e).__name__}: {e}", type="server_error"))
                running.clear()
                continue
            self._dispatch(events)

    def _admit(self, batch: Batch, job: Job) -> None:
        """Prefill a request into a free slot of the batch (or answer it with its error)."""
        eng = self.engine
        spec = job.spec
        prepared = self._prepare_or_answer(job)
        if prepared is None:
            return
        ids, ctl = prepared
        sampling = dict(spec.sampling)
        ignore_eos = sampling.pop("ignore_eos")
        try:
            sampler = eng.make_sampler(**sampling)
            stop_strs, stop_ids = eng.stop_sets(spec.stop or None, ignore_eos)
        except ValueError as e:
            self._end(job, "rejected", "error", _bad("messages" if spec.messages is not None else "prompt", str(e)))
            return
        stats = GenerationStats()
        max_new = spec.max_tokens if spec.max_tokens is not None else eng.n_ctx - len(ids)
        job.post("start", len(ids))
        self.running[job] = stats
        try:
            # a copy of the cached controller: each sequence keeps its own state
            events = batch.add(job, ids, max_new, sampler, stop_strs, stop_ids, copy.deepcopy(ctl), stats)
        except ValueError as e:  # a controller that cannot run in a batch (raised when it attaches)
            del self.running[job]
            self._end(job, "rejected", "error", _bad("flexquant", str(e)))
            return
        except BaseException as e:
            del self.running[job]
            self._end(job, "failed", "error",
                      ApiError(500, f"internal error: {type(e).__name__}: {e}", type="server_error"))
            return
        self._dispatch(events)

    def _dispatch(self, events) -> None:
        for job, piece, done in events:
            if isinstance(piece, BaseException):  # its controller failed: this request alone ends
                self.running.pop(job, None)
                self._end(job, "failed", "error",
                          ApiError(500, f"internal error: {type(piece).__name__}: {piece}", type="server_error"))
                continue
            if piece:
                job.post("text", piece)
            if done:
                self._end(job, "completed", "done", self.running.pop(job))

    def _controller(self, fq: dict):
        key = json.dumps(fq, sort_keys=True)
        ctl = self._controllers.get(key)
        if ctl is None:
            ctl = make_controller(self.engine, fq.get("policy"), fq.get("budget_bits"), fq.get("bits"),
                                  fq.get("levels"), bool(fq.get("sink_protect")))
            self._controllers[key] = ctl
            if len(self._controllers) > self._cache_size:
                self._controllers.popitem(last=False)
        else:
            self._controllers.move_to_end(key)
        return ctl

    def _prepare_or_answer(self, job: Job):
        """(prompt ids, controller) of a job, or None after counting it rejected and posting its 400."""
        try:
            return self._prepare(job.spec)
        except ApiError as e:
            self._end(job, "rejected", "error", e)
            return None

    def _prepare(self, spec: GenSpec):
        """(prompt ids, controller) of a request, or ApiError 400."""
        import jinja2

        eng = self.engine
        param = "messages" if spec.messages is not None else "prompt"
        try:
            if spec.messages is not None:
                text = eng.tokenizer.apply_chat_template(spec.messages, add_generation_prompt=True)
                ids = eng.tokenize(text, add_special_tokens=False)
            elif isinstance(spec.prompt, str):
                ids = eng.tokenize(spec.prompt)
            else:
                ids = list(spec.prompt)
        except (ValueError, jinja2.TemplateError) as e:
            raise _bad(param, str(e)) from None
        if not ids:
            raise _bad(param, "the prompt is empty (no tokens)")
        n_ctx = eng.n_ctx
        n_new = spec.max_tokens or 1
        if len(ids) + n_new > n_ctx:
            raise ApiError(400, f"This model's maximum context length is {n_ctx} tokens. However, you requested "
                                f"{len(ids) + n_new} tokens ({len(ids)} in the prompt, {n_new} for the completion). "
                                f"Please reduce the prompt or the completion length.", param, "context_length_exceeded")
        try:
            return ids, self._controller(spec.fq)
        except ValueError as e:
            raise _bad("flexquant", str(e)) from None

    def _run(self, job: Job) -> None:
        """Run one job to its end: completed, cancelled or rejected (counted, its last event posted)."""
        eng = self.engine
        spec = job.spec
        prepared = self._prepare_or_answer(job)
        if prepared is None:
            return
        ids, ctl = prepared
        eng.set_layer_bits(eng.max_bits, lm_head_bits=eng.max_bits)  # nothing carries over from the last request
        stats = GenerationStats()
        max_new = spec.max_tokens if spec.max_tokens is not None else eng.n_ctx - len(ids)
        try:
            gen = eng.generate(ids, max_new_tokens=max_new, stop=spec.stop or None, stream=True,
                               controller=_Cancellable(ctl, job.cancel), stats=stats, **spec.sampling)
        except ValueError as e:
            self._end(job, "rejected", "error", _bad("messages" if spec.messages is not None else "prompt", str(e)))
            return
        job.post("start", len(ids))
        try:
            for piece in gen:
                job.post("text", piece)
        except _Cancelled:
            self._end(job, "cancelled")
            return
        except ValueError as e:  # a controller that cannot run on this model (raised when it attaches)
            self._end(job, "rejected", "error", _bad("flexquant", str(e)))
            return
        finally:
            gen.close()
        self._end(job, "completed", "done", stats)


# ----------------------------------------------------------------------------------------------
# The ASGI app
# ----------------------------------------------------------------------------------------------

class _Disconnected(Exception):
    pass


def create_app(engine: Engine, model_name: str | None = None, default_fq: dict | None = None,
               max_queue: int = 64):
    """The FastAPI app serving `engine` (which it closes on shutdown)."""
    from contextlib import asynccontextmanager

    model_id = model_name or Path(engine.path).stem
    default_fq = dict(default_fq or {})
    make_controller(engine, default_fq.get("policy"), default_fq.get("budget_bits"), default_fq.get("bits"),
                    default_fq.get("levels"), bool(default_fq.get("sink_protect")))  # fail at start, not per request
    worker = Worker(engine, max_queue=max_queue)
    created = int(time.time())
    vocab = int(engine.config["vocab"])

    @asynccontextmanager
    async def lifespan(app):
        worker.start()
        try:
            yield
        finally:
            worker.stop()
            engine.close()

    app = FastAPI(title="flexquant_rt", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker = worker

    def error_response(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        msg = f"Invalid URL ({request.method} {request.url.path})" if e.status_code == 404 else str(e.detail)
        return error_response(ApiError(e.status_code, msg, code="not_found" if e.status_code == 404 else None))

    @app.exception_handler(RequestValidationError)
    async def _validation(request, e):
        return error_response(ApiError(400, str(e)))

    @app.exception_handler(Exception)
    async def _internal(request, e):
        return error_response(ApiError(500, f"internal error: {type(e).__name__}", type="server_error"))

    def model_card() -> dict:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "flexquant_rt",
                "max_model_len": engine.n_ctx, "max_bits": engine.max_bits}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, "queued": worker.depth, "busy": worker.busy,
                "requests": dict(worker.counts)}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name != model_id:
            raise _unknown_model(name)
        return model_card()

    def _unknown_model(name: str) -> ApiError:
        return ApiError(404, f"The model `{name}` does not exist (this server serves `{model_id}`).", "model",
                        "model_not_found")

    async def submit(request: Request, schema) -> tuple[_Sampling, Job]:
        req = parse_request(await request.body(), schema)
        if req.model != model_id:
            raise _unknown_model(req.model)
        spec = build_spec(req, default_fq, vocab)
        job = Job(spec, asyncio.get_running_loop())
        worker.submit(job)
        return req, job

    async def watch(request: Request, job: Job) -> None:
        """Set the job's cancel flag when the client disconnects."""
        while True:
            msg = await request.receive()
            if msg["type"] == "http.disconnect":
                job.cancel.set()
                return

    async def next_event(job: Job, watcher: asyncio.Task):
        get = asyncio.ensure_future(job.events.get())
        done, _ = await asyncio.wait({get, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if get in done:
            return get.result()
        get.cancel()
        job.cancel.set()
        raise _Disconnected

    async def serve_job(request: Request, schema, chat: bool):
        req, job = await submit(request, schema)
        watcher = asyncio.ensure_future(watch(request, job))
        try:
            kind, value = await next_event(job, watcher)
        except _Disconnected:
            return JSONResponse({}, status_code=499)
        except BaseException:
            job.cancel.set()
            watcher.cancel()
            raise
        if kind == "error":
            watcher.cancel()
            return error_response(value)
        n_prompt = value
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        head = {"id": rid, "created": int(time.time()), "model": model_id, "system_fingerprint": None}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(sse(job, watcher, head, chat, include_usage, n_prompt),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            text = []
            while True:
                kind, value = await next_event(job, watcher)
                if kind == "text":
                    text.append(value)
                elif kind == "error":
                    return error_response(value)
                else:
                    break
        except _Disconnected:
            return JSONResponse({}, status_code=499)
        finally:
            job.cancel.set()
            watcher.cancel()
        stats: GenerationStats = value
        content = "".join(text)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": content, "refusal": None},
                      "logprobs": None, "finish_reason": stats.finish_reason}
        else:
            choice = {"index": 0, "text": content, "logprobs": None, "finish_reason": stats.finish_reason}
        return {**head, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
                "usage": usage(n_prompt, stats), "flexquant": fq_report(job.spec.fq, stats)}

    async def sse(job: Job, watcher: asyncio.Task, head: dict, chat: bool, include_usage: bool, n_prompt: int):
        obj = "chat.completion.chunk" if chat else "text_completion"
        extra = {"usage": None} if include_usage else {}

        def chunk(delta_or_text, finish=None, **more) -> str:
            if chat:
                choice = {"index": 0, "delta": delta_or_text, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta_or_text, "logprobs": None, "finish_reason": finish}
            return "data: " + json.dumps({**head, "object": obj, "choices": [choice], **extra, **more}) + "\n\n"

        try:
            if chat:
                yield chunk({"role": "assistant", "content": "", "refusal": None})
            while True:
                kind, value = await next_event(job, watcher)
                if kind == "text":
                    yield chunk({"content": value} if chat else value)
                elif kind == "error":
                    yield "data: " + json.dumps(value.body()) + "\n\n"
                    return
                else:
                    break
            stats: GenerationStats = value
            yield chunk({} if chat else "", stats.finish_reason, flexquant=fq_report(job.spec.fq, stats))
            if include_usage:
                yield "data: " + json.dumps({**head, "object": obj, "choices": [],
                                             "usage": usage(n_prompt, stats)}) + "\n\n"
            yield "data: [DONE]\n\n"
        except _Disconnected:
            return
        finally:
            job.cancel.set()
            watcher.cancel()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await serve_job(request, ChatRequest, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await serve_job(request, CompletionRequest, chat=False)

    return app


def usage(n_prompt: int, stats: GenerationStats) -> dict:
    return {"prompt_tokens": n_prompt, "completion_tokens": stats.completion_tokens,
            "total_tokens": n_prompt + stats.completion_tokens}


def fq_report(fq: dict, stats: GenerationStats) -> dict:
    """The `flexquant` object of a response: the policy that ran and what it read."""
    out = {"policy": policy_name(fq)}
    for k in ("bits", "budget_bits", "levels", "sink_protect"):
        if fq.get(k) not in (None, False):
            out[k] = fq[k]
    out.update(mean_bits=round(stats.mean_bits, 4), bytes_read=stats.bytes_read, forward_passes=stats.steps)
    return out


def serve(model=None, host: str = "127.0.0.1", port: int = 8000, backend: str = "auto", n_ctx: int | None = None,
          threads: int | None = None, model_name: str | None = None, default_fq: dict | None = None,
          max_queue: int = 64, log_level: str = "info", batch: int = 1, kv_dtype: str = "auto",
          cpu_activations: str = "i16") -> None:
    """Load the model and serve it until interrupted (what `flexquant-rt serve` runs)."""
    try:
        import uvicorn
    except ImportError as e:
        raise ImportError(f"the server needs FastAPI and uvicorn ({e.name}); install them with: "
                          f"pip install 'flexquant_rt[serve]'") from None
    engine = Engine(model, backend=backend, n_ctx=n_ctx, threads=threads, n_seq=batch, kv_dtype=kv_dtype,
                    cpu_activations=cpu_activations)
    try:
        app = create_app(engine, model_name=model_name, default_fq=default_fq, max_queue=max_queue)
    except BaseException:
        engine.close()
        raise
    print(f"serving {engine.path} as `{model_name or Path(engine.path).stem}` at http://{host}:{port}/v1",
          flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


# ----------------------------------------------------------------------------------------------
# A server in a subprocess (the tests and tools/load_test.py)
# ----------------------------------------------------------------------------------------------

def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


class ServerProcess:
    """`flexquant-rt serve MODEL ARGS...` in a subprocess on a free loopback port, up once /health
    answers (at most `wait_s` seconds). stop() terminates it (SIGTERM, then SIGKILL)."""

    def __init__(self, model=None, *args: str, log=None, wait_s: float = 300.0):
        # The port is free when picked and bound by the child seconds later (after its imports and
        # the model's load): another process may take it in between. The child then exits; if the
        # port is taken (it is not ours to bind), start again on another one, at most 3 times.
        for attempt in range(3):
            self.port = free_port()
            self.url = f"http://127.0.0.1:{self.port}"
            cmd = [sys.executable, "-m", "flexquant_rt.cli", "serve", *([str(model)] if model else []),
                   "--host", "127.0.0.1", "--port", str(self.port), *args]
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT if log is not None else None)
            self.pid = self.proc.pid
            for _ in range(int(wait_s / 0.25)):
                if self.proc.poll() is not None:
                    if attempt < 2 and not _port_is_free(self.port):
                        break
                    raise RuntimeError(f"the server exited with {self.proc.returncode}")
                try:
                    with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                        if r.status == 200:
                            return
                except (urllib.error.URLError, OSError):
                    pass
                time.sleep(0.25)
            else:
                self.stop()
                raise RuntimeError(f"the server did not answer /health within {wait_s} s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
