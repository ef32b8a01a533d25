//! The sealed-object envelope: compress, then encrypt and authenticate.

use std::fmt;
use std::io::Read;

use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{Tag, XChaCha20Poly1305, XNonce};
use rand::rngs::OsRng;
use rand::RngCore;

use crate::key::{KeyId, RepoKey};

/// Envelope version written by the master key (symmetric, §4); the newest
/// the config's `version` names. [`ENVELOPE_SHIP`] and [`ENVELOPE_SIGNED`]
/// are the other two this crate reads.
pub const FORMAT_VERSION: u8 = 1;
/// Envelope version written by ship-only keys: sealed to the master's
/// X25519 public key under a session key (FORMAT.md §12).
pub const ENVELOPE_SHIP: u8 = 2;
/// Envelope version the master writes for what ship-only keys must read:
/// encrypted under the shared key and signed with Ed25519 (FORMAT.md §12).
pub const ENVELOPE_SIGNED: u8 = 3;

const MAGIC: &[u8; 4] = b"BSHP";
/// magic + version + kind + key id + nonce.
const HEADER_LEN: usize = 4 + 1 + 1 + 8 + 24;
/// The part of the header that goes into the associated data.
const AAD_HEADER_LEN: usize = 4 + 1 + 1 + 8;
#[cfg(test)]
const NONCE_OFFSET: usize = AAD_HEADER_LEN;
/// Version 2: magic + version + kind + key id + generation (u32 LE) +
/// ephemeral public key + nonce.
const SHIP_AAD_HEADER_LEN: usize = AAD_HEADER_LEN + 4 + 32;
const EPH_OFFSET: usize = AAD_HEADER_LEN + 4;
const SHIP_HEADER_LEN: usize = SHIP_AAD_HEADER_LEN + 24;
const TAG_LEN: usize = 16;
const SIGNATURE_LEN: usize = 64;
/// Prefix of the message a version-3 signature covers.
const SIGNED_CONTEXT: &[u8] = b"btrship signed object v3\0";

const CODEC_RAW: u8 = 0;
const CODEC_ZSTD: u8 = 1;
const ZSTD_LEVEL: i32 = 3;

/// Bytes a sealed object adds to its plaintext when stored uncompressed
/// (header + tag + codec byte) under the master key (version 1). It is also
/// the smallest valid sealed object; versions 2 and 3 add 32 and 64 bytes.
pub const ENVELOPE_OVERHEAD: usize = HEADER_LEN + TAG_LEN + 1;

/// Largest body [`RepoKey::open`] will decompress (256 MiB). Larger
/// plaintexts are still sealed fine: [`RepoKey::seal`] stores them raw, so
/// everything it seals can be opened again.
pub const MAX_DECOMPRESSED_LEN: usize = 256 << 20;

/// What a sealed object is. The kind is authenticated, so an object cannot
/// be passed off as another kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ObjectKind {
    Config = 1,
    KeyCheck = 2,
    PackHeader = 3,
    Index = 4,
    Snapshot = 5,
    Version = 6,
    DataBlob = 7,
    TreeBlob = 8,
    ChainRegistration = 9,
    Summary = 10,
    Forget = 11,
    Garbage = 12,
}

impl ObjectKind {
    /// The kind with this envelope byte, if any.
    pub fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => Self::Config,
            2 => Self::KeyCheck,
            3 => Self::PackHeader,
            4 => Self::Index,
            5 => Self::Snapshot,
            6 => Self::Version,
            7 => Self::DataBlob,
            8 => Self::TreeBlob,
            9 => Self::ChainRegistration,
            10 => Self::Summary,
            11 => Self::Forget,
            12 => Self::Garbage,
            _ => return None,
        })
    }

    /// Short name for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Config => "config",
            Self::KeyCheck => "key",
            Self::PackHeader => "pack-header",
            Self::Index => "index",
            Self::Snapshot => "snapshot",
            Self::Version => "version",
            Self::DataBlob => "data",
            Self::TreeBlob => "tree",
            Self::ChainRegistration => "chain",
            Self::Summary => "summary",
            Self::Forget => "forget",
            Self::Garbage => "garbage",
        }
    }
}

