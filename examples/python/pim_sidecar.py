"""A pim-daemon sidecar in Python: the pim.plugin.v1 protocol over grpcio.

Subclass `Sidecar`, then `sys.exit(run(MySidecar()))`. `run` reads the
PIM_PLUGIN_* environment, connects to the plugin socket (with the
`localhost` authority), registers, delivers events in order to your
handlers (one that raises is logged and its event counts as handled;
`Retry` hands the payload back, bounded), acks them (from a thread of its
own, at most every 10 ms: the delivery loop never waits for an Ack; while
full batches keep coming, each quarter of the host's queue bounds or
within a second: `_AckPacing`), drops
duplicates after a reconnect, and returns 0 on Shutdown (78 when the host
refuses the registration, 1 when the host is gone for good). On SIGTERM it
finishes the event in hand, acks, calls `shutdown` and returns 0 (while it
waits for events, within 200 ms). `Host` wraps every host RPC; its server
streams (`events`, `watch`) are read on the thread that iterates them, so
iterate each on one thread.

The gRPC stubs are generated from ../../proto by grpcio-tools into `gen/`
next to this file on first import (or when a .proto is newer).
"""

import contextlib
import os
import pathlib
import signal
import sys
import threading
import time

import grpc

HERE = pathlib.Path(__file__).resolve().parent
PROTO_ROOT = HERE.parent.parent / "proto"
GEN = HERE / "gen"
PROTOCOL_VERSION = 1
EXIT_REFUSED = 78
NODE_ID_BYTES = 16
KEY_BYTES = 32
MAX_KIND_BYTES = 255
MAX_BODY_BYTES = 65535
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
# Least time between two Acks sent by `Host.ack_soon`: one Ack covers every
# event before it, and an Ack per batch cost a busy sidecar a third of its
# CPU (docs/BENCHMARKS.md). 10 ms bounds what a crash replays.
ACK_INTERVAL = 0.010
# The host's batches hold up to this many events (and up to 1 MiB of
# bodies): a batch this full means more events were ready, a smaller one
# that the stream has caught up. The host's MAX_BATCH_EVENTS; these
# constants are compared with the host's by tests/python.rs.
FULL_BATCH_EVENTS = 256
# While full batches keep coming (a burst), the delivery loop acks once the
# events or bytes it handled since its last Ack reach this fraction of the
# host's queue bounds (Register's `limits`), and otherwise within ACK_LATER:
# an Ack in flight during a burst costs the loop about a tenth of its
# throughput (docs/BENCHMARKS.md, "Acks during a burst").
ACK_SHARE_OF_QUEUE = 1 / 4
ACK_LATER = 1.0
# The channel's options: the host's HTTP/2 server refuses a socket path as
# :authority, which grpcio sends by default; the host's largest message.
CHANNEL_OPTIONS = (
    ("grpc.default_authority", "localhost"),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
)
# grpc.experimental.ChannelOptions.SingleThreadedUnaryStream: a server
# stream (Events, Watch) is read on the thread that iterates it, instead of
# each message being handed over from a thread of grpcio's own (two thread
# wake-ups per message; docs/BENCHMARKS.md). Such a stream is iterated by
# one thread, and a signal that comes while it waits is handled within
# 200 ms (grpcio wakes the waiting thread that often).
READ_ON_CALLING_THREAD = ("SingleThreadedUnaryStream", 1)


def _generate_stubs():
    protos = sorted((PROTO_ROOT / "pim" / "plugin" / "v1").glob("*.proto"))
    stamp = GEN / ".stamp"
    if not protos:
        if stamp.exists():
            return  # the proto tree is out of sight (a sandbox): the stubs stand
        raise RuntimeError(f"no .proto files under {PROTO_ROOT} and no generated stubs in {GEN}")
    newest = max(p.stat().st_mtime for p in protos)
    if stamp.exists() and stamp.stat().st_mtime >= newest:
        return
    from grpc_tools import protoc  # only needed to (re)generate

    # Generate aside, then move into place, so that sidecars starting at the
    # same moment never import half-written files.
    tmp = HERE / f".gen-{os.getpid()}"
    args = ["protoc", f"-I{PROTO_ROOT}", f"--python_out={tmp}", f"--grpc_python_out={tmp}"]
    tmp.mkdir()
    if protoc.main(args + [str(p) for p in protos]) != 0:
        raise RuntimeError(f"generating the gRPC stubs from {PROTO_ROOT} failed")
    (tmp / ".stamp").touch()
    if GEN.exists():
        try:
            GEN.rename(HERE / f".gen-old-{os.getpid()}")
        except OSError:
            pass  # another process is replacing it
    try:
        tmp.rename(GEN)
    except OSError:
        pass  # another process won the race with the same files
    import shutil

    for leftover in (tmp, HERE / f".gen-old-{os.getpid()}"):
        shutil.rmtree(leftover, ignore_errors=True)


