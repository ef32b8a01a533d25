//! History chains (FORMAT.md §5, "history chain"): the snapshot records and
//! version batches of one share on one host form one chain. Each object
//! names its place (`seq`) and its predecessor (name and BLAKE3 hash of the
//! predecessor's sealed bytes), and its object name is a keyed hash of
//! (share, host, seq). So:
//!
//! - a missing or replaced object in the middle is noticed by anyone who
//!   holds the key: its successor names it (a *gap*);
//! - two objects at one place (two writers claiming one share and host, or
//!   a store replaying an object) are a *fork*;
//! - a writer that crashed after an upload and before its state update
//!   finds its object again at the one name its next `seq` can have.
//!
//! The newest tail of a chain can still be withheld from a reader that
//! knows nothing; the shipping machine remembers its head and detects that
//! (root crate, `history`).
//!
//! This module is pure: [`verify_chain`] takes decoded objects and returns
//! what is wrong with them; it needs no key and no store.

use crate::format::{ChainLink, PrevLink, SnapshotRecord, Summary, SummaryObject, VersionBatch};
use btrship_crypto::{ObjectKind, RepoKey};
use std::collections::BTreeMap;

/// Places per level-1 summary; a level-`l` summary covers `FANOUT^l`
/// places (FORMAT.md §5b).
pub const FANOUT: u64 = 16;
/// The highest summary level (16^5 = 1,048,576 places).
pub const MAX_LEVEL: u32 = 5;

/// Places covered by one summary of `level`.
pub fn span(level: u32) -> u64 {
    FANOUT.pow(level)
}

/// The summaries that become due when the object at place `seq` is
/// written: `(level, first place)`, lowest level first.
pub fn summaries_due(seq: u64) -> Vec<(u32, u64)> {
    (1..=MAX_LEVEL)
        .take_while(|&l| seq.is_multiple_of(span(l)))
        .map(|l| (l, seq - span(l) + 1))
        .collect()
}

/// The summary levels a reader that has read places `1..=pos` can try
/// next (a summary starts at `pos + 1` only when `pos` is a multiple of
/// its span), highest first.
pub fn levels_after(pos: u64) -> Vec<u32> {
    (1..=MAX_LEVEL)
        .rev()
        .filter(|&l| pos.is_multiple_of(span(l)))
        .collect()
}

fn keyed_name(key: &RepoKey, prefix: &str, tag: &str, parts: &[&str]) -> String {
    let mut ident = tag.as_bytes().to_vec();
    ident.push(0);
    for part in parts {
        ident.extend_from_slice(part.as_bytes());
        ident.push(0);
    }
    format!("{prefix}/{}", key.content_id(&ident).to_hex())
}

/// The name of the chain registration of share+host (FORMAT.md §5b).
pub fn chain_name(key: &RepoKey, share: &str, host: &str) -> String {
    keyed_name(key, "chains", "btrship chain", &[share, host])
}

/// The one name the summary of `level` starting at place `first` of
/// share+host's chain can have (FORMAT.md §5b).
pub fn summary_name(key: &RepoKey, share: &str, host: &str, level: u32, first: u64) -> String {
    keyed_name(
        key,
        "summaries",
        "btrship summary",
        &[share, host, &level.to_string(), &first.to_string()],
    )
}

/// The two kinds of history object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HistoryKind {
    Snapshot,
    Versions,
}

impl HistoryKind {
    pub const ALL: [HistoryKind; 2] = [HistoryKind::Snapshot, HistoryKind::Versions];

    pub fn prefix(self) -> &'static str {
        match self {
            HistoryKind::Snapshot => "snapshots",
            HistoryKind::Versions => "versions",
        }
    }

    pub fn object_kind(self) -> ObjectKind {
        match self {
            HistoryKind::Snapshot => ObjectKind::Snapshot,
            HistoryKind::Versions => ObjectKind::Version,
        }
    }

    /// The kind of an object name (`snapshots/...`, `versions/...`).
    pub fn of_name(name: &str) -> Option<HistoryKind> {
        HistoryKind::ALL.into_iter().find(|k| {
            name.strip_prefix(k.prefix())
                .is_some_and(|r| r.starts_with('/'))
        })
    }
}

