//! `btrship prune`: retention, then garbage collection (FORMAT.md §5c).
//!
//! One run: take the store's time (and refuse a local clock that is off),
//! read every chain of the repository, forget the moments the share's
//! policy no longer keeps (a forget record), compute every blob the kept
//! moments of every share and host reference, then mark, recover and
//! sweep packs in a new garbage record *before* deleting anything. No
//! repository lock: ships go on meanwhile, kept safe by the writers'
//! rule (`history::append`). A run killed at any point leaves a
//! repository `check --read-data` finds clean: records are written before
//! the deletes they announce, and deletes are redone by the next run.

use crate::catalog::{Catalog, MomentRow};
use crate::exit::{UserError, DAMAGED, USAGE};
use crate::history::sync_chain;
use crate::retention::{self, Decision, Moment};
use anyhow::{Context, Result};
use btrship_crypto::ContentId;
use btrship_upload::format::{BlobKind, ForgetRecord, GarbageRecord, MarkedPack};
use btrship_upload::history::{history_name, span, summary_name, HistoryBody, HistoryKind};
use btrship_upload::{ObjectMeta, PutOutcome, Repository};
use chrono::{DateTime, Utc};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// A mark must be this old (store time) before its pack may go, whatever
/// `--grace` says: twice [`crate::history::PUT_AFTER_CHECK`] (§5c).
pub const MIN_MARK_AGE: Duration = Duration::from_secs(60);

/// [`MIN_MARK_AGE`], unless `BTRSHIP_TEST_MIN_MARK_AGE` (seconds) lowers
/// it: for tests with no ship running beside the prune, which would
/// otherwise wait a minute per sweep. Never set it in production: it
/// removes the margin the writers' rule relies on.
fn min_mark_age() -> Duration {
    std::env::var("BTRSHIP_TEST_MIN_MARK_AGE")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(MIN_MARK_AGE, Duration::from_secs)
}

/// The local clock may be this far off the store's.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(300);

/// Default `--grace`.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(24 * 3600);

pub struct Options {
    pub dry_run: bool,
    pub grace: Duration,
    /// A used pack whose unused share is above this (0..1) is repacked.
    pub repack_unused: f64,
    /// Bytes of packs repacked per run at most.
    pub max_repack: u64,
}

/// One moment's verdict, for `--dry-run` and `--json`.
#[derive(Debug, serde::Serialize)]
pub struct MomentVerdict {
    pub place: u64,
    pub kind: &'static str,
    pub time: String,
    pub keep: bool,
    /// Why it is kept (`newest`, `hourly`, `needed-by 12`, ...); empty
    /// for a moment forgotten now.
    pub reasons: Vec<String>,
}

/// What a prune did (or, with `--dry-run`, would do). The `--json` schema.
#[derive(Debug, Default, serde::Serialize)]
pub struct PruneReport {
    pub version: u32,
    pub share: String,
    pub host: String,
    pub dry_run: bool,
    /// Moments of the share's chain before this run (forgotten earlier
    /// ones not counted).
    pub moments: u64,
    pub moments_kept: u64,
    pub moments_forgotten: u64,
    pub verdicts: Vec<MomentVerdict>,
    /// Chains (share, host) whose kept moments were read for references.
    pub chains: u64,
    pub blobs_referenced: u64,
    /// Their stored (sealed) bytes: the unique compressed data of the kept
    /// moments.
    pub bytes_referenced: u64,
    pub packs: u64,
    pub packs_marked: u64,
    pub packs_recovered: u64,
    pub packs_deleted: u64,
    pub bytes_deleted: u64,
    pub indexes_deleted: u64,
    pub history_objects_deleted: u64,
    /// Packs still marked after this run (deleted by a later one).
    pub packs_waiting: u64,
    pub bytes_waiting: u64,
    /// Packs repacked (their used blobs moved into new packs; the old
    /// ones are marked) and the bytes of blobs moved.
    pub packs_repacked: u64,
    pub bytes_repacked: u64,
    /// Object Lock: objects not deleted yet because their lock has not
    /// ended (deleted by a later run), and their bytes.
    pub objects_locked: u64,
    pub bytes_locked: u64,
    /// Object Lock: objects whose lock this run extended.
    pub locks_extended: u64,
    pub store_bytes_before: u64,
    pub store_bytes_after: u64,
    pub local: LocalCleanup,
    pub warnings: Vec<String>,
}

/// What prune removed on this machine.
#[derive(Debug, Default, serde::Serialize)]
pub struct LocalCleanup {
    pub snapshots_deleted: Vec<String>,
    pub captures_deleted: u64,
    pub events_deleted: u64,
}

