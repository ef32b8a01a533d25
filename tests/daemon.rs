//! The daemon end to end on a real loop btrfs with the local repository:
//! file operations, `sync`, then `restore --at` each acknowledged moment on
//! a fresh machine, compared with a reference snapshot taken at that moment
//! (contents, names, modes, mtimes, xattrs); a writer rewriting one file
//! 100 times a second never yields a torn version; `kill -9` of the daemon
//! at random moments of a stream of closes loses nothing `sync`
//! acknowledged; start-up after downtime reconciles; one daemon per share;
//! SIGTERM stops it cleanly; excludes; `sync` times out naming what is
//! pending while the store fails and completes when it is back.
//!
//! `BTRSHIP_KILL_ITERATIONS` (default 50) sets the kill -9 iterations.

#[macro_use]
mod common;

use common::{assert_same_tree, reference_snapshot, set_xattr, Btrship, LoopBtrfs};
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn now_text() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

fn restore_at(fresh: &Btrship, bs: &Btrship, at: &str, to: &Path, extra: &[&str]) {
    let mut args = osargs![
        "restore",
        "share",
        "--at",
        at,
        "--to",
        to,
        "--repo",
        bs.repo(),
        "--key-file",
        bs.key_file("share")
    ];
    args.extend(extra.iter().map(std::ffi::OsString::from));
    fresh.ok(args);
}

fn status(bs: &Btrship) -> serde_json::Value {
    bs.status_json("share").1
}

