//! End to end: the real `tern-server` binary on defaults (dual-stack, generated certificates),
//! `tern-server token`, and `tern-chat whoami` against it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;

fn chat_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tern-chat"))
}

/// `tern-server` is built into the same directory by a workspace build or test run.
fn server_bin() -> PathBuf {
    let path = chat_bin().with_file_name(format!("tern-server{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "{} missing: run `cargo build --workspace` first",
        path.display()
    );
    path
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("[::]:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct ServerProcess(Child);

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn token(dir: &Path, user: &str, extra: &[&str]) -> String {
    let out = Command::new(server_bin())
        .args(["token", "--user", user])
        .args(extra)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "token: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn whoami(dir: &Path, port: u16, token: &str) -> Output {
    Command::new(chat_bin())
        .arg("whoami")
        .env("TERN_SERVER", format!("localhost:{port}"))
        .env("TERN_TOKEN", token)
        .env_remove("TERN_CA")
        .current_dir(dir)
        .output()
        .unwrap()
}

#[test]
fn token_then_whoami_against_the_real_server() {
    let dir = tempfile::tempdir().unwrap();
    let token = token(dir.path(), "alice", &["--device", "phone", "--ttl", "2h"]);

    // The token is a JWT whose payload carries sub, device and a future exp.
    let payload = token.split('.').nth(1).expect("three JWT parts");
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["device"], "phone");
    let exp = claims["exp"].as_u64().unwrap();
    assert!(
        exp > now + 7000 && exp <= now + 7200 + 5,
        "exp {exp} is not ~2h ahead"
    );

    let port = free_udp_port();
    let server = ServerProcess(
        Command::new(server_bin())
            .args(["--listen", &format!("[::]:{port}")])
            .current_dir(dir.path())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // First start generates certificates into ./certs and the secret stays the one in ./data.
    let deadline = Instant::now() + Duration::from_secs(20);
    let out = loop {
        let out = whoami(dir.path(), port, &token);
        if out.status.success() || Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        out.status.success(),
        "whoami: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let session: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(session["user"], "alice");
    assert_eq!(session["device"], "phone");
    assert!(session["server_time_ms"].as_u64().unwrap() / 1000 >= now - 5);
    for file in [
        "certs/ca.pem",
        "certs/server.pem",
        "certs/server.key",
        "data/jwt.secret",
    ] {
        assert!(dir.path().join(file).exists(), "{file} was not generated");
    }

    // A token from elsewhere is refused with a typed error and a failing exit status.
    let forged = format!("{}.{}.AAAA", token.split('.').next().unwrap(), payload);
    let out = whoami(dir.path(), port, &forged);
    assert!(!out.status.success());
    let error: serde_json::Value = serde_json::from_slice(&out.stderr).unwrap();
    assert_eq!(error["code"], "TOKEN_INVALID");

    // SIGTERM shuts the server down gracefully.
    let mut server = server;
    let status = Command::new("kill")
        .args(["-TERM", &server.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = server.0.try_wait().unwrap() {
            assert!(status.success(), "server exited with {status}");
            break;
        }
        assert!(Instant::now() < deadline, "server did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The real server on a free port, dual-stack, in `dir`; returns once `token` can sign in.
fn running_server(dir: &Path, token: &str) -> (ServerProcess, u16) {
    let port = free_udp_port();
    let server = ServerProcess(
        Command::new(server_bin())
            .args(["--listen", &format!("[::]:{port}")])
            .current_dir(dir)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !whoami(dir, port, token).status.success() {
        assert!(Instant::now() < deadline, "server did not come up");
        std::thread::sleep(Duration::from_millis(200));
    }
    (server, port)
}

fn chat(dir: &Path, port: u16, token: &str, args: &[&str]) -> Output {
    Command::new(chat_bin())
        .args(args)
        .env("TERN_SERVER", format!("localhost:{port}"))
        .env("TERN_TOKEN", token)
        .env_remove("TERN_CA")
        .current_dir(dir)
        .output()
        .unwrap()
}

fn json_lines(out: &Output) -> Vec<serde_json::Value> {
    assert!(
        out.status.success(),
        "tern-chat failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn messaging_commands_against_the_real_server() {
    let dir = tempfile::tempdir().unwrap();
    let (alice, bob, carol) = (
        token(dir.path(), "alice", &[]),
        token(dir.path(), "bob", &[]),
        token(dir.path(), "carol", &[]),
    );
    let (_server, port) = running_server(dir.path(), &alice);

    // Bob listens while Alice sends; listen prints what arrives as JSON lines.
    let listener = Command::new(chat_bin())
        .args(["listen", "--count", "2", "--timeout", "20"])
        .env("TERN_SERVER", format!("localhost:{port}"))
        .env("TERN_TOKEN", &bob)
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    let sent = &json_lines(&chat(
        dir.path(),
        port,
        &alice,
        &["send", "--to", "bob", "--id", "c1", "hello bob"],
    ))[0];
    assert_eq!(sent["seq"], 1);
    assert_eq!(sent["conversation_id"], "d:alice:bob");
    assert_eq!(sent["duplicate"], false);
    let again = &json_lines(&chat(
        dir.path(),
        port,
        &alice,
        &["send", "--to", "bob", "--id", "c1", "hello bob"],
    ))[0];
    assert_eq!(
        (&again["message_id"], &again["duplicate"]),
        (&sent["message_id"], &serde_json::json!(true))
    );

    let group = &json_lines(&chat(
        dir.path(),
        port,
        &alice,
        &["group", "create", "team", "--members", "bob,carol"],
    ))[0];
    let group_id = group["conversation_id"].as_str().unwrap().to_owned();
    assert_eq!(group["members"].as_array().unwrap().len(), 3);

    let heard: Vec<serde_json::Value> = json_lines(&listener.wait_with_output().unwrap())
        .into_iter()
        .filter(|e| e["type"] == "message" || e["type"] == "conversation")
        .collect();
    assert_eq!(heard[0]["type"], "message");
    assert_eq!(heard[0]["text"], "hello bob");
    assert_eq!(heard[0]["sender"], "alice");
    assert_eq!(heard[0]["seq"], 1);
    assert_eq!(heard[1]["type"], "conversation");
    assert_eq!(heard[1]["kind"], "created");

    // Carol was offline: sync prints what she missed, once.
    let missed = json_lines(&chat(dir.path(), port, &carol, &["sync"]));
    assert_eq!(missed.len(), 1);
    assert_eq!(missed[0]["conversation_id"], group_id.as_str());
    assert!(json_lines(&chat(dir.path(), port, &carol, &["sync"])).is_empty());
    assert_eq!(
        json_lines(&chat(dir.path(), port, &carol, &["sync", "--since", "0"])).len(),
        1
    );

    let read = &json_lines(&chat(dir.path(), port, &bob, &["read", "d:alice:bob", "1"]))[0];
    assert_eq!(read["read_up_to"], 1);
    // Alice syncs: the delivered receipt (from Bob's listen) and the read receipt.
    let receipts: Vec<String> = json_lines(&chat(dir.path(), port, &alice, &["sync"]))
        .iter()
        .filter(|e| e["type"] == "receipt")
        .map(|e| e["kind"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(receipts, vec!["delivered", "read"]);

    let history = json_lines(&chat(dir.path(), port, &bob, &["history", "d:alice:bob"]));
    assert_eq!(history.len(), 1);
    assert_eq!(history[0]["text"], "hello bob");

    let left = &json_lines(&chat(
        dir.path(),
        port,
        &carol,
        &["group", "leave", &group_id],
    ))[0];
    assert_eq!(left["members"].as_array().unwrap().len(), 2);
    let refused = chat(
        dir.path(),
        port,
        &carol,
        &["send", "--conversation", &group_id, "still here?"],
    );
    assert!(!refused.status.success());
    let error: serde_json::Value = serde_json::from_slice(&refused.stderr).unwrap();
    assert_eq!(error["code"], "FORBIDDEN");
}

#[test]
fn presence_and_typing_show_up_in_listen() {
    use std::io::BufRead;

    let dir = tempfile::tempdir().unwrap();
    let (alice, bob) = (
        token(dir.path(), "alice", &[]),
        token(dir.path(), "bob", &[]),
    );
    let (_server, port) = running_server(dir.path(), &alice);
    // A conversation makes them contacts.
    json_lines(&chat(
        dir.path(),
        port,
        &alice,
        &["send", "--to", "bob", "hi"],
    ));

    let mut listener = Command::new(chat_bin())
        .args(["listen", "--timeout", "8"])
        .env("TERN_SERVER", format!("localhost:{port}"))
        .env("TERN_TOKEN", &bob)
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<serde_json::Value>();
    let stdout = listener.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let _ = tx.send(serde_json::from_str(&line.unwrap()).unwrap());
        }
    });
    // Act once Bob is connected.
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("listen did not connect");
        if line["type"] == "connection" && line["state"] == "connected" {
            break;
        }
    }
    json_lines(&chat(dir.path(), port, &alice, &["typing", "d:alice:bob"]));
    json_lines(&chat(dir.path(), port, &alice, &["presence", "away"]));
    let mut typing = None;
    let mut away = None;
    while typing.is_none() || away.is_none() {
        let line = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("missing typing or presence line");
        if line["type"] == "typing" {
            typing = Some(line);
        } else if line["type"] == "presence" && line["status"] == "away" {
            away = Some(line);
        }
    }
    let typing = typing.unwrap();
    assert_eq!(
        (typing["user"].as_str(), typing["conversation_id"].as_str()),
        (Some("alice"), Some("d:alice:bob"))
    );
    assert_eq!(away.unwrap()["user"], "alice");
    let _ = listener.kill();
    let _ = listener.wait();
    let _ = reader.join();
}
