//! A test certificate authority (rcgen, in memory) for the TLS tests of this crate: the real
//! cluster CA signs in a card (tools/src/pki.rs, tools/tests/tls_procs.rs).
#![allow(dead_code)]

use keyfort_net::tls::{TlsIdentity, Trust};
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    /// A self-signed P-256 CA.
    pub fn new() -> Ca {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // A name of its own: two CAs of one name are told apart by signature only (webpki then
        // reports a bad signature, not an unknown issuer).
        p.distinguished_name.push(
            rcgen::DnType::CommonName,
            format!("test cluster CA {:016x}", rand::random::<u64>()),
        );
        let cert = p.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    /// The CA certificate as PEM.
    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    /// This CA alone, no CRL.
    pub fn trust(&self) -> Trust {
        Trust {
            ca: vec![self.cert.der().clone()],
            crls: Vec::new(),
        }
    }

    /// A certificate naming `names` (DNS names, or IP addresses as IP SANs): the identity, and
    /// the certificate and key as PEM.
    pub fn issue(&self, names: &[&str]) -> (TlsIdentity, String, String) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &self.cert, &self.key)
            .unwrap();
        let id = TlsIdentity {
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        };
        (id, cert.pem(), key.serialize_pem())
    }
}
