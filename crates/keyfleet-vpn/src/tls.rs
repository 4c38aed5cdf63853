//! Certificate pinning: the server is trusted because the SHA-256 of its leaf certificate equals
//! the pin, not because of any CA (Outline servers use a self-signed certificate).

use std::{error::Error as StdError, fmt, io, sync::Arc};

use keyfleet_core::InvalidValue;
use rustls::{
    CertificateError, DigitallySignedStruct, OtherError, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{
        CryptoProvider, WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature,
    },
    pki_types::{CertificateDer, ServerName, UnixTime},
};
use sha2::{Digest, Sha256};

/// A SHA-256 certificate fingerprint as 64 hex digits; case is ignored and colons (`AB:CD:…`)
/// and surrounding whitespace are allowed.
pub fn parse_cert_sha256(raw: &str) -> Result<[u8; 32], InvalidValue> {
    const WHAT: &str = "certificate SHA-256 fingerprint";
    let digits: String = raw.trim().chars().filter(|c| *c != ':').collect();
    if let Some(bad) = digits.chars().find(|c| !c.is_ascii_hexdigit()) {
        return Err(InvalidValue::new(
            WHAT,
            format!("{bad:?} is not a hexadecimal digit; expected 64 hex digits, colons allowed"),
        ));
    }
    if digits.len() != 64 {
        return Err(InvalidValue::new(
            WHAT,
            format!(
                "it has {} hex digits; a SHA-256 fingerprint has 64 (colons allowed)",
                digits.len()
            ),
        ));
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(&digits, &mut out)
        .map_err(|e| InvalidValue::new(WHAT, format!("{e}; expected 64 hex digits")))?;
    Ok(out)
}

/// The form Outline prints: uppercase hex without separators.
pub(crate) fn fingerprint_hex(fp: &[u8; 32]) -> String {
    hex::encode_upper(fp)
}

/// What the verifier reports when the leaf certificate is not the pinned one; travels inside the
/// `rustls::Error` up the reqwest error chain, where [`pin_mismatch_in`] finds it.
#[derive(Debug)]
pub(crate) struct PinMismatch {
    pub actual: [u8; 32],
}

impl fmt::Display for PinMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "certificate SHA-256 {} does not match the pin",
            fingerprint_hex(&self.actual)
        )
    }
}

impl StdError for PinMismatch {}

/// Accepts exactly the certificate whose DER hashes to the pin, and still checks that the
/// server holds its private key (handshake signatures).
#[derive(Debug)]
pub(crate) struct PinVerifier {
    pin: [u8; 32],
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let actual: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        if actual == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(PinMismatch { actual })),
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// A rustls client configuration that trusts only the pinned certificate. Uses the ring provider
/// explicitly; never installs a process-wide default.
pub(crate) fn pinned_config(pin: [u8; 32]) -> Result<rustls::ClientConfig, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = PinVerifier {
        pin,
        algorithms: provider.signature_verification_algorithms,
    };
    Ok(rustls_config(provider)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth())
}

fn rustls_config(
    provider: Arc<CryptoProvider>,
) -> Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::WantsVerifier>, rustls::Error> {
    rustls::ClientConfig::builder_with_provider(provider).with_safe_default_protocol_versions()
}

/// Finds an error of type `T` in a source chain, looking inside `io::Error`s too (their
/// `source()` skips the wrapped error itself, which is where rustls errors travel).
fn find_in_chain<'a, T: StdError + 'static>(err: &'a (dyn StdError + 'static)) -> Option<&'a T> {
    let mut current = Some(err);
    while let Some(e) = current {
        if let Some(found) = e.downcast_ref::<T>() {
            return Some(found);
        }
        if let Some(inner) = e.downcast_ref::<io::Error>().and_then(|io| io.get_ref()) {
            let inner: &(dyn StdError + 'static) = inner;
            if let Some(found) = find_in_chain::<T>(inner) {
                return Some(found);
            }
        }
        current = e.source();
    }
    None
}

/// The fingerprint the server presented, if `err` is a pin mismatch.
pub(crate) fn pin_mismatch_in(err: &(dyn StdError + 'static)) -> Option<[u8; 32]> {
    match rustls_error_in(err)? {
        rustls::Error::InvalidCertificate(CertificateError::Other(other)) => {
            let inner: &(dyn StdError + 'static) = other.0.as_ref();
            inner.downcast_ref::<PinMismatch>().map(|m| m.actual)
        }
        _ => None,
    }
}

pub(crate) fn rustls_error_in<'a>(err: &'a (dyn StdError + 'static)) -> Option<&'a rustls::Error> {
    find_in_chain::<rustls::Error>(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PIN: &str = "2F2A0E8A9B4C5D6E7F8091A2B3C4D5E6F708192A3B4C5D6E7F8091A2B3C4D5E6";

    #[test]
    fn parses_fingerprints_in_every_common_form() {
        let want = parse_cert_sha256(PIN).unwrap();
        assert_eq!(fingerprint_hex(&want), PIN);
        assert_eq!(parse_cert_sha256(&PIN.to_lowercase()).unwrap(), want);
        let colons: Vec<String> = PIN
            .as_bytes()
            .chunks(2)
            .map(|c| String::from_utf8(c.to_vec()).unwrap())
            .collect();
        assert_eq!(
            parse_cert_sha256(&format!(" {} \n", colons.join(":"))).unwrap(),
            want
        );
    }

    #[test]
    fn rejects_bad_fingerprints_clearly() {
        let short = parse_cert_sha256("ABCD").unwrap_err();
        assert!(
            short.to_string().contains("4 hex digits") && short.to_string().contains("64"),
            "{short}"
        );
        let bad = parse_cert_sha256(&format!("{}ZZ", &PIN[..62])).unwrap_err();
        assert!(bad.to_string().contains("'Z'"), "{bad}");
        assert!(
            parse_cert_sha256("")
                .unwrap_err()
                .to_string()
                .contains("0 hex digits")
        );
        assert!(parse_cert_sha256(&format!("{PIN}00")).is_err());
    }

    #[test]
    fn verifier_accepts_only_the_pinned_leaf_and_reports_the_actual_one() {
        let der = CertificateDer::from(b"not really a certificate".to_vec());
        let digest: [u8; 32] = Sha256::digest(der.as_ref()).into();
        let algorithms = rustls::crypto::ring::default_provider().signature_verification_algorithms;
        let name = ServerName::try_from("127.0.0.1").unwrap();

        let good = PinVerifier {
            pin: digest,
            algorithms,
        };
        assert!(
            good.verify_server_cert(&der, &[], &name, &[], UnixTime::now())
                .is_ok()
        );

        let bad = PinVerifier {
            pin: [0u8; 32],
            algorithms,
        };
        let err = bad
            .verify_server_cert(&der, &[], &name, &[], UnixTime::now())
            .unwrap_err();
        // Wrapped the way tokio-rustls hands it to hyper: inside an io::Error.
        let io = io::Error::new(io::ErrorKind::InvalidData, err);
        assert_eq!(pin_mismatch_in(&io), Some(digest));
        assert!(pin_mismatch_in(&io::Error::other("x")).is_none());
    }

    #[test]
    fn pinned_config_builds_without_a_global_provider() {
        pinned_config([1; 32]).unwrap();
        pinned_config([2; 32]).unwrap();
    }
}
