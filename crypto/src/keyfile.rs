//! Reading and writing key files (the only I/O in this crate).

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use crate::key::{derive_key_id, KeyId, Parts, RepoKey};
use ed25519_dalek::VerifyingKey;
use x25519_dalek::PublicKey;

const COMMENT: &str = "# btrship key: keep it secret; keep a copy off this machine. \
                       Without it nothing can be restored.";
const TAG: &str = "btrship-key-v1";
const SHIP_COMMENT: &str = "# btrship ship-only key: it adds history to one repository and cannot read any of it.\n\
                            # Restores, mounts and prune need the master key, which must not be on this machine.";
const SHIP_TAG: &str = "btrship-ship-key-v1";
const WRAPPED_COMMENT: &str =
    "# btrship key, protected by a passphrase: keep a copy off this machine and \
                               remember the passphrase. Without both nothing can be restored.";
const WRAPPED_TAG: &str = "btrship-key-v1-argon2id";
/// What a key file's wrapped secret is bound to (FORMAT.md §3a).
const FILE_LABEL: &[u8] = b"btrship key file v1";
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
    #[error("key file {path} is protected by a passphrase: run on a terminal, or set BTRSHIP_PASSPHRASE_FILE (a file holding it) or BTRSHIP_PASSPHRASE")]
    NeedsPassphrase { path: PathBuf },
    #[error("key file {path}: the passphrase is wrong (or the file was changed)")]
    WrongPassphrase { path: PathBuf },
}

