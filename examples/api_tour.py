"""A tour of the link API: a source, a link driven by hand, then a supervised one.

Run it: .venv/bin/python examples/api_tour.py
"""

from __future__ import annotations

import random
import tempfile
import time

from mirror_actors import (
    ClusterIdMismatch,
    Connect,
    Disconnect,
    Entries,
    GetStatus,
    LinkConfig,
    LinkState,
    OpenStream,
    SourceLink,
    SourceServer,
    Subscribe,
    generate_dev_pki,
    link_strategy,
)
from supervisors import ChildSpec, GetChild, Supervisor, WhichChildren

workdir = tempfile.mkdtemp(prefix="api-tour-")
pki = generate_dev_pki(workdir, ["us-east"])
pair = pki.source("us-east")

with SourceServer("us-east", ("orders",), certfile=str(pair.cert), keyfile=str(pair.key)) as source:
    for i in range(1, 6):
        source.append("orders", f"order {i}".encode())
    config = LinkConfig("us-east", "orders", ca_file=str(pki.ca.cert), port=source.port)

    # 1. A standalone link does nothing until told to connect.
    link = SourceLink.start(config)
    ack = link.ask(Connect(last_applied_lsn=0))
    print(f"connected: the source {ack.source_cluster_id!r} accepted the handshake")

    # 2. Streams are thread-safe handles: subscribe, read, acknowledge.
    with link.ask(OpenStream()) as stream:
        stream.send(Subscribe(from_lsn=1))
        frame = stream.recv(timeout=5)
        assert isinstance(frame, Entries)
        for entry in frame.entries:
            print(f"  LSN {entry.lsn}: {entry.data.decode()}")
        stream.ack(frame.last_lsn)

    status = link.ask(GetStatus())
    print(
        f"status: {status.state.value}, {status.bytes_in} bytes in, applied LSN {status.last_applied_lsn}"
    )
    link.ask(Disconnect())
    link.stop()

    # 3. A configuration error is typed, hard, and says what to fix.
    wrong = SourceLink.start(
        LinkConfig(
            "eu-west", "orders", ca_file=str(pki.ca.cert), port=source.port, server_name="us-east"
        )
    )
    try:
        wrong.ask(Connect())
    except ClusterIdMismatch as error:
        print(f"hard error (never retried): {error}")
    finally:
        wrong.stop()

    # 4. Supervised, a link connects by itself and comes back after failures.
    supervisor = Supervisor.start(
        strategy=link_strategy(base=0.2, random=random.Random(1)),
        children=[
            ChildSpec("us-east/orders", lambda parent: SourceLink.start(config, parent=parent))
        ],
        on_escalation=lambda event: print(f"escalated: {event.root_cause}"),
    )
    try:
        supervised = supervisor.ask(GetChild("us-east/orders"))
        deadline = time.monotonic() + 5
        while (
            supervised.ask(GetStatus()).state is not LinkState.CONNECTED
            and time.monotonic() < deadline
        ):
            time.sleep(0.01)
        for child in supervisor.ask(WhichChildren()):
            print(f"supervised child {child.id}: {child.state.value}, {child.restarts} restarts")
    finally:
        supervisor.stop()
print("tour done")
