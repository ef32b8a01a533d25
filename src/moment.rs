//! The share at any moment: the newest snapshot at or before T, with every
//! version entry the daemon shipped after it and up to T applied in time
//! order (FORMAT.md §5, version batch). The result is an ordinary root node
//! whose changed directories are trees staged in memory
//! (`Repository::stage_tree`), so listing and restoring work unchanged.
//!
//! Applying an entry: `close` and `node` put the entry at its path
//! (replacing whatever was there), `mkdir` sets a directory's own metadata
//! (keeping its entries, or making an empty directory), `delete` removes
//! the path and everything below it. Every path component is checked like
//! a tree name: a hostile batch cannot reach outside the share.

use crate::exit::{UserError, DAMAGED};
use crate::history::ShareHistory;
use crate::restore::{self, read_checked_tree};
use anyhow::Result;
use btrship_upload::format::{
    unsafe_name_reason, BlobId, Node, NodeKind, SnapshotRecord, Tree, VersionEntry, VersionKind,
};
use btrship_upload::Repository;
use chrono::{DateTime, Utc};
use std::collections::BTreeMap;

fn damaged(message: String) -> anyhow::Error {
    UserError::new(DAMAGED, message).into()
}

/// The share at a moment.
pub struct Moment {
    /// The snapshot record, its root replaced when versions were applied.
    pub record: SnapshotRecord,
    /// The snapshot's object name.
    pub snapshot: String,
    /// Version entries applied on top of the snapshot.
    pub versions_applied: usize,
}

fn parse_time(t: &str, batch: &str) -> Result<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(t)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| damaged(format!("version batch {batch} has an invalid time {t:?}")))
}

/// Every version entry of `share` in (`after`, `upto`], in application
/// order: time, then batch, then position in the batch.
fn entries_between(
    hist: &ShareHistory,
    after: Option<DateTime<Utc>>,
    upto: DateTime<Utc>,
) -> Result<Vec<(DateTime<Utc>, VersionEntry)>> {
    let mut out = Vec::new();
    for (name, batch) in &hist.batches {
        for (i, e) in batch.entries.iter().enumerate() {
            let t = parse_time(&e.time, name)?;
            if after.is_some_and(|a| t <= a) || t > upto {
                continue;
            }
            out.push((t, name.clone(), i, e.clone()));
        }
    }
    out.sort_by(|a, b| (a.0, &a.1, a.2).cmp(&(b.0, &b.1, b.2)));
    Ok(out.into_iter().map(|(t, _, _, e)| (t, e)).collect())
}

/// The share of `hist` as it was at `at`.
pub fn at(repo: &Repository, hist: &ShareHistory, at: DateTime<Utc>) -> Result<Moment> {
    let (snapshot, mut record) = restore::find_snapshot(hist, at)?;
    let since = restore::record_time(&record)?;
    let entries = entries_between(hist, Some(since), at)?;
    if entries.is_empty() {
        return Ok(Moment {
            record,
            snapshot,
            versions_applied: 0,
        });
    }
    let mut root = MemDir::new(record.root.clone(), BTreeMap::new());
    root.load(repo)?;
    for (_, e) in &entries {
        apply(repo, &mut root, e)?;
    }
    let node = root.fold(repo);
    record.tree = node.subtree.unwrap_or(record.tree);
    record.root = node;
    Ok(Moment {
        record,
        snapshot,
        versions_applied: entries.len(),
    })
}

/// A directory being changed: its node and its entries.
struct MemDir {
    node: Node,
    children: BTreeMap<Vec<u8>, Entry>,
    loaded: bool,
}

enum Entry {
    Leaf(Node),
    Dir(MemDir),
}

impl MemDir {
    fn new(node: Node, children: BTreeMap<Vec<u8>, Entry>) -> MemDir {
        MemDir {
            node,
            children,
            loaded: false,
        }
    }

    /// Reads this directory's tree from the repository (once).
    fn load(&mut self, repo: &Repository) -> Result<()> {
        if self.loaded {
            return Ok(());
        }
        self.loaded = true;
        if self.node.subtree.is_none() {
            return Ok(());
        }
        for n in read_checked_tree(repo, &self.node)?.entries {
            self.children.insert(n.name.clone(), Entry::Leaf(n));
        }
        Ok(())
    }

    /// The child directory `name`, loaded; made (empty) when `create` and
    /// it is missing or not a directory.
    fn child_dir(
        &mut self,
        repo: &Repository,
        name: &[u8],
        create: bool,
    ) -> Result<Option<&mut MemDir>> {
        let is_dir = match self.children.get(name) {
            Some(Entry::Dir(_)) => true,
            Some(Entry::Leaf(n)) => n.kind == NodeKind::Dir,
            None => false,
        };
        if !is_dir {
            if !create {
                return Ok(None);
            }
            // A version below a directory the batches never described (its
            // creation fell into a snapshot that missed it): keep the path.
            let mut d = MemDir::new(default_dir(name), BTreeMap::new());
            d.loaded = true;
            self.children.insert(name.to_vec(), Entry::Dir(d));
        }
        let entry = self
            .children
            .get_mut(name)
            .ok_or_else(|| anyhow::anyhow!("directory entry vanished"))?;
        if let Entry::Leaf(n) = entry {
            let mut d = MemDir::new(n.clone(), BTreeMap::new());
            d.load(repo)?;
            *entry = Entry::Dir(d);
        }
        match entry {
            Entry::Dir(d) => Ok(Some(d)),
            Entry::Leaf(_) => Err(anyhow::anyhow!("directory entry is not a directory")),
        }
    }

