//! [`GcsStore`]: a repository in a Google Cloud Storage bucket, through
//! GCS's JSON API (addresses and credentials: [`crate::cloud`]).
//!
//! Requests are plain HTTPS calls with `reqwest`; getting a token (service
//! account JWTs, authorized-user refresh tokens, the metadata server) is
//! left to `object_store`'s GCS credential providers. The JSON API, not the
//! XML one `object_store` writes through, because it is what GCS documents
//! for conditional writes and resumable uploads, and the only write path
//! fake-gcs-server (the test emulator) implements.
//!
//! - **Create**: `POST /upload/storage/v1/b/B/o?uploadType=media&name=K&ifGenerationMatch=0`;
//!   GCS decides the condition atomically; `412` is
//!   [`PutOutcome::AlreadyExists`].
//! - **Large packs** (over [`MULTIPART_THRESHOLD`]): a resumable upload
//!   started with the same condition, sent in [`PART_SIZE`] chunks (each
//!   one request, so a slow link never needs a 64 MiB request to succeed
//!   whole); GCS checks the condition when the last chunk lands. A chunk
//!   the server answered with 5xx, 408 or 429 is sent again, up to
//!   [`REQUEST_TRIES`] times. A chunk whose answer was lost (reset,
//!   timeout) ends the session and the put (retryable): the retry layer
//!   starts a new one. Asking GCS how much it kept and resuming from there
//!   is not done: fake-gcs-server 1.54, the test server, finalises a
//!   truncated object when asked for that offset and appends a chunk sent
//!   twice, so neither path could be tested.
//! - **Reads**: `GET .../o/K?alt=media` with `Range:`; metadata with
//!   `GET .../o/K`; listings with `prefix=` and `pageToken`.

use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use object_store::gcp::{GcpCredentialProvider, GoogleCloudStorageBuilder};
use reqwest::header::{CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, LOCATION, RANGE};
use reqwest::{Method, StatusCode};

use crate::cloud::{
    self, no_container, one_line, CloudConfig, Credentials, Env, CONNECT_TIMEOUT,
    MULTIPART_THRESHOLD, PART_SIZE, REQUEST_TIMEOUT, REQUEST_TRIES,
};
use crate::s3::check_endpoint;
use crate::store::{validate_key, validate_prefix, ObjectMeta, PutOutcome, Store, StoreError};

/// Google's own endpoint.
const GOOGLE: &str = "https://storage.googleapis.com";
/// Objects per listing page (GCS's maximum).
const PAGE: &str = "1000";

/// A repository in a GCS bucket. See the module documentation.
#[derive(Clone)]
pub struct GcsStore {
    http: reqwest::Client,
    cfg: CloudConfig,
    /// `https://storage.googleapis.com`, or the endpoint in use.
    base: String,
    /// The endpoint when not Google's own, for messages.
    endpoint: Option<String>,
    /// None: unauthenticated (an emulator).
    auth: Option<GcpCredentialProvider>,
    credentials: Credentials,
}

impl std::fmt::Debug for GcsStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GcsStore")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

/// What went wrong with one request, before it is phrased for the user.
struct Failure {
    status: Option<u16>,
    detail: String,
    retryable: bool,
}

impl Failure {
    fn transport(e: &reqwest::Error) -> Failure {
        Failure {
            status: None,
            detail: one_line(e),
            retryable: true,
        }
    }
}

