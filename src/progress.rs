//! Progress for long work: a line on stderr, redrawn at most twice a
//! second, only when stderr is a terminal and `--no-progress` is not given.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

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
