//! The in-memory blob index: where every known blob lives. Compact, since
//! it holds one entry per blob of the whole repository (a million small
//! files are a million blobs): pack names are stored once and referred to
//! by number, so an entry is 56 bytes, and what was loaded at open is a
//! sorted array searched by bisection (a hash table would need up to twice
//! the room); blobs added later go to a small hash table until the next
//! [`MemIndex::compact`].
//!
//! A blob listed in several packs (a copy uploaded again after its first
//! pack was lost, FORMAT.md §5) keeps its first location in the array and
//! every further one in a small side table: readers try them in turn.
//!
//! [`IdSet`] is the same idea for a set of content ids (a writer's blobs in
//! flight): 32 bytes an id instead of a hash table's 33 at half load, and no
//! doubling of a million-entry table while it grows. Both move recent
//! entries into their array with one in-place merge ([`merge_sorted`]).

use crate::format::BlobKind;
use crate::repo::BlobLocation;
use btrship_crypto::ContentId;
use std::collections::{HashMap, HashSet};

#[derive(Debug, Clone, Copy)]
struct Slot {
    offset: u64,
    pack: u32,
    length: u32,
    raw_length: u32,
    kind: BlobKind,
}

#[derive(Debug, Default)]
pub(crate) struct MemIndex {
    packs: Vec<String>,
    pack_ids: HashMap<String, u32>,
    /// Sorted by id, no duplicates.
    sorted: Vec<(ContentId, Slot)>,
    recent: HashMap<ContentId, Slot>,
    /// Further locations of blobs listed in more than one pack (rare).
    extra: HashMap<ContentId, Vec<Slot>>,
}

impl MemIndex {
    /// Adds a blob unless known. Returns false (and adds nothing) when a
    /// length does not fit 32 bits: no btrship blob is that large, so the
    /// entry is damaged; the blob then counts as missing.
    pub fn insert(&mut self, id: ContentId, loc: &BlobLocationRef<'_>) -> bool {
        let (Ok(length), Ok(raw_length)) =
            (u32::try_from(loc.length), u32::try_from(loc.raw_length))
        else {
            return false;
        };
        let pack = match self.pack_ids.get(loc.pack) {
            Some(&n) => n,
            None => {
                let n = self.packs.len() as u32;
                self.packs.push(loc.pack.to_string());
                self.pack_ids.insert(loc.pack.to_string(), n);
                n
            }
        };
        let slot = Slot {
            offset: loc.offset,
            pack,
            length,
            raw_length,
            kind: loc.kind,
        };
        if let Some(first) = self.slot(&id) {
            let first_pack = first.pack;
            let extra = self.extra.entry(id).or_default();
            if first_pack != pack && !extra.iter().any(|s| s.pack == pack) {
                extra.push(slot);
            }
            if extra.is_empty() {
                self.extra.remove(&id);
            }
            return true;
        }
        self.recent.insert(id, slot);
        if self.recent.len() >= Self::RECENT_MAX {
            self.compact();
        }
        true
    }

    /// Recent entries beyond this many are moved into the sorted array.
    const RECENT_MAX: usize = 1 << 16;

    /// Moves recent entries into the sorted array (after a bulk load; also
    /// whenever they pass `RECENT_MAX`).
    pub fn compact(&mut self) {
        if self.recent.is_empty() {
            return;
        }
        // `insert` adds to `recent` only ids the array lacks.
        let mut new: Vec<(ContentId, Slot)> = self.recent.drain().collect();
        new.sort_unstable_by_key(|e| e.0);
        merge_sorted(&mut self.sorted, &new, |e| e.0);
        self.sorted.shrink_to_fit();
        self.recent.shrink_to_fit();
    }

    fn slot(&self, id: &ContentId) -> Option<&Slot> {
        match self.sorted.binary_search_by(|e| e.0 .0.cmp(&id.0)) {
            Ok(i) => Some(&self.sorted[i].1),
            Err(_) => self.recent.get(id),
        }
    }

    pub fn contains(&self, id: &ContentId) -> bool {
        self.slot(id).is_some()
    }

    pub fn len(&self) -> usize {
        self.sorted.len() + self.recent.len()
    }

    fn location(&self, s: &Slot) -> BlobLocation {
        BlobLocation {
            pack: self.packs[s.pack as usize].clone(),
            kind: s.kind,
            offset: s.offset,
            length: u64::from(s.length),
            raw_length: u64::from(s.raw_length),
        }
    }

