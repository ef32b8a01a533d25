//! Honest health: `status` says unhealthy (exit 10, one error line) when
//! the daemon failed, died or stalled, and ok only when the share is
//! protected; the daemon stops on a permanent error with the exit code its
//! systemd unit does not restart on, and pings the watchdog while it makes
//! progress; `bwlimit` comes from the share config.

#[macro_use]
mod common;

use common::{check_error_contract, run, write_random_file, Btrship, LoopBtrfs};
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The `Key=` values of a unit file.
fn unit_values(unit: &str, key: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(String::from)
        .collect()
}

/// Everything received on a notify socket within `within`.
fn notifications(sock: &UnixDatagram, within: Duration, until: &str) -> String {
    let deadline = Instant::now() + within;
    let mut all = String::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline && !all.contains(until) {
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        if let Ok(n) = sock.recv(&mut buf) {
            all.push_str(&String::from_utf8_lossy(&buf[..n]));
            all.push('\n');
        }
    }
    all
}

/// The daemon's unit runs the daemon; started with the wrong key it exits
/// within seconds with the key error (4), which the unit lists in
/// `RestartPreventExitStatus=` so systemd leaves it failed instead of
/// looping; `status` then says `daemon_failed` and exits 10. With the
/// right key back, it runs and `status` is ok; stopped cleanly, the share
/// is still healthy (snapshots alone protect it).
#[test]
fn a_permanent_error_stops_the_daemon_and_its_unit_does_not_restart_it() {
    let fs_ = LoopBtrfs::new(256);
    let share = fs_.subvolume("share");
    let bs = Btrship::new();
    bs.ok(osargs!["init", &share]);
    std::fs::write(share.join("a.txt"), b"protected\n").unwrap();
    bs.ok(["snapshot", "share"]);
    let (code, st) = bs.status_json("share");
    assert_eq!((code, &st["health"]), (0, &"ok".into()), "{st:#}");
    assert_eq!(st["daemon"]["state"], "never", "{st:#}");

    let unit = std::fs::read_to_string(bs.systemd_dir().join("btrship@.service")).unwrap();
    let exec = unit_values(&unit, "ExecStart").pop().expect("ExecStart");
    let argv: Vec<String> = exec
        .replace("%i", "share")
        .split_whitespace()
        .map(String::from)
        .collect();
    let prevent: Vec<i32> = unit_values(&unit, "RestartPreventExitStatus")
        .iter()
        .flat_map(|v| v.split_whitespace().map(|c| c.parse::<i32>().unwrap()))
        .collect();
    assert_eq!(unit_values(&unit, "WatchdogSec"), ["5min"], "{unit}");

    // Another repository's key in place of this share's.
    let other = Btrship::new();
    let other_share = fs_.subvolume("other");
    other.ok(osargs!["init", &other_share, "--no-systemd"]);
    let key = bs.key_file("share");
    let right_key = std::fs::read(&key).unwrap();
    std::fs::copy(other.key_file("other"), &key).unwrap();

    let sock_path = bs.state_dir.with_file_name("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let started = Instant::now();
    let child = Command::new(&argv[0])
        .args(&argv[1..])
        .env("NOTIFY_SOCKET", &sock_path)
        .env_remove("BTRSHIP_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let waiter = std::thread::spawn(move || child.wait_with_output().unwrap());
    while !waiter.is_finished() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the daemon with a wrong key still runs after 60 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = waiter.join().unwrap();
    let code = check_error_contract(&out, &format!("unit ExecStart {exec} (pid {pid})"));
    assert_eq!(code, 4, "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        prevent.contains(&code),
        "exit {code} is not in RestartPreventExitStatus={prevent:?}: systemd would loop"
    );
    let said = notifications(&sock, Duration::from_secs(2), "STATUS=failed");
    assert!(said.contains("STATUS=failed"), "{said}");

    let (code, st) = bs.status_json("share");
    assert_eq!(code, 10, "{st:#}");
    assert_eq!(st["health"], "daemon_failed", "{st:#}");
    assert_eq!(st["daemon"]["state"], "failed", "{st:#}");
    let text = bs.fails(["status", "share"], 10);
    assert!(text.contains("daemon_failed"), "{text}");

    // Fixed: it runs, and the share is healthy again.
    std::fs::write(&key, right_key).unwrap();
    let daemon = bs.start_daemon("share");
    let (code, st) = bs.status_json("share");
    assert_eq!((code, &st["health"]), (0, &"ok".into()), "{st:#}");
    assert_eq!(st["daemon"]["state"], "running", "{st:#}");
    assert!(daemon.terminate().success());
    let (code, st) = bs.status_json("share");
    assert_eq!(
        (code, &st["daemon"]["state"]),
        (0, &"stopped".into()),
        "{st:#}"
    );
}

/// A running daemon pings the watchdog; stopped (SIGSTOP) it is
/// `daemon_stalled` once its heartbeat is older than the limit, and
/// healthy again when it continues; killed, it is `daemon_dead` (its run
/// never ended).
#[test]
fn status_tells_a_stalled_or_dead_daemon() {
    const STALL: &[(&str, &str)] = &[("BTRSHIP_STALLED_AFTER", "12s")];
    let fs_ = LoopBtrfs::new(256);
    let share = fs_.subvolume("share");
    let bs = Btrship::new();
    bs.ok(osargs!["init", &share, "--no-systemd"]);
    bs.set_config("share", "settle_ms", "100");
    let sock_path = bs.state_dir.with_file_name("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_btrship"))
        .args(bs.full_args(["daemon", "share"]))
        .env("NOTIFY_SOCKET", &sock_path)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id().to_string();
    let said = notifications(&sock, Duration::from_secs(60), "WATCHDOG=1");
    assert!(said.contains("WATCHDOG=1"), "no watchdog ping: {said}");
    bs.sync("share");
    let (code, st) = bs.status_json_env("share", STALL);
    assert_eq!(
        (code, &st["daemon"]["state"]),
        (0, &"running".into()),
        "{st:#}"
    );
    assert!(
        st["daemon"]["heartbeat_age_seconds"].as_u64().unwrap() <= 12,
        "{st:#}"
    );

    run("kill", &["-STOP", &pid]);
    std::thread::sleep(Duration::from_secs(14));
    let (code, st) = bs.status_json_env("share", STALL);
    run("kill", &["-CONT", &pid]);
    assert_eq!(
        (code, &st["health"]),
        (10, &"daemon_stalled".into()),
        "{st:#}"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, st) = bs.status_json_env("share", STALL);
        if code == 0 {
            assert_eq!(st["daemon"]["state"], "running", "{st:#}");
            break;
        }
        assert!(Instant::now() < deadline, "still unhealthy: {st:#}");
        std::thread::sleep(Duration::from_millis(500));
    }

    let _ = child.kill();
    let _ = child.wait();
    let (code, st) = bs.status_json_env("share", STALL);
    assert_eq!((code, &st["health"]), (10, &"daemon_dead".into()), "{st:#}");
    assert_eq!(st["daemon"]["running"], false, "{st:#}");
    let problem = st["problems"][0].as_str().unwrap();
    assert!(problem.contains("not running"), "{problem}");
}