/// The share whose policy is applied: name, host, policy windows, and
/// this machine's head place of its chain (0 on a machine that did not
/// ship it).
pub struct Target<'a> {
    pub share: &'a str,
    pub host: &'a str,
    pub windows: &'a retention::Windows,
    pub own_head: u64,
}

pub fn prune(repo: &Repository, target: &Target<'_>, opts: &Options) -> Result<PruneReport> {
    let mut report = PruneReport {
        version: 1,
        share: target.share.to_string(),
        host: target.host.to_string(),
        dry_run: opts.dry_run,
        ..Default::default()
    };
    // 1. The store's time.
    let (marker, now) = if opts.dry_run {
        (None, SystemTime::now())
    } else {
        let (name, t) = repo.store_time().context("cannot write the prune marker")?;
        let Some(t) = t else {
            let _ = repo.delete_objects(std::slice::from_ref(&name));
            return Err(UserError::new(
                USAGE,
                format!(
                    "{} does not report object times: prune cannot age objects there",
                    repo.location()
                ),
            )
            .into());
        };
        (Some(name), t)
    };
    let result = run(repo, target, opts, now, &mut report);
    if let Some(m) = marker {
        if let Err(e) = repo.delete_objects(&[m]) {
            report
                .warnings
                .push(format!("cannot delete the prune marker: {e}"));
        }
    }
    result.map(|()| report)
}

