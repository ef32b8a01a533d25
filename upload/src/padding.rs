//! Size classes (FORMAT.md §6a): every pack and every sealed index,
//! snapshot record and version batch is padded so that the store sees its
//! size only as one of a few coarse classes.
//!
//! Classes: below 64 KiB the next power of two, at least 4 KiB (4, 8, 16,
//! 32, 64 KiB); from 64 KiB on the Padmé rule (PURBs, Nikitin et al. 2019):
//! with `E = floor(log2 L)` and `S = floor(log2 E) + 1`, the low `E - S` bits
//! of the size are rounded up to zero, so at most `S` significant bits
//! remain and the overhead is below `2^-S` (≤ 3.2 % for L ≥ 64 KiB,
//! falling as `S` grows; far below the 12 % bound of the paper, whose
//! worst case is at small sizes, which here get powers of two instead).
//!
//! Sealed CBOR objects are padded *inside* the encrypted body with a map
//! key `"pad"` holding random bytes, before compression and sealing:
//! random bytes do not compress, so the padding survives zstd, and readers
//! of version 1 ignore unknown keys, so older btrship still reads padded
//! objects. Since compression makes the sealed size only roughly
//! predictable, the pad length is adjusted until the sealed object lands
//! exactly on its class (a few seals; if it cannot, the next class).

use crate::format::to_cbor;
use btrship_crypto::{ObjectKind, RepoKey};
use rand::RngCore;
use serde::Serialize;

/// Smallest padded size of any object.
pub const MIN_CLASS: u64 = 4096;
/// Below this, classes are powers of two; from it on, Padmé.
pub const POW2_LIMIT: u64 = 64 * 1024;

/// The size class of an object of `len` bytes: the size it is padded to.
pub fn size_class(len: u64) -> u64 {
    if len <= MIN_CLASS {
        return MIN_CLASS;
    }
    if len < POW2_LIMIT {
        return len.next_power_of_two();
    }
    padme(len)
}

/// Padmé: keep the top `floor(log2 E) + 1` bits of `len`, `E = floor(log2 len)`.
fn padme(len: u64) -> u64 {
    let e = 63 - u64::from(len.leading_zeros());
    let s = 64 - u64::from(e.leading_zeros());
    let low = e.saturating_sub(s);
    let mask = (1u64 << low) - 1;
    len.saturating_add(mask) & !mask
}

/// Random padding bytes (the store must not see a recognisable run).
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::rngs::OsRng.fill_bytes(&mut v);
    v
}

/// `plain` (a CBOR map) with one more entry: a text key (`"pad"`, or
/// `"pad"` followed by `extra` `x`s) holding the byte string `pad`. Works
/// on the encoded bytes (the map's head is rewritten with one entry more,
/// the entry appended), so a large index is never decoded into a generic
/// value tree. Anything but a map is returned as it is.
fn with_pad(plain: &[u8], extra: usize, pad: &[u8]) -> Vec<u8> {
    let Some((entries, head_len)) = map_head(plain) else {
        return plain.to_vec();
    };
    let mut out = Vec::with_capacity(plain.len() + pad.len() + extra + 16);
    let entry = |out: &mut Vec<u8>| {
        cbor_head(3, 3 + extra as u64, out);
        out.extend_from_slice(b"pad");
        out.resize(out.len() + extra, b'x');
        cbor_head(2, pad.len() as u64, out);
        out.extend_from_slice(pad);
    };
    match entries {
        Some(n) => {
            cbor_head(5, n + 1, &mut out);
            out.extend_from_slice(&plain[head_len..]);
            entry(&mut out);
        }
        // Indefinite length: the entry goes before the closing break.
        None => {
            out.extend_from_slice(&plain[..plain.len() - 1]);
            entry(&mut out);
            out.push(0xff);
        }
    }
    out
}

