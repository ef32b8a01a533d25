//! Behaviour that applies to every store, as wrappers around any
//! [`Store`]: retries with backoff, a connection limit, a bandwidth limit,
//! and request/byte counters. Backends stay dumb; [`layered`] stacks the
//! wrappers in the order btrship uses:
//! `Counting(Retry(Limit(Bandwidth(backend))))` — counters see what the
//! caller asked for, each retry takes its own connection slot and bandwidth.

use crate::store::{ObjectMeta, PutOutcome, Store, StoreError};
use async_trait::async_trait;
use bytes::Bytes;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Mutex, Semaphore};

/// How to retry temporary failures.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts in all, including the first.
    pub attempts: u32,
    pub first_delay: Duration,
    pub max_delay: Duration,
}

/// Ten attempts: under independent faults at a rate `p` a request gives up
/// with probability `p^10` (1e-7 at 20%, the fault tests' rate, where 8
/// attempts gave up once in a few thousand runs); a real outage is given
/// up on after about 11 s on average (full jitter, 0.1 s doubling to 5 s).
impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 10,
            first_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(5),
        }
    }
}

impl RetryPolicy {
    /// Full jitter: a random delay up to `min(max, first * 2^n)`.
    fn delay(&self, retry: u32) -> Duration {
        let cap = self
            .first_delay
            .saturating_mul(1u32.checked_shl(retry.min(20)).unwrap_or(u32::MAX))
            .min(self.max_delay);
        let nanos = cap.as_nanos().min(u128::from(u64::MAX)) as u64;
        Duration::from_nanos(rand::random::<u64>() % nanos.max(1))
    }
}

/// Retries operations that failed with a retryable error (5xx, throttling,
/// timeouts, resets). Permanent errors return at once.
///
/// A retried `put_if_absent` may answer `AlreadyExists` for an object its
/// own earlier attempt stored before the connection broke; object names are
/// content-addressed or random (FORMAT.md §9), so that is success.
#[derive(Debug)]
pub struct Retry {
    inner: Arc<dyn Store>,
    policy: RetryPolicy,
    retries: AtomicU64,
    counters: Option<Arc<Counters>>,
}

impl Retry {
    pub fn new(inner: Arc<dyn Store>, policy: RetryPolicy) -> Self {
        Retry {
            inner,
            policy,
            retries: AtomicU64::new(0),
            counters: None,
        }
    }

    /// Also counts retries (each one a request sent again) in `counters`.
    pub fn with_counters(mut self, counters: Arc<Counters>) -> Self {
        self.counters = Some(counters);
        self
    }

    pub fn retries(&self) -> u64 {
        self.retries.load(Relaxed)
    }

    async fn run<T, F, Fut>(&self, what: &str, key: &str, mut op: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        let mut attempt = 0;
        loop {
            match op().await {
                Err(e) if e.is_retryable() && attempt + 1 < self.policy.attempts => {
                    let delay = self.policy.delay(attempt);
                    tracing::debug!("{what} {key}: {e}; retry {} in {delay:?}", attempt + 1);
                    self.retries.fetch_add(1, Relaxed);
                    if let Some(c) = &self.counters {
                        c.retries.fetch_add(1, Relaxed);
                    }
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }
}

#[async_trait]
impl Store for Retry {
    fn location(&self) -> String {
        self.inner.location()
    }
    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<PutOutcome, StoreError> {
        self.run("put", key, || self.inner.put_if_absent(key, data.clone()))
            .await
    }
    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        self.run("get", key, || self.inner.get(key)).await
    }
    async fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Bytes, StoreError> {
        self.run("get", key, || self.inner.get_range(key, offset, len))
            .await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        self.run("list", prefix, || self.inner.list(prefix)).await
    }
    async fn head(&self, key: &str) -> Result<ObjectMeta, StoreError> {
        self.run("head", key, || self.inner.head(key)).await
    }
    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.run("delete", key, || self.inner.delete(key)).await
    }
    fn set_object_lock(&self, lock: Option<crate::store::ObjectLock>) {
        self.inner.set_object_lock(lock)
    }
    async fn object_lock_enabled(&self) -> Result<bool, StoreError> {
        self.run("get the object lock configuration of", "", || {
            self.inner.object_lock_enabled()
        })
        .await
    }
    async fn extend_retention(
        &self,
        key: &str,
        until: std::time::SystemTime,
    ) -> Result<(), StoreError> {
        self.run("extend the retention of", key, || {
            self.inner.extend_retention(key, until)
        })
        .await
    }
}

/// At most `n` requests in flight (`--max-connections`).
#[derive(Debug)]
pub struct Limit {
    inner: Arc<dyn Store>,
    slots: Semaphore,
}

impl Limit {
    pub fn new(inner: Arc<dyn Store>, n: usize) -> Self {
        Limit {
            inner,
            slots: Semaphore::new(n.max(1)),
        }
    }