_generate_stubs()
sys.path.insert(0, str(GEN))

from pim.plugin.v1 import control_sender_pb2 as control_pb  # noqa: E402
from pim.plugin.v1 import control_sender_pb2_grpc as control_grpc  # noqa: E402
from pim.plugin.v1 import identity_secrets_pb2 as identity_pb  # noqa: E402
from pim.plugin.v1 import identity_secrets_pb2_grpc as identity_grpc  # noqa: E402
from pim.plugin.v1 import peer_directory_pb2 as peers_pb  # noqa: E402
from pim.plugin.v1 import peer_directory_pb2_grpc as peers_grpc  # noqa: E402
from pim.plugin.v1 import session_pb2 as session_pb  # noqa: E402
from pim.plugin.v1 import session_pb2_grpc as session_grpc  # noqa: E402


def log(level, message):
    """One log line on stderr; the host forwards it at `level`. Once the host
    is gone its end of the pipe is closed: the line is dropped."""
    try:
        print(f"{level} {message}", file=sys.stderr, flush=True)
    except OSError:
        pass


class Refused(Exception):
    """The host's configuration refuses this sidecar: restarting cannot help."""


def plugin_payload(kind, body):
    """A ControlFrame carrying a PluginPayload."""
    if isinstance(body, str):
        body = body.encode()
    return control_pb.ControlFrame(plugin_payload=control_pb.PluginPayload(kind=kind, body=body))


