use axum::{
    http::{HeaderMap, Method, StatusCode},
    response::Response,
};
use serde::de::DeserializeOwned;

use crate::{endpoint::Call, meter::Meter};

/// A user or key as the test sees it, whichever API the server speaks.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct FakeUser {
    pub id: String,
    pub name: String,
    /// V2Ray only.
    pub email: Option<String>,
    /// V2Ray: the `vless://` link; Outline: the `ss://` access URL.
    pub link: String,
}

/// One management API: routing, auth and state. Handlers are synchronous; everything timed
/// (latency, faults) happens around them in `server.rs`.
pub(crate) trait Api: Send + Sync + 'static {
    fn route(&self, method: &Method, path: &str) -> Call;
    fn authorized(&self, path: &str, headers: &HeaderMap) -> bool;
    fn unauthorized(&self) -> Response;
    fn error(&self, status: StatusCode, message: &str) -> Response;
    fn handle(&self, call: &Call, body: &[u8], meter: &Meter) -> Response;
    /// The JSON field that carries a share link in this API's responses.
    fn link_field(&self) -> &'static str;

    fn user_count(&self) -> usize;
    fn users(&self) -> Vec<FakeUser>;
    fn add_foreign_user(&self, name: &str) -> String;
    fn add_traffic(&self, id: &str, uplink: u64, downlink: u64);
    fn reset_traffic(&self);
    fn set_link_generation(&self, generation: u64);
    fn wipe(&self);
}

/// Parses a JSON request body, with the reason in the error for a 400.
pub(crate) fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|e| format!("Invalid JSON body: {e}"))
}
