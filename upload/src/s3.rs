//! [`S3Store`]: a repository in an S3 bucket (AWS or an S3-compatible server:
//! Garage, MinIO, Ceph RGW, moto, s3s-fs, ...).
//!
//! Object key `a/b` is stored as `<prefix>/a/b` in the bucket (just `a/b` when
//! the prefix is empty). A store is named by a URL, see [`S3Config::parse_url`]:
//!
//! ```text
//! s3://bucket[/prefix][?endpoint=http://127.0.0.1:9000&region=us-east-1&path_style=true]
//! ```
//!
//! # Credentials and configuration
//!
//! Credentials come only from the standard AWS chain (environment variables
//! `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/`AWS_SESSION_TOKEN`, the shared
//! config and credentials files with `AWS_PROFILE`, `credential_process`, web
//! identity, ECS and EC2 instance roles), never from the URL, the command line
//! or anything we log. [`S3Store::location`] and the `Debug` output name only
//! the bucket and prefix. SSO profiles are not supported (the SDK's `sso`
//! feature is left out to keep the dependency tree smaller).
//!
//! The endpoint is the URL's `endpoint=`, else `AWS_ENDPOINT_URL_S3` /
//! `AWS_ENDPOINT_URL` or `endpoint_url` in the profile (read by `aws-config`),
//! else AWS. The region is the URL's `region=`, else `AWS_REGION` /
//! `AWS_DEFAULT_REGION` or the profile's `region`, else `us-east-1`. The EC2
//! instance metadata service is deliberately *not* asked for a region: the
//! bucket's region is what matters, not the machine's, and probing it costs a
//! timeout on every machine outside EC2.
//!
//! # Write-once
//!
//! [`Store::put_if_absent`] sends `If-None-Match: *` (on `PutObject` and on
//! `CompleteMultipartUpload`) and maps `412 Precondition Failed` to
//! [`PutOutcome::AlreadyExists`]. AWS and moto decide this atomically. But
//! safety must not and does not depend on it (`docs/FORMAT.md` §9): object
//! names are content-addressed or 128+ bit random, so no two writers race for
//! one name. Garage 2.5 silently ignores `If-None-Match` (a second put
//! overwrites and reports `Created`), and s3s-fs honours it but not atomically;
//! both are safe under that rule. A retried put that gets `412` may have been
//! refused because of our own earlier attempt that succeeded with the answer
//! lost; callers treat `AlreadyExists` as success, which covers that.
//!
//! Bodies are always sent from memory with a known length, never as
//! `aws-chunked` streams: request checksums are computed by us, not the SDK
//! (`RequestChecksumCalculation::WhenRequired`), because Garage rejects the
//! SDK's default streaming-trailer upload over plain HTTP. `PutObject` carries
//! an `x-amz-checksum-crc32` header and every `UploadPart` a `Content-MD5`,
//! which the server verifies. Objects over [`MULTIPART_THRESHOLD`] go up as a
//! multipart upload in [`PART_SIZE`] parts (packs are at most 64 MiB, so this
//! is bounded in memory); the upload is aborted on any error, also when the
//! future is dropped. Part checksums are not echoed in
//! `CompleteMultipartUpload` (Garage would refuse that without a checksum
//! algorithm chosen at creation). A bucket lifecycle rule that aborts
//! incomplete multipart uploads after a day is still recommended, for
//! uploads cut off by a crash.
//!
//! # Errors, retries and timeouts
//!
//! The SDK's own retries are **off** (one attempt per call): a retry wrapper
//! around every store adds retries, backoff and counters uniformly. Each
//! error says whether it is worth retrying ([`StoreError::is_retryable`]): 5xx,
//! throttling (`SlowDown`, 503, 429), timeouts, connection and I/O failures,
//! truncated bodies and malformed responses are; missing buckets, denied
//! access, bad credentials, wrong regions and other 4xx are not, and their
//! messages say what to fix. Timeouts: see [`S3Timeouts`]; besides those, the
//! SDK's stalled-stream protection fails an upload or download body that
//! makes no progress for 20 s.
//!
//! A `HEAD` on a missing bucket answers 404 without a body, like a missing key,
//! so [`Store::head`] reports it as [`StoreError::NotFound`]; the other
//! operations tell the two apart. [`S3Store::check_bucket`] checks the bucket
//! and the credentials up front.

use std::error::Error as StdError;
use std::fmt;
use std::time::{Duration, SystemTime};

use aws_config::environment::EnvironmentVariableRegionProvider;
use aws_config::meta::region::RegionProviderChain;
use aws_config::profile::ProfileFileRegionProvider;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_credential_types::provider::error::CredentialsError;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::{RequestChecksumCalculation, ResponseChecksumValidation};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_sdk_s3::Client;
use bytes::Bytes;
use md5::{Digest, Md5};

use crate::store::{
    validate_key, validate_prefix, LockMode, ObjectLock, ObjectMeta, PutOutcome, Store, StoreError,
};
use aws_sdk_s3::types::{
    ObjectLockEnabled, ObjectLockMode, ObjectLockRetention, ObjectLockRetentionMode,
};

/// Objects larger than this are uploaded in parts.
pub const MULTIPART_THRESHOLD: usize = 16 << 20;
/// Size of each part of a multipart upload but the last (S3's minimum is 5 MiB).
pub const PART_SIZE: usize = 8 << 20;

/// S3's limit on the parts of one multipart upload.
const MAX_PARTS: usize = 10_000;

/// Region used when neither the URL, the environment nor the profile names one.
const DEFAULT_REGION: &str = "us-east-1";

/// Where an [`S3Store`] lives. Holds no credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Config {
    /// Bucket name.
    pub bucket: String,
    /// Key prefix inside the bucket: empty, or segments like `a/b` (no leading
    /// or trailing `/`), following the object key rules.
    pub prefix: String,
    /// Endpoint URL (e.g. `http://127.0.0.1:9000`); `None` means the
    /// environment or profile (`AWS_ENDPOINT_URL`), else AWS.
    pub endpoint: Option<String>,
    /// Region; `None` means the environment or profile, else `us-east-1`.
    pub region: Option<String>,
    /// Path-style addressing (`http://host/bucket/key`) instead of virtual
    /// hosts (`http://bucket.host/key`). Most self-hosted servers need it.
    pub path_style: bool,
}