class Host:
    """The daemon's ports, called over the plugin socket."""

    def __init__(self, socket_path, token):
        self.socket_path = socket_path
        self._metadata = [("authorization", f"Bearer {token}")]
        self.session_id = ""
        self.channel = grpc.insecure_channel(
            f"unix:{socket_path}",
            options=[*CHANNEL_OPTIONS, READ_ON_CALLING_THREAD],
        )
        self.session = session_grpc.PluginSessionStub(self.channel)
        # Events through a deserializer that notes each batch's size on the
        # wire (`batch_bytes`), for the delivery loop's acks. The stream is
        # read on the iterating thread, so the size noted is that of the
        # batch just returned.
        self._events = self.channel.unary_stream(
            "/pim.plugin.v1.PluginSession/Events",
            request_serializer=session_pb.EventsRequest.SerializeToString,
            response_deserializer=self._parse_batch,
        )
        self.batch_bytes = 0
        self.peers = peers_grpc.PeerDirectoryStub(self.channel)
        self.control = control_grpc.ControlSenderStub(self.channel)
        self.identity = identity_grpc.IdentitySecretsStub(self.channel)
        # `ack_soon`: the newest position asked for, the newest one sent,
        # the thread that sends them, and its pause between Acks (which
        # `close` cuts short); `ack_later`: the newest position that may
        # wait, and until when.
        self._ack_cond = threading.Condition()
        self._ack_wanted = 0
        self._ack_sent = 0
        self._ack_later = 0
        self._ack_later_at = 0.0
        self._ack_thread = None
        self._closed = threading.Event()
        self._pause = self._closed.wait

    def close(self):
        """Ends the ack thread and closes the channel."""
        self._closed.set()
        with self._ack_cond:
            self._ack_cond.notify()
        self.channel.close()

    def set_token(self, token):
        self._metadata = [("authorization", f"Bearer {token}")]

    def register(self, name, kinds, takeover=False):
        resp = self.session.Register(
            session_pb.RegisterRequest(
                protocol_version=PROTOCOL_VERSION,
                plugin_name=name,
                payload_kinds=list(kinds),
                sdk_name="pim_sidecar.py",
                sdk_version="0.1.0",
                takeover=takeover,
            ),
            metadata=self._metadata,
            timeout=10,
        )
        with self._ack_cond:
            self.session_id = resp.session_id
            # A new host instance numbers its events from 1.
            self._ack_wanted = self._ack_sent = self._ack_later = 0
        return resp

    def events(self):
        """The Events stream: iterate it on one thread (it is read on the
        thread that iterates it). While it runs, the call's `result()`,
        `exception()` and `traceback()` raise grpc.experimental.UsageError
        instead of waiting; `cancel()` may come from any thread."""
        return self._events(
            session_pb.EventsRequest(session_id=self.session_id), metadata=self._metadata
        )

    def _parse_batch(self, raw):
        self.batch_bytes = len(raw)
        return session_pb.EventsResponse.FromString(raw)

    def ack(self, seq):
        """Acks everything up to `seq` and waits for the answer: the acked position."""
        req = session_pb.AckRequest(session_id=self.session_id, seq=seq)
        return self.session.Ack(req, metadata=self._metadata, timeout=10).acked_seq

    def ack_soon(self, seq):
        """Acks everything up to `seq` without waiting. A thread of the
        module sends the newest position asked for, one Ack at a time and at
        most one per ACK_INTERVAL. An Ack that fails is logged; one that
        timed out is sent again (the last position must reach the host),
        any other is not (the event stream fails too, and the host replays
        after the last ack that arrived): the next position is sent."""
        with self._ack_cond:
            if seq <= self._ack_wanted:
                return
            self._ack_wanted = seq
            self._wake_ack_thread()

    def ack_later(self, seq):
        """Acks everything up to `seq` within ACK_LATER, or with the next
        `ack_soon`, whichever comes first; the ack thread is woken once per
        such wait, not for each call."""
        with self._ack_cond:
            if seq <= max(self._ack_wanted, self._ack_later):
                return
            waiting = self._ack_later > self._ack_sent
            self._ack_later = seq
            if not waiting:
                self._ack_later_at = time.monotonic() + ACK_LATER
                self._wake_ack_thread()

    def _wake_ack_thread(self):
        """Starts the ack thread or wakes it; called holding `_ack_cond`."""
        if self._ack_thread is None:
            self._ack_thread = threading.Thread(
                target=self._send_acks, name="pim-sidecar-ack", daemon=True
            )
            self._ack_thread.start()
        self._ack_cond.notify()

    def _send_acks(self):
        """The ack thread: until `close`."""
        while not self._closed.is_set():
            with self._ack_cond:
                while self._ack_wanted <= self._ack_sent and not self._closed.is_set():
                    if self._ack_later <= self._ack_sent:
                        self._ack_cond.wait()
                        continue
                    wait = self._ack_later_at - time.monotonic()
                    if wait <= 0:
                        break  # the position that could wait is due
                    self._ack_cond.wait(wait)
                if self._closed.is_set():
                    return
                seq = max(self._ack_wanted, self._ack_later)
                session_id, before = self.session_id, self._ack_sent
                self._ack_sent = seq
            try:
                req = session_pb.AckRequest(session_id=session_id, seq=seq)
                self.session.Ack(req, metadata=self._metadata, timeout=10)
            except ValueError:
                return  # grpcio: the channel is closed
            except Exception as e:  # noqa: BLE001 - the thread must go on
                code = e.code() if callable(getattr(e, "code", None)) else None
                with self._ack_cond:
                    stale = session_id != self.session_id
                    if code == grpc.StatusCode.DEADLINE_EXCEEDED and not stale:
                        self._ack_sent = min(self._ack_sent, before)  # again
                # Once closed, or UNAVAILABLE (the stream fails too), or
                # after a new Register (the old session's Ack is stale): no line.
                if not (self._closed.is_set() or stale or code == grpc.StatusCode.UNAVAILABLE):
                    what = f"{code.name}: {e.details()}" if code is not None else repr(e)
                    log("WARN", f"ack of seq {seq} failed: {what}")
            self._pause(ACK_INTERVAL)

    def lookup_x25519(self, node):
        """The peer's X25519 key (32 bytes), or None when unknown."""
        req = peers_pb.LookupX25519Request(session_id=self.session_id, node=node)
        resp = self.peers.LookupX25519(req, metadata=self._metadata, timeout=10)
        return resp.x25519 if resp.HasField("x25519") else None

    def lookup_name(self, node):
        """The peer's friendly name, or None when unknown."""
        req = peers_pb.LookupNameRequest(session_id=self.session_id, node=node)
        resp = self.peers.LookupName(req, metadata=self._metadata, timeout=10)
        return resp.name if resp.HasField("name") else None

    def watch(self):
        """Yields ("seen", node, x25519, name, via), ("forgotten", node) or
        ("lagged", n); iterate it on one thread, as `events`."""
        req = peers_pb.WatchRequest(session_id=self.session_id)
        for msg in self.peers.Watch(req, metadata=self._metadata):
            which = msg.WhichOneof("event")
            if which == "seen":
                s = msg.seen
                yield ("seen", s.node, s.x25519, s.name, s.via)
            elif which == "forgotten":
                yield ("forgotten", msg.forgotten.node)
            elif which == "lagged":
                yield ("lagged", msg.lagged.missed)

    def send_direct(self, peer, frame):
        req = control_pb.SendDirectRequest(session_id=self.session_id, peer=peer, frame=frame)
        self.control.SendDirect(req, metadata=self._metadata, timeout=10)

    def send_routed(self, dst, frame):
        """True when a route existed and the next-hop send was attempted."""
        req = control_pb.SendRoutedRequest(session_id=self.session_id, dst=dst, frame=frame)
        return self.control.SendRouted(req, metadata=self._metadata, timeout=10).attempted

    def signing_seed(self):
        """The node's signing seed (32 bytes); needs the SIGNING_SEED capability."""
        req = identity_pb.SigningSeedRequest(session_id=self.session_id)
        seed = self.identity.SigningSeed(req, metadata=self._metadata, timeout=10).seed
        if len(seed) != KEY_BYTES:
            raise ValueError(f"seed: expected {KEY_BYTES} bytes, got {len(seed)}")
        return seed


