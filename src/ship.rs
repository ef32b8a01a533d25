//! Shipping one read-only snapshot: walk it, chunk what changed, build trees
//! bottom-up, pack and upload, then write the snapshot record last
//! (FORMAT.md §8).
//!
//! Change detection in this version: a file whose inode number, size, mtime
//! and ctime equal those in the parent snapshot's tree keeps its content
//! list without being read; everything else is read and chunked, and chunks
//! the repository already holds are not uploaded again.

use crate::progress::Progress;
use anyhow::{Context, Result};
use btrship_crypto::{ContentId, ObjectKind};
use btrship_diff::{ChunkSizes, FileKind, FsMeta};
use btrship_upload::format::{
    to_cbor, BlobId, BlobKind, Extent, Node, NodeKind, SnapshotRecord, SnapshotStats, Tree, Xattr,
};
use btrship_upload::{PackWriter, Repository, WriteStats};
use std::collections::HashMap;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// What one ship did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ShipReport {
    pub record: String,
    pub snapshot: String,
    pub files: u64,
    pub dirs: u64,
    pub bytes: u64,
    pub read_bytes: u64,
    pub reused_files: u64,
    pub new_blobs: u64,
    pub new_bytes: u64,
    pub uploaded_bytes: u64,
    pub objects_written: u64,
    pub seconds: f64,
}

pub struct ShipInput<'a> {
    pub share: &'a str,
    pub host: &'a str,
    pub snapshot_name: &'a str,
    pub time: chrono::DateTime<chrono::Utc>,
    pub root: &'a Path,
    pub parent_tree: Option<ContentId>,
}

pub fn ship(
    repo: &Repository,
    input: &ShipInput<'_>,
    progress: &mut Progress,
) -> Result<(ShipReport, ContentId)> {
    let started = std::time::Instant::now();
    let cfg = repo.config().chunker;
    let mut walker = Walker {
        repo,
        writer: repo.writer(),
        sizes: ChunkSizes {
            min: cfg.min,
            avg: cfg.avg,
            max: cfg.max,
        },
        hardlinks: HashMap::new(),
        stats: SnapshotStats::default(),
        read_bytes: 0,
        reused_files: 0,
        progress,
    };
    let parent = match input.parent_tree {
        Some(id) => match repo.read_tree(&id) {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::warn!("parent tree unreadable, reading every file: {e}");
                None
            }
        },
        None => None,
    };
    let meta = btrship_diff::read_meta(input.root)?;
    let tree = walker.dir(input.root, parent.as_ref())?;
    let mut root = node_from(b"", &meta);
    root.subtree = Some(BlobId(tree));
    let (stats, read_bytes, reused_files) = (walker.stats, walker.read_bytes, walker.reused_files);
    walker.progress.finish();
    let written: WriteStats = walker.writer.finish()?;
    let stats = SnapshotStats {
        new_bytes: written.new_raw_bytes,
        ..stats
    };
    let record = SnapshotRecord {
        share: input.share.to_string(),
        host: input.host.to_string(),
        time: input
            .time
            .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
        snapshot: input.snapshot_name.to_string(),
        tree: BlobId(tree),
        root,
        parent: input.parent_tree.map(BlobId),
        stats,
    };
    let name = repo
        .put_record(ObjectKind::Snapshot, "snapshots", &record)
        .context("cannot write the snapshot record")?;
    Ok((
        ShipReport {
            record: name,
            snapshot: input.snapshot_name.to_string(),
            files: stats.files,
            dirs: stats.dirs,
            bytes: stats.bytes,
            read_bytes,
            reused_files,
            new_blobs: written.new_blobs,
            new_bytes: written.new_raw_bytes,
            uploaded_bytes: written.uploaded_bytes,
            objects_written: written.objects_written + 1,
            seconds: started.elapsed().as_secs_f64(),
        },
        tree,
    ))
}

struct Walker<'r, 'p> {
    repo: &'r Repository,
    writer: PackWriter<'r>,
    sizes: ChunkSizes,
    /// Content of multiply-linked inodes already chunked in this ship.
    hardlinks: HashMap<u64, Vec<Extent>>,
    stats: SnapshotStats,
    read_bytes: u64,
    reused_files: u64,
    progress: &'p mut Progress,
}

