//! `btrship check`: verify a repository against FORMAT.md. Every problem is
//! reported naming its object; one bad object never stops the check.
//!
//! Without `--read-data`: config, key checks, every index, every snapshot
//! record, every tree reachable from them (and the header of every pack
//! holding a tree), and that every referenced blob is indexed in a pack that
//! exists and is large enough. With `--read-data`: every byte of every pack.

use crate::restore::read_checked_tree;
use crate::state::HistoryHead;
use btrship_crypto::ContentId;
use btrship_upload::format::GarbageRecord;
use btrship_upload::format::{Node, NodeKind};
use btrship_upload::history::{
    history_name, verify_chain, HistoryBody, HistoryKind, HistoryObject,
};
use btrship_upload::Repository;
use std::collections::{BTreeMap, HashMap, HashSet};

#[derive(Debug, Default, serde::Serialize)]
pub struct CheckReport {
    pub snapshots: u64,
    /// Version batches (daemon) and the entries in them.
    pub version_batches: u64,
    pub version_entries: u64,
    pub trees: u64,
    pub packs: u64,
    pub packs_read: u64,
    pub blobs_referenced: u64,
    /// Share+host history chains checked.
    pub histories: u64,
    /// History summaries checked (FORMAT.md §5b).
    pub summaries: u64,
    pub problems: Vec<String>,
    pub warnings: Vec<String>,
    /// Packs listed in an index but missing from the store (remembered in
    /// the state database so the next ship uploads their blobs again).
    pub missing_packs: Vec<String>,
}

/// What the shipping machine knows of a share's history (rollback and
/// withholding detection).
pub struct LocalHistory {
    pub share: String,
    pub host: String,
    /// Snapshot records this machine shipped.
    pub shipped_records: Vec<String>,
    pub head: Option<HistoryHead>,
}

pub fn check(
    repo: &Repository,
    read_data: bool,
    local: Option<&LocalHistory>,
    progress: &mut crate::progress::Progress,
) -> CheckReport {
    let mut r = CheckReport::default();
    let objects = match repo.list("") {
        Ok(o) => o,
        Err(e) => {
            r.problems.push(format!("cannot list the repository: {e}"));
            return r;
        }
    };
    let sizes: HashMap<&str, u64> = objects.iter().map(|o| (o.key.as_str(), o.size)).collect();
    // Every snapshot record and version batch, read once: for what they
    // reference and for their chains.
    let history = match repo.history_objects() {
        Ok((good, bad)) => {
            for (_, e) in bad {
                r.problems.push(format!("{e}"));
            }
            good
        }
        Err(e) => {
            r.problems
                .push(format!("cannot read the history objects: {e}"));
            Vec::new()
        }
    };
    // Objects only summaries still hold (the single was superseded and
    // pruned) are history like any other.
    let mut history = history;
    let (garbage, forgotten) = retention_records(repo, &mut r);
    let held = check_bounded_reads(repo, &objects, &history, &garbage, &mut r);
    history.extend(held);
    // Forgotten moments (FORMAT.md §5c) count for their chain, not for
    // what must still be stored.
    let live: Vec<&HistoryObject> = history
        .iter()
        .filter(|o| !forgotten.contains(&o.name))
        .collect();
    let mut version_refs = HashSet::new();
    for o in live.iter().copied() {
        let HistoryBody::Versions(b) = &o.body else {
            continue;
        };
        r.version_batches += 1;
        r.version_entries += b.entries.len() as u64;
        for e in &b.entries {
            let Some(n) = &e.node else { continue };
            if unsafe_path(&e.path) {
                r.problems.push(format!(
                    "{}: unsafe path {:?}",
                    o.name,
                    String::from_utf8_lossy(&e.path)
                ));
            }
            version_refs.extend(n.content.iter().map(|x| x.1 .0));
        }
    }
    for o in &objects {
        let key = o.key.as_str();
        let prefix = key.split('/').next().unwrap_or_default();
        match prefix {
            "config" | "packs" | "snapshots" | "versions" | "chains" | "summaries" | "gc"
            | "forgets" | "keyslots" => {}
            "keys" => {
                if let Err(e) = repo.read_key_check(key) {
                    r.problems.push(format!("{e}"));
                }
            }
            "index" => {
                if let Err(e) = repo.read_index_object(key) {
                    r.problems.push(format!("{e}"));
                }
            }
            "locks" => {}
            _ => r
                .warnings
                .push(format!("{key}: unknown object (not written by btrship)")),
        }
    }
    // Indexed packs must exist and be large enough for their blobs.
    let indexed = repo.packs_in_index();
    let deleted_packs: HashSet<&str> = garbage.deleted_packs.iter().map(|p| p.as_str()).collect();
    for (pack, blobs) in &indexed {
        match sizes.get(pack.as_str()) {
            None if deleted_packs.contains(pack.as_str()) => {}
            None => {
                r.missing_packs.push(pack.clone());
                match crate::repair::blobs_without_copy(repo, pack, blobs, &sizes) {
                    0 => r.warnings.push(format!(
                        "{pack}: listed in an index but missing from the store; \
                         every blob it held has another copy (healed)"
                    )),
                    n => r.problems.push(format!(
                        "{pack}: listed in an index but missing from the store \
                         ({n} blobs it held have no other copy; btrship repair)"
                    )),
                }
            }
            Some(&size) => {
                if let Some((id, _)) = blobs
                    .iter()
                    .find(|(_, l)| l.offset.saturating_add(l.length) > size)
                {
                    r.problems.push(format!(
                        "{pack}: truncated ({size} bytes); blob {id} lies beyond its end"
                    ));
                }
            }
        }
    }
    for o in objects.iter().filter(|o| o.key.starts_with("packs/")) {
        r.packs += 1;
        if !indexed.contains_key(&o.key) {
            r.warnings.push(format!(
                "{}: pack in no index (left by an interrupted ship; a later prune removes it)",
                o.key
            ));
        }
    }
    // Snapshot records and everything they reference.
    let mut seen_trees = HashSet::new();
    let mut referenced = HashSet::new();
    for o in live.iter().copied() {
        let HistoryBody::Snapshot(rec) = &o.body else {
            continue;
        };
        r.snapshots += 1;
        let mut root = rec.root.clone();
        root.subtree = Some(rec.tree);
        walk(
            repo,
            &root,
            &o.name,
            &mut seen_trees,
            &mut referenced,
            &mut r,
        );
    }
    if let Some(local) = local {
        for rec in &local.shipped_records {
            if !sizes.contains_key(rec.as_str()) && !forgotten.contains(rec) {
                r.problems.push(format!("{rec}: shipped from this machine but missing from the store (deleted or rolled back)"));
            }
        }
    }
    check_chains(&history, local, &mut r);
    referenced.extend(version_refs);
    r.missing_packs.sort();
    r.trees = seen_trees.len() as u64;
    r.blobs_referenced = referenced.len() as u64;
    for id in &referenced {
        // A copy in a pack the store holds (a pack prune marked counts:
        // it is still there, and a later prune recovers it).
        let stored = repo
            .blob_locations(id)
            .iter()
            .any(|l| sizes.contains_key(l.pack.as_str()));
        if !stored {
            r.problems
                .push(format!("data blob {id}: referenced but in no index"));
        }
    }
    if read_data {
        let mut packs: Vec<(&str, u64)> = objects
            .iter()
            .filter(|o| o.key.starts_with("packs/"))
            .map(|o| (o.key.as_str(), o.size))
            .collect();
        packs.sort();
        progress.set_total(packs.len() as u64, packs.iter().map(|p| p.1).sum());
        for (pack, size) in packs {
            r.packs_read += 1;
            if let Err(e) = repo.verify_pack(pack) {
                r.problems.push(format!("{e}"));
            }
            progress.file(size);
        }
        progress.finish();
    }
    r
}