class Retry(Exception):
    """Raised by a handler: not handled, hand the event to me again (at most
    RETRIES more times, 50 ms doubling, then it is logged and counts as handled)."""


RETRIES = 5

class _Current:
    """The event a handler runs for (an attribute store per event, cheaper
    than a module global's)."""

    __slots__ = ("seq", "instance")

    def __init__(self):
        self.seq = None
        self.instance = None


_current = _Current()


def current_event():
    """The event a handler is running for, as (seq, host_instance); None outside a handler."""
    seq = _current.seq
    if seq is None:
        return None
    return (seq, _current.instance)


class Sidecar:
    """Override these; `name` and `payload_kinds` must match the host's config.

    `applied()` may return (host_instance, seq): the last event whose effect
    the plugin committed durably (with `current_event()` stored alongside its
    effect); after every Register the events up to it are skipped and acked.
    """

    name = ""
    payload_kinds = ()

    def start(self, host, data_dir, granted):
        pass

    def handle_payload(self, src, kind, body):
        raise NotImplementedError

    def on_peer_forgotten(self, node):
        pass

    def shutdown(self):
        pass

    def applied(self):
        return None


def _read_token_file(path):
    mode = os.stat(path).st_mode & 0o777
    if mode & 0o077:
        raise Refused(f"token file {path} has mode {mode:o}; it must be 0600 or stricter")
    with open(path) as f:
        return f.read().strip()


def _read_token_fd(value):
    """Reads the token from the inherited descriptor PIM_PLUGIN_TOKEN_FD, once, and closes it."""
    try:
        fd = int(value)
    except ValueError:
        raise Refused(f"PIM_PLUGIN_TOKEN_FD={value!r} is not a descriptor number") from None
    chunks = []
    try:
        while True:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            chunks.append(chunk)
    except OSError as e:
        raise Refused(f"reading the token from descriptor {fd} (PIM_PLUGIN_TOKEN_FD): {e}") from None
    finally:
        try:
            os.close(fd)
        except OSError:
            pass
    return b"".join(chunks).decode("ascii", "replace").strip()


