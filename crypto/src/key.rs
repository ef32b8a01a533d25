//! The master key, its derived sub-keys, key ids and content ids.

use std::fmt;

use chacha20poly1305::{KeyInit, XChaCha20Poly1305};
use rand::rngs::OsRng;
use rand::RngCore;
use zeroize::Zeroizing;

const ENC_KEY_CONTEXT: &str = "btrship 2026-11 encryption key v1";
const ID_KEY_CONTEXT: &str = "btrship 2026-11 content id key v1";
const KEY_ID_CONTEXT: &str = "btrship 2026-11 key id v1";

/// 32-byte keyed content id (BLAKE3 keyed hash under the id sub-key).
///
/// The hex form ([`to_hex`](Self::to_hex), `Display`) is canonical lowercase;
/// `Debug` shows only the first 16 hex characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContentId(pub [u8; 32]);

impl ContentId {
    /// The id as 64 lowercase hex characters.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses exactly 64 lowercase hex characters (the form
    /// [`to_hex`](Self::to_hex) produces); anything else is `None`.
    pub fn from_hex(s: &str) -> Option<Self> {
        if !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return None;
        }
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(s, &mut bytes).ok()?;
        Some(ContentId(bytes))
    }

    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for ContentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ContentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ContentId({}…)", hex::encode(&self.0[..8]))
    }
}

/// Public 8-byte fingerprint of a master key (derived one-way; safe to show
/// and store in object headers). `Display` is 16 lowercase hex characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct KeyId(pub [u8; 8]);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

/// The repository master key and the sub-keys derived from it.
///
/// Secret material is wiped from memory when the key is dropped. `Debug`
/// prints only the public [`KeyId`]; there is deliberately no `Display` and
/// no `Clone` (share it with `Arc` instead of copying the secret around).
pub struct MasterKey {
    /// The 32-byte secret, as stored in the key file.
    pub(crate) secret: Zeroizing<[u8; 32]>,
    /// AEAD instance keyed with the enc sub-key (zeroizes its key on drop).
    pub(crate) cipher: XChaCha20Poly1305,
    /// Key for content ids.
    pub(crate) id_key: Zeroizing<[u8; 32]>,
    pub(crate) key_id: KeyId,
}

impl MasterKey {
    /// A new key from 32 random bytes from the operating system's CSPRNG.
    pub fn generate() -> Self {
        let mut secret = Zeroizing::new([0u8; 32]);
        OsRng.fill_bytes(secret.as_mut());
        Self::from_zeroizing(secret)
    }

    /// The key with the given secret (as read from a key file).
    pub fn from_secret(secret: [u8; 32]) -> Self {
        Self::from_zeroizing(Zeroizing::new(secret))
    }

    pub(crate) fn from_zeroizing(secret: Zeroizing<[u8; 32]>) -> Self {
        let enc_key = Zeroizing::new(blake3::derive_key(ENC_KEY_CONTEXT, secret.as_ref()));
        let id_key = Zeroizing::new(blake3::derive_key(ID_KEY_CONTEXT, secret.as_ref()));
        let key_id = derive_key_id(&secret);
        let cipher = XChaCha20Poly1305::new(enc_key.as_ref().into());
        MasterKey {
            secret,
            cipher,
            id_key,
            key_id,
        }
    }

    /// The public fingerprint of this key.
    pub fn key_id(&self) -> KeyId {
        self.key_id
    }

    /// Keyed content id of `data`: `blake3::keyed_hash(id_key, data)`.
    pub fn content_id(&self, data: &[u8]) -> ContentId {
        ContentId(*blake3::keyed_hash(&self.id_key, data).as_bytes())
    }

    /// 32 random bytes from the OS CSPRNG, for naming records (index,
    /// snapshot, version) so that independent writers never collide.
    pub fn random_id() -> ContentId {
        let mut id = [0u8; 32];
        OsRng.fill_bytes(&mut id);
        ContentId(id)
    }
}

/// First 8 bytes of `derive_key("btrship 2026-11 key id v1", secret)`.
pub(crate) fn derive_key_id(secret: &[u8; 32]) -> KeyId {
    let full = Zeroizing::new(blake3::derive_key(KEY_ID_CONTEXT, secret));
    let mut id = [0u8; 8];
    id.copy_from_slice(&full[..8]);
    KeyId(id)
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MasterKey")
            .field("key_id", &format_args!("{}", self.key_id))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_key_material() {
        let key = MasterKey::generate();
        let shown = format!("{key:?} {key:#?}");
        assert_eq!(
            format!("{key:?}"),
            format!("MasterKey {{ key_id: {} }}", key.key_id())
        );

        let secret_hex = hex::encode(*key.secret);
        let enc_hex = hex::encode(blake3::derive_key(ENC_KEY_CONTEXT, key.secret.as_ref()));
        let id_hex = hex::encode(*key.id_key);
        for material in [&secret_hex, &enc_hex, &id_hex] {
            // Not the whole thing, and not even an 8-byte window of it.
            for window in material.as_bytes().chunks(16) {
                let window = std::str::from_utf8(window).unwrap();
                assert!(!shown.contains(window), "{shown} leaks {window}");
            }
        }
    }

    #[test]
    fn sub_keys_follow_the_documented_derivation() {
        let secret = [7u8; 32];
        let key = MasterKey::from_secret(secret);
        assert_eq!(*key.id_key, blake3::derive_key(ID_KEY_CONTEXT, &secret));
        assert_eq!(
            key.key_id().0[..],
            blake3::derive_key(KEY_ID_CONTEXT, &secret)[..8]
        );
        assert_eq!(
            key.content_id(b"abc").0,
            *blake3::keyed_hash(&blake3::derive_key(ID_KEY_CONTEXT, &secret), b"abc").as_bytes()
        );
        // The three sub-keys are independent of each other and of the secret.
        assert_ne!(*key.id_key, secret);
        assert_ne!(*key.id_key, blake3::derive_key(ENC_KEY_CONTEXT, &secret));
    }
}
