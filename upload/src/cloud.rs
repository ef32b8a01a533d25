//! Azure Blob Storage and Google Cloud Storage: their repository
//! addresses, where credentials come from, and [`AzureStore`] (Azure,
//! through Apache Arrow's `object_store` crate). GCS is [`crate::gcs`].
//!
//! Object key `a/b` is stored as `<prefix>/a/b` in the container (just `a/b`
//! when the prefix is empty). A store is named by a URL, see
//! [`CloudConfig::parse_url`]:
//!
//! ```text
//! azure://container[/prefix][?endpoint=https://account.blob.core.windows.net]
//! gs://bucket[/prefix][?endpoint=https://storage.googleapis.com]
//! ```
//!
//! # Why `object_store`
//!
//! One crate speaks Azure's REST API and its authentication (SharedKey,
//! SAS, managed and workload identity), is kept by the Apache Arrow project
//! (DataFusion, delta-rs and many more run their storage through it) and
//! releases often. It does conditional creates (`If-None-Match: *`), ranged
//! reads, raw-prefix listings and staged blocks. The official Azure SDK for
//! Rust is still beta and changes its API between releases. For GCS it
//! provides the token providers; its GCS client writes through the XML API,
//! which the test emulator lacks (see [`crate::gcs`]). `aws-sdk-s3` stays
//! for S3 (Object Lock, versions).
//!
//! # Credentials
//!
//! Never from the URL, the command line or anything logged; only from the
//! environment, as the services' own tools read them:
//!
//! - **Azure**: `AZURE_STORAGE_CONNECTION_STRING` (`AccountName`,
//!   `AccountKey` or `SharedAccessSignature`, `BlobEndpoint`, or
//!   `UseDevelopmentStorage=true` for Azurite); else `AZURE_STORAGE_ACCOUNT`
//!   with `AZURE_STORAGE_KEY` or `AZURE_STORAGE_SAS_TOKEN`; else, with
//!   `AZURE_STORAGE_ACCOUNT` alone, workload identity (`AZURE_CLIENT_ID`,
//!   `AZURE_TENANT_ID`, `AZURE_FEDERATED_TOKEN_FILE`) or the machine's
//!   managed identity (`AZURE_CLIENT_ID` picks a user-assigned one).
//! - **GCS**: `STORAGE_EMULATOR_HOST` (Google's own convention for an
//!   emulator: requests go there, unauthenticated); else
//!   `GOOGLE_APPLICATION_CREDENTIALS` (a service-account or authorized-user
//!   JSON file) or gcloud's application-default credentials; else the
//!   metadata server (a VM's service account, workload identity on GKE).
//!
//! # Write-once (Azure)
//!
//! [`Store::put_if_absent`] is one `Put Blob` with `If-None-Match: *` for
//! every object up to [`MULTIPART_THRESHOLD`]; Azure decides atomically
//! (409/412: [`PutOutcome::AlreadyExists`]). Bigger objects are only ever
//! packs (content-addressed: `packs/<hash of the bytes>`, FORMAT.md §9):
//! after a `HEAD` found no blob there they go up as [`PART_SIZE`] staged
//! blocks (Put Block, four in flight), committed by Put Block List. The
//! commit cannot be conditional through `object_store`, so two writers of one
//! pack may both commit; both wrote the same bytes. Any other key bigger
//! than the threshold still goes up as one conditional request.
//!
//! # Errors and retries
//!
//! The crate's own retries are off (one attempt per call); the retry layer
//! around every store retries uniformly. A staged upload is many requests,
//! so each of its requests (the `HEAD`, every block, the commit) is also
//! tried up to [`REQUEST_TRIES`] times on its own: otherwise any failed
//! request would make the whole pack start over, and a pack of n requests
//! would succeed with probability (1 - p)^n per attempt. Transport
//! failures, timeouts, 5xx, 408 and 429 are retryable; a missing container or bucket
//! ([`StoreError::NoContainer`]), refused credentials
//! ([`StoreError::Denied`]) and other 4xx are not, and say what to fix.
//! A `HEAD` of a key in a missing container answers 404 without a body, like a
//! missing key, so [`Store::head`] reports [`StoreError::NotFound`]; the other
//! operations tell the two apart.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::list::{PaginatedListOptions, PaginatedListStore};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path as ObjectPath;
use object_store::{
    BackoffConfig, ClientOptions, GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutMode,
    PutOptions, PutPayload, RetryConfig,
};