def _options():
    socket_path = os.environ.get("PIM_PLUGIN_SOCKET")
    if not socket_path:
        raise Refused("PIM_PLUGIN_SOCKET is not set: this program is a pim-daemon sidecar")
    version = os.environ.get("PIM_PLUGIN_PROTOCOL_VERSION", str(PROTOCOL_VERSION))
    if version != str(PROTOCOL_VERSION):
        raise Refused(f"the host speaks protocol {version}, this module speaks {PROTOCOL_VERSION}")
    token_fd = os.environ.pop("PIM_PLUGIN_TOKEN_FD", None)  # children must not inherit it
    token = os.environ.pop("PIM_PLUGIN_TOKEN", None)
    token_file = None
    if token_fd is not None:
        token = _read_token_fd(token_fd)
    elif token is None:
        token_file = os.environ.get("PIM_PLUGIN_TOKEN_FILE")
        if not token_file:
            raise Refused("none of PIM_PLUGIN_TOKEN_FD, PIM_PLUGIN_TOKEN and PIM_PLUGIN_TOKEN_FILE is set")
        token = _read_token_file(token_file)
    spawned = token_file is None
    return socket_path, token, token_file, (5.0 if spawned else None)


def _takeover_from_env():
    """PIM_PLUGIN_TAKEOVER=1: the first Register takes the session from a live client."""
    value = os.environ.get("PIM_PLUGIN_TAKEOVER", "")
    if value in ("", "0", "false"):
        return False
    if value in ("1", "true"):
        return True
    raise Refused(f"PIM_PLUGIN_TAKEOVER={value!r}: expected 1, true, 0 or false")


def _superseded(e):
    """Whether an RPC error says another client took this session over."""
    if e.code() != grpc.StatusCode.ABORTED:
        return False
    trailers = e.trailing_metadata() or ()
    return any(k == "pim-session-end" and v == "superseded" for k, v in trailers)


def _register(host, sidecar, token_file, give_up_after, takeover=False):
    started = time.monotonic()
    delay = 0.02
    waiting = False
    while True:
        if token_file:
            try:
                host.set_token(_read_token_file(token_file))
            except OSError:
                pass
        try:
            return host.register(sidecar.name, sidecar.payload_kinds, takeover)
        except grpc.RpcError as e:
            if e.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT):
                raise Refused(e.details()) from None
            if e.code() == grpc.StatusCode.ALREADY_EXISTS:
                # Another client holds the session: wait, however long, for it to end.
                if not waiting:
                    log("INFO", f"another client holds this plugin's session; waiting for it to end ({e.details()})")
                    waiting = True
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
                started = time.monotonic()
                continue
            if give_up_after is not None and time.monotonic() - started > give_up_after:
                raise RuntimeError(f"the host is gone: {e.code().name}: {e.details()}") from None
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


def _check_payload(seq, src, kind, body):
    """Raises ValueError, naming the field, for a payload the wire forbids."""
    if len(src) != NODE_ID_BYTES:
        raise ValueError(f"event {seq}: payload.src is {len(src)} bytes, not 16")
    if not 1 <= len(kind) <= MAX_KIND_BYTES or not kind.isascii():
        raise ValueError(f"event {seq}: payload.kind breaks 1..=255 ASCII bytes")
    if len(body) > MAX_BODY_BYTES:
        raise ValueError(f"event {seq}: payload.body is over 65535 bytes")


class _Terminated(Exception):
    """SIGTERM arrived: stop after the event in hand."""


class _Sigterm:
    """SIGTERM handling: outside a handler it interrupts the wait for events;
    inside one it is noted and acted on once the handler returned."""

    def __init__(self):
        self.requested = False
        self.in_handler = False
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN:
            signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, _signum, _frame):
        self.requested = True
        if not self.in_handler:
            raise _Terminated()

    @contextlib.contextmanager
    def handling(self):
        """A handler runs: SIGTERM waits until it returned."""
        self.in_handler = True
        try:
            yield
        finally:
            self.in_handler = False

    def check(self):
        if self.requested:
            raise _Terminated()


def _terminated(host, sidecar, sigterm, last):
    sigterm.in_handler = True  # a second SIGTERM does not cut the clean-up short
    log("INFO", f"SIGTERM: acking what was handled (seq {last}) and shutting down")
    try:
        host.ack(last)
    except grpc.RpcError:
        pass  # delivered again to the next process
    sidecar.shutdown()
    host.close()
    return 0


