use keyfleet_fakevpn::{DuplicatePolicy, Endpoint, FakeServer, FakeServerConfig};
use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::{client, create_user, json_of, v2ray};

#[tokio::test]
async fn create_list_link_delete() {
    let server = FakeServer::start(FakeServerConfig::v2ray()).await.unwrap();
    assert!(server.api_url().starts_with("http://127.0.0.1:"));
    assert_eq!(server.cert_sha256(), None);

    let response = create_user(&server, "kf-s1@keyfleet.invalid").await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let user = json_of(response).await;
    let uuid = user["uuid"].as_str().unwrap().to_owned();
    assert_eq!(user["email"], "kf-s1@keyfleet.invalid");
    assert_eq!(user["name"], "kf-s1@keyfleet.invalid");
    assert_eq!(user["is_active"], true);
    assert!(chrono::DateTime::parse_from_rfc3339(user["created_at"].as_str().unwrap()).is_ok());

    let list = json_of(
        v2ray(&server, Method::GET, "/api/users")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["uuid"], uuid.as_str());

    let link_path = format!("/api/keys/{uuid}/link");
    let body = json_of(
        v2ray(&server, Method::GET, &link_path)
            .send()
            .await
            .unwrap(),
    )
    .await;
    let link = body["link"].as_str().unwrap().to_owned();
    assert_eq!(body["uuid"], uuid.as_str());
    assert!(link.starts_with(&format!(
        "vless://{uuid}@127.0.0.1:443?type=tcp&encryption=none&security=reality"
    )));
    assert!(
        link.contains("&pbk=")
            && link.contains("&sid=")
            && link.contains("flow=xtls-rprx-vision#kf-s1%40keyfleet.invalid")
    );
    assert_eq!(server.users()[0].link, link);

    server.set_link_generation(1);
    let rotated = json_of(
        v2ray(&server, Method::GET, &link_path)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_ne!(rotated["link"].as_str().unwrap(), link);

    let delete_path = format!("/api/users/{uuid}");
    assert_eq!(
        v2ray(&server, Method::DELETE, &delete_path)
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        v2ray(&server, Method::DELETE, &delete_path)
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        v2ray(&server, Method::GET, &link_path)
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::NOT_FOUND
    );

    let meter = server.meter();
    assert_eq!(
        (
            meter.creates_committed,
            meter.deletes_committed,
            meter.current_users
        ),
        (1, 1, 0)
    );
    assert_eq!(meter.requests[&Endpoint::DeleteUser], 2);
    assert_eq!(meter.requests[&Endpoint::GetLink], 3);
    assert_eq!(meter.total_requests, 7);
    let statuses: Vec<u16> = meter.log.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [201, 200, 200, 200, 204, 404, 404]);
    server.shutdown().await;
}

#[tokio::test]
async fn wrong_or_missing_key_is_401_and_changes_nothing() {
    let server = FakeServer::start(FakeServerConfig::v2ray()).await.unwrap();
    let url = format!("{}/api/users", server.api_url());
    let body = json!({"email": "a@b", "name": "a"});
    let wrong = client()
        .post(&url)
        .header("X-API-Key", "nope")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(json_of(wrong).await, json!({"detail": "Invalid API key"}));
    let missing = client().get(&url).send().await.unwrap();
    assert_eq!(missing.status(), StatusCode::UNAUTHORIZED);
    let meter = server.meter();
    assert_eq!(
        (
            meter.total_requests,
            meter.creates_committed,
            meter.current_users
        ),
        (2, 0, 0)
    );
    assert_eq!(meter.requests[&Endpoint::CreateUser], 1);
}

#[tokio::test]
async fn conflict_policy_compares_emails_case_insensitively() {
    let server = FakeServer::start(FakeServerConfig::v2ray()).await.unwrap();
    assert_eq!(
        create_user(&server, "Kf-A@x").await.status(),
        StatusCode::CREATED
    );
    let again = create_user(&server, "kf-a@X").await;
    assert_eq!(again.status(), StatusCode::CONFLICT);
    assert!(json_of(again).await["detail"].is_string());
    let meter = server.meter();
    assert_eq!(
        (
            meter.creates_committed,
            meter.conflicts,
            meter.duplicates,
            meter.current_users
        ),
        (1, 1, 0, 1)
    );
}

