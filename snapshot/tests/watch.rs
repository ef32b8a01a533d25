//! Live change events (`watch::Watcher`) and reflink clones
//! (`watch::clone_file`) against a real loop-mounted btrfs.
//! Needs root and btrfs-progs; fails with a clear message otherwise.

mod common;

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use btrship_snapshot::watch::{clone_closed_file, clone_file, Handle, WatchEvent, Watcher};
use btrship_snapshot::{PrivateArea, Share, SnapshotError};
use common::{run, Layout, LoopFs};

/// Reads until the queue has been empty for `quiet`.
fn drain(w: &mut Watcher) -> Vec<WatchEvent> {
    let mut out = Vec::new();
    loop {
        let batch = w.read(Duration::from_millis(200)).expect("read events");
        if batch.is_empty() {
            return out;
        }
        out.extend(batch);
    }
}

fn dump(label: &str, evs: &[WatchEvent]) {
    println!("--- {label}: {} events", evs.len());
    for e in evs.iter().take(60) {
        println!("{}", describe(e));
    }
}

fn describe(e: &WatchEvent) -> String {
    let k = e.kind;
    let flags: Vec<&str> = [
        (k.create, "CREATE"),
        (k.delete, "DELETE"),
        (k.moved_from, "MOVED_FROM"),
        (k.moved_to, "MOVED_TO"),
        (k.rename, "RENAME"),
        (k.close_write, "CLOSE_WRITE"),
        (k.attrib, "ATTRIB"),
        (k.delete_self, "DELETE_SELF"),
        (k.is_dir, "ONDIR"),
        (k.overflow, "OVERFLOW"),
    ]
    .iter()
    .filter(|(on, _)| *on)
    .map(|(_, n)| *n)
    .collect();
    format!(
        "{} dir={:?} name={:?} old={:?}/{:?} new={:?}/{:?} obj={:?} pid={}",
        flags.join("|"),
        e.dir,
        e.name,
        e.old_dir,
        e.old_name,
        e.new_dir,
        e.new_name,
        e.object.map(|h| (h.root, h.ino, h.gen)),
        e.pid
    )
}

fn p(s: &str) -> PathBuf {
    PathBuf::from(s)
}

fn name_is(e: &WatchEvent, name: &str) -> bool {
    e.name.as_deref() == Some(OsStr::new(name))
}

/// The single event matching `pred`, with a dump of all on failure.
fn find<'a>(
    evs: &'a [WatchEvent],
    what: &str,
    pred: impl Fn(&WatchEvent) -> bool,
) -> &'a WatchEvent {
    let hits: Vec<&WatchEvent> = evs.iter().filter(|e| pred(e)).collect();
    if hits.is_empty() {
        dump("all events", evs);
        panic!("no event: {what}");
    }
    hits[0]
}

fn ino(path: &Path) -> u64 {
    fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .ino()
}

struct Setup {
    watcher: Watcher,
    area: PrivateArea,
    share: Share,
    // Dropped last: unmounts and detaches the loop device.
    lfs: LoopFs,
}

fn setup(layout: Layout) -> Setup {
    let lfs = LoopFs::new(layout);
    let share = Share::open(&lfs.share).expect("open share");
    let area = PrivateArea::open(&share, "share").expect("private area");
    let watcher = Watcher::new(&area, &share).expect("watcher");
    Setup {
        watcher,
        area,
        share,
        lfs,
    }
}