class _Delivery:
    """Hands a stream's events to the sidecar in order, dropping duplicates:
    the per-event path, kept to a few attribute reads, one test and one
    call per payload (a kind is checked once, then compared with the last
    payload's or looked up in a set of up to 64; a kind beyond those is
    checked again whenever it follows another)."""

    def __init__(self, sidecar, sigterm, instance, last):
        self.sidecar = sidecar
        self.sigterm = sigterm
        self.instance = instance
        self.last = last
        self.duplicates = 0
        self._kinds_ok = set()

    def batch(self, events):
        """Delivers `events`; returns the seq of a Shutdown event (not yet
        handled: the caller shuts down) or None. SIGTERM in a batch is acted
        on after the event in hand (`_Terminated`); a payload the wire
        forbids raises ValueError naming the field."""
        current = _current
        sidecar = self.sidecar
        handle = sidecar.handle_payload
        sigterm = self.sigterm
        kinds_ok = self._kinds_ok
        node_id_bytes, max_body_bytes = NODE_ID_BYTES, MAX_BODY_BYTES
        last = self.last
        known = None  # the kind of this batch's last payload, checked already
        current.instance = self.instance
        sigterm.in_handler = True  # SIGTERM waits for the event in hand
        try:
            for ev in events:
                seq = ev.seq
                p = ev.payload
                kind = p.kind
                src = p.src
                body = p.body
                # One test on the common path: a new payload of the last
                # payload's kind (a string compare) or one seen before (a set
                # lookup), its fields within the wire's limits. Anything else
                # (a duplicate, another event, a new kind, a bad field) is
                # sorted out inside.
                if (
                    seq <= last
                    or (kind != known and kind not in kinds_ok)
                    or len(src) != node_id_bytes
                    or len(body) > max_body_bytes
                ):
                    if seq <= last:
                        self.duplicates += 1
                        continue
                    which = ev.WhichOneof("event")
                    if which == "shutdown":
                        return seq
                    if which != "payload":
                        if which == "peer_forgotten":
                            current.seq = seq
                            try:
                                sidecar.on_peer_forgotten(ev.peer_forgotten.node)
                            except Exception as e:  # noqa: BLE001 - the event still counts as handled
                                log("WARN", f"on_peer_forgotten failed on seq {seq}: {e}")
                        last = seq  # an event of a newer protocol: nothing to do
                        if sigterm.requested:
                            raise _Terminated()
                        continue
                    _check_payload(seq, src, kind, body)  # names the field
                    if len(kinds_ok) < 64:
                        kinds_ok.add(kind)  # a new kind, checked once
                known = kind
                current.seq = seq
                try:
                    handle(src, kind, body)
                except Retry:
                    retry = True
                except Exception as e:  # noqa: BLE001 - the event still counts as handled
                    retry = False
                    log("WARN", f"handle_payload failed on seq {seq}: {e}")
                else:
                    last = seq
                    if sigterm.requested:
                        raise _Terminated()
                    continue
                # A Retry is retried outside the exception's handler, so
                # that the handler called again does not see it as its
                # context.
                if retry:
                    _retry(sidecar, src, kind, body, seq)
                last = seq
                if sigterm.requested:
                    raise _Terminated()
            return None
        finally:
            # The flag last: a SIGTERM from here on finds all else done.
            self.last = last
            current.seq = None
            sigterm.in_handler = False


class _AckPacing:
    """When the delivery loop acks. After a batch smaller than a full one
    (the stream caught up), or once the events or bytes handled since the
    last such Ack reach ACK_SHARE_OF_QUEUE of the host's queue bounds: at
    once, through `Host.ack_soon` (which sends at most one Ack per
    ACK_INTERVAL). Otherwise, while full batches keep coming: within
    ACK_LATER, through `Host.ack_later`. Bounds of 0 (not announced) make
    every batch ack at once."""

    def __init__(self, host, limits):
        self.host = host
        self.max_events = max(FULL_BATCH_EVENTS, int(limits.max_queued_events * ACK_SHARE_OF_QUEUE))
        self.max_bytes = max(1, int(limits.max_queued_bytes * ACK_SHARE_OF_QUEUE))
        self.events = 0
        self.bytes = 0

    def after(self, events, size, last):
        """After a batch of `events` events, `size` bytes on the wire,
        handled up to `last`."""
        self.events += events
        self.bytes += size
        if events < FULL_BATCH_EVENTS or self.events >= self.max_events or self.bytes >= self.max_bytes:
            self.events = self.bytes = 0
            self.host.ack_soon(last)
        else:
            self.host.ack_later(last)


