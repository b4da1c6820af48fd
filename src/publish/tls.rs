//! TLS for the MQTT connection: the rustls client configuration built from `[mqtt.tls]`, and
//! the classification of TLS failures the publisher must not retry quickly.
//!
//! rustls runs with the `ring` provider, installed explicitly here rather than process-wide
//! (aws-lc-rs, rustls' default, needs cmake and cross-compiles badly to ARM). Every file is read
//! once at start, so a missing or unreadable CA, certificate or key is an error naming the file
//! before the first connection. The server is verified against `ca_file` only (no system roots:
//! an edge box talks to its own broker). `server_name` replaces the name checked in the
//! server's certificate, for brokers reached by an address their certificate does not name;
//! rumqttc always sends `mqtt.host` as SNI and offers no way to change it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rumqttc::{ConnectionError, StateError, TlsConfiguration, TlsError, Transport};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::PublishError;
use crate::config::TlsSettings;

/// The rumqttc transport for `settings`: TLS with the configured CA, client certificate and
/// server name.
pub fn transport(settings: &TlsSettings) -> Result<Transport, PublishError> {
    Ok(Transport::Tls(TlsConfiguration::Rustls(Arc::new(client_config(settings)?))))
}

/// The rustls client configuration; every file named in `settings` is read here.
pub fn client_config(settings: &TlsSettings) -> Result<ClientConfig, PublishError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    let ca_file = settings.ca_file.as_deref().ok_or_else(|| PublishError::Setting {
        key: "mqtt.tls.ca_file",
        message: "required when [mqtt.tls] is present".into(),
    })?;
    for cert in certificates(ca_file, "mqtt.tls.ca_file")? {
        roots.add(cert).map_err(|error| tls_file(ca_file, "mqtt.tls.ca_file", error))?;
    }
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|error| tls_file(ca_file, "mqtt.tls.ca_file", error))?;
    let verifier: Arc<dyn ServerCertVerifier> = match &settings.server_name {
        Some(name) => {
            let name = ServerName::try_from(name.clone()).map_err(|error| {
                PublishError::Setting { key: "mqtt.tls.server_name", message: error.to_string() }
            })?;
            Arc::new(NamedVerifier { inner: verifier, name })
        }
        None => verifier,
    };
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| PublishError::Setting { key: "mqtt.tls", message: error.to_string() })?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    match (&settings.cert_file, &settings.key_file) {
        (Some(cert_file), Some(key_file)) => {
            let chain = certificates(cert_file, "mqtt.tls.cert_file")?;
            let key = PrivateKeyDer::from_pem_file(key_file)
                .map_err(|error| tls_file(key_file, "mqtt.tls.key_file", error))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|error| tls_file(key_file, "mqtt.tls.key_file", error))
        }
        (None, None) => Ok(builder.with_no_client_auth()),
        _ => Err(PublishError::Setting {
            key: "mqtt.tls.key_file",
            message: "cert_file and key_file go together".into(),
        }),
    }
}

/// Every certificate in the PEM file at `path`; at least one.
fn certificates(
    path: &Path,
    key: &'static str,
) -> Result<Vec<CertificateDer<'static>>, PublishError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|error| tls_file(path, key, error))?;
    if certs.is_empty() {
        return Err(tls_file(path, key, "no PEM certificate in the file"));
    }
    Ok(certs)
}

fn tls_file(path: &Path, key: &'static str, error: impl std::fmt::Display) -> PublishError {
    PublishError::TlsFile { key, path: PathBuf::from(path), reason: error.to_string() }
}

/// Why a connection failed in TLS itself (an untrusted or misnamed server certificate, a
/// client certificate the broker rejected): retrying soon cannot fix it. None for network
/// errors, which are retried with the normal backoff.
pub fn tls_failure(error: &ConnectionError) -> Option<String> {
    let error = match error {
        ConnectionError::Tls(error) => error,
        // With TLS 1.3 the broker rejects a client certificate after the handshake, so the
        // alert surfaces while reading the CONNACK.
        ConnectionError::Io(io) => return rustls_inside(io),
        ConnectionError::MqttState(StateError::Io(io)) => return rustls_inside(io),
        ConnectionError::MqttState(StateError::Deserialization(rumqttc::Error::Io(io))) => {
            return rustls_inside(io);
        }
        _ => return None,
    };
    match error {
        TlsError::TLS(error) => Some(error.to_string()),
        TlsError::WebPki(error) => Some(error.to_string()),
        TlsError::DNSName(error) => Some(format!("mqtt.host is not a valid TLS name: {error}")),
        TlsError::Io(io) => rustls_inside(io),
        _ => None,
    }
}

fn rustls_inside(io: &std::io::Error) -> Option<String> {
    io.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()).map(ToString::to_string)
}

/// Checks the server's certificate against a configured name instead of `mqtt.host`.
#[derive(Debug)]
struct NamedVerifier {
    inner: Arc<WebPkiServerVerifier>,
    name: ServerName<'static>,
}

impl ServerCertVerifier for NamedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner.verify_server_cert(end_entity, intermediates, &self.name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_ca_file_is_named() {
        let settings = TlsSettings {
            ca_file: Some(PathBuf::from("/nonexistent/ca.pem")),
            ..TlsSettings::default()
        };
        let error = client_config(&settings).err().map(|error| error.to_string());
        let error = error.expect("an error");
        assert!(error.contains("/nonexistent/ca.pem") && error.contains("ca_file"), "{error}");
    }

    #[test]
    fn a_file_without_certificates_is_named() {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = dir.path().join("empty.pem");
        std::fs::write(&ca, "not a certificate\n").expect("write");
        let settings = TlsSettings { ca_file: Some(ca.clone()), ..TlsSettings::default() };
        let error = client_config(&settings).err().map(|error| error.to_string());
        let error = error.expect("an error");
        assert!(error.contains(&ca.display().to_string()), "{error}");
    }
}
