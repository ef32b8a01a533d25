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
use rusqlite::{params, Connection};
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
];

pub struct State {
    conn: Connection,
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
        Ok(State { conn })
    }

    /// Records a snapshot as taken (queued for shipping). Idempotent.
    pub fn add_taken(&self, name: &str, taken_at: &str) -> Result<()> {
        self.conn.execute(
            "INSERT OR IGNORE INTO snapshots (name, taken_at, state) VALUES (?1, ?2, 'taken')",
            params![name, taken_at],
        )?;
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
        let tx = self.conn.transaction()?;
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
        let tx = self.conn.transaction()?;
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
