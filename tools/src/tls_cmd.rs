//! `keyfort tls ...`: the cluster CA's operations (docs/operations.md "TLS"): issue a client
//! certificate for a partition, issue a node certificate by hand, revoke a certificate, and
//! probe a node's TLS port (what it accepts and why it refuses).

use crate::card::CardAt;
use crate::pki::{chain_pem, key_pem, write_file, Subject, TlsDir, Validity};
use keyfort_net::tls::{classify, read_certs, read_key, TlsFailure, TlsIdentity, Trust};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// How long `tls probe` waits for the node to refuse after its handshake finished (TLS 1.3
/// servers refuse a client certificate after the client's Finished).
pub const PROBE_WAIT: Duration = Duration::from_millis(1500);

#[derive(Debug, clap::Subcommand)]
pub enum TlsCmd {
    /// Make a TLS directory (a new CA, in this card) for an existing cluster: one made before
    /// TLS, or restored without `--tls-dir`. Clients and nodes then trust the new `ca.pem`.
    Init {
        #[command(flatten)]
        card: CardAt,
        /// The cluster config file (`cluster init --out`, or `<data dir>/cluster-config`).
        #[arg(long)]
        config: PathBuf,
        /// The directory to make (must not hold a CA).
        #[arg(long)]
        tls_dir: PathBuf,
    },
    /// Issue a client certificate naming a partition (`p-<id>.<cluster>`), signed in this card.
    IssueClient {
        #[command(flatten)]
        card: CardAt,
        /// The cluster's TLS directory (`cluster init` made it).
        #[arg(long)]
        tls_dir: PathBuf,
        /// Partition id, 32 hex digits.
        #[arg(long)]
        partition: String,
        #[command(flatten)]
        out: IssueOut,
    },
    /// Issue a node certificate by hand (`n<id>.<cluster>`; nodes issue their own at start:
    /// this is for probes and tests).
    IssueNode {
        #[command(flatten)]
        card: CardAt,
        #[arg(long)]
        tls_dir: PathBuf,
        #[arg(long)]
        node_id: u64,
        /// IP addresses the certificate names (repeat; default 127.0.0.1).
        #[arg(long = "ip", default_value = "127.0.0.1")]
        ips: Vec<std::net::IpAddr>,
        #[command(flatten)]
        out: IssueOut,
    },
    /// Revoke a certificate: its serial joins `<tls dir>/revoked` and `crl.pem` is signed
    /// again in this card. Nodes read the list at start: restart them one at a time.
    Revoke {
        #[command(flatten)]
        card: CardAt,
        #[arg(long)]
        tls_dir: PathBuf,
        /// The certificate (PEM) to revoke.
        #[arg(long)]
        cert: PathBuf,
    },
    /// Open a TLS session to a node's port and say whether it was accepted, or why not
    /// (exit 0 accepted, 3 refused).
    Probe {
        #[arg(long)]
        addr: SocketAddr,
        /// CA to trust (PEM).
        #[arg(long)]
        ca: PathBuf,
        /// Client certificate and key (PEM), both or neither.
        #[arg(long, requires = "key")]
        cert: Option<PathBuf>,
        #[arg(long, requires = "cert")]
        key: Option<PathBuf>,
        /// Name to verify in the node's certificate (default: the address's IP).
        #[arg(long)]
        name: Option<String>,
        /// Offer TLS 1.2 only (a downgrade attempt: a node must refuse it).
        #[arg(long)]
        tls12_only: bool,
    },
}

#[derive(Debug, clap::Args)]
pub struct IssueOut {
    /// Where to write the certificate (PEM).
    #[arg(long)]
    out_cert: PathBuf,
    /// Where to write the private key (PEM, mode 0600).
    #[arg(long)]
    out_key: PathBuf,
    /// Days the certificate is valid.
    #[arg(long, default_value_t = crate::pki::CLIENT_CERT_DAYS)]
    days: i64,
    /// Start the validity this many days in the past (with a short `--days`, an expired
    /// certificate: for tests of refusal).
    #[arg(long, default_value_t = 0)]
    backdate_days: i64,
}