    /// Every listed location of `id`, the first one first.
    pub fn get_all(&self, id: &ContentId) -> Vec<BlobLocation> {
        let Some(first) = self.slot(id) else {
            return Vec::new();
        };
        let mut out = vec![self.location(first)];
        if let Some(extra) = self.extra.get(id) {
            out.extend(extra.iter().map(|s| self.location(s)));
        }
        out
    }

    /// Is `id` listed in some pack for which `usable` says yes?
    pub fn contains_where(&self, id: &ContentId, usable: impl Fn(&str) -> bool) -> bool {
        let Some(first) = self.slot(id) else {
            return false;
        };
        usable(&self.packs[first.pack as usize])
            || self
                .extra
                .get(id)
                .is_some_and(|v| v.iter().any(|s| usable(&self.packs[s.pack as usize])))
    }

    /// Does the index place `id` in `pack` at other than (offset, length)?
    pub fn disagrees(&self, id: &ContentId, pack: &str, offset: u64, length: u64) -> bool {
        let Some(&p) = self.pack_ids.get(pack) else {
            return false;
        };
        let Some(first) = self.slot(id) else {
            return false;
        };
        std::iter::once(first)
            .chain(self.extra.get(id).into_iter().flatten())
            .any(|s| s.pack == p && (s.offset != offset || u64::from(s.length) != length))
    }

    /// Every blob by pack.
    pub fn by_pack(&self) -> HashMap<String, Vec<(ContentId, BlobLocation)>> {
        let mut out: HashMap<String, Vec<(ContentId, BlobLocation)>> = HashMap::new();
        let all = self
            .sorted
            .iter()
            .map(|(i, s)| (i, s))
            .chain(self.recent.iter())
            .chain(
                self.extra
                    .iter()
                    .flat_map(|(id, v)| v.iter().map(move |s| (id, s))),
            );
        for (id, s) in all {
            out.entry(self.packs[s.pack as usize].clone())
                .or_default()
                .push((*id, self.location(s)));
        }
        out
    }
}

/// A location as read from an index, borrowed.
pub(crate) struct BlobLocationRef<'a> {
    pub pack: &'a str,
    pub kind: BlobKind,
    pub offset: u64,
    pub length: u64,
    pub raw_length: u64,
}

/// A set of content ids: a sorted array plus a small hash set of recent
/// additions, merged into the array when it passes [`IdSet::RECENT_MAX`].
#[derive(Debug, Default)]
pub(crate) struct IdSet {
    /// Sorted, no duplicates.
    sorted: Vec<ContentId>,
    recent: HashSet<ContentId>,
}

impl IdSet {
    const RECENT_MAX: usize = 1 << 16;

    pub fn contains(&self, id: &ContentId) -> bool {
        self.recent.contains(id) || self.sorted.binary_search(id).is_ok()
    }

    /// Adds `id`; false when it was there already.
    pub fn insert(&mut self, id: ContentId) -> bool {
        if self.sorted.binary_search(&id).is_ok() || !self.recent.insert(id) {
            return false;
        }
        if self.recent.len() >= Self::RECENT_MAX {
            self.merge_recent();
        }
        true
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.sorted.len() + self.recent.len()
    }

    fn merge_recent(&mut self) {
        let mut new: Vec<ContentId> = self.recent.drain().collect();
        new.sort_unstable();
        merge_sorted(&mut self.sorted, &new, |id| *id);
    }
}