#[test]
fn every_synced_moment_restores_exactly() {
    let fs_ = LoopBtrfs::new(1024);
    let share = fs_.subvolume("share");
    let refs = fs_.dir("refs");
    let bs = Btrship::new();
    bs.ok(osargs!["init", &share, "--no-systemd"]);
    fs::create_dir(share.join("docs")).unwrap();
    fs::write(share.join("docs/report.txt"), b"first draft\n").unwrap();
    fs::write(share.join("big.bin"), vec![7u8; 3 << 20]).unwrap();
    let daemon = bs.start_daemon("share");

    type Step = Box<dyn Fn(&Path)>;
    let steps: Vec<(&str, Step)> = vec![
        (
            "create",
            Box::new(|s: &Path| fs::write(s.join("a.txt"), b"alpha").unwrap()),
        ),
        (
            "overwrite + append",
            Box::new(|s: &Path| {
                fs::write(s.join("docs/report.txt"), b"second draft\n").unwrap();
                use std::io::Write;
                let mut f = fs::OpenOptions::new()
                    .append(true)
                    .open(s.join("a.txt"))
                    .unwrap();
                f.write_all(b" and more").unwrap();
            }),
        ),
        (
            "change a middle range of a big file",
            Box::new(|s: &Path| {
                use std::os::unix::fs::FileExt;
                let f = fs::OpenOptions::new()
                    .write(true)
                    .open(s.join("big.bin"))
                    .unwrap();
                f.write_all_at(&[9u8; 4096], 1 << 20).unwrap();
            }),
        ),
        (
            "mkdir, files in it, xattr, chmod",
            Box::new(|s: &Path| {
                fs::create_dir(s.join("new")).unwrap();
                fs::write(s.join("new/one.txt"), b"1").unwrap();
                fs::write(s.join("new/two.txt"), b"2").unwrap();
                set_xattr(&s.join("new/one.txt"), b"user.DOSATTRIB", b"0x20").unwrap();
                fs::set_permissions(s.join("new/two.txt"), fs::Permissions::from_mode(0o600))
                    .unwrap();
            }),
        ),
        (
            "rename a file, rename a directory with files",
            Box::new(|s: &Path| {
                fs::rename(s.join("a.txt"), s.join("b.txt")).unwrap();
                fs::rename(s.join("new"), s.join("docs/moved")).unwrap();
            }),
        ),
        (
            "office save: write temp, rename over",
            Box::new(|s: &Path| {
                fs::write(s.join("docs/~$report.txt"), b"lock").unwrap();
                fs::write(s.join("docs/report.tmp"), b"third draft\n").unwrap();
                fs::rename(s.join("docs/report.tmp"), s.join("docs/report.txt")).unwrap();
                fs::remove_file(s.join("docs/~$report.txt")).unwrap();
            }),
        ),
        (
            "delete a file, rmdir, symlink",
            Box::new(|s: &Path| {
                fs::remove_file(s.join("docs/moved/two.txt")).unwrap();
                fs::remove_file(s.join("docs/moved/one.txt")).unwrap();
                fs::remove_dir(s.join("docs/moved")).unwrap();
                std::os::unix::fs::symlink("docs/report.txt", s.join("link")).unwrap();
            }),
        ),
    ];
    let mut times = Vec::new();
    for (i, (what, step)) in steps.iter().enumerate() {
        step(&share);
        bs.sync("share");
        let t = now_text();
        reference_snapshot(&share, &refs.join(format!("r{i}")));
        times.push((what, t));
        std::thread::sleep(Duration::from_millis(20));
    }
    let st = status(&bs);
    assert_eq!(st["daemon"]["running"], true, "{st:#}");
    // The excluded lock file never reached the repository.
    let v = bs.ok(["versions", "share", "docs/~$report.txt", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&v).unwrap();
    assert!(v["versions"].as_array().unwrap().is_empty(), "{v:#}");
    let v: serde_json::Value =
        serde_json::from_str(&bs.ok(["versions", "share", "docs/report.txt", "--json"])).unwrap();
    let kinds: Vec<&str> = v["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds.first(), Some(&"snapshot"), "{v:#}");
    assert!(
        kinds.iter().filter(|k| **k == "close").count() >= 2,
        "{v:#}"
    );
    assert!(daemon.terminate().success());

    let fresh = Btrship::new();
    for (i, (what, t)) in times.iter().enumerate() {
        let to = fs_.dir("restored").join(format!("r{i}"));
        restore_at(&fresh, &bs, t, &to, &[]);
        eprintln!("step {i} ({what}) restores exactly");
        assert_same_tree(&refs.join(format!("r{i}")), &to);
    }
    // One folder at one moment (versions applied on top of a snapshot:
    // directories built in memory). Every blob it needs is in an index
    // the history names: the LISTs are keys/ once, chains/ twice, gc/ and
    // the chain's forgets/ once each (FORMAT.md §5c), never index/ (the
    // fallback that reads every index).
    let to = fs_.dir("restored").join("docs-r4");
    let stats = fresh.stats(osargs![
        "restore",
        "share",
        "--at",
        &times[4].1,
        "--to",
        &to,
        "--path",
        "docs",
        "--repo",
        bs.repo(),
        "--key-file",
        bs.key_file("share")
    ]);
    assert_same_tree(&refs.join("r4/docs"), &to.join("docs"));
    assert!(stats["lists"].as_u64().unwrap() <= 5, "{stats}");
    fresh.ok(osargs![
        "check",
        "share",
        "--read-data",
        "--repo",
        bs.repo(),
        "--key-file",
        bs.key_file("share")
    ]);
}

/// Content of version `n` of the hot file: four 16 KiB pieces, each
/// stamped with `n`, written one by one (a clone mid-write would mix).
fn piece(n: u64, i: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(n * 4 + i);
    let mut v = vec![0u8; 16 << 10];
    rng.fill(&mut v[..]);
    v[..8].copy_from_slice(&n.to_le_bytes());
    v
}

fn version_of(data: &[u8]) -> Option<u64> {
    if data.len() != 64 << 10 {
        return None;
    }
    let n = u64::from_le_bytes(data[..8].try_into().ok()?);
    (0..4)
        .all(|i| data[(i as usize) << 14..((i as usize + 1) << 14)] == piece(n, i)[..])
        .then_some(n)
}

#[test]
fn a_writer_at_100_hz_never_yields_a_torn_version() {
    let fs_ = LoopBtrfs::new(1024);
    let share = fs_.subvolume("share");
    let bs = Btrship::new();
    bs.ok(osargs!["init", &share, "--no-systemd"]);
    bs.set_config("share", "settle_ms", "100");
    let _daemon = bs.start_daemon("share");

    let closed = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let (closed, done, path) = (closed.clone(), done.clone(), share.join("hot.bin"));
        std::thread::spawn(move || {
            use std::io::Write;
            for n in 1..=400u64 {
                let mut f = fs::File::create(&path).unwrap();
                for i in 0..4 {
                    f.write_all(&piece(n, i)).unwrap();
                    std::thread::yield_now();
                }
                drop(f);
                closed.store(n, SeqCst);
                std::thread::sleep(Duration::from_millis(10));
            }
            done.store(true, SeqCst);
        })
    };
    // Syncs while it writes: each acknowledges at least the last close
    // before the call.
    let mut acks = Vec::new();
    while !done.load(SeqCst) {
        std::thread::sleep(Duration::from_millis(300));
        let before = closed.load(SeqCst);
        bs.sync("share");
        acks.push((before, now_text()));
    }
    writer.join().unwrap();
    bs.sync("share");
    acks.push((400, now_text()));

    let fresh = Btrship::new();
    let v: serde_json::Value = serde_json::from_str(&fresh.ok(osargs![
        "versions",
        "share",
        "hot.bin",
        "--json",
        "--repo",
        bs.repo(),
        "--key-file",
        bs.key_file("share")
    ]))
    .unwrap();
    let versions: Vec<String> = v["versions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["kind"] == "close")
        .map(|x| x["time"].as_str().unwrap().to_string())
        .collect();
    eprintln!(
        "{} close versions shipped, {} syncs",
        versions.len(),
        acks.len()
    );
    assert!(versions.len() >= 5, "{v:#}");
    let mut seen = Vec::new();
    for (i, t) in versions.iter().enumerate() {
        let to = fs_.dir("restored").join(format!("v{i}"));
        restore_at(&fresh, &bs, t, &to, &["--path", "hot.bin"]);
        let data = fs::read(to.join("hot.bin")).unwrap();
        let n = version_of(&data).unwrap_or_else(|| panic!("version at {t} is torn"));
        seen.push(n);
    }
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
    for (i, (before, t)) in acks.iter().enumerate() {
        let to = fs_.dir("acked").join(format!("a{i}"));
        restore_at(&fresh, &bs, t, &to, &["--path", "hot.bin"]);
        let data = fs::read(to.join("hot.bin")).unwrap();
        let n = version_of(&data).unwrap_or_else(|| panic!("acknowledged version at {t} is torn"));
        assert!(
            n >= *before,
            "sync at {t} acknowledged close {before} but restores {n}"
        );
    }
    assert_eq!(seen.last(), Some(&400));
}

fn expected_state(share: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut m = BTreeMap::new();
    for e in fs::read_dir(share).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            m.insert(
                e.file_name().to_string_lossy().into_owned(),
                fs::read(e.path()).unwrap(),
            );
        }
    }
    m
}

#[test]
fn kill_9_during_a_stream_of_closes_loses_nothing_acknowledged() {
    let iterations: u64 = std::env::var("BTRSHIP_KILL_ITERATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(50);
    let fs_ = LoopBtrfs::new(2048);
    let share = fs_.subvolume("share");
    let bs = Btrship::new();
    bs.ok(osargs!["init", &share, "--no-systemd"]);
    bs.set_config("share", "settle_ms", "200");
    let fresh = Btrship::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut checked = 0;
    let started = Instant::now();
    for it in 0..iterations {
        let daemon = bs.start_daemon("share");
        let kill_at = rng.gen_range(0..1000u64);
        let mut daemon = Some(daemon);
        let mut acked: Vec<(String, BTreeMap<String, Vec<u8>>)> = Vec::new();
        for n in 0..1000u64 {
            let name = format!("f{:02}", rng.gen_range(0..40));
            let data = format!(
                "iteration {it} close {n} {}",
                "x".repeat(rng.gen_range(0..2000))
            );
            if rng.gen_bool(0.03) {
                let _ = fs::remove_file(share.join(&name));
            } else {
                fs::write(share.join(&name), data).unwrap();
            }
            if n == kill_at {
                if let Some(d) = daemon.take() {
                    d.kill9();
                }
            }
            if n % 200 == 199 && daemon.is_some() {
                let state = expected_state(&share);
                bs.sync("share");
                acked.push((now_text(), state));
            }
        }
        drop(daemon);
        // Restart: the start-up snapshot covers the closes it missed.
        let daemon = bs.start_daemon("share");
        bs.sync("share");
        acked.push((now_text(), expected_state(&share)));
        drop(daemon);
        for (t, state) in &acked {
            let to = fs_.dir("restored").join(format!("i{it}-{checked}"));
            restore_at(&fresh, &bs, t, &to, &[]);
            let got = expected_state(&to);
            assert!(
                got == *state,
                "iteration {it}: restore at acknowledged {t} differs (kill at close {kill_at}): \
                 missing {:?}, extra or changed {:?}",
                state
                    .keys()
                    .filter(|k| got.get(*k) != state.get(*k))
                    .collect::<Vec<_>>(),
                got.keys()
                    .filter(|k| got.get(*k) != state.get(*k))
                    .collect::<Vec<_>>()
            );
            fs::remove_dir_all(&to).unwrap();
            checked += 1;
        }
    }
    eprintln!(
        "{iterations} kill -9 iterations, {checked} acknowledged states restored exactly, {:.1} s",
        started.elapsed().as_secs_f64()
    );
    fresh.ok(osargs![
        "check",
        "share",
        "--read-data",
        "--repo",
        bs.repo(),
        "--key-file",
        bs.key_file("share")
    ]);
}

#[test]
fn downtime_one_daemon_sigterm_and_store_failures() {
    let fs_ = LoopBtrfs::new(1024);
    let share = fs_.subvolume("share");
    let bs = Btrship::new();
    bs.ok(osargs!["init", &share, "--no-systemd"]);
    // sync without a daemon is a clear error.
    let err = bs.fails(["sync", "share"], 1);
    assert!(err.contains("no btrship daemon is running"), "{err}");

    let daemon = bs.start_daemon("share");
    // A second daemon for the same share refuses.
    let err = bs.fails(["daemon", "share"], 1);
    assert!(err.contains("already running"), "{err}");
    fs::write(share.join("one.txt"), b"1").unwrap();
    bs.sync("share");
    let t = Instant::now();
    assert!(
        daemon.terminate().success(),
        "daemon did not exit 0 on SIGTERM"
    );
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "SIGTERM took {:?}",
        t.elapsed()
    );
    assert_eq!(status(&bs)["daemon"]["running"], false);

    // Changes while no daemon runs are reconciled by the start-up snapshot.
    fs::write(share.join("two.txt"), b"2").unwrap();
    fs::remove_file(share.join("one.txt")).unwrap();
    let daemon = bs.start_daemon("share");
    bs.sync("share");
    let refs = fs_.dir("refs");
    reference_snapshot(&share, &refs.join("after-downtime"));
    let fresh = Btrship::new();
    let to = fs_.dir("restored").join("after-downtime");
    restore_at(&fresh, &bs, &now_text(), &to, &[]);
    assert_same_tree(&refs.join("after-downtime"), &to);

    // The store fails: sync times out naming what is pending, status shows
    // the backlog; when the store is back, shipping resumes by itself.
    let repo = bs.repo();
    let away: PathBuf = repo.with_file_name("repo-away");
    fs::rename(&repo, &away).unwrap();
    fs::write(share.join("three.txt"), b"3").unwrap();
    let (code, err, _) = bs.fails_with(["sync", "share", "--timeout", "3s"], &[8]);
    assert!(err.contains("three.txt"), "exit {code}: {err}");
    let st = status(&bs);
    assert!(st["daemon"]["queue_depth"].as_u64().unwrap() >= 1, "{st:#}");
    assert!(st["daemon"]["oldest_pending"].is_string(), "{st:#}");
    fs::rename(&away, &repo).unwrap();
    bs.ok(["sync", "share", "--timeout", "90s"]);
    assert_eq!(status(&bs)["daemon"]["queue_depth"], 0);
    drop(daemon);
}

#[test]
fn tells_systemd_it_is_ready_and_stopping() {
    let fs_ = LoopBtrfs::new(256);
    let share = fs_.subvolume("share");
    let bs = Btrship::new();
    bs.ok(osargs!["init", &share, "--no-systemd"]);
    let sock_path = bs.state_dir.with_file_name("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_btrship"))
        .args(bs.full_args(["daemon", "share"]))
        .env("NOTIFY_SOCKET", &sock_path)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = sock
        .recv(&mut buf)
        .expect("no notification from the daemon");
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(msg.contains("READY=1") && msg.contains("STATUS="), "{msg}");
    common::run("kill", &["-TERM", &child.id().to_string()]);
    let mut stopping = false;
    while let Ok(n) = sock.recv(&mut buf) {
        if String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1") {
            stopping = true;
            break;
        }
    }
    assert!(stopping, "no STOPPING=1");
    assert!(child.wait().unwrap().success());
}

