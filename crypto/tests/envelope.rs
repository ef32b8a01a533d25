//! Envelope behaviour through the public API: round trips, tamper detection,
//! binding of kind/id/key.

use btrship_crypto::{ContentId, CryptoError, ObjectKind, RepoKey, ENVELOPE_OVERHEAD};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

const SIZES: &[usize] = &[0, 1, 15, 16, 17, 4095, 4096, 65537, (1 << 20) + 3];

fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; len];
    StdRng::seed_from_u64(seed).fill_bytes(&mut data);
    data
}

fn repetitive_bytes(len: usize) -> Vec<u8> {
    b"btrship repetitive test data; "
        .iter()
        .copied()
        .cycle()
        .take(len)
        .collect()
}

#[test]
fn round_trip_random_data() {
    let key = RepoKey::generate();
    for &len in SIZES {
        let data = random_bytes(len, len as u64);
        let sealed = key.seal(ObjectKind::DataBlob, b"blob", &data);
        // Incompressible data is stored raw: exactly the fixed overhead.
        assert_eq!(sealed.len(), len + ENVELOPE_OVERHEAD, "len {len}");
        let opened = key.open(ObjectKind::DataBlob, b"blob", &sealed).unwrap();
        assert_eq!(opened, data, "len {len}");
    }
}

#[test]
fn round_trip_repetitive_data_and_compresses() {
    let key = RepoKey::generate();
    for &len in SIZES {
        let data = repetitive_bytes(len);
        let sealed = key.seal(ObjectKind::TreeBlob, b"tree", &data);
        assert!(sealed.len() <= len + ENVELOPE_OVERHEAD, "len {len}");
        if len >= 4095 {
            assert!(
                sealed.len() * 10 < len,
                "len {len} sealed to {}",
                sealed.len()
            );
        }
        let opened = key.open(ObjectKind::TreeBlob, b"tree", &sealed).unwrap();
        assert_eq!(opened, data, "len {len}");
    }
}

#[test]
fn sealing_twice_gives_different_bytes() {
    let key = RepoKey::generate();
    let a = key.seal(ObjectKind::Index, b"index/1", b"same");
    let b = key.seal(ObjectKind::Index, b"index/1", b"same");
    assert_ne!(a, b, "nonces must be fresh");
}

/// Every single-byte change, truncation and extension of `sealed` must fail.
fn assert_tamper_evident(key: &RepoKey, kind: ObjectKind, id: &[u8], sealed: &[u8]) {
    assert!(key.open(kind, id, sealed).is_ok());
    for i in 0..sealed.len() {
        for flip in [0x01, 0x80, 0xff] {
            let mut bad = sealed.to_vec();
            bad[i] ^= flip;
            assert!(
                key.open(kind, id, &bad).is_err(),
                "flip {flip:#x} at {i} of {} went undetected",
                sealed.len()
            );
        }
    }
    for len in 0..sealed.len() {
        assert!(
            key.open(kind, id, &sealed[..len]).is_err(),
            "truncation to {len} undetected"
        );
    }
    for extra in [0u8, 0xff] {
        let mut longer = sealed.to_vec();
        longer.push(extra);
        assert!(
            key.open(kind, id, &longer).is_err(),
            "appended byte undetected"
        );
    }
}

#[test]
fn any_modification_of_a_raw_object_fails() {
    let key = RepoKey::generate();
    let data = random_bytes(245, 1);
    let sealed = key.seal(ObjectKind::Snapshot, b"snapshots/ab", &data);
    assert_eq!(sealed.len(), 300);
    assert_tamper_evident(&key, ObjectKind::Snapshot, b"snapshots/ab", &sealed);
}

#[test]
fn any_modification_of_a_compressed_object_fails() {
    let key = RepoKey::generate();
    let data = repetitive_bytes(20_000);
    let sealed = key.seal(ObjectKind::DataBlob, b"id", &data);
    assert!(sealed.len() < 500, "expected a compressed body");
    assert_tamper_evident(&key, ObjectKind::DataBlob, b"id", &sealed);
}

#[test]
fn short_or_foreign_input_is_malformed() {
    let key = RepoKey::generate();
    for input in [&b""[..], b"BSHP", &[0u8; 100], &[0xffu8; 55]] {
        assert!(matches!(
            key.open(ObjectKind::Config, b"config", input),
            Err(CryptoError::Malformed { len }) if len == input.len()
        ));
    }
}

#[test]
fn future_version_asks_for_an_upgrade() {
    let key = RepoKey::generate();
    let mut sealed = key.seal(ObjectKind::Config, b"config", b"{}");
    sealed[4] = 4;
    let err = key
        .open(ObjectKind::Config, b"config", &sealed)
        .unwrap_err();
    assert!(matches!(err, CryptoError::UnsupportedVersion { found: 4 }));
    assert!(err.to_string().contains("upgrade btrship"));
}

#[test]
fn different_kind_is_a_kind_mismatch() {
    let key = RepoKey::generate();
    let sealed = key.seal(ObjectKind::DataBlob, b"id", b"payload");
    let err = key.open(ObjectKind::TreeBlob, b"id", &sealed).unwrap_err();
    match &err {
        CryptoError::KindMismatch { found, expected } => {
            assert_eq!(found, "data");
            assert_eq!(*expected, "tree");
        }
        other => panic!("expected KindMismatch, got {other:?}"),
    }
    assert_eq!(err.to_string(), "object is a data object, expected tree");
}

