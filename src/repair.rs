//! Healing after the store lost packs (FORMAT.md §8a).
//!
//! A pack listed in an index but missing from the store (found by `check`,
//! by `repair`, or by a read that hit it) is remembered in the state
//! database (`missing_packs`). From then on:
//! - the repository counts the pack's blobs as absent
//!   ([`Repository::mark_packs_missing`]), so dedup uploads them again and
//!   a file whose content references one is read again;
//! - the next ship walks every directory and stats every file instead of
//!   trusting btrfs' change list, so unchanged files whose chunks were lost
//!   are re-read and trees that were in the lost pack are rebuilt;
//! - after that ship each missing pack is settled: `healed` when every blob
//!   it held has another copy, `lost` (with a count) when some exist nowhere.
//!
//! `btrship repair` does all of that without taking a snapshot: it compares
//! the store's packs with the index, reads lost chunks back, byte range by
//! byte range, from every local snapshot still on disk (checked against
//! their content ids, so the records that reference them become whole
//! again) and from the daemon's staging clones, rebuilds lost trees of local
//! snapshots by a full walk, and reports which snapshot records and version
//! batches still reference data that exists nowhere any more.

use crate::progress::Progress;
use crate::ship::{self, Parent, ShipInput};
use crate::state::State;
use anyhow::{Context, Result};
use btrship_crypto::ContentId;
use btrship_snapshot::PrivateArea;
use btrship_upload::format::{from_cbor, BlobKind, Extent, Node, NodeKind};
use btrship_upload::history::HistoryBody;
use btrship_upload::Repository;
use std::collections::{HashMap, HashSet};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Tells `repo` about every pack the state knows missing. Returns the
/// reason for a full walk when some pack still waits for healing.
pub fn prepare_ship(repo: &Repository, state: &State) -> Result<Option<String>> {
    let known = state.missing_packs()?;
    repo.mark_packs_missing(known.iter().map(|m| m.pack.clone()));
    let waiting = known.iter().filter(|m| m.state == "missing").count();
    Ok((waiting > 0).then(|| {
        format!("{waiting} packs are missing from the store: re-reading what referenced them")
    }))
}

/// After a ship: remembers packs found missing while reading, then marks
/// each waiting missing pack `healed` (every blob it held has another
/// copy) or `lost` (with how many blobs exist nowhere).
pub fn settle(repo: &Repository, state: &mut State) -> Result<()> {
    let found: Vec<String> = repo.missing_packs().into_iter().collect();
    state.add_missing_packs(&found)?;
    let by_pack = repo.packs_in_index();
    for m in state.missing_packs()? {
        if m.state != "missing" {
            continue;
        }
        let lost = by_pack.get(&m.pack).map_or(0, |blobs| {
            blobs.iter().filter(|(id, _)| !repo.has_blob(id)).count()
        });
        if lost == 0 {
            state.set_missing_pack_state(&m.pack, "healed", 0)?;
            tracing::info!("{}: every blob it held is in the store again", m.pack);
        } else {
            state.set_missing_pack_state(&m.pack, "lost", lost as u64)?;
            tracing::info!(
                "{}: {lost} blobs it held are not on this machine any more (see btrship repair)",
                m.pack
            );
        }
    }
    Ok(())
}

/// How many of the blobs listed in the missing `pack` have no copy in a
/// pack the store holds (`sizes`: every object in the store).
pub fn blobs_without_copy(
    repo: &Repository,
    pack: &str,
    blobs: &[(ContentId, btrship_upload::BlobLocation)],
    sizes: &HashMap<&str, u64>,
) -> usize {
    blobs
        .iter()
        .filter(|(id, _)| {
            !repo
                .blob_locations(id)
                .iter()
                .any(|l| l.pack != pack && sizes.contains_key(l.pack.as_str()))
        })
        .count()
}

/// Something the repository references whose data exists nowhere.
#[derive(Debug, Clone, serde::Serialize, PartialEq, Eq)]
pub struct LostItem {
    /// The snapshot record or version batch referencing it.
    pub object: String,
    /// Its moment (record time or version entry time).
    pub time: String,
    /// Share-relative path.
    pub path: String,
    /// `file` (some chunks lost) or `directory` (its tree is lost: nothing
    /// below it can be listed).
    pub kind: &'static str,
    pub lost_blobs: u64,
}

/// What `repair` found and did.
#[derive(Debug, Default, serde::Serialize)]
pub struct RepairReport {
    pub packs_in_store: u64,
    pub packs_in_index: u64,
    /// Packs listed in an index and missing from the store.
    pub missing_packs: Vec<String>,
    /// Blobs with no copy left in the store before the repair.
    pub lost_blobs_before: u64,
    /// Of those, uploaded again from local data.
    pub recovered_blobs: u64,
    /// Blobs that exist nowhere any more.
    pub lost_blobs: u64,
    /// Local sources read (snapshots, staging clones).
    pub sources: Vec<String>,
    pub uploaded_bytes: u64,
    /// Moments and paths whose data is lost for good.
    pub lost: Vec<LostItem>,
}

