//! A damaged repository degrades a restore instead of stopping it: a
//! missing pack, a flipped byte inside a data blob and a flipped byte
//! inside a directory's tree blob affect only the paths that need them.
//! Restore writes everything intact, lists what it could not restore
//! (path and object, also in `--json`), leaves no partial file under a
//! listed path, and exits 9. Needs root and btrfs-progs.

#[macro_use]
mod common;

use btrship_crypto::{read_key_file, ContentId};
use btrship_upload::format::BlobKind;
use btrship_upload::local::LocalStore;
use btrship_upload::Repository;
use common::*;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs;
use std::sync::Arc;

const SHARE: &str = "share";

#[test]
fn damaged_packs_and_trees_affect_only_the_paths_that_need_them() {
    let fs_ = LoopBtrfs::new(1024);
    let share = fs_.subvolume(SHARE);
    let b = Btrship::new();
    b.ok(osargs![
        "init",
        &share,
        "--name",
        SHARE,
        "--pack-size",
        "4M"
    ]);
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    for d in 0..6 {
        let dir = share.join(format!("d{d}"));
        fs::create_dir_all(dir.join("sub")).unwrap();
        let mut big = vec![0u8; 2_500_000 + d * 1000];
        rng.fill(&mut big[..]);
        fs::write(dir.join("big.bin"), &big).unwrap();
        let mut mid = vec![0u8; 300_000];
        rng.fill(&mut mid[..]);
        fs::write(dir.join("mid.bin"), &mid).unwrap();
        fs::write(dir.join("small.txt"), format!("small {d}\n")).unwrap();
        fs::write(dir.join("sub/note.txt"), format!("note {d}\n")).unwrap();
    }
    fs::write(share.join("top.txt"), b"top\n").unwrap();
    let refs = fs_.dir("refs");
    reference_snapshot(&share, &refs.join("share"));
    b.ok(osargs!["snapshot", SHARE]);

    // Where everything lives, read with the library and the key.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = Arc::new(LocalStore::open(b.repo()).unwrap());
    let key = read_key_file(&b.key_file(SHARE)).unwrap();
    let repo = Repository::open(store, Arc::new(key), rt.handle().clone()).unwrap();
    let record = match repo.history_objects().unwrap().0.remove(0).body {
        btrship_upload::history::HistoryBody::Snapshot(r) => r,
        other => panic!("expected the one snapshot record, got {other:?}"),
    };
    let (mut files, mut dirs) = (BTreeMap::new(), BTreeMap::new());
    repo_tree_paths(&repo, &record.tree.0, "", &mut files, &mut dirs);
    let packs = repo.packs_in_index();
    let bad_tree_dir = "d3/sub";
    // Damage packs that hold neither the root tree nor the trees on the
    // way to the damaged directory (packs mix trees and data).
    let spared: HashSet<ContentId> = [record.tree.0, dirs["d3"], dirs[bad_tree_dir]].into();
    // Data blobs of files outside the damaged directory.
    let used: HashSet<ContentId> = files
        .iter()
        .filter(|(p, _)| !p.starts_with(&format!("{bad_tree_dir}/")))
        .flat_map(|(_, ids)| ids.iter().copied())
        .collect();
    let mut candidates: Vec<&String> = packs
        .iter()
        .filter(|(_, blobs)| blobs.iter().all(|(id, _)| !spared.contains(id)))
        .filter(|(_, blobs)| blobs.iter().any(|(id, _)| used.contains(id)))
        .map(|(p, _)| p)
        .collect();
    candidates.sort();
    assert!(
        candidates.len() >= 2,
        "want two packs to damage: {packs:#?}"
    );
    let missing = candidates[0].clone();
    // The flipped blob must belong to a file whose directories stay
    // readable: not below a directory whose tree is in the missing pack
    // (pack contents depend on the order the sealing threads finish).
    let lost_dirs: Vec<String> = dirs
        .iter()
        .filter(|(_, id)| packs[&missing].iter().any(|(b, _)| b == *id))
        .map(|(p, _)| format!("{p}/"))
        .collect();
    let reachable: HashSet<ContentId> = files
        .iter()
        .filter(|(p, _)| !p.starts_with(&format!("{bad_tree_dir}/")))
        .filter(|(p, _)| !lost_dirs.iter().any(|d| p.starts_with(d)))
        .flat_map(|(_, ids)| ids.iter().copied())
        .collect();
    let (flipped, bad_blob) = candidates[1..]
        .iter()
        .find_map(|pack| {
            packs[*pack]
                .iter()
                .find(|(id, l)| l.kind == BlobKind::Data && reachable.contains(id))
                .map(|(id, _)| ((*pack).clone(), *id))
        })
        .expect("a second pack with a blob of a reachable file");
    let bad_blob_loc = repo.locate(&bad_blob).unwrap();
    let bad_tree_loc = repo.locate(&dirs[bad_tree_dir]).unwrap();
    // The model: which blobs are bad, in which pack.
    let mut bad: BTreeMap<ContentId, String> = packs[&missing]
        .iter()
        .map(|(id, _)| (*id, missing.clone()))
        .collect();
    bad.insert(bad_blob, flipped.clone());
    bad.insert(dirs[bad_tree_dir], bad_tree_loc.pack.clone());
    let mut expect: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut expect_dirs: BTreeMap<String, String> = BTreeMap::new();
    let mut all: BTreeMap<String, Vec<ContentId>> = files.clone();
    for (p, id) in &dirs {
        all.insert(p.clone(), vec![*id]);
    }
    for (p, ids) in &all {
        if expect_dirs.keys().any(|d| p.starts_with(&format!("{d}/"))) {
            continue; // below a directory whose tree is unreadable
        }
        let packs: BTreeSet<String> = ids.iter().filter_map(|i| bad.get(i).cloned()).collect();
        if packs.is_empty() {
            continue;
        }
        if dirs.contains_key(p) {
            expect_dirs.insert(p.clone(), packs.into_iter().next().unwrap());
        } else {
            expect.insert(p.clone(), packs);
        }
    }
    assert!(expect_dirs.contains_key(bad_tree_dir), "{expect_dirs:?}");
    for pack in [&missing, &flipped] {
        assert!(
            expect.values().any(|p| p.contains(pack)) || expect_dirs.values().any(|p| p == pack),
            "{pack} affects nothing: {expect:?} {expect_dirs:?}"
        );
    }
    assert!(
        expect.len() < files.len() / 2,
        "the damage should spare most files"
    );
    drop(repo);
    drop(rt);

    // (a) a pack deleted, (b) a byte flipped inside one blob of another
    // pack, (c) a byte flipped inside the tree blob of one directory.
    let objects: BTreeMap<String, std::path::PathBuf> =
        repo_objects(&b.repo()).into_iter().collect();
    fs::remove_file(&objects[&missing]).unwrap();
    flip_byte(
        &objects[&flipped],
        bad_blob_loc.offset + bad_blob_loc.length / 2,
        0x40,
    );
    flip_byte(
        &objects[&bad_tree_loc.pack],
        bad_tree_loc.offset + bad_tree_loc.length / 2,
        0x40,
    );

    let out = fs_.dir("restores");
    let to = out.join("json");
    let o = b.cmd(osargs![
        "restore", SHARE, "--at", "now", "--json", "--to", &to
    ]);
    let code = check_error_contract(&o, "restore of a damaged repository");
    assert_eq!(code, 9, "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("--json output");
    let listed = v["restored"]["unrestored"]
        .as_array()
        .expect("restored.unrestored");
    let mut got: BTreeMap<String, String> = BTreeMap::new();
    let mut got_dirs = BTreeMap::new();
    for u in listed {
        let path = u["path"].as_str().unwrap().to_string();
        assert!(u["blob"].as_str().is_some_and(|b| b.len() == 64), "{u}");
        assert!(u["error"].as_str().is_some_and(|e| !e.is_empty()), "{u}");
        let pack = u["pack"].as_str().expect("pack").to_string();
        match u["kind"].as_str().unwrap() {
            "file" => got.insert(path, pack),
            "directory" => got_dirs.insert(path, pack),
            k => panic!("unexpected kind {k}: {u}"),
        };
    }
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        expect.keys().collect::<Vec<_>>(),
        "files listed as not restored"
    );
    for (p, pack) in &got {
        assert!(
            expect[p].contains(pack),
            "{p}: listed with {pack}, expected one of {:?}",
            expect[p]
        );
    }
    assert_eq!(
        got_dirs, expect_dirs,
        "directories listed with unreadable trees"
    );
    eprintln!(
        "{} of {} files and {} directories listed as not restored",
        got.len(),
        files.len(),
        got_dirs.len()
    );

    // Everything else is exact; nothing is left under a listed path; the
    // directory with the unreadable tree is there, empty.
    let mut want = snapshot_tree(&refs.join("share"));
    want.entries.retain(|k, _| {
        let p = String::from_utf8_lossy(k);
        !expect.contains_key(p.as_ref())
            && !expect_dirs.keys().any(|d| p.starts_with(&format!("{d}/")))
    });
    let have = snapshot_tree(&to);
    let diffs = diff_trees(&want, &have);
    assert!(diffs.is_empty(), "partial restore differs: {diffs:#?}");
    for p in expect.keys() {
        assert!(
            fs::symlink_metadata(to.join(p)).is_err(),
            "{p} is listed but was left in the target"
        );
    }
    for d in expect_dirs.keys() {
        assert_eq!(
            fs::read_dir(to.join(d)).unwrap().count(),
            0,
            "{d} is not empty"
        );
    }
    let leftovers: Vec<_> = fs::read_dir(&out)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("btrship-partial"))
        .collect();
    assert!(leftovers.is_empty(), "staging left behind: {leftovers:?}");

    // The text output names the paths and the objects too.
    let to = out.join("text");
    let o = b.cmd(osargs!["restore", SHARE, "--at", "now", "--to", &to]);
    assert_eq!(check_error_contract(&o, "text restore"), 9);
    let stdout = String::from_utf8_lossy(&o.stdout);
    for (p, packs) in &expect {
        assert!(
            stdout
                .lines()
                .any(|l| l.contains(p.as_str()) && packs.iter().any(|k| l.contains(k.as_str()))),
            "{p} ({packs:?}) not listed:\n{stdout}"
        );
    }
    assert!(stdout.contains(bad_tree_dir), "{stdout}");
}
