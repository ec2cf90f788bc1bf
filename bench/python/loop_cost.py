"""The Python module's delivery loop against the floor client's counting
loop, in one process and without gRPC: the cost per event of what
examples/python/pim_sidecar.py does around a handler (order, duplicates,
the wire's limits, SIGTERM, `current_event`) and of the call of the
benchmark sidecar's handler, beside a loop that only reads each event's
fields. The same parsed batches (256 payloads of 64 B each) go through
both, in interleaved rounds; prints

    loop <ours min> <floor min> <ours median> <floor median>

in ns per event. The minimum is the figure least touched by the machine's
noise; the throughput phase (`pim-bench --only python`) shows what the
whole path costs.

    loop_cost.py [rounds]
"""

import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent / "examples" / "python"))

import pim_sidecar  # noqa: E402
from bench_sidecar import Bench  # noqa: E402
from floor_client import count  # noqa: E402

BATCHES = 200
EVENTS = 256


def batches():
    pb = pim_sidecar.session_pb
    out = []
    for b in range(BATCHES):
        msg = pb.EventsResponse()
        for seq in range(b * EVENTS + 1, (b + 1) * EVENTS + 1):
            ev = msg.events.add()
            ev.seq = seq
            ev.payload.src = bytes([2] * 16)
            ev.payload.kind = "bench.data"
            ev.payload.body = bytes(64)
        # Parsed from the wire, as the stream's messages are.
        out.append(pb.EventsResponse.FromString(msg.SerializeToString()))
    return out


def floor(parsed):
    seen = 0
    for msg in parsed:
        seen += count(msg.events)
    assert seen == BATCHES * EVENTS


def ours(parsed):
    sidecar = Bench("bench")
    sigterm = SimpleNamespace(requested=False, in_handler=False)
    delivery = pim_sidecar._Delivery(sidecar, sigterm, "bench-host", 0)
    for msg in parsed:
        delivery.batch(msg.events)
    assert sidecar.count == BATCHES * EVENTS and delivery.last == BATCHES * EVENTS


def main(rounds):
    parsed = batches()
    times = {ours: [], floor: []}
    for r in range(rounds):
        # Each goes first in every other round.
        for f in (ours, floor) if r % 2 == 0 else (floor, ours):
            t = time.perf_counter_ns()
            f(parsed)
            times[f].append((time.perf_counter_ns() - t) / (BATCHES * EVENTS))
    for t in times.values():
        t.sort()
    o, f = times[ours], times[floor]
    print("loop %d %d %d %d" % (o[0], f[0], o[len(o) // 2], f[len(f) // 2]))
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 21))