#[derive(serde::Deserialize)]
struct Object {
    name: String,
    /// A decimal string in the JSON API.
    size: String,
    updated: Option<String>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Listing {
    #[serde(default)]
    items: Vec<Object>,
    next_page_token: Option<String>,
}

/// `%`-encodes a bucket path for a URL path segment or query value. Keys and
/// prefixes are validated to a-z, 0-9, `.`, `_`, `-` and `/`: only `/`
/// needs escaping.
fn enc(s: &str) -> String {
    s.replace('/', "%2F")
}

impl GcsStore {
    /// A client for `cfg` with credentials from `env`; sends no request.
    pub fn connect_with(cfg: CloudConfig, env: Env<'_>) -> Result<GcsStore, StoreError> {
        let setup = |why: String| cloud::setup_error(&cfg, &why);
        let mut endpoint = cfg.endpoint.clone();
        let (auth, credentials) = if let Some(host) = env("STORAGE_EMULATOR_HOST") {
            // Google's client libraries take a bare host:port too.
            let host = if host.contains("://") {
                host
            } else {
                format!("http://{host}")
            };
            check_endpoint(&host).map_err(|why| setup(format!("STORAGE_EMULATOR_HOST: {why}")))?;
            endpoint.get_or_insert(host.trim_end_matches('/').to_owned());
            let credentials = Credentials {
                source: "none (STORAGE_EMULATOR_HOST: an emulator, unauthenticated)".into(),
                hint: "unset STORAGE_EMULATOR_HOST to use Google Cloud Storage itself",
            };
            (None, credentials)
        } else {
            let mut b = GoogleCloudStorageBuilder::new()
                .with_bucket_name(&cfg.container)
                .with_retry(cloud::no_retries());
            let credentials = match env("GOOGLE_APPLICATION_CREDENTIALS") {
                Some(file) => {
                    b = b.with_application_credentials(&file);
                    Credentials {
                        source: format!("GOOGLE_APPLICATION_CREDENTIALS ({file})"),
                        hint: "check that the service account has roles/storage.objectUser (or objectCreator and objectViewer) on the bucket",
                    }
                }
                None => Credentials {
                    source: "the metadata server (or gcloud's application-default credentials)"
                        .into(),
                    hint: "set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file, or give the VM's service account access to the bucket",
                },
            };
            let built = b.build().map_err(|e| setup(one_line(&e)))?;
            (Some(built.credentials().clone()), credentials)
        };
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(|e| setup(one_line(&e)))?;
        Ok(GcsStore {
            http,
            base: endpoint.clone().unwrap_or_else(|| GOOGLE.to_owned()),
            cfg,
            endpoint,
            auth,
            credentials,
        })
    }

    /// The bucket's name for repository key `key`.
    fn object_name(&self, key: &str) -> String {
        if self.cfg.prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{}/{key}", self.cfg.prefix)
        }
    }

    fn object_url(&self, key: &str) -> String {
        format!(
            "{}/storage/v1/b/{}/o/{}",
            self.base,
            self.cfg.container,
            enc(&self.object_name(key))
        )
    }

    fn upload_url(&self, kind: &str, key: &str) -> String {
        format!(
            "{}/upload/storage/v1/b/{}/o?uploadType={kind}&name={}&ifGenerationMatch=0",
            self.base,
            self.cfg.container,
            enc(&self.object_name(key))
        )
    }

    /// A request with the bearer token (none for an emulator).
    async fn request(&self, method: Method, url: &str) -> Result<reqwest::RequestBuilder, Failure> {
        let req = self.http.request(method, url);
        let Some(auth) = &self.auth else {
            return Ok(req);
        };
        match auth.get_credential().await {
            Ok(c) => Ok(req.bearer_auth(&c.bearer)),
            Err(e) => {
                let status = cloud::http_status(&e);
                Err(Failure {
                    status: status.filter(|s| (400..500).contains(s)).map(|_| 401),
                    detail: format!("getting a token: {}", one_line(&e)),
                    retryable: cloud::is_retryable(&e),
                })
            }
        }
    }

    /// Sends `req`; a non-2xx answer (other than those in `ok`) is a
    /// [`Failure`] with its body.
    async fn send(
        &self,
        req: reqwest::RequestBuilder,
        ok: &[StatusCode],
    ) -> Result<reqwest::Response, Failure> {
        let resp = req.send().await.map_err(|e| Failure::transport(&e))?;
        let status = resp.status();
        if status.is_success() || ok.contains(&status) {
            return Ok(resp);
        }
        let body = resp.text().await.unwrap_or_default();
        let code = status.as_u16();
        Err(Failure {
            status: Some(code),
            detail: format!(
                "{status}: {}",
                body.split_whitespace().collect::<Vec<_>>().join(" ")
            ),
            retryable: code >= 500 || code == 408 || code == 429,
        })
    }

