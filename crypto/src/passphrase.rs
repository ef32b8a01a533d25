//! Wrapping the master secret with a passphrase (FORMAT.md §3a): a key
//! file protected at rest, and key slots in the repository that let
//! several passphrases open it.
//!
//! The wrapping key is Argon2id(passphrase, salt) — memory-hard, so every
//! guess costs `m_kib` KiB and `t` passes — and the secret is sealed with
//! XChaCha20-Poly1305 under it, bound to a context label and the key id.

use argon2::{Algorithm, Argon2, Params, Version};
use chacha20poly1305::aead::Aead;
use chacha20poly1305::{KeyInit, XChaCha20Poly1305, XNonce};
use rand::rngs::OsRng;
use rand::RngCore;
use zeroize::Zeroizing;

use crate::envelope::CryptoError;
use crate::key::{derive_key_id, RepoKey};

/// Argon2id cost parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KdfParams {
    /// Memory, KiB.
    pub m_kib: u32,
    /// Passes.
    pub t: u32,
    /// Lanes.
    pub p: u32,
}

impl Default for KdfParams {
    /// 64 MiB, 3 passes, 1 lane (about 0.2 s on the machines btrship
    /// targets; OWASP's second Argon2id recommendation, with more memory).
    fn default() -> Self {
        KdfParams {
            m_kib: 64 * 1024,
            t: 3,
            p: 1,
        }
    }
}

/// Largest memory cost accepted when reading (a hostile slot could ask
/// for more than the machine has): 4 GiB.
const MAX_M_KIB: u32 = 4 * 1024 * 1024;
const MAX_T: u32 = 64;

/// The master secret sealed under a passphrase.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wrapped {
    pub params: KdfParams,
    pub salt: [u8; 16],
    pub nonce: [u8; 24],
    /// The 32-byte secret encrypted, with its 16-byte tag.
    pub sealed: Vec<u8>,
}

fn wrapping_cipher(
    passphrase: &[u8],
    salt: &[u8; 16],
    params: KdfParams,
) -> Result<XChaCha20Poly1305, CryptoError> {
    if params.m_kib > MAX_M_KIB || params.t > MAX_T || params.p == 0 || params.p > 16 {
        return Err(CryptoError::Malformed { len: 0 });
    }
    let argon = Argon2::new(
        Algorithm::Argon2id,
        Version::V0x13,
        Params::new(params.m_kib, params.t, params.p, Some(32))
            .map_err(|_| CryptoError::Malformed { len: 0 })?,
    );
    let mut kek = Zeroizing::new([0u8; 32]);
    argon
        .hash_password_into(passphrase, salt, kek.as_mut())
        .map_err(|_| CryptoError::Malformed { len: 0 })?;
    Ok(XChaCha20Poly1305::new(kek.as_ref().into()))
}

/// `label || 0 || key id`: what the sealed secret is bound to.
fn aad(label: &[u8], key: &crate::KeyId) -> Vec<u8> {
    let mut a = label.to_vec();
    a.push(0);
    a.extend_from_slice(&key.0);
    a
}

impl RepoKey {
    /// Seals the master secret under `passphrase` for `label` (the key
    /// file, or a slot's name). Ship-only keys have no secret to wrap.
    pub fn wrap(
        &self,
        passphrase: &[u8],
        label: &[u8],
        params: KdfParams,
    ) -> Result<Wrapped, CryptoError> {
        let master = self.master.as_ref().ok_or(CryptoError::ShipOnly {
            what: "be protected with a passphrase (only the master key is)",
        })?;
        let mut salt = [0u8; 16];
        let mut nonce = [0u8; 24];
        OsRng.fill_bytes(&mut salt);
        OsRng.fill_bytes(&mut nonce);
        let cipher = wrapping_cipher(passphrase, &salt, params)?;
        let sealed = cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                chacha20poly1305::aead::Payload {
                    msg: master.secret.as_ref(),
                    aad: &aad(label, &self.key_id),
                },
            )
            .map_err(|_| CryptoError::Corrupt)?;
        Ok(Wrapped {
            params,
            salt,
            nonce,
            sealed,
        })
    }

    /// Opens a wrapped master secret with `passphrase`; the key id it was
    /// wrapped for must be the one the secret derives. A wrong passphrase
    /// (or a changed wrapping) is [`CryptoError::Corrupt`].
    pub fn unwrap(
        w: &Wrapped,
        passphrase: &[u8],
        label: &[u8],
        key_id: crate::KeyId,
    ) -> Result<RepoKey, CryptoError> {
        let cipher = wrapping_cipher(passphrase, &w.salt, w.params)?;
        let plain = Zeroizing::new(
            cipher
                .decrypt(
                    XNonce::from_slice(&w.nonce),
                    chacha20poly1305::aead::Payload {
                        msg: &w.sealed,
                        aad: &aad(label, &key_id),
                    },
                )
                .map_err(|_| CryptoError::Corrupt)?,
        );
        let mut secret = Zeroizing::new([0u8; 32]);
        if plain.len() != 32 {
            return Err(CryptoError::Corrupt);
        }
        secret.copy_from_slice(&plain);
        if derive_key_id(&secret) != key_id {
            return Err(CryptoError::Corrupt);
        }
        Ok(RepoKey::from_zeroizing(secret))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cheap() -> KdfParams {
        KdfParams {
            m_kib: 256,
            t: 1,
            p: 1,
        }
    }

    #[test]
    fn wraps_and_unwraps_only_with_the_passphrase_and_label() {
        let key = RepoKey::generate();
        let w = key.wrap(b"correct horse", b"slot-a", cheap()).unwrap();
        let back = RepoKey::unwrap(&w, b"correct horse", b"slot-a", key.key_id()).unwrap();
        assert_eq!(back.key_id(), key.key_id());
        assert_eq!(back.content_id(b"x"), key.content_id(b"x"));
        for (pass, label) in [
            (&b"wrong"[..], &b"slot-a"[..]),
            (b"correct horse", b"slot-b"),
        ] {
            assert!(matches!(
                RepoKey::unwrap(&w, pass, label, key.key_id()),
                Err(CryptoError::Corrupt)
            ));
        }
        let other = RepoKey::generate();
        assert!(RepoKey::unwrap(&w, b"correct horse", b"slot-a", other.key_id()).is_err());
        // Absurd costs from a hostile slot are refused before hashing.
        let mut greedy = w.clone();
        greedy.params.m_kib = u32::MAX;
        assert!(matches!(
            RepoKey::unwrap(&greedy, b"correct horse", b"slot-a", key.key_id()),
            Err(CryptoError::Malformed { .. })
        ));
        let ship = key.ship_only(b"p", 1).unwrap();
        assert!(ship.wrap(b"x", b"y", cheap()).unwrap_err().is_ship_only());
    }
}
