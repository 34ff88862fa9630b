"""The FastAPI app: OpenAI's /v1/completions, /v1/chat/completions, /v1/models, plus /health, /metrics."""

import asyncio
import json
import secrets
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from pdmix.errors import PdmixError
from pdmix.run_pa import apply_chat, chat_template
from pdmix.runtime.sampling import SamplingParams
from pdmix.serving.online import Choice, Delta, Failed, Finished, OnlineEngine
from pdmix.serving.online import Request as EngineRequest
from pdmix.serving.protocol import ApiError, ChatRequest, Common, CompletionRequest, parse
from pdmix.serving.responses import ChatFormat, CompletionFormat, Format

GONE = object()  # pushed to a request's events when its client disconnected
MAX_BODY_BYTES = 16 * 1024 * 1024  # a request body (token-id prompts of 100k tokens take about 1 MB)


@dataclass
class ServeConfig:
    model_name: str
    max_output_length: int
    api_key: str | None = None
    chat_template: str | None = None


def create_app(llm, engine: OnlineEngine, cfg: ServeConfig) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="pdmix", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    tokenizer = llm.tokenizer  # this (HTTP) thread's; the engine thread decodes with its own
    try:
        template, template_error = chat_template(cfg.chat_template, tokenizer), None
    except PdmixError as e:  # chat requests get this error; /v1/completions needs no template
        template, template_error = None, str(e)

    @app.exception_handler(ApiError)
    async def api_error(_, e: ApiError):
        return JSONResponse(e.body, status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(_, e: HTTPException):
        return JSONResponse(ApiError(e.status_code, str(e.detail)).body, status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, e: RequestValidationError):
        return JSONResponse(ApiError(400, str(e.errors()[0].get("msg"))).body, status_code=400)

    def authorize(request: Request) -> None:
        if cfg.api_key is not None:
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {cfg.api_key}".encode()):
                raise ApiError(401, "incorrect or missing API key (Authorization: Bearer KEY)", code="invalid_api_key")

    def check_model(name: str) -> None:
        if name != cfg.model_name:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {cfg.model_name!r}", "model",
                           "model_not_found")

    def check_request(ids: list[int], params: SamplingParams, i: int) -> None:
        try:
            llm.check_request(ids, params, i)
        except PdmixError as e:
            too_long = "max_input_length" in str(e) or "max_position_embeddings" in str(e)
            raise ApiError(400, str(e), "prompt", "context_length_exceeded" if too_long else None) from None

    def sampling_params(body: Common, max_tokens: int, logprobs: int | None, j: int) -> SamplingParams:
        try:
            return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_k=body.top_k,
                                  top_p=body.top_p, repetition_penalty=body.repetition_penalty,
                                  seed=None if body.seed is None else body.seed + j, ignore_eos=body.ignore_eos,
                                  logprobs=logprobs)
        except PdmixError as e:
            raise ApiError(400, str(e)) from None

    @app.get("/health")
    async def health():
        if not engine.alive or engine.deadline is not None:
            raise ApiError(503, "the engine is not running" if not engine.alive else "the server is shutting down")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(engine.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "created": 0, "owned_by": "pdmix",
                                            "max_model_len": llm.max_input_length + cfg.max_output_length}]}

    async def read_body(request: Request) -> bytes:
        """The body, refused (413) past MAX_BODY_BYTES before it is held whole."""
        declared = request.headers.get("content-length", "")
        too_large = ApiError(413, f"request body larger than the limit of {MAX_BODY_BYTES} bytes", code="body_too_large")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    async def accept(request: Request, model: type[Common]) -> Common:
        """The request's body, once the key, the JSON, its fields and the model name check out."""
        authorize(request)
        body = parse(model, await read_body(request))
        check_model(body.model)
        body.check_unsupported()
        return body

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await accept(request, CompletionRequest)
        p = body.prompt
        if isinstance(p, list) and not p:
            raise ApiError(400, "prompt: empty list", "prompt")
        texts_or_ids = [p] if isinstance(p, str) or isinstance(p[0], int) else p
        prompts = [llm.encode(x) if isinstance(x, str) else list(x) for x in texts_or_ids]
        return await generate(request, body, prompts, body.max_tokens, body.logprobs,
                              CompletionFormat(cfg.model_name, tokenizer))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await accept(request, ChatRequest)
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        if template_error is not None:
            raise ApiError(400, template_error, "messages")
        try:
            ids = apply_chat(tokenizer, template, [m.plain() for m in body.messages])
        except PdmixError as e:
            raise ApiError(400, str(e), "messages") from None
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        return await generate(request, body, [ids], body.max_completion_tokens or body.max_tokens,
                              logprobs, ChatFormat(cfg.model_name, tokenizer))

    async def generate(request: Request, body: Common, prompts: list[list[int]], max_tokens: int | None,
                       logprobs: int | None, fmt: Format):
        max_tokens = max_tokens or cfg.max_output_length
        if max_tokens > cfg.max_output_length:
            raise ApiError(400, f"max_tokens {max_tokens} is over this server's limit {cfg.max_output_length}",
                           "max_tokens")
        stop = body.stop_strings()
        choices = []
        for i, ids in enumerate(prompts):
            params = [sampling_params(body, max_tokens, logprobs, j) for j in range(body.n)]
            check_request(ids, params[0], i)  # the choices of a prompt differ only in their seeds
            choices += [Choice(i * body.n + j, ids, p, engine.new_stream(stop)) for j, p in enumerate(params)]
        req = EngineRequest(choices, asyncio.get_running_loop())
        engine.submit(req)
        prompt_tokens = sum(map(len, prompts))
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(stream(req, fmt, prompt_tokens, include_usage, logprobs is not None),
                                     media_type="text/event-stream")
        body = await collect(request, req, fmt, prompt_tokens, logprobs is not None)
        return Response(status_code=499) if body is None else JSONResponse(body)  # 499: the client went away

    async def collect(request: Request, req: EngineRequest, fmt: Format, prompt_tokens: int,
                      want_logprobs: bool) -> dict | None:
        n = len(req.choices)
        texts, entries, reasons, completion = [""] * n, [[] for _ in range(n)], [None] * n, 0
        watch = asyncio.create_task(watch_disconnect(request, req))
        try:
            while None in reasons:
                ev = await req.events.get()
                if ev is GONE:
                    engine.cancel(req)
                    return None
                if isinstance(ev, Failed):
                    raise ApiError(500, ev.message)
                if isinstance(ev, Delta):
                    texts[ev.index] += ev.text
                    entries[ev.index] += zip(ev.token_ids, ev.logprobs)
                if isinstance(ev, Finished):
                    reasons[ev.index] = ev.reason
                    completion += ev.completion_tokens
        except BaseException:
            engine.cancel(req)
            raise
        finally:
            watch.cancel()
        choices = [fmt.choice(i, texts[i], fmt.logprobs(entries[i], 0) if want_logprobs else None, reasons[i])
                   for i in range(n)]
        return fmt.response(choices, prompt_tokens, completion)

    async def watch_disconnect(request: Request, req: EngineRequest):
        while not await request.is_disconnected():
            await asyncio.sleep(0.5)
        req.events.put_nowait(GONE)

    async def stream(req: EngineRequest, fmt: Format, prompt_tokens: int, include_usage: bool, want_logprobs: bool):
        sse = lambda obj: f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
        done, completion, left = False, 0, len(req.choices)
        offsets = [0] * len(req.choices)
        try:
            if isinstance(fmt, ChatFormat):
                for c in req.choices:
                    yield sse(fmt.chunk(c.index, "", None, first=True))
            while left:
                ev = await req.events.get()
                if isinstance(ev, Failed):
                    yield sse(ApiError(500, ev.message).body)
                    break
                if isinstance(ev, Delta) and (ev.text or want_logprobs):
                    entries = list(zip(ev.token_ids, ev.logprobs))
                    lp = fmt.logprobs(entries, offsets[ev.index]) if want_logprobs else None
                    offsets[ev.index] += len(ev.text)
                    yield sse(fmt.chunk(ev.index, ev.text, lp))
                if isinstance(ev, Finished):
                    left -= 1
                    completion += ev.completion_tokens
                    yield sse(fmt.chunk(ev.index, "", None, ev.reason))
            if include_usage:
                yield sse(fmt.usage_chunk(prompt_tokens, completion))
            yield "data: [DONE]\n\n"
            done = True
        finally:
            if not done:  # the client went away (the response task is cancelled) or the engine failed
                engine.cancel(req)

    return app