    /// This directory as a node whose subtree is staged in memory.
    fn fold(self, repo: &Repository) -> Node {
        let entries = self
            .children
            .into_values()
            .map(|e| match e {
                Entry::Leaf(n) => n,
                Entry::Dir(d) => d.fold(repo),
            })
            .collect();
        let id = repo.stage_tree(Tree { entries });
        let mut node = self.node;
        node.subtree = Some(BlobId(id));
        node
    }
}

fn default_dir(name: &[u8]) -> Node {
    Node {
        name: name.to_vec(),
        kind: NodeKind::Dir,
        mode: 0o755,
        uid: 0,
        gid: 0,
        mtime_ns: 0,
        ctime_ns: 0,
        size: 0,
        ino: 0,
        nlink: 1,
        xattrs: Vec::new(),
        target: None,
        rdev: 0,
        content: Vec::new(),
        subtree: None,
    }
}

fn apply(repo: &Repository, root: &mut MemDir, e: &VersionEntry) -> Result<()> {
    let shown = String::from_utf8_lossy(&e.path).into_owned();
    if e.path.is_empty() {
        // The share root's own metadata.
        if let (VersionKind::Mkdir, Some(n)) = (e.kind, &e.node) {
            let subtree = root.node.subtree;
            root.node = Node {
                name: Vec::new(),
                content: Vec::new(),
                subtree,
                ..n.clone()
            };
            return Ok(());
        }
        return Err(damaged(
            "a version batch changes the share root other than by its metadata: the repository is damaged or hostile".into(),
        ));
    }
    let comps: Vec<&[u8]> = e.path.split(|&b| b == b'/').collect();
    for c in &comps {
        if let Some(reason) = unsafe_name_reason(c) {
            return Err(damaged(format!(
                "a version batch names the path {shown:?} ({reason}): the repository is damaged or hostile"
            )));
        }
    }
    let Some((last, parents)) = comps.split_last() else {
        return Ok(());
    };
    let create = e.kind != VersionKind::Delete;
    let mut dir = root;
    for c in parents {
        match dir.child_dir(repo, c, create)? {
            Some(d) => dir = d,
            None => return Ok(()), // deleting below a path that is gone
        }
    }
    let node = |e: &VersionEntry| -> Result<Node> {
        let mut n = e.node.clone().ok_or_else(|| {
            damaged(format!(
                "a version of {shown:?} has no node: the repository is damaged"
            ))
        })?;
        n.name = last.to_vec();
        Ok(n)
    };
    match e.kind {
        VersionKind::Delete => {
            dir.children.remove(*last);
        }
        VersionKind::Close | VersionKind::Node => {
            let n = node(e)?;
            if n.kind == NodeKind::Dir {
                return Err(damaged(format!(
                    "a file version of {shown:?} is a directory: the repository is damaged"
                )));
            }
            dir.children.insert(last.to_vec(), Entry::Leaf(n));
        }
        VersionKind::Mkdir => {
            let mut n = node(e)?;
            n.content.clear();
            let d = dir
                .child_dir(repo, last, true)?
                .ok_or_else(|| anyhow::anyhow!("cannot make directory {shown:?}"))?;
            n.subtree = d.node.subtree;
            d.node = n;
        }
    }
    Ok(())
}

/// One version of a path, for `btrship versions`.
#[derive(Debug, serde::Serialize)]
pub struct PathVersion {
    pub time: String,
    /// close | snapshot | delete | mkdir | node
    pub kind: String,
    pub size: Option<u64>,
    /// The snapshot or version batch object it comes from.
    pub source: String,
}

/// Every shipped version of `path`: each snapshot in which it differs from
/// the snapshot before, and every version entry for it, in time order.
pub fn versions_of(
    repo: &Repository,
    hist: &ShareHistory,
    path: &[u8],
) -> Result<Vec<PathVersion>> {
    let path = path.strip_prefix(b"/").unwrap_or(path);
    let mut out = Vec::new();
    let mut prev: Option<Option<Node>> = None;
    for (name, rec) in &hist.snapshots {
        let node = match restore::resolve(repo, &rec.root, path) {
            Ok(chain) => chain.last().cloned(),
            Err(e) if crate::exit::code_of(&e) == crate::exit::NOT_FOUND => None,
            Err(e) => return Err(e),
        };
        let key = node.clone().map(|mut n| {
            n.ctime_ns = 0;
            n.ino = 0;
            n
        });
        if prev.as_ref() != Some(&key) {
            match &node {
                Some(n) => out.push(PathVersion {
                    time: rec.time.clone(),
                    kind: "snapshot".into(),
                    size: Some(n.size),
                    source: name.clone(),
                }),
                None if prev.is_some() => out.push(PathVersion {
                    time: rec.time.clone(),
                    kind: "delete".into(),
                    size: None,
                    source: name.clone(),
                }),
                None => {}
            }
        }
        prev = Some(key);
    }
    let all = entries_between(hist, None, DateTime::<Utc>::MAX_UTC)?;
    for (_, e) in all.into_iter().filter(|(_, e)| e.path == path) {
        let kind = match e.kind {
            VersionKind::Close => "close",
            VersionKind::Mkdir => "mkdir",
            VersionKind::Node => "node",
            VersionKind::Delete => "delete",
        };
        out.push(PathVersion {
            time: e.time.clone(),
            kind: kind.into(),
            size: e.node.as_ref().map(|n| n.size),
            source: "versions".into(),
        });
    }
    out.sort_by(|a, b| a.time.cmp(&b.time));
    Ok(out)
}