    fn error(&self, what: &str, key: &str, f: Failure) -> StoreError {
        let at = if key.is_empty() {
            self.cfg.location()
        } else {
            format!("{}/{key}", self.cfg.location())
        };
        let via = match &self.endpoint {
            Some(ep) => format!(" at {ep}"),
            None => String::new(),
        };
        // A listing of an empty prefix and an upload never answer 404 for
        // a missing object; fake-gcs-server says only "Not Found".
        let container_op = what == "list" || what == "store";
        if f.status == Some(404) && (container_op || no_container(&f.detail)) {
            return StoreError::NoContainer {
                message: format!(
                    "the bucket {} does not exist{via}; create it (btrship does not), or check the repository address",
                    self.cfg.container
                ),
            };
        }
        match f.status {
            Some(404) => StoreError::NotFound {
                key: key.to_owned(),
            },
            Some(401) | Some(403) => StoreError::Denied {
                key: key.to_owned(),
                message: format!(
                    "Google Cloud Storage refused to {what} {at} with the credentials from {} ({}); {}",
                    self.credentials.source, f.detail, self.credentials.hint
                ),
            },
            _ => StoreError::Other {
                key: key.to_owned(),
                message: format!("cannot {what} {at}{via}: {}", f.detail),
                retryable: f.retryable,
            },
        }
    }

    /// Checks that the bucket exists and the credentials may list it.
    pub async fn check_container(&self) -> Result<(), StoreError> {
        let url = format!(
            "{}/storage/v1/b/{}/o?maxResults=1",
            self.base, self.cfg.container
        );
        let result = async {
            let req = self.request(Method::GET, &url).await?;
            self.send(req, &[]).await
        }
        .await;
        result.map(drop).map_err(|f| self.error("list", "", f))
    }

    async fn metadata(&self, key: &str) -> Result<Object, Failure> {
        let req = self.request(Method::GET, &self.object_url(key)).await?;
        let resp = self.send(req, &[]).await?;
        let body = resp.bytes().await.map_err(|e| Failure::transport(&e))?;
        serde_json::from_slice(&body).map_err(|e| Failure {
            status: None,
            detail: format!("malformed object metadata: {e}"),
            retryable: true,
        })
    }

    fn meta(&self, key: String, o: &Object) -> Result<ObjectMeta, StoreError> {
        let size = o.size.parse().map_err(|_| StoreError::Other {
            key: key.clone(),
            message: format!("{}: object {key} has a malformed size", self.cfg.location()),
            retryable: false,
        })?;
        let modified = o
            .updated
            .as_deref()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .map(SystemTime::from);
        Ok(ObjectMeta {
            key,
            size,
            modified,
        })
    }

    /// A resumable upload of `data` (a large pack).
    async fn put_resumable(&self, key: &str, data: &Bytes) -> Result<PutOutcome, Failure> {
        let total = data.len();
        let req = self
            .request(Method::POST, &self.upload_url("resumable", key))
            .await?
            .header("X-Upload-Content-Type", "application/octet-stream")
            .header("X-Upload-Content-Length", total)
            .header(CONTENT_LENGTH, 0);
        let resp = match self.send(req, &[]).await {
            Err(f) if f.status == Some(412) => return Ok(PutOutcome::AlreadyExists),
            other => other?,
        };
        let session = resp
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(|s| self.at_endpoint(s))
            .ok_or_else(|| Failure {
                status: None,
                detail: "a resumable upload started without a session URI".into(),
                retryable: true,
            })?;
        let sent = self.send_chunks(&session, data).await;
        if sent.is_err() {
            // Best effort: an unfinished session expires after a week.
            if let Ok(req) = self.request(Method::DELETE, &session).await {
                let _ = req.send().await;
            }
        }
        sent
    }

