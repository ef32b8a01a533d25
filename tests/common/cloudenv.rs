//! Real Azure and GCS servers for integration tests: Azurite (npm) and
//! fake-gcs-server (PyPI wheel) on 127.0.0.1, started once per test binary
//! with `scripts/azure-test-server` / `scripts/gcs-test-server` and stopped
//! (by pid) when the process exits; plus the environment the btrship
//! binary sees, as the services' own tools document it: Azurite's
//! connection string (`AZURE_STORAGE_CONNECTION_STRING`) and Google's
//! emulator convention (`STORAGE_EMULATOR_HOST`).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

/// Which emulator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Emulator {
    Azurite,
    FakeGcs,
}

impl Emulator {
    fn script(self) -> PathBuf {
        let name = match self {
            Emulator::Azurite => "azure-test-server",
            Emulator::FakeGcs => "gcs-test-server",
        };
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("scripts")
            .join(name)
    }

    /// The URL scheme of its repositories.
    pub fn scheme(self) -> &'static str {
        match self {
            Emulator::Azurite => "azure",
            Emulator::FakeGcs => "gs",
        }
    }
}

/// A running emulator.
pub struct Server {
    pub emulator: Emulator,
    dir: tempfile::TempDir,
    /// Azurite: `http://127.0.0.1:PORT/devstoreaccount1`;
    /// fake-gcs-server: `http://127.0.0.1:PORT`.
    pub endpoint: String,
}

impl Server {
    fn start(emulator: Emulator) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(emulator.script())
            .arg("start")
            .arg(dir.path())
            .output()
            .expect("run the emulator's script");
        assert!(
            out.status.success(),
            "cannot start {emulator:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let endpoint = std::fs::read_to_string(dir.path().join("endpoint"))
            .unwrap()
            .trim()
            .to_string();
        Server {
            emulator,
            dir,
            endpoint,
        }
    }

    /// The server's socket address (for a proxy in front of it).
    pub fn addr(&self) -> std::net::SocketAddr {
        let rest = self.endpoint.trim_start_matches("http://");
        rest.split('/')
            .next()
            .unwrap()
            .parse()
            .expect("endpoint is http://IP:PORT[/...]")
    }

    /// The endpoint with the proxy's address in place of the server's.
    pub fn endpoint_via(&self, proxy: &str) -> String {
        let path = self
            .endpoint
            .trim_start_matches("http://")
            .split_once('/')
            .map(|(_, p)| format!("/{p}"))
            .unwrap_or_default();
        format!("{}{path}", proxy.trim_end_matches('/'))
    }

    /// Creates a container (bucket) named `name`.
    pub fn create(&self, name: &str) {
        let out = Command::new(self.emulator.script())
            .arg("create")
            .arg(self.dir.path())
            .arg(name)
            .output()
            .expect("run the emulator's script");
        assert!(
            out.status.success(),
            "cannot create {name} on {:?}: {}",
            self.emulator,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A repository URL in container `name` under `prefix`, reached at
    /// `endpoint` (the server's own, or a proxy's).
    pub fn url(&self, name: &str, prefix: &str, endpoint: &str) -> String {
        format!(
            "{}://{name}/{prefix}?endpoint={endpoint}",
            self.emulator.scheme()
        )
    }

    fn stop(&self) {
        let _ = Command::new(self.emulator.script())
            .arg("stop")
            .arg(self.dir.path())
            .status();
    }
}

static SERVERS: Mutex<Vec<&'static Server>> = Mutex::new(Vec::new());

extern "C" fn stop_servers() {
    if let Ok(servers) = SERVERS.lock() {
        for s in servers.iter() {
            s.stop();
        }
    }
}

/// True (after saying so loudly) when the Azure/GCS tests are switched off.
pub fn skipped(test: &str) -> bool {
    if std::env::var_os("BTRSHIP_SKIP_CLOUDS").is_some() {
        eprintln!("\n*** SKIPPED: BTRSHIP_SKIP_CLOUDS is set; {test} did not run ***\n");
        return true;
    }
    false
}

/// The emulator, started on first use (one per test binary), with the
/// environment set for it. Credentials for both are in the environment at
/// once; each repository URL names its own endpoint.
pub fn server(emulator: Emulator) -> &'static Server {
    static AZURITE: OnceLock<&'static Server> = OnceLock::new();
    static FAKE_GCS: OnceLock<&'static Server> = OnceLock::new();
    let cell = match emulator {
        Emulator::Azurite => &AZURITE,
        Emulator::FakeGcs => &FAKE_GCS,
    };
    cell.get_or_init(|| {
        let server: &'static Server = Box::leak(Box::new(Server::start(emulator)));
        let mut all = SERVERS.lock().unwrap();
        if all.is_empty() {
            // Statics are never dropped: stop the servers when the process exits.
            // SAFETY: registering a plain extern "C" fn with atexit.
            unsafe { libc::atexit(stop_servers) };
        }
        all.push(server);
        match emulator {
            Emulator::Azurite => {
                for v in [
                    "AZURE_STORAGE_ACCOUNT",
                    "AZURE_STORAGE_KEY",
                    "AZURE_STORAGE_SAS_TOKEN",
                    "AZURE_CLIENT_ID",
                    "AZURE_TENANT_ID",
                    "AZURE_FEDERATED_TOKEN_FILE",
                ] {
                    std::env::remove_var(v);
                }
                let conn =
                    std::fs::read_to_string(server.dir.path().join("connection-string")).unwrap();
                std::env::set_var("AZURE_STORAGE_CONNECTION_STRING", conn.trim());
            }
            Emulator::FakeGcs => {
                std::env::remove_var("GOOGLE_APPLICATION_CREDENTIALS");
                std::env::set_var("STORAGE_EMULATOR_HOST", &server.endpoint);
            }
        }
        server
    })
}
