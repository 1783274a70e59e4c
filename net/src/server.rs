//! The client server (docs/format.md §8.5): accepts client connections on a glommio executor,
//! authenticates each for one scope, then runs its pipelined requests concurrently and writes
//! their answers as they finish. What a request does is the [`ClientService`]'s business
//! (keyfortd implements it over the card and the shard replicas); this layer owns sockets,
//! framing, the handshake and every limit:
//!
//! - at most [`MAX_CONNECTIONS`] connections; one more is answered `Overloaded` and closed;
//! - a connection must authenticate within [`AUTH_TIMEOUT`];
//! - a frame announcing more than [`CLIENT_MAX_FRAME_PAYLOAD`] is answered `TooLarge` from its
//!   header alone, and the connection closes (the next frame boundary is not trusted);
//! - at most [`MAX_IN_FLIGHT_PER_CONNECTION`] requests of one connection and
//!   [`MAX_IN_FLIGHT_PER_NODE`] of all run at once; more are answered `Overloaded` at once
//!   instead of queueing without bound.
//!
//! A bad frame (magic, crc, version, flags) closes its connection and nothing else: other
//! connections and their requests go on.
//!
//! For metrics (keyfortd's `/metrics`) the server counts every error answer by opcode and code,
//! and times every decoded request from its decode to its answer being queued, per opcode, in
//! fixed buckets ([`LATENCY_BUCKETS_US`]): [`ClientServer::request_metrics`].

use crate::client_proto::{
    op, proof_context, ErrorCode, ErrorReply, Request, Response, Scope, CHALLENGE_LEN,
    CLIENT_MAX_FRAME_PAYLOAD, CLIENT_PROTOCOL_VERSION,
};
use crate::frame::{self, flags, FrameError, FrameHeader};
use crate::tls::Stream;
use crate::transport::{within, ConnError, FrameReader};
use futures_lite::future::poll_fn;
use futures_lite::AsyncWriteExt;
use glommio::net::{TcpListener, TcpStream};
use rustls_pki_types::CertificateDer;
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};
use tracing::{debug, warn};

/// Most client connections open at once.
pub const MAX_CONNECTIONS: usize = 1024;
/// Most requests of one connection running at once.
pub const MAX_IN_FLIGHT_PER_CONNECTION: usize = 1024;
/// Most requests of all connections running at once.
pub const MAX_IN_FLIGHT_PER_NODE: usize = 16384;
/// Time a new connection has to complete hello and proof.
pub const AUTH_TIMEOUT: Duration = Duration::from_secs(5);
/// Answers waiting to be written on one connection, in bytes, beyond which the connection
/// stops reading requests until its writer catches up (a client that does not read its
/// answers cannot make the node buffer without bound).
pub const MAX_OUTBOX_BYTES: usize = 4 << 20;

/// What a client request does: keyfortd implements it over the card and the replicas.
pub trait ClientService {
    /// The cluster id and node id a challenge is made for.
    fn identity(&self) -> ([u8; 16], u64);
    /// Checks a proof (`response` = HMAC(secret of `client_id` in `scope`, challenge ‖
    /// context)). `Ok(false)`: wrong; `Err`: the check could not be made.
    fn verify_proof<'a>(
        &'a self,
        scope: Scope,
        client_id: [u8; 16],
        challenge: [u8; CHALLENGE_LEN],
        context: Vec<u8>,
        response: [u8; 32],
    ) -> Pin<Box<dyn Future<Output = Result<bool, ErrorReply>> + 'a>>;
    /// Runs one request of an authenticated connection of `scope`.
    fn handle(
        self: Rc<Self>,
        scope: Scope,
        req: Request,
    ) -> Pin<Box<dyn Future<Output = Result<Response, ErrorReply>>>>;
    /// Whether a connection authenticated for `scope` may go on with the client certificate
    /// it presented over TLS (`None`: none, or plaintext). Called after the proof verified;
    /// an error is the answer to the proof. Default: any.
    fn check_client_cert(
        &self,
        _scope: &Scope,
        _cert: Option<&CertificateDer<'static>>,
    ) -> Result<(), ErrorReply> {
        Ok(())
    }
    /// Whether the node is stopping: new requests are answered `ShuttingDown`.
    fn shutting_down(&self) -> bool {
        false
    }
}

