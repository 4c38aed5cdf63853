//! The clients against the project's fake servers, asserting on what the fake recorded.

use std::time::Duration;

use keyfleet_core::{
    FailureClass, ServerKind, SubscriptionId, owned_key_name, owned_outline_key_id,
};
use keyfleet_fakevpn::{DuplicatePolicy, Endpoint, FakeServer, FakeServerConfig, Fault};
use keyfleet_vpn::{ClientConfig, DeleteOutcome, Error, OutlineClient, ServerEndpoint, VpnClient};
use url::Url;

fn sub(s: &str) -> SubscriptionId {
    SubscriptionId::parse(s).unwrap()
}

fn endpoint_of(fake: &FakeServer) -> ServerEndpoint {
    ServerEndpoint {
        name: "fake".into(),
        kind: fake.kind(),
        api_url: Url::parse(&fake.api_url()).unwrap(),
        api_key: fake.api_key(),
        cert_sha256: fake.cert_sha256(),
        grpc: None,
        key_secret: None,
    }
}

fn client_with(endpoint: &ServerEndpoint, config: ClientConfig) -> VpnClient {
    VpnClient::new(endpoint, &config).unwrap()
}

fn client(fake: &FakeServer) -> VpnClient {
    client_with(&endpoint_of(fake), ClientConfig::default())
}

fn short_timeouts() -> ClientConfig {
    ClientConfig {
        connect_timeout: Duration::from_millis(300),
        request_timeout: Duration::from_millis(300),
        ..ClientConfig::default()
    }
}

fn requests(fake: &FakeServer, endpoint: Endpoint) -> u64 {
    fake.meter().requests.get(&endpoint).copied().unwrap_or(0)
}

async fn v2ray() -> FakeServer {
    FakeServer::start(FakeServerConfig::v2ray()).await.unwrap()
}

async fn outline() -> FakeServer {
    FakeServer::start(FakeServerConfig::outline())
        .await
        .unwrap()
}

/// No message may carry the Outline secret prefix or the API key.
fn assert_no_secret(fake: &FakeServer, err: &Error) {
    let message = format!("{err} {err:?}");
    let url = Url::parse(&fake.api_url()).unwrap();
    let prefix = url.path().trim_matches('/');
    if !prefix.is_empty() {
        assert!(!message.contains(prefix), "secret prefix leaked: {message}");
    }
    if let Some(key) = fake.api_key() {
        assert!(!message.contains(&key), "API key leaked: {message}");
    }
}

#[tokio::test]
async fn v2ray_creates_links_lists_and_deletes() {
    let fake = v2ray().await;
    let c = client(&fake);
    assert_eq!(c.kind(), ServerKind::V2ray);
    let s = sub("S1");

    let key = c.ensure_key(&s, false).await.unwrap();
    assert!(!key.adopted);
    assert!(key.link.starts_with("vless://"), "{}", key.link);
    let users = fake.users();
    assert_eq!(users.len(), 1);
    assert_eq!(users[0].id, key.server_key_id);
    assert_eq!(users[0].link, key.link);
    assert_eq!(users[0].email.as_deref(), Some("kf-s1@keyfleet.invalid"));
    assert_eq!(users[0].name, owned_key_name(&s));

    assert_eq!(c.fetch_link(&key.server_key_id).await.unwrap(), key.link);

    let foreign = fake.add_foreign_user("alice@example.com");
    let mut listed = c.list_keys().await.unwrap();
    listed.sort_by(|a, b| a.name.cmp(&b.name));
    assert_eq!(listed.len(), 2);
    assert_eq!(
        (listed[0].server_key_id.as_str(), listed[0].owner.as_ref()),
        (foreign.as_str(), None)
    );
    assert_eq!(listed[1].owner.as_ref(), Some(&s));

    fake.add_traffic(&key.server_key_id, 100, 23);
    let traffic = c.traffic().await.unwrap();
    let ours = traffic
        .iter()
        .find(|t| t.server_key_id == key.server_key_id)
        .unwrap();
    assert_eq!(ours.bytes, 123);

    assert_eq!(
        c.delete_key(&key.server_key_id).await.unwrap(),
        DeleteOutcome::Deleted
    );
    assert_eq!(
        c.delete_key(&key.server_key_id).await.unwrap(),
        DeleteOutcome::AlreadyGone
    );
    let m = fake.meter();
    assert_eq!(
        (m.creates_committed, m.deletes_committed, m.current_users),
        (1, 1, 1)
    );
    assert!(matches!(
        c.fetch_link(&key.server_key_id).await,
        Err(Error::NotFound { .. })
    ));
}

