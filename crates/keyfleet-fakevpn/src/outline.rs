//! The Outline server management API (`shared/specs/outline-server-api.md`).

use std::collections::{BTreeMap, HashMap};

use axum::{
    Json,
    http::{HeaderMap, Method, StatusCode},
    response::{IntoResponse, Response},
};
use parking_lot::Mutex;
use rand::{Rng, distr::Alphanumeric};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::{
    Endpoint, FakeUser,
    api::{Api, parse_json},
    encoding::base64url,
    endpoint::{Call, segments},
    meter::{Meter, Outcome},
};

const METHOD: &str = "chacha20-ietf-poly1305";

pub(crate) struct OutlineServer {
    /// `/<secret>`: every path must start with it.
    prefix: String,
    version: String,
    has_key_ids: bool,
    server_id: String,
    created_ms: i64,
    port: u16,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// In creation order, keyed by a sequence number.
    keys: BTreeMap<u64, AccessKey>,
    by_id: HashMap<String, u64>,
    /// Keys per non-empty name.
    names: HashMap<String, u32>,
    next_seq: u64,
    next_id: u64,
    /// Bytes per key id; outlives the key, as Outline's Prometheus figures do.
    transfer: BTreeMap<String, u64>,
    /// In every access URL; changed by the link generation, like an operator renaming the host.
    hostname: String,
}

#[derive(Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct AccessKey {
    id: String,
    name: String,
    password: String,
    port: u16,
    method: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    data_limit: Option<DataLimit>,
}

/// An access key as the API returns it.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct KeyView<'a> {
    #[serde(flatten)]
    key: &'a AccessKey,
    access_url: String,
}

#[derive(Clone, Copy, Serialize, Deserialize)]
struct DataLimit {
    bytes: u64,
}

#[derive(Default, Deserialize)]
struct CreateKey {
    name: Option<String>,
    method: Option<String>,
    password: Option<String>,
    port: Option<u16>,
    limit: Option<DataLimit>,
}

#[derive(Deserialize)]
struct Rename {
    name: String,
}

#[derive(Deserialize)]
struct SetLimit {
    limit: DataLimit,
}

impl OutlineServer {
    pub fn new(secret: &str, version: String, has_key_ids: bool) -> Self {
        Self {
            prefix: format!("/{secret}"),
            version,
            has_key_ids,
            server_id: uuid::Uuid::new_v4().to_string(),
            created_ms: chrono::Utc::now().timestamp_millis(),
            port: rand::rng().random_range(10_000..60_000),
            state: Mutex::new(State {
                hostname: hostname(0),
                ..State::default()
            }),
        }
    }

