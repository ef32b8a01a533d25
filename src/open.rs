//! The one way to reach a store and open a repository: every backend gets
//! the same layers (retries, connection and bandwidth limits, request
//! counters), a key file's absence is a key error with its own exit code,
//! and a shipping machine opens through its catalogue
//! (`catalog::open_repository`) with what it knows of its own history.

use crate::config::RepoAddress;
use crate::exit::{self, UserError};
use anyhow::Result;
use btrship_crypto::RepoKey;
use btrship_upload::layers;
use btrship_upload::local::LocalStore;
use btrship_upload::s3::{S3Config, S3Store};
use btrship_upload::versioned::VersionedStore;
use btrship_upload::{Repository, Store};
use std::path::Path;
use std::sync::Arc;
use zeroize::Zeroizing;

/// Builds stores: every backend gets the same retries, limits and
/// counters. Cloneable into the daemon's shipping thread.
#[derive(Clone)]
pub struct Stores {
    /// Read through the bucket's object versions (`--recover-versions`),
    /// validating with this key (FORMAT.md §12a).
    pub versions_of: Option<Arc<RepoKey>>,
    pub max_connections: usize,
    pub bwlimit: Option<u64>,
    pub counters: Arc<layers::Counters>,
    pub rt: tokio::runtime::Handle,
}

impl Stores {
    /// The store at `address`, layered. `create` makes a local directory
    /// that does not exist yet; otherwise its absence is "not found".
    pub fn store(
        &self,
        address: &str,
        create: bool,
        retry: layers::RetryPolicy,
    ) -> Result<Arc<dyn Store>> {
        let backend: Arc<dyn Store> = match RepoAddress::parse(address)? {
            RepoAddress::Local(path) => {
                if !create && !path.is_dir() {
                    return Err(UserError::new(
                        exit::NOT_FOUND,
                        format!(
                            "no btrship repository at {} (directory does not exist); check --repo",
                            path.display()
                        ),
                    )
                    .into());
                }
                if create {
                    Arc::new(LocalStore::create(&path)?)
                } else {
                    Arc::new(LocalStore::open(&path)?)
                }
            }
            RepoAddress::S3(url) => {
                let cfg = S3Config::parse_url(&url)?;
                let s3 = Arc::new(self.rt.block_on(S3Store::connect(cfg))?);
                match &self.versions_of {
                    Some(key) => Arc::new(VersionedStore::new(s3, validator(key.clone()))),
                    None => s3,
                }
            }
            RepoAddress::Cloud(url) => {
                let cfg = btrship_upload::cloud::CloudConfig::parse_url(&url)
                    .map_err(|e| UserError::new(exit::USAGE, e.to_string()))?;
                // The clients need a runtime to be built in.
                let _rt = self.rt.enter();
                btrship_upload::cloud::connect(cfg)?
            }
        };
        if self.versions_of.is_some() && !address.starts_with("s3://") {
            return Err(UserError::new(
                exit::USAGE,
                "--recover-versions reads the object versions of an S3 bucket; this repository is not in S3",
            )
            .into());
        }
        Ok(layers::layered(
            backend,
            layers::LayerOptions {
                retry,
                max_connections: Some(self.max_connections),
                bwlimit_bytes_per_sec: self.bwlimit,
            },
            self.counters.clone(),
        ))
    }

    /// Opens an existing repository through the catalogue in `state_dir`.
    /// `own`: the share, host and newest history place this machine
    /// shipped (the catalogue then knows what the store must hold).
    pub fn open_repository(
        &self,
        address: &str,
        key_file: &Path,
        state_dir: &Path,
        own: Option<(&str, &str, u64)>,
    ) -> Result<Repository> {
        self.open_repository_with(address, read_key(key_file)?, state_dir, own)
    }

    /// [`Stores::open_repository`] with a key already read.
    pub fn open_repository_with(
        &self,
        address: &str,
        key: Arc<RepoKey>,
        state_dir: &Path,
        own: Option<(&str, &str, u64)>,
    ) -> Result<Repository> {
        let store = self.store(address, false, layers::RetryPolicy::default())?;
        crate::catalog::open_repository(store, key, self.rt.clone(), state_dir, own)
    }

    /// Fails only when the repository cannot be opened for a reason that
    /// retrying cannot fix (wrong or missing key, no repository or bucket,
    /// unsupported format, access denied): the daemon checks this before
    /// it tells systemd it is ready, so `systemctl start` itself fails. A
    /// store that does not answer now is not such a reason (a warning; the
    /// daemon starts and retries).
    pub fn check_openable(&self, address: &str, key_file: &Path) -> Result<()> {
        let opened = read_key(key_file).and_then(|key| {
            let store = self.store(address, false, once())?;
            Repository::open_lazy(store, key, self.rt.clone())?;
            Ok(())
        });
        match opened {
            Err(e) if crate::exit::is_permanent(&e) => {
                Err(e.context(format!("cannot open the repository {address}")))
            }
            Err(e) => {
                tracing::warn!("the repository {address} cannot be read now ({e:#}); starting anyway, shipping retries");
                Ok(())
            }
            Ok(()) => Ok(()),
        }
    }

    /// Can the store be reached now? One request (the config object's
    /// metadata), no retries, at most 10 s. Returns its latency in ms.
    pub fn probe(&self, address: &str) -> Result<u64> {
        let store = self.store(address, false, once())?;
        let started = std::time::Instant::now();
        self.rt
            .block_on(async {
                tokio::time::timeout(std::time::Duration::from_secs(10), store.head("config")).await
            })
            .map_err(|_| anyhow::anyhow!("no answer within 10 s"))??;
        Ok(started.elapsed().as_millis() as u64)
    }

