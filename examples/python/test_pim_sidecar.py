"""Unit tests of the module's parts that need no host: the delivery loop
(order, duplicates, the retry of a handler that raises Retry, a failing
handler that does not stop delivery, SIGTERM within a batch, the wire's
limits) and the ack thread. Run by tests/python.rs (`python -m unittest`)."""

import sys
import threading
import unittest
from types import SimpleNamespace
from unittest import mock

import grpc

import pim_sidecar

SRC = bytes(16)


class Flaky(pim_sidecar.Sidecar):
    """Raises Retry `retries` times, then takes the payload."""

    name = "flaky"
    payload_kinds = ("flaky.data",)

    def __init__(self, retries, error=None):
        self.retries = retries
        self.error = error
        self.calls = []

    def handle_payload(self, src, kind, body):
        self.calls.append((src, kind, body, pim_sidecar.current_event()))
        if len(self.calls) <= self.retries:
            raise pim_sidecar.Retry("not yet")
        if self.error:
            raise self.error


def payload(seq, kind="flaky.data", body=b"x", src=SRC):
    pb = pim_sidecar.session_pb
    return pb.Event(seq=seq, payload=pb.Payload(src=src, kind=kind, body=body))


def delivery(sidecar, last=0):
    """A `_Delivery` with a SIGTERM flag the test sets (no signal handler)."""
    sigterm = SimpleNamespace(requested=False, in_handler=False)
    return pim_sidecar._Delivery(sidecar, sigterm, "host-1", last)


class DeliveryTests(unittest.TestCase):
    def setUp(self):
        self.sleeps = []
        patcher = mock.patch.object(pim_sidecar.time, "sleep", self.sleeps.append)
        patcher.start()
        self.addCleanup(patcher.stop)
        logs = mock.patch.object(pim_sidecar, "log")
        self.log = logs.start()
        self.addCleanup(logs.stop)

    def test_a_handler_that_takes_the_payload_is_called_once_without_sleeping(self):
        s = Flaky(0)
        d = delivery(s)
        self.assertIsNone(d.batch([payload(7)]))
        self.assertEqual(s.calls, [(SRC, "flaky.data", b"x", (7, "host-1"))])
        self.assertEqual(self.sleeps, [])
        self.assertEqual(d.last, 7)
        self.assertIsNone(pim_sidecar.current_event())
        self.assertFalse(d.sigterm.in_handler)

    def test_retry_calls_again_after_50_ms_doubling(self):
        s = Flaky(2)
        delivery(s).batch([payload(7)])
        self.assertEqual(len(s.calls), 3)
        self.assertEqual(self.sleeps, [0.05, 0.1])
        self.assertTrue(all(c[3] == (7, "host-1") for c in s.calls))
        self.log.assert_not_called()

    def test_retry_gives_up_after_retries_more_calls_and_logs_an_error(self):
        s = Flaky(100)
        d = delivery(s)
        d.batch([payload(9)])
        self.assertEqual(len(s.calls), pim_sidecar.RETRIES + 1)
        self.assertEqual(self.sleeps, [0.05 * 2**i for i in range(pim_sidecar.RETRIES)])
        level, message = self.log.call_args.args
        self.assertEqual(level, "ERROR")
        self.assertIn("seq 9", message)
        self.assertEqual(d.last, 9, "it counts as handled")

    def test_a_failure_after_a_retry_is_logged_and_not_retried(self):
        s = Flaky(1, error=RuntimeError("broken"))
        delivery(s).batch([payload(3)])
        self.assertEqual(len(s.calls), 2)
        self.assertEqual(self.log.call_args.args[0], "WARN")
        self.assertIn("broken", self.log.call_args.args[1])

    def test_a_failing_handler_is_logged_and_the_next_event_is_delivered(self):
        s = Flaky(0, error=ValueError("bad body"))
        d = delivery(s)
        d.batch([payload(4), payload(5, body=b"y")])
        self.assertEqual([c[2:] for c in s.calls], [(b"x", (4, "host-1")), (b"y", (5, "host-1"))])
        self.assertEqual(self.sleeps, [])
        self.assertEqual(self.log.call_args.args[0], "WARN")
        self.assertEqual(d.last, 5)
        self.assertIsNone(pim_sidecar.current_event())

    def test_a_handler_retried_does_not_see_the_first_retry_as_its_context(self):
        seen = []

        class Look(Flaky):
            def handle_payload(self, src, kind, body):
                seen.append(sys.exc_info()[0])
                super().handle_payload(src, kind, body)

        delivery(Look(1)).batch([payload(7)])
        self.assertEqual(seen, [None, None])

    def test_duplicates_are_counted_and_not_delivered(self):
        s = Flaky(0)
        d = delivery(s, last=5)
        d.batch([payload(4), payload(5), payload(6)])
        d.batch([payload(6)])
        self.assertEqual([c[3][0] for c in s.calls], [6])
        self.assertEqual(d.duplicates, 3)
        self.assertEqual(d.last, 6)

    def test_peer_forgotten_and_shutdown(self):
        pb = pim_sidecar.session_pb
        forgotten = []

        class Watcher(Flaky):
            def on_peer_forgotten(self, node):
                forgotten.append((node, pim_sidecar.current_event()))

        s = Watcher(0)
        d = delivery(s)
        node = bytes(range(16))
        events = [
            payload(1),
            pb.Event(seq=2, peer_forgotten=pb.PeerForgotten(node=node)),
            pb.Event(seq=3, shutdown=pb.Shutdown()),
            payload(4),
        ]
        self.assertEqual(d.batch(events), 3, "a Shutdown is handed back to run()")
        self.assertEqual(forgotten, [(node, (2, "host-1"))])
        self.assertEqual(len(s.calls), 1, "nothing after the Shutdown")
        self.assertEqual(d.last, 2)

    def test_a_failing_on_peer_forgotten_is_logged_and_counts_as_handled(self):
        pb = pim_sidecar.session_pb

        class Broken(Flaky):
            def on_peer_forgotten(self, node):
                raise RuntimeError("no such peer here")

        s = Broken(0)
        d = delivery(s)
        d.batch([pb.Event(seq=1, peer_forgotten=pb.PeerForgotten(node=bytes(16))), payload(2)])
        self.assertEqual(self.log.call_args.args[0], "WARN")
        self.assertIn("on_peer_forgotten failed on seq 1", self.log.call_args.args[1])
        self.assertEqual(len(s.calls), 1, "the next event is delivered")
        self.assertEqual(d.last, 2)
        self.assertIsNone(pim_sidecar.current_event())

    def test_sigterm_in_a_batch_stops_after_the_event_in_hand(self):
        d = None

        class Stopped(Flaky):
            def handle_payload(self, src, kind, body):
                super().handle_payload(src, kind, body)
                self.in_handler = d.sigterm.in_handler
                d.sigterm.requested = True  # as the signal handler sets it

        s = Stopped(0)
        d = delivery(s)
        with self.assertRaises(pim_sidecar._Terminated):
            d.batch([payload(1), payload(2)])
        self.assertTrue(s.in_handler, "SIGTERM waits while a handler runs")
        self.assertEqual(len(s.calls), 1)
        self.assertEqual(d.last, 1, "the event in hand counts as handled, the next does not")
        self.assertFalse(d.sigterm.in_handler)
        self.assertIsNone(pim_sidecar.current_event())