#[test]
fn close_write_is_reported_with_dir_and_name() {
    let mut s = setup(Layout::ShareOnly);
    assert_eq!(s.watcher.share_subvol_id(), s.share.subvol_id);
    assert_eq!(s.watcher.share_path_in_top_level(), Path::new("/share"));
    let root = s.share.path.clone();
    fs::create_dir_all(root.join("docs/2024")).expect("mkdir");
    let _ = drain(&mut s.watcher);

    let file = root.join("docs/2024/report.txt");
    fs::write(&file, b"quarterly numbers").expect("write");
    let evs = drain(&mut s.watcher);
    dump("close_write", &evs);
    let e = find(&evs, "close_write of report.txt", |e| {
        e.kind.close_write && name_is(e, "report.txt")
    });
    assert_eq!(e.dir.as_deref(), Some(Path::new("docs/2024")));
    assert_eq!(e.path(), Some(p("docs/2024/report.txt")));
    assert!(!e.kind.is_dir);
    let obj = e.object.expect("object handle");
    assert_eq!(obj.root, s.share.subvol_id);
    assert_eq!(obj.ino, ino(&file));
    assert!(e.object_raw.is_some());
    let dir = e.dir_handle.expect("dir handle");
    assert_eq!(dir.ino, ino(&root.join("docs/2024")));
    assert_eq!(e.pid, std::process::id() as i32);
    // Every event is about the share (the root-id filter).
    for e in &evs {
        if let Some(o) = e.object {
            assert_eq!(o.root, s.share.subvol_id, "{}", describe(e));
        }
    }

    // Rewriting an existing file in place: close_write, no create.
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .expect("open for write");
    f.write_all(b"Q").expect("write");
    drop(f);
    let evs = drain(&mut s.watcher);
    dump("rewrite", &evs);
    let e = find(&evs, "close_write of rewritten file", |e| {
        e.kind.close_write && name_is(e, "report.txt")
    });
    assert_eq!(e.object.map(|h| h.ino), Some(obj.ino));
    assert!(!evs.iter().any(|e| e.kind.create), "no create on rewrite");

    // Closing a file that was only read reports nothing.
    let mut text = String::new();
    fs::File::open(&file)
        .expect("open")
        .read_to_string(&mut text)
        .expect("read");
    assert!(
        drain(&mut s.watcher).iter().all(|e| !e.kind.close_write),
        "read-only close reported"
    );
}