use crate::s3::{check_endpoint, percent_decode};
use crate::store::{validate_key, validate_prefix, ObjectMeta, PutOutcome, Store, StoreError};

/// Objects bigger than this go up in staged parts (packs only).
pub const MULTIPART_THRESHOLD: usize = 16 << 20;
/// Size of each staged part but the last.
pub const PART_SIZE: usize = 8 << 20;
/// Staged parts in flight at once for one object.
const PARTS_IN_FLIGHT: usize = 4;
/// Tries of one request inside a multi-request upload (a staged block, the
/// commit, a resumable chunk) before the whole put fails back to the retry
/// layer.
pub(crate) const REQUEST_TRIES: u32 = 4;
/// Establishing a connection (TCP and TLS).
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// One request, its body included: a 16 MiB pack at about 0.5 Mbit/s.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// Which service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cloud {
    /// Azure Blob Storage (block blobs).
    Azure,
    /// Google Cloud Storage.
    Gcs,
}

impl Cloud {
    fn scheme(self) -> &'static str {
        match self {
            Cloud::Azure => "azure://",
            Cloud::Gcs => "gs://",
        }
    }

    /// What the container is called on this service.
    fn container_word(self) -> &'static str {
        match self {
            Cloud::Azure => "container",
            Cloud::Gcs => "bucket",
        }
    }
}

/// Where a repository lives: service, container (bucket), prefix and an
/// optional endpoint. Never holds credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudConfig {
    pub cloud: Cloud,
    pub container: String,
    /// Without leading or trailing `/`; empty for the container's root.
    pub prefix: String,
    /// `endpoint=` from the URL, without a trailing `/`.
    pub endpoint: Option<String>,
}

impl CloudConfig {
    /// Parses `azure://container[/prefix][?endpoint=URL]` or
    /// `gs://bucket[/prefix][?endpoint=URL]`. Query values may be
    /// percent-encoded; `endpoint` is the only parameter (credentials never
    /// go in the URL). A trailing `/` after the prefix is ignored.
    pub fn parse_url(url: &str) -> Result<CloudConfig, StoreError> {
        // Never echo a query (it is where a pasted SAS token would be) or
        // anything with user info.
        let shown = if url.contains('@') || url.to_ascii_lowercase().contains("%40") {
            "(not shown: it contains '@')".to_owned()
        } else {
            match url.split_once('?') {
                Some((path, _)) => format!("{path:?} (query not shown)"),
                None => format!("{url:?}"),
            }
        };
        let bad = |why: String| config_error(format!("invalid repository URL {shown}: {why}"));
        let (cloud, rest) = if let Some(rest) = url.strip_prefix("azure://") {
            (Cloud::Azure, rest)
        } else if let Some(rest) = url.strip_prefix("gs://") {
            (Cloud::Gcs, rest)
        } else {
            return Err(bad("must start with azure:// or gs://".into()));
        };
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (container, prefix) = path.split_once('/').unwrap_or((path, ""));
        check_container(cloud, container)
            .map_err(|why| bad(format!("{} {container:?}: {why}", cloud.container_word())))?;
        let prefix = prefix.strip_suffix('/').unwrap_or(prefix);
        if !prefix.is_empty() {
            validate_key(prefix).map_err(|e| bad(format!("prefix: {e}")))?;
        }
        let mut endpoint = None;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair
                .split_once('=')
                .ok_or_else(|| bad(format!("query parameter {pair:?} has no value")))?;
            let value =
                percent_decode(value).ok_or_else(|| bad(format!("bad escape in {name}")))?;
            match name {
                "endpoint" => {
                    check_endpoint(&value).map_err(|why| bad(format!("endpoint: {why}")))?;
                    endpoint = Some(value.trim_end_matches('/').to_owned());
                }
                _ => {
                    return Err(bad(format!(
                        "unknown parameter {name:?} (the only one is endpoint; credentials come from the environment)"
                    )))
                }
            }
        }
        Ok(CloudConfig {
            cloud,
            container: container.to_owned(),
            prefix: prefix.to_owned(),
            endpoint,
        })
    }

    /// `azure://container/prefix` (or without the prefix), no endpoint.
    pub fn location(&self) -> String {
        let mut s = format!("{}{}", self.cloud.scheme(), self.container);
        if !self.prefix.is_empty() {
            s.push('/');
            s.push_str(&self.prefix);
        }
        s
    }
}

