//! The object-store abstraction every repository backend implements.
//!
//! The [`Store`] trait is shaped like object storage (S3 and friends), not like
//! a filesystem: flat string keys, whole-object writes that never overwrite,
//! whole or ranged reads, prefix listing, and a delete that only garbage
//! collection uses. Backends are deliberately dumb: retries, rate limits and
//! counters are layered on top as wrappers, which is why every error can say
//! whether it is worth retrying ([`StoreError::is_retryable`]).
//!
//! Keys are restricted (see [`validate_key`]) so that the same key is valid and
//! means the same thing on every backend, including a plain directory tree.

use bytes::Bytes;

/// Longest accepted key, in bytes.
pub const MAX_KEY_LEN: usize = 512;

/// An object as reported by [`Store::list`] and [`Store::head`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    /// The object's full key.
    pub key: String,
    /// The object's size in bytes.
    pub size: u64,
    /// When the store last wrote the object, by the store's clock (S3
    /// LastModified, a file's mtime); None when the backend does not say.
    /// Garbage collection takes ages from this, never from the local clock.
    pub modified: Option<std::time::SystemTime>,
}

/// What [`Store::put_if_absent`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// The object did not exist and now does, durably.
    Created,
    /// An object with that key already existed; it was left untouched and the
    /// new data was discarded (its content was not compared).
    AlreadyExists,
}

/// Errors from a [`Store`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The object does not exist.
    #[error("object {key} not found in the store")]
    NotFound {
        /// The key that was looked up.
        key: String,
    },
    /// The key (or list prefix) breaks the key rules of [`validate_key`] or a
    /// backend-specific restriction.
    #[error("invalid object key {key:?}: {reason}")]
    InvalidKey {
        /// The offending key or prefix.
        key: String,
        /// Which rule it breaks.
        reason: &'static str,
    },
    /// A ranged read reaches past the end of the object.
    #[error("range {offset}+{len} is beyond the end of object {key} ({size} bytes)")]
    OutOfRange {
        /// The object read.
        key: String,
        /// Requested start.
        offset: u64,
        /// Requested length.
        len: u64,
        /// Actual object size.
        size: u64,
    },
    /// Local I/O failed (disk full, permission denied, EIO, ...).
    #[error("store I/O on {key}: {source}")]
    Io {
        /// The object (or, for repository-level operations, the path) involved.
        key: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The store refused the credentials or the operation (HTTP 403, bad
    /// or expired credentials, a local permission denied). Not retryable:
    /// an operator must fix credentials or permissions.
    #[error("{message}")]
    Denied {
        /// The object involved, or empty.
        key: String,
        /// What was refused and what to check.
        message: String,
    },
    /// The container (bucket) the repository lives in does not exist.
    #[error("{message}")]
    NoContainer {
        /// Which container, where, and what to do.
        message: String,
    },
    /// Anything else a backend reports (HTTP status, protocol error, ...).
    #[error("store: {message}")]
    Other {
        /// The object involved, or empty.
        key: String,
        /// Human-readable description.
        message: String,
        /// Whether repeating the same request may succeed.
        retryable: bool,
    },
}

impl StoreError {
    /// Whether repeating the same request may succeed.
    ///
    /// Only [`StoreError::Other`] with `retryable: true` and I/O errors of a
    /// transient kind (timed out, interrupted, would block) qualify; disk full,
    /// permission denied, missing objects and bad keys do not.
    pub fn is_retryable(&self) -> bool {
        use std::io::ErrorKind;
        match self {
            StoreError::Other { retryable, .. } => *retryable,
            StoreError::Io { source, .. } => matches!(
                source.kind(),
                ErrorKind::TimedOut | ErrorKind::Interrupted | ErrorKind::WouldBlock
            ),
            _ => false,
        }
    }

    /// Whether only an operator can fix it (credentials, permissions, a
    /// missing container): retrying, now or later, cannot succeed.
    pub fn is_permanent(&self) -> bool {
        match self {
            StoreError::Denied { .. } | StoreError::NoContainer { .. } => true,
            StoreError::Io { source, .. } => source.kind() == std::io::ErrorKind::PermissionDenied,
            _ => false,
        }
    }

    /// Whether the error means "no object with this key".
    pub fn is_not_found(&self) -> bool {
        matches!(self, StoreError::NotFound { .. })
    }

    /// The key (or path, or prefix) the error is about; may be empty.
    pub fn key(&self) -> &str {
        match self {
            StoreError::NotFound { key }
            | StoreError::InvalidKey { key, .. }
            | StoreError::OutOfRange { key, .. }
            | StoreError::Io { key, .. }
            | StoreError::Denied { key, .. }
            | StoreError::Other { key, .. } => key,
            StoreError::NoContainer { .. } => "",
        }
    }
}

/// S3 Object Lock retention for every object a store writes (FORMAT.md
/// §12b): kept until `duration` after the write, in `mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectLock {
    pub mode: LockMode,
    pub duration: std::time::Duration,
}

