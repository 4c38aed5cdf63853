//! Drives the fake servers over real HTTP(S) with reqwest and checks what they recorded.

mod faults;
mod hold;
mod outline;
mod server;
mod v2ray;

use std::time::Duration;

use keyfleet_fakevpn::FakeServer;
use serde_json::{Value, json};

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .tls_info(true)
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

/// A V2Ray request with the server's API key.
pub fn v2ray(server: &FakeServer, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
    client()
        .request(method, format!("{}{path}", server.api_url()))
        .header("X-API-Key", server.api_key().unwrap())
}

pub async fn create_user(server: &FakeServer, email: &str) -> reqwest::Response {
    v2ray(server, reqwest::Method::POST, "/api/users")
        .json(&json!({"email": email, "name": email}))
        .send()
        .await
        .unwrap()
}

pub fn outline(
    server: &FakeServer,
    method: reqwest::Method,
    path: &str,
) -> reqwest::RequestBuilder {
    client().request(method, format!("{}{path}", server.api_url()))
}

pub async fn json_of(response: reqwest::Response) -> Value {
    response.json().await.unwrap()
}
