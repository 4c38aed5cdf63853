use std::time::{Duration, Instant};

use keyfleet_fakevpn::{Endpoint, FakeServer, FakeServerConfig, Fault, FaultRates};
use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::{create_user, json_of, outline, v2ray};

#[tokio::test]
async fn status_after_commit_commits_and_status_does_not() {
    let server = FakeServer::start(FakeServerConfig::v2ray()).await.unwrap();
    server.inject(Some(Endpoint::CreateUser), Fault::Status(503), 1);
    server.inject(Some(Endpoint::CreateUser), Fault::StatusAfterCommit(500), 1);

    assert_eq!(
        create_user(&server, "kf-a@x").await.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(server.meter().current_users, 0);
    let hidden_success = create_user(&server, "kf-a@x").await;
    assert_eq!(hidden_success.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert!(json_of(hidden_success).await["detail"].is_string());
    assert_eq!(server.users().len(), 1);
    // The retry finds the user the failed-looking attempt made.
    assert_eq!(
        create_user(&server, "kf-a@x").await.status(),
        StatusCode::CONFLICT
    );

    let meter = server.meter();
    assert_eq!(
        (meter.creates_committed, meter.conflicts, meter.duplicates),
        (1, 1, 0)
    );
    let statuses: Vec<u16> = meter.log.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [503, 500, 409]);
}

#[tokio::test]
async fn too_many_requests_hang_and_malformed_body() {
    let server = FakeServer::start(FakeServerConfig::outline())
        .await
        .unwrap();
    server.inject(
        None,
        Fault::TooManyRequests {
            retry_after_secs: 7,
        },
        1,
    );
    server.inject(
        Some(Endpoint::CreateKeyPut),
        Fault::Hang(Duration::from_millis(50)),
        1,
    );
    server.inject(Some(Endpoint::CreateKeyPut), Fault::MalformedBody, 1);

    let limited = outline(&server, Method::GET, "/access-keys")
        .send()
        .await
        .unwrap();
    assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(limited.headers()["retry-after"], "7");

    let put = || {
        outline(&server, Method::PUT, "/access-keys/kf-a")
            .json(&json!({"name": "kf-a"}))
            .send()
    };
    let started = Instant::now();
    let hung = put().await.unwrap();
    assert_eq!(hung.status(), StatusCode::GATEWAY_TIMEOUT);
    assert!(started.elapsed() >= Duration::from_millis(50));
    assert_eq!(server.meter().current_users, 0);

    let garbled = put().await.unwrap();
    assert_eq!(garbled.status(), StatusCode::CREATED);
    let text = garbled.text().await.unwrap();
    assert!(
        serde_json::from_str::<serde_json::Value>(&text).is_err(),
        "{text}"
    );
    assert_eq!(server.meter().current_users, 1);

    assert_eq!(put().await.unwrap().status(), StatusCode::CONFLICT);
}

#[tokio::test]
async fn lost_response_after_commit_times_the_client_out() {
    let server = FakeServer::start(FakeServerConfig::v2ray()).await.unwrap();
    server.inject(
        Some(Endpoint::CreateUser),
        Fault::LostResponseAfterCommit(Duration::from_secs(30)),
        1,
    );
    let result = v2ray(&server, Method::POST, "/api/users")
        .json(&json!({"email": "kf-a@x", "name": "a"}))
        .timeout(Duration::from_millis(200))
        .send()
        .await;
    assert!(result.unwrap_err().is_timeout());
    assert_eq!(server.users().len(), 1);
    assert_eq!(server.meter().creates_committed, 1);
    // Shutdown ends the held response instead of waiting 30 s.
    let started = Instant::now();
    server.shutdown().await;
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn fault_rates_are_drawn_per_request_and_clear() {
    let server = FakeServer::start(FakeServerConfig::v2ray()).await.unwrap();
    server.set_fault_rates(FaultRates {
        status_5xx: 1.0,
        ..FaultRates::default()
    });
    for _ in 0..3 {
        assert_eq!(
            create_user(&server, "kf-a@x").await.status(),
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
    server.set_fault_rates(FaultRates {
        status_after_commit: 1.0,
        ..FaultRates::default()
    });
    let list = v2ray(&server, Method::GET, "/api/users")
        .send()
        .await
        .unwrap();
    assert_eq!(
        list.status(),
        StatusCode::OK,
        "reads never get after-commit faults"
    );
    assert_eq!(
        create_user(&server, "kf-a@x").await.status(),
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(server.users().len(), 1);
    server.clear_faults();
    assert_eq!(
        create_user(&server, "kf-b@x").await.status(),
        StatusCode::CREATED
    );
}

#[tokio::test]
async fn half_the_requests_fail_at_rate_one_half() {
    let server = FakeServer::start(FakeServerConfig::v2ray().with_seed(42))
        .await
        .unwrap();
    server.set_fault_rates(FaultRates {
        status_5xx: 0.5,
        ..FaultRates::default()
    });
    let mut failed = 0;
    for _ in 0..200 {
        if v2ray(&server, Method::GET, "/api/users")
            .send()
            .await
            .unwrap()
            .status()
            == 500
        {
            failed += 1;
        }
    }
    assert!((70..=130).contains(&failed), "{failed}");
}
