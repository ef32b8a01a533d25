//! A seeded, per-request fault-injecting HTTP/1.1 reverse proxy for the
//! integration tests.
//!
//! [`FaultProxy`] listens on `127.0.0.1:0` and forwards every client
//! connection to the S3 server (moto) over a connection of its own (opened
//! lazily, one per client connection). Bytes are forwarded verbatim: the
//! Host header and every other header are unchanged, as SigV4 signs them.
//! Bodies are streamed, never buffered whole.
//!
//! Faults are drawn **per request** (clients reuse keep-alive connections),
//! one draw from a seeded splitmix64 PRNG per request in arrival order, so a
//! seed gives a reproducible fault sequence. The kinds of fault
//! ([`FaultKind`], probabilities in [`FaultConfig`]):
//!
//! - `503` / `500`: answer `503 SlowDown` / `500 InternalError` with an S3
//!   XML error body, without forwarding the request;
//! - `reset_before`: TCP RST to the client before anything is forwarded;
//! - `truncate_request`: forward the head and only part of the request body
//!   (half of the head when there is no body), then RST both sides;
//! - `reset_after`: forward the request, read the whole response (the server
//!   has APPLIED the request), then RST the client;
//! - `truncate_response`: relay the response head and part of its body (half
//!   of the head when there is no body), then close the client connection;
//! - `stall`: like `truncate_response`, but stall for [`FaultConfig::stall`]
//!   before closing.
//!
//! [`FaultProxy::set_rule`] aims a fault at particular requests (say, the
//! first commit of a staged upload) instead of the draw.
//!
//! After an injected fault the client connection and its upstream
//! connection are closed. [`FaultProxy::set_down`] simulates an outage:
//! every new connection and every request on an existing connection is
//! reset at once (counted as faults of kind `"down"`).
//!
//! The proxy runs on its own thread with its own tokio runtime, so it is
//! used from ordinary `#[test]` functions (and from async ones too):
//!
//! ```ignore
//! let proxy = FaultProxy::start(moto_addr, FaultConfig::uniform(seed, 0.2))?;
//! // point the S3 client at proxy.endpoint() ...
//! println!("{:?}", proxy.stats());
//! ```
//!
//! Set `FAULTPROXY_LOG=1` to log every injected fault and connection error
//! to stderr.
//!
//! Limits: plain HTTP/1.x only (no TLS, no protocol upgrades); a request
//! body is forwarded whole before the response is read (moto reads every
//! body; an upstream that answers early and stops reading a large body gets
//! the client reset); for `Expect: 100-continue` the body is sent after
//! upstream's `100 Continue` or after 1 s without an answer; heads and chunk
//! size lines are limited to 64 KiB.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::time::Instant;

/// Per-connection read buffer; also the limit on an HTTP head or line.
const BUF_SIZE: usize = 64 * 1024;
/// How long to wait for upstream's `100 Continue` before sending the body
/// anyway (as curl does).
const CONTINUE_WAIT: Duration = Duration::from_secs(1);
/// How long to drain a client after answering an injected error, so that the
/// client reads the answer instead of an RST.
const LINGER: Duration = Duration::from_secs(2);

// ---------------------------------------------------------------------------
// Configuration and statistics
// ---------------------------------------------------------------------------

/// A kind of injected fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FaultKind {
    /// `503 SlowDown` answered by the proxy.
    SlowDown503,
    /// `500 InternalError` answered by the proxy.
    InternalError500,
    /// RST before anything is forwarded.
    ResetBefore,
    /// Part of the request forwarded, then RST both sides.
    TruncateRequest,
    /// Request applied upstream, then RST to the client.
    ResetAfter,
    /// Part of the response relayed, then the client connection closed.
    TruncateResponse,
    /// Part of the response relayed, then a stall, then close.
    Stall,
}

impl FaultKind {
    /// Every kind, in the order the cumulative draw walks them.
    pub const ALL: [FaultKind; 7] = [
        FaultKind::SlowDown503,
        FaultKind::InternalError500,
        FaultKind::ResetBefore,
        FaultKind::TruncateRequest,
        FaultKind::ResetAfter,
        FaultKind::TruncateResponse,
        FaultKind::Stall,
    ];