/// Counters of the server, for status and tests.
#[derive(Clone, Copy, Debug, Default)]
pub struct ServerStats {
    pub connections: usize,
    pub accepted: u64,
    pub refused_connections: u64,
    pub auth_failures: u64,
    pub bad_frames: u64,
    pub overloaded: u64,
    /// Connections whose TLS handshake failed (plaintext to the TLS port, an old protocol, a
    /// client certificate of another CA, expired or revoked).
    pub tls_failures: u64,
    pub requests: u64,
}

/// Upper bounds, in microseconds, of the request latency buckets (50 µs to 10 s; slower
/// requests count only in the implicit `+Inf` bucket).
pub const LATENCY_BUCKETS_US: [u64; 18] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 7_500_000, 10_000_000,
];

/// One opcode's request latencies: per-bucket (not cumulative) counts, the total count (those
/// above the last bound are `count` minus the buckets' sum) and the sum.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpLatency {
    /// `buckets[i]`: requests that took more than `LATENCY_BUCKETS_US[i - 1]` and at most
    /// `LATENCY_BUCKETS_US[i]`.
    pub buckets: [u64; LATENCY_BUCKETS_US.len()],
    pub count: u64,
    pub sum_ns: u64,
}

impl OpLatency {
    pub fn record(&mut self, d: Duration) {
        let ns = d.as_nanos();
        if let Some(i) = LATENCY_BUCKETS_US
            .iter()
            .position(|&b| ns <= u128::from(b) * 1000)
        {
            self.buckets[i] += 1;
        }
        self.count += 1;
        self.sum_ns = self
            .sum_ns
            .saturating_add(d.as_nanos().min(u128::from(u64::MAX)) as u64);
    }
}

/// Per opcode latencies and error answers, for metrics.
#[derive(Clone, Debug, Default)]
pub struct RequestMetrics {
    /// (opcode, latencies) of every opcode in [`op::ALL`], in that order.
    pub latency: Vec<(u16, OpLatency)>,
    /// Error answers by (opcode, code); opcode 0: a framing error (no request).
    pub errors: Vec<((u16, ErrorCode), u64)>,
}

/// The name of a client opcode in metrics: `none` for 0 (a framing error's answer), `unknown`
/// for none of [`op::ALL`].
pub fn op_name(opcode: u16) -> &'static str {
    match opcode {
        op::HELLO => "hello",
        op::PROOF => "proof",
        op::ROUTE => "route",
        op::PARTITION_CREATE => "partition_create",
        op::PARTITION_DELETE => "partition_delete",
        op::CREDENTIAL_ISSUE => "credential_issue",
        op::CLUSTER_STATUS => "cluster_status",
        op::KEY_CREATE => "key_create",
        op::KEY_ROTATE => "key_rotate",
        op::KEY_UPDATE => "key_update",
        op::KEY_DELETE => "key_delete",
        op::KEY_DESCRIBE => "key_describe",
        op::KEY_LIST => "key_list",
        op::KEY_RESTORE => "key_restore",
        op::ENCRYPT => "encrypt",
        op::DECRYPT => "decrypt",
        op::GENERATE_DATA_KEY => "generate_data_key",
        0 => "none",
        _ => "unknown",
    }
}

/// The server's shared state on its executor.
pub struct ClientServer {
    service: Rc<dyn ClientService>,
    in_flight: Cell<usize>,
    stats: RefCell<ServerStats>,
    /// Indexed like [`op::ALL`].
    latency: RefCell<[OpLatency; op::ALL.len()]>,
    errors: RefCell<std::collections::BTreeMap<(u16, u16), u64>>,
    /// TLS on every connection (none: plaintext, the loopback-only insecure mode).
    tls: RefCell<Option<std::sync::Arc<rustls::ServerConfig>>>,
}

