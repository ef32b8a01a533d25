//! A throwaway btrfs on a loop device for integration tests.
//!
//! The tests need root and btrfs-progs. They FAIL (not skip) without them.
//! [`LoopFs`] cleans up in `Drop`, also when a test panics: it unmounts its
//! own mounts and detaches its own loop device only.

#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;

/// Runs a command; panics with its output when it fails.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e} (is it installed and in PATH?)"));
    if !out.status.success() {
        panic!(
            "{cmd} {args:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn require_environment() {
    let euid = euid_from_proc();
    assert_eq!(
        euid, 0,
        "these tests need root (loop devices, mount, btrfs ioctls); run them as root"
    );
    let ok = Command::new("mkfs.btrfs")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        ok,
        "mkfs.btrfs not found; install btrfs-progs (apt-get install btrfs-progs) to run these tests"
    );
}

/// Effective uid from /proc (avoids `unsafe` in tests).
fn euid_from_proc() -> u32 {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|rest| rest.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(u32::MAX)
}

/// How the fresh filesystem is mounted at [`LoopFs::mnt`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// The top level (subvolid=5) is mounted; the share is `mnt/share`.
    TopLevel,
    /// Only the `share` subvolume is mounted (`-o subvol=share`), as for a
    /// Samba share; the top level is not visible anywhere.
    ShareOnly,
}

pub struct LoopFs {
    /// Mount point.
    pub mnt: PathBuf,
    /// Path of the `share` subvolume.
    pub share: PathBuf,
    /// Our loop device.
    pub dev: Option<PathBuf>,
    /// Mounts we made, in order; unmounted in reverse.
    mounts: Vec<PathBuf>,
    tmp: TempDir,
}

impl LoopFs {
    pub fn new(layout: Layout) -> LoopFs {
        require_environment();
        let tmp = tempfile::Builder::new()
            .prefix("btrship-snapshot-test")
            .tempdir()
            .expect("create tempdir");
        let mnt = tmp.path().join("mnt");
        let mut me = LoopFs {
            share: mnt.join("share"),
            mnt,
            dev: None,
            mounts: Vec::new(),
            tmp,
        };
        let img = me.tmp.path().join("disk.img");
        let f = fs::File::create(&img).expect("create image");
        f.set_len(1 << 30).expect("truncate image to 1 GiB");
        drop(f);
        let img_s = img.to_str().expect("utf-8 temp path").to_string();
        let dev = run("losetup", &["-f", "--show", &img_s]).trim().to_string();
        assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
        me.dev = Some(PathBuf::from(&dev));
        run("mkfs.btrfs", &["-q", "-f", &dev]);
        fs::create_dir(&me.mnt).expect("mkdir mnt");
        me.mount(&[], &me.mnt.clone());
        run(
            "btrfs",
            &["subvolume", "create", me.share.to_str().unwrap_or("")],
        );
        if layout == Layout::ShareOnly {
            me.umount_last();
            me.mount(&["-o", "subvol=share"], &me.mnt.clone());
            me.share = me.mnt.clone();
        }
        me
    }

    pub fn dev_str(&self) -> String {
        self.dev
            .as_ref()
            .map(|d| d.display().to_string())
            .unwrap_or_default()
    }

    /// Mounts our device at `at` with extra `mount` args; unmounted on drop.
    pub fn mount(&mut self, extra: &[&str], at: &Path) {
        let dev = self.dev_str();
        let at_s = at.to_str().expect("utf-8 path").to_string();
        let mut args: Vec<&str> = extra.to_vec();
        args.push(&dev);
        args.push(&at_s);
        run("mount", &args);
        self.mounts.push(at.to_path_buf());
    }

    /// Mounts the top level at a fresh directory in our tempdir.
    pub fn mount_top_level_elsewhere(&mut self) -> PathBuf {
        let at = self.tmp.path().join(format!("top{}", self.mounts.len()));
        fs::create_dir(&at).expect("mkdir");
        self.mount(&["-o", "subvolid=5"], &at);
        at
    }

    pub fn umount_last(&mut self) {
        if let Some(m) = self.mounts.pop() {
            run("umount", &[m.to_str().unwrap_or("")]);
        }
    }

    /// Lines of /proc/self/mountinfo that mention our device.
    pub fn mountinfo_lines(&self) -> Vec<String> {
        let dev = self.dev_str();
        fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter(|l| l.split(' ').any(|f| f == dev))
            .map(str::to_string)
            .collect()
    }

    pub fn tmp_path(&self) -> &Path {
        self.tmp.path()
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        // Never panic here: this also runs while a failed test unwinds.
        while let Some(m) = self.mounts.pop() {
            // Another test thread spawning a process at the same moment can
            // hold our files briefly (fork copies the fd table until exec),
            // so retry before falling back to a lazy unmount.
            let mut ok = false;
            for _ in 0..20 {
                ok = Command::new("umount")
                    .arg(&m)
                    .stderr(std::process::Stdio::null())
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false);
                if ok {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            if !ok {
                eprintln!("umount {} failed; trying lazy unmount", m.display());
                let _ = Command::new("umount").arg("-l").arg(&m).status();
            }
        }
        if let Some(dev) = self.dev.take() {
            // If a detached mount still holds the filesystem, the kernel
            // detaches the device when that mount goes away (autoclear).
            let ok = Command::new("losetup")
                .arg("-d")
                .arg(&dev)
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if !ok {
                eprintln!("losetup -d {} failed", dev.display());
            }
        }
    }
}

/// All paths under `root` (not following symlinks), `root` excluded.
pub fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) => panic!("read_dir {}: {e}", dir.display()),
        };
        for entry in rd {
            let entry = entry.expect("dir entry");
            let p = entry.path();
            let ft = entry.file_type().expect("file type");
            if ft.is_dir() {
                stack.push(p.clone());
            }
            out.push(p);
        }
    }
    out
}
