"""The FastAPI app: AUTOMATIC1111's ``/sdapi/v1`` endpoints, ``/health``, the web page at ``/`` (files in
``latentdiff/serve/static/``) and the OpenAPI page at ``/docs``.

    app = create_app(Service.start(ServeSettings()))     # uvicorn.run(app, host="127.0.0.1", port=7860)

A client's mistake is always a 4xx with ``{"detail": ...}`` and one log line (``rejected POST /sdapi/v1/txt2img
422: ...``): 401 without the API key, 404 unknown path or model, 413 body over the limit, 422 malformed or
out-of-limit fields (FastAPI's list of ``{"loc", "msg", "type"}`` for type errors), 503 with ``Retry-After`` when
the queue is full. ``create_app()`` without a service builds the routes only; :func:`attach` gives it one later
(the Ray Serve replica does).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from latentdiff.serve.jobs import RequestError, plan_job
from latentdiff.serve.responses import generation_response, sampler_items
from latentdiff.serve.schemas import Img2ImgRequest, OptionsUpdate, Txt2ImgRequest
from latentdiff.serve.service import Service
from latentdiff.serve.worker import QueueFull
from latentdiff.version import __version__

STATIC = Path(__file__).parent / "static"
# Answered without credentials: the health check, the web page's files (the page asks for the key itself and sends
# it with its API calls) and the API documentation; everything else needs the key when one is set.
OPEN_PATHS = ("/health", "/", "/docs", "/docs/oauth2-redirect", "/openapi.json")
OPEN_PREFIXES = ("/static/",)
log = logging.getLogger("latentdiff.serve")


def rejected(scope_or_request, status: int, message: str, headers: dict | None = None, detail=None) -> JSONResponse:
    """The 4xx/5xx answer to a request, logged in one line."""
    scope = scope_or_request if isinstance(scope_or_request, dict) else scope_or_request.scope
    client = scope.get("client") or ("?", 0)
    log.warning("rejected %s %s from %s: %d %s", scope.get("method"), scope.get("path"), client[0], status,
                message[:300])
    return JSONResponse({"detail": message if detail is None else detail}, status_code=status, headers=headers)


class Guard:
    """ASGI middleware in front of every route: checks the credentials (401) and the body size (413: by
    Content-Length before reading, by counting for a chunked body)."""

    def __init__(self, app, fastapi_app: FastAPI):
        self.app, self.fastapi_app = app, fastapi_app

    async def __call__(self, scope, receive, send):
        service = getattr(self.fastapi_app.state, "service", None)
        if scope["type"] != "http" or service is None:
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path = scope["path"]
        if not (path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)) and \
                not service.authorized(headers.get("authorization")):
            # a Bearer challenge: a Basic one would make browsers pop up a login box over the web page
            response = rejected(scope, 401, "missing or wrong API key (Authorization: Bearer KEY, or basic auth)",
                                {"WWW-Authenticate": 'Bearer realm="latentdiff"'})
            return await response(scope, receive, send)
        limit = service.limits.max_body_bytes
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            response = rejected(scope, 413, f"request body of {length} bytes; the limit is {limit}")
            return await response(scope, receive, send)
        seen, too_large, started = [0], [False], [False]

        async def counted_receive():
            message = await receive()
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > limit:
                    too_large[0] = True
                    return {"type": "http.request", "body": b"", "more_body": False}
            return message

        async def guarded_send(message):
            if too_large[0] and not started[0]:
                started[0] = True
                response = rejected(scope, 413, f"request body over the limit of {limit} bytes")
                return await response(scope, receive, send)
            if too_large[0]:
                return None
            started[0] = True
            return await send(message)

        return await self.app(scope, counted_receive, guarded_send)


def create_app(service: Service | None = None) -> FastAPI:
    """The app; ``service`` (or a later :func:`attach`) supplies the models, limits, worker and credentials."""
    app = FastAPI(title="latentdiff", version=__version__, docs_url="/docs",
                  description="AUTOMATIC1111-compatible text-to-image API (/sdapi/v1) of latentdiff")
    app.add_middleware(Guard, fastapi_app=app)
    if service is not None:
        attach(app, service)
    _add_error_handlers(app)
    _add_routes(app)
    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def attach(app: FastAPI, service: Service) -> None:
    app.state.service = service


def _service(request: Request) -> Service:
    service = getattr(request.app.state, "service", None)
    if service is None:
        raise StarletteHTTPException(503, "the server is starting")
    return service


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        errors = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
                  for e in exc.errors()]
        text = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors)
        return rejected(request, 422, text, detail=errors)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return rejected(request, exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        log.error("error in %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"detail": f"internal server error ({type(exc).__name__})"}, status_code=500)


def _add_routes(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    async def page():
        index = STATIC / "index.html"
        if not index.is_file():
            raise StarletteHTTPException(404, "no web page in this install (latentdiff/serve/static/index.html)")
        return FileResponse(index)

    @app.get("/health")
    async def health(request: Request):
        service = _service(request)
        return {"status": "ok", "version": __version__, "models": [m.title for m in service.models.models],
                "queue": service.worker.queue_length(), **service.worker.stats}

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(req: Txt2ImgRequest, request: Request):
        return await _generate(request, req, "txt2img")

    @app.post("/sdapi/v1/img2img")
    async def img2img(req: Img2ImgRequest, request: Request):
        return await _generate(request, req, "img2img")

    @app.get("/sdapi/v1/sd-models")
    async def sd_models(request: Request):
        return [m.a1111() for m in _service(request).models.models]

    @app.get("/sdapi/v1/samplers")
    async def samplers(request: Request):
        return sampler_items(any(m.is_vq for m in _service(request).models.models))

    @app.get("/sdapi/v1/scripts")
    async def scripts():
        return {"txt2img": [], "img2img": []}

    @app.get("/sdapi/v1/options")
    async def get_options(request: Request):
        current = _service(request).models.current
        return {"sd_model_checkpoint": current.title, "sd_checkpoint_hash": None, "samples_format": "png"}

    @app.post("/sdapi/v1/options")
    async def set_options(update: OptionsUpdate, request: Request):
        service = _service(request)
        if update.sd_model_checkpoint is not None:
            try:
                service.models.current = service.models.find(update.sd_model_checkpoint)
            except ValueError as e:
                return rejected(request, 404, str(e))
            log.info("model set to %s", service.models.current.title)
        return None

    @app.get("/sdapi/v1/progress")
    async def progress(request: Request, skip_current_image: bool = False):
        worker = _service(request).worker
        body = worker.progress()
        if not skip_current_image and body["state"]["job_count"]:
            import base64

            png = await run_in_threadpool(worker.preview_png)
            body["current_image"] = base64.b64encode(png).decode("ascii") if png else None
        return body

    @app.post("/sdapi/v1/interrupt")
    async def interrupt(request: Request):
        _service(request).worker.interrupt()
        return {}


async def _generate(request: Request, req, kind: str):
    service = _service(request)
    try:
        job = await run_in_threadpool(plan_job, req, kind, service.models, service.limits)
    except RequestError as e:
        return rejected(request, e.status, str(e))
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def on_done(_job, error):
        def resolve():
            if not done.done():
                done.set_result(error)

        try:
            loop.call_soon_threadsafe(resolve)
        except RuntimeError:  # the event loop is gone (server shutting down)
            pass

    try:
        service.worker.submit(job, on_done)
    except QueueFull as e:
        return rejected(request, 503, str(e), {"Retry-After": str(service.worker.retry_after())})
    error = await done
    if isinstance(error, RequestError):
        return rejected(request, error.status, str(error))
    if error is not None:
        return JSONResponse({"detail": f"generation failed ({type(error).__name__}: {error})"}, status_code=500)
    return JSONResponse(await run_in_threadpool(generation_response, job, req))
