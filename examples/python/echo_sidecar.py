"""The echo sidecar in Python: the same behaviour as examples/echo in Rust.

It claims `echo.ping` and `echo.pong`. A ping from a peer is answered with a
pong routed back to it, greeting the peer by the friendly name the daemon's
directory gives (LookupName); a pong is logged.

The daemon spawns it (`command = ["python3", "examples/python/echo_sidecar.py"]`
with grpcio installed); run by hand with PIM_PLUGIN_SOCKET and
PIM_PLUGIN_TOKEN_FILE set.
"""

import sys

import pim_sidecar


class Echo(pim_sidecar.Sidecar):
    name = "echo"
    payload_kinds = ("echo.ping", "echo.pong")

    def start(self, host, data_dir, granted):
        self.host = host

    def handle_payload(self, src, kind, body):
        text = body.decode("utf-8", "replace")
        if kind == "echo.ping":
            name = self.host.lookup_name(src) or "stranger"
            pim_sidecar.log("INFO", f"ping from {name}: {text}")
            pong = pim_sidecar.plugin_payload("echo.pong", f"hello {name}, you said: {text}")
            routed = self.host.send_routed(src, pong)
            pim_sidecar.log("INFO", f"pong to {name}: routed={routed}")
        else:
            pim_sidecar.log("INFO", f"pong from {src.hex()}: {text}")

    def on_peer_forgotten(self, node):
        pim_sidecar.log("INFO", f"peer forgotten: {node.hex()}")


if __name__ == "__main__":
    sys.exit(pim_sidecar.run(Echo()))