impl fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a sealed object could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("not a btrship object (bad magic or too short: {len} bytes)")]
    Malformed { len: usize },
    #[error("object format version {found} is not supported (this btrship reads versions 1 to 3); upgrade btrship")]
    UnsupportedVersion { found: u8 },
    /// `found` is the kind's name, or `kind-N` for an unknown kind byte N.
    #[error("object is a {found} object, expected {expected}")]
    KindMismatch {
        found: String,
        expected: &'static str,
    },
    #[error("object was sealed with key {found}, but the key in use is {expected}: wrong key file for this repository")]
    WrongKey { found: KeyId, expected: KeyId },
    #[error("authentication failed: the object was modified, truncated or swapped")]
    Corrupt,
    #[error("decompression failed after authentication: {0}")]
    Decompress(String),
    /// A ship-only key met an object only the master key opens, or was
    /// asked to sign.
    #[error("this is a ship-only key: it adds history to the repository but cannot {what}; use the master key")]
    ShipOnly { what: &'static str },
}

impl CryptoError {
    /// True if the object was sealed under a different master key.
    pub fn is_wrong_key(&self) -> bool {
        matches!(self, CryptoError::WrongKey { .. })
    }

    /// True if a ship-only key was asked for what only the master key does.
    pub fn is_ship_only(&self) -> bool {
        matches!(self, CryptoError::ShipOnly { .. })
    }
}

impl RepoKey {
    /// Seals `plaintext` as an object of `kind` named `id`.
    ///
    /// The body is zstd-compressed (level 3) if that makes it smaller, then
    /// encrypted with a fresh random nonce: by the master key under its enc
    /// key (envelope version 1), by a ship-only key under its current
    /// session key (version 2, FORMAT.md §12). `id` (the object's name, or a
    /// blob's content id) and the header are bound as associated data, so
    /// the result only opens under the same `kind` and `id`.
    ///
    /// # Panics
    ///
    /// Only if `plaintext` exceeds XChaCha20-Poly1305's message limit of
    /// 256 GiB, which no caller can hold in memory in practice.
    pub fn seal(&self, kind: ObjectKind, id: &[u8], plaintext: &[u8]) -> Vec<u8> {
        match &self.master {
            Some(m) => seal_with(
                &m.cipher,
                &self.header(FORMAT_VERSION, kind),
                AAD_HEADER_LEN,
                id,
                plaintext,
            ),
            None => self.with_session(|eph, cipher| {
                let mut header = self.header(ENVELOPE_SHIP, kind);
                header.extend_from_slice(&self.generation.to_le_bytes());
                header.extend_from_slice(eph);
                seal_with(cipher, &header, SHIP_AAD_HEADER_LEN, id, plaintext)
            }),
        }
    }

    /// Master only: seals `plaintext` so that its ship-only keys can open
    /// it too, and only the master can have made it (envelope version 3:
    /// the shared key encrypts, the master's Ed25519 key signs).
    pub fn seal_signed(
        &self,
        kind: ObjectKind,
        id: &[u8],
        plaintext: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        let master = self.master.as_ref().ok_or(CryptoError::ShipOnly {
            what: "sign the records prune writes",
        })?;
        let header = self.header(ENVELOPE_SIGNED, kind);
        let mut out = seal_with(&self.shared, &header, AAD_HEADER_LEN, id, plaintext);
        let signature = ed25519_dalek::Signer::sign(&master.signing, &signed_message(&out, id));
        out.extend_from_slice(&signature.to_bytes());
        Ok(out)
    }

    fn header(&self, version: u8, kind: ObjectKind) -> Vec<u8> {
        let mut header = Vec::with_capacity(SHIP_HEADER_LEN);
        header.extend_from_slice(MAGIC);
        header.push(version);
        header.push(kind as u8);
        header.extend_from_slice(&self.key_id.0);
        header
    }

