//! `btrship status`: what a share's protection looks like right now, as one
//! typed report (its serde form is the `--json` schema) and one verdict.
//!
//! Health is honest: it is "ok" only when the share is protected as
//! configured. The daemon counts as expected when systemd has its unit
//! enabled, when its last run did not end cleanly, or when captured changes
//! wait for it; then a daemon that is not running is `daemon_dead` (or
//! `daemon_failed` when it stopped on a permanent error), and a running
//! one whose heartbeat (the mtime of its lock file, touched every
//! `HEARTBEAT_EVERY` while both its threads make progress) is older than
//! `STALLED_AFTER` is `daemon_stalled`. Every state but `ok` and `backlog`
//! is unhealthy: `btrship status` then exits with `exit::UNHEALTHY`.

use crate::config::ShareConfig;
use crate::state::{Event, State};
use anyhow::Result;
use serde::Serialize;
use std::path::Path;
use std::time::Duration;

/// How often a healthy daemon touches its heartbeat.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);
/// A running daemon whose heartbeat is older than this is stalled: twelve
/// missed beats. The capture thread beats whatever the store does; the
/// shipping side may be quiet for up to 4 minutes (one large pack on a slow
/// link) before the daemon stops beating, so a stalled shipper shows here
/// after about 5 minutes, a stalled capture thread after one.
pub const STALLED_AFTER: Duration = Duration::from_secs(60);

/// The verdict, worst first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// The daemon stopped on a permanent error (wrong key, no repository,
    /// permission denied, unsupported format): it will not retry.
    DaemonFailed,
    /// The daemon is expected but not running.
    DaemonDead,
    /// The daemon runs but has not made progress for `STALLED_AFTER`.
    DaemonStalled,
    /// The local spool of unshipped snapshots is full: the next snapshot
    /// coalesces one (a point in time is lost).
    SpoolFull,
    /// The store does not answer now.
    StoreUnreachable,
    /// The last attempt to ship failed (and retries go on).
    StoreFailing,
    /// Snapshots wait to ship; the store works.
    Backlog,
    Ok,
}

impl Health {
    pub fn is_healthy(self) -> bool {
        matches!(self, Health::Ok | Health::Backlog)
    }
}

/// The `--json` form of `btrship status` (`"version": 1`; fields are only
/// ever added).
#[derive(Debug, Serialize)]
pub struct StatusReport {
    pub version: u32,
    pub share: String,
    pub path: std::path::PathBuf,
    pub repository: String,
    pub health: Health,
    pub healthy: bool,
    /// One sentence per problem, worst first (empty when healthy and
    /// nothing waits).
    pub problems: Vec<String>,
    pub queue: QueueStatus,
    pub coalesced_total: u64,
    pub daemon: DaemonStatus,
    pub last_snapshot: Option<SnapshotStatus>,
    pub last_shipped: Option<ShippedStatus>,
    pub last_error: Option<ErrorStatus>,
    pub store: StoreStatus,
}

#[derive(Debug, Serialize)]
pub struct QueueStatus {
    pub snapshots: usize,
    pub names: Vec<String>,
    pub oldest_taken_at: Option<String>,
    pub oldest_age_seconds: Option<i64>,
    pub limit: usize,
    pub full: bool,
}

/// Where the daemon is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DaemonState {
    Running,
    Stalled,
    /// Stopped on a permanent error.
    Failed,
    /// Not running though expected (enabled, crashed, or changes wait).
    Dead,
    /// Not running, stopped cleanly, nothing waits for it.
    Stopped,
    /// Never ran for this share.
    Never,
}

#[derive(Debug, Serialize)]
pub struct DaemonStatus {
    pub running: bool,
    pub state: DaemonState,
    /// systemd has `btrship@NAME.service` enabled.
    pub enabled: bool,
    pub heartbeat_age_seconds: Option<u64>,
    pub queue_depth: u64,
    pub bytes_pending: u64,
    pub oldest_pending: Option<String>,
    pub oldest_pending_age_seconds: Option<i64>,
    pub last_versions: Option<EventStatus>,
    /// The last start, clean stop or failure of the daemon.
    pub last_lifecycle: Option<EventStatus>,
}

