use keyfleet_fakevpn::{Endpoint, FakeServer, FakeServerConfig};
use reqwest::{Method, StatusCode};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::{client, json_of, outline};

#[tokio::test]
async fn server_info_and_key_lifecycle() {
    let server = FakeServer::start(FakeServerConfig::outline())
        .await
        .unwrap();
    assert!(server.api_url().starts_with("https://127.0.0.1:"));
    assert_eq!(server.api_key(), None);

    let info = json_of(
        outline(&server, Method::GET, "/server")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(info["version"], "1.9.0");
    assert_eq!(info["hostnameForAccessKeys"], "127.0.0.1");
    assert!(info["portForNewAccessKeys"].is_u64() && info["serverId"].is_string());

    let post = outline(&server, Method::POST, "/access-keys")
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), StatusCode::CREATED);
    let first = json_of(post).await;
    assert_eq!(first["id"], "0");
    assert_eq!(first["method"], "chacha20-ietf-poly1305");
    let url = first["accessUrl"].as_str().unwrap();
    assert!(
        url.starts_with("ss://")
            && url.ends_with(&format!("@127.0.0.1:{}/?outline=1", first["port"])),
        "{url}"
    );

    let put = outline(&server, Method::PUT, "/access-keys/kf-s1")
        .json(&json!({"name": "kf-s1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), StatusCode::CREATED);
    assert_eq!(json_of(put).await["name"], "kf-s1");
    let again = outline(&server, Method::PUT, "/access-keys/kf-s1")
        .json(&json!({"name": "kf-s1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::CONFLICT);
    assert_eq!(json_of(again).await["code"], "Conflict");

    let got = outline(&server, Method::GET, "/access-keys/kf-s1")
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), StatusCode::OK);
    let missing = outline(&server, Method::GET, "/access-keys/nope")
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    assert_eq!(json_of(missing).await["code"], "NotFound");

    let renamed = outline(&server, Method::PUT, "/access-keys/0/name")
        .json(&json!({"name": "bob"}))
        .send()
        .await
        .unwrap();
    assert_eq!(renamed.status(), StatusCode::NO_CONTENT);
    let limit = outline(&server, Method::PUT, "/access-keys/0/data-limit")
        .json(&json!({"limit": {"bytes": 1000}}))
        .send()
        .await
        .unwrap();
    assert_eq!(limit.status(), StatusCode::NO_CONTENT);

    let list = json_of(
        outline(&server, Method::GET, "/access-keys")
            .send()
            .await
            .unwrap(),
    )
    .await;
    let keys = list["accessKeys"].as_array().unwrap();
    assert_eq!(keys.len(), 2);
    assert_eq!(
        (&keys[0]["name"], &keys[0]["dataLimit"]["bytes"]),
        (&json!("bob"), &json!(1000))
    );

    server.add_traffic("kf-s1", 5, 7);
    let transfer = json_of(
        outline(&server, Method::GET, "/metrics/transfer")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(transfer, json!({"bytesTransferredByUserId": {"kf-s1": 12}}));

    server.set_link_generation(3);
    assert!(server.users()[0].link.contains("@g3.localhost:"));

    assert_eq!(
        outline(&server, Method::DELETE, "/access-keys/0")
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        outline(&server, Method::DELETE, "/access-keys/0")
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::NOT_FOUND
    );

    let meter = server.meter();
    assert_eq!(
        (meter.creates_committed, meter.conflicts, meter.duplicates),
        (2, 1, 0)
    );
    assert_eq!((meter.deletes_committed, meter.current_users), (1, 1));
    assert_eq!(meter.requests[&Endpoint::CreateKeyPut], 2);
    assert_eq!(meter.requests[&Endpoint::DataLimit], 1);
    server.shutdown().await;
}

#[tokio::test]
async fn wrong_prefix_is_404_for_everything() {
    let server = FakeServer::start(FakeServerConfig::outline())
        .await
        .unwrap();
    let base = server.api_url();
    let root = &base[..base.rfind('/').unwrap()];
    for url in [
        format!("{root}/wrong/server"),
        format!("{root}/access-keys"),
        format!("{base}x/server"),
    ] {
        let response = client().post(&url).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{url}");
        let response = client().get(&url).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{url}");
    }
    let meter = server.meter();
    assert_eq!((meter.total_requests, meter.current_users), (6, 0));
    assert_eq!(meter.requests[&Endpoint::Unknown], 6);
}

#[tokio::test]
async fn post_with_an_existing_name_is_a_duplicate() {
    let server = FakeServer::start(FakeServerConfig::outline())
        .await
        .unwrap();
    for _ in 0..2 {
        let response = outline(&server, Method::POST, "/access-keys")
            .json(&json!({"name": "kf-s1"}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
    }
    // Unnamed keys are not duplicates of each other.
    for _ in 0..2 {
        outline(&server, Method::POST, "/access-keys")
            .send()
            .await
            .unwrap();
    }
    let bad = outline(&server, Method::POST, "/access-keys")
        .body("{oops")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    assert!(
        json_of(bad).await["message"]
            .as_str()
            .unwrap()
            .contains("Invalid JSON")
    );
    let meter = server.meter();
    assert_eq!(
        (
            meter.creates_committed,
            meter.duplicates,
            meter.current_users
        ),
        (4, 1, 4)
    );
    let ids: Vec<_> = server.users().into_iter().map(|u| u.id).collect();
    assert_eq!(ids, ["0", "1", "2", "3"]);
}

async fn reported_version(server: &FakeServer) -> String {
    let response = outline(server, Method::GET, "/server")
        .send()
        .await
        .unwrap();
    json_of(response).await["version"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn old_servers_have_no_put_or_get_by_id() {
    let server = FakeServer::start(FakeServerConfig::outline().with_outline_version("1.7.2"))
        .await
        .unwrap();
    assert_eq!(reported_version(&server).await, "1.7.2");
    let put = outline(&server, Method::PUT, "/access-keys/kf-s1")
        .json(&json!({"name": "kf-s1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), StatusCode::METHOD_NOT_ALLOWED);
    let id = server.add_foreign_user("x");
    let get = outline(&server, Method::GET, &format!("/access-keys/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(get.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(json_of(get).await["code"], "MethodNotAllowed");
    assert_eq!(server.meter().current_users, 1);
}

#[tokio::test]
async fn a_dev_build_reports_dev_whatever_its_api_has() {
    for key_ids in [true, false] {
        let config = FakeServerConfig::outline()
            .with_outline_version("dev")
            .with_outline_key_ids(key_ids);
        let server = FakeServer::start(config).await.unwrap();
        assert_eq!(reported_version(&server).await, "dev");
        let get = outline(&server, Method::GET, "/access-keys/nope")
            .send()
            .await
            .unwrap();
        let expected = if key_ids {
            StatusCode::NOT_FOUND
        } else {
            StatusCode::METHOD_NOT_ALLOWED
        };
        assert_eq!(get.status(), expected);
    }
}

#[tokio::test]
async fn cert_sha256_pins_the_served_certificate() {
    let server = FakeServer::start(FakeServerConfig::outline())
        .await
        .unwrap();
    let pin = server.cert_sha256().unwrap();
    assert_eq!(pin.len(), 64);
    assert_eq!(pin, pin.to_uppercase());
    let response = outline(&server, Method::GET, "/server")
        .send()
        .await
        .unwrap();
    let tls = response
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .unwrap();
    let served = tls.peer_certificate().unwrap();
    assert_eq!(hex::encode_upper(Sha256::digest(served)), pin);

    let other = FakeServer::start(FakeServerConfig::outline())
        .await
        .unwrap();
    assert_ne!(other.cert_sha256().unwrap(), pin);
}