/// S3 Object Lock retention modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Nobody can shorten the retention or delete the version before it
    /// ends, the account's root user included.
    Compliance,
    /// Users with `s3:BypassGovernanceRetention` can.
    Governance,
}

impl LockMode {
    pub fn name(self) -> &'static str {
        match self {
            LockMode::Compliance => "COMPLIANCE",
            LockMode::Governance => "GOVERNANCE",
        }
    }

    pub fn parse(s: &str) -> Option<LockMode> {
        match s.to_ascii_uppercase().as_str() {
            "COMPLIANCE" => Some(LockMode::Compliance),
            "GOVERNANCE" => Some(LockMode::Governance),
            _ => None,
        }
    }
}

fn unsupported(key: &str, what: &str) -> StoreError {
    StoreError::Other {
        key: key.to_owned(),
        message: format!("{what} needs an S3 bucket with Object Lock"),
        retryable: false,
    }
}

/// An object store holding one repository.
///
/// All methods validate their key with [`validate_key`] (or the prefix with
/// [`validate_prefix`]) and fail with [`StoreError::InvalidKey`] before doing
/// any I/O.
#[async_trait::async_trait]
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Human-readable location for messages (e.g. "file:///srv/repo").
    fn location(&self) -> String;

    /// Stores `data` under `key` unless an object with that key exists (then
    /// [`PutOutcome::AlreadyExists`], existing object untouched).
    ///
    /// Concurrent calls for one key are decided atomically where the backend
    /// can (see `conformance::Capabilities::atomic_create`): exactly one wins
    /// and readers never see a partial object.
    /// Once `Ok(Created)` returns the object is durable.
    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<PutOutcome, StoreError>;

    /// The whole object.
    async fn get(&self, key: &str) -> Result<Bytes, StoreError>;

    /// Exactly `len` bytes starting at `offset`. `len == 0` is allowed and
    /// returns an empty buffer; `offset + len > size` is
    /// [`StoreError::OutOfRange`] (no short reads).
    async fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Bytes, StoreError>;

    /// All objects whose key starts with `prefix` (a plain string prefix, so
    /// `"ab"` matches `"abc"` and `"ab/c"`), recursively, sorted by key
    /// (byte order). The empty prefix lists everything.
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError>;

    /// Size of the object, without reading it.
    async fn head(&self, key: &str) -> Result<ObjectMeta, StoreError>;

    /// Removes the object. Idempotent: deleting a missing key succeeds, as on
    /// S3, so that an interrupted garbage collection can simply be rerun.
    ///
    /// Only for an explicit garbage-collection step; the shipping path never deletes.
    async fn delete(&self, key: &str) -> Result<(), StoreError>;

    /// Object Lock: every object written from now on is locked per `lock`
    /// (stores without Object Lock ignore it; `init` checks support first).
    fn set_object_lock(&self, _lock: Option<ObjectLock>) {}

    /// Does the bucket have Object Lock enabled? (false: not an S3 store)
    async fn object_lock_enabled(&self) -> Result<bool, StoreError> {
        Ok(false)
    }

    /// Extends the retention of `key`'s current version to `until`.
    async fn extend_retention(
        &self,
        key: &str,
        _until: std::time::SystemTime,
    ) -> Result<(), StoreError> {
        Err(unsupported(key, "extending a retention"))
    }
}

