//! Reading one history chain with a bounded number of requests
//! (FORMAT.md §5b): summaries first, single objects only for the places no
//! summary covers yet.
//!
//! A reader at place `pos` (places `1..=pos` read) tries the summaries
//! that can start at `pos + 1`, highest level first (a level-`l` summary
//! starts only after a multiple of `16^l`); the first one that exists and
//! checks out moves it to the summary's last place. When none does, it
//! reads the place itself (both names it can have). An empty place ends
//! the chain, unless the caller knows the chain is longer (`at_least`:
//! the shipping machine's head; it looks no further) or, for a reader
//! that knows nothing, an object within the next [`LOOKAHEAD`] places
//! exists: then the empty place is a gap, which
//! [`crate::history::verify_chain`] reports (its successor names it).
//!
//! At `n` places this reads at most about `15 · MAX_LEVEL` summaries plus
//! `15` single places, and probes one missing summary per level change:
//! about 60 requests for 100,000 places, against 100,000 before summaries.
//! Objects come through the repository's object cache, and a reader that
//! holds a checked prefix of the chain (the root crate's catalogue) walks
//! only the places after it ([`walk_from`]).

use crate::format::Index;
use crate::history::{
    history_name, levels_after, span, summary_name, summary_objects, HistoryKind, HistoryObject,
};
use crate::repo::{RepoError, Repository, Result};
use std::collections::HashMap;

/// How far past an empty place a reader looks for more of the chain.
pub const LOOKAHEAD: u64 = 8;

/// One chain as read.
#[derive(Debug, Default, Clone)]
pub struct ChainWalk {
    /// Every object found, in place order (a place may hold two: a fork).
    pub objects: Vec<HistoryObject>,
    /// Objects and summaries found but unreadable or inconsistent, with
    /// why. (An unreadable summary costs only requests: its places are
    /// read one by one.)
    pub bad: Vec<(String, String)>,
    /// The indexes the objects name, with the body when a summary embeds
    /// it.
    pub indexes: Vec<(String, Option<Index>)>,
    /// An object predates named indexes (FORMAT.md §5b): readers must
    /// read every index object to find this chain's blobs.
    pub legacy: bool,
}

fn fatal(e: &RepoError) -> bool {
    e.is_wrong_key() || matches!(e, RepoError::Store(s) if !s.is_not_found())
}

/// Reads the chain of `share` on `host`; `at_least`: a place the chain is
/// known to reach (0 when unknown).
///
/// What comes from the object cache is checked against the store at the
/// end (HEAD requests, in parallel): when the store lacks any of it, the
/// chain is read again from the store alone, so a reader sees a store
/// that lost or withholds objects as it is, also on a machine that read
/// them before.
///
/// `from`: the places `1..=from` are not read (a reader that holds them
/// already, checked, in its catalogue; 0 reads the whole chain).
pub fn walk_from(
    repo: &Repository,
    share: &str,
    host: &str,
    from: u64,
    at_least: u64,
) -> Result<ChainWalk> {
    repo.record_cache_hits(true);
    let walked = walk_once(repo, share, host, from, at_least);
    let hits = repo.record_cache_hits(false);
    let walked = walked?;
    if !hits.is_empty() && repo.exist_many(hits)?.contains(&false) {
        repo.distrust_cache();
        return walk_once(repo, share, host, from, at_least);
    }
    Ok(walked)
}