fn run(
    repo: &Repository,
    target: &Target<'_>,
    opts: &Options,
    now: SystemTime,
    report: &mut PruneReport,
) -> Result<()> {
    let skew = match now.duration_since(SystemTime::now()) {
        Ok(d) => d,
        Err(e) => e.duration(),
    };
    if skew > MAX_CLOCK_SKEW {
        return Err(UserError::new(
            crate::exit::FAILURE,
            format!(
                "this machine's clock is {}s off the store's ({}): prune ages objects by the store's clock and refuses; fix the clock (NTP) and run again",
                skew.as_secs(),
                repo.location()
            ),
        )
        .into());
    }
    // 2. Every chain, whole.
    let (regs, bad_regs) = repo.chain_registrations()?;
    if let Some((name, why)) = bad_regs.first() {
        return Err(refuse(format!(
            "chain registration {name} is unreadable: {why}"
        )));
    }
    let mut chains = Vec::new();
    for r in &regs {
        let at_least = if r.share == target.share && r.host == target.host {
            target.own_head
        } else {
            0
        };
        let st = sync_chain(repo, &r.share, &r.host, at_least)?;
        if let Some(p) = st.chain.problems.first() {
            return Err(refuse(format!(
                "the history of share {} on host {} has problems ({p})",
                r.share, r.host
            )));
        }
        if let Some((name, why)) = st.unreadable.first() {
            return Err(refuse(format!(
                "history object {name} is unreadable: {why}"
            )));
        }
        chains.push(((r.share.clone(), r.host.clone()), st));
    }
    if let Some((name, why)) = repo
        .damaged_indexes()
        .iter()
        .find(|(n, _)| !repo.index_deleted(n))
    {
        return Err(refuse(format!("index {name} is unreadable: {why}")));
    }
    let Some((_, own)) = chains
        .iter()
        .find(|((s, h), _)| s == target.share && h == target.host)
    else {
        return Err(UserError::new(
            crate::exit::NOT_FOUND,
            format!(
                "share {} has no history from host {} in {}",
                target.share,
                target.host,
                repo.location()
            ),
        )
        .into());
    };
    let cat: Arc<Catalog> = own.catalog().clone();
    let listing = repo.list("")?;
    let locks = Locks::new(repo, &cat, &listing)?;
    report.store_bytes_before = listing.iter().map(|o| o.size).sum();
    check_no_stray_history(repo, &chains, &listing)?;

    // 3. Forget.
    let rows = cat.moments(target.share, target.host)?;
    let forgotten_now = plan_forgets(target, &rows, report)?;
    if !forgotten_now.is_empty() && !opts.dry_run {
        let old = own.forgotten.clone().unwrap_or_default();
        let mut places: Vec<u64> = forgotten_now.clone();
        let merged = merge_ranges(&old.places, &mut places);
        let rec = ForgetRecord {
            share: target.share.to_string(),
            host: target.host.to_string(),
            number: old.number + 1,
            time: rfc3339(now),
            places: merged,
        };
        if repo.put_forget(&rec)? == PutOutcome::AlreadyExists {
            return Err(UserError::new(
                crate::exit::FAILURE,
                format!(
                    "another prune of share {} wrote forget record {} meanwhile; run prune again",
                    target.share, rec.number
                ),
            )
            .into());
        }
        cat.apply_forgotten(target.share, target.host, &rec.places)?;
    }
    let forgotten_set: HashSet<u64> = forgotten_now.iter().copied().collect();

    // 4. References of every kept moment of every chain.
    let mut refs = References::default();
    for ((share, host), st) in &chains {
        let cat = st.catalog();
        for m in cat.moments(share, host)? {
            let own_chain = share == target.share && host == target.host;
            if m.forgotten || (own_chain && forgotten_set.contains(&m.seq)) {
                continue;
            }
            let body = cat.moment_body(share, host, m.seq, &m.name)?;
            refs.add_moment(repo, cat, &body)?;
        }
        report.chains += 1;
    }
    refs.flush(&cat)?;
    report.blobs_referenced = refs.blobs.len() as u64;

    // 5. Mark, recover, sweep.
    let (old, skipped) = repo.newest_garbage()?;
    for (name, why) in skipped {
        report
            .warnings
            .push(format!("garbage record {name} skipped: {why}"));
    }
    let old = old.unwrap_or_default();
    let mut plan = plan_garbage(repo, &listing, &refs, &old, now, opts, report)?;
    report.packs_repacked = plan.repack.len() as u64;
    report.bytes_repacked = plan
        .repack
        .iter()
        .flat_map(|(_, b)| b.iter().map(|x| x.1.length))
        .sum();
    if opts.dry_run {
        return Ok(());
    }
    if !plan.repack.is_empty() {
        repack(repo, &mut plan, now)?;
    }
    if plan.changed {
        if repo.put_garbage(&plan.record)? == PutOutcome::AlreadyExists {
            return Err(UserError::new(
                crate::exit::FAILURE,
                format!(
                    "another prune wrote garbage record {} meanwhile; run prune again",
                    plan.record.number
                ),
            )
            .into());
        }
        locks.delete(repo, &plan.delete_packs, now, report)?;
        locks.delete(repo, &plan.delete_indexes, now, report)?;
        cat.drop_packs(&plan.delete_packs)?;
    }
    // Forgotten objects that a level-1 summary holds (readers walk it).
    let all_forgotten: Vec<u64> = cat
        .moments(target.share, target.host)?
        .into_iter()
        .filter(|m| m.forgotten)
        .map(|m| m.seq)
        .collect();
    let singles = forgotten_singles(repo, target, &all_forgotten, &listing);
    let singles = locks.delete(repo, &singles, now, report)?;
    report.history_objects_deleted = singles.len() as u64;
    // Older records: the newest two of each kind stay.
    let mut old_records: Vec<String> = listing
        .iter()
        .filter(|o| o.key.starts_with("gc/"))
        .map(|o| o.key.clone())
        .collect();
    old_records.sort();
    old_records.truncate(old_records.len().saturating_sub(1));
    let mut forgets: Vec<String> = listing
        .iter()
        .filter(|o| {
            o.key.starts_with(&btrship_upload::repo::forget_prefix(
                repo.key(),
                target.share,
                target.host,
            ))
        })
        .map(|o| o.key.clone())
        .collect();
    forgets.sort();
    forgets.truncate(forgets.len().saturating_sub(1));
    old_records.extend(forgets);
    locks.delete(repo, &old_records, now, report)?;
    report.store_bytes_after = report
        .store_bytes_before
        .saturating_sub(report.bytes_deleted);
    // 6. Object Lock: what stays gets its lock extended before it ends.
    let mut going: HashSet<&str> = plan
        .record
        .deleted_packs
        .iter()
        .map(|s| s.as_str())
        .collect();
    going.extend(plan.record.deleted_indexes.iter().map(|s| s.as_str()));
    going.extend(plan.record.marked.iter().map(|m| m.pack.as_str()));
    going.extend(singles.iter().map(|s| s.as_str()));
    going.extend(old_records.iter().map(|s| s.as_str()));
    locks.extend(repo, &cat, &listing, &going, now, report)?;
    Ok(())
}

/// Object Lock (FORMAT.md §12b): when each listed object's lock ends —
/// the date prune last set (the catalogue), else its store time plus the
/// repository's lock duration.
struct Locks {
    /// None: the repository has no Object Lock.
    duration: Option<Duration>,
    until: HashMap<String, SystemTime>,
    size: HashMap<String, u64>,
}

