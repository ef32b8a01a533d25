//! Pack assembly and parsing (FORMAT.md §6): sealed blobs back to back,
//! then the sealed pack header, then its length as a little-endian u32.

use crate::format::{from_cbor, to_cbor, BlobKind, PackHeader, PackedBlob};
use crate::padding::{self, size_class};
use btrship_crypto::{ContentId, ObjectKind, RepoKey};

/// Object name of a pack: `packs/<2 hex>/<64 hex>`, from the keyed hash of
/// its bytes, so a retried upload reuses the name and the name reveals nothing.
pub fn pack_object_name(key: &RepoKey, bytes: &[u8]) -> String {
    let hex = key.content_id(bytes).to_hex();
    format!("packs/{}/{}", &hex[..2], hex)
}

/// Accumulates sealed blobs into one pack in memory.
#[derive(Default)]
pub struct PackBuilder {
    buf: Vec<u8>,
    blobs: Vec<PackedBlob>,
}

impl PackBuilder {
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blobs.is_empty()
    }

    /// Blobs appended so far.
    pub fn blobs(&self) -> usize {
        self.blobs.len()
    }

    /// Appends an already sealed blob.
    pub fn push(&mut self, id: ContentId, kind: BlobKind, sealed: &[u8], raw_length: u64) {
        self.blobs.push(PackedBlob {
            id: crate::format::BlobId(id),
            kind: kind.to_u8(),
            offset: self.buf.len() as u64,
            length: sealed.len() as u64,
            raw_length,
        });
        self.buf.extend_from_slice(sealed);
    }

    /// Seals the header and returns (pack bytes, blobs in it). Random
    /// padding between the last blob and the header, declared in the
    /// header, brings the pack to its size class (FORMAT.md §6a).
    pub fn finish(mut self, key: &RepoKey) -> (Vec<u8>, Vec<PackedBlob>) {
        let blobs_len = self.buf.len() as u64;
        let seal = |padding: u64| {
            let header = PackHeader {
                blobs: self.blobs.clone(),
                padding,
            };
            key.seal(ObjectKind::PackHeader, b"", &to_cbor(&header))
        };
        let mut sealed = seal(0);
        let mut target = size_class(blobs_len + sealed.len() as u64 + 4);
        let mut padding = 0u64;
        for _ in 0..32 {
            let total = blobs_len + padding + sealed.len() as u64 + 4;
            if total == target {
                break;
            }
            if total < target {
                padding += target - total;
            } else if total - target <= padding {
                padding -= total - target;
            } else {
                target = size_class(target + 1);
                continue;
            }
            sealed = seal(padding);
        }
        let total = blobs_len + padding + sealed.len() as u64 + 4;
        if total != target {
            tracing::debug!("pack of {total} bytes misses its class {target}");
        }
        self.buf
            .extend_from_slice(&padding::random_bytes(padding as usize));
        self.buf.extend_from_slice(&sealed);
        self.buf
            .extend_from_slice(&(sealed.len() as u32).to_le_bytes());
        (self.buf, self.blobs)
    }
}

/// Reasons a pack does not parse or does not match what the index says.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("pack is {0} bytes, too short for a header length")]
    TooShort(u64),
    #[error("header length {header} does not fit in a pack of {size} bytes")]
    BadHeaderLength { header: u64, size: u64 },
    #[error("pack header: {0}")]
    Header(#[from] btrship_crypto::CryptoError),
    #[error("pack header is not valid CBOR: {0}")]
    HeaderFormat(String),
    #[error("pack blobs do not tile the pack: {0}")]
    Layout(String),
}

/// Where the header sits, given the pack size and its last 4 bytes.
pub fn header_range(size: u64, tail: &[u8]) -> Result<(u64, u64), PackError> {
    let tail: [u8; 4] = tail.try_into().map_err(|_| PackError::TooShort(size))?;
    let header = u64::from(u32::from_le_bytes(tail));
    if size < 4 || header > size - 4 {
        return Err(PackError::BadHeaderLength { header, size });
    }
    Ok((size - 4 - header, header))
}

