//! Messaging over real QUIC on loopback: delivery, sync, receipts, groups, idempotency and
//! head-of-line independence of conversations.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{TestServer, wait_for};
use tern_client::tern_protocol::pb::{self, ConversationEventKind, ReceiptKind};
use tern_client::{ClientError, Event, SendTarget};
use tern_protocol::ErrorCode;

/// Waits for the next event matching `pick`, skipping others, failing after `secs`.
async fn messages(
    events: &mut tern_client::Events,
    n: usize,
    secs: u64,
) -> Vec<(pb::Message, u64)> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        out.push(
            wait_for(events, secs, |e| match e {
                Event::Message { message, inbox_seq } => Some((message, inbox_seq)),
                _ => None,
            })
            .await,
        );
    }
    out
}

/// No further message arrives within `ms`.
async fn quiet(events: &mut tern_client::Events, ms: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(ms);
    while let Ok(Some(event)) = tokio::time::timeout_at(deadline, events.recv()).await {
        assert!(
            !matches!(event, Event::Message { .. }),
            "unexpected message {event:?}"
        );
    }
}

fn code_of<T: std::fmt::Debug>(result: Result<T, ClientError>) -> ErrorCode {
    match result {
        Err(ClientError::Server { code, .. }) => code,
        other => panic!("expected a server error, got {other:?}"),
    }
}

fn assert_in_order(received: &[(pb::Message, u64)], first_seq: u64) {
    for (i, (message, _)) in received.iter().enumerate() {
        assert_eq!(message.seq, first_seq + i as u64, "conversation order");
    }
    for pair in received.windows(2) {
        assert!(pair[0].1 < pair[1].1, "inbox order");
    }
}

#[tokio::test]
async fn one_to_one_online_in_order_then_delivered_then_read_receipts() {
    let server = TestServer::start().await;
    let (alice, mut alice_events) = server.connect("alice", "phone").await;
    let (bob, mut bob_events) = server.connect("bob", "phone").await;
    let mut last = None;
    for i in 0..20 {
        let sent = alice
            .send(SendTarget::User("bob".into()), &format!("hi {i}"), None)
            .await
            .unwrap();
        assert_eq!(sent.seq, i + 1);
        last = Some(sent);
    }
    let last = last.unwrap();
    let got = messages(&mut bob_events, 20, 10).await;
    assert_in_order(&got, 1);
    assert_eq!(got[0].0.text, "hi 0");
    assert_eq!(got[19].0.sender, "alice");
    assert_eq!(got[19].0.conversation_id, last.conversation_id);

    // Bob's client acknowledges what it received: Alice hears "delivered up to 20".
    let delivered = wait_for(&mut alice_events, 10, |e| match e {
        Event::Receipt { receipt, .. }
            if receipt.kind == ReceiptKind::Delivered as i32 && receipt.up_to_seq == 20 =>
        {
            Some(receipt)
        }
        Event::Receipt { receipt, .. } => {
            assert_ne!(
                receipt.kind,
                ReceiptKind::Read as i32,
                "read before delivered"
            );
            None
        }
        _ => None,
    })
    .await;
    assert_eq!(delivered.user_id, "bob");

    bob.mark_read(&last.conversation_id, 20).await.unwrap();
    let read = wait_for(&mut alice_events, 10, |e| match e {
        Event::Receipt { receipt, .. } if receipt.kind == ReceiptKind::Read as i32 => Some(receipt),
        _ => None,
    })
    .await;
    assert_eq!((read.user_id.as_str(), read.up_to_seq), ("bob", 20));
    server.stop().await;
}

#[tokio::test]
async fn offline_user_receives_every_message_once_in_order() {
    let server = TestServer::start().await;
    let (alice, mut alice_events) = server.connect("alice", "phone").await;
    let alice = Arc::new(alice);
    for i in 0..1000 {
        alice
            .send(SendTarget::User("bob".into()), &format!("m{i}"), None)
            .await
            .unwrap();
    }
    let (_bob, mut bob_events) = server.connect("bob", "phone").await;
    let got = messages(&mut bob_events, 1000, 30).await;
    assert_in_order(&got, 1);
    for (i, (message, _)) in got.iter().enumerate() {
        assert_eq!(message.text, format!("m{i}"));
    }
    quiet(&mut bob_events, 500).await;
    // More than the writer remembers per user (512) arrived unacknowledged, so the receipt
    // for Bob's ack comes from reading his inbox back.
    let delivered = wait_for(&mut alice_events, 10, |e| match e {
        Event::Receipt { receipt, .. }
            if receipt.kind == ReceiptKind::Delivered as i32 && receipt.up_to_seq == 1000 =>
        {
            Some(receipt)
        }
        _ => None,
    })
    .await;
    assert_eq!(delivered.user_id, "bob");
    server.stop().await;
}

#[tokio::test]
async fn sync_switches_to_live_without_gap_or_duplicate() {
    let server = TestServer::start().await;
    let (alice, _a) = server.connect("alice", "phone").await;
    let alice = Arc::new(alice);
    for i in 0..300 {
        alice
            .send(SendTarget::User("bob".into()), &format!("m{i}"), None)
            .await
            .unwrap();
    }
    // Alice keeps sending while Bob connects and syncs the backlog.
    let sender = {
        let alice = alice.clone();
        tokio::spawn(async move {
            for i in 300..600 {
                alice
                    .send(SendTarget::User("bob".into()), &format!("m{i}"), None)
                    .await
                    .unwrap();
            }
        })
    };
    let (_bob, mut bob_events) = server.connect("bob", "phone").await;
    let got = messages(&mut bob_events, 600, 30).await;
    sender.await.unwrap();
    assert_in_order(&got, 1);
    quiet(&mut bob_events, 500).await;
    server.stop().await;
}

