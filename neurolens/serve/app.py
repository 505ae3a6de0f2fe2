"""The web app (Starlette): pages, blurred images, reveals and probes over one cache folder.

Security model
- Requests only read: pages and images come from cache records (neurolens.storage.cache); the only computation is
  a probe's forward pass, which writes nothing.
- Images are addressed as (layer id, kind, unit, number). A layer id is looked up in the index of the
  cache (unknown ids are 404), numbers are parsed as integers, and no part of a request is ever used as
  a path. Static files are a fixed set held in memory.
- Every image is served blurred under the blur policy; raw pixels come only from /raw/..., only when
  reveals are on, and only for requests that carry the `X-Neurolens-Reveal: 1` header (which a page's
  script sets after the user confirmed, and which an <img> tag or a link elsewhere cannot send).
- With a token, every request needs it (query `?token=`, which sets an HttpOnly cookie and redirects to
  the same URL without it, the cookie, or `Authorization: token ...`); without it, 403. The cookie is named
  after the port (`neurolens_token_<port>`: cookies are shared by every port of a host, so two servers must
  not overwrite each other's), and an Authorization header, when sent, decides alone (a stale cookie never
  beats it).
- Without a token (loopback, or --no-token), requests must name an allowed host: a literal IP address, a
  loopback name, the --host name or an --allow-host name (DNS-rebinding guard: a rebinding page's requests
  carry its own domain name). With a token, only when --allow-host names some.
- Probes need the `X-Neurolens-Probe: 1` header (a page on another site cannot send it without a CORS
  preflight, which this server never grants), so other sites cannot make the server compute.
- Uploads are read up to MAX_UPLOAD_BYTES and decoded by the dataset decoder (bomb guard); a bad one is a
  400 with a one-line reason.
"""
from __future__ import annotations

import re
import secrets
import threading
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, Optional, Set
from urllib.parse import parse_qsl, quote, urlencode

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from .access import COOKIE, LOOPBACK_NAMES, host_allowed
from .images import KINDS, LayerImages
from .pages import STATIC, STATIC_TYPES, Pages
from .probe import MAX_UPLOAD_BYTES, ProbeError, Prober, answer, dataset_item, decode_upload
from .layer import LayerData

REVEAL_HEADER = "x-neurolens-reveal"
PROBE_HEADER = "x-neurolens-probe"
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; img-src 'self' blob: data:; style-src 'self' 'unsafe-inline'; "
                                 b"script-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
                                 b"form-action 'self'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]
_IMAGE_NAME = re.compile(r"^(\d{1,7})(?:-(\d{1,6}))?\.(jpg|png)$")


@dataclass
class ServeState:
    """Everything the app serves: the cache's layers, their images, the options."""
    layers: Dict[str, LayerData]
    reveal: bool = True
    prober: Optional[Prober] = None
    token: Optional[str] = None
    allowed_hosts: Optional[FrozenSet[str]] = frozenset(LOOPBACK_NAMES)   # Host names answered (None: any)
    cookie: str = COOKIE                  # the token cookie's name (cookie_name(port))
    model_note: str = ""
    _images: Dict[str, LayerImages] = field(default_factory=dict)
    probe_layers: Set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self):
        if self.prober is not None:
            self.probe_layers = {i for i, data in self.layers.items() if self.prober.matches(data)}
        self.pages = Pages(self.layers, mode="serve", reveal=self.reveal, probe_layers=self.probe_layers,
                           model_note=self.model_note, images=self._images)

    def images(self, layer_id: str) -> LayerImages:
        with self._lock:        # requests arrive on many threads; one LayerImages (and memo) per layer
            if layer_id not in self._images:
                self._images[layer_id] = LayerImages(self.layers[layer_id])
            return self._images[layer_id]


def _text(status: int, message: str) -> PlainTextResponse:
    return PlainTextResponse(message + "\n", status_code=status)


def _layer(state: ServeState, request: Request) -> str:
    layer_id = request.path_params["layer_id"]
    if layer_id not in state.layers:
        raise _NotFound("no such layer in this cache")
    return layer_id


class _NotFound(Exception):
    pass


