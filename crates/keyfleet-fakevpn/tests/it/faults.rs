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

#[tokio::test]
async fn oversized_body_streams_its_bytes_and_stays_in_flight_until_done() {
    let server = FakeServer::start(FakeServerConfig::v2ray()).await.unwrap();
    server.inject(
        Some(Endpoint::ListUsers),
        Fault::OversizedBody { bytes: 1_000_000 },
        1,
    );
    let response = v2ray(&server, Method::GET, "/api/users")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.content_length(), None);
    let body = response.bytes().await.unwrap();
    assert_eq!(body.len(), 1_000_000);
    assert!(body.starts_with(b"[ "));

    // An endless body: the request is in flight while the client reads, and leaves when it stops.
    server.inject(
        Some(Endpoint::ListUsers),
        Fault::OversizedBody { bytes: u64::MAX },
        1,
    );
    let mut response = v2ray(&server, Method::GET, "/api/users")
        .send()
        .await
        .unwrap();
    let mut read = 0;
    while read < 4_000_000 {
        read += response.chunk().await.unwrap().unwrap().len();
    }
    assert_eq!(server.meter().in_flight, 1);
    drop(response);
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.meter().in_flight != 0 {
        assert!(Instant::now() < deadline, "the endless body never ended");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn text_faults_corrupt_one_field_of_the_real_answer() {
    let server = FakeServer::start(FakeServerConfig::v2ray()).await.unwrap();
    let first = json_of(create_user(&server, "kf-a@x").await).await;
    create_user(&server, "kf-b@x").await;
    let uuid = first["uuid"].as_str().unwrap();

    server.inject(Some(Endpoint::GetLink), Fault::NulInLink { offset: 17 }, 1);
    let path = format!("/api/keys/{uuid}/link");
    let link = json_of(v2ray(&server, Method::GET, &path).send().await.unwrap()).await;
    let link = link["link"].as_str().unwrap();
    assert_eq!(link.find('\0'), Some(17));
    assert_eq!(link.replace('\0', ""), server.users()[0].link);

    server.inject(
        Some(Endpoint::ListUsers),
        Fault::InsertIntoField {
            field: "uuid".into(),
            offset: 0,
            text: "\u{7}".into(),
        },
        1,
    );
    let list = json_of(
        v2ray(&server, Method::GET, "/api/users")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(list[0]["uuid"], format!("\u{7}{uuid}"));
    assert_eq!(list[1]["uuid"], server.users()[1].id);

    let outline_server = FakeServer::start(FakeServerConfig::outline())
        .await
        .unwrap();
    outline_server.inject(
        Some(Endpoint::CreateKeyPost),
        Fault::NulInLink { offset: usize::MAX },
        1,
    );
    let key = json_of(
        outline(&outline_server, Method::POST, "/access-keys")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert!(key["accessUrl"].as_str().unwrap().ends_with("outline=1\0"));
    assert_eq!(outline_server.users().len(), 1);
}

#[tokio::test]
async fn echo_secrets_answers_an_error_page_with_the_key_the_path_and_a_link() {
    let server = FakeServer::start(FakeServerConfig::v2ray()).await.unwrap();
    create_user(&server, "kf-a@x").await;
    server.inject(None, Fault::EchoSecrets(500), 1);
    let response = v2ray(&server, Method::GET, "/api/users")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let page = response.text().await.unwrap();
    assert!(page.contains(&server.api_key().unwrap()), "{page}");
    assert!(page.contains(&server.users()[0].link), "{page}");

    let server = FakeServer::start(FakeServerConfig::outline())
        .await
        .unwrap();
    server.inject(None, Fault::EchoSecrets(503), 1);
    let response = outline(&server, Method::GET, "/server")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let page = response.text().await.unwrap();
    let prefix = server.api_url().rsplit('/').next().unwrap().to_owned();
    assert!(page.contains(&format!("/{prefix}/server")), "{page}");
    assert!(page.contains("vless://"), "{page}");
}
