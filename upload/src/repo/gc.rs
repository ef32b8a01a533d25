//! Retention and garbage records in the store (FORMAT.md §5c), and the
//! writers' rule that keeps a ship safe while prune runs.
//!
//! - Forget records (`forgets/<chain id>/<number>`): per chain, the places
//!   retention forgot so far. Readers take the newest that opens.
//! - Garbage records (`gc/<number>`): per repository, the packs prune
//!   marked and everything it ever deleted. Everyone who reads or writes
//!   treats those packs as missing (no deduplication against them; other
//!   copies first) and does not fetch the deleted indexes.
//! - The writers' rule ([`Repository::garbage_conflict`]): before a
//!   history object is put, the newest garbage record is read again; when
//!   a pack marked since holds a blob this ship used and no other copy is
//!   left, the ship must not be put (it is shipped again instead).

use super::{RepoError, Repository, Result};
use crate::format::{from_cbor, to_cbor, ForgetRecord, GarbageRecord};
use crate::history::chain_name;
use crate::store::{ObjectMeta, PutOutcome};
use btrship_crypto::{ContentId, ObjectKind, RepoKey};
use bytes::Bytes;
use std::collections::HashSet;

/// What this process knows of the garbage records.
#[derive(Default)]
pub(crate) struct GarbageView {
    /// The newest record read (0: none, or none read yet).
    number: u64,
    read: bool,
    /// Indexes any prune deleted: never fetched.
    deleted_indexes: HashSet<String>,
}

/// The blobs and packs the current ship used, for the writers' rule:
/// cleared once its history object is in the store.
#[derive(Default)]
pub(crate) struct ShipUse {
    /// Blobs found already stored (deduplicated against, not uploaded).
    pub(crate) deduplicated: HashSet<ContentId>,
    /// Packs this ship uploaded.
    pub(crate) packs: HashSet<String>,
}

/// Digits of the numbers in forget and garbage record names (sorted by
/// name = sorted by number).
const NUMBER_DIGITS: usize = 20;

/// The prefix of share+host's forget records.
pub fn forget_prefix(key: &RepoKey, share: &str, host: &str) -> String {
    let chain = chain_name(key, share, host);
    let id = chain.strip_prefix("chains/").unwrap_or(&chain);
    format!("forgets/{id}/")
}

/// The name of forget record `number` of share+host.
pub fn forget_name(key: &RepoKey, share: &str, host: &str, number: u64) -> String {
    format!(
        "{}{number:0NUMBER_DIGITS$}",
        forget_prefix(key, share, host)
    )
}

/// The name of garbage record `number`.
pub fn garbage_name(number: u64) -> String {
    format!("gc/{number:0NUMBER_DIGITS$}")
}

/// The number in a record's name (its last path part), if it is one.
fn number_of(name: &str) -> Option<u64> {
    let last = name.rsplit('/').next()?;
    (last.len() == NUMBER_DIGITS && last.bytes().all(|b| b.is_ascii_digit()))
        .then(|| last.parse().ok())
        .flatten()
}

/// Records that did not open, with why (a hostile store's plants or
/// damage): skipped, an older record serves.
pub type Skipped = Vec<(String, String)>;

impl Repository {
    /// The newest forget record of share+host that opens, and the ones
    /// newer than it that did not. One LIST, and a GET unless cached.
    pub fn newest_forget(
        &self,
        share: &str,
        host: &str,
    ) -> Result<(Option<ForgetRecord>, Skipped)> {
        let prefix = forget_prefix(&self.key, share, host);
        self.newest_record(&prefix, None, ObjectKind::Forget, |r: &ForgetRecord, n| {
            r.share == share && r.host == host && r.number == n
        })
    }

    /// Puts forget record `rec.number` of its chain (AlreadyExists:
    /// another prune wrote that number first).
    pub fn put_forget(&self, rec: &ForgetRecord) -> Result<PutOutcome> {
        let name = forget_name(&self.key, &rec.share, &rec.host, rec.number);
        self.put_sealed(ObjectKind::Forget, &name, &to_cbor(rec))
    }

