use std::time::Duration;

use keyfleet_fakevpn::{Endpoint, FakeServer, FakeServerConfig, Hold};
use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::{create_user, json_of, outline, v2ray};

/// `wait_arrived` with a deadline, so a hold that never holds fails instead of hanging.
async fn arrived(hold: &Hold, n: u64) {
    tokio::time::timeout(Duration::from_secs(5), hold.wait_arrived(n))
        .await
        .unwrap_or_else(|_| panic!("{n} requests never reached {hold:?}"));
}

#[tokio::test]
async fn a_held_list_takes_its_snapshot_after_the_release() {
    let server = FakeServer::start(FakeServerConfig::v2ray()).await.unwrap();
    create_user(&server, "kf-a@x").await;
    let hold = server.hold(Endpoint::ListUsers);
    let list = tokio::spawn(v2ray(&server, Method::GET, "/api/users").send());
    arrived(&hold, 1).await;
    assert_eq!(hold.arrived(), 1);
    // Parked and honestly in flight; other endpoints pass.
    assert_eq!(server.meter().in_flight, 1);
    assert_eq!(
        create_user(&server, "kf-b@x").await.status(),
        StatusCode::CREATED
    );
    assert!(!list.is_finished());

    hold.release();
    let users: Value = json_of(list.await.unwrap().unwrap()).await;
    assert_eq!(users.as_array().unwrap().len(), 2, "{users}");
    // After the release, requests are no longer held, and the count stays.
    let again = v2ray(&server, Method::GET, "/api/users")
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::OK);
    assert_eq!(hold.arrived(), 1);
    let meter = server.meter();
    assert_eq!((meter.in_flight, meter.peak_in_flight), (0, 2));
}

#[tokio::test]
async fn held_creates_wait_before_storing_and_dropping_the_hold_releases_them() {
    let server = FakeServer::start(FakeServerConfig::v2ray()).await.unwrap();
    let hold = server.hold(Endpoint::CreateUser);
    let a = tokio::spawn({
        let server = server.clone();
        async move { create_user(&server, "kf-a@x").await.status() }
    });
    let b = tokio::spawn({
        let server = server.clone();
        async move { create_user(&server, "kf-a@x").await.status() }
    });
    arrived(&hold, 2).await;
    let meter = server.meter();
    assert_eq!(
        (
            meter.in_flight,
            meter.creates_committed,
            meter.current_users
        ),
        (2, 0, 0)
    );
    drop(hold);
    let mut statuses = [a.await.unwrap(), b.await.unwrap()];
    statuses.sort();
    assert_eq!(statuses, [StatusCode::CREATED, StatusCode::CONFLICT]);
    assert_eq!(server.users().len(), 1);
}

#[tokio::test]
async fn outline_delete_is_held_before_it_deletes() {
    let server = FakeServer::start(FakeServerConfig::outline())
        .await
        .unwrap();
    let id = server.add_foreign_user("x");
    let hold = server.hold(Endpoint::DeleteKey);
    let delete =
        tokio::spawn(outline(&server, Method::DELETE, &format!("/access-keys/{id}")).send());
    arrived(&hold, 1).await;
    // Held requests stay held however long it takes.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(server.users().len(), 1);
    assert_eq!(server.meter().in_flight, 1);
    hold.release();
    assert_eq!(
        delete.await.unwrap().unwrap().status(),
        StatusCode::NO_CONTENT
    );
    assert!(server.users().is_empty());
}

#[tokio::test]
async fn shutdown_ends_held_requests() {
    let server = FakeServer::start(FakeServerConfig::outline())
        .await
        .unwrap();
    let hold = server.hold(Endpoint::ServerInfo);
    let info = tokio::spawn(outline(&server, Method::GET, "/server").send());
    arrived(&hold, 1).await;
    tokio::time::timeout(Duration::from_secs(3), server.shutdown())
        .await
        .unwrap();
    // Answered (or cut), never left hanging.
    let _ = tokio::time::timeout(Duration::from_secs(3), info)
        .await
        .unwrap();
}