class CheckPayloadTests(unittest.TestCase):
    CASES = [
        ((bytes(15), "a.b", b""), "payload.src"),
        ((SRC, "", b""), "payload.kind"),
        ((SRC, "k" * 256, b""), "payload.kind"),
        ((SRC, "ké", b""), "payload.kind"),
        ((SRC, "a.b", bytes(65536)), "payload.body"),
    ]

    def test_each_wire_limit_names_its_field(self):
        for (src, kind, body), field in self.CASES:
            with self.assertRaisesRegex(ValueError, field):
                pim_sidecar._check_payload(5, src, kind, body)

    def test_a_payload_at_the_limits_passes(self):
        pim_sidecar._check_payload(5, SRC, "k" * 255, bytes(65535))
        s = Flaky(0)
        delivery(s).batch([payload(1, kind="k" * 255, body=bytes(65535))])
        self.assertEqual(len(s.calls), 1)

    def test_delivery_refuses_what_the_wire_forbids_even_for_a_kind_seen_before(self):
        for (src, kind, body), field in self.CASES:
            s = Flaky(0)
            d = delivery(s)
            ok = payload(1, kind=kind if kind.isascii() and 0 < len(kind) < 256 else "a.b")
            bad = payload(2, kind=kind, body=body, src=src)
            with self.assertRaisesRegex(ValueError, f"event 2: {field}"):
                d.batch([ok, bad])
            self.assertEqual(len(s.calls), 1, f"{field}: the bad payload reached the handler")
            self.assertEqual(d.last, 1)

    def test_every_kind_reaches_the_handler_as_sent_alternating_or_many(self):
        kinds = ["a.b", "c.d", "a.b", "a.b", "c.d"] + [f"k.{i}" for i in range(70)] + ["k.3"]
        s = Flaky(0)
        d = delivery(s)
        d.batch([payload(seq, kind=kind) for seq, kind in enumerate(kinds, 1)])
        self.assertEqual([c[1] for c in s.calls], kinds)
        self.assertEqual([c[3][0] for c in s.calls], list(range(1, len(kinds) + 1)))
        self.assertEqual(len(d._kinds_ok), 64)


