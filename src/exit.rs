//! Exit codes, in one place. Documented in README.md; scripts rely on them.

use btrship_crypto::{CryptoError, KeyFileError};
use btrship_snapshot::SnapshotError;
use btrship_upload::{RepoError, StoreError};

/// Success.
pub const OK: u8 = 0;
/// Anything not classified below.
pub const FAILURE: u8 = 1;
/// Bad command line or argument (includes unparseable times).
pub const USAGE: u8 = 2;
/// Something named does not exist: repository, share config, snapshot at that time, path.
pub const NOT_FOUND: u8 = 3;
/// Wrong key, or a key file that cannot be used.
pub const KEY: u8 = 4;
/// The repository is damaged: authentication failed, data missing, `check` found problems.
pub const DAMAGED: u8 = 5;
/// The share path is not a btrfs subvolume (or not btrfs at all).
pub const NOT_BTRFS: u8 = 6;
/// The restore target is unusable (not empty, not writable, disk full).
pub const TARGET: u8 = 7;
/// The store could not be reached or failed in a way worth retrying later.
pub const STORE: u8 = 8;
/// Restore finished but some paths could not be restored (the repository
/// data they need is damaged or missing): they are listed, everything else
/// is restored exactly.
pub const PARTIAL: u8 = 9;
/// `status`: the share is not protected as configured (the daemon failed,
/// died or stalled, the spool is full, the store fails or does not answer).
pub const UNHEALTHY: u8 = 10;
/// The repository was written in a format version this btrship does not
/// know: upgrade btrship.
pub const UNSUPPORTED: u8 = 11;
/// The store refused access (credentials, bucket policy, a local
/// permission): fix the credentials or permissions.
pub const DENIED: u8 = 12;

/// Exit codes that mean "retrying cannot help; an operator must act". The
/// daemon stops on them (its unit lists them in `RestartPreventExitStatus=`);
/// every other failure is retried with backoff.
pub const PERMANENT: &[u8] = &[USAGE, NOT_FOUND, KEY, NOT_BTRFS, UNSUPPORTED, DENIED];

/// Whether `err` is permanent (see [`PERMANENT`]).
pub fn is_permanent(err: &anyhow::Error) -> bool {
    PERMANENT.contains(&code_of(err))
}

/// An error with a chosen exit code and a complete one-line message.
#[derive(Debug)]
pub struct UserError {
    pub code: u8,
    pub message: String,
}

impl UserError {
    pub fn new(code: u8, message: impl Into<String>) -> Self {
        UserError {
            code,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for UserError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for UserError {}

/// Maps an error chain to its exit code: the first cause we recognise wins;
/// an otherwise unclassified failure whose cause is a refused permission
/// (EPERM, EACCES: e.g. a missing capability under a hardened unit) is
/// [`DENIED`], so that the daemon stops instead of restarting in a loop.
pub fn code_of(err: &anyhow::Error) -> u8 {
    match classify(err) {
        FAILURE if permission_refused(err) => DENIED,
        code => code,
    }
}

fn permission_refused(err: &anyhow::Error) -> bool {
    err.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::PermissionDenied)
    })
}

fn classify(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        if let Some(e) = cause.downcast_ref::<UserError>() {
            return e.code;
        }
        if let Some(e) = cause.downcast_ref::<RepoError>() {
            return match e {
                RepoError::NoRepository { .. } => NOT_FOUND,
                RepoError::UnsupportedVersion { .. } => UNSUPPORTED,
                _ if e.is_wrong_key() => KEY,
                RepoError::Store(s) => store_code(s),
                RepoError::Task(_) => FAILURE,
                _ => DAMAGED,
            };
        }
        if let Some(e) = cause.downcast_ref::<CryptoError>() {
            return if e.is_wrong_key() || e.is_ship_only() {
                KEY
            } else {
                DAMAGED
            };
        }
        if cause.downcast_ref::<KeyFileError>().is_some() {
            return KEY;
        }
        if let Some(e) = cause.downcast_ref::<StoreError>() {
            return store_code(e);
        }
        if let Some(e) = cause.downcast_ref::<SnapshotError>() {
            return match e {
                SnapshotError::NotBtrfs { .. }
                | SnapshotError::NotSubvolume { .. }
                | SnapshotError::TopLevel { .. }
                | SnapshotError::NotDirectory { .. } => NOT_BTRFS,
                SnapshotError::NotFound { .. } => NOT_FOUND,
                _ => FAILURE,
            };
        }
    }
    FAILURE
}

fn store_code(e: &StoreError) -> u8 {
    match e {
        StoreError::NotFound { .. } => DAMAGED, // a referenced object is missing
        StoreError::NoContainer { .. } => NOT_FOUND,
        _ if e.is_permanent() => DENIED,
        _ => STORE,
    }
}

/// Whether a failure while shipping is permanent: the store refused the
/// credentials or the operation, or the container is gone. Narrower than
/// [`is_permanent`]: a file or snapshot that vanished under a running
/// daemon is not a reason to stop it.
pub fn is_permanent_store(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<StoreError>()
            .or_else(|| match cause.downcast_ref::<RepoError>() {
                Some(RepoError::Store(s)) => Some(s),
                _ => None,
            })
            .is_some_and(StoreError::is_permanent)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(e: StoreError) -> anyhow::Error {
        anyhow::Error::new(e).context("shipping 3 captures")
    }

    #[test]
    fn permanent_and_temporary_errors_are_told_apart() {
        let denied = store(StoreError::Denied {
            key: "packs/x".into(),
            message: "access denied".into(),
        });
        assert_eq!(code_of(&denied), DENIED);
        assert!(is_permanent(&denied) && is_permanent_store(&denied));
        let no_bucket = store(StoreError::NoContainer {
            message: "bucket b does not exist".into(),
        });
        assert_eq!(code_of(&no_bucket), NOT_FOUND);
        assert!(is_permanent(&no_bucket) && is_permanent_store(&no_bucket));
        let eperm = store(StoreError::Io {
            key: "packs".into(),
            source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        });
        assert_eq!(code_of(&eperm), DENIED);
        assert!(is_permanent_store(&eperm));
        // Through the repository error, too.
        let wrapped = anyhow::Error::new(RepoError::Store(StoreError::Denied {
            key: String::new(),
            message: "denied".into(),
        }));
        assert!(is_permanent_store(&wrapped));
        let version = anyhow::Error::new(RepoError::UnsupportedVersion {
            version: 2,
            supported: 1,
        });
        assert_eq!(code_of(&version), UNSUPPORTED);
        assert!(is_permanent(&version));

        for temporary in [
            store(StoreError::Other {
                key: String::new(),
                message: "503 slow down".into(),
                retryable: true,
            }),
            store(StoreError::Io {
                key: "packs".into(),
                source: std::io::Error::from(std::io::ErrorKind::TimedOut),
            }),
            store(StoreError::Io {
                key: "packs".into(),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            }),
        ] {
            assert!(!is_permanent(&temporary), "{temporary:#}");
            assert!(!is_permanent_store(&temporary), "{temporary:#}");
        }
        // A refused permission below an unclassified failure: denied.
        let eperm = anyhow::Error::new(std::io::Error::from_raw_os_error(libc::EPERM))
            .context("cannot mount the btrfs top level privately");
        assert_eq!(code_of(&eperm), DENIED);
        assert!(is_permanent(&eperm));
        // A vanished file is permanent for a one-shot command's exit code,
        // but not a reason to stop shipping.
        let gone = anyhow::Error::new(UserError::new(NOT_FOUND, "no such path"));
        assert!(is_permanent(&gone) && !is_permanent_store(&gone));
    }
}
