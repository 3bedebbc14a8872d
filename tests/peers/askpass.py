"""SSH_ASKPASS helper: answers the jump server's keyboard-interactive prompts from files.

OpenSSH runs ``$SSH_ASKPASS "<prompt>"`` (with ``SSH_ASKPASS_REQUIRE=force``) for each
keyboard-interactive prompt and reads the answer from its stdout. The test writes the
personal link into ``$DOMUM_ASKPASS_DIR/link`` up front; the token only exists once the
link was answered (that is what makes the gateway mail it), so for ``Token:`` this
helper waits for ``$DOMUM_ASKPASS_DIR/token`` to appear. A token file is consumed when
read, so a retry prompt waits for the next one. Every prompt is appended to
``prompts.log``; anything else is refused (exit 1), like a person pressing Escape.

Use :func:`write_wrapper` to get an executable that runs this file with the current
Python, since OpenSSH needs a program path, not a command line. :class:`JumpClient`
drives the real OpenSSH client through the gateway's jump server with this helper.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .smtp import Mailbox

__all__ = ["JumpClient", "SshResult", "askpass_env", "put", "write_wrapper"]


def write_wrapper(dir: Path) -> Path:
    """An executable ``askpass`` script in ``dir`` that runs this helper."""
    dir.mkdir(parents=True, exist_ok=True)
    wrapper = dir / "askpass"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{Path(__file__).resolve()}" "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def askpass_env(dir: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for an ``ssh`` that must use the helper (no terminal, no agent)."""
    env = dict(base if base is not None else os.environ)
    env.pop("SSH_AUTH_SOCK", None)
    env.update(
        {
            "SSH_ASKPASS": str(write_wrapper(dir)),
            "SSH_ASKPASS_REQUIRE": "force",
            "DISPLAY": env.get("DISPLAY", ":0"),
            "DOMUM_ASKPASS_DIR": str(dir),
        }
    )
    return env


def put(path: Path, value: str) -> None:
    """Write ``value`` to ``path`` atomically, so the helper never reads half a token."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(value + "\n")
    tmp.replace(path)


@dataclass
class SshResult:
    returncode: int
    stdout: bytes
    stderr: str


@dataclass
class JumpClient:
    """The OpenSSH client configured for one gateway jump server, in its own folder.

    ``gw`` in the generated config is the jump server (user = the remote user's e-mail);
    ``known_hosts`` pins the gateway's host key plus the lines given. ``-F`` is passed
    to every ``ssh``, which passes it on to the ``ssh -W`` that ``-J`` starts.
    """

    dir: Path
    jump_port: int
    jump_key_line: str
    user: str
    identity: Path | None = None
    known_hosts: Sequence[str] = ()
    extra_config: Sequence[str] = ()
    config: Path = field(init=False)

    def __post_init__(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        kh = self.dir / "known_hosts"
        key = " ".join(self.jump_key_line.split()[:2])
        lines = [f"[127.0.0.1]:{self.jump_port} {key}\n", *self.known_hosts]
        kh.write_text("".join(line if line.endswith("\n") else line + "\n" for line in lines))
        self.config = self.dir / "ssh_config"
        identity = [f"  IdentityFile {self.identity}", "  IdentitiesOnly yes"] if self.identity else []
        self.config.write_text(
            "\n".join(
                [
                    "Host gw",
                    "  HostName 127.0.0.1",
                    f"  Port {self.jump_port}",
                    f"  User {self.user}",
                    "  PreferredAuthentications keyboard-interactive",
                    "Host *",
                    f"  UserKnownHostsFile {kh}",
                    "  GlobalKnownHostsFile /dev/null",
                    "  StrictHostKeyChecking yes",
                    "  UpdateHostKeys no",
                    "  ForwardAgent no",
                    "  ForwardX11 no",
                    "  ControlMaster no",
                    "  ControlPath none",
                    "  ConnectTimeout 10",
                    "  LogLevel INFO",
                    *identity,
                    *self.extra_config,
                    "",
                ]
            )
        )

    def env(self) -> dict[str, str]:
        return askpass_env(self.dir)

    def argv(self, *args: str, program: str = "ssh") -> list[str]:
        return [program, "-F", str(self.config), *args]

    async def start(self, *args: str, link: str, program: str = "ssh") -> asyncio.subprocess.Process:
        """Start ``ssh -F config ARGS`` detached from any terminal (answers come from files)."""
        put(self.dir / "link", link)
        (self.dir / "token").unlink(missing_ok=True)
        return await asyncio.create_subprocess_exec(
            *self.argv(*args, program=program),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self.env(),
            start_new_session=True,
        )

    async def give_token(self, mailbox: Mailbox, email: str, before: int, timeout: float = 15.0) -> str:
        """Wait for the token mail (message number ``before + 1``) and hand it to askpass."""
        await mailbox.wait_count(before + 1, timeout)
        token = mailbox.last_token(email)
        put(self.dir / "token", token)
        return token

    @staticmethod
    async def finish(proc: asyncio.subprocess.Process, timeout: float = 120.0) -> SshResult:
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            # The whole process group: ``ssh -J`` and ``scp`` run helper ssh processes that
            # would otherwise keep the pipes open (and ``communicate`` waiting) for ever.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, err = await asyncio.wait_for(proc.communicate(), 10)
        assert proc.returncode is not None
        return SshResult(proc.returncode, out, err.decode(errors="replace"))

    async def run(
        self,
        *args: str,
        link: str,
        mailbox: Mailbox,
        email: str,
        program: str = "ssh",
        timeout: float = 120.0,
    ) -> SshResult:
        """Run one command that signs in once: link from ``link``, token from the mailbox."""
        before = len(mailbox.messages)
        proc = await self.start(*args, link=link, program=program)
        waiter = asyncio.ensure_future(self.give_token(mailbox, email, before))
        result = await self.finish(proc, timeout)
        if not waiter.done():
            waiter.cancel()
        elif waiter.exception() is not None and result.returncode == 0:
            raise AssertionError(f"token mail did not arrive: {waiter.exception()}")
        return result

    def prompts(self) -> list[str]:
        path = self.dir / "prompts.log"
        return path.read_text().splitlines() if path.exists() else []


def _main(argv: list[str]) -> int:
    folder = Path(os.environ["DOMUM_ASKPASS_DIR"])
    prompt = argv[1] if len(argv) > 1 else ""
    with (folder / "prompts.log").open("a") as log:
        log.write(prompt.replace("\n", " ") + "\n")
    if "Personal link" in prompt:
        sys.stdout.write((folder / "link").read_text().strip() + "\n")
        return 0
    if "Token" in prompt:
        path = folder / "token"
        deadline = time.monotonic() + float(os.environ.get("DOMUM_ASKPASS_WAIT", "60"))
        while time.monotonic() < deadline:
            try:
                token = path.read_text().strip()
            except FileNotFoundError:
                time.sleep(0.05)
                continue
            if not token:
                time.sleep(0.05)
                continue
            if os.environ.get("DOMUM_ASKPASS_KEEP") != "1":
                path.unlink()
            sys.stdout.write(token + "\n")
            return 0
        return 1
    return 1


if __name__ == "__main__":
    sys.exit(_main(sys.argv))
