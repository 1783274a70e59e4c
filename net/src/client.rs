//! The client library: what services, operators and the `keyfort` CLI use to talk to a cluster
//! over the client protocol ([`crate::client_proto`], docs/format.md §5 frames, §8 messages).
//!
//! * [`Credential`]: a scope, a client id and a secret, with a text form and a 0600 file.
//! * [`Connection`]: one authenticated, pipelined connection to one node. Requests are written
//!   at once and answered through a [`Pending`], which is both a runtime-agnostic `Future` and a
//!   blocking [`Pending::wait`]. A reader thread per connection matches answers to requests by
//!   request id, so answers may come in any order.
//! * [`Client`]: one credential over every node of a cluster: connections opened lazily and
//!   reopened after failures, requests routed to the node leading the partition's shard, and
//!   retryable errors and lost connections retried with backoff until the request timeout.
//!
//! * [`ClientTls`]: TLS 1.3 to the nodes (rustls, [`crate::tls::client_config`]): the cluster
//!   CA, an optional client certificate, the name verified in each node's certificate. Without
//!   it a connection is plaintext, and plaintext is allowed to loopback addresses only
//!   ([`ClientError::Insecure`]).
//!
//! Std threads and blocking sockets only: no async runtime is needed or assumed. Over TLS the
//! design stays the same (callers write pipelined requests, a reader thread matches answers):
//! the rustls session sits in a mutex beside the raw socket, writers encrypt under it and write
//! the records after releasing it, the reader decrypts what its blocking read brought.

use crate::client_proto::{
    create_flags, proof_context, ErrorCode, ErrorReply, KeyStateCode, KeyWritten, Request,
    Response, Scope, ShardStatus, VersionInfo, CLIENT_MAX_FRAME_PAYLOAD, CLIENT_PROTOCOL_VERSION,
    CREDENTIAL_LEN,
};
use crate::frame::{self, flags, FrameHeader, FRAME_HEADER_BYTES};
use crate::tls::{classify, classify_io, TlsFailure};
use rustls_pki_types::ServerName;
use std::collections::HashMap;
use std::future::Future;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};
use thiserror::Error;

/// Default of [`ClientOptions::request_timeout`].
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Default of [`ClientOptions::connect_timeout`].
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Default of [`ClientOptions::max_in_flight`].
pub const DEFAULT_MAX_IN_FLIGHT: usize = 1024;
/// First pause of the [`Client`] before retrying a request; it doubles after each retry.
pub const RETRY_BACKOFF_START: Duration = Duration::from_millis(20);
/// Longest pause of the [`Client`] between two tries of a request: short, because the common
/// retryable error is a shard electing a new leader, and every pause past the election adds to
/// the write gap a client sees (the failover goal is 500 ms).
pub const RETRY_BACKOFF_MAX: Duration = Duration::from_millis(100);
/// After a node failed to connect, the [`Client`] does not try it again for this long while
/// other nodes are available (a dead node would otherwise cost a connect timeout per request).
pub const RECONNECT_HOLDOFF: Duration = Duration::from_millis(100);
/// Longest wait for the answer of a leader refresh (a `Route` call) after a `Retry` error or a
/// lost connection; the refresh is best effort and never fails the request itself.
pub const ROUTE_REFRESH_TIMEOUT: Duration = Duration::from_millis(500);
/// Request ids of the handshake: the hello, then the proof. Requests after it start at 3.
pub const HELLO_REQUEST_ID: u64 = 1;
pub const PROOF_REQUEST_ID: u64 = 2;
/// Bytes the reader thread asks the socket for at a time.
const READ_CHUNK_BYTES: usize = 64 << 10;
/// Largest capacity the TLS writer's record buffer keeps between writes (a bigger one, left by a
/// large request, is given back).
const TLS_OUT_KEEP_BYTES: usize = 256 << 10;

// ---- errors ----

/// Why a client call failed.
#[derive(Debug, Error, Clone)]
pub enum ClientError {
    /// The node answered with a typed error (or the library refused locally with one:
    /// `Overloaded` when `max_in_flight` answers are outstanding, `TooLarge` for a request over
    /// the frame limit).
    #[error("server error {0}")]
    Server(ErrorReply),
    /// No answer in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// A socket error (connect, read or write).
    #[error("i/o error: {0}")]
    Io(String),
    /// The peer broke the protocol (a bad frame, an answer to no request, an undecodable or
    /// unexpected answer); the connection is closed.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A credential text or file that does not parse.
    #[error("bad credential: {0}")]
    Credential(String),
    /// No node could be reached (or none was given).
    #[error("no node reachable")]
    NoNodes,
    /// The connection closed before the answer came.
    #[error("connection closed")]
    Closed,
    /// The TLS handshake (or the TLS session) failed, and why: a certificate of another CA, a
    /// wrong name, a revoked or expired certificate, a missing client certificate, or TLS on
    /// one side only ([`TlsFailure::NotTls`]). A configuration problem: never retried.
    #[error("TLS: {0}")]
    Tls(TlsFailure),
    /// Bad TLS material: a CA, certificate, key or revocation list file that does not read or
    /// parse, a key that does not match, a server name that is not a name.
    #[error("TLS configuration: {0}")]
    TlsConfig(String),
    /// Plaintext to an address that is not loopback was refused before connecting.
    #[error("{0}")]
    Insecure(String),
}

impl ClientError {
    /// The server's error code, for [`ClientError::Server`].
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server(e) => Some(e.code),
            _ => None,
        }
    }

    /// Whether the [`Client`] tries the request again: retryable server codes, lost
    /// connections and unreachable nodes.
    fn is_retryable(&self) -> bool {
        match self {
            ClientError::Server(e) => e.code.is_retryable(),
            ClientError::Io(_) | ClientError::Closed | ClientError::NoNodes => true,
            // Configuration errors (TLS refused, bad TLS material, plaintext off loopback)
            // fail fast: retrying cannot fix them.
            ClientError::Tls(_) | ClientError::TlsConfig(_) | ClientError::Insecure(_) => false,
            _ => false,
        }
    }

    fn connection_lost(&self) -> bool {
        matches!(self, ClientError::Io(_) | ClientError::Closed)
    }
}

impl From<ErrorReply> for ClientError {
    fn from(e: ErrorReply) -> Self {
        ClientError::Server(e)
    }
}

fn io_err(e: std::io::Error) -> ClientError {
    ClientError::Io(e.to_string())
}

// ---- credentials ----

/// What a client authenticates with: its scope, its client id and its secret.
/// `Debug` never shows the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    pub scope: Scope,
    pub client_id: [u8; 16],
    pub secret: [u8; CREDENTIAL_LEN],
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("scope", &self.scope)
            .field("client_id", &hex(&self.client_id))
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// Lower-case hex of `b` (credentials, names in certificates).
pub(crate) fn hex(b: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for &x in b {
        s.push(DIGITS[(x >> 4) as usize] as char);
        s.push(DIGITS[(x & 15) as usize] as char);
    }
    s
}