#[tokio::test]
async fn v2ray_duplicate_create_gets_409_and_adopts() {
    let fake = v2ray().await;
    let c = client(&fake);
    let first = c.ensure_key(&sub("s2"), false).await.unwrap();
    // A second attempt that does not know the first one succeeded.
    let second = c.ensure_key(&sub("S2"), false).await.unwrap();
    assert!(second.adopted);
    assert_eq!(second.server_key_id, first.server_key_id);
    assert_eq!(second.link, first.link);
    let m = fake.meter();
    assert_eq!(
        (
            m.conflicts,
            m.duplicates,
            m.creates_committed,
            m.current_users
        ),
        (1, 0, 1, 1)
    );
}

#[tokio::test]
async fn v2ray_silent_duplicate_panel_retry_adopts_without_a_second_user() {
    let fake = FakeServer::start(
        FakeServerConfig::v2ray().with_duplicate_policy(DuplicatePolicy::SilentDuplicate),
    )
    .await
    .unwrap();
    let c = client_with(&endpoint_of(&fake), short_timeouts());
    let s = sub("s3");
    fake.inject(
        Some(Endpoint::CreateUser),
        Fault::LostResponseAfterCommit(Duration::from_secs(3)),
        1,
    );
    let err = c.ensure_key(&s, false).await.unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    assert!(err.is_retryable() && err.may_have_taken_effect());
    assert_eq!(fake.meter().creates_committed, 1);

    let key = c.ensure_key(&s, true).await.unwrap();
    assert!(key.adopted);
    assert_eq!(fake.users().len(), 1);
    assert_eq!(fake.users()[0].id, key.server_key_id);
    let m = fake.meter();
    assert_eq!(
        (m.duplicates, m.creates_committed, m.current_users),
        (0, 1, 1)
    );
    assert_eq!(requests(&fake, Endpoint::CreateUser), 1);
}

#[tokio::test]
async fn v2ray_retry_on_a_fresh_server_creates() {
    let fake = v2ray().await;
    let key = client(&fake).ensure_key(&sub("s4"), true).await.unwrap();
    assert!(!key.adopted);
    assert_eq!(requests(&fake, Endpoint::ListUsers), 1);
    assert_eq!(fake.meter().creates_committed, 1);
}

#[tokio::test]
async fn outline_creates_with_chosen_id_and_adopts_on_409() {
    let fake = outline().await;
    let c = client(&fake);
    assert_eq!(c.kind(), ServerKind::Outline);
    let s = sub("s5");

    let key = c.ensure_key(&s, false).await.unwrap();
    assert!(!key.adopted);
    assert_eq!(key.server_key_id, owned_outline_key_id(&s));
    assert!(key.link.starts_with("ss://"), "{}", key.link);
    assert_eq!(fake.users()[0].link, key.link);
    assert_eq!(fake.users()[0].name, owned_key_name(&s));

    let again = c.ensure_key(&s, true).await.unwrap();
    assert!(again.adopted);
    assert_eq!(
        (again.server_key_id.as_str(), again.link.as_str()),
        (key.server_key_id.as_str(), key.link.as_str())
    );
    let m = fake.meter();
    assert_eq!(
        (
            m.conflicts,
            m.duplicates,
            m.creates_committed,
            m.current_users
        ),
        (1, 0, 1, 1)
    );
    assert_eq!(requests(&fake, Endpoint::CreateKeyPut), 2);
    // The probe of the API, once per client, and the GET after the 409.
    assert_eq!(requests(&fake, Endpoint::GetKey), 2);
    assert_eq!(requests(&fake, Endpoint::CreateKeyPost), 0);
    assert_eq!(requests(&fake, Endpoint::ServerInfo), 0);

    assert_eq!(c.fetch_link(&key.server_key_id).await.unwrap(), key.link);
    let listed = c.list_keys().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].owner.as_ref(), Some(&s));

    fake.add_traffic(&key.server_key_id, 1000, 24);
    let traffic = c.traffic().await.unwrap();
    assert_eq!(
        traffic
            .iter()
            .find(|t| t.server_key_id == key.server_key_id)
            .unwrap()
            .bytes,
        1024
    );

    assert_eq!(
        c.delete_key(&key.server_key_id).await.unwrap(),
        DeleteOutcome::Deleted
    );
    assert_eq!(
        c.delete_key(&key.server_key_id).await.unwrap(),
        DeleteOutcome::AlreadyGone
    );
    assert_eq!(fake.meter().current_users, 0);
    assert_eq!(requests(&fake, Endpoint::GetKey), 3);
    assert_eq!(requests(&fake, Endpoint::ServerInfo), 0);
}