#[tokio::test]
async fn silent_duplicate_policy_stores_and_counts_a_second_user() {
    let config = FakeServerConfig::v2ray().with_duplicate_policy(DuplicatePolicy::SilentDuplicate);
    let server = FakeServer::start(config).await.unwrap();
    assert_eq!(
        create_user(&server, "kf-a@x").await.status(),
        StatusCode::CREATED
    );
    assert_eq!(
        create_user(&server, "KF-A@x").await.status(),
        StatusCode::CREATED
    );
    let meter = server.meter();
    assert_eq!(
        (
            meter.creates_committed,
            meter.conflicts,
            meter.duplicates,
            meter.current_users
        ),
        (2, 0, 1, 2)
    );
    let users = server.users();
    assert_ne!(users[0].id, users[1].id);
}

#[tokio::test]
async fn malformed_bodies_get_400_with_a_message() {
    let server = FakeServer::start(FakeServerConfig::v2ray()).await.unwrap();
    for body in [
        "{not json",
        r#"{"email": "a@b"}"#,
        r#"{"email": "", "name": "x"}"#,
    ] {
        let response = v2ray(&server, Method::POST, "/api/users")
            .header("Content-Type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{body}");
        assert!(
            !json_of(response).await["detail"]
                .as_str()
                .unwrap()
                .is_empty()
        );
    }
    assert_eq!(server.meter().current_users, 0);
}

#[tokio::test]
async fn stats_wipe_and_foreign_users() {
    let server = FakeServer::start(FakeServerConfig::v2ray()).await.unwrap();
    let ours = json_of(create_user(&server, "kf-a@x").await).await["uuid"]
        .as_str()
        .unwrap()
        .to_owned();
    let foreign = server.add_foreign_user("alice@example.com");
    server.add_traffic(&ours, 10, 20);
    server.add_traffic(&ours, 1, 2);

    let stats = json_of(
        v2ray(&server, Method::GET, "/api/stats/users")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        stats,
        json!({"users": [{"uuid": ours, "email": "kf-a@x", "uplink": 11, "downlink": 22}]})
    );
    let names: Vec<_> = server
        .users()
        .into_iter()
        .map(|u| (u.id, u.email))
        .collect();
    assert_eq!(
        names,
        [
            (ours.clone(), Some("kf-a@x".to_owned())),
            (foreign, Some("alice@example.com".to_owned()))
        ]
    );

    server.wipe();
    assert!(server.users().is_empty());
    let list = json_of(
        v2ray(&server, Method::GET, "/api/users")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(list, json!([]));
    // Deleted users linger in stats until the counters reset.
    let stats = json_of(
        v2ray(&server, Method::GET, "/api/stats/users")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(stats["users"].as_array().unwrap().len(), 1);
    server.reset_traffic_counters();
    let stats = json_of(
        v2ray(&server, Method::GET, "/api/stats/users")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(stats, json!({"users": []}));

    let meter = server.meter();
    assert_eq!(
        (
            meter.total_requests,
            meter.creates_committed,
            meter.current_users
        ),
        (5, 1, 0)
    );
    // The same email can be created again after the wipe.
    assert_eq!(
        create_user(&server, "kf-a@x").await.status(),
        StatusCode::CREATED
    );
}

#[tokio::test]
async fn lists_100k_users() {
    let server = FakeServer::start(FakeServerConfig::v2ray()).await.unwrap();
    for i in 0..100_000 {
        server.add_foreign_user(&format!("u{i}@x"));
    }
    let list = json_of(
        v2ray(&server, Method::GET, "/api/users")
            .send()
            .await
            .unwrap(),
    )
    .await;
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 100_000);
    assert_eq!(list[99_999]["email"], "u99999@x");
}