fn unhex<const N: usize>(what: &str, s: &str) -> Result<[u8; N], ClientError> {
    let bad = || ClientError::Credential(format!("{what}: expected {} hex digits", N * 2));
    let s = s.as_bytes();
    if s.len() != N * 2 {
        return Err(bad());
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        let hi = digit(s[2 * i]).ok_or_else(bad)?;
        let lo = digit(s[2 * i + 1]).ok_or_else(bad)?;
        *o = hi << 4 | lo;
    }
    Ok(out)
}

impl Credential {
    /// The text form: three `name=value` lines, `scope=admin` or `scope=partition:<32 hex>`,
    /// `client_id=<32 hex>`, `secret=<64 hex>`.
    pub fn to_text(&self) -> String {
        let scope = match self.scope {
            Scope::Admin => "admin".to_string(),
            Scope::Partition(p) => format!("partition:{}", hex(&p)),
        };
        format!(
            "scope={scope}\nclient_id={}\nsecret={}\n",
            hex(&self.client_id),
            hex(&self.secret)
        )
    }

    /// Parses [`Credential::to_text`]. Blank lines and `#` comments are skipped; each of the
    /// three names must appear exactly once and nothing else may.
    pub fn from_text(s: &str) -> Result<Credential, ClientError> {
        let (mut scope, mut client_id, mut secret) = (None, None, None);
        for (n, line) in s.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (name, value) = line.split_once('=').ok_or_else(|| {
                ClientError::Credential(format!("line {}: not name=value", n + 1))
            })?;
            let (name, value) = (name.trim(), value.trim());
            let dup = || ClientError::Credential(format!("line {}: {name} given twice", n + 1));
            match name {
                "scope" => {
                    let v = if value == "admin" {
                        Scope::Admin
                    } else if let Some(p) = value.strip_prefix("partition:") {
                        Scope::Partition(unhex::<16>("scope partition", p)?)
                    } else {
                        return Err(ClientError::Credential(format!(
                            "line {}: scope is neither admin nor partition:<hex>",
                            n + 1
                        )));
                    };
                    if scope.replace(v).is_some() {
                        return Err(dup());
                    }
                }
                "client_id" => {
                    if client_id
                        .replace(unhex::<16>("client_id", value)?)
                        .is_some()
                    {
                        return Err(dup());
                    }
                }
                "secret" => {
                    if secret
                        .replace(unhex::<CREDENTIAL_LEN>("secret", value)?)
                        .is_some()
                    {
                        return Err(dup());
                    }
                }
                _ => {
                    return Err(ClientError::Credential(format!(
                        "line {}: unknown name {name:?}",
                        n + 1
                    )))
                }
            }
        }
        let missing = |what: &str| ClientError::Credential(format!("{what} missing"));
        Ok(Credential {
            scope: scope.ok_or_else(|| missing("scope"))?,
            client_id: client_id.ok_or_else(|| missing("client_id"))?,
            secret: secret.ok_or_else(|| missing("secret"))?,
        })
    }

    /// Writes the text form to `path`, readable by its owner only (mode 0600): a temporary
    /// file beside it, synced, then renamed over `path`.
    pub fn write_file(&self, path: &Path) -> std::io::Result<()> {
        let name = path
            .file_name()
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "no file name"))?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".tmp.{}", std::process::id()));
        let tmp = path.with_file_name(tmp_name);
        let mut o = std::fs::OpenOptions::new();
        o.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            o.mode(0o600);
        }
        let written = (|| {
            let mut f = o.open(&tmp)?;
            #[cfg(unix)]
            {
                // An existing temporary file keeps its mode through open: set it again.
                use std::os::unix::fs::PermissionsExt;
                f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            }
            f.write_all(self.to_text().as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
            return written;
        }
        if let Some(dir) = path.parent() {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            // Best effort: makes the rename durable where directories can be synced.
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }

    /// Reads a file written by [`Credential::write_file`].
    pub fn read_file(path: &Path) -> Result<Credential, ClientError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ClientError::Credential(format!("cannot read {}: {e}", path.display())))?;
        Credential::from_text(&text)
    }
}

// ---- TLS ----

/// TLS of a [`Connection`] and a [`Client`]: one rustls configuration shared by every
/// connection (so sessions resume across them), and the name verified in each node's
/// certificate.
#[derive(Clone)]
pub struct ClientTls {
    pub config: Arc<rustls::ClientConfig>,
    /// Name to verify in every node's certificate (the cluster name,
    /// [`crate::tls::cluster_name`], which every node's certificate carries); `None`: the IP
    /// address dialed.
    pub server_name: Option<String>,
    /// One configuration per node address, each with its own session cache: rustls keys its
    /// tickets by server name only, so nodes sharing a name (the cluster name, or one IP with
    /// several ports) would be offered each other's tickets, which they cannot resume.
    per_node: Arc<Mutex<HashMap<SocketAddr, Arc<rustls::ClientConfig>>>>,
}

/// Node addresses whose own session cache a [`ClientTls`] keeps (beyond: the shared one).
pub const TLS_SESSION_CACHES_MAX: usize = 256;
/// Sessions kept per node address.
pub const TLS_SESSIONS_PER_NODE: usize = 32;

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("server_name", &self.server_name)
            .field(
                "client_cert",
                &self.config.client_auth_cert_resolver.has_certs(),
            )
            .finish()
    }
}

impl ClientTls {
    /// From PEM files: `ca`, the cluster CA's certificate(s), and any revocation lists
    /// (`X509 CRL` blocks) in the same file; `cert` and `key`, a client certificate chain and
    /// its private key (both or neither). The configuration is TLS 1.3 only
    /// ([`crate::tls::client_config`]).
    pub fn from_files(
        ca: &Path,
        cert: Option<&Path>,
        key: Option<&Path>,
        server_name: Option<String>,
    ) -> Result<ClientTls, ClientError> {
        let bad = |e: crate::tls::TlsConfigError| ClientError::TlsConfig(e.to_string());
        let trust = crate::tls::Trust {
            ca: crate::tls::read_certs("CA certificate", ca).map_err(bad)?,
            crls: crate::tls::read_crls(ca).map_err(bad)?,
        };
        let identity = match (cert, key) {
            (Some(cert), Some(key)) => Some(crate::tls::TlsIdentity {
                chain: crate::tls::read_certs("client certificate", cert).map_err(bad)?,
                key: crate::tls::read_key(key).map_err(bad)?,
            }),
            (None, None) => None,
            _ => {
                return Err(ClientError::TlsConfig(
                    "a client certificate and its key go together: give both or neither".into(),
                ))
            }
        };
        if let Some(name) = &server_name {
            server_name_of(name)?;
        }
        Ok(ClientTls::new(
            crate::tls::client_config(&trust, identity).map_err(bad)?,
            server_name,
        ))
    }

    /// From a rustls configuration (TLS 1.3: [`crate::tls::client_config`]).
    pub fn new(config: Arc<rustls::ClientConfig>, server_name: Option<String>) -> ClientTls {
        ClientTls {
            config,
            server_name,
            per_node: Arc::default(),
        }
    }

    /// The configuration for the node at `addr`: the shared one with a session cache of that
    /// address's own, so a reconnection resumes that node's session.
    fn config_for(&self, addr: SocketAddr) -> Arc<rustls::ClientConfig> {
        let mut m = lock(&self.per_node);
        if let Some(c) = m.get(&addr) {
            return c.clone();
        }
        if m.len() >= TLS_SESSION_CACHES_MAX {
            return self.config.clone();
        }
        let mut c = (*self.config).clone();
        c.resumption = rustls::client::Resumption::in_memory_sessions(TLS_SESSIONS_PER_NODE);
        let c = Arc::new(c);
        m.insert(addr, c.clone());
        c
    }