fn walk_once(
    repo: &Repository,
    share: &str,
    host: &str,
    from: u64,
    at_least: u64,
) -> Result<ChainWalk> {
    let key = repo.key();
    let mut out = ChainWalk::default();
    let mut pos = from;
    // Where each index name sits in `out.indexes`.
    let mut slots: HashMap<String, usize> = HashMap::new();
    let add = |out: &mut ChainWalk, slots: &mut HashMap<String, usize>, o: HistoryObject| {
        match o.body.indexes() {
            Some(names) => {
                for n in names {
                    if !slots.contains_key(n) {
                        slots.insert(n.clone(), out.indexes.len());
                        out.indexes.push((n.clone(), None));
                    }
                }
            }
            None => out.legacy = true,
        }
        out.objects.push(o);
    };
    loop {
        let mut advanced = false;
        for level in levels_after(pos) {
            let name = summary_name(key, share, host, level, pos + 1);
            match repo.read_summary(&name) {
                Ok(Some(s)) => match summary_objects(key, &s, share, host, level, pos + 1) {
                    Ok(objects) => {
                        for o in objects {
                            add(&mut out, &mut slots, o);
                        }
                        // Embedded bodies replace the names the objects gave.
                        for ix in s.indexes {
                            match slots.get(&ix.name) {
                                Some(&i) => {
                                    let slot = &mut out.indexes[i];
                                    slot.1 = ix.index.or(slot.1.take());
                                }
                                None => {
                                    slots.insert(ix.name.clone(), out.indexes.len());
                                    out.indexes.push((ix.name, ix.index));
                                }
                            }
                        }
                        pos = s.last;
                        advanced = true;
                        break;
                    }
                    Err(why) => out.bad.push((name, why)),
                },
                Ok(None) => {}
                Err(e) if fatal(&e) => return Err(e),
                Err(e) => out.bad.push((name, e.to_string())),
            }
        }
        if advanced {
            continue;
        }
        let place = pos + 1;
        let mut found = false;
        for kind in HistoryKind::ALL {
            let name = history_name(key, kind, share, host, place);
            match repo.read_history_opt(&name) {
                Ok(Some(o)) => {
                    add(&mut out, &mut slots, o);
                    found = true;
                }
                Ok(None) => {}
                Err(e) if fatal(&e) => return Err(e),
                Err(e) => {
                    out.bad.push((name, e.to_string()));
                    found = true;
                }
            }
        }
        if !found && place % span(1) != 1 {
            // Mid-block (a reader whose checked prefix ends inside a
            // block of 16): a place prune emptied (FORMAT.md §5c: only
            // inside a level-1 summary) is read from that summary.
            let first = (place - 1) / span(1) * span(1) + 1;
            let name = summary_name(key, share, host, 1, first);
            match repo.read_summary(&name) {
                Ok(Some(s)) => match summary_objects(key, &s, share, host, 1, first) {
                    Ok(objects) => {
                        let named: Vec<String> = objects
                            .iter()
                            .filter(|o| o.body.chain().is_some_and(|l| l.seq >= place))
                            .flat_map(|o| o.body.indexes().unwrap_or_default().to_vec())
                            .collect();
                        for o in objects {
                            if o.body.chain().is_some_and(|l| l.seq >= place) {
                                add(&mut out, &mut slots, o);
                            }
                        }
                        for ix in s.indexes.into_iter().filter(|ix| named.contains(&ix.name)) {
                            if let Some(&i) = slots.get(&ix.name) {
                                let slot = &mut out.indexes[i];
                                slot.1 = ix.index.or(slot.1.take());
                            }
                        }
                        pos = s.last;
                        continue;
                    }
                    Err(why) => out.bad.push((name, why)),
                },
                Ok(None) => {}
                Err(e) if fatal(&e) => return Err(e),
                Err(e) => out.bad.push((name, e.to_string())),
            }
        }
        if found || place <= at_least {
            pos = place;
            continue;
        }
        if at_least > 0 {
            // The shipping machine knows where its chain ends; an object
            // past an empty place after it would be another writer's,
            // which its append protocol refuses.
            break;
        }
        // An empty place: the end, or a gap with more after it.
        let ahead: Vec<(u64, String)> = (place + 1..=place + LOOKAHEAD)
            .flat_map(|p| HistoryKind::ALL.map(|k| (p, history_name(key, k, share, host, p))))
            .collect();
        let names: Vec<String> = ahead.iter().map(|(_, n)| n.clone()).collect();
        let exists = repo.exist_many(names)?;
        match ahead.iter().zip(exists).find(|(_, e)| *e) {
            Some(((p, _), _)) => pos = p - 1,
            None => break,
        }
    }
    Ok(out)
}
