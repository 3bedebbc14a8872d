"""The Store contract, run against every implementation: SQLite and a real PostgreSQL.

Each test gets a fresh database. Concurrency tests spread their calls over two store
instances on the same database: two connections for SQLite, two pools ("two replicas")
for PostgreSQL, so the guarantees are proven across processes' worth of connections,
not just inside one asyncio lock.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import asyncpg
import pytest

from domum_gateway.audit import AuditEntry, verify_chain
from domum_gateway.auth.secrets import hash_secret, new_id
from domum_gateway.clock import FakeClock
from domum_gateway.errors import BadRequest, Conflict, StoreError
from domum_gateway.model import (
    AccessRequest,
    Channel,
    Group,
    GroupKind,
    GroupPolicy,
    Protocol,
    Reason,
    RemoteUser,
    RequestStatus,
    Role,
    Session,
    Target,
)
from domum_gateway.store.base import (
    AuditFilter,
    ConnectionRecord,
    ConsoleSessionRecord,
    OtpIssue,
    OtpResult,
    RequestFilter,
    SecretKind,
    SessionCreate,
    Store,
)
from domum_gateway.store.migrations import MIGRATIONS
from domum_gateway.store.migrations_pg import MIGRATIONS_PG
from domum_gateway.store.postgres import PostgresStore
from domum_gateway.store.sqlite import SqliteStore

from ..peers.postgres import PostgresServer

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


def _audit(action: str = "test", subject: str = "x", **details: str) -> AuditEntry:
    return AuditEntry(actor="test", action=action, subject=subject, details=details or None)


@dataclass
class Backend:
    """A store under test, plus what a test needs to go behind its back."""

    kind: str
    url: str
    store: Store
    pg: PostgresServer | None
    tmp: Path
    extra: list[Store] = field(default_factory=list)

    def new_store(self) -> Store:
        return _new_store(self.url)

    async def replica(self) -> Store:
        """Another instance on the same database (a second process's view)."""
        other = self.new_store()
        await other.open()
        self.extra.append(other)
        return other

    async def raw(self, sql: str) -> None:
        """Run SQL directly against the database (tampering, as an attacker would)."""
        if self.kind == "sqlite":
            db = sqlite3.connect(self.url[len("sqlite:///") :])
            with db:
                db.executescript(sql)
            db.close()
            return
        conn = await asyncpg.connect(self.url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()


def _new_store(url: str) -> Store:
    if url.startswith("sqlite:"):
        return SqliteStore(Path(url[len("sqlite:///") :]))
    return PostgresStore(url)


@pytest.fixture(params=["sqlite", "postgresql"])
def backend_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgresql":
        return str(request.getfixturevalue("pg_url"))
    return f"sqlite:///{tmp_path}/contract.db"


@pytest.fixture
async def backend(request: pytest.FixtureRequest, backend_url: str, tmp_path: Path) -> AsyncIterator[Backend]:
    kind = "sqlite" if backend_url.startswith("sqlite:") else "postgresql"
    pg = request.getfixturevalue("pg_server") if kind == "postgresql" else None
    b = Backend(kind, backend_url, _new_store(backend_url), pg, tmp_path)
    await b.store.open()
    try:
        yield b
    finally:
        for s in [b.store, *b.extra]:
            await s.close()


@pytest.fixture
def store(backend: Backend) -> Store:
    return backend.store


# --- builders ------------------------------------------------------------------------------


@dataclass
class World:
    group: Group
    user: RemoteUser
    reason: Reason
    target: Target


async def _world(store: Store, name: str = "ops", max_sessions: int = 3) -> World:
    group = Group(
        new_id("grp"), f"group {name}", GroupKind.INTERNAL, GroupPolicy(max_sessions=max_sessions), T0
    )
    await store.create_group(group, _audit("group.created", group.id))
    user = RemoteUser(new_id("usr"), group.id, f"User {name}", f"{name}@Example.com", None, Channel.EMAIL, T0)
    await store.create_user(user, _audit("user.created", user.id))
    reason = Reason(new_id("rsn"), f"Maintenance {name}", T0)
    await store.create_reason(reason, _audit("reason.created", reason.id))
    target = Target(
        new_id("tgt"), f"wiki-{name}", Protocol.HTTP, "http://127.0.0.1:9/", None, None, None, True, T0
    )
    await store.create_target(target, _audit("target.created", target.id))
    return World(group, user, reason, target)


async def _request(
    store: Store, w: World, *, created: datetime = T0, hours: int = 2, rid: str | None = None
) -> AccessRequest:
    req = AccessRequest(
        id=rid or new_id("req"),
        group_id=w.group.id,
        user_id=w.user.id,
        justification="Patch the wiki",
        reason_id=w.reason.id,
        governance_code=None,
        start=T0,
        end=T0 + timedelta(hours=hours),
        status=RequestStatus.SAVED,
        created_at=created,
        created_by="token:admin",
    )
    await store.create_request(req, None, _audit("request.created", req.id))
    return req


def _session(request_id: str, at: datetime = T0) -> tuple[Session, str]:
    sid = new_id("ses")
    return Session(sid, request_id, "127.0.0.1", at, at), hash_secret(sid + "-cookie")


# --- schema --------------------------------------------------------------------------------


async def _sqlite_schema(path: Path) -> tuple[dict[str, list[str]], set[str]]:
    db = sqlite3.connect(path)
    try:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        cols = {t: sorted(r[1] for r in db.execute(f"PRAGMA table_info({t})")) for t in tables}
        idx = {
            r[0]
            for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")
        }
    finally:
        db.close()
    return cols, idx


async def _pg_schema(url: str) -> tuple[dict[str, list[str]], set[str]]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT table_name, column_name FROM information_schema.columns"
            " WHERE table_schema = current_schema()"
        )
        # Constraint-backed indexes (primary keys, UNIQUE) are implicit in SQLite too.
        idx = await conn.fetch(
            "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema() AND indexname NOT IN"
            " (SELECT conname FROM pg_constraint)"
        )
    finally:
        await conn.close()
    cols: dict[str, list[str]] = {}
    for r in rows:
        cols.setdefault(r["table_name"], []).append(r["column_name"])
    return {t: sorted(c) for t, c in cols.items()}, {r["indexname"] for r in idx}


async def test_both_dialects_have_the_same_versions_tables_columns_and_indexes(
    tmp_path: Path, pg_url: str
) -> None:
    assert [v for v, _ in MIGRATIONS] == [v for v, _ in MIGRATIONS_PG]
    lite = SqliteStore(tmp_path / "schema.db")
    pg = PostgresStore(pg_url)
    await lite.open()
    await pg.open()
    try:
        assert await lite.schema_version() == await pg.schema_version() == MIGRATIONS[-1][0]
    finally:
        await lite.close()
        await pg.close()
    lite_cols, lite_idx = await _sqlite_schema(tmp_path / "schema.db")
    pg_cols, pg_idx = await _pg_schema(pg_url)
    assert lite_cols == pg_cols
    assert lite_idx == pg_idx


async def test_audit_hashes_are_byte_identical_across_stores(tmp_path: Path, pg_url: str) -> None:
    """The same events at the same instants chain to the same hashes in both stores."""
    clock = FakeClock(T0)
    lite = SqliteStore(tmp_path / "same.db", clock)
    pg = PostgresStore(pg_url, clock)
    await lite.open()
    await pg.open()
    try:
        for i in range(5):
            entry = AuditEntry(
                actor="token:admin",
                action="request.revoked",
                subject=f"req_{i}",
                origin="192.0.2.7",
                details={"reason": "ünïcode ✓", "n": str(i)},
            )
            clock.advance(seconds=1.25)
            await lite.append_audit(entry)
            await pg.append_audit(entry)
        a, b = await lite.all_audit(), await pg.all_audit()
        assert [e.hash for e in a] == [e.hash for e in b]
        assert a == b
        assert await lite.audit_head() == await pg.audit_head()
    finally:
        await lite.close()
        await pg.close()


async def test_reopening_keeps_the_schema(backend: Backend) -> None:
    other = await backend.replica()
    assert await other.schema_version() == MIGRATIONS[-1][0]


# --- CRUD ----------------------------------------------------------------------------------


async def test_api_tokens(store: Store) -> None:
    tok = await store.create_api_token("ci", Role.ADMIN, "h1", T0, _audit("token.created"))
    assert tok.name == "ci" and tok.role is Role.ADMIN
    with pytest.raises(Conflict):
        await store.create_api_token("ci", Role.AUDITOR, "h2", T0, _audit("token.created"))
    with pytest.raises(Conflict, match="token_hash"):
        await store.create_api_token("other", Role.AUDITOR, "h1", T0, _audit("token.created"))
    found = await store.find_api_token("h1")
    assert found is not None and found.created_at == T0
    assert [t.name for t in await store.list_api_tokens()] == ["ci"]
    assert await store.revoke_api_token("ci", T0 + timedelta(minutes=1), _audit("token.revoked"))
    assert not await store.revoke_api_token("ci", T0, _audit("token.revoked"))
    assert await store.find_api_token("h1") is None
    assert (await store.list_api_tokens())[0].revoked_at == T0 + timedelta(minutes=1)


async def test_groups_users_reasons_targets(store: Store) -> None:
    w = await _world(store, "b")
    await _world(store, "a")
    assert [g.name for g in await store.list_groups()] == ["group a", "group b"]
    assert await store.get_group(w.group.id) == w.group
    with pytest.raises(Conflict, match="another record already has this name"):
        await store.create_group(
            Group(new_id("grp"), "group a", GroupKind.INTERNAL, GroupPolicy(), T0), _audit()
        )
    changed = Group(w.group.id, "group b2", GroupKind.THIRD_PARTY, GroupPolicy(max_sessions=7), T0)
    await store.update_group(changed, _audit("group.updated"))
    assert await store.get_group(w.group.id) == changed

    assert await store.get_user(w.user.id) == w.user
    assert await store.find_user_by_login("B@example.COM") == w.user
    assert await store.find_user_by_login(w.user.id) == w.user
    assert await store.find_user_by_login("nobody@example.com") is None
    assert [u.id for u in await store.list_users(w.group.id)] == [w.user.id]
    assert len(await store.list_users()) == 2
    moved = RemoteUser(w.user.id, w.group.id, "Bee", None, "+15550100", Channel.SMS, T0)
    await store.update_user(moved, _audit("user.updated"))
    assert await store.get_user(w.user.id) == moved
    with pytest.raises(Conflict, match="referenced record does not exist"):
        await store.create_user(
            RemoteUser(new_id("usr"), "grp_missing", "X", "x@example.com", None, Channel.EMAIL, T0), _audit()
        )
    with pytest.raises(Conflict, match="still has users"):
        await store.delete_group(w.group.id, _audit("group.deleted"))

    assert await store.get_reason(w.reason.id) == w.reason
    assert [r.label for r in await store.list_reasons()] == ["Maintenance a", "Maintenance b"]
    assert await store.get_target(w.target.id) == w.target
    assert await store.get_target("wiki-b") == w.target
    renamed = Target(w.target.id, "ssh-b", Protocol.SSH, None, "10.0.0.5", 22, "ssh-ed25519 AAAA", False, T0)
    await store.update_target(renamed, _audit("target.updated"))
    assert await store.get_target("ssh-b") == renamed
    assert [t.name for t in await store.list_targets()] == ["ssh-b", "wiki-a"]

    req = await _request(store, w)
    with pytest.raises(Conflict, match="kept for the record"):
        await store.delete_user(w.user.id, _audit())
    with pytest.raises(Conflict, match="kept for the record"):
        await store.delete_reason(w.reason.id, _audit())
    assert await store.get_request(req.id) == req

    fresh = await _world(store, "c")
    assert await store.delete_target(fresh.target.id, _audit("target.deleted"))
    assert not await store.delete_target(fresh.target.id, _audit("target.deleted"))
    assert await store.delete_reason(fresh.reason.id, _audit("reason.deleted"))
    assert await store.delete_user(fresh.user.id, _audit("user.deleted"))
    assert await store.delete_group(fresh.group.id, _audit("group.deleted"))
    assert not await store.delete_group(fresh.group.id, _audit("group.deleted"))
    assert await store.get_group(fresh.group.id) is None
    # Every change above, and nothing that failed, is in the chain.
    assert verify_chain(await store.all_audit(), await store.audit_head()) is None
    assert not [e for e in await store.all_audit() if e.subject == "grp_missing"]


async def test_inline_third_party_user_is_saved_with_its_request(store: Store) -> None:
    w = await _world(store)
    guest = RemoteUser(
        new_id("usr"), w.group.id, "Guest", "g@x.test", None, Channel.EMAIL, T0, ephemeral=True
    )
    req = AccessRequest(
        new_id("req"), w.group.id, guest.id, "Vendor fix", w.reason.id, "CHG-1", T0, T0 + timedelta(hours=1),
        RequestStatus.SAVED, T0, "token:admin",
    )  # fmt: skip
    await store.create_request(req, guest, _audit("request.created", req.id))
    assert await store.get_user(guest.id) == guest
    assert await store.get_request(req.id) == req
    # Atomic: a request that cannot be saved leaves no user behind.
    ghost = RemoteUser(
        new_id("usr"), w.group.id, "Ghost", "h@x.test", None, Channel.EMAIL, T0, ephemeral=True
    )
    bad = AccessRequest(
        new_id("req"), w.group.id, ghost.id, "x", "rsn_missing", None, T0, T0, RequestStatus.SAVED, T0, "t"
    )
    with pytest.raises(Conflict):
        await store.create_request(bad, ghost, _audit("request.created", bad.id))
    assert await store.get_user(ghost.id) is None


async def test_retention_queries(store: Store) -> None:
    w = await _world(store)
    req = await _request(store, w, hours=1)
    assert await store.has_open_requests(w.user.id, T0)
    assert not await store.has_open_requests(w.user.id, T0 + timedelta(hours=1))
    assert await store.purge_candidates(T0) == []
    assert [u.id for u in await store.purge_candidates(T0 + timedelta(hours=1))] == [w.user.id]
    await store.append_audit(
        AuditEntry("test", "login.ok", req.id, details={"request_id": req.id}, personal={"email": "b@x"})
    )
    assert await store.purge_user(w.user.id, T0 + timedelta(days=90), _audit("user.purged", w.user.id))
    assert not await store.purge_user(w.user.id, T0, _audit("user.purged", w.user.id))
    user = await store.get_user(w.user.id)
    assert user is not None and user.email is None and user.purged_at is not None
    assert all(e.personal is None for e in await store.all_audit())
    assert verify_chain(await store.all_audit(), await store.audit_head()) is None


# --- listing and cursors ---------------------------------------------------------------------


async def test_request_filters_and_cursor_pagination(store: Store) -> None:
    a, b = await _world(store, "a"), await _world(store, "b")
    made: list[AccessRequest] = []
    for i in range(7):
        # Two share a creation instant: the id breaks the tie.
        created = T0 + timedelta(minutes=i if i != 4 else 3)
        made.append(await _request(store, a if i % 2 else b, created=created))
    expected = sorted(made, key=lambda r: (r.created_at, r.id), reverse=True)
    seen: list[str] = []
    cursor: str | None = None
    while True:
        page = await store.list_requests(RequestFilter(limit=3, cursor=cursor))
        seen.extend(r.id for r in page.items)
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert seen == [r.id for r in expected]
    assert {r.id for r in (await store.list_requests(RequestFilter(user_id=a.user.id))).items} == {
        r.id for r in made if r.user_id == a.user.id
    }
    only_b = await store.list_requests(RequestFilter(group_id=b.group.id, limit=2))
    assert len(only_b.items) == 2 and only_b.next_cursor is not None
    await store.revoke_request(made[0].id, T0, "admin", _audit("request.revoked", made[0].id))
    revoked = await store.list_requests(RequestFilter(status=RequestStatus.REVOKED))
    assert [r.id for r in revoked.items] == [made[0].id]
    for bad in ("nope", "W10", "WyJhIl0"):  # not base64 JSON / wrong shape / one part
        with pytest.raises(BadRequest):
            await store.list_requests(RequestFilter(cursor=bad))


async def test_audit_filters_and_cursor(store: Store) -> None:
    for i in range(6):
        await store.append_audit(
            AuditEntry("test", "a.even" if i % 2 == 0 else "a.odd", f"req_{i % 3}", details={"i": i})
        )
    events = await store.all_audit()
    assert [e.seq for e in events] == [1, 2, 3, 4, 5, 6]
    page = await store.list_audit(AuditFilter(limit=4))
    assert [e.seq for e in page.items] == [1, 2, 3, 4] and page.next_cursor
    rest = await store.list_audit(AuditFilter(limit=4, cursor=page.next_cursor))
    assert [e.seq for e in rest.items] == [5, 6] and rest.next_cursor is None
    assert [e.seq for e in (await store.list_audit(AuditFilter(type="a.odd"))).items] == [2, 4, 6]
    assert [e.seq for e in (await store.list_audit(AuditFilter(request_id="req_1"))).items] == [2, 5]
    assert [e.seq for e in (await store.list_audit(AuditFilter(subject="req_2"))).items] == [3, 6]
    assert (await store.list_audit(AuditFilter(since=events[4].at))).items[0].seq == 5
    assert (await store.list_audit(AuditFilter(since=events[5].at + timedelta(seconds=1)))).items == []
    for bad in ("nope", "WyJ4Il0"):
        with pytest.raises(BadRequest):
            await store.list_audit(AuditFilter(cursor=bad))


# --- request lifecycle ---------------------------------------------------------------------


async def test_forward_revoke_and_expire_semantics(store: Store) -> None:
    w = await _world(store)
    req = await _request(store, w)
    fwd = await store.mark_forwarded(req.id, "link1", T0, "token:admin", _audit("request.forwarded", req.id))
    assert fwd is not None and fwd.status is RequestStatus.FORWARDED and fwd.forwarded_by == "token:admin"
    assert await store.find_request_by_link("link1") == fwd
    await store.issue_otp(req.id, "otp1", T0, T0 + timedelta(minutes=5), 10)
    # A new link replaces the old one and kills its token.
    again = await store.mark_forwarded(
        req.id, "link2", T0, "token:admin", _audit("request.forwarded", req.id)
    )
    assert again is not None
    assert await store.find_request_by_link("link1") is None
    assert await store.redeem_otp(req.id, "otp1", T0, 5) is OtpResult.NONE
    # The same link cannot be given to two requests.
    other = await _request(store, w)
    with pytest.raises(Conflict):
        await store.mark_forwarded(other.id, "link2", T0, "a", _audit("request.forwarded", other.id))

    s1, h1 = _session(req.id)
    assert await store.create_session(s1, h1, 3, _audit("session.started", s1.id)) is SessionCreate.OK
    await store.issue_otp(req.id, "otp2", T0, T0 + timedelta(minutes=5), 10)
    revoked = await store.revoke_request(
        req.id, T0 + timedelta(minutes=1), "token:admin", _audit("r", req.id)
    )
    assert revoked is not None and revoked.status is RequestStatus.REVOKED
    assert revoked.revoked_at == T0 + timedelta(minutes=1)
    ended = await store.get_session(s1.id)
    assert ended is not None and ended.end_reason == "revoked"
    assert await store.find_session(h1) is None
    assert await store.redeem_otp(req.id, "otp2", T0, 5) is OtpResult.NONE
    assert await store.revoke_request(req.id, T0, "a", _audit()) is None
    assert await store.mark_forwarded(req.id, "link3", T0, "a", _audit()) is None
    assert await store.revoke_request("req_missing", T0, "a", _audit()) is None

    short = await _request(store, w, hours=1)
    s2, h2 = _session(short.id)
    await store.create_session(s2, h2, 3, _audit("session.started", s2.id))
    assert await store.expire_requests(T0 + timedelta(minutes=59)) == []
    assert await store.expire_requests(T0 + timedelta(hours=1)) == [short.id]
    assert await store.expire_requests(T0 + timedelta(hours=5)) == [other.id]
    assert await store.expire_requests(T0 + timedelta(hours=9)) == []
    gone = await store.get_session(s2.id)
    assert gone is not None and gone.end_reason == "expired"
    expired = [e.subject for e in await store.all_audit() if e.action == "request.expired"]
    assert sorted(expired) == sorted([short.id, other.id])
    assert verify_chain(await store.all_audit(), await store.audit_head()) is None


async def _paged_active_grants(store: Store, now: datetime) -> int:
    """What ``Scheduler.active_grants`` computed before the count moved into the store."""
    count = 0
    cursor: str | None = None
    while True:
        page = await store.list_requests(
            RequestFilter(status=RequestStatus.FORWARDED, limit=2, cursor=cursor)
        )
        count += sum(1 for r in page.items if r.start <= now < r.end)
        cursor = page.next_cursor
        if cursor is None:
            return count


async def test_count_active_grants_counts_forwarded_open_windows(store: Store) -> None:
    """Only forwarded requests with ``start <= now < end`` count, to the microsecond."""
    w = await _world(store)
    now = T0 + timedelta(hours=5)
    tick = timedelta(microseconds=1)
    made: dict[str, AccessRequest] = {}

    async def add(name: str, start: datetime, end: datetime, to: RequestStatus) -> None:
        req = AccessRequest(
            id=new_id("req"),
            group_id=w.group.id,
            user_id=w.user.id,
            justification=name,
            reason_id=w.reason.id,
            governance_code=None,
            start=start,
            end=end,
            status=RequestStatus.SAVED,
            created_at=T0,
            created_by="token:admin",
        )
        await store.create_request(req, None, _audit("request.created", req.id))
        if to is not RequestStatus.SAVED:
            await store.mark_forwarded(req.id, f"link-{name}", T0, "a", _audit("request.forwarded", req.id))
        if to is RequestStatus.REVOKED:
            await store.revoke_request(req.id, T0, "a", _audit("request.revoked", req.id))
        made[name] = req

    # Expired first, while it is the only request whose window has ended.
    await add("expired", T0, T0 + timedelta(hours=1), RequestStatus.FORWARDED)
    assert await store.expire_requests(T0 + timedelta(hours=1)) == [made["expired"].id]
    fwd = RequestStatus.FORWARDED
    await add("active", now - timedelta(hours=1), now + timedelta(hours=1), fwd)
    await add("starts now", now, now + timedelta(hours=1), fwd)
    await add("ends a tick later", now - timedelta(hours=1), now + tick, fwd)
    await add("not yet started", now + timedelta(hours=1), now + timedelta(hours=2), fwd)
    await add("starts a tick later", now + tick, now + timedelta(hours=1), fwd)
    await add("ends now, not marked expired", now - timedelta(hours=1), now, fwd)
    await add("ended long ago, not marked expired", T0, T0 + timedelta(hours=2), fwd)
    await add("saved, window open", now - timedelta(hours=1), now + timedelta(hours=1), RequestStatus.SAVED)
    await add(
        "revoked, window open", now - timedelta(hours=1), now + timedelta(hours=1), RequestStatus.REVOKED
    )

    assert await store.count_active_grants(now) == 3  # active, starts now, ends a tick later
    instants = [T0 - timedelta(days=1), T0, T0 + timedelta(hours=2) - tick, now - tick, now, now + tick]
    instants += [now + timedelta(hours=1), now + timedelta(hours=2), now + timedelta(days=1)]
    for at in instants:
        assert await store.count_active_grants(at) == await _paged_active_grants(store, at), at
    assert await store.count_active_grants(now + timedelta(days=1)) == 0
    # Other offsets name the same instant: the store compares UTC instants, not wall clocks.
    east = now.astimezone(timezone(timedelta(hours=2)))
    assert await store.count_active_grants(east) == 3


# --- one-time tokens -----------------------------------------------------------------------


async def test_otp_issue_and_redeem(store: Store) -> None:
    w = await _world(store)
    req = await _request(store, w)
    exp = T0 + timedelta(minutes=5)
    assert await store.redeem_otp(req.id, "h", T0, 5) is OtpResult.NONE
    assert await store.issue_otp(req.id, "good", T0, exp, 3) == OtpIssue(True)
    assert await store.redeem_otp(req.id, "bad", T0, 5) is OtpResult.WRONG
    assert await store.redeem_otp(req.id, "good", T0 + timedelta(minutes=1), 5) is OtpResult.OK
    assert await store.redeem_otp(req.id, "good", T0, 5) is OtpResult.EXHAUSTED  # single use
    # A new token replaces the old one and its tries; expiry is exact.
    await store.issue_otp(req.id, "late", T0, exp, 3)
    assert await store.redeem_otp(req.id, "late", exp, 5) is OtpResult.EXPIRED
    assert await store.redeem_otp(req.id, "other", exp, 5) is OtpResult.EXPIRED
    # A send the provider refused: token unusable, send not counted.
    await store.issue_otp(req.id, "refused", T0, exp, 3)
    await store.cancel_otp_send(req.id, "refused")
    assert await store.redeem_otp(req.id, "refused", T0, 5) is OtpResult.NONE
    assert await store.issue_otp(req.id, "fourth", T0, exp, 3) == OtpIssue(
        True
    )  # 3 counted: good, late, this
    refused = await store.issue_otp(req.id, "fifth", T0 + timedelta(minutes=10), exp, 3)
    assert not refused.issued and refused.retry_after == 50 * 60 + 1


async def test_send_limit_per_hour_is_exact_under_concurrency(backend: Backend) -> None:
    w = await _world(backend.store)
    req = await _request(backend.store, w)
    other = await backend.replica()
    stores = [backend.store, other]
    exp = T0 + timedelta(minutes=5)
    results = await asyncio.gather(
        *(stores[i % 2].issue_otp(req.id, f"otp{i}", T0, exp, 3) for i in range(12))
    )
    assert sum(r.issued for r in results) == 3
    assert {r.retry_after for r in results if not r.issued} == {3601}
    later = T0 + timedelta(minutes=59, seconds=59)
    assert not (await backend.store.issue_otp(req.id, "x", later, exp, 3)).issued
    assert (await backend.store.issue_otp(req.id, "y", T0 + timedelta(hours=1), exp, 3)).issued


async def test_fifty_concurrent_wrong_guesses_count_exactly_five(backend: Backend) -> None:
    """Guesses race over two store instances; only ``max_tries`` of them are ever counted,
    and after that even the right token is refused."""
    w = await _world(backend.store)
    req = await _request(backend.store, w)
    other = await backend.replica()
    stores = [backend.store, other]
    await backend.store.issue_otp(req.id, "right", T0, T0 + timedelta(minutes=5), 3)
    results = await asyncio.gather(*(stores[i % 2].redeem_otp(req.id, f"wrong{i}", T0, 5) for i in range(50)))
    assert Counter(results) == {OtpResult.WRONG: 5, OtpResult.EXHAUSTED: 45}
    assert await backend.store.redeem_otp(req.id, "right", T0, 5) is OtpResult.EXHAUSTED


async def test_two_concurrent_correct_redemptions_give_one_ok(backend: Backend) -> None:
    """The token is spent when ``used_at`` commits: exactly one of two racing redemptions
    (on two store instances) wins; the other sees it spent."""
    w = await _world(backend.store)
    other = await backend.replica()
    for round_ in range(5):
        req = await _request(backend.store, w)
        await backend.store.issue_otp(req.id, f"right{round_}", T0, T0 + timedelta(minutes=5), 3)
        results = await asyncio.gather(
            backend.store.redeem_otp(req.id, f"right{round_}", T0, 5),
            other.redeem_otp(req.id, f"right{round_}", T0, 5),
        )
        assert sorted(results) == sorted([OtpResult.OK, OtpResult.EXHAUSTED])


# --- sessions ------------------------------------------------------------------------------


async def test_sessions_lifecycle(store: Store) -> None:
    w = await _world(store)
    req = await _request(store, w)
    s1, h1 = _session(req.id)
    assert await store.create_session(s1, h1, 3, _audit("session.started", s1.id)) is SessionCreate.OK
    assert await store.find_session(h1) == s1
    assert await store.get_session(s1.id) == s1
    later = T0 + timedelta(minutes=3)
    await store.touch_sessions({s1.id: later, "ses_missing": later})
    await store.touch_sessions({s1.id: T0})  # never moves backwards
    await store.touch_sessions({})
    touched = await store.get_session(s1.id)
    assert touched is not None and touched.last_seen == later
    s2, h2 = _session(req.id, T0 + timedelta(seconds=1))
    await store.create_session(s2, h2, 3, _audit("session.started", s2.id))
    assert [s.id for s in await store.list_sessions(req.id)] == [s1.id, s2.id]
    assert await store.end_session(s1.id, "logout", later, _audit("session.ended", s1.id))
    assert not await store.end_session(s1.id, "logout", later, None)
    assert await store.find_session(h1) is None
    assert [s.id for s in await store.list_sessions()] == [s2.id]
    assert [s.id for s in await store.list_sessions(req.id, live=False)] == [s1.id, s2.id]
    with pytest.raises(Conflict):  # same cookie hash twice
        await store.create_session(_session(req.id)[0], h2, 3, _audit())


async def test_max_sessions_is_exact_under_concurrency(backend: Backend) -> None:
    w = await _world(backend.store)
    req = await _request(backend.store, w)
    other = await backend.replica()
    stores = [backend.store, other]
    pending = [_session(req.id) for _ in range(20)]
    results = await asyncio.gather(
        *(
            stores[i % 2].create_session(s, h, 3, _audit("session.started", s.id))
            for i, (s, h) in enumerate(pending)
        )
    )
    assert Counter(results) == {SessionCreate.OK: 3, SessionCreate.TOO_MANY: 17}
    live = await backend.store.list_sessions(req.id)
    assert len(live) == 3
    await backend.store.end_session(live[0].id, "logout", T0, None)
    s, h = _session(req.id)
    assert await other.create_session(s, h, 3, _audit()) is SessionCreate.OK


# --- session secrets and console sessions (issue 9: shared by every replica) -------------


async def _live_session(store: Store) -> tuple[Session, str]:
    w = await _world(store, new_id("w"))
    req = await _request(store, w)
    ses, digest = _session(req.id)
    assert await store.create_session(ses, digest, 3, _audit("session.started", ses.id)) is SessionCreate.OK
    return ses, digest


async def test_session_secrets_expire_in_the_query_and_die_with_their_session(store: Store) -> None:
    ses, digest = await _live_session(store)
    soon, later = T0 + timedelta(minutes=1), T0 + timedelta(minutes=10)
    assert await store.add_session_secret(SecretKind.TICKET, "t1", ses.id, T0, later)
    assert await store.add_session_secret(
        SecretKind.HOST_COOKIE, "c1", ses.id, T0, later, target_id="tgt_1", detail=None
    )
    found = await store.find_session_secret(SecretKind.TICKET, "t1", T0)
    assert found is not None
    assert (found.kind, found.session_id, found.session_hash, found.expires_at) == (
        SecretKind.TICKET,
        ses.id,
        digest,
        later,
    )
    cookie = await store.find_session_secret(SecretKind.HOST_COOKIE, "c1", soon)
    assert cookie is not None and cookie.target_id == "tgt_1"
    # The kind is part of the lookup: a ticket is no host cookie, and the reverse.
    assert await store.find_session_secret(SecretKind.HOST_COOKIE, "t1", T0) is None
    assert await store.find_session_secret(SecretKind.TICKET, "c1", T0) is None
    assert await store.take_session_secret(SecretKind.HOST_CODE, "t1", T0) is None
    # Expiry is enforced by the query itself, to the instant.
    assert await store.find_session_secret(SecretKind.TICKET, "t1", later) is None
    assert await store.find_session_secret(SecretKind.TICKET, "t1", later - timedelta(microseconds=1))
    # Ending the session makes every secret of it worthless at once.
    assert await store.end_session(ses.id, "logout", soon, None)
    assert await store.find_session_secret(SecretKind.TICKET, "t1", soon) is None
    assert await store.find_session_secret(SecretKind.HOST_COOKIE, "c1", soon) is None
    assert not await store.add_session_secret(SecretKind.TICKET, "t2", ses.id, soon, later)
    # ... and the sweep deletes them (and expired ones of live sessions).
    other, _ = await _live_session(store)
    assert await store.add_session_secret(SecretKind.TICKET, "t3", other.id, T0, soon)
    assert await store.add_session_secret(SecretKind.TICKET, "t4", other.id, T0, later)
    assert await store.purge_expired(soon) == 3  # t1, c1 (session ended), t3 (expired)
    assert await store.find_session_secret(SecretKind.TICKET, "t4", soon) is not None
    assert await store.drop_session_secrets(other.id, SecretKind.HOST_COOKIE) == 0
    assert await store.drop_session_secrets(other.id) == 1
    assert await store.find_session_secret(SecretKind.TICKET, "t4", soon) is None


async def test_session_secrets_are_bounded_per_session(store: Store) -> None:
    ses, _ = await _live_session(store)
    short, long = T0 + timedelta(minutes=1), T0 + timedelta(minutes=10)
    assert await store.add_session_secret(SecretKind.TICKET, "a", ses.id, T0, short, max_per_session=2)
    assert await store.add_session_secret(SecretKind.TICKET, "b", ses.id, T0, long, max_per_session=2)
    assert not await store.add_session_secret(SecretKind.TICKET, "c", ses.id, T0, long, max_per_session=2)
    # Another kind has its own allowance.
    assert await store.add_session_secret(SecretKind.HOST_CODE, "c", ses.id, T0, long, max_per_session=2)
    # Once "a" expired it no longer counts (and is deleted on the way).
    assert await store.add_session_secret(SecretKind.TICKET, "d", ses.id, short, long, max_per_session=2)
    with pytest.raises(Conflict):  # same hash twice
        await store.add_session_secret(SecretKind.TICKET, "d", ses.id, short, long)
    assert not await store.add_session_secret(SecretKind.TICKET, "e", "ses_missing", T0, long)


async def test_one_time_codes_are_taken_once_across_instances(backend: Backend) -> None:
    ses, digest = await _live_session(backend.store)
    other = await backend.replica()
    stores = [backend.store, other]
    end = T0 + timedelta(minutes=1)
    for n in range(5):
        code = f"code{n}"
        assert await backend.store.add_session_secret(
            SecretKind.HOST_CODE, code, ses.id, T0, end, target_id="tgt_w", detail="/next?x=1"
        )
        got = await asyncio.gather(
            *(stores[i % 2].take_session_secret(SecretKind.HOST_CODE, code, T0) for i in range(10))
        )
        won = [g for g in got if g is not None]
        assert len(won) == 1, got
        assert (won[0].session_hash, won[0].target_id, won[0].detail) == (digest, "tgt_w", "/next?x=1")
    # An expired code is refused, as is the code of an ended session.
    assert await other.add_session_secret(SecretKind.HOST_CODE, "old", ses.id, T0, end)
    assert await backend.store.take_session_secret(SecretKind.HOST_CODE, "old", end) is None
    assert await other.add_session_secret(SecretKind.HOST_CODE, "late", ses.id, T0, end)
    await backend.store.end_session(ses.id, "logout", T0, None)
    assert await other.take_session_secret(SecretKind.HOST_CODE, "late", T0) is None


def _console(sid_hash: str, at: datetime, owner: str = "tok") -> ConsoleSessionRecord:
    return ConsoleSessionRecord(
        sid_hash=sid_hash,
        token_hash=owner,
        token_name="admin",
        role=Role.ADMIN,
        created_at=at,
        last_seen=at,
        idle_until=at + timedelta(minutes=30),
        expires_at=at + timedelta(hours=12),
        state={},
    )


async def test_console_sessions_are_shared_bounded_and_expire(backend: Backend) -> None:
    store = backend.store
    other = await backend.replica()
    await store.create_console_session(_console("s1", T0), 3)
    found = await other.find_console_session("s1", T0 + timedelta(minutes=1))
    assert found == _console("s1", T0)
    state = {"notices": [["ok", "Saved ✓"]], "drafts": [["d", "req_1"]]}
    t1 = T0 + timedelta(minutes=20)
    assert await other.save_console_session("s1", t1, t1 + timedelta(minutes=30), state)
    again = await store.find_console_session("s1", T0 + timedelta(minutes=45))
    assert again is not None and again.state == state and again.last_seen == t1
    # Idle and absolute limits are part of the query.
    assert await store.find_console_session("s1", t1 + timedelta(minutes=30)) is None
    assert await store.find_console_session("nope", T0) is None
    assert not await store.save_console_session("nope", T0, T0, {})
    # At most ``max_sessions``: the least recently used goes.
    for n in range(2, 5):
        await other.create_console_session(_console(f"s{n}", T0 + timedelta(seconds=n)), 3)
    live = [h for h in ("s1", "s2", "s3", "s4") if await store.find_console_session(h, t1) is not None]
    assert live == ["s1", "s3", "s4"], live
    await store.create_console_session(_console("x", T0, owner="other"), 10)
    assert await store.end_console_sessions_for_token("tok") == 3
    assert await store.end_console_session("x")
    assert not await store.end_console_session("x")
    await store.create_console_session(_console("y", T0), 10)
    assert await other.purge_expired(T0 + timedelta(hours=1)) == 1


# --- live connections (issue 7: one registry for every replica) ----------------------------


def _conn(
    cid: str,
    replica: str,
    updated: datetime,
    *,
    session_id: str = "ses_1",
    request_id: str = "req_1",
    since: datetime = T0,
    target: str | None = "db01",
) -> ConnectionRecord:
    return ConnectionRecord(
        id=cid,
        session_id=session_id,
        request_id=request_id,
        user_id="usr_1",
        protocol="rdp",
        target=target,
        origin="192.0.2.7",
        since=since,
        bytes_in=0,
        bytes_out=0,
        replica=replica,
        updated_at=updated,
    )


async def test_live_connections_are_shared_refreshed_and_deleted(backend: Backend) -> None:
    store = backend.store
    other = await backend.replica()
    long_ago = T0 - timedelta(hours=1)
    a1 = _conn("con_a1", "rep_a", T0, since=T0 - timedelta(seconds=2, microseconds=5))
    a2 = _conn("con_a2", "rep_a", T0, session_id="ses_2", request_id="req_2", target=None)
    b1 = _conn("con_b1", "rep_b", T0, since=T0 - timedelta(seconds=1))
    await store.upsert_connections([a1, a2])
    await other.upsert_connections([b1])
    await store.upsert_connections([])
    # Every instance sees every replica's rows, oldest first; filters narrow them.
    for s in (store, other):
        assert await s.list_connections(long_ago) == [a1, b1, a2]
    assert await store.list_connections(long_ago, session_id="ses_2") == [a2]
    assert await other.list_connections(long_ago, request_id="req_1") == [a1, b1]
    assert await other.list_connections(long_ago, session_id="ses_1", request_id="req_2") == []
    # A refresh moves the counters (64-bit), the holder and updated_at; what was fixed when
    # the connection opened stays. The last record of an id given twice wins.
    later = T0 + timedelta(seconds=30)
    moved = replace(a1, bytes_in=5 * 2**40, bytes_out=7, updated_at=later)
    await other.upsert_connections([replace(moved, bytes_in=1, target="changed"), moved])
    assert await store.get_connection("con_a1") == moved
    assert await store.get_connection("con_missing") is None
    # Freshness is part of the query: rows not refreshed after the bound are not listed.
    assert await store.list_connections(T0) == [moved]
    assert await other.list_connections(later) == []
    # ... the sweep deletes them (however old, ``get_connection`` still finds a row until then).
    assert await store.get_connection("con_b1") == b1
    assert await other.purge_stale_connections(T0) == 2
    assert await store.get_connection("con_b1") is None
    assert await store.list_connections(long_ago) == [moved]
    # Deleting by id ignores ids it does not know.
    assert await store.delete_connections(["con_a1", "con_missing"]) == 1
    assert await store.delete_connections([]) == 0
    assert await store.list_connections(long_ago) == []
    # A replica shutting down takes all of its rows with it, and no one else's.
    await store.upsert_connections([_conn(f"con_x{n}", "rep_x", later) for n in range(3)])
    await other.upsert_connections([_conn("con_y", "rep_y", later)])
    assert await other.delete_replica_connections("rep_x") == 3
    assert await store.delete_replica_connections("rep_x") == 0
    assert [c.id for c in await store.list_connections(long_ago)] == ["con_y"]


async def test_live_connection_batches_are_large_and_concurrent(backend: Backend) -> None:
    """Two replicas flushing a thousand rows each at once, while a third sweeps stale ones."""
    other = await backend.replica()
    now = T0 + timedelta(minutes=5)
    mine = [_conn(f"con_a{n:04d}", "rep_a", now, since=T0 + timedelta(microseconds=n)) for n in range(1000)]
    theirs = [_conn(f"con_b{n:04d}", "rep_b", now, since=T0 + timedelta(microseconds=n)) for n in range(1000)]
    await backend.store.upsert_connections([_conn("con_dead", "rep_dead", T0)])
    gone = await asyncio.gather(
        backend.store.upsert_connections(mine),
        other.upsert_connections(theirs),
        backend.store.purge_stale_connections(T0 + timedelta(minutes=1)),
    )
    assert gone[2] == 1
    assert len(await other.list_connections(T0)) == 2000
    assert await backend.store.delete_connections([c.id for c in mine[::2]]) == 500
    assert await other.delete_replica_connections("rep_b") == 1000
    assert len(await backend.store.list_connections(T0)) == 500


# --- audit chain ---------------------------------------------------------------------------


async def test_audit_chain_holds_under_concurrent_appends_from_two_instances(backend: Backend) -> None:
    w = await _world(backend.store)
    req = await _request(backend.store, w)
    other = await backend.replica()
    stores = [backend.store, other]
    jobs: list[Awaitable[object]] = []
    for i in range(120):
        s = stores[i % 2]
        if i % 3 == 0:
            jobs.append(s.append_audit(AuditEntry("test", "x.appended", f"x{i}", personal={"n": i})))
        elif i % 3 == 1:
            sess, h = _session(req.id)
            jobs.append(s.create_session(sess, h, 1000, _audit("session.started", sess.id)))
        else:
            jobs.append(s.revoke_api_token(f"none{i}", T0, _audit()))  # no change: no event
    await asyncio.gather(*jobs)
    events = await backend.store.all_audit()
    head = await other.audit_head()
    assert verify_chain(events, head) is None
    assert head is not None and head[0] == len(events) == 5 + 80
    assert [e.seq for e in events] == list(range(1, len(events) + 1))


@pytest.mark.parametrize(
    ("tamper", "seq"),
    [
        ("UPDATE audit_events SET actor = 'someone-else' WHERE seq = 3", 3),
        ("DELETE FROM audit_events WHERE seq = 3", 3),
        ("DELETE FROM audit_events WHERE seq = 6", 6),
        ("UPDATE audit_events SET details = '{\"n\": 9}' WHERE seq = 2", 2),
    ],
)
async def test_tampering_is_detected(backend: Backend, tamper: str, seq: int) -> None:
    for i in range(6):
        await backend.store.append_audit(AuditEntry("test", "x", f"s{i}", details={"n": i}))
    assert verify_chain(await backend.store.all_audit(), await backend.store.audit_head()) is None
    await backend.raw(tamper)
    broken = verify_chain(await backend.store.all_audit(), await backend.store.audit_head())
    assert broken is not None and broken.seq == seq


# --- failure -------------------------------------------------------------------------------


async def _expect_store_error(call: Callable[[], Awaitable[object]]) -> None:
    started = time.monotonic()
    with pytest.raises(StoreError):
        await call()
    assert time.monotonic() - started < 5, "failing closed must not hang"


async def test_store_error_when_the_database_is_unreachable(backend: Backend) -> None:
    store = backend.store
    w = await _world(store)
    req = await _request(store, w)
    calls: list[Callable[[], Awaitable[object]]] = [
        store.ping,
        lambda: store.get_request(req.id),
        lambda: store.list_requests(RequestFilter()),
        lambda: store.append_audit(_audit()),
        lambda: store.redeem_otp(req.id, "x", T0, 5),
        lambda: store.issue_otp(req.id, "x", T0, T0, 3),
        lambda: store.create_session(*_session(req.id), 3, _audit()),
        lambda: store.upsert_connections([_conn("con_1", "rep_a", T0)]),
        lambda: store.list_connections(T0),
    ]
    if backend.pg is None:
        await store.close()
        for call in calls:
            await _expect_store_error(call)
        await store.open()
    else:
        backend.pg.stop()
        try:
            for call in calls:
                await _expect_store_error(call)
        finally:
            backend.pg.start()
        # The pool reconnects by itself: no reopen needed.
        deadline = time.monotonic() + 10
        while True:
            try:
                await store.ping()
                break
            except StoreError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
    await store.append_audit(_audit("after.recovery"))
    assert await store.get_request(req.id) == req
    assert verify_chain(await store.all_audit(), await store.audit_head()) is None


async def test_postgres_statement_timeout_fails_closed(pg_url: str) -> None:
    """A statement stuck behind a lock is abandoned after ``statement_timeout`` seconds."""
    store = PostgresStore(pg_url, statement_timeout=0.5)
    await store.open()
    blocker = await asyncpg.connect(pg_url)
    try:
        await store.append_audit(_audit())
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute("LOCK TABLE audit_head IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        with pytest.raises(StoreError, match="in time"):
            await store.append_audit(_audit())
        assert time.monotonic() - started < 3
        await tx.rollback()
        await store.append_audit(_audit())
        assert verify_chain(await store.all_audit(), await store.audit_head()) is None
    finally:
        await blocker.close()
        await store.close()


async def test_postgres_open_fails_with_store_error(pg_server: PostgresServer) -> None:
    store = PostgresStore(pg_server.url("no_such_database"), statement_timeout=1.0)
    with pytest.raises(StoreError, match="cannot open"):
        await store.open()
    with pytest.raises(StoreError, match="not open"):
        await store.ping()


# --- configuration -------------------------------------------------------------------------


def test_build_store_follows_storage_settings(tmp_path: Path) -> None:
    from domum_gateway.app import build_store
    from domum_gateway.errors import ConfigError
    from domum_gateway.settings import settings_from_mapping

    cfg = tmp_path / "domum.toml"
    lite = settings_from_mapping({}, cfg)
    assert (lite.storage.pool_size, lite.storage.statement_timeout) == (10, 5.0)
    assert isinstance(build_store(lite), SqliteStore)
    pg = settings_from_mapping(
        {"storage": {"url": "postgresql://u@db.example/d", "pool_size": 4, "statement_timeout": 2.5}}, cfg
    )
    store = build_store(pg)
    assert isinstance(store, PostgresStore)
    assert (store._pool_size, store._timeout) == (4, 2.5)
    for bad, key in (
        ({"pool_size": 0}, "storage.pool_size"),
        ({"statement_timeout": -1}, "storage.statement_timeout"),
    ):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            settings_from_mapping({"storage": bad}, cfg)