    /// Opens an object sealed by [`seal`](Self::seal) or
    /// [`seal_signed`](Self::seal_signed) with the same `kind` and `id`,
    /// returning the original plaintext.
    ///
    /// Checks run in the order documented at the crate root, so a wrong key
    /// ([`CryptoError::WrongKey`]) and a wrong kind
    /// ([`CryptoError::KindMismatch`]) are told apart from tampering
    /// ([`CryptoError::Corrupt`]). A ship-only key opens only version 3
    /// and says [`CryptoError::ShipOnly`] for the others. Never panics,
    /// whatever `sealed` contains.
    pub fn open(&self, kind: ObjectKind, id: &[u8], sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let malformed = CryptoError::Malformed { len: sealed.len() };
        if sealed.len() < ENVELOPE_OVERHEAD || &sealed[0..4] != MAGIC {
            return Err(malformed);
        }
        // Indexing below is within the length checked above.
        let version = sealed[4];
        if !matches!(version, FORMAT_VERSION | ENVELOPE_SHIP | ENVELOPE_SIGNED) {
            return Err(CryptoError::UnsupportedVersion { found: version });
        }
        let mut found_key = [0u8; 8];
        found_key.copy_from_slice(&sealed[6..14]);
        if found_key != self.key_id.0 {
            return Err(CryptoError::WrongKey {
                found: KeyId(found_key),
                expected: self.key_id,
            });
        }
        let found_kind = sealed[5];
        if found_kind != kind as u8 {
            return Err(CryptoError::KindMismatch {
                found: ObjectKind::from_u8(found_kind)
                    .map_or_else(|| format!("kind-{found_kind}"), |k| k.name().to_owned()),
                expected: kind.name(),
            });
        }
        let ship_only = CryptoError::ShipOnly {
            what: "read what is in it",
        };
        match version {
            FORMAT_VERSION => {
                let master = self.master.as_ref().ok_or(ship_only)?;
                open_with(&master.cipher, sealed, AAD_HEADER_LEN, id)
            }
            ENVELOPE_SHIP => {
                if self.master.is_none() {
                    return Err(ship_only);
                }
                if sealed.len() < SHIP_HEADER_LEN + TAG_LEN + 1 {
                    return Err(malformed);
                }
                let mut generation = [0u8; 4];
                generation.copy_from_slice(&sealed[AAD_HEADER_LEN..EPH_OFFSET]);
                let mut eph = [0u8; 32];
                eph.copy_from_slice(&sealed[EPH_OFFSET..SHIP_AAD_HEADER_LEN]);
                let cipher = self
                    .master_session(u32::from_le_bytes(generation), &eph)
                    .ok_or(CryptoError::Corrupt)?;
                open_with(&cipher, sealed, SHIP_AAD_HEADER_LEN, id)
            }
            _ => {
                if sealed.len() < ENVELOPE_OVERHEAD + SIGNATURE_LEN {
                    return Err(malformed);
                }
                let (body, sig) = sealed.split_at(sealed.len() - SIGNATURE_LEN);
                let mut sig_bytes = [0u8; SIGNATURE_LEN];
                sig_bytes.copy_from_slice(sig);
                let signature = ed25519_dalek::Signature::from_bytes(&sig_bytes);
                self.verifying
                    .verify_strict(&signed_message(body, id), &signature)
                    .map_err(|_| CryptoError::Corrupt)?;
                open_with(&self.shared, body, AAD_HEADER_LEN, id)
            }
        }
    }
}

