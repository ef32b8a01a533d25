//! [`LocalStore`]: a repository in a local directory (a USB disk, a NAS mount).
//!
//! Object key `a/b/c` is the file `<root>/a/b/c`. Writes go to a uniquely
//! named file in `<root>/.tmp/`, are fsynced, and are then published with
//! `link(2)`, which fails with `EEXIST` instead of replacing an existing file:
//! that gives atomic, never-overwriting create-if-absent, and readers never see
//! a partial object. New directories and the final parent directory are
//! fsynced before `Created` is returned, so a returned `Created` survives a
//! crash or power loss.
//!
//! Permissions: objects are created `0600` and directories `0700` (both further
//! restricted by the umask). The content is encrypted, but names, sizes and
//! timestamps are metadata, and the repository may sit on a disk other local
//! users can reach, so only the owner gets access.
//!
//! Limitations compared to object storage:
//! - a key cannot also be a "directory" of other keys: with `a/b` stored,
//!   storing `a` fails (and vice versa) with a non-retryable error;
//! - keys whose first segment is `.tmp` are reserved;
//! - `delete` leaves empty directories behind (removing them would race with
//!   concurrent puts into the same directory);
//! - the filesystem must support hard links;
//! - a crash can leave stray files in `.tmp/`; anything there may be removed
//!   while no btrship process uses the repository.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, ErrorKind, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use bytes::Bytes;

use crate::store::{validate_key, validate_prefix, ObjectMeta, PutOutcome, Store, StoreError};

/// Directory under the root for in-flight writes; never listed.
const TMP_DIR: &str = ".tmp";
const FILE_MODE: u32 = 0o600;
const DIR_MODE: u32 = 0o700;

/// A repository stored as a directory tree. See the module documentation.
#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
}

impl LocalStore {
    /// Creates the repository directory (and missing parents, like `mkdir -p`)
    /// durably, then opens it. An existing directory is simply opened.
    pub fn create(root: impl AsRef<Path>) -> Result<Self, StoreError> {
        let root = absolute(root.as_ref())?;
        let missing: Vec<&Path> = root
            .ancestors()
            .take_while(|p| matches!(p.try_exists(), Ok(false)))
            .collect();
        for dir in missing.into_iter().rev() {
            mkdir_durable(dir).map_err(|e| path_err(dir, e))?;
        }
        Self::open(root)
    }

    /// Opens an existing repository directory.
    ///
    /// A missing root or one that is not a directory is a [`StoreError::Io`]
    /// whose message names the path.
    pub fn open(root: impl AsRef<Path>) -> Result<Self, StoreError> {
        let root = absolute(root.as_ref())?;
        match fs::metadata(&root) {
            Ok(md) if md.is_dir() => Ok(LocalStore { root }),
            Ok(_) => Err(path_err(
                &root,
                io::Error::new(
                    ErrorKind::NotADirectory,
                    "repository path is not a directory",
                ),
            )),
            Err(e) if e.kind() == ErrorKind::NotFound => Err(path_err(
                &root,
                io::Error::new(ErrorKind::NotFound, "repository directory does not exist"),
            )),
            Err(e) => Err(path_err(&root, e)),
        }
    }

    /// The repository directory (absolute).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Validates `key` for this store and returns its file path.
    fn path_of(&self, key: &str) -> Result<PathBuf, StoreError> {
        validate_key(key)?;
        if key.split('/').next() == Some(TMP_DIR) {
            return Err(StoreError::InvalidKey {
                key: key.to_owned(),
                reason: "the '.tmp' directory is reserved by the local store",
            });
        }
        Ok(self.root.join(key))
    }
}

