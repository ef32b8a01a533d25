//! Restore against a local user who can write to the target's parent
//! (needs root, btrfs-progs, useradd/userdel).
//!
//! A real unprivileged user owns the directory root restores into. While
//! the restore runs, the user's process swaps the staging directory (and
//! tries inner directories) for symlinks to a victim directory only root
//! can write, at several timings. Nothing may ever change in the victim
//! directory; the restore either completes exactly or fails with one error
//! line and exit 7 (target unusable).
//!
//! Also: the device/setuid policy (`--special-files`).

#[macro_use]
mod common;

use common::*;
use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SHARE: &str = "share";

/// A system user made for one test and removed on drop (also when the
/// test fails).
struct TempUser {
    name: String,
    uid: u32,
    gid: u32,
}

impl TempUser {
    fn new() -> TempUser {
        let name = format!(
            "btrship-race-{}-{}",
            std::process::id(),
            rand::random::<u16>()
        );
        run(
            "useradd",
            &[
                "--system",
                "--no-create-home",
                "--user-group",
                "--shell",
                "/usr/sbin/nologin",
                &name,
            ],
        );
        let mut me = TempUser {
            name,
            uid: 0,
            gid: 0,
        };
        me.uid = run("id", &["-u", &me.name]).trim().parse().expect("uid");
        me.gid = run("id", &["-g", &me.name]).trim().parse().expect("gid");
        assert_ne!(me.uid, 0);
        me
    }
}

impl Drop for TempUser {
    fn drop(&mut self) {
        let ok = Command::new("userdel")
            .arg(&self.name)
            .stdin(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            eprintln!("userdel {} failed", self.name);
        }
    }
}

/// The attacker's process, killed on drop.
struct Attacker(std::process::Child);

impl Drop for Attacker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// How the attacker swaps: wait `delay` after the staging directory
/// appears, then swap; with `flip`, swap back and forth every `delay`.
#[derive(Debug, Clone, Copy)]
struct Timing {
    delay: Duration,
    flip: bool,
}

/// Runs this test binary's `attacker` entry point as `user`.
fn start_attacker(user: &TempUser, parent: &Path, victim: &Path, t: Timing) -> Attacker {
    let exe = std::env::current_exe().expect("current exe");
    let child = Command::new(exe)
        .args(["--ignored", "--exact", "attacker", "--nocapture"])
        .arg("--test-threads=1")
        .env("RACE_PARENT", parent)
        .env("RACE_VICTIM", victim)
        .env("RACE_DELAY_US", t.delay.as_micros().to_string())
        .env("RACE_FLIP", if t.flip { "1" } else { "0" })
        .uid(user.uid)
        .gid(user.gid)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("start the attacker");
    Attacker(child)
}

/// The attacker (runs as the unprivileged user, started by
/// `start_attacker`): watches the parent directory for restore's staging
/// directory and swaps it, and any directory it can reach inside it, for
/// symlinks to the victim.
#[test]
#[ignore = "helper process of the race tests, started as another user"]
fn attacker() {
    let (Some(parent), Some(victim)) = (
        std::env::var_os("RACE_PARENT"),
        std::env::var_os("RACE_VICTIM"),
    ) else {
        return;
    };
    let parent = PathBuf::from(parent);
    let victim = PathBuf::from(victim);
    let delay = Duration::from_micros(
        std::env::var("RACE_DELAY_US")
            .ok()
            .and_then(|d| d.parse().ok())
            .unwrap_or(0),
    );
    let flip = std::env::var("RACE_FLIP").is_ok_and(|f| f == "1");
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut n = 0u64;
    while Instant::now() < deadline {
        let Ok(rd) = fs::read_dir(&parent) else {
            std::thread::sleep(Duration::from_micros(200));
            continue;
        };
        let staging: Vec<OsString> = rd
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| n.to_string_lossy().contains(".btrship-partial-"))
            .collect();
        for name in staging {
            let p = parent.join(&name);
            let Ok(md) = fs::symlink_metadata(&p) else {
                continue;
            };
            if !md.is_dir() {
                continue;
            }
            std::thread::sleep(delay);
            // Inner directories, when reachable.
            if let Ok(inner) = fs::read_dir(&p) {
                for e in inner.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        let aside = parent.join(format!("inner-aside-{n}"));
                        n += 1;
                        if fs::rename(e.path(), &aside).is_ok() {
                            let _ = std::os::unix::fs::symlink(&victim, e.path());
                        }
                    }
                }
            }
            let aside = parent.join(format!("aside-{n}"));
            n += 1;
            if fs::rename(&p, &aside).is_err() {
                continue;
            }
            let _ = std::os::unix::fs::symlink(&victim, &p);
            if flip {
                // Back and forth until restore is done with the name.
                loop {
                    std::thread::sleep(delay);
                    if fs::remove_file(&p).is_err() {
                        break;
                    }
                    if fs::rename(&aside, &p).is_err() {
                        break;
                    }
                    std::thread::sleep(delay);
                    if fs::rename(&p, &aside).is_err() {
                        break;
                    }
                    let _ = std::os::unix::fs::symlink(&victim, &p);
                }
            }
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// Lets `user` reach `path` (x on every ancestor directory).
fn let_traverse(path: &Path) {
    let mut p = path.to_path_buf();
    while p.pop() {
        if let Ok(md) = fs::metadata(&p) {
            let mode = md.permissions().mode() & 0o7777;
            if mode & 0o001 == 0 {
                fs::set_permissions(&p, fs::Permissions::from_mode(mode | 0o011)).unwrap();
            }
        }
    }
}