    /// The key of this kind in [`FaultStats::by_kind`]: `"503"`, `"500"`,
    /// `"reset_before"`, `"truncate_request"`, `"reset_after"`,
    /// `"truncate_response"` or `"stall"`.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::SlowDown503 => "503",
            FaultKind::InternalError500 => "500",
            FaultKind::ResetBefore => "reset_before",
            FaultKind::TruncateRequest => "truncate_request",
            FaultKind::ResetAfter => "reset_after",
            FaultKind::TruncateResponse => "truncate_response",
            FaultKind::Stall => "stall",
        }
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What to inject. Each request draws one number `u` in `[0, 1)` and walks
/// the probabilities cumulatively in [`FaultKind::ALL`] order (`p_503`,
/// `p_500`, `p_reset_before`, ...): the first kind whose running sum exceeds
/// `u` is injected, none if the sum stays at or below `u`. Keep the sum at
/// most 1.
#[derive(Clone, Debug, PartialEq)]
pub struct FaultConfig {
    /// PRNG seed; [`FaultProxy::start`] and [`FaultProxy::set_config`]
    /// (re)seed the generator with it.
    pub seed: u64,
    /// Answer `503 SlowDown` (S3 XML error body) without forwarding.
    pub p_503: f64,
    /// Answer `500 InternalError` without forwarding.
    pub p_500: f64,
    /// TCP RST to the client (SO_LINGER 0) before anything is forwarded.
    pub p_reset_before: f64,
    /// Forward the head and only part of the request body upstream, then RST
    /// both sides.
    pub p_truncate_request: f64,
    /// Forward fully, read the full upstream response (so the server APPLIED
    /// it), then RST the client.
    pub p_reset_after: f64,
    /// Forward, relay the response head and part of the body, then close the
    /// client connection.
    pub p_truncate_response: f64,
    /// Forward, relay the response head and part of the body, then stall for
    /// `stall` before closing.
    pub p_stall: f64,
    /// How long a `stall` fault stalls.
    pub stall: Duration,
    /// Delay added before handling every request (faulted or not).
    pub latency: Duration,
}

impl Default for FaultConfig {
    fn default() -> Self {
        FaultConfig::none()
    }
}

impl FaultConfig {
    /// No faults, no latency: a transparent proxy.
    pub fn none() -> Self {
        FaultConfig {
            seed: 0,
            p_503: 0.0,
            p_500: 0.0,
            p_reset_before: 0.0,
            p_truncate_request: 0.0,
            p_reset_after: 0.0,
            p_truncate_response: 0.0,
            p_stall: 0.0,
            stall: Duration::from_secs(3),
            latency: Duration::ZERO,
        }
    }

    /// `total_fault_rate` split evenly over the 7 kinds, 2 ms latency per
    /// request, 3 s stalls.
    pub fn uniform(seed: u64, total_fault_rate: f64) -> Self {
        let p = total_fault_rate / FaultKind::ALL.len() as f64;
        FaultConfig {
            seed,
            p_503: p,
            p_500: p,
            p_reset_before: p,
            p_truncate_request: p,
            p_reset_after: p,
            p_truncate_response: p,
            p_stall: p,
            stall: Duration::from_secs(3),
            latency: Duration::from_millis(2),
        }
    }

    /// Only `kind`, with probability `p`; no latency, 3 s stalls.
    pub fn only(seed: u64, kind: FaultKind, p: f64) -> Self {
        let mut cfg = FaultConfig {
            seed,
            ..FaultConfig::none()
        };
        *cfg.probability_mut(kind) = p;
        cfg
    }

    /// The probability of `kind`.
    pub fn probability(&self, kind: FaultKind) -> f64 {
        match kind {
            FaultKind::SlowDown503 => self.p_503,
            FaultKind::InternalError500 => self.p_500,
            FaultKind::ResetBefore => self.p_reset_before,
            FaultKind::TruncateRequest => self.p_truncate_request,
            FaultKind::ResetAfter => self.p_reset_after,
            FaultKind::TruncateResponse => self.p_truncate_response,
            FaultKind::Stall => self.p_stall,
        }
    }

    /// The probability of `kind`, for changing it.
    pub fn probability_mut(&mut self, kind: FaultKind) -> &mut f64 {
        match kind {
            FaultKind::SlowDown503 => &mut self.p_503,
            FaultKind::InternalError500 => &mut self.p_500,
            FaultKind::ResetBefore => &mut self.p_reset_before,
            FaultKind::TruncateRequest => &mut self.p_truncate_request,
            FaultKind::ResetAfter => &mut self.p_reset_after,
            FaultKind::TruncateResponse => &mut self.p_truncate_response,
            FaultKind::Stall => &mut self.p_stall,
        }
    }

    /// The fault for a uniform draw `u` in `[0, 1)`.
    fn pick(&self, u: f64) -> Option<FaultKind> {
        let mut sum = 0.0;
        for kind in FaultKind::ALL {
            let p = self.probability(kind);
            if p > 0.0 {
                sum += p;
                if u < sum {
                    return Some(kind);
                }
            }
        }
        None
    }
}

/// The [`FaultStats::by_kind`] key of resets by outage mode
/// ([`FaultProxy::set_down`]).
pub const DOWN: &str = "down";