#[test]
fn relabelled_kind_byte_fails() {
    // Rewriting the kind byte to match what the reader expects is caught by
    // authentication.
    let key = RepoKey::generate();
    let mut sealed = key.seal(ObjectKind::DataBlob, b"id", b"payload");
    sealed[5] = ObjectKind::TreeBlob as u8;
    assert!(matches!(
        key.open(ObjectKind::TreeBlob, b"id", &sealed),
        Err(CryptoError::Corrupt)
    ));
    sealed[5] = 200;
    let err = key.open(ObjectKind::TreeBlob, b"id", &sealed).unwrap_err();
    assert!(matches!(&err, CryptoError::KindMismatch { found, .. } if found == "kind-200"));
}

#[test]
fn different_id_is_corrupt() {
    let key = RepoKey::generate();
    let sealed = key.seal(ObjectKind::Index, b"index/aa", b"payload");
    for other_id in [&b"index/ab"[..], b"index/a", b"index/aa\0", b""] {
        assert!(matches!(
            key.open(ObjectKind::Index, other_id, &sealed),
            Err(CryptoError::Corrupt)
        ));
    }
}

#[test]
fn wrong_key_is_reported_as_such() {
    let key = RepoKey::generate();
    let other = RepoKey::generate();
    let sealed = key.seal(ObjectKind::Config, b"config", b"payload");
    let err = other
        .open(ObjectKind::Config, b"config", &sealed)
        .unwrap_err();
    assert!(err.is_wrong_key());
    match err {
        CryptoError::WrongKey { found, expected } => {
            assert_eq!(found, key.key_id());
            assert_eq!(expected, other.key_id());
        }
        other => panic!("expected WrongKey, got {other:?}"),
    }
    assert!(!CryptoError::Corrupt.is_wrong_key());

    // A forged key id matching the reader still fails authentication.
    let mut forged = sealed.clone();
    forged[6..14].copy_from_slice(&other.key_id().0);
    assert!(matches!(
        other.open(ObjectKind::Config, b"config", &forged),
        Err(CryptoError::Corrupt)
    ));
}

#[test]
fn content_id_is_keyed_and_deterministic() {
    let a = RepoKey::from_secret([1; 32]);
    let a_again = RepoKey::from_secret([1; 32]);
    let b = RepoKey::from_secret([2; 32]);
    assert_eq!(a.content_id(b"chunk"), a_again.content_id(b"chunk"));
    assert_ne!(a.content_id(b"chunk"), a.content_id(b"chunk2"));
    assert_ne!(a.content_id(b"chunk"), b.content_id(b"chunk"));
    assert_ne!(
        a.content_id(b"chunk").0,
        *blake3::hash(b"chunk").as_bytes(),
        "content ids must not be plain hashes"
    );
    assert_eq!(a.key_id(), a_again.key_id());
    assert_ne!(a.key_id(), b.key_id());
}

#[test]
fn content_id_hex_round_trip() {
    let id = RepoKey::random_id();
    assert_ne!(id, RepoKey::random_id());
    let hex = id.to_hex();
    assert_eq!(hex.len(), 64);
    assert_eq!(id.to_string(), hex);
    assert_eq!(ContentId::from_hex(&hex), Some(id));
    assert_eq!(id.as_bytes(), &id.0);
    assert!(format!("{id:?}").contains(&hex[..16]));

    assert_eq!(ContentId::from_hex(&hex.to_uppercase()), None);
    assert_eq!(ContentId::from_hex(&hex[..63]), None);
    assert_eq!(ContentId::from_hex(&format!("{hex}0")), None);
    assert_eq!(ContentId::from_hex(""), None);
    assert_eq!(ContentId::from_hex(&"g".repeat(64)), None);
}

#[test]
fn key_id_displays_as_hex() {
    let key = RepoKey::from_secret([9; 32]);
    let shown = key.key_id().to_string();
    assert_eq!(shown.len(), 16);
    assert_eq!(shown, hex::encode(key.key_id().0));
}

#[test]
fn object_kind_bytes_and_names() {
    let all = [
        (1, ObjectKind::Config, "config"),
        (2, ObjectKind::KeyCheck, "key"),
        (3, ObjectKind::PackHeader, "pack-header"),
        (4, ObjectKind::Index, "index"),
        (5, ObjectKind::Snapshot, "snapshot"),
        (6, ObjectKind::Version, "version"),
        (7, ObjectKind::DataBlob, "data"),
        (8, ObjectKind::TreeBlob, "tree"),
        (9, ObjectKind::ChainRegistration, "chain"),
        (10, ObjectKind::Summary, "summary"),
        (11, ObjectKind::Forget, "forget"),
        (12, ObjectKind::Garbage, "garbage"),
    ];
    for (byte, kind, name) in all {
        assert_eq!(kind as u8, byte);
        assert_eq!(ObjectKind::from_u8(byte), Some(kind));
        assert_eq!(kind.name(), name);
    }
    assert_eq!(ObjectKind::from_u8(0), None);
    assert_eq!(ObjectKind::from_u8(13), None);
}

#[test]
fn open_never_panics_on_garbage() {
    let key = RepoKey::from_secret([5; 32]);
    let mut rng = StdRng::seed_from_u64(42);
    let template = key.seal(ObjectKind::DataBlob, b"id", b"hello");
    for round in 0..2000 {
        let len = (rng.next_u32() % 200) as usize;
        let mut input = random_bytes(len, round);
        // Often keep a valid prefix so deeper checks are reached.
        let keep = (rng.next_u32() as usize % (template.len() + 1)).min(len);
        input[..keep].copy_from_slice(&template[..keep]);
        let _ = key.open(ObjectKind::DataBlob, b"id", &input);
    }
}