impl ClientServer {
    pub fn new(service: Rc<dyn ClientService>) -> Rc<ClientServer> {
        Rc::new(ClientServer {
            service,
            in_flight: Cell::new(0),
            stats: RefCell::new(ServerStats::default()),
            latency: RefCell::default(),
            errors: RefCell::default(),
            tls: RefCell::new(None),
        })
    }

    /// Serves every connection accepted from now on over TLS with `config`.
    pub fn set_tls(&self, config: std::sync::Arc<rustls::ServerConfig>) {
        *self.tls.borrow_mut() = Some(config);
    }

    /// Plaintext, or the TLS handshake (a failure is counted and logged, and closes `tcp`).
    async fn secure(&self, tcp: TcpStream) -> Option<Stream> {
        let tls = self.tls.borrow().clone();
        let Some(config) = tls else {
            return Some(Stream::Plain(tcp));
        };
        let remote = tcp.peer_addr().ok();
        match Stream::accept(tcp, config).await {
            Ok(s) => Some(s),
            Err(e) => {
                self.stats.borrow_mut().tls_failures += 1;
                debug!(?remote, error = %e, "client TLS handshake refused");
                None
            }
        }
    }

    pub fn stats(&self) -> ServerStats {
        *self.stats.borrow()
    }

    /// A copy of the per opcode latencies and error counts.
    pub fn request_metrics(&self) -> RequestMetrics {
        let latency = self.latency.borrow();
        RequestMetrics {
            latency: op::ALL
                .iter()
                .copied()
                .zip(latency.iter().copied())
                .collect(),
            errors: self
                .errors
                .borrow()
                .iter()
                .filter_map(|(&(o, c), &n)| Some(((o, ErrorCode::from_u16(c)?), n)))
                .collect(),
        }
    }

    /// Records a decoded request's time from `decoded` to now (its answer just queued).
    fn observe(&self, opcode: u16, decoded: Instant) {
        if let Some(i) = op::ALL.iter().position(|&o| o == opcode) {
            self.latency.borrow_mut()[i].record(decoded.elapsed());
        }
    }

    /// Queues an error answer and counts it.
    fn error(&self, out: &Outbox, h: FrameHeader, e: ErrorReply) {
        *self
            .errors
            .borrow_mut()
            .entry((h.opcode, e.code as u16))
            .or_default() += 1;
        out.error(h, e);
    }

    /// Binds `addr` and serves it on the current executor until the process ends. Returns
    /// the bound address.
    pub fn listen(self: &Rc<Self>, addr: SocketAddr) -> std::io::Result<SocketAddr> {
        let listener = TcpListener::bind(addr).map_err(std::io::Error::from)?;
        let bound = listener.local_addr()?;
        glommio::spawn_local(self.clone().accept_loop(listener)).detach();
        Ok(bound)
    }

