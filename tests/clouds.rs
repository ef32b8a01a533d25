//! End to end on Azure Blob Storage and Google Cloud Storage, through real
//! servers on 127.0.0.1: Azurite and fake-gcs-server (`tests/common/
//! cloudenv.rs`), reached as a new user would with the emulators'
//! documented settings (Azurite's connection string in
//! `AZURE_STORAGE_CONNECTION_STRING`, `STORAGE_EMULATOR_HOST`).
//!
//! For each: init, two snapshots, the daemon shipping closes; a fresh
//! machine (only `--repo` and the key) checks with `--read-data` and
//! restores every moment exactly; a missing container is a clear error.
//! Then a ship of 1,000 files and a 48 MiB file (32 MiB packs: staged
//! uploads) through the fault proxy at 20% faults completes and restores
//! exactly. Faults aimed at one request: the lost answer to an Azure
//! staged upload's commit (sent again, refused as already committed, found
//! by its size) and to a GCS resumable upload's chunk (the upload starts
//! over). `upload/tests/cloud_store.rs` covers the stores themselves.

#[macro_use]
mod common;

use common::cloudenv::{self, Emulator};
use common::faultproxy::{FaultConfig, FaultKind, FaultProxy};
use common::{assert_same_tree, reference_snapshot, Btrship, LoopBtrfs, Mutator};
use rand::Rng;
use std::fs;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

fn now_text() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

fn container(emu: Emulator, what: &str) -> String {
    let name = format!("{what}-{}-{}", std::process::id(), rand::random::<u32>());
    cloudenv::server(emu).create(&name);
    name
}

