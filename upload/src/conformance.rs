//! A conformance suite every [`Store`] implementation must pass.
//!
//! The same checks run against the local directory store in unit tests and
//! against real object storage (an S3 server, a shared bucket) in integration
//! tests, so they only use the [`Store`] trait, write under a fresh random key
//! prefix per check (`conformance-<random>/<check>/`), and delete what they
//! wrote afterwards (best effort).
//!
//! Every check returns `Err` with a message that starts with the check's name.
//! [`run_all`] runs them all and reports every failure, not just the first.

use std::fmt::Display;
use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use rand::RngCore;

use crate::store::{ObjectMeta, PutOutcome, Store, StoreError};

/// What a backend guarantees beyond the basic contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// `put_if_absent` on an existing key reports `AlreadyExists` and leaves
    /// the object (false only for a test server that ignores the condition:
    /// fake-gcs-server 1.54 ignores `ifGenerationMatch=0`).
    pub exclusive_create: bool,
    /// Concurrent `put_if_absent` calls for one key are decided atomically:
    /// exactly one returns `Created`, and the stored object is that call's data.
    pub atomic_create: bool,
}

/// Runs every check applicable to `caps`; `Err` lists all failed checks.
pub async fn run_all(store: &dyn Store, caps: Capabilities) -> Result<(), String> {
    let mut results = vec![
        put_get_round_trip(store).await,
        missing_key_is_not_found(store).await,
        get_range(store).await,
        list(store).await,
        modified_time(store).await,
        delete(store).await,
        invalid_keys(store).await,
    ];
    if caps.exclusive_create {
        results.push(put_if_absent_keeps_existing(store).await);
    }
    if caps.atomic_create {
        results.push(concurrent_create(store).await);
    }
    let failures: Vec<String> = results.into_iter().filter_map(Result::err).collect();
    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} conformance check(s) failed on {}:\n{}",
            failures.len(),
            store.location(),
            failures.join("\n")
        ))
    }
}

/// Objects of 0 bytes, 1 byte, 1 MiB and 17 MiB (random) read back identically,
/// and `head` reports their sizes.
pub async fn put_get_round_trip(store: &dyn Store) -> Result<(), String> {
    scoped(store, "put_get_round_trip", |store, p| async move {
        for (name, len) in [
            ("empty", 0),
            ("one", 1),
            ("1mib", 1 << 20),
            ("17mib", 17 << 20),
        ] {
            let key = format!("{p}{name}");
            let data = random_bytes(len);
            put_expect(store, &key, data.clone(), PutOutcome::Created).await?;
            let got = ctx(store.get(&key).await, format_args!("get {key}"))?;
            same(format_args!("get {key}"), &got, &data)?;
            head_expect(store, &key, data.len()).await?;
        }
        Ok(())
    })
    .await
}

/// A second `put_if_absent` reports `AlreadyExists` and leaves the original.
pub async fn put_if_absent_keeps_existing(store: &dyn Store) -> Result<(), String> {
    scoped(
        store,
        "put_if_absent_keeps_existing",
        |store, p| async move {
            let key = format!("{p}obj");
            let original = random_bytes(1000);
            put_expect(store, &key, original.clone(), PutOutcome::Created).await?;
            put_expect(store, &key, random_bytes(2000), PutOutcome::AlreadyExists).await?;
            put_expect(store, &key, Bytes::new(), PutOutcome::AlreadyExists).await?;
            let got = ctx(store.get(&key).await, format_args!("get {key}"))?;
            same(format_args!("get {key} after second put"), &got, &original)?;
            head_expect(store, &key, original.len()).await
        },
    )
    .await
}

/// `get`, `head` and `get_range` of a missing key fail with `is_not_found()`.
pub async fn missing_key_is_not_found(store: &dyn Store) -> Result<(), String> {
    scoped(store, "missing_key_is_not_found", |store, p| async move {
        for key in [format!("{p}missing"), format!("{p}no/such/dir/obj")] {
            expect_err(
                store.get(&key).await,
                format_args!("get {key}"),
                Expect::NotFound,
            )?;
            expect_err(
                store.head(&key).await,
                format_args!("head {key}"),
                Expect::NotFound,
            )?;
            let what = format_args!("get_range {key} 0+1");
            expect_err(store.get_range(&key, 0, 1).await, what, Expect::NotFound)?;
            let what = format_args!("get_range {key} 0+0");
            expect_err(store.get_range(&key, 0, 0).await, what, Expect::NotFound)?;
        }
        Ok(())
    })
    .await
}