/// The number of entries of the CBOR map `b` starts with (`None` for an
/// indefinite-length map that ends in its break byte) and its head's
/// length; `None` if `b` does not start with a map.
fn map_head(b: &[u8]) -> Option<(Option<u64>, usize)> {
    let first = *b.first()?;
    if first >> 5 != 5 {
        return None;
    }
    let arg = |n: usize| -> Option<u64> {
        let bytes = b.get(1..1 + n)?;
        Some(bytes.iter().fold(0u64, |acc, &x| acc << 8 | u64::from(x)))
    };
    match first & 0x1f {
        n @ 0..=23 => Some((Some(u64::from(n)), 1)),
        24 => Some((Some(arg(1)?), 2)),
        25 => Some((Some(arg(2)?), 3)),
        26 => Some((Some(arg(4)?), 5)),
        27 => Some((Some(arg(8)?), 9)),
        31 if b.last() == Some(&0xff) && b.len() >= 2 => Some((None, 1)),
        _ => None,
    }
}

/// Appends the shortest CBOR head of major type `major` with argument `n`.
fn cbor_head(major: u8, n: u64, out: &mut Vec<u8>) {
    let m = major << 5;
    match n {
        0..=23 => out.push(m | n as u8),
        24..=0xff => out.extend_from_slice(&[m | 24, n as u8]),
        0x100..=0xffff => {
            out.push(m | 25);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        0x1_0000..=0xffff_ffff => {
            out.push(m | 26);
            out.extend_from_slice(&(n as u32).to_be_bytes());
        }
        _ => {
            out.push(m | 27);
            out.extend_from_slice(&n.to_be_bytes());
        }
    }
}

/// Seals `body` (a CBOR map) padded to a size class.
///
/// The pad length is adjusted until the sealed size is the class. Where a
/// CBOR length prefix grows (pad lengths 24, 256, 65536) the size jumps by
/// two, so one pad length cannot hit the class; a key one to three bytes
/// longer (`"padx"`…, also ignored by readers) shifts it back on target.
pub fn seal_padded<T: Serialize>(key: &RepoKey, kind: ObjectKind, id: &[u8], body: &T) -> Vec<u8> {
    let plain = to_cbor(body);
    let unpadded = key.seal(kind, id, &with_pad(&plain, 0, &[]));
    let mut target = size_class(unpadded.len() as u64);
    let mut pool = Vec::new();
    let mut best = unpadded.clone();
    for _class in 0..3 {
        for extra in 0..4 {
            let mut pad = target.saturating_sub(unpadded.len() as u64) as usize;
            let mut seen = std::collections::HashSet::new();
            while seen.insert(pad) && seen.len() < 16 {
                if pool.len() < pad {
                    pool = random_bytes(pad + 4096);
                }
                let sealed = key.seal(kind, id, &with_pad(&plain, extra, &pool[..pad]));
                let got = sealed.len() as u64;
                if got == target {
                    return sealed;
                }
                if got < target {
                    pad += (target - got) as usize;
                    if got > best.len() as u64 {
                        best = sealed;
                    }
                } else {
                    let over = (got - target) as usize;
                    if over > pad {
                        break;
                    }
                    pad -= over;
                }
            }
        }
        target = size_class(target + 1);
    }
    // Not reached in practice; an object just under its class is still a
    // correct object.
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{from_cbor, Index};

    #[test]
    fn every_size_maps_to_its_class() {
        assert_eq!(size_class(0), 4096);
        assert_eq!(size_class(1), 4096);
        assert_eq!(size_class(4096), 4096);
        assert_eq!(size_class(4097), 8192);
        assert_eq!(size_class(40_000), 65536);
        assert_eq!(size_class(65536), 65536);
        let mut classes = std::collections::BTreeSet::new();
        let mut prev = 0;
        let mut len = 0u64;
        while len < 1 << 34 {
            let c = size_class(len);
            assert!(c >= len, "{len} -> {c}");
            assert!(c >= prev, "classes are monotone at {len}");
            assert_eq!(size_class(c), c, "a class is its own class ({c})");
            if len >= POW2_LIMIT {
                assert!(
                    (c - len) as f64 <= 0.12 * len as f64,
                    "{len} -> {c}: more than 12 %"
                );
            } else {
                assert!(c.is_power_of_two());
            }
            classes.insert(c);
            prev = c;
            len = len * 21 / 20 + 1;
        }
        // Coarse: 16 MiB packs fall into a handful of classes.
        let near_16m: std::collections::BTreeSet<u64> = (15u64 << 20..17u64 << 20)
            .step_by(4096)
            .map(size_class)
            .collect();
        assert!(near_16m.len() <= 20, "{near_16m:?}");
    }

    #[test]
    fn padded_objects_land_on_their_class_and_read_back() {
        let key = RepoKey::generate();
        for n in (0usize..40).chain([100, 1000, 5000]) {
            let mut index = Index::default();
            for i in 0..n {
                index.packs.push(crate::format::IndexPack {
                    pack: format!("packs/{i:02x}/{}", "ab".repeat(32)),
                    blobs: Vec::new(),
                });
            }
            let sealed = seal_padded(&key, ObjectKind::Index, b"index/x", &index);
            let len = sealed.len() as u64;
            assert_eq!(
                len,
                size_class(len),
                "{n} packs: {len} bytes is not a class"
            );
            let body = key.open(ObjectKind::Index, b"index/x", &sealed).unwrap();
            let back: Index = from_cbor(&body).unwrap();
            assert_eq!(back, index, "old readers ignore the pad key");
            // Tampering with the sealed bytes (the pad included) fails.
            let mut bad = sealed.clone();
            let at = bad.len() / 2;
            bad[at] ^= 1;
            assert!(key.open(ObjectKind::Index, b"index/x", &bad).is_err());
        }
    }

    /// The pad entry is added on the encoded bytes: the result decodes to
    /// the same map with one entry more, at every size of the map's head
    /// (and of the pad's), for indefinite-length maps too; anything else
    /// is left as it is.
    #[test]
    fn the_pad_entry_is_added_to_the_encoded_map() {
        use ciborium::Value;
        for n in [0usize, 1, 22, 23, 24, 255, 256, 65_535, 65_536] {
            let map: std::collections::BTreeMap<String, u8> =
                (0..n).map(|i| (format!("k{i}"), (i % 251) as u8)).collect();
            let plain = to_cbor(&map);
            for (extra, pad_len) in [(0, 0), (1, 23), (2, 24), (3, 300), (0, 70_000)] {
                let pad = random_bytes(pad_len);
                let out = with_pad(&plain, extra, &pad);
                let Value::Map(entries) = ciborium::from_reader(out.as_slice()).unwrap() else {
                    panic!("not a map");
                };
                assert_eq!(entries.len(), n + 1, "{n} entries");
                let key = format!("pad{}", "x".repeat(extra));
                assert_eq!(
                    entries.last().unwrap(),
                    &(Value::Text(key), Value::Bytes(pad.clone()))
                );
                let back: std::collections::BTreeMap<String, Value> =
                    ciborium::from_reader(out.as_slice()).unwrap();
                assert_eq!(back.len(), n + 1);
                for (k, v) in &map {
                    assert_eq!(back[k], Value::Integer((*v).into()));
                }
            }
        }
        // An indefinite-length map: {"a": 1} then the break.
        let indefinite = [0xbf, 0x61, b'a', 0x01, 0xff];
        let out = with_pad(&indefinite, 0, b"zz");
        let Value::Map(entries) = ciborium::from_reader(out.as_slice()).unwrap() else {
            panic!("not a map");
        };
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[1].1, Value::Bytes(b"zz".to_vec()));
        // Not a map: unchanged.
        let list = to_cbor(&vec![1u8, 2, 3]);
        assert_eq!(with_pad(&list, 0, b"zz"), list);
        assert_eq!(with_pad(&[], 0, b"zz"), Vec::<u8>::new());
        assert_eq!(with_pad(&[0xb9, 0x01], 0, b"zz"), vec![0xb9, 0x01]);
    }
}