class FakeAckCall:
    """An Ack the ack thread is waiting on, until the test answers it."""

    def __init__(self, seq):
        self.seq = seq
        self.error = None
        self.answered = threading.Event()

    def answer(self, error=None):
        self.error = error
        self.answered.set()


class FakeSession:
    """The PluginSession stub: records the Acks the ack thread sends (each
    waits for the test's answer) and answers Register."""

    def __init__(self):
        self.sent = []
        self.changed = threading.Condition()

    def Ack(self, req, metadata, timeout):  # noqa: N802 - the stub's name
        call = FakeAckCall(req.seq)
        with self.changed:
            self.sent.append(call)
            self.changed.notify_all()
        if not call.answered.wait(10):
            raise AssertionError(f"the test never answered the Ack of {req.seq}")
        if call.error:
            raise call.error
        return mock.Mock(acked_seq=req.seq)

    def Register(self, req, metadata, timeout):  # noqa: N802 - the stub's name
        return mock.Mock(session_id="s2")

    def wait_sent(self, n):
        """Waits until the ack thread has sent `n` Acks; returns their seqs."""
        with self.changed:
            if not self.changed.wait_for(lambda: len(self.sent) >= n, timeout=10):
                raise AssertionError(f"{len(self.sent)} Acks sent, not {n}: {self.seqs()}")
            return self.seqs()

    def seqs(self):
        return [call.seq for call in self.sent]


class AckFailed(grpc.RpcError):
    def __init__(self, code=grpc.StatusCode.INVALID_ARGUMENT):
        self._code = code

    def code(self):
        return self._code

    def details(self):
        return "bad seq"


class AckSoonTests(unittest.TestCase):
    def setUp(self):
        self.host = pim_sidecar.Host("/nonexistent.sock", "t")
        self.session = FakeSession()
        self.host.session = self.session
        logs = mock.patch.object(pim_sidecar, "log")
        self.log = logs.start()
        self.addCleanup(logs.stop)
        self.pauses = []
        self.host._pause = self.pauses.append  # this host's own pause, not time.sleep
        self.addCleanup(self.stop_thread)

    def stop_thread(self):
        """Ends the ack thread: close, then answer what it waits on."""
        self.host.close()
        for call in self.session.sent:
            call.answer()
        if self.host._ack_thread is not None:
            self.host._ack_thread.join(10)
            self.assertFalse(self.host._ack_thread.is_alive(), "the ack thread outlived close()")

    def test_one_ack_at_a_time_then_the_newest_position(self):
        self.host.ack_soon(5)
        self.assertEqual(self.session.wait_sent(1), [5])
        self.host.ack_soon(6)
        self.host.ack_soon(9)
        self.session.sent[0].answer()
        self.assertEqual(self.session.wait_sent(2), [5, 9], "the newest, not each one")
        self.session.sent[1].answer()
        self.host.ack_soon(9)
        self.host.ack_soon(3)
        self.host.ack_soon(10)
        self.assertEqual(self.session.wait_sent(3), [5, 9, 10], "nothing new in 9 and 3")
        self.assertEqual(self.pauses, [pim_sidecar.ACK_INTERVAL] * 2, "ACK_INTERVAL after each Ack")
        self.log.assert_not_called()

    def test_a_new_registration_acks_from_the_start_again(self):
        self.host.ack_soon(9)
        self.session.wait_sent(1)
        self.session.sent[0].answer()
        self.host.register("p", ["p.k"])
        self.host.ack_soon(3)
        self.assertEqual(self.session.wait_sent(2), [9, 3])

    def test_a_failed_ack_is_logged_not_sent_again_and_the_next_position_is_sent(self):
        self.host.ack_soon(5)
        self.session.wait_sent(1)
        self.session.sent[0].answer(AckFailed())
        self.host.ack_soon(8)
        self.assertEqual(self.session.wait_sent(2), [5, 8])
        self.assertIn("ack of seq 5 failed: INVALID_ARGUMENT", self.log.call_args[0][1])

    def test_an_ack_that_timed_out_is_sent_again(self):
        self.host.ack_soon(5)
        self.session.wait_sent(1)
        self.session.sent[0].answer(AckFailed(grpc.StatusCode.DEADLINE_EXCEEDED))
        self.assertEqual(self.session.wait_sent(2), [5, 5], "the last position must arrive")
        self.assertIn("ack of seq 5 failed: DEADLINE_EXCEEDED", self.log.call_args[0][1])

    def test_a_cancelled_ack_does_not_end_the_thread(self):
        self.host.ack_soon(5)
        self.session.wait_sent(1)
        self.session.sent[0].answer(AckFailed(grpc.StatusCode.CANCELLED))
        self.host.ack_soon(7)
        self.assertEqual(self.session.wait_sent(2), [5, 7])

    def test_after_close_nothing_more_is_sent(self):
        self.host.ack_soon(5)
        self.session.wait_sent(1)
        self.host.close()
        self.session.sent[0].answer(AckFailed(grpc.StatusCode.CANCELLED))  # the channel closed
        self.host._ack_thread.join(10)
        self.assertFalse(self.host._ack_thread.is_alive(), "the ack thread ends")
        self.host.ack_soon(7)
        self.assertEqual(self.session.seqs(), [5])
        self.log.assert_not_called()

    def test_ack_later_waits_then_sends_the_newest_position_once(self):
        with mock.patch.object(pim_sidecar, "ACK_LATER", 0.3):
            self.host.ack_later(5)
            self.host.ack_later(9)
            self.host.ack_later(7)
            self.assertEqual(self.session.seqs(), [], "nothing before ACK_LATER")
            self.assertEqual(self.session.wait_sent(1), [9])
        self.session.sent[0].answer()
        self.host.ack_soon(9)
        self.host.close()
        self.host._ack_thread.join(10)
        self.assertEqual(self.session.seqs(), [9], "9 was sent already")

    def test_ack_soon_takes_the_waiting_position_along(self):
        with mock.patch.object(pim_sidecar, "ACK_LATER", 60):
            self.host.ack_later(5)
            self.host.ack_soon(3)
            self.assertEqual(self.session.wait_sent(1), [5], "the newest handled position")
            self.session.sent[0].answer()
            self.host.ack_later(12)
            self.host.ack_soon(14)
            self.assertEqual(self.session.wait_sent(2), [5, 14])
            self.session.sent[1].answer()
        self.host.close()
        self.host._ack_thread.join(10)
        self.assertEqual(self.session.seqs(), [5, 14], "nothing was left waiting")

    def test_a_new_registration_drops_the_waiting_position(self):
        with mock.patch.object(pim_sidecar, "ACK_LATER", 0.2):
            self.host.ack_later(9)
            self.host.register("p", ["p.k"])
            self.host.ack_later(2)
            self.assertEqual(self.session.wait_sent(1), [2], "a new instance numbers from 1")


