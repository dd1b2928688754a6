"""A tiny "product" with its own login that embeds chatd for its users (docs/embedding.md).

Its users exist only here (a dict below). When one signs in, the page shows chatd's web
client in an iframe (/chat?embed); the iframe asks this page for a token, and the page
asks this app's backend (GET /chat-token, behind the app's own session cookie), which
signs a short-lived JWT with the secret it shares with chatd. chatd creates the user on
first sight. No chatd account, no chatd password.

Run chatd with (the same secret on both sides):

    CHATD_AUTH_JWT_SECRET=an-example-secret-of-at-least-32-chars \\
    CHATD_AUTH_ISSUER=http://127.0.0.1:8080 CHATD_AUTH_AUDIENCE=chatd \\
    CHATD_EMBED_ORIGINS=http://127.0.0.1:8080 make run

and this app with:

    CHATD_AUTH_JWT_SECRET=an-example-secret-of-at-least-32-chars \\
    .venv/bin/python examples/embed_app.py --port 8080 --chatd http://127.0.0.1:8000

then open http://127.0.0.1:8080 and sign in as ada or bob (password: "demo"), each in a
window of their own.

With an API key (CHATD_API_KEY, made by a chatd admin: POST /admin/api_keys), the app's
backend also creates its users in chatd when they sign in, and one chat they all share,
"Shop support" (idempotent by its ext_id); with the key's webhook secret
(CHATD_WEBHOOK_SECRET) it receives chatd's events at POST /chatd-events, checks their
signature, and lists them at GET /chatd-events.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import html
import json
import os
import secrets
import time

import httpx
import jwt
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from chatd import signing

# The product's own users: its database, in a real app. Passwords are "demo".
USERS = {
    "ada": {"name": "Ada Lovelace", "password": "demo"},
    "bob": {"name": "Bob Babbage", "password": "demo"},
    "cyd": {"name": "Cyd Charisse", "password": "demo"},
}
TOKEN_TTL = 600  # seconds: short, the chat asks for a new one before it ends
COOKIE = "shop_session"


SUPPORT_CHAT = "shop-support"  # the ext_id of the chat the app makes for its users


def make_app(
    chatd_url: str,
    secret: str,
    issuer: str,
    audience: str = "chatd",
    api_key: str | None = None,
    webhook_secret: str | None = None,
) -> Starlette:
    """The app: chatd at `chatd_url`, tokens signed with `secret` for `issuer`; with
    `api_key` its backend manages users and a chat, with `webhook_secret` it hears events."""
    cookie_key = secrets.token_bytes(32)  # the app's own sessions: signed cookies
    events: list[dict] = []  # chatd's webhook deliveries, newest last (a database, really)
    seen: set[str] = set()  # delivery ids: at least once means maybe twice

    async def provision(username: str) -> None:
        """The user in chatd, and the support chat of all the shop's users (both are
        idempotent: made the first time, found after)."""
        headers = {"Authorization": f"Bearer {api_key}"}
        async with httpx.AsyncClient(base_url=chatd_url, headers=headers, timeout=10) as chatd:
            users = [{"sub": name, "name": user["name"]} for name, user in USERS.items()]
            (await chatd.post("/app/users", json={"users": users})).raise_for_status()
            body = {"ext_id": SUPPORT_CHAT, "name": "Shop support", "members": list(USERS)}
            (await chatd.post("/app/chats", json=body)).raise_for_status()

    async def chatd_events(request: Request) -> Response:
        if request.method == "GET":
            return JSONResponse(events)
        body = await request.body()
        if webhook_secret is None or not signing.verify(
            webhook_secret.encode(), body, request.headers
        ):
            return JSONResponse({"error": "bad signature"}, 401)
        delivery = request.headers.get(signing.DELIVERY, "")
        if delivery not in seen:
            seen.add(delivery)
            events.append(json.loads(body))
        return JSONResponse({})

    def session_cookie(username: str) -> str:
        mac = hmac.new(cookie_key, username.encode(), hashlib.sha256).hexdigest()
        return f"{username}.{mac}"

    def signed_in(request: Request) -> str | None:
        username, _, mac = request.cookies.get(COOKIE, "").partition(".")
        expected = hmac.new(cookie_key, username.encode(), hashlib.sha256).hexdigest()
        return username if username in USERS and hmac.compare_digest(mac, expected) else None

    async def home(request: Request) -> Response:
        username = signed_in(request)
        if username is None:
            return HTMLResponse(LOGIN_PAGE)
        page = CHAT_PAGE.replace("{{name}}", html.escape(USERS[username]["name"]))
        return HTMLResponse(page.replace("{{chatd}}", html.escape(chatd_url.rstrip("/"))))

    async def login(request: Request) -> Response:
        form = await request.form()
        username = str(form.get("username", ""))
        user = USERS.get(username)
        if user is None or not hmac.compare_digest(user["password"], str(form.get("password"))):
            return HTMLResponse(LOGIN_PAGE.replace("<!--error-->", "Wrong name or password"), 401)
        if api_key:
            await provision(username)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE, session_cookie(username), httponly=True, samesite="lax")
        return response

    async def logout(request: Request) -> Response:
        response = RedirectResponse("/", status_code=303)
        response.delete_cookie(COOKIE)
        return response

    async def chat_token(request: Request) -> Response:
        """The signed-in user's chat token: what chatd trusts (CHATD_AUTH_JWT_SECRET)."""
        username = signed_in(request)
        if username is None:
            return JSONResponse({"error": "sign in first"}, 401)
        now = int(time.time())
        claims = {
            "iss": issuer,
            "aud": audience,
            "sub": username,
            "name": USERS[username]["name"],
            "iat": now,
            "exp": now + TOKEN_TTL,
        }
        return JSONResponse({"token": jwt.encode(claims, secret, algorithm="HS256")})

    return Starlette(
        routes=[
            Route("/", home),
            Route("/login", login, methods=["POST"]),
            Route("/logout", logout, methods=["POST"]),
            Route("/chat-token", chat_token),
            Route("/chatd-events", chatd_events, methods=["GET", "POST"]),
        ]
    )


LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Shop: sign in</title></head>
<body>
<h1>The Shop</h1>
<form method="post" action="/login">
  <p><label>Name <input name="username" autocomplete="username"></label></p>
  <p><label>Password <input name="password" type="password"></label></p>
  <p class="error"><!--error--></p>
  <button type="submit">Sign in</button>
</form>
</body></html>
"""

# The page that embeds chatd: an iframe of /chat?embed, and the few lines that answer its
# token requests with a token from this app's backend.
CHAT_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Shop: messages</title>
<style>body{font-family:sans-serif;margin:0} header{padding:8px}
iframe{border:0;width:100%;height:calc(100vh - 50px)}</style></head>
<body>
<header>Signed in to the Shop as <b id="who">{{name}}</b>
  <form method="post" action="/logout" style="display:inline"><button>Sign out</button></form>
</header>
<iframe id="chat" src="{{chatd}}/chat?embed" title="Messages"></iframe>
<script>
const CHATD = new URL("{{chatd}}").origin;
const frame = document.getElementById("chat");
window.addEventListener("message", async (event) => {
  if (event.origin !== CHATD || event.source !== frame.contentWindow) return;
  if (!event.data || event.data.type !== "chatd:token-request") return;
  const res = await fetch("/chat-token", {credentials: "same-origin"});
  if (!res.ok) { location.reload(); return; }  // signed out here: back to the login
  const {token} = await res.json();
  frame.contentWindow.postMessage({type: "chatd:token", token}, CHATD);
});
</script>
</body></html>
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--chatd", default=os.environ.get("CHATD_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--issuer", default=None, help="default: this app's own URL")
    args = parser.parse_args()
    secret = os.environ.get("CHATD_AUTH_JWT_SECRET")
    if not secret:
        parser.error("set CHATD_AUTH_JWT_SECRET, the same as chatd's")
    issuer = args.issuer or f"http://{args.host}:{args.port}"
    app = make_app(
        args.chatd,
        secret,
        issuer,
        api_key=os.environ.get("CHATD_API_KEY"),
        webhook_secret=os.environ.get("CHATD_WEBHOOK_SECRET"),
    )
    uvicorn.run(app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
