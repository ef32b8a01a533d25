//! `btrship init` writes systemd units that systemd itself accepts
//! (`systemd-analyze verify`, with no warning), that run this binary with
//! this machine's config and state directories, at the chosen interval;
//! `--no-systemd` writes none.

#[macro_use]
mod common;

use common::{Btrship, LoopBtrfs};
use std::process::Command;

fn verify(dir: &std::path::Path, instance: &str) {
    // Verify instances of the templates, as systemd would load them.
    let mut paths = Vec::new();
    for (unit, kind) in [
        ("btrship-snapshot", "service"),
        ("btrship-snapshot", "timer"),
        ("btrship", "service"),
    ] {
        let link = dir.join(format!("{unit}@{instance}.{kind}"));
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(format!("{unit}@.{kind}"), &link).unwrap();
        paths.push(link);
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&paths)
        .output()
        .expect("systemd-analyze (package systemd) must be installed");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{stderr}"
    );
    assert!(
        !stderr.contains("btrship"),
        "systemd-analyze verify warned:\n{stderr}"
    );
}

#[test]
fn init_writes_units_systemd_accepts() {
    let fs = LoopBtrfs::new(256);
    let share = fs.subvolume("share");
    let bs = Btrship::new();
    let out = bs.ok(osargs!["init", &share, "--snapshot-every", "30m"]);
    assert!(out.contains("btrship-snapshot@share.timer"), "{out}");
    assert!(out.contains("btrship@share.service"), "{out}");
    let dir = bs.systemd_dir();
    let service = std::fs::read_to_string(dir.join("btrship-snapshot@.service")).unwrap();
    let timer = std::fs::read_to_string(dir.join("btrship-snapshot@.timer")).unwrap();
    let daemon = std::fs::read_to_string(dir.join("btrship@.service")).unwrap();
    for line in ["Type=notify", "Restart=on-failure", "daemon %i"] {
        assert!(daemon.contains(line), "{line}: {daemon}");
    }
    assert!(service.contains(env!("CARGO_BIN_EXE_btrship")), "{service}");
    assert!(
        service.contains(&format!(
            "--config-dir {} --state-dir {}",
            bs.config_dir.display(),
            bs.state_dir.display()
        )),
        "{service}"
    );
    assert!(service.contains("snapshot %i"), "{service}");
    assert!(timer.contains("OnUnitActiveSec=1800s"), "{timer}");
    verify(&dir, "share");

    // A bad interval is a usage error; --no-systemd writes nothing.
    bs.fails(osargs!["init", &share, "--snapshot-every", "5s"], 2);
    let other = Btrship::new();
    other.ok(osargs!["init", &share, "--name", "other", "--no-systemd"]);
    assert!(!other.systemd_dir().exists());
}