/// Merges `new` into `sorted` (both sorted by `key`, no key in both) from
/// the array's end, in place: one pass over it and no second copy, where
/// appending and sorting again would sort the whole array at every merge.
fn merge_sorted<T: Copy, K: Ord>(sorted: &mut Vec<T>, new: &[T], key: impl Fn(&T) -> K) {
    let mut i = sorted.len();
    sorted.extend_from_slice(new);
    let mut k = sorted.len();
    let mut j = new.len();
    // Invariant: sorted[k..] is final; sorted[..i] and new[..j] remain.
    while j > 0 {
        k -= 1;
        if i > 0 && key(&sorted[i - 1]) > key(&new[j - 1]) {
            sorted[k] = sorted[i - 1];
            i -= 1;
        } else {
            sorted[k] = new[j - 1];
            j -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_packs_are_shared() {
        let mut m = MemIndex::default();
        let a = ContentId([1; 32]);
        let b = ContentId([2; 32]);
        let loc = |pack, offset| BlobLocationRef {
            pack,
            kind: BlobKind::Data,
            offset,
            length: 10,
            raw_length: 20,
        };
        assert!(m.insert(a, &loc("packs/aa/x", 5)));
        assert!(m.insert(b, &loc("packs/aa/x", 15)));
        assert!(m.insert(a, &loc("packs/bb/y", 0)), "first location wins");
        assert_eq!(m.packs.len(), 2);
        assert_eq!(m.get_all(&a).len(), 2, "the second copy is kept too");
        assert!(m.insert(a, &loc("packs/bb/y", 0)));
        assert_eq!(m.get_all(&a).len(), 2, "a pack is listed once per blob");
        assert!(m.contains_where(&a, |p| p == "packs/bb/y"));
        assert!(!m.contains_where(&b, |p| p == "packs/bb/y"));
        let got = m.get_all(&a).remove(0);
        assert_eq!(
            (got.pack.as_str(), got.offset, got.length, got.raw_length),
            ("packs/aa/x", 5, 10, 20)
        );
        assert!(m.disagrees(&a, "packs/aa/x", 6, 10));
        assert!(!m.disagrees(&a, "packs/aa/x", 5, 10));
        assert!(m.disagrees(&a, "packs/bb/y", 6, 10));
        assert!(!m.disagrees(&a, "packs/bb/y", 0, 10));
        assert!(!m.disagrees(&a, "packs/zz/none", 6, 10));
        let huge = BlobLocationRef {
            length: 1 << 40,
            ..loc("packs/cc/z", 0)
        };
        assert!(!m.insert(ContentId([3; 32]), &huge));
        assert!(!m.contains(&ContentId([3; 32])));
        assert_eq!(m.len(), 2);
        m.compact();
        assert_eq!((m.sorted.len(), m.recent.len()), (2, 0));
        assert!(m.insert(ContentId([0; 32]), &loc("packs/dd/w", 1)));
        assert!(m.contains(&ContentId([0; 32])) && m.contains(&a) && m.contains(&b));
        assert_eq!(m.get_all(&b)[0].offset, 15);
        m.compact();
        assert_eq!(m.len(), 3);
        assert_eq!(m.get_all(&ContentId([0; 32]))[0].pack, "packs/dd/w");
        assert_eq!(m.by_pack()["packs/aa/x"].len(), 2);
        assert_eq!(m.by_pack()["packs/bb/y"].len(), 1);
        assert!(std::mem::size_of::<(ContentId, Slot)>() <= 56);
    }

    #[test]
    fn an_id_set_keeps_every_id_once_across_merges() {
        let id = |n: u64| {
            let mut b = [0u8; 32];
            // Spread the ids so merges interleave old and new ones.
            b[..8].copy_from_slice(&n.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_be_bytes());
            b[24..].copy_from_slice(&n.to_le_bytes());
            ContentId(b)
        };
        let mut set = IdSet::default();
        let n = 3 * IdSet::RECENT_MAX as u64 + 123;
        for k in 0..n {
            assert!(set.insert(id(k)), "{k} is new");
        }
        for k in (0..n).step_by(7) {
            assert!(!set.insert(id(k)), "{k} is there already");
        }
        assert_eq!(set.len() as u64, n);
        assert!(set.sorted.len() >= 3 * IdSet::RECENT_MAX);
        assert!(set.sorted.windows(2).all(|w| w[0] < w[1]));
        for k in 0..n {
            assert!(set.contains(&id(k)));
        }
        assert!(!set.contains(&id(n)));
    }

    #[test]
    fn the_index_finds_every_blob_across_merges() {
        let id = |n: u64| {
            let mut b = [0u8; 32];
            b[..8].copy_from_slice(&n.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_be_bytes());
            b[24..].copy_from_slice(&n.to_le_bytes());
            ContentId(b)
        };
        let mut m = MemIndex::default();
        let n = 2 * MemIndex::RECENT_MAX as u64 + 77;
        for k in 0..n {
            let at = BlobLocationRef {
                pack: "packs/aa/x",
                kind: BlobKind::Data,
                offset: k,
                length: 1,
                raw_length: 1,
            };
            assert!(m.insert(id(k), &at));
        }
        m.compact();
        assert_eq!((m.sorted.len() as u64, m.recent.len()), (n, 0));
        assert!(m.sorted.windows(2).all(|w| w[0].0 < w[1].0));
        for k in 0..n {
            assert_eq!(m.get_all(&id(k))[0].offset, k, "blob {k}");
        }
    }
}