/// The header (everything before the nonce in `header`'s first
/// `aad_len` bytes), a fresh nonce, the codec byte and body, encrypted, and
/// the tag.
fn seal_with(
    cipher: &XChaCha20Poly1305,
    header: &[u8],
    aad_len: usize,
    id: &[u8],
    plaintext: &[u8],
) -> Vec<u8> {
    debug_assert_eq!(header.len(), aad_len);
    let mut nonce = [0u8; 24];
    OsRng.fill_bytes(&mut nonce);

    let mut out = compress(plaintext, |frame| {
        let body = frame.unwrap_or(plaintext);
        let mut out = Vec::with_capacity(aad_len + 24 + 1 + body.len() + TAG_LEN + SIGNATURE_LEN);
        out.extend_from_slice(header);
        out.extend_from_slice(&nonce);
        out.push(if frame.is_some() {
            CODEC_ZSTD
        } else {
            CODEC_RAW
        });
        out.extend_from_slice(body);
        out
    });

    let (head, payload) = out.split_at_mut(aad_len + 24);
    let aad = associated_data(&head[..aad_len], id);
    let tag = cipher
        .encrypt_in_place_detached(XNonce::from_slice(&nonce), &aad, payload)
        .expect("XChaCha20-Poly1305 encrypts messages up to 256 GiB");
    out.extend_from_slice(&tag);
    out
}

/// Decrypts and decompresses `sealed` (header of `aad_len` bytes, nonce,
/// ciphertext, tag), already checked for magic, version, key and kind.
fn open_with(
    cipher: &XChaCha20Poly1305,
    sealed: &[u8],
    aad_len: usize,
    id: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    let header_len = aad_len + 24;
    if sealed.len() < header_len + TAG_LEN + 1 {
        return Err(CryptoError::Malformed { len: sealed.len() });
    }
    let (header, rest) = sealed.split_at(header_len);
    let (ciphertext, tag) = rest.split_at(rest.len() - TAG_LEN);
    let aad = associated_data(&header[..aad_len], id);
    let mut plain = ciphertext.to_vec();
    cipher
        .decrypt_in_place_detached(
            XNonce::from_slice(&header[aad_len..header_len]),
            &aad,
            &mut plain,
            Tag::from_slice(tag),
        )
        .map_err(|_| CryptoError::Corrupt)?;

    // `plain` holds at least the codec byte: the length check counts it.
    match plain.first().copied() {
        Some(CODEC_RAW) => {
            plain.remove(0);
            Ok(plain)
        }
        Some(CODEC_ZSTD) => decompress(&plain[1..], MAX_DECOMPRESSED_LEN),
        Some(codec) => Err(CryptoError::Decompress(format!("unknown codec {codec}"))),
        None => Err(CryptoError::Corrupt),
    }
}

/// What a version-3 signature covers: a context string, the id (length
/// first) and every byte of the object before the signature.
fn signed_message(sealed: &[u8], id: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(SIGNED_CONTEXT.len() + 4 + id.len() + sealed.len());
    msg.extend_from_slice(SIGNED_CONTEXT);
    msg.extend_from_slice(&u32::try_from(id.len()).unwrap_or(u32::MAX).to_le_bytes());
    msg.extend_from_slice(id);
    msg.extend_from_slice(sealed);
    msg
}

/// `header[0..14] || u32 LE id length || id`.
///
/// An id of 4 GiB or more saturates the length field; the encoding stays
/// unambiguous because the id is the whole remainder of the data.
fn associated_data(header: &[u8], id: &[u8]) -> Vec<u8> {
    let id_len = u32::try_from(id.len()).unwrap_or(u32::MAX);
    let mut aad = Vec::with_capacity(header.len() + 4 + id.len());
    aad.extend_from_slice(header);
    aad.extend_from_slice(&id_len.to_le_bytes());
    aad.extend_from_slice(id);
    aad
}

