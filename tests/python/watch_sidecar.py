"""A test sidecar for tests/python.rs: follows the host's Watch stream with
`Host.watch()` on a thread of its own while the main thread delivers
events, and reports each peer event back as a payload sent direct to that
peer: `watch.seen` (its friendly name as the body) or `watch.forgotten`. A
`watch.ping` payload is answered with a `watch.pong` to its sender.
"""

import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent / "examples" / "python"))

import pim_sidecar  # noqa: E402


class Watcher(pim_sidecar.Sidecar):
    name = "watch"
    payload_kinds = ("watch.ping",)

    def start(self, host, data_dir, granted):
        self.host = host
        threading.Thread(target=self.follow, name="watch", daemon=True).start()

    def follow(self):
        for event in self.host.watch():
            if event[0] == "seen":
                _, node, _x25519, name, _via = event
                self.host.send_direct(node, pim_sidecar.plugin_payload("watch.seen", name))
            elif event[0] == "forgotten":
                self.host.send_direct(event[1], pim_sidecar.plugin_payload("watch.forgotten", ""))

    def handle_payload(self, src, kind, body):
        self.host.send_direct(src, pim_sidecar.plugin_payload("watch.pong", body))


if __name__ == "__main__":
    sys.exit(pim_sidecar.run(Watcher()))
