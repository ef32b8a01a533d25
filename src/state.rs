//! The local state database of one share: a SQLite file (WAL mode) that is
//! the durable queue of snapshots taken but not yet shipped, and a cache of
//! what was shipped. The repository is the truth: losing this file loses no
//! data, only the knowledge of which local snapshots still need shipping.
//!
//! Every state change is one transaction. Schema changes are numbered
//! migrations applied in order (`PRAGMA user_version`).

use crate::ship::Totals;
use anyhow::{Context, Result};
use btrship_crypto::ContentId;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use std::path::Path;

/// Migrations; entry `i` takes the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    "
    CREATE TABLE snapshots (
        name        TEXT PRIMARY KEY,   -- btrfs snapshot name, @GMT-...
        taken_at    TEXT NOT NULL,      -- RFC 3339 UTC
        state       TEXT NOT NULL CHECK (state IN ('taken', 'shipped')),
        record      TEXT,               -- repository object name once shipped
        tree        BLOB,               -- root tree blob id once shipped
        shipped_at  TEXT,
        stats       TEXT                -- JSON counters of the ship
    );
    CREATE TABLE events (
        id      INTEGER PRIMARY KEY,
        time    TEXT NOT NULL,
        level   TEXT NOT NULL,
        message TEXT NOT NULL
    );
",
    "
    -- Files, directories and bytes below each tree shipped from here, so a
    -- ship that reuses a subtree need not walk it to count.
    CREATE TABLE tree_totals (
        id    BLOB PRIMARY KEY,
        files INTEGER NOT NULL,
        dirs  INTEGER NOT NULL,
        bytes INTEGER NOT NULL
    ) WITHOUT ROWID;
",
    "
    -- What an event is about, for `status`: ship_failed, shipped, coalesced,
    -- vanished (NULL for older rows).
    ALTER TABLE events ADD COLUMN kind TEXT;
    CREATE INDEX events_kind ON events (kind, id);
",
    "
    -- The daemon's durable capture queue: one row per captured state of a
    -- path, in capture order. 'busy' rows stand for a close seen while a
    -- writer had the file open again: the next capture of the path
    -- supersedes them, and `sync` waits for that.
    CREATE TABLE captures (
        seq     INTEGER PRIMARY KEY,
        time    TEXT NOT NULL,          -- RFC 3339 UTC, ns: the state's moment
        path    BLOB NOT NULL,          -- share-relative, '/'-separated
        kind    TEXT NOT NULL CHECK (kind IN ('close', 'mkdir', 'node', 'delete', 'busy')),
        clone   TEXT,                   -- staging file name (close)
        node    BLOB,                   -- CBOR tree node without content
        size    INTEGER NOT NULL DEFAULT 0,
        state   TEXT NOT NULL DEFAULT 'pending'
                CHECK (state IN ('pending', 'shipped', 'superseded')),
        batch   TEXT,                   -- versions/ object once shipped
        shipped_at TEXT,                -- when it became durable in the store
        covers  INTEGER                 -- the oldest capture this one superseded
                                        -- (directly or not): a sync up to that
                                        -- waits for this one
    );
    CREATE INDEX captures_pending ON captures (state, seq);
    CREATE INDEX captures_path ON captures (path, state);
    -- The newest shipped clone of each path: the base for the next one's
    -- changed ranges (FIEMAP) and chunk reuse.
    CREATE TABLE baselines (
        path    BLOB PRIMARY KEY,
        clone   TEXT NOT NULL,
        size    INTEGER NOT NULL,
        content BLOB NOT NULL           -- CBOR extents [[offset, id, len]...]
    ) WITHOUT ROWID;
    -- `btrship sync` asks; the daemon answers with the last capture that
    -- covers every close before the request.
    CREATE TABLE sync_requests (
        id           INTEGER PRIMARY KEY,
        requested_at TEXT NOT NULL,
        target_seq   INTEGER
    );
