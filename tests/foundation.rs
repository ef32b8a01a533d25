//! btrship's foundational guarantees, through the real binary on a real
//! btrfs (loop device; needs root and btrfs-progs):
//!
//! - every snapshot of a random history restores bit-exactly (contents,
//!   holes, modes, owners, mtimes, xattrs incl. ACLs and security.NTACL,
//!   symlinks, special files, hard links), by time and by path;
//! - unchanged data is not uploaded again;
//! - a fresh machine restores with only the repository and the key file;
//! - bad input fails with the documented exit code and one error line;
//! - every flipped byte of every object is detected, and never yields a
//!   silently wrong restore;
//! - restore writes nothing outside its target.
//!
//! Run: `cargo test --test foundation -- --test-threads=2` (as root).

#[macro_use]
mod common;

use chrono::{DateTime, SecondsFormat, Utc};
use common::*;
use rand::{Rng, SeedableRng};
use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};

const SHARE: &str = "share";

/// A loop btrfs with subvolume `share`, a machine, and `init` done.
fn setup() -> (LoopBtrfs, PathBuf, Btrship) {
    let fs_ = LoopBtrfs::new(1024);
    let share = fs_.subvolume(SHARE);
    let b = Btrship::new();
    b.ok(osargs!["init", &share, "--name", SHARE]);
    assert!(
        b.key_file(SHARE).is_file(),
        "init did not create the default key file {}",
        b.key_file(SHARE).display()
    );
    assert!(
        b.repo().is_dir(),
        "init did not create the default repository {}",
        b.repo().display()
    );
    (fs_, share, b)
}

/// `btrship snapshot`, then the new entry of `snapshots --json`.
fn ship(b: &Btrship) -> SnapshotInfo {
    let before = b.snapshot_list(SHARE);
    b.ok(osargs!["snapshot", SHARE]);
    let after = b.snapshot_list(SHARE);
    assert_eq!(
        after.len(),
        before.len() + 1,
        "`snapshot` should add exactly one snapshot: before {before:#?}, after {after:#?}"
    );
    let new = after.last().expect("a snapshot").clone();
    assert!(
        new.snapshot.starts_with("@GMT-"),
        "snapshot name {:?} is not @GMT-…",
        new.snapshot
    );
    if let Some(prev) = before.last() {
        assert!(
            new.parsed > prev.parsed,
            "new snapshot {new:?} not after {prev:?}"
        );
        assert_ne!(new.snapshot, prev.snapshot, "two snapshots with one name");
    }
    new
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Nanos, true)
}

/// A time strictly between two snapshot times.
fn between(a: &SnapshotInfo, b: &SnapshotInfo) -> String {
    rfc3339(a.parsed + (b.parsed - a.parsed) / 2)
}

fn utf8_rel(k: &[u8]) -> Option<String> {
    let s = std::str::from_utf8(k).ok()?;
    (!s.is_empty() && !s.contains('\n') && !s.starts_with(' ')).then(|| s.to_string())
}

/// Every path under `dir` (relative, '/'-joined bytes), excluding `dir`.
fn paths_under(dir: &Path) -> BTreeSet<Vec<u8>> {
    snapshot_tree(dir)
        .entries
        .into_keys()
        .filter(|k| !k.is_empty())
        .collect()
}

/// Asserts `to` holds exactly the ancestors of `rel` and the subtree at
/// `rel`, and that the subtree equals `reference/rel`.
fn assert_path_restored(reference: &Path, to: &Path, rel: &str) {
    assert_same_tree(&reference.join(rel), &to.join(rel));
    for p in paths_under(to) {
        let ok = rel.as_bytes().starts_with(&p)
            && (rel.len() == p.len() || rel.as_bytes()[p.len()] == b'/')
            || p.starts_with(rel.as_bytes()) && (p.len() == rel.len() || p[rel.len()] == b'/');
        assert!(
            ok,
            "restore --path {rel:?} also wrote {:?}",
            String::from_utf8_lossy(&p)
        );
    }
}

// ---------------------------------------------------------------------------
// 1. Random histories round-trip exactly
// ---------------------------------------------------------------------------

