//! Key management (FORMAT.md §3a) on real btrfs with a local repository:
//!
//! - `a_protected_key_file_needs_its_passphrase`: `key passwd` protects
//!   the master key file; commands then need the passphrase (a wrong one
//!   is the key error, exit 4); `--remove` stores it in the clear again.
//! - `key_slots_open_the_repository_with_a_passphrase`: two key slots;
//!   `key recover` on a fresh machine with either passphrase writes the
//!   master key, which restores exactly; a removed slot no longer opens;
//!   a slot the store planted (wrapping another key) is refused.

#[macro_use]
mod common;

use common::{assert_same_tree, reference_snapshot, Btrship, LoopBtrfs};
use std::fs;

fn setup() -> (LoopBtrfs, std::path::PathBuf, Btrship) {
    let fs_ = LoopBtrfs::new(512);
    let share = fs_.subvolume("share");
    let bs = Btrship::new();
    bs.ok(osargs!["init", &share, "--no-systemd"]);
    fs::write(share.join("a.txt"), b"first file\n").unwrap();
    fs::create_dir(share.join("dir")).unwrap();
    fs::write(share.join("dir/b.bin"), vec![7u8; 300_000]).unwrap();
    (fs_, share, bs)
}

/// Runs btrship with environment `env` and returns (exit code, stdout,
/// stderr).
fn run_env(
    bs: &Btrship,
    args: Vec<std::ffi::OsString>,
    env: &[(&str, &str)],
) -> (i32, String, String) {
    let out = bs.cmd_env(args, env);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_protected_key_file_needs_its_passphrase() {
    let (_fs, _share, bs) = setup();
    let key = bs.key_file("share");
    let (code, _, err) = run_env(
        &bs,
        osargs!["key", "passwd", &key],
        &[("BTRSHIP_NEW_PASSPHRASE", "short")],
    );
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = run_env(
        &bs,
        osargs!["key", "passwd", &key],
        &[("BTRSHIP_NEW_PASSPHRASE", "a long passphrase")],
    );
    assert_eq!(code, 0, "{err}");
    let text = fs::read_to_string(&key).unwrap();
    assert!(text.contains("btrship-key-v1-argon2id"), "{text}");
    assert!(!text.contains("btrship-key-v1 "), "{text}");

    // The passphrase from a file, from the environment; a wrong one.
    let pass_file = bs.config_dir.join("pass");
    fs::write(&pass_file, "a long passphrase\n").unwrap();
    let pf = pass_file.to_string_lossy().into_owned();
    let (code, _, err) = run_env(
        &bs,
        osargs!["snapshot", "share"],
        &[("BTRSHIP_PASSPHRASE_FILE", pf.as_str())],
    );
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = run_env(
        &bs,
        osargs!["snapshots", "share"],
        &[("BTRSHIP_PASSPHRASE", "a long passphrase")],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("@GMT-"), "{out}");
    let (code, _, err) = run_env(
        &bs,
        osargs!["snapshots", "share"],
        &[("BTRSHIP_PASSPHRASE", "not the passphrase")],
    );
    assert_eq!(code, 4, "{err}");
    assert!(
        err.contains("passphrase is wrong") && err.lines().count() == 1,
        "{err}"
    );

    // Back in the clear.
    let (code, _, err) = run_env(
        &bs,
        osargs!["key", "passwd", &key, "--remove"],
        &[("BTRSHIP_PASSPHRASE", "a long passphrase")],
    );
    assert_eq!(code, 0, "{err}");
    bs.ok(osargs!["snapshots", "share"]);
    let shown = bs.ok(osargs!["key", "show", &key]);
    assert!(shown.contains("master key"), "{shown}");
}

#[test]
fn key_slots_open_the_repository_with_a_passphrase() {
    let (fs_, share, bs) = setup();
    bs.ok(["snapshot", "share"]);
    let reference = fs_.dir("refs").join("r");
    reference_snapshot(&share, &reference);
    let t = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);

    for (pass, label) in [("first passphrase", "alice"), ("second passphrase", "bob")] {
        let (code, _, err) = run_env(
            &bs,
            osargs!["key", "add", "share", "--label", label],
            &[("BTRSHIP_NEW_PASSPHRASE", pass)],
        );
        assert_eq!(code, 0, "{err}");
    }
    let listed: serde_json::Value =
        serde_json::from_str(&bs.ok(["key", "list", "share", "--json"])).unwrap();
    let rows = listed.as_array().unwrap();
    assert_eq!(rows.len(), 2, "{listed:#}");
    let bob = rows.iter().find(|r| r["label"] == "bob").unwrap()["slot"]
        .as_str()
        .unwrap()
        .to_string();

    // A fresh machine with the address and a passphrase.
    let fresh = Btrship::new();
    let repo = bs.repo();
    let recovered = fresh.config_dir.join("recovered.key");
    let (code, _, err) = run_env(
        &fresh,
        osargs!["key", "recover", "--repo", &repo, "--out", &recovered],
        &[("BTRSHIP_PASSPHRASE", "nobody's passphrase")],
    );
    assert_eq!(code, 4, "{err}");
    assert!(!recovered.exists());
    let (code, _, err) = run_env(
        &fresh,
        osargs!["key", "recover", "--repo", &repo, "--out", &recovered],
        &[("BTRSHIP_PASSPHRASE", "second passphrase")],
    );
    assert_eq!(code, 0, "{err}");
    let to = fs_.dir("out").join("restored");
    fresh.ok(osargs![
        "restore",
        "share",
        "--at",
        &t,
        "--to",
        &to,
        "--repo",
        &repo,
        "--key-file",
        &recovered
    ]);
    assert_same_tree(&reference, &to);

    // Removed: bob's passphrase opens nothing any more; alice's still does.
    bs.ok(["key", "remove", "share", &bob]);
    let again = fresh.config_dir.join("again.key");
    let (code, _, err) = run_env(
        &fresh,
        osargs!["key", "recover", "--repo", &repo, "--out", &again],
        &[("BTRSHIP_PASSPHRASE", "second passphrase")],
    );
    assert_eq!(code, 4, "{err}");
    let (code, _, err) = run_env(
        &fresh,
        osargs!["key", "recover", "--repo", &repo, "--out", &again],
        &[("BTRSHIP_PASSPHRASE", "first passphrase")],
    );
    assert_eq!(code, 0, "{err}");

    // The store plants a slot of its own key under a passphrase it
    // hopes someone types: the key it gives does not open the config.
    let other = Btrship::new();
    let fs2 = LoopBtrfs::new(256);
    let share2 = fs2.subvolume("share");
    other.ok(osargs!["init", &share2, "--no-systemd"]);
    let (code, _, err) = run_env(
        &other,
        osargs!["key", "add", "share"],
        &[("BTRSHIP_NEW_PASSPHRASE", "planted passphrase")],
    );
    assert_eq!(code, 0, "{err}");
    for e in fs::read_dir(other.repo().join("keyslots")).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), repo.join("keyslots").join(e.file_name())).unwrap();
    }
    let planted = fresh.config_dir.join("planted.key");
    let (code, _, err) = run_env(
        &fresh,
        osargs!["key", "recover", "--repo", &repo, "--out", &planted],
        &[("BTRSHIP_PASSPHRASE", "planted passphrase")],
    );
    assert_eq!(code, 4, "{err}");
    assert!(!planted.exists());
}