def build_app(state: ServeState) -> Starlette:
    async def home(request: Request) -> Response:
        return _html(await run_in_threadpool(state.pages.home))

    async def layer(request: Request) -> Response:
        layer_id = _layer(state, request)
        return _html(await run_in_threadpool(state.pages.layer, layer_id))

    async def layer_slash(request: Request) -> Response:
        return RedirectResponse(f"/L/{_layer(state, request)}/index.html", status_code=308)

    async def unit(request: Request) -> Response:
        layer_id = _layer(state, request)
        number = _int(request.path_params["unit"])
        data = state.layers[layer_id]
        await run_in_threadpool(data.load)
        if number is None or not 0 <= number < data.units:
            return _text(404, f"no such {data.entry.words['unit']} in this layer")
        await run_in_threadpool(state.images, layer_id)   # the page names each image's blur reason
        return _html(await run_in_threadpool(state.pages.unit, layer_id, number))

    async def image(request: Request) -> Response:
        layer_id, kind, unit_number, number = _image_address(state, request, "jpg")
        images = await run_in_threadpool(state.images, layer_id)
        body = images.cached(kind, unit_number, number)
        if body is None:
            body = await run_in_threadpool(images.shown, kind, unit_number, number)
        if body is None:
            return _text(404, "no such image")
        return Response(body, media_type="image/jpeg", headers={"cache-control": "private, max-age=600"})

    async def raw(request: Request) -> Response:
        if not state.reveal:
            return _text(403, "reveals are off (neurolens serve --no-reveal)")
        if request.headers.get(REVEAL_HEADER) != "1":
            return _text(403, "raw pixels are sent only on a confirmed reveal from the unit page")
        layer_id, kind, unit_number, number = _image_address(state, request, "png")
        images = await run_in_threadpool(state.images, layer_id)
        body = await run_in_threadpool(images.raw, kind, unit_number, number)
        if body is None:
            return _text(404, "no such image")
        return Response(body, media_type="image/png", headers={"cache-control": "no-store"})

    async def probe(request: Request) -> Response:
        layer_id = _layer(state, request)
        if request.headers.get(PROBE_HEADER) != "1":   # a custom header: other sites' pages cannot send it
            return JSONResponse({"error": f"probes come from the unit page (header {PROBE_HEADER}: 1)"},
                                status_code=400)
        if state.prober is None:
            return JSONResponse({"error": "no model is loaded: start neurolens serve with --model or --checkpoint"},
                                status_code=400)
        if layer_id not in state.probe_layers:
            reason = state.prober.reasons.get(layer_id, "the loaded model cannot probe this layer")
            return JSONResponse({"error": reason}, status_code=400)
        try:
            unit_number = _int(request.query_params.get("unit", ""))
            if unit_number is None:
                raise ProbeError(f"give the {state.layers[layer_id].entry.words['unit']} to probe as ?unit=N")
            index = request.query_params.get("index")
            images = await run_in_threadpool(state.images, layer_id)
            if index is not None:
                picture = await state.prober.run(dataset_item, images, index)
            else:
                body = await _read_limited(request)
                if not body:
                    raise ProbeError("the upload is empty; send an image file, or ?index=N for a dataset item")
                picture = await state.prober.run(decode_upload, body)
            result = await state.prober.run(answer, state.prober, images, unit_number, picture)
        except ProbeError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse(result, headers={"cache-control": "no-store"})

    async def find(request: Request) -> Response:
        return _html(await run_in_threadpool(state.pages.find))

    async def find_index(request: Request) -> Response:
        layer_id = _layer(state, request)
        body = await run_in_threadpool(state.pages.find_index, layer_id)
        if body is None:
            return _text(404, "no concept audit of this layer in the cache")
        return Response(body, media_type=STATIC_TYPES[".js"], headers={"cache-control": "no-cache"})

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        body = STATIC.get(name)
        if body is None:
            return _text(404, "no such file")
        suffix = name[name.rfind("."):]
        return Response(body, media_type=STATIC_TYPES[suffix], headers={"cache-control": "no-cache"})

    async def not_found(request: Request, exc) -> Response:
        return _text(404, "not found")

    async def missing(request: Request, exc: _NotFound) -> Response:
        return _text(404, str(exc))

    routes = [
        Route("/", home), Route("/index.html", home),
        Route("/L/{layer_id}", layer_slash), Route("/L/{layer_id}/", layer), Route("/L/{layer_id}/index.html", layer),
        Route("/L/{layer_id}/u/{unit}.html", unit),
        Route("/find.html", find), Route("/L/{layer_id}/find-index.js", find_index),
        Route("/img/{layer_id}/{kind}/{name}", image),
        Route("/raw/{layer_id}/{kind}/{name}", raw),
        Route("/api/{layer_id}/probe", probe, methods=["POST"]),
        Route("/static/{name}", static),
    ]
    app = Starlette(routes=routes, exception_handlers={404: not_found, _NotFound: missing})
    return Guard(app, token=state.token, allowed_hosts=state.allowed_hosts, cookie=state.cookie)