impl S3Config {
    /// Parses `s3://bucket[/prefix][?endpoint=URL&region=R&path_style=BOOL]`.
    ///
    /// Query values may be percent-encoded. `path_style` accepts
    /// `true`/`false`/`1`/`0` and defaults to `true` when `endpoint` is given
    /// (self-hosted servers rarely do virtual hosts) and to `false` otherwise.
    /// A trailing `/` after the prefix is ignored. Credentials in the URL
    /// (`user:pass@` in the endpoint) are refused.
    pub fn parse_url(url: &str) -> Result<S3Config, StoreError> {
        // Never echo a URL that carries credentials.
        let shown = if url.contains('@') || url.to_ascii_lowercase().contains("%40") {
            "(not shown: it contains '@')".to_owned()
        } else {
            format!("{url:?}")
        };
        let bad = |why: String| config_error(format!("invalid S3 URL {shown}: {why}"));
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| bad("must start with s3://".into()))?;
        let (path, query) = match rest.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (rest, None),
        };
        let (bucket, prefix) = path.split_once('/').unwrap_or((path, ""));
        check_bucket_name(bucket).map_err(|why| bad(format!("bucket {bucket:?}: {why}")))?;
        let prefix = prefix.strip_suffix('/').unwrap_or(prefix);
        if !prefix.is_empty() {
            validate_key(prefix).map_err(|e| bad(format!("prefix: {e}")))?;
        }

        let mut cfg = S3Config {
            bucket: bucket.to_owned(),
            prefix: prefix.to_owned(),
            endpoint: None,
            region: None,
            path_style: false,
        };
        let mut path_style = None;
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair
                .split_once('=')
                .ok_or_else(|| bad(format!("query parameter {pair:?} has no value")))?;
            let value =
                percent_decode(value).ok_or_else(|| bad(format!("bad escape in {name}")))?;
            match name {
                "endpoint" => {
                    check_endpoint(&value).map_err(|why| bad(format!("endpoint: {why}")))?;
                    cfg.endpoint = Some(value.trim_end_matches('/').to_owned());
                }
                "region" => {
                    let ok = !value.is_empty()
                        && value
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
                    if !ok {
                        return Err(bad(format!("bad region {value:?}")));
                    }
                    cfg.region = Some(value);
                }
                "path_style" => {
                    path_style = Some(match value.as_str() {
                        "true" | "1" => true,
                        "false" | "0" => false,
                        _ => return Err(bad(format!("path_style={value:?}: use true or false"))),
                    });
                }
                _ => {
                    return Err(bad(format!(
                        "unknown parameter {name:?} (known: endpoint, region, path_style)"
                    )))
                }
            }
        }
        cfg.path_style = path_style.unwrap_or(cfg.endpoint.is_some());
        Ok(cfg)
    }

    /// `s3://bucket/prefix` (or `s3://bucket`), without endpoint or region.
    pub fn location(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }

    /// The bucket key of store key `key` (also used for list prefixes).
    /// What bucket listings put before a repository key (`prefix/`, or
    /// nothing).
    fn listing_prefix(&self) -> String {
        if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        }
    }

    fn object_key(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{}/{key}", self.prefix)
        }
    }
}

/// Bucket names as S3 accepts them for new buckets: 3–63 characters of
/// `a-z`, `0-9`, `.` and `-`, starting and ending with a letter or digit.
fn check_bucket_name(bucket: &str) -> Result<(), &'static str> {
    if bucket.is_empty() {
        return Err("missing bucket name");
    }
    if !(3..=63).contains(&bucket.len()) {
        return Err("must be 3 to 63 characters long");
    }
    let inner = |b: u8| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-');
    let edge = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = bucket.as_bytes();
    if !bytes.iter().all(|&b| inner(b)) || !edge(bytes[0]) || !edge(bytes[bytes.len() - 1]) {
        return Err(
            "only a-z, 0-9, '.' and '-' are allowed, starting and ending with a letter or digit",
        );
    }
    Ok(())
}

pub(crate) fn check_endpoint(endpoint: &str) -> Result<(), &'static str> {
    let rest = endpoint
        .strip_prefix("http://")
        .or_else(|| endpoint.strip_prefix("https://"))
        .ok_or("must start with http:// or https://")?;
    let authority = rest.split('/').next().unwrap_or("");
    if authority.is_empty() {
        return Err("missing host");
    }
    if authority.contains('@') {
        return Err("credentials do not belong in the URL; \
                    use the AWS credential chain (AWS_ACCESS_KEY_ID, AWS_PROFILE, ...)");
    }
    if rest.contains(['?', '#']) {
        return Err("must not have a query or fragment (percent-encode it inside the s3:// URL)");
    }
    Ok(())
}

/// Decodes `%XX` escapes (and nothing else); `None` for malformed escapes or
/// non-UTF-8 results.
pub(crate) fn percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hi = (bytes.next()? as char).to_digit(16)?;
            let lo = (bytes.next()? as char).to_digit(16)?;
            out.push((hi * 16 + lo) as u8);
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).ok()
}

/// Client-side time limits of an [`S3Store`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct S3Timeouts {
    /// Establishing a connection (TCP and TLS). Default 5 s.
    pub connect: Duration,
    /// One request attempt: sending it, its body included, until the response
    /// headers (and, except for downloads, the response body) have arrived.
    /// Default 120 s, which fits a 16 MiB single-request upload at about
    /// 1.1 Mbit/s. Download bodies are guarded by the SDK's stalled-stream
    /// protection instead.
    pub attempt: Duration,
}

impl Default for S3Timeouts {
    fn default() -> Self {
        S3Timeouts {
            connect: Duration::from_secs(5),
            attempt: Duration::from_secs(120),
        }
    }
}

/// A repository in an S3 bucket. See the module documentation.
#[derive(Clone)]
pub struct S3Store {
    client: Client,
    cfg: S3Config,
    /// Object Lock retention for every object written (FORMAT.md §12b).
    lock: std::sync::Arc<std::sync::RwLock<Option<ObjectLock>>>,
    /// The endpoint in use when not AWS's own (from the URL or the
    /// environment), for messages.
    endpoint: Option<String>,
}

