//! `btrship init` writes systemd units that systemd itself accepts
//! (`systemd-analyze verify`, with no warning), that run this binary with
//! this machine's config and state directories, and the share's interval as
//! a drop-in, and the daily prune timer and service (under the snapshot
//! service's sandbox); when the units installed by the package (here a stand-in for
//! /lib/systemd/system, `BTRSHIP_SYSTEM_UNIT_DIR`) run this binary with
//! these directories it writes only the drop-in; `--no-systemd` writes
//! none. The example config of the package explains every setting.

#[macro_use]
mod common;

use common::{Btrship, LoopBtrfs};
use std::path::Path;
use std::process::Command;

const TEMPLATES: [&str; 6] = [
    "btrship@.service",
    "btrship-snapshot@.service",
    "btrship-snapshot@.timer",
    "btrship-prune@.service",
    "btrship-prune@.timer",
    "btrship-mount@.service",
];

/// `systemd-analyze verify` on instances of the templates in `templates`,
/// as systemd would load them: links named after the instance in `dir`
/// (where drop-ins are found too). Returns the error output on failure.
fn try_verify(dir: &Path, templates: &Path, instance: &str) -> Result<(), String> {
    let mut paths = Vec::new();
    for t in TEMPLATES {
        let link = dir.join(t.replace("@.", &format!("@{instance}.")));
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(templates.join(t), &link).unwrap();
        paths.push(link);
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&paths)
        .output()
        .expect("systemd-analyze (package systemd) must be installed");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() || stderr.contains("btrship") {
        return Err(stderr);
    }
    Ok(())
}

fn verify(dir: &Path, templates: &Path, instance: &str) {
    if let Err(e) = try_verify(dir, templates, instance) {
        panic!("systemd-analyze verify failed or warned:\n{e}");
    }
}

/// The prune service runs `btrship prune` on the instance's share with this
/// binary and these directories, in the background, under every option of
/// the snapshot service's sandbox; its timer fires daily and catches up on
/// a missed day.
fn check_prune_units(bs: &Btrship, dir: &Path) {
    let service = std::fs::read_to_string(dir.join("btrship-prune@.service")).unwrap();
    let timer = std::fs::read_to_string(dir.join("btrship-prune@.timer")).unwrap();
    let exec = format!(
        "\nExecStart={} --config-dir {} --state-dir {} --no-progress prune %i\n",
        env!("CARGO_BIN_EXE_btrship"),
        bs.config_dir.display(),
        bs.state_dir.display()
    );
    assert!(service.contains(&exec), "{exec}: {service}");
    for line in ["Type=oneshot", "Nice=10", "IOSchedulingClass=idle"] {
        assert!(
            service.contains(&format!("\n{line}\n")),
            "{line}: {service}"
        );
    }
    assert!(
        !service.contains("[Install]"),
        "started by its timer only: {service}"
    );
    let hardening = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/hardening-snapshot.conf");
    let hardening = std::fs::read_to_string(hardening).unwrap();
    let options: Vec<&str> = hardening
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('['))
        .collect();
    assert!(
        options.contains(&"CapabilityBoundingSet=CAP_SYS_ADMIN CAP_DAC_READ_SEARCH"),
        "{hardening}"
    );
    for option in options {
        assert!(
            service.contains(&format!("\n{option}\n")),
            "{option}: {service}"
        );
    }
    for line in [
        "OnCalendar=daily",
        "RandomizedDelaySec=1h",
        "Persistent=true",
        "WantedBy=timers.target",
    ] {
        assert!(timer.contains(&format!("\n{line}\n")), "{line}: {timer}");
    }
}