impl Locks {
    fn new(repo: &Repository, cat: &Catalog, listing: &[ObjectMeta]) -> Result<Locks> {
        let Some(duration) = repo
            .config()
            .object_lock
            .as_ref()
            .map(|l| Duration::from_secs(l.seconds))
        else {
            return Ok(Locks {
                duration: None,
                until: HashMap::new(),
                size: HashMap::new(),
            });
        };
        let extended = cat.lock_until()?;
        let mut until = HashMap::new();
        for o in listing {
            let written = o.modified.map(|t| t + duration);
            let set = extended
                .get(&o.key)
                .map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs((*s).max(0) as u64));
            if let Some(t) = written.max(set) {
                until.insert(o.key.clone(), t);
            }
        }
        Ok(Locks {
            duration: Some(duration),
            until,
            size: listing.iter().map(|o| (o.key.clone(), o.size)).collect(),
        })
    }

    /// Deletes the objects of `names` whose lock has ended (all of them
    /// without Object Lock); the others stay for a later run. Returns the
    /// names deleted.
    fn delete(
        &self,
        repo: &Repository,
        names: &[String],
        now: SystemTime,
        report: &mut PruneReport,
    ) -> Result<Vec<String>> {
        if self.duration.is_none() {
            repo.delete_objects(names)?;
            return Ok(names.to_vec());
        }
        let (locked, free): (Vec<String>, Vec<String>) = names
            .iter()
            .cloned()
            .partition(|n| self.until.get(n).is_some_and(|t| *t > now));
        report.objects_locked += locked.len() as u64;
        let bytes: u64 = locked.iter().filter_map(|n| self.size.get(n)).sum();
        report.bytes_locked += bytes;
        report.bytes_deleted = report.bytes_deleted.saturating_sub(bytes);
        repo.delete_objects(&free)?;
        Ok(free)
    }

    /// Extends to `now + duration` the lock of every listed object not in
    /// `going` whose lock ends within half the duration.
    fn extend(
        &self,
        repo: &Repository,
        cat: &Catalog,
        listing: &[ObjectMeta],
        going: &HashSet<&str>,
        now: SystemTime,
        report: &mut PruneReport,
    ) -> Result<()> {
        let Some(duration) = self.duration else {
            return Ok(());
        };
        let soon = now + duration / 2;
        let due: Vec<String> = listing
            .iter()
            .filter(|o| !o.key.starts_with("locks/") && !going.contains(o.key.as_str()))
            .filter(|o| self.until.get(&o.key).is_none_or(|t| *t < soon))
            .map(|o| o.key.clone())
            .collect();
        if due.is_empty() {
            return Ok(());
        }
        let until = now + duration;
        let failed = repo.extend_retention_many(&due, until);
        let ok: Vec<String> = due
            .iter()
            .filter(|n| !failed.iter().any(|(f, _)| f == *n))
            .cloned()
            .collect();
        let secs = until
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        cat.set_lock_until(&ok, secs, &[])?;
        report.locks_extended += ok.len() as u64;
        if let Some((name, why)) = failed.first() {
            report.warnings.push(format!(
                "the lock of {} objects could not be extended (first: {name}: {why}); the next prune tries again",
                failed.len()
            ));
        }
        Ok(())
    }
}

fn refuse(why: String) -> anyhow::Error {
    UserError::new(
        DAMAGED,
        format!("prune needs the whole history readable and refuses: {why}; run btrship check (and repair) first"),
    )
    .into()
}

/// History objects that belong to no registered chain (written by
/// btrship before chain registrations) reference data prune cannot see
/// through the chains: it refuses rather than delete that data. Objects
/// at places just past a chain's head (shipped since it was read) are
/// fine: the sweep that could delete their data reads them first.
fn check_no_stray_history(
    repo: &Repository,
    chains: &[((String, String), Arc<crate::history::ChainState>)],
    listing: &[ObjectMeta],
) -> Result<()> {
    let mut known: HashSet<String> = HashSet::new();
    for ((share, host), st) in chains {
        let c = st.catalog();
        for m in c.moments(share, host)? {
            known.insert(m.name);
        }
        let head = st.chain.head.as_ref().map_or(0, |h| h.seq);
        for seq in head + 1..=head + 64 {
            for k in HistoryKind::ALL {
                known.insert(history_name(repo.key(), k, share, host, seq));
            }
        }
    }
    for o in listing {
        if HistoryKind::of_name(&o.key).is_some() && !known.contains(&o.key) {
            return Err(refuse(format!(
                "{} belongs to no registered history chain (written by an older btrship, or by a machine whose chain this one cannot read)",
                o.key
            )));
        }
    }
    Ok(())
}

