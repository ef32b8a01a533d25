//! `btrship`: ship a Samba share on btrfs to object storage — read-only
//! snapshots, compressed and encrypted locally — and restore any path as it
//! was at any time. This crate is the orchestration: configuration, the
//! state database, shipping a snapshot, restoring, checking. The binary
//! (`src/main.rs`, `src/cli/`) is the only place that builds a tokio runtime, prints, or
//! reads the environment; the library is also what the tests drive directly.

pub mod catalog;
pub mod check;
pub mod config;
pub mod daemon;
pub mod exit;
pub mod history;
pub mod metrics;
pub mod moment;
pub mod mount;
pub mod open;
pub mod progress;
pub mod prune;
pub mod queue;
pub mod repair;
pub mod restore;
pub mod retention;
pub mod ship;
pub mod state;
pub mod status;
pub mod systemd;
pub mod timespec;
