//! The share at any moment: the newest snapshot at or before T, with every
//! version entry the daemon shipped after it and up to T applied in time
//! order (FORMAT.md §5, version batch). The result is an ordinary root node
//! whose changed directories are trees staged in memory
//! (`Repository::stage_tree`), so listing and restoring work unchanged.
//!
//! Applying an entry: `close` and `node` put the entry at its path
//! (replacing whatever was there), `mkdir` sets a directory's own metadata
//! (keeping its entries when it is the same directory, by inode number;
//! otherwise the directory was replaced and starts empty), `delete` removes
//! the path and everything below it. Every path component is checked like
//! a tree name: a hostile batch cannot reach outside the share.
//!
//! Hard links: a `close` or `node` entry whose node has `nlink` > 1 is the
//! state of an inode with several names. Every other name that holds the
//! same inode (same `ino`, not a directory) at that point of the moment
//! gets the same node under its own name, so all names show the new
//! content and metadata, and restore links them again (it links nodes with
//! equal `ino` and `nlink` > 1). The names are found once: the snapshot's
//! tree is walked for the inode numbers of such entries only when there
//! are any, and later entries for those inodes add their paths. Batches
//! written before this rule carry `nlink` 1 and change one name only.

use crate::exit::{UserError, DAMAGED};
use crate::history::ShareHistory;
use crate::restore::{self, read_checked_tree};
use anyhow::Result;
use btrship_upload::format::{
    unsafe_name_reason, BlobId, Node, NodeKind, SnapshotRecord, Tree, VersionEntry, VersionKind,
};
use btrship_upload::Repository;
use chrono::{DateTime, Utc};
use std::collections::{BTreeMap, BTreeSet, HashMap};

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
    /// Set when retention forgot moments between the kept moment this is
    /// and the time asked for (FORMAT.md §5c): what to tell the user.
    pub forgotten_note: Option<String>,
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
    for (name, batch) in &hist.batches_between(after, upto)? {
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
    let forgotten_note = hist.forgotten_between(since, at)?.map(|f| {
        let kept = entries.last().map_or(since, |e| e.0);
        format!(
            "retention forgot the moments from {} to {} (the newest at {f}); this is the share as of the newest kept moment before them, {}",
            kept.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
            at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            kept.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
        )
    });
    if entries.is_empty() {
        return Ok(Moment {
            record,
            snapshot,
            versions_applied: 0,
            forgotten_note,
        });
    }
    let mut root = MemDir::new(record.root.clone(), BTreeMap::new());
    root.load(repo)?;
    let mut links = Links::for_entries(entries.iter().map(|(_, e)| e));
    if !links.is_empty() {
        links.find_in(repo, &record.root)?;
    }
    for (_, e) in &entries {
        apply(repo, &mut root, &mut links, e)?;
    }
    let node = root.fold(repo);
    record.tree = node.subtree.unwrap_or(record.tree);
    record.root = node;
    Ok(Moment {
        record,
        snapshot,
        versions_applied: entries.len(),
        forgotten_note,
    })
}

/// Where directory trees come from: the repository (checked names), or a
/// table in unit tests.
trait Trees {
    fn read(&self, dir: &Node) -> Result<Tree>;
}

impl Trees for Repository {
    fn read(&self, dir: &Node) -> Result<Tree> {
        read_checked_tree(self, dir)
    }
}

/// The names of hard-linked inodes in the moment being built: for every
/// inode number that some entry shows with `nlink` > 1, the paths that
/// held it at some point (each is checked again before use: it may have
/// been replaced or deleted since).
#[derive(Default)]
struct Links {
    paths: HashMap<u64, BTreeSet<Vec<u8>>>,
}