def _retry(sidecar, src, kind, body, seq):
    """After a Retry: at most RETRIES more calls, 50 ms doubling between them."""
    for attempt in range(RETRIES):
        time.sleep(0.05 * 2**attempt)
        try:
            sidecar.handle_payload(src, kind, body)
            return
        except Retry as e:
            if attempt == RETRIES - 1:
                log("ERROR", f"handle_payload asked for a retry {RETRIES} times on seq {seq}; the event counts as handled: {e}")
        except Exception as e:  # noqa: BLE001 - the event still counts as handled
            log("WARN", f"handle_payload failed on seq {seq}: {e}")
            return


def _skip_applied(host, sidecar, instance, last):
    """Skips, and acks, what the plugin has applied durably in this host instance."""
    applied = sidecar.applied()
    if not applied:
        return last
    applied_instance, applied_seq = applied
    if applied_instance != instance or applied_seq <= last:
        return last
    log("INFO", f"skipping the events the plugin applied already (up to seq {applied_seq})")
    try:
        host.ack(applied_seq)
    except grpc.RpcError:
        pass  # acked with the next batch
    return applied_seq


def run(sidecar):
    """Runs `sidecar` until Shutdown or SIGTERM; returns the process exit code."""
    sigterm = _Sigterm()
    try:
        socket_path, token, token_file, give_up_after = _options()
        host = Host(socket_path, token)
        # Only the first Register may take over, never one after a lost stream.
        resp = _register(host, sidecar, token_file, give_up_after, _takeover_from_env())
        log("INFO", f"registered {sidecar.name} acked={resp.acked_seq}")
        with sigterm.handling():
            sidecar.start(host, resp.data_dir, list(resp.granted))
    except Refused as e:
        log("ERROR", f"refused by the host's configuration: {e}")
        return EXIT_REFUSED
    except _Terminated:
        return 0
    except Exception as e:  # noqa: BLE001 - report and exit non-zero
        log("ERROR", f"start failed: {e}")
        return 1
    delivery = _Delivery(sidecar, sigterm, resp.host_instance, resp.acked_seq)
    acks = _AckPacing(host, resp.limits)
    with sigterm.handling():
        delivery.last = _skip_applied(host, sidecar, delivery.instance, delivery.last)
    if sigterm.requested:
        return _terminated(host, sidecar, sigterm, delivery.last)
    while True:
        try:
            for batch in host.events():
                events = batch.events
                shutdown = delivery.batch(events)
                sigterm.check()  # one that came as the batch ended
                if shutdown is not None:
                    sigterm.in_handler = True  # from here on a SIGTERM changes nothing
                    sidecar.shutdown()
                    try:
                        host.ack(shutdown)
                    except grpc.RpcError:
                        pass  # the daemon may be gone already; the clean-up is done
                    log("INFO", f"shut down by the host, duplicates={delivery.duplicates}")
                    host.close()
                    return 0
                acks.after(len(events), host.batch_bytes, delivery.last)
            log("WARN", "the host closed the event stream")
        except _Terminated:
            return _terminated(host, sidecar, sigterm, delivery.last)
        except grpc.RpcError as e:
            if _superseded(e):
                log("WARN", "another client took this plugin's session over: stopping")
                sigterm.in_handler = True  # from here on a SIGTERM changes nothing
                sidecar.shutdown()
                host.close()
                return 0
            log("WARN", f"event stream lost: {e.code().name}")
        try:
            resp = _register(host, sidecar, token_file, give_up_after)
        except _Terminated:
            return _terminated(host, sidecar, sigterm, delivery.last)
        except Refused as e:
            log("ERROR", f"refused by the host's configuration: {e}")
            return EXIT_REFUSED
        except RuntimeError as e:
            log("ERROR", str(e))
            return 1
        if resp.host_instance != delivery.instance:
            log("INFO", "the host restarted: its sequence numbers start over")
            delivery.instance, delivery.last = resp.host_instance, resp.acked_seq
        acks = _AckPacing(host, resp.limits)
        with sigterm.handling():
            delivery.last = _skip_applied(host, sidecar, delivery.instance, delivery.last)
        if sigterm.requested:
            return _terminated(host, sidecar, sigterm, delivery.last)
        log("INFO", f"registered again acked={resp.acked_seq}")