impl fmt::Debug for S3Store {
    // The SDK client's own Debug output is long and shows configuration we do
    // not want in logs; bucket, prefix and endpoint are enough.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Store")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl S3Store {
    /// Builds a client for `cfg` with the default [`S3Timeouts`]. Reads the
    /// AWS configuration (environment, profile files) but sends no request:
    /// an unreachable server or a missing bucket shows on the first operation
    /// (or use [`S3Store::check_bucket`]).
    pub async fn connect(cfg: S3Config) -> Result<S3Store, StoreError> {
        Self::connect_with(cfg, S3Timeouts::default()).await
    }

    /// [`S3Store::connect`] with explicit timeouts.
    ///
    /// Fails (not retryable) if `cfg` has an invalid bucket name or prefix.
    pub async fn connect_with(cfg: S3Config, timeouts: S3Timeouts) -> Result<S3Store, StoreError> {
        let bad = |why: String| config_error(format!("invalid S3 configuration: {why}"));
        check_bucket_name(&cfg.bucket).map_err(|e| bad(format!("bucket {:?}: {e}", cfg.bucket)))?;
        if !cfg.prefix.is_empty() {
            validate_key(&cfg.prefix).map_err(|e| bad(format!("prefix: {e}")))?;
        }
        if let Some(endpoint) = &cfg.endpoint {
            check_endpoint(endpoint).map_err(|e| bad(format!("endpoint: {e}")))?;
        }
        let region = RegionProviderChain::first_try(cfg.region.clone().map(Region::new))
            .or_else(EnvironmentVariableRegionProvider::new())
            .or_else(ProfileFileRegionProvider::new())
            .or_else(Region::from_static(DEFAULT_REGION));
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(region)
            // One attempt per call: retries belong to the store wrapper.
            .retry_config(RetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(timeouts.connect)
                    .operation_attempt_timeout(timeouts.attempt)
                    .build(),
            );
        if let Some(endpoint) = &cfg.endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        let sdk_config = loader.load().await;
        let s3_config = aws_sdk_s3::config::Builder::from(&sdk_config)
            .force_path_style(cfg.path_style)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .build();
        Ok(S3Store {
            lock: Default::default(),
            client: Client::from_conf(s3_config),
            endpoint: sdk_config.endpoint_url().map(str::to_owned),
            cfg,
        })
    }

    /// The store's configuration.
    pub fn config(&self) -> &S3Config {
        &self.cfg
    }