#[tokio::test]
async fn outline_id_taken_by_a_foreign_key_is_a_permanent_error() {
    let fake = outline().await;
    let c = client(&fake);
    let s = sub("s6");
    let VpnClient::Outline(low) = &c else {
        panic!("outline client expected")
    };
    low.create_key_put(&owned_outline_key_id(&s), "someone else's")
        .await
        .unwrap();

    let err = c.ensure_key(&s, false).await.unwrap_err();
    assert!(
        matches!(&err, Error::ForeignKey { id, .. } if *id == owned_outline_key_id(&s)),
        "{err}"
    );
    assert_eq!(err.class(), FailureClass::Permanent);
    assert_no_secret(&fake, &err);
}

#[tokio::test]
async fn old_outline_posts_and_a_retry_adopts_by_name() {
    let fake = FakeServer::start(FakeServerConfig::outline().with_outline_version("1.7.0"))
        .await
        .unwrap();
    let c = client_with(&endpoint_of(&fake), short_timeouts());
    let s = sub("s7");

    fake.inject(
        Some(Endpoint::CreateKeyPost),
        Fault::LostResponseAfterCommit(Duration::from_secs(3)),
        1,
    );
    let err = c.ensure_key(&s, false).await.unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    assert_eq!(fake.meter().creates_committed, 1);

    let key = c.ensure_key(&s, true).await.unwrap();
    assert!(key.adopted);
    assert!(key.link.starts_with("ss://"));
    assert_eq!(fake.users().len(), 1);
    assert_eq!(fake.users()[0].id, key.server_key_id);
    assert_eq!(requests(&fake, Endpoint::CreateKeyPut), 0);
    assert_eq!(requests(&fake, Endpoint::CreateKeyPost), 1);

    // A first attempt on an old server creates with POST and the name as its tag.
    let other = c.ensure_key(&sub("s8"), false).await.unwrap();
    assert!(!other.adopted);
    assert_eq!(fake.users()[1].name, "kf-s8");
    assert_eq!(
        c.fetch_link(&other.server_key_id).await.unwrap(),
        other.link
    );
    // Only the probe asked for a key by id, and the old server refused it.
    let by_id: Vec<u16> = fake
        .meter()
        .log
        .iter()
        .filter(|r| r.endpoint == Endpoint::GetKey)
        .map(|r| r.status)
        .collect();
    assert_eq!(by_id, [405]);
    let m = fake.meter();
    assert_eq!(
        (m.duplicates, m.creates_committed, m.current_users),
        (0, 2, 2)
    );
}

/// Built from source, both report "dev": the probe tells them apart, once per client, and
/// creates nothing.
#[tokio::test]
async fn outline_dev_builds_are_told_apart_by_probing() {
    for key_ids in [true, false] {
        let config = FakeServerConfig::outline()
            .with_outline_version("dev")
            .with_outline_key_ids(key_ids);
        let fake = FakeServer::start(config).await.unwrap();
        let c = OutlineClient::new(&endpoint_of(&fake), &ClientConfig::default()).unwrap();
        assert_eq!(c.supports_chosen_ids().await.unwrap(), key_ids);
        assert_eq!(c.supports_chosen_ids().await.unwrap(), key_ids);
        assert_eq!(
            fake.meter().total_requests,
            1,
            "{:?}",
            fake.meter().requests
        );
        assert!(fake.users().is_empty());

        let key = c.ensure_key(&sub("s1"), false).await.unwrap();
        let (put, post) = if key_ids { (1, 0) } else { (0, 1) };
        assert_eq!(requests(&fake, Endpoint::CreateKeyPut), put);
        assert_eq!(requests(&fake, Endpoint::CreateKeyPost), post);
        assert_eq!(
            key.server_key_id == owned_outline_key_id(&sub("s1")),
            key_ids
        );
        assert_eq!(fake.users().len(), 1);
    }
}