/// Azure: 3-63 of a-z, 0-9 and single '-', starting and ending with a
/// letter or digit. GCS: 3-63 of a-z, 0-9, '-', '_' and '.', starting and
/// ending with a letter or digit (dotted names up to 222 are not accepted:
/// they need domain verification and are rare).
fn check_container(cloud: Cloud, name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("missing name");
    }
    if !(3..=63).contains(&name.len()) {
        return Err("must be 3 to 63 characters long");
    }
    let bytes = name.as_bytes();
    match cloud {
        Cloud::Azure => {
            let inner = |b: u8| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'-');
            if !bytes.iter().all(|&b| inner(b)) || name.contains("--") {
                return Err("only a-z, 0-9 and single '-' are allowed");
            }
        }
        Cloud::Gcs => {
            let inner = |b: u8| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.');
            if !bytes.iter().all(|&b| inner(b)) {
                return Err("only a-z, 0-9, '-', '_' and '.' are allowed");
            }
        }
    }
    let edge = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if !edge(bytes[0]) || !edge(bytes[bytes.len() - 1]) {
        return Err("must start and end with a letter or digit");
    }
    Ok(())
}

/// Where credentials came from, for messages (never their values).
#[derive(Debug, Clone)]
pub(crate) struct Credentials {
    /// e.g. "AZURE_STORAGE_CONNECTION_STRING" or "the metadata server".
    pub source: String,
    /// What to check when they are refused.
    pub hint: &'static str,
}

/// A client that can also list by a raw (not per-directory) prefix and
/// stage blocks one request at a time.
trait Backend: ObjectStore + PaginatedListStore + MultipartStore {}
impl<T: ObjectStore + PaginatedListStore + MultipartStore> Backend for T {}

/// A repository in an Azure container. See the module documentation.
#[derive(Clone)]
pub struct AzureStore {
    inner: Arc<dyn Backend>,
    cfg: CloudConfig,
    /// The endpoint in use when not the service's own, for messages.
    endpoint: Option<String>,
    credentials: Credentials,
}

impl fmt::Debug for AzureStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AzureStore")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

/// The environment, as a function (tests pass their own).
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process environment; empty values count as unset.
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

impl AzureStore {
    /// A client for `cfg` with credentials from the process environment.
    /// Sends no request.
    pub fn connect(cfg: CloudConfig) -> Result<AzureStore, StoreError> {
        Self::connect_with(cfg, &process_env)
    }

