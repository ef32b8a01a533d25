//! A repository on a store: config, index, blob reads and writes, records.
//!
//! Sync/async boundary, decided once: stores are async (network I/O);
//! `Repository` is a synchronous facade that holds a tokio runtime handle and
//! is meant to be called from ordinary threads (the CLI's main thread, or
//! `spawn_blocking` in the daemon) — never from inside an async task, where
//! `Handle::block_on` would panic. Pack uploads run concurrently on the
//! runtime behind a small semaphore, so chunking and uploading overlap.

mod gc;
pub use gc::{forget_name, forget_prefix, garbage_name, Skipped};

use crate::format::{
    from_cbor, to_cbor, BlobId, BlobKind, ChainRegistration, ChunkerParams, Config, Index,
    IndexPack, KeyCheck, PackedBlob, SnapshotRecord, Summary, Tree,
};
use crate::history::{self, HistoryBody, HistoryKind, HistoryObject};
use crate::memindex::{BlobLocationRef, IdSet, MemIndex};
use crate::pack::{self, PackBuilder, PackError};
use crate::stages::{Stage, Stages};
use crate::store::{ObjectMeta, PutOutcome, Store, StoreError};
use btrship_crypto::{ContentId, CryptoError, ObjectKind, RepoKey};
use bytes::Bytes;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use tokio::runtime::Handle;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

/// Default pack size target (FORMAT.md §6).
pub const DEFAULT_PACK_TARGET: u64 = 16 * 1024 * 1024;
/// Pack sizes a new repository may choose (`btrship init --pack-size`).
pub const PACK_TARGET_RANGE: std::ops::RangeInclusive<u64> = (4 << 20)..=(256 << 20);
/// Pack uploads in flight per writer.
const UPLOADS_IN_FLIGHT: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("no btrship repository at {location} (it has no config object); check --repo, or run btrship init")]
    NoRepository { location: String },
    #[error("{object}: {source}")]
    Crypto {
        object: String,
        #[source]
        source: CryptoError,
    },
    #[error("{object}: {reason}")]
    Format { object: String, reason: String },
    #[error("{object}: {source}")]
    Pack {
        object: String,
        #[source]
        source: PackError,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("blob {id} is referenced but listed in no index: the repository is missing data")]
    MissingBlob { id: ContentId },
    #[error("blob {id} in {object}: its content does not match its id")]
    BlobMismatch { id: ContentId, object: String },
    #[error("repository format version {version} is not supported by this btrship ({supported}); upgrade btrship")]
    UnsupportedVersion { version: u32, supported: u32 },
    #[error("upload task failed: {0}")]
    Task(String),
}

impl RepoError {
    /// The key in use cannot open this object: another repository's key,
    /// or a ship-only key (which opens nothing but signed records). Never
    /// skipped like a damaged object: it says nothing about the object.
    pub fn is_wrong_key(&self) -> bool {
        matches!(self, RepoError::Crypto { source, .. } if source.is_wrong_key() || source.is_ship_only())
    }
    fn crypto(object: &str, source: CryptoError) -> Self {
        RepoError::Crypto {
            object: object.to_string(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, RepoError>;

/// The history objects that opened, and those that did not with why.
pub type HistoryObjects = (Vec<HistoryObject>, Vec<(String, RepoError)>);
/// Chain registrations that open, and those that do not (name, why).
pub type ChainRegistrations = (Vec<ChainRegistration>, Vec<(String, String)>);

/// Where a blob lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobLocation {
    pub pack: String,
    pub kind: BlobKind,
    pub offset: u64,
    pub length: u64,
    pub raw_length: u64,
}

/// Counters of one writer, units in the names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteStats {
    pub new_blobs: u64,
    pub new_raw_bytes: u64,
    pub uploaded_bytes: u64,
    pub packs_written: u64,
    pub objects_written: u64,
}

pub struct Repository {
    store: Arc<dyn Store>,
    key: Arc<RepoKey>,
    rt: Handle,
    config: Config,
    index: RwLock<MemIndex>,
    loaded_indexes: Mutex<HashSet<String>>,
    verified_packs: Mutex<HashSet<String>>,
    /// Trees built in memory (restore between snapshots), never uploaded.
    staged_trees: Mutex<HashMap<ContentId, Tree>>,
    /// Index objects that could not be read or opened, with why: their
    /// blobs are unknown, so only the paths that need them fail.
    damaged_indexes: Mutex<Vec<(String, String)>>,
    /// Packs known to be missing from the store (`check`, `repair`): their
    /// blobs count as absent, so writers upload them again.
    missing_packs: RwLock<HashSet<String>>,
    /// The local catalogue's object cache, when there is one.
    cache: RwLock<Option<Arc<dyn ObjectCache>>>,
    /// Index objects this process uploaded that no history object names
    /// yet (FORMAT.md §5b: the next one appended names them).
    written_indexes: Mutex<Vec<String>>,
    /// Those of their bodies too large for the object cache, until named
    /// (then they go to the catalogue's blob index).
    written_bodies: Mutex<HashMap<String, Index>>,
    /// Every `index/` object has been listed and read.
    fully_indexed: Mutex<bool>,
    /// Packs known only from indexes that no history object names (read
    /// when a blob was not found otherwise): readable, but writers do not
    /// deduplicate against them (FORMAT.md §5b, dedup scope).
    unnamed_packs: RwLock<HashSet<String>>,
    cache_off: AtomicBool,
    /// State other crates keep per repository (one value per type).
    extensions: Mutex<Vec<Arc<dyn std::any::Any + Send + Sync>>>,
    /// The in-memory index holds named blobs the catalogue lacks (a merge
    /// into it failed): it is never emptied.
    memory_only: AtomicBool,
    recording: AtomicBool,
    cache_hits: Mutex<Vec<String>>,
    /// The garbage records read so far (FORMAT.md §5c).
    garbage: Mutex<gc::GarbageView>,
    /// Packs a prune marked or deleted: like missing ones, never
    /// deduplicated against and read last, but not lost (no healing).
    garbage_packs: RwLock<HashSet<String>>,
    /// What the current ship used, for the writers' rule (§5c).
    ship_use: Mutex<gc::ShipUse>,
}

/// The local catalogue's cache of opened objects (FORMAT.md §5b): write-
/// once objects (history objects, summaries, chain registrations, indexes)
/// never change under one name, so an object authenticated once is kept
/// by name with the BLAKE3 hash of its sealed bytes. A cache, never the
/// truth: losing it costs requests, not correctness.
pub trait ObjectCache: Send + Sync {
    /// The opened body and sealed hash of `name`, if cached.
    fn get(&self, name: &str) -> Option<(Vec<u8>, [u8; 32])>;
    /// Remembers an authenticated object.
    fn put(&self, name: &str, body: &[u8], hash: &[u8; 32]);
    /// Forgets cached objects (a cache may keep less than it was given).
    fn remove(&self, _names: &[String]) {}
    /// Has the blob list of this named index been merged into the
    /// catalogue's blob index ([`ObjectCache::merge_indexes`])?
    fn index_merged(&self, _name: &str) -> bool {
        false
    }
    /// Merges the blob lists of named indexes (FORMAT.md §5b) into a
    /// persistent blob index, all or nothing; false when it could not (the
    /// repository then keeps them in memory).
    fn merge_indexes(&self, _indexes: &[(&str, &Index)]) -> bool {
        false
    }
    /// Every location the persistent blob index lists for `id`.
    fn blob_locations(&self, _id: &ContentId) -> Vec<BlobLocation> {
        Vec::new()
    }
    /// A tree blob's plaintext this machine wrote with a ship-only key
    /// (FORMAT.md §12: it cannot read its parent trees from the store).
    fn own_tree(&self, _id: &ContentId) -> Option<Vec<u8>> {
        None
    }
    /// Keeps a tree blob's plaintext written with a ship-only key.
    fn put_own_tree(&self, _id: &ContentId, _plaintext: &[u8]) {}
    /// The cache as `Any`, for its owner to get its own type back.
    fn as_any(self: Arc<Self>) -> Arc<dyn std::any::Any + Send + Sync>;
}

impl std::fmt::Debug for Repository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repository")
            .field("store", &self.store.location())
            .finish_non_exhaustive()
    }
}