    /// The session URI at the endpoint in use: a proxy or private endpoint
    /// in front of GCS answers with its backend's own address.
    fn at_endpoint(&self, location: &str) -> String {
        if self.endpoint.is_none() {
            return location.to_owned();
        }
        let rest = location
            .strip_prefix("http://")
            .or_else(|| location.strip_prefix("https://"))
            .unwrap_or(location);
        match rest.find('/') {
            Some(at) => format!("{}{}", self.base, &rest[at..]),
            None => location.to_owned(),
        }
    }

    async fn send_chunks(&self, session: &str, data: &Bytes) -> Result<PutOutcome, Failure> {
        let total = data.len();
        let mut start = 0;
        let mut tries = 1;
        loop {
            let end = total.min(start + PART_SIZE);
            let req = self
                .request(Method::PUT, session)
                .await?
                .header(
                    CONTENT_RANGE,
                    format!("bytes {start}-{}/{total}", end.max(1) - 1),
                )
                .body(data.slice(start..end));
            match self.send(req, &[StatusCode::PERMANENT_REDIRECT]).await {
                // 308: more wanted; GCS says how much it has.
                // It may keep less than was sent: send on from there.
                Ok(resp) if resp.status() == StatusCode::PERMANENT_REDIRECT => {
                    let next = persisted(&resp).unwrap_or(end);
                    if next <= start || next >= total {
                        return Err(Failure {
                            status: None,
                            detail: format!(
                                "the resumable upload stalled at byte {start} of {total} (the server kept up to {next})"
                            ),
                            retryable: true,
                        });
                    }
                    start = next;
                    tries = 1;
                }
                Ok(_) => return Ok(PutOutcome::Created),
                Err(f) if f.status == Some(412) => return Ok(PutOutcome::AlreadyExists),
                // The session is gone (expired, or ended by a failure on
                // the server's side): a new upload, not a missing bucket.
                Err(f) if f.status == Some(404) => {
                    return Err(Failure {
                        status: None,
                        detail: format!(
                            "the resumable upload's session ended at byte {start} of {total} ({})",
                            f.detail
                        ),
                        retryable: true,
                    })
                }
                // The server answered and refused the chunk (5xx, 408, 429):
                // send it again. After a lost answer (no status) the chunk
                // may or may not have been kept, and fake-gcs-server appends
                // a chunk sent twice, so the whole upload starts over then.
                Err(f) if f.retryable && f.status.is_some() && tries < REQUEST_TRIES => {
                    cloud::pause_before_try(tries).await;
                    tries += 1;
                }
                Err(f) => return Err(f),
            }
        }
    }
}

/// The first byte not yet stored, from a `308`'s `Range: bytes=0-N`.
fn persisted(resp: &reqwest::Response) -> Option<usize> {
    let range = resp.headers().get(RANGE)?.to_str().ok()?;
    let last: usize = range.strip_prefix("bytes=0-")?.parse().ok()?;
    Some(last + 1)
}