    /// The underlying SDK client (for setup steps outside the [`Store`]
    /// trait, e.g. creating a bucket in tests).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Checks that the bucket exists and the credentials may access it
    /// (`HeadBucket`); the error says what is wrong.
    pub async fn check_bucket(&self) -> Result<(), StoreError> {
        let result = self
            .client
            .head_bucket()
            .bucket(&self.cfg.bucket)
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) => {
                let mut f = Failure::new(e);
                // HEAD answers carry no error code; for a bucket, 404 is clear.
                if f.status == Some(404) && f.code.as_deref().is_none_or(|c| c == "NotFound") {
                    f.code = Some("NoSuchBucket".into());
                }
                Err(self.error("check bucket", "", f))
            }
        }
    }

    /// The Object Lock mode and retain-until date for an object written now.
    fn retention(&self) -> Option<(ObjectLockMode, aws_smithy_types::DateTime)> {
        let lock = (*self.lock.read().unwrap_or_else(|p| p.into_inner()))?;
        let until = SystemTime::now() + lock.duration;
        Some((
            object_lock_mode(lock.mode),
            aws_smithy_types::DateTime::from(until),
        ))
    }

    /// `put_if_absent` for large objects.
    async fn put_multipart(&self, key: &str, data: Bytes) -> Result<PutOutcome, StoreError> {
        if data.len().div_ceil(PART_SIZE) > MAX_PARTS {
            return Err(StoreError::Other {
                key: key.to_owned(),
                message: format!(
                    "object {key} of {} bytes is too large for one S3 upload",
                    data.len()
                ),
                retryable: false,
            });
        }
        // A retry after an ambiguous failure should not send 64 MiB again.
        // Any failure of this check (e.g. 403 for credentials that may write
        // but not read) just means uploading.
        if self.head(key).await.is_ok() {
            return Ok(PutOutcome::AlreadyExists);
        }
        let object = self.cfg.object_key(key);
        let mut req = self
            .client
            .create_multipart_upload()
            .bucket(&self.cfg.bucket)
            .key(&object);
        if let Some((mode, until)) = self.retention() {
            req = req
                .object_lock_mode(mode)
                .object_lock_retain_until_date(until);
        }
        let created = req
            .send()
            .await
            .map_err(|e| self.error("start multipart upload of", key, Failure::new(e)))?;
        let upload_id = created.upload_id().ok_or_else(|| {
            self.error(
                "start multipart upload of",
                key,
                Failure::protocol("no UploadId in the response"),
            )
        })?;
        let mut guard = AbortGuard {
            client: self.client.clone(),
            bucket: self.cfg.bucket.clone(),
            object: object.clone(),
            upload_id: Some(upload_id.to_owned()),
        };
        let result = self
            .upload_parts_and_complete(key, &object, upload_id, data)
            .await;
        match result {
            Ok(PutOutcome::Created) => guard.disarm(),
            // After a 412 the upload is still open; abort it.
            Ok(PutOutcome::AlreadyExists) | Err(_) => guard.abort().await,
        }
        result
    }

    async fn upload_parts_and_complete(
        &self,
        key: &str,
        object: &str,
        upload_id: &str,
        data: Bytes,
    ) -> Result<PutOutcome, StoreError> {
        let mut parts = Vec::new();
        let mut start = 0;
        while start < data.len() {
            let end = data.len().min(start + PART_SIZE);
            let part = data.slice(start..end);
            let number = i32::try_from(parts.len() + 1).expect("at most MAX_PARTS parts");
            let uploaded = self
                .client
                .upload_part()
                .bucket(&self.cfg.bucket)
                .key(object)
                .upload_id(upload_id)
                .part_number(number)
                .content_md5(aws_smithy_types::base64::encode(Md5::digest(&part)))
                .content_length(part.len() as i64)
                .body(sized_body(part))
                .send()
                .await
                .map_err(|e| {
                    self.error(&format!("upload part {number} of"), key, Failure::new(e))
                })?;
            let etag = uploaded.e_tag().ok_or_else(|| {
                self.error(
                    &format!("upload part {number} of"),
                    key,
                    Failure::protocol("no ETag in the response"),
                )
            })?;
            parts.push(
                CompletedPart::builder()
                    .e_tag(etag)
                    .part_number(number)
                    .build(),
            );
            start = end;
        }
        let completed = self
            .client
            .complete_multipart_upload()
            .bucket(&self.cfg.bucket)
            .key(object)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .if_none_match("*")
            .send()
            .await;
        self.create_outcome("complete multipart upload of", key, completed.map(|_| ()))
    }

    /// Every version of every object under `prefix` (ListObjectVersions):
    /// delete markers included, each key's versions newest first.
    pub async fn list_versions(&self, prefix: &str) -> Result<Vec<ObjectVersion>, StoreError> {
        validate_prefix(prefix)?;
        let full_prefix = self.cfg.object_key(prefix);
        let strip = self.cfg.listing_prefix();
        let mut out = Vec::new();
        let (mut key_marker, mut version_marker): (Option<String>, Option<String>) = (None, None);
        loop {
            let page = self
                .client
                .list_object_versions()
                .bucket(&self.cfg.bucket)
                .set_prefix((!full_prefix.is_empty()).then(|| full_prefix.clone()))
                .set_key_marker(key_marker.take())
                .set_version_id_marker(version_marker.take())
                .send()
                .await
                .map_err(|e| self.error("list versions of", prefix, Failure::new(e)))?;
            let key_of = |name: Option<&str>| -> Option<String> {
                let key = name?.strip_prefix(&strip)?;
                (key.starts_with(prefix) && validate_key(key).is_ok()).then(|| key.to_owned())
            };
            for v in page.versions() {
                let (Some(key), Some(id)) = (key_of(v.key()), v.version_id()) else {
                    continue;
                };
                out.push(ObjectVersion {
                    key,
                    version_id: id.to_owned(),
                    delete_marker: false,
                    size: v.size().and_then(|s| u64::try_from(s).ok()).unwrap_or(0),
                    modified: system_time(v.last_modified()),
                    latest: v.is_latest() == Some(true),
                });
            }
            for m in page.delete_markers() {
                let (Some(key), Some(id)) = (key_of(m.key()), m.version_id()) else {
                    continue;
                };
                out.push(ObjectVersion {
                    key,
                    version_id: id.to_owned(),
                    delete_marker: true,
                    size: 0,
                    modified: system_time(m.last_modified()),
                    latest: m.is_latest() == Some(true),
                });
            }
            if page.is_truncated() != Some(true) {
                break;
            }
            key_marker = page.next_key_marker().map(str::to_owned);
            version_marker = page.next_version_id_marker().map(str::to_owned);
            if key_marker.is_none() {
                return Err(self.error(
                    "list versions of",
                    prefix,
                    Failure::protocol("truncated version listing without a marker"),
                ));
            }
        }
        // Newest first within a key (the latest one first on equal times).
        out.sort_by(|a, b| {
            a.key
                .cmp(&b.key)
                .then(b.latest.cmp(&a.latest))
                .then(b.modified.cmp(&a.modified))
        });
        Ok(out)
    }

    /// One version of an object, whole or (`range`: offset, length) a range.
    pub async fn get_version(
        &self,
        key: &str,
        version_id: &str,
        range: Option<(u64, u64)>,
    ) -> Result<Bytes, StoreError> {
        validate_key(key)?;
        let mut req = self
            .client
            .get_object()
            .bucket(&self.cfg.bucket)
            .key(self.cfg.object_key(key))
            .version_id(version_id);
        if let Some((offset, len)) = range {
            if len == 0 {
                return Ok(Bytes::new());
            }
            req = req.range(format!("bytes={offset}-{}", offset + len - 1));
        }
        let out = match req.send().await {
            Ok(out) => out,
            Err(e) => {
                let f = Failure::new(e);
                return Err(if f.is_no_such_key() || f.status == Some(404) {
                    not_found(key)
                } else {
                    self.error("get version of", key, f)
                });
            }
        };
        let expected = out.content_length();
        let body = self.collect(key, out.body, expected).await?;
        if let Some((offset, len)) = range {
            if body.len() as u64 != len {
                return Err(StoreError::OutOfRange {
                    key: key.to_owned(),
                    offset,
                    len,
                    size: body.len() as u64,
                });
            }
        }
        Ok(body)
    }

    /// Collects a response body of `expected` bytes (when known).
    async fn collect(
        &self,
        key: &str,
        body: ByteStream,
        expected: Option<i64>,
    ) -> Result<Bytes, StoreError> {
        let data = body
            .collect()
            .await
            .map_err(|e| self.error("read body of", key, Failure::retryable(error_chain(&e))))?
            .into_bytes();
        if let Some(expected) = expected {
            if u64::try_from(expected).ok() != Some(data.len() as u64) {
                return Err(self.error(
                    "read body of",
                    key,
                    Failure::retryable(format!(
                        "got {} bytes, Content-Length said {expected}",
                        data.len()
                    )),
                ));
            }
        }
        Ok(data)
    }

    /// The size of `key` for an [`StoreError::OutOfRange`] answer.
    async fn out_of_range(&self, key: &str, offset: u64, len: u64) -> StoreError {
        match self.head(key).await {
            Ok(meta) => StoreError::OutOfRange {
                key: key.to_owned(),
                offset,
                len,
                size: meta.size,
            },
            Err(e) => e,
        }
    }

    /// What to do about a wrong-region answer.
    fn region_hint(&self, f: &Failure) -> String {
        let bucket = &self.cfg.bucket;
        match &f.bucket_region {
            Some(region) => {
                format!("bucket {bucket} is in region {region}: add ?region={region} to the URL")
            }
            None => format!("bucket {bucket} may be in another region: set ?region= in the URL"),
        }
    }

    /// Builds the [`StoreError`] for a failed `op` on `key` (may be empty).
    fn error(&self, op: &str, key: &str, f: Failure) -> StoreError {
        let bucket = &self.cfg.bucket;
        let target = if key.is_empty() {
            self.cfg.location()
        } else {
            format!("{}/{key}", self.cfg.location())
        };
        let server = match &self.endpoint {
            Some(endpoint) => format!("at {endpoint}"),
            None => "on AWS".to_owned(),
        };
        let code = f.code.as_deref().unwrap_or("");
        let (message, retryable) = match code {
            "NoSuchBucket" => (format!("bucket {bucket} does not exist {server}"), false),
            "AccessDenied" | "InvalidAccessKeyId" | "SignatureDoesNotMatch" | "InvalidToken"
            | "AllAccessDisabled" | "AccountProblem" => (
                format!(
                    "access denied: {op} {target}: {}; check AWS credentials \
                     (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and the bucket's permissions",
                    f.detail
                ),
                false,
            ),
            "ExpiredToken" => (
                format!(
                    "{op} {target}: the AWS credentials have expired ({}); renew them",
                    f.detail
                ),
                false,
            ),
            "RequestTimeTooSkewed" => (
                format!(
                    "{op} {target}: the system clock is too far off for S3 ({}); fix the time",
                    f.detail
                ),
                false,
            ),
            "PermanentRedirect"
            | "AuthorizationHeaderMalformed"
            | "IllegalLocationConstraintException" => (
                format!("{op} {target}: {}; {}", f.detail, self.region_hint(&f)),
                false,
            ),
            _ if f.status == Some(403) => (
                format!(
                    "access denied: {op} {target}: {}; check AWS credentials and the bucket's permissions",
                    f.detail
                ),
                false,
            ),
            _ if f.status == Some(301) => (
                format!("{op} {target}: {}; {}", f.detail, self.region_hint(&f)),
                false,
            ),
            _ if f.credentials => (
                format!(
                    "{op} {target}: no usable AWS credentials ({}); set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY \
                     or AWS_PROFILE",
                    f.detail
                ),
                f.retryable,
            ),
            // No answer: say which server did not answer.
            _ if f.status.is_none() && f.retryable => {
                (format!("{op} {target} {server}: {}", f.detail), true)
            }
            _ => (format!("{op} {target}: {}", f.detail), f.retryable),
        };
        let denied = matches!(
            code,
            "AccessDenied"
                | "InvalidAccessKeyId"
                | "SignatureDoesNotMatch"
                | "InvalidToken"
                | "AllAccessDisabled"
                | "AccountProblem"
                | "ExpiredToken"
        ) || f.status == Some(403);
        if code == "NoSuchBucket" {
            StoreError::NoContainer { message }
        } else if denied {
            StoreError::Denied {
                key: key.to_owned(),
                message,
            }
        } else {
            StoreError::Other {
                key: key.to_owned(),
                message,
                retryable,
            }
        }
    }
}