#[test]
fn a_user_swapping_directories_cannot_redirect_restore() {
    let fs_ = LoopBtrfs::new(1024);
    let share = fs_.subvolume(SHARE);
    let b = Btrship::new();
    b.ok(osargs!["init", &share, "--name", SHARE]);
    // Many small files in many directories: a restore of a second or so.
    for d in 0..40 {
        let dir = share.join(format!("d{d:02}"));
        fs::create_dir(&dir).unwrap();
        for f in 0..60 {
            fs::write(
                dir.join(format!("f{f}")),
                format!("{d} {f}\n").repeat(f + 1),
            )
            .unwrap();
        }
        fs::create_dir(dir.join("sub")).unwrap();
        fs::write(dir.join("sub/deep"), b"deep\n").unwrap();
    }
    let refs = fs_.dir("refs");
    reference_snapshot(&share, &refs.join("share"));
    b.ok(osargs!["snapshot", SHARE]);

    let user = TempUser::new();
    let victim = fs_.dir("victim");
    fs::write(victim.join("precious"), b"root's file\n").unwrap();
    fs::set_permissions(&victim, fs::Permissions::from_mode(0o755)).unwrap();
    let victim_before = snapshot_tree(&victim);
    let arena = fs_.dir("arena");
    let_traverse(&arena.join("x"));

    let timings = [
        Timing {
            delay: Duration::ZERO,
            flip: false,
        },
        Timing {
            delay: Duration::from_millis(5),
            flip: false,
        },
        Timing {
            delay: Duration::from_millis(50),
            flip: false,
        },
        Timing {
            delay: Duration::from_millis(300),
            flip: false,
        },
        Timing {
            delay: Duration::from_millis(1),
            flip: true,
        },
        Timing {
            delay: Duration::from_millis(20),
            flip: true,
        },
    ];
    let mut outcomes = Vec::new();
    // Full restores into a new target, then `--path` restores into an
    // existing empty target the user owns.
    let runs = timings
        .iter()
        .map(|t| (*t, None))
        .chain(timings[..3].iter().map(|t| (*t, Some("d07"))));
    for (i, (t, path)) in runs.enumerate() {
        // The user's own directory; root restores into it.
        let parent = arena.join(format!("home{i}"));
        fs::create_dir(&parent).unwrap();
        std::os::unix::fs::chown(&parent, Some(user.uid), Some(user.gid)).unwrap();
        fs::set_permissions(&parent, fs::Permissions::from_mode(0o755)).unwrap();
        let to = parent.join("target");
        let mut args = osargs!["restore", SHARE, "--at", "now", "--to", &to];
        if let Some(p) = path {
            fs::create_dir(&to).unwrap();
            std::os::unix::fs::chown(&to, Some(user.uid), Some(user.gid)).unwrap();
            args.extend(osargs!["--path", p]);
        }
        let attacker = start_attacker(&user, &parent, &victim, t);
        std::thread::sleep(Duration::from_millis(100)); // let it start watching
        let started = Instant::now();
        let o = b.cmd(&args);
        let took = started.elapsed();
        drop(attacker);
        let changed = diff_trees(&victim_before, &snapshot_tree(&victim));
        assert!(
            changed.is_empty(),
            "timing {t:?}: restore wrote into the victim directory ({} changes), e.g. {:#?}",
            changed.len(),
            &changed[..changed.len().min(5)]
        );
        let outcome = if o.status.success() {
            match path {
                None => assert_same_tree(&refs.join("share"), &to),
                Some(p) => {
                    assert_same_tree(&refs.join("share").join(p), &to.join(p));
                    assert_eq!(fs::read_dir(&to).unwrap().count(), 1, "only {p} restored");
                }
            }
            "restored exactly".to_string()
        } else {
            let code = check_error_contract(&o, &format!("restore with timing {t:?}"));
            assert_eq!(
                code,
                7,
                "timing {t:?}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            // Whatever is at the target now is not a tree restore left
            // there looking complete.
            if let Ok(md) = fs::symlink_metadata(&to) {
                assert!(
                    md.uid() == user.uid || md.file_type().is_symlink(),
                    "timing {t:?}: a failed restore left {}",
                    to.display()
                );
            }
            format!("refused: {}", String::from_utf8_lossy(&o.stderr).trim())
        };
        eprintln!("timing {t:?}, --path {path:?}: {took:?}, {outcome}");
        outcomes.push(outcome);
    }
    // The attack must have hit at least once, or the test proves nothing.
    assert!(
        outcomes.iter().any(|o| o.starts_with("refused")),
        "the attacker never got in the way: {outcomes:#?}"
    );
}

/// Device nodes and setuid/setgid bits need `--special-files`; without it
/// they are skipped/cleared and listed, everything else is exact.
#[test]
fn devices_and_setuid_need_special_files() {
    let fs_ = LoopBtrfs::new(1024);
    let share = fs_.subvolume(SHARE);
    let b = Btrship::new();
    b.ok(osargs!["init", &share, "--name", SHARE]);
    fs::create_dir(share.join("dev")).unwrap();
    run(
        "mknod",
        &[share.join("dev/null").to_str().unwrap(), "c", "1", "3"],
    );
    run(
        "mknod",
        &[share.join("dev/loopx").to_str().unwrap(), "b", "7", "200"],
    );
    fs::hard_link(share.join("dev/null"), share.join("null-again")).unwrap();
    run("mkfifo", &[share.join("dev/fifo").to_str().unwrap()]);
    for (name, mode) in [
        ("suid", 0o4755),
        ("sgid", 0o2755),
        ("both", 0o6711),
        ("plain", 0o755),
    ] {
        fs::write(share.join(name), b"#!/bin/sh\n").unwrap();
        fs::set_permissions(share.join(name), fs::Permissions::from_mode(mode)).unwrap();
    }
    fs::create_dir(share.join("shared")).unwrap();
    fs::set_permissions(share.join("shared"), fs::Permissions::from_mode(0o2775)).unwrap();
    let refs = fs_.dir("refs");
    reference_snapshot(&share, &refs.join("share"));
    b.ok(osargs!["snapshot", SHARE]);
    let out = fs_.dir("restores");

    // Default: skipped and cleared, listed in --json.
    let to = out.join("default");
    let json = b.ok(osargs![
        "restore", SHARE, "--at", "now", "--json", "--to", &to
    ]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let mut skipped: Vec<(String, String)> = v["restored"]["skipped"]
        .as_array()
        .expect("restored.skipped")
        .iter()
        .map(|s| {
            (
                s["path"].as_str().unwrap().to_string(),
                s["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    skipped.sort();
    let want: Vec<(String, String)> = [
        ("both", "setuid"),
        ("dev/loopx", "device"),
        ("dev/null", "device"),
        ("null-again", "device"),
        ("sgid", "setuid"),
        ("suid", "setuid"),
    ]
    .iter()
    .map(|(p, r)| (p.to_string(), r.to_string()))
    .collect();
    assert_eq!(skipped, want, "{json}");
    let mut expect = snapshot_tree(&refs.join("share"));
    for p in ["dev/null", "dev/loopx", "null-again"] {
        expect.entries.remove(p.as_bytes());
    }
    expect.links.clear();
    for p in ["suid", "sgid", "both"] {
        expect.entries.get_mut(p.as_bytes()).unwrap().mode &= !0o6000;
    }
    let got = snapshot_tree(&to);
    let diffs = diff_trees(&expect, &got);
    assert!(diffs.is_empty(), "default restore: {diffs:#?}");
    assert_eq!(
        got.entries[b"shared".as_slice()].mode,
        0o2775,
        "setgid directory kept"
    );
    let text = b.ok(osargs![
        "restore",
        SHARE,
        "--at",
        "now",
        "--to",
        out.join("text")
    ]);
    assert!(text.contains("--special-files"), "{text}");
    assert!(text.contains("dev/null"), "{text}");

    // With --special-files: exact.
    let to = out.join("special");
    let json = b.ok(osargs![
        "restore",
        SHARE,
        "--at",
        "now",
        "--special-files",
        "--json",
        "--to",
        &to
    ]);
    assert_same_tree(&refs.join("share"), &to);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["restored"]["skipped"].as_array().map(Vec::len), Some(0));
}
