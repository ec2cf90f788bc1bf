"""The counter sidecar in Python: each hit counted once across crashes.

It claims `counter.hit` and `counter.get`, like examples/counter in Rust. Each
hit stores the new count together with the event's seq and host instance
(`pim_sidecar.current_event()`) in one atomic step, a new file renamed over
the old one in its data directory; `applied()` returns that position, so after
a restart the module skips the events already counted instead of counting them
again. `counter.get` answers the sender with `counter.count` (the count).
"""

import os
import sys

import pim_sidecar


class Counter(pim_sidecar.Sidecar):
    name = "counter"
    payload_kinds = ("counter.hit", "counter.get")

    def start(self, host, data_dir, granted):
        self.host = host
        self.path = os.path.join(data_dir, "count")
        self.instance, self.seq, self.count = "", 0, 0
        try:
            with open(self.path) as f:
                instance, seq, count = f.read().split()
            self.instance, self.seq, self.count = instance, int(seq), int(count)
        except FileNotFoundError:
            pass

    def handle_payload(self, src, kind, body):
        if kind == "counter.get":
            reply = pim_sidecar.plugin_payload("counter.count", str(self.count))
            self.host.send_direct(src, reply)
            return
        seq, instance = pim_sidecar.current_event()
        tmp = self.path + ".new"
        with open(tmp, "w") as f:
            f.write(f"{instance} {seq} {self.count + 1}\n")
        os.rename(tmp, self.path)  # the count and its position, together
        self.instance, self.seq, self.count = instance, seq, self.count + 1

    def applied(self):
        return (self.instance, self.seq) if self.instance else None


if __name__ == "__main__":
    sys.exit(pim_sidecar.run(Counter()))
