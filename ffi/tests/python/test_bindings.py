"""The generated Python bindings, driven against a real tern-server over QUIC on loopback."""

import asyncio
import gc
import os
import queue
import sys
import threading
import time
import unittest

sys.path.insert(0, os.environ["TERN_PY_BINDINGS"])

import tern_ffi as tern  # noqa: E402
from tern_server import TernServer  # noqa: E402

TIMEOUT = 10.0


class Recorder(tern.TernListener):
    """Collects every callback on a queue, and checks they come from the listener thread."""

    def __init__(self) -> None:
        self.events = queue.Queue()
        self.threads = set()

    def _put(self, kind, value):
        # The OS thread name: Python calls threads it did not start "Dummy-N".
        with open(f"/proc/self/task/{threading.get_native_id()}/comm") as comm:
            self.threads.add(comm.read().strip())
        self.events.put((kind, value))

    def on_message(self, message, inbox_seq):
        self._put("message", (message, inbox_seq))

    def on_receipt(self, receipt, inbox_seq):
        self._put("receipt", receipt)

    def on_conversation_event(self, event, inbox_seq):
        self._put("conversation", event)

    def on_presence(self, presence):
        self._put("presence", presence)

    def on_typing(self, typing):
        self._put("typing", typing)

    def on_connection_state(self, state):
        self._put("connection", state)

    def on_sync_too_long(self, inbox_head):
        self._put("too_long", inbox_head)

    def expect(self, kind, match=lambda v: True, timeout=TIMEOUT):
        """The first event of `kind` that satisfies `match`; others are skipped."""
        deadline = time.monotonic() + timeout
        seen = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {kind} event matched within {timeout}s; saw {seen}")
            try:
                got_kind, value = self.events.get(timeout=left)
            except queue.Empty:
                continue
            seen.append((got_kind, value))
            if got_kind == kind and match(value):
                return value