/// Ranged reads return exactly the requested bytes; zero-length ranges work
/// anywhere up to the end; ranges past the end are `OutOfRange`.
pub async fn get_range(store: &dyn Store) -> Result<(), String> {
    scoped(store, "get_range", |store, p| async move {
        let key = format!("{p}obj");
        let data = random_bytes(100_003);
        put_expect(store, &key, data.clone(), PutOutcome::Created).await?;
        let size = data.len() as u64;
        let good = [
            (0, 0),
            (0, 1),
            (0, 100),
            (50_000, 1000),
            (77, 0),
            (size - 100, 100),
            (size - 1, 1),
            (size, 0),
            (0, size),
        ];
        for (offset, len) in good {
            let what = format!("get_range {key} {offset}+{len}");
            let got = ctx(store.get_range(&key, offset, len).await, &what)?;
            // In range, so the conversions cannot truncate.
            let want = &data[offset as usize..(offset + len) as usize];
            same(&what, &got, want)?;
        }
        let bad = [
            (size - 5, 10),
            (size, 1),
            (size + 1, 0),
            (u64::MAX, 1),
            (1, u64::MAX),
        ];
        for (offset, len) in bad {
            let what = format!("get_range {key} {offset}+{len}");
            expect_err(
                store.get_range(&key, offset, len).await,
                what,
                Expect::OutOfRange,
            )?;
        }

        let empty = format!("{p}empty");
        put_expect(store, &empty, Bytes::new(), PutOutcome::Created).await?;
        let got = ctx(store.get_range(&empty, 0, 0).await, "get_range empty 0+0")?;
        same("get_range empty 0+0", &got, &[])?;
        expect_err(
            store.get_range(&empty, 0, 1).await,
            "get_range empty 0+1",
            Expect::OutOfRange,
        )
    })
    .await
}

/// `list` returns exactly the keys under a string prefix, nested ones
/// included, sorted by key (byte order), with sizes (modification times are
/// checked by [`modified_time`]).
pub async fn list(store: &dyn Store) -> Result<(), String> {
    scoped(store, "list", |store, p| async move {
        // Chosen so that byte order differs from a per-directory walk:
        // "x-1" < "x/..." and "x/b/..." < "x/ba".
        let names = ["x/a", "x/b/c", "x/b/d/e", "x/ba", "xy/z", "x-1", "y/a"];
        let mut all = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let key = format!("{p}{name}");
            let size = 3 * i + 1;
            put_expect(store, &key, random_bytes(size), PutOutcome::Created).await?;
            all.push(ObjectMeta {
                key,
                size: size as u64,
                modified: None,
            });
        }
        all.sort_by(|a, b| a.key.cmp(&b.key));
        let subs = [
            "", "x", "x/", "x/b", "x/b/", "x/a", "xy", "y/", "empty/", "nothing", "x/b/d/e/",
        ];
        for sub in subs {
            let prefix = format!("{p}{sub}");
            let got = ctx(store.list(&prefix).await, format_args!("list {prefix:?}"))?;
            let want: Vec<&ObjectMeta> =
                all.iter().filter(|m| m.key.starts_with(&prefix)).collect();
            if got
                .iter()
                .map(key_size)
                .ne(want.iter().copied().map(key_size))
            {
                return Err(format!(
                    "list {prefix:?} returned {:?}, expected {:?}",
                    summary(got.iter()),
                    summary(want.into_iter())
                ));
            }
        }
        Ok(())
    })
    .await
}

/// Right after `put_if_absent`, `head` and `list` report the object's
/// modification time: present, the same in both, and within
/// [`MAX_CLOCK_SKEW`] of this machine's clock (the stores under test run on
/// or near this machine).
pub async fn modified_time(store: &dyn Store) -> Result<(), String> {
    scoped(store, "modified_time", |store, p| async move {
        let key = format!("{p}obj");
        put_expect(store, &key, random_bytes(10), PutOutcome::Created).await?;
        let head = ctx(store.head(&key).await, format_args!("head {key}"))?;
        let listed = ctx(store.list(&p).await, format_args!("list {p}"))?;
        let now = SystemTime::now();
        let [listed] = &listed[..] else {
            return Err(format!(
                "list {p} returned {:?}, expected [{key}]",
                summary(listed.iter())
            ));
        };
        let Some(head_time) = head.modified else {
            return Err(format!("head {key} reports no modification time"));
        };
        let Some(list_time) = listed.modified else {
            return Err(format!("list {p} reports no modification time for {key}"));
        };
        if head_time != list_time {
            return Err(format!(
                "{key} modified: head reports {head_time:?}, list reports {list_time:?}"
            ));
        }
        let skew = match now.duration_since(head_time) {
            Ok(behind) => behind,
            Err(ahead) => ahead.duration(),
        };
        if skew > MAX_CLOCK_SKEW {
            return Err(format!(
                "{key} modified {head_time:?} is {skew:?} away from now ({now:?})"
            ));
        }
        Ok(())
    })
    .await
}