/// The local side of a repair (absent with `--repo/--key-file` only).
pub struct Local<'a> {
    pub state: &'a mut State,
    pub area: &'a PrivateArea,
    pub share: &'a str,
    pub host: &'a str,
}

/// Blobs listed only in missing packs.
fn lost_blobs(repo: &Repository, missing: &[String]) -> HashSet<ContentId> {
    let by_pack = repo.packs_in_index();
    missing
        .iter()
        .filter_map(|p| by_pack.get(p))
        .flatten()
        .map(|(id, _)| *id)
        .filter(|id| !repo.has_blob(id))
        .collect()
}

pub fn repair(repo: &Repository, local: Option<Local<'_>>) -> Result<RepairReport> {
    let mut r = RepairReport::default();
    let in_store: HashSet<String> = repo.list("packs/")?.into_iter().map(|o| o.key).collect();
    let indexed = repo.packs_in_index();
    r.packs_in_store = in_store.len() as u64;
    r.packs_in_index = indexed.len() as u64;
    // Packs prune deleted (FORMAT.md §5c) are gone on purpose, not lost.
    let (garbage, _) = repo.newest_garbage()?;
    let deleted: HashSet<String> = garbage
        .map(|g| g.deleted_packs.into_iter().collect())
        .unwrap_or_default();
    r.missing_packs = indexed
        .keys()
        .filter(|p| !in_store.contains(*p) && !deleted.contains(*p))
        .cloned()
        .collect();
    r.missing_packs.sort();
    repo.mark_packs_missing(r.missing_packs.iter().cloned());
    let mut lost = lost_blobs(repo, &r.missing_packs);
    r.lost_blobs_before = lost.len() as u64;
    if let Some(local) = local {
        local.state.add_missing_packs(&r.missing_packs)?;
        let known = local.state.missing_packs()?;
        repo.mark_packs_missing(known.iter().map(|m| m.pack.clone()));
        if !lost.is_empty() {
            recover(repo, &local, &mut lost, &mut r)?;
        }
        settle(repo, local.state)?;
    }
    lost = lost_blobs(repo, &r.missing_packs);
    r.recovered_blobs = r.lost_blobs_before.saturating_sub(lost.len() as u64);
    r.lost_blobs = lost.len() as u64;
    if !lost.is_empty() {
        r.lost = attribute(repo, &lost)?;
    }
    Ok(r)
}

/// Reads lost blobs back from local snapshots and staging clones.
fn recover(
    repo: &Repository,
    local: &Local<'_>,
    lost: &mut HashSet<ContentId>,
    r: &mut RepairReport,
) -> Result<()> {
    // Newest first: the newest snapshot holds most of what is still needed.
    let mut shipped: Vec<_> = local
        .state
        .snapshots()?
        .into_iter()
        .filter(|s| s.shipped && s.tree.is_some())
        .collect();
    shipped.sort_by(|a, b| b.taken_at.cmp(&a.taken_at));
    for snap in shipped {
        if lost.is_empty() {
            break;
        }
        let Ok(info) = local.area.get(&snap.name) else {
            continue;
        };
        let Some(tree) = snap
            .tree
            .as_deref()
            .and_then(|t| <[u8; 32]>::try_from(t).ok())
            .map(ContentId)
        else {
            continue;
        };
        r.sources.push(format!("snapshot {}", snap.name));
        let mut writer = repo.writer();
        let mut trees_lost = false;
        let root = Node {
            subtree: Some(btrship_upload::format::BlobId(tree)),
            ..Node::empty_dir(b"", 0)
        };
        walk(
            repo,
            &root,
            &mut PathBuf::new(),
            &mut |rel, node| match node {
                Walked::File(n) => {
                    if n.content.iter().any(|e| lost.contains(&e.1 .0)) {
                        let healed =
                            read_back(&mut writer, repo, &info.path.join(rel), &n.content, lost)
                                .unwrap_or_else(|e| {
                                    tracing::warn!("{}: {e:#}", rel.display());
                                    Vec::new()
                                });
                        for id in healed {
                            lost.remove(&id);
                        }
                    }
                }
                Walked::LostTree => trees_lost = true,
            },
        );
        let stats = writer.finish()?;
        r.uploaded_bytes += stats.uploaded_bytes;
        if trees_lost {
            // Rebuild the trees: a full walk of the same snapshot builds the
            // same trees where its chunks are all present again; its record
            // lands on the name it already has.
            let input = ShipInput {
                share: local.share,
                host: local.host,
                snapshot_name: &snap.name,
                time: chrono::DateTime::parse_from_rfc3339(&snap.taken_at)
                    .map(|t| t.with_timezone(&chrono::Utc))
                    .unwrap_or(info.time),
                root: &info.path,
                parent: Some(Parent {
                    name: snap.name.clone(),
                    tree,
                    path: None,
                }),
            };
            let mut progress = Progress::new("repairing", crate::progress::Show::Nothing);
            let (report, _) = ship::ship_with(
                repo,
                local.state,
                &input,
                &mut progress,
                Some("repair: rebuilding lost trees"),
            )?;
            r.uploaded_bytes += report.uploaded_bytes;
        }
        lost.retain(|id| !repo.has_blob(id));
    }
    // The daemon's staging clones: the newest shipped version of each path.
    if !lost.is_empty() {
        let staging = local.area.staging_dir()?;
        let mut writer = repo.writer();
        let mut used = false;
        for (path, clone, content) in local.state.all_baselines()? {
            let Ok(content) = from_cbor::<Vec<Extent>>(&content) else {
                continue;
            };
            if !content.iter().any(|e| lost.contains(&e.1 .0)) {
                continue;
            }
            used = true;
            match read_back(&mut writer, repo, &staging.join(&clone), &content, lost) {
                Ok(healed) => {
                    for id in healed {
                        lost.remove(&id);
                    }
                }
                Err(e) => tracing::warn!("{}: {e:#}", String::from_utf8_lossy(&path)),
            }
        }
        if used {
            r.sources.push("staging clones".into());
        }
        let stats = writer.finish()?;
        r.uploaded_bytes += stats.uploaded_bytes;
        lost.retain(|id| !repo.has_blob(id));
    }
    Ok(())
}