def process_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class BindingsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.server = TernServer()

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()

    def config(self, user, device="phone", token=None):
        return tern.TernConfig(
            server=self.server.address,
            token=token if token is not None else self.server.token(user, device),
            ca_pem=self.server.ca_pem,
            server_name="localhost",
            resume_from=None,
            background=False,
        )

    async def connect(self, user, device="phone"):
        listener = Recorder()
        client = await tern.TernClient.connect(self.config(user, device), listener)
        listener.expect("connection", lambda s: s.is_connected())
        return client, listener

    def test_conversation_receipts_presence_typing_and_migration(self):
        async def run():
            alice, alice_events = await self.connect("alice")
            bob, bob_events = await self.connect("bob")
            self.assertEqual(alice.session().user, "alice")

            sent = await alice.send_to_user("bob", "hello bob", None)
            self.assertEqual(sent.conversation_id, "d:alice:bob")
            self.assertEqual(sent.seq, 1)
            message, inbox_seq = bob_events.expect("message")
            self.assertEqual((message.sender, message.text), ("alice", "hello bob"))
            self.assertGreater(inbox_seq, 0)

            # Bob's client acknowledged it (delivered); reading it sends a read receipt.
            alice_events.expect("receipt", lambda r: r.kind == tern.ReceiptKind.DELIVERED
                                and r.up_to_seq >= 1)
            await bob.mark_read(sent.conversation_id, sent.seq)
            alice_events.expect("receipt", lambda r: r.kind == tern.ReceiptKind.READ
                                and r.user_id == "bob" and r.up_to_seq == 1)

            await alice.set_presence(tern.PresenceStatus.AWAY)
            bob_events.expect("presence", lambda p: p.user_id == "alice"
                              and p.status == tern.PresenceStatus.AWAY)
            await bob.typing(sent.conversation_id)
            typing = alice_events.expect("typing")
            self.assertEqual((typing.user_id, typing.conversation_id), ("bob", "d:alice:bob"))

            # The network changes in the middle of the conversation: nothing is lost, nothing
            # is reordered, and the session is not re-established.
            first = await alice.send_to_user("bob", "before the switch", None)
            alice.network_changed()
            second = await alice.send_to_user("bob", "after the switch", None)
            self.assertEqual(second.seq, first.seq + 1)
            got = [bob_events.expect("message")[0].text for _ in range(2)]
            self.assertEqual(got, ["before the switch", "after the switch"])
            session = alice.session().session_id
            self.assertGreater(await alice.ping(), 0.0)
            self.assertEqual(alice.session().session_id, session)

            history = await bob.history(sent.conversation_id, 0, 10)
            self.assertEqual([m.text for m in history.messages],
                             ["after the switch", "before the switch", "hello bob"])
            await alice.disconnect()
            alice_events.expect("connection", lambda s: s.is_disconnected())
            with self.assertRaises(tern.TernError.Closed):
                await alice.send_to_user("bob", "too late", None)
            await bob.disconnect()
            self.assertEqual(alice_events.threads | bob_events.threads, {"tern-listener"})

        asyncio.run(run())

    def test_group(self):
        async def run():
            carol, carol_events = await self.connect("carol")
            dave, dave_events = await self.connect("dave")
            group = await carol.create_group("team", ["dave"])
            self.assertEqual(group.kind, tern.ConversationKind.GROUP)
            self.assertEqual(sorted(m.user_id for m in group.members), ["carol", "dave"])
            event = dave_events.expect("conversation")
            self.assertEqual((event.kind, event.actor), (tern.ConversationEventKind.CREATED, "carol"))

            await carol.send(group.conversation_id, "hi team", None)
            message, _ = dave_events.expect("message")
            self.assertEqual((message.conversation_id, message.text), (group.conversation_id, "hi team"))

            await carol.add_members(group.conversation_id, ["erin"])
            left = await dave.leave_group(group.conversation_id)
            self.assertEqual(sorted(m.user_id for m in left.members), ["carol", "erin"])
            with self.assertRaises(tern.TernError.Server) as refused:
                await dave.send(group.conversation_id, "not a member any more", None)
            self.assertEqual(refused.exception.code, tern.TernErrorCode.FORBIDDEN)
            convs = await carol.conversations()
            self.assertIn(group.conversation_id, [c.conversation_id for c in convs])
            await carol.disconnect()
            await dave.disconnect()

        asyncio.run(run())

    def test_bad_token_is_a_typed_error(self):
        async def run():
            config = self.config("mallory", token="not.a.jwt")
            with self.assertRaises(tern.TernError.Server) as refused:
                await tern.TernClient.connect(config, Recorder())
            self.assertEqual(refused.exception.code, tern.TernErrorCode.TOKEN_INVALID)

        asyncio.run(run())

    def test_dropped_clients_leak_no_threads_connections_or_sockets(self):
        async def churn(rounds):
            for i in range(rounds):
                client, events = await self.connect("leaky", device=f"d{i % 3}")
                await client.send_to_user("alice", f"churn {i}", None)
                del client  # the last reference: Rust drops the client and closes it

        def settle(baseline_threads, baseline_fds):
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                gc.collect()
                live = tern.live_clients()
                if (live.objects == 0 and live.sessions == 0
                        and process_threads() <= baseline_threads
                        and open_fds() <= baseline_fds):
                    return
                time.sleep(0.1)
            self.fail(f"leak: {tern.live_clients()}, threads {process_threads()} "
                      f"(baseline {baseline_threads}), fds {open_fds()} (baseline {baseline_fds})")

        # Warm up: the bindings' runtime starts its worker threads once, on first use.
        asyncio.run(churn(2))
        settle(process_threads() + 8, open_fds() + 8)
        threads, fds = process_threads(), open_fds()
        asyncio.run(churn(40))
        # Blocking-pool threads of the runtime may linger a second; allow one.
        settle(threads + 1, fds)


if __name__ == "__main__":
    unittest.main(verbosity=2)
