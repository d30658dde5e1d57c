"""The mirror-actors command: dev certificates and a demo source, as a user runs them."""

from __future__ import annotations

import asyncio
import signal
import stat
import subprocess
import sys
from pathlib import Path

from mirror_actors.cli import main
from mirror_actors.protocol import Entries, Hello, HelloAck, Subscribe
from tests.rawclient import raw_mirror


def test_certs_writes_a_ca_source_and_mirror_certificates(tmp_path: Path, capsys: object) -> None:
    out = tmp_path / "certs"
    assert main(["certs", "--out", str(out), "--cluster", "us-east", "--cluster", "eu-west"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        ["ca.pem", "ca.key", "mirror.pem", "mirror.key"]
        + [f"source-{c}.{ext}" for c in ("us-east", "eu-west") for ext in ("pem", "key")]
    )
    for key in out.glob("*.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_certs_rejects_a_cluster_id_that_is_not_a_dns_name(tmp_path: Path) -> None:
    assert main(["certs", "--out", str(tmp_path), "--cluster", "not a name"]) == 2


def test_source_serves_demo_entries_until_interrupted(tmp_path: Path) -> None:
    main(["certs", "--out", str(tmp_path), "--cluster", "us-east"])
    command = [
        sys.executable, "-m", "mirror_actors.cli", "--log-level", "WARNING", "source",
        "--cluster-id", "us-east", "--database", "orders", "--port", "0", "--rate", "50",
        "--cert", str(tmp_path / "source-us-east.pem"), "--key", str(tmp_path / "source-us-east.key"),
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        banner = process.stdout.readline()
        port = int(banner.rsplit(":", 1)[1])

        async def follow() -> Entries:
            async with raw_mirror(port, "us-east", str(tmp_path / "ca.pem")) as client:
                client.send(0, Hello("us-east", "orders"), end=True)
                ack = await client.recv(0)
                assert isinstance(ack, HelloAck) and ack.accepted
                stream = client.open_stream()
                client.send(stream, Subscribe(1))
                frame = await client.recv(stream)
                assert isinstance(frame, Entries)
                return frame

        frame = asyncio.run(follow())
        assert frame.entries[0].data == b"demo entry 1"
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=10) == 0
    finally:
        process.kill()
        process.wait()
        if process.stdout is not None:
            process.stdout.close()
