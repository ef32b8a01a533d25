//! The local catalogue (FORMAT.md §5b): a SQLite cache, per repository,
//! of what this machine has authenticated: write-once objects by name
//! (history objects, the newest summaries, chain registrations, indexes),
//! the blob index of the named indexes, and per chain the checked prefix
//! with its moments (by time) and paths, so a command decodes only the
//! moments it needs. A cache, never the truth: every entry was opened
//! with the key before it was stored, object names never change meaning
//! (write-once), and deleting the file costs requests, never correctness.
//! With it, commands on a machine that has read a history before read
//! only what is new ([`crate::history::sync_chain`] says how a prefix is
//! trusted).
//!
//! `<state dir>/catalog-<repository id>.db`, mode 0600 in the root-only
//! state directory (it holds decrypted metadata: names, sizes, times).
//! WAL with `synchronous = NORMAL`: a power cut may lose the newest
//! entries (they are read again) but never corrupts the file; a file that
//! cannot be opened is removed and started again.

use anyhow::{Context, Result};
use btrship_crypto::{ContentId, RepoKey};
use btrship_upload::format::{
    from_cbor, to_cbor, BlobKind, Index, Node, SnapshotRecord, VersionBatch,
};
use btrship_upload::history::{ChainHead, HistoryBody, HistoryKind, HistoryObject};
use btrship_upload::repo::ObjectCache;
use btrship_upload::{BlobLocation, Repository, Store};
use rusqlite::{params, Connection, OptionalExtension};
use std::collections::{HashMap, HashSet};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;

/// The catalogue of one repository on this machine.
pub struct Catalog {
    conn: Mutex<Connection>,
    path: PathBuf,
    /// Indexes known to be merged into `blobs` (saves a query per name).
    merged: Mutex<HashSet<String>>,
    /// Chains this process has brought up to date ([`crate::history`]).
    pub(crate) synced: Mutex<HashMap<(String, String), Arc<crate::history::ChainState>>>,
}

const SCHEMA: &str = "
    -- (A rowid table: in a WITHOUT ROWID table a lookup can read the
    -- whole of a large body it passes, e.g. a million-blob index.)
    CREATE TABLE IF NOT EXISTS object_cache (
        name TEXT PRIMARY KEY,   -- object name in the store
        hash BLOB NOT NULL,      -- BLAKE3 of its sealed bytes
        body BLOB NOT NULL       -- its opened body (CBOR)
    );
    -- The blob index: the blob lists of the named indexes merged so far.
    CREATE TABLE IF NOT EXISTS packs (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE
    );
    CREATE TABLE IF NOT EXISTS blobs (
        id BLOB NOT NULL,        -- content id
        pack INTEGER NOT NULL,   -- packs.id
        kind INTEGER NOT NULL,
        offset INTEGER NOT NULL,
        length INTEGER NOT NULL,
        raw_length INTEGER NOT NULL,
        PRIMARY KEY (id, pack)
    ) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS merged_indexes (
        name TEXT PRIMARY KEY
    ) WITHOUT ROWID;
    -- Each chain's checked prefix: places 1..=through are in `moments`,
    -- checked as a chain, their indexes merged into `blobs`.
    CREATE TABLE IF NOT EXISTS chain_sync (
        share TEXT NOT NULL,
        host TEXT NOT NULL,
        through INTEGER NOT NULL,
        head_name TEXT NOT NULL,
        head_hash BLOB NOT NULL,
        declared_lost TEXT NOT NULL,  -- JSON [[from, to], ...]
        PRIMARY KEY (share, host)
    ) WITHOUT ROWID;
    -- Every history object read, by chain and place; times in ns since
    -- the epoch (a snapshot's time in both, a batch's oldest and newest
    -- entry).
    CREATE TABLE IF NOT EXISTS moments (
        share TEXT NOT NULL,
        host TEXT NOT NULL,
        seq INTEGER NOT NULL,
        name TEXT NOT NULL,
        kind INTEGER NOT NULL,   -- 0 snapshot record, 1 version batch
        t_first INTEGER NOT NULL,
        t_last INTEGER NOT NULL,
        hash BLOB NOT NULL,
        body BLOB NOT NULL,
        forgotten INTEGER NOT NULL DEFAULT 0,  -- retention forgot it (FORMAT.md §5c)
        UNIQUE (share, host, seq, name)
    );
    CREATE INDEX IF NOT EXISTS moments_by_time ON moments (share, host, kind, t_last);
    -- What a path is in a directory tree (`versions`): the node's CBOR,
    -- or NULL when the path is not there. Trees never change under an id.
    CREATE TABLE IF NOT EXISTS resolved (
        tree BLOB NOT NULL,
        path BLOB NOT NULL,
        node BLOB,
        PRIMARY KEY (tree, path)
    ) WITHOUT ROWID;
    -- The paths each version batch holds entries for (by place, so the
    -- rows past a prefix go in one range; by path for `versions`).
    CREATE TABLE IF NOT EXISTS moment_paths (
        share TEXT NOT NULL,
        host TEXT NOT NULL,
        seq INTEGER NOT NULL,
        path BLOB NOT NULL,
        PRIMARY KEY (share, host, seq, path)
    ) WITHOUT ROWID;
    CREATE INDEX IF NOT EXISTS moment_paths_by_path ON moment_paths (share, host, path);
    -- What a tree blob references (prune): 33 bytes per entry, a kind
    -- byte (7 data, 8 tree) and the content id. Trees never change.
    CREATE TABLE IF NOT EXISTS tree_refs (
        tree BLOB PRIMARY KEY,
        refs BLOB NOT NULL
    ) WITHOUT ROWID;
    -- Tree blobs this machine wrote with a ship-only key (FORMAT.md §12):
    -- the plaintext, by content id. It cannot read them from the store.
    -- (Added within layout 3: older files gain the table on opening.)
    CREATE TABLE IF NOT EXISTS own_trees (
        id BLOB PRIMARY KEY,
        body BLOB NOT NULL
    );
    -- Object Lock (FORMAT.md §12b): the retain-until date prune last set
    -- for an object (seconds since the epoch). Without a row, an object
    -- is locked until its store time plus the repository's lock duration.
    CREATE TABLE IF NOT EXISTS lock_until (
        name TEXT PRIMARY KEY,
        until INTEGER NOT NULL
    ) WITHOUT ROWID;
