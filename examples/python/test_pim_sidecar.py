"""Unit tests of the module's event handling that need no host: the retry
of a handler that raises Retry, payload checks, and that a failing handler
does not stop delivery. Run by tests/python.rs (`python -m unittest`)."""

import sys
import unittest
from unittest import mock

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


class HandleTests(unittest.TestCase):
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
        pim_sidecar._handle(s, SRC, "flaky.data", b"x", 7, "host-1")
        self.assertEqual(s.calls, [(SRC, "flaky.data", b"x", (7, "host-1"))])
        self.assertEqual(self.sleeps, [])
        self.assertIsNone(pim_sidecar.current_event())

    def test_retry_calls_again_after_50_ms_doubling(self):
        s = Flaky(2)
        pim_sidecar._handle(s, SRC, "flaky.data", b"x", 7, "host-1")
        self.assertEqual(len(s.calls), 3)
        self.assertEqual(self.sleeps, [0.05, 0.1])
        self.assertTrue(all(c[3] == (7, "host-1") for c in s.calls))
        self.log.assert_not_called()

    def test_retry_gives_up_after_retries_more_calls_and_logs_an_error(self):
        s = Flaky(100)
        pim_sidecar._handle(s, SRC, "flaky.data", b"x", 9, "host-1")
        self.assertEqual(len(s.calls), pim_sidecar.RETRIES + 1)
        self.assertEqual(self.sleeps, [0.05 * 2**i for i in range(pim_sidecar.RETRIES)])
        level, message = self.log.call_args.args
        self.assertEqual(level, "ERROR")
        self.assertIn("seq 9", message)

    def test_a_failure_after_a_retry_is_logged_and_not_retried(self):
        s = Flaky(1, error=RuntimeError("broken"))
        pim_sidecar._handle(s, SRC, "flaky.data", b"x", 3, "host-1")
        self.assertEqual(len(s.calls), 2)
        self.assertEqual(self.log.call_args.args[0], "WARN")
        self.assertIn("broken", self.log.call_args.args[1])

    def test_a_failing_handler_is_logged_and_counts_as_handled(self):
        s = Flaky(0, error=ValueError("bad body"))
        pim_sidecar._handle(s, SRC, "flaky.data", b"x", 4, "host-1")
        self.assertEqual(len(s.calls), 1)
        self.assertEqual(self.sleeps, [])
        self.assertEqual(self.log.call_args.args[0], "WARN")
        self.assertIsNone(pim_sidecar.current_event())


class CheckPayloadTests(unittest.TestCase):
    def test_each_wire_limit_names_its_field(self):
        cases = [
            ((bytes(15), "a.b", b""), "payload.src"),
            ((SRC, "", b""), "payload.kind"),
            ((SRC, "k" * 256, b""), "payload.kind"),
            ((SRC, "ké", b""), "payload.kind"),
            ((SRC, "a.b", bytes(65536)), "payload.body"),
        ]
        for (src, kind, body), field in cases:
            with self.assertRaisesRegex(ValueError, field):
                pim_sidecar._check_payload(5, src, kind, body)

    def test_a_payload_at_the_limits_passes(self):
        pim_sidecar._check_payload(5, SRC, "k" * 255, bytes(65535))
        self.assertTrue(pim_sidecar._payload_ok(SRC, "k" * 255, bytes(65535)))

    def test_the_quick_check_refuses_what_the_named_check_refuses(self):
        for src, kind, body in [
            (bytes(15), "a.b", b""),
            (SRC, "", b""),
            (SRC, "k" * 256, b""),
            (SRC, "ké", b""),
            (SRC, "a.b", bytes(65536)),
        ]:
            self.assertFalse(pim_sidecar._payload_ok(src, kind, body))
            with self.assertRaises(ValueError):
                pim_sidecar._check_payload(5, src, kind, body)

    def test_a_handler_retried_does_not_see_the_first_retry_as_its_context(self):
        seen = []

        class Look(Flaky):
            def handle_payload(self, src, kind, body):
                seen.append(sys.exc_info()[0])
                super().handle_payload(src, kind, body)

        s = Look(1)
        with mock.patch.object(pim_sidecar.time, "sleep"):
            pim_sidecar._handle(s, SRC, "flaky.data", b"x", 7, "host-1")
        self.assertEqual(seen, [None, None])



class FakeAckCall:
    """An Ack in flight that the test answers."""

    def __init__(self, seq):
        self.seq = seq
        self.callbacks = []
        self.error = None
        self.was_cancelled = False

    def add_done_callback(self, callback):
        self.callbacks.append(callback)

    def cancelled(self):
        return self.was_cancelled

    def exception(self):
        return self.error

    def answer(self, error=None, cancelled=False):
        self.error = error
        self.was_cancelled = cancelled
        for callback in self.callbacks:
            callback(self)


class FakeSession:
    """The PluginSession stub: records Acks sent, answers Register."""

    def __init__(self):
        self.sent = []
        self.Ack = mock.Mock()
        self.Ack.future = self._ack

    def _ack(self, req, metadata, timeout):
        self.sent.append(FakeAckCall(req.seq))
        return self.sent[-1]

    def Register(self, req, metadata, timeout):  # noqa: N802 - the stub's name
        return mock.Mock(session_id="s2")


class AckFailed(Exception):
    def code(self):
        return pim_sidecar.grpc.StatusCode.INVALID_ARGUMENT

    def details(self):
        return "bad seq"


class AckSoonTests(unittest.TestCase):
    def setUp(self):
        self.host = pim_sidecar.Host("/nonexistent.sock", "t")
        self.addCleanup(self.host.channel.close)
        self.session = FakeSession()
        self.host.session = self.session
        logs = mock.patch.object(pim_sidecar, "log")
        self.log = logs.start()
        self.addCleanup(logs.stop)

    def sent(self):
        return [call.seq for call in self.session.sent]

    def test_one_ack_in_flight_then_the_newest_position(self):
        self.host.ack_soon(5)
        self.host.ack_soon(6)
        self.host.ack_soon(9)
        self.assertEqual(self.sent(), [5], "no second Ack while one is in flight")
        self.session.sent[0].answer()
        self.assertEqual(self.sent(), [5, 9], "the newest, not each one")
        self.session.sent[1].answer()
        self.host.ack_soon(9)
        self.host.ack_soon(3)
        self.assertEqual(self.sent(), [5, 9], "nothing new to ack")
        self.host.ack_soon(10)
        self.assertEqual(self.sent(), [5, 9, 10])

    def test_a_new_registration_acks_from_the_start_again(self):
        self.host.ack_soon(9)
        self.session.sent[0].answer()
        self.host.register("p", ["p.k"])
        self.host.ack_soon(3)
        self.assertEqual(self.sent(), [9, 3])

    def test_a_failed_ack_is_logged_and_the_next_position_is_sent(self):
        self.host.ack_soon(5)
        self.host.ack_soon(7)
        self.session.sent[0].answer(AckFailed())
        self.assertEqual(self.sent(), [5], "a failed Ack is not followed at once")
        self.assertIn("ack of seq 5 failed: INVALID_ARGUMENT", self.log.call_args[0][1])
        self.host.ack_soon(8)
        self.assertEqual(self.sent(), [5, 8])

    def test_after_a_cancelled_ack_nothing_more_is_sent(self):
        self.host.ack_soon(5)
        self.host.ack_soon(7)
        self.session.sent[0].answer(cancelled=True)  # the channel was closed
        self.assertEqual(self.sent(), [5])
        self.log.assert_not_called()


if __name__ == "__main__":
    unittest.main()