#[derive(Debug, Serialize)]
pub struct EventStatus {
    pub time: String,
    pub message: String,
}

#[derive(Debug, Serialize)]
pub struct SnapshotStatus {
    pub name: String,
    pub taken_at: String,
}

#[derive(Debug, Serialize)]
pub struct ShippedStatus {
    pub name: String,
    pub taken_at: String,
    pub shipped_at: Option<String>,
    pub record: Option<String>,
    pub store: Option<serde_json::Value>,
}

#[derive(Debug, Serialize)]
pub struct ErrorStatus {
    pub time: String,
    pub message: String,
    /// Newer than the last success.
    pub current: bool,
}

#[derive(Debug, Serialize)]
pub struct StoreStatus {
    pub reachable: bool,
    pub error: Option<String>,
    pub latency_ms: Option<u64>,
}

/// Event kinds of the daemon's life (the newest of them tells how its last
/// run ended).
pub const DAEMON_STARTED: &str = "daemon_started";
pub const DAEMON_STOPPED: &str = "daemon_stopped";
pub const DAEMON_FAILED: &str = "daemon_failed";

/// Where systemd keeps the enablement links of system units.
const SYSTEMD_WANTS: &[&str] = &[
    "/etc/systemd/system/multi-user.target.wants",
    "/etc/systemd/system/default.target.wants",
];

fn enabled_in_systemd(name: &str) -> bool {
    SYSTEMD_WANTS.iter().any(|d| {
        Path::new(d)
            .join(format!("btrship@{name}.service"))
            .exists()
    })
}