";

/// The layout above; a file with another (older) one is emptied first.
const SCHEMA_VERSION: i64 = 3;

/// One moment as [`Catalog::moments`] lists it.
#[derive(Debug, Clone)]
pub struct MomentRow {
    pub seq: u64,
    pub name: String,
    pub snapshot: bool,
    pub t_first: i64,
    pub t_last: i64,
    pub forgotten: bool,
}

/// A chain's checked prefix, as the catalogue holds it.
#[derive(Debug, Clone)]
pub struct ChainSync {
    pub through: u64,
    pub head: ChainHead,
    pub declared_lost: Vec<(u64, u64)>,
}

/// A time as ns since the epoch (None: not RFC 3339).
pub fn time_ns(t: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(t)
        .ok()?
        .timestamp_nanos_opt()
}

/// The (first, last) times a history object covers: a record's time, or
/// its batch's oldest and newest entry. An unreadable time widens the
/// range to everything, so every query finds the object and its reader
/// reports the time.
fn time_range(body: &HistoryBody) -> (i64, i64) {
    match body {
        HistoryBody::Snapshot(r) => {
            let t = time_ns(&r.time).unwrap_or(i64::MIN);
            (t, t)
        }
        HistoryBody::Versions(b) => {
            let mut range: Option<(i64, i64)> = None;
            for e in &b.entries {
                let Some(t) = time_ns(&e.time) else {
                    return (i64::MIN, i64::MAX);
                };
                range = Some(range.map_or((t, t), |(a, z)| (a.min(t), z.max(t))));
            }
            range.unwrap_or((i64::MIN, i64::MIN))
        }
    }
}

fn kind_code(k: HistoryKind) -> i64 {
    match k {
        HistoryKind::Snapshot => 0,
        HistoryKind::Versions => 1,
    }
}

impl Catalog {
    /// The catalogue file of the repository `repo_id` under `state_dir`.
    pub fn path(state_dir: &Path, repo_id: &[u8]) -> PathBuf {
        let hex: String = repo_id.iter().map(|b| format!("{b:02x}")).collect();
        state_dir.join(format!("catalog-{hex}.db"))
    }

    /// Opens (or creates) the catalogue at `path`; a file that is not a
    /// usable catalogue is replaced by an empty one.
    pub fn open(path: &Path) -> Result<Catalog> {
        match Self::try_open(path) {
            Ok(c) => Ok(c),
            Err(e) => {
                tracing::info!(
                    "catalogue {} unusable ({e:#}); starting it again",
                    path.display()
                );
                for suffix in ["", "-wal", "-shm"] {
                    let mut p = path.as_os_str().to_owned();
                    p.push(suffix);
                    let _ = std::fs::remove_file(PathBuf::from(p));
                }
                Self::try_open(path)
            }
        }
    }