impl Walker<'_, '_> {
    /// Ships one directory's subtree; returns its tree blob id.
    fn dir(&mut self, path: &Path, parent: Option<&Tree>) -> Result<ContentId> {
        let before: HashMap<&[u8], &Node> = parent
            .map(|t| t.entries.iter().map(|n| (n.name.as_slice(), n)).collect())
            .unwrap_or_default();
        let mut tree = Tree::default();
        for name in btrship_diff::read_dir_sorted(path)? {
            let child = path.join(&name);
            let meta = btrship_diff::read_meta(&child)?;
            let mut node = node_from(name.as_bytes(), &meta);
            let old = before.get(name.as_bytes()).copied();
            match meta.kind {
                FileKind::Dir => {
                    self.stats.dirs += 1;
                    let old_tree = old
                        .filter(|o| o.kind == NodeKind::Dir)
                        .and_then(|o| o.subtree)
                        .and_then(|id| match self.repo.read_tree(&id.0) {
                            Ok(t) => Some(t),
                            Err(e) => {
                                tracing::warn!("{}: parent tree unreadable: {e}", child.display());
                                None
                            }
                        });
                    node.subtree = Some(BlobId(self.dir(&child, old_tree.as_ref())?));
                }
                FileKind::File => {
                    self.stats.files += 1;
                    self.stats.bytes += meta.size;
                    node.content = self.file_content(&child, &meta, old)?;
                    self.progress.file(meta.size);
                }
                _ => {}
            }
            tree.entries.push(node);
        }
        Ok(self.writer.add(BlobKind::Tree, &to_cbor(&tree))?)
    }

    fn file_content(
        &mut self,
        path: &Path,
        meta: &FsMeta,
        old: Option<&Node>,
    ) -> Result<Vec<Extent>> {
        if meta.nlink > 1 {
            if let Some(content) = self.hardlinks.get(&meta.ino) {
                return Ok(content.clone());
            }
        }
        let unchanged = old.filter(|o| {
            o.kind == NodeKind::File
                && o.ino == meta.ino
                && o.size == meta.size
                && o.mtime_ns == meta.mtime_ns
                && o.ctime_ns == meta.ctime_ns
                && o.content.iter().all(|e| self.repo.has_blob(&e.1 .0))
        });
        let content = match unchanged {
            Some(o) => {
                self.reused_files += 1;
                o.content.clone()
            }
            None => {
                let mut content = Vec::new();
                let writer = &mut self.writer;
                self.read_bytes +=
                    btrship_diff::chunk_file::<anyhow::Error>(path, self.sizes, |off, data| {
                        let id = writer.add(BlobKind::Data, data)?;
                        content.push(Extent(off, BlobId(id), data.len() as u64));
                        Ok(())
                    })?;
                content
            }
        };
        if meta.nlink > 1 {
            self.hardlinks.insert(meta.ino, content.clone());
        }
        Ok(content)
    }
}

fn node_from(name: &[u8], m: &FsMeta) -> Node {
    Node {
        name: name.to_vec(),
        kind: match m.kind {
            FileKind::File => NodeKind::File,
            FileKind::Dir => NodeKind::Dir,
            FileKind::Symlink => NodeKind::Symlink,
            FileKind::Fifo => NodeKind::Fifo,
            FileKind::Socket => NodeKind::Socket,
            FileKind::CharDev => NodeKind::Chardev,
            FileKind::BlockDev => NodeKind::Blockdev,
        },
        mode: m.mode,
        uid: m.uid,
        gid: m.gid,
        mtime_ns: m.mtime_ns,
        ctime_ns: m.ctime_ns,
        size: m.size,
        ino: m.ino,
        nlink: m.nlink,
        xattrs: m
            .xattrs
            .iter()
            .map(|(n, v)| Xattr(n.clone(), v.clone()))
            .collect(),
        target: m.target.clone(),
        rdev: m.rdev,
        content: Vec::new(),
        subtree: None,
    }
}
