#!/usr/bin/env python3
"""Cost of opening a stream on an h2 link while many others stay open (in memory, one process).

h2 itself counts open streams by walking all of them on every new stream (quadratic with the
10,000 streams a link must carry); tele.rpc.h2link counts them in amortised O(1). For each
number of idle streams held open, opens and resets 2,000 more streams one after another and
prints the CPU per open; a table, then a JSON line.

Run:  .venv/bin/python bench/h2_streams.py [--held 0,1000,10000]
"""

from __future__ import annotations

import argparse
import json
import time

import trio

from tele.rpc.h2link import TUNNEL_STREAMS, LinkSettings
from tele.testing.streams import open_link_pair

HEADERS = [(":method", "CONNECT"), (":authority", "bench:1")]


async def measure(held: int, count: int) -> float:
    """CPU µs per open (+ reset) with `held` idle streams open on the link."""
    async with trio.open_nursery() as nursery:
        tunnel = LinkSettings(max_concurrent_streams=TUNNEL_STREAMS)  # as the manager's
        link, incoming = await open_link_pair(nursery, settings=tunnel)
        idle = [await link.open_stream(HEADERS) for _ in range(held)]
        for _ in range(held):
            await incoming.receive()
        started = time.process_time()
        for _ in range(count):
            stream = await link.open_stream(HEADERS)
            await incoming.receive()
            stream.reset()
        cpu = time.process_time() - started
        for stream in idle:
            stream.reset()
        nursery.cancel_scope.cancel()
    return cpu / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--held", default="0,1000,10000", help="idle streams held open")
    parser.add_argument("--count", type=int, default=2000, help="streams opened per case")
    args = parser.parse_args()
    rows = []
    print(f"{'held open':>10} {'µs CPU/open':>12}")
    for held in (int(v) for v in args.held.split(",")):
        us = trio.run(measure, held, args.count)
        rows.append({"held": held, "cpu_us_per_open": us})
        print(f"{held:>10} {us:>12.0f}")
    print(json.dumps({"bench": "h2_streams", "count": args.count, "rows": rows}))


if __name__ == "__main__":
    from tele import _patches

    _patches.apply()  # as in the processes measured (the daemon, manager, agent)
    main()