    /// [`AzureStore::connect`] with credentials from `env`.
    pub fn connect_with(cfg: CloudConfig, env: Env<'_>) -> Result<AzureStore, StoreError> {
        let mut options = ClientOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT);
        let retry = no_retries();
        let built = azure(&cfg, env, &mut options, retry);
        let (inner, endpoint, credentials) = built.map_err(|e| setup_error(&cfg, &e))?;
        Ok(AzureStore {
            inner,
            cfg,
            endpoint,
            credentials,
        })
    }

    /// The container's (bucket's) key of store key `key`.
    fn object_path(&self, key: &str) -> Result<ObjectPath, StoreError> {
        let full = if self.cfg.prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{}/{key}", self.cfg.prefix)
        };
        ObjectPath::parse(&full).map_err(|_| StoreError::InvalidKey {
            key: key.to_owned(),
            reason: "not a valid object path",
        })
    }

    /// What listings put before a repository key (`prefix/`, or nothing).
    fn listing_prefix(&self) -> String {
        if self.cfg.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.cfg.prefix)
        }
    }

    fn meta(&self, key: String, m: &object_store::ObjectMeta) -> ObjectMeta {
        ObjectMeta {
            key,
            size: m.size,
            modified: Some(SystemTime::from(m.last_modified)),
        }
    }

    /// Checks that the container exists and the credentials may list it
    /// (one listing of at most one key); the error says what is wrong.
    pub async fn check_container(&self) -> Result<(), StoreError> {
        let opts = PaginatedListOptions {
            max_keys: Some(1),
            ..Default::default()
        };
        let prefix = self.listing_prefix();
        let prefix = (!prefix.is_empty()).then_some(prefix.as_str());
        match self.inner.list_paginated(prefix, opts).await {
            Ok(_) => Ok(()),
            Err(e) => Err(self.error("list", "", e)),
        }
    }

    /// `put_if_absent` of a pack bigger than [`MULTIPART_THRESHOLD`]: staged
    /// parts, committed once all are stored; aborted on any error.
    async fn put_staged(
        &self,
        key: &str,
        path: &ObjectPath,
        data: Bytes,
    ) -> Result<PutOutcome, StoreError> {
        match retried(|| self.inner.head(path)).await {
            Ok(_) => return Ok(PutOutcome::AlreadyExists),
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(self.error("check before uploading", key, e)),
        }
        // Azure: no request; every block gets a fresh id, so a block tried
        // again never clashes with an earlier try.
        let id = (self.inner.create_multipart(path).await)
            .map_err(|e| self.error("start the staged upload of", key, e))?;
        let mut in_flight = VecDeque::new();
        let mut parts = Vec::new();
        let mut failed = None;
        for (idx, start) in (0..data.len()).step_by(PART_SIZE).enumerate() {
            let end = data.len().min(start + PART_SIZE);
            let payload = PutPayload::from(data.slice(start..end));
            let (inner, path, id) = (Arc::clone(&self.inner), path.clone(), id.clone());
            in_flight.push_back(tokio::spawn(async move {
                retried(|| inner.put_part(&path, &id, idx, payload.clone())).await
            }));
            if in_flight.len() < PARTS_IN_FLIGHT {
                continue;
            }
            if let Some(part) = in_flight.pop_front() {
                match join_part(part).await {
                    Ok(part) => parts.push(part),
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
        }
        while failed.is_none() {
            let Some(part) = in_flight.pop_front() else {
                break;
            };
            match join_part(part).await {
                Ok(part) => parts.push(part),
                Err(e) => failed = Some(e),
            }
        }
        if let Some(e) = failed {
            for part in in_flight {
                part.abort();
            }
            // Uncommitted blocks (Azure) expire on their own after a week.
            let _ = self.inner.abort_multipart(path, &id).await;
            return Err(self.error("upload a part of", key, e));
        }
        let committed = retried(|| self.inner.complete_multipart(path, &id, parts.clone())).await;
        if let Err(e) = committed {
            // A commit whose answer was lost may have landed; committing its
            // blocks again is then refused (they are no longer uncommitted:
            // 400 InvalidBlockList). A blob of the pack's size under the
            // pack's name is the pack: the name is the hash of the bytes.
            match retried(|| self.inner.head(path)).await {
                Ok(m) if m.size == data.len() as u64 => return Ok(PutOutcome::Created),
                _ => return Err(self.error("commit the staged upload of", key, e)),
            }
        }
        Ok(PutOutcome::Created)
    }

    /// Phrases an `object_store` error for the user: `what` is the action
    /// ("read", "store", ...), `key` the repository key (may be empty).
    fn error(&self, what: &str, key: &str, e: object_store::Error) -> StoreError {
        let detail = one_line(&e);
        let word = self.cfg.cloud.container_word();
        let at = if key.is_empty() {
            self.cfg.location()
        } else {
            format!("{}/{key}", self.cfg.location())
        };
        let via = match &self.endpoint {
            Some(ep) => format!(" at {ep}"),
            None => String::new(),
        };
        if no_container(&detail) {
            return StoreError::NoContainer {
                message: format!(
                    "the {word} {} does not exist{via}; create it (btrship does not), or check the repository address",
                    self.cfg.container
                ),
            };
        }
        match e {
            object_store::Error::NotFound { .. } => StoreError::NotFound {
                key: key.to_owned(),
            },
            object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. } => StoreError::Denied {
                key: key.to_owned(),
                message: format!(
                    "{} refused to {what} {at} with the credentials from {} ({detail}); {}",
                    self.service(),
                    self.credentials.source,
                    self.credentials.hint
                ),
            },
            _ => {
                let status = http_status(&e);
                let retryable = is_retryable(&e);
                if status == Some(401) || status == Some(403) {
                    return StoreError::Denied {
                        key: key.to_owned(),
                        message: format!(
                            "{} refused to {what} {at} with the credentials from {} ({detail}); {}",
                            self.service(),
                            self.credentials.source,
                            self.credentials.hint
                        ),
                    };
                }
                StoreError::Other {
                    key: key.to_owned(),
                    message: format!("cannot {what} {at}{via}: {detail}"),
                    retryable,
                }
            }
        }
    }

    fn service(&self) -> &'static str {
        match self.cfg.cloud {
            Cloud::Azure => "Azure Blob Storage",
            Cloud::Gcs => "Google Cloud Storage",
        }
    }
}

/// Runs `op` (one request) up to [`REQUEST_TRIES`] times while it fails
/// retryably, with a short growing pause between tries.
async fn retried<T, F, Fut>(mut op: F) -> object_store::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = object_store::Result<T>>,
{
    let mut tries = 1;
    loop {
        match op().await {
            Err(e) if tries < REQUEST_TRIES && is_retryable(&e) => {
                pause_before_try(tries).await;
                tries += 1;
            }
            other => return other,
        }
    }
}