#[tokio::test]
async fn both_devices_of_a_user_receive_and_see_their_own_sends() {
    let server = TestServer::start().await;
    let (phone, mut phone_events) = server.connect("alice", "phone").await;
    let (_tablet, mut tablet_events) = server.connect("alice", "tablet").await;
    let (bob, mut bob_events) = server.connect("bob", "laptop").await;

    bob.send(SendTarget::User("alice".into()), "to both", None)
        .await
        .unwrap();
    assert_eq!(
        messages(&mut phone_events, 1, 10).await[0].0.text,
        "to both"
    );
    assert_eq!(
        messages(&mut tablet_events, 1, 10).await[0].0.text,
        "to both"
    );

    let sent = phone
        .send(SendTarget::User("bob".into()), "from phone", None)
        .await
        .unwrap();
    let on_tablet = messages(&mut tablet_events, 1, 10).await;
    assert_eq!(on_tablet[0].0.text, "from phone");
    assert_eq!(on_tablet[0].0.sender_device, "phone");
    assert_eq!(
        messages(&mut bob_events, 1, 10).await[0].0.message_id,
        sent.message_id
    );
    // The sending device is not sent its own message back.
    quiet(&mut phone_events, 300).await;
    assert!(phone.inbox_cursor() >= sent.inbox_seq);
    server.stop().await;
}

#[tokio::test]
async fn retried_client_message_id_stores_one_message() {
    let server = TestServer::start().await;
    let (alice, _a) = server.connect("alice", "phone").await;
    let first = alice
        .send(
            SendTarget::User("bob".into()),
            "once",
            Some("cmid-1".into()),
        )
        .await
        .unwrap();
    let again = alice
        .send(
            SendTarget::User("bob".into()),
            "once",
            Some("cmid-1".into()),
        )
        .await
        .unwrap();
    assert!(!first.duplicate);
    assert!(again.duplicate);
    assert_eq!(
        (first.message_id.as_str(), first.seq),
        (again.message_id.as_str(), again.seq)
    );
    let page = alice.history(&first.conversation_id, 0, 10).await.unwrap();
    assert_eq!(page.messages.len(), 1);
    // Also across a reconnect.
    drop(alice);
    let (alice, _a) = server.connect("alice", "phone").await;
    let third = alice
        .send(
            SendTarget::User("bob".into()),
            "once",
            Some("cmid-1".into()),
        )
        .await
        .unwrap();
    assert_eq!(third.message_id, first.message_id);
    assert!(third.duplicate);
    server.stop().await;
}

#[tokio::test]
async fn groups_create_add_remove_leave_dissolve() {
    let server = TestServer::start().await;
    let (alice, mut alice_events) = server.connect("alice", "phone").await;
    let (bob, mut bob_events) = server.connect("bob", "phone").await;
    let (carol, mut carol_events) = server.connect("carol", "phone").await;
    let (eve, _e) = server.connect("eve", "phone").await;

    let group = alice
        .create_group("friends", &["bob".into(), "carol".into()])
        .await
        .unwrap();
    let id = group.conversation_id.clone();
    assert_eq!(group.members.len(), 3);
    let created = wait_for(&mut carol_events, 10, |e| match e {
        Event::Conversation { event, .. } => Some(event),
        _ => None,
    })
    .await;
    assert_eq!(created.kind, ConversationEventKind::Created as i32);

    bob.send(SendTarget::Conversation(id.clone()), "hello group", None)
        .await
        .unwrap();
    assert_eq!(
        messages(&mut alice_events, 1, 10).await[0].0.text,
        "hello group"
    );
    assert_eq!(
        messages(&mut carol_events, 1, 10).await[0].0.text,
        "hello group"
    );

    // Non-members can neither send nor read.
    assert_eq!(
        code_of(
            eve.send(SendTarget::Conversation(id.clone()), "let me in", None)
                .await
        ),
        ErrorCode::Forbidden
    );
    assert_eq!(code_of(eve.history(&id, 0, 10).await), ErrorCode::Forbidden);
    // Members cannot manage the group; only owner and admins can.
    assert_eq!(
        code_of(bob.add_members(&id, &["eve".into()]).await),
        ErrorCode::Forbidden
    );

    let (dave, mut dave_events) = server.connect("dave", "phone").await;
    let after_add = alice.add_members(&id, &["dave".into()]).await.unwrap();
    assert_eq!(after_add.members.len(), 4);
    let added = wait_for(&mut dave_events, 10, |e| match e {
        Event::Conversation { event, .. } => Some(event),
        _ => None,
    })
    .await;
    assert_eq!(
        (added.kind, added.subject.as_str()),
        (ConversationEventKind::MemberAdded as i32, "dave")
    );

    alice.remove_member(&id, "carol").await.unwrap();
    let removed = wait_for(&mut carol_events, 10, |e| match e {
        Event::Conversation { event, .. }
            if event.kind == ConversationEventKind::MemberRemoved as i32 =>
        {
            Some(event)
        }
        _ => None,
    })
    .await;
    assert_eq!(
        (removed.subject.as_str(), removed.actor.as_str()),
        ("carol", "alice")
    );
    dave.send(SendTarget::Conversation(id.clone()), "carol is gone", None)
        .await
        .unwrap();
    assert_eq!(
        messages(&mut bob_events, 1, 10).await[0].0.text,
        "carol is gone"
    );
    quiet(&mut carol_events, 500).await;
    assert_eq!(
        code_of(
            carol
                .send(SendTarget::Conversation(id.clone()), "still here?", None)
                .await
        ),
        ErrorCode::Forbidden
    );

    let after_leave = bob.leave_group(&id).await.unwrap();
    assert!(after_leave.members.iter().all(|m| m.user_id != "bob"));
    assert_eq!(
        code_of(alice.leave_group(&id).await),
        ErrorCode::Forbidden,
        "the owner cannot just leave"
    );
    assert_eq!(
        code_of(dave.dissolve_group(&id).await),
        ErrorCode::Forbidden
    );
    let dissolved = alice.dissolve_group(&id).await.unwrap();
    assert!(dissolved.dissolved);
    assert_eq!(
        code_of(
            alice
                .send(SendTarget::Conversation(id.clone()), "anyone?", None)
                .await
        ),
        ErrorCode::Forbidden
    );
    server.stop().await;
}