    /// The name verified for a node dialed at `addr`.
    fn name_for(&self, addr: SocketAddr) -> Result<ServerName<'static>, ClientError> {
        match &self.server_name {
            Some(n) => server_name_of(n),
            None => Ok(ServerName::from(addr.ip())),
        }
    }
}

fn server_name_of(name: &str) -> Result<ServerName<'static>, ClientError> {
    ServerName::try_from(name.to_string()).map_err(|_| {
        ClientError::TlsConfig(format!(
            "server name {name:?} is neither a DNS name nor an IP address"
        ))
    })
}

/// The message of [`ClientError::Insecure`].
pub const INSECURE_MESSAGE: &str =
    "plaintext is allowed to loopback addresses only; give a CA (TLS)";

// ---- options ----

/// Limits of a [`Connection`] and a [`Client`].
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// How long a [`Client`] call may take, retries included; also the handshake's wait.
    pub request_timeout: Duration,
    /// How long a TCP connect may take.
    pub connect_timeout: Duration,
    /// Most answers outstanding on one connection; a request beyond it is refused locally
    /// with `Overloaded`.
    pub max_in_flight: usize,
    /// TLS to the nodes; `None`: plaintext, to loopback addresses only (any other address is
    /// refused with [`ClientError::Insecure`]). The handshake is bounded by `connect_timeout`.
    pub tls: Option<ClientTls>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            tls: None,
        }
    }
}

// ---- connection ----

type Answer = Result<Response, ClientError>;

/// One request's answer slot, shared by the reader thread and the [`Pending`].
struct Slot {
    opcode: u16,
    state: Mutex<SlotState>,
    ready: Condvar,
}

#[derive(Default)]
struct SlotState {
    answer: Option<Answer>,
    /// The answer came and was handed out.
    done: bool,
    waker: Option<Waker>,
    /// When the reader thread (or a close) completed the slot: the answer's arrival, for
    /// latency measured independently of when a waiter gets to it.
    completed_at: Option<Instant>,
}

impl Slot {
    fn complete(&self, answer: Answer) {
        let waker = {
            let mut st = lock(&self.state);
            if st.done || st.answer.is_some() {
                return;
            }
            st.answer = Some(answer);
            st.completed_at = Some(Instant::now());
            st.waker.take()
        };
        self.ready.notify_all();
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// A mutex poisoned by a panicking holder still guards consistent data here (every critical
/// section is a few field updates), so poison is ignored.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What is spoken on the socket.
enum Wire {
    Plain,
    /// The rustls session. Lock order: [`Shared::writer`] first, then this; the reader thread,
    /// which holds this, only ever `try_lock`s the writer.
    Tls(Box<Mutex<rustls::ClientConnection>>),
}

/// The writing half: the socket, and (TLS) the buffer records are gathered in before they are
/// written, kept to save an allocation per request.
struct SockWriter {
    sock: TcpStream,
    tls_out: Vec<u8>,
}

impl SockWriter {
    /// Takes every record `tls` has to send into `tls_out` (after what is there).
    fn gather(&mut self, tls: &mut rustls::ClientConnection) -> std::io::Result<()> {
        while tls.wants_write() {
            tls.write_tls(&mut self.tls_out)?;
        }
        Ok(())
    }

    /// Writes `tls_out` to the socket and empties it.
    fn send_gathered(&mut self) -> std::io::Result<()> {
        let r = self.sock.write_all(&self.tls_out);
        self.tls_out.clear();
        if self.tls_out.capacity() > TLS_OUT_KEEP_BYTES {
            self.tls_out = Vec::new();
        }
        r
    }
}

struct Shared {
    /// Outstanding requests by request id.
    slots: Mutex<HashMap<u64, Arc<Slot>>>,
    closed: AtomicBool,
    /// Next request id; ids below it were issued, so a late answer to an abandoned request
    /// (timed out, dropped) is recognised and ignored.
    next_id: AtomicU64,
    /// Held for a whole frame's write, so frames (and TLS records) go out whole and in order.
    writer: Mutex<SockWriter>,
    wire: Wire,
    /// Why the TLS session (or the node's first bytes) failed, once the reader saw it: a
    /// request started after that close is told why rather than just `Closed`.
    tls_failure: Mutex<Option<TlsFailure>>,
    /// Another handle of the socket, to shut it down without waiting for a blocked writer.
    control: TcpStream,
    max_in_flight: usize,
}

impl Shared {
    /// Marks the connection closed and completes every outstanding request with `why`.
    fn close(&self, why: ClientError) {
        if let ClientError::Tls(f) = &why {
            lock(&self.tls_failure).get_or_insert_with(|| f.clone());
        }
        self.closed.store(true, Ordering::SeqCst);
        let _ = self.control.shutdown(Shutdown::Both);
        let slots: Vec<Arc<Slot>> = lock(&self.slots).drain().map(|(_, s)| s).collect();
        for s in slots {
            s.complete(Err(why.clone()));
        }
    }

    fn start(self: &Arc<Self>, id: u64, req: &Request) -> Result<Pending, ClientError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(ClientError::Closed);
        }
        let payload = req.encode();
        if payload.len() > CLIENT_MAX_FRAME_PAYLOAD {
            return Err(ClientError::Server(ErrorReply::new(
                ErrorCode::TooLarge,
                format!(
                    "request payload of {} bytes exceeds the client frame limit of {}",
                    payload.len(),
                    CLIENT_MAX_FRAME_PAYLOAD
                ),
            )));
        }
        let opcode = req.opcode();
        let mut bytes = Vec::with_capacity(FRAME_HEADER_BYTES + payload.len());
        frame::encode(
            FrameHeader {
                flags: 0,
                opcode,
                request_id: id,
            },
            &payload,
            &mut bytes,
        )
        .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let slot = Arc::new(Slot {
            opcode,
            state: Mutex::new(SlotState::default()),
            ready: Condvar::new(),
        });
        {
            let mut slots = lock(&self.slots);
            if slots.len() >= self.max_in_flight {
                return Err(ClientError::Server(ErrorReply::new(
                    ErrorCode::Overloaded,
                    format!(
                        "{} answers outstanding on this connection (max_in_flight)",
                        slots.len()
                    ),
                )));
            }
            // Registered before the write: the answer may come before write_all returns.
            slots.insert(id, slot.clone());
        }
        let pending = Pending {
            slot,
            shared: self.clone(),
            id,
        };
        let written = self.write_frame(&bytes);
        if let Err(e) = written {
            // Part of a frame may have gone: the stream is out of step, so it is closed.
            let err = io_err(e);
            self.close(err.clone());
            return Err(err);
        }
        Ok(pending)
    }