    async fn slot(&self) -> Result<tokio::sync::SemaphorePermit<'_>, StoreError> {
        self.slots.acquire().await.map_err(|_| StoreError::Other {
            key: String::new(),
            message: "connection limit closed".into(),
            retryable: false,
        })
    }
}

#[async_trait]
impl Store for Limit {
    fn location(&self) -> String {
        self.inner.location()
    }
    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<PutOutcome, StoreError> {
        let _s = self.slot().await?;
        self.inner.put_if_absent(key, data).await
    }
    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        let _s = self.slot().await?;
        self.inner.get(key).await
    }
    async fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Bytes, StoreError> {
        let _s = self.slot().await?;
        self.inner.get_range(key, offset, len).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        let _s = self.slot().await?;
        self.inner.list(prefix).await
    }
    async fn head(&self, key: &str) -> Result<ObjectMeta, StoreError> {
        let _s = self.slot().await?;
        self.inner.head(key).await
    }
    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let _s = self.slot().await?;
        self.inner.delete(key).await
    }
    fn set_object_lock(&self, lock: Option<crate::store::ObjectLock>) {
        self.inner.set_object_lock(lock)
    }
    async fn object_lock_enabled(&self) -> Result<bool, StoreError> {
        self.inner.object_lock_enabled().await
    }
    async fn extend_retention(
        &self,
        key: &str,
        until: std::time::SystemTime,
    ) -> Result<(), StoreError> {
        self.inner.extend_retention(key, until).await
    }
}

/// Limits the bytes per second moved by puts and gets (`--bwlimit`), shared
/// by all requests: each transfer waits until the budget allows it.
#[derive(Debug)]
pub struct Bandwidth {
    inner: Arc<dyn Store>,
    bytes_per_sec: u64,
    /// When the budget is free again.
    next_free: Mutex<tokio::time::Instant>,
}

impl Bandwidth {
    pub fn new(inner: Arc<dyn Store>, bytes_per_sec: u64) -> Self {
        Bandwidth {
            inner,
            bytes_per_sec: bytes_per_sec.max(1),
            next_free: Mutex::new(tokio::time::Instant::now()),
        }
    }

    async fn take(&self, bytes: u64) {
        let cost = Duration::from_secs_f64(bytes as f64 / self.bytes_per_sec as f64);
        let wait_until = {
            let mut next = self.next_free.lock().await;
            let now = tokio::time::Instant::now();
            let start = (*next).max(now);
            *next = start + cost;
            start
        };
        tokio::time::sleep_until(wait_until).await;
    }
}

#[async_trait]
impl Store for Bandwidth {
    fn location(&self) -> String {
        self.inner.location()
    }
    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<PutOutcome, StoreError> {
        self.take(data.len() as u64).await;
        self.inner.put_if_absent(key, data).await
    }
    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        let b = self.inner.get(key).await?;
        self.take(b.len() as u64).await;
        Ok(b)
    }
    async fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Bytes, StoreError> {
        // Charged for what arrived, not what was asked (a request may be
        // refused as out of range).
        let b = self.inner.get_range(key, offset, len).await?;
        self.take(b.len() as u64).await;
        Ok(b)
    }
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        self.inner.list(prefix).await
    }
    async fn head(&self, key: &str) -> Result<ObjectMeta, StoreError> {
        self.inner.head(key).await
    }
    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.inner.delete(key).await
    }
    fn set_object_lock(&self, lock: Option<crate::store::ObjectLock>) {
        self.inner.set_object_lock(lock)
    }
    async fn object_lock_enabled(&self) -> Result<bool, StoreError> {
        self.inner.object_lock_enabled().await
    }
    async fn extend_retention(
        &self,
        key: &str,
        until: std::time::SystemTime,
    ) -> Result<(), StoreError> {
        self.inner.extend_retention(key, until).await
    }
}