/// Opens a sealed pack header and checks that its blobs tile the pack
/// exactly from offset 0, followed by exactly the padding the header
/// declares, up to the header (no unaccounted byte).
pub fn open_header(
    key: &RepoKey,
    sealed: &[u8],
    header_offset: u64,
) -> Result<Vec<PackedBlob>, PackError> {
    let body = key.open(ObjectKind::PackHeader, b"", sealed)?;
    let header: PackHeader = from_cbor(&body).map_err(PackError::HeaderFormat)?;
    let mut expect = 0u64;
    for b in &header.blobs {
        if b.offset != expect || BlobKind::from_u8(b.kind).is_none() {
            return Err(PackError::Layout(format!(
                "blob {:?} at offset {} (expected {expect}), kind {}",
                b.id, b.offset, b.kind
            )));
        }
        expect = b.offset.saturating_add(b.length);
    }
    if expect.saturating_add(header.padding) != header_offset {
        return Err(PackError::Layout(format!(
            "blobs end at {expect}, {} bytes of padding, header starts at {header_offset}",
            header.padding
        )));
    }
    Ok(header.blobs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_and_parse_round_trip() {
        let key = RepoKey::generate();
        let mut b = PackBuilder::default();
        for data in [&b"hello"[..], b"", &[9u8; 5000]] {
            let id = key.content_id(data);
            let sealed = key.seal(ObjectKind::DataBlob, id.as_bytes(), data);
            b.push(id, BlobKind::Data, &sealed, data.len() as u64);
        }
        let (bytes, blobs) = b.finish(&key);
        let size = bytes.len() as u64;
        assert_eq!(size, size_class(size), "a pack is padded to its class");
        let (off, len) = header_range(size, &bytes[bytes.len() - 4..]).unwrap();
        let parsed = open_header(&key, &bytes[off as usize..(off + len) as usize], off).unwrap();
        assert_eq!(parsed, blobs);
        for p in parsed {
            let sealed = &bytes[p.offset as usize..(p.offset + p.length) as usize];
            let plain = key
                .open(ObjectKind::DataBlob, p.id.0.as_bytes(), sealed)
                .unwrap();
            assert_eq!(key.content_id(&plain), p.id.0);
        }
    }

    #[test]
    fn padding_is_accepted_only_as_declared() {
        let key = RepoKey::generate();
        let data = b"some data";
        let id = key.content_id(data);
        let sealed = key.seal(ObjectKind::DataBlob, id.as_bytes(), data);
        let mut b = PackBuilder::default();
        b.push(id, BlobKind::Data, &sealed, data.len() as u64);
        let (bytes, blobs) = b.finish(&key);
        let size = bytes.len() as u64;
        assert_eq!(size, 4096);
        let (off, len) = header_range(size, &bytes[bytes.len() - 4..]).unwrap();
        let header_bytes = &bytes[off as usize..(off + len) as usize];
        assert_eq!(open_header(&key, header_bytes, off).unwrap(), blobs);
        // A header declaring another padding length (sealed with the key:
        // a writer bug) does not lay out.
        for padding in [
            0,
            off - sealed.len() as u64 - 1,
            off - sealed.len() as u64 + 1,
        ] {
            let lying = key.seal(
                ObjectKind::PackHeader,
                b"",
                &to_cbor(&PackHeader {
                    blobs: blobs.clone(),
                    padding,
                }),
            );
            assert!(matches!(
                open_header(&key, &lying, off),
                Err(PackError::Layout(_))
            ));
        }
        // A tampered header (the padding length in it) fails authentication.
        for i in 0..header_bytes.len() {
            let mut bad = header_bytes.to_vec();
            bad[i] ^= 0x40;
            assert!(open_header(&key, &bad, off).is_err(), "byte {i}");
        }
    }

    #[test]
    fn hostile_header_length_is_an_error() {
        assert!(header_range(10, &u32::MAX.to_le_bytes()).is_err());
        assert!(header_range(3, &[0, 0, 0]).is_err());
        assert!(header_range(4, &0u32.to_le_bytes()).is_ok());
    }
}
