//! Metrics: the daemon serves Prometheus text at `metrics_listen` with
//! plausible values (the lag rises while the store is away and falls when
//! it is back), and one-shot commands write `metrics_textfile`.

#[macro_use]
mod common;

use common::{Btrship, LoopBtrfs};
use std::io::{Read, Write};
use std::time::{Duration, Instant};

/// `GET path` over plain HTTP/1.1: (status line, body).
fn get(addr: &str, path: &str) -> (String, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

/// The value of the sample whose name and labels start with `prefix`.
fn value(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn now_s() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[test]
fn the_daemon_serves_metrics_and_the_lag_follows_an_outage() {
    let fs_ = LoopBtrfs::new(256);
    let share = fs_.subvolume("share");
    let bs = Btrship::new();
    bs.ok(osargs!["init", &share, "--no-systemd"]);
    bs.set_config("share", "settle_ms", "100");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    bs.set_config("share", "metrics_listen", &format!("\"{addr}\""));
    let daemon = bs.start_daemon("share");
    std::fs::write(share.join("a.txt"), b"one\n").unwrap();
    bs.sync("share");

    let (status, text) = get(&addr, "/metrics");
    assert!(status.contains("200"), "{status}\n{text}");
    let lag = r#"btrship_capture_lag_seconds{share="share"}"#;
    assert_eq!(value(&text, lag), Some(0.0), "{text}");
    assert_eq!(
        value(&text, r#"btrship_queue_depth{share="share"}"#),
        Some(0.0)
    );
    let durable = value(
        &text,
        r#"btrship_last_durable_timestamp_seconds{share="share"}"#,
    )
    .unwrap_or_else(|| panic!("no last durable timestamp:\n{text}"));
    assert!((now_s() - durable).abs() < 120.0, "last durable {durable}");
    let puts_ok =
        r#"btrship_store_requests_total{share="share",backend="local",op="put",result="ok"}"#;
    assert!(value(&text, puts_ok).unwrap_or(0.0) > 0.0, "{text}");
    for name in [
        "btrship_bytes_pending",
        "btrship_snapshots_queued",
        "btrship_store_bytes_total",
        "btrship_store_retries_total",
        "btrship_fanotify_overflows_total",
        "btrship_last_success_timestamp_seconds",
    ] {
        assert!(text.contains(name), "{name} missing:\n{text}");
    }
    assert!(!text.contains("a.txt"), "a path in the metrics:\n{text}");
    let (status, _) = get(&addr, "/elsewhere");
    assert!(status.contains("404"), "{status}");

    // The store goes away: a change waits, and the lag grows with it.
    let repo = bs.repo();
    let away = repo.with_file_name("repo-away");
    std::fs::rename(&repo, &away).unwrap();
    std::fs::write(share.join("b.txt"), b"two\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let text = loop {
        let (_, text) = get(&addr, "/metrics");
        if value(&text, lag).unwrap_or(0.0) >= 3.0 {
            break text;
        }
        assert!(Instant::now() < deadline, "the lag never rose:\n{text}");
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(
        value(&text, r#"btrship_queue_depth{share="share"}"#).unwrap_or(0.0) >= 1.0,
        "{text}"
    );
    let puts_failed =
        r#"btrship_store_requests_total{share="share",backend="local",op="put",result="error"}"#;
    assert!(value(&text, puts_failed).unwrap_or(0.0) >= 1.0, "{text}");

    // Back: it ships, and the lag falls to zero.
    std::fs::rename(&away, &repo).unwrap();
    bs.ok(["sync", "share", "--timeout", "90s"]);
    let (_, text) = get(&addr, "/metrics");
    assert_eq!(value(&text, lag), Some(0.0), "{text}");
    drop(daemon);
}

#[test]
fn one_shot_commands_write_the_textfile() {
    let fs_ = LoopBtrfs::new(256);
    let share = fs_.subvolume("share");
    let bs = Btrship::new();
    bs.ok(osargs!["init", &share, "--no-systemd"]);
    let prom = fs_.dir("textfile").join("btrship-share.prom");
    bs.set_config(
        "share",
        "metrics_textfile",
        &format!("\"{}\"", prom.display()),
    );
    std::fs::write(share.join("a.txt"), b"one\n").unwrap();
    bs.ok(["snapshot", "share"]);
    let text = std::fs::read_to_string(&prom).unwrap();
    let snap = r#"btrship_last_success_timestamp_seconds{share="share",op="snapshot"}"#;
    let t = value(&text, snap).unwrap_or_else(|| panic!("{text}"));
    assert!((now_s() - t).abs() < 120.0, "{text}");
    assert!(!text.contains("# EOF"), "{text}");
    assert!(value(
        &text,
        r#"btrship_last_success_timestamp_seconds{share="share",op="check"}"#
    )
    .is_none());
    bs.ok(["check", "share"]);
    let text = std::fs::read_to_string(&prom).unwrap();
    assert!(
        value(
            &text,
            r#"btrship_last_success_timestamp_seconds{share="share",op="check"}"#
        )
        .is_some(),
        "{text}"
    );
    // A bad listen address is refused when the config is read.
    bs.set_config("share", "metrics_listen", "\"not an address\"");
    let err = bs.fails(["status", "share"], 2);
    assert!(err.contains("metrics_listen"), "{err}");
}