/// Reads the lost chunks of a file from `path`, byte range by byte range,
/// and adds those whose bytes still hash to their id. Returns their ids.
fn read_back(
    writer: &mut btrship_upload::PackWriter<'_>,
    repo: &Repository,
    path: &Path,
    content: &[Extent],
    lost: &HashSet<ContentId>,
) -> Result<Vec<ContentId>> {
    let f = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
    let mut healed = Vec::new();
    for e in content.iter().filter(|e| lost.contains(&e.1 .0)) {
        let len = usize::try_from(e.2).context("chunk length")?;
        let mut buf = vec![0u8; len];
        if f.read_exact_at(&mut buf, e.0).is_err() {
            continue;
        }
        if repo.key().content_id(&buf) == e.1 .0 {
            writer.add(BlobKind::Data, &buf)?;
            healed.push(e.1 .0);
        }
    }
    Ok(healed)
}

enum Walked<'n> {
    File(&'n Node),
    /// The tree of the directory at this path cannot be read.
    LostTree,
}

/// Visits every file below `dir` (and every directory whose tree is lost).
fn walk(
    repo: &Repository,
    dir: &Node,
    rel: &mut PathBuf,
    visit: &mut dyn FnMut(&Path, Walked<'_>),
) {
    let tree = match crate::restore::read_checked_tree(repo, dir) {
        Ok(t) => t,
        Err(e) => {
            tracing::debug!("{}: {e:#}", rel.display());
            visit(rel, Walked::LostTree);
            return;
        }
    };
    for n in &tree.entries {
        rel.push(std::ffi::OsStr::from_bytes(&n.name));
        match n.kind {
            NodeKind::Dir => walk(repo, n, rel, visit),
            NodeKind::File => visit(rel, Walked::File(n)),
            _ => {}
        }
        rel.pop();
    }
}

/// Every snapshot record and version entry referencing a lost blob, or a
/// directory whose tree is lost.
fn attribute(repo: &Repository, lost: &HashSet<ContentId>) -> Result<Vec<LostItem>> {
    let mut out = Vec::new();
    // Unreadable objects are `check`'s to report; they hold nothing to list.
    let (history, _) = repo.history_objects()?;
    let mut batches = Vec::new();
    for o in history {
        let (name, rec) = match o.body {
            HistoryBody::Snapshot(rec) => (o.name, rec),
            HistoryBody::Versions(b) => {
                batches.push((o.name, b));
                continue;
            }
        };
        let mut root = rec.root.clone();
        root.subtree = Some(rec.tree);
        let mut seen: HashMap<PathBuf, ()> = HashMap::new();
        walk(repo, &root, &mut PathBuf::new(), &mut |rel, w| {
            let (kind, n) = match w {
                Walked::File(n) => {
                    let n = n.content.iter().filter(|e| lost.contains(&e.1 .0)).count();
                    if n == 0 {
                        return;
                    }
                    ("file", n as u64)
                }
                Walked::LostTree => ("directory", 0),
            };
            if seen.insert(rel.to_path_buf(), ()).is_none() {
                out.push(LostItem {
                    object: name.clone(),
                    time: rec.time.clone(),
                    path: rel.to_string_lossy().into_owned(),
                    kind,
                    lost_blobs: n,
                });
            }
        });
    }
    for (name, batch) in batches {
        for e in &batch.entries {
            let Some(n) = &e.node else { continue };
            let count = n.content.iter().filter(|x| lost.contains(&x.1 .0)).count();
            if count > 0 {
                out.push(LostItem {
                    object: name.clone(),
                    time: e.time.clone(),
                    path: String::from_utf8_lossy(&e.path).into_owned(),
                    kind: "file",
                    lost_blobs: count as u64,
                });
            }
        }
    }
    Ok(out)
}
