use std::time::{Duration, Instant};

use keyfleet_fakevpn::{
    Endpoint, FakeFleet, FakeServer, FakeServerConfig, Fault, Latency, ServerKind,
};
use reqwest::{Method, StatusCode};

use crate::{create_user, outline, v2ray};

#[tokio::test]
async fn peak_in_flight_counts_concurrent_requests_during_latency() {
    let latency = Duration::from_millis(200);
    let server = FakeServer::start(FakeServerConfig::v2ray().with_latency(Latency::Fixed(latency)))
        .await
        .unwrap();
    let started = Instant::now();
    let requests = (0..8).map(|_| v2ray(&server, Method::GET, "/api/users").send());
    for response in join_all(requests).await {
        assert_eq!(response.unwrap().status(), StatusCode::OK);
    }
    let elapsed = started.elapsed();
    assert!(elapsed >= latency && elapsed < latency * 4, "{elapsed:?}");
    let meter = server.meter();
    assert_eq!(
        (meter.peak_in_flight, meter.in_flight, meter.total_requests),
        (8, 0, 8)
    );

    server.reset_meter();
    let meter = server.meter();
    assert_eq!(
        (meter.peak_in_flight, meter.total_requests, meter.log.len()),
        (0, 0, 0)
    );
}

/// Runs the futures concurrently, each on its own task.
async fn join_all<F>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send,
{
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for handle in handles {
        out.push(handle.await.unwrap());
    }
    out
}

#[tokio::test]
async fn refusing_gives_connection_refused_then_serves_again_on_the_same_port() {
    let server = FakeServer::start(FakeServerConfig::v2ray()).await.unwrap();
    let pooled = crate::client();
    let list = || {
        pooled
            .get(format!("{}/api/users", server.api_url()))
            .header("X-API-Key", server.api_key().unwrap())
    };
    assert_eq!(list().send().await.unwrap().status(), StatusCode::OK);
    server.inject(None, Fault::Hang(Duration::from_secs(10)), 1);
    let stuck = tokio::spawn(v2ray(&server, Method::GET, "/api/users").send());
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.meter().in_flight == 0 {
        assert!(Instant::now() < deadline, "the request never arrived");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    server.set_refusing(true);
    let refused = v2ray(&server, Method::GET, "/api/users")
        .send()
        .await
        .unwrap_err();
    assert!(refused.is_connect(), "{refused:?}");
    // Open connections are cut: the in-flight request and the kept-alive one fail.
    assert!(stuck.await.unwrap().is_err());
    assert!(list().send().await.is_err());

    server.set_refusing(true);
    server.set_refusing(false);
    assert_eq!(
        v2ray(&server, Method::GET, "/api/users")
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    let meter = server.meter();
    // Refused connects never reached the server; the cut request was never answered.
    let statuses: Vec<u16> = meter.log.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [200, 0, 200]);
    assert_eq!(meter.in_flight, 0);
}

#[tokio::test]
async fn creates_slow_down_with_the_key_count_and_queue() {
    let config = FakeServerConfig::outline().with_create_latency_per_key(Duration::from_millis(10));
    let server = FakeServer::start(config).await.unwrap();
    for i in 0..5 {
        server.add_foreign_user(&format!("k{i}"));
    }
    let started = Instant::now();
    let creates = (0..2).map(|_| outline(&server, Method::POST, "/access-keys").send());
    for response in join_all(creates).await {
        assert_eq!(response.unwrap().status(), StatusCode::CREATED);
    }
    // 5 keys × 10 ms, then 6 × 10 ms for the one that queued behind it.
    assert!(
        started.elapsed() >= Duration::from_millis(110),
        "{:?}",
        started.elapsed()
    );
    let list_started = Instant::now();
    outline(&server, Method::GET, "/access-keys")
        .send()
        .await
        .unwrap();
    assert!(list_started.elapsed() < Duration::from_millis(50));
}

#[tokio::test]
async fn fleet_sums_meters_and_shuts_down() {
    let fleet = FakeFleet::start(2, 1, |kind, i| match kind {
        ServerKind::V2ray => FakeServerConfig::v2ray().with_seed(i as u64),
        ServerKind::Outline | ServerKind::XrayGrpc => FakeServerConfig::outline(),
    })
    .await
    .unwrap();
    let kinds: Vec<_> = fleet.servers.iter().map(FakeServer::kind).collect();
    assert_eq!(
        kinds,
        [ServerKind::V2ray, ServerKind::V2ray, ServerKind::Outline]
    );
    for server in &fleet.servers[..2] {
        assert_eq!(
            create_user(server, "kf-a@x").await.status(),
            StatusCode::CREATED
        );
    }
    let outline_server = &fleet.servers[2];
    assert_eq!(
        outline(outline_server, Method::POST, "/access-keys")
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::CREATED
    );
    assert_eq!(
        outline(outline_server, Method::GET, "/server")
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );

    let total = fleet.total_meter();
    assert_eq!(
        (
            total.total_requests,
            total.creates_committed,
            total.current_users
        ),
        (4, 3, 3)
    );
    assert_eq!(total.requests[&Endpoint::CreateUser], 2);
    assert_eq!(total.log.len(), 4);
    assert_eq!(total.peak_in_flight, 1);
    let url = outline_server.api_url();
    fleet.shutdown().await;
    assert!(
        crate::client()
            .get(format!("{url}/server"))
            .send()
            .await
            .unwrap_err()
            .is_connect()
    );
}
