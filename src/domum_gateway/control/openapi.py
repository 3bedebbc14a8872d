"""OpenAPI 3.1 description of the control API. A test compares it with the router."""

from __future__ import annotations

from typing import Any

from .. import __version__

__all__ = ["build_openapi"]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


_DURATION = {
    "type": "object",
    "additionalProperties": False,
    "required": ["value", "unit"],
    "properties": {
        "value": {"type": "integer", "minimum": 1},
        "unit": {"type": "string", "enum": ["minutes", "hours", "days", "months"]},
    },
}

_SCHEMAS: dict[str, Any] = {
    "Problem": {
        "type": "object",
        "description": "RFC 9457 problem details",
        "required": ["type", "title", "status", "detail"],
        "properties": {
            "type": {"type": "string", "format": "uri"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
            "correlation_id": {"type": "string"},
            "errors": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["field", "message"],
                    "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
                },
            },
        },
    },
    "Duration": _DURATION,
    "Policy": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "targets": {"type": "array", "items": {"type": "string"}, "description": "target ids or names"},
            "origins": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "allow_cidrs": {"type": "array", "items": {"type": "string"}},
                    "deny_cidrs": {"type": "array", "items": {"type": "string"}},
                    "countries": {"type": "array", "items": {"type": "string", "pattern": "^[A-Za-z]{2}$"}},
                },
            },
            "max_duration": _ref("Duration"),
            "idle_timeout": _ref("Duration"),
            "max_sessions": {"type": "integer", "minimum": 1, "maximum": 1000},
            "channels": {"type": "array", "items": {"type": "string", "enum": ["email", "sms"]}},
        },
    },
    "GroupInput": {
        "type": "object",
        "additionalProperties": False,
        "required": ["name"],
        "properties": {
            "name": {"type": "string", "maxLength": 100},
            "kind": {"type": "string", "enum": ["internal", "third_party"], "default": "internal"},
            "policy": _ref("Policy"),
        },
    },
    "Group": {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "name": {"type": "string"},
            "kind": {"type": "string", "enum": ["internal", "third_party"]},
            "policy": _ref("Policy"),
            "created_at": {"type": "string", "format": "date-time"},
        },
    },
    "UserInput": {
        "type": "object",
        "additionalProperties": False,
        "required": ["group_id", "name"],
        "properties": {
            "group_id": {"type": "string"},
            "name": {"type": "string", "maxLength": 200},
            "email": {"type": "string", "format": "email"},
            "phone": {"type": "string", "pattern": "^\\+[1-9][0-9]{6,14}$"},
            "channel": {"type": "string", "enum": ["email", "sms"]},
        },
    },
    "User": {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "group_id": {"type": "string"},
            "name": {"type": "string"},
            "email": {"type": ["string", "null"]},
            "phone": {"type": ["string", "null"]},
            "channel": {"type": "string", "enum": ["email", "sms"]},
            "third_party": {"type": "boolean"},
            "created_at": {"type": "string", "format": "date-time"},
            "purged_at": {"type": ["string", "null"], "format": "date-time"},
        },
    },
    "ReasonInput": {
        "type": "object",
        "additionalProperties": False,
        "required": ["label"],
        "properties": {"label": {"type": "string", "maxLength": 200}},
    },
    "Reason": {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "label": {"type": "string"},
            "created_at": {"type": "string", "format": "date-time"},
        },
    },
    "TargetInput": {
        "type": "object",
        "additionalProperties": False,
        "required": ["name", "protocol"],
        "properties": {
            "name": {"type": "string", "pattern": "^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$"},
            "protocol": {"type": "string", "enum": ["http", "ssh", "rdp", "tcp"]},
            "url": {"type": "string", "description": "http targets: base URL"},
            "host": {"type": "string", "description": "ssh/rdp/tcp targets"},
            "port": {"type": "integer", "minimum": 1, "maximum": 65535},
            "ssh_host_key": {"type": "string", "description": "OpenSSH public key line of the target"},
            "tls_verify": {"type": "boolean", "default": True},
        },
    },
    "Target": {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "name": {"type": "string"},
            "protocol": {"type": "string"},
            "url": {"type": ["string", "null"]},
            "host": {"type": ["string", "null"]},
            "port": {"type": ["integer", "null"]},
            "ssh_host_key": {"type": ["string", "null"]},
            "tls_verify": {"type": "boolean"},
            "created_at": {"type": "string", "format": "date-time"},
        },
    },
    "AccessRequestInput": {
        "type": "object",
        "additionalProperties": False,
        "required": ["group_id", "justification", "reason_id", "start"],
        "properties": {
            "group_id": {"type": "string"},
            "user_id": {"type": "string", "description": "a user of the group"},
            "user": {
                "type": "object",
                "additionalProperties": False,
                "description": "inline third-party user (groups of kind third_party)",
                "required": ["name"],
                "properties": {
                    "name": {"type": "string"},
                    "email": {"type": "string"},
                    "phone": {"type": "string"},
                    "channel": {"type": "string", "enum": ["email", "sms"]},
                },
            },
            "justification": {"type": "string", "maxLength": 2000},
            "reason_id": {"type": "string"},
            "governance_code": {"type": "string", "maxLength": 100},
            "start": {"type": "string", "format": "date-time", "description": "ISO 8601 with offset"},
            "duration": _ref("Duration"),
            "end": {
                "type": "string",
                "format": "date-time",
                "description": "custom window end, on the 15-minute grid",
            },
        },
    },
    "AccessRequest": {
        "type": "object",
        "properties": {
            "id": {"type": ["string", "null"]},
            "status": {"type": "string", "enum": ["review", "saved", "forwarded", "revoked", "expired"]},
            "group_id": {"type": "string"},
            "user_id": {"type": "string"},
            "justification": {"type": "string"},
            "reason_id": {"type": "string"},
            "governance_code": {"type": ["string", "null"]},
            "start": {"type": "string", "format": "date-time"},
            "end": {"type": "string", "format": "date-time"},
            "channel": {"type": "string"},
            "sent_to": {"type": "string"},
            "targets": {"type": "array", "items": {"type": "object"}},
        },
    },
    "Session": {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "request_id": {"type": "string"},
            "protocol": {"type": "string"},
            "origin": {"type": "string"},
            "since": {"type": "string", "format": "date-time"},
            "last_seen": {"type": "string", "format": "date-time"},
            "bytes_in": {"type": "integer"},
            "bytes_out": {"type": "integer"},
            "connections": {
                "type": "array",
                "description": "live tunnels, terminals, SSH channels and proxied websockets (all replicas)",
                "items": {
                    "type": "object",
                    "properties": {
                        "id": {
                            "type": "string",
                            "description": "con_...; DELETE /sessions/{id} cuts it alone",
                        },
                        "protocol": {"type": "string"},
                        "target": {"type": ["string", "null"]},
                        "origin": {"type": "string"},
                        "since": {"type": "string", "format": "date-time"},
                        "bytes_in": {"type": "integer"},
                        "bytes_out": {"type": "integer"},
                        "replica": {
                            "type": "string",
                            "description": "the gateway process holding it; byte counts of other "
                            "replicas' connections are as of their last flush (5 s)",
                        },
                    },
                },
            },
        },
    },
    "AuditEvent": {
        "type": "object",
        "properties": {
            "seq": {"type": "integer"},
            "at": {"type": "string", "format": "date-time"},
            "actor": {"type": "string"},
            "type": {"type": "string"},
            "subject": {"type": "string"},
            "outcome": {"type": "string"},
            "origin": {"type": "string"},
            "details": {"type": "object"},
            "hash": {"type": "string"},
            "prev_hash": {"type": "string"},
        },
    },
    "Explain": {
        "type": "object",
        "additionalProperties": False,
        "required": ["request_id"],
        "properties": {
            "request_id": {"type": "string"},
            "target_id": {"type": "string"},
            "address": {"type": "string"},
            "at": {"type": "string", "format": "date-time"},
        },
    },
    "Decision": {
        "type": "object",
        "properties": {
            "allowed": {"type": "boolean"},
            "reason": {"type": ["string", "null"]},
            "message": {"type": "string"},
        },
    },
}