#[async_trait::async_trait]
impl Store for GcsStore {
    fn location(&self) -> String {
        self.cfg.location()
    }

    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<PutOutcome, StoreError> {
        validate_key(key)?;
        if data.len() > MULTIPART_THRESHOLD && key.starts_with("packs/") {
            return self
                .put_resumable(key, &data)
                .await
                .map_err(|f| self.error("store", key, f));
        }
        let result = async {
            let req = self
                .request(Method::POST, &self.upload_url("media", key))
                .await?
                .header(CONTENT_TYPE, "application/octet-stream")
                .body(data);
            self.send(req, &[]).await
        }
        .await;
        match result {
            Ok(_) => Ok(PutOutcome::Created),
            Err(f) if f.status == Some(412) => Ok(PutOutcome::AlreadyExists),
            Err(f) => Err(self.error("store", key, f)),
        }
    }

    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        validate_key(key)?;
        let url = format!("{}?alt=media", self.object_url(key));
        let result = async {
            let req = self.request(Method::GET, &url).await?;
            let resp = self.send(req, &[]).await?;
            let expected = resp.content_length();
            let body = resp.bytes().await.map_err(|e| Failure::transport(&e))?;
            match expected {
                Some(n) if n != body.len() as u64 => Err(Failure {
                    status: None,
                    detail: format!("got {} of {n} bytes", body.len()),
                    retryable: true,
                }),
                _ => Ok(body),
            }
        }
        .await;
        result.map_err(|f| self.error("read", key, f))
    }

    async fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Bytes, StoreError> {
        validate_key(key)?;
        let out_of_range = |size: u64| StoreError::OutOfRange {
            key: key.to_owned(),
            offset,
            len,
            size,
        };
        let end = offset.checked_add(len).ok_or_else(|| out_of_range(0))?;
        if len == 0 {
            let m = self.head(key).await?;
            return if offset > m.size {
                Err(out_of_range(m.size))
            } else {
                Ok(Bytes::new())
            };
        }
        let url = format!("{}?alt=media", self.object_url(key));
        let result = async {
            let req = self
                .request(Method::GET, &url)
                .await?
                .header(RANGE, format!("bytes={offset}-{}", end - 1));
            let resp = self.send(req, &[]).await?;
            resp.bytes().await.map_err(|e| Failure::transport(&e))
        }
        .await;
        match result {
            Ok(data) if data.len() as u64 == len => Ok(data),
            Ok(data) => {
                // Short: past the end, or a cut-off body.
                let m = self.head(key).await?;
                if end > m.size {
                    Err(out_of_range(m.size))
                } else {
                    Err(cloud::short_read(&self.cfg, key, offset, data.len(), len))
                }
            }
            Err(f) if f.status == Some(416) => {
                // fake-gcs-server drops the connection after a 416, and the
                // pool may hand that one out next: one more try.
                let size = match self.head(key).await {
                    Err(e) if e.is_retryable() => self.head(key).await?.size,
                    other => other?.size,
                };
                Err(out_of_range(size))
            }
            Err(f) => Err(self.error("read", key, f)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        validate_prefix(prefix)?;
        let base = if self.cfg.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.cfg.prefix)
        };
        let full = format!("{base}{prefix}");
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut url = format!(
                "{}/storage/v1/b/{}/o?maxResults={PAGE}",
                self.base, self.cfg.container
            );
            if !full.is_empty() {
                url.push_str(&format!("&prefix={}", enc(&full)));
            }
            if let Some(t) = &token {
                url.push_str(&format!("&pageToken={}", urlencode(t)));
            }
            let page = async {
                let req = self.request(Method::GET, &url).await?;
                let resp = self.send(req, &[]).await?;
                let body = resp.bytes().await.map_err(|e| Failure::transport(&e))?;
                serde_json::from_slice::<Listing>(&body).map_err(|e| Failure {
                    status: None,
                    detail: format!("malformed listing: {e}"),
                    retryable: true,
                })
            }
            .await
            .map_err(|f| self.error("list", prefix, f))?;
            for o in &page.items {
                if let Some(key) = o.name.strip_prefix(&base).filter(|k| k.starts_with(prefix)) {
                    out.push(self.meta(key.to_owned(), o)?);
                }
            }
            match page.next_page_token {
                Some(t) if !t.is_empty() => token = Some(t),
                _ => break,
            }
        }
        Ok(cloud::sorted(out))
    }

    async fn head(&self, key: &str) -> Result<ObjectMeta, StoreError> {
        validate_key(key)?;
        let o = self
            .metadata(key)
            .await
            .map_err(|f| self.error("look up", key, f))?;
        self.meta(key.to_owned(), &o)
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        validate_key(key)?;
        let result = async {
            let req = self.request(Method::DELETE, &self.object_url(key)).await?;
            self.send(req, &[]).await
        }
        .await;
        match result {
            Ok(_) => Ok(()),
            Err(f) => match self.error("delete", key, f) {
                StoreError::NotFound { .. } => Ok(()),
                other => Err(other),
            },
        }
    }
}

/// `%`-encodes everything but unreserved characters (page tokens are
/// opaque).
fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The store for `cfg` (GCS), as a trait object.
pub fn connect_with(cfg: CloudConfig, env: Env<'_>) -> Result<Arc<dyn Store>, StoreError> {
    Ok(Arc::new(GcsStore::connect_with(cfg, env)?))
}