/// `bwlimit` in the share config limits the store transfers (a lower bound
/// on time is safe to assert: nothing can make a limited transfer faster),
/// and a value that does not parse is refused naming the setting.
#[test]
fn bwlimit_comes_from_the_share_config() {
    let fs_ = LoopBtrfs::new(256);
    let share = fs_.subvolume("share");
    let bs = Btrship::new();
    bs.ok(osargs!["init", &share, "--no-systemd"]);
    write_random_file(&share.join("big.bin"), 4 << 20, 7);
    bs.set_config("share", "bwlimit", "\"1M\"");
    bs.set_config("share", "max_connections", "2");
    let t = Instant::now();
    bs.ok(["snapshot", "share"]);
    let took = t.elapsed();
    assert!(
        took >= Duration::from_secs(3),
        "4 MiB shipped in {took:?} under bwlimit = 1M"
    );
    bs.set_config("share", "bwlimit", "\"fast\"");
    let err = bs.fails(["snapshot", "share"], 2);
    assert!(err.contains("bwlimit"), "{err}");
    bs.set_config("share", "bwlimit", "\"1G\"");
    bs.set_config("share", "max_connections", "0");
    let err = bs.fails(["snapshot", "share"], 2);
    assert!(err.contains("max_connections"), "{err}");
}