def _nullable_optionals(schema: dict[str, Any]) -> dict[str, Any]:
    """Request bodies read ``null`` as "not given" (``fields.Reader``): say so for every
    optional property, nested objects included."""
    required = set(schema.get("required", ()))
    props: dict[str, Any] = {}
    for key, prop in schema.get("properties", {}).items():
        if prop.get("type") == "object" and "properties" in prop:
            prop = _nullable_optionals(prop)
        if key not in required:
            if "$ref" in prop:
                prop = {"anyOf": [prop, {"type": "null"}]}
            elif isinstance(prop.get("type"), str):
                prop = {**prop, "type": [prop["type"], "null"]}
                if "enum" in prop:
                    prop["enum"] = [*prop["enum"], None]
        props[key] = prop
    return {**schema, "properties": props} if props else schema


for _name in (
    "Policy",
    "GroupInput",
    "UserInput",
    "ReasonInput",
    "TargetInput",
    "AccessRequestInput",
    "Explain",
):
    _SCHEMAS[_name] = _nullable_optionals(_SCHEMAS[_name])


def _patch_of(name: str, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """A PATCH body: the create body with every field optional and no defaults (an omitted
    field keeps its value); ``drop`` names fields that cannot be changed."""
    schema = {k: v for k, v in _SCHEMAS[f"{name}Input"].items() if k != "required"}
    schema["properties"] = {
        k: {kk: vv for kk, vv in v.items() if kk != "default"}
        for k, v in schema["properties"].items()
        if k not in drop
    }
    return _nullable_optionals(schema)


_SCHEMAS.update(
    {
        "GroupPatch": _patch_of("Group"),
        "UserPatch": _patch_of("User", drop=("group_id",)),
        "TargetPatch": _patch_of("Target"),
    }
)


def _list_of(name: str) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "items": {"type": "array", "items": _ref(name)},
            "next_cursor": {"type": ["string", "null"]},
        },
    }


