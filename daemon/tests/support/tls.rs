//! Test certificate authorities (rcgen) and rustls server configurations built from them, for
//! HTTPS receivers in tests (the webhook receiver, the Kubernetes API stand-in).
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};

pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate, PEM.
    pub pem: String,
}

/// A certificate and its private key, PEM.
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).expect("self-signed CA");
        TestCa { issuer: Issuer::new(params, key), pem: cert.pem() }
    }

    /// A certificate for `names` (DNS names or IP addresses) signed by this CA.
    pub fn leaf(&self, names: &[&str]) -> Leaf {
        let key = KeyPair::generate().expect("leaf key");
        let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, names.first().copied().unwrap_or("client"));
        let cert = params.signed_by(&key, &self.issuer).expect("signed leaf");
        Leaf { cert_pem: cert.pem(), key_pem: key.serialize_pem() }
    }

    pub fn write_pem(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, &self.pem).expect("write CA");
        path
    }

    /// A TLS server for localhost/127.0.0.1/::1 signed by this CA; with `client_ca`, clients
    /// must present a certificate that CA signed.
    pub fn server(&self, client_ca: Option<&TestCa>) -> Arc<ServerConfig> {
        self.server_for(&["localhost", "127.0.0.1", "::1"], client_ca)
    }

    /// A TLS server whose certificate names only `names`.
    pub fn server_for(&self, names: &[&str], client_ca: Option<&TestCa>) -> Arc<ServerConfig> {
        let leaf = self.leaf(names);
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes()).collect::<Result<_, _>>().expect("leaf PEM");
        let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).expect("key PEM");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions().expect("protocols");
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(ca.pem.as_bytes()) {
                    roots.add(cert.expect("CA PEM")).expect("CA root");
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).build().expect("verifier");
                builder.with_client_cert_verifier(verifier)
            }
        };
        Arc::new(builder.with_single_cert(chain, key).expect("server cert"))
    }

    pub fn acceptor(&self, client_ca: Option<&TestCa>) -> TlsAcceptor {
        TlsAcceptor::from(self.server(client_ca))
    }
}