pub fn run(cmd: TlsCmd) -> crate::CmdResult {
    match cmd {
        TlsCmd::Init {
            card,
            config,
            tls_dir,
        } => {
            let bytes = std::fs::read(&config).map_err(|e| format!("{}: {e}", config.display()))?;
            let cfg = keyfort_engine::cluster::ClusterConfig::decode(&bytes)
                .map_err(|e| format!("{}: {e}", config.display()))?;
            let session = card.session_without_integrity_key()?;
            TlsDir::create(&tls_dir, &session, cfg.cluster_id)?;
            println!(
                "TLS directory {} made for cluster {} (CA made in card {})",
                tls_dir.display(),
                crate::cluster_cmd::hex(&cfg.cluster_id),
                card.label()
            );
            Ok(())
        }
        TlsCmd::IssueClient {
            card,
            tls_dir,
            partition,
            out,
        } => {
            let p = crate::client_cmd::parse_id(&partition, "partition id")?;
            issue(&card, &tls_dir, &Subject::Partition(p), &out)
        }
        TlsCmd::IssueNode {
            card,
            tls_dir,
            node_id,
            ips,
            out,
        } => issue(&card, &tls_dir, &Subject::Node { node_id, ips }, &out),
        TlsCmd::Revoke {
            card,
            tls_dir,
            cert,
        } => {
            let t = TlsDir::open(&tls_dir)?;
            let serial = crate::pki::serial_of(&cert)?;
            let n = crate::pki::revoke(&t, card.session_without_integrity_key()?, serial)?;
            println!(
                "revoked {}; {} now lists {n} serial(s); restart the nodes one at a time to apply it",
                cert.display(),
                t.dir.join(crate::pki::CRL_FILE).display()
            );
            Ok(())
        }
        TlsCmd::Probe {
            addr,
            ca,
            cert,
            key,
            name,
            tls12_only,
        } => match probe(addr, &ca, cert.zip(key), name, tls12_only)? {
            Ok(resumed) => {
                println!("accepted: TLS 1.3 (resumed: {resumed})");
                Ok(())
            }
            Err(f) => {
                println!("refused: {f}");
                println!("typed: {f:?}");
                std::process::exit(3);
            }
        },
    }
}

fn issue(
    card: &CardAt,
    tls_dir: &std::path::Path,
    subject: &Subject,
    out: &IssueOut,
) -> crate::CmdResult {
    let t = TlsDir::open(tls_dir)?;
    let ca = t.ca_in(card.session_without_integrity_key()?)?;
    let id = ca.issue(
        &t,
        subject,
        Validity {
            days: out.days,
            backdate_days: out.backdate_days,
        },
    )?;
    write_file(&out.out_key, key_pem(&id.key).as_bytes(), 0o600)?;
    write_file(&out.out_cert, chain_pem(&id.chain).as_bytes(), 0o644)?;
    println!(
        "issued {:?} ({} days) to {} (key {})",
        subject,
        out.days,
        out.out_cert.display(),
        out.out_key.display()
    );
    Ok(())
}

/// One TLS session to `addr`: `Ok(Ok(resumed))` accepted, `Ok(Err(why))` refused.
pub fn probe(
    addr: SocketAddr,
    ca: &std::path::Path,
    client: Option<(PathBuf, PathBuf)>,
    name: Option<String>,
    tls12_only: bool,
) -> Result<Result<bool, TlsFailure>, String> {
    let trust = Trust {
        ca: read_certs("CA certificate", ca).map_err(|e| e.to_string())?,
        crls: Vec::new(),
    };
    let identity = match client {
        Some((c, k)) => Some(TlsIdentity {
            chain: read_certs("certificate", &c).map_err(|e| e.to_string())?,
            key: read_key(&k).map_err(|e| e.to_string())?,
        }),
        None => None,
    };
    let config: Arc<rustls::ClientConfig> = if tls12_only {
        let mut roots = rustls::RootCertStore::empty();
        for c in &trust.ca {
            roots.add(c.clone()).map_err(|e| e.to_string())?;
        }
        Arc::new(
            rustls::ClientConfig::builder_with_provider(keyfort_net::tls::provider())
                .with_protocol_versions(&[&rustls::version::TLS12])
                .map_err(|e| e.to_string())?
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    } else {
        keyfort_net::tls::client_config(&trust, identity).map_err(|e| e.to_string())?
    };
    let name = name.unwrap_or_else(|| addr.ip().to_string());
    let server_name =
        rustls_pki_types::ServerName::try_from(name.clone()).map_err(|e| e.to_string())?;
    let mut conn = rustls::ClientConnection::new(config, server_name).map_err(|e| e.to_string())?;
    let mut sock = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("{addr}: {e}"))?;
    sock.set_read_timeout(Some(PROBE_WAIT))
        .map_err(|e| e.to_string())?;
    let fail = |e: &std::io::Error| match keyfort_net::tls::classify_io(e) {
        Some(TlsFailure::WrongName { .. }) => TlsFailure::WrongName {
            expected: name.clone(),
        },
        Some(f) => f,
        None => TlsFailure::Other(format!("connection closed: {e}")),
    };
    while conn.is_handshaking() {
        if let Err(e) = conn.complete_io(&mut sock) {
            return Ok(Err(fail(&e)));
        }
    }
    let resumed = conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    // A refusal of our certificate comes after our Finished: wait for it.
    let mut tls = rustls::Stream::new(&mut conn, &mut sock);
    let _ = tls.flush();
    let mut b = [0u8; 64];
    match tls.read(&mut b) {
        Ok(0) => Ok(Err(TlsFailure::Other("closed after the handshake".into()))),
        Ok(_) => Ok(Ok(resumed)),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Ok(Ok(resumed))
        }
        Err(e) => match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
            Some(r) => Ok(Err(classify(r))),
            None => Ok(Err(fail(&e))),
        },
    }
}