#[tokio::test]
async fn a_probe_that_fails_is_not_cached() {
    let fake = FakeServer::start(FakeServerConfig::outline().with_outline_version("dev"))
        .await
        .unwrap();
    let c = OutlineClient::new(&endpoint_of(&fake), &ClientConfig::default()).unwrap();
    fake.inject(Some(Endpoint::GetKey), Fault::Status(503), 1);
    let err = c.supports_chosen_ids().await.unwrap_err();
    assert!(err.is_retryable(), "{err}");
    assert!(c.supports_chosen_ids().await.unwrap());
}

#[tokio::test]
async fn health_is_one_cheap_request_and_refused_connections_are_retryable() {
    for fake in [v2ray().await, outline().await] {
        let c = client(&fake);
        c.ensure_key(&sub("s1"), false).await.unwrap();
        fake.reset_meter();
        c.health().await.unwrap();
        let m = fake.meter();
        let expected = match fake.kind() {
            ServerKind::V2ray => Endpoint::GetLink,
            ServerKind::Outline | ServerKind::XrayGrpc => Endpoint::ServerInfo,
        };
        assert_eq!((m.total_requests, requests(&fake, expected)), (1, 1));
        assert!(matches!(m.log[0].status, 200 | 404), "{:?}", m.log);

        fake.set_refusing(true);
        // The pooled connection is cut (Interrupted), then new ones are refused (Connect).
        let err = c.health().await.unwrap_err();
        assert!(err.is_retryable(), "{err:?}");
        let err = c.health().await.unwrap_err();
        assert!(matches!(err, Error::Connect { .. }), "{err:?}");
        assert!(err.is_retryable());
        assert_no_secret(&fake, &err);
        fake.set_refusing(false);
        c.health().await.unwrap();

        fake.inject(None, Fault::Status(503), 1);
        assert!(c.health().await.unwrap_err().is_retryable());
    }
    let fake = v2ray().await;
    let endpoint = ServerEndpoint {
        api_key: Some("wrong".into()),
        ..endpoint_of(&fake)
    };
    let err = client_with(&endpoint, ClientConfig::default())
        .health()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unauthorized { .. }), "{err:?}");
}

#[tokio::test]
async fn wrong_api_key_is_unauthorized_and_permanent() {
    let fake = v2ray().await;
    let mut endpoint = endpoint_of(&fake);
    endpoint.api_key = Some("wrong-key".into());
    let err = client_with(&endpoint, ClientConfig::default())
        .ensure_key(&sub("s9"), false)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unauthorized { .. }), "{err}");
    assert_eq!(err.class(), FailureClass::Permanent);
    assert_eq!(fake.meter().creates_committed, 0);
}

#[tokio::test]
async fn outline_wrong_prefix_is_not_taken_for_already_gone() {
    let fake = outline().await;
    let mut endpoint = endpoint_of(&fake);
    endpoint.api_url.set_path("/not-the-secret");
    let c = client_with(&endpoint, ClientConfig::default());
    let err = c.delete_key("kf-x").await.unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
    assert!(err.to_string().contains("prefix"), "{err}");
    assert_eq!(err.class(), FailureClass::Permanent);
    let err = c.ensure_key(&sub("x"), false).await.unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
    assert!(!err.to_string().contains("not-the-secret"), "{err}");
}

#[tokio::test]
async fn certificate_pin_mismatch_fails_closed() {
    let fake = outline().await;
    let mut endpoint = endpoint_of(&fake);
    let real = fake.cert_sha256().unwrap();
    endpoint.cert_sha256 = Some("00".repeat(32));
    let c = client_with(&endpoint, ClientConfig::default());
    let err = c.ensure_key(&sub("s10"), false).await.unwrap_err();
    match &err {
        Error::CertificateMismatch {
            expected, actual, ..
        } => {
            assert_eq!(expected, &"00".repeat(32));
            assert_eq!(actual, &real.to_uppercase());
        }
        other => panic!("expected a pin mismatch, got {other}"),
    }
    assert_eq!(err.class(), FailureClass::Permanent);
    assert!(!err.may_have_taken_effect());
    assert_no_secret(&fake, &err);
    assert!(matches!(
        c.delete_key("kf-s10").await,
        Err(Error::CertificateMismatch { .. })
    ));
    let m = fake.meter();
    assert_eq!(
        (m.total_requests, m.creates_committed),
        (0, 0),
        "no request may reach a handler"
    );

    // The right pin, written with colons and in lowercase, works.
    let colons: Vec<String> = real
        .as_bytes()
        .chunks(2)
        .map(|c| String::from_utf8_lossy(c).to_lowercase())
        .collect();
    endpoint.cert_sha256 = Some(colons.join(":"));
    client_with(&endpoint, ClientConfig::default())
        .ensure_key(&sub("s10"), false)
        .await
        .unwrap();
}

