//! Key file writing, reading, permissions and format checks.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use btrship_crypto::{read_key_file, write_key_file, KeyFileError, ObjectKind, RepoKey};

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Writes `contents` to `path` with mode 0600.
fn write_private(path: &Path, contents: &str) {
    fs::write(path, contents).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).unwrap();
}

#[test]
fn round_trip_and_mode_0600() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("key");
    let key = RepoKey::generate();
    write_key_file(&path, &key).unwrap();
    assert_eq!(mode(&path), 0o600);

    let read = read_key_file(&path).unwrap();
    assert_eq!(read.key_id(), key.key_id());
    assert_eq!(read.content_id(b"x"), key.content_id(b"x"));
    let sealed = key.seal(ObjectKind::Config, b"config", b"hello");
    assert_eq!(
        read.open(ObjectKind::Config, b"config", &sealed).unwrap(),
        b"hello"
    );
}

#[test]
fn file_has_the_documented_format() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("key");
    let secret = [0x5a; 32];
    let key = RepoKey::from_secret(secret);
    write_key_file(&path, &key).unwrap();
    let text = fs::read_to_string(&path).unwrap();
    assert_eq!(
        text,
        format!(
            "# btrship key: keep it secret; keep a copy off this machine. Without it nothing can be restored.\n\
             btrship-key-v1 {} {}\n",
            hex::encode(secret),
            key.key_id()
        )
    );
}

#[test]
fn creates_missing_parent_with_mode_0700() {
    let dir = tempfile::tempdir().unwrap();
    let parent = dir.path().join("etc").join("btrship");
    let path = parent.join("key");
    write_key_file(&path, &RepoKey::generate()).unwrap();
    assert_eq!(mode(&parent), 0o700);
    assert_eq!(mode(&path), 0o600);
}

#[test]
fn refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("key");
    let first = RepoKey::generate();
    write_key_file(&path, &first).unwrap();
    let err = write_key_file(&path, &RepoKey::generate()).unwrap_err();
    assert!(matches!(err, KeyFileError::Exists { .. }), "{err:?}");
    // The original key is untouched.
    assert_eq!(read_key_file(&path).unwrap().key_id(), first.key_id());
}

#[test]
fn refuses_group_or_world_accessible_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("key");
    write_key_file(&path, &RepoKey::generate()).unwrap();
    for bad in [0o640, 0o644, 0o604, 0o620, 0o602] {
        fs::set_permissions(&path, fs::Permissions::from_mode(bad)).unwrap();
        match read_key_file(&path) {
            Err(KeyFileError::Permissions { mode, .. }) => assert_eq!(mode, bad),
            other => panic!("mode {bad:o}: expected Permissions, got {other:?}"),
        }
    }
    fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
    assert!(read_key_file(&path).is_ok());
}

#[test]
fn tolerates_comments_blank_lines_and_whitespace() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("key");
    let key = RepoKey::from_secret([3; 32]);
    write_private(
        &path,
        &format!(
            "\n# a comment\n   \n  btrship-key-v1   {}\t{}  \r\n# trailing\n",
            hex::encode([3u8; 32]),
            key.key_id()
        ),
    );
    assert_eq!(read_key_file(&path).unwrap().key_id(), key.key_id());
}

#[test]
fn garbled_files_are_format_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("key");
    let key = RepoKey::from_secret([4; 32]);
    let secret = hex::encode([4u8; 32]);
    let id = key.key_id().to_string();
    let cases = [
        String::new(),
        "# only a comment\n".to_owned(),
        "hello world\n".to_owned(),
        format!("btrship-key-v2 {secret} {id}\n"),
        format!("btrship-key-v1 {secret}\n"),
        format!("btrship-key-v1 {secret} {id} extra\n"),
        format!("btrship-key-v1 {} {id}\n", &secret[..62]),
        format!("btrship-key-v1 {}zz {id}\n", &secret[..62]),
        format!("btrship-key-v1 {secret} {}\n", &id[..15]),
        format!("btrship-key-v1 {secret} {id}\nbtrship-key-v1 {secret} {id}\n"),
    ];
    for contents in cases {
        write_private(&path, &contents);
        match read_key_file(&path) {
            Err(KeyFileError::Format { reason, .. }) => {
                assert!(!reason.contains(&secret), "reason leaks the secret")
            }
            other => panic!("{contents:?}: expected Format, got {other:?}"),
        }
    }

    fs::write(&path, [0xff, 0xfe, 0x00]).unwrap();
    assert!(matches!(
        read_key_file(&path),
        Err(KeyFileError::Format { .. })
    ));
}

#[test]
fn mismatched_key_id_field_is_a_format_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("key");
    write_key_file(&path, &RepoKey::from_secret([6; 32])).unwrap();
    let text = fs::read_to_string(&path).unwrap();

    // A single mistyped character in the secret.
    let secret = hex::encode([6u8; 32]);
    let typo = format!("7{}", &secret[1..]);
    write_private(&path, &text.replace(&secret, &typo));
    let err = read_key_file(&path).unwrap_err();
    assert!(
        matches!(&err, KeyFileError::Format { reason, .. } if reason.contains("does not match"))
    );

    // A wrong key id field with the right secret.
    let other_id = RepoKey::from_secret([7; 32]).key_id().to_string();
    let id = RepoKey::from_secret([6; 32]).key_id().to_string();
    write_private(&path, &text.replace(&id, &other_id));
    assert!(matches!(
        read_key_file(&path),
        Err(KeyFileError::Format { .. })
    ));
}

#[test]
fn missing_file_is_an_io_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent");
    let err = read_key_file(&path).unwrap_err();
    assert!(matches!(err, KeyFileError::Io { .. }));
    assert!(err.to_string().contains("absent"));
}
