//! The cluster's certificate authority (docs/operations.md "TLS", docs/format.md §10).
//!
//! `cluster init` makes the CA key in the card (`keyfort_hsm::ca`: P-256, wrapped under the
//! realm's adapter KBK) and a self-signed CA certificate, and writes the **TLS directory**:
//!
//! | file | what |
//! |---|---|
//! | `ca.pem` | the CA certificate: what every node and client trusts |
//! | `ca-key.kfca` | the CA private key, wrapped: only a card of the realm can use it |
//! | `cluster-id` | the cluster id, 32 hex digits (the names in certificates) |
//! | `crl.pem` | optional: the revocation list `keyfort tls revoke` keeps |
//! | `revoked` | the serials revoked so far, one hex serial a line (`crl.pem` is made from it) |
//!
//! A node issues its own certificate at every start, in its card, for the raft id it has (or
//! `joiner.<cluster>` while it joins): the certificate's key is made in memory for the life of
//! the process and is never written anywhere, so there is no node key file to steal, rotate or
//! lose; a restart is a rotation. Node certificates live [`NODE_CERT_DAYS`].
//!
//! Client certificates (`keyfort tls issue-client`) name a partition and are written as PEM
//! files for the client; the operator hands them over like a credential file.

use crate::cluster_cmd::hex;
use keyfort_hsm::{CaKey, CoreSession, WrappedCaKey};
use keyfort_net::tls::{
    cluster_name, joiner_name, node_name, partition_name, read_certs, read_crls, TlsIdentity, Trust,
};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevokedCertParams, SanType, SerialNumber,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca-key.kfca";
pub const CLUSTER_ID_FILE: &str = "cluster-id";
pub const CRL_FILE: &str = "crl.pem";
pub const REVOKED_FILE: &str = "revoked";
/// Life of the CA certificate.
pub const CA_CERT_DAYS: i64 = 3650;
/// Life of a node certificate (re-issued at every start).
pub const NODE_CERT_DAYS: i64 = 30;
/// Default life of a client certificate.
pub const CLIENT_CERT_DAYS: i64 = 365;
/// A new certificate is valid from this long before now, for clocks a little behind.
pub const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(300);
/// Life written in a revocation list (its next update). Nodes do not enforce it (rustls's default:
/// a stale list still revokes); `keyfort tls revoke` signs a new list each time it runs.
pub const CRL_DAYS: i64 = 30;
/// Most serials a revocation list holds.
pub const MAX_REVOKED: usize = 100_000;

type R<T> = Result<T, String>;

fn io(p: &Path, e: impl std::fmt::Display) -> String {
    format!("{}: {e}", p.display())
}

/// The CA key in a card, as rcgen's remote signer. The session is behind a mutex because rcgen
/// wants `Send + Sync`; it is used by one thread at a time.
struct CardSigner {
    inner: Mutex<Option<(CoreSession, CaKey)>>,
    public: [u8; 65],
}

impl rcgen::RemoteKeyPair for CardSigner {
    fn public_key(&self) -> &[u8] {
        &self.public
    }
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        let g = self
            .inner
            .lock()
            .map_err(|_| rcgen::Error::RemoteKeyError)?;
        let (s, k) = g.as_ref().ok_or(rcgen::Error::RemoteKeyError)?;
        s.ca_sign(k, msg).map_err(|_| rcgen::Error::RemoteKeyError)
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

impl Drop for CardSigner {
    fn drop(&mut self) {
        if let Ok(mut g) = self.inner.lock() {
            if let Some((s, k)) = g.take() {
                s.forget_ca_key(k);
            }
        }
    }
}

/// The CA certificate's parameters. Its name comes from its key (the first 8 bytes of the
/// SHA-256 of the public point), not from a cluster id: the issuer of every certificate must
/// stay the same name after a restore binds the CA to the restored cluster.
fn ca_params(public_point: &[u8]) -> CertificateParams {
    use sha2::Digest;
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "keyfort");
    dn.push(
        DnType::CommonName,
        format!(
            "keyfort cluster CA {}",
            hex(&sha2::Sha256::digest(public_point)[..8])
        ),
    );
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.key_identifier_method = KeyIdMethod::Sha256;
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - CLOCK_SKEW_ALLOWANCE;
    p.not_after = now + time::Duration::days(CA_CERT_DAYS);
    p
}