/// The pause after `failed` tries of one request within an upload: 100 ms,
/// then 200, 400, ... (at most 3.2 s).
pub(crate) async fn pause_before_try(failed: u32) {
    tokio::time::sleep(Duration::from_millis(100 << (failed - 1).min(5))).await;
}

async fn join_part(
    part: tokio::task::JoinHandle<object_store::Result<PartId>>,
) -> object_store::Result<PartId> {
    part.await
        .unwrap_or_else(|e| Err(object_store::Error::JoinError { source: e }))
}

/// The error and its sources in one line, without repeating a source that
/// its parent already quotes.
pub(crate) fn one_line(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Does the service say the container or bucket is missing? Azure names it
/// `ContainerNotFound`; GCS says "bucket does not exist".
pub(crate) fn no_container(detail: &str) -> bool {
    let lower = detail.to_ascii_lowercase();
    detail.contains("ContainerNotFound")
        || lower.contains("container does not exist")
        || lower.contains("bucket does not exist")
        || lower.contains("nosuchbucket")
}

/// The HTTP status of a failed request, when a response arrived.
/// `object_store` keeps it in a private error type whose text reads
/// "Server returned non-2xx status code: 503 Service Unavailable: ..." or
/// "Server returned error response: ..."; the unit tests pin that wording.
pub(crate) fn http_status(e: &object_store::Error) -> Option<u16> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        let text = err.to_string();
        if let Some(at) = text.find("status code: ") {
            let digits: String = text[at + 13..].chars().take(3).collect();
            if let Ok(s) = digits.parse() {
                return Some(s);
            }
        }
        cur = err.source();
    }
    None
}

/// Did the request fail before a response arrived (connect, timeout, reset)?
pub(crate) fn is_transport(e: &object_store::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.is::<object_store::client::HttpError>() {
            return true;
        }
        cur = err.source();
    }
    false
}

/// `object_store`'s own retries off: the retry layer retries every store
/// alike.
pub(crate) fn no_retries() -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig::default(),
        max_retries: 0,
        retry_timeout: REQUEST_TIMEOUT,
    }
}

/// Whether repeating the request may succeed: transport failures, 5xx,
/// 408 and 429.
pub(crate) fn is_retryable(e: &object_store::Error) -> bool {
    match http_status(e) {
        Some(s) => s >= 500 || s == 408 || s == 429,
        None => is_transport(e),
    }
}

/// The store at `cfg` with credentials from the process environment;
/// sends no request.
pub fn connect(cfg: CloudConfig) -> Result<Arc<dyn Store>, StoreError> {
    connect_with(cfg, &process_env)
}

/// [`connect`] with credentials from `env`.
pub fn connect_with(cfg: CloudConfig, env: Env<'_>) -> Result<Arc<dyn Store>, StoreError> {
    match cfg.cloud {
        Cloud::Azure => Ok(Arc::new(AzureStore::connect_with(cfg, env)?)),
        Cloud::Gcs => crate::gcs::connect_with(cfg, env),
    }
}

/// The client could not be set up from the environment: missing or
/// unusable credentials (nothing was sent). Permanent: only the operator
/// can fix it.
pub(crate) fn setup_error(cfg: &CloudConfig, why: &str) -> StoreError {
    StoreError::Denied {
        key: String::new(),
        message: format!("cannot use the credentials for {}: {why}", cfg.location()),
    }
}

/// A body shorter than the store said (a cut-off transfer): retryable.
pub(crate) fn short_read(
    cfg: &CloudConfig,
    key: &str,
    offset: u64,
    got: usize,
    want: u64,
) -> StoreError {
    StoreError::Other {
        key: key.to_owned(),
        message: format!(
            "reading {}/{key} at {offset}: got {got} of {want} bytes",
            cfg.location()
        ),
        retryable: true,
    }
}

/// A listing in key order, each key once (pages may overlap).
pub(crate) fn sorted(mut out: Vec<ObjectMeta>) -> Vec<ObjectMeta> {
    out.sort_by(|a, b| a.key.cmp(&b.key));
    out.dedup_by(|a, b| a.key == b.key);
    out
}

pub(crate) fn config_error(message: String) -> StoreError {
    StoreError::Other {
        key: String::new(),
        message,
        retryable: false,
    }
}

type Built = (Arc<dyn Backend>, Option<String>, Credentials);