impl Links {
    /// The inodes some entry shows with several names (`ino` 0 is unknown).
    fn for_entries<'a>(entries: impl Iterator<Item = &'a VersionEntry>) -> Links {
        let mut paths = HashMap::new();
        for e in entries {
            if let Some(n) = linked_node(e) {
                paths.insert(n.ino, BTreeSet::new());
            }
        }
        Links { paths }
    }

    fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }

    /// Records the paths below `root` (the snapshot) that hold one of the
    /// inodes of interest. Reads every tree of the snapshot once.
    fn find_in(&mut self, trees: &dyn Trees, root: &Node) -> Result<()> {
        let mut stack = vec![(Vec::new(), root.clone())];
        while let Some((path, dir)) = stack.pop() {
            if dir.subtree.is_none() {
                continue;
            }
            for n in trees.read(&dir)?.entries {
                let mut p = path.clone();
                if !p.is_empty() {
                    p.push(b'/');
                }
                p.extend_from_slice(&n.name);
                if n.kind == NodeKind::Dir {
                    stack.push((p, n));
                } else {
                    self.note(n.ino, &p);
                }
            }
        }
        Ok(())
    }

    /// Remembers that `path` holds inode `ino` (if it is of interest).
    fn note(&mut self, ino: u64, path: &[u8]) {
        if let Some(set) = self.paths.get_mut(&ino) {
            set.insert(path.to_vec());
        }
    }
}

/// The node of a `close`/`node` entry for an inode with several names.
fn linked_node(e: &VersionEntry) -> Option<&Node> {
    match e.kind {
        VersionKind::Close | VersionKind::Node => e
            .node
            .as_ref()
            .filter(|n| n.nlink > 1 && n.ino != 0 && n.kind != NodeKind::Dir),
        _ => None,
    }
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
    fn load(&mut self, repo: &dyn Trees) -> Result<()> {
        if self.loaded {
            return Ok(());
        }
        self.loaded = true;
        if self.node.subtree.is_none() {
            return Ok(());
        }
        for n in repo.read(&self.node)?.entries {
            self.children.insert(n.name.clone(), Entry::Leaf(n));
        }
        Ok(())
    }

    /// The child directory `name`, loaded; made (empty) when `create` and
    /// it is missing or not a directory.
    fn child_dir(
        &mut self,
        repo: &dyn Trees,
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
    Node::empty_dir(name, 0o755)
}

/// The non-directory node at `comps` below `root`, if there is one
/// (nothing is created on the way).
fn leaf_mut<'d>(
    repo: &dyn Trees,
    root: &'d mut MemDir,
    comps: &[&[u8]],
) -> Result<Option<&'d mut Node>> {
    let Some((last, parents)) = comps.split_last() else {
        return Ok(None);
    };
    let mut dir = root;
    for c in parents {
        match dir.child_dir(repo, c, false)? {
            Some(d) => dir = d,
            None => return Ok(None),
        }
    }
    Ok(match dir.children.get_mut(*last) {
        Some(Entry::Leaf(n)) if n.kind != NodeKind::Dir => Some(n),
        _ => None,
    })
}