/// Counters since [`FaultProxy::start`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FaultStats {
    /// Requests received, plus connections reset by outage mode at accept
    /// (each would have carried a request).
    pub requests: u64,
    /// Of those, the ones that got a fault: injected, or reset by outage
    /// mode. Always the sum of `by_kind`.
    pub faulted: u64,
    /// Faults by [`FaultKind::name`], and outage resets under [`DOWN`]
    /// (`"down"`). Every key is present (0 when never seen), so
    /// `by_kind["stall"]` never panics.
    pub by_kind: BTreeMap<&'static str, u64>,
}

impl FaultStats {
    fn new() -> Self {
        let mut by_kind: BTreeMap<&'static str, u64> =
            FaultKind::ALL.iter().map(|k| (k.name(), 0)).collect();
        by_kind.insert(DOWN, 0);
        FaultStats {
            requests: 0,
            faulted: 0,
            by_kind,
        }
    }
}

/// splitmix64 (Steele, Lea, Flood 2014): tiny, seedable, good enough.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

// ---------------------------------------------------------------------------
// The proxy handle
// ---------------------------------------------------------------------------

/// The fault-injecting reverse proxy; see the module documentation. Dropping
/// it stops the listener, kills every connection and joins its thread.
pub struct FaultProxy {
    port: u16,
    upstream: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultProxy")
            .field("port", &self.port)
            .field("upstream", &self.upstream)
            .field("down", &self.shared.down.load(Ordering::SeqCst))
            .finish()
    }
}

impl FaultProxy {
    /// Binds `127.0.0.1:0` and starts proxying to `upstream` on a thread of
    /// its own, with faults per `cfg`.
    pub fn start(upstream: SocketAddr, cfg: FaultConfig) -> io::Result<FaultProxy> {
        let std_listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        std_listener.set_nonblocking(true)?;
        let port = std_listener.local_addr()?.port();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let listener = {
            let _guard = runtime.enter();
            TcpListener::from_std(std_listener)?
        };
        let shared = Arc::new(Shared {
            port,
            down: AtomicBool::new(false),
            deny: Mutex::new(None),
            rule: Mutex::new(None),
            seen: Mutex::new(Vec::new()),
            state: Mutex::new(State {
                rng: SplitMix64(cfg.seed),
                cfg,
                stats: FaultStats::new(),
            }),
        });
        let (shutdown_tx, shutdown_rx) = oneshot::channel();
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name(format!("faultproxy-{port}"))
            .spawn(move || {
                runtime.block_on(accept_loop(listener, upstream, thread_shared, shutdown_rx));
                // Dropping the runtime drops every connection task, and with
                // them their sockets.
                drop(runtime);
            })?;
        Ok(FaultProxy {
            port,
            upstream,
            shared,
            shutdown: Some(shutdown_tx),
            thread: Some(thread),
        })
    }

    /// The port the proxy listens on (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT`, for the S3 client's endpoint.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The server the proxy forwards to.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// Replaces the configuration and reseeds the PRNG with `cfg.seed`;
    /// takes effect for the following requests. Statistics are kept.
    pub fn set_config(&self, cfg: FaultConfig) {
        let mut state = self.shared.lock();
        state.rng = SplitMix64(cfg.seed);
        state.cfg = cfg;
    }