def _html(text: str) -> Response:
    return Response(text, media_type="text/html; charset=utf-8", headers={"cache-control": "no-cache"})


def _int(text: str) -> Optional[int]:
    return int(text) if isinstance(text, str) and text.isdigit() and len(text) <= 9 else None


def _image_address(state: ServeState, request: Request, extension: str):
    layer_id = _layer(state, request)
    kind = request.path_params["kind"]
    match = _IMAGE_NAME.match(request.path_params["name"])
    if kind not in KINDS or match is None or match.group(3) != extension:
        raise _NotFound("no such image")
    unit_number = int(match.group(1))
    number = int(match.group(2)) if match.group(2) is not None else 0
    if (kind == "tile") != (match.group(2) is None):
        raise _NotFound("no such image")
    return layer_id, kind, unit_number, number


async def _read_limited(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_UPLOAD_BYTES:
        raise ProbeError(f"the upload is larger than {MAX_UPLOAD_BYTES // 2 ** 20} MB; send a smaller image")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_UPLOAD_BYTES:
            raise ProbeError(f"the upload is larger than {MAX_UPLOAD_BYTES // 2 ** 20} MB; send a smaller image")
        chunks.append(chunk)
    return b"".join(chunks)


class Guard:
    """ASGI middleware: the token, the Host check, and the security headers on every response."""

    def __init__(self, app, token: Optional[str], allowed_hosts: Optional[FrozenSet[str]] = None,
                 cookie: str = COOKIE):
        self.app, self.token, self.cookie = app, token, cookie
        self.allowed_hosts = None if allowed_hosts is None else frozenset(h.lower() for h in allowed_hosts)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.allowed_hosts is not None and not host_allowed(headers.get("host", ""), self.allowed_hosts):
            return await _plain(send, 400, "this server answers only requests to its own address or an allowed host "
                                           "name (127.0.0.1, localhost, an IP address, or neurolens serve "
                                           "--allow-host NAME)")
        extra = []
        if self.token is not None:
            query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
            given_query = query.get("token")
            if given_query is not None and _same(given_query, self.token):
                rest = urlencode({k: v for k, v in query.items() if k != "token"})
                # the path as the client sent it (still percent-encoded: no CR/LF can reach the header)
                path = scope.get("raw_path") or quote(scope["path"]).encode("ascii")
                location = path + (f"?{rest}".encode("ascii") if rest else b"")
                cookie = f"{self.cookie}={self.token}; HttpOnly; SameSite=Strict; Path=/"
                if scope["method"] in ("GET", "HEAD"):
                    return await _plain(send, 303, "token accepted", [(b"location", location),
                                                                      (b"set-cookie", cookie.encode("latin-1"))])
                extra.append((b"set-cookie", cookie.encode("latin-1")))
            elif not self._authorized(headers):
                return await _plain(send, 403, "403: this server needs its token: open the URL that neurolens "
                                               "serve printed (it ends in ?token=...)")

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = list(message.get("headers", [])) + SECURITY_HEADERS + extra
            await send(message)
        await self.app(scope, receive, send_with_headers)

    def _authorized(self, headers: Dict[str, str]) -> bool:
        """The Authorization header when one is sent (it alone decides), else this server's cookie."""
        if "authorization" in headers:
            auth = headers["authorization"].strip()
            return auth.lower().startswith("token ") and _same(auth[6:].strip(), self.token)
        cookies = [part.strip().split("=", 1) for part in headers.get("cookie", "").split(";") if "=" in part]
        # a browser may send several cookies of one name (other paths): any of them may hold the token
        return any(name == self.cookie and _same(value, self.token) for name, value in cookies)


def _same(given: str, token: str) -> bool:
    """Constant-time comparison (any text: a non-ASCII guess must not raise)."""
    return secrets.compare_digest(given.encode("utf-8", "replace"), token.encode("utf-8"))


async def _plain(send, status: int, text: str, headers=()) -> None:
    body = (text + "\n").encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode())] + SECURITY_HEADERS + list(headers)})
    await send({"type": "http.response.body", "body": body})
