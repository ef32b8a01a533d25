//! The history of one share on one host, as commands see it and as the
//! shipping machine extends it (FORMAT.md §5, "history chain").
//!
//! Reading ([`load`]): every history object is read once; the ones of the
//! chosen share and host are checked as a chain. Which host: `--host` when
//! given; on the shipping machine its own host name; on a fresh machine
//! the only host that shipped the share, or a usage error listing them.
//! Damaged objects are named, never fatal by themselves: only the moments
//! that need them are affected.
//!
//! Extending ([`append`]): one writer at a time per share (a file lock
//! beside the state database: the daemon's batches and the snapshot timer
//! share one chain). The writer first reads the object its state database
//! names as the head: missing or different means the store is behind this
//! machine (withheld or rolled back) and nothing more is shipped until
//! `btrship repair` continues the history. Then it probes the one name the
//! next object can have: an object there is its own upload from before a
//! crash (adopted; when it holds what is being shipped, the ship is done)
//! or another writer's (refused). Only then is the new object uploaded and
//! the head recorded.

use crate::catalog::{Catalog, ChainSync};
use crate::exit::{UserError, DAMAGED, NOT_FOUND, USAGE};
use crate::state::{HistoryHead, State};
use anyhow::{Context, Result};
use btrship_upload::format::{ChainLink, Node, PrevLink, SnapshotRecord, VersionBatch};
use btrship_upload::format::{Index, Summary, SummaryIndex};
use btrship_upload::history::{
    history_name, sealed_hash, span, summary_entry, summary_name, summary_objects, verify_chain,
    verify_chain_after, ChainCheck, ChainHead, ChainProblem, HistoryBody, HistoryKind,
    HistoryObject, FANOUT, MAX_LEVEL,
};
use btrship_upload::walk::walk_from;
use btrship_upload::{PutOutcome, Repository};
use chrono::{DateTime, Utc};
use std::collections::BTreeSet;
use std::sync::Arc;

/// What a read command asks for.
pub struct Select<'a> {
    pub share: &'a str,
    /// `--host`.
    pub host: Option<&'a str>,
    /// The shipping machine's own host name (None on a fresh machine).
    pub local_host: Option<&'a str>,
    /// The shipping machine's head of this share's chain.
    pub local_head: Option<HistoryHead>,
}

/// The history of one share on one host. Its moments stay in the
/// catalogue (a file, or memory when the file cannot be trusted); a
/// command decodes only the ones it asks for.
pub struct ShareHistory {
    pub share: String,
    pub host: String,
    pub chain: ChainCheck,
    /// History objects (of any share) that could not be read or opened.
    pub unreadable: Vec<(String, String)>,
    /// Why the store is behind the shipping machine, when it is.
    pub behind: Option<String>,
    catalog: Arc<Catalog>,
}

impl ShareHistory {
    /// Everything wrong with this history, one line each.
    pub fn problems(&self) -> Vec<String> {
        let mut out: Vec<String> = self.behind.iter().cloned().collect();
        out.extend(self.chain.problems.iter().map(|p| p.to_string()));
        out
    }

    /// Refuses (exit 5) when the history has gaps or the store is behind
    /// this machine, unless `allow_gaps`: then every problem comes back as
    /// a warning for the caller to show, and the command goes on with what
    /// is there.
    pub fn require_intact(&self, allow_gaps: bool) -> Result<Vec<String>> {
        let problems = self.problems();
        let Some(first) = problems.first() else {
            return Ok(problems);
        };
        if allow_gaps {
            return Ok(problems);
        }
        Err(UserError::new(
            DAMAGED,
            format!(
                "the history of share {} on host {} is incomplete ({} problems; btrship check lists them): {first}; pass --allow-gaps to use what is there",
                self.share,
                self.host,
                problems.len()
            ),
        )
        .into())
    }

    /// Every snapshot record, oldest first.
    pub fn snapshots(&self) -> Result<Vec<(String, SnapshotRecord)>> {
        self.catalog.snapshots(&self.share, &self.host)
    }

    /// The newest snapshot record taken at or before `at`, and the oldest
    /// one.
    pub fn snapshot_at(&self, at: DateTime<Utc>) -> Result<SnapshotAt> {
        self.catalog
            .snapshot_at(&self.share, &self.host, clamp_ns(at))
    }

    /// Every version batch (decodes them all: for tests and tools, not
    /// for commands).
    pub fn batches(&self) -> Result<Vec<(String, VersionBatch)>> {
        self.catalog
            .batches_between(&self.share, &self.host, i64::MIN, i64::MAX)
    }

    /// The version batches with an entry in (`after`, `upto`].
    pub fn batches_between(
        &self,
        after: Option<DateTime<Utc>>,
        upto: DateTime<Utc>,
    ) -> Result<Vec<(String, VersionBatch)>> {
        self.catalog.batches_between(
            &self.share,
            &self.host,
            after.map_or(i64::MIN, clamp_ns),
            clamp_ns(upto),
        )
    }