    /// Outage mode: while `down`, every new connection and every request on
    /// an existing connection is reset at once (the store is unreachable).
    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, Ordering::SeqCst);
    }

    /// Refuses (403 AccessDenied, not forwarded) every request `rule`
    /// says the store's policy denies; `None` lets everything through.
    pub fn set_deny(&self, rule: Option<DenyRule>) {
        *self.shared.deny.lock().unwrap_or_else(|p| p.into_inner()) = rule;
    }

    /// Injects the fault `rule` picks for a request (from its method and
    /// target) instead of the drawn one; `None` from the rule leaves the
    /// draw's. The draw is made either way, so a seed's sequence does not
    /// move. For faults aimed at one request (the answer to a commit).
    pub fn set_rule(&self, rule: Option<FaultRule>) {
        *self.shared.rule.lock().unwrap_or_else(|p| p.into_inner()) = rule;
    }

    /// Every request line seen so far (`METHOD target HTTP/1.1`).
    pub fn request_lines(&self) -> Vec<String> {
        self.shared
            .seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> FaultStats {
        self.shared.lock().stats.clone()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            // An error means the thread is gone already.
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                eprintln!("faultproxy {}: proxy thread panicked", self.port);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Shared state
// ---------------------------------------------------------------------------

struct Shared {
    port: u16,
    down: AtomicBool,
    state: Mutex<State>,
    /// Access rules: a request they refuse is answered `403 AccessDenied`
    /// (never forwarded), as a store whose policy denies it would.
    deny: Mutex<Option<DenyRule>>,
    /// Faults aimed at particular requests ([`FaultProxy::set_rule`]).
    rule: Mutex<Option<FaultRule>>,
    /// Every request line seen, in order (method and target).
    seen: Mutex<Vec<String>>,
}

/// Decides from a request's method and target (path and query) whether the
/// store's policy refuses it.
pub type DenyRule = Arc<dyn Fn(&str, &str) -> bool + Send + Sync>;

/// Picks the fault for a request from its method and target, or `None`
/// to leave the draw's.
pub type FaultRule = Arc<dyn Fn(&str, &str) -> Option<FaultKind> + Send + Sync>;

struct State {
    cfg: FaultConfig,
    rng: SplitMix64,
    stats: FaultStats,
}

/// The outcome of one request's draw.
struct Draw {
    seq: u64,
    fault: Option<FaultKind>,
    latency: Duration,
    stall: Duration,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn is_down(&self) -> bool {
        self.down.load(Ordering::SeqCst)
    }

    /// Counts an outage reset (no PRNG draw: the fault sequence is the same
    /// with or without outages).
    fn count_down(&self) {
        let stats = &mut self.lock().stats;
        stats.requests += 1;
        stats.faulted += 1;
        *stats.by_kind.entry(DOWN).or_insert(0) += 1;
    }

    /// Draws the next request's fault; `aimed` (a rule's pick) replaces it.
    fn draw(&self, aimed: Option<FaultKind>) -> Draw {
        let mut state = self.lock();
        let u = state.rng.next_f64();
        let fault = aimed.or(state.cfg.pick(u));
        state.stats.requests += 1;
        if let Some(kind) = fault {
            state.stats.faulted += 1;
            *state.stats.by_kind.entry(kind.name()).or_insert(0) += 1;
        }
        Draw {
            seq: state.stats.requests,
            fault,
            latency: state.cfg.latency,
            stall: state.cfg.stall,
        }
    }

    fn log(&self, args: fmt::Arguments<'_>) {
        static ENABLED: OnceLock<bool> = OnceLock::new();
        let enabled = *ENABLED.get_or_init(|| {
            std::env::var_os("FAULTPROXY_LOG").is_some_and(|v| !v.is_empty() && v != "0")
        });
        if enabled {
            eprintln!("faultproxy {}: {args}", self.port);
        }
    }
}

// ---------------------------------------------------------------------------
// Connections
// ---------------------------------------------------------------------------

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    shared: Arc<Shared>,
    mut shutdown: oneshot::Receiver<()>,
) {
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    if shared.is_down() {
                        shared.count_down();
                        shared.log(format_args!("outage mode: reset new connection"));
                        reset(stream, &shared);
                        continue;
                    }
                    if let Err(e) = stream.set_nodelay(true) {
                        shared.log(format_args!("set_nodelay: {e}"));
                    }
                    tokio::spawn(serve_connection(stream, upstream, Arc::clone(&shared)));
                }
                Err(e) => {
                    // E.g. out of file descriptors: do not spin.
                    shared.log(format_args!("accept: {e}"));
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
        }
    }
}

/// How a client connection ends.
enum End {
    /// The client closed the connection between requests.
    Eof,
    /// Orderly close (FIN) of the client connection.
    Close,
    /// Answered without reading everything the client may send: FIN, then
    /// drain the client for a while so that it reads the answer, not an RST.
    Linger,
    /// RST to the client.
    Reset,
    /// RST to the client and upstream.
    ResetBoth,
}

/// Closes `stream` with an RST (SO_LINGER 0).
fn reset(stream: TcpStream, shared: &Shared) {
    if let Err(e) = stream.set_zero_linger() {
        shared.log(format_args!("SO_LINGER: {e}"));
    }
    drop(stream);
}

async fn serve_connection(stream: TcpStream, upstream: SocketAddr, shared: Arc<Shared>) {
    let mut client = Conn::new(stream);
    let mut up: Option<Conn> = None;
    let end = loop {
        match handle_request(&mut client, &mut up, upstream, &shared).await {
            Ok(None) => continue,
            Ok(Some(end)) => break end,
            Err(e) => {
                shared.log(format_args!("connection error, resetting client: {e}"));
                break End::Reset;
            }
        }
    };
    match end {
        End::Eof => {}
        End::Close => {
            // The peer may be gone already; the socket is closed either way.
            let _ = client.stream.shutdown().await;
        }
        End::Linger => lingering_close(client).await,
        End::Reset => reset(client.stream, &shared),
        End::ResetBoth => {
            if let Some(up) = up.take() {
                reset(up.stream, &shared);
            }
            reset(client.stream, &shared);
        }
    }
}