#[test]
fn directory_entry_events_have_share_relative_paths() {
    let mut s = setup(Layout::ShareOnly);
    let root = s.share.path.clone();
    let sub = s.share.subvol_id;

    // File in the share root.
    fs::write(root.join("a.txt"), b"a").expect("write a");
    let evs = drain(&mut s.watcher);
    dump("create a.txt", &evs);
    let e = find(&evs, "create a.txt", |e| {
        e.kind.create && name_is(e, "a.txt")
    });
    assert_eq!(e.dir.as_deref(), Some(Path::new("")));
    assert!(!e.kind.is_dir);
    assert_eq!(e.object.map(|h| h.ino), Some(ino(&root.join("a.txt"))));

    // mkdir at the root and below.
    fs::create_dir(root.join("d1")).expect("mkdir d1");
    fs::create_dir(root.join("d1/d2")).expect("mkdir d2");
    let evs = drain(&mut s.watcher);
    dump("mkdir", &evs);
    let e = find(&evs, "mkdir d1", |e| e.kind.create && name_is(e, "d1"));
    assert!(e.kind.is_dir);
    assert_eq!(e.dir.as_deref(), Some(Path::new("")));
    let e = find(&evs, "mkdir d1/d2", |e| e.kind.create && name_is(e, "d2"));
    assert!(e.kind.is_dir);
    assert_eq!(e.path(), Some(p("d1/d2")));
    let d2_ino = ino(&root.join("d1/d2"));
    assert_eq!(e.object.map(|h| h.ino), Some(d2_ino));

    fs::write(root.join("d1/d2/f"), b"f").expect("write f");
    let f_ino = ino(&root.join("d1/d2/f"));
    let evs = drain(&mut s.watcher);
    let e = find(&evs, "create d1/d2/f", |e| e.kind.create && name_is(e, "f"));
    assert_eq!(e.path(), Some(p("d1/d2/f")));

    // Rename a file to another directory.
    fs::rename(root.join("d1/d2/f"), root.join("d1/g")).expect("rename file");
    let evs = drain(&mut s.watcher);
    dump("rename file", &evs);
    let e = find(&evs, "rename f -> g", |e| e.kind.rename);
    assert_eq!(e.old_path(), Some(p("d1/d2/f")));
    assert_eq!(e.new_path(), Some(p("d1/g")));
    assert!(!e.kind.is_dir);
    assert_eq!(e.object.map(|h| (h.root, h.ino)), Some((sub, f_ino)));
    let e = find(&evs, "moved_from f", |e| e.kind.moved_from);
    assert_eq!(e.path(), Some(p("d1/d2/f")));
    let e = find(&evs, "moved_to g", |e| e.kind.moved_to);
    assert_eq!(e.path(), Some(p("d1/g")));
    assert_eq!(e.object.map(|h| h.ino), Some(f_ino));

    // Rename a directory.
    let d1_ino = ino(&root.join("d1"));
    fs::rename(root.join("d1"), root.join("d3")).expect("rename dir");
    let evs = drain(&mut s.watcher);
    dump("rename dir", &evs);
    let e = find(&evs, "rename d1 -> d3", |e| e.kind.rename);
    assert!(e.kind.is_dir);
    assert_eq!(e.old_path(), Some(p("d1")));
    assert_eq!(e.new_path(), Some(p("d3")));
    assert_eq!(e.object.map(|h| h.ino), Some(d1_ino));
    let e = find(&evs, "moved_from d1", |e| e.kind.moved_from);
    assert!(e.kind.is_dir);
    assert_eq!(e.path(), Some(p("d1")));
    let e = find(&evs, "moved_to d3", |e| e.kind.moved_to);
    assert!(e.kind.is_dir);
    assert_eq!(e.path(), Some(p("d3")));

    // Unlink and rmdir.
    fs::remove_file(root.join("d3/g")).expect("unlink");
    fs::remove_dir(root.join("d3/d2")).expect("rmdir");
    let evs = drain(&mut s.watcher);
    dump("unlink + rmdir", &evs);
    let e = find(&evs, "delete d3/g", |e| e.kind.delete && name_is(e, "g"));
    assert!(!e.kind.is_dir);
    assert_eq!(e.path(), Some(p("d3/g")));
    assert_eq!(e.object.map(|h| h.ino), Some(f_ino));
    let e = find(&evs, "delete d3/d2", |e| e.kind.delete && name_is(e, "d2"));
    assert!(e.kind.is_dir);
    assert_eq!(e.path(), Some(p("d3/d2")));
    // An event on a directory itself: the directory with name ".".
    let e = find(&evs, "delete_self of d2", |e| {
        e.kind.delete_self && e.kind.is_dir && e.object.map(|h| h.ino) == Some(d2_ino)
    });
    assert!(name_is(e, "."));
    assert_eq!(e.dir, None, "d2 is gone");
    assert_eq!(e.dir_handle.map(|h| h.ino), Some(d2_ino));
    // The unlinked file's last event carries only its handle.
    let e = find(&evs, "delete_self of g", |e| {
        e.kind.delete_self && !e.kind.is_dir
    });
    assert_eq!(e.object.map(|h| h.ino), Some(f_ino));
    assert_eq!((e.dir.as_ref(), e.name.as_ref()), (None, None));

    // Attribute changes on a directory and on the share root itself.
    fs::set_permissions(root.join("d3"), fs::Permissions::from_mode(0o750)).expect("chmod d3");
    fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).expect("chmod root");
    let evs = drain(&mut s.watcher);
    dump("chmod dirs", &evs);
    let e = find(&evs, "attrib d3", |e| {
        e.kind.attrib && e.object.map(|h| h.ino) == Some(d1_ino)
    });
    assert!(e.kind.is_dir);
    assert_eq!(e.path(), Some(p("d3")));
    let e = find(&evs, "attrib on the share root", |e| {
        e.kind.attrib && e.object.map(|h| h.ino) == Some(256)
    });
    assert_eq!(e.path(), Some(p("")));

    // Events in a directory deleted before they are read: the directory
    // resolves to None (ESTALE), the parent's own events still resolve.
    fs::create_dir(root.join("gone")).expect("mkdir gone");
    fs::write(root.join("gone/x"), b"x").expect("write x");
    fs::remove_file(root.join("gone/x")).expect("rm x");
    fs::remove_dir(root.join("gone")).expect("rmdir gone");
    let evs = drain(&mut s.watcher);
    dump("deleted directory", &evs);
    let e = find(&evs, "create gone/x", |e| e.kind.create && name_is(e, "x"));
    assert_eq!(e.dir, None, "deleted directory resolves to None");
    assert!(e.dir_handle.is_some());
    let e = find(&evs, "rmdir gone", |e| e.kind.delete && name_is(e, "gone"));
    assert_eq!(e.dir.as_deref(), Some(Path::new("")));

    // A live directory whose name looks like the kernel's " (deleted)" mark.
    fs::create_dir(root.join("x (deleted)")).expect("mkdir tricky");
    fs::write(root.join("x (deleted)/y"), b"y").expect("write y");
    let evs = drain(&mut s.watcher);
    let e = find(&evs, "create y", |e| e.kind.create && name_is(e, "y"));
    assert_eq!(e.path(), Some(p("x (deleted)/y")));
}