/// The zstd frame for `data`, if compression makes it smaller and the result
/// can be opened again (not larger than [`MAX_DECOMPRESSED_LEN`]), passed to
/// `use_frame`. Each thread keeps one compression context and one output
/// buffer: a context costs more to set up than a small blob to compress.
fn compress<T>(data: &[u8], use_frame: impl FnOnce(Option<&[u8]>) -> T) -> T {
    thread_local! {
        static CCTX: std::cell::RefCell<Option<(zstd::bulk::Compressor<'static>, Vec<u8>)>> =
            const { std::cell::RefCell::new(None) };
    }
    if data.is_empty() || data.len() > MAX_DECOMPRESSED_LEN {
        return use_frame(None);
    }
    CCTX.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            // An error here (allocation failure inside zstd) just means
            // "store raw".
            *slot = zstd::bulk::Compressor::new(ZSTD_LEVEL)
                .ok()
                .map(|c| (c, Vec::new()));
        }
        let Some((cctx, buf)) = slot.as_mut() else {
            return use_frame(None);
        };
        if data.len() >= SAMPLED_FROM && !samples_compress(cctx, buf, data) {
            return use_frame(None);
        }
        buf.clear();
        // Only a frame smaller than the data is kept: no room for more.
        buf.reserve(data.len());
        match cctx.compress_to_buffer(data, buf) {
            Ok(n) if n < data.len() => use_frame(Some(&buf[..n])),
            _ => use_frame(None),
        }
    })
}

/// Blobs at least this big are sampled before they are compressed whole.
const SAMPLED_FROM: usize = 128 << 10;
/// Each sample, and how many, spread evenly over the blob.
const SAMPLE_LEN: usize = 8 << 10;
const SAMPLES: usize = 4;

/// Do evenly spread samples of `data` shrink by at least 2% under zstd?
/// Random and already-compressed data (media, archives, encrypted files)
/// does not, and is then stored raw for an eighth of the cost of trying
/// the whole blob (most of a level-3 pass goes to searching for matches
/// that are not there). A blob compressible only between the samples is
/// stored raw: a few percent of size, for a cheaper first ship.
fn samples_compress(
    cctx: &mut zstd::bulk::Compressor<'static>,
    buf: &mut Vec<u8>,
    data: &[u8],
) -> bool {
    let step = (data.len() - SAMPLE_LEN) / (SAMPLES - 1);
    let (mut raw, mut packed) = (0, 0);
    for i in 0..SAMPLES {
        let sample = &data[i * step..i * step + SAMPLE_LEN];
        buf.clear();
        buf.reserve(sample.len());
        raw += sample.len();
        packed += match cctx.compress_to_buffer(sample, buf) {
            Ok(n) => n.min(sample.len()),
            Err(_) => sample.len(),
        };
    }
    packed * 100 <= raw * 98
}