    /// The newest garbage record that opens, and the newer ones that did
    /// not. One LIST, and a GET unless cached.
    pub fn newest_garbage(&self) -> Result<(Option<GarbageRecord>, Skipped)> {
        self.newest_record("gc/", None, ObjectKind::Garbage, |r: &GarbageRecord, n| {
            r.number == n
        })
    }

    /// Puts garbage record `rec.number`.
    pub fn put_garbage(&self, rec: &GarbageRecord) -> Result<PutOutcome> {
        self.put_sealed(
            ObjectKind::Garbage,
            &garbage_name(rec.number),
            &to_cbor(rec),
        )
    }

    fn put_sealed(&self, kind: ObjectKind, name: &str, body: &[u8]) -> Result<PutOutcome> {
        // Garbage records are read by every writer, ship-only ones too:
        // the master signs them (FORMAT.md §12).
        let sealed = if kind == ObjectKind::Garbage {
            self.key
                .seal_signed(kind, name.as_bytes(), body)
                .map_err(|e| RepoError::crypto(name, e))?
        } else {
            self.key.seal(kind, name.as_bytes(), body)
        };
        let hash = crate::history::sealed_hash(&sealed);
        let outcome = self.block_on(self.store.put_if_absent(name, Bytes::from(sealed)))?;
        if outcome == PutOutcome::Created {
            if let Some(c) = self.cache() {
                c.put(name, body, &hash);
            }
        }
        Ok(outcome)
    }

    /// The newest record under `prefix` (numbered records; `listed`: its
    /// listing when the caller has it) that opens as `kind` and that
    /// `fits` its name's number. A listed record gone by the time it is
    /// read was replaced by a newer one (prune keeps the newest two): the
    /// prefix is listed again, so a reader never falls back to an older
    /// record, nor to none, because of that race.
    fn newest_record<T: for<'de> serde::Deserialize<'de>>(
        &self,
        prefix: &str,
        listed: Option<Vec<ObjectMeta>>,
        kind: ObjectKind,
        fits: impl Fn(&T, u64) -> bool,
    ) -> Result<(Option<T>, Skipped)> {
        let mut listed = match listed {
            Some(l) => l,
            None => self.list(prefix)?,
        };
        for _ in 0..4 {
            match self.newest_listed(listed, kind, &fits)? {
                Some(found) => return Ok(found),
                None => listed = self.list(prefix)?,
            }
        }
        Err(RepoError::Format {
            object: prefix.to_string(),
            reason: "records vanished four times while being read (prunes running back to back?); try again".into(),
        })
    }

    /// [`Repository::newest_record`] over one listing; None when a listed
    /// record is gone.
    #[allow(clippy::type_complexity)]
    fn newest_listed<T: for<'de> serde::Deserialize<'de>>(
        &self,
        listed: Vec<ObjectMeta>,
        kind: ObjectKind,
        fits: &impl Fn(&T, u64) -> bool,
    ) -> Result<Option<(Option<T>, Skipped)>> {
        let mut numbered: Vec<(u64, String)> = listed
            .into_iter()
            .filter_map(|m| number_of(&m.key).map(|n| (n, m.key)))
            .collect();
        numbered.sort();
        let mut skipped = Vec::new();
        for (n, name) in numbered.into_iter().rev() {
            let body = match self.cached(&name) {
                Some((body, _)) => Ok(body),
                None => self
                    .block_on(self.store.get(&name))
                    .map_err(RepoError::from)
                    .and_then(|sealed| {
                        let body = self
                            .key
                            .open(kind, name.as_bytes(), &sealed)
                            .map_err(|e| RepoError::crypto(&name, e))?;
                        if let Some(c) = self.cache() {
                            c.put(&name, &body, &crate::history::sealed_hash(&sealed));
                        }
                        Ok(body)
                    }),
            };
            let opened = body.and_then(|b| {
                from_cbor::<T>(&b).map_err(|reason| RepoError::Format {
                    object: name.clone(),
                    reason,
                })
            });
            match opened {
                Ok(r) if fits(&r, n) => return Ok(Some((Some(r), skipped))),
                Ok(_) => skipped.push((name, "a record under another record's name".into())),
                Err(RepoError::Crypto { object, source }) if source.is_ship_only() => {
                    return Err(RepoError::Crypto {
                        object,
                        source: btrship_crypto::CryptoError::ShipOnly {
                            what: "read a record an older btrship's prune wrote; run `btrship prune` once with the master key (it signs the records ship-only keys read)",
                        },
                    })
                }
                Err(e) if e.is_wrong_key() => return Err(e),
                Err(RepoError::Store(s)) if s.is_not_found() => return Ok(None),
                Err(RepoError::Store(s)) => return Err(RepoError::Store(s)),
                Err(e) => skipped.push((name, e.to_string())),
            }
        }
        Ok(Some((None, skipped)))
    }