#[test]
fn rename_over_an_existing_file_is_a_replace() {
    let mut s = setup(Layout::ShareOnly);
    let root = s.share.path.clone();
    fs::write(root.join("~tmp123.tmp"), b"new version").expect("write tmp");
    fs::write(root.join("doc.docx"), b"old version").expect("write doc");
    let old_ino = ino(&root.join("doc.docx"));
    let tmp_ino = ino(&root.join("~tmp123.tmp"));
    let _ = drain(&mut s.watcher);

    fs::rename(root.join("~tmp123.tmp"), root.join("doc.docx")).expect("rename over");
    let evs = drain(&mut s.watcher);
    dump("rename over", &evs);
    let e = find(&evs, "rename tmp -> doc", |e| e.kind.rename);
    assert_eq!(e.old_path(), Some(p("~tmp123.tmp")));
    assert_eq!(e.new_path(), Some(p("doc.docx")));
    assert_eq!(e.object.map(|h| h.ino), Some(tmp_ino));
    let e = find(&evs, "moved_to doc", |e| {
        e.kind.moved_to && name_is(e, "doc.docx")
    });
    assert_eq!(e.dir.as_deref(), Some(Path::new("")));
    assert_eq!(e.object.map(|h| h.ino), Some(tmp_ino));
    // The replaced inode: no delete for the overwritten name.
    assert!(
        !evs.iter().any(|e| e.kind.delete),
        "no DELETE for a replaced name"
    );
    // The replaced inode's end is reported on its handle alone.
    let e = find(&evs, "delete_self of the replaced inode", |e| {
        e.kind.delete_self && e.object.map(|h| h.ino) == Some(old_ino)
    });
    assert_eq!((e.dir.as_ref(), e.name.as_ref()), (None, None));
    assert!(matches!(
        s.watcher.open_object(&e.object.expect("handle")),
        Err(SnapshotError::ObjectGone { .. })
    ));
}

#[test]
fn other_subvolumes_are_not_reported() {
    // Top level mounted: the share, another subvolume and a plain directory
    // of the top level side by side, plus the daemon's own snapshots.
    let mut s = setup(Layout::TopLevel);
    let mnt = s.lfs.mnt.clone();
    let root = s.share.path.clone();
    let other = mnt.join("other");
    run(
        "btrfs",
        &["subvolume", "create", other.to_str().expect("utf-8")],
    );
    fs::create_dir(mnt.join("plain")).expect("mkdir plain");
    let _ = drain(&mut s.watcher);

    fs::write(other.join("other-file"), b"x").expect("write other");
    fs::create_dir(other.join("other-dir")).expect("mkdir other");
    fs::rename(other.join("other-file"), other.join("other-renamed")).expect("rename other");
    fs::remove_file(other.join("other-renamed")).expect("rm other");
    fs::write(mnt.join("plain/top-file"), b"x").expect("write top");
    // The daemon's own work in the private area (subvolume 5).
    let staging = s.area.snapshots_dir().join("../staging");
    fs::create_dir(&staging).expect("mkdir staging");
    fs::write(staging.join("staged"), b"x").expect("write staged");
    let snap = s.area.create_snapshot(&s.share).expect("snapshot");
    // A nested subvolume in the share: its creation is an entry in the
    // share, its contents belong to another subvolume.
    let nested = root.join("nested");
    run(
        "btrfs",
        &["subvolume", "create", nested.to_str().expect("utf-8")],
    );
    fs::write(nested.join("nested-file"), b"x").expect("write nested");
    // And one real change in the share.
    fs::write(root.join("marker"), b"x").expect("write marker");

    let evs = drain(&mut s.watcher);
    dump("mixed", &evs);
    let names: BTreeSet<String> = evs
        .iter()
        .filter_map(|e| e.name.as_ref())
        .map(|n| n.to_string_lossy().into_owned())
        .collect();
    assert!(names.contains("marker"), "{names:?}");
    assert!(names.contains("nested"), "{names:?}");
    for foreign in [
        "other-file",
        "other-dir",
        "other-renamed",
        "top-file",
        "staging",
        "staged",
        "nested-file",
        snap.name.as_str(),
    ] {
        assert!(!names.contains(foreign), "{foreign} reported: {names:?}");
    }
    for e in &evs {
        assert!(e.old_name.is_none(), "{}", describe(e));
        assert!(e.dir.is_some(), "{}", describe(e));
    }
    let e = find(&evs, "nested subvolume", |e| name_is(e, "nested"));
    assert!(e.kind.create && e.kind.is_dir);
    assert_eq!(e.dir_handle.map(|h| h.root), Some(s.share.subvol_id));
    // The child handle is the new subvolume's root directory.
    let child = e.object.expect("child handle");
    assert_ne!(child.root, s.share.subvol_id);
    assert_eq!(child.ino, 256);
}

