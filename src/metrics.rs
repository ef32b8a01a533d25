//! Prometheus metrics: what an operator alerts on (the RPO, the newest
//! durable moment, the queues, the store's requests and failures).
//!
//! One function computes them from the state database and a run's request
//! counters ([`render`]); the daemon serves them over HTTP at
//! `metrics_listen` (`GET /metrics`, OpenMetrics text), and one-shot
//! commands (`snapshot`, `check`) write them to `metrics_textfile`
//! atomically for node_exporter's textfile collector ([`write_textfile`]).
//!
//! Labels are `share` and at most `backend`, `op`, `result`: never paths,
//! object names or ids (unbounded cardinality, and paths are private).
//! The registry is built afresh for each scrape from durable state, so a
//! restarted daemon reports the same gauges; the request counters are the
//! process's own (a counter reset on restart is what Prometheus expects).
//!
//! Crate: `prometheus-client`, the Prometheus project's own Rust client
//! (typed metric families, OpenMetrics encoding); the HTTP side is `hyper`,
//! already in the build through the S3 SDK.

use crate::state::State;
use anyhow::{Context, Result};
use btrship_upload::layers::{CounterValues, OPS};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ShareLabel {
    share: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    share: String,
    op: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    share: String,
    backend: String,
    op: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    share: String,
    backend: String,
    op: String,
}

type FGauge = Gauge<f64, AtomicU64>;

/// The backend label of a repository address: `local`, `s3`, `azure` or
/// `gcs`.
pub fn backend_of(address: &str) -> &'static str {
    if address.starts_with("s3://") {
        "s3"
    } else if address.starts_with("azure://") {
        "azure"
    } else if address.starts_with("gs://") {
        "gcs"
    } else {
        "local"
    }
}

fn unix_seconds(t: &str) -> Option<f64> {
    chrono::DateTime::parse_from_rfc3339(t)
        .ok()
        .map(|t| t.timestamp_nanos_opt().unwrap_or(0) as f64 / 1e9)
}

/// The metrics of share `share` as OpenMetrics text (with `# EOF` when
/// `eof`; node_exporter's textfile collector wants it without).
pub fn render(
    share: &str,
    backend: &str,
    state: &State,
    counters: &CounterValues,
    eof: bool,
) -> Result<String> {
    let now = chrono::Utc::now();
    let now_s = now.timestamp_nanos_opt().unwrap_or(0) as f64 / 1e9;
    let label = ShareLabel {
        share: share.to_string(),
    };
    let mut reg = Registry::default();
    let gauge = |reg: &mut Registry, name: &str, help: &str, v: f64| {
        let g: Family<ShareLabel, FGauge> = Family::default();
        g.get_or_create(&label).set(v);
        reg.register(name, help, g);
    };

    // The RPO: the oldest change not yet durable (a pending capture, or a
    // snapshot taken but not shipped).
    let (depth, bytes_pending, oldest_capture) = state.capture_backlog()?;
    let snapshots = state.snapshots()?;
    let queued: Vec<_> = snapshots.iter().filter(|s| !s.shipped).collect();
    let oldest = [
        oldest_capture.as_deref().and_then(unix_seconds),
        queued.first().and_then(|s| unix_seconds(&s.taken_at)),
    ]
    .into_iter()
    .flatten()
    .fold(f64::INFINITY, f64::min);
    let lag = if oldest.is_finite() {
        (now_s - oldest).max(0.0)
    } else {
        0.0
    };
    gauge(
        &mut reg,
        "btrship_capture_lag_seconds",
        "Age of the oldest change not yet durable in the store (the recovery point objective now; 0 when everything is durable)",
        lag,
    );
    let last_snapshot = snapshots
        .iter()
        .rev()
        .find(|s| s.shipped)
        .and_then(|s| unix_seconds(&s.taken_at));
    let last_capture = state
        .last_shipped_capture_time()?
        .as_deref()
        .and_then(unix_seconds);
    if let Some(t) = [last_snapshot, last_capture]
        .into_iter()
        .flatten()
        .reduce(f64::max)
    {
        gauge(
            &mut reg,
            "btrship_last_durable_timestamp_seconds",
            "Time of the newest moment (snapshot or file version) that is durable in the store",
            t,
        );
    }
    gauge(
        &mut reg,
        "btrship_queue_depth",
        "Captured file changes waiting to ship",
        depth as f64,
    );
    gauge(
        &mut reg,
        "btrship_bytes_pending",
        "Bytes of captured file changes waiting to ship",
        bytes_pending as f64,
    );
    gauge(
        &mut reg,
        "btrship_snapshots_queued",
        "Snapshots taken and not yet shipped",
        queued.len() as f64,
    );
    let successes: Family<OpLabels, FGauge> = Family::default();
    for (op, kind) in [
        ("snapshot", "shipped"),
        ("check", "checked"),
        ("prune", "pruned"),
    ] {
        if let Some(t) = state.last_event(kind)?.and_then(|e| unix_seconds(&e.time)) {
            successes
                .get_or_create(&OpLabels {
                    share: share.to_string(),
                    op: op.to_string(),
                })
                .set(t);
        }
    }
    reg.register(
        "btrship_last_success_timestamp_seconds",
        "When snapshot, check and prune last succeeded",
        successes,
    );
    let overflows: Family<ShareLabel, Counter> = Family::default();
    overflows
        .get_or_create(&label)
        .inc_by(state.count_events("overflow")?);
    reg.register(
        "btrship_fanotify_overflows",
        "Times the kernel's fanotify queue overflowed (each reconciled with a snapshot)",
        overflows,
    );

    let requests: Family<RequestLabels, Counter> = Family::default();
    let by_op = counters.by_op();
    for (i, op) in OPS.iter().enumerate() {
        let failed = counters.op_errors[i];
        for (result, n) in [("ok", by_op[i].saturating_sub(failed)), ("error", failed)] {
            requests
                .get_or_create(&RequestLabels {
                    share: share.to_string(),
                    backend: backend.to_string(),
                    op: op.to_string(),
                    result: result.to_string(),
                })
                .inc_by(n);
        }
    }
    reg.register(
        "btrship_store_requests",
        "Store requests by operation and final result (after retries; not found counts as ok) since this process started",
        requests,
    );
    let bytes: Family<BackendLabels, Counter> = Family::default();
    for (op, n) in [
        ("put", counters.uploaded_bytes),
        ("get", counters.downloaded_bytes),
    ] {
        bytes
            .get_or_create(&BackendLabels {
                share: share.to_string(),
                backend: backend.to_string(),
                op: op.to_string(),
            })
            .inc_by(n);
    }
    reg.register(
        "btrship_store_bytes",
        "Bytes moved to (put) and from (get) the store since this process started",
        bytes,
    );
    let retries: Family<BackendLabels, Counter> = Family::default();
    retries
        .get_or_create(&BackendLabels {
            share: share.to_string(),
            backend: backend.to_string(),
            op: "any".to_string(),
        })
        .inc_by(counters.retries);
    reg.register(
        "btrship_store_retries",
        "Store requests sent again after a temporary failure since this process started",
        retries,
    );

    let mut text = String::new();
    if eof {
        prometheus_client::encoding::text::encode(&mut text, &reg)?;
    } else {
        prometheus_client::encoding::text::encode_registry(&mut text, &reg)?;
    }
    Ok(text)
}

