//! `btrship sync NAME`: wait until every file closed before the call is
//! durable in the store (the daemon does the work).

use super::{parse_duration, print_json, App};
use anyhow::Result;
use btrship::exit::{self, UserError};
use btrship::state;

/// Wait until every file closed before this call is durable in the store
/// (needs the daemon).
#[derive(clap::Args)]
#[command(
    long_about = "Wait until every file closed on the share before this call is durable in the \
repository. The running daemon answers: it reads every event up to now, ships what it captured \
without waiting for the settle time, and the call returns once nothing up to that point is \
pending. Use it before a planned shutdown, or in scripts that must know a file is off-site.",
    after_help = "Examples:
  btrship sync office
  btrship sync office --timeout 30s --json"
)]
pub struct Args {
    /// The share.
    name: String,
    /// Give up after this long: 30s, 5m, 1h ... (exit 8).
    #[arg(long, default_value = "5m", value_parser = parse_duration, value_name = "DURATION")]
    timeout: std::time::Duration,
    #[arg(long)]
    json: bool,
}

pub fn run(app: &App, args: Args) -> Result<u8> {
    let Args {
        name,
        timeout,
        json,
    } = args;
    app.load_config(&name)?;
    if !btrship::daemon::daemon_running(&app.state_dir, &name) {
        return Err(UserError::new(
            exit::FAILURE,
            format!("no btrship daemon is running for share {name}; start it (systemctl start btrship@{name}, or btrship daemon {name})"),
        )
        .into());
    }
    let state = state::State::open(&app.state_path(&name))?;
    let requested = btrship::daemon::now_text();
    let id = state.request_sync(&requested)?;
    let started = std::time::Instant::now();
    let mut pending = Vec::new();
    let mut checked = std::time::Instant::now();
    while started.elapsed() < timeout {
        if checked.elapsed() > std::time::Duration::from_secs(1) {
            checked = std::time::Instant::now();
            if !btrship::daemon::daemon_running(&app.state_dir, &name) {
                state.forget_sync_request(id)?;
                return Err(UserError::new(
                    exit::FAILURE,
                    format!("the btrship daemon for share {name} stopped while syncing; start it again and retry"),
                )
                .into());
            }
        }
        if let Some(target) = state.sync_target(id)? {
            pending = state.pending_upto(target)?;
            if pending.is_empty() {
                state.forget_sync_request(id)?;
                if json {
                    print_json(
                        &serde_json::json!({"version": 1, "synced": true, "requested_at": requested, "seconds": started.elapsed().as_secs_f64()}),
                    )?;
                } else {
                    println!(
                        "synced: every file closed before {requested} is durable in the store ({:.2} s)",
                        started.elapsed().as_secs_f64()
                    );
                }
                return Ok(exit::OK);
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    state.forget_sync_request(id)?;
    let error = state
        .last_event("ship_failed")?
        .map(|e| format!("; last store error at {}: {}", e.time, e.message))
        .unwrap_or_default();
    let first = pending
        .first()
        .map(|(p, k)| format!(" (first: {} {k})", String::from_utf8_lossy(p)))
        .unwrap_or_else(|| " (the daemon has not answered)".into());
    Err(UserError::new(
        exit::STORE,
        format!(
            "sync timed out after {} s: {} changes are not durable yet{first}{error}",
            timeout.as_secs(),
            pending.len()
        ),
    )
    .into())
}