/// The one name the object at `seq` of share+host's chain can have.
pub fn history_name(key: &RepoKey, kind: HistoryKind, share: &str, host: &str, seq: u64) -> String {
    let mut ident = b"btrship history\0".to_vec();
    for part in [share, host, &seq.to_string()] {
        ident.extend_from_slice(part.as_bytes());
        ident.push(0);
    }
    format!("{}/{}", kind.prefix(), key.content_id(&ident).to_hex())
}

/// BLAKE3 of an object's sealed bytes, as a [`PrevLink`] holds it.
pub fn sealed_hash(sealed: &[u8]) -> [u8; 32] {
    *blake3::hash(sealed).as_bytes()
}

/// A decoded history object. (Records are larger than batch headers; the
/// few hundred bytes of difference do not matter for a list of objects.)
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)]
pub enum HistoryBody {
    Snapshot(SnapshotRecord),
    Versions(VersionBatch),
}

impl HistoryBody {
    pub fn kind(&self) -> HistoryKind {
        match self {
            HistoryBody::Snapshot(_) => HistoryKind::Snapshot,
            HistoryBody::Versions(_) => HistoryKind::Versions,
        }
    }
    pub fn share(&self) -> &str {
        match self {
            HistoryBody::Snapshot(r) => &r.share,
            HistoryBody::Versions(b) => &b.share,
        }
    }
    pub fn host(&self) -> &str {
        match self {
            HistoryBody::Snapshot(r) => &r.host,
            HistoryBody::Versions(b) => &b.host,
        }
    }
    pub fn chain(&self) -> Option<&ChainLink> {
        match self {
            HistoryBody::Snapshot(r) => r.chain.as_ref(),
            HistoryBody::Versions(b) => b.chain.as_ref(),
        }
    }
    /// The index objects this object names (None: written before §5b).
    pub fn indexes(&self) -> Option<&[String]> {
        match self {
            HistoryBody::Snapshot(r) => r.indexes.as_deref(),
            HistoryBody::Versions(b) => b.indexes.as_deref(),
        }
    }
    pub fn set_indexes(&mut self, names: Vec<String>) {
        match self {
            HistoryBody::Snapshot(r) => r.indexes = Some(names),
            HistoryBody::Versions(b) => b.indexes = Some(names),
        }
    }
    /// A snapshot record's time, or a batch's newest entry time.
    pub fn time(&self) -> String {
        match self {
            HistoryBody::Snapshot(r) => r.time.clone(),
            HistoryBody::Versions(b) => b
                .entries
                .iter()
                .map(|e| e.time.as_str())
                .max()
                .unwrap_or("")
                .to_string(),
        }
    }
    /// The body as CBOR, unpadded (as a summary holds it).
    pub fn to_cbor(&self) -> Vec<u8> {
        match self {
            HistoryBody::Snapshot(r) => crate::format::to_cbor(r),
            HistoryBody::Versions(b) => crate::format::to_cbor(b),
        }
    }
    /// Decodes a body of `kind` from CBOR.
    pub fn from_cbor(kind: HistoryKind, bytes: &[u8]) -> Result<HistoryBody, String> {
        Ok(match kind {
            HistoryKind::Snapshot => HistoryBody::Snapshot(crate::format::from_cbor(bytes)?),
            HistoryKind::Versions => HistoryBody::Versions(crate::format::from_cbor(bytes)?),
        })
    }
}

/// The entry a summary holds for a history object.
pub fn summary_entry(obj: &HistoryObject) -> Option<SummaryObject> {
    let chain = obj.body.chain()?.clone();
    Some(SummaryObject {
        seq: chain.seq,
        name: obj.name.clone(),
        hash: obj.hash.to_vec(),
        chain,
        time: obj.body.time(),
        body: obj.body.to_cbor(),
    })
}

