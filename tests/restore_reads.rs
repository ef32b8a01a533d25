//! Restore reads packs, not blobs: a share of many small files restores
//! with far fewer GET requests than it has blobs (neighbouring blobs of a
//! pack come in one ranged read), and a byte flipped in one blob in the
//! middle of such a range costs only the one file that needs it (exit 9,
//! that file listed, every other file exact). Needs root and btrfs-progs.

#[macro_use]
mod common;

use btrship_crypto::{read_key_file, ContentId};
use btrship_upload::local::LocalStore;
use btrship_upload::Repository;
use common::*;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::sync::Arc;

const SHARE: &str = "share";
const FILES: usize = 1500;

#[test]
fn small_files_come_in_few_ranged_reads_and_one_bad_blob_costs_one_file() {
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
    // 1,500 files of 1-8 KiB of random bytes (one blob each) in 15
    // directories, and a copy of one of them (one blob, two files).
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for i in 0..FILES {
        let dir = share.join(format!("d{:02}", i % 15));
        fs::create_dir_all(&dir).unwrap();
        let mut data = vec![0u8; rng.gen_range(1024..8192)];
        rng.fill(&mut data[..]);
        fs::write(dir.join(format!("f{i:04}")), &data).unwrap();
    }
    fs::copy(share.join("d00/f0000"), share.join("d00/dup")).unwrap();
    let refs = fs_.dir("refs");
    reference_snapshot(&share, &refs.join("share"));
    b.ok(osargs!["snapshot", SHARE]);

    // Every file and the blobs it needs, read with the library.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = Arc::new(LocalStore::open(b.repo()).unwrap());
    let key = read_key_file(&b.key_file(SHARE)).unwrap();
    let repo = Repository::open(store, Arc::new(key), rt.handle().clone()).unwrap();
    let record = match repo.history_objects().unwrap().0.remove(0).body {
        btrship_upload::history::HistoryBody::Snapshot(r) => r,
        other => panic!("expected the one snapshot record, got {other:?}"),
    };
    let mut files = BTreeMap::new();
    repo_tree_paths(&repo, &record.tree.0, "", &mut files, &mut BTreeMap::new());
    assert_eq!(files.len(), FILES + 1);
    assert_eq!(files["d00/dup"], files["d00/f0000"]);
    let blobs = FILES;

    // (1) A whole restore: far fewer GETs than blobs.
    let out = fs_.dir("restores");
    let to = out.join("all");
    let v: serde_json::Value = serde_json::from_str(&b.ok(osargs![
        "restore", SHARE, "--at", "now", "--json", "--to", &to
    ]))
    .expect("--json output");
    let gets = v["store"]["gets"].as_u64().expect("store.gets");
    eprintln!("restore of {FILES} small files: {}", v["store"]);
    assert!(
        gets * 10 < blobs as u64,
        "{gets} GET requests for {blobs} blobs: {}",
        v["store"]
    );
    assert_same_tree(&refs.join("share"), &to);

    // (2) One byte flipped in a blob in the middle of a coalesced range:
    // the blob between two others of the same pack, all needed.
    let by_blob: HashMap<ContentId, &String> = files
        .iter()
        .filter(|(path, _)| !path.ends_with("f0000") && !path.ends_with("dup"))
        .map(|(path, ids)| (ids[0], path))
        .collect();
    let mut in_pack: BTreeMap<String, Vec<(u64, u64, ContentId)>> = BTreeMap::new();
    for id in by_blob.keys() {
        let loc = repo.locate(id).unwrap();
        in_pack
            .entry(loc.pack)
            .or_default()
            .push((loc.offset, loc.length, *id));
    }
    let (pack, mut blobs_in_pack) = in_pack.into_iter().max_by_key(|(_, b)| b.len()).unwrap();
    blobs_in_pack.sort();
    assert!(blobs_in_pack.len() > 100, "{pack}: {}", blobs_in_pack.len());
    let (offset, length, bad) = blobs_in_pack[blobs_in_pack.len() / 2];
    let bad_file = by_blob[&bad].clone();
    drop(repo);
    drop(rt);
    let objects: BTreeMap<String, std::path::PathBuf> =
        repo_objects(&b.repo()).into_iter().collect();
    flip_byte(&objects[&pack], offset + length / 2, 0x10);

    let to = out.join("damaged");
    let o = b.cmd(osargs![
        "restore", SHARE, "--at", "now", "--json", "--to", &to
    ]);
    let code = check_error_contract(&o, "restore with one flipped byte");
    assert_eq!(code, 9, "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("--json output");
    let listed = v["restored"]["unrestored"].as_array().unwrap();
    assert_eq!(listed.len(), 1, "{listed:#?}");
    assert_eq!(listed[0]["path"], bad_file.as_str(), "{listed:#?}");
    assert_eq!(listed[0]["kind"], "file");
    assert_eq!(listed[0]["pack"], pack.as_str());
    assert_eq!(listed[0]["blob"], bad.to_hex().as_str());
    assert_eq!(v["restored"]["files"], FILES as u64);
    // Still few requests: the damaged blob is read once more on its own.
    let gets = v["store"]["gets"].as_u64().unwrap();
    assert!(gets * 10 < blobs as u64, "{}", v["store"]);
    let mut want = snapshot_tree(&refs.join("share"));
    want.entries
        .retain(|k, _| String::from_utf8_lossy(k) != bad_file.as_str());
    let diffs = diff_trees(&want, &snapshot_tree(&to));
    assert!(diffs.is_empty(), "partial restore differs: {diffs:#?}");
    assert!(fs::symlink_metadata(to.join(&bad_file)).is_err());
}