fn round_trip(seed: u64) {
    let (fs_, share, b) = setup();
    let mut m = Mutator::new(seed);
    m.budget = 16 * MIB;
    m.populate(&share, 200);
    let refs = fs_.dir("refs");
    let out = fs_.dir("restores");
    let rounds = 6;
    let mut snaps = Vec::new();
    for i in 0..rounds {
        m.mutate(&share, 40);
        reference_snapshot(&share, &refs.join(i.to_string()));
        snaps.push(ship(&b));
    }
    assert_eq!(b.snapshot_list(SHARE).len(), rounds);
    let t = snapshot_tree(&share);
    eprintln!(
        "seed {seed}: {} entries, {} hard-link groups, {} apparent bytes, repository {} bytes",
        t.entries.len(),
        t.links.len(),
        dir_bytes(&share),
        dir_bytes(&b.repo())
    );

    // Each snapshot, by its own time.
    for (i, s) in snaps.iter().enumerate() {
        let to = out.join(format!("at-{i}"));
        b.ok(osargs![
            "restore",
            SHARE,
            "--special-files",
            "--at",
            &s.time,
            "--to",
            &to
        ]);
        assert_same_tree(&refs.join(i.to_string()), &to);
    }
    // A time between snapshot i and i+1 gives snapshot i; after the last
    // ('now') gives the last.
    for i in 0..rounds - 1 {
        let to = out.join(format!("between-{i}"));
        b.ok(osargs![
            "restore",
            SHARE,
            "--special-files",
            "--at",
            between(&snaps[i], &snaps[i + 1]),
            "--to",
            &to
        ]);
        assert_same_tree(&refs.join(i.to_string()), &to);
    }
    let to = out.join("now");
    b.ok(osargs![
        "restore",
        SHARE,
        "--special-files",
        "--at",
        "now",
        "--to",
        &to
    ]);
    assert_same_tree(&refs.join((rounds - 1).to_string()), &to);

    // One folder (from an older snapshot) and one file, by --path.
    let old = refs.join("2");
    let t = snapshot_tree(&old);
    let folder = t
        .entries
        .iter()
        .filter(|(k, e)| e.kind == Kind::Dir && utf8_rel(k).is_some())
        .max_by_key(|(k, _)| {
            let prefix: Vec<u8> = [&k[..], b"/"].concat();
            (
                t.entries.keys().filter(|p| p.starts_with(&prefix)).count(),
                k.len(),
            )
        })
        .map(|(k, _)| utf8_rel(k).unwrap())
        .expect("a folder with a UTF-8 name in snapshot 2");
    let to = out.join("folder");
    b.ok(osargs![
        "restore",
        SHARE,
        "--special-files",
        "--at",
        &snaps[2].time,
        format!("--path={folder}"),
        "--to",
        &to
    ]);
    assert_path_restored(&old, &to, &folder);

    let last = refs.join((rounds - 1).to_string());
    let t = snapshot_tree(&last);
    // Prefer a sparse file in a subdirectory, else any non-empty file.
    let score = |k: &[u8], e: &Entry| {
        let holes = matches!((&e.regions, e.size), (Some(r), Some(s)) if r.iter().map(|x| x.1).sum::<u64>() < s);
        (holes, k.contains(&b'/'), e.size.unwrap_or(0) > 0)
    };
    let file = t
        .entries
        .iter()
        .filter(|(k, e)| e.kind == Kind::File && utf8_rel(k).is_some())
        .max_by_key(|(k, e)| score(k, e))
        .map(|(k, _)| utf8_rel(k).unwrap())
        .expect("a file with a UTF-8 name");
    let to = out.join("file");
    b.ok(osargs![
        "restore",
        SHARE,
        "--special-files",
        "--at",
        &snaps[rounds - 1].time,
        format!("--path={file}"),
        "--to",
        &to
    ]);
    assert_path_restored(&last, &to, &file);
}

#[test]
fn round_trip_random_histories_seed_1() {
    round_trip(1);
}

#[test]
fn round_trip_random_histories_seed_2() {
    round_trip(2);
}

#[test]
fn round_trip_random_histories_seed_3() {
    round_trip(3);
}

// ---------------------------------------------------------------------------
// 2. Unchanged data is not shipped again
// ---------------------------------------------------------------------------