/// The history objects a summary holds, checked against what the
/// summary's name promises: each object's name must be the one name its
/// place can have in this chain, its place within the summary's range,
/// its body of this share and host with the chain link the entry states.
/// An authentic summary that fails this was written by a faulty writer:
/// the reader treats the summary as unreadable and reads the places.
pub fn summary_objects(
    key: &RepoKey,
    s: &Summary,
    share: &str,
    host: &str,
    level: u32,
    first: u64,
) -> Result<Vec<HistoryObject>, String> {
    if s.share != share || s.host != host || s.level != level || s.first != first {
        return Err("it names another chain or range than its name".into());
    }
    if s.last != first + span(level) - 1 {
        return Err(format!(
            "its range ends at {} instead of {}",
            s.last,
            first + span(level) - 1
        ));
    }
    let mut out = Vec::with_capacity(s.objects.len());
    let mut last_seq = 0;
    for o in &s.objects {
        if o.seq < first || o.seq > s.last || o.seq <= last_seq {
            return Err(format!("place {} is out of range or order", o.seq));
        }
        last_seq = o.seq;
        let kind = HistoryKind::of_name(&o.name)
            .ok_or_else(|| format!("{} is not a history object name", o.name))?;
        if o.name != history_name(key, kind, share, host, o.seq) {
            return Err(format!("{} is not the name of place {}", o.name, o.seq));
        }
        let body = HistoryBody::from_cbor(kind, &o.body)?;
        if body.share() != share
            || body.host() != host
            || body.chain() != Some(&o.chain)
            || o.chain.seq != o.seq
        {
            return Err(format!(
                "the body at place {} does not match its entry",
                o.seq
            ));
        }
        let hash: [u8; 32] = o
            .hash
            .as_slice()
            .try_into()
            .map_err(|_| format!("the hash at place {} is not 32 bytes", o.seq))?;
        out.push(HistoryObject {
            name: o.name.clone(),
            hash,
            body,
        });
    }
    Ok(out)
}

/// A history object as read from the store.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryObject {
    pub name: String,
    /// BLAKE3 of its sealed bytes.
    pub hash: [u8; 32],
    pub body: HistoryBody,
}

impl HistoryObject {
    pub fn link(&self) -> PrevLink {
        PrevLink {
            name: self.name.clone(),
            hash: self.hash.to_vec(),
        }
    }
}

/// What is wrong with a chain, each naming the object concerned.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "problem", rename_all = "snake_case")]
pub enum ChainProblem {
    /// The object at `seq` is named by its successor but absent (withheld,
    /// deleted, or unreadable).
    Missing {
        seq: u64,
        name: String,
        named_by: String,
    },
    /// The object at `seq` is there but is not the one its successor names
    /// (replaced, or another writer's).
    Mismatch {
        seq: u64,
        name: String,
        named_by: String,
    },
    /// Several objects claim `seq`.
    Fork { seq: u64, names: Vec<String> },
    /// The object at `seq` is there but cannot be read or opened.
    Damaged {
        seq: u64,
        name: String,
        error: String,
    },
}

impl std::fmt::Display for ChainProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChainProblem::Missing {
                seq,
                name,
                named_by,
            } => write!(
                f,
                "history object {seq} ({name}) is missing: {named_by} follows it (withheld, deleted or damaged)"
            ),
            ChainProblem::Mismatch {
                seq,
                name,
                named_by,
            } => write!(
                f,
                "history object {seq} ({name}) is not the one {named_by} follows (replaced)"
            ),
            ChainProblem::Damaged { seq, name, error } => {
                write!(f, "history object {seq} ({name}) is damaged: {error}")
            }
            ChainProblem::Fork { seq, names } => write!(
                f,
                "several history objects claim place {seq}: {} (two writers with one share and host name?)",
                names.join(", ")
            ),
        }
    }
}

/// The newest object of a chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainHead {
    pub seq: u64,
    pub name: String,
    pub hash: [u8; 32],
}

/// The verdict on one share+host chain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChainCheck {
    /// The object with the highest `seq` (the first one by name on a fork).
    pub head: Option<ChainHead>,
    pub problems: Vec<ChainProblem>,
    /// Ranges `from ..= to` that `repair` declared lost for good.
    pub declared_lost: Vec<(u64, u64)>,
    /// Objects written before chains existed (no `chain`): gaps among them
    /// cannot be detected.
    pub unchained: usize,
}

/// Checks the chain formed by `objects` (all of one share and host).
pub fn verify_chain<'a>(objects: impl IntoIterator<Item = &'a HistoryObject>) -> ChainCheck {
    verify_chain_after(None, objects)
}