fn object_lock_mode(mode: LockMode) -> ObjectLockMode {
    match mode {
        LockMode::Compliance => ObjectLockMode::Compliance,
        LockMode::Governance => ObjectLockMode::Governance,
    }
}

/// One version of an object in a versioned bucket ([`S3Store::list_versions`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectVersion {
    pub key: String,
    pub version_id: String,
    /// A delete marker (no data), not a version with content.
    pub delete_marker: bool,
    pub size: u64,
    pub modified: Option<SystemTime>,
    pub latest: bool,
}

#[async_trait::async_trait]
impl Store for S3Store {
    fn location(&self) -> String {
        self.cfg.location()
    }

    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<PutOutcome, StoreError> {
        validate_key(key)?;
        if data.len() > MULTIPART_THRESHOLD {
            return self.put_multipart(key, data).await;
        }
        let crc = crc32fast::hash(&data).to_be_bytes();
        let mut req = self
            .client
            .put_object()
            .bucket(&self.cfg.bucket)
            .key(self.cfg.object_key(key))
            .if_none_match("*")
            .checksum_crc32(aws_smithy_types::base64::encode(crc));
        // (Prune's clock markers under locks/ are not locked: it deletes
        // them at once.)
        let locked = self.retention().filter(|_| !key.starts_with("locks/"));
        if let Some((mode, until)) = locked {
            // Object Lock puts need Content-MD5 (or an SDK checksum header).
            req = req
                .object_lock_mode(mode)
                .object_lock_retain_until_date(until)
                .content_md5(aws_smithy_types::base64::encode(Md5::digest(&data)));
        }
        let result = req
            .content_length(data.len() as i64)
            .body(sized_body(data))
            .send()
            .await;
        self.create_outcome("put", key, result.map(|_| ()))
    }

    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        validate_key(key)?;
        let result = self
            .client
            .get_object()
            .bucket(&self.cfg.bucket)
            .key(self.cfg.object_key(key))
            .send()
            .await;
        let out = match result {
            Ok(out) => out,
            Err(e) => {
                let f = Failure::new(e);
                return Err(if f.is_no_such_key() {
                    not_found(key)
                } else {
                    self.error("get", key, f)
                });
            }
        };
        let expected = out.content_length();
        self.collect(key, out.body, expected).await
    }

    async fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Bytes, StoreError> {
        validate_key(key)?;
        if len == 0 {
            // No request can ask for zero bytes; the object must still exist
            // and the offset be within it.
            let meta = self.head(key).await?;
            if offset > meta.size {
                return Err(StoreError::OutOfRange {
                    key: key.to_owned(),
                    offset,
                    len,
                    size: meta.size,
                });
            }
            return Ok(Bytes::new());
        }
        let Some(end) = offset.checked_add(len) else {
            return Err(self.out_of_range(key, offset, len).await);
        };
        let result = self
            .client
            .get_object()
            .bucket(&self.cfg.bucket)
            .key(self.cfg.object_key(key))
            .range(format!("bytes={offset}-{}", end - 1))
            .send()
            .await;
        let out = match result {
            Ok(out) => out,
            Err(e) => {
                let f = Failure::new(e);
                if f.is_no_such_key() {
                    return Err(not_found(key));
                }
                if f.status == Some(416) || f.code.as_deref() == Some("InvalidRange") {
                    return Err(match self.out_of_range(key, offset, len).await {
                        StoreError::OutOfRange { size, .. } if end <= size => self.error(
                            "get range of",
                            key,
                            Failure::retryable(format!(
                                "server refused range {offset}+{len} of an object of {size} bytes"
                            )),
                        ),
                        e => e,
                    });
                }
                return Err(self.error("get range of", key, f));
            }
        };
        let content_range = out.content_range().map(str::to_owned);
        let expected = out.content_length();
        let body = self.collect(key, out.body, expected).await?;
        let what = format!("range {offset}+{len}");
        match content_range {
            Some(header) => {
                let Some((first, last, size)) = parse_content_range(&header) else {
                    return Err(self.error(
                        "get range of",
                        key,
                        Failure::protocol(&format!("bad Content-Range {header:?} for {what}")),
                    ));
                };
                if end > size {
                    // S3 answers a range reaching past the end with what exists.
                    return Err(StoreError::OutOfRange {
                        key: key.to_owned(),
                        offset,
                        len,
                        size,
                    });
                }
                if first != offset || last.checked_add(1) != Some(end) || body.len() as u64 != len {
                    return Err(self.error(
                        "get range of",
                        key,
                        Failure::retryable(format!(
                            "asked for {what}, got Content-Range {header:?} with {} bytes",
                            body.len()
                        )),
                    ));
                }
                Ok(body)
            }
            // No Content-Range: the server ignored the Range and sent it all.
            None => {
                let size = body.len() as u64;
                if end > size {
                    return Err(StoreError::OutOfRange {
                        key: key.to_owned(),
                        offset,
                        len,
                        size,
                    });
                }
                // In range, so these fit in usize.
                Ok(body.slice(offset as usize..end as usize))
            }
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        validate_prefix(prefix)?;
        let full_prefix = self.cfg.object_key(prefix);
        let strip = self.cfg.listing_prefix();
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            // No delimiter at all: s3s-fs treats an empty `delimiter=` as one.
            let page = self
                .client
                .list_objects_v2()
                .bucket(&self.cfg.bucket)
                .set_prefix((!full_prefix.is_empty()).then(|| full_prefix.clone()))
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|e| self.error("list", prefix, Failure::new(e)))?;
            for object in page.contents() {
                let Some(name) = object.key() else { continue };
                let Some(key) = name.strip_prefix(&strip) else {
                    continue;
                };
                if !key.starts_with(prefix) || validate_key(key).is_err() {
                    tracing::warn!(
                        store = %self.cfg.location(),
                        object = name,
                        "ignoring object that is not a valid key"
                    );
                    continue;
                }
                let size = object.size().and_then(|s| u64::try_from(s).ok());
                let Some(size) = size else {
                    return Err(self.error(
                        "list",
                        prefix,
                        Failure::protocol(&format!("no size for {name} in the listing")),
                    ));
                };
                out.push(ObjectMeta {
                    key: key.to_owned(),
                    size,
                    modified: system_time(object.last_modified()),
                });
            }
            if page.is_truncated() != Some(true) {
                break;
            }
            match page.next_continuation_token() {
                Some(next) if !next.is_empty() => token = Some(next.to_owned()),
                _ => {
                    return Err(self.error(
                        "list",
                        prefix,
                        Failure::protocol("truncated listing without a continuation token"),
                    ))
                }
            }
        }
        out.sort_unstable_by(|a, b| a.key.cmp(&b.key));
        out.dedup_by(|a, b| a.key == b.key);
        Ok(out)
    }

    async fn head(&self, key: &str) -> Result<ObjectMeta, StoreError> {
        validate_key(key)?;
        let result = self
            .client
            .head_object()
            .bucket(&self.cfg.bucket)
            .key(self.cfg.object_key(key))
            .send()
            .await;
        match result {
            Ok(out) => match out.content_length().and_then(|s| u64::try_from(s).ok()) {
                Some(size) => Ok(ObjectMeta {
                    key: key.to_owned(),
                    size,
                    modified: system_time(out.last_modified()),
                }),
                None => Err(self.error(
                    "head",
                    key,
                    Failure::protocol("no Content-Length in the response"),
                )),
            },
            Err(e) => {
                let f = Failure::new(e);
                Err(if f.is_no_such_key() {
                    not_found(key)
                } else {
                    self.error("head", key, f)
                })
            }
        }
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        validate_key(key)?;
        if self
            .lock
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
        {
            // A versioned (locked) bucket keeps the data of a plain delete
            // behind a delete marker: delete the versions themselves (a
            // version still locked is refused by the store).
            for v in self.list_versions(key).await? {
                if v.key != key {
                    continue;
                }
                let r = self
                    .client
                    .delete_object()
                    .bucket(&self.cfg.bucket)
                    .key(self.cfg.object_key(key))
                    .version_id(&v.version_id)
                    .send()
                    .await;
                if let Err(e) = r {
                    let f = Failure::new(e);
                    if !f.is_no_such_key() {
                        return Err(self.error("delete a version of", key, f));
                    }
                }
            }
            return Ok(());
        }
        let result = self
            .client
            .delete_object()
            .bucket(&self.cfg.bucket)
            .key(self.cfg.object_key(key))
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) => {
                let f = Failure::new(e);
                if f.is_no_such_key() {
                    Ok(())
                } else {
                    Err(self.error("delete", key, f))
                }
            }
        }
    }

    fn set_object_lock(&self, lock: Option<ObjectLock>) {
        *self.lock.write().unwrap_or_else(|p| p.into_inner()) = lock;
    }

    async fn object_lock_enabled(&self) -> Result<bool, StoreError> {
        let r = self
            .client
            .get_object_lock_configuration()
            .bucket(&self.cfg.bucket)
            .send()
            .await;
        match r {
            Ok(out) => Ok(out
                .object_lock_configuration()
                .and_then(|c| c.object_lock_enabled())
                == Some(&ObjectLockEnabled::Enabled)),
            Err(e) => {
                let f = Failure::new(e);
                if f.code.as_deref() == Some("ObjectLockConfigurationNotFoundError")
                    || f.status == Some(404)
                {
                    Ok(false)
                } else {
                    Err(self.error("get the Object Lock configuration of", "", f))
                }
            }
        }
    }

    async fn extend_retention(&self, key: &str, until: SystemTime) -> Result<(), StoreError> {
        validate_key(key)?;
        let Some(lock) = *self.lock.read().unwrap_or_else(|p| p.into_inner()) else {
            return Err(StoreError::Other {
                key: key.to_owned(),
                message: "the repository has no Object Lock".into(),
                retryable: false,
            });
        };
        let mode = match lock.mode {
            LockMode::Compliance => ObjectLockRetentionMode::Compliance,
            LockMode::Governance => ObjectLockRetentionMode::Governance,
        };
        let retention = ObjectLockRetention::builder()
            .mode(mode)
            .retain_until_date(aws_smithy_types::DateTime::from(until))
            .build();
        self.client
            .put_object_retention()
            .bucket(&self.cfg.bucket)
            .key(self.cfg.object_key(key))
            .retention(retention)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| self.error("extend the retention of", key, Failure::new(e)))
    }
}