def _problem(desc: str) -> dict[str, Any]:
    return {"description": desc, "content": {"application/problem+json": {"schema": _ref("Problem")}}}


def _ok(status: str, desc: str, schema: dict[str, Any] | None) -> dict[str, Any]:
    resp: dict[str, Any] = {"description": desc}
    if schema is not None:
        resp["content"] = {"application/json": {"schema": schema}}
    return {status: resp}


def _op(
    summary: str,
    role: str,
    ok: dict[str, Any],
    body: str | None = None,
    params: list[dict[str, Any]] | None = None,
    errors: tuple[int, ...] = (),
) -> dict[str, Any]:
    responses: dict[str, Any] = dict(ok)
    responses["401"] = _problem("missing or invalid API token")
    if role == "admin":
        responses["403"] = _problem("the token's role may not do this")
    if body is not None:
        responses["400"] = _problem("malformed JSON or invalid UTF-8")
        responses["413"] = _problem("body over 1 MiB")
        responses["422"] = _problem("validation failed; `errors` names each field")
    for code in errors:
        responses[str(code)] = _problem(
            {
                400: "a query parameter is malformed (e.g. a cursor that is not valid)",
                404: "not found",
                409: "state conflict",
                502: "message delivery failed",
                422: "invalid query parameter",
                503: "storage unavailable",
            }[code]
        )
    # Any parameter can carry a character the store refuses (NUL, on PostgreSQL).
    responses.setdefault(
        "400", _problem("malformed request: a parameter holds a character that cannot be used")
    )
    responses.setdefault("503", _problem("storage unavailable"))
    op: dict[str, Any] = {
        "summary": summary,
        "x-role": role,
        "responses": responses,
        "security": [{"bearer": []}],
    }
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(body)}}}
    if params:
        op["parameters"] = params
    return op


