//! Repository keys: the master key, the ship-only key derived from it, their
//! sub-keys, key ids and content ids.
//!
//! A [`RepoKey`] is either the **master key** (can seal and open everything)
//! or a **ship-only key** (FORMAT.md §12): it computes content ids and object
//! names and seals new objects to the master's X25519 public key under a
//! session key it forgets within the hour, so it can add history but never
//! open any of it, its own earlier shipments included. It can open only the
//! objects the master signs for it (garbage records).

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chacha20poly1305::{KeyInit, XChaCha20Poly1305};
use ed25519_dalek::{SigningKey, VerifyingKey};
use rand::rngs::OsRng;
use rand::RngCore;
use x25519_dalek::{EphemeralSecret, PublicKey, StaticSecret};
use zeroize::Zeroizing;

const ENC_KEY_CONTEXT: &str = "btrship 2026-11 encryption key v1";
const ID_KEY_CONTEXT: &str = "btrship 2026-11 content id key v1";
const KEY_ID_CONTEXT: &str = "btrship 2026-11 key id v1";
const X25519_CONTEXT: &str = "btrship 2026-12 x25519 secret v1";
const SHIP_SECRET_CONTEXT: &str = "btrship 2026-12 ship secret v1";
const GENERATION_CONTEXT: &str = "btrship 2026-12 ship generation secret v1";
const SIGNING_CONTEXT: &str = "btrship 2026-12 signing key v1";
const SHARED_KEY_CONTEXT: &str = "btrship 2026-12 shared key v1";
const SESSION_KEY_CONTEXT: &str = "btrship 2026-12 session key v1";

/// How long a ship-only key seals with one session key before it draws a
/// new ephemeral key pair and forgets the old session (FORMAT.md §12).
pub const SESSION_LIFETIME: Duration = Duration::from_secs(3600);

/// Session ciphers a master key keeps derived (one X25519 each); past this
/// the cache starts again. A restore meets one session per ship hour.
const SESSION_CACHE: usize = 4096;

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

/// What only the master key holds.
pub(crate) struct MasterPart {
    /// The 32-byte secret, as stored in the key file.
    pub(crate) secret: Zeroizing<[u8; 32]>,
    /// AEAD keyed with the enc sub-key (envelope version 1).
    pub(crate) cipher: XChaCha20Poly1305,
    /// X25519 secret that opens what ship-only keys seal (version 2).
    pub(crate) x_secret: StaticSecret,
    /// Ed25519 key that signs what ship-only keys may read (version 3).
    pub(crate) signing: SigningKey,
    /// Session ciphers already derived, by generation and ephemeral
    /// public key.
    pub(crate) sessions: Mutex<HashMap<(u32, [u8; 32]), XChaCha20Poly1305>>,
}

/// A ship-only key's current session: the ephemeral public key written into
/// every envelope it seals and the cipher derived for it. The ephemeral
/// secret itself is dropped as soon as the cipher is derived.
pub(crate) struct Session {
    pub(crate) eph_public: [u8; 32],
    pub(crate) cipher: XChaCha20Poly1305,
    pub(crate) started: Instant,
}

/// A repository key: the master key, or a ship-only key derived from it.
///
/// Secret material is wiped from memory when the key is dropped. `Debug`
/// prints only the public [`KeyId`] and the kind; there is deliberately no
/// `Display` and no `Clone` (share it with `Arc`).
pub struct RepoKey {
    pub(crate) key_id: KeyId,
    /// Key for content ids and keyed object names.
    pub(crate) id_key: Zeroizing<[u8; 32]>,
    /// Keys the AEAD of version-3 objects; every ship-only key has it.
    pub(crate) shared_key: Zeroizing<[u8; 32]>,
    /// Ship-only keys: the secret of their generation, mixed into every
    /// session key, so only the master and that generation's ship-only
    /// keys can make objects the master accepts. (Master: unused.)
    pub(crate) gen_secret: Zeroizing<[u8; 32]>,
    /// Ship-only keys: their generation (written into every envelope).
    pub(crate) generation: u32,
    /// The master's X25519 public key, to which sessions are sealed.
    pub(crate) master_public: PublicKey,
    /// The master's Ed25519 public key, which signs version-3 objects.
    pub(crate) verifying: VerifyingKey,
    /// AEAD for version-3 objects.
    pub(crate) shared: XChaCha20Poly1305,
    /// `Some` for the master key.
    pub(crate) master: Option<MasterPart>,
    /// Ship-only keys: the session in use (rotated after
    /// [`SESSION_LIFETIME`]).
    pub(crate) session: Mutex<Option<Session>>,
    /// Ship-only keys: the repository parameters the key file carries (the
    /// `config` body, which a ship-only key cannot open in the store).
    pub(crate) params: Vec<u8>,
}