/// Aborts a multipart upload unless disarmed: explicitly via
/// [`AbortGuard::abort`], or in the background when dropped (the upload
/// future was cancelled).
struct AbortGuard {
    client: Client,
    bucket: String,
    object: String,
    upload_id: Option<String>,
}

impl AbortGuard {
    fn disarm(&mut self) {
        self.upload_id = None;
    }

    async fn abort(&mut self) {
        if let Some(upload_id) = self.upload_id.take() {
            abort_upload(&self.client, &self.bucket, &self.object, &upload_id).await;
        }
    }
}

impl Drop for AbortGuard {
    fn drop(&mut self) {
        let Some(upload_id) = self.upload_id.take() else {
            return;
        };
        let (client, bucket, object) = (
            self.client.clone(),
            self.bucket.clone(),
            self.object.clone(),
        );
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(
                    async move { abort_upload(&client, &bucket, &object, &upload_id).await },
                );
            }
            Err(_) => {
                tracing::warn!(
                    bucket,
                    object,
                    upload_id,
                    "cannot abort multipart upload: no runtime"
                );
            }
        }
    }
}

async fn abort_upload(client: &Client, bucket: &str, object: &str, upload_id: &str) {
    let result = client
        .abort_multipart_upload()
        .bucket(bucket)
        .key(object)
        .upload_id(upload_id)
        .send()
        .await;
    if let Err(e) = result {
        tracing::warn!(
            bucket,
            object,
            upload_id,
            error = %error_chain(&e),
            "cannot abort multipart upload; a lifecycle rule or a later cleanup must remove it"
        );
    }
}