    async fn accept_loop(self: Rc<Self>, listener: TcpListener) {
        loop {
            let stream = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, "client accept failed");
                    glommio::timer::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let live = self.stats.borrow().connections;
            if live >= MAX_CONNECTIONS {
                self.stats.borrow_mut().refused_connections += 1;
                let me = self.clone();
                glommio::spawn_local(async move {
                    if let Some(stream) = me.secure(stream).await {
                        refuse(
                            stream,
                            ErrorReply::new(
                                ErrorCode::Overloaded,
                                format!("too many client connections ({MAX_CONNECTIONS})"),
                            ),
                        )
                        .await
                    }
                })
                .detach();
                continue;
            }
            {
                let mut st = self.stats.borrow_mut();
                st.connections += 1;
                st.accepted += 1;
            }
            let me = self.clone();
            glommio::spawn_local(async move {
                let remote = stream.peer_addr().ok();
                if let Some(stream) = me.secure(stream).await {
                    if let Err(e) = me.clone().serve(stream).await {
                        debug!(?remote, error = %e, "client connection ended");
                    }
                }
                me.stats.borrow_mut().connections -= 1;
            })
            .detach();
        }
    }

    async fn serve(self: Rc<Self>, stream: Stream) -> Result<(), ConnError> {
        let cert = stream
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.clone().into_owned());
        let (mut rd, wr) = futures_lite::io::split(stream);
        let out = Rc::new(Outbox::default());
        let writer = glommio::spawn_local(run_writer(wr, out.clone()));
        let r = self.read_loop(&mut rd, &out, cert.as_ref()).await;
        out.close();
        let _ = writer.await;
        r
    }

    async fn read_loop<R: futures_lite::AsyncRead + Unpin>(
        self: &Rc<Self>,
        rd: &mut R,
        out: &Rc<Outbox>,
        cert: Option<&CertificateDer<'static>>,
    ) -> Result<(), ConnError> {
        let mut reader = FrameReader::with_max(CLIENT_MAX_FRAME_PAYLOAD);
        let scope = match within(AUTH_TIMEOUT, "client authentication", async {
            self.authenticate(rd, &mut reader, out, cert).await
        })
        .await
        {
            Ok(Some(scope)) => scope,
            Ok(None) => return Ok(()),
            Err(e) => {
                self.frame_error(&e, &reader, out);
                return Err(e);
            }
        };
        let conn_in_flight = Rc::new(Cell::new(0usize));
        loop {
            out.wait_room().await;
            let h = match reader.next(rd).await {
                Ok(h) => h,
                Err(e) => {
                    self.frame_error(&e, &reader, out);
                    return Err(e);
                }
            };
            self.stats.borrow_mut().requests += 1;
            if h.flags != 0 {
                self.error(
                    out,
                    h,
                    ErrorReply::new(ErrorCode::BadRequest, "a request frame has no flags"),
                );
                continue;
            }
            let req = match Request::decode(h.opcode, reader.payload()) {
                Ok(r) => r,
                Err(e) => {
                    let code = match e {
                        crate::client_proto::ProtoError::UnknownOpcode(_) => {
                            ErrorCode::UnknownOpcode
                        }
                        crate::client_proto::ProtoError::TooLong { .. } => ErrorCode::TooLarge,
                        _ => ErrorCode::BadRequest,
                    };
                    self.error(out, h, ErrorReply::new(code, e.to_string()));
                    continue;
                }
            };
            let decoded = Instant::now();
            if matches!(req, Request::Hello { .. } | Request::Proof { .. }) {
                self.error(
                    out,
                    h,
                    ErrorReply::new(ErrorCode::BadRequest, "the connection is authenticated"),
                );
                self.observe(h.opcode, decoded);
                continue;
            }
            if self.service.shutting_down() {
                self.error(
                    out,
                    h,
                    ErrorReply::new(ErrorCode::ShuttingDown, "the node is shutting down"),
                );
                self.observe(h.opcode, decoded);
                continue;
            }
            if conn_in_flight.get() >= MAX_IN_FLIGHT_PER_CONNECTION
                || self.in_flight.get() >= MAX_IN_FLIGHT_PER_NODE
            {
                self.stats.borrow_mut().overloaded += 1;
                self.error(out,
                    h,
                    ErrorReply::new(
                        ErrorCode::Overloaded,
                        format!(
                            "too many requests in flight (connection {MAX_IN_FLIGHT_PER_CONNECTION}, \
                             node {MAX_IN_FLIGHT_PER_NODE})"
                        ),
                    ),
                );
                self.observe(h.opcode, decoded);
                continue;
            }
            conn_in_flight.set(conn_in_flight.get() + 1);
            self.in_flight.set(self.in_flight.get() + 1);
            let (me, out, conn) = (self.clone(), out.clone(), conn_in_flight.clone());
            glommio::spawn_local(async move {
                let r = me.service.clone().handle(scope, req).await;
                conn.set(conn.get() - 1);
                me.in_flight.set(me.in_flight.get() - 1);
                match r {
                    Ok(resp) => out.answer(h, &resp),
                    Err(e) => me.error(&out, h, e),
                }
                me.observe(h.opcode, decoded);
            })
            .detach();
        }
    }

    /// Hello → challenge → proof. `Ok(None)`: refused (the answer is queued).
    async fn authenticate<R: futures_lite::AsyncRead + Unpin>(
        &self,
        rd: &mut R,
        reader: &mut FrameReader,
        out: &Outbox,
        cert: Option<&CertificateDer<'static>>,
    ) -> Result<Option<Scope>, ConnError> {
        let h = reader.next(rd).await?;
        let hello = Request::decode(h.opcode, reader.payload());
        let (scope, client_id) = match hello {
            Ok(Request::Hello {
                version,
                scope,
                client_id,
            }) if h.flags == 0 => {
                if version != CLIENT_PROTOCOL_VERSION {
                    self.error(
                        out,
                        h,
                        ErrorReply::new(
                            ErrorCode::UnsupportedVersion,
                            format!(
                                "client protocol {version}; this node speaks \
                                 {CLIENT_PROTOCOL_VERSION}"
                            ),
                        ),
                    );
                    return Ok(None);
                }
                (scope, client_id)
            }
            Ok(_) => {
                self.stats.borrow_mut().auth_failures += 1;
                self.error(
                    out,
                    h,
                    ErrorReply::new(ErrorCode::Unauthenticated, "authenticate first (hello)"),
                );
                return Ok(None);
            }
            Err(e) => {
                self.error(
                    out,
                    h,
                    ErrorReply::new(ErrorCode::BadRequest, e.to_string()),
                );
                return Ok(None);
            }
        };
        let (cluster_id, node_id) = self.service.identity();
        let challenge: [u8; CHALLENGE_LEN] = rand::random();
        out.answer(
            h,
            &Response::Challenge {
                challenge,
                cluster_id,
                node_id,
            },
        );
        let h = reader.next(rd).await?;
        let response = match Request::decode(h.opcode, reader.payload()) {
            Ok(Request::Proof { response }) if h.flags == 0 => response,
            _ => {
                self.stats.borrow_mut().auth_failures += 1;
                self.error(
                    out,
                    h,
                    ErrorReply::new(ErrorCode::Unauthenticated, "expected the proof"),
                );
                return Ok(None);
            }
        };
        let context = proof_context(&cluster_id, node_id, &scope, &client_id);
        match self
            .service
            .verify_proof(scope, client_id, challenge, context, response)
            .await
        {
            Ok(true) => match self.service.check_client_cert(&scope, cert) {
                Ok(()) => {
                    out.answer(h, &Response::Accepted);
                    Ok(Some(scope))
                }
                Err(e) => {
                    self.stats.borrow_mut().auth_failures += 1;
                    self.error(out, h, e);
                    Ok(None)
                }
            },
            Ok(false) => {
                self.stats.borrow_mut().auth_failures += 1;
                self.error(
                    out,
                    h,
                    ErrorReply::new(
                        ErrorCode::Unauthenticated,
                        "wrong credential for this scope",
                    ),
                );
                Ok(None)
            }
            Err(e) => {
                self.error(out, h, e);
                Ok(None)
            }
        }
    }

    /// Answers what can be answered of a framing error before the connection closes.
    fn frame_error(&self, e: &ConnError, reader: &FrameReader, out: &Outbox) {
        let ConnError::Frame(fe) = e else { return };
        self.stats.borrow_mut().bad_frames += 1;
        let (code, request_id) = match fe {
            FrameError::TooLong { .. } => (ErrorCode::TooLarge, reader.pending_request_id()),
            _ => (ErrorCode::BadRequest, None),
        };
        let h = FrameHeader {
            flags: 0,
            opcode: 0,
            request_id: request_id.unwrap_or(0),
        };
        self.error(
            out,
            h,
            ErrorReply::new(code, format!("{fe}; closing the connection")),
        );
    }
}