fn invalid(key: &str, reason: &'static str) -> StoreError {
    StoreError::InvalidKey {
        key: key.to_owned(),
        reason,
    }
}

fn check_chars(key: &str) -> Result<(), StoreError> {
    if key.len() > MAX_KEY_LEN {
        return Err(invalid(key, "longer than 512 bytes"));
    }
    let allowed = |b: u8| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-' | b'/');
    if !key.bytes().all(allowed) {
        return Err(invalid(
            key,
            "only a-z, 0-9, '.', '_', '-' and '/' separators are allowed",
        ));
    }
    if key.starts_with('/') {
        return Err(invalid(key, "starts with '/'"));
    }
    Ok(())
}

fn check_segment(key: &str, segment: &str) -> Result<(), StoreError> {
    match segment {
        "" => Err(invalid(key, "empty path segment")),
        "." | ".." => Err(invalid(key, "'.' or '..' path segment")),
        _ => Ok(()),
    }
}

/// Checks the key rules shared by all backends: non-empty, at most
/// [`MAX_KEY_LEN`] bytes, ASCII `[a-z0-9._-]` with `/` separators, no leading
/// or trailing `/`, and no empty, `.` or `..` segments.
pub fn validate_key(key: &str) -> Result<(), StoreError> {
    if key.is_empty() {
        return Err(invalid(key, "empty key"));
    }
    check_chars(key)?;
    if key.ends_with('/') {
        return Err(invalid(key, "ends with '/'"));
    }
    key.split('/').try_for_each(|s| check_segment(key, s))
}

/// Checks a [`Store::list`] prefix: empty, or the start of a possible key.
///
/// Every complete segment (before the last `/`) must be a valid key segment;
/// the trailing partial segment only has to use allowed characters, since it
/// is matched as a string prefix and never used as a path.
pub fn validate_prefix(prefix: &str) -> Result<(), StoreError> {
    check_chars(prefix)?;
    match prefix.rsplit_once('/') {
        Some((dirs, _partial)) => dirs.split('/').try_for_each(|s| check_segment(prefix, s)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        for ok in ["a", "a/b", "packs/0a/0a1b.pack", ".x/..y/z.", "a_b-c"] {
            assert!(validate_key(ok).is_ok(), "{ok}");
        }
        let long = "a".repeat(MAX_KEY_LEN + 1);
        for bad in [
            "", "/a", "a/", "a//b", "a/./b", "../x", "a/..", ".", "A", "a b", "é", &long,
        ] {
            assert!(
                matches!(validate_key(bad), Err(StoreError::InvalidKey { .. })),
                "{bad:?}"
            );
        }
        assert!(validate_key(&"a".repeat(MAX_KEY_LEN)).is_ok());
    }

    #[test]
    fn prefixes() {
        for ok in ["", "a", "a/", "a/b", "a/.", "a/..", "."] {
            assert!(validate_prefix(ok).is_ok(), "{ok:?}");
        }
        for bad in ["/", "/a", "a//", "../", "a/../b", "./a", "A"] {
            assert!(validate_prefix(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn retryable() {
        let io = |kind| StoreError::Io {
            key: "k".into(),
            source: std::io::Error::from(kind),
        };
        assert!(!io(std::io::ErrorKind::StorageFull).is_retryable());
        assert!(io(std::io::ErrorKind::TimedOut).is_retryable());
        assert!(StoreError::NotFound { key: "k".into() }.is_not_found());
        let other = StoreError::Other {
            key: String::new(),
            message: "503".into(),
            retryable: true,
        };
        assert!(other.is_retryable() && !other.is_not_found());
    }
}