async fn lingering_close(mut client: Conn) {
    if client.stream.shutdown().await.is_err() {
        return;
    }
    let drain = async {
        loop {
            client.discard_buffered();
            match client.fill().await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    };
    // Timing out just means the client kept the connection open.
    let _ = tokio::time::timeout(LINGER, drain).await;
}

/// Handles one request on a client connection: `Ok(None)` to keep the
/// connection alive for the next one, `Ok(Some(end))` to end it.
async fn handle_request(
    client: &mut Conn,
    up: &mut Option<Conn>,
    upstream: SocketAddr,
    shared: &Shared,
) -> io::Result<Option<End>> {
    let Some(head) = client.read_head().await? else {
        return Ok(Some(End::Eof));
    };
    if shared.is_down() {
        shared.count_down();
        shared.log(format_args!("outage mode: reset request"));
        return Ok(Some(End::Reset));
    }
    let req = Request::parse(head)?;
    shared
        .seen
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(req.line().to_string());
    let rule = shared
        .deny
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let mut parts = req.line().split_ascii_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if rule.is_some_and(|deny| deny(method, target)) {
        shared.log(format_args!("denied {}", req.line()));
        if !req.expect_continue {
            relay_body(client, &mut tokio::io::sink(), req.body, Cut::None).await?;
        }
        client
            .stream
            .write_all(&denied_response(req.is_head))
            .await?;
        return Ok(Some(End::Linger));
    }
    let aimed = shared
        .rule
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .and_then(|rule| rule(method, target));
    let draw = shared.draw(aimed);
    if let Some(kind) = draw.fault {
        shared.log(format_args!(
            "request #{} {}: injecting {kind}",
            draw.seq,
            req.line()
        ));
    }
    if !draw.latency.is_zero() {
        tokio::time::sleep(draw.latency).await;
    }

    match draw.fault {
        Some(kind @ (FaultKind::SlowDown503 | FaultKind::InternalError500)) => {
            if !req.expect_continue {
                // Read the body first, so the client is not writing into a
                // closing connection when it should be reading the answer.
                relay_body(client, &mut tokio::io::sink(), req.body, Cut::None).await?;
            }
            client
                .stream
                .write_all(&error_response(kind, req.is_head))
                .await?;
            return Ok(Some(End::Linger));
        }
        Some(FaultKind::ResetBefore) => return Ok(Some(End::Reset)),
        _ => {}
    }

    let upc = match connect_upstream(up, upstream).await {
        Ok(upc) => upc,
        Err(e) => {
            shared.log(format_args!("cannot connect to {upstream}: {e}"));
            return Ok(Some(End::Reset));
        }
    };

    if draw.fault == Some(FaultKind::TruncateRequest) {
        if let Err(e) = truncate_request(client, upc, &req).await {
            shared.log(format_args!("truncate_request: {e}"));
        }
        return Ok(Some(End::ResetBoth));
    }

    upc.stream.write_all(&req.head).await?;
    let mut early = None;
    if req.expect_continue && !req.body.is_empty() {
        early = await_continue(upc, client).await?;
    }
    let answered_early = early.is_some();
    let resp = match early {
        Some(resp) => resp,
        None => {
            relay_body(client, &mut upc.stream, req.body, Cut::None).await?;
            read_final_response(upc, client).await?
        }
    };
    let framing = resp.framing(&req);

    match draw.fault {
        Some(FaultKind::ResetAfter) => {
            relay_body(upc, &mut tokio::io::sink(), framing, Cut::None).await?;
            Ok(Some(End::Reset))
        }
        Some(kind @ (FaultKind::TruncateResponse | FaultKind::Stall)) => {
            if framing.is_empty() {
                let half = resp.head.len() / 2;
                client.stream.write_all(&resp.head[..half]).await?;
            } else {
                client.stream.write_all(&resp.head).await?;
                relay_body(upc, &mut client.stream, framing, Cut::Half).await?;
            }
            // The rest of the response is never read: drop the connection.
            *up = None;
            if kind == FaultKind::Stall {
                tokio::time::sleep(draw.stall).await;
            }
            Ok(Some(End::Close))
        }
        _ => {
            client.stream.write_all(&resp.head).await?;
            relay_body(upc, &mut client.stream, framing, Cut::None).await?;
            if answered_early {
                // The client may still send the body it was not asked for.
                Ok(Some(End::Linger))
            } else if req.close || resp.close() || framing == Framing::UntilClose {
                Ok(Some(End::Close))
            } else {
                Ok(None)
            }
        }
    }
}

/// The connection to upstream for this client connection: the existing one
/// if upstream has not closed it, else a new one.
async fn connect_upstream(up: &mut Option<Conn>, upstream: SocketAddr) -> io::Result<&mut Conn> {
    let reusable = up.as_mut().is_some_and(Conn::is_reusable);
    if !reusable {
        *up = None;
        let stream = TcpStream::connect(upstream).await?;
        stream.set_nodelay(true)?;
        *up = Some(Conn::new(stream));
    }
    up.as_mut()
        .ok_or_else(|| io::Error::other("no upstream connection"))
}

/// Forwards part of the request upstream: half of the head when there is no
/// body, else the head and half of the body (of the first chunk if chunked).
async fn truncate_request(client: &mut Conn, upc: &mut Conn, req: &Request) -> io::Result<()> {
    if req.body.is_empty() {
        let half = req.head.len() / 2;
        return upc.stream.write_all(&req.head[..half]).await;
    }
    upc.stream.write_all(&req.head).await?;
    if req.expect_continue && await_continue(upc, client).await?.is_some() {
        // Upstream answered without wanting the body: nothing to truncate.
        return Ok(());
    }
    relay_body(client, &mut upc.stream, req.body, Cut::Half).await
}

/// After forwarding an `Expect: 100-continue` head: waits for upstream's
/// `100 Continue` and relays it to the client (`Ok(None)`: send the body), or
/// returns upstream's final response if it answers at once. Sends the body
/// anyway if upstream says nothing for [`CONTINUE_WAIT`].
async fn await_continue(upc: &mut Conn, client: &mut Conn) -> io::Result<Option<Response>> {
    let deadline = Instant::now() + CONTINUE_WAIT;
    loop {
        let head = match tokio::time::timeout_at(deadline, upc.read_head()).await {
            Err(_elapsed) => return Ok(None),
            Ok(head) => head?.ok_or_else(upstream_eof)?,
        };
        let resp = Response::parse(head)?;
        if !resp.is_interim() {
            return Ok(Some(resp));
        }
        client.stream.write_all(&resp.head).await?;
        if resp.status == 100 {
            return Ok(None);
        }
    }
}

/// Reads upstream's final response head, relaying interim (1xx) responses
/// to the client.
async fn read_final_response(upc: &mut Conn, client: &mut Conn) -> io::Result<Response> {
    loop {
        let head = upc.read_head().await?.ok_or_else(upstream_eof)?;
        let resp = Response::parse(head)?;
        if !resp.is_interim() {
            return Ok(resp);
        }
        client.stream.write_all(&resp.head).await?;
    }
}

fn upstream_eof() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "upstream closed the connection before a response",
    )
}

