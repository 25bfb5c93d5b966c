//! Mobile transport over real QUIC on loopback: presence and typing datagrams, connection
//! migration, 0-RTT resumption, and delivery through a lossy relay.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{TestServer, wait_for};
use tern_client::tern_protocol::pb::{self, PresenceStatus};
use tern_client::{Client, ClientConfig, Event, SendTarget};
use tern_netsim::{Impairment, Relay, RelayConfig};

fn presence_of(
    user: &'static str,
    status: PresenceStatus,
) -> impl FnMut(Event) -> Option<pb::Presence> {
    move |e| match e {
        Event::Presence(p) if p.user_id == user && p.status == status as i32 => Some(p),
        _ => None,
    }
}

/// Waits (up to 10 s) until the server's presence book has `user` at `status`.
async fn server_sees(server: &TestServer, user: &str, status: PresenceStatus) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.state.presence.get(user).status != status as i32 {
        assert!(
            Instant::now() < deadline,
            "the server never saw {user} {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Collects `n` messages, returning (conversation, seq, text) in arrival order.
async fn collect(
    events: &mut tern_client::Events,
    n: usize,
    secs: u64,
) -> Vec<(String, u64, String)> {
    let mut out = Vec::new();
    while out.len() < n {
        let m = wait_for(events, secs, |e| match e {
            Event::Message { message, .. } => Some(message),
            _ => None,
        })
        .await;
        out.push((m.conversation_id, m.seq, m.text));
    }
    out
}

/// Each conversation's messages arrive exactly once, in order, with no gap.
fn assert_once_in_order(received: &[(String, u64, String)]) {
    let mut last: std::collections::HashMap<&str, u64> = Default::default();
    for (conv, seq, _) in received {
        let prev = last.insert(conv, *seq).unwrap_or(0);
        assert_eq!(
            *seq,
            prev + 1,
            "{conv}: expected seq {} after {prev}, got {seq}",
            prev + 1
        );
    }
}

fn via_relay(server: &TestServer, relay: &Relay, user: &str, device: &str) -> ClientConfig {
    let mut config = server.config(&server.token(user, device));
    config.server = relay.local_addr().to_string();
    config
}

#[tokio::test]
async fn presence_goes_online_then_offline_as_datagrams() {
    let server = TestServer::start_with(|c| c.idle_timeout_secs = 2).await;
    // A shared conversation makes them contacts.
    let (alice, _a) = server.connect("alice", "phone").await;
    alice
        .send(SendTarget::User("bob".into()), "hi", None)
        .await
        .unwrap();
    alice.close().await;

    let (bob, mut bob_events) = server.connect("bob", "phone").await;
    // The snapshot on connect says alice is offline now.
    wait_for(
        &mut bob_events,
        10,
        presence_of("alice", PresenceStatus::Offline),
    )
    .await;
    let before = bob.stats().datagrams_received;

    let relay = Relay::start(RelayConfig::new(server.addr)).await.unwrap();
    let mut config = via_relay(&server, &relay, "alice", "phone");
    // Keep the connection alive well inside the server's 2 s idle timeout.
    config.transport.keep_alive = Duration::from_millis(300);
    let (alice, _a) = Client::connect(config).await.unwrap();
    wait_for(
        &mut bob_events,
        10,
        presence_of("alice", PresenceStatus::Online),
    )
    .await;
    assert!(
        bob.stats().datagrams_received > before,
        "presence arrived as a datagram"
    );
    assert!(server.state.datagram_stats.sent.load(Ordering::Relaxed) > 0);

    alice.set_presence(PresenceStatus::Away).await.unwrap();
    wait_for(
        &mut bob_events,
        10,
        presence_of("alice", PresenceStatus::Away),
    )
    .await;
    assert!(alice.stats().datagrams_sent >= 1);
    assert!(server.state.datagram_stats.received.load(Ordering::Relaxed) >= 1);

    // The phone falls silent (no packets either way): offline within the idle timeout.
    relay.set_blackhole(true);
    let silent_at = Instant::now();
    wait_for(
        &mut bob_events,
        10,
        presence_of("alice", PresenceStatus::Offline),
    )
    .await;
    let took = silent_at.elapsed();
    assert!(
        took <= Duration::from_secs(2) + Duration::from_millis(1500),
        "offline after {took:?}"
    );
    drop(alice);

    // A clean disconnect is seen at once.
    let (alice, _a) = server.connect("alice", "tablet").await;
    wait_for(
        &mut bob_events,
        10,
        presence_of("alice", PresenceStatus::Online),
    )
    .await;
    alice.close().await;
    wait_for(
        &mut bob_events,
        5,
        presence_of("alice", PresenceStatus::Offline),
    )
    .await;
    server.stop().await;
}

#[tokio::test]
async fn typing_arrives_and_is_never_stored() {
    let server = TestServer::start().await;
    let (alice, _a) = server.connect("alice", "phone").await;
    let sent = alice
        .send(SendTarget::User("bob".into()), "hi", None)
        .await
        .unwrap();
    let (bob, mut bob_events) = server.connect("bob", "phone").await;
    let head_before = server.state.store.inbox_head("bob").unwrap();
    // Datagrams are best effort; on loopback the first one arrives, but retry a little anyway.
    let typing = async {
        loop {
            alice.typing(&sent.conversation_id).await.unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let seen = tokio::select! {
        seen = wait_for(&mut bob_events, 10, |e| match e {
            Event::Typing(t) => Some(t),
            _ => None,
        }) => seen,
        () = typing => unreachable!(),
    };
    assert_eq!(
        (seen.user_id.as_str(), seen.conversation_id.as_str()),
        ("alice", sent.conversation_id.as_str())
    );
    assert!(seen.expires_in_ms > 0 && seen.expires_in_ms <= 10_000);
    // Not stored, not synced.
    assert_eq!(server.state.store.inbox_head("bob").unwrap(), head_before);
    let synced = bob.sync(0).await.unwrap();
    assert!(
        synced
            .entries
            .iter()
            .all(|e| matches!(e.body, Some(pb::inbox_entry::Body::Message(_))))
    );
    assert_eq!(synced.entries.len(), 1);
    // A non-member's typing goes nowhere.
    let (eve, _e) = server.connect("eve", "phone").await;
    let dropped_before = server
        .state
        .datagram_stats
        .dropped_malformed
        .load(Ordering::Relaxed);
    eve.typing(&sent.conversation_id).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        server
            .state
            .datagram_stats
            .dropped_malformed
            .load(Ordering::Relaxed)
            > dropped_before
    );
    server.stop().await;
}

#[tokio::test]
async fn migration_mid_burst_keeps_the_connection_and_every_message() {
    let server = TestServer::start().await;
    let (alice, mut alice_events) = server.connect("alice", "phone").await;
    let (bob, mut bob_events) = server.connect("bob", "phone").await;
    let alice = Arc::new(alice);
    let bob = Arc::new(bob);
    let alice_conn = alice.connection().unwrap();
    let stable_id = alice_conn.stable_id();
    let old_addr = server.state.registry.sessions_of("alice")[0]
        .conn
        .remote_address();

    let burst = |from: Arc<Client>, to: &'static str| {
        tokio::spawn(async move {
            for i in 0..1000 {
                from.send(SendTarget::User(to.into()), &format!("{i}"), None)
                    .await
                    .unwrap();
            }
        })
    };
    let a = burst(alice.clone(), "bob");
    let b = burst(bob.clone(), "alice");
    // Move alice to a new UDP port in the middle of the burst.
    while server.state.store.conversation_head("d:alice:bob").unwrap() < 600 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    alice.network_changed().unwrap();
    let to_bob = collect(&mut bob_events, 1000, 30).await;
    let to_alice = collect(&mut alice_events, 1000, 30).await;
    a.await.unwrap();
    b.await.unwrap();

    // One conversation, both directions: 2,000 messages, each exactly once, in order.
    let mut all: Vec<u64> = to_bob
        .iter()
        .chain(to_alice.iter())
        .map(|(_, seq, _)| *seq)
        .collect();
    all.sort_unstable();
    assert_eq!(all, (1..=2000).collect::<Vec<_>>());
    for pair in to_bob.windows(2).chain(to_alice.windows(2)) {
        assert!(
            pair[0].1 < pair[1].1,
            "out of order: {} then {}",
            pair[0].1,
            pair[1].1
        );
    }
    // Same connection: no new handshake, same stable id; the server saw the new address.
    let conn = alice.connection().unwrap();
    assert_eq!(conn.stable_id(), stable_id);
    assert_eq!(alice.stats().reconnects, 0);
    let new_addr = server.state.registry.sessions_of("alice")[0]
        .conn
        .remote_address();
    assert_ne!(new_addr, old_addr, "the server sees the new path");
    server.stop().await;
}

#[tokio::test]
async fn reconnect_to_the_same_server_resumes_with_0rtt() {
    let server = TestServer::start().await;
    let (alice, mut events) = server.connect("alice", "phone").await;
    let first_stable = alice.connection().unwrap().stable_id();
    // Drop the connection under the client, as a lost network would.
    alice
        .connection()
        .unwrap()
        .close(0u32.into(), b"simulated loss");
    wait_for(&mut events, 10, |e| {
        matches!(
            e,
            Event::Connection(tern_client::ConnectionState::Connected)
        )
        .then_some(())
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while alice.stats().zero_rtt_accepted == 0 {
        assert!(
            Instant::now() < deadline,
            "0-RTT was not accepted on reconnect"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(alice.stats().reconnects, 1);
    assert_ne!(alice.connection().unwrap().stable_id(), first_stable);
    // The resumed session works.
    let sent = alice
        .send(SendTarget::User("bob".into()), "after resume", None)
        .await
        .unwrap();
    assert_eq!(sent.seq, 1);
    server.stop().await;
}

#[tokio::test]
async fn five_percent_loss_each_way_loses_nothing_and_presence_recovers() {
    let server = TestServer::start().await;
    let mut config = RelayConfig::new(server.addr);
    config.to_server = Impairment::lossy(0.05);
    config.to_client = Impairment::lossy(0.05);
    config.seed = Some(7);
    let relay = Relay::start(config).await.unwrap();
    let (alice, _a) = Client::connect(via_relay(&server, &relay, "alice", "phone"))
        .await
        .unwrap();
    let (bob, mut bob_events) = Client::connect(via_relay(&server, &relay, "bob", "phone"))
        .await
        .unwrap();
    let alice = Arc::new(alice);
    let group = alice
        .create_group("g", &["bob".into()])
        .await
        .unwrap()
        .conversation_id;

    let mut senders = Vec::new();
    for target in [
        SendTarget::User("bob".into()),
        SendTarget::Conversation(group.clone()),
    ] {
        let alice = alice.clone();
        senders.push(tokio::spawn(async move {
            for i in 0..200 {
                alice
                    .send(target.clone(), &format!("{i}"), None)
                    .await
                    .unwrap();
            }
        }));
    }
    let received = collect(&mut bob_events, 400, 60).await;
    for sender in senders {
        sender.await.unwrap();
    }
    assert_once_in_order(&received);
    assert!(
        relay.stats().to_client_dropped > 0 && relay.stats().to_server_dropped > 0,
        "the relay did drop packets"
    );

    // Presence is best effort; a client republishes until it is seen.
    let presence = async {
        loop {
            alice.set_presence(PresenceStatus::Away).await.unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    tokio::select! {
        _ = wait_for(&mut bob_events, 20, presence_of("alice", PresenceStatus::Away)) => {}
        () = presence => unreachable!(),
    }
    drop(bob);
    server.stop().await;
}

#[tokio::test]
async fn a_lost_presence_is_repaired_by_the_next_republish() {
    let server = TestServer::start().await;
    let relay = Relay::start(RelayConfig::new(server.addr)).await.unwrap();
    let (alice, _a) = server.connect("alice", "phone").await;
    alice
        .send(SendTarget::User("bob".into()), "hi", None)
        .await
        .unwrap();
    let (_bob, mut bob_events) = Client::connect(via_relay(&server, &relay, "bob", "phone"))
        .await
        .unwrap();
    wait_for(
        &mut bob_events,
        10,
        presence_of("alice", PresenceStatus::Online),
    )
    .await;
    // The fan-out of alice's change to bob is lost.
    relay.set_blackhole(true);
    alice.set_presence(PresenceStatus::Away).await.unwrap();
    server_sees(&server, "alice", PresenceStatus::Away).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    relay.set_blackhole(false);
    // alice's device repeats it, unchanged, as it does until it sees it took.
    let republish = async {
        loop {
            alice.set_presence(PresenceStatus::Away).await.unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    tokio::select! {
        _ = wait_for(&mut bob_events, 10, presence_of("alice", PresenceStatus::Away)) => {}
        () = republish => unreachable!(),
    }
    server.stop().await;
}

#[tokio::test]
async fn presence_follows_contacts_as_memberships_change() {
    // The server keeps each user's contacts between presence changes: it must notice when a
    // group adds or removes someone.
    let server = TestServer::start().await;
    let (alice, _a) = server.connect("alice", "phone").await;
    let (_carol, mut carol_events) = server.connect("carol", "phone").await;
    let (_dave, mut dave_events) = server.connect("dave", "phone").await;
    // A change while alice has no contacts: the server reads (and keeps) an empty list.
    alice.set_presence(PresenceStatus::Away).await.unwrap();
    server_sees(&server, "alice", PresenceStatus::Away).await;
    let group = alice
        .create_group("g", &["carol".to_string(), "dave".to_string()])
        .await
        .unwrap();
    alice.set_presence(PresenceStatus::Online).await.unwrap();
    wait_for(
        &mut carol_events,
        10,
        presence_of("alice", PresenceStatus::Online),
    )
    .await;
    wait_for(
        &mut dave_events,
        10,
        presence_of("alice", PresenceStatus::Online),
    )
    .await;
    // Removed from the group, carol is no longer a contact: dave hears of the next change,
    // carol does not.
    alice
        .remove_member(&group.conversation_id, "carol")
        .await
        .unwrap();
    alice.set_presence(PresenceStatus::Away).await.unwrap();
    wait_for(
        &mut dave_events,
        10,
        presence_of("alice", PresenceStatus::Away),
    )
    .await;
    let late = tokio::time::timeout(
        Duration::from_millis(500),
        wait_for(
            &mut carol_events,
            5,
            presence_of("alice", PresenceStatus::Away),
        ),
    )
    .await;
    assert!(
        late.is_err(),
        "carol got alice's presence after leaving the group"
    );
    server.stop().await;
}

#[tokio::test]
async fn presence_and_typing_stay_out_of_groups_over_the_limit() {
    // A group of three with a limit of two: its members get neither presence nor typing of
    // each other; a direct conversation still carries both.
    let server = TestServer::start_with(|c| c.presence_max_group_members = 2).await;
    let (alice, _a) = server.connect("alice", "phone").await;
    let (_carol, mut carol_events) = server.connect("carol", "phone").await;
    let (_dave, mut dave_events) = server.connect("dave", "phone").await;
    let group = alice
        .create_group("big", &["carol".to_string(), "dave".to_string()])
        .await
        .unwrap();
    alice
        .send(SendTarget::User("dave".into()), "hi", None)
        .await
        .unwrap();
    alice.typing(&group.conversation_id).await.unwrap();
    alice.set_presence(PresenceStatus::Away).await.unwrap();
    // dave is a direct contact: he hears of it. That also orders the checks below after it.
    wait_for(
        &mut dave_events,
        10,
        presence_of("alice", PresenceStatus::Away),
    )
    .await;
    let carol_heard = tokio::time::timeout(
        Duration::from_millis(500),
        wait_for(&mut carol_events, 5, |e| match e {
            Event::Presence(p) if p.user_id == "alice" => Some("presence"),
            Event::Typing(t) if t.user_id == "alice" => Some("typing"),
            _ => None,
        }),
    )
    .await;
    assert!(
        carol_heard.is_err(),
        "carol got alice's {:?} through a group over the limit",
        carol_heard.ok()
    );
    server.stop().await;
}

#[tokio::test]
async fn background_devices_get_messages_but_no_presence_or_typing() {
    let server = TestServer::start().await;
    let (alice, _a) = server.connect("alice", "phone").await;
    let sent = alice
        .send(SendTarget::User("bob".into()), "hi", None)
        .await
        .unwrap();
    let (bob, mut bob_events) = server.connect("bob", "phone").await;
    bob.set_background(true).await.unwrap();
    // The control stream is ordered: after this pong the server knows Bob is in the background.
    bob.ping().await.unwrap();
    let received_before = bob.stats().datagrams_received;
    for _ in 0..5 {
        alice.typing(&sent.conversation_id).await.unwrap();
        alice.set_presence(PresenceStatus::Away).await.unwrap();
        alice.set_presence(PresenceStatus::Online).await.unwrap();
    }
    alice
        .send(SendTarget::User("bob".into()), "still delivered", None)
        .await
        .unwrap();
    let message = wait_for(&mut bob_events, 10, |e| match e {
        Event::Message { message, .. } if message.text == "still delivered" => Some(message),
        Event::Typing(_) => panic!("typing reached a background device"),
        _ => None,
    })
    .await;
    assert_eq!(message.sender, "alice");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        bob.stats().datagrams_received,
        received_before,
        "no datagrams while in the background"
    );

    // Back in the foreground, typing flows again.
    bob.set_background(false).await.unwrap();
    bob.ping().await.unwrap();
    alice.typing(&sent.conversation_id).await.unwrap();
    wait_for(&mut bob_events, 10, |e| {
        matches!(e, Event::Typing(_)).then_some(())
    })
    .await;
    server.stop().await;
}

#[tokio::test]
async fn sends_in_flight_when_the_connection_drops_are_stored_in_call_order() {
    let server = TestServer::start().await;
    let (alice, _alice_events) = server.connect("alice", "phone").await;
    let (_bob, mut bob_events) = server.connect("bob", "phone").await;
    let alice = Arc::new(alice);
    // 300 sends of one conversation, all in flight at once, made in order.
    let sends = common::spawn_sends(&alice, "bob", 300);
    // Drop the connection under the client once part of them is stored.
    while server.state.store.conversation_head("d:alice:bob").unwrap() < 50 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    alice
        .connection()
        .unwrap()
        .close(0u32.into(), b"simulated loss");
    let mut seqs = Vec::new();
    for send in sends {
        seqs.push(send.await.unwrap().unwrap().seq);
    }
    assert_eq!(alice.stats().reconnects, 1, "the drop came mid-burst");
    // Stored once each, in the order the app made them.
    assert_eq!(seqs, (1..=300).collect::<Vec<u64>>());
    let received = collect(&mut bob_events, 300, 30).await;
    assert_once_in_order(&received);
    let texts: Vec<String> = received.into_iter().map(|(_, _, text)| text).collect();
    assert_eq!(texts, (0..300).map(|i| i.to_string()).collect::<Vec<_>>());
    server.stop().await;
}

#[tokio::test]
async fn an_event_cut_off_with_a_dropped_link_during_a_sync_is_delivered_after_reconnect() {
    // Bob comes online to a backlog larger than his app's event channel (1,024), and his
    // app takes nothing yet: the sync waits to hand over the next entry. The connection then
    // drops, which cancels the sync task in that wait. The entry must come again after the
    // reconnect, and acknowledgements must go past it.
    const SENT: usize = 1_100;
    // More than the default burst of messages a user may send at once.
    let server = TestServer::start_with(|c| c.messages_burst = 10_000).await;
    let (alice, _alice_events) = server.connect("alice", "phone").await;
    let alice = Arc::new(alice);
    for send in common::spawn_sends(&alice, "bob", SENT) {
        send.await.unwrap().unwrap();
    }
    let (bob, mut bob_events) = server.connect("bob", "phone").await;
    // Let the sync fill the channel, up to the entry it cannot hand over.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    bob.connection()
        .unwrap()
        .close(0u32.into(), b"simulated loss");
    let received = collect(&mut bob_events, SENT, 20).await;
    assert_once_in_order(&received);
    assert_eq!(bob.stats().reconnects, 1);
    let head = server.state.store.inbox_head("bob").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let acked = server.state.store.cursor("bob", "phone").unwrap();
        if acked == head {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "acknowledgements stopped at {acked} of {head}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.stop().await;
}
