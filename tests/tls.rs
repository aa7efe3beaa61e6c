//! The sidecar reaches Rutter over HTTPS: rustls with the web roots plus `upstream.ca_file`.

mod common;

use std::path::PathBuf;

use common::*;
use http::{Method, StatusCode};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A test CA and a server certificate for `localhost` and 127.0.0.1 signed by it.
fn certificates() -> (TempDir, PathBuf, PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("rutter-sidecar-tls-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "rutter-sidecar test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let mut server = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    server
        .subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let server_cert = server.signed_by(&server_key, &ca_cert, &ca_key).unwrap();
    let (ca_path, cert_path, key_path) = (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    );
    std::fs::write(&ca_path, ca_cert.pem()).unwrap();
    std::fs::write(&cert_path, server_cert.pem()).unwrap();
    std::fs::write(&key_path, server_key.serialize_pem()).unwrap();
    (TempDir(dir), ca_path, cert_path, key_path)
}

#[tokio::test]
async fn the_sidecar_speaks_tls_to_rutter_trusting_the_configured_ca() {
    let (_dir, ca, cert, key) = certificates();
    let options = rutter_sidecar::emulator::EmulatorOptions {
        tls_cert: Some(cert),
        tls_key: Some(key),
        ..emulator_options(300)
    };
    let rutter = start_emulator(options).await;
    let mut config = config_for(rutter.addr);
    config.upstream.base_url = base_url(&format!("https://localhost:{}", rutter.addr.port()));
    config.upstream.ca_file = Some(ca);
    let sidecar = start_sidecar(config).await;

    let path = format!("/versioned/accounting/invoices?access_token={TOKEN}");
    let reply = send(&client(), sidecar.addr, Method::POST, &path, &[], INVOICE).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert_eq!(reply.json()["invoice"]["document_number"], "INV-10042");
    assert!(
        polls(&rutter.emulator) >= 1,
        "the job was polled over TLS too"
    );
    let write = rutter
        .emulator
        .seen()
        .into_iter()
        .find(|r| r.method == Method::POST)
        .unwrap();
    assert_eq!(
        write.headers["host"],
        format!("localhost:{}", rutter.addr.port()).as_str()
    );
}

#[tokio::test]
async fn an_untrusted_certificate_is_a_502_and_nothing_is_sent() {
    let (_dir, _ca, cert, key) = certificates();
    let options = rutter_sidecar::emulator::EmulatorOptions {
        tls_cert: Some(cert),
        tls_key: Some(key),
        ..emulator_options(300)
    };
    let rutter = start_emulator(options).await;
    let mut config = config_for(rutter.addr);
    config.upstream.base_url = base_url(&format!("https://localhost:{}", rutter.addr.port()));
    let sidecar = start_sidecar(config).await; // no ca_file: the test CA is not trusted
    let path = format!("/versioned/accounting/invoices?access_token={TOKEN}");
    let reply = send(&client(), sidecar.addr, Method::POST, &path, &[], INVOICE).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert_eq!(
        reply.header("x-sidecar-error"),
        Some("UPSTREAM_UNAVAILABLE")
    );
    assert!(rutter.emulator.seen().is_empty());
}