/// The parts of an Azure connection string (`Key=Value;...`, keys
/// case-insensitive, values may hold '=').
fn connection_string(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for part in s.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').ok_or_else(|| {
            "AZURE_STORAGE_CONNECTION_STRING is not Key=Value;Key=Value;... (a part has no '=')"
                .to_owned()
        })?;
        out.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
    }
    Ok(out)
}

/// Azurite's documented development account and key.
const AZURITE_ACCOUNT: &str = "devstoreaccount1";
const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

fn azure(
    cfg: &CloudConfig,
    env: Env<'_>,
    options: &mut ClientOptions,
    retry: RetryConfig,
) -> Result<Built, String> {
    let mut b = MicrosoftAzureBuilder::new()
        .with_container_name(&cfg.container)
        .with_retry(retry);
    let mut endpoint = cfg.endpoint.clone();
    let hint = "check the account key or SAS token (its permissions and expiry) or the identity's role on the container (Storage Blob Data Contributor)";
    let source;
    if let Some(conn) = env("AZURE_STORAGE_CONNECTION_STRING") {
        source = "AZURE_STORAGE_CONNECTION_STRING".to_owned();
        let parts = connection_string(&conn)?;
        let get = |k: &str| parts.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        if get("usedevelopmentstorage").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
            b = b.with_account(AZURITE_ACCOUNT).with_access_key(AZURITE_KEY);
            endpoint.get_or_insert_with(|| format!("http://127.0.0.1:10000/{AZURITE_ACCOUNT}"));
        } else {
            let account = get("accountname").ok_or(
                "AZURE_STORAGE_CONNECTION_STRING has no AccountName (or UseDevelopmentStorage=true)",
            )?;
            b = b.with_account(&account);
            if let Some(key) = get("accountkey") {
                b = b.with_access_key(key);
            } else if let Some(sas) = get("sharedaccesssignature") {
                b = b.with_config(object_store::azure::AzureConfigKey::SasKey, sas);
            } else {
                return Err("AZURE_STORAGE_CONNECTION_STRING has neither AccountKey nor SharedAccessSignature".into());
            }
            if endpoint.is_none() {
                if let Some(ep) = get("blobendpoint") {
                    endpoint = Some(ep.trim_end_matches('/').to_owned());
                } else {
                    let proto = get("defaultendpointsprotocol").unwrap_or_else(|| "https".into());
                    let suffix = get("endpointsuffix").unwrap_or_else(|| "core.windows.net".into());
                    endpoint = Some(format!("{proto}://{account}.blob.{suffix}"));
                }
            }
        }
    } else if let Some(account) = env("AZURE_STORAGE_ACCOUNT") {
        b = b.with_account(&account);
        if let Some(key) = env("AZURE_STORAGE_KEY") {
            source = "AZURE_STORAGE_ACCOUNT and AZURE_STORAGE_KEY".to_owned();
            b = b.with_access_key(key);
        } else if let Some(sas) = env("AZURE_STORAGE_SAS_TOKEN") {
            source = "AZURE_STORAGE_ACCOUNT and AZURE_STORAGE_SAS_TOKEN".to_owned();
            b = b.with_config(object_store::azure::AzureConfigKey::SasKey, sas);
        } else {
            let client = env("AZURE_CLIENT_ID");
            match (
                client.clone(),
                env("AZURE_TENANT_ID"),
                env("AZURE_FEDERATED_TOKEN_FILE"),
            ) {
                (Some(c), Some(t), Some(f)) => {
                    source = "workload identity (AZURE_FEDERATED_TOKEN_FILE)".to_owned();
                    b = b
                        .with_client_id(c)
                        .with_tenant_id(t)
                        .with_federated_token_file(f);
                }
                _ => {
                    source = "the managed identity".to_owned();
                    if let Some(c) = client {
                        b = b.with_client_id(c);
                    }
                }
            }
        }
    } else {
        return Err("no Azure credentials: set AZURE_STORAGE_CONNECTION_STRING, or AZURE_STORAGE_ACCOUNT with AZURE_STORAGE_KEY or AZURE_STORAGE_SAS_TOKEN (AZURE_STORAGE_ACCOUNT alone uses the managed identity)".into());
    }
    if let Some(ep) = &endpoint {
        if ep.starts_with("http://") {
            *options = options.clone().with_allow_http(true);
        }
        b = b.with_endpoint(ep.clone());
    }
    let store = b
        .with_client_options(options.clone())
        .build()
        .map_err(|e| one_line(&e))?;
    Ok((Arc::new(store), endpoint, Credentials { source, hint }))
}