/// The daemon runs as root: a share user who swaps a directory for a
/// symlink to another place on the same btrfs (here a second subvolume,
/// read-only so that writes through the symlink fail) must never make it
/// ship a file from there. Writers close files in `d/` as fast as they can
/// while another thread renames `d` away, puts `d -> other` in its place
/// and back, again and again. Afterwards no version of any path, and no
/// acknowledged moment, holds the secret content.
#[test]
fn a_directory_swapped_for_a_symlink_never_ships_a_file_from_elsewhere() {
    const SECRET: &[u8] = b"SECRET of another share, never to be shipped from this one\n";
    const FILES: usize = 6;
    let fs_ = LoopBtrfs::new(1024);
    let share = fs_.subvolume("share");
    let src = fs_.subvolume("other-src");
    for i in 0..FILES {
        fs::write(src.join(format!("f{i}")), SECRET).unwrap();
    }
    let other = fs_.mnt.join("other");
    reference_snapshot(&src, &other);
    let bs = Btrship::new();
    bs.ok(osargs!["init", &share, "--no-systemd"]);
    bs.set_config("share", "settle_ms", "100");
    fs::create_dir(share.join("d")).unwrap();
    let _daemon = bs.start_daemon("share");

    let done = Arc::new(AtomicBool::new(false));
    let swaps = Arc::new(AtomicU64::new(0));
    let closes = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for w in 0..2 {
        let (done, closes, share) = (done.clone(), closes.clone(), share.clone());
        threads.push(std::thread::spawn(move || {
            let mut n = 0u64;
            while !done.load(SeqCst) {
                n += 1;
                let p = share.join(format!("d/f{}", (n as usize + w) % FILES));
                // Fails while `d` is the symlink (read-only target) or gone.
                if fs::write(&p, format!("public {w} {n}\n")).is_ok() {
                    closes.fetch_add(1, SeqCst);
                }
            }
        }));
    }
    {
        let (done, swaps, share, other) =
            (done.clone(), swaps.clone(), share.clone(), other.clone());
        threads.push(std::thread::spawn(move || {
            let (d, away) = (share.join("d"), share.join("d.real"));
            while !done.load(SeqCst) {
                fs::rename(&d, &away).unwrap();
                std::os::unix::fs::symlink(&other, &d).unwrap();
                std::thread::yield_now();
                fs::remove_file(&d).unwrap();
                fs::rename(&away, &d).unwrap();
                swaps.fetch_add(1, SeqCst);
            }
        }));
    }
    let mut acks = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(6) {
        std::thread::sleep(Duration::from_millis(1000));
        bs.sync("share");
        acks.push(now_text());
    }
    done.store(true, SeqCst);
    for t in threads {
        t.join().unwrap();
    }
    bs.sync("share");
    acks.push(now_text());
    eprintln!(
        "{} closes, {} symlink swaps, {} acknowledged moments",
        closes.load(SeqCst),
        swaps.load(SeqCst),
        acks.len()
    );

    let fresh = Btrship::new();
    let holds_secret = |dir: &Path| -> Vec<String> {
        common::walk(dir)
            .into_iter()
            .filter(|(_, md)| md.is_file())
            .filter_map(|(rel, _)| {
                let p = rel.iter().fold(dir.to_path_buf(), |p, c| p.join(c));
                let data = fs::read(&p).unwrap();
                (data.windows(6).any(|w| w == b"SECRET")).then(|| p.display().to_string())
            })
            .collect()
    };
    let mut leaks = Vec::new();
    for (i, t) in acks.iter().enumerate() {
        let to = fs_.dir("restored").join(format!("a{i}"));
        restore_at(&fresh, &bs, t, &to, &[]);
        leaks.extend(holds_secret(&to));
    }
    // Every version of every path the writers used, at its own moment.
    let mut checked = 0;
    for dir in ["d", "d.real"] {
        for i in 0..FILES {
            let path = format!("{dir}/f{i}");
            let v: serde_json::Value = serde_json::from_str(&fresh.ok(osargs![
                "versions",
                "share",
                &path,
                "--json",
                "--repo",
                bs.repo(),
                "--key-file",
                bs.key_file("share")
            ]))
            .unwrap();
            for x in v["versions"].as_array().unwrap() {
                if x["size"].as_u64() == Some(SECRET.len() as u64) {
                    leaks.push(format!(
                        "{path} has a version of the secret's size at {}",
                        x["time"]
                    ));
                }
                if x["kind"] != "close" {
                    continue;
                }
                let t = x["time"].as_str().unwrap();
                let to = fs_.dir("versions").join(format!("v{checked}"));
                restore_at(&fresh, &bs, t, &to, &["--path", &path]);
                leaks.extend(holds_secret(&to));
                fs::remove_dir_all(&to).unwrap();
                checked += 1;
            }
        }
    }
    eprintln!("{checked} file versions restored and read");
    assert!(leaks.is_empty(), "the secret was shipped: {leaks:#?}");
}
