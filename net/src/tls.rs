//! Transport security (docs/format.md §10, docs/operations.md "TLS"): TLS 1.3 with rustls on
//! both protocols, over glommio's futures-io streams (futures-rustls) on the nodes and over
//! blocking std sockets in the client library.
//!
//! **Names.** Every certificate is issued by the cluster CA (made in a card at `cluster init`)
//! and names what it is for in DNS subject alternative names under the cluster's domain
//! `<cluster id hex>.keyfort` ([`cluster_name`]):
//!
//! - a node: `n<raft id>.<cluster>` ([`node_name`]), the cluster name itself (what a client may
//!   verify when it knows the cluster but not the node), and the IP addresses it listens on;
//! - a node that is joining and has no raft id yet: `joiner.<cluster>` ([`joiner_name`]);
//! - a client of one partition: `p-<partition id hex>.<cluster>` ([`partition_name`]).
//!
//! A dialing node verifies the node it dials *by name* (`n<id>.<cluster>`), so a certificate of
//! another node, of a joiner, of a client or of another cluster's CA does not pass; a listening
//! node checks, once the HMAC handshake named the peer, that the peer's certificate names that
//! raft id ([`cert_names`]). The HMAC handshake stays as a second factor inside the TLS session.
//!
//! **Versions.** Nodes speak TLS 1.3 only ([`protocol_versions`]); a TLS 1.2 offer is refused
//! with a `protocol_version` alert. Sessions resume from an in-memory cache of
//! [`SESSION_CACHE_ENTRIES`] on both sides; no request ever makes a handshake.
//!
//! **Errors.** Every handshake failure is reported as a [`TlsFailure`] ([`classify`]), so a
//! refused client or peer says *why*: unknown issuer, expired, revoked, wrong name, no
//! certificate, a downgrade, or plaintext on a TLS port.

use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;
use rustls::crypto::CryptoProvider;
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use crate::client::hex;

/// Time a TLS handshake may take, on either protocol, before the connection is dropped.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Sessions each side keeps for resumption (server: session ids/tickets it can resume; client:
/// tickets it holds, per server name).
pub const SESSION_CACHE_ENTRIES: usize = 4096;
/// Longest PEM file (CA, certificate, key, CRL) read: these are small; a bigger file is refused.
pub const MAX_PEM_BYTES: u64 = 1 << 20;

/// The one crypto provider: ring, with its default TLS 1.3 suites.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// TLS 1.3 only.
pub fn protocol_versions() -> &'static [&'static rustls::SupportedProtocolVersion] {
    static TLS13_ONLY: [&rustls::SupportedProtocolVersion; 1] = [&rustls::version::TLS13];
    &TLS13_ONLY
}

/// The cluster's DNS domain in certificates: `<cluster id hex>.keyfort`.
pub fn cluster_name(cluster_id: &[u8; 16]) -> String {
    format!("{}.keyfort", hex(cluster_id))
}

/// A node's name: `n<raft id>.<cluster>`.
pub fn node_name(cluster_id: &[u8; 16], node_id: u64) -> String {
    format!("n{node_id}.{}", cluster_name(cluster_id))
}

/// A joining node's name (it has no raft id yet): `joiner.<cluster>`.
pub fn joiner_name(cluster_id: &[u8; 16]) -> String {
    format!("joiner.{}", cluster_name(cluster_id))
}

/// A partition client's name: `p-<partition id hex>.<cluster>`.
pub fn partition_name(cluster_id: &[u8; 16], partition: &[u8; 16]) -> String {
    format!("p-{}.{}", hex(partition), cluster_name(cluster_id))
}

/// Why a TLS handshake failed, as the side that noticed saw it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsFailure {
    /// The other side's certificate is not issued by the CA this side trusts (another
    /// cluster's CA, a self-made certificate, or this side lacks the right CA file).
    #[error("certificate not issued by the trusted cluster CA")]
    UnknownIssuer,
    #[error("certificate expired")]
    Expired,
    #[error("certificate not valid yet")]
    NotYetValid,
    #[error("certificate revoked (listed in the CA's revocation list)")]
    Revoked,
    /// The certificate does not name what was expected (another node's raft id, a joiner,
    /// a client certificate where a node's was needed, another address).
    #[error("certificate does not name {expected}")]
    WrongName { expected: String },
    /// A certificate was required and none was presented.
    #[error("no certificate presented (a client certificate is required)")]
    NoCertificate,
    /// The other side offered or accepted only an older protocol: a downgrade is refused.
    #[error("TLS version refused: keyfort speaks TLS 1.3 only")]
    ProtocolVersion,
    /// The other side is not speaking TLS (plaintext to a TLS port, or TLS to a plaintext
    /// port).
    #[error("the other side does not speak TLS (plaintext port, or plaintext to a TLS port)")]
    NotTls,
    /// The other side refused the handshake with this alert.
    #[error("refused by the other side: TLS alert {0}")]
    Alert(String),
    /// A certificate that does not parse, a bad signature, or another certificate problem.
    #[error("bad certificate: {0}")]
    BadCertificate(String),
    #[error("TLS error: {0}")]
    Other(String),
}

