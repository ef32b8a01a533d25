//! Size classes seen by the store (FORMAT.md §6a): the daemon's burst of
//! 1,000 small closes ships in a few objects, every one of a class size.
//! Real btrfs (loop device; root), the real daemon, local repository.
//!
//! Run: `cargo test --test padding -- --test-threads=1` (as root).

#[macro_use]
mod common;

use btrship_upload::padding::size_class;
use common::*;
use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

fn objects(repo: &Path) -> BTreeMap<String, u64> {
    repo_objects(repo)
        .into_iter()
        .map(|(name, p)| {
            let len = fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
            (name, len)
        })
        .collect()
}

#[test]
fn a_burst_of_1000_small_closes_ships_in_few_objects_of_class_sizes() {
    let fs_ = LoopBtrfs::new(1024);
    let share = fs_.subvolume("share");
    let bs = Btrship::new();
    bs.ok(osargs!["init", &share, "--no-systemd"]);
    fs::create_dir(share.join("small")).expect("mkdir");
    let daemon = bs.start_daemon("share");
    bs.sync("share");
    let before = objects(&bs.repo());

    const FILES: u64 = 1000;
    // One burst, as fast as a writer can: contents made beforehand.
    let contents: Vec<Vec<u8>> = (0..FILES)
        .map(|i| {
            let tmp = fs_.dir("gen").join(format!("{i}"));
            write_random_file(&tmp, 4 * KIB, 1000 + i);
            fs::read(&tmp).expect("read generated file")
        })
        .collect();
    for (i, c) in contents.iter().enumerate() {
        fs::write(share.join(format!("small/f{i:04}")), c).expect("write");
    }
    bs.sync("share");
    let after = objects(&bs.repo());
    let new: Vec<(&String, &u64)> = after
        .iter()
        .filter(|(name, _)| !before.contains_key(*name))
        .collect();
    let data = FILES * 4 * KIB;
    let stored: u64 = new.iter().map(|(_, len)| **len).sum();
    let mut by_kind: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    for (name, len) in &new {
        let e = by_kind
            .entry(name.split('/').next().unwrap_or_default())
            .or_default();
        e.0 += 1;
        e.1 += **len;
    }
    eprintln!(
        "{FILES} closes of 4 KiB ({data} bytes): {} objects (PUTs), {stored} bytes stored \
         ({:.2} % over the data); by kind (count, bytes): {by_kind:?}; sizes: {:?}",
        new.len(),
        (stored as f64 / data as f64 - 1.0) * 100.0,
        new.iter().map(|(_, l)| **l).collect::<Vec<_>>()
    );
    for (name, len) in &new {
        assert_eq!(
            **len,
            size_class(**len),
            "{name}: {len} bytes is not a size class"
        );
    }
    assert!(
        new.len() <= 10,
        "{} PUTs for {FILES} small closes: {new:?}",
        new.len()
    );
    daemon.terminate();
}