fn apply(repo: &dyn Trees, root: &mut MemDir, links: &mut Links, e: &VersionEntry) -> Result<()> {
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
    if let Some(n) = linked_node(e) {
        // The inode's other names get the same state.
        let others: Vec<Vec<u8>> = links
            .paths
            .get(&n.ino)
            .map(|s| s.iter().filter(|p| **p != e.path).cloned().collect())
            .unwrap_or_default();
        for other in others {
            let oc: Vec<&[u8]> = other.split(|&b| b == b'/').collect();
            if let Some(leaf) = leaf_mut(repo, root, &oc)? {
                if leaf.ino == n.ino {
                    *leaf = Node {
                        name: leaf.name.clone(),
                        ..n.clone()
                    };
                }
            }
        }
    }
    if let Some(n) = &e.node {
        if n.kind != NodeKind::Dir && e.kind != VersionKind::Mkdir {
            links.note(n.ino, &e.path);
        }
    }
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
            if let Some(Entry::Dir(MemDir { node: old, .. })) | Some(Entry::Leaf(old)) =
                dir.children.get(*last)
            {
                if old.kind == NodeKind::Dir && old.ino != 0 && n.ino != 0 && old.ino != n.ino {
                    // Another directory now holds this name (the old one was
                    // removed or renamed away; entries below a removed
                    // directory have no path of their own): it starts empty.
                    dir.children.remove(*last);
                }
            }
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
    for (name, rec) in &hist.snapshots()? {
        let node = hist.node_at(repo, &rec.root, path)?;
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
    let mut all = Vec::new();
    for (name, batch) in hist.batches_with_path(path)? {
        for e in batch.entries {
            if e.path == path {
                parse_time(&e.time, &name)?;
                all.push(e);
            }
        }
    }
    for e in all {
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

#[cfg(test)]
mod tests {
    use super::*;
    use btrship_crypto::ContentId;

    /// Trees by subtree id.
    struct Table(HashMap<[u8; 32], Tree>);

    impl Trees for Table {
        fn read(&self, dir: &Node) -> Result<Tree> {
            let id = dir.subtree.ok_or_else(|| anyhow::anyhow!("no subtree"))?;
            self.0
                .get(&id.0 .0)
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("no such tree"))
        }
    }

    fn file(name: &str, ino: u64, nlink: u64, size: u64) -> Node {
        Node {
            kind: NodeKind::File,
            mode: 0o644,
            size,
            ino,
            nlink,
            ..default_dir(name.as_bytes())
        }
    }

    fn dir(name: &str, ino: u64, tree: u8) -> Node {
        Node {
            ino,
            subtree: Some(BlobId(ContentId([tree; 32]))),
            ..default_dir(name.as_bytes())
        }
    }

    /// A snapshot: `a` and `b` one inode (ino 10, 3 bytes), `d/c` another
    /// name of it, `e` a file of its own, `sub/x` a file in a directory.
    fn snapshot() -> (Table, MemDir) {
        let mut t = HashMap::new();
        t.insert(
            [1; 32],
            Tree {
                entries: vec![
                    file("a", 10, 3, 3),
                    file("b", 10, 3, 3),
                    dir("d", 20, 2),
                    file("e", 11, 1, 5),
                    dir("sub", 21, 3),
                ],
            },
        );
        t.insert(
            [2; 32],
            Tree {
                entries: vec![file("c", 10, 3, 3)],
            },
        );
        t.insert(
            [3; 32],
            Tree {
                entries: vec![file("x", 12, 1, 1)],
            },
        );
        let table = Table(t);
        let mut root = MemDir::new(dir("", 256, 1), BTreeMap::new());
        root.load(&table).unwrap();
        (table, root)
    }

    fn entry(path: &str, kind: VersionKind, node: Option<Node>) -> VersionEntry {
        VersionEntry {
            time: "2026-12-03T00:00:00.000000001Z".into(),
            path: path.as_bytes().to_vec(),
            kind,
            node,
        }
    }

    fn run(table: &Table, root: &mut MemDir, entries: &[VersionEntry]) {
        let mut links = Links::for_entries(entries.iter());
        if !links.is_empty() {
            links.find_in(table, &root.node.clone()).unwrap();
        }
        for e in entries {
            apply(table, root, &mut links, e).unwrap();
        }
    }

    fn at<'d>(table: &Table, root: &'d mut MemDir, path: &str) -> Option<&'d mut Node> {
        let comps: Vec<&[u8]> = path.as_bytes().split(|&b| b == b'/').collect();
        leaf_mut(table, root, &comps).unwrap()
    }

    #[test]
    fn a_close_of_a_linked_inode_changes_every_name() {
        let (table, mut root) = snapshot();
        // Truncated to 0 through `b`.
        let entries = [entry("b", VersionKind::Close, Some(file("b", 10, 3, 0)))];
        run(&table, &mut root, &entries);
        for p in ["a", "b", "d/c"] {
            let n = at(&table, &mut root, p).unwrap();
            assert_eq!((n.ino, n.nlink, n.size), (10, 3, 0), "{p}");
            assert_eq!(n.name, p.rsplit('/').next().unwrap().as_bytes());
        }
        assert_eq!(at(&table, &mut root, "e").unwrap().size, 5);
    }

    #[test]
    fn a_new_link_joins_the_old_name() {
        let (table, mut root) = snapshot();
        // `ln e sub/y`: the new name's entry says 2 links.
        let entries = [entry(
            "sub/y",
            VersionKind::Close,
            Some(file("y", 11, 2, 5)),
        )];
        run(&table, &mut root, &entries);
        let e = at(&table, &mut root, "e").unwrap();
        assert_eq!((e.ino, e.nlink), (11, 2));
        assert_eq!(at(&table, &mut root, "sub/y").unwrap().nlink, 2);
        assert_eq!(at(&table, &mut root, "sub/x").unwrap().nlink, 1);
    }

    #[test]
    fn a_replaced_or_deleted_name_is_left_alone() {
        let (table, mut root) = snapshot();
        let entries = [
            // `a` replaced by another file (rename over it), `d` removed.
            entry("a", VersionKind::Close, Some(file("a", 30, 1, 7))),
            entry("d", VersionKind::Delete, None),
            entry("b", VersionKind::Close, Some(file("b", 10, 2, 9))),
        ];
        run(&table, &mut root, &entries);
        let a = at(&table, &mut root, "a").unwrap();
        assert_eq!((a.ino, a.size), (30, 7));
        assert!(at(&table, &mut root, "d/c").is_none());
        assert_eq!(at(&table, &mut root, "b").unwrap().size, 9);
    }

    #[test]
    fn entries_with_one_link_change_one_name() {
        let (table, mut root) = snapshot();
        // Batches written before links were kept say nlink 1.
        let entries = [entry("a", VersionKind::Close, Some(file("a", 10, 1, 0)))];
        run(&table, &mut root, &entries);
        assert_eq!(at(&table, &mut root, "a").unwrap().size, 0);
        assert_eq!(at(&table, &mut root, "b").unwrap().size, 3);
    }

    #[test]
    fn a_link_made_by_an_earlier_entry_is_followed() {
        let (table, mut root) = snapshot();
        let entries = [
            entry("new", VersionKind::Close, Some(file("new", 40, 1, 1))),
            entry("sub/l", VersionKind::Close, Some(file("l", 40, 2, 1))),
            entry("new", VersionKind::Close, Some(file("new", 40, 2, 0))),
        ];
        run(&table, &mut root, &entries);
        assert_eq!(at(&table, &mut root, "sub/l").unwrap().size, 0);
        assert_eq!(at(&table, &mut root, "new").unwrap().nlink, 2);
    }

    #[test]
    fn mkdir_of_another_directory_starts_empty() {
        let (table, mut root) = snapshot();
        // `rm -r sub; mkdir sub`: the deletes below had no path any more.
        let entries = [entry("sub", VersionKind::Mkdir, Some(dir("sub", 99, 0)))];
        run(&table, &mut root, &entries);
        assert!(at(&table, &mut root, "sub/x").is_none());
        // The same directory keeps its entries.
        let (table, mut root) = snapshot();
        let mut same = dir("sub", 21, 0);
        same.mode = 0o700;
        run(
            &table,
            &mut root,
            &[entry("sub", VersionKind::Mkdir, Some(same))],
        );
        assert!(at(&table, &mut root, "sub/x").is_some());
        // A directory made in place of a file.
        let (table, mut root) = snapshot();
        run(
            &table,
            &mut root,
            &[entry("e", VersionKind::Mkdir, Some(dir("e", 98, 0)))],
        );
        assert!(at(&table, &mut root, "e").is_none());
        assert!(root
            .child_dir(&table, b"e", false)
            .unwrap()
            .is_some_and(|d| d.children.is_empty()));
    }
}