    /// Writes one whole frame: plaintext as is; over TLS, encrypted under the session lock and
    /// written after it is released (the writer lock, held throughout, keeps records in the
    /// order they were made, and a blocked socket never holds up the reader's decryption).
    fn write_frame(&self, bytes: &[u8]) -> std::io::Result<()> {
        let mut w = lock(&self.writer);
        let tls = match &self.wire {
            Wire::Plain => return w.sock.write_all(bytes),
            Wire::Tls(tls) => tls,
        };
        {
            let mut c = lock(tls);
            let mut rest = bytes;
            while !rest.is_empty() {
                let n = c.writer().write(rest)?;
                rest = &rest[n..];
                // Emptying the session's record buffer makes room for the rest.
                w.gather(&mut c)?;
                if n == 0 && !rest.is_empty() {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::WriteZero,
                        "TLS session takes no more data",
                    ));
                }
            }
        }
        w.send_gathered()
    }

    /// Sends what the session has to send (a key update's answer) if no writer is busy; a
    /// busy writer sends it with its own records. Never blocks on the writer lock.
    fn flush_tls(&self, tls: &Mutex<rustls::ClientConnection>) -> std::io::Result<()> {
        let Ok(mut w) = self.writer.try_lock() else {
            return Ok(());
        };
        w.gather(&mut lock(tls))?;
        if w.tls_out.is_empty() {
            return Ok(());
        }
        w.send_gathered()
    }

    /// Over TLS: decrypts `data` (read from the socket) and appends its plaintext to `buf`.
    /// Returns whether the node closed the session (close_notify).
    fn decrypt(
        &self,
        tls: &Mutex<rustls::ClientConnection>,
        mut data: &[u8],
        buf: &mut Vec<u8>,
    ) -> Result<bool, ClientError> {
        let mut peer_closed = false;
        let wants_write = {
            let mut c = lock(tls);
            while !data.is_empty() {
                c.read_tls(&mut data).map_err(io_err)?;
                let st = c
                    .process_new_packets()
                    .map_err(|e| ClientError::Tls(classify(&e)))?;
                let k = st.plaintext_bytes_to_read();
                if k > 0 {
                    let old = buf.len();
                    buf.resize(old + k, 0);
                    c.reader().read_exact(&mut buf[old..]).map_err(io_err)?;
                }
                peer_closed |= st.peer_has_closed();
            }
            c.wants_write()
        };
        if wants_write {
            self.flush_tls(tls).map_err(io_err)?;
        }
        Ok(peer_closed)
    }

    /// The reader thread: decodes answers and completes their slots until the stream ends.
    fn read_loop(self: Arc<Self>, mut stream: TcpStream) {
        let why = match self.read_frames(&mut stream) {
            Ok(()) => ClientError::Closed,
            Err(e) => e,
        };
        self.close(why);
    }

    fn read_frames(&self, stream: &mut TcpStream) -> Result<(), ClientError> {
        let mut buf: Vec<u8> = Vec::with_capacity(READ_CHUNK_BYTES);
        let mut chunk = vec![0u8; READ_CHUNK_BYTES];
        // No answer decoded yet: the first bytes may show the node speaks TLS to our plaintext.
        let mut first = true;
        loop {
            let n = match stream.read(&mut chunk) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    if self.closed.load(Ordering::SeqCst) {
                        return Err(ClientError::Closed);
                    }
                    return Err(io_err(e));
                }
            };
            let peer_closed = match &self.wire {
                Wire::Plain => {
                    buf.extend_from_slice(&chunk[..n]);
                    if first && buf.len() >= 2 && matches!(buf[..2], [0x15 | 0x16, 0x03]) {
                        // A TLS alert or handshake record: a TLS port, answering our
                        // plaintext (frames start with "KFRM").
                        return Err(ClientError::Tls(TlsFailure::NotTls));
                    }
                    false
                }
                Wire::Tls(tls) => self.decrypt(tls, &chunk[..n], &mut buf)?,
            };
            let mut used = 0;
            loop {
                match frame::decode(&buf[used..]) {
                    Ok(Some((f, len))) => {
                        if f.payload.len() > CLIENT_MAX_FRAME_PAYLOAD {
                            return Err(ClientError::Protocol(format!(
                                "answer payload of {} bytes exceeds {}",
                                f.payload.len(),
                                CLIENT_MAX_FRAME_PAYLOAD
                            )));
                        }
                        self.answer(f.header, f.payload)?;
                        first = false;
                        used += len;
                    }
                    Ok(None) => {
                        // A whole header has passed its checks: refuse an oversized payload
                        // before waiting for (and buffering) it.
                        let rest = &buf[used..];
                        if rest.len() >= FRAME_HEADER_BYTES {
                            let len = u32::from_le_bytes([rest[16], rest[17], rest[18], rest[19]]);
                            if len as usize > CLIENT_MAX_FRAME_PAYLOAD {
                                return Err(ClientError::Protocol(format!(
                                    "answer payload of {len} bytes exceeds {}",
                                    CLIENT_MAX_FRAME_PAYLOAD
                                )));
                            }
                        }
                        break;
                    }
                    Err(e) => return Err(ClientError::Protocol(format!("bad frame: {e}"))),
                }
            }
            buf.drain(..used);
            if peer_closed {
                return Ok(());
            }
        }
    }

    fn answer(&self, h: FrameHeader, payload: &[u8]) -> Result<(), ClientError> {
        if h.flags & flags::RESPONSE == 0 || h.flags & flags::MORE != 0 {
            return Err(ClientError::Protocol(format!(
                "frame with flags {:#04x} where an answer was expected",
                h.flags
            )));
        }
        let slot = lock(&self.slots).remove(&h.request_id);
        let Some(slot) = slot else {
            if h.request_id != 0 && h.request_id < self.next_id.load(Ordering::SeqCst) {
                // An answer to a request given up on (timed out or dropped).
                return Ok(());
            }
            return Err(ClientError::Protocol(format!(
                "answer to request id {} that was never sent",
                h.request_id
            )));
        };
        if h.opcode != slot.opcode {
            let e = ClientError::Protocol(format!(
                "answer opcode {:#06x} to a request of opcode {:#06x}",
                h.opcode, slot.opcode
            ));
            slot.complete(Err(e.clone()));
            return Err(e);
        }
        let answer = if h.flags & flags::ERROR != 0 {
            ErrorReply::decode(payload).map(|e| Err(ClientError::Server(e)))
        } else {
            Response::decode(h.opcode, payload).map(Ok)
        };
        match answer {
            Ok(a) => {
                slot.complete(a);
                Ok(())
            }
            Err(e) => {
                let e = ClientError::Protocol(format!("undecodable answer: {e}"));
                slot.complete(Err(e.clone()));
                Err(e)
            }
        }
    }
}