/// [`verify_chain`] of the part of a chain after `base`, a place already
/// checked (the newest of an intact prefix a reader holds): the first
/// object after it must name it. The verdict's head is `base` when no
/// object follows it.
pub fn verify_chain_after<'a>(
    base: Option<&ChainHead>,
    objects: impl IntoIterator<Item = &'a HistoryObject>,
) -> ChainCheck {
    let mut by_seq: BTreeMap<u64, Vec<&HistoryObject>> = BTreeMap::new();
    let mut out = ChainCheck::default();
    for o in objects {
        match o.body.chain() {
            Some(link) => by_seq.entry(link.seq).or_default().push(o),
            None => out.unchained += 1,
        }
    }
    for (&seq, objs) in &by_seq {
        if objs.len() > 1 {
            let mut names: Vec<String> = objs.iter().map(|o| o.name.clone()).collect();
            names.sort();
            out.problems.push(ChainProblem::Fork { seq, names });
        }
        for o in objs {
            let Some(link) = o.body.chain() else { continue };
            let expected = match link.lost_from {
                Some(from) if from >= 1 && from < seq => {
                    out.declared_lost.push((from, seq - 1));
                    from - 1
                }
                _ => seq.saturating_sub(1),
            };
            let Some(prev) = &link.prev else {
                if expected > 0 {
                    // Nothing named, though something came before.
                    out.problems.push(ChainProblem::Missing {
                        seq: expected,
                        name: "(not named)".into(),
                        named_by: o.name.clone(),
                    });
                }
                continue;
            };
            if let Some(b) = base.filter(|b| b.seq == expected) {
                if b.name != prev.name || b.hash.as_slice() != prev.hash.as_slice() {
                    out.problems.push(ChainProblem::Mismatch {
                        seq: expected,
                        name: prev.name.clone(),
                        named_by: o.name.clone(),
                    });
                }
                continue;
            }
            if base.is_some_and(|b| expected < b.seq) {
                // Places the reader checked before: an object after the
                // base that names one is a fork of the checked part.
                out.problems.push(ChainProblem::Mismatch {
                    seq: expected,
                    name: prev.name.clone(),
                    named_by: o.name.clone(),
                });
                continue;
            }
            let candidates = by_seq.get(&expected).map(Vec::as_slice).unwrap_or(&[]);
            match candidates.iter().find(|c| c.name == prev.name) {
                None => out.problems.push(ChainProblem::Missing {
                    seq: expected,
                    name: prev.name.clone(),
                    named_by: o.name.clone(),
                }),
                Some(c) if c.hash.as_slice() != prev.hash.as_slice() => {
                    out.problems.push(ChainProblem::Mismatch {
                        seq: expected,
                        name: prev.name.clone(),
                        named_by: o.name.clone(),
                    })
                }
                Some(_) => {}
            }
        }
    }
    out.declared_lost.sort();
    out.declared_lost.dedup();
    out.head = by_seq
        .iter()
        .next_back()
        .and_then(|(&seq, objs)| {
            let o = objs.iter().min_by(|a, b| a.name.cmp(&b.name))?;
            Some(ChainHead {
                seq,
                name: o.name.clone(),
                hash: o.hash,
            })
        })
        .or_else(|| base.cloned());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{VersionBatch, VersionEntry, VersionKind};

    fn obj(seq: u64, prev: Option<&HistoryObject>, lost_from: Option<u64>) -> HistoryObject {
        let name = format!("versions/{seq:04}");
        HistoryObject {
            hash: *blake3::hash(name.as_bytes()).as_bytes(),
            name,
            body: HistoryBody::Versions(VersionBatch {
                share: "s".into(),
                host: "h".into(),
                entries: vec![VersionEntry {
                    time: "t".into(),
                    path: b"p".to_vec(),
                    kind: VersionKind::Delete,
                    node: None,
                }],
                chain: Some(ChainLink {
                    seq,
                    prev: prev.map(HistoryObject::link),
                    lost_from,
                }),
                indexes: None,
            }),
        }
    }

    fn chain(n: u64) -> Vec<HistoryObject> {
        let mut out: Vec<HistoryObject> = Vec::new();
        for seq in 1..=n {
            let o = obj(seq, out.last(), None);
            out.push(o);
        }
        out
    }

    #[test]
    fn summaries_fall_due_on_aligned_places_and_readers_find_them() {
        assert!(summaries_due(15).is_empty());
        assert_eq!(summaries_due(16), vec![(1, 1)]);
        assert_eq!(summaries_due(32), vec![(1, 17)]);
        assert_eq!(summaries_due(256), vec![(1, 241), (2, 1)]);
        assert_eq!(summaries_due(4096), vec![(1, 4081), (2, 3841), (3, 1)]);
        assert_eq!(levels_after(0), vec![5, 4, 3, 2, 1]);
        assert_eq!(levels_after(16), vec![1]);
        assert_eq!(levels_after(17), Vec::<u32>::new());
        assert_eq!(levels_after(512), vec![2, 1]);
        // Every due summary starts where a reader can try it.
        for seq in 1..=5000u64 {
            for (level, first) in summaries_due(seq) {
                assert!(levels_after(first - 1).contains(&level), "{seq}");
                assert_eq!(first + span(level) - 1, seq);
            }
        }
    }

    #[test]
    fn an_intact_chain_has_no_problems_and_its_head() {
        let c = chain(5);
        let v = verify_chain(&c);
        assert!(v.problems.is_empty(), "{:?}", v.problems);
        assert_eq!(v.head.map(|h| h.seq), Some(5));
    }

    #[test]
    fn a_withheld_middle_object_is_named() {
        let mut c = chain(5);
        let gone = c.remove(2);
        let v = verify_chain(&c);
        assert_eq!(
            v.problems,
            vec![ChainProblem::Missing {
                seq: 3,
                name: gone.name,
                named_by: c[2].name.clone()
            }]
        );
    }

    #[test]
    fn a_replaced_object_is_a_mismatch() {
        let mut c = chain(4);
        c[1].hash = [9; 32];
        let v = verify_chain(&c);
        assert!(matches!(
            v.problems.as_slice(),
            [ChainProblem::Mismatch { seq: 2, .. }]
        ));
    }

    #[test]
    fn two_objects_at_one_place_are_a_fork() {
        let mut c = chain(3);
        let mut other = obj(3, Some(&c[1]), None);
        other.name = "versions/other".into();
        c.push(other);
        let v = verify_chain(&c);
        assert!(v
            .problems
            .iter()
            .any(|p| matches!(p, ChainProblem::Fork { seq: 3, .. })));
    }

    #[test]
    fn a_declared_loss_is_not_a_problem() {
        let c = chain(2);
        let resumed = obj(6, Some(&c[1]), Some(3));
        let mut all = c;
        all.push(resumed);
        let v = verify_chain(&all);
        assert!(v.problems.is_empty(), "{:?}", v.problems);
        assert_eq!(v.declared_lost, vec![(3, 5)]);
        assert_eq!(v.head.map(|h| h.seq), Some(6));
    }

    #[test]
    fn the_part_after_a_checked_prefix_must_follow_it() {
        let c = chain(6);
        let base = ChainHead {
            seq: 3,
            name: c[2].name.clone(),
            hash: c[2].hash,
        };
        let v = verify_chain_after(Some(&base), &c[3..]);
        assert!(v.problems.is_empty(), "{:?}", v.problems);
        assert_eq!(v.head.as_ref().map(|h| h.seq), Some(6));
        let none = verify_chain_after(Some(&base), &[]);
        assert_eq!(none.head, Some(base.clone()));
        let other = ChainHead {
            hash: [1; 32],
            ..base.clone()
        };
        let v = verify_chain_after(Some(&other), &c[3..]);
        assert!(matches!(
            v.problems.as_slice(),
            [ChainProblem::Mismatch { seq: 3, .. }]
        ));
        // The object at 4 is missing: 5 names it.
        let v = verify_chain_after(Some(&base), &c[4..]);
        assert!(matches!(
            v.problems.as_slice(),
            [ChainProblem::Missing { seq: 4, .. }]
        ));
    }

    #[test]
    fn a_missing_first_object_is_found_from_the_second() {
        let mut c = chain(2);
        c.remove(0);
        let v = verify_chain(&c);
        assert!(matches!(
            v.problems.as_slice(),
            [ChainProblem::Missing { seq: 1, .. }]
        ));
    }
}