/// Runs `btrship daemon share` with capabilities dropped from its bounding
/// set (`setpriv`, as a hardened unit's CapabilityBoundingSet= would).
fn daemon_without(bs: &Btrship, caps: &str) -> std::process::Child {
    Command::new("setpriv")
        .args([
            &format!("--bounding-set={caps}"),
            &format!("--inh-caps={caps}"),
            "--",
        ])
        .arg(env!("CARGO_BIN_EXE_btrship"))
        .args(bs.full_args(["daemon", "share"]))
        .env_remove("BTRSHIP_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("setpriv (util-linux) must be installed")
}

/// Without CAP_SYS_ADMIN the daemon cannot watch the share: that is a
/// permanent failure (exit 12, access denied), not a crash systemd would
/// restart forever.
#[test]
fn a_missing_capability_is_a_permanent_failure() {
    let fs_ = LoopBtrfs::new(256);
    let share = fs_.subvolume("share");
    let bs = Btrship::new();
    bs.ok(osargs!["init", &share, "--no-systemd"]);
    let out = daemon_without(&bs, "-sys_admin")
        .wait_with_output()
        .unwrap();
    let code = check_error_contract(&out, "daemon without CAP_SYS_ADMIN");
    assert_eq!(code, 12, "{}", String::from_utf8_lossy(&out.stderr));
    let (code, st) = bs.status_json("share");
    assert_eq!(
        (code, &st["health"]),
        (10, &"daemon_failed".into()),
        "{st:#}"
    );
}

/// A close the daemon cannot capture (here: no CAP_LEASE, so no read lease
/// on another user's file) is carried by a reconciling snapshot, and `sync`
/// waits for that snapshot: it never acknowledges a version it did not
/// ship.
#[test]
fn sync_waits_for_the_snapshot_that_carries_a_failed_capture() {
    let fs_ = LoopBtrfs::new(256);
    let share = fs_.subvolume("share");
    let bs = Btrship::new();
    bs.ok(osargs!["init", &share, "--no-systemd"]);
    bs.set_config("share", "settle_ms", "100");
    let mut child = daemon_without(&bs, "-lease");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !bs
        .cmd(["sync", "share", "--timeout", "2s"])
        .status
        .success()
    {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the daemon without CAP_LEASE exited"
        );
        assert!(Instant::now() < deadline, "the daemon never got ready");
    }
    let file = share.join("alice.txt");
    std::fs::write(&file, b"draft\n").unwrap();
    std::os::unix::fs::chown(&file, Some(1000), Some(1000)).unwrap();
    std::fs::write(&file, b"alice's final version\n").unwrap();
    bs.sync("share");
    let _ = child.kill();
    let _ = child.wait();

    let fresh = Btrship::new();
    let to = fs_.dir("restored").join("r");
    fresh.ok(osargs![
        "restore",
        "share",
        "--at",
        "now",
        "--to",
        &to,
        "--repo",
        bs.repo(),
        "--key-file",
        bs.key_file("share")
    ]);
    assert_eq!(
        std::fs::read(to.join("alice.txt")).unwrap(),
        b"alice's final version\n"
    );
}
