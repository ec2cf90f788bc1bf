"""The raw grpcio floor for the Python sidecar's delivery throughput: reads
n events from a plain tonic Events stream (`pim-bench`'s floor server at
<socket>), only counting them (each one's seq, src, kind and body are read), then acks once so
the server sees the end.

    floor_client.py <socket> <n> [single-threaded | default]

`single-threaded` (the default) reads the stream on the calling thread, with
grpcio's SingleThreadedUnaryStream channel option, as the module does: the
floor. `default` reads it as a plain grpcio client does, each message
handed over from grpcio's own thread.

It uses the stubs examples/python/pim_sidecar.py generates and that
module's channel options, nothing else of it.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent / "examples" / "python"))

import grpc  # noqa: E402

import pim_sidecar  # noqa: E402


def count(events):
    """The floor's work per event: each event's fields are read (as any
    consumer that hands them to a handler must), nothing more."""
    seen = 0
    for ev in events:
        p = ev.payload
        if ev.seq and (p.src, p.kind, p.body):
            seen += 1
    return seen


MODES = {"single-threaded": [pim_sidecar.READ_ON_CALLING_THREAD], "default": []}


def main(socket_path, n, mode="single-threaded"):
    if mode not in MODES:
        print(f"floor client: mode {mode!r} is not one of {', '.join(MODES)}", file=sys.stderr)
        return 2
    channel = grpc.insecure_channel(
        f"unix:{socket_path}",
        options=[*pim_sidecar.CHANNEL_OPTIONS, *MODES[mode]],
    )
    session = pim_sidecar.session_grpc.PluginSessionStub(channel)
    seen = 0
    for batch in session.Events(pim_sidecar.session_pb.EventsRequest()):
        seen += count(batch.events)
        if seen >= n:
            break
    if seen < n:
        print(f"floor client: the stream ended after {seen} of {n}", file=sys.stderr)
        return 1
    session.Ack(pim_sidecar.session_pb.AckRequest(seq=seen), timeout=10)
    channel.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]), *sys.argv[3:4]))