#[test]
fn twenty_thousand_creates_do_not_overflow() {
    const N: usize = 20_000;
    let mut s = setup(Layout::ShareOnly);
    let dir = s.share.path.join("many");
    fs::create_dir(&dir).expect("mkdir");
    let _ = drain(&mut s.watcher);
    let t = Instant::now();
    for i in 0..N {
        fs::File::create(dir.join(format!("f{i:05}"))).expect("create");
    }
    println!("{N} creates: {:?}", t.elapsed());
    // More than the default 16384-event queue is now waiting.
    let t = Instant::now();
    let mut evs = s.watcher.read(Duration::ZERO).expect("read");
    println!("first read: {} events in {:?}", evs.len(), t.elapsed());
    evs.extend(drain(&mut s.watcher));
    assert!(!evs.iter().any(|e| e.kind.overflow), "queue overflowed");
    let created: BTreeSet<&OsStr> = evs
        .iter()
        .filter(|e| e.kind.create)
        .inspect(|e| assert_eq!(e.dir.as_deref(), Some(Path::new("many"))))
        .filter_map(|e| e.name.as_deref())
        .collect();
    assert_eq!(created.len(), N);
    let closed = evs.iter().filter(|e| e.kind.close_write).count();
    println!(
        "events with create: {}, with close_write: {closed}",
        evs.iter().filter(|e| e.kind.create).count()
    );
}

#[test]
fn open_object_returns_the_closed_inode() {
    let mut s = setup(Layout::ShareOnly);
    let root = s.share.path.clone();
    fs::write(root.join("a.bin"), b"first content").expect("write");
    let evs = drain(&mut s.watcher);
    let handle: Handle = find(&evs, "close_write a.bin", |e| {
        e.kind.close_write && name_is(e, "a.bin")
    })
    .object
    .expect("object");

    // The name now points to another inode; the handle still finds the old.
    fs::rename(root.join("a.bin"), root.join("b.bin")).expect("rename");
    fs::write(root.join("a.bin"), b"second content").expect("write again");
    let mut f = s.watcher.open_object(&handle).expect("open_object");
    let mut text = String::new();
    f.read_to_string(&mut text).expect("read");
    assert_eq!(text, "first content");
    assert_eq!(f.metadata().expect("stat").ino(), handle.ino);
    drop(f);

    // Directories are refused.
    let _ = drain(&mut s.watcher);
    fs::create_dir(root.join("dir")).expect("mkdir");
    let evs = drain(&mut s.watcher);
    let dir_handle = find(&evs, "mkdir", |e| e.kind.create && e.kind.is_dir)
        .object
        .expect("dir object");
    assert!(matches!(
        s.watcher.open_object(&dir_handle),
        Err(SnapshotError::NotRegularFile { .. })
    ));

    // Deleted: ObjectGone, not some other error.
    fs::remove_file(root.join("b.bin")).expect("unlink");
    match s.watcher.open_object(&handle) {
        Err(SnapshotError::ObjectGone { root, ino, gen }) => {
            assert_eq!((root, ino, gen), (handle.root, handle.ino, handle.gen));
        }
        other => panic!("expected ObjectGone, got {other:?}"),
    }
    // The current a.bin opens with its own handle, but not with a wrong
    // generation (what a reused inode number would look like).
    let current = Handle {
        ino: ino(&root.join("a.bin")),
        ..handle
    };
    let mut text = String::new();
    s.watcher
        .open_object(&current)
        .expect("open current a.bin")
        .read_to_string(&mut text)
        .expect("read");
    assert_eq!(text, "second content");
    let wrong_gen = Handle {
        gen: current.gen + 1000,
        ..current
    };
    assert!(matches!(
        s.watcher.open_object(&wrong_gen),
        Err(SnapshotError::ObjectGone { .. })
    ));
}