/// Answers waiting to be written on one connection.
#[derive(Default)]
struct Outbox {
    buf: RefCell<Vec<u8>>,
    writer: RefCell<Option<Waker>>,
    reader: RefCell<Option<Waker>>,
    closed: Cell<bool>,
}

impl Outbox {
    fn push(&self, h: FrameHeader, fl: u8, payload: &[u8]) {
        let header = FrameHeader {
            flags: fl,
            opcode: h.opcode,
            request_id: h.request_id,
        };
        if let Err(e) = frame::encode(header, payload, &mut self.buf.borrow_mut()) {
            warn!(error = %e, "client answer not encodable");
        }
        if let Some(w) = self.writer.borrow_mut().take() {
            w.wake();
        }
    }

    fn answer(&self, h: FrameHeader, r: &Response) {
        self.push(h, flags::RESPONSE, &r.encode());
    }

    fn error(&self, h: FrameHeader, e: ErrorReply) {
        self.push(h, flags::RESPONSE | flags::ERROR, &e.encode());
    }

    fn close(&self) {
        self.closed.set(true);
        if let Some(w) = self.writer.borrow_mut().take() {
            w.wake();
        }
    }

    /// Waits while more than [`MAX_OUTBOX_BYTES`] wait to be written.
    async fn wait_room(&self) {
        poll_fn(|cx| {
            if self.buf.borrow().len() <= MAX_OUTBOX_BYTES || self.closed.get() {
                Poll::Ready(())
            } else {
                *self.reader.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }
}

async fn run_writer<W: futures_lite::AsyncWrite + Unpin>(mut wr: W, out: Rc<Outbox>) {
    let mut batch = Vec::new();
    loop {
        let closing = poll_fn(|cx| {
            if !out.buf.borrow().is_empty() {
                Poll::Ready(false)
            } else if out.closed.get() {
                Poll::Ready(true)
            } else {
                *out.writer.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await;
        if closing {
            let _ = wr.close().await;
            return;
        }
        std::mem::swap(&mut batch, &mut out.buf.borrow_mut());
        if let Some(w) = out.reader.borrow_mut().take() {
            w.wake();
        }
        if wr.write_all(&batch).await.is_err() || wr.flush().await.is_err() {
            out.closed.set(true);
            return;
        }
        batch.clear();
    }
}

/// Writes one error answer (request id 0) and closes.
async fn refuse(mut stream: Stream, e: ErrorReply) {
    let mut b = Vec::new();
    let h = FrameHeader {
        flags: flags::RESPONSE | flags::ERROR,
        opcode: 0,
        request_id: 0,
    };
    if frame::encode(h, &e.encode(), &mut b).is_ok() {
        let _ = within(AUTH_TIMEOUT, "refusal", async {
            stream.write_all(&b).await?;
            stream.flush().await?;
            Ok(())
        })
        .await;
    }
    let _ = stream.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_buckets_hold_their_upper_bound() {
        let mut l = OpLatency::default();
        l.record(Duration::from_micros(50));
        l.record(Duration::from_nanos(50_001));
        l.record(Duration::from_secs(10));
        l.record(Duration::from_secs(11));
        assert_eq!(l.buckets[0], 1);
        assert_eq!(l.buckets[1], 1);
        assert_eq!(l.buckets[LATENCY_BUCKETS_US.len() - 1], 1);
        assert_eq!(l.count, 4);
        assert_eq!(l.buckets.iter().sum::<u64>(), 3);
        assert_eq!(l.sum_ns, 50_000 + 50_001 + 21_000_000_000);
        assert!(LATENCY_BUCKETS_US.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn every_opcode_has_a_name() {
        for o in op::ALL {
            assert_ne!(op_name(o), "unknown");
        }
        assert_eq!(op_name(0), "none");
        assert_eq!(op_name(0xffff), "unknown");
    }
}
