#!/usr/bin/env python3
"""Self-check of the reference peers (python/server.py, node/server.js).

Starts each server on a free loopback port with a fresh data directory, runs
a few end-to-end checks against it with a grpcio client, stops it with
SIGTERM and prints one line per check, then `N passed, N failed`. Exits 1 if
anything failed. Run ./setup.sh first; then either of:

    python/.venv/bin/python selftest.py [python|node ...]
    python3 selftest.py            (re-runs itself with the venv's python)
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENV_PYTHON = HERE / "python" / ".venv" / "bin" / "python"

try:
    import grpc
except ImportError:
    if VENV_PYTHON.exists() and Path(sys.executable) != VENV_PYTHON:
        os.execv(VENV_PYTHON, [str(VENV_PYTHON), __file__, *sys.argv[1:]])
    sys.exit("grpcio is missing: run ./setup.sh first")

sys.path.insert(0, str(HERE / "python" / "gen"))
import chat_pb2  # noqa: E402
import chat_pb2_grpc  # noqa: E402
import fileupload_pb2  # noqa: E402
import fileupload_pb2_grpc  # noqa: E402
import telemetry_pb2  # noqa: E402
import telemetry_pb2_grpc  # noqa: E402

PEERS = {
    "python": [str(VENV_PYTHON), str(HERE / "python" / "server.py")],
    "node": ["node", str(HERE / "node" / "server.js")],
}
CHECK_TIMEOUT = 30.0  # seconds, per check
MiB = 1024 * 1024


class CheckFailed(Exception):
    pass


def expect(condition: bool, what: str) -> None:
    if not condition:
        raise CheckFailed(what)


def payload(service: str, cpu: float, mem: float = 512.0, **kw) -> telemetry_pb2.MetricsPayload:
    return telemetry_pb2.MetricsPayload(service_name=service, cpu_usage=cpu, memory_mb=mem, **kw)


async def publish(channel, *payloads) -> list[telemetry_pb2.AlertResponse]:
    """Sends payloads on one LiveFeed stream, closes it, returns the alerts.
    The server ends the stream only after handling all of them."""
    stub = telemetry_pb2_grpc.TelemetryServiceStub(channel)
    return [a async for a in stub.LiveFeed(iter(payloads))]


async def expect_status(coro, *codes: grpc.StatusCode) -> None:
    try:
        await coro
    except grpc.aio.AioRpcError as err:
        expect(err.code() in codes, f"status {err.code().name}, wanted {[c.name for c in codes]}")
        return
    raise CheckFailed(f"call succeeded, wanted {[c.name for c in codes]}")


# ------------------------------------------------------------------- checks


async def check_livefeed_then_snapshot(channel, data_dir):
    before = time.time() * 1000
    await publish(channel, payload("svc-a", 12.5, 300.0, request_count=7))
    snap = await telemetry_pb2_grpc.TelemetryServiceStub(channel).GetSnapshot(
        telemetry_pb2.MetricsRequest(service_name="svc-a")
    )
    expect(snap.service_name == "svc-a", f"service_name {snap.service_name!r}")
    expect((snap.cpu_usage, snap.memory_mb) == (12.5, 300.0), f"values {snap}")
    expect(snap.request_count == 7, f"request_count {snap.request_count}")
    expect(before - 5000 <= snap.timestamp_ms <= time.time() * 1000 + 5000,
           f"timestamp_ms {snap.timestamp_ms} is not server time")


async def check_snapshot_not_found(channel, data_dir):
    stub = telemetry_pb2_grpc.TelemetryServiceStub(channel)
    await expect_status(
        stub.GetSnapshot(telemetry_pb2.MetricsRequest(service_name="never-reported")),
        grpc.StatusCode.NOT_FOUND,
    )


async def check_livefeed_rejects(channel, data_dir):
    for bad in (payload("", 1.0), payload("svc-x", float("nan")), payload("svc-x", 1.0, -5.0)):
        await expect_status(publish(channel, bad), grpc.StatusCode.INVALID_ARGUMENT)


async def check_subscribe(channel, data_dir):
    """Subscribing before the first sample waits for it, then gets updates."""
    stub = telemetry_pb2_grpc.TelemetryServiceStub(channel)
    call = stub.Subscribe(telemetry_pb2.MetricsRequest(service_name="svc-b", interval_ms=100))
    try:
        await asyncio.sleep(0.3)  # let the subscription reach the server
        await publish(channel, payload("svc-b", 33.0))
        first = await call.read()
        expect(first.service_name == "svc-b" and first.cpu_usage == 33.0, f"first {first}")
        await publish(channel, payload("svc-b", 44.0))
        second = await call.read()
        expect(second.cpu_usage == 44.0, f"second {second}")
    finally:
        call.cancel()


async def check_cpu_alert(channel, data_dir):
    alerts = await publish(
        channel,
        payload("api-gateway", 95.0),
        payload("api-gateway", 97.0),  # still high: no second alert
        payload("api-gateway", 40.0),
        payload("api-gateway", 50.0, 5000.0),
    )
    kinds = [a.alert_type for a in alerts]
    expect(kinds == ["CPU_HIGH", "CPU_HIGH_RESOLVED", "MEMORY_HIGH"], f"alerts {kinds}")
    expect("api-gateway: CPU at 95.0%" in alerts[0].message, f"message {alerts[0].message!r}")
    expect(alerts[0].value == 95.0, f"value {alerts[0].value}")


async def check_upload(channel, data_dir):
    data = os.urandom(MiB + 123)
    size = 64 * 1024
    chunks = [
        fileupload_pb2.FileChunk(
            filename="blob.bin", data=data[i : i + size], chunk_index=n,
            is_last=i + size >= len(data),
        )
        for n, i in enumerate(range(0, len(data), size))
    ]
    stub = fileupload_pb2_grpc.FileUploadServiceStub(channel)
    resp = await stub.Upload(iter(chunks))
    expect(resp.success and resp.filename == "blob.bin", f"response {resp}")
    expect((resp.total_bytes, resp.total_chunks) == (len(data), len(chunks)), f"totals {resp}")
    stored = (data_dir / "uploads" / "blob.bin").read_bytes()
    expect(stored == data, "stored file differs from the upload")
    expect(hashlib.sha256(data).hexdigest() in resp.message, f"no sha256 in {resp.message!r}")


async def check_upload_rejects(channel, data_dir):
    stub = fileupload_pb2_grpc.FileUploadServiceStub(channel)
    for bad in ("../evil", "a/b", "a\\b", ""):
        chunk = fileupload_pb2.FileChunk(filename=bad, data=b"x", is_last=True)
        await expect_status(stub.Upload(iter([chunk])), grpc.StatusCode.INVALID_ARGUMENT)
    # A stream that ends without is_last publishes nothing.
    unfinished = [fileupload_pb2.FileChunk(filename="half.bin", data=b"x" * 1000, chunk_index=i)
                  for i in range(3)]
    await expect_status(stub.Upload(iter(unfinished)),
                        grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ABORTED)
    left = sorted(p.name for p in (data_dir / "uploads").iterdir())
    expect(left == ["blob.bin"], f"uploads/ holds {left}")


async def check_chat(channel, data_dir):
    stub = chat_pb2_grpc.ChatServiceStub(channel)
    room = (("chat-room", "selftest"),)
    a, b = stub.Chat(metadata=room), stub.Chat(metadata=room)
    # Response headers arrive once the server has made the caller a member.
    await a.initial_metadata()
    await b.initial_metadata()
    await a.write(chat_pb2.ChatMessage(sender="alice", message="hi bob"))
    got_a1, got_b1 = await a.read(), await b.read()
    await b.write(chat_pb2.ChatMessage(sender="bob", message="hi alice"))
    got_a2, got_b2 = await a.read(), await b.read()
    for who, got in (("alice", [got_a1, got_a2]), ("bob", [got_b1, got_b2])):
        seen = [(m.seq, m.sender, m.message) for m in got]
        expect(seen == [(1, "alice", "hi bob"), (2, "bob", "hi alice")], f"{who} got {seen}")
        expect(all(abs(m.timestamp - time.time()) < 60 for m in got), f"{who}: timestamps")
    for call in (a, b):
        await call.done_writing()
        expect(await call.code() == grpc.StatusCode.OK, f"chat ended with {await call.code()}")
    log = (data_dir / "chat" / "selftest.log").read_text().splitlines()
    expect(len(log) == 2, f"room log has {len(log)} lines")


async def check_chat_slow_member(channel, data_dir):
    """A member that stops reading is dropped with RESOURCE_EXHAUSTED."""
    stub = chat_pb2_grpc.ChatServiceStub(channel)
    room = (("chat-room", "slow"),)
    slow, fast = stub.Chat(metadata=room), stub.Chat(metadata=room)
    await slow.initial_metadata()
    await fast.initial_metadata()
    text = "x" * 16 * 1024
    # Far more than 1024 messages plus what the transports buffer (~80 MB).
    # `slow` reads nothing; `fast` reads its own echoes and keeps at most 256
    # of them outstanding, so that it is not itself a slow member.
    total = 5000
    window = asyncio.Semaphore(256)

    async def send():
        for _ in range(total):
            await window.acquire()
            await fast.write(chat_pb2.ChatMessage(sender="fast", message=text))
        await fast.done_writing()

    sender = asyncio.create_task(send())
    received = 0
    try:
        async for _ in fast:
            received += 1
            window.release()
    finally:
        sender.cancel()
    expect(received == total, f"fast member got {received} of {total}")
    # Now drain the slow member: what was buffered, then the status.
    with contextlib.suppress(grpc.aio.AioRpcError):
        async for _ in slow:
            pass
    expect(await slow.code() == grpc.StatusCode.RESOURCE_EXHAUSTED,
           f"slow member ended with {(await slow.code()).name}")


CHECKS = [
    check_livefeed_then_snapshot,
    check_snapshot_not_found,
    check_livefeed_rejects,
    check_subscribe,
    check_cpu_alert,
    check_upload,
    check_upload_rejects,
    check_chat,
    check_chat_slow_member,
]


# ------------------------------------------------------------------- runner


def start_peer(cmd: list[str], data_dir: Path) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(
        [*cmd, "--port", "0", "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE, text=True,
    )
    line = proc.stdout.readline()  # the server prints it once serving
    match = re.fullmatch(r"listening on 127\.0\.0\.1:(\d+)\n", line)
    if not match:
        proc.kill()
        raise CheckFailed(f"unexpected first line {line!r}")
    return proc, int(match.group(1))


async def run_peer(name: str) -> list[tuple[str, str | None]]:
    """Returns (check, error or None) for each check against one peer."""
    results = []
    with tempfile.TemporaryDirectory(prefix=f"peer-{name}-") as tmp:
        data_dir = Path(tmp)
        try:
            proc, port = start_peer(PEERS[name], data_dir)
        except (OSError, CheckFailed) as err:
            return [("start", str(err))]
        results.append(("start", None))
        options = [("grpc.max_send_message_length", 4 * MiB),
                   ("grpc.max_receive_message_length", 4 * MiB)]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            for check in CHECKS:
                try:
                    await asyncio.wait_for(check(channel, data_dir), CHECK_TIMEOUT)
                    results.append((check.__name__, None))
                except Exception as err:  # noqa: BLE001  (report, then go on)
                    results.append((check.__name__, f"{type(err).__name__}: {err}"))
        # SIGTERM must stop the server cleanly, and it must have said nothing more.
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=10)
            rest = proc.stdout.read()
            error = None if code == 0 else f"exit code {code}"
            if error is None and rest:
                error = f"extra stdout {rest!r}"
        except subprocess.TimeoutExpired:
            proc.kill()
            error = "still running 10 s after SIGTERM"
        results.append(("sigterm", error))
    return results


def main() -> int:
    names = sys.argv[1:] or list(PEERS)
    passed = failed = 0
    for name in names:
        for check, error in asyncio.run(run_peer(name)):
            check = check.removeprefix("check_")
            if error is None:
                passed += 1
                print(f"PASS {name}/{check}", flush=True)
            else:
                failed += 1
                print(f"FAIL {name}/{check}: {error}", flush=True)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
