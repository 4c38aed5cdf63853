//! The self-signed certificate an Outline server serves, and its pin.

use std::{io, sync::Arc};

use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};
use tokio_rustls::TlsAcceptor;

/// A TLS acceptor for a fresh certificate valid for 127.0.0.1 and localhost, and the uppercase
/// hex SHA-256 of its DER encoding (Outline's `certSha256`).
pub(crate) fn self_signed() -> io::Result<(TlsAcceptor, String)> {
    let certified =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .map_err(io::Error::other)?;
    let der = certified.cert.der().clone();
    let pin = hex::encode_upper(Sha256::digest(&der));
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.key_pair.serialize_der()));
    // An explicit provider, so a process that links another one cannot make this ambiguous.
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(io::Error::other)?
    .with_no_client_auth()
    .with_single_cert(vec![der], key)
    .map_err(io::Error::other)?;
    Ok((TlsAcceptor::from(Arc::new(config)), pin))
}
