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

/// Maps an error chain to its exit code: the first cause we recognise wins.
pub fn code_of(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        if let Some(e) = cause.downcast_ref::<UserError>() {
            return e.code;
        }
        if let Some(e) = cause.downcast_ref::<RepoError>() {
            return match e {
                RepoError::NoRepository { .. } => NOT_FOUND,
                _ if e.is_wrong_key() => KEY,
                RepoError::Store(s) => store_code(s),
                RepoError::Task(_) => FAILURE,
                _ => DAMAGED,
            };
        }
        if let Some(e) = cause.downcast_ref::<CryptoError>() {
            return if e.is_wrong_key() { KEY } else { DAMAGED };
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
    if e.is_not_found() {
        DAMAGED // a referenced object is missing
    } else {
        STORE
    }
}