    /// Does a repository (its config object) exist at this address? Any
    /// failure to tell counts as no: `init` then reports the real error.
    pub fn repository_exists(&self, address: &str) -> bool {
        match self.store(address, false, once()) {
            Ok(store) => self.rt.block_on(store.head("config")).is_ok(),
            Err(_) => false,
        }
    }
}

/// One attempt, no retries: for probes.
fn once() -> layers::RetryPolicy {
    layers::RetryPolicy {
        attempts: 1,
        ..Default::default()
    }
}

/// Reads a key file; a missing one is a key error (exit 4) naming it. A
/// passphrase-protected one asks for its passphrase ([`passphrase`]).
pub fn read_key(path: &Path) -> Result<Arc<RepoKey>> {
    let read = match btrship_crypto::read_key_file(path) {
        Err(btrship_crypto::KeyFileError::NeedsPassphrase { .. }) => {
            let pass = passphrase(&format!("Passphrase of {}: ", path.display())).map_err(|e| {
                e.context(format!(
                    "key file {} is protected by a passphrase",
                    path.display()
                ))
            })?;
            btrship_crypto::read_key_file_with(path, Some(pass.as_bytes()))
        }
        other => other,
    };
    let key = read.map_err(|e| {
        let missing = matches!(&e, btrship_crypto::KeyFileError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound);
        if missing {
            anyhow::Error::new(UserError::new(
                exit::KEY,
                format!("key file {} does not exist; pass --key-file", path.display()),
            ))
        } else {
            anyhow::Error::new(e)
        }
    })?;
    Ok(Arc::new(key))
}

/// This machine's host name ("localhost" when it has none).
pub fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: buf is writable for its length.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    if ok && end > 0 {
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        "localhost".into()
    }
}

/// The host name a share's history is shipped under.
pub fn share_host(cfg: &crate::config::ShareConfig) -> String {
    cfg.host.clone().unwrap_or_else(host_name)
}

/// A passphrase: the file `BTRSHIP_PASSPHRASE_FILE` names (its first
/// line), else `BTRSHIP_PASSPHRASE`, else asked on the terminal. Without
/// any of them: the key error (exit 4) saying how to give one.
pub fn passphrase(prompt: &str) -> Result<Zeroizing<String>> {
    passphrase_from("BTRSHIP_PASSPHRASE", prompt, false)
}

/// A new passphrase (`BTRSHIP_NEW_PASSPHRASE_FILE`,
/// `BTRSHIP_NEW_PASSPHRASE`, else asked twice on the terminal); at least
/// 8 characters.
pub fn new_passphrase(prompt: &str) -> Result<Zeroizing<String>> {
    let pass = passphrase_from("BTRSHIP_NEW_PASSPHRASE", prompt, true)?;
    if pass.chars().count() < 8 {
        return Err(UserError::new(
            exit::USAGE,
            "the new passphrase is shorter than 8 characters; choose a longer one",
        )
        .into());
    }
    Ok(pass)
}

fn passphrase_from(var: &str, prompt: &str, twice: bool) -> Result<Zeroizing<String>> {
    let file_var = format!("{var}_FILE");
    if let Some(path) = std::env::var_os(&file_var) {
        let text = Zeroizing::new(std::fs::read_to_string(&path).map_err(|e| {
            UserError::new(
                exit::KEY,
                format!(
                    "cannot read {file_var} ({}): {e}",
                    Path::new(&path).display()
                ),
            )
        })?);
        return Ok(Zeroizing::new(
            text.lines().next().unwrap_or_default().to_string(),
        ));
    }
    if let Ok(p) = std::env::var(var) {
        return Ok(Zeroizing::new(p));
    }
    let no_terminal = |_| {
        UserError::new(
            exit::KEY,
            format!("a passphrase is needed and there is no terminal to ask on; set {file_var} (a file holding it) or {var}"),
        )
    };
    let first = Zeroizing::new(rpassword::prompt_password(prompt).map_err(no_terminal)?);
    if twice {
        let again = Zeroizing::new(rpassword::prompt_password("Again: ").map_err(no_terminal)?);
        if *again != *first {
            return Err(UserError::new(exit::USAGE, "the two passphrases differ").into());
        }
    }
    Ok(first)
}

/// Whether bytes read under a name are what btrship wrote there: sealed
/// objects open under `key` as their kind, a pack hashes to its name, a
/// key slot parses (it is checked against `config` when used). For
/// reading through object versions ([`VersionedStore`]).
pub fn validator(key: Arc<RepoKey>) -> btrship_upload::versioned::Validator {
    use btrship_crypto::ObjectKind as K;
    Arc::new(move |name: &str, bytes: &[u8]| {
        let kind = match name.split('/').next().unwrap_or_default() {
            "packs" => return btrship_upload::pack::pack_object_name(&key, bytes) == name,
            "keyslots" => {
                return btrship_upload::format::from_cbor::<btrship_upload::format::KeySlot>(bytes)
                    .is_ok()
            }
            "config" => K::Config,
            "keys" => K::KeyCheck,
            "index" => K::Index,
            "snapshots" => K::Snapshot,
            "versions" => K::Version,
            "chains" => K::ChainRegistration,
            "summaries" => K::Summary,
            "forgets" => K::Forget,
            "gc" => K::Garbage,
            _ => return true,
        };
        key.open(kind, name.as_bytes(), bytes).is_ok()
    })
}
