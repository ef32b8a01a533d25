//! The on-disk (in-store) types of repository format version 1, all in one
//! place. `docs/FORMAT.md` is the specification; every type here names the
//! section it implements. Bodies are CBOR (RFC 8949) via `ciborium`.

use btrship_crypto::ContentId;
use serde::{Deserialize, Serialize};

/// Blob id as stored: 32 bytes, serialized as a CBOR byte string.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobId(pub ContentId);

impl std::fmt::Debug for BlobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl Serialize for BlobId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0.as_bytes())
    }
}

impl<'de> Deserialize<'de> for BlobId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let bytes: serde_bytes::ByteBuf = Deserialize::deserialize(d)?;
        let arr: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| serde::de::Error::invalid_length(bytes.len(), &"32 bytes"))?;
        Ok(BlobId(ContentId(arr)))
    }
}

/// FORMAT.md §5 config.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Config {
    pub version: u32,
    #[serde(with = "serde_bytes")]
    pub repo_id: Vec<u8>,
    pub created: String,
    pub chunker: ChunkerParams,
    pub pack_target: u64,
    /// S3 Object Lock (FORMAT.md §12b): every object is written locked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object_lock: Option<ObjectLockConfig>,
}

/// FORMAT.md §12b `config.object_lock`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ObjectLockConfig {
    /// "COMPLIANCE" or "GOVERNANCE".
    pub mode: String,
    /// How long each object stays locked after it is written (and after
    /// each extension by prune).
    pub seconds: u64,
}

impl ObjectLockConfig {
    /// The store-level setting; None for a mode this btrship does not know.
    pub fn lock(&self) -> Option<crate::store::ObjectLock> {
        Some(crate::store::ObjectLock {
            mode: crate::store::LockMode::parse(&self.mode)?,
            duration: std::time::Duration::from_secs(self.seconds),
        })
    }
}

/// Content-defined chunking sizes (FastCDC 2020), bytes.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChunkerParams {
    pub min: u32,
    pub avg: u32,
    pub max: u32,
}

impl Default for ChunkerParams {
    fn default() -> Self {
        ChunkerParams {
            min: 256 * 1024,
            avg: 1024 * 1024,
            max: 4 * 1024 * 1024,
        }
    }
}

/// FORMAT.md §5 key check.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyCheck {
    #[serde(with = "serde_bytes")]
    pub key_id: Vec<u8>,
    pub created: String,
    pub host: String,
}

/// Kind byte of a blob inside a pack (the envelope kinds 7 and 8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlobKind {
    Data,
    Tree,
}

impl BlobKind {
    pub fn object_kind(self) -> btrship_crypto::ObjectKind {
        match self {
            BlobKind::Data => btrship_crypto::ObjectKind::DataBlob,
            BlobKind::Tree => btrship_crypto::ObjectKind::TreeBlob,
        }
    }
    pub fn to_u8(self) -> u8 {
        self.object_kind() as u8
    }
    pub fn from_u8(b: u8) -> Option<Self> {
        match b {
            7 => Some(BlobKind::Data),
            8 => Some(BlobKind::Tree),
            _ => None,
        }
    }
}

/// FORMAT.md §5 index / §6 pack header: one blob inside a pack.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct PackedBlob {
    pub id: BlobId,
    pub kind: u8,
    pub offset: u64,
    pub length: u64,
    pub raw_length: u64,
}

/// FORMAT.md §6 pack header body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PackHeader {
    pub blobs: Vec<PackedBlob>,
    /// Random bytes between the last blob and the header (size classes,
    /// FORMAT.md §6a); absent = 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub padding: u64,
}

/// FORMAT.md §5 index body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Index {
    pub packs: Vec<IndexPack>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct IndexPack {
    pub pack: String,
    pub blobs: Vec<PackedBlob>,
}

/// FORMAT.md §5 snapshot record.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotRecord {
    pub share: String,
    pub host: String,
    /// RFC 3339, UTC, nanoseconds.
    pub time: String,
    pub snapshot: String,
    pub tree: BlobId,
    /// The share's root directory itself (name empty, `subtree` = `tree`).
    pub root: Node,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<BlobId>,
    pub stats: SnapshotStats,
    /// Its place in the share+host history chain (FORMAT.md §5, history
    /// chain); absent in records written before chains existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain: Option<ChainLink>,
    /// The index objects its writer uploaded since its previous history
    /// object (FORMAT.md §5b); absent in objects written before §5b.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub indexes: Option<Vec<String>>,
}

/// FORMAT.md §5 history chain: where a snapshot record or version batch
/// sits in the history of its share and host.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChainLink {
    /// 1 for the first object of the chain, then +1 per object.
    pub seq: u64,
    /// The object at `seq - 1` (absent for `seq` 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev: Option<PrevLink>,
    /// `repair` continued the chain after a loss: the objects
    /// `lost_from ..= seq - 1` are gone for good, and `prev` names the
    /// object at `lost_from - 1` (absent when nothing before survived).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost_from: Option<u64>,
}