/// One authenticated, pipelined connection to one node. `Send + Sync`: any number of threads
/// may start requests on it at once. Dropping it closes the socket (outstanding [`Pending`]s
/// then end with [`ClientError::Closed`]).
pub struct Connection {
    shared: Arc<Shared>,
    addr: SocketAddr,
    node_id: u64,
    cluster_id: [u8; 16],
    tls: bool,
    resumed: bool,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("addr", &self.addr)
            .field("node_id", &self.node_id)
            .field("tls", &self.tls)
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl Connection {
    /// Connects (within `connect_timeout`), makes the TLS handshake when `opts.tls` is set
    /// (also within `connect_timeout`), starts the reader thread and authenticates (hello,
    /// then proof; each answer awaited up to `request_timeout`). A wrong credential is
    /// `ClientError::Server` with code `Unauthenticated`; a refused handshake is
    /// [`ClientError::Tls`]; plaintext (`opts.tls` unset) to an address that is not loopback
    /// is refused before connecting with [`ClientError::Insecure`].
    pub fn open(
        addr: SocketAddr,
        cred: &Credential,
        opts: &ClientOptions,
    ) -> Result<Connection, ClientError> {
        if opts.tls.is_none() && !addr.ip().to_canonical().is_loopback() {
            return Err(ClientError::Insecure(format!("{addr}: {INSECURE_MESSAGE}")));
        }
        let server_name = opts.tls.as_ref().map(|t| t.name_for(addr)).transpose()?;
        let mut stream = TcpStream::connect_timeout(&addr, opts.connect_timeout).map_err(io_err)?;
        stream.set_nodelay(true).map_err(io_err)?;
        let wire = match (&opts.tls, server_name) {
            (Some(tls), Some(name)) => {
                let config = tls.config_for(addr);
                let session = handshake(&mut stream, config, name, opts.connect_timeout)?;
                Wire::Tls(Box::new(Mutex::new(session)))
            }
            _ => Wire::Plain,
        };
        let resumed = match &wire {
            Wire::Plain => false,
            Wire::Tls(c) => lock(c).handshake_kind() == Some(rustls::HandshakeKind::Resumed),
        };
        // A node that stops reading must not block a writer forever.
        stream
            .set_write_timeout(Some(opts.request_timeout.max(Duration::from_millis(1))))
            .map_err(io_err)?;
        let reader = stream.try_clone().map_err(io_err)?;
        let control = stream.try_clone().map_err(io_err)?;
        let tls = matches!(wire, Wire::Tls(_));
        let shared = Arc::new(Shared {
            slots: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
            next_id: AtomicU64::new(PROOF_REQUEST_ID + 1),
            writer: Mutex::new(SockWriter {
                sock: stream,
                tls_out: Vec::new(),
            }),
            wire,
            tls_failure: Mutex::new(None),
            control,
            max_in_flight: opts.max_in_flight.max(1),
        });
        let s = shared.clone();
        std::thread::Builder::new()
            .name(format!("keyfort-client-{addr}"))
            .spawn(move || s.read_loop(reader))
            .map_err(io_err)?;
        // From here on, an early return drops the Connection, whose Drop closes the socket and
        // so ends the reader thread.
        let mut conn = Connection {
            shared,
            addr,
            node_id: 0,
            cluster_id: [0; 16],
            tls,
            resumed,
        };
        let hello = Request::Hello {
            version: CLIENT_PROTOCOL_VERSION,
            scope: cred.scope,
            client_id: cred.client_id,
        };
        // A node that refuses our certificate says so with an alert after the handshake, which
        // the reader may see before the hello is written (or fails to be): that alert is the
        // answer to the hello and the proof.
        let call = |id: u64, req: &Request| {
            conn.shared
                .start(id, req)
                .and_then(|p| p.wait(opts.request_timeout))
                .map_err(|e| match e {
                    ClientError::Closed | ClientError::Io(_) => {
                        match lock(&conn.shared.tls_failure).clone() {
                            Some(f) => ClientError::Tls(f),
                            None => e,
                        }
                    }
                    e => e,
                })
        };
        let (challenge, cluster_id, node_id) = match call(HELLO_REQUEST_ID, &hello)? {
            Response::Challenge {
                challenge,
                cluster_id,
                node_id,
            } => (challenge, cluster_id, node_id),
            other => return Err(unexpected("hello", &other)),
        };
        let context = proof_context(&cluster_id, node_id, &cred.scope, &cred.client_id);
        let response = keyfort_hsm::client_answer(&cred.secret, &challenge, &context);
        match call(PROOF_REQUEST_ID, &Request::Proof { response })? {
            Response::Accepted => {}
            other => return Err(unexpected("proof", &other)),
        }
        conn.node_id = node_id;
        conn.cluster_id = cluster_id;
        Ok(conn)
    }

    /// The node's id, from its challenge.
    pub fn node_id(&self) -> u64 {
        self.node_id
    }

    /// The cluster's id, from the node's challenge.
    pub fn cluster_id(&self) -> [u8; 16] {
        self.cluster_id
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Whether the connection is TLS.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// Whether the TLS session was resumed from an earlier connection's (same
    /// [`ClientTls::config`]): no full handshake, no certificate exchange.
    pub fn resumed(&self) -> bool {
        self.resumed
    }

    /// Sends `req` now (a blocking write on the socket) and returns its pending answer.
    /// Refused locally, without sending, with `ClientError::Server(Overloaded)` when
    /// `max_in_flight` answers are outstanding, and with [`ClientError::Closed`] once the
    /// connection is closed.
    pub fn start(&self, req: &Request) -> Result<Pending, ClientError> {
        let id = self.shared.next_id.fetch_add(1, Ordering::SeqCst);
        self.shared.start(id, req)
    }

    /// [`Connection::start`], then [`Pending::wait`] up to `timeout`.
    pub fn call(&self, req: &Request, timeout: Duration) -> Result<Response, ClientError> {
        self.start(req)?.wait(timeout)
    }

    /// Whether the connection has closed (the peer hung up, a socket or protocol error, or
    /// this side closed it); a closed connection never opens again.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::SeqCst)
    }
}

/// Bytes read through it, to tell a node that hung up at once from one that spoke first.
struct Counted<'a> {
    sock: &'a mut TcpStream,
    read: u64,
}

impl Read for Counted<'_> {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        let n = self.sock.read(b)?;
        self.read += n as u64;
        Ok(n)
    }
}

impl Write for Counted<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.sock.write(b)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.sock.flush()
    }
}

/// The TLS handshake on the blocking socket, within `limit` per read and write.
fn handshake(
    sock: &mut TcpStream,
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
    limit: Duration,
) -> Result<rustls::ClientConnection, ClientError> {
    let expected = match &name {
        ServerName::DnsName(d) => d.as_ref().to_string(),
        ServerName::IpAddress(ip) => std::net::IpAddr::from(*ip).to_string(),
        other => format!("{other:?}"),
    };
    let mut conn =
        rustls::ClientConnection::new(config, name).map_err(|e| ClientError::Tls(classify(&e)))?;
    let limit = Some(limit.max(Duration::from_millis(1)));
    sock.set_read_timeout(limit).map_err(io_err)?;
    sock.set_write_timeout(limit).map_err(io_err)?;
    let mut counted = Counted { sock, read: 0 };
    while conn.is_handshaking() {
        if let Err(e) = conn.complete_io(&mut counted) {
            return Err(match classify_io(&e) {
                Some(TlsFailure::WrongName { .. }) => {
                    ClientError::Tls(TlsFailure::WrongName { expected })
                }
                Some(f) => ClientError::Tls(f),
                // The node hung up on our ClientHello without a byte of TLS: a plaintext
                // keyfort port does that with a frame it cannot read.
                None if counted.read == 0
                    && matches!(
                        e.kind(),
                        std::io::ErrorKind::UnexpectedEof
                            | std::io::ErrorKind::ConnectionReset
                            | std::io::ErrorKind::ConnectionAborted
                            | std::io::ErrorKind::BrokenPipe
                    ) =>
                {
                    ClientError::Tls(TlsFailure::NotTls)
                }
                None if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
                {
                    ClientError::Io(format!("TLS handshake: no answer within {limit:?}"))
                }
                None => ClientError::Io(format!("TLS handshake: {e}")),
            });
        }
    }
    let sock = counted.sock;
    sock.set_read_timeout(None).map_err(io_err)?;
    sock.set_write_timeout(None).map_err(io_err)?;
    Ok(conn)
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.shared.close(ClientError::Closed);
    }
}

