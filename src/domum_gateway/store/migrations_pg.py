"""PostgreSQL dialect of the versioned schema, kept in step with ``migrations.MIGRATIONS``.

Same version numbers, same tables, columns and index names as the SQLite dialect (a test
applies both and compares them); append a version here whenever one is appended there.

Differences, and why:
- every text column is ``COLLATE "C"``: SQLite compares text byte by byte, and so must
  PostgreSQL, whatever locale the database was created with, so that ``ORDER BY name``,
  cursor comparisons on ``(created_at, id)`` and ``lower(email)`` behave the same;
- timestamps stay fixed-width UTC text (``audit.format_instant``), not ``timestamptz``: the
  audit hash covers the text, and the same text in both stores keeps ``audit verify``,
  ordering and cursors identical;
- ``seq`` and the byte counters of ``live_connections`` are ``BIGINT``; booleans stay
  ``INTEGER`` 0/1 as in SQLite.
"""

from __future__ import annotations

__all__ = ["MIGRATIONS_PG"]

MIGRATIONS_PG: list[tuple[int, str]] = [
    (
        1,
        """
CREATE TABLE api_tokens (
    name        TEXT COLLATE "C" PRIMARY KEY,
    role        TEXT COLLATE "C" NOT NULL CHECK (role IN ('admin', 'auditor')),
    token_hash  TEXT COLLATE "C" NOT NULL UNIQUE,
    created_at  TEXT COLLATE "C" NOT NULL,
    revoked_at  TEXT COLLATE "C"
);
CREATE TABLE groups (
    id          TEXT COLLATE "C" PRIMARY KEY,
    name        TEXT COLLATE "C" NOT NULL UNIQUE,
    kind        TEXT COLLATE "C" NOT NULL CHECK (kind IN ('internal', 'third_party')),
    policy      TEXT COLLATE "C" NOT NULL,
    created_at  TEXT COLLATE "C" NOT NULL
);
CREATE TABLE users (
    id          TEXT COLLATE "C" PRIMARY KEY,
    group_id    TEXT COLLATE "C" NOT NULL REFERENCES groups(id),
    name        TEXT COLLATE "C" NOT NULL,
    email       TEXT COLLATE "C",
    phone       TEXT COLLATE "C",
    channel     TEXT COLLATE "C" NOT NULL CHECK (channel IN ('email', 'sms')),
    ephemeral   INTEGER NOT NULL DEFAULT 0,
    created_at  TEXT COLLATE "C" NOT NULL,
    purged_at   TEXT COLLATE "C"
);
CREATE INDEX users_group ON users(group_id);
CREATE INDEX users_email ON users(lower(email));
CREATE TABLE reasons (
    id          TEXT COLLATE "C" PRIMARY KEY,
    label       TEXT COLLATE "C" NOT NULL UNIQUE,
    created_at  TEXT COLLATE "C" NOT NULL
);
CREATE TABLE targets (
    id           TEXT COLLATE "C" PRIMARY KEY,
    name         TEXT COLLATE "C" NOT NULL UNIQUE,
    protocol     TEXT COLLATE "C" NOT NULL CHECK (protocol IN ('http', 'ssh', 'rdp', 'tcp')),
    url          TEXT COLLATE "C",
    host         TEXT COLLATE "C",
    port         INTEGER,
    ssh_host_key TEXT COLLATE "C",
    tls_verify   INTEGER NOT NULL DEFAULT 1,
    created_at   TEXT COLLATE "C" NOT NULL
);
CREATE TABLE access_requests (
    id              TEXT COLLATE "C" PRIMARY KEY,
    group_id        TEXT COLLATE "C" NOT NULL REFERENCES groups(id),
    user_id         TEXT COLLATE "C" NOT NULL REFERENCES users(id),
    justification   TEXT COLLATE "C" NOT NULL,
    reason_id       TEXT COLLATE "C" NOT NULL REFERENCES reasons(id),
    governance_code TEXT COLLATE "C",
    start_at        TEXT COLLATE "C" NOT NULL,
    end_at          TEXT COLLATE "C" NOT NULL,
    status          TEXT COLLATE "C" NOT NULL
                    CHECK (status IN ('saved', 'forwarded', 'revoked', 'expired')),
    created_at      TEXT COLLATE "C" NOT NULL,
    created_by      TEXT COLLATE "C" NOT NULL,
    forwarded_at    TEXT COLLATE "C",
    forwarded_by    TEXT COLLATE "C",
    revoked_at      TEXT COLLATE "C",
    revoked_by      TEXT COLLATE "C",
    link_hash       TEXT COLLATE "C" UNIQUE
);
CREATE INDEX requests_status ON access_requests(status, end_at);
CREATE INDEX requests_user ON access_requests(user_id);
CREATE INDEX requests_created ON access_requests(created_at, id);
CREATE TABLE otps (
    request_id  TEXT COLLATE "C" PRIMARY KEY REFERENCES access_requests(id) ON DELETE CASCADE,
    otp_hash    TEXT COLLATE "C" NOT NULL,
    created_at  TEXT COLLATE "C" NOT NULL,
    expires_at  TEXT COLLATE "C" NOT NULL,
    tries       INTEGER NOT NULL DEFAULT 0,
    used_at     TEXT COLLATE "C"
);
CREATE TABLE otp_sends (
    request_id  TEXT COLLATE "C" NOT NULL REFERENCES access_requests(id) ON DELETE CASCADE,
    sent_at     TEXT COLLATE "C" NOT NULL,
    otp_hash    TEXT COLLATE "C" NOT NULL
);
CREATE INDEX otp_sends_req ON otp_sends(request_id, sent_at);
CREATE TABLE sessions (
    id           TEXT COLLATE "C" PRIMARY KEY,
    request_id   TEXT COLLATE "C" NOT NULL REFERENCES access_requests(id) ON DELETE CASCADE,
    session_hash TEXT COLLATE "C" NOT NULL UNIQUE,
    address      TEXT COLLATE "C" NOT NULL,
    created_at   TEXT COLLATE "C" NOT NULL,
    last_seen    TEXT COLLATE "C" NOT NULL,
    ended_at     TEXT COLLATE "C",
    end_reason   TEXT COLLATE "C"
);
CREATE INDEX sessions_request ON sessions(request_id, ended_at);
CREATE TABLE audit_events (
    seq                 BIGINT PRIMARY KEY,
    at                  TEXT COLLATE "C" NOT NULL,
    actor               TEXT COLLATE "C" NOT NULL,
    action              TEXT COLLATE "C" NOT NULL,
    subject             TEXT COLLATE "C" NOT NULL,
    request_id          TEXT COLLATE "C",
    outcome             TEXT COLLATE "C" NOT NULL,
    origin              TEXT COLLATE "C" NOT NULL,
    details             TEXT COLLATE "C" NOT NULL,
    personal_commitment TEXT COLLATE "C" NOT NULL,
    personal            TEXT COLLATE "C",
    prev_hash           TEXT COLLATE "C" NOT NULL,
    hash                TEXT COLLATE "C" NOT NULL
);
CREATE INDEX audit_action ON audit_events(action);
CREATE INDEX audit_at ON audit_events(at);
CREATE INDEX audit_request ON audit_events(request_id);
CREATE TABLE audit_head (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    seq   BIGINT NOT NULL,
    hash  TEXT COLLATE "C" NOT NULL
);
""",
    ),
    (
        2,
        # See ``migrations.MIGRATIONS`` version 2.
        """
CREATE TABLE session_secrets (
    secret_hash TEXT COLLATE "C" PRIMARY KEY,
    kind        TEXT COLLATE "C" NOT NULL CHECK (kind IN ('ticket', 'host_code', 'host_cookie')),
    session_id  TEXT COLLATE "C" NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    target_id   TEXT COLLATE "C",
    detail      TEXT COLLATE "C",
    created_at  TEXT COLLATE "C" NOT NULL,
    expires_at  TEXT COLLATE "C" NOT NULL
);
CREATE INDEX session_secrets_session ON session_secrets(session_id, kind);
CREATE INDEX session_secrets_expiry ON session_secrets(expires_at);
CREATE TABLE console_sessions (
    sid_hash    TEXT COLLATE "C" PRIMARY KEY,
    token_hash  TEXT COLLATE "C" NOT NULL,
    token_name  TEXT COLLATE "C" NOT NULL,
    role        TEXT COLLATE "C" NOT NULL CHECK (role IN ('admin', 'auditor')),
    created_at  TEXT COLLATE "C" NOT NULL,
    last_seen   TEXT COLLATE "C" NOT NULL,
    idle_until  TEXT COLLATE "C" NOT NULL,
    expires_at  TEXT COLLATE "C" NOT NULL,
    state       TEXT COLLATE "C" NOT NULL
);
CREATE INDEX console_sessions_token ON console_sessions(token_hash);
CREATE INDEX console_sessions_seen ON console_sessions(last_seen);
""",
    ),
    (
        3,
        # See ``migrations.MIGRATIONS`` version 3.
        """
CREATE TABLE live_connections (
    id          TEXT COLLATE "C" PRIMARY KEY,
    session_id  TEXT COLLATE "C" NOT NULL,
    request_id  TEXT COLLATE "C" NOT NULL,
    user_id     TEXT COLLATE "C" NOT NULL,
    protocol    TEXT COLLATE "C" NOT NULL,
    target      TEXT COLLATE "C",
    origin      TEXT COLLATE "C" NOT NULL,
    since       TEXT COLLATE "C" NOT NULL,
    bytes_in    BIGINT NOT NULL DEFAULT 0,
    bytes_out   BIGINT NOT NULL DEFAULT 0,
    replica     TEXT COLLATE "C" NOT NULL,
    updated_at  TEXT COLLATE "C" NOT NULL
);
CREATE INDEX live_connections_request ON live_connections(request_id);
CREATE INDEX live_connections_replica ON live_connections(replica);
CREATE INDEX live_connections_updated ON live_connections(updated_at);
""",
    ),
]