/// Requests by kind and bytes moved, as seen by the caller.
#[derive(Debug, Default)]
pub struct Counters {
    pub puts: AtomicU64,
    pub gets: AtomicU64,
    pub lists: AtomicU64,
    pub heads: AtomicU64,
    pub deletes: AtomicU64,
    /// Requests that failed after any retries.
    pub errors: AtomicU64,
    /// Attempts sent again after a temporary failure (each one more request).
    pub retries: AtomicU64,
    pub uploaded_bytes: AtomicU64,
    pub downloaded_bytes: AtomicU64,
    /// `errors` by operation, in the order of [`OPS`].
    pub op_errors: [AtomicU64; 5],
}

/// The operations counted, as metrics label them.
pub const OPS: [&str; 5] = ["put", "get", "list", "head", "delete"];

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct CounterValues {
    pub puts: u64,
    pub gets: u64,
    pub lists: u64,
    pub heads: u64,
    pub deletes: u64,
    pub errors: u64,
    pub retries: u64,
    pub uploaded_bytes: u64,
    pub downloaded_bytes: u64,
    /// Failed requests by operation, in the order of [`OPS`].
    pub op_errors: [u64; 5],
}

impl CounterValues {
    /// Requests of each operation (retries not included), in the order of
    /// [`OPS`].
    pub fn by_op(&self) -> [u64; 5] {
        [self.puts, self.gets, self.lists, self.heads, self.deletes]
    }

    /// What happened between `earlier` and `self`.
    pub fn since(&self, earlier: &CounterValues) -> CounterValues {
        CounterValues {
            puts: self.puts.saturating_sub(earlier.puts),
            gets: self.gets.saturating_sub(earlier.gets),
            lists: self.lists.saturating_sub(earlier.lists),
            heads: self.heads.saturating_sub(earlier.heads),
            deletes: self.deletes.saturating_sub(earlier.deletes),
            errors: self.errors.saturating_sub(earlier.errors),
            retries: self.retries.saturating_sub(earlier.retries),
            uploaded_bytes: self.uploaded_bytes.saturating_sub(earlier.uploaded_bytes),
            downloaded_bytes: self
                .downloaded_bytes
                .saturating_sub(earlier.downloaded_bytes),
            op_errors: std::array::from_fn(|i| {
                self.op_errors[i].saturating_sub(earlier.op_errors[i])
            }),
        }
    }

    /// Requests sent, retries included.
    pub fn requests(&self) -> u64 {
        self.puts + self.gets + self.lists + self.heads + self.deletes + self.retries
    }
}

impl std::fmt::Display for CounterValues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} requests (put {}, get {}, list {}, head {}, delete {}, retried {}, failed {}), {} bytes up, {} bytes down",
            self.requests(),
            self.puts,
            self.gets,
            self.lists,
            self.heads,
            self.deletes,
            self.retries,
            self.errors,
            self.uploaded_bytes,
            self.downloaded_bytes
        )
    }
}

impl Counters {
    pub fn values(&self) -> CounterValues {
        CounterValues {
            puts: self.puts.load(Relaxed),
            gets: self.gets.load(Relaxed),
            lists: self.lists.load(Relaxed),
            heads: self.heads.load(Relaxed),
            deletes: self.deletes.load(Relaxed),
            errors: self.errors.load(Relaxed),
            retries: self.retries.load(Relaxed),
            uploaded_bytes: self.uploaded_bytes.load(Relaxed),
            downloaded_bytes: self.downloaded_bytes.load(Relaxed),
            op_errors: std::array::from_fn(|i| self.op_errors[i].load(Relaxed)),
        }
    }
}

#[derive(Debug)]
pub struct Counting {
    inner: Arc<dyn Store>,
    counters: Arc<Counters>,
}

impl Counting {
    pub fn new(inner: Arc<dyn Store>, counters: Arc<Counters>) -> Self {
        Counting { inner, counters }
    }

    /// Counts failures. "Not found" is an answer, not a failure: readers
    /// probe for objects that may not exist (the next place of a history).
    fn note<T>(&self, op: usize, r: &Result<T, StoreError>) {
        if r.as_ref().is_err_and(|e| !e.is_not_found()) {
            self.counters.errors.fetch_add(1, Relaxed);
            self.counters.op_errors[op].fetch_add(1, Relaxed);
        }
    }
}

