"""Interop: a QUIC stack not built on quinn (aioquic) against the real tern-server binary.

The server is started exactly as the README's run command leaves it: no arguments, in an empty
directory. So this also checks that a first start generates certificates into ./certs and
listens dual-stack on UDP 4433.

Checks:
- aioquic, trusting certs/ca.pem, completes a handshake with ALPN tern/1 over IPv4 and IPv6;
- a handshake offering any other ALPN is refused;
- OpenSSL (a strict verifier) accepts the generated chain.

Usage: python3 quic_interop.py PATH_TO_TERN_SERVER
"""

import asyncio
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time

from aioquic.asyncio import connect
from aioquic.quic.configuration import QuicConfiguration

PORT = 4433
passed = 0
failed = 0


def check(name, ok, detail=""):
    global passed, failed
    if ok:
        passed += 1
        print(f"ok   {name}")
    else:
        failed += 1
        print(f"FAIL {name} {detail}")


async def handshake(host, alpn, ca):
    config = QuicConfiguration(is_client=True, alpn_protocols=[alpn], server_name="localhost")
    config.load_verify_locations(ca)
    config.verify_mode = ssl.CERT_REQUIRED
    try:
        async with connect(host, PORT, configuration=config, wait_connected=True) as client:
            await asyncio.wait_for(client.ping(), 5)
            return client._quic.tls.alpn_negotiated
    except Exception as e:  # a refused handshake surfaces as ConnectionError or a timeout
        return e


async def with_timeout(coro, secs=10):
    try:
        return await asyncio.wait_for(coro, secs)
    except asyncio.TimeoutError as e:
        return e


def main():
    server_bin = os.path.abspath(sys.argv[1])
    workdir = tempfile.mkdtemp(prefix="tern-interop-")
    log = open(os.path.join(workdir, "server.log"), "w")
    server = subprocess.Popen([server_bin], cwd=workdir, stderr=log)
    try:
        ca = os.path.join(workdir, "certs", "ca.pem")
        deadline = time.time() + 20
        while not os.path.exists(ca) and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(0.3)
        for name in ["ca.pem", "server.pem", "server.key"]:
            check(f"first start generated certs/{name}", os.path.exists(os.path.join(workdir, "certs", name)))
        check("server is running", server.poll() is None)

        for host in ["127.0.0.1", "::1"]:
            result = asyncio.run(with_timeout(handshake(host, "tern/1", ca)))
            check(f"aioquic handshake with ALPN tern/1 on [{host}]:{PORT}", result == "tern/1", repr(result))
        for alpn in ["h3", "tern/2"]:
            result = asyncio.run(with_timeout(handshake("127.0.0.1", alpn, ca)))
            check(f"ALPN {alpn} is refused ({type(result).__name__}: {result})", isinstance(result, ConnectionError), repr(result))

        if shutil.which("openssl"):
            out = subprocess.run(
                ["openssl", "verify", "-CAfile", ca, os.path.join(workdir, "certs", "server.pem")],
                capture_output=True, text=True,
            )
            check("openssl verifies the generated chain", out.returncode == 0, out.stdout + out.stderr)
        else:
            print("skip openssl verify (no openssl binary)")

        server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(10)
            check("SIGTERM stops the server cleanly", code == 0, f"exit {code}")
        except subprocess.TimeoutExpired:
            check("SIGTERM stops the server cleanly", False, "still running after 10 s")
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        log.close()
        if failed:
            print(open(os.path.join(workdir, "server.log")).read()[-4000:])
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"interop: {passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