    /// The path under the secret prefix, or `None` if the prefix is wrong.
    fn strip<'p>(&self, path: &'p str) -> Option<&'p str> {
        let rest = path.strip_prefix(&self.prefix)?;
        (rest.is_empty() || rest.starts_with('/')).then_some(rest)
    }

    fn not_found(&self, id: &str) -> Response {
        self.error(
            StatusCode::NOT_FOUND,
            &format!("Access key \"{id}\" not found"),
        )
    }

    /// What restify answers for a path no route has (and so for every wrong secret prefix).
    fn no_such_route(&self) -> Response {
        (
            StatusCode::NOT_FOUND,
            Json(json!({"code": "ResourceNotFound", "message": "Route does not exist"})),
        )
            .into_response()
    }

    /// What a server older than 1.8.0 (restify) answers for `GET`/`PUT /access-keys/{id}`: the
    /// path exists for `DELETE`, not for this method.
    fn method_not_allowed(&self, method: &Method) -> Response {
        let mut response = (
            StatusCode::METHOD_NOT_ALLOWED,
            Json(
                json!({"code": "MethodNotAllowed", "message": format!("{method} is not allowed")}),
            ),
        )
            .into_response();
        response.headers_mut().insert(
            axum::http::header::ALLOW,
            axum::http::HeaderValue::from_static("DELETE"),
        );
        response
    }

    fn server_info(&self) -> Response {
        Json(json!({
            "name": "Outline Server",
            "serverId": self.server_id,
            "metricsEnabled": false,
            "createdTimestampMs": self.created_ms,
            "version": self.version,
            "portForNewAccessKeys": self.port,
            "hostnameForAccessKeys": self.state.lock().hostname,
        }))
        .into_response()
    }

    /// `id`: `None` picks the next free integer (`POST`), `Some` is a chosen id (`PUT`).
    fn create(&self, id: Option<&str>, body: &[u8], meter: &Meter) -> Response {
        let req = if body.trim_ascii().is_empty() {
            CreateKey::default()
        } else {
            match parse_json::<CreateKey>(body) {
                Ok(req) => req,
                Err(message) => return self.error(StatusCode::BAD_REQUEST, &message),
            }
        };
        let mut state = self.state.lock();
        if let Some(id) = id
            && state.by_id.contains_key(id)
        {
            drop(state);
            meter.record(Outcome::Conflict);
            return self.error(
                StatusCode::CONFLICT,
                &format!("Access key \"{id}\" already exists"),
            );
        }
        let key = self.new_key(&mut state, id, req);
        let duplicate = state.names.contains_key(&key.name);
        let response = (StatusCode::CREATED, Json(state.view(&key))).into_response();
        state.insert(key);
        drop(state);
        meter.record(if duplicate {
            Outcome::CreatedDuplicate
        } else {
            Outcome::Created
        });
        response
    }

    fn new_key(&self, state: &mut State, id: Option<&str>, req: CreateKey) -> AccessKey {
        let id = match id {
            Some(id) => id.to_owned(),
            None => loop {
                let candidate = state.next_id.to_string();
                state.next_id += 1;
                if !state.by_id.contains_key(&candidate) {
                    break candidate;
                }
            },
        };
        let method = req.method.unwrap_or_else(|| METHOD.to_owned());
        let password = req.password.unwrap_or_else(|| {
            rand::rng()
                .sample_iter(Alphanumeric)
                .take(22)
                .map(char::from)
                .collect()
        });
        AccessKey {
            id,
            name: req.name.unwrap_or_default(),
            password,
            port: req.port.unwrap_or(self.port),
            method,
            data_limit: req.limit,
        }
    }

    fn get_key(&self, id: &str) -> Response {
        let state = self.state.lock();
        match state.by_id.get(id) {
            Some(seq) => Json(state.view(&state.keys[seq])).into_response(),
            None => self.not_found(id),
        }
    }

    fn list(&self) -> Response {
        let state = self.state.lock();
        let keys: Vec<_> = state.keys.values().map(|k| state.view(k)).collect();
        Json(json!({ "accessKeys": keys })).into_response()
    }

    fn delete(&self, id: &str, meter: &Meter) -> Response {
        if self.state.lock().remove(id) {
            meter.record(Outcome::Deleted);
            StatusCode::NO_CONTENT.into_response()
        } else {
            self.not_found(id)
        }
    }

    fn rename(&self, id: &str, body: &[u8]) -> Response {
        let req: Rename = match parse_json(body) {
            Ok(req) => req,
            Err(message) => return self.error(StatusCode::BAD_REQUEST, &message),
        };
        let mut state = self.state.lock();
        let Some(key) = state.get_mut(id) else {
            return self.not_found(id);
        };
        let old = std::mem::replace(&mut key.name, req.name.clone());
        state.forget_name(&old);
        state.count_name(&req.name);
        StatusCode::NO_CONTENT.into_response()
    }

    fn data_limit(&self, call: &Call, body: &[u8]) -> Response {
        let limit = if call.method == Method::DELETE {
            None
        } else {
            match parse_json::<SetLimit>(body) {
                Ok(req) => Some(req.limit),
                Err(message) => return self.error(StatusCode::BAD_REQUEST, &message),
            }
        };
        match self.state.lock().get_mut(&call.id) {
            Some(key) => {
                key.data_limit = limit;
                StatusCode::NO_CONTENT.into_response()
            }
            None => self.not_found(&call.id),
        }
    }

    fn transfer(&self) -> Response {
        let state = self.state.lock();
        let bytes: BTreeMap<_, _> = state.transfer.iter().filter(|(_, b)| **b > 0).collect();
        Json(json!({ "bytesTransferredByUserId": bytes })).into_response()
    }
}

fn hostname(generation: u64) -> String {
    if generation == 0 {
        "127.0.0.1".to_owned()
    } else {
        format!("g{generation}.localhost")
    }
}

impl State {
    fn view<'k>(&self, key: &'k AccessKey) -> KeyView<'k> {
        let userinfo = base64url(format!("{}:{}", key.method, key.password).as_bytes());
        KeyView {
            key,
            access_url: format!("ss://{userinfo}@{}:{}/?outline=1", self.hostname, key.port),
        }
    }

    fn insert(&mut self, key: AccessKey) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.count_name(&key.name);
        self.by_id.insert(key.id.clone(), seq);
        self.keys.insert(seq, key);
    }

    fn get_mut(&mut self, id: &str) -> Option<&mut AccessKey> {
        let seq = self.by_id.get(id)?;
        self.keys.get_mut(seq)
    }

    fn remove(&mut self, id: &str) -> bool {
        let Some(seq) = self.by_id.remove(id) else {
            return false;
        };
        if let Some(key) = self.keys.remove(&seq) {
            self.forget_name(&key.name);
        }
        true
    }

    fn count_name(&mut self, name: &str) {
        if !name.is_empty() {
            *self.names.entry(name.to_owned()).or_default() += 1;
        }
    }

    fn forget_name(&mut self, name: &str) {
        if let Some(n) = self.names.get_mut(name) {
            *n -= 1;
            if *n == 0 {
                self.names.remove(name);
            }
        }
    }
}