/// A deleted object is gone for `get`, `head` and `list`; deleting a missing
/// key succeeds; the key can be created again.
pub async fn delete(store: &dyn Store) -> Result<(), String> {
    scoped(store, "delete", |store, p| async move {
        let key = format!("{p}dir/obj");
        let keep = format!("{p}dir/keep");
        put_expect(store, &key, random_bytes(10), PutOutcome::Created).await?;
        put_expect(store, &keep, random_bytes(11), PutOutcome::Created).await?;
        ctx(store.delete(&key).await, format_args!("delete {key}"))?;
        expect_err(
            store.get(&key).await,
            format_args!("get deleted {key}"),
            Expect::NotFound,
        )?;
        expect_err(
            store.head(&key).await,
            format_args!("head deleted {key}"),
            Expect::NotFound,
        )?;
        let listed = ctx(store.list(&p).await, format_args!("list {p}"))?;
        if listed.iter().map(|m| m.key.as_str()).ne([keep.as_str()]) {
            return Err(format!(
                "list {p} after delete returned {:?}, expected [{keep}]",
                summary(listed.iter())
            ));
        }
        ctx(
            store.delete(&key).await,
            format_args!("second delete {key}"),
        )?;
        let never = format!("{p}never/existed");
        ctx(
            store.delete(&never).await,
            format_args!("delete missing {never}"),
        )?;
        let again = random_bytes(12);
        put_expect(store, &key, again.clone(), PutOutcome::Created).await?;
        let got = ctx(store.get(&key).await, format_args!("get recreated {key}"))?;
        same(format_args!("get recreated {key}"), &got, &again)
    })
    .await
}

/// Keys breaking the key rules are refused with `InvalidKey` by every method,
/// and nothing gets written.
pub async fn invalid_keys(store: &dyn Store) -> Result<(), String> {
    scoped(store, "invalid_keys", |store, p| async move {
        let mut keys: Vec<String> = ["../x", "/abs", "a//b", "", "a/./b", "a/", "a/..", "A"]
            .map(String::from)
            .into();
        for bad in ["a//b", "../x", "up/..", "trailing/", "Upper", "sp ace", "é"] {
            keys.push(format!("{p}{bad}"));
        }
        keys.push(format!("{p}{}", "x".repeat(512)));
        for key in &keys {
            let put = store.put_if_absent(key, Bytes::from_static(b"x")).await;
            expect_err(put, format_args!("put {key:?}"), Expect::InvalidKey)?;
            expect_err(
                store.get(key).await,
                format_args!("get {key:?}"),
                Expect::InvalidKey,
            )?;
            expect_err(
                store.head(key).await,
                format_args!("head {key:?}"),
                Expect::InvalidKey,
            )?;
            let range = store.get_range(key, 0, 0).await;
            expect_err(range, format_args!("get_range {key:?}"), Expect::InvalidKey)?;
            expect_err(
                store.delete(key).await,
                format_args!("delete {key:?}"),
                Expect::InvalidKey,
            )?;
        }
        for prefix in ["/abs", "../", "a//", "a/../b"] {
            let listed = store.list(prefix).await;
            expect_err(listed, format_args!("list {prefix:?}"), Expect::InvalidKey)?;
        }
        let listed = ctx(store.list(&p).await, format_args!("list {p}"))?;
        if !listed.is_empty() {
            return Err(format!(
                "invalid puts wrote objects: {:?}",
                summary(listed.iter())
            ));
        }
        Ok(())
    })
    .await
}

/// 16 concurrent `put_if_absent` calls with different data for one key:
/// exactly one `Created`, the rest `AlreadyExists`, and the stored object is
/// the winner's data in full. Repeated for a few keys.
pub async fn concurrent_create(store: &dyn Store) -> Result<(), String> {
    scoped(store, "concurrent_create", |store, p| async move {
        for round in 0..3 {
            let key = format!("{p}race-{round}");
            // Different lengths, so a mix of two writers cannot go unnoticed.
            let datas: Vec<Bytes> = (0..16).map(|i| random_bytes(65_536 + 1031 * i)).collect();
            let puts = datas
                .iter()
                .map(|data| store.put_if_absent(&key, data.clone()))
                .collect();
            let outcomes = join_all(puts).await;
            let mut winners = Vec::new();
            for (i, outcome) in outcomes.into_iter().enumerate() {
                match outcome {
                    Ok(PutOutcome::Created) => winners.push(i),
                    Ok(PutOutcome::AlreadyExists) => {}
                    Err(e) => return Err(format!("concurrent put {key} #{i}: {e}")),
                }
            }
            let [winner] = winners[..] else {
                return Err(format!(
                    "concurrent puts of {key}: {} returned Created (#{winners:?}), expected exactly 1",
                    winners.len()
                ));
            };
            let got = ctx(store.get(&key).await, format_args!("get {key}"))?;
            same(
                format_args!("get {key} (winner #{winner})"),
                &got,
                &datas[winner],
            )?;
        }
        Ok(())
    })
    .await
}