/// The predecessor of a history object: its name and the BLAKE3 hash of
/// its sealed bytes, exactly as stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PrevLink {
    pub name: String,
    #[serde(with = "serde_bytes")]
    pub hash: Vec<u8>,
}

/// FORMAT.md §5 version batch: what the daemon captured between
/// snapshots, several paths per object (one PUT for many closes).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VersionBatch {
    pub share: String,
    pub host: String,
    /// Entries in capture order; a reader applies them in that order.
    pub entries: Vec<VersionEntry>,
    /// Its place in the share+host history chain (FORMAT.md §5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain: Option<ChainLink>,
    /// As in [`SnapshotRecord::indexes`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub indexes: Option<Vec<String>>,
}

/// FORMAT.md §5b chain registration (`chains/<id>`): one per share and
/// host, so readers find the hosts of a share by listing `chains/`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChainRegistration {
    pub share: String,
    pub host: String,
    pub created: String,
}

/// FORMAT.md §5b history summary (`summaries/<id>`): every history object
/// at the places `first ..= last` of one chain, and the indexes they name.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Summary {
    pub share: String,
    pub host: String,
    pub level: u32,
    pub first: u64,
    pub last: u64,
    /// The objects at the covered places that exist, in place order.
    pub objects: Vec<SummaryObject>,
    /// The indexes those objects name; `index` absent when the writer did
    /// not embed it (read the index object itself).
    pub indexes: Vec<SummaryIndex>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SummaryObject {
    pub seq: u64,
    pub name: String,
    /// BLAKE3 of the object's sealed bytes (what its successor links).
    #[serde(with = "serde_bytes")]
    pub hash: Vec<u8>,
    /// Its chain link, as in its body (so a reader can check the chain
    /// without decoding bodies).
    pub chain: ChainLink,
    /// A snapshot record's `time`, or a batch's newest entry time (empty
    /// for a batch without entries): lets a reader pick the bodies a
    /// moment needs without decoding the others.
    pub time: String,
    /// The object's body: CBOR, as it decodes from the object.
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SummaryIndex {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<Index>,
}

/// One captured state of one path.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VersionEntry {
    /// Capture time: RFC 3339, UTC, nanoseconds. The entry is the path's
    /// state at that moment.
    pub time: String,
    /// Share-relative, '/'-separated, each component a safe name.
    #[serde(with = "serde_bytes")]
    pub path: Vec<u8>,
    pub kind: VersionKind,
    /// The entry's node (name = last path component); absent for `delete`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<Node>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum VersionKind {
    /// A regular file as a writer closed it (content and metadata).
    Close,
    /// A directory's own metadata; its entries are unchanged by this.
    Mkdir,
    /// Anything else at the path (symlink, special file) or a file whose
    /// metadata changed.
    Node,
    /// Nothing at the path any more (and nothing below it).
    Delete,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct SnapshotStats {
    pub files: u64,
    pub dirs: u64,
    pub bytes: u64,
    pub new_bytes: u64,
}

/// FORMAT.md §7 tree blob body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Tree {
    pub entries: Vec<Node>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum NodeKind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    Chardev,
    Blockdev,
}

/// One extended attribute: name, value.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct Xattr(
    #[serde(with = "serde_bytes")] pub Vec<u8>,
    #[serde(with = "serde_bytes")] pub Vec<u8>,
);

/// One data region of a file: offset in the file, blob, length.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Extent(pub u64, pub BlobId, pub u64);

/// FORMAT.md §7 node.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Node {
    #[serde(with = "serde_bytes")]
    pub name: Vec<u8>,
    pub kind: NodeKind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_ns: i64,
    /// Change detection only (unchanged inode ⇒ reuse content); not restored.
    #[serde(default)]
    pub ctime_ns: i64,
    #[serde(default)]
    pub size: u64,
    #[serde(default)]
    pub ino: u64,
    #[serde(default)]
    pub nlink: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub xattrs: Vec<Xattr>,
    #[serde(default, skip_serializing_if = "Option::is_none", with = "serde_bytes")]
    pub target: Option<Vec<u8>>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub rdev: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub content: Vec<Extent>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subtree: Option<BlobId>,
}

impl Node {
    /// An empty directory named `name` with mode `mode`, owned by root,
    /// time zero: a directory the history names but does not describe.
    pub fn empty_dir(name: &[u8], mode: u32) -> Node {
        Node {
            name: name.to_vec(),
            kind: NodeKind::Dir,
            mode,
            uid: 0,
            gid: 0,
            mtime_ns: 0,
            ctime_ns: 0,
            size: 0,
            ino: 0,
            nlink: 1,
            xattrs: Vec::new(),
            target: None,
            rdev: 0,
            content: Vec::new(),
            subtree: None,
        }
    }
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// Why a name from a tree is unsafe to create, or `None` when it is a single,
/// ordinary path component (FORMAT.md §2).
pub fn unsafe_name_reason(name: &[u8]) -> Option<&'static str> {
    if name.is_empty() {
        Some("empty name")
    } else if name == b"." || name == b".." {
        Some("'.' or '..'")
    } else if name.contains(&b'/') {
        Some("contains '/'")
    } else if name.contains(&0) {
        Some("contains NUL")
    } else {
        None
    }
}