/// The answer of a store whose policy denies the request.
fn denied_response(head_request: bool) -> Vec<u8> {
    let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>AccessDenied</Code>\
                <Message>Access Denied (faultproxy policy)</Message></Error>";
    let mut out = format!(
        "HTTP/1.1 403 Forbidden\r\n\
         Content-Type: application/xml\r\n\
         Content-Length: {}\r\n\
         x-amz-request-id: FAULTPROXY\r\n\
         Connection: close\r\n\
         \r\n",
        body.len()
    )
    .into_bytes();
    if !head_request {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

/// The injected `503 SlowDown` or `500 InternalError` answer.
fn error_response(kind: FaultKind, head_request: bool) -> Vec<u8> {
    let (status, code) = match kind {
        FaultKind::SlowDown503 => ("503 Slow Down", "SlowDown"),
        _ => ("500 Internal Server Error", "InternalError"),
    };
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code>\
         <Message>injected by faultproxy</Message></Error>"
    );
    let mut out = format!(
        "HTTP/1.1 {status}\r\n\
         Content-Type: application/xml\r\n\
         Content-Length: {}\r\n\
         x-amz-request-id: FAULTPROXY\r\n\
         Connection: close\r\n\
         \r\n",
        body.len()
    )
    .into_bytes();
    if !head_request {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

// ---------------------------------------------------------------------------
// Buffered connection and body relaying
// ---------------------------------------------------------------------------

/// A TCP stream with a read buffer, so that bytes read past a head or a body
/// (the next request, a body after its head) are kept.
struct Conn {
    stream: TcpStream,
    buf: Box<[u8]>,
    pos: usize,
    end: usize,
}

impl Conn {
    fn new(stream: TcpStream) -> Self {
        Conn {
            stream,
            buf: vec![0; BUF_SIZE].into_boxed_slice(),
            pos: 0,
            end: 0,
        }
    }

    fn buffered(&self) -> &[u8] {
        &self.buf[self.pos..self.end]
    }

    fn consume(&mut self, n: usize) {
        self.pos += n;
        if self.pos >= self.end {
            self.pos = 0;
            self.end = 0;
        }
    }

    fn discard_buffered(&mut self) {
        self.pos = 0;
        self.end = 0;
    }

    /// Reads more bytes into the buffer: `Ok(0)` at EOF. Cancel-safe.
    async fn fill(&mut self) -> io::Result<usize> {
        if self.end == self.buf.len() {
            if self.pos == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "HTTP head or line longer than 64 KiB",
                ));
            }
            self.buf.copy_within(self.pos..self.end, 0);
            self.end -= self.pos;
            self.pos = 0;
        }
        let n = self.stream.read(&mut self.buf[self.end..]).await?;
        self.end += n;
        Ok(n)
    }

    /// An idle connection is reusable unless the peer closed it or sent
    /// something unasked.
    fn is_reusable(&mut self) -> bool {
        if !self.buffered().is_empty() {
            return false;
        }
        let mut probe = [0u8; 1];
        matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// Reads an HTTP head up to and including the blank line; `Ok(None)` at
    /// EOF before any byte of it. Cancel-safe.
    async fn read_head(&mut self) -> io::Result<Option<Vec<u8>>> {
        loop {
            // Tolerate stray CRLFs between messages (RFC 9112, 2.2).
            while self.buffered().starts_with(b"\r\n") {
                self.consume(2);
            }
            if let Some(i) = find(self.buffered(), b"\r\n\r\n") {
                let head = self.buffered()[..i + 4].to_vec();
                self.consume(i + 4);
                return Ok(Some(head));
            }
            if self.fill().await? == 0 {
                if self.buffered().is_empty() {
                    return Ok(None);
                }
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed inside an HTTP head",
                ));
            }
        }
    }

    /// Reads a line up to and including its `\n`.
    async fn read_line(&mut self) -> io::Result<Vec<u8>> {
        loop {
            if let Some(i) = self.buffered().iter().position(|&b| b == b'\n') {
                let line = self.buffered()[..=i].to_vec();
                self.consume(i + 1);
                return Ok(line);
            }
            if self.fill().await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed inside a chunked body",
                ));
            }
        }
    }

    /// Copies exactly `n` bytes to `dst`.
    async fn copy_exact<W: AsyncWrite + Unpin>(&mut self, dst: &mut W, n: u64) -> io::Result<()> {
        let mut left = n;
        while left > 0 {
            if self.buffered().is_empty() && self.fill().await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed inside a body",
                ));
            }
            let take = self
                .buffered()
                .len()
                .min(usize::try_from(left).unwrap_or(usize::MAX));
            dst.write_all(&self.buffered()[..take]).await?;
            self.consume(take);
            left -= take as u64;
        }
        Ok(())
    }

    /// Copies everything up to EOF to `dst`.
    async fn copy_to_eof<W: AsyncWrite + Unpin>(&mut self, dst: &mut W) -> io::Result<()> {
        loop {
            if !self.buffered().is_empty() {
                dst.write_all(self.buffered()).await?;
                self.discard_buffered();
            }
            if self.fill().await? == 0 {
                return Ok(());
            }
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// How a message body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
    UntilClose,
}

impl Framing {
    fn is_empty(self) -> bool {
        matches!(self, Framing::None | Framing::Length(0))
    }
}

/// Whether to relay a whole body or only part of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cut {
    None,
    /// Half of a `Content-Length` body, half of the first chunk's data (with
    /// its size line; nothing if the body is empty), half of what is first
    /// read of a read-until-close body.
    Half,
}