    fn try_open(path: &Path) -> Result<Catalog> {
        if let Some(dir) = path.parent() {
            if !dir.exists() {
                use std::os::unix::fs::DirBuilderExt;
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
            }
        }
        // Create it 0600 before SQLite opens it.
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(30))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        let tables: i64 = conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))?;
        if version != SCHEMA_VERSION && tables > 0 {
            // Another layout: start again (dropping its tables would leave
            // a file of free pages and a WAL as large).
            anyhow::bail!("catalogue layout {version}, this btrship uses {SCHEMA_VERSION}");
        }
        // Checkpointed WAL beyond 64 MiB is cut back (a first reading of a
        // long history writes hundreds of MiB in one transaction).
        conn.pragma_update(None, "journal_size_limit", 64i64 << 20)?;
        conn.execute_batch(SCHEMA)?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        Ok(Catalog::with(conn, path))
    }

    fn with(conn: Connection, path: &Path) -> Catalog {
        Catalog {
            conn: Mutex::new(conn),
            path: path.to_path_buf(),
            merged: Mutex::default(),
            synced: Mutex::default(),
        }
    }

    /// A catalogue in memory, for a process that cannot trust (or has no)
    /// catalogue file: filled from the store alone, gone at exit.
    pub fn in_memory() -> Result<Catalog> {
        let conn = Connection::open_in_memory()?;
        conn.execute_batch(SCHEMA)?;
        Ok(Catalog::with(conn, Path::new(":memory:")))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The checked prefix of the chain of share+host, if any.
    pub fn chain_sync(&self, share: &str, host: &str) -> Result<Option<ChainSync>> {
        let conn = self.lock();
        let row: Option<(i64, String, Vec<u8>, String)> = conn
            .prepare_cached(
                "SELECT through, head_name, head_hash, declared_lost FROM chain_sync WHERE share = ?1 AND host = ?2",
            )?
            .query_row(params![share, host], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })
            .optional()?;
        let Some((through, name, hash, lost)) = row else {
            return Ok(None);
        };
        let (Ok(hash), Ok(lost)) = (
            <[u8; 32]>::try_from(hash.as_slice()),
            serde_json::from_str::<Vec<(u64, u64)>>(&lost),
        ) else {
            return Ok(None);
        };
        Ok(Some(ChainSync {
            through: through as u64,
            head: ChainHead {
                seq: through as u64,
                name,
                hash,
            },
            declared_lost: lost,
        }))
    }

    /// The object names the catalogue holds at these places of a chain.
    pub fn names_at(&self, share: &str, host: &str, seqs: &[u64]) -> Result<Vec<(u64, String)>> {
        let conn = self.lock();
        let mut st = conn.prepare_cached(
            "SELECT name FROM moments WHERE share = ?1 AND host = ?2 AND seq = ?3",
        )?;
        let mut out = Vec::new();
        for &seq in seqs {
            let names = st
                .query_map(params![share, host, seq as i64], |r| r.get::<_, String>(0))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            out.extend(names.into_iter().map(|n| (seq, n)));
        }
        Ok(out)
    }

    /// The sealed hash of the object `name` at place `seq`, if held.
    pub fn moment_hash(
        &self,
        share: &str,
        host: &str,
        seq: u64,
        name: &str,
    ) -> Result<Option<[u8; 32]>> {
        let conn = self.lock();
        let hash: Option<Vec<u8>> = conn
            .prepare_cached(
                "SELECT hash FROM moments WHERE share = ?1 AND host = ?2 AND seq = ?3 AND name = ?4",
            )?
            .query_row(params![share, host, seq as i64, name], |r| r.get(0))
            .optional()?;
        Ok(hash.and_then(|h| h.as_slice().try_into().ok()))
    }

    /// Records what a reader found after place `after` of a chain (the
    /// rows it held past `after` are replaced: they were the store's
    /// state at an earlier reading) and, when the whole chain checked
    /// out, its new checked prefix. One transaction, and only while the
    /// recorded prefix is still the one the reader started from: when
    /// another process moved it meanwhile, its reading stands (returns
    /// false) and the rows it recorded are the ones queries see.
    pub fn record_chain(
        &self,
        share: &str,
        host: &str,
        after: u64,
        objects: &[HistoryObject],
        sync: Option<&ChainSync>,
    ) -> Result<bool> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let current: i64 = tx
            .query_row(
                "SELECT through FROM chain_sync WHERE share = ?1 AND host = ?2",
                params![share, host],
                |r| r.get(0),
            )
            .optional()?
            .unwrap_or(0);
        if current as u64 != after {
            return Ok(false);
        }
        tx.execute(
            "DELETE FROM moments WHERE share = ?1 AND host = ?2 AND seq > ?3",
            params![share, host, after as i64],
        )?;
        tx.execute(
            "DELETE FROM moment_paths WHERE share = ?1 AND host = ?2 AND seq > ?3",
            params![share, host, after as i64],
        )?;
        {
            let mut put = tx.prepare_cached(
                "INSERT OR REPLACE INTO moments (share, host, seq, name, kind, t_first, t_last, hash, body) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?;
            let mut path = tx.prepare_cached(
                "INSERT OR IGNORE INTO moment_paths (share, host, seq, path) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for o in objects {
                let Some(seq) = o.body.chain().map(|l| l.seq) else {
                    continue; // unchained (older than chains): not cached
                };
                let (first, last) = time_range(&o.body);
                put.execute(params![
                    share,
                    host,
                    seq as i64,
                    o.name,
                    kind_code(o.body.kind()),
                    first,
                    last,
                    o.hash.as_slice(),
                    o.body.to_cbor()
                ])?;
                if let HistoryBody::Versions(b) = &o.body {
                    for e in &b.entries {
                        path.execute(params![share, host, seq as i64, e.path])?;
                    }
                }
            }
        }
        if let Some(s) = sync {
            tx.execute(
                "INSERT OR REPLACE INTO chain_sync (share, host, through, head_name, head_hash, declared_lost) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    share,
                    host,
                    s.through as i64,
                    s.head.name,
                    s.head.hash.as_slice(),
                    serde_json::to_string(&s.declared_lost)?
                ],
            )?;
        }
        tx.commit()?;
        Ok(true)
    }

    /// Forgets a chain's rows and checked prefix (read again from the
    /// store).
    pub fn forget_chain(&self, share: &str, host: &str) -> Result<()> {
        let conn = self.lock();
        for table in ["moments", "moment_paths", "chain_sync"] {
            conn.execute(
                &format!("DELETE FROM {table} WHERE share = ?1 AND host = ?2"),
                params![share, host],
            )?;
        }
        Ok(())
    }

    fn decode<T>(
        &self,
        sql: &str,
        args: impl rusqlite::Params,
        pick: impl Fn(HistoryBody) -> Option<T>,
    ) -> Result<Vec<(String, T)>> {
        let conn = self.lock();
        let mut st = conn.prepare_cached(sql)?;
        let rows = st
            .query_map(args, |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, Vec<u8>>(2)?,
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let mut out = Vec::with_capacity(rows.len());
        for (name, kind, body) in rows {
            let kind = if kind == 0 {
                HistoryKind::Snapshot
            } else {
                HistoryKind::Versions
            };
            let body = HistoryBody::from_cbor(kind, &body)
                .map_err(|e| anyhow::anyhow!("catalogue {}: {name}: {e}", self.path.display()))?;
            if let Some(v) = pick(body) {
                out.push((name, v));
            }
        }
        Ok(out)
    }

    /// Every snapshot record of a chain, oldest first (then by name).
    pub fn snapshots(&self, share: &str, host: &str) -> Result<Vec<(String, SnapshotRecord)>> {
        self.decode(
            "SELECT name, kind, body FROM moments WHERE share = ?1 AND host = ?2 AND kind = 0 AND forgotten = 0 ORDER BY t_last, name",
            params![share, host],
            record,
        )
    }

    /// The newest snapshot record taken at or before `at` (ns), and the
    /// oldest one of the chain.
    pub fn snapshot_at(
        &self,
        share: &str,
        host: &str,
        at: i64,
    ) -> Result<crate::history::SnapshotAt> {
        let at_or_before = self.decode(
            "SELECT name, kind, body FROM moments WHERE share = ?1 AND host = ?2 AND kind = 0 AND forgotten = 0 AND t_last <= ?3 ORDER BY t_last DESC, name DESC LIMIT 1",
            params![share, host, at],
            record,
        )?;
        let first = self.decode(
            "SELECT name, kind, body FROM moments WHERE share = ?1 AND host = ?2 AND kind = 0 AND forgotten = 0 ORDER BY t_last, name LIMIT 1",
            params![share, host],
            record,
        )?;
        Ok((at_or_before.into_iter().next(), first.into_iter().next()))
    }

    /// The version batches with an entry in (`after`, `upto`] (ns), by
    /// name.
    pub fn batches_between(
        &self,
        share: &str,
        host: &str,
        after: i64,
        upto: i64,
    ) -> Result<Vec<(String, VersionBatch)>> {
        self.decode(
            "SELECT name, kind, body FROM moments WHERE share = ?1 AND host = ?2 AND kind = 1 AND forgotten = 0 AND t_last > ?3 AND t_first <= ?4 ORDER BY name",
            params![share, host, after, upto],
            batch,
        )
    }

    /// What `path` is below the directory tree `tree`, if remembered:
    /// Some(None) when it is not there.
    pub fn resolved(&self, tree: &ContentId, path: &[u8]) -> Option<Option<Node>> {
        let conn = self.lock();
        let row: Option<Option<Vec<u8>>> = conn
            .prepare_cached("SELECT node FROM resolved WHERE tree = ?1 AND path = ?2")
            .and_then(|mut st| {
                st.query_row(params![tree.as_bytes().as_slice(), path], |r| r.get(0))
                    .optional()
            })
            .ok()
            .flatten();
        match row? {
            None => Some(None),
            Some(bytes) => from_cbor::<Node>(&bytes).ok().map(Some),
        }
    }

    /// Remembers what `path` is below `tree` (from authenticated trees).
    pub fn remember_resolved(&self, tree: &ContentId, path: &[u8], node: Option<&Node>) {
        let conn = self.lock();
        let put = conn
            .prepare_cached(
                "INSERT OR REPLACE INTO resolved (tree, path, node) VALUES (?1, ?2, ?3)",
            )
            .and_then(|mut st| {
                st.execute(params![tree.as_bytes().as_slice(), path, node.map(to_cbor)])
            });
        if let Err(e) = put {
            tracing::debug!(
                "catalogue {}: cannot remember a path: {e}",
                self.path.display()
            );
        }
    }

    /// The version batches with an entry for `path`, by name. (CROSS JOIN
    /// and `+m.kind` keep SQLite on the path's few rows and the place
    /// index, not a scan of every batch.)
    pub fn batches_with_path(
        &self,
        share: &str,
        host: &str,
        path: &[u8],
    ) -> Result<Vec<(String, VersionBatch)>> {
        self.decode(
            "SELECT m.name, m.kind, m.body FROM moment_paths p CROSS JOIN moments m ON m.share = p.share AND m.host = p.host AND m.seq = p.seq WHERE p.share = ?1 AND p.host = ?2 AND p.path = ?3 AND +m.kind = 1 AND m.forgotten = 0 ORDER BY m.name",
            params![share, host, path],
            batch,
        )
    }

    /// Marks these places of a chain forgotten (FORMAT.md §5c): they
    /// leave every query above. Forgetting is for good, so rows stay
    /// marked whatever a later reading finds.
    pub fn apply_forgotten(&self, share: &str, host: &str, places: &[(u64, u64)]) -> Result<()> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        {
            let mut st = tx.prepare_cached(
                "UPDATE moments SET forgotten = 1 WHERE share = ?1 AND host = ?2 AND seq BETWEEN ?3 AND ?4 AND forgotten = 0",
            )?;
            for &(a, b) in places {
                st.execute(params![
                    share,
                    host,
                    a as i64,
                    b.min(i64::MAX as u64) as i64
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// The newest forgotten moment's time in (`after`, `upto`] (ns): when
    /// there is one, a restore at `upto` gives an older kept moment.
    pub fn forgotten_between(
        &self,
        share: &str,
        host: &str,
        after: i64,
        upto: i64,
    ) -> Result<Option<i64>> {
        let conn = self.lock();
        let t: Option<i64> = conn
            .prepare_cached(
                "SELECT max(t_last) FROM moments WHERE share = ?1 AND host = ?2 AND forgotten = 1 AND t_last > ?3 AND t_last <= ?4",
            )?
            .query_row(params![share, host, after, upto], |r| r.get(0))?;
        Ok(t)
    }

    /// Every moment of a chain the catalogue holds, by place (prune).
    pub fn moments(&self, share: &str, host: &str) -> Result<Vec<MomentRow>> {
        let conn = self.lock();
        let mut st = conn.prepare_cached(
            "SELECT seq, name, kind, t_first, t_last, forgotten FROM moments WHERE share = ?1 AND host = ?2 ORDER BY seq, name",
        )?;
        let rows = st
            .query_map(params![share, host], |r| {
                Ok(MomentRow {
                    seq: r.get::<_, i64>(0)? as u64,
                    name: r.get(1)?,
                    snapshot: r.get::<_, i64>(2)? == 0,
                    t_first: r.get(3)?,
                    t_last: r.get(4)?,
                    forgotten: r.get::<_, i64>(5)? != 0,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    /// The decoded body of the object at place `seq` named `name`.
    pub fn moment_body(
        &self,
        share: &str,
        host: &str,
        seq: u64,
        name: &str,
    ) -> Result<HistoryBody> {
        let conn = self.lock();
        let (kind, body): (i64, Vec<u8>) = conn
            .prepare_cached(
                "SELECT kind, body FROM moments WHERE share = ?1 AND host = ?2 AND seq = ?3 AND name = ?4",
            )?
            .query_row(params![share, host, seq as i64, name], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?;
        let kind = if kind == 0 {
            HistoryKind::Snapshot
        } else {
            HistoryKind::Versions
        };
        HistoryBody::from_cbor(kind, &body)
            .map_err(|e| anyhow::anyhow!("catalogue {}: {name}: {e}", self.path.display()))
    }

    /// Is the history object `name` a forgotten moment (of any chain)?
    pub fn is_forgotten(&self, name: &str) -> Result<bool> {
        let conn = self.lock();
        let n: i64 = conn
            .prepare_cached("SELECT count(*) FROM moments WHERE name = ?1 AND forgotten = 1")?
            .query_row(params![name], |r| r.get(0))?;
        Ok(n > 0)
    }

    /// What tree `tree` references, if remembered: (blob kind, id).
    pub fn tree_refs(&self, tree: &ContentId) -> Option<Vec<(BlobKind, ContentId)>> {
        let conn = self.lock();
        let refs: Vec<u8> = conn
            .prepare_cached("SELECT refs FROM tree_refs WHERE tree = ?1")
            .and_then(|mut st| {
                st.query_row(params![tree.as_bytes().as_slice()], |r| r.get(0))
                    .optional()
            })
            .ok()
            .flatten()?;
        if !refs.len().is_multiple_of(33) {
            return None;
        }
        refs.chunks_exact(33)
            .map(|c| {
                let kind = match c[0] {
                    7 => BlobKind::Data,
                    8 => BlobKind::Tree,
                    _ => return None,
                };
                let id: [u8; 32] = c[1..].try_into().ok()?;
                Some((kind, ContentId(id)))
            })
            .collect()
    }

    /// Remembers what tree `tree` references (from an authenticated tree).
    pub fn remember_tree_refs(
        &self,
        trees: &[(ContentId, Vec<(BlobKind, ContentId)>)],
    ) -> Result<()> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        {
            let mut st =
                tx.prepare_cached("INSERT OR REPLACE INTO tree_refs (tree, refs) VALUES (?1, ?2)")?;
            for (tree, refs) in trees {
                let mut bytes = Vec::with_capacity(refs.len() * 33);
                for (kind, id) in refs {
                    bytes.push(match kind {
                        BlobKind::Data => 7,
                        BlobKind::Tree => 8,
                    });
                    bytes.extend_from_slice(id.as_bytes());
                }
                st.execute(params![tree.as_bytes().as_slice(), bytes])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Drops the blob rows of packs prune deleted (one scan of the blob
    /// index, however many packs).
    /// The retain-until dates prune set (Object Lock), seconds since the
    /// epoch, by object name.
    pub fn lock_until(&self) -> Result<HashMap<String, i64>> {
        let conn = self.lock();
        let mut st = conn.prepare("SELECT name, until FROM lock_until")?;
        let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Records that `names` are locked until `until` (seconds), and drops
    /// the rows of `gone` (deleted objects).
    pub fn set_lock_until(&self, names: &[String], until: i64, gone: &[String]) -> Result<()> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        {
            let mut put = tx.prepare_cached(
                "INSERT INTO lock_until (name, until) VALUES (?1, ?2) ON CONFLICT (name) DO UPDATE SET until = max(until, excluded.until)",
            )?;
            for n in names {
                put.execute(params![n, until])?;
            }
            let mut del = tx.prepare_cached("DELETE FROM lock_until WHERE name = ?1")?;
            for n in gone {
                del.execute(params![n])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    pub fn drop_packs(&self, packs: &[String]) -> Result<()> {
        if packs.is_empty() {
            return Ok(());
        }
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        tx.execute_batch(
            "CREATE TEMP TABLE IF NOT EXISTS gone (id INTEGER PRIMARY KEY); DELETE FROM gone;",
        )?;
        {
            let mut put = tx.prepare_cached(
                "INSERT OR IGNORE INTO gone (id) SELECT id FROM packs WHERE name = ?1",
            )?;
            for p in packs {
                put.execute(params![p])?;
            }
        }
        tx.execute_batch(
            "DELETE FROM blobs WHERE pack IN (SELECT id FROM gone); DELETE FROM packs WHERE id IN (SELECT id FROM gone); DELETE FROM gone;",
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Number of objects cached.
    pub fn len(&self) -> Result<u64> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let n: i64 = conn.query_row("SELECT count(*) FROM object_cache", [], |r| r.get(0))?;
        Ok(n as u64)
    }

    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }
}

fn record(b: HistoryBody) -> Option<SnapshotRecord> {
    match b {
        HistoryBody::Snapshot(r) => Some(r),
        HistoryBody::Versions(_) => None,
    }
}

fn batch(b: HistoryBody) -> Option<VersionBatch> {
    match b {
        HistoryBody::Versions(v) => Some(v),
        HistoryBody::Snapshot(_) => None,
    }
}

/// The one way commands open a repository (FORMAT.md §5b): config and
/// key checks, this machine's catalogue for it as the object cache, then
/// the indexes the histories name — not every index object. `own`: this
/// machine's share, host and head place, when it ships to this repository.
/// A catalogue that cannot be opened only costs requests (warned in the
/// log, never fatal).
pub fn open_repository(
    store: Arc<dyn Store>,
    key: Arc<RepoKey>,
    rt: tokio::runtime::Handle,
    state_dir: &Path,
    own: Option<(&str, &str, u64)>,
) -> Result<Repository> {
    let repo = Repository::open_lazy(store, key, rt)?;
    let path = Catalog::path(state_dir, &repo.config().repo_id);
    match Catalog::open(&path) {
        Ok(c) => repo.set_cache(Arc::new(c)),
        Err(e) => tracing::info!("no catalogue at {}: {e:#}", path.display()),
    }
    crate::history::load_indexes(&repo, own)?;
    Ok(repo)
}

impl ObjectCache for Catalog {
    fn get(&self, name: &str) -> Option<(Vec<u8>, [u8; 32])> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let row: Option<(Vec<u8>, Vec<u8>)> = conn
            .prepare_cached("SELECT body, hash FROM object_cache WHERE name = ?1")
            .and_then(|mut st| {
                st.query_row(params![name], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()
            })
            .ok()
            .flatten();
        let (body, hash) = row?;
        Some((body, hash.as_slice().try_into().ok()?))
    }

    fn index_merged(&self, name: &str) -> bool {
        if self
            .merged
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(name)
        {
            return true;
        }
        let conn = self.lock();
        let found = conn
            .prepare_cached("SELECT 1 FROM merged_indexes WHERE name = ?1")
            .and_then(|mut st| st.exists(params![name]))
            .unwrap_or(false);
        if found {
            drop(conn);
            self.merged
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(name.to_string());
        }
        found
    }

    fn merge_indexes(&self, indexes: &[(&str, &Index)]) -> bool {
        let merged = (|| -> rusqlite::Result<()> {
            let mut conn = self.lock();
            let tx = conn.transaction()?;
            {
                let mut pack_id = tx.prepare_cached(
                    "INSERT INTO packs (name) VALUES (?1) ON CONFLICT (name) DO UPDATE SET name = name RETURNING id",
                )?;
                let mut blob = tx.prepare_cached(
                    "INSERT OR IGNORE INTO blobs (id, pack, kind, offset, length, raw_length) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )?;
                let mut done =
                    tx.prepare_cached("INSERT OR IGNORE INTO merged_indexes (name) VALUES (?1)")?;
                for (name, index) in indexes {
                    for p in &index.packs {
                        let id: i64 = pack_id.query_row(params![p.pack], |r| r.get(0))?;
                        for b in &p.blobs {
                            if BlobKind::from_u8(b.kind).is_none()
                                || u32::try_from(b.length).is_err()
                                || u32::try_from(b.raw_length).is_err()
                            {
                                continue; // damaged entry: the blob counts as missing
                            }
                            blob.execute(params![
                                b.id.0.as_bytes().as_slice(),
                                id,
                                b.kind,
                                b.offset as i64,
                                b.length as i64,
                                b.raw_length as i64
                            ])?;
                        }
                    }
                    done.execute(params![name])?;
                }
            }
            tx.commit()
        })();
        match merged {
            Ok(()) => {
                let mut m = self.merged.lock().unwrap_or_else(|p| p.into_inner());
                m.extend(indexes.iter().map(|(n, _)| n.to_string()));
                true
            }
            Err(e) => {
                tracing::info!(
                    "catalogue {}: cannot merge indexes: {e}",
                    self.path.display()
                );
                false
            }
        }
    }

    fn blob_locations(&self, id: &ContentId) -> Vec<BlobLocation> {
        let conn = self.lock();
        let rows = conn
            .prepare_cached(
                "SELECT p.name, b.kind, b.offset, b.length, b.raw_length FROM blobs b JOIN packs p ON p.id = b.pack WHERE b.id = ?1",
            )
            .and_then(|mut st| {
                st.query_map(params![id.as_bytes().as_slice()], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, u8>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, i64>(3)?,
                        r.get::<_, i64>(4)?,
                    ))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()
            })
            .unwrap_or_default();
        rows.into_iter()
            .filter_map(|(pack, kind, offset, length, raw_length)| {
                Some(BlobLocation {
                    pack,
                    kind: BlobKind::from_u8(kind)?,
                    offset: offset as u64,
                    length: length as u64,
                    raw_length: raw_length as u64,
                })
            })
            .collect()
    }

    fn remove(&self, names: &[String]) {
        let conn = self.lock();
        let gone = conn
            .prepare_cached("DELETE FROM object_cache WHERE name = ?1")
            .and_then(|mut st| {
                for n in names {
                    st.execute(params![n])?;
                }
                Ok(())
            });
        if let Err(e) = gone {
            tracing::debug!(
                "catalogue {}: cannot drop objects: {e}",
                self.path.display()
            );
        }
    }

    fn as_any(self: Arc<Self>) -> Arc<dyn std::any::Any + Send + Sync> {
        self
    }

    fn own_tree(&self, id: &ContentId) -> Option<Vec<u8>> {
        let conn = self.lock();
        conn.prepare_cached("SELECT body FROM own_trees WHERE id = ?1")
            .and_then(|mut st| {
                st.query_row(params![id.as_bytes().as_slice()], |r| r.get(0))
                    .optional()
            })
            .ok()
            .flatten()
    }

    fn put_own_tree(&self, id: &ContentId, plaintext: &[u8]) {
        let conn = self.lock();
        let put = conn
            .prepare_cached("INSERT OR IGNORE INTO own_trees (id, body) VALUES (?1, ?2)")
            .and_then(|mut st| st.execute(params![id.as_bytes().as_slice(), plaintext]));
        if let Err(e) = put {
            // The next ship then reads the files below it again.
            tracing::warn!(
                "catalogue {}: cannot keep tree {id}: {e}",
                self.path.display()
            );
        }
    }

    fn put(&self, name: &str, body: &[u8], hash: &[u8; 32]) {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let put = conn
            .prepare_cached(
                "INSERT OR REPLACE INTO object_cache (name, hash, body) VALUES (?1, ?2, ?3)",
            )
            .and_then(|mut st| st.execute(params![name, hash.as_slice(), body]));
        if let Err(e) = put {
            // A cache that cannot take an entry costs a request later.
            tracing::debug!(
                "catalogue {}: cannot cache {name}: {e}",
                self.path.display()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_what_it_is_given_and_survives_a_damaged_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog-00.db");
        let c = Catalog::open(&path).unwrap();
        assert!(c.get("index/a").is_none());
        c.put("index/a", b"body", &[7; 32]);
        assert_eq!(c.get("index/a"), Some((b"body".to_vec(), [7; 32])));
        drop(c);
        let again = Catalog::open(&path).unwrap();
        assert_eq!(again.len().unwrap(), 1);
        drop(again);
        std::fs::write(
            &path,
            b"not a database at all, 100 bytes of junk ................................",
        )
        .unwrap();
        let fresh = Catalog::open(&path).unwrap();
        assert!(fresh.is_empty().unwrap());
    }
    fn batch_at(seq: u64, time: &str, path: &str) -> HistoryObject {
        use btrship_upload::format::{ChainLink, VersionEntry, VersionKind};
        HistoryObject {
            name: format!("versions/{seq}"),
            hash: [seq as u8; 32],
            body: HistoryBody::Versions(VersionBatch {
                share: "s".into(),
                host: "h".into(),
                entries: vec![VersionEntry {
                    time: time.into(),
                    path: path.as_bytes().to_vec(),
                    kind: VersionKind::Delete,
                    node: None,
                }],
                chain: Some(ChainLink {
                    seq,
                    prev: None,
                    lost_from: None,
                }),
                indexes: Some(vec![]),
            }),
        }
    }

    #[test]
    fn moments_are_found_by_time_and_path_and_a_prefix_moves_only_from_where_it_was() {
        let c = Catalog::in_memory().unwrap();
        let objs = [
            batch_at(1, "2026-01-01T00:00:01Z", "a"),
            batch_at(2, "2026-01-01T00:00:02Z", "b"),
            batch_at(3, "not a time", "a"),
        ];
        let head = |seq: u64| ChainSync {
            through: seq,
            head: ChainHead {
                seq,
                name: format!("versions/{seq}"),
                hash: [seq as u8; 32],
            },
            declared_lost: vec![(7, 9)],
        };
        assert!(c
            .record_chain("s", "h", 0, &objs[..2], Some(&head(2)))
            .unwrap());
        let t = |s: &str| time_ns(s).unwrap();
        let names = |v: Vec<(String, VersionBatch)>| -> Vec<String> {
            v.into_iter().map(|(n, _)| n).collect()
        };
        let between = c
            .batches_between("s", "h", t("2026-01-01T00:00:01Z"), i64::MAX)
            .unwrap();
        assert_eq!(names(between), vec!["versions/2"]);
        assert_eq!(
            names(c.batches_with_path("s", "h", b"a").unwrap()),
            vec!["versions/1"]
        );
        let sync = c.chain_sync("s", "h").unwrap().unwrap();
        assert_eq!((sync.through, sync.declared_lost), (2, vec![(7, 9)]));
        // A reader that started from place 0 may not move a prefix another
        // process recorded meanwhile.
        assert!(!c
            .record_chain("s", "h", 0, &objs[..1], Some(&head(1)))
            .unwrap());
        assert_eq!(c.chain_sync("s", "h").unwrap().unwrap().through, 2);
        // An unreadable time is found by every query (its reader reports it).
        assert!(c.record_chain("s", "h", 2, &objs[2..], None).unwrap());
        let early = c
            .batches_between("s", "h", i64::MIN, t("2026-01-01T00:00:00Z"))
            .unwrap();
        assert_eq!(names(early), vec!["versions/3"]);
        assert_eq!(c.batches_with_path("s", "h", b"a").unwrap().len(), 2);
        assert_eq!(
            c.moment_hash("s", "h", 2, "versions/2").unwrap(),
            Some([2; 32])
        );
        assert_eq!(
            c.names_at("s", "h", &[1, 5]).unwrap(),
            vec![(1, "versions/1".to_string())]
        );
        c.forget_chain("s", "h").unwrap();
        assert!(c.chain_sync("s", "h").unwrap().is_none());
        assert!(c.batches_with_path("s", "h", b"a").unwrap().is_empty());
    }

    #[test]
    fn the_blob_index_keeps_every_copy_and_remembers_what_it_merged() {
        use btrship_upload::format::{BlobId, IndexPack, PackedBlob};
        let c = Arc::new(Catalog::in_memory().unwrap());
        let blob = |id: u8, offset| PackedBlob {
            id: BlobId(ContentId([id; 32])),
            kind: BlobKind::Data.to_u8(),
            offset,
            length: 10,
            raw_length: 12,
        };
        let index = |pack: &str, blobs| Index {
            packs: vec![IndexPack {
                pack: pack.into(),
                blobs,
            }],
        };
        let (a, b) = (
            index("packs/a", vec![blob(1, 0), blob(2, 10)]),
            index("packs/b", vec![blob(1, 0)]),
        );
        assert!(!c.index_merged("index/a"));
        assert!(c.merge_indexes(&[("index/a", &a), ("index/b", &b)]));
        assert!(c.index_merged("index/a") && c.index_merged("index/b"));
        let mut packs: Vec<String> = c
            .blob_locations(&ContentId([1; 32]))
            .into_iter()
            .map(|l| l.pack)
            .collect();
        packs.sort();
        assert_eq!(packs, vec!["packs/a", "packs/b"]);
        let two = c.blob_locations(&ContentId([2; 32]));
        assert_eq!(
            (two[0].offset, two[0].length, two[0].raw_length),
            (10, 10, 12)
        );
        assert!(c.blob_locations(&ContentId([3; 32])).is_empty());
        // Merging again changes nothing.
        assert!(c.merge_indexes(&[("index/a", &a)]));
        assert_eq!(c.blob_locations(&ContentId([2; 32])).len(), 1);
    }
}
