//! Data blobs for `btrship mount`: read on demand, kept in a bounded
//! in-memory cache, and read ahead for sequential readers.
//!
//! A blob is fetched once however many readers want it at the same time
//! (the others wait for the first). Read-ahead requests go to a small
//! pool of threads, so the store sees several ranged GETs in flight while
//! a reader copies the blob it has: that is what makes a sequential read
//! from a remote store fast. Every blob is authenticated and its content
//! id checked by [`Repository::read_blob`] before it enters the cache.
//!
//! Memory: the cache holds at most `cap` bytes of plaintext (least
//! recently used blobs go first), plus the blobs being fetched (at most
//! the fetch threads' count, each at most one chunk: 4 MiB).

use btrship_crypto::ContentId;
use btrship_upload::format::BlobKind;
use btrship_upload::Repository;
use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Condvar, Mutex};

/// Threads that read ahead.
const FETCHERS: usize = 6;
/// Read-ahead requests waiting at most (older ones are dropped).
const QUEUE: usize = 64;

pub struct Blobs {
    repo: Arc<Repository>,
    state: Mutex<State>,
    /// Signalled when a fetch ends (waiters re-check the cache).
    fetched: Condvar,
    /// Signalled when read-ahead work is queued.
    work: Condvar,
}

struct State {
    cache: lru::LruCache<ContentId, Arc<Vec<u8>>>,
    bytes: u64,
    cap: u64,
    loading: HashSet<ContentId>,
    queue: VecDeque<ContentId>,
    stop: bool,
}

impl State {
    fn insert(&mut self, id: ContentId, data: Arc<Vec<u8>>) {
        self.bytes += data.len() as u64;
        if let Some(old) = self.cache.put(id, data) {
            self.bytes -= old.len() as u64;
        }
        while self.bytes > self.cap {
            match self.cache.pop_lru() {
                Some((_, old)) => self.bytes -= old.len() as u64,
                None => break,
            }
        }
    }
}

impl Blobs {
    /// A cache of `cap` bytes over `repo`, with its read-ahead threads.
    pub fn new(repo: Arc<Repository>, cap: u64) -> Arc<Blobs> {
        let blobs = Arc::new(Blobs {
            repo,
            state: Mutex::new(State {
                cache: lru::LruCache::unbounded(),
                bytes: 0,
                cap,
                loading: HashSet::new(),
                queue: VecDeque::new(),
                stop: false,
            }),
            fetched: Condvar::new(),
            work: Condvar::new(),
        });
        for i in 0..FETCHERS {
            let b = blobs.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("btrship-readahead-{i}"))
                .spawn(move || b.fetcher());
            if let Err(e) = spawned {
                tracing::warn!("cannot start a read-ahead thread: {e}");
            }
        }
        blobs
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The plaintext of data blob `id`.
    pub fn get(&self, id: &ContentId) -> Result<Arc<Vec<u8>>, btrship_upload::RepoError> {
        let mut st = self.lock();
        loop {
            if let Some(d) = st.cache.get(id) {
                return Ok(d.clone());
            }
            if !st.loading.contains(id) {
                break;
            }
            st = self.fetched.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.loading.insert(*id);
        drop(st);
        let read = self.repo.read_blob(id, BlobKind::Data).map(Arc::new);
        let mut st = self.lock();
        st.loading.remove(id);
        if let Ok(d) = &read {
            st.insert(*id, d.clone());
        }
        drop(st);
        self.fetched.notify_all();
        read
    }

    /// Asks for blobs a reader will want next; returns at once.
    pub fn read_ahead(&self, ids: impl IntoIterator<Item = ContentId>) {
        let mut st = self.lock();
        let mut queued = false;
        for id in ids {
            if st.cache.contains(&id) || st.loading.contains(&id) || st.queue.contains(&id) {
                continue;
            }
            if st.queue.len() >= QUEUE {
                st.queue.pop_front();
            }
            st.queue.push_back(id);
            queued = true;
        }
        drop(st);
        if queued {
            self.work.notify_all();
        }
    }

    fn fetcher(&self) {
        loop {
            let mut st = self.lock();
            let id = loop {
                if st.stop {
                    return;
                }
                match st.queue.pop_front() {
                    Some(id) if st.cache.contains(&id) || st.loading.contains(&id) => continue,
                    Some(id) => break id,
                    None => st = self.work.wait(st).unwrap_or_else(|p| p.into_inner()),
                }
            };
            st.loading.insert(id);
            drop(st);
            let read = self.repo.read_blob(&id, BlobKind::Data);
            let mut st = self.lock();
            st.loading.remove(&id);
            match read {
                Ok(d) => st.insert(id, Arc::new(d)),
                // The reader that needs it reads it again and reports it.
                Err(e) => tracing::debug!("read-ahead of blob {id} failed: {e}"),
            }
            drop(st);
            self.fetched.notify_all();
        }
    }

    /// Stops the read-ahead threads (they end after their current fetch).
    pub fn stop(&self) {
        self.lock().stop = true;
        self.work.notify_all();
    }
}
