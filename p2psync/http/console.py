"""The web console: pages for the people who run a site, served by the same HTTP
server as the API (Jinja2 templates, no asset from anywhere else).

Logging in takes the API key (typed into the login form) or a one-time link that
``p2psync console`` prints; either gives a session cookie (HttpOnly,
SameSite=Strict, 12 hours from the last use). A session may read the site
(the pages, ``GET`` of the API and its event stream, which keeps the pages live)
and send the console's own forms, each carrying the session's CSRF token; writing
through the API itself still takes the key.
"""

from __future__ import annotations

import hmac
import json
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from http.cookies import SimpleCookie
from itertools import islice
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

import jinja2
import trio
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from p2psync import pairing
from p2psync.api import Database
from p2psync.clock import now_ms
from p2psync.core import hlc
from p2psync.core.entry import OpKind, check_collection, check_key
from p2psync.core.identity import device_id, parse_device_id, short_id
from p2psync.core.rules import Direction, Mode, RuleState
from p2psync.core.rules import Route as RuleRoute
from p2psync.errors import P2PSyncError, UsageError
from p2psync.http.admin import find_rule, waiting
from p2psync.http.body import read_body
from p2psync.http.keys import LINK_TTL_MS, check_link_token, matches
from p2psync.http.site import Site
from p2psync.store.local import Change
from p2psync.views.peers import peer_rows
from p2psync.views.records import version_row
from p2psync.views.rules import RuleOptions, accept_in_view, pending, rule_row
from p2psync.views.status import site_status
from p2psync.views.values import from_json, to_json

HERE = Path(__file__).parent
COOKIE = "p2psync_console"  # + "_" and the first characters of the site's device ID
SESSION_S = 12 * 3600  # a session lasts this long from its last use
MAX_SESSIONS = 64
MAX_FORM = 64 * 1024  # bytes of a console form
FORM_SECONDS = 30.0  # for the whole of a console form to arrive
PAGE = 50  # records per page in the browser
#: Every console page: scripts, styles and connections from this origin only.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; "
    "form-action 'self'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


@dataclass
class Session:
    csrf: str
    last_used: float
    #: what the last form did (or why it failed) and the page it went back to,
    #: shown once by that page: kept here, not in the URL, so a crafted link
    #: cannot put words on a page
    notice: str = ""
    problem: str = ""
    back: str = ""


class Sessions:
    """Console sessions in the agent's memory (a restart logs everyone out), and
    the one-time links already used."""

    def __init__(self, key: str, started_ms: int | None = None, site: str = "") -> None:
        self.key = key
        # a browser keeps cookies per host, not per port: each site's has its own
        # name, so logging in to two agents on one machine keeps both sessions
        self.cookie = f"{COOKIE}_{site[:7]}" if site else COOKIE
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._used_links: dict[str, int] = {}
        # links made before this start are refused: the links used before a
        # restart are forgotten with it, and must not work again
        self.started_ms = now_ms() if started_ms is None else started_ms

    def open(self) -> tuple[str, Session]:
        token = secrets.token_urlsafe(32)
        session = Session(secrets.token_urlsafe(24), time.monotonic())
        self._sessions[token] = session
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)  # the least recently used goes
        return token, session

    def get(self, token: str | None) -> Session | None:
        if not token:
            return None
        session = self._sessions.get(token)
        if session is None:
            return None
        if time.monotonic() - session.last_used > SESSION_S:
            del self._sessions[token]
            return None
        session.last_used = time.monotonic()
        self._sessions.move_to_end(token)
        return session

    def close(self, token: str | None) -> None:
        if token:
            self._sessions.pop(token, None)

    def take_link(self, token: str) -> bool:
        """A one-time link's token, sound, unexpired and not used before."""
        now = now_ms()
        found = check_link_token(self.key, token, now)
        self._used_links = {n: e for n, e in self._used_links.items() if e >= now}
        if found is None or found[0] in self._used_links:
            return False
        if found[1] - LINK_TTL_MS < self.started_ms:
            return False  # (`p2psync console` makes links only while the agent runs)
        self._used_links[found[0]] = found[1]
        return True

    def allows(self, scope: Scope) -> bool:
        """The guard's question: a session may read anything (``GET``) and send
        the console's forms (which check its CSRF token)."""
        if scope["method"] not in ("GET", "HEAD") and not scope["path"].startswith("/console/"):
            return False
        return self.get(_cookie(scope, self.cookie)) is not None