def _q(name: str, schema: dict[str, Any], desc: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": desc}


_ID = [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}]
_ID64 = {"type": "string", "maxLength": 64}  # ids and names in filters (longer: 422)
_PAGE = [
    _q("limit", {"type": "integer", "minimum": 1}, "page size"),
    _q("cursor", {"type": "string"}, "next_cursor of the previous page"),
]


def _crud(
    noun: str, schema: str, *, patch: bool = True, extra_list: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    base = f"/api/v1/{noun}"
    item: dict[str, Any] = {
        "get": _op(
            f"Get one {noun[:-1]}", "auditor", _ok("200", "found", _ref(schema)), params=_ID, errors=(404,)
        ),
        "delete": _op(
            f"Delete a {noun[:-1]}", "admin", _ok("204", "deleted", None), params=_ID, errors=(404, 409)
        ),
    }
    if patch:
        item["patch"] = _op(
            f"Change a {noun[:-1]}",
            "admin",
            _ok("200", "changed", _ref(schema)),
            body=f"{schema}Patch",
            params=_ID,
            errors=(404, 409),
        )
    return {
        base: {
            "post": _op(
                f"Create a {noun[:-1]}",
                "admin",
                _ok("201", "created", _ref(schema)),
                body=f"{schema}Input",
                errors=(409,),
            ),
            "get": _op(
                f"List {noun}",
                "auditor",
                _ok("200", "list", _list_of(schema)),
                params=extra_list,
                errors=(422,) if extra_list else (),
            ),
        },
        base + "/{id}": item,
    }


def build_openapi() -> dict[str, Any]:
    paths: dict[str, Any] = {
        "/api/v1/openapi.json": {
            "get": _op("This document", "auditor", _ok("200", "OpenAPI 3.1", {"type": "object"})),
        },
    }
    paths.update(_crud("groups", "Group"))
    paths.update(_crud("users", "User", extra_list=[_q("group_id", _ID64, "only this group")]))
    paths["/api/v1/users/{id}"]["delete"]["parameters"] = [
        *_ID,
        _q("erase", {"type": "boolean"}, "keep the record but erase name, e-mail and phone"),
    ]
    paths["/api/v1/users/{id}"]["delete"]["responses"]["422"] = _problem("invalid query parameter")
    paths["/api/v1/users/{id}/export"] = {
        "get": _op(
            "Everything held about one user: record, requests, sessions, audit events",
            "admin",
            _ok("200", "a domum-user-export/1 document", {"type": "object"}),
            params=_ID,
            errors=(404,),
        ),
    }
    paths.update(_crud("reasons", "Reason", patch=False))
    paths.update(_crud("targets", "Target"))
    status = {"type": "string", "enum": ["saved", "forwarded", "revoked", "expired"]}
    paths["/api/v1/access-requests"] = {
        "post": _op(
            "Create an access request (or review it with dry_run=true)",
            "admin",
            {
                **_ok("201", "saved", _ref("AccessRequest")),
                **_ok("200", "dry run: the normalised request, not saved", _ref("AccessRequest")),
            },
            body="AccessRequestInput",
            params=[_q("dry_run", {"type": "boolean"}, "validate and normalise without saving")],
        ),
        "get": _op(
            "List access requests, newest first",
            "auditor",
            _ok("200", "a page", _list_of("AccessRequest")),
            params=[
                _q("status", status, "filter"),
                _q("user_id", _ID64, "filter"),
                _q("group_id", _ID64, "filter"),
                *_PAGE,
            ],
            errors=(400, 422),
        ),
    }
    paths["/api/v1/access-requests/{id}"] = {
        "get": _op(
            "Get an access request",
            "auditor",
            _ok("200", "found", _ref("AccessRequest")),
            params=_ID,
            errors=(404,),
        ),
    }
    paths["/api/v1/access-requests/{id}/forward"] = {
        "post": _op(
            "Send the personal link on the user's channel",
            "admin",
            _ok("200", "forwarded; `sent_to` is the masked destination", _ref("AccessRequest")),
            params=_ID,
            errors=(404, 409, 502),
        ),
    }
    paths["/api/v1/access-requests/{id}/revoke"] = {
        "post": _op(
            "Revoke; every session of the grant ends",
            "admin",
            _ok("200", "revoked", _ref("AccessRequest")),
            params=_ID,
            errors=(404, 409),
        ),
    }
    paths["/api/v1/access-requests/{id}/evidence"] = {
        "get": _op(
            "Signed evidence bundle: the request, its timeline, sessions and the audit-chain segment",
            "auditor",
            _ok("200", "an Ed25519-signed domum-evidence/1 document", {"type": "object"}),
            params=_ID,
            errors=(404, 409),
        ),
    }
    paths["/api/v1/sessions"] = {
        "get": _op(
            "Live sessions",
            "auditor",
            _ok("200", "list", _list_of("Session")),
            params=[_q("request_id", _ID64, "filter")],
            errors=(422,),
        ),
    }
    end = _op(
        "End a live session (ses_...) or cut one live connection (con_...)",
        "auditor",
        {
            **_ok("204", "ended, or the connection is cut", None),
            **_ok(
                "202",
                "a connection held by another replica is being cut there (asynchronously): it did "
                "not confirm within 2 s",
                None,
            ),
        },
        params=_ID,
        errors=(404,),
    )
    end["description"] = (
        "A connection held by another replica is cut by that replica, told through the database "
        "(PostgreSQL LISTEN/NOTIFY); the answer is 204 once it is gone from the shared registry, "
        "202 if that takes longer. Either way it is audited once (connection.terminated)."
    )
    paths["/api/v1/sessions/{id}"] = {"delete": end}
    watch = _op(
        "Watch a browser SSH terminal live, read-only (websocket; nothing is recorded)",
        "auditor",
        _ok(
            "101",
            "websocket: a text frame {type: size, cols, rows} (again on every resize), then binary "
            "frames with what the user's terminal shows from now on; input is ignored. Closes 1000 "
            "when the SSH session ends, 1008 with the reason when it is cut or the watcher falls behind",
            None,
        ),
        params=[
            {
                "name": "id",
                "in": "path",
                "required": True,
                "schema": {"type": "string"},
                "description": "con_... of an ssh-terminal connection, or ses_... with one terminal",
            }
        ],
        errors=(404, 409),
    )
    watch["description"] = (
        "The user sees a line naming the watcher when watching starts and stops; both are audit "
        "events (session.watch.started, session.watch.stopped). Browsers may authenticate with the "
        "admin console's session cookie instead of a Bearer token, from the admin listener's own "
        "origin only."
    )
    watch["responses"]["403"] = _problem("the console cookie was sent from another origin")
    watch["responses"]["426"] = _problem("not a websocket handshake")
    watch["security"] = [{"bearer": []}, {"console": []}]
    paths["/api/v1/sessions/{id}/watch"] = {"get": watch}
    paths["/api/v1/audit"] = {
        "get": _op(
            "Audit events in chain order",
            "auditor",
            _ok("200", "a page", _list_of("AuditEvent")),
            params=[
                _q("since", {"type": "string", "format": "date-time"}, "events at or after"),
                _q("type", _ID64, "event type, e.g. request.forwarded"),
                _q("request_id", _ID64, "events of one request"),
                *_PAGE,
            ],
            errors=(400, 422),
        ),
    }
    paths["/api/v1/explain"] = {
        "post": _op(
            "Why would this request be allowed or refused?",
            "auditor",
            _ok("200", "the decision", _ref("Decision")),
            body="Explain",
            errors=(404,),
        ),
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Domum Gateway control API",
            "version": __version__,
            "description": "Administrators and auditors manage time-boxed remote access.",
        },
        "servers": [{"url": "/"}],
        "components": {
            "schemas": _SCHEMAS,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "console": {"type": "apiKey", "in": "cookie", "name": "__Host-domum-admin"},
            },
        },
        "paths": paths,
    }
