"""The benchmark's Python sidecar, written with examples/python/pim_sidecar.py.

It claims `<name>.data` and `<name>.cmd` (`<name>` is PIM_PLUGIN_NAME,
`bench` by default). Each `<name>.data` payload is only counted. A
`<name>.cmd` payload `rtt <floor socket> <n>` measures n LookupX25519 round
trips through the module, and n raw grpcio unary LookupX25519 calls to the
plain tonic server at <floor socket> (no session, no token, no checks) in
ten interleaved rounds, and answers `rtt <ours median> <ours p99> <raw
median> <raw p99>` (ns) with a `<name>.result` payload sent direct.
"""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent / "examples" / "python"))

import grpc  # noqa: E402

import pim_sidecar  # noqa: E402

NODE = bytes([9] * 16)
ROUNDS = 10


def median_p99(samples):
    samples.sort()
    at = lambda q: samples[round((len(samples) - 1) * q)]  # noqa: E731
    return at(0.5), at(0.99)


class Bench(pim_sidecar.Sidecar):
    def __init__(self, name):
        self.name = name
        self.cmd_kind = f"{name}.cmd"
        self.payload_kinds = (f"{name}.data", self.cmd_kind)
        self.count = 0

    def start(self, host, data_dir, granted):
        self.host = host

    def round_trips(self, floor_socket, n):
        channel = grpc.insecure_channel(
            f"unix:{floor_socket}", options=[("grpc.default_authority", "localhost")]
        )
        raw = pim_sidecar.peers_grpc.PeerDirectoryStub(channel)
        request = pim_sidecar.peers_pb.LookupX25519Request(node=NODE)
        ours, floor = [], []
        per_round = max(1, n // ROUNDS)
        for _ in range(ROUNDS):
            for _ in range(per_round):
                t = time.monotonic_ns()
                self.host.lookup_x25519(NODE)
                ours.append(time.monotonic_ns() - t)
            for _ in range(per_round):
                t = time.monotonic_ns()
                raw.LookupX25519(request, timeout=10)
                floor.append(time.monotonic_ns() - t)
        channel.close()
        return "rtt %d %d %d %d" % (*median_p99(ours), *median_p99(floor))

    def handle_payload(self, src, kind, body):
        if kind != self.cmd_kind:
            self.count += 1
            return
        words = body.decode("utf-8", "replace").split(" ")
        if words[0] == "rtt" and len(words) == 3:
            reply = self.round_trips(words[1], int(words[2]))
        else:
            reply = f"unknown command {words[0]!r}"
        self.host.send_direct(src, pim_sidecar.plugin_payload(f"{self.name}.result", reply))


if __name__ == "__main__":
    sys.exit(pim_sidecar.run(Bench(os.environ.get("PIM_PLUGIN_NAME", "bench"))))