    /// What `path` is in the snapshot whose root is `root` (None: not
    /// there), remembered in the catalogue: `versions` asks this of every
    /// snapshot, and trees never change under an id.
    pub fn node_at(&self, repo: &Repository, root: &Node, path: &[u8]) -> Result<Option<Node>> {
        let tree = root.subtree.map(|t| t.0);
        if let Some(known) = tree.and_then(|t| self.catalog.resolved(&t, path)) {
            return Ok(known);
        }
        let node = match crate::restore::resolve(repo, root, path) {
            Ok(chain) => chain.last().cloned(),
            Err(e) if crate::exit::code_of(&e) == NOT_FOUND => None,
            Err(e) => return Err(e),
        };
        if let Some(t) = tree {
            self.catalog.remember_resolved(&t, path, node.as_ref());
        }
        Ok(node)
    }

    /// The newest forgotten moment in (`after`, `upto`], if any (FORMAT.md
    /// §5c): a moment asked for at `upto` is then an older kept one.
    pub fn forgotten_between(
        &self,
        after: DateTime<Utc>,
        upto: DateTime<Utc>,
    ) -> Result<Option<String>> {
        let t = self.catalog.forgotten_between(
            &self.share,
            &self.host,
            clamp_ns(after),
            clamp_ns(upto),
        )?;
        Ok(t.map(|ns| {
            DateTime::<Utc>::from_timestamp_nanos(ns)
                .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
        }))
    }

    /// Every moment of this history the catalogue holds, by place
    /// (forgotten ones flagged).
    pub fn moments(&self) -> Result<Vec<crate::catalog::MomentRow>> {
        self.catalog.moments(&self.share, &self.host)
    }

    /// The version batches with an entry for `path`.
    pub fn batches_with_path(&self, path: &[u8]) -> Result<Vec<(String, VersionBatch)>> {
        self.catalog
            .batches_with_path(&self.share, &self.host, path)
    }
}

/// A time as ns since the epoch, as the catalogue keeps times; times
/// outside what 64 bits hold (before 1677, after 2262) become the ends.
fn clamp_ns(t: DateTime<Utc>) -> i64 {
    t.timestamp_nanos_opt().unwrap_or(if t.timestamp() < 0 {
        i64::MIN
    } else {
        i64::MAX
    })
}

/// [`ShareHistory::snapshot_at`]: (newest at or before, oldest).
pub type SnapshotAt = (
    Option<(String, SnapshotRecord)>,
    Option<(String, SnapshotRecord)>,
);

/// One chain as this process brought it up to date: its verdict, and the
/// catalogue that holds its moments.
pub struct ChainState {
    pub chain: ChainCheck,
    pub unreadable: Vec<(String, String)>,
    /// The newest forget record of the chain (FORMAT.md §5c), if any.
    pub forgotten: Option<btrship_upload::format::ForgetRecord>,
    catalog: Arc<Catalog>,
}

impl ChainState {
    /// The catalogue holding this chain's moments.
    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.catalog
    }
}

/// Reads the chain's newest forget record (one LIST, a GET when new) and
/// marks its places forgotten in the catalogue: they leave every query.
fn apply_forgets(
    repo: &Repository,
    cat: &Catalog,
    share: &str,
    host: &str,
) -> Result<Option<btrship_upload::format::ForgetRecord>> {
    let (rec, skipped) = repo.newest_forget(share, host)?;
    for (name, why) in skipped {
        tracing::warn!("skipping forget record {name}: {why}");
    }
    if let Some(r) = &rec {
        cat.apply_forgotten(share, host, &r.places)?;
    }
    Ok(rec)
}

/// The catalogue a chain is read into: the repository's own while it is
/// trusted, else one in memory for this process (filled from the store).
fn catalog_of(repo: &Repository) -> Result<Arc<Catalog>> {
    if let Some(c) = repo.object_cache() {
        if let Ok(c) = c.as_any().downcast::<Catalog>() {
            return Ok(c);
        }
    }
    repo.extension(Catalog::in_memory)
}

/// The aligned pieces that cover places `1..=through` of a chain, largest
/// first: `(level, first place)`, level 0 a single place. What a reader
/// that holds the prefix checks the store still holds.
fn covering(through: u64) -> Vec<(u32, u64)> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < through {
        let level = (1..=MAX_LEVEL)
            .rev()
            .find(|&l| pos.is_multiple_of(span(l)) && pos + span(l) <= through)
            .unwrap_or(0);
        out.push((level, pos + 1));
        pos += span(level);
    }
    out
}