/// Writes `text` to `path` atomically (a temporary file beside it, then a
/// rename), so node_exporter never reads half a file.
pub fn write_textfile(path: &Path, text: &str) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = std::fs::File::create(&tmp)
        .with_context(|| format!("cannot write metrics file {}", tmp.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot write metrics file {}", path.display()))?;
    Ok(())
}

/// What the HTTP server needs to answer a scrape.
pub struct Source {
    pub share: String,
    pub backend: &'static str,
    pub state: std::sync::Mutex<State>,
    pub counters: std::sync::Arc<btrship_upload::layers::Counters>,
}

impl Source {
    fn scrape(&self) -> Result<String> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        render(
            &self.share,
            self.backend,
            &state,
            &self.counters.values(),
            true,
        )
    }
}

/// Serves `GET /metrics` on `listener` until the runtime stops. Any other
/// path is 404; a scrape that fails is a 500 with the error (and logged).
pub async fn serve(listener: tokio::net::TcpListener, source: std::sync::Arc<Source>) {
    use http_body_util::Full;
    use hyper::body::Bytes;
    use hyper::{Response, StatusCode};
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("metrics: accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let source = source.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: hyper::Request<_>| {
                let source = source.clone();
                async move {
                    let (status, ctype, body) = if req.uri().path() != "/metrics" {
                        (StatusCode::NOT_FOUND, "text/plain", "try /metrics\n".into())
                    } else {
                        match tokio::task::spawn_blocking(move || source.scrape()).await {
                            Ok(Ok(text)) => (
                                StatusCode::OK,
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                                text,
                            ),
                            Ok(Err(e)) => {
                                tracing::warn!("metrics: {e:#}");
                                (
                                    StatusCode::INTERNAL_SERVER_ERROR,
                                    "text/plain",
                                    format!("{e:#}\n"),
                                )
                            }
                            Err(e) => (
                                StatusCode::INTERNAL_SERVER_ERROR,
                                "text/plain",
                                format!("{e}\n"),
                            ),
                        }
                    };
                    Response::builder()
                        .status(status)
                        .header("content-type", ctype)
                        .body(Full::new(Bytes::from(body)))
                }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await
            {
                tracing::debug!("metrics connection: {e}");
            }
        });
    }
}
