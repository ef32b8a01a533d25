//! Reading and writing key files (the only I/O in this crate).

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use crate::key::{derive_key_id, KeyId, MasterKey};

const COMMENT: &str = "# btrship key: keep it secret; keep a copy off this machine. \
                       Without it nothing can be restored.";
const TAG: &str = "btrship-key-v1";
/// Key files are a couple of hundred bytes; refuse to slurp anything huge.
const MAX_KEY_FILE_LEN: u64 = 64 * 1024;

/// Why a key file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("key file {path} is readable or writable by group/others (mode {mode:o}); run: chmod 600 {path}")]
    Permissions { path: PathBuf, mode: u32 },
    #[error("key file {path} is not a btrship key file: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error("key file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("key file {path} already exists; refusing to overwrite it")]
    Exists { path: PathBuf },
}

/// Writes `key` to a new key file at `path` with mode 0600.
///
/// Creates the parent directory (mode 0700) if it is missing. Never
/// overwrites: an existing file gives [`KeyFileError::Exists`]. The file and
/// its directory are fsynced before returning; if writing fails, the partial
/// file is removed.
pub fn write_key_file(path: &Path, key: &MasterKey) -> Result<(), KeyFileError> {
    let io_err = |source| KeyFileError::Io {
        path: path.to_owned(),
        source,
    };
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let created_parent = !parent.exists();
    if created_parent {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(io_err)?;
    }

    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists => KeyFileError::Exists {
                path: path.to_owned(),
            },
            _ => io_err(e),
        })?;

    let contents = Zeroizing::new(format!(
        "{COMMENT}\n{TAG} {} {}\n",
        hex::encode(*key.secret),
        key.key_id()
    ));
    let written = file
        .write_all(contents.as_bytes())
        .and_then(|()| file.sync_all());
    if let Err(e) = written {
        drop(file);
        let _ = std::fs::remove_file(path);
        return Err(io_err(e));
    }

    sync_dir(parent).map_err(io_err)?;
    if created_parent {
        if let Some(grandparent) = parent.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(grandparent).map_err(io_err)?;
        }
    }
    Ok(())
}

/// Reads the key file at `path`.
///
/// Refuses a file that group or others may access
/// ([`KeyFileError::Permissions`]), and one whose key id field does not match
/// its secret ([`KeyFileError::Format`]).
pub fn read_key_file(path: &Path) -> Result<MasterKey, KeyFileError> {
    let io_err = |source| KeyFileError::Io {
        path: path.to_owned(),
        source,
    };
    let format_err = |reason: &str| KeyFileError::Format {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };

    let file = File::open(path).map_err(io_err)?;
    // Check the opened file itself, not the path, so the check cannot race.
    let meta = file.metadata().map_err(io_err)?;
    if !meta.is_file() {
        return Err(format_err("not a regular file"));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyFileError::Permissions {
            path: path.to_owned(),
            mode,
        });
    }

    let mut raw = Zeroizing::new(Vec::with_capacity(MAX_KEY_FILE_LEN as usize + 1));
    file.take(MAX_KEY_FILE_LEN + 1)
        .read_to_end(&mut raw)
        .map_err(io_err)?;
    if raw.len() as u64 > MAX_KEY_FILE_LEN {
        return Err(format_err("file is too large"));
    }
    let text = std::str::from_utf8(&raw).map_err(|_| format_err("not UTF-8 text"))?;

    let mut key_lines = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'));
    let line = key_lines
        .next()
        .ok_or_else(|| format_err("no key line found"))?;
    if key_lines.next().is_some() {
        return Err(format_err("more than one key line"));
    }
    parse_key_line(line).map_err(|reason| format_err(&reason))
}

/// Parses `btrship-key-v1 <secret hex> <key id hex>`. Error messages never
/// include the secret.
fn parse_key_line(line: &str) -> Result<MasterKey, String> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    match fields.first() {
        Some(&TAG) => {}
        Some(tag) if tag.starts_with("btrship-key-") => {
            return Err(format!("unsupported key format {tag:?}; upgrade btrship"))
        }
        _ => return Err(format!("the key line does not start with {TAG:?}")),
    }
    let &[_, secret_hex, key_id_hex] = fields.as_slice() else {
        return Err(format!(
            "the key line has {} fields, expected 3: {TAG} <secret> <key id>",
            fields.len()
        ));
    };

    let mut secret = Zeroizing::new([0u8; 32]);
    hex::decode_to_slice(secret_hex, secret.as_mut())
        .map_err(|_| "the secret is not 64 hex characters".to_owned())?;
    let mut key_id = [0u8; 8];
    hex::decode_to_slice(key_id_hex, &mut key_id)
        .map_err(|_| "the key id is not 16 hex characters".to_owned())?;

    let derived = derive_key_id(&secret);
    if derived != KeyId(key_id) {
        return Err(format!(
            "key id field {} does not match the secret (which gives {derived}): \
             the file was mistyped or damaged",
            KeyId(key_id)
        ));
    }
    Ok(MasterKey::from_zeroizing(secret))
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_messages_show_the_path() {
        let err = KeyFileError::Permissions {
            path: PathBuf::from("/etc/btrship/key"),
            mode: 0o644,
        };
        assert_eq!(
            err.to_string(),
            "key file /etc/btrship/key is readable or writable by group/others (mode 644); \
             run: chmod 600 /etc/btrship/key"
        );
    }

    #[test]
    fn parse_errors_do_not_leak_the_secret() {
        let key = MasterKey::from_secret([0xab; 32]);
        let secret_hex = hex::encode([0xab; 32]);
        for line in [
            format!("{TAG} {secret_hex} 0000000000000000"),
            format!("{TAG} {secret_hex}"),
            format!("{TAG} {secret_hex} {} extra", key.key_id()),
            format!("{TAG} {}z {}", &secret_hex[1..], key.key_id()),
        ] {
            let err = parse_key_line(&line).unwrap_err();
            assert!(!err.contains(&secret_hex[..16]), "{err}");
        }
    }
}