/// A request body of known length, sent as-is (no `aws-chunked` encoding).
fn sized_body(data: Bytes) -> ByteStream {
    ByteStream::from(data)
}

/// An S3 `LastModified` as a [`SystemTime`], truncated to whole seconds;
/// `None` when absent or not representable on this platform.
///
/// HeadObject sends it as an HTTP date (whole seconds) while some servers
/// (MinIO, Ceph) list it with milliseconds; truncating makes `head` and
/// `list` agree.
fn system_time(dt: Option<&aws_smithy_types::DateTime>) -> Option<SystemTime> {
    let whole = aws_smithy_types::DateTime::from_secs(dt?.secs());
    SystemTime::try_from(whole).ok()
}

/// Parses `bytes FIRST-LAST/SIZE`.
fn parse_content_range(header: &str) -> Option<(u64, u64, u64)> {
    let rest = header.trim().strip_prefix("bytes ")?;
    let (range, size) = rest.split_once('/')?;
    let (first, last) = range.split_once('-')?;
    let (first, last, size) = (first.parse().ok()?, last.parse().ok()?, size.parse().ok()?);
    (first <= last && last < size).then_some((first, last, size))
}

fn not_found(key: &str) -> StoreError {
    StoreError::NotFound {
        key: key.to_owned(),
    }
}

fn config_error(message: String) -> StoreError {
    StoreError::Other {
        key: String::new(),
        message,
        retryable: false,
    }
}

/// What went wrong with one SDK call, before it is phrased for the user.
struct Failure {
    /// HTTP status, when a response arrived.
    status: Option<u16>,
    /// S3 error code (`NoSuchKey`, `SlowDown`, ...), when the response had one.
    code: Option<String>,
    /// The `x-amz-bucket-region` response header (wrong-region answers).
    bucket_region: Option<String>,
    /// The error in words (status, code and message, or the transport error).
    detail: String,
    /// Whether the same request may succeed later.
    retryable: bool,
    /// Whether resolving credentials failed (no request was sent).
    credentials: bool,
}

impl S3Store {
    /// The answer to a conditional create (`If-None-Match: *`): 412 means
    /// the object exists — possibly our own earlier attempt — which callers
    /// treat as success (names are content-addressed or random).
    fn create_outcome<E>(
        &self,
        what: &str,
        key: &str,
        result: Result<(), SdkError<E, HttpResponse>>,
    ) -> Result<PutOutcome, StoreError>
    where
        E: ProvideErrorMetadata + StdError + Send + Sync + 'static,
    {
        match result {
            Ok(()) => Ok(PutOutcome::Created),
            Err(e) => {
                let f = Failure::new(e);
                if f.is_precondition_failed() {
                    Ok(PutOutcome::AlreadyExists)
                } else {
                    Err(self.error(what, key, f))
                }
            }
        }
    }
}

impl Failure {
    fn new<E>(err: SdkError<E, HttpResponse>) -> Failure
    where
        E: ProvideErrorMetadata + StdError + Send + Sync + 'static,
    {
        let response = err.raw_response();
        let status = response.map(|r| r.status().as_u16());
        let bucket_region = response
            .and_then(|r| r.headers().get("x-amz-bucket-region"))
            .map(str::to_owned);
        let credentials = credentials_error(&err);
        match &err {
            SdkError::ServiceError(service) => {
                let inner = service.err();
                let code = inner.code().map(str::to_owned);
                let status = status.unwrap_or(0);
                let mut detail = format!("HTTP {status}");
                if let Some(code) = &code {
                    detail.push_str(&format!(" {code}"));
                }
                if let Some(message) = inner.message().filter(|m| !m.is_empty()) {
                    detail.push_str(&format!(": {message}"));
                }
                let retryable = retryable_status(status, code.as_deref());
                Failure {
                    status: Some(status),
                    code,
                    bucket_region,
                    detail,
                    retryable,
                    credentials: credentials.is_some(),
                }
            }
            _ => {
                let retryable = match &err {
                    // A bug or a bad setting: the same request fails again.
                    SdkError::ConstructionFailure(_) => false,
                    SdkError::TimeoutError(_) | SdkError::ResponseError(_) => true,
                    SdkError::DispatchFailure(dispatch) => match credentials {
                        Some(retryable) => retryable,
                        None => !dispatch.is_user(),
                    },
                    _ => true,
                };
                Failure {
                    status,
                    code: None,
                    bucket_region,
                    detail: error_chain(&err),
                    retryable,
                    credentials: credentials.is_some(),
                }
            }
        }
    }