/// FORMAT.md §5b: chain registrations open and name their own chain;
/// every summary opens, covers what its name says, and agrees with every
/// object it holds that is still in the store; every index a history
/// object names exists; every chain with named indexes is registered.
/// Returns the objects summaries hold whose own object the store lacks.
fn check_bounded_reads(
    repo: &Repository,
    objects: &[btrship_upload::ObjectMeta],
    history: &[HistoryObject],
    garbage: &GarbageRecord,
    r: &mut CheckReport,
) -> Vec<HistoryObject> {
    let mut only_held: HashMap<String, HistoryObject> = HashMap::new();
    let present: HashSet<&str> = objects.iter().map(|o| o.key.as_str()).collect();
    let regs = match repo.chain_registrations() {
        Ok((good, bad)) => {
            for (name, e) in bad {
                r.problems.push(format!("{name}: {e}"));
            }
            good
        }
        Err(e) => {
            r.problems
                .push(format!("cannot read the chain registrations: {e}"));
            Vec::new()
        }
    };
    let registered: HashSet<(&str, &str)> = regs
        .iter()
        .map(|g| (g.share.as_str(), g.host.as_str()))
        .collect();
    let by_name: HashMap<&str, &HistoryObject> =
        history.iter().map(|o| (o.name.as_str(), o)).collect();
    let mut unregistered = BTreeMap::new();
    for o in history {
        let Some(names) = o.body.indexes() else {
            continue;
        };
        if !registered.contains(&(o.body.share(), o.body.host())) {
            unregistered.insert((o.body.share(), o.body.host()), o.name.as_str());
        }
        for name in names {
            if !present.contains(name.as_str()) && !garbage.deleted_indexes.contains(name) {
                r.problems.push(format!(
                    "{}: names index {name}, which the store lacks",
                    o.name
                ));
            }
        }
    }
    for ((share, host), example) in unregistered {
        r.warnings.push(format!(
            "share {share} on host {host} has history (e.g. {example}) but no chain registration: readers on other machines list every object to find it"
        ));
    }
    for o in objects.iter().filter(|o| o.key.starts_with("summaries/")) {
        r.summaries += 1;
        let summary = match repo.read_summary(&o.key) {
            Ok(Some(s)) => s,
            Ok(None) => continue,
            Err(e) => {
                r.problems.push(format!("{e}"));
                continue;
            }
        };
        let expected = btrship_upload::history::summary_name(
            repo.key(),
            &summary.share,
            &summary.host,
            summary.level,
            summary.first,
        );
        if expected != o.key {
            r.problems.push(format!(
                "{}: a summary stored under another summary's name",
                o.key
            ));
            continue;
        }
        let held = match btrship_upload::history::summary_objects(
            repo.key(),
            &summary,
            &summary.share,
            &summary.host,
            summary.level,
            summary.first,
        ) {
            Ok(h) => h,
            Err(why) => {
                r.problems
                    .push(format!("{}: inconsistent summary: {why}", o.key));
                continue;
            }
        };
        for h in held {
            match by_name.get(h.name.as_str()) {
                Some(single) if single.hash != h.hash || single.body != h.body => {
                    r.problems.push(format!(
                        "{}: holds {} differently from the object itself",
                        o.key, h.name
                    ))
                }
                Some(_) => {}
                None => {
                    only_held.insert(h.name.clone(), h);
                }
            }
        }
    }
    let mut out: Vec<HistoryObject> = only_held.into_values().collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The newest garbage record (FORMAT.md §5c) and the names of every
/// forgotten history object (at the places the chains' newest forget
/// records name). Records that do not open are problems.
fn retention_records(repo: &Repository, r: &mut CheckReport) -> (GarbageRecord, HashSet<String>) {
    let garbage = match repo.newest_garbage() {
        Ok((g, skipped)) => {
            for (name, why) in skipped {
                r.problems.push(format!("{name}: {why}"));
            }
            g.unwrap_or_default()
        }
        Err(e) => {
            r.problems
                .push(format!("cannot read the garbage records: {e}"));
            GarbageRecord::default()
        }
    };
    let mut forgotten = HashSet::new();
    let regs = repo
        .chain_registrations()
        .map(|(g, _)| g)
        .unwrap_or_default();
    for reg in regs {
        match repo.newest_forget(&reg.share, &reg.host) {
            Ok((rec, skipped)) => {
                for (name, why) in skipped {
                    r.problems.push(format!("{name}: {why}"));
                }
                for (a, b) in rec.map(|f| f.places).unwrap_or_default() {
                    for seq in a..=b {
                        for k in HistoryKind::ALL {
                            forgotten.insert(history_name(
                                repo.key(),
                                k,
                                &reg.share,
                                &reg.host,
                                seq,
                            ));
                        }
                    }
                }
            }
            Err(e) => r.problems.push(format!(
                "cannot read the forget records of share {} on host {}: {e}",
                reg.share, reg.host
            )),
        }
    }
    (garbage, forgotten)
}

/// Every share+host history chain: gaps, replaced objects, forks; and
/// whether the store holds what this machine shipped last.
fn check_chains(objects: &[HistoryObject], local: Option<&LocalHistory>, r: &mut CheckReport) {
    let mut chains: BTreeMap<(&str, &str), Vec<&HistoryObject>> = BTreeMap::new();
    for o in objects {
        chains
            .entry((o.body.share(), o.body.host()))
            .or_default()
            .push(o);
    }
    for ((share, host), objs) in &chains {
        let v = verify_chain(objs.iter().copied());
        r.histories += 1;
        for p in &v.problems {
            r.problems
                .push(format!("share {share} on host {host}: {p}"));
        }
        for (from, to) in &v.declared_lost {
            r.warnings.push(format!(
                "share {share} on host {host}: history objects {from} to {to} were lost and declared lost by repair"
            ));
        }
        if v.unchained > 0 {
            r.warnings.push(format!(
                "share {share} on host {host}: {} history objects predate history chains (a gap among them cannot be detected)",
                v.unchained
            ));
        }
    }
    // Names are unique to a share, host and place: no need to filter.
    if let Some(LocalHistory {
        share,
        head: Some(head),
        ..
    }) = local
    {
        if let Some(why) = crate::history::behind_reason(objects, head, share) {
            r.problems.push(why);
        }
    }
}

fn unsafe_path(path: &[u8]) -> bool {
    !path.is_empty()
        && path
            .split(|&b| b == b'/')
            .any(|c| btrship_upload::format::unsafe_name_reason(c).is_some())
}

fn walk(
    repo: &Repository,
    dir: &Node,
    record: &str,
    seen: &mut HashSet<ContentId>,
    referenced: &mut HashSet<ContentId>,
    r: &mut CheckReport,
) {
    let Some(id) = dir.subtree else {
        r.problems.push(format!(
            "{record}: directory {:?} has no tree",
            String::from_utf8_lossy(&dir.name)
        ));
        return;
    };
    if !seen.insert(id.0) {
        return;
    }
    let tree = match read_checked_tree(repo, dir) {
        Ok(t) => t,
        Err(e) => {
            r.problems.push(format!("{record}: tree {}: {e:#}", id.0));
            return;
        }
    };
    for node in &tree.entries {
        match node.kind {
            NodeKind::Dir => walk(repo, node, record, seen, referenced, r),
            NodeKind::File => referenced.extend(node.content.iter().map(|e| e.1 .0)),
            _ => {}
        }
    }
}
