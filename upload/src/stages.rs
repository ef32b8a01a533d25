//! Where a ship's time goes: seconds per stage of the pipeline, summed over
//! the threads that ran it, so the next bottleneck is visible in every
//! `snapshot --json` report (and in `bench/run`'s table).
//!
//! Stages that wait for the disk or the store (stat, read, upload) count
//! wall time, the waiting included; the others (chunk, hash, seal, pack)
//! count the thread's CPU time, so a thread the scheduler preempted is not
//! charged for it. Timing costs two clock reads per file or blob (the
//! thread CPU clock is a system call of about 0.2 µs).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// One stage of the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// `lstat` and the xattrs of each entry (the file workers).
    Stat,
    /// Reading file data (wall time of the reads).
    Read,
    /// FastCDC over the data read, and the kernel's copy of it (the CPU
    /// of the reading thread, hashing excluded).
    Chunk,
    /// Content ids (keyed BLAKE3) and the dedup lookup.
    Hash,
    /// Compression (or the samples that skip it) and encryption.
    Seal,
    /// Closing a pack: its sealed header, padding and name (a hash of it).
    Pack,
    /// Storing packs and the index (wall time of each request, retries
    /// included).
    Upload,
}

impl Stage {
    const ALL: [Stage; 7] = [
        Stage::Stat,
        Stage::Read,
        Stage::Chunk,
        Stage::Hash,
        Stage::Seal,
        Stage::Pack,
        Stage::Upload,
    ];

    /// The stage's name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Stat => "stat",
            Stage::Read => "read",
            Stage::Chunk => "chunk",
            Stage::Hash => "hash",
            Stage::Seal => "seal",
            Stage::Pack => "pack",
            Stage::Upload => "upload",
        }
    }
}

/// Nanoseconds per [`Stage`], shared by every thread of one writer.
#[derive(Debug, Default)]
pub struct Stages([AtomicU64; 7]);

impl Stages {
    /// Adds `d` to `stage`.
    pub fn add(&self, stage: Stage, d: Duration) {
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.0[stage as usize].fetch_add(nanos, Ordering::Relaxed);
    }

    /// Runs `f`, counting its wall time to `stage`.
    pub fn time<T>(&self, stage: Stage, f: impl FnOnce() -> T) -> T {
        let start = Instant::now();
        let out = f();
        self.add(stage, start.elapsed());
        out
    }

    /// Runs `f`, counting the CPU time of this thread to `stage`.
    pub fn time_cpu<T>(&self, stage: Stage, f: impl FnOnce() -> T) -> T {
        let start = thread_cpu();
        let out = f();
        self.add(stage, thread_cpu().saturating_sub(start));
        out
    }

    /// Seconds per stage name, every stage listed.
    pub fn seconds(&self) -> BTreeMap<&'static str, f64> {
        Stage::ALL
            .iter()
            .map(|s| {
                let nanos = self.0[*s as usize].load(Ordering::Relaxed);
                (s.name(), nanos as f64 / 1e9)
            })
            .collect()
    }
}

/// CPU time this thread has used so far (user and system).
pub fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_add_up_per_name() {
        let s = Stages::default();
        s.add(Stage::Read, Duration::from_millis(1500));
        s.add(Stage::Read, Duration::from_millis(500));
        let v = s.time(Stage::Seal, || 7);
        assert_eq!(v, 7);
        let secs = s.seconds();
        assert_eq!(secs.len(), 7);
        assert!((secs["read"] - 2.0).abs() < 1e-9);
        assert!(secs["seal"] >= 0.0 && secs["seal"] < 1.0);
        assert_eq!(secs["upload"], 0.0);
    }

    #[test]
    fn cpu_time_counts_work_and_not_sleep() {
        let s = Stages::default();
        s.time_cpu(Stage::Pack, || {
            std::thread::sleep(Duration::from_millis(200))
        });
        // Work until this thread has used 100 ms of CPU, however busy the
        // machine (the wall time it takes does not matter).
        let mut x = 0u64;
        s.time_cpu(Stage::Hash, || {
            let from = thread_cpu();
            let give_up = Instant::now() + Duration::from_secs(30);
            while thread_cpu() - from < Duration::from_millis(100) && Instant::now() < give_up {
                x = x.wrapping_add(1);
            }
        });
        assert!(x > 0);
        let secs = s.seconds();
        assert!(secs["pack"] < 0.05, "{secs:?}");
        assert!(secs["hash"] >= 0.1, "{secs:?}");
    }
}
