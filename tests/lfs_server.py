"""A real git-lfs HTTP server on the loopback address for the remote tests: giftless 0.6.2 (Flask, local-disk
storage) from its own virtualenv under .reference/giftless (scripts/reference-tools.sh installs it). Anonymous
read/write, or JWT-only when a test checks credentials (tokens signed with the server's key, sent by git-lfs as
basic auth with user `_jwt`, the way giftless accepts them)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIFTLESS_PY = ROOT / ".reference" / "giftless" / "bin" / "python"
KEY = "gittheta-test-key"
REPO_PATH = "theta/models"  # the ORG/REPO part of the LFS URL


def available() -> bool:
    return GIFTLESS_PY.exists()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LfsServer:
    """Start/stop giftless on a free port; `storage` survives restarts (a killed server comes back with the same
    objects, as a real one would)."""

    def __init__(self, workdir: Path, *, anonymous: bool = True) -> None:
        self.workdir = workdir
        self.storage = workdir / "storage"
        self.storage.mkdir(parents=True, exist_ok=True)
        self.config = workdir / "giftless.yaml"
        providers = "  - factory: giftless.auth.jwt:factory\n" \
                    f"    options: {{algorithm: HS256, private_key: {KEY}}}\n"
        if anonymous:
            providers += "  - giftless.auth.allow_anon:read_write\n"
        self.config.write_text(
            "AUTH_PROVIDERS:\n" + providers +
            "TRANSFER_ADAPTERS:\n  basic:\n    factory: giftless.transfer.basic_streaming:factory\n"
            "    options:\n      storage_class: giftless.storage.local_storage:LocalStorage\n"
            f"      storage_options: {{path: {self.storage}}}\n")
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> LfsServer:
        env = {**os.environ, "GIFTLESS_CONFIG_FILE": str(self.config)}
        log = open(self.workdir / "server.log", "ab")  # noqa: SIM115 - the server process owns it
        self.proc = subprocess.Popen(
            [str(GIFTLESS_PY), "-m", "flask", "--app", "giftless.wsgi_entrypoint", "run", "--port", str(self.port),
             "--with-threads"], env=env, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"giftless exited: {(self.workdir / 'server.log').read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("giftless did not start within 30 s")

    def kill(self) -> None:
        """SIGKILL, as a crash or a pulled plug would stop it."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def url(self, token: str | None = None) -> str:
        auth = f"_jwt:{token}@" if token else ""
        return f"http://{auth}127.0.0.1:{self.port}/{REPO_PATH}"

    def objects(self) -> dict[str, int]:
        """oid -> size of every object the server stores."""
        return {p.name: p.stat().st_size for p in self.storage.rglob("*") if p.is_file() and len(p.name) == 64}

    def token(self, key: str = KEY, scope: str = f"obj:{REPO_PATH}/*") -> str:
        """A JWT as the server's operator would hand one out (signed in giftless's own venv, which has pyjwt)."""
        code = ("import jwt, sys, time; print(jwt.encode({'sub': 'tester', 'exp': int(time.time()) + 3600, "
                "'scopes': [sys.argv[2]]}, sys.argv[1], algorithm='HS256'))")
        return subprocess.run([str(GIFTLESS_PY), "-c", code, key, scope], capture_output=True, text=True,
                              check=True).stdout.strip()
