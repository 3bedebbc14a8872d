"""Versioned schema migrations. Append new versions; never edit a released one.

Timestamps are stored as fixed-width UTC text (``audit.format_instant``) so that text
order is time order in SQLite and PostgreSQL alike. Secrets appear only as SHA-256 hex.
"""

from __future__ import annotations

__all__ = ["MIGRATIONS"]

MIGRATIONS: list[tuple[int, str]] = [
    (
        1,
        """
CREATE TABLE api_tokens (
    name        TEXT PRIMARY KEY,
    role        TEXT NOT NULL CHECK (role IN ('admin', 'auditor')),
    token_hash  TEXT NOT NULL UNIQUE,
    created_at  TEXT NOT NULL,
    revoked_at  TEXT
);
CREATE TABLE groups (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    kind        TEXT NOT NULL CHECK (kind IN ('internal', 'third_party')),
    policy      TEXT NOT NULL,
    created_at  TEXT NOT NULL
);
CREATE TABLE users (
    id          TEXT PRIMARY KEY,
    group_id    TEXT NOT NULL REFERENCES groups(id),
    name        TEXT NOT NULL,
    email       TEXT,
    phone       TEXT,
    channel     TEXT NOT NULL CHECK (channel IN ('email', 'sms')),
    ephemeral   INTEGER NOT NULL DEFAULT 0,
    created_at  TEXT NOT NULL,
    purged_at   TEXT
);
CREATE INDEX users_group ON users(group_id);
CREATE INDEX users_email ON users(lower(email));
CREATE TABLE reasons (
    id          TEXT PRIMARY KEY,
    label       TEXT NOT NULL UNIQUE,
    created_at  TEXT NOT NULL
);
CREATE TABLE targets (
    id           TEXT PRIMARY KEY,
    name         TEXT NOT NULL UNIQUE,
    protocol     TEXT NOT NULL CHECK (protocol IN ('http', 'ssh', 'rdp', 'tcp')),
    url          TEXT,
    host         TEXT,
    port         INTEGER,
    ssh_host_key TEXT,
    tls_verify   INTEGER NOT NULL DEFAULT 1,
    created_at   TEXT NOT NULL
);
CREATE TABLE access_requests (
    id              TEXT PRIMARY KEY,
    group_id        TEXT NOT NULL REFERENCES groups(id),
    user_id         TEXT NOT NULL REFERENCES users(id),
    justification   TEXT NOT NULL,
    reason_id       TEXT NOT NULL REFERENCES reasons(id),
    governance_code TEXT,
    start_at        TEXT NOT NULL,
    end_at          TEXT NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('saved', 'forwarded', 'revoked', 'expired')),
    created_at      TEXT NOT NULL,
    created_by      TEXT NOT NULL,
    forwarded_at    TEXT,
    forwarded_by    TEXT,
    revoked_at      TEXT,
    revoked_by      TEXT,
    link_hash       TEXT UNIQUE
);
CREATE INDEX requests_status ON access_requests(status, end_at);
CREATE INDEX requests_user ON access_requests(user_id);
CREATE INDEX requests_created ON access_requests(created_at, id);
CREATE TABLE otps (
    request_id  TEXT PRIMARY KEY REFERENCES access_requests(id) ON DELETE CASCADE,
    otp_hash    TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    expires_at  TEXT NOT NULL,
    tries       INTEGER NOT NULL DEFAULT 0,
    used_at     TEXT
);
CREATE TABLE otp_sends (
    request_id  TEXT NOT NULL REFERENCES access_requests(id) ON DELETE CASCADE,
    sent_at     TEXT NOT NULL,
    otp_hash    TEXT NOT NULL
);
CREATE INDEX otp_sends_req ON otp_sends(request_id, sent_at);
CREATE TABLE sessions (
    id           TEXT PRIMARY KEY,
    request_id   TEXT NOT NULL REFERENCES access_requests(id) ON DELETE CASCADE,
    session_hash TEXT NOT NULL UNIQUE,
    address      TEXT NOT NULL,
    created_at   TEXT NOT NULL,
    last_seen    TEXT NOT NULL,
    ended_at     TEXT,
    end_reason   TEXT
);
CREATE INDEX sessions_request ON sessions(request_id, ended_at);
CREATE TABLE audit_events (
    seq                 INTEGER PRIMARY KEY,
    at                  TEXT NOT NULL,
    actor               TEXT NOT NULL,
    action              TEXT NOT NULL,
    subject             TEXT NOT NULL,
    request_id          TEXT,
    outcome             TEXT NOT NULL,
    origin              TEXT NOT NULL,
    details             TEXT NOT NULL,
    personal_commitment TEXT NOT NULL,
    personal            TEXT,
    prev_hash           TEXT NOT NULL,
    hash                TEXT NOT NULL
);
CREATE INDEX audit_action ON audit_events(action);
CREATE INDEX audit_at ON audit_events(at);
CREATE INDEX audit_request ON audit_events(request_id);
CREATE TABLE audit_head (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    seq   INTEGER NOT NULL,
    hash  TEXT NOT NULL
);
""",
    ),
    (
        2,
        # Scale-out (issue 9): what used to live in one process's memory, so that any
        # replica can check it. Secrets are SHA-256 hex only; every row expires.
        # ``session_secrets``: tunnel tickets, host-mode hand-over codes (one-time) and
        # host-mode cookies, each bound to a session and worthless once it ends.
        """
CREATE TABLE session_secrets (
    secret_hash TEXT PRIMARY KEY,
    kind        TEXT NOT NULL CHECK (kind IN ('ticket', 'host_code', 'host_cookie')),
    session_id  TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    target_id   TEXT,
    detail      TEXT,
    created_at  TEXT NOT NULL,
    expires_at  TEXT NOT NULL
);
CREATE INDEX session_secrets_session ON session_secrets(session_id, kind);
CREATE INDEX session_secrets_expiry ON session_secrets(expires_at);
CREATE TABLE console_sessions (
    sid_hash    TEXT PRIMARY KEY,
    token_hash  TEXT NOT NULL,
    token_name  TEXT NOT NULL,
    role        TEXT NOT NULL CHECK (role IN ('admin', 'auditor')),
    created_at  TEXT NOT NULL,
    last_seen   TEXT NOT NULL,
    idle_until  TEXT NOT NULL,
    expires_at  TEXT NOT NULL,
    state       TEXT NOT NULL
);
CREATE INDEX console_sessions_token ON console_sessions(token_hash);
CREATE INDEX console_sessions_seen ON console_sessions(last_seen);
""",
    ),
    (
        3,
        # One registry of live connections across replicas (issue 7). Each replica writes
        # its own connections (tunnels, browser terminals, ``ssh -J`` channels, proxied
        # websockets) in batches off the hot path and refreshes ``updated_at`` as a
        # heartbeat; a row not refreshed within the staleness bound belongs to a replica
        # that died and is neither listed nor kept. No secrets, nothing a user typed.
        # ``session_id`` has no foreign key: the rows are a cache owned by the replica that
        # holds the connection, and a batch must never fail on one session's row.
        """
CREATE TABLE live_connections (
    id          TEXT PRIMARY KEY,
    session_id  TEXT NOT NULL,
    request_id  TEXT NOT NULL,
    user_id     TEXT NOT NULL,
    protocol    TEXT NOT NULL,
    target      TEXT,
    origin      TEXT NOT NULL,
    since       TEXT NOT NULL,
    bytes_in    INTEGER NOT NULL DEFAULT 0,
    bytes_out   INTEGER NOT NULL DEFAULT 0,
    replica     TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);
CREATE INDEX live_connections_request ON live_connections(request_id);
CREATE INDEX live_connections_replica ON live_connections(replica);
CREATE INDEX live_connections_updated ON live_connections(updated_at);
""",
    ),
]