#[async_trait::async_trait]
impl Store for LocalStore {
    fn location(&self) -> String {
        format!("file://{}", self.root.display())
    }

    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<PutOutcome, StoreError> {
        let path = self.path_of(key)?;
        let root = self.root.clone();
        let key = key.to_owned();
        blocking(key.clone(), move || {
            put_blocking(&root, &path, &key, &data).map_err(|e| io_err(&key, e))?
        })
        .await
    }

    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        let path = self.path_of(key)?;
        let key = key.to_owned();
        blocking(key.clone(), move || {
            let (mut file, size) = open_object(&path, &key)?;
            let mut buf = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
            file.read_to_end(&mut buf).map_err(|e| io_err(&key, e))?;
            Ok(Bytes::from(buf))
        })
        .await
    }

    async fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Bytes, StoreError> {
        let path = self.path_of(key)?;
        let key = key.to_owned();
        blocking(key.clone(), move || {
            let (file, size) = open_object(&path, &key)?;
            if offset.checked_add(len).is_none_or(|end| end > size) {
                return Err(StoreError::OutOfRange {
                    key,
                    offset,
                    len,
                    size,
                });
            }
            // len <= size, which already fit in memory-addressable file offsets.
            let len = usize::try_from(len).map_err(|_| StoreError::Other {
                key: key.clone(),
                message: format!("range of {len} bytes does not fit in memory"),
                retryable: false,
            })?;
            let mut buf = vec![0; len];
            file.read_exact_at(&mut buf, offset)
                .map_err(|e| io_err(&key, e))?;
            Ok(Bytes::from(buf))
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        validate_prefix(prefix)?;
        let root = self.root.clone();
        let prefix = prefix.to_owned();
        blocking(prefix.clone(), move || {
            list_blocking(&root, &prefix).map_err(|e| io_err(&prefix, e))
        })
        .await
    }

    async fn head(&self, key: &str) -> Result<ObjectMeta, StoreError> {
        let path = self.path_of(key)?;
        let key = key.to_owned();
        blocking(key.clone(), move || match fs::metadata(&path) {
            Ok(md) if md.is_file() => Ok(ObjectMeta {
                key,
                size: md.len(),
                modified: md.modified().ok(),
            }),
            Ok(_) => Err(StoreError::NotFound { key }),
            Err(e) => Err(read_err(&key, e)),
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let path = self.path_of(key)?;
        let key = key.to_owned();
        blocking(key.clone(), move || {
            match fs::remove_file(&path) {
                Ok(()) => {}
                // Nothing there, or a directory of other keys: no such object.
                Err(e) if is_absent(&e) || e.kind() == ErrorKind::IsADirectory => return Ok(()),
                Err(e) => return Err(io_err(&key, e)),
            }
            fsync_parent(&path).map_err(|e| io_err(&key, e))
        })
        .await
    }
}

/// Runs blocking filesystem work off the async worker threads.
async fn blocking<T, F>(key: String, f: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, StoreError> + Send + 'static,
{
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(StoreError::Other {
            key,
            message: format!("blocking I/O task failed: {e}"),
            retryable: false,
        })
    })
}

/// The body of `put_if_absent`; the outer `Result` carries plain I/O errors,
/// the inner one store-level refusals.
fn put_blocking(
    root: &Path,
    path: &Path,
    key: &str,
    data: &[u8],
) -> io::Result<Result<PutOutcome, StoreError>> {
    let tmp = TempFile::create(&root.join(TMP_DIR))?;
    {
        let mut file = &tmp.file;
        file.write_all(data)?;
        file.sync_all()?;
    }

    // Create (or confirm) every parent directory below the root and make its
    // entry durable. The parent is fsynced even when the directory already
    // existed: a concurrent put may have just created it and not fsynced yet.
    let rel = path.strip_prefix(root).map_err(io::Error::other)?;
    for dir in rel
        .ancestors()
        .skip(1)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
    {
        if dir.as_os_str().is_empty() {
            continue;
        }
        match mkdir_durable(&root.join(dir)) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotADirectory => return Ok(Err(conflict(key))),
            Err(e) => return Err(e),
        }
    }

    match fs::hard_link(&tmp.path, path) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {
            return Ok(match fs::symlink_metadata(path) {
                Ok(md) if md.is_file() => Ok(PutOutcome::AlreadyExists),
                _ => Err(conflict(key)),
            });
        }
        Err(e) if e.kind() == ErrorKind::NotADirectory => return Ok(Err(conflict(key))),
        Err(e) => return Err(e),
    }
    fsync_parent(path)?;
    Ok(Ok(PutOutcome::Created))
}

fn conflict(key: &str) -> StoreError {
    StoreError::Other {
        key: key.to_owned(),
        message: format!(
            "cannot store {key}: a local store cannot hold both a key and other keys below it"
        ),
        retryable: false,
    }
}