#[async_trait]
impl Store for Counting {
    fn location(&self) -> String {
        self.inner.location()
    }
    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<PutOutcome, StoreError> {
        self.counters.puts.fetch_add(1, Relaxed);
        let len = data.len() as u64;
        let r = self.inner.put_if_absent(key, data).await;
        if r.is_ok() {
            self.counters.uploaded_bytes.fetch_add(len, Relaxed);
        }
        self.note(0, &r);
        r
    }
    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        self.counters.gets.fetch_add(1, Relaxed);
        let r = self.inner.get(key).await;
        if let Ok(b) = &r {
            self.counters
                .downloaded_bytes
                .fetch_add(b.len() as u64, Relaxed);
        }
        self.note(1, &r);
        r
    }
    async fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Bytes, StoreError> {
        self.counters.gets.fetch_add(1, Relaxed);
        let r = self.inner.get_range(key, offset, len).await;
        if let Ok(b) = &r {
            self.counters
                .downloaded_bytes
                .fetch_add(b.len() as u64, Relaxed);
        }
        self.note(1, &r);
        r
    }
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        self.counters.lists.fetch_add(1, Relaxed);
        let r = self.inner.list(prefix).await;
        self.note(2, &r);
        r
    }
    async fn head(&self, key: &str) -> Result<ObjectMeta, StoreError> {
        self.counters.heads.fetch_add(1, Relaxed);
        let r = self.inner.head(key).await;
        self.note(3, &r);
        r
    }
    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.counters.deletes.fetch_add(1, Relaxed);
        let r = self.inner.delete(key).await;
        self.note(4, &r);
        r
    }
    fn set_object_lock(&self, lock: Option<crate::store::ObjectLock>) {
        self.inner.set_object_lock(lock)
    }
    async fn object_lock_enabled(&self) -> Result<bool, StoreError> {
        self.inner.object_lock_enabled().await
    }
    async fn extend_retention(
        &self,
        key: &str,
        until: std::time::SystemTime,
    ) -> Result<(), StoreError> {
        self.inner.extend_retention(key, until).await
    }
}

/// Options for [`layered`].
#[derive(Debug, Clone, Copy, Default)]
pub struct LayerOptions {
    pub retry: RetryPolicy,
    pub max_connections: Option<usize>,
    pub bwlimit_bytes_per_sec: Option<u64>,
}

/// Wraps a backend in bandwidth limit, connection limit, retries and
/// counters (in that order, innermost first).
pub fn layered(
    backend: Arc<dyn Store>,
    opts: LayerOptions,
    counters: Arc<Counters>,
) -> Arc<dyn Store> {
    let mut s = backend;
    if let Some(bw) = opts.bwlimit_bytes_per_sec {
        s = Arc::new(Bandwidth::new(s, bw));
    }
    if let Some(n) = opts.max_connections {
        s = Arc::new(Limit::new(s, n));
    }
    s = Arc::new(Retry::new(s, opts.retry).with_counters(counters.clone()));
    Arc::new(Counting::new(s, counters))
}