/// Builds the report. `probe` is the store's answer to one request (its
/// latency, or why not); `stalled_after` is normally `STALLED_AFTER`.
pub fn report(
    cfg: &ShareConfig,
    state: &State,
    state_dir: &Path,
    probe: std::result::Result<u64, String>,
    stalled_after: Duration,
) -> Result<StatusReport> {
    let name = &cfg.name;
    let now = chrono::Utc::now();
    let age = |t: &str| {
        chrono::DateTime::parse_from_rfc3339(t)
            .ok()
            .map(|t| (now - t.with_timezone(&chrono::Utc)).num_seconds().max(0))
    };
    let snapshots = state.snapshots()?;
    let queued: Vec<_> = snapshots.iter().filter(|s| !s.shipped).collect();
    let last_shipped = snapshots.iter().rev().find(|s| s.shipped);
    let last_error = state.last_event("ship_failed")?;
    let last_ok = state.last_event("shipped")?;
    let last_versions = state.last_event("versions")?;
    // Errors newer than the last success are current.
    let newest_ok = [&last_ok, &last_versions]
        .into_iter()
        .flatten()
        .map(|e| e.time.clone())
        .max();
    let failing = match (&last_error, &newest_ok) {
        (Some(e), Some(ok)) => e.time > *ok,
        (Some(_), None) => true,
        _ => false,
    };
    let spool_full = queued.len() >= cfg.max_queued_snapshots.max(1);

    let running = crate::daemon::daemon_running(state_dir, name);
    let heartbeat = crate::daemon::heartbeat_age(state_dir, name);
    let enabled = enabled_in_systemd(name);
    let lifecycle = state.last_event_of(&[DAEMON_STARTED, DAEMON_STOPPED, DAEMON_FAILED])?;
    let (captures, capture_bytes, oldest_capture) = state.capture_backlog()?;
    let ended = |kind: &str| {
        lifecycle
            .as_ref()
            .is_some_and(|e| e.kind.as_deref() == Some(kind))
    };
    let daemon_state = if running {
        match heartbeat {
            Some(a) if a > stalled_after => DaemonState::Stalled,
            _ => DaemonState::Running,
        }
    } else if ended(DAEMON_FAILED) {
        DaemonState::Failed
    } else if enabled || ended(DAEMON_STARTED) || captures > 0 {
        DaemonState::Dead
    } else if lifecycle.is_some() {
        DaemonState::Stopped
    } else {
        DaemonState::Never
    };

    let mut problems = Vec::new();
    let mut worst = Health::Ok;
    let mut add = |h: Health, text: String| {
        if (h as u8) < (worst as u8) {
            worst = h;
        }
        problems.push(text);
    };
    match daemon_state {
        DaemonState::Failed => add(
            Health::DaemonFailed,
            format!(
                "the daemon stopped on a permanent error: {}; fix it, then systemctl restart btrship@{name}",
                lifecycle.as_ref().map(|e| e.message.as_str()).unwrap_or("?")
            ),
        ),
        DaemonState::Dead => add(
            Health::DaemonDead,
            format!(
                "the daemon is not running{}{}; start it: systemctl start btrship@{name}",
                if enabled { " though enabled" } else { "" },
                if captures > 0 {
                    format!(" and {captures} captured changes wait for it")
                } else {
                    String::new()
                }
            ),
        ),
        DaemonState::Stalled => add(
            Health::DaemonStalled,
            format!(
                "the daemon runs but made no progress for {} s; see journalctl -u btrship@{name}",
                heartbeat.map_or(0, |a| a.as_secs())
            ),
        ),
        _ => {}
    }
    if spool_full {
        add(
            Health::SpoolFull,
            format!(
                "{} snapshots wait to ship (the limit): the next one coalesces one",
                queued.len()
            ),
        );
    }
    if let Err(e) = &probe {
        add(
            Health::StoreUnreachable,
            format!("the store is not reachable: {e}"),
        );
    }
    if failing {
        add(
            Health::StoreFailing,
            format!(
                "shipping fails: {}",
                last_error
                    .as_ref()
                    .map(|e| e.message.as_str())
                    .unwrap_or("")
            ),
        );
    }
    if !queued.is_empty() && worst == Health::Ok {
        worst = Health::Backlog;
    }

    let event = |e: &Event| EventStatus {
        time: e.time.clone(),
        message: e.message.clone(),
    };
    Ok(StatusReport {
        version: 1,
        share: cfg.name.clone(),
        path: cfg.path.clone(),
        repository: cfg.repo.clone(),
        health: worst,
        healthy: worst.is_healthy(),
        problems,
        queue: QueueStatus {
            snapshots: queued.len(),
            names: queued.iter().map(|s| s.name.clone()).collect(),
            oldest_taken_at: queued.first().map(|s| s.taken_at.clone()),
            oldest_age_seconds: queued.first().and_then(|s| age(&s.taken_at)),
            limit: cfg.max_queued_snapshots,
            full: spool_full,
        },
        coalesced_total: state.count_events("coalesced")?,
        daemon: DaemonStatus {
            running,
            state: daemon_state,
            enabled,
            heartbeat_age_seconds: heartbeat.filter(|_| running).map(|a| a.as_secs()),
            queue_depth: captures,
            bytes_pending: capture_bytes,
            oldest_pending_age_seconds: oldest_capture.as_deref().and_then(age),
            oldest_pending: oldest_capture,
            last_versions: last_versions.as_ref().map(event),
            last_lifecycle: lifecycle.as_ref().map(event),
        },
        last_snapshot: snapshots.last().map(|s| SnapshotStatus {
            name: s.name.clone(),
            taken_at: s.taken_at.clone(),
        }),
        last_shipped: last_shipped.map(|s| ShippedStatus {
            name: s.name.clone(),
            taken_at: s.taken_at.clone(),
            shipped_at: s.shipped_at.clone(),
            record: s.record.clone(),
            store: s
                .stats
                .as_deref()
                .and_then(|s| serde_json::from_str::<serde_json::Value>(s).ok())
                .and_then(|v| v.get("store").cloned()),
        }),
        last_error: last_error.as_ref().map(|e| ErrorStatus {
            time: e.time.clone(),
            message: e.message.clone(),
            current: failing,
        }),
        store: StoreStatus {
            reachable: probe.is_ok(),
            latency_ms: probe.as_ref().ok().copied(),
            error: probe.err(),
        },
    })
}