#[test]
fn second_snapshot_of_unchanged_share_uploads_almost_nothing() {
    let (fs_, share, b) = setup();
    let mut rng = rand::rngs::StdRng::seed_from_u64(99);
    fs::create_dir(share.join("big")).unwrap();
    for i in 0..5 {
        let mut data = vec![0u8; 4 * MIB as usize];
        rng.fill(&mut data[..]);
        fs::write(share.join("big").join(format!("f{i}.bin")), &data).unwrap();
    }
    let mut m = Mutator::new(5);
    m.budget = 2 * MIB;
    m.populate(&share, 40);

    ship(&b);
    let s1 = dir_bytes(&b.repo());
    assert!(
        s1 > 20 * MIB,
        "the repository holds only {s1} bytes after shipping 20 MiB of random data"
    );
    ship(&b);
    let s2 = dir_bytes(&b.repo());
    assert!(
        s2 - s1 < 64 * KIB,
        "second snapshot of an unchanged share grew the repository by {} bytes (limit 64 KiB)",
        s2 - s1
    );

    // One small change in the middle of one 4 MiB file.
    let f = fs::OpenOptions::new()
        .write(true)
        .open(share.join("big/f2.bin"))
        .unwrap();
    f.write_all_at(b"changed!", 2 * MIB).unwrap();
    drop(f);
    let refs = fs_.dir("refs");
    reference_snapshot(&share, &refs.join("last"));
    ship(&b);
    let s3 = dir_bytes(&b.repo());
    assert!(
        s3 - s2 < 3 * MIB,
        "changing 8 bytes of one 4 MiB file grew the repository by {} bytes (limit 3 MiB)",
        s3 - s2
    );
    let to = fs_.dir("restores").join("last");
    b.ok(osargs![
        "restore",
        SHARE,
        "--special-files",
        "--at",
        "now",
        "--to",
        &to
    ]);
    assert_same_tree(&refs.join("last"), &to);
}

// ---------------------------------------------------------------------------
// 3. A fresh machine restores with only the repository and the key
// ---------------------------------------------------------------------------

#[test]
fn fresh_machine_restore() {
    let (fs_, share, b) = setup();
    let refs = fs_.dir("refs");
    let out = fs_.dir("restores");
    let mut m = Mutator::new(11);
    m.budget = 8 * MIB;
    m.populate(&share, 80);
    reference_snapshot(&share, &refs.join("0"));
    let s0 = ship(&b);
    m.mutate(&share, 40);
    reference_snapshot(&share, &refs.join("1"));
    let s1 = ship(&b);

    // Only the repository and the key file survive; the key is copied to
    // another place (mode 0600) as a user would.
    let fresh = Btrship::new();
    let key = fresh.config_dir.parent().unwrap().join("saved.key");
    fs::copy(b.key_file(SHARE), &key).unwrap();
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
    let repo = b.repo();
    let repo_url = format!("file://{}", repo.display());

    // Into a path that does not exist yet.
    let to = out.join("fresh-now");
    fresh.ok(osargs![
        "restore",
        SHARE,
        "--special-files",
        "--at",
        "now",
        "--repo",
        &repo,
        "--key-file",
        &key,
        "--to",
        &to
    ]);
    assert_same_tree(&refs.join("1"), &to);

    // Into an existing empty directory, an older snapshot, file:// address.
    let to = out.join("fresh-old");
    fs::create_dir(&to).unwrap();
    fresh.ok(osargs![
        "restore",
        SHARE,
        "--special-files",
        "--at",
        &s0.time,
        "--repo",
        &repo_url,
        "--key-file",
        &key,
        "--to",
        &to
    ]);
    assert_same_tree(&refs.join("0"), &to);

    let to = out.join("fresh-between");
    fresh.ok(osargs![
        "restore",
        SHARE,
        "--special-files",
        "--at",
        between(&s0, &s1),
        "--repo",
        &repo,
        "--key-file",
        &key,
        "--to",
        &to
    ]);
    assert_same_tree(&refs.join("0"), &to);

    fresh.ok(osargs![
        "check",
        SHARE,
        "--read-data",
        "--repo",
        &repo,
        "--key-file",
        &key
    ]);
    // The fresh machine's own directories got nothing it would need later.
    assert!(
        !fresh.config_dir.join(format!("{SHARE}.toml")).exists(),
        "a read-only restore set up the share on the fresh machine"
    );
}

