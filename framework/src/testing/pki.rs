//! The certificates and the kubeconfig of a test cluster, made in its state directory.

use super::TestError;
use super::process::harness;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use std::path::Path;

/// The Service network of the cluster, and the address of the `kubernetes` Service in it.
pub(crate) const SERVICE_RANGE: &str = "10.96.0.0/16";
const SERVICE_IP: &str = "10.96.0.1";

/// A file of the cluster's certificates.
pub(crate) fn file(state: &Path, name: &str) -> String {
    state.join("pki").join(name).display().to_string()
}

/// Writes the certificates and keys of a control plane into `<state>/pki`: `ca.crt`,
/// `serving.crt`/`.key` (loopback, and the names and address of the `kubernetes` Service),
/// `admin.crt`/`.key` (`system:masters`) and the service account key pair `sa.key`/`sa.pub`.
pub(crate) fn write_pki(state: &Path) -> Result<(), TestError> {
    let dir = &state.join("pki");
    std::fs::create_dir_all(dir).map_err(|e| harness("writing certificates", e))?;
    let cert = |e: rcgen::Error| harness("making certificates", e);
    let ca_key = KeyPair::generate().map_err(cert)?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(cert)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "kube-plan test CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).map_err(cert)?;
    let issuer = Issuer::new(ca, &ca_key);
    // A certificate the CA signs, with its key.
    let leaf = |names: &[&str], subject: &[(DnType, &str)], usage| {
        let key = KeyPair::generate()?;
        let mut params =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())?;
        for (kind, value) in subject {
            params.distinguished_name.push(kind.clone(), *value);
        }
        params.extended_key_usages = vec![usage];
        Ok::<_, rcgen::Error>((params.signed_by(&key, &issuer)?, key))
    };
    let (serving_cert, serving_key) = leaf(
        &[
            "127.0.0.1",
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
            SERVICE_IP,
        ],
        &[(DnType::CommonName, "kube-apiserver")],
        ExtendedKeyUsagePurpose::ServerAuth,
    )
    .map_err(cert)?;
    let (admin_cert, admin_key) = leaf(
        &[],
        &[
            (DnType::CommonName, "admin"),
            (DnType::OrganizationName, "system:masters"),
        ],
        ExtendedKeyUsagePurpose::ClientAuth,
    )
    .map_err(cert)?;
    let sa_key = KeyPair::generate().map_err(cert)?;
    for (file, pem) in [
        ("ca.crt", ca_cert.pem()),
        ("serving.crt", serving_cert.pem()),
        ("serving.key", serving_key.serialize_pem()),
        ("admin.crt", admin_cert.pem()),
        ("admin.key", admin_key.serialize_pem()),
        ("sa.key", sa_key.serialize_pem()),
        ("sa.pub", sa_key.public_key_pem()),
    ] {
        std::fs::write(dir.join(file), pem).map_err(|e| harness("writing certificates", e))?;
    }
    Ok(())
}

/// Writes `<state>/kubeconfig` for the admin user, certificates named by path.
pub(crate) fn write_kubeconfig(state: &Path, port: u16) -> Result<(), TestError> {
    let path = |f: &str| file(state, f);
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": {
            "server": format!("https://127.0.0.1:{port}"),
            "certificate-authority": path("ca.crt"),
        }}],
        "users": [{"name": "admin", "user": {
            "client-certificate": path("admin.crt"),
            "client-key": path("admin.key"),
        }}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "admin"}}],
        "current-context": "test",
    });
    // JSON is YAML: kubectl and kube read it as a kubeconfig.
    std::fs::write(state.join("kubeconfig"), config.to_string())
        .map_err(|e| harness("writing the kubeconfig", e))
}