/// The answer to one request. A runtime-agnostic `Future` (waker based: works under tokio,
/// `futures_lite::future::block_on`, any executor) with no timeout of its own — wrap it in the
/// runtime's — and a blocking [`Pending::wait`]. Dropping it gives the request up: a late
/// answer is ignored.
pub struct Pending {
    slot: Arc<Slot>,
    shared: Arc<Shared>,
    id: u64,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("request_id", &self.id)
            .finish()
    }
}

impl Pending {
    /// The request id the request went out with.
    pub fn request_id(&self) -> u64 {
        self.id
    }

    /// Blocks until the answer comes, the connection closes, or `timeout` passes
    /// ([`ClientError::Timeout`]).
    pub fn wait(self, timeout: Duration) -> Result<Response, ClientError> {
        self.wait_timed(timeout).0
    }

    /// [`Pending::wait`], with the instant the answer arrived (the reader thread completed
    /// the request, or the connection closed): `None` on a timeout. Load generators measure
    /// latency to it, not to when the waiter got around to the answer.
    pub fn wait_timed(self, timeout: Duration) -> (Result<Response, ClientError>, Option<Instant>) {
        let deadline = Instant::now().checked_add(timeout);
        let mut st = lock(&self.slot.state);
        loop {
            if let Some(a) = st.answer.take() {
                st.done = true;
                return (a, st.completed_at);
            }
            if st.done {
                return (Err(ClientError::Closed), st.completed_at);
            }
            let left = match deadline {
                Some(d) => d.saturating_duration_since(Instant::now()),
                None => Duration::from_secs(3600),
            };
            if left.is_zero() {
                return (Err(ClientError::Timeout(timeout)), None);
            }
            st = self
                .slot
                .ready
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

impl Future for Pending {
    type Output = Result<Response, ClientError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut st = lock(&self.slot.state);
        if let Some(a) = st.answer.take() {
            st.done = true;
            return Poll::Ready(a);
        }
        if st.done {
            return Poll::Ready(Err(ClientError::Closed));
        }
        match &mut st.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            w => *w = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let done = {
            let st = lock(&self.slot.state);
            st.done || st.answer.is_some()
        };
        if !done {
            // Frees the in-flight place; the answer, if it comes, is recognised and ignored.
            let mut slots = lock(&self.shared.slots);
            if slots
                .get(&self.id)
                .is_some_and(|s| Arc::ptr_eq(s, &self.slot))
            {
                slots.remove(&self.id);
            }
        }
    }
}

fn unexpected(what: &str, r: &Response) -> ClientError {
    let name = format!("{r:?}");
    let name = name.split([' ', '(', '{']).next().unwrap_or("");
    ClientError::Protocol(format!("unexpected answer {name} to {what}"))
}

// ---- client ----

/// One node of a [`Client`]: its connection, opened lazily.
#[derive(Default)]
struct NodeSlot {
    conn: Option<Arc<Connection>>,
    /// Learnt from its challenge (or a route answer); `None` until first connected.
    node_id: Option<u64>,
    /// When the last connect failed.
    failed_at: Option<Instant>,
}

struct ClientInner {
    nodes: Vec<SocketAddr>,
    cred: Credential,
    opts: ClientOptions,
    slots: Vec<Mutex<NodeSlot>>,
    /// Leader node id of every shard (0: unknown); its length is the shard count.
    leaders: Mutex<Vec<u64>>,
    /// Where the search for "any live node" starts, so load spreads.
    next: AtomicUsize,
}

/// A client of one credential over every node of a cluster: connections opened lazily and
/// reopened after failures, each request routed to the node leading its partition's shard
/// (any live node when the leader is unknown: nodes forward writes to the leader), and
/// retries with backoff ([`RETRY_BACKOFF_START`] doubling to [`RETRY_BACKOFF_MAX`]) of
/// retryable errors and of lost connections until `request_timeout`. A retried request is the
/// same [`Request`], so a retried write carries the same idempotency id.
///
/// `Clone + Send + Sync` (an `Arc` inside): share it between threads. Its calls **block**;
/// from async code (tokio) call them in `tokio::task::spawn_blocking`, or use
/// [`Connection::start`], whose [`Pending`] is a `Future`.
#[derive(Clone)]
pub struct Client {
    inner: Arc<ClientInner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("nodes", &self.inner.nodes)
            .field("scope", &self.inner.cred.scope)
            .finish()
    }
}

/// Where one try of a request goes.
#[derive(Clone, Copy)]
enum Target {
    /// This node index only.
    Node(usize),
    /// The leader of this shard if known, else any live node.
    Shard(Option<u32>),
}

impl Client {
    /// Connects to the first node of `nodes` that answers (in order) and learns the shard
    /// count and leaders from it with a `Route` call. Fails with the first error a node gave
    /// (a wrong credential is `Server(Unauthenticated)`), or [`ClientError::NoNodes`] when
    /// `nodes` is empty.
    pub fn connect(
        nodes: Vec<SocketAddr>,
        cred: Credential,
        opts: ClientOptions,
    ) -> Result<Client, ClientError> {
        if nodes.is_empty() {
            return Err(ClientError::NoNodes);
        }
        let slots = nodes.iter().map(|_| Mutex::default()).collect();
        let client = Client {
            inner: Arc::new(ClientInner {
                nodes,
                cred,
                opts,
                slots,
                leaders: Mutex::new(Vec::new()),
                next: AtomicUsize::new(0),
            }),
        };
        let mut first_err = None;
        for i in 0..client.inner.nodes.len() {
            let routed = client.conn(i).and_then(|c| {
                c.call(&Request::Route, client.inner.opts.request_timeout)
                    .map(|r| (c, r))
            });
            match routed {
                Ok((_, r)) => {
                    client.learn_route(r)?;
                    return Ok(client);
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        Err(first_err.unwrap_or(ClientError::NoNodes))
    }

    /// The nodes as given to [`Client::connect`].
    pub fn nodes(&self) -> &[SocketAddr] {
        &self.inner.nodes
    }

    /// The credential this client authenticates with.
    pub fn credential(&self) -> &Credential {
        &self.inner.cred
    }

    /// Sends `req` to the node leading its shard, retrying as the type documents.
    pub fn call(&self, req: &Request) -> Result<Response, ClientError> {
        let shard = self.shard_of_request(req);
        self.call_with(Target::Shard(shard), req, shard)
    }

    /// Sends `req` to `nodes()[node_index]` only (no routing), retrying there.
    pub fn call_on(&self, node_index: usize, req: &Request) -> Result<Response, ClientError> {
        if node_index >= self.inner.nodes.len() {
            return Err(ClientError::NoNodes);
        }
        self.call_with(Target::Node(node_index), req, None)
    }

    fn call_with(
        &self,
        target: Target,
        req: &Request,
        shard: Option<u32>,
    ) -> Result<Response, ClientError> {
        let timeout = self.inner.opts.request_timeout;
        let deadline = Instant::now() + timeout;
        let mut backoff = RETRY_BACKOFF_START;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let err = match self
                .pick(target)
                .and_then(|(_, c)| c.call(req, left.max(Duration::from_millis(1))))
            {
                Ok(r) => return Ok(r),
                Err(ClientError::Timeout(_)) => return Err(ClientError::Timeout(timeout)),
                Err(e) if !e.is_retryable() => return Err(e),
                Err(e) => e,
            };
            let retry_hint = match &err {
                ClientError::Server(e) if e.code == ErrorCode::Retry => Some(e.leader),
                _ => None,
            };
            if retry_hint.is_some() || err.connection_lost() {
                self.refresh_route(deadline);
            }
            if let (Some(leader), Some(shard)) = (retry_hint, shard) {
                if leader != 0 {
                    if let Some(l) = lock(&self.inner.leaders).get_mut(shard as usize) {
                        *l = leader;
                    }
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(err);
            }
            std::thread::sleep(backoff.min(left));
            if Instant::now() >= deadline {
                return Err(err);
            }
            backoff = (backoff * 2).min(RETRY_BACKOFF_MAX);
        }
    }

    /// The shard a request acts on: its partition's (the connection's for key operations, the
    /// named one for partition administration); `None` for requests of no partition.
    fn shard_of_request(&self, req: &Request) -> Option<u32> {
        let partition = match req {
            Request::PartitionCreate { partition, .. }
            | Request::PartitionDelete { partition }
            | Request::CredentialIssue { partition } => *partition,
            Request::Hello { .. }
            | Request::Proof { .. }
            | Request::Route
            | Request::ClusterStatus => return None,
            _ => match self.inner.cred.scope {
                Scope::Partition(p) => p,
                Scope::Admin => return None,
            },
        };
        let shards = lock(&self.inner.leaders).len() as u32;
        (shards > 0).then(|| {
            keyfort_engine::cluster::shard_of(&keyfort_hsm::PartitionId(partition), shards)
        })
    }

    /// The live connection to node `i`, opening it if needed.
    fn conn(&self, i: usize) -> Result<Arc<Connection>, ClientError> {
        let mut slot = lock(&self.inner.slots[i]);
        if let Some(c) = &slot.conn {
            if !c.is_closed() {
                return Ok(c.clone());
            }
        }
        slot.conn = None;
        match Connection::open(self.inner.nodes[i], &self.inner.cred, &self.inner.opts) {
            Ok(c) => {
                let c = Arc::new(c);
                slot.node_id = Some(c.node_id());
                slot.failed_at = None;
                slot.conn = Some(c.clone());
                Ok(c)
            }
            Err(e) => {
                slot.failed_at = Some(Instant::now());
                Err(e)
            }
        }
    }

    fn live(&self, i: usize) -> Option<Arc<Connection>> {
        let slot = lock(&self.inner.slots[i]);
        slot.conn.as_ref().filter(|c| !c.is_closed()).cloned()
    }

    fn holding_off(&self, i: usize) -> bool {
        lock(&self.inner.slots[i])
            .failed_at
            .is_some_and(|t| t.elapsed() < RECONNECT_HOLDOFF)
    }

    /// The connection one try of a request goes on.
    fn pick(&self, target: Target) -> Result<(usize, Arc<Connection>), ClientError> {
        let n = self.inner.nodes.len();
        let shard = match target {
            Target::Node(i) => return self.conn(i).map(|c| (i, c)),
            Target::Shard(s) => s,
        };
        let leader = shard
            .and_then(|s| lock(&self.inner.leaders).get(s as usize).copied())
            .filter(|l| *l != 0);
        let mut last_err = None;
        // A node that refuses us for good (its handshake answered a non-retryable error, e.g.
        // a partition it has not applied yet is `Unauthenticated`) is skipped: the others may
        // take us. Its error is returned only when no node does.
        let mut refused: Option<ClientError> = None;
        let mut note = |e: ClientError, last_err: &mut Option<ClientError>| {
            if e.is_retryable() {
                *last_err = Some(e);
            } else if refused.is_none() {
                refused = Some(e);
            }
        };
        if let Some(leader) = leader {
            // The leader's node if its address is known; else connect to the nodes not yet
            // known, one by one, until it shows up.
            let known = (0..n).find(|&i| lock(&self.inner.slots[i]).node_id == Some(leader));
            match known {
                Some(i) => match self.conn(i) {
                    Ok(c) => return Ok((i, c)),
                    Err(e) => note(e, &mut last_err),
                },
                None => {
                    for i in 0..n {
                        if lock(&self.inner.slots[i]).node_id.is_some() || self.holding_off(i) {
                            continue;
                        }
                        match self.conn(i) {
                            Ok(c) if c.node_id() == leader => return Ok((i, c)),
                            Ok(_) => {}
                            Err(e) => note(e, &mut last_err),
                        }
                    }
                }
            }
        }
        let start = self.inner.next.fetch_add(1, Ordering::Relaxed);
        for k in 0..n {
            let i = (start + k) % n;
            if let Some(c) = self.live(i) {
                return Ok((i, c));
            }
        }
        for k in 0..n {
            let i = (start + k) % n;
            if self.holding_off(i) {
                continue;
            }
            match self.conn(i) {
                Ok(c) => return Ok((i, c)),
                Err(e) => note(e, &mut last_err),
            }
        }
        Err(refused.or(last_err).unwrap_or(ClientError::NoNodes))
    }

    /// Asks a live node for the leaders (best effort, bounded by [`ROUTE_REFRESH_TIMEOUT`]).
    fn refresh_route(&self, deadline: Instant) {
        let left = deadline.saturating_duration_since(Instant::now());
        let wait = left.min(ROUTE_REFRESH_TIMEOUT);
        if wait.is_zero() {
            return;
        }
        let n = self.inner.nodes.len();
        let start = self.inner.next.fetch_add(1, Ordering::Relaxed);
        for k in 0..n {
            let i = (start + k) % n;
            if let Some(c) = self.live(i) {
                if let Ok(r) = c.call(&Request::Route, wait) {
                    let _ = self.learn_route(r);
                    return;
                }
            }
        }
    }

    fn learn_route(&self, r: Response) -> Result<(), ClientError> {
        match r {
            Response::Route { leaders, .. } => {
                *lock(&self.inner.leaders) = leaders;
                Ok(())
            }
            other => Err(unexpected("route", &other)),
        }
    }

    // ---- typed helpers ----

    fn written(&self, req: Request) -> Result<KeyWritten, ClientError> {
        match self.call(&req)? {
            Response::KeyWritten(w) => Ok(w),
            other => Err(unexpected("a key write", &other)),
        }
    }

    /// Creates a key; with `backup`, the answer carries its single-key backup.
    pub fn create_key(&self, metadata: &[u8], backup: bool) -> Result<KeyWritten, ClientError> {
        self.written(Request::KeyCreate {
            idempotency_id: rand::random(),
            flags: if backup { create_flags::BACKUP } else { 0 },
            metadata: metadata.to_vec(),
        })
    }

    /// Adds a version to a key whose current version is `replaces`.
    pub fn rotate_key(&self, key_id: [u8; 16], replaces: u32) -> Result<KeyWritten, ClientError> {
        self.written(Request::KeyRotate {
            idempotency_id: rand::random(),
            key_id,
            replaces,
        })
    }

    /// Sets the state and metadata of one version of a key.
    pub fn update_key(
        &self,
        key_id: [u8; 16],
        version: u32,
        state: KeyStateCode,
        metadata: &[u8],
    ) -> Result<KeyWritten, ClientError> {
        self.written(Request::KeyUpdate {
            idempotency_id: rand::random(),
            key_id,
            version,
            state,
            metadata: metadata.to_vec(),
        })
    }

    /// Deletes a key (every version).
    pub fn delete_key(&self, key_id: [u8; 16]) -> Result<KeyWritten, ClientError> {
        self.written(Request::KeyDelete {
            idempotency_id: rand::random(),
            key_id,
        })
    }

    /// Restores a key from its single-key backup.
    pub fn restore_key(&self, backup: &[u8]) -> Result<KeyWritten, ClientError> {
        self.written(Request::KeyRestore {
            idempotency_id: rand::random(),
            backup: backup.to_vec(),
        })
    }

    /// A key's versions, oldest first (the newest `MAX_DESCRIBE_VERSIONS` of them).
    pub fn describe_key(&self, key_id: [u8; 16]) -> Result<Vec<VersionInfo>, ClientError> {
        match self.call(&Request::KeyDescribe { key_id })? {
            Response::Described { versions, .. } => Ok(versions),
            other => Err(unexpected("describe", &other)),
        }
    }

    /// Up to `limit` (key id, newest version) after `after`, and whether more follow.
    #[allow(clippy::type_complexity)]
    pub fn list_keys(
        &self,
        after: Option<[u8; 16]>,
        limit: u16,
    ) -> Result<(Vec<([u8; 16], u32)>, bool), ClientError> {
        match self.call(&Request::KeyList { after, limit })? {
            Response::Listed { keys, more } => Ok((keys, more)),
            other => Err(unexpected("list", &other)),
        }
    }

    /// Encrypts under the key's current version: (that version, the envelope).
    pub fn encrypt(
        &self,
        key_id: [u8; 16],
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<(u32, Vec<u8>), ClientError> {
        match self.call(&Request::Encrypt {
            key_id,
            aad: aad.to_vec(),
            plaintext: plaintext.to_vec(),
        })? {
            Response::Encrypted { version, envelope } => Ok((version, envelope)),
            other => Err(unexpected("encrypt", &other)),
        }
    }

    /// Opens an envelope made by [`Client::encrypt`] with the same AAD.
    pub fn decrypt(
        &self,
        key_id: [u8; 16],
        aad: &[u8],
        envelope: &[u8],
    ) -> Result<Vec<u8>, ClientError> {
        match self.call(&Request::Decrypt {
            key_id,
            aad: aad.to_vec(),
            envelope: envelope.to_vec(),
        })? {
            Response::Decrypted { plaintext } => Ok(plaintext),
            other => Err(unexpected("decrypt", &other)),
        }
    }

    /// A fresh data key of `len` bytes: (key version, plaintext, envelope of it).
    pub fn generate_data_key(
        &self,
        key_id: [u8; 16],
        len: u8,
        aad: &[u8],
    ) -> Result<(u32, Vec<u8>, Vec<u8>), ClientError> {
        match self.call(&Request::GenerateDataKey {
            key_id,
            len,
            aad: aad.to_vec(),
        })? {
            Response::DataKey {
                version,
                plaintext,
                envelope,
            } => Ok((version, plaintext, envelope)),
            other => Err(unexpected("generate data key", &other)),
        }
    }

    /// Creates a partition (admin): its log position and its first client's credential.
    pub fn create_partition(&self, partition: [u8; 16]) -> Result<(u64, Credential), ClientError> {
        self.create_partition_with(partition, false)
    }

    /// [`Client::create_partition`] with its policy: `require_client_cert` — its clients must
    /// also present a TLS client certificate naming the partition (`keyfort tls issue-client`),
    /// else their connections are refused `ClientCertRequired`.
    pub fn create_partition_with(
        &self,
        partition: [u8; 16],
        require_client_cert: bool,
    ) -> Result<(u64, Credential), ClientError> {
        let flags = if require_client_cert {
            crate::client_proto::partition_flags::REQUIRE_CLIENT_CERT
        } else {
            0
        };
        match self.call(&Request::PartitionCreate { partition, flags })? {
            Response::PartitionCreated {
                lsn,
                client_id,
                credential,
            } => Ok((
                lsn,
                Credential {
                    scope: Scope::Partition(partition),
                    client_id,
                    secret: credential,
                },
            )),
            other => Err(unexpected("partition create", &other)),
        }
    }

    /// Issues another client credential of a partition (admin).
    pub fn issue_credential(&self, partition: [u8; 16]) -> Result<Credential, ClientError> {
        match self.call(&Request::CredentialIssue { partition })? {
            Response::Credential {
                client_id,
                credential,
            } => Ok(Credential {
                scope: Scope::Partition(partition),
                client_id,
                secret: credential,
            }),
            other => Err(unexpected("credential issue", &other)),
        }
    }

    /// Deletes an empty partition (admin): the log position of the delete.
    pub fn delete_partition(&self, partition: [u8; 16]) -> Result<u64, ClientError> {
        match self.call(&Request::PartitionDelete { partition })? {
            Response::PartitionDeleted { lsn } => Ok(lsn),
            other => Err(unexpected("partition delete", &other)),
        }
    }

    /// Every node's view of its shards (admin), node by node in `nodes()` order: (node id,
    /// shards) or why that node did not answer. One try per node (a probe: a down node is
    /// reported, not waited for beyond `connect_timeout` / `request_timeout`).
    #[allow(clippy::type_complexity)]
    pub fn cluster_status(
        &self,
    ) -> Vec<(SocketAddr, Result<(u64, Vec<ShardStatus>), ClientError>)> {
        self.node_statuses()
            .into_iter()
            .map(|(a, r)| (a, r.map(|n| (n.node_id, n.shards))))
            .collect()
    }

    /// [`Client::cluster_status`] with each node's recovery report.
    pub fn node_statuses(&self) -> Vec<(SocketAddr, Result<NodeStatus, ClientError>)> {
        let timeout = self.inner.opts.request_timeout;
        (0..self.inner.nodes.len())
            .map(|i| {
                let r = self
                    .conn(i)
                    .and_then(|c| c.call(&Request::ClusterStatus, timeout))
                    .and_then(|r| match r {
                        Response::Status {
                            node_id,
                            recovery,
                            shards,
                        } => Ok(NodeStatus {
                            node_id,
                            recovery,
                            shards,
                        }),
                        other => Err(unexpected("cluster status", &other)),
                    });
                (self.inner.nodes[i], r)
            })
            .collect()
    }
}

/// One node's answer to a cluster status request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeStatus {
    pub node_id: u64,
    pub recovery: crate::client_proto::RecoveryStatus,
    pub shards: Vec<ShardStatus>,
}