/// Does the store still hold the checked prefix `1..=through` the
/// catalogue has for this chain? HEAD requests for the summaries that
/// cover it (one that is missing is replaced by the 16 below it, down to
/// single places): about 15 per level, not one per place. A summary
/// stands for its places, as it does for a reader that walks it.
fn prefix_held(
    repo: &Repository,
    cat: &Catalog,
    share: &str,
    host: &str,
    through: u64,
) -> Result<bool> {
    let key = repo.key();
    let mut pieces = covering(through);
    while !pieces.is_empty() {
        let mut names = Vec::new();
        let singles: Vec<u64> = pieces.iter().filter(|p| p.0 == 0).map(|p| p.1).collect();
        let by_place = cat.names_at(share, host, &singles)?;
        for &(level, first) in &pieces {
            if level == 0 {
                let held: Vec<&String> = by_place
                    .iter()
                    .filter(|(s, _)| *s == first)
                    .map(|(_, n)| n)
                    .collect();
                if held.is_empty() {
                    return Ok(false);
                }
                names.extend(held.into_iter().map(|n| ((0, first), n.clone())));
            } else {
                names.push(((level, first), summary_name(key, share, host, level, first)));
            }
        }
        let there = repo.exist_many(names.iter().map(|(_, n)| n.clone()).collect())?;
        let mut next = Vec::new();
        for (((level, first), _), present) in names.into_iter().zip(there) {
            if present {
                continue;
            }
            if level == 0 {
                return Ok(false);
            }
            let child = span(level - 1);
            next.extend((0..FANOUT).map(|i| (level - 1, first + i * child)));
        }
        pieces = next;
    }
    Ok(true)
}

/// Brings this process's view of the chain of share+host up to date
/// (FORMAT.md §5b): the catalogue's checked prefix when the store still
/// holds it, then a walk of the places after it. The walk's indexes are
/// merged into the blob index and its objects recorded before the prefix
/// moves forward, so a prefix in the catalogue always comes with its
/// moments and its blobs. Once per chain and process.
pub fn sync_chain(
    repo: &Repository,
    share: &str,
    host: &str,
    at_least: u64,
) -> Result<Arc<ChainState>> {
    let mut cat = catalog_of(repo)?;
    let memo_key = (share.to_string(), host.to_string());
    {
        let mut memo = cat.synced.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = memo.get(&memo_key) {
            // A head this machine shipped since (the daemon runs beside
            // the command) is read: its absence would look like a store
            // that withholds it.
            if s.chain.head.as_ref().map_or(0, |h| h.seq) >= at_least {
                return Ok(s.clone());
            }
            memo.remove(&memo_key);
        }
    }
    let mut resume = cat.chain_sync(share, host)?;
    if let Some(r) = &resume {
        if !prefix_held(repo, &cat, share, host, r.through)? {
            // Not a prefix of the store's chain any more: the next
            // reading records a new one (this one reads the store alone).
            cat.forget_chain(share, host)?;
            repo.distrust_cache();
            resume = None;
        }
    }
    let from = resume.as_ref().map_or(0, |r| r.through);
    let mut walk = walk_from(repo, share, host, from, at_least)?;
    if !Arc::ptr_eq(&cat, &catalog_of(repo)?) {
        // The store lacks what the catalogue holds: read all of the chain
        // again, from the store alone, into memory.
        cat = catalog_of(repo)?;
        resume = None;
        if from > 0 {
            walk = walk_from(repo, share, host, 0, at_least)?;
        }
    }
    let from = resume.as_ref().map_or(0, |r| r.through);
    if from == 0 {
        cat.forget_chain(share, host)?;
    }
    let base = resume.as_ref().map(|r| &r.head);
    let mut chain = verify_chain_after(base, &walk.objects);
    if let Some(r) = &resume {
        chain.declared_lost.extend(r.declared_lost.iter().copied());
        chain.declared_lost.sort();
        chain.declared_lost.dedup();
    }
    // The blobs of the indexes the new part names (not those a prune
    // deleted: FORMAT.md §5c).
    repo.ensure_garbage_read()?;
    if walk.legacy {
        repo.load_index()?;
    } else {
        let mut embedded = Vec::new();
        let mut names = Vec::new();
        for (name, body) in &walk.indexes {
            match body {
                Some(index) => embedded.push((name.as_str(), index)),
                None => names.push(name.clone()),
            }
        }
        repo.merge_named_indexes(&embedded);
        repo.load_named_indexes(&names)?;
    }
    let damaged: BTreeSet<String> = repo
        .damaged_indexes()
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| !repo.index_deleted(n))
        .collect();
    let index_damaged = walk.indexes.iter().any(|(n, _)| damaged.contains(n));
    let bad = walk.bad.clone();
    damaged_places(repo, share, host, from, &bad, &mut chain);
    let intact = chain.problems.is_empty()
        && bad.is_empty()
        && !walk.legacy
        && chain.unchained == 0
        && !index_damaged;
    let sync = match (&chain.head, intact) {
        (Some(head), true) => Some(ChainSync {
            through: head.seq,
            head: head.clone(),
            declared_lost: chain.declared_lost.clone(),
        }),
        _ => None,
    };
    cat.record_chain(share, host, from, &walk.objects, sync.as_ref())?;
    let forgotten = apply_forgets(repo, &cat, share, host)?;
    let state = Arc::new(ChainState {
        chain,
        unreadable: bad,
        forgotten,
        catalog: cat.clone(),
    });
    cat.synced
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(memo_key, state.clone());
    Ok(state)
}