/// The typed failure of a rustls error.
pub fn classify(e: &rustls::Error) -> TlsFailure {
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};
    match e {
        E::InvalidCertificate(c) => match c {
            C::UnknownIssuer => TlsFailure::UnknownIssuer,
            C::Expired | C::ExpiredContext { .. } => TlsFailure::Expired,
            C::NotValidYet | C::NotValidYetContext { .. } => TlsFailure::NotYetValid,
            C::Revoked => TlsFailure::Revoked,
            C::NotValidForName | C::NotValidForNameContext { .. } => TlsFailure::WrongName {
                expected: "the expected name".into(),
            },
            other => TlsFailure::BadCertificate(format!("{other:?}")),
        },
        E::NoCertificatesPresented => TlsFailure::NoCertificate,
        E::AlertReceived(a) => match a {
            A::ProtocolVersion => TlsFailure::ProtocolVersion,
            A::UnknownCA => TlsFailure::UnknownIssuer,
            A::CertificateExpired => TlsFailure::Expired,
            A::CertificateRevoked => TlsFailure::Revoked,
            A::CertificateRequired => TlsFailure::NoCertificate,
            other => TlsFailure::Alert(format!("{other:?}")),
        },
        E::PeerIncompatible(p) => {
            let s = format!("{p:?}");
            if s.contains("Tls12") || s.contains("Version") {
                TlsFailure::ProtocolVersion
            } else {
                TlsFailure::Other(s)
            }
        }
        E::InvalidMessage(_) | E::InappropriateMessage { .. } => TlsFailure::NotTls,
        other => TlsFailure::Other(other.to_string()),
    }
}

/// The typed failure inside an I/O error from a TLS stream, if it is one.
pub fn classify_io(e: &io::Error) -> Option<TlsFailure> {
    let inner = e.get_ref()?;
    if let Some(r) = inner.downcast_ref::<rustls::Error>() {
        return Some(classify(r));
    }
    inner.downcast_ref::<TlsFailure>().cloned()
}

/// Bad TLS material (a file that does not parse, a key that does not match).
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("{what} {path}: {why}")]
    File {
        what: &'static str,
        path: String,
        why: String,
    },
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn config_err(e: impl std::fmt::Display) -> TlsConfigError {
    TlsConfigError::Config(e.to_string())
}

fn read_pem(what: &'static str, path: &std::path::Path) -> Result<Vec<u8>, TlsConfigError> {
    let err = |why: String| TlsConfigError::File {
        what,
        path: path.display().to_string(),
        why,
    };
    let len = std::fs::metadata(path)
        .map_err(|e| err(e.to_string()))?
        .len();
    if len > MAX_PEM_BYTES {
        return Err(err(format!("{len} bytes, more than {MAX_PEM_BYTES}")));
    }
    std::fs::read(path).map_err(|e| err(e.to_string()))
}

/// Every certificate of a PEM file (at least one).
pub fn read_certs(
    what: &'static str,
    path: &std::path::Path,
) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    use rustls_pki_types::pem::PemObject;
    let pem = read_pem(what, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsConfigError::File {
            what,
            path: path.display().to_string(),
            why: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsConfigError::File {
            what,
            path: path.display().to_string(),
            why: "no certificate in it".into(),
        });
    }
    Ok(certs)
}

/// The private key of a PEM file.
pub fn read_key(path: &std::path::Path) -> Result<PrivateKeyDer<'static>, TlsConfigError> {
    use rustls_pki_types::pem::PemObject;
    let pem = read_pem("private key", path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsConfigError::File {
        what: "private key",
        path: path.display().to_string(),
        why: e.to_string(),
    })
}

/// Every revocation list of a PEM file (none is fine).
pub fn read_crls(
    path: &std::path::Path,
) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsConfigError> {
    use rustls_pki_types::pem::PemObject;
    let pem = read_pem("revocation list", path)?;
    CertificateRevocationListDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsConfigError::File {
            what: "revocation list",
            path: path.display().to_string(),
            why: e.to_string(),
        })
}

