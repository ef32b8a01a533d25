//! Logs: structured records to journald (fields SHARE, SNAPSHOT, OBJECT,
//! PRIORITY under the identifier btrship), JSON lines with `--log-format
//! json`, and still exactly one error line for a failing command.

#[macro_use]
mod common;

use common::{Btrship, LoopBtrfs};
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::Duration;

const JOURNAL: &str = "/run/systemd/journal/socket";

/// The fields of one datagram of journald's native protocol: `NAME=value`
/// lines, or `NAME`, newline, a little-endian u64 length, the value and a
/// newline.
fn journal_fields(mut d: &[u8]) -> Vec<(String, String)> {
    let mut fields = Vec::new();
    while let Some(nl) = d.iter().position(|&b| b == b'\n') {
        let line = &d[..nl];
        if let Some(eq) = line.iter().position(|&b| b == b'=') {
            fields.push((
                String::from_utf8_lossy(&line[..eq]).into_owned(),
                String::from_utf8_lossy(&line[eq + 1..]).into_owned(),
            ));
            d = &d[nl + 1..];
        } else {
            let len = u64::from_le_bytes(d[nl + 1..nl + 9].try_into().unwrap()) as usize;
            let value = &d[nl + 9..nl + 9 + len];
            fields.push((
                String::from_utf8_lossy(line).into_owned(),
                String::from_utf8_lossy(value).into_owned(),
            ));
            d = &d[nl + 9 + len + 1..];
        }
    }
    fields
}