/// Relays a body from `src` to `dst` verbatim (chunk framing included).
async fn relay_body<W: AsyncWrite + Unpin>(
    src: &mut Conn,
    dst: &mut W,
    framing: Framing,
    cut: Cut,
) -> io::Result<()> {
    match framing {
        Framing::None => Ok(()),
        Framing::Length(n) => {
            let n = if cut == Cut::Half { n / 2 } else { n };
            src.copy_exact(dst, n).await
        }
        Framing::Chunked => relay_chunked(src, dst, cut).await,
        Framing::UntilClose => {
            if cut == Cut::None {
                return src.copy_to_eof(dst).await;
            }
            if src.buffered().is_empty() && src.fill().await? == 0 {
                return Ok(());
            }
            let half = src.buffered().len() / 2;
            dst.write_all(&src.buffered()[..half]).await?;
            src.consume(half);
            Ok(())
        }
    }
}

async fn relay_chunked<W: AsyncWrite + Unpin>(
    src: &mut Conn,
    dst: &mut W,
    cut: Cut,
) -> io::Result<()> {
    loop {
        let line = src.read_line().await?;
        let size = parse_chunk_size(&line)?;
        if cut == Cut::Half {
            if size > 0 {
                dst.write_all(&line).await?;
                src.copy_exact(dst, size / 2).await?;
            }
            return Ok(());
        }
        dst.write_all(&line).await?;
        if size == 0 {
            // Trailer section, up to and including the blank line.
            loop {
                let line = src.read_line().await?;
                dst.write_all(&line).await?;
                if line == b"\r\n" || line == b"\n" {
                    return Ok(());
                }
            }
        }
        // The data and its CRLF.
        src.copy_exact(dst, size + 2).await?;
    }
}

fn parse_chunk_size(line: &[u8]) -> io::Result<u64> {
    let size = line.split(|&b| b == b';').next().unwrap_or(line);
    std::str::from_utf8(size)
        .ok()
        .and_then(|s| u64::from_str_radix(s.trim(), 16).ok())
        .ok_or_else(|| invalid("bad chunk size line"))
}