/// Whether `filefrag` reports any extent of `path` as shared.
fn has_shared_extent(path: &Path) -> bool {
    let out = run("filefrag", &["-v", "-s", path.to_str().expect("utf-8")]);
    out.lines().any(|l| l.contains("shared"))
}

#[test]
fn clone_file_makes_an_independent_shared_copy() {
    let mut s = setup(Layout::ShareOnly);
    let root = s.share.path.clone();
    let src_path = root.join("big.bin");
    let data: Vec<u8> = (0..(8u32 << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    fs::write(&src_path, &data).expect("write source");
    run("sync", &[]);
    assert!(!has_shared_extent(&src_path), "fresh file already shared");
    let evs = drain(&mut s.watcher);
    let handle = find(&evs, "close_write big.bin", |e| {
        e.kind.close_write && name_is(e, "big.bin")
    })
    .object
    .expect("object");

    // Clone into the private area (another subvolume on the same fs).
    let staging = s.area.snapshots_dir().join("../staging");
    fs::create_dir(&staging).expect("mkdir staging");
    let dst_path = staging.join("big.clone");
    let src = s.watcher.open_object(&handle).expect("open source");
    let dst = fs::File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&dst_path)
        .expect("create clone");
    let t = Instant::now();
    clone_file(&src, &dst).expect("FICLONE");
    let took = t.elapsed();
    println!("FICLONE of 8 MiB: {took:?}");
    assert!(took < Duration::from_secs(2), "clone took {took:?}");
    assert_eq!(dst.metadata().expect("stat").len(), data.len() as u64);
    assert!(
        fs::read(&dst_path).expect("read clone") == data,
        "clone differs"
    );
    assert!(
        has_shared_extent(&src_path),
        "source extents not shared after clone"
    );

    // The clone is not reported (other subvolume).
    let evs = drain(&mut s.watcher);
    dump("after clone", &evs);
    assert!(
        !evs.iter()
            .any(|e| name_is(e, "big.clone") || name_is(e, "staging")),
        "clone reported"
    );

    // Writing to the source does not change the clone.
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(&src_path)
        .expect("open source for write");
    f.seek(SeekFrom::Start(4096)).expect("seek");
    f.write_all(&[0xEE; 65536]).expect("overwrite");
    f.sync_all().expect("fsync");
    drop(f);
    let now_src = fs::read(&src_path).expect("read source");
    assert_eq!(&now_src[4096..4096 + 65536], &[0xEE; 65536][..]);
    assert!(
        fs::read(&dst_path).expect("read clone") == data,
        "clone changed"
    );
    let evs = drain(&mut s.watcher);
    find(&evs, "close_write after overwrite", |e| {
        e.kind.close_write && name_is(e, "big.bin")
    });

    // Cross-filesystem clones fail cleanly.
    let tmp = tempfile::tempfile().expect("tempfile");
    assert!(matches!(
        clone_file(&src, &tmp),
        Err(SnapshotError::Ioctl { op: "FICLONE", .. })
    ));
}

#[test]
fn clone_closed_file_refuses_while_a_writer_has_it_open() {
    let mut s = setup(Layout::ShareOnly);
    let path = s.share.path.join("doc.txt");
    fs::write(&path, b"version one").expect("write");
    let staging = s.area.staging_dir().expect("staging subvolume");
    assert_eq!(s.area.staging_dir().expect("again"), staging);
    let mut writer = fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open for writing");
    writer.write_all(b"VERSION").expect("write");
    let new_clone = |name: &str| {
        fs::File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(staging.join(name))
            .expect("create clone")
    };
    let src = fs::File::open(&path).expect("open read-only");
    assert!(
        !clone_closed_file(&src, &new_clone("a")).expect("lease attempt"),
        "cloned while a writer had the file open"
    );
    drop(writer);
    assert!(clone_closed_file(&src, &new_clone("b")).expect("clone after close"));
    assert_eq!(fs::read(staging.join("b")).expect("read"), b"VERSION one");
    // The lease is released: a writer can open the file again at once.
    let t = Instant::now();
    fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("reopen for writing");
    assert!(t.elapsed() < Duration::from_secs(1));
    // Writes in the staging subvolume are not reported.
    let evs = drain(&mut s.watcher);
    assert!(
        !evs.iter().any(|e| name_is(e, "a") || name_is(e, "b")),
        "staging writes were reported"
    );
}
