"""Starts a real tern-server for the binding tests: a free port, its own data directory and
development certificates, and tokens signed with its secret."""

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def server_binary() -> Path:
    explicit = os.environ.get("TERN_SERVER_BIN")
    if explicit:
        return Path(explicit)
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    return target / "debug" / "tern-server"


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TernServer:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="tern-ffi-py-"))
        self.port = free_udp_port()
        self.bin = server_binary()
        self.log = open(self.dir / "server.log", "wb")
        self.proc = subprocess.Popen(
            [str(self.bin), *self.global_args(), "--listen", f"127.0.0.1:{self.port}", "run"],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        ca = self.dir / "certs" / "ca.pem"
        deadline = time.monotonic() + 30
        while not ca.exists() or not (self.dir / "data" / "jwt.secret").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"tern-server did not start: {self.logs()}")
            time.sleep(0.05)
        self.ca_pem = ca.read_text()
        self.address = f"127.0.0.1:{self.port}"

    def global_args(self) -> list:
        return ["--data-dir", str(self.dir / "data"), "--certs-dir", str(self.dir / "certs")]

    def token(self, user: str, device: str = "phone") -> str:
        out = subprocess.run(
            [str(self.bin), *self.global_args(), "token", "--user", user, "--device", device],
            check=True,
            capture_output=True,
        )
        return out.stdout.decode().strip()

    def logs(self) -> str:
        self.log.flush()
        return (self.dir / "server.log").read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