impl RepoKey {
    /// A new master key from 32 random bytes from the OS CSPRNG.
    pub fn generate() -> Self {
        let mut secret = Zeroizing::new([0u8; 32]);
        OsRng.fill_bytes(secret.as_mut());
        Self::from_zeroizing(secret)
    }

    /// The master key with the given secret (as read from a key file).
    pub fn from_secret(secret: [u8; 32]) -> Self {
        Self::from_zeroizing(Zeroizing::new(secret))
    }

    pub(crate) fn from_zeroizing(secret: Zeroizing<[u8; 32]>) -> Self {
        let derive = |context| Zeroizing::new(blake3::derive_key(context, secret.as_ref()));
        let enc_key = derive(ENC_KEY_CONTEXT);
        let id_key = derive(ID_KEY_CONTEXT);
        let ship_secret = derive(SHIP_SECRET_CONTEXT);
        let shared_key =
            Zeroizing::new(blake3::derive_key(SHARED_KEY_CONTEXT, ship_secret.as_ref()));
        let x_secret = StaticSecret::from(*derive(X25519_CONTEXT));
        let signing = SigningKey::from_bytes(&derive(SIGNING_CONTEXT));
        let master_public = PublicKey::from(&x_secret);
        let verifying = signing.verifying_key();
        let key_id = derive_key_id(&secret);
        let master = MasterPart {
            cipher: XChaCha20Poly1305::new(enc_key.as_ref().into()),
            secret,
            x_secret,
            signing,
            sessions: Mutex::new(HashMap::new()),
        };
        Self::assemble(Parts {
            key_id,
            id_key,
            shared_key,
            gen_secret: Zeroizing::new([0; 32]),
            generation: 0,
            master_public,
            verifying,
            master: Some(master),
            params: Vec::new(),
        })
    }

    pub(crate) fn assemble(p: Parts) -> Self {
        RepoKey {
            key_id: p.key_id,
            id_key: p.id_key,
            shared: XChaCha20Poly1305::new(p.shared_key.as_ref().into()),
            shared_key: p.shared_key,
            gen_secret: p.gen_secret,
            generation: p.generation,
            master_public: p.master_public,
            verifying: p.verifying,
            master: p.master,
            session: Mutex::new(None),
            params: p.params,
        }
    }

    /// The ship-only key of generation `generation` of this master key,
    /// carrying `params` (the repository's `config` body) for the machine
    /// that will use it. None when this key is itself ship-only.
    /// Generations differ only in the secret their sessions mix in: a new
    /// one replaces a leaked one without re-uploading anything.
    pub fn ship_only(&self, params: &[u8], generation: u32) -> Option<RepoKey> {
        let master = self.master.as_ref()?;
        Some(Self::assemble(Parts {
            key_id: self.key_id,
            id_key: self.id_key.clone(),
            shared_key: self.shared_key.clone(),
            gen_secret: generation_secret(&master.secret, generation),
            generation,
            master_public: self.master_public,
            verifying: self.verifying,
            master: None,
            params: params.to_vec(),
        }))
    }

    /// A ship-only key's generation (None for the master key).
    pub fn generation(&self) -> Option<u32> {
        (!self.is_master()).then_some(self.generation)
    }

    /// True for the master key; false for a ship-only key.
    pub fn is_master(&self) -> bool {
        self.master.is_some()
    }

    /// A ship-only key's repository parameters (the `config` body); None
    /// for the master key (it reads `config` from the store).
    pub fn ship_params(&self) -> Option<&[u8]> {
        (!self.is_master()).then_some(self.params.as_slice())
    }

    /// The public fingerprint of the master key (a ship-only key carries
    /// its master's: every object names the key that can open it).
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