// ---------------------------------------------------------------------------
// 4. Bad input
// ---------------------------------------------------------------------------

#[test]
fn bad_input_fails_with_the_documented_exit_codes() {
    let (fs_, share, b) = setup();
    let out = fs_.dir("restores");

    // init on a plain directory inside btrfs: 6, and says how to convert.
    let plain = fs_.dir("plain");
    let b_other = Btrship::new();
    let err = b_other.fails(osargs!["init", &plain, "--name", "plain"], 6);
    assert!(
        err.contains("btrfs subvolume create"),
        "init on a plain directory should say how to convert it: {err}"
    );
    // init on a directory that is not on btrfs at all: 6.
    let not_btrfs = tempfile::tempdir_in("/tmp").unwrap();
    assert_ne!(
        fs_type(not_btrfs.path()),
        "btrfs",
        "/tmp is btrfs; this case needs a non-btrfs dir"
    );
    b_other.fails(osargs!["init", not_btrfs.path(), "--name", "elsewhere"], 6);
    // init on a path that does not exist: not a success.
    let (code, _, _) = b_other.fails_with(
        osargs!["init", fs_.mnt.join("nope"), "--name", "nope"],
        &[1, 3, 6],
    );
    let _ = code;

    // A share with known content.
    fs::write(share.join("hello.txt"), b"hello\n").unwrap();
    fs::create_dir(share.join("docs")).unwrap();
    fs::write(share.join("docs/report 2024.docx"), b"report").unwrap();
    fs::write(share.join("docs/~$report 2024.docx"), b"lock").unwrap();
    let s0 = ship(&b);

    // Unparseable times: 2. A time before the first snapshot: 3.
    for bad in ["yesterday-ish", "2026-13-45 99:99", "", "5 parsecs ago"] {
        b.fails(
            osargs!["restore", SHARE, "--at", bad, "--to", out.join("x")],
            2,
        );
    }
    b.fails(osargs!["ls", SHARE, "--at", "not a time"], 2);
    b.fails(
        osargs![
            "restore",
            SHARE,
            "--at",
            "2000-01-01T00:00:00Z",
            "--to",
            out.join("x")
        ],
        3,
    );
    b.fails(osargs!["ls", SHARE, "--at", "2000-01-01 00:00"], 3);
    b.fails(
        osargs!["restore", SHARE, "--at", "3650d ago", "--to", out.join("x")],
        3,
    );
    assert!(
        !out.join("x").exists(),
        "a failed restore created its target"
    );
    // Local time forms: the snapshot's second (rounded up) finds it.
    let secs = s0.parsed.timestamp() + i64::from(s0.parsed.timestamp_subsec_nanos() > 0);
    let local = DateTime::from_timestamp(secs, 0)
        .unwrap()
        .with_timezone(&chrono::Local);
    let text = b.ok(osargs![
        "ls",
        SHARE,
        "--at",
        local.format("%Y-%m-%d %H:%M:%S").to_string()
    ]);
    assert!(text.contains("hello.txt"), "ls --at local time:\n{text}");
    let minute_before = (local - chrono::TimeDelta::minutes(1))
        .format("%Y-%m-%d %H:%M")
        .to_string();
    b.fails(osargs!["ls", SHARE, "--at", minute_before], 3);
    b.ok(osargs!["ls", SHARE, "--at", "0s ago"]);

    // --to a non-empty directory: 7, and the directory is untouched.
    let busy = out.join("busy");
    fs::create_dir(&busy).unwrap();
    fs::write(busy.join("keep.txt"), b"mine").unwrap();
    let before = snapshot_tree(&busy);
    b.fails(osargs!["restore", SHARE, "--at", "now", "--to", &busy], 7);
    let d = diff_trees(&before, &snapshot_tree(&busy));
    assert!(d.is_empty(), "a refused restore changed its target: {d:#?}");
    // --to an existing file: 7.
    b.fails(
        osargs![
            "restore",
            SHARE,
            "--at",
            "now",
            "--to",
            busy.join("keep.txt")
        ],
        7,
    );

    // Wrong key: the key of another share (another machine's init).
    let share2 = fs_.subvolume("share2");
    let b2 = Btrship::new();
    b2.ok(osargs!["init", &share2, "--name", "share2"]);
    let key2 = b2.key_file("share2");
    let repo = b.repo();
    b2.fails(
        osargs![
            "restore",
            SHARE,
            "--at",
            "now",
            "--repo",
            &repo,
            "--key-file",
            &key2,
            "--to",
            out.join("wk")
        ],
        4,
    );
    b2.fails(
        osargs!["check", SHARE, "--repo", &repo, "--key-file", &key2],
        4,
    );
    assert!(!out.join("wk").exists());

    // A repository that does not exist: 3.
    b.fails(
        osargs![
            "restore",
            SHARE,
            "--at",
            "now",
            "--repo",
            "/nonexistent/x",
            "--key-file",
            b.key_file(SHARE),
            "--to",
            out.join("nr")
        ],
        3,
    );
    b.fails(
        osargs![
            "check",
            SHARE,
            "--repo",
            "/nonexistent/x",
            "--key-file",
            b.key_file(SHARE)
        ],
        3,
    );

    // A key file readable by others: 4.
    let loose = fs_.tmp_path().join("loose.key");
    fs::copy(b.key_file(SHARE), &loose).unwrap();
    fs::set_permissions(&loose, fs::Permissions::from_mode(0o644)).unwrap();
    b.fails(
        osargs![
            "restore",
            SHARE,
            "--at",
            "now",
            "--repo",
            &repo,
            "--key-file",
            &loose,
            "--to",
            out.join("lk")
        ],
        4,
    );
    // A key file that does not exist: 4.
    b.fails(
        osargs![
            "restore",
            SHARE,
            "--at",
            "now",
            "--repo",
            &repo,
            "--key-file",
            fs_.tmp_path().join("nokey"),
            "--to",
            out.join("nk")
        ],
        4,
    );

    // Unknown share names: 3.
    b.fails(osargs!["snapshot", "nosuch"], 3);
    b.fails(osargs!["snapshots", "nosuch"], 3);
    b.fails(osargs!["ls", "nosuch"], 3);
    b.fails(
        osargs!["restore", "nosuch", "--at", "now", "--to", out.join("ns")],
        3,
    );
    b.fails(osargs!["check", "nosuch"], 3);
    // ... and a share the repository has never seen, on a fresh machine.
    let fresh = Btrship::new();
    fresh.fails(
        osargs![
            "restore",
            "nosuch",
            "--at",
            "now",
            "--repo",
            &repo,
            "--key-file",
            b.key_file(SHARE),
            "--to",
            out.join("ns2")
        ],
        3,
    );

    // `snapshots` and `ls` show what is there.
    let text = b.ok(osargs!["snapshots", SHARE]);
    assert!(
        text.contains(&s0.snapshot),
        "`snapshots` does not show {}:\n{text}",
        s0.snapshot
    );
    let text = b.ok(osargs!["ls", SHARE]);
    for name in ["hello.txt", "docs"] {
        assert!(text.contains(name), "`ls` does not show {name}:\n{text}");
    }
    let text = b.ok(osargs!["ls", SHARE, "--at", &s0.time, "docs"]);
    for name in ["report 2024.docx", "~$report 2024.docx"] {
        assert!(
            text.contains(name),
            "`ls docs` does not show {name}:\n{text}"
        );
    }
    let json = b.ok(osargs!["ls", SHARE, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&json)
        .unwrap_or_else(|e| panic!("ls --json is not JSON ({e}):\n{json}"));
    let flat = v.to_string();
    for name in ["hello.txt", "report 2024.docx"] {
        assert!(
            flat.contains(name),
            "`ls --json` does not show {name}:\n{json}"
        );
    }
    b.fails(osargs!["ls", SHARE, "no/such/path"], 3);
    b.fails(
        osargs![
            "restore",
            SHARE,
            "--at",
            "now",
            "--path",
            "no/such/path",
            "--to",
            out.join("np")
        ],
        3,
    );
    assert!(!out.join("np").exists());
    // The good restore still works after all that.
    let to = out.join("good");
    b.ok(osargs!["restore", SHARE, "--at", "now", "--to", &to]);
    assert_eq!(
        fs::read(to.join("docs/report 2024.docx")).unwrap(),
        b"report"
    );
}

// ---------------------------------------------------------------------------
// 5. Every flipped byte of every object is detected
// ---------------------------------------------------------------------------

/// Byte ranges of envelope key-id fields in `data`: bytes 6..14 of the
/// object, and of every sealed blob inside it (found by the "BSHP\x01"
/// magic; a false match only widens what is allowed to say "wrong key").
fn key_id_ranges(data: &[u8]) -> Vec<std::ops::Range<usize>> {
    let mut out: Vec<std::ops::Range<usize>> = Vec::new();
    out.push(6..14);
    for i in 0..data.len().saturating_sub(5) {
        if &data[i..i + 5] == b"BSHP\x01" {
            out.push(i + 6..i + 14);
        }
    }
    out
}

/// A partial restore (exit 9): every entry it restored equals the
/// reference, and every entry it lacks is listed in its text output (or
/// lies below a listed directory).
fn assert_partial_restore(reference: &Path, to: &Path, stdout: &str, what: &str) {
    let want = snapshot_tree(reference);
    let got = snapshot_tree(to);
    for (k, e) in &got.entries {
        assert_eq!(
            want.entries.get(k),
            Some(e),
            "partial restore after flipping {what}: {:?} differs from the reference",
            String::from_utf8_lossy(k)
        );
    }
    let listed: Vec<&str> = stdout
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("  ")?.trim_start();
            let rest = ["file ", "directory ", "path "]
                .iter()
                .find_map(|k| rest.strip_prefix(k))?;
            rest.trim_start().split(": ").next()
        })
        .collect();
    assert!(
        !listed.is_empty(),
        "partial restore after flipping {what} lists nothing:\n{stdout}"
    );
    for k in want
        .entries
        .keys()
        .filter(|k| !got.entries.contains_key(*k))
    {
        let p = String::from_utf8_lossy(k);
        assert!(
            listed
                .iter()
                .any(|l| *l == p || p.starts_with(&format!("{l}/"))),
            "partial restore after flipping {what}: {p:?} is missing but not listed:\n{stdout}"
        );
    }
}