#[tokio::test]
async fn group_member_limit_is_enforced() {
    let server = TestServer::start_with(|c| c.max_group_members = 3).await;
    let (alice, _a) = server.connect("alice", "phone").await;
    let members: Vec<String> = ["b", "c", "d"].iter().map(|s| (*s).to_owned()).collect();
    assert_eq!(
        code_of(alice.create_group("big", &members).await),
        ErrorCode::LimitExceeded
    );
    let group = alice.create_group("small", &members[..2]).await.unwrap();
    assert_eq!(
        code_of(
            alice
                .add_members(&group.conversation_id, &["e".into()])
                .await
        ),
        ErrorCode::LimitExceeded
    );
    server.stop().await;
}

#[tokio::test]
async fn oversized_message_gets_a_typed_error_and_the_stream_goes_on() {
    let server = TestServer::start_with(|c| c.max_message_bytes = 1000).await;
    let (alice, _a) = server.connect("alice", "phone").await;
    let big = "x".repeat(1001);
    assert_eq!(
        code_of(alice.send(SendTarget::User("bob".into()), &big, None).await),
        ErrorCode::MessageTooLarge
    );
    let ok = alice
        .send(SendTarget::User("bob".into()), "small", None)
        .await
        .unwrap();
    assert_eq!(ok.seq, 1);
    server.stop().await;
}

#[tokio::test]
async fn history_pages_backwards() {
    let server = TestServer::start().await;
    let (alice, _a) = server.connect("alice", "phone").await;
    let mut conv = String::new();
    for i in 1..=25 {
        conv = alice
            .send(SendTarget::User("bob".into()), &format!("{i}"), None)
            .await
            .unwrap()
            .conversation_id;
    }
    let page = alice.history(&conv, 0, 10).await.unwrap();
    assert_eq!(
        page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        (16..=25).rev().collect::<Vec<_>>()
    );
    assert!(page.has_more);
    let page = alice.history(&conv, 6, 10).await.unwrap();
    assert_eq!(
        page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![5, 4, 3, 2, 1]
    );
    assert!(!page.has_more);
    server.stop().await;
}

#[tokio::test]
async fn device_too_far_behind_gets_too_long_then_live() {
    let server = TestServer::start_with(|c| c.sync_limit = 5).await;
    let (alice, _a) = server.connect("alice", "phone").await;
    for i in 0..10 {
        alice
            .send(SendTarget::User("bob".into()), &format!("{i}"), None)
            .await
            .unwrap();
    }
    let (bob, mut bob_events) = server.connect("bob", "phone").await;
    let (head, heads) = wait_for(&mut bob_events, 10, |e| match e {
        Event::SyncTooLong { inbox_head, heads } => Some((inbox_head, heads)),
        Event::Message { .. } => panic!("no entries before the too-long answer"),
        _ => None,
    })
    .await;
    assert_eq!(head, 10);
    assert_eq!(heads.len(), 1);
    assert_eq!(heads[0].conversation.as_ref().unwrap().last_seq, 10);
    // History fills in what the device needs, and live delivery continues after the head.
    assert_eq!(
        bob.history(
            &heads[0].conversation.as_ref().unwrap().conversation_id,
            0,
            3
        )
        .await
        .unwrap()
        .messages
        .len(),
        3
    );
    alice
        .send(SendTarget::User("bob".into()), "live", None)
        .await
        .unwrap();
    let live = messages(&mut bob_events, 1, 10).await;
    assert_eq!((live[0].0.text.as_str(), live[0].1), ("live", 11));
    server.stop().await;
}