    /// The session key for ephemeral public key `eph` (FORMAT.md §12):
    /// `derive_key(SESSION_KEY_CONTEXT, generation secret || X25519 shared
    /// secret || eph || master public)`. None when the shared secret is not
    /// contributory (a low-order `eph`, which only a forger would write).
    pub(crate) fn session_cipher(
        &self,
        gen_secret: &[u8; 32],
        shared_secret: &x25519_dalek::SharedSecret,
        eph: &[u8; 32],
    ) -> Option<XChaCha20Poly1305> {
        if !shared_secret.was_contributory() {
            return None;
        }
        let mut input = Zeroizing::new(Vec::with_capacity(128));
        input.extend_from_slice(gen_secret);
        input.extend_from_slice(shared_secret.as_bytes());
        input.extend_from_slice(eph);
        input.extend_from_slice(self.master_public.as_bytes());
        let key = Zeroizing::new(blake3::derive_key(SESSION_KEY_CONTEXT, &input));
        Some(XChaCha20Poly1305::new(key.as_ref().into()))
    }

    /// A ship-only key's session, started or rotated as needed; calls `f`
    /// with its ephemeral public key and cipher.
    pub(crate) fn with_session<T>(&self, f: impl FnOnce(&[u8; 32], &XChaCha20Poly1305) -> T) -> T {
        let mut slot = self.session.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = slot
            .as_ref()
            .is_some_and(|s| s.started.elapsed() < SESSION_LIFETIME);
        if !fresh {
            // The previous session's cipher is dropped (and wiped) here.
            *slot = None;
            loop {
                let eph_secret = EphemeralSecret::random_from_rng(OsRng);
                let eph_public = PublicKey::from(&eph_secret).to_bytes();
                let shared = eph_secret.diffie_hellman(&self.master_public);
                if let Some(cipher) = self.session_cipher(&self.gen_secret, &shared, &eph_public) {
                    *slot = Some(Session {
                        eph_public,
                        cipher,
                        started: Instant::now(),
                    });
                    break;
                }
            }
        }
        let Some(s) = slot.as_ref() else {
            unreachable!("a session was just started")
        };
        f(&s.eph_public, &s.cipher)
    }

    /// Ends a ship-only key's current session now: what it sealed can no
    /// longer be opened by anything on this machine. The next seal starts a
    /// new one. A no-op for the master key.
    pub fn end_session(&self) {
        *self.session.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Master only: the session cipher of generation `generation` for
    /// ephemeral key `eph`, cached.
    pub(crate) fn master_session(
        &self,
        generation: u32,
        eph: &[u8; 32],
    ) -> Option<XChaCha20Poly1305> {
        let master = self.master.as_ref()?;
        let mut cache = master.sessions.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = cache.get(&(generation, *eph)) {
            return Some(c.clone());
        }
        let shared = master.x_secret.diffie_hellman(&PublicKey::from(*eph));
        let gen_secret = generation_secret(&master.secret, generation);
        let cipher = self.session_cipher(&gen_secret, &shared, eph)?;
        if cache.len() >= SESSION_CACHE {
            cache.clear();
        }
        cache.insert((generation, *eph), cipher.clone());
        Some(cipher)
    }
}

/// What [`RepoKey::assemble`] puts together.
pub(crate) struct Parts {
    pub(crate) key_id: KeyId,
    pub(crate) id_key: Zeroizing<[u8; 32]>,
    pub(crate) shared_key: Zeroizing<[u8; 32]>,
    pub(crate) gen_secret: Zeroizing<[u8; 32]>,
    pub(crate) generation: u32,
    pub(crate) master_public: PublicKey,
    pub(crate) verifying: VerifyingKey,
    pub(crate) master: Option<MasterPart>,
    pub(crate) params: Vec<u8>,
}

/// The secret of ship-only key generation `g`: `derive_key(
/// GENERATION_CONTEXT, ship secret || u32 LE g)`, the ship secret being
/// `derive_key(SHIP_SECRET_CONTEXT, master secret)`.
fn generation_secret(secret: &[u8; 32], g: u32) -> Zeroizing<[u8; 32]> {
    let ship_secret = Zeroizing::new(blake3::derive_key(SHIP_SECRET_CONTEXT, secret));
    let mut input = Zeroizing::new([0u8; 36]);
    input[..32].copy_from_slice(ship_secret.as_ref());
    input[32..].copy_from_slice(&g.to_le_bytes());
    Zeroizing::new(blake3::derive_key(GENERATION_CONTEXT, input.as_ref()))
}

/// First 8 bytes of `derive_key("btrship 2026-11 key id v1", secret)`.
pub(crate) fn derive_key_id(secret: &[u8; 32]) -> KeyId {
    let full = Zeroizing::new(blake3::derive_key(KEY_ID_CONTEXT, secret));
    let mut id = [0u8; 8];
    id.copy_from_slice(&full[..8]);
    KeyId(id)
}

impl fmt::Debug for RepoKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct(if self.is_master() {
            "RepoKey"
        } else {
            "ShipOnlyKey"
        })
        .field("key_id", &format_args!("{}", self.key_id))
        .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret_of(key: &RepoKey) -> [u8; 32] {
        *key.master.as_ref().unwrap().secret
    }