/// Names the unreadable objects (`bad`) that sit at places after `from`
/// of this chain as damaged places: names are keyed hashes of share, host
/// and place, so they are recognised without opening them — a damaged
/// part of this history, not someone else's.
fn damaged_places(
    repo: &Repository,
    share: &str,
    host: &str,
    from: u64,
    bad: &[(String, String)],
    chain: &mut ChainCheck,
) {
    if bad.is_empty() {
        return;
    }
    let top = chain.head.as_ref().map_or(0, |h| h.seq) + bad.len() as u64;
    for seq in from + 1..=top {
        for kind in HistoryKind::ALL {
            let name = history_name(repo.key(), kind, share, host, seq);
            if let Some((_, e)) = bad.iter().find(|(n, _)| *n == name) {
                chain.problems.push(ChainProblem::Damaged {
                    seq,
                    name,
                    error: e.clone(),
                });
            }
        }
    }
}

/// Reads the history of `sel.share` on the chosen host: through chain
/// registrations, summaries and the catalogue (FORMAT.md §5b) when the
/// share has them, else by listing every history object (repositories
/// written before §5b).
pub fn load(repo: &Repository, sel: &Select<'_>) -> Result<ShareHistory> {
    let (regs, _) = repo.chain_registrations()?;
    let hosts: BTreeSet<String> = regs
        .iter()
        .filter(|r| r.share == sel.share)
        .map(|r| r.host.clone())
        .collect();
    let wanted = sel.host.or(sel.local_host);
    if hosts.is_empty() || wanted.is_some_and(|h| !hosts.contains(h)) {
        return load_listing(repo, sel);
    }
    let host = choose_host(repo, sel, &hosts)?;
    let at_least = sel
        .local_head
        .as_ref()
        .filter(|h| h.host == host)
        .map_or(0, |h| h.seq);
    let state = sync_chain(repo, sel.share, &host, at_least)?;
    let behind = match sel.local_head.as_ref().filter(|h| h.host == host) {
        Some(h) => behind_in(&state.catalog, h, sel.share)?,
        None => None,
    };
    Ok(ShareHistory {
        share: sel.share.to_string(),
        host,
        chain: state.chain.clone(),
        unreadable: state.unreadable.clone(),
        behind,
        catalog: state.catalog.clone(),
    })
}

/// The host whose history a command reads (see [`load`]).
fn choose_host(repo: &Repository, sel: &Select<'_>, hosts: &BTreeSet<String>) -> Result<String> {
    let host = match (sel.host, sel.local_host) {
        (Some(h), _) | (None, Some(h)) => h.to_string(),
        (None, None) => match hosts.len() {
            0 => {
                return Err(UserError::new(
                    NOT_FOUND,
                    format!(
                        "share {:?} has no snapshots in {}",
                        sel.share,
                        repo.location()
                    ),
                )
                .into())
            }
            1 => hosts.iter().next().cloned().unwrap_or_default(),
            _ => {
                let list: Vec<&str> = hosts.iter().map(|h| h.as_str()).collect();
                return Err(UserError::new(
                    USAGE,
                    format!(
                        "share {:?} was shipped by several hosts ({}); pass --host with one of them",
                        sel.share,
                        list.join(", ")
                    ),
                )
                .into());
            }
        },
    };
    if sel.host.is_some() && !hosts.contains(&host) && !hosts.is_empty() {
        let list: Vec<&str> = hosts.iter().map(|h| h.as_str()).collect();
        return Err(UserError::new(
            NOT_FOUND,
            format!(
                "share {:?} has no history from host {host:?}; it has: {}",
                sel.share,
                list.join(", ")
            ),
        )
        .into());
    }
    Ok(host)
}

/// [`load`] for a share without chain registrations: every history object
/// of the repository is listed and read (into a catalogue in memory).
fn load_listing(repo: &Repository, sel: &Select<'_>) -> Result<ShareHistory> {
    let (objects, bad) = repo.history_objects()?;
    for (name, e) in &bad {
        tracing::debug!("unreadable history object {name}: {e}");
    }
    let hosts: BTreeSet<String> = objects
        .iter()
        .filter(|o| o.body.share() == sel.share)
        .map(|o| o.body.host().to_string())
        .collect();
    let host = choose_host(repo, sel, &hosts)?;
    let mine: Vec<HistoryObject> = objects
        .into_iter()
        .filter(|o| o.body.share() == sel.share && o.body.host() == host)
        .collect();
    let bad: Vec<(String, String)> = bad.into_iter().map(|(n, e)| (n, e.to_string())).collect();
    let mut chain = verify_chain(&mine);
    damaged_places(repo, sel.share, &host, 0, &bad, &mut chain);
    let behind = sel
        .local_head
        .as_ref()
        .and_then(|h| behind_reason(&mine, h, sel.share));
    // Objects without a chain link (older than chains) get places of
    // their own past any real one, so the catalogue can hold them.
    let catalog = Arc::new(Catalog::in_memory()?);
    let mut extra = 1u64 << 62;
    let placed: Vec<HistoryObject> = mine
        .into_iter()
        .map(|mut o| {
            if o.body.chain().is_none() {
                extra += 1;
                let link = ChainLink {
                    seq: extra,
                    prev: None,
                    lost_from: None,
                };
                match &mut o.body {
                    HistoryBody::Snapshot(r) => r.chain = Some(link),
                    HistoryBody::Versions(b) => b.chain = Some(link),
                }
            }
            o
        })
        .collect();
    catalog.record_chain(sel.share, &host, 0, &placed, None)?;
    Ok(ShareHistory {
        share: sel.share.to_string(),
        host,
        chain,
        unreadable: bad,
        behind,
        catalog,
    })
}