#[tokio::test]
async fn blocked_conversation_does_not_delay_another() {
    let server = TestServer::start().await;
    let (alice, _a) = server.connect("alice", "phone").await;
    let (bob, mut bob_events) = server.connect("bob", "phone").await;
    let direct = tern_protocol::ids::direct_conversation_id("alice", "bob");
    let group = alice
        .create_group("b", &["bob".into()])
        .await
        .unwrap()
        .conversation_id;
    wait_for(&mut bob_events, 10, |e| {
        matches!(e, Event::Conversation { .. }).then_some(())
    })
    .await;

    // Bob stops reading the direct conversation; 40 messages of 60 KB overflow its stream's
    // flow-control window (quinn's default is 1.25 MB per stream).
    bob.pause_conversation(&direct, true);
    let big = "x".repeat(60_000);
    for _ in 0..40 {
        alice
            .send(SendTarget::User("bob".into()), &big, None)
            .await
            .unwrap();
    }
    for i in 0..5 {
        alice
            .send(
                SendTarget::Conversation(group.clone()),
                &format!("small {i}"),
                None,
            )
            .await
            .unwrap();
    }
    // The group's messages arrive while the direct stream is still blocked.
    let mut direct_seen = 0;
    let mut group_seen = Vec::new();
    while group_seen.len() < 5 {
        let (message, _) = messages(&mut bob_events, 1, 10).await.remove(0);
        if message.conversation_id == group {
            group_seen.push(message.seq);
        } else {
            direct_seen += 1;
        }
    }
    assert_eq!(group_seen, vec![1, 2, 3, 4, 5]);
    assert!(
        direct_seen < 40,
        "the direct stream was not blocked ({direct_seen} arrived)"
    );

    // Unblocked, the rest of the direct conversation arrives, each message once.
    bob.pause_conversation(&direct, false);
    let rest = messages(&mut bob_events, 40 - direct_seen, 30).await;
    assert!(rest.iter().all(|(m, _)| m.conversation_id == direct));
    quiet(&mut bob_events, 500).await;
    server.stop().await;
}