fn snapshots_daemon_and_a_fresh_restore(emu: Emulator) {
    let server = cloudenv::server(emu);
    let name = container(emu, "e2e");
    // No endpoint in the address: it comes from the emulator's settings.
    let url = format!("{}://{name}/office", emu.scheme());

    let fs_ = LoopBtrfs::new(1024);
    let share = fs_.subvolume("share");
    let refs = fs_.dir("refs");
    let bs = Btrship::new();
    bs.ok(osargs!["init", &share, "--repo", &url, "--no-systemd"]);
    let mut m = Mutator::new(11);
    m.budget = 8 << 20;
    m.populate(&share, 40);
    let mut moments = Vec::new();
    for round in 0..2 {
        if round > 0 {
            m.mutate(&share, 15);
        }
        reference_snapshot(&share, &refs.join(format!("r{round}")));
        bs.ok(["snapshot", "share"]);
        moments.push(bs.snapshot_list("share").last().unwrap().time.clone());
    }
    // The daemon ships closes as they happen; a sync makes them durable.
    bs.set_config("share", "settle_ms", "100");
    let daemon = bs.start_daemon("share");
    fs::write(share.join("closed-by-a-user.txt"), b"saved at the desk\n").unwrap();
    fs::write(share.join("second.txt"), vec![42u8; 300_000]).unwrap();
    bs.sync("share");
    moments.push(now_text());
    reference_snapshot(&share, &refs.join("r2"));
    let v: serde_json::Value =
        serde_json::from_str(&bs.ok(["versions", "share", "closed-by-a-user.txt", "--json"]))
            .unwrap();
    let kinds: Vec<&str> = v["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["kind"].as_str().unwrap())
        .collect();
    assert!(kinds.contains(&"close"), "{emu:?}: {v:#}");
    assert!(daemon.terminate().success());

    let fresh = Btrship::new();
    let key = bs.key_file("share");
    fresh.check_repo(&url, &key);
    for (i, t) in moments.iter().enumerate() {
        let to = fs_.dir("restored").join(format!("r{i}"));
        fresh.restore_repo(&url, &key, t, &to);
        assert_same_tree(&refs.join(format!("r{i}")), &to);
        eprintln!("{emu:?}: moment {i} restores exactly");
    }

    // A missing container or bucket: one clear line naming it.
    let missing = format!("{}://no-such-{name}", emu.scheme());
    let (code, err, _) = fresh.fails_with(
        osargs!["snapshots", "share", "--repo", &missing, "--key-file", &key],
        &[3, 8],
    );
    assert!(
        err.contains(&format!("no-such-{name}")),
        "exit {code}: {err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    // Refused or unusable credentials: exit 12 (permanent), one line saying
    // where they came from, never the secret.
    let args = osargs!["snapshots", "share", "--repo", &url, "--key-file", &key];
    let wrong_key = "A".repeat(88);
    let conn = format!(
        "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={wrong_key};BlobEndpoint={};",
        server.endpoint
    );
    let env: Vec<(&str, &str)> = match emu {
        Emulator::Azurite => vec![("AZURE_STORAGE_CONNECTION_STRING", &conn)],
        Emulator::FakeGcs => vec![
            ("STORAGE_EMULATOR_HOST", ""),
            ("GOOGLE_APPLICATION_CREDENTIALS", "/nonexistent/sa.json"),
        ],
    };
    let out = fresh.cmd_env(args, &env);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(12), "{emu:?}: {err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let source = match emu {
        Emulator::Azurite => "AZURE_STORAGE_CONNECTION_STRING",
        Emulator::FakeGcs => "/nonexistent/sa.json",
    };
    assert!(err.contains(source) && !err.contains(&wrong_key), "{err}");
}

fn twenty_percent_faults(emu: Emulator) {
    let server = cloudenv::server(emu);
    let name = container(emu, "faults");
    let seed: u64 = std::env::var("BTRSHIP_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    eprintln!("{emu:?}: fault seed {seed} (BTRSHIP_FAULT_SEED to repeat)");
    let proxy = FaultProxy::start(server.addr(), FaultConfig::none()).unwrap();
    let url = server.url(&name, "office", &server.endpoint_via(&proxy.endpoint()));

    let fs_ = LoopBtrfs::new(1024);
    let share = fs_.subvolume("share");
    let refs = fs_.dir("refs");
    let mut m = Mutator::new(seed);
    for d in 0..10 {
        let dir = share.join(format!("d{d:02}"));
        fs::create_dir(&dir).unwrap();
        for f in 0..100 {
            let len = m.rng().gen_range(200..8200);
            fs::write(dir.join(format!("f{f:03}.txt")), m.bytes(len)).unwrap();
        }
    }
    common::write_random_file(&share.join("big.bin"), 48 << 20, seed);
    reference_snapshot(&share, &refs.join("r0"));

    let bs = Btrship::new();
    bs.ok(osargs![
        "init",
        &share,
        "--repo",
        &url,
        "--pack-size",
        "32M",
        "--no-systemd"
    ]);
    proxy.set_config(FaultConfig::uniform(seed, 0.2));
    let out: serde_json::Value =
        serde_json::from_str(&bs.ok(["snapshot", "share", "--json"])).unwrap();
    let report = &out["shipped"][0];
    assert_eq!(report["files"], 1001, "{report:#}");
    let retries = report["store"]["retries"].as_u64().unwrap();
    let stats = proxy.stats();
    eprintln!("{emu:?}: ship under 20% faults: {retries} retries; proxy: {stats:?}");
    // (The report counts the ship's own requests; faults may also have hit
    // opening the repository, before it.)
    assert!(stats.faulted > 0, "no request was faulted: {stats:?}");
    if emu == Emulator::FakeGcs {
        // Every write asks GCS to create, never to overwrite.
        let lines = proxy.request_lines();
        let uploads: Vec<&String> = lines
            .iter()
            .filter(|l| l.starts_with("POST") && l.contains("/upload/"))
            .collect();
        assert!(!uploads.is_empty());
        for l in uploads {
            assert!(l.contains("ifGenerationMatch=0"), "{l}");
        }
        assert!(
            lines.iter().any(|l| l.contains("uploadType=resumable")),
            "no staged upload of a large pack"
        );
    } else {
        let lines = proxy.request_lines();
        assert!(
            lines.iter().any(|l| l.contains("comp=blocklist")),
            "no staged upload of a large pack"
        );
    }

    // Reading back through the same faults: check and a fresh restore.
    let fresh = Btrship::new();
    let key = bs.key_file("share");
    fresh.check_repo(&url, &key);
    let to = fs_.dir("restored");
    let t = bs.snapshot_list("share").last().unwrap().time.clone();
    fresh.restore_repo(&url, &key, &t, &to);
    assert_same_tree(&refs.join("r0"), &to);
    // The ship alone is a few dozen requests (big packs); over the whole
    // run the share faulted is what was asked for.
    let stats = proxy.stats();
    eprintln!("{emu:?}: whole run: {stats:?}");
    assert!(
        stats.faulted * 10 >= stats.requests,
        "fewer than 10% faulted: {stats:?}"
    );
}

/// The answer to one request of a large pack's staged upload is lost after
/// the store applied it: on Azure the commit (`Put Block List`), on GCS the
/// second chunk of a resumable upload. The ship still completes, and a
/// fresh machine checks and restores exactly.
fn a_lost_answer_in_a_staged_upload(emu: Emulator) {
    let server = cloudenv::server(emu);
    let name = container(emu, "lost");
    let proxy = FaultProxy::start(server.addr(), FaultConfig::none()).unwrap();
    let url = server.url(&name, "office", &server.endpoint_via(&proxy.endpoint()));
    let fs_ = LoopBtrfs::new(1024);
    let share = fs_.subvolume("share");
    let refs = fs_.dir("refs");
    common::write_random_file(&share.join("big.bin"), 40 << 20, 7);
    fs::write(share.join("small.txt"), b"next to a big one\n").unwrap();
    reference_snapshot(&share, &refs.join("r0"));
    let bs = Btrship::new();
    bs.ok(osargs![
        "init",
        &share,
        "--repo",
        &url,
        "--pack-size",
        "32M",
        "--no-systemd"
    ]);

    // Which request loses its answer: the first commit (Azure), the second
    // chunk (GCS).
    let (is_target, nth): (fn(&str, &str) -> bool, u32) = match emu {
        Emulator::Azurite => (|m, t| m == "PUT" && t.contains("comp=blocklist"), 1),
        Emulator::FakeGcs => (|m, t| m == "PUT" && t.contains("/upload/"), 2),
    };
    let seen = Arc::new(AtomicU32::new(0));
    let counter = seen.clone();
    proxy.set_rule(Some(Arc::new(move |m: &str, t: &str| {
        let hit = is_target(m, t) && counter.fetch_add(1, Ordering::SeqCst) + 1 == nth;
        hit.then_some(FaultKind::ResetAfter)
    })));
    bs.ok(["snapshot", "share"]);
    proxy.set_rule(None);
    let stats = proxy.stats();
    assert_eq!(stats.faulted, 1, "{stats:?}");

    let lines = proxy.request_lines();
    match emu {
        Emulator::Azurite => {
            // The commit went again, and then a HEAD found the pack.
            let commits: Vec<usize> = (0..lines.len())
                .filter(|&i| lines[i].contains("comp=blocklist"))
                .collect();
            assert!(commits.len() >= 2, "{lines:#?}");
            let pack = lines[commits[0]]
                .split_whitespace()
                .nth(1)
                .and_then(|t| t.split('?').next())
                .unwrap()
                .to_owned();
            assert!(
                lines[commits[1]].contains(&pack),
                "the commit sent again was for another blob: {lines:#?}"
            );
            assert!(
                lines[commits[1]..]
                    .iter()
                    .any(|l| l.starts_with("HEAD") && l.contains(&pack)),
                "no HEAD after the commit sent again: {lines:#?}"
            );
        }
        Emulator::FakeGcs => {
            // The upload started over: a second session for the same pack.
            let starts = lines
                .iter()
                .filter(|l| l.starts_with("POST") && l.contains("uploadType=resumable"))
                .count();
            assert!(starts >= 2, "{lines:#?}");
        }
    }

    let fresh = Btrship::new();
    let key = bs.key_file("share");
    fresh.check_repo(&url, &key);
    let to = fs_.dir("restored");
    let t = bs.snapshot_list("share").last().unwrap().time.clone();
    fresh.restore_repo(&url, &key, &t, &to);
    assert_same_tree(&refs.join("r0"), &to);
}

#[test]
fn azure_snapshots_daemon_and_a_fresh_restore() {
    if cloudenv::skipped("the Azure end-to-end test") {
        return;
    }
    snapshots_daemon_and_a_fresh_restore(Emulator::Azurite);
}

#[test]
fn gcs_snapshots_daemon_and_a_fresh_restore() {
    if cloudenv::skipped("the GCS end-to-end test") {
        return;
    }
    snapshots_daemon_and_a_fresh_restore(Emulator::FakeGcs);
}

#[test]
fn azure_twenty_percent_faults_still_ship_and_restore_exactly() {
    if cloudenv::skipped("the Azure fault test") {
        return;
    }
    twenty_percent_faults(Emulator::Azurite);
}

#[test]
fn gcs_twenty_percent_faults_still_ship_and_restore_exactly() {
    if cloudenv::skipped("the GCS fault test") {
        return;
    }
    twenty_percent_faults(Emulator::FakeGcs);
}

#[test]
fn azure_a_lost_commit_answer_still_ships_exactly() {
    if cloudenv::skipped("the Azure lost-answer test") {
        return;
    }
    a_lost_answer_in_a_staged_upload(Emulator::Azurite);
}

#[test]
fn gcs_a_lost_chunk_answer_still_ships_exactly() {
    if cloudenv::skipped("the GCS lost-answer test") {
        return;
    }
    a_lost_answer_in_a_staged_upload(Emulator::FakeGcs);
}