/// Loads the blob index a repository opened with
/// [`Repository::open_lazy`] needs: the indexes every chain's history
/// names (FORMAT.md §5b), through [`sync_chain`] — on a machine with a
/// catalogue, only those named since its last reading. A repository
/// without chain registrations has every index read instead. `own`: this
/// machine's share, host and head place (its chain is read at least that
/// far).
pub fn load_indexes(repo: &Repository, own: Option<(&str, &str, u64)>) -> Result<()> {
    if !repo.key().is_master() {
        // A ship-only key reads no history (FORMAT.md §12): it
        // deduplicates against what its catalogue's blob index holds,
        // which is what this machine uploaded itself, and against nothing
        // prune marked.
        repo.ensure_garbage_read()?;
        return Ok(());
    }
    let (regs, _) = repo.chain_registrations()?;
    if regs.is_empty() {
        return Ok(repo.load_index()?);
    }
    for r in &regs {
        let at_least = own
            .filter(|(s, h, _)| *s == r.share && *h == r.host)
            .map_or(0, |o| o.2);
        sync_chain(repo, &r.share, &r.host, at_least)?;
    }
    Ok(())
}

/// Why the store does not hold this machine's head, if it does not, from
/// the moments a reading recorded.
fn behind_in(cat: &Catalog, head: &HistoryHead, share: &str) -> Result<Option<String>> {
    if head.name.is_empty() {
        return Ok(None);
    }
    let found = cat.moment_hash(share, &head.host, head.seq, &head.name)?;
    Ok(behind_message(head, share, found))
}

/// Why the store does not hold this machine's head, if it does not
/// (`objects`: the history of the head's share and host in the store).
pub fn behind_reason(objects: &[HistoryObject], head: &HistoryHead, share: &str) -> Option<String> {
    if head.name.is_empty() {
        return None; // repair found nothing surviving: nothing to hold
    }
    let found = objects.iter().find(|o| o.name == head.name).map(|o| o.hash);
    behind_message(head, share, found)
}

/// `found`: the sealed hash of the object the store holds under the
/// head's name, if any.
fn behind_message(head: &HistoryHead, share: &str, found: Option<[u8; 32]>) -> Option<String> {
    match found {
        Some(h) if h == head.hash => None,
        Some(_) => Some(format!(
            "the store's {} is not the history object this machine shipped there (share {share}, place {}): it was replaced",
            head.name, head.seq
        )),
        None => Some(format!(
            "the store lacks {} (share {share}, place {} of this machine's history, shipped {}): it was withheld, deleted or rolled back",
            head.name, head.seq, head.time
        )),
    }
}

/// A history object this machine sealed, as its catalogue holds it
/// (a ship-only key reads its own history only from there).
fn own_written(repo: &Repository, name: &str) -> Option<HistoryObject> {
    let kind = HistoryKind::of_name(name)?;
    let (body, hash) = repo.object_cache()?.get(name)?;
    let body = HistoryBody::from_cbor(kind, &body).ok()?;
    Some(HistoryObject {
        name: name.to_string(),
        hash,
        body,
    })
}

/// A history object appended (or found already there).
pub struct Appended {
    pub name: String,
    /// The object was in the store already (shipped before a crash).
    pub existed: bool,
}

fn store_behind(share: &str, msg: String) -> anyhow::Error {
    UserError::new(
        DAMAGED,
        format!("{msg}; nothing more is shipped until `btrship repair {share}` re-ships what this machine still holds and continues the history"),
    )
    .into()
}

/// Fails (exit 5) when the store lacks this machine's head of the history
/// of `share` on `host`, or holds another object under its name: call it
/// before shipping anything, so nothing is uploaded into a store that is
/// behind. One GET. [`append`] checks the same again under its lock.
pub fn ensure_store_holds_head(
    repo: &Repository,
    state: &State,
    share: &str,
    host: &str,
) -> Result<()> {
    match state.history_head()?.filter(|h| h.host == host) {
        Some(h) => read_head(repo, &h, share).map(|_| ()),
        None => Ok(()),
    }
}

/// The object this machine recorded as its head, as the store holds it;
/// exit 5 when the store lacks it or holds another object under its name.
/// None when `repair` found nothing surviving (nothing to hold).
fn read_head(repo: &Repository, h: &HistoryHead, share: &str) -> Result<Option<HistoryObject>> {
    if h.name.is_empty() {
        return Ok(None);
    }
    if !repo.key().is_master() {
        // A ship-only key cannot open its head (FORMAT.md §12): one HEAD
        // says the store still holds it; the body, when `same` needs it,
        // is the one this machine wrote (its catalogue).
        if !repo.exists(&h.name)? {
            return Err(store_behind(
                share,
                format!(
                    "the store lacks {} (place {} of this machine's history of share {share}, shipped {}): it was withheld, deleted or rolled back",
                    h.name, h.seq, h.time
                ),
            ));
        }
        return Ok(own_written(repo, &h.name).filter(|o| o.hash == h.hash));
    }
    match repo.read_history(&h.name) {
        Ok(o) if o.hash == h.hash => Ok(Some(o)),
        Ok(_) => Err(store_behind(
            share,
            format!(
                "the store's {} is not the object this machine shipped there: it was replaced",
                h.name
            ),
        )),
        Err(e) if is_not_found(&e) => Err(store_behind(
            share,
            format!(
                "the store lacks {} (place {} of this machine's history of share {share}, shipped {}): it was withheld, deleted or rolled back",
                h.name, h.seq, h.time
            ),
        )),
        Err(e) => Err(e).context(format!("cannot read {}", h.name)),
    }
}