",
    "
    -- The head of this share's history chain as this machine shipped it
    -- (FORMAT.md §5, history chain): at most one row. `lost_from` is set by
    -- `repair` after a loss: `name`/`hash` are then the newest surviving
    -- object and the next object declares `lost_from ..= seq` lost.
    CREATE TABLE history_head (
        id        INTEGER PRIMARY KEY CHECK (id = 1),
        host      TEXT NOT NULL,
        seq       INTEGER NOT NULL,
        name      TEXT NOT NULL,
        hash      BLOB NOT NULL,
        lost_from INTEGER,
        time      TEXT NOT NULL
    );
",
    "
    -- Packs listed in an index but missing from the store (found by check
    -- or repair). 'missing': the next ship re-reads and re-uploads what
    -- referenced them; 'healed': every blob they held has another copy;
    -- 'lost': some blobs exist nowhere any more (lost_blobs of them).
    CREATE TABLE missing_packs (
        pack       TEXT PRIMARY KEY,
        found_at   TEXT NOT NULL,
        state      TEXT NOT NULL CHECK (state IN ('missing', 'healed', 'lost')),
        lost_blobs INTEGER NOT NULL DEFAULT 0,
        updated_at TEXT NOT NULL
    ) WITHOUT ROWID;
",
    "
    -- History summaries this machine owes the store (FORMAT.md §5b): added
    -- in the transaction that records the head at a summary's last place,
    -- removed once the summary is in the store (or cannot be written).
    CREATE TABLE summaries_due (
        host  TEXT NOT NULL,
        level INTEGER NOT NULL CHECK (level >= 1),
        first INTEGER NOT NULL CHECK (first >= 1),
        PRIMARY KEY (host, level, first)
    ) WITHOUT ROWID;
",
];

pub struct State {
    conn: Connection,
    path: std::path::PathBuf,
}

/// The head of this share's history chain as this machine shipped it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryHead {
    pub host: String,
    pub seq: u64,
    pub name: String,
    pub hash: [u8; 32],
    pub lost_from: Option<u64>,
    /// When it was recorded (RFC 3339 UTC).
    pub time: String,
}

#[derive(Debug, Clone)]
pub struct LocalSnapshot {
    pub name: String,
    pub taken_at: String,
    pub shipped: bool,
    pub record: Option<String>,
    pub tree: Option<Vec<u8>>,
    pub shipped_at: Option<String>,
    /// The ship report (JSON) once shipped.
    pub stats: Option<String>,
}

/// One row of the event log.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Event {
    pub time: String,
    pub level: String,
    pub kind: Option<String>,
    pub message: String,
}

