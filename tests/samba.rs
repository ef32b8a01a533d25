//! Through a real smbd (private config on 127.0.0.1, `vfs objects =
//! acl_xattr`, DOS attributes stored) driven by `smbclient`, with the
//! daemon watching the share: put, overwrite, append, rename (also over an
//! existing file, Office style), delete, mkdir, rmdir and attribute
//! changes over SMB; after each, `btrship sync`, the moment, and a
//! reference snapshot. Every moment then restores on a fresh machine
//! exactly like its reference: contents, names, modes, mtimes and every
//! xattr (`user.DOSATTRIB`, `security.NTACL`, POSIX ACLs).

#[macro_use]
mod common;

use common::samba::Samba;
use common::{assert_same_tree, read_xattrs, reference_snapshot, Btrship, LoopBtrfs};
use std::fs;

fn now_text() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

#[test]
fn samba_operations_restore_at_every_synced_moment() {
    let fs_ = LoopBtrfs::new(1024);
    let share = fs_.subvolume("office");
    let refs = fs_.dir("refs");
    let local = fs_.dir("local");
    let bs = Btrship::new();
    bs.ok(osargs!["init", &share, "--no-systemd"]);
    let daemon = bs.start_daemon("office");
    let smb = Samba::start(&share, "office");

    let file = |name: &str, data: &[u8]| {
        let p = local.join(name);
        fs::write(&p, data).unwrap();
        p
    };
    let big: Vec<u8> = (0..(3u32 << 20)).map(|i| (i % 251) as u8).collect();
    type Step<'a> = Box<dyn Fn() + 'a>;
    let steps: Vec<(&str, Step)> = vec![
        (
            "put",
            Box::new(|| {
                smb.put(&file("a.txt", b"first"), "a.txt");
                smb.put(&file("big.bin", &big), "big.bin");
            }),
        ),
        (
            "overwrite",
            Box::new(|| smb.put(&file("a2.txt", b"second version"), "a.txt")),
        ),
        (
            "append",
            Box::new(|| smb.append(&file("tail.txt", b" + tail"), "a.txt")),
        ),
        (
            "mkdir and put inside",
            Box::new(|| {
                smb.mkdir("Reports");
                smb.put(&file("q1.txt", b"q1 numbers"), "Reports/q1.txt");
                smb.put(&file("q2.txt", b"q2 numbers"), "Reports/q2.txt");
            }),
        ),
        (
            "rename file and directory",
            Box::new(|| {
                smb.rename("a.txt", "b.txt");
                smb.rename("Reports", "Archive");
            }),
        ),
        (
            "office save: temp file renamed over the document",
            Box::new(|| {
                smb.put(&file("doc1.docx", b"doc v1"), "doc.docx");
                smb.put(&file("t.tmp", b"doc v2, saved by Word"), "~WRL0001.tmp");
                smb.rename("~WRL0001.tmp", "doc.docx");
            }),
        ),
        (
            "read-only and hidden attributes",
            Box::new(|| {
                smb.setmode("b.txt", "+r");
                smb.setmode("Archive/q1.txt", "+h");
            }),
        ),
        (
            "delete and rmdir",
            Box::new(|| {
                smb.rm("Archive/q2.txt");
                smb.rm("Archive/q1.txt");
                smb.rmdir("Archive");
            }),
        ),
    ];
    let mut moments = Vec::new();
    for (i, (what, step)) in steps.iter().enumerate() {
        step();
        bs.sync("office");
        let t = now_text();
        reference_snapshot(&share, &refs.join(format!("r{i}")));
        moments.push((*what, t));
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // Samba wrote its metadata: the test means something.
    let x = read_xattrs(&refs.join("r6/b.txt"));
    assert!(x.contains_key(b"user.DOSATTRIB".as_slice()), "{x:?}");
    assert!(x.contains_key(b"security.NTACL".as_slice()), "{x:?}");
    drop(steps);
    drop(smb);
    assert!(daemon.terminate().success());

    let fresh = Btrship::new();
    for (i, (what, t)) in moments.iter().enumerate() {
        let to = fs_.dir("restored").join(format!("r{i}"));
        fresh.ok(osargs![
            "restore",
            "office",
            "--at",
            t,
            "--to",
            &to,
            "--repo",
            bs.repo(),
            "--key-file",
            bs.key_file("office")
        ]);
        eprintln!("moment {i} ({what}) restores exactly");
        assert_same_tree(&refs.join(format!("r{i}")), &to);
    }
    let versions = fresh.ok(osargs![
        "versions",
        "office",
        "doc.docx",
        "--json",
        "--repo",
        bs.repo(),
        "--key-file",
        bs.key_file("office")
    ]);
    let v: serde_json::Value = serde_json::from_str(&versions).unwrap();
    assert!(
        !v["versions"].as_array().unwrap().is_empty(),
        "doc.docx has no versions: {v:#}"
    );
    fresh.ok(osargs![
        "check",
        "office",
        "--read-data",
        "--repo",
        bs.repo(),
        "--key-file",
        bs.key_file("office")
    ]);
}