/// A prune marked a pack this ship used (FORMAT.md §5c, the writers'
/// rule): nothing was put; shipping again uploads those blobs anew.
#[derive(Debug)]
pub struct GarbageConflict(pub String);

impl std::fmt::Display for GarbageConflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}; the ship must be done again", self.0)
    }
}

impl std::error::Error for GarbageConflict {}

/// How long after its garbage check a writer's put may land (FORMAT.md
/// §5c: half the 60 s a mark must age before a sweep deletes).
pub const PUT_AFTER_CHECK: std::time::Duration = std::time::Duration::from_secs(30);

/// The content a history object names directly (a version batch's file
/// data; a snapshot record's root tree, whose blobs the ship's writer saw).
fn content_ids(body: &HistoryBody) -> Vec<btrship_crypto::ContentId> {
    match body {
        HistoryBody::Snapshot(r) => vec![r.tree.0],
        HistoryBody::Versions(b) => b
            .entries
            .iter()
            .filter_map(|e| e.node.as_ref())
            .flat_map(|n| {
                n.content
                    .iter()
                    .map(|c| c.1 .0)
                    .chain(n.subtree.map(|t| t.0))
            })
            .collect(),
    }
}

/// After a put that took longer than [`PUT_AFTER_CHECK`]: a prune may
/// have marked (and may soon delete) what the object needs. Says so and
/// makes the next ship upload those blobs again (they count as absent);
/// `check` then reports the object if the data went.
fn late_garbage_check(
    repo: &Repository,
    state: &State,
    name: &str,
    also: &[btrship_crypto::ContentId],
) {
    let msg = match repo.garbage_conflict(also) {
        Ok(None) => return,
        Ok(Some(why)) => format!(
            "{name} took longer than {}s to store and meanwhile {why}: if that prune deletes it, {name} loses that data; run btrship check",
            PUT_AFTER_CHECK.as_secs()
        ),
        Err(e) => format!("{name}: cannot read the garbage records after a slow put: {e:#}"),
    };
    tracing::error!("{msg}");
    let _ = state.log_event("error", "garbage_race", &msg);
}

/// Appends one object to the history of `share` on `host`: `build` makes
/// it given its chain link; `same` tells whether an object found in the
/// store already holds what is being shipped (a ship repeated after a
/// crash between upload and state update).
pub fn append(
    repo: &Repository,
    state: &State,
    share: &str,
    host: &str,
    kind: HistoryKind,
    build: impl Fn(ChainLink) -> HistoryBody,
    same: impl Fn(&HistoryBody) -> bool,
) -> Result<Appended> {
    let _lock = state.lock_history()?;
    repo.register_chain(share, host)
        .context("cannot register the history chain")?;
    let mut head = state.history_head()?;
    if let Some(h) = &head {
        if h.host != host {
            // The configured host changed: a new chain under the new name.
            head = None;
        }
    }
    if let Some(h) = &head {
        if let Some(obj) = read_head(repo, h, share)? {
            if h.lost_from.is_none() && same(&obj.body) {
                return Ok(Appended {
                    name: h.name.clone(),
                    existed: true,
                });
            }
        }
    }
    loop {
        let seq = head.as_ref().map_or(1, |h| h.seq + 1);
        // An object at the next place: our own upload before a crash.
        let mut found = None;
        for k in HistoryKind::ALL {
            let name = history_name(repo.key(), k, share, host, seq);
            if repo.exists(&name)? {
                found = Some(name);
                break;
            }
        }
        let name = match found {
            Some(name) => name,
            None => {
                let link = ChainLink {
                    seq,
                    prev: head
                        .as_ref()
                        .filter(|h| !h.name.is_empty())
                        .map(|h| PrevLink {
                            name: h.name.clone(),
                            hash: h.hash.to_vec(),
                        }),
                    lost_from: head.as_ref().and_then(|h| h.lost_from),
                };
                let name = history_name(repo.key(), kind, share, host, seq);
                let mut body = build(link);
                let indexes = repo.unnamed_written_indexes();
                body.set_indexes(indexes.clone());
                // The writers' rule (FORMAT.md §5c).
                let also = content_ids(&body);
                let checked = std::time::Instant::now();
                if let Some(why) = repo.garbage_conflict(&also)? {
                    repo.ship_done();
                    return Err(GarbageConflict(why).into());
                }
                let (outcome, hash) = repo.put_history(&name, &body)?;
                if checked.elapsed() > PUT_AFTER_CHECK {
                    late_garbage_check(repo, state, &name, &also);
                }
                repo.ship_done();
                if outcome == PutOutcome::Created {
                    repo.indexes_named(&indexes);
                    state.set_history_head(&HistoryHead {
                        host: host.to_string(),
                        seq,
                        name: name.clone(),
                        hash,
                        lost_from: None,
                        time: crate::daemon::now_text(),
                    })?;
                    write_due_summaries(repo, state, share, host);
                    return Ok(Appended {
                        name,
                        existed: false,
                    });
                }
                name
            }
        };
        let obj = if repo.key().is_master() {
            repo.read_history(&name)?
        } else {
            // Ours only if it is exactly what this machine sealed for
            // that place before the crash (its catalogue holds it, cached
            // before the put): one GET of the sealed bytes, no opening.
            let sealed = repo.get_sealed(&name)?;
            match own_written(repo, &name).filter(|o| o.hash == sealed_hash(&sealed)) {
                Some(o) => o,
                None => {
                    return Err(UserError::new(
                        DAMAGED,
                        format!(
                            "{name} holds place {seq} of share {share} on host {host} and is not an object this machine wrote: another machine ships this share under the same host name (set `host` in its config), or the store is hostile"
                        ),
                    )
                    .into())
                }
            }
        };
        let follows = match (obj.body.chain(), &head) {
            (Some(l), Some(h)) => {
                l.seq == seq
                    && l.prev
                        .as_ref()
                        .is_some_and(|p| p.name == h.name && p.hash == h.hash)
            }
            (Some(l), None) => l.seq == seq && l.prev.is_none(),
            (None, _) => false,
        };
        if !follows || obj.body.share() != share || obj.body.host() != host {
            return Err(UserError::new(
                DAMAGED,
                format!(
                    "{name} holds place {seq} of share {share} on host {host} but does not follow this machine's history: another machine ships this share under the same host name (set `host` in its config), or the store is hostile"
                ),
            )
            .into());
        }
        let adopted = ChainHead {
            seq,
            name: name.clone(),
            hash: obj.hash,
        };
        state.set_history_head(&HistoryHead {
            host: host.to_string(),
            seq: adopted.seq,
            name: adopted.name.clone(),
            hash: adopted.hash,
            lost_from: None,
            time: crate::daemon::now_text(),
        })?;
        if same(&obj.body) {
            repo.ship_done();
            return Ok(Appended {
                name,
                existed: true,
            });
        }
        head = state.history_head()?;
    }
}

