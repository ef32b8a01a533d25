//! Progress of long work (`snapshot`, `restore`, `check --read-data`):
//!
//! - on a terminal, a bar (`indicatif`) with bytes, totals, rate and ETA
//!   when the total is known, a spinner with counts and rate otherwise;
//! - with `--progress-json`, one JSON object per second on stderr
//!   (`{"progress": {...}}`, the fields of [`Event`]), and a last one when
//!   the work ends;
//! - nothing when stderr is not a terminal or with `--no-progress`.
//!
//! Every file counted is also a [`beat`]: the daemon's heartbeat (see
//! `status`) stops only when its shipping side makes no progress at all.
//!
//! Crate: `indicatif`, the de-facto terminal progress bar for Rust (rate
//! limited redraws, ETA, hides itself when stderr is not a terminal).

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Milliseconds after `EPOCH` of the last [`beat`].
static LAST_BEAT: AtomicU64 = AtomicU64::new(0);
static EPOCH: OnceLock<Instant> = OnceLock::new();

fn now_ms() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// Records that work moved forward (a file read, a request answered, a
/// loop turned).
pub fn beat() {
    LAST_BEAT.fetch_max(now_ms(), Ordering::Relaxed);
}

/// How long since the last [`beat`] (since the first call, if none).
pub fn since_beat() -> Duration {
    Duration::from_millis(now_ms().saturating_sub(LAST_BEAT.load(Ordering::Relaxed)))
}

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Show {
    Nothing,
    /// A bar on stderr, if it is a terminal.
    Terminal,
    /// JSON lines on stderr.
    Json,
}

/// One `--progress-json` line: `{"progress": Event}`.
#[derive(Debug, serde::Serialize)]
pub struct Event<'a> {
    pub label: &'a str,
    pub files: u64,
    pub bytes: u64,
    pub total_files: Option<u64>,
    pub total_bytes: Option<u64>,
    pub seconds: f64,
    pub bytes_per_second: f64,
    pub eta_seconds: Option<f64>,
    pub done: bool,
}

pub struct Progress {
    show: Show,
    label: &'static str,
    bar: Option<indicatif::ProgressBar>,
    files: u64,
    bytes: u64,
    total: Option<(u64, u64)>,
    started: Instant,
    last: Instant,
}

const BAR: &str =
    "{prefix}: [{wide_bar}] {bytes}/{total_bytes} {binary_bytes_per_sec}, ETA {eta} {msg}";
const SPINNER: &str = "{spinner} {prefix}: {bytes} {binary_bytes_per_sec} {msg}";

impl Progress {
    pub fn new(label: &'static str, show: Show) -> Self {
        let bar = (show == Show::Terminal && std::io::stderr().is_terminal()).then(|| {
            let bar = indicatif::ProgressBar::new_spinner().with_prefix(label);
            if let Ok(style) = indicatif::ProgressStyle::with_template(SPINNER) {
                bar.set_style(style);
            }
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Progress {
            show,
            label,
            bar,
            files: 0,
            bytes: 0,
            total: None,
            started: Instant::now(),
            last: Instant::now(),
        }
    }

    /// The work's size, once known: the bar gets a length and an ETA.
    pub fn set_total(&mut self, files: u64, bytes: u64) {
        self.total = Some((files, bytes));
        if let Some(bar) = &self.bar {
            bar.set_length(bytes);
            if let Ok(style) = indicatif::ProgressStyle::with_template(BAR) {
                bar.set_style(style.progress_chars("=> "));
            }
        }
    }

    /// One file (or pack) of `bytes` done.
    pub fn file(&mut self, bytes: u64) {
        self.files += 1;
        self.bytes += bytes;
        beat();
        match self.show {
            Show::Nothing => {}
            Show::Terminal => {
                if let Some(bar) = &self.bar {
                    bar.inc(bytes);
                    if self.last.elapsed() >= Duration::from_millis(100) {
                        self.last = Instant::now();
                        bar.set_message(self.files_text());
                    }
                }
            }
            Show::Json => {
                if self.last.elapsed() >= Duration::from_secs(1) {
                    self.last = Instant::now();
                    self.emit(false);
                }
            }
        }
    }

    fn files_text(&self) -> String {
        match self.total {
            Some((total, _)) => format!("{}/{total} files", self.files),
            None => format!("{} files", self.files),
        }
    }

    /// The current state as an [`Event`].
    pub fn event(&self, done: bool) -> Event<'_> {
        let seconds = self.started.elapsed().as_secs_f64();
        let rate = if seconds > 0.0 {
            self.bytes as f64 / seconds
        } else {
            0.0
        };
        Event {
            label: self.label,
            files: self.files,
            bytes: self.bytes,
            total_files: self.total.map(|t| t.0),
            total_bytes: self.total.map(|t| t.1),
            seconds,
            bytes_per_second: rate,
            eta_seconds: self
                .total
                .filter(|_| rate > 0.0)
                .map(|(_, b)| b.saturating_sub(self.bytes) as f64 / rate),
            done,
        }
    }

    fn emit(&self, done: bool) {
        let line = serde_json::json!({ "progress": self.event(done) });
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "{line}");
        let _ = err.flush();
    }

    /// The work ended: the bar is cleared, a last JSON event written.
    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        if self.show == Show::Json {
            self.emit(true);
            self.show = Show::Nothing;
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}