/// Encode any format type as CBOR.
pub fn to_cbor<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = Vec::new();
    // Writing into a Vec cannot fail; serialization of these types cannot fail.
    ciborium::into_writer(value, &mut out).expect("CBOR encoding into memory");
    out
}

/// Decode a format type from CBOR (after authentication: a failure here
/// means a bug or a different format, still reported, never a panic).
pub fn from_cbor<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, String> {
    ciborium::from_reader(bytes).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_round_trip_keeps_binary_names_and_xattrs() {
        let node = Node {
            name: vec![0xff, b'a', 0x80],
            kind: NodeKind::File,
            mode: 0o4755,
            uid: 1000,
            gid: 100,
            mtime_ns: -5,
            ctime_ns: 7,
            size: 10,
            ino: 300,
            nlink: 2,
            xattrs: vec![Xattr(b"security.NTACL".to_vec(), vec![0, 1, 2])],
            target: None,
            rdev: 0,
            content: vec![Extent(4096, BlobId(ContentId([7; 32])), 6)],
            subtree: None,
        };
        let tree = Tree {
            entries: vec![node],
        };
        let back: Tree = from_cbor(&to_cbor(&tree)).unwrap();
        assert_eq!(back, tree);
    }

    #[test]
    fn unsafe_names_are_refused() {
        for bad in [&b""[..], b".", b"..", b"a/b", b"/", b"a\0b"] {
            assert!(unsafe_name_reason(bad).is_some(), "{bad:?}");
        }
        assert!(unsafe_name_reason(b"...").is_none());
        assert!(unsafe_name_reason(b"~$budget.xlsx").is_none());
    }

    #[test]
    fn bad_blob_id_length_is_an_error_not_a_panic() {
        #[derive(Serialize)]
        struct Wrong {
            id: serde_bytes::ByteBuf,
        }
        #[derive(Deserialize, Debug)]
        #[allow(dead_code)]
        struct Right {
            id: BlobId,
        }
        let bytes = to_cbor(&Wrong {
            id: serde_bytes::ByteBuf::from(vec![1, 2, 3]),
        });
        assert!(from_cbor::<Right>(&bytes).is_err());
    }
}

/// FORMAT.md §5c forget record (`forgets/<chain id>/<number>`): the places
/// of one chain that retention forgot so far (cumulative).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct ForgetRecord {
    pub share: String,
    pub host: String,
    pub number: u64,
    pub time: String,
    /// Sorted, disjoint `[first, last]` ranges of forgotten places.
    pub places: Vec<(u64, u64)>,
}

impl ForgetRecord {
    /// Is place `seq` forgotten?
    pub fn forgets(&self, seq: u64) -> bool {
        let i = self.places.partition_point(|r| r.1 < seq);
        self.places.get(i).is_some_and(|r| r.0 <= seq)
    }
}

/// FORMAT.md §5c garbage record (`gc/<number>`): the packs prune marked
/// (current) and everything it ever deleted (cumulative).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct GarbageRecord {
    pub number: u64,
    /// Store time of the run that wrote it.
    pub time: String,
    pub marked: Vec<MarkedPack>,
    pub deleted_packs: Vec<String>,
    pub deleted_indexes: Vec<String>,
    /// The indexes prune wrote for the packs it repacked (current: one
    /// leaves when its packs are deleted). Everyone merges them like the
    /// indexes history objects name.
    #[serde(default)]
    pub indexes: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MarkedPack {
    pub pack: String,
    /// Store time of the run that marked it (RFC 3339).
    pub at: String,
}

/// A key slot (`keyslots/<16 hex>`, FORMAT.md §3a): the master secret
/// wrapped under a passphrase (Argon2id, XChaCha20-Poly1305, bound to the
/// slot's name and the key id). Plain CBOR, not sealed: it is what opens
/// the key. A reader checks the key it gives against `config`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeySlot {
    pub version: u32,
    #[serde(with = "serde_bytes")]
    pub key_id: Vec<u8>,
    /// Always "argon2id".
    pub kdf: String,
    pub m_kib: u32,
    pub t: u32,
    pub p: u32,
    #[serde(with = "serde_bytes")]
    pub salt: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub nonce: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub sealed: Vec<u8>,
    pub created: String,
    pub host: String,
    #[serde(default)]
    pub label: String,
}

/// Key slot objects live under this prefix.
pub const KEY_SLOT_PREFIX: &str = "keyslots/";