#[tokio::test]
async fn idle_conversation_streams_close_so_many_conversations_fit_the_stream_limit() {
    // 100 conversations through a server that allows 16 concurrent client streams.
    let server = TestServer::start_with(|c| c.max_client_bidi_streams = 16).await;
    let mut config = server.config(&server.token("alice", "phone"));
    config.transport.conversation_idle = Duration::from_millis(100);
    let (alice, _a) = tern_client::Client::connect(config).await.unwrap();
    for i in 0..100 {
        let sent = tokio::time::timeout(
            Duration::from_secs(10),
            alice.send(SendTarget::User(format!("user{i}")), "hi", None),
        )
        .await
        .expect("send stalled on the stream limit")
        .unwrap();
        assert_eq!(sent.seq, 1);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(alice.open_conversation_streams().await, 0);
    // A conversation whose stream was closed opens a new one on the next send.
    let sent = alice
        .send(SendTarget::User("user0".into()), "again", None)
        .await
        .unwrap();
    assert_eq!(sent.seq, 2);
    server.stop().await;
}

#[tokio::test]
async fn a_busy_client_is_granted_more_streams_than_it_starts_with() {
    // A connection starts with 8 streams (tern_server::streams::INITIAL_BIDI_STREAMS) and is
    // granted more as it opens them: 40 conversations at once must all stay open.
    let server = TestServer::start().await;
    let (alice, _a) = server.connect("alice", "phone").await;
    let alice = std::sync::Arc::new(alice);
    let mut sends = tokio::task::JoinSet::new();
    for i in 0..40 {
        let alice = alice.clone();
        sends.spawn(async move {
            alice
                .send(SendTarget::User(format!("user{i}")), "hi", None)
                .await
        });
    }
    let sent = tokio::time::timeout(Duration::from_secs(10), sends.join_all())
        .await
        .expect("sends stalled on stream credit");
    assert!(sent.iter().all(|s| s.as_ref().is_ok_and(|s| s.seq == 1)));
    assert_eq!(alice.open_conversation_streams().await, 40);
    server.stop().await;
}

#[tokio::test]
async fn large_messages_sync_in_pages_that_fit_a_frame() {
    let server = TestServer::start().await;
    let (alice, _a) = server.connect("alice", "phone").await;
    let big = "y".repeat(60_000);
    for _ in 0..10 {
        alice
            .send(SendTarget::User("bob".into()), &big, None)
            .await
            .unwrap();
    }
    // 600 KB of backlog: more than one 128 KiB frame, so it must come in several pages.
    let (bob, mut bob_events) = server.connect("bob", "phone").await;
    let got = messages(&mut bob_events, 10, 20).await;
    assert_in_order(&got, 1);
    assert!(got.iter().all(|(m, _)| m.text.len() == 60_000));
    let page = bob.history("d:alice:bob", 0, 500).await.unwrap();
    assert!(page.has_more && !page.messages.is_empty() && page.messages.len() < 10);
    server.stop().await;
}

#[tokio::test]
async fn pipelined_sends_of_mixed_sizes_read_back_whole_from_sync_and_history() {
    // Sends pipelined on one stream land in few write groups, so the log stores several
    // messages per record, and large ones close a record early (store/log.rs). Sync and
    // history must still find every message whole, in order, across those records.
    let server = TestServer::start().await;
    let (alice, _a) = server.connect("alice", "phone").await;
    let alice = Arc::new(alice);
    let text = |i: usize| {
        if i.is_multiple_of(3) {
            format!("{i}:{}", "z".repeat(20_000))
        } else {
            format!("{i}")
        }
    };
    let sends: Vec<_> = (0..120)
        .map(|i| {
            let alice = alice.clone();
            let text = text(i);
            tokio::spawn(async move {
                let sent = alice
                    .send(SendTarget::User("bob".into()), &text, None)
                    .await;
                sent.map(|sent| (sent.seq, text))
            })
        })
        .collect();
    let mut expected = std::collections::BTreeMap::new();
    for send in sends {
        let (seq, text) = tokio::time::timeout(Duration::from_secs(20), send)
            .await
            .expect("a send got no answer")
            .unwrap()
            .unwrap();
        expected.insert(seq, text);
    }
    assert_eq!(
        expected.keys().copied().collect::<Vec<_>>(),
        (1..=120).collect::<Vec<u64>>()
    );

    let (bob, mut bob_events) = server.connect("bob", "phone").await;
    let got = messages(&mut bob_events, 120, 30).await;
    assert_in_order(&got, 1);
    for (message, _) in &got {
        assert_eq!(
            Some(&message.text),
            expected.get(&message.seq),
            "synced message {}",
            message.seq
        );
    }
    let mut history = Vec::new();
    let mut before = 0;
    loop {
        let page = bob.history("d:alice:bob", before, 500).await.unwrap();
        before = page.messages.last().map_or(0, |m| m.seq);
        history.extend(page.messages);
        if !page.has_more {
            break;
        }
    }
    assert_eq!(
        history.iter().map(|m| m.seq).collect::<Vec<_>>(),
        (1..=120).rev().collect::<Vec<u64>>()
    );
    for message in &history {
        assert_eq!(
            Some(&message.text),
            expected.get(&message.seq),
            "history message {}",
            message.seq
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn a_big_group_answers_with_a_capped_member_list() {
    let server = TestServer::start().await;
    let (alice, _a) = server.connect("alice", "phone").await;
    let members: Vec<String> = (0..2000).map(|i| format!("member{i}")).collect();
    let group = alice.create_group("crowd", &members).await.unwrap();
    assert_eq!(group.member_count, 2001);
    assert!(group.members_truncated);
    assert_eq!(group.members.len(), 1000);
    let fetched = alice.conversation(&group.conversation_id).await.unwrap();
    assert_eq!(fetched.member_count, 2001);
    let list = alice.conversations().await.unwrap();
    assert_eq!(list.len(), 1);
    server.stop().await;
}

#[tokio::test]
async fn only_events_the_app_took_are_acknowledged() {
    let server = TestServer::start().await;
    let (alice, _a) = server.connect("alice", "phone").await;
    let (_bob, mut bob_events) = server.connect("bob", "phone").await;
    for i in 0..5 {
        alice
            .send(SendTarget::User("bob".into()), &format!("{i}"), None)
            .await
            .unwrap();
    }
    // The client has received them, but the app has not taken them: nothing acknowledged.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(server.state.store.cursor("bob", "phone").unwrap(), 0);
    messages(&mut bob_events, 5, 10).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while server.state.store.cursor("bob", "phone").unwrap() < 5 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "taken events were not acknowledged"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.stop().await;
}

#[tokio::test]
async fn removed_members_get_no_receipts() {
    let server = TestServer::start().await;
    let (alice, _a) = server.connect("alice", "phone").await;
    let (carol, _c) = server.connect("carol", "phone").await;
    let group = alice
        .create_group("g", &["bob".into(), "carol".into()])
        .await
        .unwrap()
        .conversation_id;
    let sent = carol
        .send(SendTarget::Conversation(group.clone()), "before", None)
        .await
        .unwrap();
    alice.remove_member(&group, "carol").await.unwrap();
    let carol_head = server.state.store.inbox_head("carol").unwrap();
    let (bob, _b) = server.connect("bob", "phone").await;
    bob.mark_read(&group, sent.seq).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        server.state.store.inbox_head("carol").unwrap(),
        carol_head,
        "carol got a receipt"
    );
    server.stop().await;
}

#[tokio::test]
async fn frames_follow_the_cap_the_server_announces() {
    // Frames four times the protocol default: a 300 KB message is over the cap clients start
    // with, so it goes out, is pushed and syncs only if the client took the cap from Welcome.
    let server = TestServer::start_with(|c| {
        c.max_frame_bytes = 512 * 1024;
        c.max_message_bytes = 400 * 1024;
    })
    .await;
    let (alice, _a) = server.connect("alice", "phone").await;
    let (_bob_live, mut live_events) = server.connect("bob", "tablet").await;
    let big = "z".repeat(300_000);
    alice
        .send(SendTarget::User("bob".into()), &big, None)
        .await
        .unwrap();
    let pushed = messages(&mut live_events, 1, 10).await;
    assert_eq!(pushed[0].0.text.len(), 300_000);
    let (_bob_later, mut synced_events) = server.connect("bob", "phone").await;
    let synced = messages(&mut synced_events, 1, 10).await;
    assert_eq!(synced[0].0.text.len(), 300_000);
    server.stop().await;
}

#[tokio::test]
async fn a_writer_cache_of_two_drops_and_reloads_without_losing_order_or_receipts() {
    // Five users in ten 1:1 conversations, with room for two users and two conversations
    // in the writer's caches: nearly every send reloads what it touches from disk.
    let server = TestServer::start_with(|c| c.store_cache_entries = 2).await;
    let users: Vec<String> = (0..5).map(|i| format!("u{i}")).collect();
    let mut clients = Vec::new();
    for user in &users {
        clients.push(server.connect(user, "phone").await);
    }
    for round in 0..4 {
        for (s, sender) in users.iter().enumerate() {
            for recipient in users.iter().filter(|r| *r != sender) {
                clients[s]
                    .0
                    .send(
                        SendTarget::User(recipient.clone()),
                        &format!("{sender}>{recipient}#{round}"),
                        None,
                    )
                    .await
                    .unwrap();
            }
        }
    }
    assert!(
        server.state.store.cache_evictions() > 0,
        "the caches were trimmed"
    );
    // Live: each user got 4 messages from each of the 4 others, in conversation order.
    for (i, (_, events)) in clients.iter_mut().enumerate() {
        let got = messages(events, 16, 10).await;
        for sender in users.iter().filter(|s| **s != users[i]) {
            let from: Vec<&pb::Message> = got
                .iter()
                .map(|(m, _)| m)
                .filter(|m| m.sender == *sender)
                .collect();
            let texts: Vec<String> = from.iter().map(|m| m.text.clone()).collect();
            let expected: Vec<String> = (0..4)
                .map(|r| format!("{sender}>{}#{r}", users[i]))
                .collect();
            assert_eq!(texts, expected);
            assert!(from.windows(2).all(|w| w[0].seq < w[1].seq));
        }
        quiet(events, 200).await;
    }
    // Delivered receipts reach u0 for the last message it sent in each conversation, seq 7
    // (each conversation's seq 8 is the other user's answer).
    let mut receipted = std::collections::BTreeSet::new();
    while receipted.len() < 4 {
        let receipt = wait_for(&mut clients[0].1, 10, |e| match e {
            Event::Receipt { receipt, .. }
                if receipt.kind == ReceiptKind::Delivered as i32 && receipt.up_to_seq == 7 =>
            {
                Some(receipt)
            }
            _ => None,
        })
        .await;
        receipted.insert(receipt.user_id);
    }
    // A new device of each user syncs its whole inbox: every conversation's seqs 1 to 8.
    for user in &users {
        let (_tablet, mut events) = server.connect(user, "tablet").await;
        let got = messages(&mut events, 32, 10).await;
        let mut seqs: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
        for (m, _) in &got {
            seqs.entry(m.conversation_id.clone())
                .or_default()
                .push(m.seq);
        }
        assert_eq!(seqs.len(), 4, "{user}: {seqs:?}");
        assert!(
            seqs.values().all(|s| *s == (1..=8).collect::<Vec<u64>>()),
            "{user}: {seqs:?}"
        );
        quiet(&mut events, 200).await;
    }
    server.stop().await;
}

#[tokio::test]
async fn starting_conversations_is_rate_limited_per_user_with_a_typed_wait() {
    // Three starts at once, then one every 3 s (slow enough that the refusals below come
    // before a token is back, on a loaded machine too).
    let server = TestServer::start_with(|c| {
        c.conversation_starts_burst = 3;
        c.conversation_starts_per_minute = 20;
    })
    .await;
    let (alice, _a) = server.connect("alice", "phone").await;
    for peer in ["p1", "p2", "p3"] {
        alice
            .send(SendTarget::User(peer.into()), "hi", None)
            .await
            .unwrap();
    }
    match alice.send(SendTarget::User("p4".into()), "hi", None).await {
        Err(ClientError::Server {
            code: ErrorCode::RateLimited,
            retry_after_ms,
            ..
        }) => assert!((1..=3000).contains(&retry_after_ms), "{retry_after_ms}"),
        other => panic!("expected RATE_LIMITED, got {other:?}"),
    }
    let refused = alice
        .create_group("crowd", &["p5".to_string()])
        .await
        .map(drop);
    assert_eq!(code_of(refused), ErrorCode::RateLimited);
    // Existing conversations go on, and other users are not limited.
    let again = alice
        .send(SendTarget::User("p1".into()), "again", None)
        .await
        .unwrap();
    assert_eq!(again.seq, 2);
    let (bob, _b) = server.connect("bob", "phone").await;
    bob.send(SendTarget::User("p9".into()), "hi", None)
        .await
        .unwrap();
    // The refused start stored nothing: p4 has no conversation.
    let (p4, _p4_events) = server.connect("p4", "phone").await;
    assert!(p4.conversations().await.unwrap().is_empty());
    // Three seconds later a token is back.
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let started = alice
        .send(SendTarget::User("p4".into()), "now", None)
        .await
        .unwrap();
    assert_eq!(started.seq, 1);
    server.stop().await;
}

#[tokio::test]
async fn sending_messages_is_rate_limited_per_user_with_a_typed_wait() {
    // Four at once, then one every 3 s (slow enough that the refusals below come before a
    // token is back, on a loaded machine too), per user over all devices and conversations.
    let server = TestServer::start_with(|c| {
        c.messages_burst = 4;
        c.messages_per_minute = 20;
    })
    .await;
    let (alice, _a) = server.connect("alice", "phone").await;
    let (alice_laptop, _l) = server.connect("alice", "laptop").await;
    let (bob, mut bob_events) = server.connect("bob", "phone").await;
    let first = alice
        .send(SendTarget::User("bob".into()), "0", Some("app-id-0".into()))
        .await
        .unwrap();
    for (i, peer) in [(1, "bob"), (2, "carol")] {
        alice
            .send(SendTarget::User(peer.into()), &i.to_string(), None)
            .await
            .unwrap();
    }
    alice_laptop
        .send(SendTarget::User("bob".into()), "3", None)
        .await
        .unwrap();
    for (client, peer) in [(&alice, "bob"), (&alice_laptop, "dave")] {
        match client
            .send(SendTarget::User(peer.into()), "over", None)
            .await
        {
            Err(ClientError::Server {
                code: ErrorCode::RateLimited,
                retry_after_ms,
                ..
            }) => assert!((1..=3000).contains(&retry_after_ms), "{retry_after_ms}"),
            other => panic!("expected RATE_LIMITED, got {other:?}"),
        }
    }
    // A repeat of a stored message is answered, not refused: it stores nothing.
    let repeat = alice
        .send(SendTarget::User("bob".into()), "0", Some("app-id-0".into()))
        .await
        .unwrap();
    assert!(repeat.duplicate);
    assert_eq!(repeat.seq, first.seq);
    // Other users are not limited.
    bob.send(SendTarget::User("erin".into()), "hi", None)
        .await
        .unwrap();
    // The refused sends stored nothing: Bob got 0, 1 and 3, and dave has no conversation.
    let got = messages(&mut bob_events, 3, 10).await;
    let texts: Vec<&str> = got.iter().map(|(m, _)| m.text.as_str()).collect();
    assert_eq!(texts, ["0", "1", "3"]);
    quiet(&mut bob_events, 300).await;
    let (dave, _d) = server.connect("dave", "phone").await;
    assert!(dave.conversations().await.unwrap().is_empty());
    // Three seconds later a token is back.
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let sent = alice
        .send(SendTarget::User("bob".into()), "4", None)
        .await
        .unwrap();
    assert_eq!(sent.seq, 4);
    server.stop().await;
}

#[tokio::test]
async fn adding_group_members_is_rate_limited_per_user_with_a_typed_wait() {
    // Five additions at once, then one every 3 s (slow enough that the refusals below come
    // before a token is back, on a loaded machine too); group starts are not the limit here.
    let server = TestServer::start_with(|c| {
        c.member_additions_burst = 5;
        c.member_additions_per_minute = 20;
    })
    .await;
    let (alice, _a) = server.connect("alice", "phone").await;
    let names = |r: std::ops::Range<u32>| r.map(|i| format!("m{i}")).collect::<Vec<_>>();
    // Creating a group adds all but its creator: 3 of the 5.
    let group = alice.create_group("crew", &names(0..3)).await.unwrap();
    let id = group.conversation_id.clone();
    match alice.add_members(&id, &names(3..6)).await {
        Err(ClientError::Server {
            code: ErrorCode::RateLimited,
            retry_after_ms,
            ..
        }) => assert!((1..=3000).contains(&retry_after_ms), "{retry_after_ms}"),
        other => panic!("expected RATE_LIMITED, got {other:?}"),
    }
    // The refused addition changed nothing, and a group needing more than is left is
    // refused too, without starting.
    let members = alice.conversation(&id).await.unwrap().member_count;
    assert_eq!(members, 4);
    let refused = alice.create_group("big", &names(10..13)).await.map(drop);
    assert_eq!(code_of(refused), ErrorCode::RateLimited);
    // Members already in the group cost nothing; the two left add two.
    let grown = alice.add_members(&id, &names(1..5)).await.unwrap();
    assert_eq!(grown.member_count, 6);
    // More than the burst at once can never be allowed.
    let too_many = alice.add_members(&id, &names(20..26)).await.map(drop);
    assert_eq!(code_of(too_many), ErrorCode::LimitExceeded);
    // Others are not limited.
    let (bob, _b) = server.connect("bob", "phone").await;
    bob.create_group("other", &names(0..5)).await.unwrap();
    // Three seconds later one addition is allowed again.
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let later = alice.add_members(&id, &names(6..7)).await.unwrap();
    assert_eq!(later.member_count, 7);
    server.stop().await;
}

#[tokio::test]
async fn a_burst_of_pipelined_sends_gets_every_answer_in_step() {
    // More sends in flight on one stream than the server writes answers at once (64): each
    // must get its own answer, none lost or shifted to the next send.
    let server = TestServer::start().await;
    let (alice, _a) = server.connect("alice", "phone").await;
    let alice = Arc::new(alice);
    let sends = common::spawn_sends(&alice, "bob", 300);
    let mut seqs = Vec::new();
    for send in sends {
        let sent = tokio::time::timeout(Duration::from_secs(20), send)
            .await
            .expect("a send got no answer")
            .unwrap()
            .unwrap();
        let stored = server
            .state
            .store
            .message(&sent.conversation_id, sent.seq)
            .unwrap();
        assert_eq!(stored.client_message_id, sent.client_message_id);
        seqs.push(sent.seq);
    }
    assert_eq!(seqs, (1..=300).collect::<Vec<u64>>());
    assert_eq!(alice.stats().reconnects, 0);
    server.stop().await;
}

/// A raw session of `user`: Hello answered by Welcome, then one conversation stream to
/// `peer`, on which `send` writes a `SendMessage` and reads its answer.
struct RawConversation {
    _endpoint: quinn::Endpoint,
    _conn: quinn::Connection,
    _control: quinn::SendStream,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    buf: bytes::BytesMut,
}

impl RawConversation {
    async fn open(server: &TestServer, user: &str, peer: &str) -> Self {
        let max = 1 << 20;
        let (endpoint, conn) = tern_client::Client::connect_raw(&server.config(""))
            .await
            .unwrap();
        let (mut control, mut control_recv) = conn.open_bi().await.unwrap();
        let hello = pb::ClientFrame {
            body: Some(pb::client_frame::Body::Hello(pb::Hello {
                protocol_version: 1,
                token: server.token(user, "raw"),
                ..Default::default()
            })),
        };
        control
            .write_all(&tern_protocol::frame::frame_bytes(&hello, max).unwrap())
            .await
            .unwrap();
        let mut buf = bytes::BytesMut::new();
        let welcome = read_server_frame(&mut control_recv, &mut buf).await;
        assert!(
            matches!(welcome.body, Some(pb::server_frame::Body::Welcome(_))),
            "{welcome:?}"
        );
        let (mut send, recv) = conn.open_bi().await.unwrap();
        let open = pb::ClientFrame {
            body: Some(pb::client_frame::Body::OpenConversation(
                pb::OpenConversation {
                    direct_peer: peer.into(),
                    ..Default::default()
                },
            )),
        };
        send.write_all(&tern_protocol::frame::frame_bytes(&open, max).unwrap())
            .await
            .unwrap();
        Self {
            _endpoint: endpoint,
            _conn: conn,
            _control: control,
            send,
            recv,
            buf: bytes::BytesMut::new(),
        }
    }

    async fn send(&mut self, msg: pb::SendMessage) -> pb::SendAck {
        let frame = pb::ClientFrame {
            body: Some(pb::client_frame::Body::Send(msg)),
        };
        self.send
            .write_all(&tern_protocol::frame::frame_bytes(&frame, 1 << 20).unwrap())
            .await
            .unwrap();
        match read_server_frame(&mut self.recv, &mut self.buf).await.body {
            Some(pb::server_frame::Body::SendAck(ack)) => ack,
            other => panic!("expected a SendAck, got {other:?}"),
        }
    }
}

async fn read_server_frame(
    recv: &mut quinn::RecvStream,
    buf: &mut bytes::BytesMut,
) -> pb::ServerFrame {
    loop {
        if let Some(frame) = tern_protocol::decode_frame(buf, 1 << 20).unwrap() {
            return frame;
        }
        let chunk = tokio::time::timeout(Duration::from_secs(10), recv.read_chunk(1 << 16, true))
            .await
            .expect("timed out reading a frame")
            .unwrap()
            .expect("stream ended");
        buf.extend_from_slice(&chunk.bytes);
    }
}

fn retry_scoped(id: &str, retry_after_inbox_seq: Option<u64>) -> pb::SendMessage {
    pb::SendMessage {
        client_message_id: id.into(),
        text: id.into(),
        id_scope: pb::IdScope::Retries as i32,
        retry_after_inbox_seq,
        ..Default::default()
    }
}

#[tokio::test]
async fn retry_scoped_ids_are_found_after_the_named_sequence_and_late_first_attempts_too() {
    let server = TestServer::start().await;
    let mut alice = RawConversation::open(&server, "alice", "bob").await;
    let first = alice.send(retry_scoped("r-1", None)).await;
    assert!(!first.duplicate);
    // Other traffic in alice's inbox between the first attempt and its retry.
    let (bob, _b) = server.connect("bob", "phone").await;
    for i in 0..5 {
        bob.send(SendTarget::User("alice".into()), &format!("b{i}"), None)
            .await
            .unwrap();
    }
    // A retry naming a sequence stored before the first attempt finds the original.
    let retry = alice.send(retry_scoped("r-1", Some(0))).await;
    assert!(retry.duplicate);
    assert_eq!((retry.seq, retry.inbox_seq), (first.seq, first.inbox_seq));
    let retry = alice
        .send(retry_scoped("r-1", Some(first.inbox_seq - 1)))
        .await;
    assert!(retry.duplicate);
    // The server looks only after the named sequence: a retry claiming the first attempt came
    // later is stored anew. (This proves the lookup is the bounded scan, not an index.)
    let later = alice.send(retry_scoped("r-1", Some(first.inbox_seq))).await;
    assert!(!later.duplicate);
    assert_ne!(later.seq, first.seq);
    // Without a retry, a retry-scoped id is not looked up at all...
    let fresh = alice.send(retry_scoped("r-2", None)).await;
    let again = alice.send(retry_scoped("r-2", None)).await;
    assert!(!fresh.duplicate && !again.duplicate);
    // ...except against a retry stored as new: its first attempt may still arrive late, from
    // a connection the phone has left, and is then answered as the retry's duplicate.
    let retried = alice.send(retry_scoped("r-3", Some(again.inbox_seq))).await;
    assert!(!retried.duplicate);
    let late = alice.send(retry_scoped("r-3", None)).await;
    assert!(late.duplicate);
    assert_eq!(late.seq, retried.seq);
    // The default scope keeps its index: found at any time, whatever the fields say.
    let indexed = alice
        .send(pb::SendMessage {
            client_message_id: "app-1".into(),
            ..Default::default()
        })
        .await;
    let indexed_again = alice
        .send(pb::SendMessage {
            client_message_id: "app-1".into(),
            ..Default::default()
        })
        .await;
    assert!(!indexed.duplicate && indexed_again.duplicate);
    assert_eq!(indexed_again.seq, indexed.seq);
    // What was stored: r-1 twice (the original and the "later" one), r-2 twice, r-3 once,
    // app-1 once, and bob's five.
    let history = bob.history(&first.conversation_id, 0, 50).await.unwrap();
    let mut texts: Vec<String> = history.messages.iter().map(|m| m.text.clone()).collect();
    texts.sort();
    assert_eq!(
        texts,
        [
            "", "b0", "b1", "b2", "b3", "b4", "r-1", "r-1", "r-2", "r-2", "r-3"
        ]
    );
    server.stop().await;
}