const CONFIG: &str = "config";

/// Index bodies up to this size are kept in the object cache (to embed in
/// summaries); larger ones (a first ship of a million files) only in the
/// catalogue's blob index.
const CACHED_INDEX_MAX: usize = 4 << 20;

/// At most this many blobs per index object a writer uploads (a pack is
/// never split across indexes). About 3 MB of
/// CBOR: a ship of a million files writes a few dozen index objects, each
/// sealed in bounded memory and small enough for the local cache, instead
/// of one object whose sealing held the whole list several times over.
pub const INDEX_BLOBS_MAX: usize = 50_000;

/// At most this many blobs in one pack: a pack of tiny blobs closes before
/// its size target, so its header and its index entry stay bounded too.
pub const PACK_BLOBS_MAX: usize = 10_000;

/// `packs` in index objects of at most [`INDEX_BLOBS_MAX`] blobs each.
fn index_parts(packs: Vec<IndexPack>) -> Vec<Index> {
    let mut parts = Vec::new();
    let mut part = Index::default();
    let mut blobs = 0;
    for pack in packs {
        if !part.packs.is_empty() && blobs + pack.blobs.len() > INDEX_BLOBS_MAX {
            parts.push(std::mem::take(&mut part));
            blobs = 0;
        }
        blobs += pack.blobs.len();
        part.packs.push(pack);
    }
    if !part.packs.is_empty() {
        parts.push(part);
    }
    parts
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

fn random_name(prefix: &str) -> String {
    format!("{prefix}/{}", RepoKey::random_id().to_hex())
}

impl Repository {
    /// Opens the repository at `store`, or creates it when the store holds no
    /// config yet. Opening an existing one checks the key. Returns whether
    /// it was created.
    pub fn open_or_create(
        store: Arc<dyn Store>,
        key: Arc<RepoKey>,
        rt: Handle,
        host: &str,
    ) -> Result<(Self, bool)> {
        Self::open_or_create_with(store, key, rt, host, DEFAULT_PACK_TARGET, None)
    }

    /// [`Repository::open_or_create`] with the pack size a new repository
    /// gets (an existing one keeps its own).
    pub fn open_or_create_with(
        store: Arc<dyn Store>,
        key: Arc<RepoKey>,
        rt: Handle,
        host: &str,
        pack_target: u64,
        object_lock: Option<crate::format::ObjectLockConfig>,
    ) -> Result<(Self, bool)> {
        match Self::open(store.clone(), key.clone(), rt.clone()) {
            Ok(repo) => return Ok((repo, false)),
            Err(RepoError::NoRepository { .. }) => {}
            Err(e) => return Err(e),
        }
        let config = Config {
            version: 1,
            repo_id: RepoKey::random_id().as_bytes()[..16].to_vec(),
            created: now_rfc3339(),
            chunker: ChunkerParams::default(),
            pack_target,
            object_lock,
        };
        // Everything from the key check on is written locked.
        store.set_object_lock(config.object_lock.as_ref().and_then(|l| l.lock()));
        let check = KeyCheck {
            key_id: key.key_id().0.to_vec(),
            created: now_rfc3339(),
            host: host.to_string(),
        };
        let check_name = format!("keys/{}", key.key_id());
        let sealed = key.seal(
            ObjectKind::KeyCheck,
            check_name.as_bytes(),
            &to_cbor(&check),
        );
        rt.block_on(store.put_if_absent(&check_name, Bytes::from(sealed)))?;
        let sealed = key.seal(ObjectKind::Config, CONFIG.as_bytes(), &to_cbor(&config));
        let created = rt.block_on(store.put_if_absent(CONFIG, Bytes::from(sealed)))?;
        // Someone else may have created it between our open and put: use theirs.
        let repo = Self::open(store, key, rt)?;
        Ok((repo, created == PutOutcome::Created))
    }

    /// Opens an existing repository and loads its index; any index that
    /// does not authenticate is an error.
    pub fn open(store: Arc<dyn Store>, key: Arc<RepoKey>, rt: Handle) -> Result<Self> {
        let repo = Self::open_config(store, key, rt)?;
        // Key checks are few and small: authenticate them all on open, so a
        // tampered one is noticed by every command, not only by `check`.
        for meta in repo.list("keys/")? {
            repo.read_key_check(&meta.key)?;
        }
        repo.load_index()?;
        Ok(repo)
    }

    /// Opens an existing repository without reading its indexes: the
    /// caller loads the indexes its histories name ([`Repository::merge_named_index`],
    /// FORMAT.md §5b). A blob not found in them makes the repository list
    /// and read every index once before it gives up.
    pub fn open_lazy(store: Arc<dyn Store>, key: Arc<RepoKey>, rt: Handle) -> Result<Self> {
        let repo = Self::open_config(store, key, rt)?;
        if !repo.key.is_master() {
            // A ship-only key opens no key check (FORMAT.md §12).
            return Ok(repo);
        }
        for meta in repo.list("keys/")? {
            repo.read_key_check(&meta.key)?;
        }
        Ok(repo)
    }

    /// Gives the repository the local catalogue's object cache.
    pub fn set_cache(&self, cache: Arc<dyn ObjectCache>) {
        *self.cache.write().unwrap_or_else(|p| p.into_inner()) = Some(cache);
    }

    /// The object cache, unless absent or distrusted
    /// ([`Repository::distrust_cache`]).
    pub fn object_cache(&self) -> Option<Arc<dyn ObjectCache>> {
        self.cache()
    }

    /// The value of type `T` this repository keeps for another crate,
    /// made by `make` the first time it is asked for.
    pub fn extension<T: std::any::Any + Send + Sync, E>(
        &self,
        make: impl FnOnce() -> std::result::Result<T, E>,
    ) -> std::result::Result<Arc<T>, E> {
        let mut all = self.extensions.lock().unwrap_or_else(|p| p.into_inner());
        for e in all.iter() {
            if let Ok(t) = e.clone().downcast::<T>() {
                return Ok(t);
            }
        }
        let t = Arc::new(make()?);
        all.push(t.clone());
        Ok(t)
    }

    fn cache(&self) -> Option<Arc<dyn ObjectCache>> {
        if self.cache_off.load(Ordering::Relaxed) {
            return None;
        }
        self.cache.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// An object from the cache, remembered as a hit while a reader
    /// records them ([`Repository::record_cache_hits`]).
    fn cached(&self, name: &str) -> Option<(Vec<u8>, [u8; 32])> {
        let got = self.cache()?.get(name)?;
        if self.recording.load(Ordering::Relaxed) {
            self.cache_hits
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(name.to_string());
        }
        Some(got)
    }

    /// Starts (`true`) or stops recording which objects came from the
    /// cache; returns those recorded since the last call.
    pub fn record_cache_hits(&self, on: bool) -> Vec<String> {
        self.recording.store(on, Ordering::Relaxed);
        std::mem::take(&mut *self.cache_hits.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The store lacks an object the cache holds (lost, withheld or rolled
    /// back): from now on this process reads only from the store, so it
    /// sees the store as it is.
    pub fn distrust_cache(&self) {
        if !self.cache_off.swap(true, Ordering::Relaxed) {
            tracing::info!("the store lacks objects this machine's catalogue holds: reading from the store only");
        }
    }

    /// Opens a repository for `check`: indexes that fail to load are
    /// skipped (check reports them one by one) instead of failing the open.
    pub fn open_for_check(store: Arc<dyn Store>, key: Arc<RepoKey>, rt: Handle) -> Result<Self> {
        let repo = Self::open_config(store, key, rt)?;
        for meta in repo.list("index/")? {
            if let Ok(index) = repo.get_cbor::<Index>(ObjectKind::Index, &meta.key) {
                repo.merge_index(&index);
                repo.lock_loaded().insert(meta.key);
            }
        }
        Ok(repo)
    }

    fn open_config(store: Arc<dyn Store>, key: Arc<RepoKey>, rt: Handle) -> Result<Self> {
        let sealed = match rt.block_on(store.get(CONFIG)) {
            Ok(b) => b,
            Err(e) if e.is_not_found() => {
                return Err(RepoError::NoRepository {
                    location: store.location(),
                })
            }
            Err(e) => return Err(e.into()),
        };
        let body = match key.ship_params() {
            // A ship-only key cannot open `config`: its key file carries
            // the body (FORMAT.md §12). The store's config must still be
            // of this key's repository (its header names the key).
            Some(params) => {
                let found = sealed.get(6..14).unwrap_or_default();
                if found != key.key_id().0 {
                    let found = btrship_crypto::KeyId(found.try_into().unwrap_or_default());
                    return Err(RepoError::crypto(
                        CONFIG,
                        CryptoError::WrongKey {
                            found,
                            expected: key.key_id(),
                        },
                    ));
                }
                params.to_vec()
            }
            None => key
                .open(ObjectKind::Config, CONFIG.as_bytes(), &sealed)
                .map_err(|e| RepoError::crypto(CONFIG, e))?,
        };
        let config: Config = from_cbor(&body).map_err(|reason| RepoError::Format {
            object: CONFIG.into(),
            reason,
        })?;
        if config.version != 1 {
            return Err(RepoError::UnsupportedVersion {
                version: config.version,
                supported: 1,
            });
        }
        if let Some(l) = &config.object_lock {
            let Some(lock) = l.lock() else {
                return Err(RepoError::Format {
                    object: CONFIG.into(),
                    reason: format!(
                        "Object Lock mode {:?} is unknown to this btrship; upgrade btrship",
                        l.mode
                    ),
                });
            };
            store.set_object_lock(Some(lock));
        }
        let repo = Repository {
            store,
            key,
            rt,
            config,
            index: RwLock::default(),
            loaded_indexes: Mutex::default(),
            verified_packs: Mutex::default(),
            staged_trees: Mutex::default(),
            damaged_indexes: Mutex::default(),
            missing_packs: RwLock::default(),
            cache: RwLock::default(),
            written_indexes: Mutex::default(),
            written_bodies: Mutex::default(),
            fully_indexed: Mutex::new(false),
            unnamed_packs: RwLock::default(),
            cache_off: AtomicBool::new(false),
            extensions: Mutex::default(),
            memory_only: AtomicBool::new(false),
            recording: AtomicBool::new(false),
            cache_hits: Mutex::default(),
            garbage: Mutex::default(),
            garbage_packs: RwLock::default(),
            ship_use: Mutex::default(),
        };
        Ok(repo)
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn key(&self) -> &RepoKey {
        &self.key
    }

    pub fn location(&self) -> String {
        self.store.location()
    }

    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// Reads and opens one sealed object.
    pub fn get_object(&self, kind: ObjectKind, name: &str) -> Result<Vec<u8>> {
        let sealed = self.block_on(self.store.get(name))?;
        self.key
            .open(kind, name.as_bytes(), &sealed)
            .map_err(|e| RepoError::crypto(name, e))
    }

    fn get_cbor<T: for<'de> serde::Deserialize<'de>>(
        &self,
        kind: ObjectKind,
        name: &str,
    ) -> Result<T> {
        let body = self.get_object(kind, name)?;
        from_cbor(&body).map_err(|reason| RepoError::Format {
            object: name.to_string(),
            reason,
        })
    }

    pub fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        Ok(self.block_on(self.store.list(prefix))?)
    }

    /// Reads every index not read yet into the in-memory index. An index
    /// that cannot be read or does not authenticate is skipped and
    /// remembered ([`Repository::damaged_indexes`]): one bad object costs
    /// the paths that need its blobs, not the whole repository. A wrong
    /// key or an unreachable store still fails.
    pub fn load_index(&self) -> Result<()> {
        self.load_all_indexes(true)
    }

    /// [`Repository::load_index`]; `dedup`: whether writers may dedup
    /// against what it adds (a repository without chain registrations:
    /// every index counts, as before FORMAT.md §5b).
    fn load_all_indexes(&self, dedup: bool) -> Result<()> {
        *self.fully_indexed.lock().unwrap_or_else(|p| p.into_inner()) = true;
        for meta in self.list("index/")? {
            if self.index_loaded(&meta.key) {
                continue;
            }
            let index: Index = match self.get_cbor(ObjectKind::Index, &meta.key) {
                Ok(i) => i,
                Err(e) if e.is_wrong_key() => return Err(e),
                Err(RepoError::Store(s)) if !s.is_not_found() => return Err(RepoError::Store(s)),
                Err(e) => {
                    tracing::debug!("skipping damaged index {}: {e}", meta.key);
                    self.damaged_indexes
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((meta.key.clone(), e.to_string()));
                    self.lock_loaded().insert(meta.key);
                    continue;
                }
            };
            if !dedup {
                let mut unnamed = self
                    .unnamed_packs
                    .write()
                    .unwrap_or_else(|p| p.into_inner());
                unnamed.extend(index.packs.iter().map(|p| p.pack.clone()));
            }
            self.merge_index(&index);
            self.lock_loaded().insert(meta.key);
        }
        self.index
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .compact();
        Ok(())
    }

    /// Reads a blob location the named indexes lack from every index
    /// (once per process): an index no history object names (written by
    /// older btrship, or by a process that crashed) may still list it.
    fn load_unnamed_indexes(&self, id: &ContentId) -> Result<bool> {
        if *self.fully_indexed.lock().unwrap_or_else(|p| p.into_inner()) {
            return Ok(false);
        }
        tracing::debug!("blob {id} is in no named index: reading every index");
        self.load_all_indexes(false)?;
        Ok(true)
    }

    /// Merges an index a history object names (FORMAT.md §5b), read by
    /// the caller or embedded in a summary.
    pub fn merge_named_index(&self, name: &str, index: &Index) {
        self.merge_named_indexes(&[(name, index)]);
    }

    /// [`Repository::merge_named_index`] for many: into the catalogue's
    /// persistent blob index when there is one (one transaction), else
    /// into memory.
    pub fn merge_named_indexes(&self, indexes: &[(&str, &Index)]) {
        let fresh: Vec<(&str, &Index)> = indexes
            .iter()
            .filter(|(n, _)| !self.index_loaded(n))
            .copied()
            .collect();
        if fresh.is_empty() {
            return;
        }
        if self.cache().is_some_and(|c| c.merge_indexes(&fresh)) {
            return;
        }
        for (name, index) in fresh {
            if self.lock_loaded().insert(name.to_string()) {
                self.merge_index(index);
            }
        }
    }

    /// Has this index been merged (in memory, or in the catalogue)?
    pub fn index_loaded(&self, name: &str) -> bool {
        self.lock_loaded().contains(name) || self.cache().is_some_and(|c| c.index_merged(name))
    }

    /// Reads and merges the named indexes not merged yet, up to 16 at a
    /// time. One that cannot be read is remembered as damaged
    /// ([`Repository::damaged_indexes`]), as in [`Repository::load_index`].
    pub fn load_named_indexes(&self, names: &[String]) -> Result<()> {
        let wanted: Vec<String> = names
            .iter()
            .filter(|n| !self.index_loaded(n) && !self.index_deleted(n))
            .cloned()
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let mut fetch = Vec::new();
        let mut from_cache = Vec::new();
        for name in wanted {
            match self
                .cached(&name)
                .map(|(body, _)| from_cbor::<Index>(&body))
            {
                Some(Ok(index)) => from_cache.push((name, index)),
                _ => fetch.push(name),
            }
        }
        // Cached copies count only while the store still holds them (see
        // `walk`): one that is gone is fetched, and found damaged.
        let present = self.exist_many(from_cache.iter().map(|(n, _)| n.clone()).collect())?;
        let mut good = Vec::new();
        for ((name, index), present) in from_cache.into_iter().zip(present) {
            if present {
                good.push((name, index));
            } else {
                self.distrust_cache();
                fetch.push(name);
            }
        }
        let merge = |good: &[(String, Index)]| {
            let refs: Vec<(&str, &Index)> = good.iter().map(|(n, i)| (n.as_str(), i)).collect();
            self.merge_named_indexes(&refs);
        };
        for (name, got) in self.get_many(fetch) {
            let opened = got
                .map_err(RepoError::from)
                .and_then(|sealed| self.open_and_cache::<Index>(ObjectKind::Index, &name, &sealed));
            match opened {
                Ok(index) => {
                    good.push((name, index));
                    if good.len() >= 256 {
                        merge(&good);
                        good.clear();
                    }
                }
                Err(e) if e.is_wrong_key() => return Err(e),
                Err(RepoError::Store(s)) if !s.is_not_found() => return Err(RepoError::Store(s)),
                Err(e) => {
                    self.damaged_indexes
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((name.clone(), e.to_string()));
                    self.lock_loaded().insert(name);
                }
            }
        }
        merge(&good);
        Ok(())
    }

    /// GETs many objects, up to 16 in flight, in the order given.
    fn get_many(
        &self,
        names: Vec<String>,
    ) -> Vec<(String, std::result::Result<Bytes, StoreError>)> {
        if names.is_empty() {
            return Vec::new();
        }
        let store = self.store.clone();
        self.block_on(async move {
            let slots = Arc::new(Semaphore::new(16));
            let mut set = tokio::task::JoinSet::new();
            for (i, name) in names.into_iter().enumerate() {
                let (store, slots) = (store.clone(), slots.clone());
                set.spawn(async move {
                    let _permit = slots.acquire_owned().await;
                    let got = store.get(&name).await;
                    (i, name, got)
                });
            }
            let mut out = Vec::new();
            while let Some(r) = set.join_next().await {
                if let Ok(r) = r {
                    out.push(r);
                }
            }
            out.sort_by_key(|r| r.0);
            out.into_iter().map(|(_, n, g)| (n, g)).collect()
        })
    }

    /// Index objects this process uploaded that no history object names
    /// yet (the next appended object names them).
    pub fn unnamed_written_indexes(&self) -> Vec<String> {
        self.written_indexes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A history object naming `names` is durable: they are named now.
    /// With a catalogue, their blob lists move into its persistent blob
    /// index; once nothing in memory is left that the catalogue lacks,
    /// the in-memory index is emptied (a long-running daemon keeps no
    /// per-blob memory, FORMAT.md §5b).
    pub fn indexes_named(&self, names: &[String]) {
        let left = {
            let mut written = self
                .written_indexes
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            written.retain(|n| !names.contains(n));
            written.len()
        };
        let Some(cache) = self.cache() else {
            // Nothing reads the bodies again.
            let mut all = self
                .written_bodies
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            all.retain(|n, _| !names.contains(n));
            return;
        };
        // One index at a time (each merge is atomic with its mark in the
        // catalogue): a million-blob ship holds one part's entries here, not
        // all of them beside the in-memory index.
        for n in names {
            let kept = self
                .written_bodies
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(n);
            let Some(index) = kept.or_else(|| self.cached_index(n)) else {
                self.memory_only.store(true, Ordering::Relaxed);
                continue;
            };
            if !cache.merge_indexes(&[(n.as_str(), &index)]) {
                self.memory_only.store(true, Ordering::Relaxed);
            }
        }
        if self.memory_only.load(Ordering::Relaxed) {
            return;
        }
        let unnamed = !self
            .unnamed_packs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty();
        if left == 0 && !unnamed {
            *self.index.write().unwrap_or_else(|p| p.into_inner()) = MemIndex::default();
            // What memory held is in the catalogue now; only damaged
            // indexes stay "loaded" by name (should the catalogue be
            // distrusted, the rest is read again).
            let damaged: HashSet<String> =
                self.damaged_indexes().into_iter().map(|(n, _)| n).collect();
            self.lock_loaded().retain(|n| damaged.contains(n));
        }
    }

    /// Index objects skipped by [`Repository::load_index`], with why.
    pub fn damaged_indexes(&self) -> Vec<(String, String)> {
        self.damaged_indexes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn lock_loaded(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.loaded_indexes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn merge_index(&self, index: &Index) {
        let mut map = self.index.write().unwrap_or_else(|p| p.into_inner());
        for p in &index.packs {
            for b in &p.blobs {
                let Some(kind) = BlobKind::from_u8(b.kind) else {
                    continue;
                };
                map.insert(
                    b.id.0,
                    &BlobLocationRef {
                        pack: &p.pack,
                        kind,
                        offset: b.offset,
                        length: b.length,
                        raw_length: b.raw_length,
                    },
                );
            }
        }
    }

    /// Is `id` listed in a pack not known to be missing (and named by a
    /// history object, FORMAT.md §5b)? What writers deduplicate against.
    pub fn has_blob(&self, id: &ContentId) -> bool {
        let map = self.index.read().unwrap_or_else(|p| p.into_inner());
        let missing = self.missing_packs.read().unwrap_or_else(|p| p.into_inner());
        let unnamed = self.unnamed_packs.read().unwrap_or_else(|p| p.into_inner());
        let garbage = self.garbage_packs.read().unwrap_or_else(|p| p.into_inner());
        let usable = |pack: &str| {
            !missing.contains(pack) && !unnamed.contains(pack) && !garbage.contains(pack)
        };
        let in_memory = if missing.is_empty() && unnamed.is_empty() && garbage.is_empty() {
            map.contains(id)
        } else {
            map.contains_where(id, usable)
        };
        in_memory
            || self
                .cache()
                .is_some_and(|c| c.blob_locations(id).iter().any(|l| usable(&l.pack)))
    }

    /// Tells the repository that these packs are missing from the store:
    /// their blobs no longer count as present ([`has_blob`]), so a writer
    /// uploads them again, and readers try other copies first.
    ///
    /// [`has_blob`]: Repository::has_blob
    pub fn mark_packs_missing<I: IntoIterator<Item = String>>(&self, packs: I) {
        self.missing_packs
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .extend(packs);
    }

    /// The packs marked missing.
    pub fn missing_packs(&self) -> HashSet<String> {
        self.missing_packs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Every listed location of a blob (a blob uploaded again after its
    /// pack was lost is listed in several packs).
    /// A blob in no index read so far makes the repository read every
    /// index once (see [`Repository::open_lazy`]).
    pub fn blob_locations(&self, id: &ContentId) -> Vec<BlobLocation> {
        let found = self.known_locations(id);
        if found.is_empty() && self.is_staged(id) {
            // A tree built in memory (a moment between snapshots): in no
            // index, and no reason to read every index for it.
            return found;
        }
        if found.is_empty() && matches!(self.load_unnamed_indexes(id), Ok(true)) {
            return self.known_locations(id);
        }
        found
    }

    /// The locations the in-memory index and the catalogue list for `id`
    /// (memory first, each pack once).
    fn known_locations(&self, id: &ContentId) -> Vec<BlobLocation> {
        let mut found = self
            .index
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get_all(id);
        if let Some(c) = self.cache() {
            for l in c.blob_locations(id) {
                if !found.iter().any(|f| f.pack == l.pack) {
                    found.push(l);
                }
            }
        }
        found
    }

    pub fn locate(&self, id: &ContentId) -> Result<BlobLocation> {
        self.blob_locations(id)
            .into_iter()
            .next()
            .ok_or(RepoError::MissingBlob { id: *id })
    }

    /// Number of distinct blobs known.
    pub fn blob_count(&self) -> usize {
        self.index.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Reads one blob: ranged GET, authenticate, check the content id.
    /// Also authenticates the header of each pack it touches, once.
    ///
    /// A blob listed in several packs is read from the first copy that
    /// works: packs known missing are tried last, and a copy that cannot be
    /// read (pack gone, damaged) falls through to the next; when none works
    /// the first copy's error is returned.
    pub fn read_blob(&self, id: &ContentId, kind: BlobKind) -> Result<Vec<u8>> {
        let mut locations = self.blob_locations(id);
        if locations.is_empty() {
            return Err(RepoError::MissingBlob { id: *id });
        }
        {
            let missing = self.missing_packs.read().unwrap_or_else(|p| p.into_inner());
            let garbage = self.garbage_packs.read().unwrap_or_else(|p| p.into_inner());
            locations.sort_by_key(|l| missing.contains(&l.pack) || garbage.contains(&l.pack));
        }
        let mut first_error = None;
        for loc in locations {
            let pack = loc.pack.clone();
            match self.read_blob_at(id, kind, loc) {
                Ok(plain) => return Ok(plain),
                Err(e) => {
                    if matches!(&e, RepoError::Store(s) if s.is_not_found()) {
                        // The store lost this pack: count its blobs absent.
                        tracing::info!("{pack}: listed in an index but missing from the store");
                        self.mark_packs_missing([pack]);
                    }
                    tracing::debug!("blob {id}: one copy failed: {e}");
                    first_error.get_or_insert(e);
                }
            }
        }
        // Every listed copy failed: an index no history object names (a
        // healed copy written by `repair`) may list another.
        if matches!(self.load_unnamed_indexes(id), Ok(true)) {
            for loc in self.blob_locations(id) {
                if let Ok(plain) = self.read_blob_at(id, kind, loc) {
                    return Ok(plain);
                }
            }
        }
        Err(first_error.unwrap_or(RepoError::MissingBlob { id: *id }))
    }

    fn read_blob_at(&self, id: &ContentId, kind: BlobKind, loc: BlobLocation) -> Result<Vec<u8>> {
        if loc.kind != kind {
            return Err(RepoError::Format {
                object: loc.pack,
                reason: format!("blob {id} is a {:?} blob, expected {kind:?}", loc.kind),
            });
        }
        self.verify_pack_header(&loc.pack)?;
        let sealed = self.block_on(self.store.get_range(&loc.pack, loc.offset, loc.length))?;
        self.open_blob(id, kind, &loc.pack, &sealed)
    }

    /// Reads `len` bytes at `offset` of `pack` in one ranged GET, for
    /// cutting several blobs out of it with [`open_blob_in`] (restore reads
    /// neighbouring blobs of a pack together). Authenticates the pack's
    /// header first (once per pack), as [`read_blob`] does. The bytes are
    /// the store's, not trusted: every blob cut from them is authenticated
    /// and its content id checked.
    ///
    /// [`open_blob_in`]: Repository::open_blob_in
    /// [`read_blob`]: Repository::read_blob
    pub fn read_pack_range(&self, pack: &str, offset: u64, len: u64) -> Result<Bytes> {
        self.verify_pack_header(pack)?;
        Ok(self.block_on(self.store.get_range(pack, offset, len))?)
    }

    /// Opens blob `id`, listed at `loc`, from `range`: the bytes of
    /// `loc.pack` from `range_offset` on (from [`read_pack_range`]). The
    /// same checks as [`read_blob`]: the kind the index lists, the
    /// envelope's authentication, the content id. A blob the range does
    /// not hold whole is a format error.
    ///
    /// [`read_pack_range`]: Repository::read_pack_range
    /// [`read_blob`]: Repository::read_blob
    pub fn open_blob_in(
        &self,
        id: &ContentId,
        kind: BlobKind,
        loc: &BlobLocation,
        range_offset: u64,
        range: &[u8],
    ) -> Result<Vec<u8>> {
        if loc.kind != kind {
            return Err(RepoError::Format {
                object: loc.pack.clone(),
                reason: format!("blob {id} is a {:?} blob, expected {kind:?}", loc.kind),
            });
        }
        let start = loc.offset.checked_sub(range_offset);
        let end = start.and_then(|s| s.checked_add(loc.length));
        let sealed = match (start, end) {
            (Some(s), Some(e)) if e <= range.len() as u64 => &range[s as usize..e as usize],
            _ => {
                return Err(RepoError::Format {
                    object: loc.pack.clone(),
                    reason: format!(
                        "blob {id} at {}+{} lies outside the range read ({range_offset}+{})",
                        loc.offset,
                        loc.length,
                        range.len()
                    ),
                })
            }
        };
        self.open_blob(id, kind, &loc.pack, sealed)
    }

    fn open_blob(
        &self,
        id: &ContentId,
        kind: BlobKind,
        pack: &str,
        sealed: &[u8],
    ) -> Result<Vec<u8>> {
        let plain = self
            .key
            .open(kind.object_kind(), id.as_bytes(), sealed)
            .map_err(|e| RepoError::crypto(&format!("{pack} (blob {id})"), e))?;
        if self.key.content_id(&plain) != *id {
            return Err(RepoError::BlobMismatch {
                id: *id,
                object: pack.to_string(),
            });
        }
        Ok(plain)
    }

    /// Authenticates a pack's header with two ranged reads (cached per pack).
    pub fn verify_pack_header(&self, pack: &str) -> Result<()> {
        if self
            .verified_packs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(pack)
        {
            return Ok(());
        }
        let perr = |source| RepoError::Pack {
            object: pack.to_string(),
            source,
        };
        let size = self.block_on(self.store.head(pack))?.size;
        if size < 4 {
            return Err(perr(PackError::TooShort(size)));
        }
        let tail = self.block_on(self.store.get_range(pack, size - 4, 4))?;
        let (off, len) = pack::header_range(size, &tail).map_err(perr)?;
        let sealed = self.block_on(self.store.get_range(pack, off, len))?;
        let blobs = pack::open_header(&self.key, &sealed, off).map_err(perr)?;
        self.check_header_against_index(pack, &blobs)?;
        self.verified_packs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(pack.to_string());
        Ok(())
    }

    /// Every index entry that points into `pack` must agree with its header.
    fn check_header_against_index(&self, pack: &str, blobs: &[PackedBlob]) -> Result<()> {
        // Entries in the catalogue's blob index are not compared (a query
        // per blob of every pack a restore touches): a wrong offset there
        // fails the blob's authentication when it is read instead.
        let map = self.index.read().unwrap_or_else(|p| p.into_inner());
        for b in blobs {
            if map.disagrees(&b.id.0, pack, b.offset, b.length) {
                return Err(RepoError::Format {
                    object: pack.to_string(),
                    reason: format!("pack header and index disagree on blob {:?}", b.id),
                });
            }
        }
        Ok(())
    }

    /// Reads a whole pack and verifies every byte of it: header, layout,
    /// each blob's authentication and content id (`check --read-data`).
    /// Returns the blobs it holds.
    pub fn verify_pack(&self, pack: &str) -> Result<Vec<PackedBlob>> {
        let perr = |source| RepoError::Pack {
            object: pack.to_string(),
            source,
        };
        let bytes = self.block_on(self.store.get(pack))?;
        let size = bytes.len() as u64;
        if size < 4 {
            return Err(perr(PackError::TooShort(size)));
        }
        let (off, len) = pack::header_range(size, &bytes[bytes.len() - 4..]).map_err(perr)?;
        let blobs = pack::open_header(&self.key, &bytes[off as usize..(off + len) as usize], off)
            .map_err(perr)?;
        if pack::pack_object_name(&self.key, &bytes) != pack {
            return Err(RepoError::Format {
                object: pack.to_string(),
                reason: "pack content does not match its name".into(),
            });
        }
        for b in &blobs {
            let kind = BlobKind::from_u8(b.kind).ok_or_else(|| RepoError::Format {
                object: pack.to_string(),
                reason: format!("unknown blob kind {}", b.kind),
            })?;
            let sealed = &bytes[b.offset as usize..(b.offset + b.length) as usize];
            let plain = self.open_blob(&b.id.0, kind, pack, sealed)?;
            if plain.len() as u64 != b.raw_length {
                return Err(RepoError::Format {
                    object: pack.to_string(),
                    reason: format!("blob {:?} length differs from its header entry", b.id),
                });
            }
        }
        self.check_header_against_index(pack, &blobs)?;
        Ok(blobs)
    }

    /// Index entries grouped by pack (for `check`).
    pub fn packs_in_index(&self) -> HashMap<String, Vec<(ContentId, BlobLocation)>> {
        self.index
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .by_pack()
    }

    pub fn read_tree(&self, id: &ContentId) -> Result<Tree> {
        if let Some(t) = self
            .staged_trees
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
        {
            return Ok(t.clone());
        }
        let own = match self.key.is_master() {
            true => None,
            false => self.cache().and_then(|c| c.own_tree(id)),
        };
        let body = match own {
            Some(b) if self.key.content_id(&b) == *id => b,
            _ => self.read_blob(id, BlobKind::Tree)?,
        };
        from_cbor(&body).map_err(|reason| RepoError::Format {
            object: format!("tree {id}"),
            reason,
        })
    }

    /// Keeps `tree` in memory under its content id, so [`read_tree`] finds
    /// it: trees of a moment between snapshots, built for a restore. Nothing
    /// is uploaded.
    ///
    /// [`read_tree`]: Repository::read_tree
    /// Is `id` a tree built in memory ([`Repository::stage_tree`])?
    pub fn is_staged(&self, id: &ContentId) -> bool {
        self.staged_trees
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(id)
    }

    pub fn stage_tree(&self, tree: Tree) -> ContentId {
        let id = self.key.content_id(&to_cbor(&tree));
        self.staged_trees
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tree);
        id
    }

    /// Seals and uploads a record under a fresh random name
    /// (`<prefix>/<64 hex>`), returning the name.
    pub fn put_record<T: serde::Serialize>(
        &self,
        kind: ObjectKind,
        prefix: &str,
        body: &T,
    ) -> Result<String> {
        let name = random_name(prefix);
        let sealed = crate::padding::seal_padded(&self.key, kind, name.as_bytes(), body);
        self.block_on(self.store.put_if_absent(&name, Bytes::from(sealed)))?;
        Ok(name)
    }

    pub fn snapshot(&self, name: &str) -> Result<SnapshotRecord> {
        self.get_cbor(ObjectKind::Snapshot, name)
    }

    /// Seals `body` as the history object `name` and uploads it unless an
    /// object of that name exists. Returns the outcome and the BLAKE3 hash
    /// of the sealed bytes (what the next object's link holds).
    pub fn put_history(&self, name: &str, body: &HistoryBody) -> Result<(PutOutcome, [u8; 32])> {
        let kind = body.kind().object_kind();
        let sealed = match body {
            HistoryBody::Snapshot(r) => {
                crate::padding::seal_padded(&self.key, kind, name.as_bytes(), r)
            }
            HistoryBody::Versions(b) => {
                crate::padding::seal_padded(&self.key, kind, name.as_bytes(), b)
            }
        };
        let hash = history::sealed_hash(&sealed);
        let ship_only = !self.key.is_master();
        if ship_only {
            // A ship-only key can never read this object back: its
            // catalogue is the only copy of the body it will need (the
            // next append, summaries, recovery after a crash between the
            // put and recording the head). Kept before the put.
            if let Some(c) = self.cache() {
                c.put(name, &body.to_cbor(), &hash);
            }
        }
        let outcome = self.block_on(self.store.put_if_absent(name, Bytes::from(sealed)))?;
        if outcome == PutOutcome::Created && !ship_only {
            if let Some(c) = self.cache() {
                c.put(name, &body.to_cbor(), &hash);
            }
        }
        Ok((outcome, hash))
    }

    /// The sealed bytes of an object, unopened.
    pub fn get_sealed(&self, name: &str) -> Result<Bytes> {
        Ok(self.block_on(self.store.get(name))?)
    }

    /// Reads a history object through the cache; None when the store
    /// has no object of that name.
    pub fn read_history_opt(&self, name: &str) -> Result<Option<HistoryObject>> {
        let kind = HistoryKind::of_name(name).ok_or_else(|| RepoError::Format {
            object: name.to_string(),
            reason: "not a history object name".into(),
        })?;
        if let Some((body, hash)) = self.cached(name) {
            if let Ok(body) = HistoryBody::from_cbor(kind, &body) {
                return Ok(Some(HistoryObject {
                    name: name.to_string(),
                    hash,
                    body,
                }));
            }
        }
        let sealed = match self.block_on(self.store.get(name)) {
            Ok(b) => b,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let obj = self.open_history(name, kind, &sealed)?;
        if let Some(c) = self.cache() {
            c.put(name, &obj.body.to_cbor(), &obj.hash);
        }
        Ok(Some(obj))
    }

    /// Opens and decodes a write-once object read from the store, and
    /// gives it to the object cache.
    fn open_and_cache<T: for<'de> serde::Deserialize<'de>>(
        &self,
        kind: ObjectKind,
        name: &str,
        sealed: &[u8],
    ) -> Result<T> {
        let body = self
            .key
            .open(kind, name.as_bytes(), sealed)
            .map_err(|e| RepoError::crypto(name, e))?;
        let value = from_cbor(&body).map_err(|reason| RepoError::Format {
            object: name.to_string(),
            reason,
        })?;
        if let Some(c) = self.cache() {
            c.put(name, &body, &history::sealed_hash(sealed));
        }
        Ok(value)
    }

    /// Registers the chain of share+host (FORMAT.md §5b) unless it is.
    pub fn register_chain(&self, share: &str, host: &str) -> Result<()> {
        let name = history::chain_name(&self.key, share, host);
        if self.cache().and_then(|c| c.get(&name)).is_some() || self.exists(&name)? {
            return Ok(());
        }
        let reg = ChainRegistration {
            share: share.to_string(),
            host: host.to_string(),
            created: now_rfc3339(),
        };
        let sealed = self.key.seal(
            ObjectKind::ChainRegistration,
            name.as_bytes(),
            &to_cbor(&reg),
        );
        let hash = history::sealed_hash(&sealed);
        self.block_on(self.store.put_if_absent(&name, Bytes::from(sealed)))?;
        if let Some(c) = self.cache() {
            c.put(&name, &to_cbor(&reg), &hash);
        }
        Ok(())
    }

    /// An index body the object cache holds (indexes this machine wrote
    /// or read), for embedding in a summary.
    pub fn cached_index(&self, name: &str) -> Option<Index> {
        let (body, _) = self.cache()?.get(name)?;
        from_cbor(&body).ok()
    }

    /// Every chain registration (FORMAT.md §5b): the (share, host) pairs
    /// with history. One whose name is not its share+host's is skipped as
    /// damaged (returned in the second list with why).
    pub fn chain_registrations(&self) -> Result<ChainRegistrations> {
        let names: Vec<String> = self.list("chains/")?.into_iter().map(|m| m.key).collect();
        let (mut good, mut bad) = (Vec::new(), Vec::new());
        let mut fetch = Vec::new();
        for name in names {
            match self.cache().and_then(|c| c.get(&name)) {
                Some((body, _)) => match from_cbor::<ChainRegistration>(&body) {
                    Ok(r) => good.push(r),
                    Err(_) => fetch.push(name),
                },
                None => fetch.push(name),
            }
        }
        for (name, got) in self.get_many(fetch) {
            let opened = got.map_err(RepoError::from).and_then(|sealed| {
                let reg: ChainRegistration =
                    self.open_and_cache(ObjectKind::ChainRegistration, &name, &sealed)?;
                if history::chain_name(&self.key, &reg.share, &reg.host) != name {
                    return Err(RepoError::Format {
                        object: name.clone(),
                        reason: "a chain registration under another chain's name".into(),
                    });
                }
                Ok(reg)
            });
            match opened {
                Ok(r) => good.push(r),
                Err(e) if e.is_wrong_key() => return Err(e),
                Err(RepoError::Store(s)) if !s.is_not_found() => return Err(RepoError::Store(s)),
                Err(e) => bad.push((name, e.to_string())),
            }
        }
        good.sort_by(|a, b| (&a.share, &a.host).cmp(&(&b.share, &b.host)));
        Ok((good, bad))
    }

    /// Seals and uploads a summary (padded, §6a) unless one of that name
    /// exists.
    pub fn put_summary(&self, name: &str, summary: &Summary) -> Result<PutOutcome> {
        let sealed =
            crate::padding::seal_padded(&self.key, ObjectKind::Summary, name.as_bytes(), summary);
        let hash = history::sealed_hash(&sealed);
        let outcome = self.block_on(self.store.put_if_absent(name, Bytes::from(sealed)))?;
        if let Some(c) = self.cache() {
            c.put(name, &to_cbor(summary), &hash);
        }
        Ok(outcome)
    }

    /// Reads a summary through the cache; None when there is none of that
    /// name.
    pub fn read_summary(&self, name: &str) -> Result<Option<Summary>> {
        if let Some((body, _)) = self.cached(name) {
            if let Ok(s) = from_cbor::<Summary>(&body) {
                return Ok(Some(s));
            }
        }
        let sealed = match self.block_on(self.store.get(name)) {
            Ok(b) => b,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        // Not cached: a reader needs a summary once (its catalogue then
        // holds the places as a checked prefix), and summaries repeat
        // every place once per level.
        let body = self
            .key
            .open(ObjectKind::Summary, name.as_bytes(), &sealed)
            .map_err(|e| RepoError::crypto(name, e))?;
        Ok(Some(from_cbor(&body).map_err(|reason| {
            RepoError::Format {
                object: name.to_string(),
                reason,
            }
        })?))
    }

    /// Drops objects from the object cache (their writer needs them no
    /// more: a summary above them holds them).
    pub fn uncache(&self, names: &[String]) {
        if let Some(c) = self.cache() {
            c.remove(names);
        }
    }

    /// Which of these objects exist (HEAD requests, up to 16 in flight).
    pub fn exist_many(&self, names: Vec<String>) -> Result<Vec<bool>> {
        let store = self.store.clone();
        let answers = self.block_on(async move {
            let slots = Arc::new(Semaphore::new(16));
            let mut set = tokio::task::JoinSet::new();
            for (i, name) in names.into_iter().enumerate() {
                let (store, slots) = (store.clone(), slots.clone());
                set.spawn(async move {
                    let _permit = slots.acquire_owned().await;
                    (i, store.head(&name).await)
                });
            }
            let mut out = Vec::new();
            while let Some(r) = set.join_next().await {
                if let Ok(r) = r {
                    out.push(r);
                }
            }
            out.sort_by_key(|r| r.0);
            out
        });
        answers
            .into_iter()
            .map(|(_, got)| match got {
                Ok(_) => Ok(true),
                Err(e) if e.is_not_found() => Ok(false),
                Err(e) => Err(e.into()),
            })
            .collect()
    }

    /// Does an object of this name exist? (One HEAD request.)
    pub fn exists(&self, name: &str) -> Result<bool> {
        match self.block_on(self.store.head(name)) {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Reads, authenticates and decodes one history object.
    pub fn read_history(&self, name: &str) -> Result<HistoryObject> {
        let kind = HistoryKind::of_name(name).ok_or_else(|| RepoError::Format {
            object: name.to_string(),
            reason: "not a history object name".into(),
        })?;
        let sealed = self.block_on(self.store.get(name))?;
        self.open_history(name, kind, &sealed)
    }

    fn open_history(&self, name: &str, kind: HistoryKind, sealed: &[u8]) -> Result<HistoryObject> {
        let plain = self
            .key
            .open(kind.object_kind(), name.as_bytes(), sealed)
            .map_err(|e| RepoError::crypto(name, e))?;
        let fmt = |reason| RepoError::Format {
            object: name.to_string(),
            reason,
        };
        let body = match kind {
            HistoryKind::Snapshot => HistoryBody::Snapshot(from_cbor(&plain).map_err(fmt)?),
            HistoryKind::Versions => HistoryBody::Versions(from_cbor(&plain).map_err(fmt)?),
        };
        Ok(HistoryObject {
            name: name.to_string(),
            hash: history::sealed_hash(sealed),
            body,
        })
    }

    /// Every history object (snapshot records and version batches of every
    /// share and host), read with up to 16 requests in flight. Objects that
    /// cannot be read or opened come back as errors, each naming its
    /// object; only a wrong key or a store failure fails the whole call.
    pub fn history_objects(&self) -> Result<HistoryObjects> {
        let mut names = Vec::new();
        for kind in HistoryKind::ALL {
            for meta in self.list(&format!("{}/", kind.prefix()))? {
                names.push((meta.key, kind));
            }
        }
        let store = self.store.clone();
        let fetched: Vec<(String, HistoryKind, std::result::Result<Bytes, StoreError>)> = self
            .block_on(async move {
                let slots = Arc::new(Semaphore::new(16));
                let mut set = tokio::task::JoinSet::new();
                for (i, (name, kind)) in names.into_iter().enumerate() {
                    let (store, slots) = (store.clone(), slots.clone());
                    set.spawn(async move {
                        let _permit = slots.acquire_owned().await;
                        let got = store.get(&name).await;
                        (i, name, kind, got)
                    });
                }
                let mut out = Vec::new();
                while let Some(r) = set.join_next().await {
                    if let Ok(r) = r {
                        out.push(r);
                    }
                }
                out.sort_by_key(|r| r.0);
                out.into_iter().map(|(_, n, k, g)| (n, k, g)).collect()
            });
        let (mut good, mut bad) = (Vec::new(), Vec::new());
        for (name, kind, got) in fetched {
            let opened = match got {
                Ok(sealed) => self.open_history(&name, kind, &sealed),
                Err(e) if e.is_not_found() => Err(e.into()),
                Err(e) => return Err(e.into()),
            };
            match opened {
                Ok(o) => good.push(o),
                Err(e) if e.is_wrong_key() => return Err(e),
                Err(e) => bad.push((name, e)),
            }
        }
        Ok((good, bad))
    }

    /// Opens every object under `index/` and `keys/` (for `check`).
    pub fn read_index_object(&self, name: &str) -> Result<Index> {
        self.get_cbor(ObjectKind::Index, name)
    }

    pub fn read_key_check(&self, name: &str) -> Result<KeyCheck> {
        self.get_cbor(ObjectKind::KeyCheck, name)
    }

    /// A writer that stores every blob added, even one stored already:
    /// prune moves the used blobs of a mostly unused pack into new packs.
    pub fn repack_writer(&self) -> PackWriter<'_> {
        PackWriter {
            force: true,
            ..self.writer()
        }
    }

    /// Reads one blob from one given copy (authenticated, its content id
    /// checked).
    pub fn read_blob_from(&self, id: &ContentId, loc: BlobLocation) -> Result<Vec<u8>> {
        let kind = loc.kind;
        self.read_blob_at(id, kind, loc)
    }

    pub fn writer(&self) -> PackWriter<'_> {
        let packing = Arc::new(Packing {
            key: self.key.clone(),
            store: self.store.clone(),
            rt: self.rt.clone(),
            pack_target: self.config.pack_target,
            slots: Arc::new(Semaphore::new(UPLOADS_IN_FLIGHT)),
            state: Mutex::default(),
            stages: Arc::default(),
        });
        PackWriter {
            repo: self,
            force: false,
            pending: Mutex::default(),
            counts: Mutex::default(),
            sealers: Sealers::start(packing.clone()),
            packing,
        }
    }
}

type Upload = JoinHandle<std::result::Result<(IndexPack, u64), RepoError>>;

/// Adds blobs to a repository: dedups against the index and against itself,
/// seals, packs and uploads. `finish` uploads the index for everything it
/// wrote; nothing it wrote is referenced by a record before that.
///
/// The pipeline (FORMAT.md §9 is the format; this is only the order of
/// work): [`add`](Self::add) runs on the caller's threads (any number: it
/// takes `&self`) and hashes and dedups; a bounded queue hands new blobs to
/// one sealing thread per core, which compresses, encrypts and appends to
/// the open pack; a full pack is named (hashed) on the sealing thread that
/// filled it and uploaded on the runtime, at most [`UPLOADS_IN_FLIGHT`] at
/// once. Memory is bounded by the queue (4 blobs per sealing thread, each at
/// most the chunker's maximum), the open pack and the packs uploading.
pub struct PackWriter<'r> {
    repo: &'r Repository,
    /// Repacking (prune): store every blob added, even when a copy exists.
    force: bool,
    /// Blobs handed to the sealers by this writer (32 bytes each).
    pending: Mutex<IdSet>,
    counts: Mutex<WriteStats>,
    sealers: Sealers,
    packing: Arc<Packing>,
}

/// What the sealing threads share: how to seal, pack and upload.
struct Packing {
    key: Arc<RepoKey>,
    store: Arc<dyn Store>,
    rt: Handle,
    pack_target: u64,
    slots: Arc<Semaphore>,
    state: Mutex<PackState>,
    stages: Arc<Stages>,
}

#[derive(Default)]
struct PackState {
    builder: PackBuilder,
    /// Every pack's upload, in the order they started.
    uploads: Vec<Upload>,
    /// The first error of a sealing thread (it stops taking blobs).
    failed: Option<RepoError>,
}

impl Packing {
    fn lock(&self) -> std::sync::MutexGuard<'_, PackState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends one sealed blob to the open pack; uploads the pack first
    /// when the blob would take it past the target size.
    fn pack(&self, id: ContentId, kind: BlobKind, sealed: &[u8], raw_length: u64) -> Result<()> {
        let full = {
            let mut st = self.lock();
            let full = (!st.builder.is_empty()
                && ((st.builder.len() + sealed.len()) as u64 > self.pack_target
                    || st.builder.blobs() >= PACK_BLOBS_MAX))
                .then(|| std::mem::take(&mut st.builder));
            st.builder.push(id, kind, sealed, raw_length);
            full
        };
        match full {
            Some(builder) => self.upload(builder),
            None => Ok(()),
        }
    }

    /// Finishes `builder` (header, padding, name) and starts its upload;
    /// waits while too many are in flight.
    fn upload(&self, builder: PackBuilder) -> Result<()> {
        if builder.is_empty() {
            return Ok(());
        }
        let (bytes, blobs, name) = self.stages.time_cpu(Stage::Pack, || {
            let (bytes, blobs) = builder.finish(&self.key);
            let name = pack::pack_object_name(&self.key, &bytes);
            (bytes, blobs, name)
        });
        let permit = self
            .rt
            .block_on(self.slots.clone().acquire_owned())
            .map_err(|e| RepoError::Task(e.to_string()))?;
        let (store, stages) = (self.store.clone(), self.stages.clone());
        let size = bytes.len() as u64;
        let upload = self.rt.spawn(async move {
            let _permit = permit;
            let start = std::time::Instant::now();
            // AlreadyExists: identical bytes are there (content-addressed name).
            let stored = store.put_if_absent(&name, Bytes::from(bytes)).await;
            stages.add(Stage::Upload, start.elapsed());
            stored?;
            Ok((IndexPack { pack: name, blobs }, size))
        });
        self.lock().uploads.push(upload);
        Ok(())
    }
}

/// A blob to seal.
type SealJob = (ContentId, BlobKind, Bytes);

/// Threads that compress, encrypt and pack blobs, so reading, chunking
/// and hashing on the callers' threads overlap with sealing on these.
struct Sealers {
    jobs: Option<std::sync::mpsc::SyncSender<SealJob>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Sealers {
    fn start(packing: Arc<Packing>) -> Self {
        let n = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 8));
        let (jobs, rx) = std::sync::mpsc::sync_channel::<SealJob>(4 * n);
        let rx = Arc::new(Mutex::new(rx));
        let threads = (0..n)
            .map(|_| {
                let (rx, packing) = (rx.clone(), packing.clone());
                std::thread::spawn(move || loop {
                    let job = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                    let Ok((id, kind, plain)) = job else { return };
                    let sealed = packing.stages.time_cpu(Stage::Seal, || {
                        packing.key.seal(kind.object_kind(), id.as_bytes(), &plain)
                    });
                    let raw_length = plain.len() as u64;
                    drop(plain);
                    if let Err(e) = packing.pack(id, kind, &sealed, raw_length) {
                        packing.lock().failed.get_or_insert(e);
                        return;
                    }
                })
            })
            .collect();
        Sealers {
            jobs: Some(jobs),
            threads,
        }
    }

    /// Lets the threads finish the queued blobs and waits for them.
    fn stop(&mut self) {
        self.jobs = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Sealers {
    fn drop(&mut self) {
        self.stop();
    }
}

impl PackWriter<'_> {
    /// Adds a blob unless the repository (or this writer) already has it.
    /// Sealing happens on other threads; the blob is packed when sealed.
    pub fn add(&self, kind: BlobKind, plaintext: &[u8]) -> Result<ContentId> {
        self.add_with(kind, plaintext, || Bytes::copy_from_slice(plaintext))
    }

    /// [`add`](Self::add) of data the caller owns: handed to the sealers
    /// without a copy.
    pub fn add_bytes(&self, kind: BlobKind, data: Bytes) -> Result<ContentId> {
        self.add_with(kind, &data, || data.clone())
    }

    fn add_with(
        &self,
        kind: BlobKind,
        plaintext: &[u8],
        owned: impl FnOnce() -> Bytes,
    ) -> Result<ContentId> {
        let id = self
            .packing
            .stages
            .time_cpu(Stage::Hash, || self.repo.key.content_id(plaintext));
        if self.lock_pending().contains(&id) {
            return Ok(id);
        }
        if kind == BlobKind::Tree && !self.repo.key.is_master() {
            if let Some(c) = self.repo.cache() {
                c.put_own_tree(&id, plaintext);
            }
        }
        if !self.force && self.repo.has_blob(&id) {
            self.repo
                .ship_use
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .deduplicated
                .insert(id);
            return Ok(id);
        }
        // Two threads adding one blob at once: the first to get here sends it.
        if !self.lock_pending().insert(id) {
            return Ok(id);
        }
        {
            let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
            c.new_blobs += 1;
            c.new_raw_bytes += plaintext.len() as u64;
        }
        // A sealing thread that failed stopped; finish reports its error.
        if let Some(e) = &self.packing.lock().failed {
            return Err(RepoError::Task(format!("a sealing thread stopped: {e}")));
        }
        let jobs = self
            .sealers
            .jobs
            .as_ref()
            .ok_or_else(|| RepoError::Task("sealers stopped".into()))?;
        jobs.send((id, kind, owned()))
            .map_err(|_| RepoError::Task("a sealing thread died".into()))?;
        Ok(id)
    }

    /// Where this writer's time went so far; callers add the stages they
    /// run themselves (stat, read, chunk).
    pub fn stages(&self) -> &Arc<Stages> {
        &self.packing.stages
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, IdSet> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Uploads the last pack, waits for every upload, then writes their
    /// index (objects of at most [`INDEX_BLOBS_MAX`] blobs) and makes the
    /// blobs visible to the repository.
    pub fn finish(mut self) -> Result<WriteStats> {
        self.sealers.stop();
        // Nothing is added any more: the set of blobs in flight (32 MB for
        // a million new blobs) goes before the index is built, not after.
        *self.pending.get_mut().unwrap_or_else(|p| p.into_inner()) = IdSet::default();
        // The sealing threads are gone: this thread alone packs now.
        let last = {
            let mut st = self.packing.lock();
            if let Some(e) = st.failed.take() {
                return Err(e);
            }
            std::mem::take(&mut st.builder)
        };
        self.packing.upload(last)?;
        let uploads = std::mem::take(&mut self.packing.lock().uploads);
        let mut stats = *self.counts.lock().unwrap_or_else(|p| p.into_inner());
        stats.packs_written = uploads.len() as u64;
        stats.objects_written += stats.packs_written;
        let mut packs = Vec::with_capacity(uploads.len());
        for handle in uploads {
            let (pack, size) = self
                .repo
                .block_on(handle)
                .map_err(|e| RepoError::Task(e.to_string()))??;
            stats.uploaded_bytes += size;
            self.repo
                .ship_use
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .packs
                .insert(pack.pack.clone());
            packs.push(pack);
        }
        for index in index_parts(packs) {
            stats.uploaded_bytes += self.write_index(index)?;
            stats.objects_written += 1;
        }
        Ok(stats)
    }

    /// Uploads one index object (FORMAT.md §5b) and makes its blobs known
    /// to this process; returns its sealed size.
    fn write_index(&self, index: Index) -> Result<u64> {
        let name = random_name("index");
        let sealed =
            crate::padding::seal_padded(&self.repo.key, ObjectKind::Index, name.as_bytes(), &index);
        let size = sealed.len() as u64;
        let hash = history::sealed_hash(&sealed);
        self.repo
            .block_on(self.repo.store.put_if_absent(&name, Bytes::from(sealed)))?;
        self.repo.merge_index(&index);
        // Once named, the body moves into the catalogue's blob index
        // (`indexes_named`), read back from the object cache; it stays in
        // memory only when the cache cannot hold it. Without a catalogue
        // nothing reads it again.
        if let Some(c) = self.repo.cache() {
            let body = to_cbor(&index);
            if body.len() <= CACHED_INDEX_MAX {
                c.put(&name, &body, &hash);
            } else {
                self.repo
                    .written_bodies
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(name.clone(), index);
            }
        }
        self.repo.lock_loaded().insert(name.clone());
        self.repo
            .written_indexes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(name);
        Ok(size)
    }

    /// Blobs and bytes handed to the sealers so far (packs and uploads
    /// are counted by [`finish`](Self::finish)).
    pub fn stats(&self) -> WriteStats {
        *self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl BlobId {
    pub fn id(&self) -> ContentId {
        self.0
    }
}