impl State {
    pub fn open(path: &Path) -> Result<State> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create state directory {}", dir.display()))?;
        }
        let mut conn = Connection::open(path)
            .with_context(|| format!("cannot open state database {}", path.display()))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // FULL: a commit survives a power cut (WAL's NORMAL may lose the last one).
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        migrate(&mut conn)
            .with_context(|| format!("cannot migrate state database {}", path.display()))?;
        Ok(State {
            conn,
            path: path.to_path_buf(),
        })
    }

    /// This share's history head, if this machine shipped any.
    pub fn history_head(&self) -> Result<Option<HistoryHead>> {
        let row = self
            .conn
            .query_row(
                "SELECT host, seq, name, hash, lost_from, time FROM history_head WHERE id = 1",
                [],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, Vec<u8>>(3)?,
                        r.get::<_, Option<i64>>(4)?,
                        r.get::<_, String>(5)?,
                    ))
                },
            )
            .map(Some)
            .or_else(|e| match e {
                rusqlite::Error::QueryReturnedNoRows => Ok(None),
                e => Err(e),
            })?;
        let Some((host, seq, name, hash, lost_from, time)) = row else {
            return Ok(None);
        };
        let hash = <[u8; 32]>::try_from(hash.as_slice())
            .map_err(|_| anyhow::anyhow!("state database: history head hash is not 32 bytes"))?;
        Ok(Some(HistoryHead {
            host,
            seq: seq as u64,
            name,
            hash,
            lost_from: lost_from.map(|l| l as u64),
            time,
        }))
    }

    /// Records this share's history head, and the summaries that become
    /// due with it (one transaction).
    pub fn set_history_head(&self, h: &HistoryHead) -> Result<()> {
        let tx = self.conn.unchecked_transaction()?;
        tx.execute(
            "INSERT OR REPLACE INTO history_head (id, host, seq, name, hash, lost_from, time)
             VALUES (1, ?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                h.host,
                h.seq as i64,
                h.name,
                h.hash.as_slice(),
                h.lost_from.map(|l| l as i64),
                h.time
            ],
        )?;
        if !h.name.is_empty() {
            for (level, first) in btrship_upload::history::summaries_due(h.seq) {
                tx.execute(
                    "INSERT OR IGNORE INTO summaries_due (host, level, first) VALUES (?1, ?2, ?3)",
                    params![h.host, level, first as i64],
                )?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Summaries owed for `host`'s chain: (level, first place), oldest
    /// and lowest first.
    pub fn summaries_due(&self, host: &str) -> Result<Vec<(u32, u64)>> {
        let mut stmt = self.conn.prepare(
            "SELECT level, first FROM summaries_due WHERE host = ?1 ORDER BY first, level",
        )?;
        let rows = stmt.query_map(params![host], |r| {
            Ok((r.get::<_, u32>(0)?, r.get::<_, i64>(1)? as u64))
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// A summary was written (or given up).
    pub fn summary_done(&self, host: &str, level: u32, first: u64) -> Result<()> {
        self.conn.execute(
            "DELETE FROM summaries_due WHERE host = ?1 AND level = ?2 AND first = ?3",
            params![host, level, first as i64],
        )?;
        Ok(())
    }

    /// One writer of this share's history at a time (the daemon's batches
    /// and snapshot ships): an exclusive lock on a file beside the
    /// database, held while the returned file lives. Waits for it.
    pub fn lock_history(&self) -> Result<std::fs::File> {
        let mut p = self.path.clone().into_os_string();
        p.push(".history-lock");
        let f = std::fs::File::create(&p)
            .with_context(|| format!("cannot open {}", p.to_string_lossy()))?;
        f.lock()
            .with_context(|| format!("cannot lock {}", p.to_string_lossy()))?;
        Ok(f)
    }

    /// Records a snapshot as taken (queued for shipping). Idempotent.
    pub fn add_taken(&self, name: &str, taken_at: &str) -> Result<()> {
        self.conn.execute(
            "INSERT OR IGNORE INTO snapshots (name, taken_at, state) VALUES (?1, ?2, 'taken')",
            params![name, taken_at],
        )?;
        Ok(())
    }

    /// Puts a shipped snapshot back in the queue (its record was lost by
    /// the store; `repair`): the next run ships it again.
    pub fn requeue(&self, name: &str, message: &str) -> Result<()> {
        let tx = self.conn.unchecked_transaction()?;
        tx.execute(
            "UPDATE snapshots SET state = 'taken', record = NULL, tree = NULL, stats = NULL,
                 shipped_at = NULL
             WHERE name = ?1",
            params![name],
        )?;
        insert_event(&tx, "warn", "requeued", message)?;
        tx.commit()?;
        Ok(())
    }

    pub fn mark_shipped(
        &mut self,
        name: &str,
        record: &str,
        tree: &[u8],
        stats: &str,
        message: &str,
    ) -> Result<()> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let n = tx.execute(
            "UPDATE snapshots SET state = 'shipped', record = ?2, tree = ?3, stats = ?4,
                 shipped_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
             WHERE name = ?1",
            params![name, record, tree, stats],
        )?;
        anyhow::ensure!(n == 1, "snapshot {name} is not in the state database");
        insert_event(&tx, "info", "shipped", message)?;
        tx.commit()?;
        Ok(())
    }

    /// Drops a snapshot from the queue and logs why, in one transaction.
    pub fn forget(&mut self, name: &str, level: &str, kind: &str, message: &str) -> Result<()> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute("DELETE FROM snapshots WHERE name = ?1", params![name])?;
        insert_event(&tx, level, kind, message)?;
        tx.commit()?;
        Ok(())
    }

    pub fn snapshots(&self) -> Result<Vec<LocalSnapshot>> {
        let mut stmt = self.conn.prepare(
            "SELECT name, taken_at, state, record, tree, shipped_at, stats
             FROM snapshots ORDER BY taken_at, name",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(LocalSnapshot {
                name: r.get(0)?,
                taken_at: r.get(1)?,
                shipped: r.get::<_, String>(2)? == "shipped",
                record: r.get(3)?,
                tree: r.get(4)?,
                shipped_at: r.get(5)?,
                stats: r.get(6)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// Snapshots taken and not shipped yet, oldest first: the spool.
    pub fn queued(&self) -> Result<Vec<LocalSnapshot>> {
        Ok(self
            .snapshots()?
            .into_iter()
            .filter(|s| !s.shipped)
            .collect())
    }

    /// The newest shipped snapshot: the parent of the next ship.
    pub fn last_shipped(&self) -> Result<Option<LocalSnapshot>> {
        Ok(self
            .snapshots()?
            .into_iter()
            .rev()
            .find(|s| s.shipped && s.tree.is_some()))
    }

    pub fn tree_totals(&self, id: &[u8]) -> Result<Option<Totals>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT files, dirs, bytes FROM tree_totals WHERE id = ?1")?;
        let mut rows = stmt.query(params![id])?;
        Ok(match rows.next()? {
            Some(r) => Some(Totals {
                files: r.get::<_, i64>(0)? as u64,
                dirs: r.get::<_, i64>(1)? as u64,
                bytes: r.get::<_, i64>(2)? as u64,
            }),
            None => None,
        })
    }

    /// Caches tree totals, all in one transaction.
    pub fn cache_tree_totals(&self, totals: &[(ContentId, Totals)]) -> Result<()> {
        let tx = self.conn.unchecked_transaction()?;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT OR IGNORE INTO tree_totals (id, files, dirs, bytes) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for (id, t) in totals {
                stmt.execute(params![
                    &id.as_bytes()[..],
                    t.files as i64,
                    t.dirs as i64,
                    t.bytes as i64
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Appends to the event log (`status` shows the latest of each kind).
    pub fn log_event(&self, level: &str, kind: &str, message: &str) -> Result<()> {
        insert_event(&self.conn, level, kind, message)
    }

    /// Prune's local cleanup (FORMAT.md §5c): shipped and superseded
    /// captures older than `captures_before`, and events older than
    /// `events_before` except the newest of each kind (`status` reads
    /// those). Returns (captures, events) deleted.
    pub fn shrink(&mut self, captures_before: &str, events_before: &str) -> Result<(u64, u64)> {
        let tx = self.conn.transaction()?;
        let captures = tx.execute(
            "DELETE FROM captures WHERE state IN ('shipped', 'superseded') AND time < ?1",
            params![captures_before],
        )?;
        let events = tx.execute(
            "DELETE FROM events WHERE time < ?1 AND id NOT IN (SELECT max(id) FROM events GROUP BY kind)",
            params![events_before],
        )?;
        tx.commit()?;
        Ok((captures as u64, events as u64))
    }

    /// Drops the rows of local snapshots whose record retention forgot
    /// and whose btrfs snapshot is gone (they are nobody's parent and no
    /// longer a point in time to check the store for).
    pub fn drop_snapshots(&mut self, names: &[String]) -> Result<()> {
        let tx = self.conn.transaction()?;
        for n in names {
            tx.execute(
                "DELETE FROM snapshots WHERE name = ?1 AND state = 'shipped'",
                params![n],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The newest event of a kind.
    pub fn last_event(&self, kind: &str) -> Result<Option<Event>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT time, level, kind, message FROM events WHERE kind = ?1 ORDER BY id DESC LIMIT 1",
        )?;
        let mut rows = stmt.query(params![kind])?;
        Ok(match rows.next()? {
            Some(r) => Some(Event {
                time: r.get(0)?,
                level: r.get(1)?,
                kind: r.get(2)?,
                message: r.get(3)?,
            }),
            None => None,
        })
    }

    /// The newest event of any of these kinds.
    pub fn last_event_of(&self, kinds: &[&str]) -> Result<Option<Event>> {
        let mut newest: Option<(i64, Event)> = None;
        for kind in kinds {
            let mut stmt = self.conn.prepare_cached(
                "SELECT id, time, level, kind, message FROM events WHERE kind = ?1 ORDER BY id DESC LIMIT 1",
            )?;
            let mut rows = stmt.query(params![kind])?;
            if let Some(r) = rows.next()? {
                let id: i64 = r.get(0)?;
                if newest.as_ref().is_none_or(|(n, _)| id > *n) {
                    let e = Event {
                        time: r.get(1)?,
                        level: r.get(2)?,
                        kind: r.get(3)?,
                        message: r.get(4)?,
                    };
                    newest = Some((id, e));
                }
            }
        }
        Ok(newest.map(|(_, e)| e))
    }

    /// How many events of a kind were logged in all.
    pub fn count_events(&self, kind: &str) -> Result<u64> {
        let n: i64 = self.conn.query_row(
            "SELECT count(*) FROM events WHERE kind = ?1",
            params![kind],
            |r| r.get(0),
        )?;
        Ok(n as u64)
    }
}

/// seq, kind, clone, time, covers of a pending capture.
type PendingRow = (i64, String, Option<String>, String, Option<i64>);

/// A captured state of one path, as the daemon records it.
#[derive(Debug, Clone)]
pub struct NewCapture {
    pub time: String,
    pub path: Vec<u8>,
    /// close | mkdir | node | delete | busy
    pub kind: &'static str,
    pub clone: Option<String>,
    pub node: Option<Vec<u8>>,
    pub size: u64,
}

/// A queued capture.
#[derive(Debug, Clone)]
pub struct Capture {
    pub seq: i64,
    pub time: String,
    pub path: Vec<u8>,
    pub kind: String,
    pub clone: Option<String>,
    pub node: Option<Vec<u8>>,
    pub size: u64,
}

/// The newest shipped clone of a path.
#[derive(Debug, Clone)]
pub struct Baseline {
    pub clone: String,
    pub size: u64,
    pub content: Vec<u8>,
}

/// What a shipped batch changes in the state.
pub struct ShippedBatch<'a> {
    pub batch: &'a str,
    pub seqs: &'a [i64],
    /// (path, clone, size, CBOR content) for each shipped close.
    pub baselines: Vec<(Vec<u8>, String, u64, Vec<u8>)>,
    /// Paths shipped as deleted: their baselines (and those below) go.
    pub deleted: Vec<Vec<u8>>,
}

impl State {
    /// Queues captures in one transaction. An older pending capture of the
    /// same path is superseded when it is less than `settle` older (a burst
    /// ships once) — except that a delete is never superseded by a mkdir (it
    /// removes what was below) — and 'busy' rows always are. Returns the
    /// clones of superseded rows (the caller deletes them).
    pub fn add_captures(&mut self, caps: &[NewCapture], settle_after: &str) -> Result<Vec<String>> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut freed = Vec::new();
        {
            let mut older = tx.prepare_cached(
                "SELECT seq, kind, clone, time, covers FROM captures
                 WHERE path = ?1 AND state = 'pending'",
            )?;
            let mut supersede =
                tx.prepare_cached("UPDATE captures SET state = 'superseded' WHERE seq = ?1")?;
            let mut insert = tx.prepare_cached(
                "INSERT INTO captures (time, path, kind, clone, node, size, covers)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
            for c in caps {
                let rows: Vec<PendingRow> = older
                    .query_map(params![c.path], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                    })?
                    .collect::<rusqlite::Result<_>>()?;
                let mut covers: Option<i64> = None;
                for (seq, kind, clone, time, their_covers) in rows {
                    let recent = time.as_str() > settle_after;
                    let keep_delete = kind == "delete" && c.kind == "mkdir";
                    if kind == "busy" || (recent && !keep_delete) {
                        supersede.execute(params![seq])?;
                        freed.extend(clone);
                        let oldest = their_covers.map_or(seq, |t| t.min(seq));
                        covers = Some(covers.map_or(oldest, |c| c.min(oldest)));
                    }
                }
                insert.execute(params![
                    c.time,
                    c.path,
                    c.kind,
                    c.clone,
                    c.node,
                    c.size as i64,
                    covers
                ])?;
            }
        }
        tx.commit()?;
        Ok(freed)
    }

    /// Whether capture `seq` is still pending (not shipped or superseded).
    pub fn capture_pending(&self, seq: i64) -> Result<bool> {
        Ok(self
            .conn
            .query_row(
                "SELECT 1 FROM captures WHERE seq = ?1 AND state = 'pending'",
                params![seq],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }

    /// Paths whose newest pending capture is 'busy' (to look at again).
    pub fn busy_paths(&self) -> Result<Vec<Vec<u8>>> {
        let mut stmt = self.conn.prepare(
            "SELECT DISTINCT path FROM captures WHERE state = 'pending' AND kind = 'busy'",
        )?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The newest capture's sequence number (0 when none).
    pub fn last_capture_seq(&self) -> Result<i64> {
        Ok(self
            .conn
            .query_row("SELECT coalesce(max(seq), 0) FROM captures", [], |r| {
                r.get(0)
            })?)
    }

    /// Pending captures ready to ship: taken at or before `settled_before`,
    /// or covered by a `sync` (seq <= `force_upto`). Busy rows never ship.
    pub fn ready_captures(
        &self,
        settled_before: &str,
        force_upto: i64,
        limit: usize,
    ) -> Result<Vec<Capture>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT seq, time, path, kind, clone, node, size FROM captures
             WHERE state = 'pending' AND kind != 'busy'
               AND (time <= ?1 OR seq <= ?2 OR covers <= ?2)
             ORDER BY seq LIMIT ?3",
        )?;
        let rows = stmt.query_map(params![settled_before, force_upto, limit as i64], |r| {
            Ok(Capture {
                seq: r.get(0)?,
                time: r.get(1)?,
                path: r.get(2)?,
                kind: r.get(3)?,
                clone: r.get(4)?,
                node: r.get(5)?,
                size: r.get::<_, i64>(6)? as u64,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Pending captures at or below `seq`, or standing in for one that was
    /// (what a `sync` up to `seq` still waits for).
    pub fn pending_upto(&self, seq: i64) -> Result<Vec<(Vec<u8>, String)>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT path, kind FROM captures
             WHERE state = 'pending' AND (seq <= ?1 OR covers <= ?1) ORDER BY seq",
        )?;
        let rows = stmt.query_map(params![seq], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// (pending captures, their bytes, the oldest one's time).
    /// The time of the newest capture that shipped (the newest durable
    /// file version).
    pub fn last_shipped_capture_time(&self) -> Result<Option<String>> {
        Ok(self
            .conn
            .query_row(
                "SELECT time FROM captures WHERE state = 'shipped' ORDER BY seq DESC LIMIT 1",
                [],
                |r| r.get(0),
            )
            .optional()?)
    }

    pub fn capture_backlog(&self) -> Result<(u64, u64, Option<String>)> {
        Ok(self.conn.query_row(
            "SELECT count(*), coalesce(sum(size), 0), min(time) FROM captures WHERE state = 'pending'",
            [],
            |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64, r.get(2)?)),
        )?)
    }

    pub fn baseline(&self, path: &[u8]) -> Result<Option<Baseline>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT clone, size, content FROM baselines WHERE path = ?1")?;
        let mut rows = stmt.query(params![path])?;
        Ok(match rows.next()? {
            Some(r) => Some(Baseline {
                clone: r.get(0)?,
                size: r.get::<_, i64>(1)? as u64,
                content: r.get(2)?,
            }),
            None => None,
        })
    }

    /// Every clone the state still needs (pending captures and baselines).
    pub fn live_clones(&self) -> Result<std::collections::HashSet<String>> {
        let mut stmt = self.conn.prepare(
            "SELECT clone FROM captures WHERE state = 'pending' AND clone IS NOT NULL
             UNION SELECT clone FROM baselines",
        )?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Marks a batch shipped (after its object is durable in the store) and
    /// moves baselines, in one transaction. Returns clones no longer needed.
    pub fn finish_batch(&mut self, b: ShippedBatch<'_>) -> Result<Vec<String>> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut freed = Vec::new();
        {
            let mut mark = tx.prepare_cached(
                "UPDATE captures SET state = 'shipped', batch = ?2,
                     shipped_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
                 WHERE seq = ?1 AND state = 'pending'",
            )?;
            for seq in b.seqs {
                mark.execute(params![seq, b.batch])?;
            }
            let mut old = tx.prepare_cached("SELECT clone FROM baselines WHERE path = ?1")?;
            let mut put = tx.prepare_cached(
                "INSERT OR REPLACE INTO baselines (path, clone, size, content) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for (path, clone, size, content) in &b.baselines {
                let prev: Option<String> = old.query_row(params![path], |r| r.get(0)).ok();
                if let Some(p) = prev.filter(|p| p != clone) {
                    freed.push(p);
                }
                put.execute(params![path, clone, *size as i64, content])?;
            }
            let mut below = tx.prepare_cached(
                "SELECT path, clone FROM baselines WHERE path = ?1 OR substr(path, 1, ?2) = ?3",
            )?;
            let mut drop_base = tx.prepare_cached("DELETE FROM baselines WHERE path = ?1")?;
            for path in &b.deleted {
                let mut prefix = path.clone();
                prefix.push(b'/');
                let gone: Vec<(Vec<u8>, String)> = below
                    .query_map(params![path, prefix.len() as i64, prefix], |r| {
                        Ok((r.get(0)?, r.get(1)?))
                    })?
                    .collect::<rusqlite::Result<_>>()?;
                for (p, clone) in gone {
                    drop_base.execute(params![p])?;
                    freed.push(clone);
                }
            }
        }
        tx.commit()?;
        Ok(freed)
    }

    /// Asks the daemon for a sync barrier; returns the request id.
    pub fn request_sync(&self, requested_at: &str) -> Result<i64> {
        self.conn.execute(
            "INSERT INTO sync_requests (requested_at) VALUES (?1)",
            params![requested_at],
        )?;
        Ok(self.conn.last_insert_rowid())
    }

    /// The oldest unanswered sync request's time.
    pub fn open_sync_request(&self) -> Result<Option<String>> {
        Ok(self.conn.query_row(
            "SELECT min(requested_at) FROM sync_requests WHERE target_seq IS NULL",
            [],
            |r| r.get(0),
        )?)
    }

    /// Answers every request made at or before `drained_at` with `seq`.
    pub fn answer_sync_requests(&self, drained_at: &str, seq: i64) -> Result<()> {
        self.conn.execute(
            "UPDATE sync_requests SET target_seq = ?2
             WHERE target_seq IS NULL AND requested_at <= ?1",
            params![drained_at, seq],
        )?;
        Ok(())
    }

    /// The answer to a sync request, once given.
    pub fn sync_target(&self, id: i64) -> Result<Option<i64>> {
        Ok(self.conn.query_row(
            "SELECT target_seq FROM sync_requests WHERE id = ?1",
            params![id],
            |r| r.get(0),
        )?)
    }

    /// The highest answered sync target whose captures are not all shipped
    /// yet (the shipper ships up to it without waiting for settle).
    pub fn sync_force_upto(&self) -> Result<i64> {
        Ok(self.conn.query_row(
            "SELECT coalesce(max(target_seq), 0) FROM sync_requests r
             WHERE target_seq IS NOT NULL AND EXISTS
               (SELECT 1 FROM captures c WHERE c.state = 'pending'
                  AND (c.seq <= r.target_seq OR c.covers <= r.target_seq))",
            [],
            |r| r.get(0),
        )?)
    }

    pub fn forget_sync_request(&self, id: i64) -> Result<()> {
        self.conn
            .execute("DELETE FROM sync_requests WHERE id = ?1", params![id])?;
        Ok(())
    }
}

/// One snapshot-and-ship at a time per share (the timer, a manual run and
/// the daemon's reconciling snapshots may overlap). Held while the file
/// lives.
pub fn lock_share(state_dir: &Path, name: &str) -> Result<std::fs::File> {
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("cannot create {}", state_dir.display()))?;
    let path = state_dir.join(format!("{name}.lock"));
    let f =
        std::fs::File::create(&path).with_context(|| format!("cannot open {}", path.display()))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => Err(crate::exit::UserError::new(
            crate::exit::FAILURE,
            format!(
                "another btrship is shipping share {name} right now (lock {}); try again when it finishes",
                path.display()
            ),
        )
        .into()),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
}

/// One baseline: (share-relative path, clone file name, CBOR content).
pub type BaselineRow = (Vec<u8>, String, Vec<u8>);

/// A pack the store lost, as the state remembers it.
#[derive(Debug, Clone, serde::Serialize, PartialEq, Eq)]
pub struct MissingPack {
    pub pack: String,
    pub found_at: String,
    /// `missing`, `healed` or `lost`.
    pub state: String,
    pub lost_blobs: u64,
}

impl State {
    /// Remembers packs found missing from the store (a pack already known
    /// keeps its state).
    pub fn add_missing_packs(&mut self, packs: &[String]) -> Result<()> {
        let tx = self.conn.transaction()?;
        for p in packs {
            tx.execute(
                "INSERT INTO missing_packs (pack, found_at, state, updated_at)
                 VALUES (?1, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), 'missing',
                         strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
                 ON CONFLICT (pack) DO NOTHING",
                params![p],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Every pack known missing, in any state.
    pub fn missing_packs(&self) -> Result<Vec<MissingPack>> {
        let mut stmt = self.conn.prepare(
            "SELECT pack, found_at, state, lost_blobs FROM missing_packs ORDER BY found_at, pack",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(MissingPack {
                pack: r.get(0)?,
                found_at: r.get(1)?,
                state: r.get(2)?,
                lost_blobs: r.get::<_, i64>(3)? as u64,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Every baseline (the newest shipped clone of a path): (path, clone
    /// file name, CBOR content). `repair` reads lost chunks back from them.
    pub fn all_baselines(&self) -> Result<Vec<BaselineRow>> {
        let mut stmt = self
            .conn
            .prepare("SELECT path, clone, content FROM baselines ORDER BY path")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Sets a missing pack's state ('missing', 'healed', 'lost') and the
    /// number of its blobs that exist nowhere else.
    pub fn set_missing_pack_state(&self, pack: &str, state: &str, lost_blobs: u64) -> Result<()> {
        self.conn.execute(
            "UPDATE missing_packs SET state = ?2, lost_blobs = ?3,
                 updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
             WHERE pack = ?1",
            params![pack, state, lost_blobs as i64],
        )?;
        Ok(())
    }
}

fn insert_event(conn: &Connection, level: &str, kind: &str, message: &str) -> Result<()> {
    conn.execute(
        "INSERT INTO events (time, level, kind, message)
         VALUES (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), ?1, ?2, ?3)",
        params![level, kind, message],
    )?;
    Ok(())
}

fn migrate(conn: &mut Connection) -> Result<()> {
    let version: usize = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    anyhow::ensure!(
        version <= MIGRATIONS.len(),
        "state database schema {version} is newer than this btrship ({}); upgrade btrship",
        MIGRATIONS.len()
    );
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i + 1)?;
        tx.commit()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_then_ship_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        {
            let st = State::open(&path).unwrap();
            st.add_taken("@GMT-2026.11.25-10.00.00", "2026-11-25T10:00:00Z")
                .unwrap();
            st.add_taken("@GMT-2026.11.25-10.00.00", "2026-11-25T10:00:00Z")
                .unwrap();
            assert!(st.last_shipped().unwrap().is_none());
        }
        let mut st = State::open(&path).unwrap();
        let snaps = st.snapshots().unwrap();
        assert_eq!(snaps.len(), 1);
        assert!(!snaps[0].shipped);
        st.mark_shipped(
            "@GMT-2026.11.25-10.00.00",
            "snapshots/ab",
            &[1; 32],
            "{}",
            "shipped",
        )
        .unwrap();
        assert_eq!(st.count_events("shipped").unwrap(), 1);
        assert!(st.queued().unwrap().is_empty());
        let last = st.last_shipped().unwrap().unwrap();
        assert_eq!(last.record.as_deref(), Some("snapshots/ab"));
        assert!(st.mark_shipped("missing", "x", &[], "{}", "m").is_err());
        assert_eq!(st.count_events("shipped").unwrap(), 1);
    }

    #[test]
    fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        drop(State::open(&path).unwrap());
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        let err = State::open(&path).err().unwrap();
        assert!(format!("{err:#}").contains("upgrade btrship"));
    }
}
