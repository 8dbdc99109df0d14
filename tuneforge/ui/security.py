"""Who may talk to the dashboard: the local user by default, anyone with the token otherwise.

It reads every run and can load models, so a non-local bind without a token is refused at startup. With a token,
every request carries it (Authorization: Bearer, X-Tuneforge-Token, or ?token= once, after which a cookie does).
Without a token the Host header must be a local name: a web page the user visits cannot reach the dashboard by
pointing its own domain at 127.0.0.1 (DNS rebinding). Requests that change something (POST) must be JSON and, when
the browser names an Origin, come from the dashboard's own: another site's form or script cannot post ratings or
start generation jobs (a JSON content type needs a CORS preflight, which is never granted).
"""

from __future__ import annotations

import hmac
from urllib.parse import urlsplit

from fastapi import Request
from fastapi.responses import JSONResponse, PlainTextResponse

from tuneforge.errors import UserError

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
COOKIE = "tuneforge_ui_token"


def check_bind(host: str, token: str | None) -> None:
    if host not in LOCAL_HOSTS and not token:
        raise UserError(f"--host {host}: other machines could read every run and start models; give --token SECRET "
                        f"as well (or bind to 127.0.0.1)")


def _host_name(header: str) -> str:
    if header.startswith("["):  # [::1]:7860
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _given_token(request: Request) -> tuple[str, bool]:
    """(the token the request carries, whether it came in the query string)."""
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip(), False
    if "x-tuneforge-token" in request.headers:
        return request.headers["x-tuneforge-token"], False
    if "token" in request.query_params:
        return request.query_params["token"], True
    return request.cookies.get(COOKIE, ""), False


def _same_origin_json(request: Request) -> bool:
    if not request.headers.get("content-type", "").startswith("application/json"):
        return False
    origin = request.headers.get("origin")
    return origin is None or urlsplit(origin).netloc == request.headers.get("host", "")


def guard(token: str | None):
    """The HTTP middleware enforcing the rules above."""

    async def check(request: Request, call_next):
        if request.method not in ("GET", "HEAD") and not _same_origin_json(request):
            return JSONResponse({"error": "tuneforge ui: changes must be JSON requests from the dashboard itself"}, 403)
        if token is not None and request.url.path == "/health":  # says only "up": scripts wait on it
            return await call_next(request)
        if token is None:
            if _host_name(request.headers.get("host", "")) not in LOCAL_HOSTS:
                return PlainTextResponse("tuneforge ui: only local host names are served without --token", 403)
            return await call_next(request)
        given, from_query = _given_token(request)
        if not hmac.compare_digest(given.encode(), token.encode()):
            message = "tuneforge ui: a token is required: open the address with ?token=YOUR_TOKEN"
            if request.url.path.startswith("/api/"):
                return JSONResponse({"error": message}, 401)
            return PlainTextResponse(message, 401)
        response = await call_next(request)
        if from_query:  # later page loads and the pages' own requests send the cookie instead
            response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
        return response

    return check
