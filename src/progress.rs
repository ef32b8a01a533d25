//! Progress for long work: a line on stderr, redrawn at most twice a
//! second, only when stderr is a terminal and `--no-progress` is not given.
//! Every file counted is also a [`beat`]: the daemon's heartbeat (see
//! `status`) stops only when its shipping side makes no progress at all.

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

pub struct Progress {
    enabled: bool,
    label: &'static str,
    files: u64,
    bytes: u64,
    last: Instant,
    drawn: bool,
}

impl Progress {
    pub fn new(label: &'static str, allowed: bool) -> Self {
        Progress {
            enabled: allowed && std::io::stderr().is_terminal(),
            label,
            files: 0,
            bytes: 0,
            last: Instant::now(),
            drawn: false,
        }
    }

    pub fn file(&mut self, bytes: u64) {
        self.files += 1;
        self.bytes += bytes;
        beat();
        if self.enabled && self.last.elapsed() >= Duration::from_millis(500) {
            self.last = Instant::now();
            self.drawn = true;
            let mut err = std::io::stderr().lock();
            let _ = write!(
                err,
                "\r{}: {} files, {:.1} MiB   ",
                self.label,
                self.files,
                self.bytes as f64 / 1048576.0
            );
            let _ = err.flush();
        }
    }

    pub fn finish(&mut self) {
        if self.drawn {
            let _ = writeln!(std::io::stderr());
            self.drawn = false;
        }
    }
}