    /// Reads the newest garbage record when it is newer than the one this
    /// process knows, and treats its marked and deleted packs as missing.
    /// Returns the packs that became missing by it (empty when nothing
    /// changed). One LIST; a GET only for a new record.
    pub fn refresh_garbage(&self) -> Result<HashSet<String>> {
        let listed = self.list("gc/")?;
        let newest_listed = listed
            .iter()
            .filter_map(|m| number_of(&m.key))
            .max()
            .unwrap_or(0);
        {
            let view = self.garbage.lock().unwrap_or_else(|p| p.into_inner());
            if view.read && view.number >= newest_listed {
                return Ok(HashSet::new());
            }
        }
        let (rec, skipped) = self.newest_record(
            "gc/",
            Some(listed),
            ObjectKind::Garbage,
            |r: &GarbageRecord, n| r.number == n,
        )?;
        for (name, why) in skipped {
            tracing::warn!("skipping garbage record {name}: {why}");
        }
        let Some(rec) = rec else {
            self.garbage.lock().unwrap_or_else(|p| p.into_inner()).read = true;
            return Ok(HashSet::new());
        };
        // The copies prune made of blobs it moved out of mostly unused
        // packs: known before those packs count as gone. A ship-only key
        // cannot open them: its blobs in those packs count as gone, and
        // the writers' rule has it upload them again (FORMAT.md §12).
        if self.key.is_master() {
            self.load_named_indexes(&rec.indexes)?;
        }
        let gone: HashSet<String> = {
            let mut known = self
                .garbage_packs
                .write()
                .unwrap_or_else(|p| p.into_inner());
            let gone: HashSet<String> = rec
                .marked
                .iter()
                .map(|m| m.pack.clone())
                .chain(rec.deleted_packs.iter().cloned())
                .filter(|p| !known.contains(p))
                .collect();
            // A pack prune recovered (marked before, not now, not deleted)
            // is usable again.
            let now: HashSet<&String> = rec
                .marked
                .iter()
                .map(|m| &m.pack)
                .chain(rec.deleted_packs.iter())
                .collect();
            known.retain(|p| now.contains(p));
            known.extend(gone.iter().cloned());
            gone
        };
        let mut view = self.garbage.lock().unwrap_or_else(|p| p.into_inner());
        view.read = true;
        view.number = view.number.max(rec.number);
        view.deleted_indexes.extend(rec.deleted_indexes);
        Ok(gone)
    }

    /// Reads the garbage records once per process (readers call this
    /// before they load indexes).
    pub fn ensure_garbage_read(&self) -> Result<()> {
        if self.garbage.lock().unwrap_or_else(|p| p.into_inner()).read {
            return Ok(());
        }
        self.refresh_garbage().map(|_| ())
    }