#[test]
fn tamper_every_object() {
    let (fs_, share, b) = setup();
    let refs = fs_.dir("refs");
    let out = fs_.dir("restores");
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    fs::create_dir(share.join("dir")).unwrap();
    fs::write(share.join("a.txt"), b"alpha\n").unwrap();
    fs::write(share.join("dir/b.txt"), b"bravo ".repeat(1000)).unwrap();
    let mut big = vec![0u8; 300 * KIB as usize];
    rng.fill(&mut big[..]);
    fs::write(share.join("dir/random.bin"), &big).unwrap();
    set_xattr(&share.join("a.txt"), b"user.DOSATTRIB", b"\x00\x00\x04\x00").unwrap();
    ship(&b);
    // Second snapshot: one change, one new file; the rest comes from the first.
    fs::write(share.join("a.txt"), b"alpha, changed\n").unwrap();
    let mut more = vec![0u8; 100 * KIB as usize];
    rng.fill(&mut more[..]);
    fs::write(share.join("dir/new.bin"), &more).unwrap();
    reference_snapshot(&share, &refs.join("latest"));
    ship(&b);
    b.ok(osargs!["check", SHARE, "--read-data"]);

    let repo = b.repo();
    let objects = repo_objects(&repo);
    assert!(
        objects.iter().any(|o| o.0 == "config"),
        "no config object: {objects:?}"
    );
    for prefix in ["packs/", "index/", "snapshots/", "keys/"] {
        assert!(
            objects.iter().any(|o| o.0.starts_with(prefix)),
            "no {prefix} object: {objects:?}"
        );
    }
    // The newest snapshot record is the last one written.
    let latest_record = objects
        .iter()
        .filter(|o| o.0.starts_with("snapshots/"))
        .max_by_key(|o| fs::metadata(&o.1).unwrap().modified().unwrap())
        .unwrap()
        .0
        .clone();

    let key = b.key_file(SHARE);
    let mut n = 0;
    let mut partial = 0;
    for (rel, path) in &objects {
        let data = fs::read(path).unwrap();
        let len = data.len() as u64;
        assert!(len > 0, "{rel} is empty");
        let kid = key_id_ranges(&data);
        let mut positions: BTreeSet<u64> = [0, len / 2, len - 1].into_iter().collect();
        for _ in 0..3 {
            positions.insert(rng.gen_range(0..len));
        }
        let must_fail_restore =
            rel == "config" || rel.starts_with("index/") || *rel == latest_record;
        for pos in positions {
            let what = format!("{rel} byte {pos} of {len}");
            flip_byte(path, pos, 0x01);
            let codes: &[i32] = if kid.iter().any(|r| r.contains(&(pos as usize))) {
                &[4, 5]
            } else {
                &[5]
            };

            let o = b.cmd(osargs!["check", SHARE, "--read-data"]);
            let code =
                check_error_contract(&o, &format!("check --read-data after flipping {what}"));
            let all = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            assert!(
                codes.contains(&code),
                "check --read-data after flipping {what}: exit {code}, expected {codes:?}:\n{all}"
            );
            assert!(
                all.contains(rel.as_str()),
                "check --read-data after flipping {what} does not name the object:\n{all}"
            );
            if n % 10 == 0 {
                eprintln!("example: check --read-data after flipping {what}:\n{all}");
            }

            // Restore on this machine and on a fresh one (no local state):
            // it fails, or it is exact.
            let here = out.join(format!("t{n}"));
            let there = out.join(format!("f{n}"));
            // A machine that never read this repository (no catalogue).
            let fresh = Btrship::new();
            let runs = [
                (
                    "this machine",
                    b.cmd(osargs!["restore", SHARE, "--at", "now", "--to", &here]),
                    here,
                ),
                (
                    "a fresh machine",
                    fresh.cmd(osargs![
                        "restore",
                        SHARE,
                        "--at",
                        "now",
                        "--repo",
                        &repo,
                        "--key-file",
                        &key,
                        "--to",
                        &there
                    ]),
                    there,
                ),
            ];
            for (who, o, to) in runs {
                let what = format!("{what} (restore on {who})");
                // This machine's catalogue holds an authentic copy of every
                // index and history object it shipped (FORMAT.md §5b): a
                // restore there may use it and be exact.
                let cached = who == "this machine" && rel != "config";
                if o.status.success() {
                    assert!(
                        !must_fail_restore || cached,
                        "restore succeeded although {what} was flipped \
                         (it is needed by the latest snapshot)"
                    );
                    assert_same_tree(&refs.join("latest"), &to);
                } else {
                    let code = check_error_contract(&o, &format!("restore after flipping {what}"));
                    if code == 9 && (rel.starts_with("packs/") || rel.starts_with("index/")) {
                        // Some blobs of this pack are damaged, or an index
                        // listing them is skipped: restored without the
                        // paths that need them, listed.
                        partial += 1;
                        assert_partial_restore(
                            &refs.join("latest"),
                            &to,
                            &String::from_utf8_lossy(&o.stdout),
                            &what,
                        );
                        continue;
                    }
                    assert!(
                        codes.contains(&code),
                        "restore after flipping {what}: exit {code}, expected {codes:?}:\n{}",
                        String::from_utf8_lossy(&o.stderr)
                    );
                    assert!(!to.exists(), "a failed restore left {}", to.display());
                }
            }
            n += 1;
            flip_byte(path, pos, 0x01);
        }
    }
    eprintln!(
        "tamper: {} objects, {n} flips, {partial} partial restores (exit 9)",
        objects.len()
    );
    // Everything flipped back: the repository is whole again.
    b.ok(osargs!["check", SHARE, "--read-data"]);
    let to = out.join("final");
    Btrship::new().ok(osargs![
        "restore",
        SHARE,
        "--at",
        "now",
        "--repo",
        &repo,
        "--key-file",
        &key,
        "--to",
        &to
    ]);
    assert_same_tree(&refs.join("latest"), &to);
}