fn run_logged(bs: &Btrship, format: &str, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_btrship"))
        .args(osargs![
            "--config-dir",
            &bs.config_dir,
            "--state-dir",
            &bs.state_dir,
            "--log-format",
            format
        ])
        .args(args)
        .env("BTRSHIP_LOG", "info")
        .env_remove("JOURNAL_STREAM")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn records_carry_their_share_in_journald_and_json() {
    let fs_ = LoopBtrfs::new(256);
    let share = fs_.subvolume("share");
    let bs = Btrship::new();
    bs.ok(osargs!["init", &share, "--no-systemd"]);
    std::fs::write(share.join("a.txt"), b"one\n").unwrap();

    // JSON: one object per line, the share in the span.
    let out = run_logged(&bs, "json", &["snapshot", "share"]);
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let records: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let shipped = records
        .iter()
        .find(|r| {
            r["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("shipped"))
        })
        .unwrap_or_else(|| panic!("no shipped record:\n{stderr}"));
    assert_eq!(shipped["span"]["share"], "share", "{shipped:#}");
    assert!(shipped["fields"]["snapshot"].is_string(), "{shipped:#}");
    assert_eq!(shipped["level"], "INFO", "{shipped:#}");

    // journald: the real socket when a journald runs here, else a stand-in
    // bound at its path for the duration of the test.
    std::fs::write(share.join("b.txt"), b"two\n").unwrap();
    if std::path::Path::new(JOURNAL).exists() {
        let out = run_logged(&bs, "journald", &["snapshot", "share"]);
        assert!(out.status.success(), "{out:?}");
        std::thread::sleep(Duration::from_secs(1));
        let j = Command::new("journalctl")
            .args([
                "-o",
                "json",
                "--since",
                "-2min",
                "SYSLOG_IDENTIFIER=btrship",
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&j.stdout);
        assert!(text.contains("\"SHARE\":\"share\""), "{text}");
        return;
    }
    let dir = std::path::Path::new(JOURNAL).parent().unwrap();
    let made_dir = !dir.exists();
    std::fs::create_dir_all(dir).unwrap();
    let sock = UnixDatagram::bind(JOURNAL).unwrap();
    let out = run_logged(&bs, "journald", &["snapshot", "share"]);
    let mut got = Vec::new();
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut buf = vec![0u8; 1 << 16];
    while let Ok(n) = sock.recv(&mut buf) {
        got.push(buf[..n].to_vec());
    }
    // A command that fails: its error is a record with its kind and code,
    // and still the one line on stderr.
    let failed = run_logged(&bs, "journald", &["snapshot", "nosuch"]);
    let mut failure = Vec::new();
    while let Ok(n) = sock.recv(&mut buf) {
        failure.push(buf[..n].to_vec());
    }
    drop(sock);
    let _ = std::fs::remove_file(JOURNAL);
    if made_dir {
        let _ = std::fs::remove_dir(dir);
        let _ = std::fs::remove_dir(dir.parent().unwrap());
    }
    assert!(out.status.success(), "{out:?}");
    assert!(
        out.stderr.is_empty(),
        "records went to stderr too: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let records: Vec<Vec<(String, String)>> = got.iter().map(|d| journal_fields(d)).collect();
    let field = |r: &[(String, String)], name: &str| {
        r.iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .collect::<Vec<_>>()
    };
    let shipped = records
        .iter()
        .find(|r| field(r, "MESSAGE").iter().any(|m| m.starts_with("shipped")))
        .unwrap_or_else(|| panic!("no shipped record among {records:?}"));
    assert_eq!(field(shipped, "SHARE"), ["share"], "{shipped:?}");
    assert_eq!(field(shipped, "PRIORITY"), ["5"], "{shipped:?}");
    assert_eq!(
        field(shipped, "SYSLOG_IDENTIFIER"),
        ["btrship"],
        "{shipped:?}"
    );
    assert!(
        field(shipped, "SNAPSHOT")[0].starts_with("@GMT-"),
        "{shipped:?}"
    );
    assert!(
        field(shipped, "OBJECT")[0].starts_with("snapshots/"),
        "{shipped:?}"
    );
    assert_eq!(failed.status.code(), Some(3), "{failed:?}");
    common::check_error_contract(&failed, "snapshot nosuch --log-format journald");
    let error = failure
        .iter()
        .map(|d| journal_fields(d))
        .find(|r| field(r, "ERROR_KIND") == ["permanent"])
        .unwrap_or_else(|| panic!("no error record among {failure:?}"));
    assert_eq!(field(&error, "EXIT_CODE"), ["3"], "{error:?}");
    assert_eq!(field(&error, "PRIORITY"), ["3"], "{error:?}");
    // Every record of the run carries the share, and only its name.
    for r in records.iter().filter(|r| !r.is_empty()) {
        assert_eq!(field(r, "SHARE"), ["share"], "{r:?}");
    }
}

/// `--progress-json`: JSON lines on stderr, the last one `done` with the
/// totals reached (restore knows its total before it writes; check
/// --read-data counts packs).
#[test]
fn progress_json_reports_totals_and_the_end() {
    let fs_ = LoopBtrfs::new(256);
    let share = fs_.subvolume("share");
    let bs = Btrship::new();
    bs.ok(osargs!["init", &share, "--no-systemd"]);
    for i in 0..20 {
        std::fs::write(share.join(format!("f{i}")), vec![i as u8; 10_000 + i]).unwrap();
    }
    bs.ok(["snapshot", "share"]);
    let last_event = |args: &[&std::ffi::OsStr]| -> serde_json::Value {
        let out = bs.cmd(
            args.iter()
                .copied()
                .chain([std::ffi::OsStr::new("--progress-json")]),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        let events: Vec<serde_json::Value> = stderr
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        let last = events
            .last()
            .unwrap_or_else(|| panic!("no events:\n{stderr}"));
        assert_eq!(last["progress"]["done"], true, "{stderr}");
        last["progress"].clone()
    };
    let to = fs_.dir("restored").join("r");
    let ev = last_event(&[
        "restore".as_ref(),
        "share".as_ref(),
        "--at".as_ref(),
        "now".as_ref(),
        "--to".as_ref(),
        to.as_os_str(),
    ]);
    assert_eq!(ev["label"], "restoring", "{ev:#}");
    assert_eq!(ev["total_files"], 20, "{ev:#}");
    assert_eq!(ev["files"], 20, "{ev:#}");
    let bytes: u64 = (0..20).map(|i| 10_000 + i).sum();
    assert_eq!(ev["total_bytes"], bytes, "{ev:#}");
    assert_eq!(ev["bytes"], bytes, "{ev:#}");
    let ev = last_event(&["check".as_ref(), "share".as_ref(), "--read-data".as_ref()]);
    assert!(ev["total_files"].as_u64().unwrap() >= 1, "{ev:#}");
    assert_eq!(ev["files"], ev["total_files"], "{ev:#}");
}
