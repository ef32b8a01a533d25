//! Finding the block device behind a btrfs path in `/proc/self/mountinfo`.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

/// One line of `/proc/self/mountinfo`, the fields we need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MountEntry {
    pub mount_point: PathBuf,
    pub fstype: String,
    pub source: String,
}

/// Undoes the kernel's octal escaping (`\040` for space etc.) in mountinfo.
fn unescape(field: &str) -> Vec<u8> {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let oct = &b[i + 1..i + 4];
            if oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                let v = u32::from(oct[0] - b'0') * 64
                    + u32::from(oct[1] - b'0') * 8
                    + u32::from(oct[2] - b'0');
                if let Ok(byte) = u8::try_from(v) {
                    out.push(byte);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// Parses one mountinfo line; `None` if it is malformed.
fn parse_line(line: &str) -> Option<MountEntry> {
    let fields: Vec<&str> = line.split(' ').collect();
    // id parent major:minor root mount_point options [optional...] - fstype source superopts
    let sep = fields.iter().skip(6).position(|f| *f == "-")? + 6;
    let mount_point = fields.get(4)?;
    let fstype = fields.get(sep + 1)?;
    let source = fields.get(sep + 2)?;
    Some(MountEntry {
        mount_point: PathBuf::from(OsString::from_vec(unescape(mount_point))),
        fstype: String::from_utf8_lossy(&unescape(fstype)).into_owned(),
        source: String::from_utf8_lossy(&unescape(source)).into_owned(),
    })
}

/// Parses the whole mountinfo text; malformed lines are skipped.
pub(crate) fn parse(text: &str) -> Vec<MountEntry> {
    text.lines().filter_map(parse_line).collect()
}

/// The mount whose mount point is the longest (component-wise) prefix of
/// `path`. When several mounts share that mount point the last one (the one
/// on top) wins.
pub(crate) fn covering_mount<'a>(entries: &'a [MountEntry], path: &Path) -> Option<&'a MountEntry> {
    let mut best: Option<(usize, &MountEntry)> = None;
    for e in entries {
        if path.starts_with(&e.mount_point) {
            let depth = e.mount_point.components().count();
            if best.is_none_or(|(d, _)| depth >= d) {
                best = Some((depth, e));
            }
        }
    }
    best.map(|(_, e)| e)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda rw
100 27 0:50 / /mnt/pool rw,relatime shared:40 - btrfs /dev/loop3 rw,space_cache=v2,subvolid=5,subvol=/
101 27 0:50 /share /srv/my\\040share rw,relatime shared:41 - btrfs /dev/loop4 rw,subvolid=256,subvol=/share
102 27 0:51 / /mnt/pool/inner rw - btrfs /dev/loop5 rw
garbage line
";

    #[test]
    fn parses_and_unescapes() {
        let e = parse(SAMPLE);
        assert_eq!(e.len(), 5);
        assert_eq!(e[3].mount_point, PathBuf::from("/srv/my share"));
        assert_eq!(e[3].fstype, "btrfs");
        assert_eq!(e[3].source, "/dev/loop4");
    }

    #[test]
    fn longest_prefix_wins() {
        let e = parse(SAMPLE);
        let m = covering_mount(&e, Path::new("/srv/my share/x")).map(|m| m.source.as_str());
        assert_eq!(m, Some("/dev/loop4"));
        let m = covering_mount(&e, Path::new("/mnt/pool/share")).map(|m| m.source.as_str());
        assert_eq!(m, Some("/dev/loop3"));
        let m = covering_mount(&e, Path::new("/mnt/pool/inner/a")).map(|m| m.source.as_str());
        assert_eq!(m, Some("/dev/loop5"));
        // component-wise: /mnt/poolx is not under /mnt/pool
        let m = covering_mount(&e, Path::new("/mnt/poolx")).map(|m| m.fstype.as_str());
        assert_eq!(m, Some("ext4"));
    }

    #[test]
    fn unescape_edge_cases() {
        assert_eq!(unescape("a\\"), b"a\\".to_vec());
        assert_eq!(unescape("a\\04"), b"a\\04".to_vec());
        assert_eq!(unescape("\\134x"), b"\\x".to_vec());
        assert_eq!(unescape("\\777"), b"\\777".to_vec());
        assert_eq!(unescape("\\011"), b"\t".to_vec());
    }
}
