//! The local catalogue (FORMAT.md §5b): a SQLite cache, per repository,
//! of the write-once objects this machine has authenticated — history
//! objects, summaries, chain registrations and indexes — by name. A cache,
//! never the truth: every entry was opened with the key before it was
//! stored, object names never change meaning (write-once), and deleting
//! the file costs requests, never correctness. With it, commands on a
//! machine that has read a history before read only what is new.
//!
//! `<state dir>/catalog-<repository id>.db`, mode 0600 in the root-only
//! state directory (it holds decrypted metadata: names, sizes, times).
//! WAL with `synchronous = NORMAL`: a power cut may lose the newest
//! entries (they are read again) but never corrupts the file; a file that
//! cannot be opened is removed and started again.

use anyhow::{Context, Result};
use btrship_crypto::MasterKey;
use btrship_upload::repo::ObjectCache;
use btrship_upload::{Repository, Store};
use rusqlite::{params, Connection, OptionalExtension};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;

/// The object cache of one repository on this machine.
pub struct Catalog {
    conn: Mutex<Connection>,
    path: PathBuf,
}

const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS objects (
        name TEXT PRIMARY KEY,   -- object name in the store
        hash BLOB NOT NULL,      -- BLAKE3 of its sealed bytes
        body BLOB NOT NULL       -- its opened body (CBOR)
    ) WITHOUT ROWID;
";

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
        conn.execute_batch(SCHEMA)?;
        Ok(Catalog {
            conn: Mutex::new(conn),
            path: path.to_path_buf(),
        })
    }

    /// Number of objects cached.
    pub fn len(&self) -> Result<u64> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let n: i64 = conn.query_row("SELECT count(*) FROM objects", [], |r| r.get(0))?;
        Ok(n as u64)
    }

    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
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
    key: Arc<MasterKey>,
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
            .prepare_cached("SELECT body, hash FROM objects WHERE name = ?1")
            .and_then(|mut st| {
                st.query_row(params![name], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()
            })
            .ok()
            .flatten();
        let (body, hash) = row?;
        Some((body, hash.as_slice().try_into().ok()?))
    }

    fn put(&self, name: &str, body: &[u8], hash: &[u8; 32]) {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let put = conn
            .prepare_cached("INSERT OR REPLACE INTO objects (name, hash, body) VALUES (?1, ?2, ?3)")
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
}