/// Writes `key` to a new key file at `path` with mode 0600.
///
/// Creates the parent directory (mode 0700) if it is missing. Never
/// overwrites: an existing file gives [`KeyFileError::Exists`]. The file and
/// its directory are fsynced before returning; if writing fails, the partial
/// file is removed.
pub fn write_key_file(path: &Path, key: &RepoKey) -> Result<(), KeyFileError> {
    let contents = key_file_text(key, None).map_err(|e| KeyFileError::Format {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    write_new_file(path, &contents)
}

/// Replaces the key file at `path` (or writes a new one) with `key`,
/// protected by `passphrase` when given (Argon2id with `params`), else in
/// the clear: written beside it, fsynced, renamed over it, the directory
/// fsynced; a crash leaves the old file or the new one.
pub fn replace_key_file(
    path: &Path,
    key: &RepoKey,
    passphrase: Option<(&[u8], crate::KdfParams)>,
) -> Result<(), KeyFileError> {
    let contents = key_file_text(key, passphrase).map_err(|e| KeyFileError::Format {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".new-{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    write_new_file(&tmp, &contents)?;
    std::fs::rename(&tmp, path).map_err(|source| {
        let _ = std::fs::remove_file(&tmp);
        KeyFileError::Io {
            path: path.to_owned(),
            source,
        }
    })?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    sync_dir(parent).map_err(|source| KeyFileError::Io {
        path: path.to_owned(),
        source,
    })
}

/// The text of a key file holding `key`.
fn key_file_text(
    key: &RepoKey,
    passphrase: Option<(&[u8], crate::KdfParams)>,
) -> Result<Zeroizing<String>, crate::CryptoError> {
    if let Some((pass, params)) = passphrase {
        let w = key.wrap(pass, FILE_LABEL, params)?;
        return Ok(Zeroizing::new(format!(
            "{WRAPPED_COMMENT}\n{WRAPPED_TAG} {} {} {} {} {} {} {}\n",
            w.params.m_kib,
            w.params.t,
            w.params.p,
            hex::encode(w.salt),
            hex::encode(w.nonce),
            hex::encode(&w.sealed),
            key.key_id()
        )));
    }
    Ok(match &key.master {
        Some(m) => Zeroizing::new(format!(
            "{COMMENT}\n{TAG} {} {}\n",
            hex::encode(*m.secret),
            key.key_id()
        )),
        None => {
            let fields = ship_fields(key);
            Zeroizing::new(format!(
                "{SHIP_COMMENT}\n{SHIP_TAG} {} {}\n",
                fields.join(" "),
                ship_check(&fields)
            ))
        }
    })
}

/// The fields of a ship-only key line, before its check field.
fn ship_fields(key: &RepoKey) -> Vec<String> {
    vec![
        key.key_id().to_string(),
        hex::encode(*key.id_key),
        hex::encode(*key.shared_key),
        hex::encode(*key.gen_secret),
        key.generation.to_string(),
        hex::encode(key.master_public.as_bytes()),
        hex::encode(key.verifying.as_bytes()),
        hex::encode(&key.params),
    ]
}

/// 16 hex characters of BLAKE3 over the other fields: catches a mistyped or
/// damaged ship-only key line (it has no secret to derive a key id from).
fn ship_check(fields: &[String]) -> String {
    hex::encode(&blake3::hash(fields.join(" ").as_bytes()).as_bytes()[..8])
}

fn write_new_file(path: &Path, contents: &str) -> Result<(), KeyFileError> {
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
pub fn read_key_file(path: &Path) -> Result<RepoKey, KeyFileError> {
    read_key_file_with(path, None)
}

/// [`read_key_file`]; a passphrase-protected file is opened with
/// `passphrase` (without one: [`KeyFileError::NeedsPassphrase`]).
pub fn read_key_file_with(path: &Path, passphrase: Option<&[u8]>) -> Result<RepoKey, KeyFileError> {
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
    if line.split_whitespace().next() == Some(WRAPPED_TAG) {
        let w = parse_wrapped_line(line).map_err(|reason| format_err(&reason))?;
        let Some(pass) = passphrase else {
            return Err(KeyFileError::NeedsPassphrase {
                path: path.to_owned(),
            });
        };
        return RepoKey::unwrap(&w.0, pass, FILE_LABEL, w.1).map_err(|e| match e {
            crate::CryptoError::Malformed { .. } => {
                format_err("the key derivation parameters are out of range")
            }
            _ => KeyFileError::WrongPassphrase {
                path: path.to_owned(),
            },
        });
    }
    parse_key_line(line).map_err(|reason| format_err(&reason))
}

/// `btrship-key-v1-argon2id <m KiB> <t> <p> <salt> <nonce> <sealed> <key id>`.
fn parse_wrapped_line(line: &str) -> Result<(crate::Wrapped, KeyId), String> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let &[_, m, t, p, salt_hex, nonce_hex, sealed_hex, key_id_hex] = fields.as_slice() else {
        return Err(format!(
            "the protected key line has {} fields, expected 8",
            fields.len()
        ));
    };
    let num = |v: &str, what: &str| -> Result<u32, String> {
        v.parse().map_err(|_| format!("the {what} is not a number"))
    };
    let mut salt = [0u8; 16];
    let mut nonce = [0u8; 24];
    let mut key_id = [0u8; 8];
    hex::decode_to_slice(salt_hex, &mut salt)
        .map_err(|_| "the salt is not 32 hex characters".to_owned())?;
    hex::decode_to_slice(nonce_hex, &mut nonce)
        .map_err(|_| "the nonce is not 48 hex characters".to_owned())?;
    hex::decode_to_slice(key_id_hex, &mut key_id)
        .map_err(|_| "the key id is not 16 hex characters".to_owned())?;
    let sealed = hex::decode(sealed_hex).map_err(|_| "the sealed secret is not hex".to_owned())?;
    Ok((
        crate::Wrapped {
            params: crate::KdfParams {
                m_kib: num(m, "memory cost")?,
                t: num(t, "time cost")?,
                p: num(p, "parallelism")?,
            },
            salt,
            nonce,
            sealed,
        },
        KeyId(key_id),
    ))
}

/// Parses `btrship-key-v1 <secret hex> <key id hex>` (the master key) or
/// a `btrship-ship-key-v1` line. Error messages never include the secret.
fn parse_key_line(line: &str) -> Result<RepoKey, String> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    match fields.first() {
        Some(&TAG) => {}
        Some(&SHIP_TAG) => return parse_ship_line(&fields),
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
    Ok(RepoKey::from_zeroizing(secret))
}

/// `btrship-ship-key-v1 <key id> <id key> <shared key> <generation secret>
/// <generation> <x25519 public> <ed25519 public> <params> <check>`, all hex
/// but the generation (decimal).
fn parse_ship_line(fields: &[&str]) -> Result<RepoKey, String> {
    let &[_, key_id_hex, id_hex, shared_hex, gen_hex, generation, x_hex, ed_hex, params_hex, check] =
        fields
    else {
        return Err(format!(
            "the ship-only key line has {} fields, expected 10",
            fields.len()
        ));
    };
    let own: Vec<String> = fields[1..9].iter().map(|f| f.to_string()).collect();
    if ship_check(&own) != check {
        return Err(
            "the check field does not match the key: the file was mistyped or damaged".into(),
        );
    }
    let bytes32 = |hex_text: &str, what: &str| -> Result<Zeroizing<[u8; 32]>, String> {
        let mut out = Zeroizing::new([0u8; 32]);
        hex::decode_to_slice(hex_text, out.as_mut())
            .map_err(|_| format!("the {what} is not 64 hex characters"))?;
        Ok(out)
    };
    let mut key_id = [0u8; 8];
    hex::decode_to_slice(key_id_hex, &mut key_id)
        .map_err(|_| "the key id is not 16 hex characters".to_owned())?;
    let id_key = bytes32(id_hex, "id key")?;
    let shared_key = bytes32(shared_hex, "shared key")?;
    let gen_secret = bytes32(gen_hex, "generation secret")?;
    let generation: u32 = generation
        .parse()
        .map_err(|_| "the generation is not a number".to_owned())?;
    let master_public = PublicKey::from(*bytes32(x_hex, "master public key")?);
    let verifying = VerifyingKey::from_bytes(&*bytes32(ed_hex, "signing public key")?)
        .map_err(|_| "the signing public key is not a valid Ed25519 key".to_owned())?;
    let params = hex::decode(params_hex).map_err(|_| "the parameters are not hex".to_owned())?;
    Ok(RepoKey::assemble(Parts {
        key_id: KeyId(key_id),
        id_key,
        shared_key,
        gen_secret,
        generation,
        master_public,
        verifying,
        master: None,
        params,
    }))
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
    fn a_ship_only_key_round_trips_and_a_typo_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let master = RepoKey::generate();
        let ship = master.ship_only(b"repository parameters", 2).unwrap();
        let path = dir.path().join("ship.key");
        write_key_file(&path, &ship).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("# btrship ship-only key"), "{text}");
        let back = read_key_file(&path).unwrap();
        assert!(!back.is_master());
        assert_eq!(back.key_id(), master.key_id());
        assert_eq!(back.ship_params(), Some(&b"repository parameters"[..]));
        assert_eq!(back.generation(), Some(2));
        assert_eq!(back.content_id(b"x"), master.content_id(b"x"));
        // What the file's key seals, the master opens.
        let sealed = back.seal(crate::ObjectKind::Index, b"index/a", b"body");
        assert_eq!(
            master
                .open(crate::ObjectKind::Index, b"index/a", &sealed)
                .unwrap(),
            b"body"
        );

        let line = text.lines().find(|l| l.starts_with(SHIP_TAG)).unwrap();
        let mut fields: Vec<&str> = line.split_whitespace().collect();
        let flipped = fields[3].replacen('0', "1", 1).replacen('a', "b", 1);
        fields[3] = &flipped;
        let err = parse_key_line(&fields.join(" ")).unwrap_err();
        assert!(err.contains("check field"), "{err}");
        let err = parse_key_line(&fields[..5].join(" ")).unwrap_err();
        assert!(err.contains("expected 10"), "{err}");
    }

    #[test]
    fn a_protected_key_file_opens_with_its_passphrase_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.key");
        let key = RepoKey::generate();
        write_key_file(&path, &key).unwrap();
        let cheap = crate::KdfParams {
            m_kib: 256,
            t: 1,
            p: 1,
        };
        replace_key_file(&path, &key, Some((b"s3cret pass", cheap))).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(WRAPPED_TAG), "{text}");
        let secret_hex = hex::encode(*key.master.as_ref().unwrap().secret);
        assert!(!text.contains(&secret_hex[..16]));
        assert!(matches!(
            read_key_file(&path),
            Err(KeyFileError::NeedsPassphrase { .. })
        ));
        assert!(matches!(
            read_key_file_with(&path, Some(b"wrong")),
            Err(KeyFileError::WrongPassphrase { .. })
        ));
        let back = read_key_file_with(&path, Some(b"s3cret pass")).unwrap();
        assert_eq!(back.key_id(), key.key_id());
        assert!(back.is_master());
        // Back to a plain file; the mode stays 0600.
        replace_key_file(&path, &back, None).unwrap();
        assert_eq!(read_key_file(&path).unwrap().key_id(), key.key_id());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let leftovers = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(leftovers, 1);
    }

    #[test]
    fn parse_errors_do_not_leak_the_secret() {
        let key = RepoKey::from_secret([0xab; 32]);
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