    /// The packs the newest garbage record read marks or deletes.
    pub fn garbage_packs(&self) -> HashSet<String> {
        self.garbage_packs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Did a prune delete this index (so it is not fetched)?
    pub fn index_deleted(&self, name: &str) -> bool {
        self.garbage
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .deleted_indexes
            .contains(name)
    }

    /// The writers' rule (FORMAT.md §5c): reads the newest garbage record;
    /// if a pack marked or deleted since the last reading holds a blob
    /// this ship used (uploaded or deduplicated, or named in `also`, e.g.
    /// a version batch's content) and no other copy is left, says which.
    /// The caller then puts nothing and ships again (the blobs now count
    /// as absent, so they are uploaded anew).
    pub fn garbage_conflict(&self, also: &[ContentId]) -> Result<Option<String>> {
        let gone = self.refresh_garbage()?;
        if gone.is_empty() {
            return Ok(None);
        }
        let used = self.ship_use.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = used.packs.iter().find(|p| gone.contains(*p)) {
            return Ok(Some(format!(
                "prune marked pack {p}, which this ship uploaded"
            )));
        }
        let lost = used
            .deduplicated
            .iter()
            .chain(also)
            .find(|id| !self.has_blob(id));
        Ok(lost.map(|id| {
            format!("prune marked the only stored copy of blob {id}, which this ship used")
        }))
    }

    /// The ship whose use [`Repository::garbage_conflict`] checks is in
    /// the store (or abandoned): start afresh.
    pub fn ship_done(&self) {
        let mut used = self.ship_use.lock().unwrap_or_else(|p| p.into_inner());
        used.deduplicated.clear();
        used.packs.clear();
    }
}

impl Repository {
    /// The store's clock now: puts an empty marker under `locks/` and
    /// reads its modification time back (FORMAT.md §5c, step 1). Returns
    /// the marker's name (delete it when done) and the time, None when
    /// the store does not report one.
    pub fn store_time(&self) -> Result<(String, Option<std::time::SystemTime>)> {
        let name = format!("locks/prune-{}", RepoKey::random_id().to_hex());
        self.block_on(self.store.put_if_absent(&name, Bytes::new()))?;
        let meta = self.block_on(self.store.head(&name))?;
        Ok((name, meta.modified))
    }

    /// Deletes objects, up to 16 at a time (prune only). Deleting one
    /// that is already gone succeeds.
    /// Extends the Object Lock retention of every object in `names` to
    /// `until` (16 in flight); the names whose extension failed, with why.
    pub fn extend_retention_many(
        &self,
        names: &[String],
        until: std::time::SystemTime,
    ) -> Vec<(String, String)> {
        let store = self.store.clone();
        let names = names.to_vec();
        self.block_on(async move {
            let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(16));
            let mut set = tokio::task::JoinSet::new();
            for name in names {
                let (store, slots) = (store.clone(), slots.clone());
                set.spawn(async move {
                    let _permit = slots.acquire_owned().await;
                    let r = store.extend_retention(&name, until).await;
                    (name, r)
                });
            }
            let mut failed = Vec::new();
            while let Some(r) = set.join_next().await {
                match r {
                    Ok((name, Err(e))) => failed.push((name, e.to_string())),
                    Err(e) => failed.push((String::new(), e.to_string())),
                    Ok((_, Ok(()))) => {}
                }
            }
            failed
        })
    }

    pub fn delete_objects(&self, names: &[String]) -> Result<()> {
        let store = self.store.clone();
        let names = names.to_vec();
        self.block_on(async move {
            let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(16));
            let mut set = tokio::task::JoinSet::new();
            for name in names {
                let (store, slots) = (store.clone(), slots.clone());
                set.spawn(async move {
                    let _permit = slots.acquire_owned().await;
                    store.delete(&name).await
                });
            }
            let mut first_error = None;
            while let Some(r) = set.join_next().await {
                match r {
                    Ok(Err(e)) => {
                        first_error.get_or_insert(RepoError::from(e));
                    }
                    Err(e) => {
                        first_error.get_or_insert(RepoError::Task(e.to_string()));
                    }
                    Ok(Ok(())) => {}
                }
            }
            first_error.map_or(Ok(()), Err)
        })
    }
}