impl Api for OutlineServer {
    fn route(&self, method: &Method, path: &str) -> Call {
        let Some(rest) = self.strip(path) else {
            return Call::new(Endpoint::Unknown, "", method);
        };
        let segs = segments(rest);
        let (endpoint, id) = match (method, segs.as_slice()) {
            (&Method::GET, ["server"]) => (Endpoint::ServerInfo, ""),
            (&Method::POST, ["access-keys"]) => (Endpoint::CreateKeyPost, ""),
            (&Method::GET, ["access-keys"]) => (Endpoint::ListKeys, ""),
            (&Method::PUT, ["access-keys", id]) => (Endpoint::CreateKeyPut, *id),
            (&Method::GET, ["access-keys", id]) => (Endpoint::GetKey, *id),
            (&Method::DELETE, ["access-keys", id]) => (Endpoint::DeleteKey, *id),
            (&Method::PUT, ["access-keys", id, "name"]) => (Endpoint::RenameKey, *id),
            (&Method::PUT | &Method::DELETE, ["access-keys", id, "data-limit"]) => {
                (Endpoint::DataLimit, *id)
            }
            (&Method::GET, ["metrics", "transfer"]) => (Endpoint::Transfer, ""),
            _ => (Endpoint::Unknown, ""),
        };
        Call::new(endpoint, id, method)
    }

    fn authorized(&self, path: &str, _headers: &HeaderMap) -> bool {
        self.strip(path).is_some()
    }

    fn unauthorized(&self) -> Response {
        self.no_such_route()
    }

    fn error(&self, status: StatusCode, message: &str) -> Response {
        let code = match status {
            StatusCode::BAD_REQUEST => "InvalidArgument",
            StatusCode::NOT_FOUND => "NotFound",
            StatusCode::CONFLICT => "Conflict",
            StatusCode::TOO_MANY_REQUESTS => "TooManyRequests",
            StatusCode::GATEWAY_TIMEOUT => "GatewayTimeout",
            _ => "InternalServerError",
        };
        (status, Json(json!({ "code": code, "message": message }))).into_response()
    }

    fn handle(&self, call: &Call, body: &[u8], meter: &Meter) -> Response {
        match call.endpoint {
            Endpoint::ServerInfo => self.server_info(),
            Endpoint::CreateKeyPost => self.create(None, body, meter),
            Endpoint::CreateKeyPut | Endpoint::GetKey if !self.has_key_ids => {
                self.method_not_allowed(&call.method)
            }
            Endpoint::CreateKeyPut => self.create(Some(&call.id), body, meter),
            Endpoint::GetKey => self.get_key(&call.id),
            Endpoint::ListKeys => self.list(),
            Endpoint::DeleteKey => self.delete(&call.id, meter),
            Endpoint::RenameKey => self.rename(&call.id, body),
            Endpoint::DataLimit => self.data_limit(call, body),
            Endpoint::Transfer => self.transfer(),
            _ => self.no_such_route(),
        }
    }

    fn link_field(&self) -> &'static str {
        "accessUrl"
    }

    fn user_count(&self) -> usize {
        self.state.lock().keys.len()
    }

    fn users(&self) -> Vec<FakeUser> {
        let state = self.state.lock();
        state
            .keys
            .values()
            .map(|k| FakeUser {
                id: k.id.clone(),
                name: k.name.clone(),
                email: None,
                link: state.view(k).access_url,
            })
            .collect()
    }

    fn add_foreign_user(&self, name: &str) -> String {
        let mut state = self.state.lock();
        let key = self.new_key(
            &mut state,
            None,
            CreateKey {
                name: Some(name.to_owned()),
                ..CreateKey::default()
            },
        );
        let id = key.id.clone();
        state.insert(key);
        id
    }

    fn add_traffic(&self, id: &str, uplink: u64, downlink: u64) {
        let mut state = self.state.lock();
        let bytes = state.transfer.entry(id.to_owned()).or_default();
        *bytes = bytes.saturating_add(uplink).saturating_add(downlink);
    }

    fn reset_traffic(&self) {
        self.state.lock().transfer.clear();
    }

    fn set_link_generation(&self, generation: u64) {
        self.state.lock().hostname = hostname(generation);
    }

    fn wipe(&self) {
        let mut state = self.state.lock();
        state.keys.clear();
        state.by_id.clear();
        state.names.clear();
    }
}