fn dropin(systemd_dir: &Path, name: &str) -> String {
    let path = systemd_dir.join(format!("btrship-snapshot@{name}.timer.d/btrship.conf"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn init_writes_units_systemd_accepts() {
    let fs = LoopBtrfs::new(256);
    let share = fs.subvolume("share");
    let bs = Btrship::new();
    let out = bs.ok(osargs!["init", &share, "--snapshot-every", "30m"]);
    assert!(out.contains("btrship-snapshot@share.timer"), "{out}");
    assert!(out.contains("btrship@share.service"), "{out}");
    assert!(out.contains("btrship-prune@share.timer"), "{out}");
    let dir = bs.systemd_dir();
    let service = std::fs::read_to_string(dir.join("btrship-snapshot@.service")).unwrap();
    let timer = std::fs::read_to_string(dir.join("btrship-snapshot@.timer")).unwrap();
    let daemon = std::fs::read_to_string(dir.join("btrship@.service")).unwrap();
    for line in [
        "Type=notify",
        "Restart=on-failure",
        "WatchdogSec=5min",
        "RestartPreventExitStatus=",
        "daemon %i",
    ] {
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
    check_prune_units(&bs, &dir);
    // The template runs hourly; the share's own interval is its drop-in.
    assert!(timer.contains("OnUnitActiveSec=3600s"), "{timer}");
    let conf = dropin(&dir, "share");
    assert!(conf.contains("\nOnUnitActiveSec=1800s\n"), "{conf}");
    verify(&dir, &dir, "share");

    // A bad interval is a usage error; --no-systemd writes nothing.
    bs.fails(osargs!["init", &share, "--snapshot-every", "5s"], 2);
    let other = Btrship::new();
    other.ok(osargs!["init", &share, "--name", "other", "--no-systemd"]);
    assert!(!other.systemd_dir().exists());
}

#[test]
fn init_uses_installed_units_and_writes_only_the_dropin() {
    let fs = LoopBtrfs::new(256);
    let share = fs.subvolume("share");
    let bs = Btrship::new();
    // What the package installs in /lib/systemd/system, rendered as
    // scripts/package does, for this binary and these directories.
    let installed = bs.config_dir.with_file_name("lib-systemd-system");
    bs.ok(osargs!["units", "--out", &installed]);
    for t in TEMPLATES {
        assert!(installed.join(t).is_file(), "{t}");
    }
    check_prune_units(&bs, &installed);
    // The package's example config in the config dir is not a share.
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/share.toml.example");
    std::fs::copy(&example, bs.config_dir.join("share.toml.example")).unwrap();

    let env = [("BTRSHIP_SYSTEM_UNIT_DIR", installed.to_str().unwrap())];
    let init = |every: &str| {
        let out = bs.cmd_env(
            osargs![
                "init",
                &share,
                "--name",
                "office",
                "--snapshot-every",
                every
            ],
            &env,
        );
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        assert!(out.status.success(), "init failed:\n{stderr}\n{stdout}");
        assert!(stderr.is_empty(), "{stderr}");
        stdout
    };
    let out = init("45m");
    assert!(out.contains("(installed with btrship)"), "{out}");
    assert!(
        out.contains(
            "btrship@office.service btrship-snapshot@office.timer btrship-prune@office.timer"
        ),
        "{out}"
    );
    let dir = bs.systemd_dir();
    let mut entries: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    entries.sort();
    assert_eq!(
        entries,
        ["btrship-snapshot@office.timer.d"],
        "only the drop-in"
    );
    let conf = dropin(&dir, "office");
    assert!(conf.contains("\nOnUnitActiveSec=2700s\n"), "{conf}");
    assert!(conf.contains("\nOnActiveSec=1min\n"), "{conf}");
    verify(&dir, &installed, "office");

    // verify reads the drop-in: without OnActiveSec= the reset leaves the
    // timer with nothing to do, and systemd refuses it.
    let conf_path = dir.join("btrship-snapshot@office.timer.d/btrship.conf");
    std::fs::write(&conf_path, "[Timer]\nOnUnitActiveSec=\n").unwrap();
    assert!(try_verify(&dir, &installed, "office").is_err());

    // Again with the default interval: the drop-in says so; nothing else.
    let out = init("1h");
    assert!(out.contains("every 3600 s"), "{out}");
    assert!(dropin(&dir, "office").contains("\nOnUnitActiveSec=3600s\n"));
    assert!(!dir.join("btrship@.service").exists());
    verify(&dir, &installed, "office");

    // Installed units that run another binary (or other directories) are
    // not used: init writes the templates.
    let daemon = installed.join("btrship@.service");
    let text = std::fs::read_to_string(&daemon).unwrap();
    std::fs::write(
        &daemon,
        text.replace(env!("CARGO_BIN_EXE_btrship"), "/usr/bin/btrship"),
    )
    .unwrap();
    let out = init("30m");
    assert!(!out.contains("installed with btrship"), "{out}");
    for t in TEMPLATES {
        assert!(dir.join(t).is_file(), "{t}");
    }
    assert!(dropin(&dir, "office").contains("\nOnUnitActiveSec=1800s\n"));
    verify(&dir, &dir, "office");
}

/// The commented example config (`/usr/share/doc/btrship/examples/`)
/// parses as a share config, and with its optional settings uncommented
/// sets every field there is, by its right name.
#[test]
fn example_config_explains_every_setting() {
    use btrship::config::ShareConfig;
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/share.toml.example");
    let text = std::fs::read_to_string(&path).unwrap();
    let cfg: ShareConfig = toml::from_str(&text).expect("the example as it is");
    assert_eq!(
        cfg.keep_local_snapshots,
        ShareConfig::defaults().keep_local_snapshots
    );
    let uncommented: String = text
        .lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(rest)
                if rest.split_once(" = ").is_some_and(|(k, _)| {
                    !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                }) =>
            {
                rest
            }
            _ => l,
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let full: ShareConfig = toml::from_str(&uncommented).expect("the example uncommented");
    // The shown defaults are the defaults.
    let d = ShareConfig::defaults();
    assert_eq!(full.keep_local_snapshots, d.keep_local_snapshots);
    assert_eq!(full.max_queued_snapshots, d.max_queued_snapshots);
    assert_eq!(full.settle_ms, d.settle_ms);
    assert_eq!(full.exclude, d.exclude);
    // Every field there is: serde names them all when refusing an unknown one.
    let err = toml::from_str::<ShareConfig>("not_a_setting = 1")
        .expect_err("unknown fields are refused")
        .to_string();
    let expected = err
        .split_once("expected one of ")
        .map(|(_, list)| list)
        .unwrap_or_else(|| panic!("{err}"));
    let mut b: Vec<&str> = expected
        .split(", ")
        .map(|f| f.trim().trim_matches('`'))
        .collect();
    let set: toml::Table = toml::from_str(&uncommented).unwrap();
    let mut a: Vec<&str> = set.keys().map(|k| k.as_str()).collect();
    a.sort();
    b.sort();
    assert_eq!(a, b, "the example sets every field of ShareConfig");
}