#[tokio::test]
async fn malformed_json_is_a_permanent_decode_error() {
    let fake = v2ray().await;
    fake.inject(Some(Endpoint::ListUsers), Fault::MalformedBody, 1);
    let err = client(&fake).list_keys().await.unwrap_err();
    assert!(
        matches!(&err, Error::Decode { endpoint, .. } if endpoint == "GET /api/users"),
        "{err}"
    );
    assert_eq!(err.class(), FailureClass::Permanent);

    let fake = outline().await;
    fake.inject(Some(Endpoint::ListKeys), Fault::MalformedBody, 1);
    let err = client(&fake).list_keys().await.unwrap_err();
    assert!(matches!(err, Error::Decode { .. }), "{err}");
    assert_no_secret(&fake, &err);
}

#[tokio::test]
async fn server_error_is_retryable_and_a_500_after_commit_is_adopted_on_retry() {
    let fake = v2ray().await;
    let c = client(&fake);
    fake.inject(Some(Endpoint::CreateUser), Fault::Status(500), 1);
    let err = c.ensure_key(&sub("s11"), false).await.unwrap_err();
    assert!(
        matches!(err, Error::ServerError { status: 500, .. }),
        "{err}"
    );
    assert_eq!(err.class(), FailureClass::Retryable { retry_after: None });
    assert_eq!(fake.meter().creates_committed, 0);

    fake.inject(Some(Endpoint::CreateUser), Fault::StatusAfterCommit(500), 1);
    let err = c.ensure_key(&sub("s12"), false).await.unwrap_err();
    assert!(err.is_retryable() && err.may_have_taken_effect(), "{err}");
    let key = c.ensure_key(&sub("s12"), true).await.unwrap();
    assert!(key.adopted);
    let m = fake.meter();
    assert_eq!(
        (m.creates_committed, m.duplicates, m.current_users),
        (1, 0, 1)
    );

    let fake = outline().await;
    fake.inject(
        Some(Endpoint::CreateKeyPut),
        Fault::StatusAfterCommit(500),
        1,
    );
    let c = client(&fake);
    let err = c.ensure_key(&sub("s13"), false).await.unwrap_err();
    assert!(err.is_retryable(), "{err}");
    assert_no_secret(&fake, &err);
    assert!(c.ensure_key(&sub("s13"), true).await.unwrap().adopted);
    assert_eq!(fake.meter().creates_committed, 1);
}

#[tokio::test]
async fn too_many_requests_carries_retry_after() {
    let fake = v2ray().await;
    fake.inject(
        Some(Endpoint::CreateUser),
        Fault::TooManyRequests {
            retry_after_secs: 7,
        },
        1,
    );
    let err = client(&fake)
        .ensure_key(&sub("s14"), false)
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::RateLimited { retry_after: Some(d), .. } if d == Duration::from_secs(7)),
        "{err}"
    );
    assert_eq!(
        err.class(),
        FailureClass::Retryable {
            retry_after: Some(Duration::from_secs(7))
        }
    );
    assert_eq!(err.to_failure().class, err.class());
}

#[tokio::test]
async fn connection_refused_is_a_retryable_connect_error() {
    let fake = v2ray().await;
    fake.set_refusing(true);
    let c = client_with(&endpoint_of(&fake), short_timeouts());
    let err = c.ensure_key(&sub("s15"), false).await.unwrap_err();
    assert!(matches!(err, Error::Connect { .. }), "{err}");
    assert_eq!(err.class(), FailureClass::Retryable { retry_after: None });
    assert!(!err.may_have_taken_effect());

    fake.set_refusing(false);
    c.ensure_key(&sub("s15"), false).await.unwrap();

    let fake = outline().await;
    fake.set_refusing(true);
    let err = client(&fake).list_keys().await.unwrap_err();
    assert!(matches!(err, Error::Connect { .. }), "{err}");
    assert_no_secret(&fake, &err);
}