/// How far a fresh object's modification time may be from this machine's clock.
const MAX_CLOCK_SKEW: Duration = Duration::from_secs(10 * 60);

/// Runs `body` with a fresh key prefix, cleans the prefix up, and labels any
/// error with the check's name.
async fn scoped<'a, F, Fut>(store: &'a dyn Store, check: &str, body: F) -> Result<(), String>
where
    F: FnOnce(&'a dyn Store, String) -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let prefix = format!("conformance-{:016x}/{check}/", rand::random::<u64>());
    let result = body(store, prefix.clone()).await;
    cleanup(store, &prefix).await;
    result.map_err(|e| format!("{check}: {e}"))
}

/// Best-effort removal of everything under `prefix`.
async fn cleanup(store: &dyn Store, prefix: &str) {
    let objects = match store.list(prefix).await {
        Ok(objects) => objects,
        Err(e) => {
            tracing::warn!(prefix, error = %e, "conformance cleanup: cannot list");
            return;
        }
    };
    for object in objects {
        if let Err(e) = store.delete(&object.key).await {
            tracing::warn!(key = object.key, error = %e, "conformance cleanup: cannot delete");
        }
    }
}

/// Polls all futures concurrently on the current task; outputs in input order.
async fn join_all<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (future, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    Poll::Ready(value) => *output = Some(value),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().flatten().collect()
}

fn random_bytes(len: usize) -> Bytes {
    let mut data = vec![0; len];
    rand::thread_rng().fill_bytes(&mut data);
    Bytes::from(data)
}

async fn put_expect(
    store: &dyn Store,
    key: &str,
    data: Bytes,
    want: PutOutcome,
) -> Result<(), String> {
    let got = ctx(
        store.put_if_absent(key, data).await,
        format_args!("put {key}"),
    )?;
    if got != want {
        return Err(format!("put {key} returned {got:?}, expected {want:?}"));
    }
    Ok(())
}

async fn head_expect(store: &dyn Store, key: &str, size: usize) -> Result<(), String> {
    let got = ctx(store.head(key).await, format_args!("head {key}"))?;
    let want = (key, size as u64);
    if key_size(&got) != want {
        return Err(format!(
            "head {key} returned {got:?}, expected {key} ({size} B)"
        ));
    }
    Ok(())
}

/// What the checks compare: `modified` differs from one write to the next.
fn key_size(meta: &ObjectMeta) -> (&str, u64) {
    (meta.key.as_str(), meta.size)
}

fn ctx<T>(result: Result<T, StoreError>, what: impl Display) -> Result<T, String> {
    result.map_err(|e| format!("{what}: {e}"))
}

/// The error a check requires.
#[derive(Debug, Clone, Copy)]
enum Expect {
    NotFound,
    OutOfRange,
    InvalidKey,
}

impl Expect {
    fn accepts(self, e: &StoreError) -> bool {
        match self {
            Expect::NotFound => e.is_not_found(),
            Expect::OutOfRange => matches!(e, StoreError::OutOfRange { .. }),
            Expect::InvalidKey => matches!(e, StoreError::InvalidKey { .. }),
        }
    }
}

/// Requires `result` to be the error `want`.
fn expect_err<T>(
    result: Result<T, StoreError>,
    what: impl Display,
    want: Expect,
) -> Result<(), String> {
    match result {
        Err(e) if want.accepts(&e) => Ok(()),
        Err(e) => Err(format!("{what}: expected {want:?}, got error: {e}")),
        Ok(_) => Err(format!("{what}: expected {want:?}, got success")),
    }
}

/// Compares contents without dumping megabytes into the message.
fn same(what: impl Display, got: &[u8], want: &[u8]) -> Result<(), String> {
    if got == want {
        return Ok(());
    }
    match got.iter().zip(want).position(|(a, b)| a != b) {
        Some(at) => Err(format!("{what}: content differs at byte {at}")),
        None => Err(format!(
            "{what}: returned {} bytes, expected {}",
            got.len(),
            want.len()
        )),
    }
}

/// Keys and sizes, for messages.
fn summary<'a>(objects: impl Iterator<Item = &'a ObjectMeta>) -> Vec<String> {
    objects
        .map(|m| format!("{} ({} B)", m.key, m.size))
        .collect()
}