/// Applies the policy to the share's chain; fills the report's verdicts
/// and returns the places forgotten now.
fn plan_forgets(
    target: &Target<'_>,
    rows: &[MomentRow],
    report: &mut PruneReport,
) -> Result<Vec<u64>> {
    let live: Vec<&MomentRow> = rows.iter().filter(|m| !m.forgotten).collect();
    let moments: Vec<Moment> = live.iter().map(|m| Moment::from(*m)).collect();
    let decisions: Vec<Decision> = retention::plan(target.windows, &moments);
    // The chain's newest place stays whatever its time (the append
    // protocol reads it).
    let newest_place = live.iter().map(|m| m.seq).max().unwrap_or(0);
    let mut forgotten = Vec::new();
    report.moments = live.len() as u64;
    for (m, d) in live.iter().zip(&decisions) {
        let keep = d.keep || m.seq == newest_place;
        let mut reasons: Vec<String> = d.reasons.iter().map(|r| r.to_string()).collect();
        if !d.keep && keep {
            reasons.push("newest-place".into());
        }
        if keep {
            report.moments_kept += 1;
        } else {
            forgotten.push(m.seq);
        }
        report.verdicts.push(MomentVerdict {
            place: m.seq,
            kind: if m.snapshot { "snapshot" } else { "versions" },
            time: ns_text(m.t_last),
            keep,
            reasons,
        });
    }
    report.moments_forgotten = forgotten.len() as u64;
    Ok(forgotten)
}