/// Decompresses one authenticated zstd body, refusing to produce more than
/// `limit` bytes.
fn decompress(frame: &[u8], limit: usize) -> Result<Vec<u8>, CryptoError> {
    let err = |e: std::io::Error| CryptoError::Decompress(e.to_string());
    // Reserve the declared size up front when it is declared and sane.
    let declared = zstd::zstd_safe::get_frame_content_size(frame)
        .ok()
        .flatten()
        .and_then(|n| usize::try_from(n).ok())
        .filter(|&n| n <= limit)
        .unwrap_or(0);
    let mut out = Vec::with_capacity(declared);
    let take = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    // One decompression context per thread, reused: creating one costs
    // more than decompressing a small blob (a restore of many small files
    // spent a tenth of its CPU in ZSTD_createDCtx). `with_context` resets
    // the context's session first, so nothing of an earlier frame (also
    // one that failed half way) carries over.
    thread_local! {
        static DCTX: std::cell::RefCell<Option<zstd::zstd_safe::DCtx<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    DCTX.with(|cell| -> Result<(), CryptoError> {
        let mut slot = cell
            .try_borrow_mut()
            .map_err(|_| CryptoError::Decompress("decompression context already in use".into()))?;
        if slot.is_none() {
            *slot =
                Some(zstd::zstd_safe::DCtx::try_create().ok_or_else(|| {
                    CryptoError::Decompress("cannot allocate a zstd context".into())
                })?);
        }
        let Some(ctx) = slot.as_mut() else {
            unreachable!("set above")
        };
        zstd::stream::read::Decoder::with_context(frame, ctx)
            .take(take)
            .read_to_end(&mut out)
            .map_err(err)?;
        Ok(())
    })?;
    if out.len() > limit {
        return Err(CryptoError::Decompress(format!(
            "output exceeds the limit of {limit} bytes"
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overhead_matches_layout() {
        assert_eq!(HEADER_LEN, 38);
        assert_eq!(ENVELOPE_OVERHEAD, 55);
        let key = RepoKey::from_secret([1; 32]);
        let sealed = key.seal(ObjectKind::Index, b"x", b"");
        assert_eq!(sealed.len(), ENVELOPE_OVERHEAD);
    }

    #[test]
    fn a_ship_only_key_seals_for_the_master_and_opens_nothing() {
        let master = RepoKey::from_secret([4; 32]);
        let ship = master.ship_only(b"p", 1).unwrap();
        let sealed = ship.seal(ObjectKind::Snapshot, b"snapshots/a", b"record");
        assert_eq!(sealed[4], ENVELOPE_SHIP);
        assert_eq!(sealed.len(), ENVELOPE_OVERHEAD + 36 + b"record".len());
        assert_eq!(
            master
                .open(ObjectKind::Snapshot, b"snapshots/a", &sealed)
                .unwrap(),
            b"record"
        );
        // Bound to its name and kind like any envelope.
        assert!(matches!(
            master.open(ObjectKind::Snapshot, b"snapshots/b", &sealed),
            Err(CryptoError::Corrupt)
        ));
        // The ship-only key cannot open its own object, nor the master's.
        for sealed in [
            sealed,
            master.seal(ObjectKind::Snapshot, b"snapshots/a", b"x"),
        ] {
            let err = ship
                .open(ObjectKind::Snapshot, b"snapshots/a", &sealed)
                .unwrap_err();
            assert!(err.is_ship_only(), "{err}");
        }
        // Another repository's master cannot open it.
        let other = RepoKey::from_secret([5; 32]);
        let sealed = ship.seal(ObjectKind::Index, b"i", b"x");
        assert!(other
            .open(ObjectKind::Index, b"i", &sealed)
            .unwrap_err()
            .is_wrong_key());
    }

    #[test]
    fn one_session_per_hour_and_ended_sessions_are_new() {
        let master = RepoKey::from_secret([6; 32]);
        let ship = master.ship_only(b"p", 1).unwrap();
        let eph = |s: &[u8]| s[EPH_OFFSET..SHIP_AAD_HEADER_LEN].to_vec();
        let a = ship.seal(ObjectKind::DataBlob, b"1", b"a");
        let b = ship.seal(ObjectKind::DataBlob, b"2", b"b");
        assert_eq!(eph(&a), eph(&b));
        ship.end_session();
        let c = ship.seal(ObjectKind::DataBlob, b"3", b"c");
        assert_ne!(eph(&a), eph(&c));
        // An old session's start time past the lifetime rotates too.
        if let Some(s) = ship.session.lock().unwrap().as_mut() {
            s.started -= crate::SESSION_LIFETIME;
        }
        let d = ship.seal(ObjectKind::DataBlob, b"4", b"d");
        assert_ne!(eph(&c), eph(&d));
        for (id, sealed, plain) in [(b"1", a, b"a"), (b"3", c, b"c"), (b"4", d, b"d")] {
            assert_eq!(
                master.open(ObjectKind::DataBlob, id, &sealed).unwrap(),
                plain
            );
        }
    }

    #[test]
    fn a_forged_session_key_does_not_open() {
        // Anyone can make an X25519 key pair; without the ship secret the
        // session key differs, and a low-order point is refused outright.
        let master = RepoKey::from_secret([7; 32]);
        let ship = master.ship_only(b"p", 1).unwrap();
        let mut sealed = ship.seal(ObjectKind::Index, b"i", b"x");
        sealed[EPH_OFFSET..SHIP_AAD_HEADER_LEN].copy_from_slice(&[0u8; 32]);
        assert!(matches!(
            master.open(ObjectKind::Index, b"i", &sealed),
            Err(CryptoError::Corrupt)
        ));
    }

    #[test]
    fn generations_are_bound_to_their_secret() {
        let master = RepoKey::from_secret([9; 32]);
        let g1 = master.ship_only(b"p", 1).unwrap();
        let g2 = master.ship_only(b"p", 2).unwrap();
        let a = g1.seal(ObjectKind::Index, b"i", b"one");
        let b = g2.seal(ObjectKind::Index, b"i", b"two");
        assert_eq!(&a[AAD_HEADER_LEN..EPH_OFFSET], &1u32.to_le_bytes());
        assert_eq!(master.open(ObjectKind::Index, b"i", &a).unwrap(), b"one");
        assert_eq!(master.open(ObjectKind::Index, b"i", &b).unwrap(), b"two");
        // Relabelling an object as another generation's fails.
        let mut relabelled = a.clone();
        relabelled[AAD_HEADER_LEN..EPH_OFFSET].copy_from_slice(&2u32.to_le_bytes());
        assert!(matches!(
            master.open(ObjectKind::Index, b"i", &relabelled),
            Err(CryptoError::Corrupt)
        ));
    }

    #[test]
    fn signed_objects_open_for_both_and_only_the_master_signs() {
        let master = RepoKey::from_secret([8; 32]);
        let ship = master.ship_only(b"p", 1).unwrap();
        let sealed = master
            .seal_signed(ObjectKind::Garbage, b"gc/1", b"marks")
            .unwrap();
        assert_eq!(sealed[4], ENVELOPE_SIGNED);
        assert_eq!(
            ship.open(ObjectKind::Garbage, b"gc/1", &sealed).unwrap(),
            b"marks"
        );
        assert_eq!(
            master.open(ObjectKind::Garbage, b"gc/1", &sealed).unwrap(),
            b"marks"
        );
        assert!(ship
            .seal_signed(ObjectKind::Garbage, b"gc/1", b"x")
            .unwrap_err()
            .is_ship_only());
        // A ship-only key can encrypt under the shared key but not sign: an
        // object it makes with a wrong signature is refused.
        let mut forged = sealed.clone();
        let n = forged.len();
        forged[n - 1] ^= 1;
        assert!(matches!(
            ship.open(ObjectKind::Garbage, b"gc/1", &forged),
            Err(CryptoError::Corrupt)
        ));
        assert!(matches!(
            ship.open(ObjectKind::Garbage, b"gc/2", &sealed),
            Err(CryptoError::Corrupt)
        ));
    }

    #[test]
    fn decompression_is_capped() {
        let frame = zstd::bulk::compress(&[0u8; 1001], 3).unwrap();
        assert_eq!(decompress(&frame, 1001).unwrap(), vec![0u8; 1001]);
        assert!(matches!(
            decompress(&frame, 1000),
            Err(CryptoError::Decompress(_))
        ));
        // Without a declared content size, too.
        let mut streamed = Vec::new();
        let mut enc = zstd::stream::write::Encoder::new(&mut streamed, 3).unwrap();
        std::io::Write::write_all(&mut enc, &[0u8; 100_000]).unwrap();
        enc.finish().unwrap();
        assert_eq!(decompress(&streamed, 100_000).unwrap().len(), 100_000);
        assert!(matches!(
            decompress(&streamed, 99_999),
            Err(CryptoError::Decompress(_))
        ));
    }

    #[test]
    fn big_random_blobs_skip_compression_and_text_does_not() {
        let mut random = vec![0u8; 1 << 20];
        OsRng.fill_bytes(&mut random);
        assert!(compress(&random, |f| f.is_none()));
        let text: Vec<u8> = b"invoice budget quarter report "
            .iter()
            .cycle()
            .take(1 << 20)
            .copied()
            .collect();
        assert!(compress(&text, |f| f.is_some_and(|f| f.len() < text.len() / 10)));
        // Half text, half random, interleaved: the samples see both.
        let mixed: Vec<u8> = text
            .chunks(4096)
            .zip(random.chunks(4096))
            .flat_map(|(t, r)| t.iter().chain(r).copied())
            .collect();
        assert!(compress(&mixed, |f| f.is_some_and(|f| f.len() < mixed.len() * 3 / 4)));
        // Zeros but for random bytes exactly where the samples fall: the
        // samples say "incompressible" and the blob is stored raw (the
        // trade-off the sampling makes) ...
        let fooled = |len: usize| {
            let mut data = vec![0u8; len];
            let step = (len - SAMPLE_LEN) / (SAMPLES - 1);
            for i in 0..SAMPLES {
                data[i * step..i * step + SAMPLE_LEN]
                    .copy_from_slice(&random[i * SAMPLE_LEN..(i + 1) * SAMPLE_LEN]);
            }
            data
        };
        assert!(compress(&fooled(2 * SAMPLED_FROM), |f| f.is_none()));
        // ... but below the sampling size every blob is tried whole.
        let small = fooled(SAMPLED_FROM - 1);
        assert!(compress(&small, |f| f.is_some_and(|f| f.len() < small.len() / 2)));
        // Sealed either way, opened the same.
        let key = RepoKey::from_secret([6; 32]);
        for data in [&random[..], &text[..], &mixed[..]] {
            let sealed = key.seal(ObjectKind::DataBlob, b"id", data);
            assert_eq!(
                key.open(ObjectKind::DataBlob, b"id", &sealed).unwrap(),
                data
            );
        }
    }

    #[test]
    fn seal_stores_oversized_bodies_raw() {
        assert!(compress(&[0u8; 4096], |f| f.map(<[u8]>::to_vec)).is_some());
        assert!(compress(&vec![0u8; MAX_DECOMPRESSED_LEN + 1], |f| f
            .map(<[u8]>::to_vec))
        .is_none());
    }

    #[test]
    fn garbage_zstd_body_is_a_decompress_error() {
        assert!(matches!(
            decompress(b"not zstd", MAX_DECOMPRESSED_LEN),
            Err(CryptoError::Decompress(_))
        ));
        let frame = zstd::bulk::compress(&[5u8; 5000], 3).unwrap();
        let truncated = &frame[..frame.len() - 3];
        assert!(matches!(
            decompress(truncated, MAX_DECOMPRESSED_LEN),
            Err(CryptoError::Decompress(_))
        ));
    }

    #[test]
    fn codec_bytes_are_as_documented() {
        let key = RepoKey::from_secret([2; 32]);
        for (data, codec) in [
            (vec![9u8; 4096], CODEC_ZSTD),
            (b"short".to_vec(), CODEC_RAW),
        ] {
            let sealed = key.seal(ObjectKind::DataBlob, b"id", &data);
            let (header, rest) = sealed.split_at(HEADER_LEN);
            let (ct, tag) = rest.split_at(rest.len() - TAG_LEN);
            let mut plain = ct.to_vec();
            key.master
                .as_ref()
                .unwrap()
                .cipher
                .decrypt_in_place_detached(
                    XNonce::from_slice(&header[NONCE_OFFSET..]),
                    &associated_data(&header[..AAD_HEADER_LEN], b"id"),
                    &mut plain,
                    Tag::from_slice(tag),
                )
                .unwrap();
            assert_eq!(plain[0], codec);
        }
    }

    #[test]
    fn unknown_codec_is_reported() {
        let key = RepoKey::from_secret([3; 32]);
        let mut sealed = key.seal(ObjectKind::Config, b"config", b"hello");
        // Re-encrypt the same header with a bogus codec byte.
        let (header, _) = sealed.split_at(HEADER_LEN);
        let mut payload = b"\x07hello".to_vec();
        let tag = key
            .master
            .as_ref()
            .unwrap()
            .cipher
            .encrypt_in_place_detached(
                XNonce::from_slice(&header[NONCE_OFFSET..]),
                &associated_data(&header[..AAD_HEADER_LEN], b"config"),
                &mut payload,
            )
            .unwrap();
        sealed.truncate(HEADER_LEN);
        sealed.extend_from_slice(&payload);
        sealed.extend_from_slice(&tag);
        let err = key
            .open(ObjectKind::Config, b"config", &sealed)
            .unwrap_err();
        assert!(
            matches!(&err, CryptoError::Decompress(m) if m == "unknown codec 7"),
            "{err}"
        );
    }
}