def _cookie(scope: Scope, name: str) -> str | None:
    for header, value in scope.get("headers", []):
        if header == b"cookie":
            jar: SimpleCookie = SimpleCookie()
            try:
                jar.load(value.decode("latin-1"))
            except Exception:  # a malformed cookie header is no session
                return None
            morsel = jar.get(name)
            if morsel is not None:
                return morsel.value
    return None


def public(method: str, path: str) -> bool:
    """What is served without the key or a session: the login page and the
    console's static files (and ``/``, which sends a browser there)."""
    return path in ("/", "/console/login") or path.startswith("/console/static/")


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["when"] = _when
    env.filters["clock"] = lambda stamp: _when(hlc.wall_ms(stamp))
    env.filters["json"] = _json_text
    env.filters["short"] = lambda text: str(text or "")[:7]
    return env


def _when(ms: int | None) -> str:
    if not ms:
        return "never"
    return time.strftime("%d %b %H:%M:%S", time.localtime(ms / 1000))


def _json_text(value: Any) -> str:
    return json.dumps(to_json(value), ensure_ascii=False, indent=1, sort_keys=True)


class Console:
    def __init__(self, site: Site, sessions: Sessions) -> None:
        self.site = site
        self.sessions = sessions
        self.env = _environment()

    # ------------------------------------------------------------ rendering

    def page(self, request: Request, template: str, **context: Any) -> Response:
        session = self.sessions.get(request.cookies.get(self.sessions.cookie))
        notice = problem = ""
        # shown by the page the form went back to, not by a live refresh of it
        if (
            session is not None
            and session.back == request.url.path
            and not request.headers.get("x-console-live")
        ):
            notice, problem = session.notice, session.problem
            session.notice = session.problem = session.back = ""
        html = self.env.get_template(template).render(
            site_name=self.site.db.name,
            device_id=self.site.db.device_id,
            csrf=session.csrf if session else "",
            path=request.url.path,
            notice=notice,
            problem=problem,
            **context,
        )
        return HTMLResponse(html, headers=SECURITY_HEADERS)

    async def _form(self, request: Request) -> dict[str, str]:
        """The form of a console action, its CSRF token checked (and its Origin, when
        the browser sends one)."""
        session = self.sessions.get(request.cookies.get(self.sessions.cookie))
        if session is None:
            raise UsageError("log in to the console first")
        origin = request.headers.get("origin")
        host = request.headers.get("host", "")
        # "null": the browser would not say (a privacy setting, a sandbox): the token
        # decides, as it does for every form
        if origin not in (None, "null") and origin not in (f"http://{host}", f"https://{host}"):
            raise UsageError("a form from another site was refused")
        body = await read_body(request, MAX_FORM, what="the form", deadline=FORM_SECONDS)
        try:
            text = body.decode("utf-8")
            fields = {k: v[-1] for k, v in parse_qs(text).items()}
        except UnicodeDecodeError:
            raise UsageError("the form is not UTF-8") from None
        if not hmac.compare_digest(fields.get("csrf", "").encode(), session.csrf.encode()):
            raise UsageError(
                "the form expired (its CSRF token does not match): load the page again"
            )
        return fields

    # ------------------------------------------------------------ login

    async def login_page(self, request: Request) -> Response:
        once = request.query_params.get("once")
        if once is not None:
            if self.sessions.take_link(once):
                return self._logged_in()
            return self.page(request, "login.html", error="that link is used or expired: run "
                             "`p2psync console` again, or give the API key")
        return self.page(request, "login.html", error="")

    async def login(self, request: Request) -> Response:
        # (anyone may send it: a deadline for the whole, not only a stall limit)
        body = await read_body(request, MAX_FORM, what="the form", deadline=FORM_SECONDS)
        fields = parse_qs(body.decode("utf-8", "replace"))
        given = (fields.get("key") or [""])[-1].strip()
        if matches(given, self.sessions.key):
            return self._logged_in()
        await trio.sleep(0.5)  # a guess costs time
        return self.page(request, "login.html", error="that is not this site's API key "
                         "(it is in HOME/http.key)")

    def _logged_in(self) -> Response:
        token, _session = self.sessions.open()
        response = RedirectResponse("/console/", status_code=303, headers=SECURITY_HEADERS)
        response.set_cookie(
            self.sessions.cookie,
            token,
            max_age=SESSION_S,
            httponly=True,
            samesite="strict",
            path="/",
        )
        return response

    async def logout(self, request: Request) -> Response:
        await self._form(request)
        self.sessions.close(request.cookies.get(self.sessions.cookie))
        response = RedirectResponse("/console/login", status_code=303)
        response.delete_cookie(self.sessions.cookie, path="/")
        return response

    # ------------------------------------------------------------ pages

    async def overview(self, request: Request) -> Response:
        running = self.site.status()
        status = await trio.to_thread.run_sync(site_status, self.site.db, running)
        asks, _joins, _strangers = await trio.to_thread.run_sync(self._pending)
        waiting_here = [a for a in asks if a["awaiting"] == "you"]
        wrong: list[str] = []
        for row in status["peers"]:
            if row.get("problem"):
                wrong.append(f"{row['name'] or row['device_id'][:7]}: {row['problem']}")
        for hurt in status["store"]["damaged"]:
            wrong.append(
                f"entry {hurt['seq']} of {hurt['author']} is damaged here and waits for a "
                "sound copy from a peer (`p2psync verify`)"
            )
        if status["store"]["conflicts"]:
            wrong.append(f"{status['store']['conflicts']} records are in conflict")
        if waiting_here:
            wrong.append(f"{len(waiting_here)} pairing requests wait for your answer")
        return self.page(
            request, "overview.html", status=status, agent=running, wrong=wrong,
            relay=running.get("relay") or {},
        )

    async def peers(self, request: Request) -> Response:
        rows = await trio.to_thread.run_sync(peer_rows, self.site.db, self.site.status())
        return self.page(request, "peers.html", peers=rows)

    def _pending(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
        """What waits for an answer, without the sweep of expired requests (a
        write; the agent sweeps them hourly)."""
        return pending(self.site.db, expire=False)

    async def requests(self, request: Request) -> Response:
        asks, joins, strangers = await trio.to_thread.run_sync(self._pending)
        return self.page(
            request, "requests.html", requests=asks, joins=joins, strangers=strangers,
            directions=[d.value for d in Direction],
        )

    async def rules(self, request: Request) -> Response:
        db = self.site.db

        def read() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
            me = db.identity.public_key
            names = {p.key: p.name for p in db.store.peers()}
            rows = [rule_row(me, r, names) for r in db.store.rules()]
            known = [
                {"device_id": row["device_id"], "name": row["name"]}
                for row in peer_rows(db, None)
                if row["state"] != "discovered (not paired)"
            ]
            return rows, known

        rows, known = await trio.to_thread.run_sync(read)
        return self.page(
            request, "rules.html", rules=rows, peers=known,
            directions=[d.value for d in Direction], modes=[m.value for m in Mode],
            routes=[r.value for r in RuleRoute],
        )

    async def conflicts(self, request: Request) -> Response:
        db = self.site.db
        found = await trio.to_thread.run_sync(db.conflicts)
        names = {device_id(p.key): p.name for p in await trio.to_thread.run_sync(db.store.peers)}
        names[db.device_id] = f"{db.name} (this site)"
        rows = [
            {
                "collection": c.collection,
                "key": c.key,
                "versions": [version_row(c.winner), *[version_row(v) for v in c.losers]],
            }
            for c in found
        ]
        return self.page(request, "conflicts.html", conflicts=rows, names=names)

    async def records(self, request: Request) -> Response:
        db = self.site.db
        collection = request.query_params.get("collection")
        after = request.query_params.get("after") or None
        prefix = request.query_params.get("prefix", "")
        if collection is None:
            names = await trio.to_thread.run_sync(db.collections)
            return self.page(request, "records.html", collections=names, collection=None,
                             rows=[], next=None, prefix="")
        check_collection(collection)

        def read() -> list[tuple[str, Any]]:
            return list(islice(db.scan(collection, prefix, after), PAGE + 1))

        rows = await trio.to_thread.run_sync(read)
        more = len(rows) > PAGE
        rows = rows[:PAGE]
        following = None
        if more:
            following = "?" + urlencode(
                {"collection": collection, "prefix": prefix, "after": rows[-1][0]}
            )
        return self.page(request, "records.html", collections=[], collection=collection,
                         rows=rows, next=following, prefix=prefix)

    # ------------------------------------------------------------ actions

    async def act(self, request: Request) -> Response:
        """A console form: do it, and go back to the page it came from saying what
        happened (or what was wrong)."""
        action = request.path_params["action"]
        back = {"accept": "requests", "reject": "requests", "propose": "rules",
                "revoke": "rules", "keep": "conflicts", "write": "conflicts"}.get(action)
        if back is None:
            raise UsageError(f"no console action {repr(action)[:80]}")
        fields = await self._form(request)
        session = self.sessions.get(request.cookies.get(self.sessions.cookie))
        assert session is not None  # (_form checked it)
        session.notice = session.problem = ""
        session.back = f"/console/{back}"
        try:
            session.notice = await trio.to_thread.run_sync(self._do, action, fields)
        except P2PSyncError as exc:
            session.problem = str(exc)
        if action in ("accept", "reject", "propose", "revoke"):
            self.site.peers_changed()
        return RedirectResponse(f"/console/{back}", status_code=303)

    def _do(self, action: str, fields: dict[str, str]) -> str:
        db = self.site.db
        for field, choices in (("direction", Direction), ("mode", Mode), ("route", RuleRoute)):
            allowed = [member.value for member in choices]
            if fields.get(field) and fields[field] not in allowed:
                raise UsageError(
                    f"{field} is one of {', '.join(allowed)}, not {repr(fields[field])[:80]}"
                )
        if action in ("accept", "reject"):
            rule = waiting(db, find_rule(db, fields.get("rule", "")))
            if action == "reject":
                reason = fields.get("reason", "").strip()
                if not reason:
                    raise UsageError("say why you reject it (the requester sees it)")
                pairing.reject(db, rule, reason[:500])
                return f"rejected the request of {_peer(db, rule.proposer)}"
            collections = tuple(
                c.strip() for c in fields.get("collections", "").split(",") if c.strip()
            )
            direction = fields.get("direction") or None
            mine = accept_in_view(db, rule, RuleOptions(collections, direction, None, None))
            db.store.add_peer(rule.proposer, None, [], now_ms())
            return f"paired with {_peer(db, rule.proposer)}: {mine.describe()}"
        if action == "revoke":
            rule = find_rule(db, fields.get("rule", ""))
            if rule.state is RuleState.REVOKED:
                raise UsageError("that rule is already revoked")
            pairing.revoke(db, rule)
            me = db.identity.public_key
            other = rule.acceptor if rule.proposer == me else rule.proposer
            return f"revoked the rule with {_peer(db, other)}"
        if action == "propose":
            peer = parse_device_id(fields.get("peer", ""))
            collections = tuple(
                c.strip() for c in fields.get("collections", "").split(",") if c.strip()
            )
            options = RuleOptions(
                collections,
                fields.get("direction") or None,
                fields.get("mode") or None,
                fields.get("route") or None,
            )
            result = pairing.propose(db, peer, options.terms())
            terms = result.rule.terms_for(db.identity.public_key).describe()
            return ("proposed: " if result.new else "already in place: ") + terms
        collection = check_collection(fields.get("collection"))
        key = check_key(fields.get("key"))
        conflict = next(
            (c for c in db.conflicts() if c.collection == collection and c.key == key), None
        )
        if conflict is None:
            raise UsageError(f"{collection}/{key} is not in conflict any more")
        if action == "keep":
            versions = [conflict.winner, *conflict.losers]
            picked = next((v for v in versions if v.entry.hex() == fields.get("entry")), None)
            if picked is None:
                raise UsageError("that version is not one of the record's versions any more")
            kind = OpKind.DELETE if picked.deleted else OpKind.PUT
            db.write([[Change(kind, collection, key, picked.value, resolve=True)]])
            return f"kept the version of {_peer(db, picked.author)} for {collection}/{key}"
        try:
            value = from_json(json.loads(fields.get("value", "")))
        except ValueError as exc:
            raise UsageError(f"the value is not JSON: {exc}") from None
        db.write([[Change(OpKind.PUT, collection, key, value, resolve=True)]])
        return f"wrote a new value for {collection}/{key}"

    # ------------------------------------------------------------ routes

    def routes(self) -> list[BaseRoute]:
        async def root(_request: Request) -> Response:
            return RedirectResponse("/console/", status_code=303)

        return [
            Route("/", root, methods=["GET"]),
            Route("/console/login", self.login_page, methods=["GET"]),
            Route("/console/login", self.login, methods=["POST"]),
            Route("/console/logout", self.logout, methods=["POST"]),
            Route("/console/", self.overview, methods=["GET"]),
            Route("/console/peers", self.peers, methods=["GET"]),
            Route("/console/requests", self.requests, methods=["GET"]),
            Route("/console/rules", self.rules, methods=["GET"]),
            Route("/console/conflicts", self.conflicts, methods=["GET"]),
            Route("/console/records", self.records, methods=["GET"]),
            Route("/console/act/{action}", self.act, methods=["POST"]),
            Mount("/console/static", StaticFiles(directory=HERE / "static"), name="static"),
        ]


def _peer(db: Database, key: bytes) -> str:
    found = db.store.peer(key)
    name = found.name if found is not None and found.name else None
    return f"{name} ({short_id(key)})" if name else short_id(key)

