//! The remote side of btrship: an object-store trait shaped like object
//! storage (put-if-absent, get, ranged get, list), its backends and
//! conformance suite, and the repository format on top of it — packs of
//! sealed blobs, indexes, trees and records (see `docs/FORMAT.md`).
//!
//! Layers, bottom up: [`store`] (dumb backends: [`local`], [`s3`], [`cloud`] (Azure) and [`gcs`]), [`format`] (the
//! in-store types), [`pack`] (pack layout), [`repo`] (a repository: reads,
//! dedup, packing, uploads, records), [`history`] (the chain of each
//! share+host's snapshot records and version batches), [`walk`] (reading
//! one chain through its summaries with bounded requests).

pub mod cloud;
pub mod conformance;
pub mod format;
pub mod gcs;
pub mod history;
pub mod layers;
pub mod local;
mod memindex;
pub mod pack;
pub mod padding;
pub mod repo;
pub mod s3;
pub mod stages;
pub mod store;
pub mod versioned;
pub mod walk;

pub use repo::{BlobLocation, PackWriter, RepoError, Repository, WriteStats};
pub use store::{ObjectMeta, PutOutcome, Store, StoreError};