/// A certificate chain (leaf first) and its private key.
#[derive(Debug)]
pub struct TlsIdentity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Clone for TlsIdentity {
    fn clone(&self) -> Self {
        TlsIdentity {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

/// What a node trusts: the cluster CA and its revocation lists.
#[derive(Debug, Clone)]
pub struct Trust {
    pub ca: Vec<CertificateDer<'static>>,
    pub crls: Vec<CertificateRevocationListDer<'static>>,
}

impl Trust {
    fn roots(&self) -> Result<Arc<RootCertStore>, TlsConfigError> {
        let mut roots = RootCertStore::empty();
        for c in &self.ca {
            roots.add(c.clone()).map_err(config_err)?;
        }
        Ok(Arc::new(roots))
    }
}

/// A client configuration: TLS 1.3, trusting `trust`, with an optional client certificate.
/// Sessions resume (the in-memory ticket cache of [`SESSION_CACHE_ENTRIES`]) as long as the
/// same `Arc` is used for every connection.
pub fn client_config(
    trust: &Trust,
    identity: Option<TlsIdentity>,
) -> Result<Arc<ClientConfig>, TlsConfigError> {
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(trust.roots()?, provider())
            .with_crls(trust.crls.clone())
            .build()
            .map_err(config_err)?;
    let b = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(protocol_versions())
        .map_err(config_err)?
        .with_webpki_verifier(verifier);
    let mut c = match identity {
        Some(id) => b
            .with_client_auth_cert(id.chain, id.key)
            .map_err(config_err)?,
        None => b.with_no_client_auth(),
    };
    c.resumption = rustls::client::Resumption::in_memory_sessions(SESSION_CACHE_ENTRIES);
    Ok(Arc::new(c))
}

/// A server configuration: TLS 1.3, presenting `identity`; client certificates are verified
/// against `trust` and required or optional.
pub fn server_config(
    trust: &Trust,
    identity: TlsIdentity,
    require_client_cert: bool,
) -> Result<Arc<ServerConfig>, TlsConfigError> {
    let mut vb = WebPkiClientVerifier::builder_with_provider(trust.roots()?, provider())
        .with_crls(trust.crls.clone());
    if !require_client_cert {
        vb = vb.allow_unauthenticated();
    }
    let verifier = vb.build().map_err(config_err)?;
    let mut c = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(protocol_versions())
        .map_err(config_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain, identity.key)
        .map_err(config_err)?;
    c.session_storage = rustls::server::ServerSessionMemoryCache::new(SESSION_CACHE_ENTRIES);
    Ok(Arc::new(c))
}

/// Whether `cert` names `name` (a DNS name or an IP address) in its subject alternative names.
/// Only the name is checked: the chain was verified by the handshake.
pub fn cert_names(cert: &CertificateDer<'_>, name: &str) -> bool {
    let Ok(parsed) = ParsedCertificate::try_from(cert) else {
        return false;
    };
    let Ok(server_name) = ServerName::try_from(name) else {
        return false;
    };
    rustls::client::verify_server_name(&parsed, &server_name).is_ok()
}

/// A node's TLS on both protocols.
#[derive(Clone)]
pub struct NodeTls {
    pub cluster_id: [u8; 16],
    /// Client protocol: server authentication; client certificates verified when presented.
    pub client_server: Arc<ServerConfig>,
    /// Peer protocol, listening: a certificate of the cluster CA is required.
    pub peer_server: Arc<ServerConfig>,
    /// Peer protocol, dialing: presents this node's certificate, verifies the dialed node's
    /// name.
    pub peer_client: Arc<ClientConfig>,
}

impl std::fmt::Debug for NodeTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeTls")
            .field("cluster", &cluster_name(&self.cluster_id))
            .finish()
    }
}

impl NodeTls {
    pub fn new(
        cluster_id: [u8; 16],
        trust: &Trust,
        identity: TlsIdentity,
    ) -> Result<NodeTls, TlsConfigError> {
        Ok(NodeTls {
            cluster_id,
            client_server: server_config(trust, identity.clone(), false)?,
            peer_server: server_config(trust, identity.clone(), true)?,
            peer_client: client_config(trust, Some(identity))?,
        })
    }
}

/// How a node dials over TLS where it knows no raft id to verify (a joiner fetching the config
/// and asking to join): the client configuration (with the joiner's certificate) and the name
/// the dialed node must carry, [`cluster_name`].
#[derive(Clone)]
pub struct DialTls {
    pub config: Arc<ClientConfig>,
    pub name: String,
}

/// A connection of a node: plaintext (loopback-only insecure mode) or TLS, either side.
pub enum Stream {
    Plain(TcpStream),
    Client(Box<futures_rustls::client::TlsStream<TcpStream>>),
    Server(Box<futures_rustls::server::TlsStream<TcpStream>>),
}

impl Stream {
    pub fn peer_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.tcp().peer_addr().map_err(io::Error::from)
    }

    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Client(s) => s.get_ref().0,
            Stream::Server(s) => s.get_ref().0,
        }
    }

    /// The other side's certificate chain (TLS with a certificate presented), leaf first.
    pub fn peer_certificates(&self) -> Option<&[CertificateDer<'static>]> {
        match self {
            Stream::Plain(_) => None,
            Stream::Client(s) => s.get_ref().1.peer_certificates(),
            Stream::Server(s) => s.get_ref().1.peer_certificates(),
        }
    }

    /// Whether this TLS session was resumed (no full handshake).
    pub fn resumed(&self) -> bool {
        let kind = match self {
            Stream::Plain(_) => return false,
            Stream::Client(s) => s.get_ref().1.handshake_kind(),
            Stream::Server(s) => s.get_ref().1.handshake_kind(),
        };
        kind == Some(rustls::HandshakeKind::Resumed)
    }

    pub fn is_tls(&self) -> bool {
        !matches!(self, Stream::Plain(_))
    }

    /// Accepts a TLS session on `tcp` with `config` (within [`TLS_HANDSHAKE_TIMEOUT`]).
    pub async fn accept(tcp: TcpStream, config: Arc<ServerConfig>) -> Result<Stream, TlsFailure> {
        let acc = futures_rustls::TlsAcceptor::from(config);
        match within_handshake_timeout(acc.accept(tcp)).await? {
            Ok(s) => Ok(Stream::Server(Box::new(s))),
            Err(e) => Err(classify_io(&e).unwrap_or_else(|| eof_or_other(&e))),
        }
    }

    /// Opens a TLS session on `tcp` to `name` with `config` (within
    /// [`TLS_HANDSHAKE_TIMEOUT`]).
    pub async fn connect(
        tcp: TcpStream,
        config: Arc<ClientConfig>,
        name: &str,
    ) -> Result<Stream, TlsFailure> {
        let server_name =
            ServerName::try_from(name.to_string()).map_err(|_| TlsFailure::WrongName {
                expected: name.to_string(),
            })?;
        let conn = futures_rustls::TlsConnector::from(config);
        match within_handshake_timeout(conn.connect(server_name, tcp)).await? {
            Ok(s) => Ok(Stream::Client(Box::new(s))),
            Err(e) => Err(match classify_io(&e) {
                Some(TlsFailure::WrongName { .. }) => TlsFailure::WrongName {
                    expected: name.to_string(),
                },
                Some(f) => f,
                None => eof_or_other(&e),
            }),
        }
    }
}