/// A uniquely named, exclusively created file in `.tmp/`, removed on drop
/// (after a successful `link` the published name keeps the data alive).
struct TempFile {
    path: PathBuf,
    file: File,
}

impl TempFile {
    fn create(dir: &Path) -> io::Result<Self> {
        match DirBuilder::new().mode(DIR_MODE).create(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let mut attempts = 0;
        loop {
            let path = dir.join(format!("{:032x}", rand::random::<u128>()));
            let opened = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(FILE_MODE)
                .open(&path);
            match opened {
                Ok(file) => return Ok(TempFile { path, file }),
                // 128 random bits: a collision means something is badly wrong.
                Err(e) if e.kind() == ErrorKind::AlreadyExists && attempts < 3 => attempts += 1,
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_file(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot remove temporary file");
        }
    }
}

/// Opens an object for reading: its file and size. Directories and missing
/// paths are `NotFound`.
fn open_object(path: &Path, key: &str) -> Result<(File, u64), StoreError> {
    let file = File::open(path).map_err(|e| read_err(key, e))?;
    let md = file.metadata().map_err(|e| io_err(key, e))?;
    if !md.is_file() {
        return Err(StoreError::NotFound {
            key: key.to_owned(),
        });
    }
    Ok((file, md.len()))
}

fn list_blocking(root: &Path, prefix: &str) -> io::Result<Vec<ObjectMeta>> {
    // Only the directory named by the prefix's complete segments can hold
    // matches; its entries are filtered by the trailing partial segment.
    let (dir_key, partial) = prefix.rsplit_once('/').unwrap_or(("", prefix));
    if dir_key.split('/').next() == Some(TMP_DIR) {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    let mut stack = vec![(root.join(dir_key), dir_key.to_owned())];
    let mut top = true;
    while let Some((dir, dir_key)) = stack.pop() {
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if is_absent(&e) => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                tracing::warn!(dir = %dir.display(), name = ?name, "ignoring non-UTF-8 name in store");
                continue;
            };
            if (top && !name.starts_with(partial)) || (dir_key.is_empty() && name == TMP_DIR) {
                continue;
            }
            let key = if dir_key.is_empty() {
                name.to_owned()
            } else {
                format!("{dir_key}/{name}")
            };
            if validate_key(&key).is_err() {
                tracing::warn!(path = %entry.path().display(), "ignoring file that is not a valid object key");
                continue;
            }
            let file_type = entry.file_type()?;
            if file_type.is_dir() {
                stack.push((entry.path(), key));
            } else if file_type.is_file() {
                match entry.metadata() {
                    Ok(md) => out.push(ObjectMeta {
                        key,
                        size: md.len(),
                        modified: md.modified().ok(),
                    }),
                    Err(e) if is_absent(&e) => {} // deleted meanwhile
                    Err(e) => return Err(e),
                }
            } else {
                tracing::warn!(path = %entry.path().display(), "ignoring non-regular file in store");
            }
        }
        top = false;
    }
    out.sort_unstable_by(|a, b| a.key.cmp(&b.key));
    Ok(out)
}

/// Creates `dir` if missing and makes its directory entry durable.
fn mkdir_durable(dir: &Path) -> io::Result<()> {
    match DirBuilder::new().mode(DIR_MODE).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    fsync_parent(dir)
}

fn fsync_parent(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(parent) => File::open(parent)?.sync_all(),
        None => Ok(()),
    }
}

fn absolute(path: &Path) -> Result<PathBuf, StoreError> {
    std::path::absolute(path).map_err(|e| path_err(path, e))
}

/// The path is missing, or a component of it is a file.
fn is_absent(e: &io::Error) -> bool {
    matches!(e.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory)
}

fn read_err(key: &str, e: io::Error) -> StoreError {
    if is_absent(&e) {
        StoreError::NotFound {
            key: key.to_owned(),
        }
    } else {
        io_err(key, e)
    }
}

fn io_err(key: &str, source: io::Error) -> StoreError {
    StoreError::Io {
        key: key.to_owned(),
        source,
    }
}

/// Repository-level errors are reported against the path itself.
fn path_err(path: &Path, source: io::Error) -> StoreError {
    io_err(&path.display().to_string(), source)
}