/// A summary whose body would pass this is not written: readers use the
/// 16 summaries (or places) below it. Keeps every summary well under the
/// envelope's 256 MiB decompression cap and the writer's memory bounded
/// (a level-1 summary of daemon batches is a few KiB to a few MiB).
pub const SUMMARY_MAX_BYTES: usize = 16 << 20;

/// Writes the summaries this machine owes for its chain (FORMAT.md §5b),
/// each once its last place is this machine's head or older. Never fails
/// the ship that calls it: a summary that cannot be written now stays due
/// (readers meanwhile read the places it would cover).
pub fn write_due_summaries(repo: &Repository, state: &State, share: &str, host: &str) {
    if let Err(e) = try_write_due_summaries(repo, state, share, host) {
        tracing::info!("history summaries of {share} not written yet: {e:#}");
    }
}

fn try_write_due_summaries(
    repo: &Repository,
    state: &State,
    share: &str,
    host: &str,
) -> Result<()> {
    let Some(head) = state.history_head()?.filter(|h| h.host == host) else {
        return Ok(());
    };
    for (level, first) in state.summaries_due(host)? {
        if first + span(level) - 1 > head.seq {
            continue;
        }
        let name = summary_name(repo.key(), share, host, level, first);
        // What the catalogue gave must still be in the store: a summary
        // must not bring back objects the store lost (repair declared
        // them lost), so a miss rebuilds it from the store alone.
        repo.record_cache_hits(true);
        let built = build_summary(repo, share, host, level, first);
        let hits = repo.record_cache_hits(false);
        let mut built = built?;
        if !hits.is_empty() && repo.exist_many(hits)?.contains(&false) {
            repo.distrust_cache();
            built = build_summary(repo, share, host, level, first)?;
        }
        match built {
            Some(summary) => {
                repo.put_summary(&name, &summary)?;
                tracing::debug!("wrote {name}: level {level}, places {first}..={}", summary.last);
                // What it was built from is not needed again: the 16
                // summaries below it, or (level 1) its objects — except
                // the newest place, which the next append reads — and
                // their indexes (merged into the blob index already).
                let below: Vec<String> = if level >= 2 {
                    (0..FANOUT)
                        .map(|i| {
                            let f = first + i * span(level - 1);
                            summary_name(repo.key(), share, host, level - 1, f)
                        })
                        .collect()
                } else {
                    let objects = summary.objects.iter().filter(|o| o.seq < head.seq);
                    objects
                        .map(|o| o.name.clone())
                        .chain(summary.indexes.iter().map(|i| i.name.clone()))
                        .collect()
                };
                repo.uncache(&below);
            }
            None => tracing::info!(
                "summary of places {first}..={} of {share} is larger than {} MiB: not written (readers use the ones below it)",
                first + span(level) - 1,
                SUMMARY_MAX_BYTES >> 20
            ),
        }
        state.summary_done(host, level, first)?;
        if level >= 2 {
            release_freed_memory();
        }
    }
    Ok(())
}