/// Parses a bandwidth such as `10M`, `500K`, `1G` (bytes per second,
/// binary multiples) or a plain number of bytes per second.
pub fn parse_bwlimit(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last()? {
        (i, 'k' | 'K') => (&s[..i], 1u64 << 10),
        (i, 'm' | 'M') => (&s[..i], 1 << 20),
        (i, 'g' | 'G') => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    let v: f64 = num.trim().parse().ok()?;
    (v.is_finite() && v > 0.0 && v * mult as f64 >= 1.0).then_some((v * mult as f64) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local::LocalStore;
    use std::sync::atomic::AtomicU32;

    /// A store that fails the first `fail` calls of every operation with a
    /// retryable (or permanent) error, then delegates.
    #[derive(Debug)]
    struct Flaky {
        inner: Arc<dyn Store>,
        fail: u32,
        calls: AtomicU32,
        retryable: bool,
    }

    impl Flaky {
        fn gate(&self) -> Result<(), StoreError> {
            if self.calls.fetch_add(1, Relaxed) < self.fail {
                return Err(StoreError::Other {
                    key: "k".into(),
                    message: "503 Slow Down".into(),
                    retryable: self.retryable,
                });
            }
            Ok(())
        }
    }

    #[async_trait]
    impl Store for Flaky {
        fn location(&self) -> String {
            "flaky".into()
        }
        async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<PutOutcome, StoreError> {
            self.gate()?;
            self.inner.put_if_absent(key, data).await
        }
        async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
            self.gate()?;
            self.inner.get(key).await
        }
        async fn get_range(&self, key: &str, o: u64, l: u64) -> Result<Bytes, StoreError> {
            self.gate()?;
            self.inner.get_range(key, o, l).await
        }
        async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
            self.gate()?;
            self.inner.list(prefix).await
        }
        async fn head(&self, key: &str) -> Result<ObjectMeta, StoreError> {
            self.gate()?;
            self.inner.head(key).await
        }
        async fn delete(&self, key: &str) -> Result<(), StoreError> {
            self.gate()?;
            self.inner.delete(key).await
        }
    }

    fn fast() -> RetryPolicy {
        RetryPolicy {
            attempts: 5,
            first_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(5),
        }
    }

    #[tokio::test]
    async fn retries_temporary_failures_and_not_permanent_ones() {
        let dir = tempfile::tempdir().unwrap();
        let local: Arc<dyn Store> = Arc::new(LocalStore::create(dir.path()).unwrap());
        let flaky = Arc::new(Flaky {
            inner: local.clone(),
            fail: 3,
            calls: AtomicU32::new(0),
            retryable: true,
        });
        let counters = Arc::new(Counters::default());
        let r = Retry::new(flaky, fast()).with_counters(counters.clone());
        assert_eq!(
            r.put_if_absent("a/b", Bytes::from_static(b"x"))
                .await
                .unwrap(),
            PutOutcome::Created
        );
        assert_eq!(r.retries(), 3);
        assert_eq!(counters.values().retries, 3);
        let permanent = Arc::new(Flaky {
            inner: local,
            fail: 1,
            calls: AtomicU32::new(0),
            retryable: false,
        });
        let r = Retry::new(permanent, fast());
        assert!(r.get("a/b").await.is_err());
        assert_eq!(r.retries(), 0);
    }

    #[tokio::test]
    async fn gives_up_after_the_attempts() {
        let dir = tempfile::tempdir().unwrap();
        let flaky = Arc::new(Flaky {
            inner: Arc::new(LocalStore::create(dir.path()).unwrap()),
            fail: 100,
            calls: AtomicU32::new(0),
            retryable: true,
        });
        let r = Retry::new(flaky.clone(), fast());
        assert!(r.list("").await.unwrap_err().is_retryable());
        assert_eq!(flaky.calls.load(Relaxed), 5);
    }

    #[tokio::test]
    async fn layered_store_passes_conformance_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let counters = Arc::new(Counters::default());
        let store = layered(
            Arc::new(LocalStore::create(dir.path()).unwrap()),
            LayerOptions {
                retry: fast(),
                max_connections: Some(2),
                bwlimit_bytes_per_sec: Some(1 << 30),
            },
            counters.clone(),
        );
        crate::conformance::run_all(
            store.as_ref(),
            crate::conformance::Capabilities {
                exclusive_create: true,
                atomic_create: true,
            },
        )
        .await
        .unwrap();
        let v = counters.values();
        assert!(v.puts > 10 && v.gets > 10 && v.lists > 0, "{v:?}");
        assert!(v.uploaded_bytes > 17 << 20, "{v:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn bandwidth_limit_paces_transfers() {
        let dir = tempfile::tempdir().unwrap();
        let bw = Bandwidth::new(Arc::new(LocalStore::create(dir.path()).unwrap()), 1 << 20);
        let start = tokio::time::Instant::now();
        for i in 0..4 {
            bw.put_if_absent(&format!("o{i}"), Bytes::from(vec![0u8; 512 << 10]))
                .await
                .unwrap();
        }
        // 2 MiB at 1 MiB/s: the last put starts no earlier than 1.5 s in.
        assert!(
            start.elapsed() >= Duration::from_millis(1500),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn bwlimit_parsing() {
        assert_eq!(parse_bwlimit("10M"), Some(10 << 20));
        assert_eq!(parse_bwlimit("500k"), Some(500 << 10));
        assert_eq!(parse_bwlimit("1.5G"), Some(3 << 29));
        assert_eq!(parse_bwlimit("4096"), Some(4096));
        for bad in ["", "M", "-1M", "fast", "0"] {
            assert_eq!(parse_bwlimit(bad), None, "{bad}");
        }
    }
}