/// Sorted ranges of `old` and the places `add`, merged.
fn merge_ranges(old: &[(u64, u64)], add: &mut [u64]) -> Vec<(u64, u64)> {
    let mut all: Vec<(u64, u64)> = old.to_vec();
    all.extend(add.iter().map(|&p| (p, p)));
    all.sort();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (a, b) in all {
        match out.last_mut() {
            Some(last) if a <= last.1.saturating_add(1) => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

/// Every blob the kept moments reference.
#[derive(Default)]
struct References {
    blobs: HashSet<ContentId>,
    trees_seen: HashSet<ContentId>,
    /// Tree references read from the store in this run, to remember.
    learned: Vec<(ContentId, Vec<(BlobKind, ContentId)>)>,
}

impl References {
    fn add_moment(&mut self, repo: &Repository, cat: &Catalog, body: &HistoryBody) -> Result<()> {
        match body {
            HistoryBody::Snapshot(r) => {
                self.blobs.extend(r.root.content.iter().map(|c| c.1 .0));
                self.tree(repo, cat, r.tree.0)
            }
            HistoryBody::Versions(b) => {
                for n in b.entries.iter().filter_map(|e| e.node.as_ref()) {
                    self.blobs.extend(n.content.iter().map(|c| c.1 .0));
                    if let Some(t) = n.subtree {
                        self.tree(repo, cat, t.0)?;
                    }
                }
                Ok(())
            }
        }
    }

    /// Every blob below tree `root`, each tree once.
    fn tree(&mut self, repo: &Repository, cat: &Catalog, root: ContentId) -> Result<()> {
        let mut stack = vec![root];
        while let Some(id) = stack.pop() {
            if !self.trees_seen.insert(id) {
                continue;
            }
            self.blobs.insert(id);
            let refs = match cat.tree_refs(&id) {
                Some(r) => r,
                None => {
                    let tree = repo.read_tree(&id).with_context(|| {
                        format!("cannot read tree {id}: prune stops before deleting anything")
                    })?;
                    let mut r = Vec::new();
                    for n in &tree.entries {
                        r.extend(n.content.iter().map(|c| (BlobKind::Data, c.1 .0)));
                        if let Some(t) = n.subtree {
                            r.push((BlobKind::Tree, t.0));
                        }
                    }
                    self.learned.push((id, r.clone()));
                    if self.learned.len() >= 4096 {
                        self.flush(cat)?;
                    }
                    r
                }
            };
            for (kind, child) in refs {
                match kind {
                    BlobKind::Data => {
                        self.blobs.insert(child);
                    }
                    BlobKind::Tree => stack.push(child),
                }
            }
        }
        Ok(())
    }

    fn flush(&mut self, cat: &Catalog) -> Result<()> {
        cat.remember_tree_refs(&self.learned)?;
        self.learned.clear();
        Ok(())
    }
}

/// The garbage record to write and the deletes it announces.
struct GarbagePlan {
    record: GarbageRecord,
    delete_packs: Vec<String>,
    delete_indexes: Vec<String>,
    /// Packs to repack, with the used blobs (and where) in each.
    repack: Vec<(String, Vec<(ContentId, btrship_upload::BlobLocation)>)>,
    changed: bool,
}

#[allow(clippy::too_many_arguments)]
fn plan_garbage(
    repo: &Repository,
    listing: &[ObjectMeta],
    refs: &References,
    old: &GarbageRecord,
    now: SystemTime,
    opts: &Options,
    report: &mut PruneReport,
) -> Result<GarbagePlan> {
    let (grace, repack_unused, max_repack) = (opts.grace, opts.repack_unused, opts.max_repack);
    let packs: HashMap<&str, &ObjectMeta> = listing
        .iter()
        .filter(|o| o.key.starts_with("packs/"))
        .map(|o| (o.key.as_str(), o))
        .collect();
    report.packs = packs.len() as u64;
    let deleted_before: HashSet<&str> = old.deleted_packs.iter().map(|s| s.as_str()).collect();
    let marked_before: HashSet<&str> = old.marked.iter().map(|m| m.pack.as_str()).collect();
    // Which packs the references use: the first listed copy in a pack the
    // store holds, no prune deleted and none marked (a repacked blob's
    // new copy); a copy in a marked pack only when there is no other
    // (that pack is recovered).
    let mut used: HashMap<String, Vec<(ContentId, btrship_upload::BlobLocation)>> = HashMap::new();
    let mut unplaced = 0u64;
    for id in &refs.blobs {
        let locs = repo.blob_locations(id);
        let held = |l: &&btrship_upload::BlobLocation| {
            packs.contains_key(l.pack.as_str()) && !deleted_before.contains(l.pack.as_str())
        };
        let chosen = locs
            .iter()
            .filter(held)
            .find(|l| !marked_before.contains(l.pack.as_str()))
            .or_else(|| locs.iter().find(held));
        match chosen {
            Some(l) => {
                used.entry(l.pack.clone())
                    .or_default()
                    .push((*id, l.clone()));
                report.bytes_referenced += l.length;
            }
            None => unplaced += 1,
        }
    }
    if unplaced > 0 {
        report.warnings.push(format!(
            "{unplaced} referenced blobs have no copy in the store (btrship check names them)"
        ));
    }
    let age = |t: Option<SystemTime>| t.and_then(|t| now.duration_since(t).ok());
    let mark_age = |at: &str| {
        DateTime::parse_from_rfc3339(at)
            .ok()
            .map(|t| SystemTime::from(t.with_timezone(&Utc)))
            .and_then(|t| now.duration_since(t).ok())
    };
    let sweep_after = grace.max(min_mark_age());
    let mut marked = Vec::new();
    let mut delete_packs = Vec::new();
    let mut changed = false;
    let was_marked: HashSet<&str> = old.marked.iter().map(|m| m.pack.as_str()).collect();
    for m in &old.marked {
        let Some(meta) = packs.get(m.pack.as_str()) else {
            // Gone already (a run that wrote its record, then died).
            delete_packs.push(m.pack.clone());
            changed = true;
            continue;
        };
        if used.contains_key(&m.pack) {
            report.packs_recovered += 1;
            changed = true;
        } else if mark_age(&m.at).is_some_and(|a| a >= sweep_after) {
            delete_packs.push(m.pack.clone());
            report.packs_deleted += 1;
            report.bytes_deleted += meta.size;
            changed = true;
        } else {
            report.packs_waiting += 1;
            report.bytes_waiting += meta.size;
            marked.push(m.clone());
        }
    }
    let now_text = rfc3339(now);
    let mut fresh: Vec<&&ObjectMeta> = packs
        .values()
        .filter(|p| {
            !used.contains_key(&p.key)
                && !was_marked.contains(p.key.as_str())
                && !deleted_before.contains(p.key.as_str())
                && age(p.modified).is_some_and(|a| a >= grace)
        })
        .collect();
    fresh.sort_by(|a, b| a.key.cmp(&b.key));
    for p in fresh {
        marked.push(MarkedPack {
            pack: p.key.clone(),
            at: now_text.clone(),
        });
        report.packs_marked += 1;
        report.packs_waiting += 1;
        report.bytes_waiting += p.size;
        changed = true;
    }
    // Every index: which packs it lists, and the blob bytes each pack
    // holds (padding and headers are not "unused": a pack is repacked for
    // its dead blobs only).
    let deleted_idx_before: HashSet<&str> =
        old.deleted_indexes.iter().map(|s| s.as_str()).collect();
    let mut index_packs: Vec<(&ObjectMeta, Vec<String>)> = Vec::new();
    let mut pack_blob_bytes: HashMap<String, u64> = HashMap::new();
    for o in listing.iter().filter(|o| o.key.starts_with("index/")) {
        if deleted_idx_before.contains(o.key.as_str()) {
            index_packs.push((o, Vec::new()));
            continue;
        }
        let index = match repo.cached_index(&o.key) {
            Some(i) => i,
            None => match repo.read_index_object(&o.key) {
                Ok(i) => i,
                Err(e) => {
                    report
                        .warnings
                        .push(format!("index {} unreadable, kept: {e}", o.key));
                    continue;
                }
            },
        };
        for p in &index.packs {
            let bytes: u64 = p.blobs.iter().map(|b| b.length).sum();
            let e = pack_blob_bytes.entry(p.pack.clone()).or_default();
            *e = (*e).max(bytes);
        }
        index_packs.push((o, index.packs.into_iter().map(|p| p.pack).collect()));
    }
    // Repack: used packs, old enough, mostly unused, up to the budget.
    let mut candidates: Vec<(&String, u64, u64)> = used
        .iter()
        .filter(|(p, _)| !was_marked.contains(p.as_str()))
        .filter_map(|(p, blobs)| {
            let meta = packs.get(p.as_str())?;
            let all = *pack_blob_bytes.get(p.as_str())?;
            let live: u64 = blobs.iter().map(|b| b.1.length).sum();
            let unused = all.saturating_sub(live) as f64 / all.max(1) as f64;
            (unused > repack_unused && age(meta.modified).is_some_and(|a| a >= grace))
                .then_some((p, live, all))
        })
        .collect();
    // The emptiest first: most space back per byte moved.
    candidates.sort_by(|a, b| {
        (a.1 as f64 / a.2 as f64)
            .total_cmp(&(b.1 as f64 / b.2 as f64))
            .then(a.0.cmp(b.0))
    });
    let mut repack = Vec::new();
    let mut budget = max_repack;
    for (p, live, _) in candidates {
        if live > budget {
            continue;
        }
        budget -= live;
        repack.push((p.clone(), used[p].clone()));
    }
    // Packs deleted by an earlier run that are still listed (it died
    // between its record and its deletes): delete again.
    for p in packs.keys().filter(|p| deleted_before.contains(**p)) {
        delete_packs.push(p.to_string());
        report.bytes_deleted += packs[p].size;
        changed = true;
    }
    // Indexes whose every pack is deleted.
    let gone: HashSet<&str> = deleted_before
        .iter()
        .copied()
        .chain(delete_packs.iter().map(|s| s.as_str()))
        .collect();
    let mut delete_indexes = Vec::new();
    for (o, listed) in &index_packs {
        if deleted_idx_before.contains(o.key.as_str()) {
            delete_indexes.push(o.key.clone());
            continue;
        }
        if !listed.is_empty() && listed.iter().all(|p| gone.contains(p.as_str())) {
            delete_indexes.push(o.key.clone());
            report.indexes_deleted += 1;
            report.bytes_deleted += o.size;
            changed = true;
        }
    }
    let mut deleted_packs = old.deleted_packs.clone();
    deleted_packs.extend(
        delete_packs
            .iter()
            .filter(|p| !deleted_before.contains(p.as_str()))
            .cloned(),
    );
    deleted_packs.sort();
    deleted_packs.dedup();
    let mut deleted_indexes = old.deleted_indexes.clone();
    deleted_indexes.extend(
        delete_indexes
            .iter()
            .filter(|i| !deleted_idx_before.contains(i.as_str()))
            .cloned(),
    );
    deleted_indexes.sort();
    deleted_indexes.dedup();
    // Repack indexes stay named while any pack they list is not deleted.
    let indexes: Vec<String> = old
        .indexes
        .iter()
        .filter(|i| !delete_indexes.contains(i) && !deleted_idx_before.contains(i.as_str()))
        .cloned()
        .collect();
    changed |= indexes.len() != old.indexes.len();
    Ok(GarbagePlan {
        record: GarbageRecord {
            number: old.number + 1,
            time: now_text,
            marked,
            deleted_packs,
            deleted_indexes,
            indexes,
        },
        delete_packs,
        delete_indexes,
        repack,
        changed,
    })
}

/// Moves the used blobs of the plan's repack packs into new packs (and a
/// new index, named by the garbage record), and marks the old packs: the
/// next runs delete them once the mark is old enough. Before the record
/// names the new index, nobody knows those packs: a crash leaves them as
/// garbage for a later run.
fn repack(repo: &Repository, plan: &mut GarbagePlan, now: SystemTime) -> Result<()> {
    let writer = repo.repack_writer();
    for (_, blobs) in &plan.repack {
        for (id, loc) in blobs {
            let plain = repo
                .read_blob_from(id, loc.clone())
                .with_context(|| format!("cannot repack blob {id} from {}", loc.pack))?;
            writer.add(loc.kind, &plain)?;
        }
    }
    writer.finish()?;
    let names = repo.unnamed_written_indexes();
    repo.indexes_named(&names);
    plan.record.indexes.extend(names);
    let at = rfc3339(now);
    for (pack, _) in &plan.repack {
        plan.record.marked.push(MarkedPack {
            pack: pack.clone(),
            at: at.clone(),
        });
    }
    plan.changed = true;
    repo.ship_done();
    Ok(())
}

/// The objects at forgotten places of the share's chain that a level-1
/// summary in the store holds (and that are still there).
fn forgotten_singles(
    repo: &Repository,
    target: &Target<'_>,
    forgotten: &[u64],
    listing: &[ObjectMeta],
) -> Vec<String> {
    let present: HashSet<&str> = listing.iter().map(|o| o.key.as_str()).collect();
    let mut summarised: BTreeMap<u64, bool> = BTreeMap::new();
    let mut out = Vec::new();
    for &seq in forgotten {
        let first = (seq - 1) / span(1) * span(1) + 1;
        let held = *summarised.entry(first).or_insert_with(|| {
            present.contains(summary_name(repo.key(), target.share, target.host, 1, first).as_str())
        });
        if !held {
            continue;
        }
        for k in HistoryKind::ALL {
            let name = history_name(repo.key(), k, target.share, target.host, seq);
            if present.contains(name.as_str()) {
                out.push(name);
            }
        }
    }
    out
}

fn rfc3339(t: SystemTime) -> String {
    DateTime::<Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

fn ns_text(ns: i64) -> String {
    DateTime::<Utc>::from_timestamp_nanos(ns).to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

/// Prune's cleanup on the shipping machine (FORMAT.md §5c, local state):
/// local snapshots whose record retention forgot (never the newest
/// shipped one: the next ship's parent; never a queued one), and old
/// captures and events in the state database.
pub fn clean_local(
    state_path: &std::path::Path,
    cfg: &crate::config::ShareConfig,
    host: &str,
    repo: &Repository,
) -> Result<LocalCleanup> {
    let mut out = LocalCleanup::default();
    let mut st = crate::state::State::open(state_path)?;
    let cat = repo
        .object_cache()
        .and_then(|c| c.as_any().downcast::<Catalog>().ok());
    if let Some(cat) = cat {
        // The chain's forgotten records, in one query.
        let gone: HashSet<String> = cat
            .moments(&cfg.name, host)?
            .into_iter()
            .filter(|m| m.forgotten)
            .map(|m| m.name)
            .collect();
        let shipped: Vec<_> = st.snapshots()?.into_iter().filter(|s| s.shipped).collect();
        let newest = shipped.last().map(|s| s.name.clone());
        let forgotten: Vec<String> = shipped
            .iter()
            .filter(|s| Some(&s.name) != newest.as_ref())
            .filter(|s| s.record.as_ref().is_some_and(|r| gone.contains(r)))
            .map(|s| s.name.clone())
            .collect();
        if !forgotten.is_empty() {
            let share = btrship_snapshot::Share::open(&cfg.path)?;
            let area = btrship_snapshot::PrivateArea::open(&share, &cfg.name)?;
            let on_disk: HashSet<String> =
                area.list_snapshots()?.into_iter().map(|s| s.name).collect();
            for name in &forgotten {
                if on_disk.contains(name) {
                    area.delete_snapshot(name)?;
                    out.snapshots_deleted.push(name.clone());
                }
            }
            st.drop_snapshots(&forgotten)?;
        }
    }
    let now = Utc::now();
    let text = |d: chrono::TimeDelta| (now - d).to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
    let (captures, events) = st.shrink(
        &text(chrono::TimeDelta::days(1)),
        &text(chrono::TimeDelta::days(90)),
    )?;
    out.captures_deleted = captures;
    out.events_deleted = events;
    Ok(out)
}