// ---------------------------------------------------------------------------
// HTTP heads
// ---------------------------------------------------------------------------

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

/// The header fields that matter for framing and connection reuse.
#[derive(Default)]
struct Fields {
    content_length: Option<u64>,
    transfer_encoding: bool,
    chunked: bool,
    close: bool,
    keep_alive: bool,
    expect_continue: bool,
}

/// Splits a head into its start line and header fields.
fn parse_head(head: &[u8]) -> io::Result<(String, Fields)> {
    let mut lines = head
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let start = String::from_utf8_lossy(lines.next().unwrap_or_default()).into_owned();
    let mut fields = Fields::default();
    for line in lines {
        if line.is_empty() || line[0] == b' ' || line[0] == b'\t' {
            continue;
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return Err(invalid("header line without a colon"));
        };
        let name = line[..colon].trim_ascii();
        let value = String::from_utf8_lossy(line[colon + 1..].trim_ascii());
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = value
                .split(',')
                .map(|v| v.trim().parse::<u64>())
                .try_fold(None, |prev: Option<u64>, n| match (prev, n) {
                    (_, Err(_)) => Err(()),
                    (Some(p), Ok(n)) if p != n => Err(()),
                    (_, Ok(n)) => Ok(Some(n)),
                })
                .ok()
                .flatten()
                .ok_or_else(|| invalid("bad Content-Length"))?;
            if fields.content_length.is_some_and(|prev| prev != n) {
                return Err(invalid("conflicting Content-Length headers"));
            }
            fields.content_length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            fields.transfer_encoding = true;
            fields.chunked = value
                .rsplit(',')
                .next()
                .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
        } else if name.eq_ignore_ascii_case(b"connection") {
            for token in value.split(',') {
                let token = token.trim();
                fields.close |= token.eq_ignore_ascii_case("close");
                fields.keep_alive |= token.eq_ignore_ascii_case("keep-alive");
            }
        } else if name.eq_ignore_ascii_case(b"expect") {
            fields.expect_continue = value.eq_ignore_ascii_case("100-continue");
        }
    }
    Ok((start, fields))
}

struct Request {
    /// The head exactly as received.
    head: Vec<u8>,
    start: String,
    body: Framing,
    expect_continue: bool,
    is_head: bool,
    /// The client wants the connection closed after this exchange.
    close: bool,
}

impl Request {
    fn parse(head: Vec<u8>) -> io::Result<Request> {
        let (start, fields) = parse_head(&head)?;
        let mut parts = start.split_ascii_whitespace();
        let (Some(method), Some(_target), Some(version)) =
            (parts.next(), parts.next(), parts.next())
        else {
            return Err(invalid("bad request line"));
        };
        if !version.starts_with("HTTP/1.") {
            return Err(invalid("not an HTTP/1.x request"));
        }
        let body = if fields.transfer_encoding {
            if !fields.chunked {
                return Err(invalid("request Transfer-Encoding without chunked"));
            }
            Framing::Chunked
        } else {
            fields.content_length.map_or(Framing::None, Framing::Length)
        };
        let is_head = method.eq_ignore_ascii_case("HEAD");
        let close = fields.close || (version == "HTTP/1.0" && !fields.keep_alive);
        Ok(Request {
            head,
            start,
            body,
            expect_continue: fields.expect_continue,
            is_head,
            close,
        })
    }

    /// The request line, for logs.
    fn line(&self) -> &str {
        &self.start
    }
}

struct Response {
    /// The head exactly as received.
    head: Vec<u8>,
    status: u16,
    http10: bool,
    fields: Fields,
}

impl Response {
    fn parse(head: Vec<u8>) -> io::Result<Response> {
        let (start, fields) = parse_head(&head)?;
        let mut parts = start.split_ascii_whitespace();
        let version = parts.next().unwrap_or_default();
        if !version.starts_with("HTTP/1.") {
            return Err(invalid("not an HTTP/1.x response"));
        }
        let status = parts
            .next()
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| invalid("bad status line"))?;
        Ok(Response {
            head,
            status,
            http10: version == "HTTP/1.0",
            fields,
        })
    }

    /// 1xx other than 101: another response follows.
    fn is_interim(&self) -> bool {
        (100..200).contains(&self.status) && self.status != 101
    }

    /// Upstream closes the connection after this response.
    fn close(&self) -> bool {
        self.fields.close || (self.http10 && !self.fields.keep_alive)
    }

    fn framing(&self, req: &Request) -> Framing {
        if req.is_head
            || (100..200).contains(&self.status)
            || self.status == 204
            || self.status == 304
        {
            Framing::None
        } else if self.fields.transfer_encoding {
            if self.fields.chunked {
                Framing::Chunked
            } else {
                Framing::UntilClose
            }
        } else {
            self.fields
                .content_length
                .map_or(Framing::UntilClose, Framing::Length)
        }
    }
}