/// A TLS directory (module docs).
#[derive(Debug, Clone)]
pub struct TlsDir {
    pub dir: PathBuf,
    pub cluster_id: [u8; 16],
}

/// The CA ready to sign: the issuer certificate (rebuilt from the same name and key: children's
/// issuer and authority key id match `ca.pem`) and the card signer.
pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl TlsDir {
    /// Makes the CA in the card of `session` for `cluster_id` and writes the directory (which
    /// must not hold a CA yet).
    pub fn create(dir: &Path, session: &CoreSession, cluster_id: [u8; 16]) -> R<TlsDir> {
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        let key_path = dir.join(CA_KEY_FILE);
        if key_path.exists() {
            return Err(io(
                &key_path,
                "a CA exists already (refusing to replace it)",
            ));
        }
        let wrapped = session
            .generate_ca_key()
            .map_err(|e| format!("making the CA key in the card: {e}"))?;
        let t = TlsDir {
            dir: dir.to_path_buf(),
            cluster_id,
        };
        write_file(&key_path, &wrapped.encode(), 0o644)?;
        write_file(
            &dir.join(CLUSTER_ID_FILE),
            format!("{}\n", hex(&cluster_id)).as_bytes(),
            0o644,
        )?;
        let ca = t.ca_in(session.card().session().map_err(|e| e.to_string())?)?;
        write_file(&dir.join(CA_CERT_FILE), ca.cert.pem().as_bytes(), 0o644)?;
        Ok(t)
    }

    /// Opens an existing directory.
    pub fn open(dir: &Path) -> R<TlsDir> {
        let p = dir.join(CLUSTER_ID_FILE);
        let text = std::fs::read_to_string(&p).map_err(|e| io(&p, e))?;
        let id = crate::client_cmd::parse_id(&text, "cluster id").map_err(|e| io(&p, e))?;
        Ok(TlsDir {
            dir: dir.to_path_buf(),
            cluster_id: id,
        })
    }

    /// Binds the directory of cluster `old` to the cluster restored from it, `new`: the CA
    /// key must load in the card of `session` (a card of the realm).
    pub fn rebind(dir: &Path, session: CoreSession, old: &[u8; 16], new: [u8; 16]) -> R<TlsDir> {
        let t = TlsDir::open(dir)?;
        if t.cluster_id != *old && t.cluster_id != new {
            return Err(format!(
                "{}: the TLS directory is of cluster {}, not of cluster {} (the one restored); \
                 the restore itself is done: make a TLS directory for the new cluster with \
                 `keyfort tls init`",
                dir.display(),
                hex(&t.cluster_id),
                hex(old)
            ));
        }
        drop(t.ca_in(session)?);
        write_file(
            &dir.join(CLUSTER_ID_FILE),
            format!("{}\n", hex(&new)).as_bytes(),
            0o644,
        )?;
        Ok(TlsDir {
            dir: dir.to_path_buf(),
            cluster_id: new,
        })
    }

    pub fn ca_cert_path(&self) -> PathBuf {
        self.dir.join(CA_CERT_FILE)
    }

    /// The CA certificate and the revocation list (when there is one).
    pub fn trust(&self) -> R<Trust> {
        let ca = read_certs("CA certificate", &self.ca_cert_path()).map_err(|e| e.to_string())?;
        let crl = self.dir.join(CRL_FILE);
        let crls = if crl.exists() {
            read_crls(&crl).map_err(|e| e.to_string())?
        } else {
            Vec::new()
        };
        Ok(Trust { ca, crls })
    }

    /// The CA key unwrapped into the card of `session` (which it keeps for the signer's life).
    pub fn ca_in(&self, session: CoreSession) -> R<Ca> {
        let p = self.dir.join(CA_KEY_FILE);
        let bytes = std::fs::read(&p).map_err(|e| io(&p, e))?;
        let wrapped = WrappedCaKey::decode(&bytes).map_err(|e| io(&p, e))?;
        let key = session.load_ca_key(&wrapped).map_err(|e| {
            format!(
                "{}: the CA key does not load in this card: {e}",
                p.display()
            )
        })?;
        let public = key.public_point;
        let signer = CardSigner {
            inner: Mutex::new(Some((session, key))),
            public,
        };
        let key = KeyPair::from_remote(Box::new(signer)).map_err(|e| e.to_string())?;
        let cert = ca_params(&public)
            .self_signed(&key)
            .map_err(|e| e.to_string())?;
        Ok(Ca { cert, key })
    }
}

