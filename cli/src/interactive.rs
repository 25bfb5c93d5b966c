//! Interactive terminal chat: incoming events as readable lines, each stdin line sent.

use tern_client::tern_protocol::pb;
use tern_client::{Client, ClientConfig, ConnectionState, Event, SendTarget};
use tokio::io::{AsyncBufReadExt, BufReader};

pub async fn run(config: ClientConfig, target: SendTarget) -> anyhow::Result<()> {
    let (client, events) = Client::connect(config).await?;
    let me = client.session().user.clone();
    let peer = match &target {
        SendTarget::User(user) => format!("user {user}"),
        SendTarget::Conversation(id) => format!("conversation {id}"),
    };
    println!("connected as {me}, chatting with {peer}; /quit or end of input to exit");
    let mut printer = tokio::spawn(print_events(events));
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let result = loop {
        tokio::select! {
            line = lines.next_line() => {
                let line = match line {
                    Ok(Some(line)) => line,
                    Ok(None) => break Ok(()),
                    Err(e) => break Err(e.into()),
                };
                let text = line.trim();
                if text == "/quit" {
                    break Ok(());
                }
                if text.is_empty() {
                    continue;
                }
                match client.send(target.clone(), text, None).await {
                    Ok(sent) => println!("[{} {}] {me}: {text}", sent.conversation_id, sent.seq),
                    Err(e) => break Err(e.into()),
                }
            }
            // The printer ends only when the session does.
            _ = &mut printer => break Err(anyhow::anyhow!("disconnected")),
            _ = tokio::signal::ctrl_c() => break Ok(()),
        }
    };
    printer.abort();
    client.close().await;
    result
}

async fn print_events(mut events: tern_client::Events) {
    while let Some(event) = events.recv().await {
        match event {
            Event::Message { message: m, .. } => {
                println!("[{} {}] {}: {}", m.conversation_id, m.seq, m.sender, m.text);
            }
            Event::Receipt { receipt: r, .. } => {
                let mark = match r.kind() {
                    pb::ReceiptKind::Read => "✓✓ read",
                    _ => "✓ delivered",
                };
                println!(
                    "{mark} up to {} by {} in {}",
                    r.up_to_seq, r.user_id, r.conversation_id
                );
            }
            Event::Conversation { event: e, .. } => {
                let kind = e
                    .kind()
                    .as_str_name()
                    .to_ascii_lowercase()
                    .replace('_', " ");
                let subject = if e.subject.is_empty() {
                    String::new()
                } else {
                    format!(": {}", e.subject)
                };
                println!("* {} {kind}{subject} by {}", e.conversation_id, e.actor);
            }
            Event::SyncTooLong { inbox_head, .. } => {
                println!("* too far behind: skipped to inbox {inbox_head} (see `history`)");
            }
            Event::Presence(p) => {
                println!(
                    "* {} is {}",
                    p.user_id,
                    p.status().as_str_name().to_ascii_lowercase()
                );
            }
            Event::Typing(t) => println!("* {} is typing in {}", t.user_id, t.conversation_id),
            Event::Connection(ConnectionState::Reconnecting { attempt, .. }) => {
                println!("* connection lost; reconnecting (attempt {attempt})");
            }
            Event::Connection(ConnectionState::Connected) => println!("* connected"),
            Event::Connection(ConnectionState::Disconnected { code, reason }) => {
                let code = code.map_or("", |c| c.as_str_name());
                println!("* disconnected {code}: {reason}");
                return;
            }
            _ => {}
        }
    }
}