#[tokio::test]
async fn lost_response_is_a_retryable_timeout() {
    let fake = outline().await;
    let c = client_with(&endpoint_of(&fake), short_timeouts());
    fake.inject(
        Some(Endpoint::CreateKeyPut),
        Fault::LostResponseAfterCommit(Duration::from_secs(3)),
        1,
    );
    let started = std::time::Instant::now();
    let err = c.ensure_key(&sub("s16"), false).await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the request timeout did not apply"
    );
    assert!(
        matches!(&err, Error::Timeout { endpoint, .. } if endpoint == "PUT /access-keys/kf-s16"),
        "{err}"
    );
    assert_eq!(err.class(), FailureClass::Retryable { retry_after: None });
    assert_no_secret(&fake, &err);
    // The retry adopts what the lost attempt committed.
    let key = c.ensure_key(&sub("s16"), true).await.unwrap();
    assert!(key.adopted);
    assert_eq!(fake.meter().creates_committed, 1);

    let fake = v2ray().await;
    fake.inject(
        Some(Endpoint::ListUsers),
        Fault::Hang(Duration::from_secs(3)),
        1,
    );
    let err = client_with(&endpoint_of(&fake), short_timeouts())
        .list_keys()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
}

#[tokio::test]
async fn an_endless_body_is_cut_off_at_the_cap() {
    let fake = v2ray().await;
    let config = ClientConfig {
        max_body_bytes: 1 << 20,
        ..ClientConfig::default()
    };
    let c = client_with(&endpoint_of(&fake), config);
    fake.inject(
        Some(Endpoint::ListUsers),
        Fault::OversizedBody { bytes: u64::MAX },
        1,
    );
    let err = c.list_keys().await.unwrap_err();
    assert!(
        matches!(&err, Error::BodyTooLarge { endpoint, limit, .. }
            if endpoint == "GET /api/users" && *limit == 1 << 20),
        "{err:?}"
    );
    let m = err.to_string();
    assert!(m.contains("GET /api/users") && m.contains("1048576"), "{m}");
    assert_eq!(err.class(), FailureClass::Permanent);

    // Under the cap the body is read whole (and then does not decode).
    fake.inject(
        Some(Endpoint::ListUsers),
        Fault::OversizedBody { bytes: 1000 },
        1,
    );
    let err = c.list_keys().await.unwrap_err();
    assert!(matches!(err, Error::Decode { .. }), "{err:?}");
    assert!(c.list_keys().await.unwrap().is_empty());
}

/// A server error page that echoes the request and a link: the error carries none of it.
#[tokio::test]
async fn error_excerpts_redact_the_api_key_the_prefix_and_links() {
    for fake in [v2ray().await, outline().await] {
        let c = client(&fake);
        let link = c.ensure_key(&sub("s1"), false).await.unwrap().link;
        fake.inject(None, Fault::EchoSecrets(500), 1);
        let err = c.list_keys().await.unwrap_err();
        assert!(
            matches!(err, Error::ServerError { status: 500, .. }),
            "{err:?}"
        );
        assert!(err.is_retryable());
        let message = format!("{err} {err:?}");
        assert_no_secret(&fake, &err);
        for leaked in [link.as_str(), "vless://", "ss://"] {
            assert!(!message.contains(leaked), "{leaked} leaked: {message}");
        }
        assert!(message.contains("<redacted>"), "{message}");
    }
}

fn assert_invalid_text(fake: &FakeServer, err: &Error, expected: &[&str]) {
    assert!(matches!(err, Error::InvalidText { .. }), "{err:?}");
    assert_eq!(err.class(), FailureClass::Permanent);
    let m = err.to_string();
    for part in expected {
        assert!(m.contains(part), "{part:?} missing: {m}");
    }
    assert!(!m.contains('\0'), "{m:?}");
    assert_no_secret(fake, err);
    for user in fake.users() {
        assert!(!m.contains(&user.link), "link leaked: {m}");
    }
}