/// Gives memory the allocator holds free back to the system. A summary
/// of level 2 and up is built from several MiB of bodies; without this a
/// long-running daemon keeps the high-water mark of those builds in its
/// allocator's arenas.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory to the system; it is
    // safe to call at any time from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The summary of places `first ..= first + 16^level - 1`, from the
/// summaries below it and the objects themselves (both through the object
/// cache: what this machine wrote is there; anything else is read back
/// and authenticated). None when it would pass [`SUMMARY_MAX_BYTES`].
fn build_summary(
    repo: &Repository,
    share: &str,
    host: &str,
    level: u32,
    first: u64,
) -> Result<Option<Summary>> {
    let last = first + span(level) - 1;
    let mut objects = Vec::new();
    let mut index_names: Vec<(String, Option<Index>)> = Vec::new();
    let mut size = 0usize;
    let mut pos = first - 1;
    while pos < last {
        if size > SUMMARY_MAX_BYTES {
            return Ok(None);
        }
        let lower = (1..level)
            .rev()
            .filter(|&l| pos.is_multiple_of(span(l)) && pos + span(l) <= last)
            .find_map(|l| {
                let name = summary_name(repo.key(), share, host, l, pos + 1);
                let s = repo.read_summary(&name).ok().flatten()?;
                summary_objects(repo.key(), &s, share, host, l, pos + 1)
                    .ok()
                    .map(|_| s)
            });
        if let Some(s) = lower {
            size += s.objects.iter().map(|o| o.body.len() + 200).sum::<usize>();
            objects.extend(s.objects);
            index_names.extend(s.indexes.into_iter().map(|i| (i.name, i.index)));
            pos = s.last;
            continue;
        }
        for kind in HistoryKind::ALL {
            let name = history_name(repo.key(), kind, share, host, pos + 1);
            if let Some(o) = repo.read_history_opt(&name)? {
                if let Some(names) = o.body.indexes() {
                    index_names.extend(names.iter().map(|n| (n.clone(), None)));
                }
                if let Some(entry) = summary_entry(&o) {
                    size += entry.body.len() + 200;
                    objects.push(entry);
                }
            }
        }
        pos += 1;
    }
    let mut indexes = Vec::new();
    for (name, embedded) in index_names {
        let index = embedded.or_else(|| repo.cached_index(&name));
        let embedded = index
            .as_ref()
            .map_or(0, |i| i.packs.iter().map(|p| 64 + 90 * p.blobs.len()).sum());
        let index = index.filter(|_| size + embedded <= SUMMARY_MAX_BYTES);
        if index.is_some() {
            size += embedded;
        }
        indexes.push(SummaryIndex { name, index });
    }
    if size > SUMMARY_MAX_BYTES {
        return Ok(None);
    }
    Ok(Some(Summary {
        share: share.to_string(),
        host: host.to_string(),
        level,
        first,
        last,
        objects,
        indexes,
    }))
}

fn is_not_found(e: &btrship_upload::RepoError) -> bool {
    matches!(e, btrship_upload::RepoError::Store(s) if s.is_not_found())
}

/// Continues the history after a loss (`btrship repair`): when the store
/// lacks this machine's head, the next object follows the newest intact
/// object of the chain in the store and declares the places in between
/// lost for good. Returns the declared range, or None when nothing was
/// lost.
pub fn resume_after_loss(
    repo: &Repository,
    state: &State,
    share: &str,
    host: &str,
) -> Result<Option<(u64, u64)>> {
    let _lock = state.lock_history()?;
    let Some(head) = state.history_head()? else {
        return Ok(None);
    };
    let (objects, _) = repo.history_objects()?;
    let mine: Vec<HistoryObject> = objects
        .into_iter()
        .filter(|o| o.body.share() == share && o.body.host() == host)
        .collect();
    if behind_reason(&mine, &head, share).is_none() {
        return Ok(None);
    }
    // The newest object whose chain back to the start is intact.
    let mut by_seq: Vec<&HistoryObject> =
        mine.iter().filter(|o| o.body.chain().is_some()).collect();
    by_seq.sort_by_key(|o| o.body.chain().map(|l| l.seq));
    let mut last: Option<&HistoryObject> = None;
    for o in by_seq {
        let Some(link) = o.body.chain() else { continue };
        let ok = match (&last, &link.prev) {
            (None, None) => link.seq == 1,
            (Some(p), Some(prev)) => prev.name == p.name && prev.hash == p.hash,
            _ => false,
        };
        if !ok {
            break;
        }
        last = Some(o);
    }
    let (name, hash, surviving) = match last {
        Some(o) => (o.name.clone(), o.hash, o.body.chain().map_or(0, |l| l.seq)),
        None => (String::new(), [0; 32], 0),
    };
    let from = surviving + 1;
    state.set_history_head(&HistoryHead {
        host: host.to_string(),
        seq: head.seq.max(surviving),
        name,
        hash,
        lost_from: Some(from),
        time: crate::daemon::now_text(),
    })?;
    Ok(Some((from, head.seq)))
}