// ---------------------------------------------------------------------------
// 6. Restore writes nothing outside its target
// ---------------------------------------------------------------------------

/// Description of `dir` without its root entry and without `skip/…`.
fn tree_except(dir: &Path, skip: &str) -> Tree {
    let mut t = snapshot_tree(dir);
    t.entries.retain(|k, _| {
        !(k.is_empty() || k == skip.as_bytes() || k.starts_with(format!("{skip}/").as_bytes()))
    });
    t.links
        .retain(|g| g.iter().all(|k| !k.starts_with(skip.as_bytes())));
    t
}

#[test]
fn restore_writes_nothing_outside_its_target() {
    let (fs_, share, b) = setup();
    let outside = fs_.dir("outside");
    fs::write(outside.join("sentinel"), b"do not touch").unwrap();
    fs::create_dir(outside.join("sub")).unwrap();
    fs::write(outside.join("sub/sentinel2"), b"nor this").unwrap();

    // Links that point out of the share, to the directory around the target.
    let mut m = Mutator::new(21);
    m.budget = 4 * MIB;
    m.populate(&share, 60);
    std::os::unix::fs::symlink(&outside, share.join("escape")).unwrap();
    std::os::unix::fs::symlink("../../outside", share.join("escape-rel")).unwrap();
    fs::create_dir(share.join("d")).unwrap();
    std::os::unix::fs::symlink("..", share.join("d/up")).unwrap();
    fs::write(share.join("d/sentinel"), b"from the share").unwrap();
    fs::write(share.join("sentinel"), b"from the share").unwrap();
    let refs = fs_.dir("refs");
    reference_snapshot(&share, &refs.join("0"));
    ship(&b);

    let others = |t: &Tree| {
        let mut t = t.clone();
        t.entries.retain(|k, _| !k.starts_with(b"target"));
        t
    };
    let before = others(&tree_except(&outside, "target"));
    let check_outside = |what: &str| {
        let after = others(&tree_except(&outside, "target"));
        let d = diff_trees(&before, &after);
        assert!(
            d.is_empty(),
            "{what} changed things outside its target: {d:#?}"
        );
        let stray: Vec<_> = fs::read_dir(&outside)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| !n.as_bytes().starts_with(b"target") && n != "sentinel" && n != "sub")
            .collect();
        assert!(stray.is_empty(), "{what} left {stray:?} next to its target");
    };

    let to = outside.join("target");
    b.ok(osargs![
        "restore",
        SHARE,
        "--special-files",
        "--at",
        "now",
        "--to",
        &to
    ]);
    assert_same_tree(&refs.join("0"), &to);
    check_outside("full restore");

    let to = outside.join("target-d");
    b.ok(osargs![
        "restore",
        SHARE,
        "--special-files",
        "--at",
        "now",
        "--path",
        "d",
        "--path",
        "escape",
        "--to",
        &to
    ]);
    assert_same_tree(&refs.join("0/d"), &to.join("d"));
    assert_same_tree(&refs.join("0/escape"), &to.join("escape"));
    check_outside("restore --path d --path escape");

    // Paths through symlinks are not followed: not found, nothing written.
    for p in [
        "escape/sentinel",
        "escape-rel/sentinel",
        "d/up/sentinel",
        "../outside/sentinel",
    ] {
        let to = outside.join(format!("target-{}", p.replace('/', "_")));
        let (code, _, _) = b.fails_with(
            osargs![
                "restore",
                SHARE,
                "--special-files",
                "--at",
                "now",
                format!("--path={p}"),
                "--to",
                &to
            ],
            &[2, 3],
        );
        let _ = code;
        assert!(
            !to.exists(),
            "restore --path {p} failed but created its target"
        );
        check_outside(&format!("restore --path {p}"));
    }
    let _ = OsString::new();
}

// ---------------------------------------------------------------------------
// 7. Command-line usage errors follow the error contract too
// ---------------------------------------------------------------------------

/// Usage errors found by the argument parser (unknown option, missing
/// required option) exit 2 with one "btrship: error: " line, like every
/// other error.
#[test]
fn usage_errors_exit_2_with_one_error_line() {
    let b = Btrship::new();
    let to = b.state_dir.join("t");
    b.fails(
        osargs!["restore", SHARE, "--at", "now", "--to", &to, "--bogus"],
        2,
    );
    b.fails(osargs!["restore", SHARE, "--at", "now"], 2);
    b.fails(osargs!["frobnicate"], 2);
    assert!(!to.exists());
}
