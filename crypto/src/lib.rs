//! Cryptography for btrship repositories: keys, keyed content ids and the
//! sealed-object envelope (zstd compression + XChaCha20-Poly1305).
//!
//! This crate is bytes in, bytes out. The only I/O it does is reading and
//! writing key files ([`read_key_file`], [`write_key_file`]).
//!
//! # Keys
//!
//! A repository has one 32-byte random secret, the [`RepoKey`]. Everything
//! else is derived from it with BLAKE3 `derive_key(context, secret)`:
//!
//! | sub-key | context string                      | use                              |
//! | ------- | ----------------------------------- | -------------------------------- |
//! | enc key | `btrship 2026-11 encryption key v1` | XChaCha20-Poly1305 key           |
//! | id key  | `btrship 2026-11 content id key v1` | keyed BLAKE3 for [`ContentId`]s  |
//! | key id  | `btrship 2026-11 key id v1`         | first 8 bytes: public [`KeyId`]  |
//!
//! A content id is `blake3::keyed_hash(id_key, data)`.
//!
//! # Envelope (every sealed object and blob)
//!
//! All integers little-endian.
//!
//! ```text
//! offset 0  magic   4 bytes  "BSHP"
//!        4  version u8       = 1 (FORMAT_VERSION)
//!        5  kind    u8       ObjectKind
//!        6  key_id  8 bytes
//!       14  nonce   24 bytes random (XChaCha20-Poly1305)
//!       38  ciphertext || 16-byte Poly1305 tag
//! ```
//!
//! Associated data is `header[0..14] || u32(id.len()) || id`, where `id` is
//! the object's name or the blob's content id, so a sealed object moved to
//! another name, or re-labelled as another kind, fails to open.
//!
//! The encrypted plaintext is `codec u8 || body`: codec 0 = stored raw,
//! codec 1 = one zstd frame (level 3). Compression is used only when it makes
//! the body smaller. After authentication, decompression output is capped at
//! [`MAX_DECOMPRESSED_LEN`] (256 MiB) so hostile data cannot exhaust memory.
//!
//! [`RepoKey::open`] checks, in order: length ≥ [`ENVELOPE_OVERHEAD`] and
//! magic ([`CryptoError::Malformed`]), version
//! ([`CryptoError::UnsupportedVersion`]), key id ([`CryptoError::WrongKey`]),
//! kind ([`CryptoError::KindMismatch`]), authentication
//! ([`CryptoError::Corrupt`]), then codec and decompression
//! ([`CryptoError::Decompress`]).
//!
//! # Ship-only keys and the other envelope versions
//!
//! [`RepoKey::ship_only`] derives a key that computes content ids and
//! names like the master but seals with envelope version 2: each session
//! (at most [`SESSION_LIFETIME`]) draws an ephemeral X25519 key pair,
//! derives the session key from the shared secret with the master's
//! public key and the key's generation secret, and forgets the ephemeral
//! secret, so it cannot open anything, its own earlier objects included.
//! The master opens version 2 with its X25519 secret. Version 3 is what
//! the master signs (Ed25519) for ship-only keys to read: garbage
//! records. Passphrases wrap the master secret with Argon2id
//! ([`RepoKey::wrap`]). docs/FORMAT.md §3, §3a, §4 and §12 are the
//! normative description.
//!
//! # Key file
//!
//! ```text
//! # btrship key: keep it secret; keep a copy off this machine. Without it nothing can be restored.
//! btrship-key-v1 <64 lowercase hex chars of the secret> <16 hex chars of the key id>
//! ```
//!
//! Blank lines and lines starting with `#` are ignored. The key id field must
//! match the key id derived from the secret (this catches typing errors).
//! The file must not be accessible by group or others (mode 0600).

mod envelope;
mod key;
mod keyfile;
mod passphrase;

pub use envelope::{
    CryptoError, ObjectKind, ENVELOPE_OVERHEAD, ENVELOPE_SHIP, ENVELOPE_SIGNED, FORMAT_VERSION,
    MAX_DECOMPRESSED_LEN,
};
pub use key::{ContentId, KeyId, RepoKey, SESSION_LIFETIME};
pub use keyfile::{
    read_key_file, read_key_file_with, replace_key_file, write_key_file, KeyFileError,
};
pub use passphrase::{KdfParams, Wrapped};