/// `handshake`'s own result, or a timeout failure when it takes longer than
/// [`TLS_HANDSHAKE_TIMEOUT`].
async fn within_handshake_timeout<T>(
    handshake: impl std::future::Future<Output = std::io::Result<T>>,
) -> Result<std::io::Result<T>, TlsFailure> {
    futures_lite::future::or(async { Ok(handshake.await) }, async {
        glommio::timer::sleep(TLS_HANDSHAKE_TIMEOUT).await;
        Err(TlsFailure::Other("handshake timed out".into()))
    })
    .await
}

/// A handshake that ended in EOF or a reset: the other side hung up, which is what a plaintext
/// keyfort port does with a ClientHello (a bad frame) and what a TLS node does after it sent
/// its alert.
fn eof_or_other(e: &io::Error) -> TlsFailure {
    match e.kind() {
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::BrokenPipe => TlsFailure::Other(format!("connection closed: {e}")),
        _ => TlsFailure::Other(e.to_string()),
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Stream::Plain($s) => $e,
            Stream::Client($s) => $e,
            Stream::Server($s) => $e,
        }
    };
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => Pin::new(s).poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_flush(cx))
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_close(cx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_dns_names() {
        let c = [0xab; 16];
        for n in [
            cluster_name(&c),
            node_name(&c, 7),
            joiner_name(&c),
            partition_name(&c, &[1; 16]),
        ] {
            assert!(ServerName::try_from(n.as_str()).is_ok(), "{n}");
        }
        assert_eq!(node_name(&c, 3), format!("n3.{}.keyfort", "ab".repeat(16)));
    }

    #[test]
    fn alerts_and_certificate_errors_are_typed() {
        use rustls::{AlertDescription, CertificateError, Error};
        assert_eq!(
            classify(&Error::AlertReceived(AlertDescription::ProtocolVersion)),
            TlsFailure::ProtocolVersion
        );
        assert_eq!(
            classify(&Error::InvalidCertificate(CertificateError::Revoked)),
            TlsFailure::Revoked
        );
        assert_eq!(
            classify(&Error::InvalidCertificate(CertificateError::UnknownIssuer)),
            TlsFailure::UnknownIssuer
        );
        assert_eq!(
            classify(&Error::NoCertificatesPresented),
            TlsFailure::NoCertificate
        );
    }
}
