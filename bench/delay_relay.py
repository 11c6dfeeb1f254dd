#!/usr/bin/env python3
"""A delay relay for the benches' round-trip rows: it relays a byte stream both ways and releases
each chunk RTT/2 after it arrived, reading on without pause, so it adds latency without limiting
bandwidth (this kernel has no netem). At most 64 MiB wait in each direction.

One thread per direction reads, one writes; the writer sleeps with `time.sleep` to 2 ms before
each chunk's due time and spins the rest (`SPIN`). A trio relay sleeping until each chunk's due
time was ~0.7 ms late per direction: epoll's timeout is whole milliseconds, rounded up.
`measured_rtt` tells what a relay really adds, so rows can be judged against the round trip they
got.

    delay_relay.py fds RTT_MS FD_A FD_B            relay between two inherited sockets
    delay_relay.py tcp RTT_MS LISTEN_PORT HOST:PORT  accept on 127.0.0.1:LISTEN_PORT, relay each
                                                   connection to HOST:PORT (prints "ready")
"""

from __future__ import annotations

import queue
import socket
import statistics
import subprocess
import sys
import threading
import time

CHUNK = 1 << 18
QUEUED = 256  # chunks waiting per direction: at most 64 MiB
# An idle vCPU of this VM wakes from a short sleep up to ~1 ms late (a 21 us nanosleep measured
# 0.9 ms): a chunk released that late lands on the row as latency a network would not add, the
# more so for a protocol that writes twice in a row (the second chunk's short sleep). The writer
# sleeps to SPIN before the due time and spins the rest; with more than SPIN_QUEUED chunks
# waiting (a bulk transfer, where such lateness does not show) it only sleeps, so it never
# keeps a core busy for a whole transfer.
SPIN = 0.002
SPIN_QUEUED = 8


def pump(src: socket.socket, dst: socket.socket, delay: float) -> None:
    """Copy src to dst, each chunk `delay` seconds after it was read; EOF passes on."""
    chunks: queue.Queue[tuple[float, bytes] | None] = queue.Queue(QUEUED)

    def reader() -> None:
        try:
            while data := src.recv(CHUNK):
                chunks.put((time.monotonic() + delay, data))
        except OSError:
            pass
        chunks.put(None)

    def writer() -> None:
        broken = False
        while (item := chunks.get()) is not None:
            if broken:
                continue  # keep draining so the reader never blocks on a full queue
            due, data = item
            wait = due - time.monotonic()
            if chunks.qsize() > SPIN_QUEUED:  # a bulk transfer: its lateness does not show
                if wait > 0:
                    time.sleep(wait)
            else:
                if wait > SPIN:
                    time.sleep(wait - SPIN)
                while time.monotonic() < due:  # the last SPIN seconds: a sleep may end late
                    pass
            try:
                dst.sendall(data)
            except OSError:
                broken = True
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    threads = [threading.Thread(target=reader, daemon=True), threading.Thread(target=writer)]
    for thread in threads:
        thread.start()
    threads[1].join()


def relay(a: socket.socket, b: socket.socket, rtt_ms: float) -> None:
    """Relay a <-> b with `rtt_ms` added to the round trip; returns when both ends are done."""
    delay = rtt_ms / 2000
    for sock in (a, b):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    other = threading.Thread(target=pump, args=(b, a, delay))
    other.start()
    pump(a, b, delay)
    other.join()
    a.close()
    b.close()


def start_fds(rtt_ms: float, pass_fds: tuple[int, int]) -> subprocess.Popen[bytes]:
    """A relay process between two sockets this process hands over (it may close its copies)."""
    return subprocess.Popen(
        [sys.executable, __file__, "fds", str(rtt_ms), *map(str, pass_fds)], pass_fds=pass_fds
    )


def measured_rtt(rtt_ms: float, rounds: int = 40) -> float:
    """The round trip (ms, p50) that a relay of `rtt_ms` really adds: 64-byte pings through one."""
    near, relay_a = socket.socketpair()
    relay_b, far = socket.socketpair()
    proc = start_fds(rtt_ms, (relay_a.fileno(), relay_b.fileno()))
    relay_a.close()
    relay_b.close()

    def echo() -> None:
        while data := far.recv(65536):
            far.sendall(data)
        far.close()

    thread = threading.Thread(target=echo)
    thread.start()
    samples = []
    try:
        for _ in range(rounds):
            started = time.perf_counter()
            near.sendall(b"p" * 64)
            got = 0
            while got < 64:
                got += len(near.recv(64 - got))
            samples.append((time.perf_counter() - started) * 1e3)
    finally:
        near.close()
        thread.join(10)
        proc.wait(10)
    return statistics.median(samples)


def main() -> None:
    mode, rtt_ms = sys.argv[1], float(sys.argv[2])
    if mode == "fds":
        a, b = (socket.socket(fileno=int(fd)) for fd in sys.argv[3:5])
        relay(a, b, rtt_ms)
        return
    listen_port = int(sys.argv[3])
    host, _, port = sys.argv[4].rpartition(":")
    server = socket.create_server(("127.0.0.1", listen_port), backlog=64)
    print("ready", flush=True)
    while True:
        client, _ = server.accept()
        target = socket.create_connection((host, int(port)), timeout=10)
        target.settimeout(None)
        threading.Thread(target=relay, args=(client, target, rtt_ms), daemon=True).start()


if __name__ == "__main__":
    main()