    #[test]
    fn debug_never_shows_key_material() {
        let key = RepoKey::generate();
        let secret = secret_of(&key);
        let shown = format!("{key:?} {key:#?}");
        assert_eq!(
            format!("{key:?}"),
            format!("RepoKey {{ key_id: {} }}", key.key_id())
        );

        let secret_hex = hex::encode(secret);
        let enc_hex = hex::encode(blake3::derive_key(ENC_KEY_CONTEXT, &secret));
        let id_hex = hex::encode(*key.id_key);
        let ship_hex = hex::encode(*key.shared_key);
        for material in [&secret_hex, &enc_hex, &id_hex, &ship_hex] {
            // Not the whole thing, and not even an 8-byte window of it.
            for window in material.as_bytes().chunks(16) {
                let window = std::str::from_utf8(window).unwrap();
                assert!(!shown.contains(window), "{shown} leaks {window}");
            }
        }
        let ship = key.ship_only(b"p", 1).unwrap();
        assert_eq!(
            format!("{ship:?}"),
            format!("ShipOnlyKey {{ key_id: {} }}", key.key_id())
        );
    }

    #[test]
    fn sub_keys_follow_the_documented_derivation() {
        let secret = [7u8; 32];
        let key = RepoKey::from_secret(secret);
        assert_eq!(*key.id_key, blake3::derive_key(ID_KEY_CONTEXT, &secret));
        assert_eq!(
            key.key_id().0[..],
            blake3::derive_key(KEY_ID_CONTEXT, &secret)[..8]
        );
        assert_eq!(
            key.content_id(b"abc").0,
            *blake3::keyed_hash(&blake3::derive_key(ID_KEY_CONTEXT, &secret), b"abc").as_bytes()
        );
        let ship_secret = blake3::derive_key(SHIP_SECRET_CONTEXT, &secret);
        assert_eq!(
            *key.shared_key,
            blake3::derive_key(SHARED_KEY_CONTEXT, &ship_secret)
        );
        let mut gen_input = ship_secret.to_vec();
        gen_input.extend_from_slice(&3u32.to_le_bytes());
        assert_eq!(
            *key.ship_only(b"p", 3).unwrap().gen_secret,
            blake3::derive_key(GENERATION_CONTEXT, &gen_input)
        );
        let x = StaticSecret::from(blake3::derive_key(X25519_CONTEXT, &secret));
        assert_eq!(key.master_public.as_bytes(), PublicKey::from(&x).as_bytes());
        // The sub-keys are independent of each other and of the secret.
        assert_ne!(*key.id_key, secret);
        assert_ne!(*key.id_key, blake3::derive_key(ENC_KEY_CONTEXT, &secret));
        assert_ne!(*key.shared_key, *key.id_key);
        assert_ne!(
            *key.ship_only(b"p", 1).unwrap().gen_secret,
            *key.ship_only(b"p", 2).unwrap().gen_secret
        );
    }

    #[test]
    fn a_ship_only_key_names_and_ids_as_its_master() {
        let master = RepoKey::generate();
        let ship = master.ship_only(b"params", 1).unwrap();
        assert!(!ship.is_master());
        assert_eq!(ship.generation(), Some(1));
        assert_eq!(master.generation(), None);
        assert!(ship.ship_only(b"x", 1).is_none());
        assert_eq!(ship.key_id(), master.key_id());
        assert_eq!(ship.content_id(b"abc"), master.content_id(b"abc"));
        assert_eq!(ship.ship_params(), Some(&b"params"[..]));
        assert_eq!(master.ship_params(), None);
    }
}