#[tokio::test]
async fn v2ray_text_that_cannot_be_stored_is_a_permanent_error_saying_where() {
    let fake = v2ray().await;
    let c = client(&fake);
    let s = sub("s1");
    fake.inject(Some(Endpoint::GetLink), Fault::NulInLink { offset: 17 }, 2);
    let err = c.ensure_key(&s, false).await.unwrap_err();
    let uuid = fake.users()[0].id.clone();
    assert_invalid_text(
        &fake,
        &err,
        &[
            "V2Ray panel returned a link with a NUL byte at offset 17",
            &format!("for user {uuid}"),
            &format!("GET /api/keys/{uuid}/link"),
        ],
    );
    let err = c.fetch_link(&uuid).await.unwrap_err();
    assert_invalid_text(&fake, &err, &["NUL byte at offset 17"]);
    assert!(c.fetch_link(&uuid).await.unwrap().starts_with("vless://"));

    fake.inject(
        Some(Endpoint::CreateUser),
        Fault::InsertIntoField {
            field: "uuid".into(),
            offset: 3,
            text: "\u{1b}[31m".into(),
        },
        1,
    );
    let err = c.ensure_key(&sub("s2"), false).await.unwrap_err();
    assert_invalid_text(
        &fake,
        &err,
        &[
            "user id with the control character U+001B at offset 3",
            "POST /api/users",
        ],
    );
    fake.inject(
        Some(Endpoint::GetLink),
        Fault::InsertIntoField {
            field: "link".into(),
            offset: 0,
            text: "x".repeat(20_000),
        },
        1,
    );
    let err = c.fetch_link(&uuid).await.unwrap_err();
    assert_invalid_text(&fake, &err, &["over the 16384-byte limit"]);
}

#[tokio::test]
async fn outline_text_that_cannot_be_stored_is_a_permanent_error_saying_where() {
    let fake = outline().await;
    let c = client(&fake);
    fake.inject(
        Some(Endpoint::CreateKeyPut),
        Fault::NulInLink { offset: 5 },
        1,
    );
    let err = c.ensure_key(&sub("s1"), false).await.unwrap_err();
    let id = owned_outline_key_id(&sub("s1"));
    assert_invalid_text(
        &fake,
        &err,
        &[
            "access URL with a NUL byte at offset 5",
            &format!("for access key {id}"),
        ],
    );
    fake.inject(
        Some(Endpoint::GetKey),
        Fault::InsertIntoField {
            field: "name".into(),
            offset: 0,
            text: "n".repeat(2000),
        },
        1,
    );
    let err = c.fetch_link(&id).await.unwrap_err();
    assert_invalid_text(
        &fake,
        &err,
        &["name of 2005 bytes, over the 1024-byte limit"],
    );
    assert!(c.fetch_link(&id).await.unwrap().starts_with("ss://"));

    // An old server: the link comes from the list, and is checked there too.
    let old = FakeServer::start(FakeServerConfig::outline().with_outline_version("1.7.0"))
        .await
        .unwrap();
    let c = client(&old);
    let key = c.ensure_key(&sub("s1"), false).await.unwrap();
    old.inject(Some(Endpoint::ListKeys), Fault::NulInLink { offset: 0 }, 1);
    let err = c.fetch_link(&key.server_key_id).await.unwrap_err();
    assert_invalid_text(&old, &err, &["access URL with a NUL byte at offset 0"]);
}

/// A bad entry does not sink the list: a bad id is left out, a bad name is never ours.
#[tokio::test]
async fn list_entries_with_bad_ids_are_skipped_and_bad_names_are_foreign() {
    for fake in [v2ray().await, outline().await] {
        let c = client(&fake);
        let first = c.ensure_key(&sub("s1"), false).await.unwrap();
        let second = c.ensure_key(&sub("s2"), false).await.unwrap();
        // Trimmed, this name would parse as subscription s9's.
        let odd = fake.add_foreign_user("kf-s9\n");
        let id_field = match fake.kind() {
            ServerKind::V2ray => "uuid",
            ServerKind::Outline | ServerKind::XrayGrpc => "id",
        };
        fake.inject(
            None,
            Fault::InsertIntoField {
                field: id_field.into(),
                offset: 0,
                text: "\0".into(),
            },
            1,
        );
        let keys = c.list_keys().await.unwrap();
        let ids: Vec<_> = keys.iter().map(|k| k.server_key_id.as_str()).collect();
        assert_eq!(
            ids,
            [second.server_key_id.as_str(), odd.as_str()],
            "{keys:?}"
        );
        assert_eq!(keys[0].owner, Some(sub("s2")));
        assert_eq!(keys[1].owner, None, "{:?}", keys[1]);
        assert!(!keys[1].name.contains('\n'));

        let keys = c.list_keys().await.unwrap();
        assert_eq!(keys.len(), 3);
        assert_eq!(keys[0].server_key_id, first.server_key_id);
    }
}
