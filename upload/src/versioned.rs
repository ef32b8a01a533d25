//! Reading a repository through the object versions of a versioned S3
//! bucket (FORMAT.md §12a): after an attacker with write access overwrote
//! objects or hid them behind delete markers, every name still has the
//! versions written before, and the newest version that authenticates is
//! the one btrship wrote.
//!
//! [`VersionedStore`] lists every version once (ListObjectVersions over
//! the repository), then answers reads with, per name, the newest version
//! that the repository's `validate` accepts (sealed objects open under the
//! key, a pack hashes to its name). A name whose only version fits is
//! read directly; several versions cost one full read each until one
//! fits, once per name. Listings show every name that has a version with
//! content, whatever the newest version is. Writes and deletes go to the
//! bucket as usual (the reading commands make none).

use crate::s3::{ObjectVersion, S3Store};
use crate::store::{ObjectMeta, PutOutcome, Store, StoreError};
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::OnceCell;

/// Whether `bytes` is what btrship wrote under `name`.
pub type Validator = Arc<dyn Fn(&str, &[u8]) -> bool + Send + Sync>;

/// See the module documentation.
pub struct VersionedStore {
    inner: Arc<S3Store>,
    validate: Validator,
    /// Each name's versions with content, newest first.
    versions: OnceCell<HashMap<String, Vec<ObjectVersion>>>,
    /// The version chosen for a name (the newest that validated).
    chosen: Mutex<HashMap<String, String>>,
    /// Names whose newest version did not validate or was a delete
    /// marker, with the version read instead.
    recovered: Mutex<Vec<(String, String)>>,
}

impl std::fmt::Debug for VersionedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VersionedStore")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl VersionedStore {
    pub fn new(inner: Arc<S3Store>, validate: Validator) -> Self {
        VersionedStore {
            inner,
            validate,
            versions: OnceCell::new(),
            chosen: Mutex::default(),
            recovered: Mutex::default(),
        }
    }

    async fn versions(&self) -> Result<&HashMap<String, Vec<ObjectVersion>>, StoreError> {
        self.versions
            .get_or_try_init(|| async {
                let mut map: HashMap<String, Vec<ObjectVersion>> = HashMap::new();
                for v in self.inner.list_versions("").await? {
                    if !v.delete_marker {
                        map.entry(v.key.clone()).or_default().push(v);
                    } else {
                        map.entry(v.key.clone()).or_default();
                    }
                }
                map.retain(|_, v| !v.is_empty());
                Ok(map)
            })
            .await
    }

    /// Names read from an older version than the newest (overwritten or
    /// hidden by a delete marker), with the version id read.
    pub fn recovered(&self) -> Vec<(String, String)> {
        self.recovered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The version of `key` to read, choosing it (reading candidates in
    /// full) when there are several; with `whole`, the bytes read.
    async fn choose(&self, key: &str) -> Result<(String, Option<Bytes>), StoreError> {
        if let Some(v) = self
            .chosen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
        {
            return Ok((v.clone(), None));
        }
        let all = self.versions().await?;
        let Some(candidates) = all.get(key) else {
            return Err(StoreError::NotFound {
                key: key.to_owned(),
            });
        };
        let mut first = None;
        for (i, v) in candidates.iter().enumerate() {
            let bytes = match self.inner.get_version(key, &v.version_id, None).await {
                Ok(b) => b,
                Err(e) if e.is_not_found() => continue,
                Err(e) => return Err(e),
            };
            if (self.validate)(key, &bytes) {
                if i > 0 || !v.latest {
                    tracing::info!(
                        "{key}: its newest version is not what btrship wrote (overwritten, or a delete marker); reading version {}",
                        v.version_id
                    );
                    self.recovered
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((key.to_owned(), v.version_id.clone()));
                }
                self.chosen
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(key.to_owned(), v.version_id.clone());
                return Ok((v.version_id.clone(), Some(bytes)));
            }
            first.get_or_insert((v.version_id.clone(), bytes));
        }
        // Nothing fits: the newest content, for the caller to report.
        match first {
            Some((id, bytes)) => Ok((id, Some(bytes))),
            None => Err(StoreError::NotFound {
                key: key.to_owned(),
            }),
        }
    }
}

#[async_trait::async_trait]
impl Store for VersionedStore {
    fn location(&self) -> String {
        format!("{} (through its object versions)", self.inner.location())
    }

    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<PutOutcome, StoreError> {
        self.inner.put_if_absent(key, data).await
    }

    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        match self.choose(key).await? {
            (_, Some(bytes)) => Ok(bytes),
            (id, None) => self.inner.get_version(key, &id, None).await,
        }
    }

    async fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Bytes, StoreError> {
        let only = self
            .versions()
            .await?
            .get(key)
            .filter(|v| v.len() == 1)
            .map(|v| v[0].version_id.clone());
        let id = match only {
            Some(id) => id,
            None => self.choose(key).await?.0,
        };
        self.inner.get_version(key, &id, Some((offset, len))).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        crate::store::validate_prefix(prefix)?;
        let mut keys: Vec<&String> = self
            .versions()
            .await?
            .keys()
            .filter(|k| k.starts_with(prefix))
            .collect();
        keys.sort_unstable();
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            out.push(self.head(k).await?);
        }
        Ok(out)
    }

    /// The size and time of the version [`VersionedStore::choose`] picks
    /// (a name with one version: that one, without reading it).
    async fn head(&self, key: &str) -> Result<ObjectMeta, StoreError> {
        let Some(versions) = self.versions().await?.get(key) else {
            return Err(StoreError::NotFound {
                key: key.to_owned(),
            });
        };
        let id = match versions.len() {
            1 => versions[0].version_id.clone(),
            _ => self.choose(key).await?.0,
        };
        let v = versions
            .iter()
            .find(|v| v.version_id == id)
            .unwrap_or(&versions[0]);
        Ok(ObjectMeta {
            key: key.to_owned(),
            size: v.size,
            modified: v.modified,
        })
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