/// What a certificate is for.
#[derive(Debug, Clone)]
pub enum Subject {
    /// A node with a raft id, listening on these addresses.
    Node { node_id: u64, ips: Vec<IpAddr> },
    /// A node joining (no raft id yet).
    Joiner,
    /// A client of one partition.
    Partition([u8; 16]),
}

/// Validity of a new certificate: from `now - backdate` for `days`.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    pub days: i64,
    pub backdate_days: i64,
}

impl Ca {
    /// Issues a certificate for `subject` with a new P-256 key made in memory.
    pub fn issue(&self, t: &TlsDir, subject: &Subject, v: Validity) -> R<TlsIdentity> {
        let c = &t.cluster_id;
        let (names, eku, cn) = match subject {
            Subject::Node { node_id, ips } => {
                let mut n = vec![
                    SanType::DnsName(node_name(c, *node_id).try_into().map_err(s)?),
                    SanType::DnsName(cluster_name(c).try_into().map_err(s)?),
                ];
                n.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
                (
                    n,
                    vec![
                        ExtendedKeyUsagePurpose::ServerAuth,
                        ExtendedKeyUsagePurpose::ClientAuth,
                    ],
                    format!("keyfort node {node_id}"),
                )
            }
            Subject::Joiner => (
                vec![SanType::DnsName(joiner_name(c).try_into().map_err(s)?)],
                vec![ExtendedKeyUsagePurpose::ClientAuth],
                "keyfort joiner".to_string(),
            ),
            Subject::Partition(p) => (
                vec![SanType::DnsName(
                    partition_name(c, p).try_into().map_err(s)?,
                )],
                vec![ExtendedKeyUsagePurpose::ClientAuth],
                format!("keyfort client of partition {}", hex(p)),
            ),
        };
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "keyfort");
        dn.push(DnType::CommonName, cn);
        p.distinguished_name = dn;
        p.subject_alt_names = names;
        p.extended_key_usages = eku;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.use_authority_key_identifier_extension = true;
        p.serial_number = Some(SerialNumber::from_slice(&rand::random::<[u8; 16]>()[..]));
        let now = time::OffsetDateTime::now_utc() - time::Duration::days(v.backdate_days);
        p.not_before = now - CLOCK_SKEW_ALLOWANCE;
        p.not_after = now + time::Duration::days(v.days);
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(s)?;
        let cert = p.signed_by(&key, &self.cert, &self.key).map_err(s)?;
        Ok(TlsIdentity {
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        })
    }

    /// Writes a revocation list of `serials` (hex).
    pub fn crl(&self, serials: &[Vec<u8>], number: u64) -> R<String> {
        let now = time::OffsetDateTime::now_utc();
        let p = CertificateRevocationListParams {
            this_update: now - CLOCK_SKEW_ALLOWANCE,
            next_update: now + time::Duration::days(CRL_DAYS),
            crl_number: SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|sn| RevokedCertParams {
                    serial_number: SerialNumber::from_slice(sn),
                    revocation_time: now,
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = p.signed_by(&self.cert, &self.key).map_err(s)?;
        crl.pem().map_err(s)
    }
}

fn s(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Writes `bytes` to `path` (through a temporary file, then rename) with `mode`.
pub fn write_file(path: &Path, bytes: &[u8], mode: u32) -> R<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| io(&tmp, e))?;
    f.write_all(bytes).map_err(|e| io(&tmp, e))?;
    f.sync_all().map_err(|e| io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io(path, e))
}