#[async_trait::async_trait]
impl Store for AzureStore {
    fn location(&self) -> String {
        self.cfg.location()
    }

    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<PutOutcome, StoreError> {
        validate_key(key)?;
        let path = self.object_path(key)?;
        if data.len() > MULTIPART_THRESHOLD && key.starts_with("packs/") {
            return self.put_staged(key, &path, data).await;
        }
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .inner
            .put_opts(&path, PutPayload::from(data), opts)
            .await
        {
            Ok(_) => Ok(PutOutcome::Created),
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => Ok(PutOutcome::AlreadyExists),
            Err(e) => Err(self.error("store", key, e)),
        }
    }

    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        validate_key(key)?;
        let path = self.object_path(key)?;
        let got = self
            .inner
            .get_opts(&path, GetOptions::default())
            .await
            .map_err(|e| self.error("read", key, e))?;
        let size = got.meta.size;
        let data = got.bytes().await.map_err(|e| self.error("read", key, e))?;
        if data.len() as u64 != size {
            return Err(short_read(&self.cfg, key, 0, data.len(), size));
        }
        Ok(data)
    }

    async fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Bytes, StoreError> {
        validate_key(key)?;
        let path = self.object_path(key)?;
        let out_of_range = |size: u64| StoreError::OutOfRange {
            key: key.to_owned(),
            offset,
            len,
            size,
        };
        let end = offset.checked_add(len).ok_or_else(|| out_of_range(0))?;
        if len == 0 {
            // No request for zero bytes; the object must still exist.
            let m = self
                .inner
                .head(&path)
                .await
                .map_err(|e| self.error("read", key, e))?;
            return if offset > m.size {
                Err(out_of_range(m.size))
            } else {
                Ok(Bytes::new())
            };
        }
        let opts = GetOptions {
            range: Some(GetRange::Bounded(offset..end)),
            ..Default::default()
        };
        let got = match self.inner.get_opts(&path, opts).await {
            Ok(got) => got,
            Err(e @ object_store::Error::NotFound { .. }) => return Err(self.error("read", key, e)),
            Err(e) => {
                // A range past the end: say so with the size (a HEAD).
                if let Ok(m) = self.inner.head(&path).await {
                    if end > m.size {
                        return Err(out_of_range(m.size));
                    }
                }
                return Err(self.error("read", key, e));
            }
        };
        if end > got.meta.size {
            return Err(out_of_range(got.meta.size));
        }
        let data = got.bytes().await.map_err(|e| self.error("read", key, e))?;
        if data.len() as u64 != len {
            return Err(short_read(&self.cfg, key, offset, data.len(), len));
        }
        Ok(data)
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        validate_prefix(prefix)?;
        let base = self.listing_prefix();
        let full = format!("{base}{prefix}");
        // object_store drops a blob whose name equals the prefix asked for
        // (it treats prefixes as directories): ask for one character less
        // and filter here.
        let asked = &full[..full.len().saturating_sub(1)];
        let mut out = Vec::new();
        let mut page_token = None;
        loop {
            let opts = PaginatedListOptions {
                page_token: page_token.take(),
                ..Default::default()
            };
            let page = self
                .inner
                .list_paginated((!asked.is_empty()).then_some(asked), opts)
                .await
                .map_err(|e| self.error("list", prefix, e))?;
            for m in &page.result.objects {
                let name = m.location.as_ref();
                // The service filtered by prefix; a stray answer is dropped.
                if let Some(key) = name.strip_prefix(&base).filter(|k| k.starts_with(prefix)) {
                    out.push(self.meta(key.to_owned(), m));
                }
            }
            match page.page_token {
                Some(t) if !t.is_empty() => page_token = Some(t),
                _ => break,
            }
        }
        Ok(sorted(out))
    }

    async fn head(&self, key: &str) -> Result<ObjectMeta, StoreError> {
        validate_key(key)?;
        let path = self.object_path(key)?;
        let m = self
            .inner
            .head(&path)
            .await
            .map_err(|e| self.error("look up", key, e))?;
        Ok(self.meta(key.to_owned(), &m))
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        validate_key(key)?;
        let path = self.object_path(key)?;
        match self.inner.delete(&path).await {
            Ok(()) => Ok(()),
            Err(e) => match self.error("delete", key, e) {
                StoreError::NotFound { .. } => Ok(()),
                other => Err(other),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let c = CloudConfig::parse_url("azure://backups/office/").unwrap();
        assert_eq!(c.cloud, Cloud::Azure);
        assert_eq!(
            (c.container.as_str(), c.prefix.as_str()),
            ("backups", "office")
        );
        assert_eq!(c.location(), "azure://backups/office");
        let c =
            CloudConfig::parse_url("gs://my_bucket.x?endpoint=http%3A%2F%2F127.0.0.1%3A4443%2F")
                .unwrap();
        assert_eq!(c.cloud, Cloud::Gcs);
        assert_eq!(c.endpoint.as_deref(), Some("http://127.0.0.1:4443"));
        assert_eq!(c.location(), "gs://my_bucket.x");
        for bad in [
            "azure://",
            "azure://ab",
            "azure://Backups",
            "azure://a--b",
            "azure://my_bucket",
            "gs://-bucket",
            "azure://backups/Office",
            "azure://backups?sig=secret",
            "gs://bucket?endpoint=ftp://x",
            "gs://bucket?endpoint=http://user:pw@host",
            "s3://bucket",
        ] {
            let e = CloudConfig::parse_url(bad).unwrap_err().to_string();
            assert!(!e.contains("secret") && !e.contains("pw@"), "{e}");
        }
    }

    #[test]
    fn connection_strings() {
        let p = connection_string(
            "DefaultEndpointsProtocol=http;AccountName=a;AccountKey=k0==;BlobEndpoint=http://h:1/a;",
        )
        .unwrap();
        assert!(p.contains(&("accountkey".into(), "k0==".into())));
        assert!(p.contains(&("blobendpoint".into(), "http://h:1/a".into())));
        assert!(connection_string("AccountName").is_err());
    }

    #[test]
    fn credentials_come_only_from_the_environment() {
        let cfg = CloudConfig::parse_url("azure://backups").unwrap();
        let none = |_: &str| None;
        let e = AzureStore::connect_with(cfg.clone(), &none).unwrap_err();
        assert!(
            e.to_string().contains("AZURE_STORAGE_CONNECTION_STRING"),
            "{e}"
        );
        let dev = |n: &str| {
            (n == "AZURE_STORAGE_CONNECTION_STRING").then(|| "UseDevelopmentStorage=true".into())
        };
        let s = AzureStore::connect_with(cfg, &dev).unwrap();
        assert_eq!(
            s.endpoint.as_deref(),
            Some("http://127.0.0.1:10000/devstoreaccount1")
        );
        let gcs = CloudConfig::parse_url("gs://bucket/p").unwrap();
        let emu = |n: &str| (n == "STORAGE_EMULATOR_HOST").then(|| "localhost:4443".into());
        let s = crate::gcs::GcsStore::connect_with(gcs, &emu).unwrap();
        assert!(format!("{s:?}").contains("bucket"));
    }

    /// A server that reads each request, then answers with `reply` (maybe
    /// nothing, maybe a cut-off head) and closes: every way a connection can
    /// break must come back retryable, for HEAD as for GET.
    #[test]
    fn broken_connections_are_retryable() {
        use std::io::{Read, Write};
        let rt = tokio::runtime::Runtime::new().unwrap();
        for reply in [&b""[..], b"HTTP/1.1 200 OK\r\nContent-Le"] {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let port = listener.local_addr().unwrap().port();
            let server = std::thread::spawn(move || {
                for _ in 0..2 {
                    let (mut c, _) = listener.accept().unwrap();
                    let mut buf = [0u8; 4096];
                    let _ = c.read(&mut buf);
                    let _ = c.write_all(reply);
                }
            });
            let cfg = CloudConfig::parse_url(&format!(
                "azure://backups?endpoint=http%3A%2F%2F127.0.0.1%3A{port}%2Fdevstoreaccount1"
            ))
            .unwrap();
            let env = |n: &str| {
                (n == "AZURE_STORAGE_CONNECTION_STRING")
                    .then(|| "UseDevelopmentStorage=true".into())
            };
            let _g = rt.enter();
            let s = AzureStore::connect_with(cfg, &env).unwrap();
            let head = rt.block_on(s.head("config")).unwrap_err();
            assert!(head.is_retryable(), "{reply:?}: {head}");
            let get = rt.block_on(s.get("config")).unwrap_err();
            assert!(get.is_retryable(), "{reply:?}: {get}");
            server.join().unwrap();
        }
    }

    #[test]
    fn no_container_texts() {
        assert!(no_container("... <Code>ContainerNotFound</Code> ..."));
        assert!(no_container("The specified bucket does not exist."));
        assert!(!no_container("BlobNotFound"));
    }
}
