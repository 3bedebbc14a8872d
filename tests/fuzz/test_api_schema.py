"""Schemathesis against the real admin listener: no 5xx, and every answer is what the OpenAPI says.

The gateway runs in the test's event loop (the ``running`` fixture: TLS on loopback, a
real SMTP server); schemathesis is synchronous (``requests``), so the whole run happens in
a worker thread while the loop keeps serving. The document fuzzed is the one the gateway
serves at ``/api/v1/openapi.json``, so a route the document forgets, or a response it
does not describe, fails here.

Each operation gets ``DOMUM_FUZZ_EXAMPLES`` positive cases (valid by the schema) and as
many negative ones (invalid by the schema, which must be refused with a 4xx), half of
them aimed at records that exist (seeded before the run) so the handlers past the 404
are reached too.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from requests.adapters import HTTPAdapter
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from ..conftest import Running
from ..integration.helpers import create_forwarded, login_direct, seed
from .profiles import api_examples

CHECKS: list[Any] = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
NEGATIVE_CHECKS: list[Any] = [*CHECKS, negative_data_rejection]
REQUEST_TIMEOUT = 10.0


@dataclass
class Report:
    ran: dict[str, int] = field(default_factory=dict)
    statuses: dict[int, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    nothing_to_negate: list[str] = field(default_factory=list)


def _existing_ids(ids: dict[str, str]) -> Callable[[str], str | None]:
    """The seeded record a path like ``/api/v1/groups/{id}`` should be aimed at."""

    def pick(path: str) -> str | None:
        for noun, value in ids.items():
            if path.startswith(f"/api/v1/{noun}/"):
                return value
        return None

    return pick


def _runner(
    strategy: st.SearchStrategy[Any],
    examples: int,
    report: Report,
    label: str,
    checks: list[Any],
    base_url: str,
    session: requests.Session,
    auth: dict[str, str],
) -> Callable[[], None]:
    @given(case=strategy)
    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def run(case: Any) -> None:  # a schemathesis.Case
        report.ran[label] = report.ran.get(label, 0) + 1
        response = case.call(
            base_url=base_url, session=session, headers=auth, timeout=REQUEST_TIMEOUT, verify=session.verify
        )
        report.statuses[response.status_code] = report.statuses.get(response.status_code, 0) + 1
        case.validate_response(response, checks=checks, headers=auth)

    return run


def _fuzz(base_url: str, token: str, ca: str, ids: dict[str, str], examples: int) -> Report:
    with requests.Session() as session:
        session.verify = ca
        # Not from the environment: REQUESTS_CA_BUNDLE would replace our CA, a proxy variable the route.
        session.trust_env = False
        try:
            return _fuzz_with(session, base_url, token, ids, examples)
        finally:
            _close_pooled_connections(session)


def _close_pooled_connections(session: requests.Session) -> None:
    """Close the session's keep-alive connections now, while the gateway still serves.

    ``Session.close()`` is not enough: urllib3 2's ``PoolManager.clear()`` only forgets its
    pools, and a pool closes its connections when it is garbage collected. A response left
    in a reference cycle keeps its pool (``HTTPResponse._pool``), so an idle TLS connection
    to the admin listener outlived the test; ``gateway.stop()`` then began a TLS shutdown
    the client never answered, and the accepted socket was reported unclosed once the
    event loop was gone.
    """
    for adapter in session.adapters.values():
        if isinstance(adapter, HTTPAdapter):
            for manager in (adapter.poolmanager, *adapter.proxy_manager.values()):
                for key in manager.pools.keys():  # a snapshot: the container refuses iteration
                    pool = manager.pools.get(key)
                    if pool is not None:
                        pool.close()


def _fuzz_with(
    session: requests.Session, base_url: str, token: str, ids: dict[str, str], examples: int
) -> Report:
    auth = {"Authorization": f"Bearer {token}"}
    with session.get(f"{base_url}/api/v1/openapi.json", headers=auth, timeout=REQUEST_TIMEOUT) as served:
        assert served.status_code == 200, served.text
        schema = schemathesis.openapi.from_dict(served.json())
    target_of = _existing_ids(ids)
    report = Report()
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), f"the served document has an invalid operation: {result}"
        operation = result.ok()
        label = f"{operation.method.upper()} {operation.path}"
        existing = target_of(operation.path) if "{id}" in operation.path else None
        for mode, checks in (
            (schemathesis.GenerationMode.POSITIVE, CHECKS),
            (schemathesis.GenerationMode.NEGATIVE, NEGATIVE_CHECKS),
        ):
            # The token is fixed, not generated: a case whose only flaw is a missing or junk
            # Authorization header would otherwise be "fixed" by the one the call adds.
            strategy = operation.as_strategy(generation_mode=mode, headers=auth)
            if existing is not None:
                aimed = operation.as_strategy(
                    generation_mode=mode, headers=auth, path_parameters={"id": existing}
                )
                strategy = st.one_of(strategy, aimed)

            runner = _runner(strategy, examples, report, label, checks, base_url, session, auth)
            try:
                runner()
            except Unsatisfiable:
                # Nothing to make invalid (no parameters, no body): only the positive run counts.
                assert mode is schemathesis.GenerationMode.NEGATIVE, label
                report.nothing_to_negate.append(label)
            except (AssertionError, BaseExceptionGroup, requests.RequestException) as exc:
                # Collect every operation's failure (hypothesis shrinks each), then fail once.
                report.failures.append(f"{label} [{mode.value}]: {exc}")
    return report


async def test_control_api_matches_its_openapi_document(running: Running) -> None:
    sd = await seed(running)
    request_id, link = await create_forwarded(running, sd)
    await login_direct(running, sd, link)
    sessions = await running.gateway.store.list_sessions(request_id)
    ids = {
        "groups": sd.group_id,
        "users": sd.user_id,
        "reasons": sd.reason_id,
        "targets": sd.target_id,
        "access-requests": request_id,
        "sessions": sessions[0].id,
    }
    examples = api_examples()
    started = time.monotonic()
    report = await asyncio.to_thread(
        _fuzz, running.admin_url, running.admin_token, str(running.gateway.settings.tls.ca), ids, examples
    )
    elapsed = time.monotonic() - started
    assert not report.failures, "\n\n".join(report.failures)
    # Every documented operation was exercised, and the run reached past the front door.
    assert len(report.ran) >= 30, sorted(report.ran)
    assert all(count >= 1 for count in report.ran.values())
    assert any(200 <= status < 300 for status in report.statuses), report.statuses
    assert 422 in report.statuses, report.statuses
    assert not any(status >= 500 for status in report.statuses), report.statuses
    print(f"schemathesis: {sum(report.ran.values())} requests, {elapsed:.1f}s, statuses {report.statuses}")
