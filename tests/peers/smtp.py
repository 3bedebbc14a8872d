"""A real SMTP server (aiosmtpd) on loopback that records what it receives."""

from __future__ import annotations

import asyncio
import email
import email.policy
import re
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

from aiosmtpd.controller import Controller


class LoopbackController(Controller):
    """aiosmtpd's Controller on an ephemeral port (it probes ``self.port`` at start)."""

    def _trigger_server(self) -> None:
        assert isinstance(self.server, asyncio.Server)
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()  # type: ignore[no-untyped-call]


@dataclass
class Mailbox:
    messages: list[EmailMessage] = field(default_factory=list)
    refuse: bool = False

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: Any
    ) -> str:
        if self.refuse:
            return "550 mailbox unavailable"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(msg, EmailMessage)
        self.messages.append(msg)
        return "250 Message accepted"

    def bodies_to(self, rcpt: str) -> list[str]:
        out = []
        for m in self.messages:
            if rcpt.lower() in str(m["To"]).lower():
                part = m.get_body(("plain",))
                assert part is not None
                out.append(part.get_content())
        return out

    def last_link(self, rcpt: str) -> str:
        for body in reversed(self.bodies_to(rcpt)):
            m = re.search(r"https?://\S+/a/[A-Za-z0-9_-]+", body)
            if m:
                return m.group(0)
        raise AssertionError(f"no link mailed to {rcpt}")

    def last_token(self, rcpt: str) -> str:
        for body in reversed(self.bodies_to(rcpt)):
            m = re.search(r"\b(\d{8})\b", body)
            if m:
                return m.group(1)
        raise AssertionError(f"no token mailed to {rcpt}")

    async def wait_count(self, n: int, timeout: float = 5.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self.messages) < n:
            if loop.time() > deadline:
                raise AssertionError(f"expected {n} messages, got {len(self.messages)}")
            await asyncio.sleep(0.02)