/// PEM of a certificate chain.
pub fn chain_pem(chain: &[CertificateDer<'_>]) -> String {
    chain
        .iter()
        .map(|c| pem_block("CERTIFICATE", c.as_ref()))
        .collect()
}

/// PEM of a PKCS#8 private key.
pub fn key_pem(key: &PrivateKeyDer<'_>) -> String {
    pem_block("PRIVATE KEY", key.secret_der())
}

fn pem_block(label: &str, der: &[u8]) -> String {
    pem::encode(&pem::Pem::new(label, der.to_vec()))
}

/// The serial of the first certificate in a PEM file.
pub fn serial_of(cert_pem: &Path) -> R<Vec<u8>> {
    let certs = read_certs("certificate", cert_pem).map_err(s)?;
    serial_of_der(&certs[0]).ok_or_else(|| io(cert_pem, "no serial number found"))
}

/// The serial number of a DER certificate (its INTEGER's content bytes, as rustls-webpki parses
/// them); `None` when the bytes are not a certificate.
fn serial_of_der(der: &[u8]) -> Option<Vec<u8>> {
    let der = CertificateDer::from(der);
    let cert = webpki::EndEntityCert::try_from(&der).ok()?;
    Some(cert.serial().to_vec())
}

/// Adds `serial` to the directory's revoked list and rewrites `crl.pem` (signed in the card of
/// `session`). Nodes read the list at start: restart them (one at a time) to apply it.
pub fn revoke(t: &TlsDir, session: CoreSession, serial: Vec<u8>) -> R<usize> {
    let list_path = t.dir.join(REVOKED_FILE);
    let mut serials: Vec<Vec<u8>> = match std::fs::read_to_string(&list_path) {
        Ok(text) => text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| parse_hex(l.trim()).ok_or_else(|| io(&list_path, "bad serial")))
            .collect::<R<_>>()?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io(&list_path, e)),
    };
    if !serials.contains(&serial) {
        serials.push(serial);
    }
    if serials.len() > MAX_REVOKED {
        return Err(format!("more than {MAX_REVOKED} revoked serials"));
    }
    let ca = t.ca_in(session)?;
    // CRL numbers must grow: the signing time in milliseconds does, across runs and machines.
    let number = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let pem = ca.crl(&serials, number)?;
    let list: String = serials.iter().map(|s| format!("{}\n", hex(s))).collect();
    write_file(&list_path, list.as_bytes(), 0o644)?;
    write_file(&t.dir.join(CRL_FILE), pem.as_bytes(), 0o644)?;
    Ok(serials.len())
}

fn parse_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_parser_survives_any_bytes() {
        assert_eq!(serial_of_der(&[]), None);
        for n in 0..2000u32 {
            let b: Vec<u8> = (0..(n % 64)).map(|i| (i * 31 + n) as u8).collect();
            let _ = serial_of_der(&b);
        }
    }

    #[test]
    fn serial_of_an_rcgen_certificate() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::new(vec!["a.keyfort".to_string()]).unwrap();
        p.serial_number = Some(SerialNumber::from_slice(&[0x7f, 1, 2, 3]));
        let c = p.self_signed(&key).unwrap();
        assert_eq!(serial_of_der(c.der()), Some(vec![0x7f, 1, 2, 3]));
    }
}