class FakeAckHost:
    """Records which of `ack_soon` and `ack_later` the pacing calls."""

    def __init__(self):
        self.calls = []

    def ack_soon(self, seq):
        self.calls.append(("soon", seq))

    def ack_later(self, seq):
        self.calls.append(("later", seq))


class AckPacingTests(unittest.TestCase):
    FULL = pim_sidecar.FULL_BATCH_EVENTS

    def pacing(self, max_events, max_bytes):
        host = FakeAckHost()
        limits = SimpleNamespace(max_queued_events=max_events, max_queued_bytes=max_bytes)
        return host, pim_sidecar._AckPacing(host, limits)

    def test_a_caught_up_stream_acks_at_once(self):
        host, acks = self.pacing(65536, 64 << 20)
        acks.after(1, 40, 1)
        acks.after(self.FULL - 1, 9000, self.FULL)
        self.assertEqual(host.calls, [("soon", 1), ("soon", self.FULL)])

    def test_full_batches_ack_later_until_a_share_of_the_queue_in_events(self):
        host, acks = self.pacing(16 * self.FULL, 64 << 20)  # a quarter: 4 batches
        for i in range(1, 9):
            acks.after(self.FULL, 100, i * self.FULL)
        whens = [when for when, _ in host.calls]
        self.assertEqual(whens, ["later"] * 3 + ["soon"] + ["later"] * 3 + ["soon"])
        self.assertEqual(host.calls[3], ("soon", 4 * self.FULL))

    def test_full_batches_ack_at_once_when_a_share_of_the_queue_in_bytes_is_reached(self):
        host, acks = self.pacing(1 << 30, 4 << 20)  # a quarter: 1 MiB
        acks.after(self.FULL, 600 << 10, self.FULL)
        acks.after(self.FULL, 600 << 10, 2 * self.FULL)
        self.assertEqual(host.calls, [("later", self.FULL), ("soon", 2 * self.FULL)])

    def test_bounds_not_announced_ack_every_batch_at_once(self):
        host, acks = self.pacing(0, 0)
        acks.after(self.FULL, 100, self.FULL)
        acks.after(self.FULL, 100, 2 * self.FULL)
        self.assertEqual(host.calls, [("soon", self.FULL), ("soon", 2 * self.FULL)])


if __name__ == "__main__":
    unittest.main()