    /// A malformed response (a server bug or a proxy in the way); retrying
    /// may help if it was a hiccup.
    fn protocol(what: &str) -> Failure {
        Failure::retryable(format!("unexpected response: {what}"))
    }

    fn retryable(detail: String) -> Failure {
        Failure {
            status: None,
            code: None,
            bucket_region: None,
            detail,
            retryable: true,
            credentials: false,
        }
    }

    fn is_precondition_failed(&self) -> bool {
        self.status == Some(412) || self.code.as_deref() == Some("PreconditionFailed")
    }

    /// 404 for the key, not for the bucket.
    fn is_no_such_key(&self) -> bool {
        match self.code.as_deref() {
            Some("NoSuchKey") => true,
            Some("NoSuchBucket") => false,
            // HEAD answers have no body and so no code; the SDK may say NotFound.
            None | Some("NotFound") => self.status == Some(404),
            _ => false,
        }
    }
}

/// Whether an HTTP error answer is worth retrying.
fn retryable_status(status: u16, code: Option<&str>) -> bool {
    let retryable_code = matches!(
        code,
        Some(
            "SlowDown"
                | "RequestTimeout"
                | "RequestTimeoutException"
                | "Throttling"
                | "ThrottlingException"
                | "TooManyRequestsException"
                | "ServiceUnavailable"
                | "InternalError"
                | "OperationAborted"
                // Another conditional write on the key was in flight.
                | "ConditionalRequestConflict"
        )
    );
    retryable_code || status >= 500 || status == 429 || status == 408
}

/// `err` and its sources as one line, skipping a source whose text its
/// parent already includes (multi-line texts are joined with `; `).
fn error_chain(err: &(dyn StdError + 'static)) -> String {
    let mut parts = vec![err.to_string()];
    let mut current = err.source();
    while let Some(e) = current {
        let text = e.to_string();
        if !text.is_empty() && !parts.last().is_some_and(|last| last.contains(&text)) {
            parts.push(text);
        }
        current = e.source();
    }
    let joined = parts.join(": ");
    let lines: Vec<&str> = joined
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    lines.join("; ")
}

/// `Some(retryable)` when `err` comes from resolving credentials: a provider
/// that could not load any (or is misconfigured) fails again; a timeout or a
/// failing remote provider (STS, IMDS) may recover.
fn credentials_error(err: &(dyn StdError + 'static)) -> Option<bool> {
    let mut current: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = current {
        if let Some(c) = e.downcast_ref::<CredentialsError>() {
            return Some(matches!(
                c,
                CredentialsError::ProviderTimedOut(_) | CredentialsError::ProviderError(_)
            ));
        }
        current = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_url() {
        let cfg = S3Config::parse_url("s3://my-bucket").unwrap();
        assert_eq!(
            cfg,
            S3Config {
                bucket: "my-bucket".into(),
                prefix: String::new(),
                endpoint: None,
                region: None,
                path_style: false
            }
        );
        assert_eq!(cfg.location(), "s3://my-bucket");
        assert_eq!(cfg.object_key("a/b"), "a/b");

        let cfg = S3Config::parse_url(
            "s3://b.x-1/some/prefix/?endpoint=http%3A%2F%2F127.0.0.1:9000/&region=eu-west-1",
        )
        .unwrap();
        assert_eq!(cfg.bucket, "b.x-1");
        assert_eq!(cfg.prefix, "some/prefix");
        assert_eq!(cfg.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(cfg.region.as_deref(), Some("eu-west-1"));
        assert!(cfg.path_style, "endpoint given: path style by default");
        assert_eq!(cfg.location(), "s3://b.x-1/some/prefix");
        assert_eq!(cfg.object_key("a/b"), "some/prefix/a/b");

        let cfg =
            S3Config::parse_url("s3://bkt/p?endpoint=https://s3.example.com&path_style=false")
                .unwrap();
        assert!(!cfg.path_style);
        assert!(
            S3Config::parse_url("s3://bkt?path_style=1")
                .unwrap()
                .path_style
        );

        for bad in [
            "",
            "bucket",
            "http://bucket",
            "s3://",
            "s3://ab",
            "s3://Bucket",
            "s3://-bucket",
            "s3://bu_cket",
            "s3://bucket//x",
            "s3://bucket/A",
            "s3://bucket/../x",
            "s3://bucket?foo=bar",
            "s3://bucket?endpoint",
            "s3://bucket?endpoint=ftp://x",
            "s3://bucket?endpoint=http://user:secret@host",
            "s3://bucket?endpoint=http://",
            "s3://bucket?region=",
            "s3://bucket?region=a%2Fb",
            "s3://bucket?path_style=yes",
            "s3://bucket?endpoint=%zz",
        ] {
            let err = S3Config::parse_url(bad).expect_err(bad);
            assert!(!err.is_retryable(), "{bad}");
            assert!(!err.to_string().contains("secret"), "{err}");
        }
    }

    #[test]
    fn content_range() {
        assert_eq!(parse_content_range("bytes 0-9/100"), Some((0, 9, 100)));
        assert_eq!(parse_content_range("bytes 95-99/100"), Some((95, 99, 100)));
        for bad in [
            "bytes 9-0/100",
            "bytes 0-100/100",
            "bytes */100",
            "0-9/100",
            "bytes 0-9/*",
        ] {
            assert_eq!(parse_content_range(bad), None, "{bad}");
        }
    }

    #[test]
    fn retry_classes() {
        assert!(retryable_status(503, Some("SlowDown")));
        assert!(retryable_status(500, None));
        assert!(retryable_status(200, Some("InternalError")));
        assert!(retryable_status(409, Some("ConditionalRequestConflict")));
        assert!(!retryable_status(403, Some("AccessDenied")));
        assert!(!retryable_status(404, Some("NoSuchBucket")));
        assert!(!retryable_status(400, Some("InvalidArgument")));
    }
}
