//! The V2Ray panel API (`shared/specs/v2ray-panel-api.md`).

use std::collections::{BTreeMap, HashMap};

use axum::{
    Json,
    http::{HeaderMap, Method, StatusCode},
    response::{IntoResponse, Response},
};
use chrono::{SecondsFormat, Utc};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::{
    DuplicatePolicy, Endpoint, FakeUser,
    api::{Api, parse_json},
    encoding::{base64url, percent_encode},
    endpoint::{Call, segments},
    meter::{Meter, Outcome},
};

pub(crate) struct V2rayPanel {
    api_key: String,
    duplicate_policy: DuplicatePolicy,
    /// Reality short id: fixed per server.
    short_id: String,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// In creation order, keyed by a sequence number.
    users: BTreeMap<u64, User>,
    by_uuid: HashMap<String, u64>,
    /// Users per lowercased email.
    emails: HashMap<String, u32>,
    next_seq: u64,
    /// Per uuid; outlives the user, as Xray's stats do.
    traffic: BTreeMap<String, Traffic>,
    /// Reality public key, derived from the link generation.
    pbk: String,
    uuid_salt: (u64, u64),
    uuid_counter: u64,
}

#[derive(Serialize)]
struct User {
    uuid: String,
    email: String,
    name: String,
    /// RFC 3339, formatted once: lists serialise it for every user.
    created_at: String,
    is_active: bool,
}

struct Traffic {
    email: String,
    uplink: u64,
    downlink: u64,
}

#[derive(Deserialize)]
struct CreateUser {
    email: String,
    name: String,
}

impl V2rayPanel {
    pub fn new(api_key: String, duplicate_policy: DuplicatePolicy) -> Self {
        let short_id = hex::encode(&Sha256::digest(format!("sid:{api_key}"))[..4]);
        let panel = Self {
            api_key,
            duplicate_policy,
            short_id,
            state: Mutex::default(),
        };
        panel.set_link_generation(0);
        panel
    }

    fn link(&self, state: &State, user: &User) -> String {
        format!(
            "vless://{}@127.0.0.1:443?type=tcp&encryption=none&security=reality&sni=example.com&fp=chrome&pbk={}&sid={}&flow=xtls-rprx-vision#{}",
            user.uuid,
            state.pbk,
            self.short_id,
            percent_encode(&user.name)
        )
    }

    fn create(&self, body: &[u8], meter: &Meter) -> Response {
        let req: CreateUser = match parse_json(body) {
            Ok(req) => req,
            Err(message) => return self.error(StatusCode::BAD_REQUEST, &message),
        };
        if req.email.trim().is_empty() {
            return self.error(StatusCode::BAD_REQUEST, "email must not be empty");
        }
        let mut state = self.state.lock();
        let exists = state.emails.contains_key(&req.email.to_lowercase());
        if exists && self.duplicate_policy == DuplicatePolicy::Conflict409 {
            drop(state);
            meter.record(Outcome::Conflict);
            return self.error(
                StatusCode::CONFLICT,
                &format!("User with email {} already exists", req.email),
            );
        }
        let seq = state.insert(req.email, req.name);
        let response = (StatusCode::CREATED, Json(&state.users[&seq])).into_response();
        drop(state);
        meter.record(if exists {
            Outcome::CreatedDuplicate
        } else {
            Outcome::Created
        });
        response
    }

    fn get_link(&self, uuid: &str) -> Response {
        let state = self.state.lock();
        match state.by_uuid.get(uuid) {
            Some(seq) => Json(json!({"uuid": uuid, "link": self.link(&state, &state.users[seq])}))
                .into_response(),
            None => self.error(StatusCode::NOT_FOUND, "User not found"),
        }
    }

    fn delete(&self, uuid: &str, meter: &Meter) -> Response {
        if self.state.lock().remove(uuid) {
            meter.record(Outcome::Deleted);
            StatusCode::NO_CONTENT.into_response()
        } else {
            self.error(StatusCode::NOT_FOUND, "User not found")
        }
    }

    fn stats(&self) -> Response {
        let state = self.state.lock();
        let users: Vec<_> = state
            .traffic
            .iter()
            .filter(|(_, t)| t.uplink > 0 || t.downlink > 0)
            .map(|(uuid, t)| json!({"uuid": uuid, "email": t.email, "uplink": t.uplink, "downlink": t.downlink}))
            .collect();
        Json(json!({ "users": users })).into_response()
    }
}

impl State {
    fn insert(&mut self, email: String, name: String) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        let uuid = self.next_uuid();
        *self.emails.entry(email.to_lowercase()).or_default() += 1;
        self.by_uuid.insert(uuid.clone(), seq);
        self.users.insert(
            seq,
            User {
                uuid,
                email,
                name,
                created_at: Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true),
                is_active: true,
            },
        );
        seq
    }

    /// A random-looking v4 uuid from a per-server salt and a counter: drawing from an RNG per user
    /// makes 100k-user fixtures take seconds in debug builds.
    fn next_uuid(&mut self) -> String {
        loop {
            self.uuid_counter += 1;
            let high = splitmix64(self.uuid_salt.0 ^ self.uuid_counter);
            let low = splitmix64(self.uuid_salt.1.wrapping_add(self.uuid_counter));
            let bytes = (u128::from(high) << 64 | u128::from(low)).to_be_bytes();
            let uuid = uuid::Builder::from_random_bytes(bytes)
                .into_uuid()
                .to_string();
            if !self.by_uuid.contains_key(&uuid) {
                return uuid;
            }
        }
    }

    fn remove(&mut self, uuid: &str) -> bool {
        let Some(seq) = self.by_uuid.remove(uuid) else {
            return false;
        };
        if let Some(user) = self.users.remove(&seq) {
            let key = user.email.to_lowercase();
            if let Some(n) = self.emails.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    self.emails.remove(&key);
                }
            }
        }
        true
    }
}

/// The SplitMix64 finaliser: a bijection on u64 that looks random.
fn splitmix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Api for V2rayPanel {
    fn route(&self, method: &Method, path: &str) -> Call {
        let segs = segments(path);
        let (endpoint, id) = match (method, segs.as_slice()) {
            (&Method::POST, ["api", "users"]) => (Endpoint::CreateUser, ""),
            (&Method::GET, ["api", "users"]) => (Endpoint::ListUsers, ""),
            (&Method::DELETE, ["api", "users", uuid]) => (Endpoint::DeleteUser, *uuid),
            (&Method::GET, ["api", "keys", uuid, "link"]) => (Endpoint::GetLink, *uuid),
            (&Method::GET, ["api", "stats", "users"]) => (Endpoint::Stats, ""),
            _ => (Endpoint::Unknown, ""),
        };
        Call::new(endpoint, id, method)
    }

    fn authorized(&self, _path: &str, headers: &HeaderMap) -> bool {
        headers
            .get("x-api-key")
            .is_some_and(|key| key.as_bytes() == self.api_key.as_bytes())
    }

    fn unauthorized(&self) -> Response {
        self.error(StatusCode::UNAUTHORIZED, "Invalid API key")
    }

    fn error(&self, status: StatusCode, message: &str) -> Response {
        (status, Json(json!({ "detail": message }))).into_response()
    }

    fn handle(&self, call: &Call, body: &[u8], meter: &Meter) -> Response {
        match call.endpoint {
            Endpoint::CreateUser => self.create(body, meter),
            Endpoint::ListUsers => {
                Json(self.state.lock().users.values().collect::<Vec<_>>()).into_response()
            }
            Endpoint::GetLink => self.get_link(&call.id),
            Endpoint::DeleteUser => self.delete(&call.id, meter),
            Endpoint::Stats => self.stats(),
            _ => self.error(StatusCode::NOT_FOUND, "Not Found"),
        }
    }

    fn link_field(&self) -> &'static str {
        "link"
    }

    fn user_count(&self) -> usize {
        self.state.lock().users.len()
    }

    fn users(&self) -> Vec<FakeUser> {
        let state = self.state.lock();
        state
            .users
            .values()
            .map(|u| FakeUser {
                id: u.uuid.clone(),
                name: u.name.clone(),
                email: Some(u.email.clone()),
                link: self.link(&state, u),
            })
            .collect()
    }

    fn add_foreign_user(&self, name: &str) -> String {
        let mut state = self.state.lock();
        let seq = state.insert(name.to_owned(), name.to_owned());
        state.users[&seq].uuid.clone()
    }

    fn add_traffic(&self, id: &str, uplink: u64, downlink: u64) {
        let mut state = self.state.lock();
        let Some(email) = state
            .by_uuid
            .get(id)
            .map(|seq| state.users[seq].email.clone())
        else {
            tracing::warn!(uuid = id, "Traffic for an unknown user ignored.");
            return;
        };
        let t = state.traffic.entry(id.to_owned()).or_insert(Traffic {
            email,
            uplink: 0,
            downlink: 0,
        });
        t.uplink = t.uplink.saturating_add(uplink);
        t.downlink = t.downlink.saturating_add(downlink);
    }

    fn reset_traffic(&self) {
        self.state.lock().traffic.clear();
    }

    fn set_link_generation(&self, generation: u64) {
        let digest = Sha256::digest(format!("pbk:{}:{generation}", self.api_key));
        self.state.lock().pbk = base64url(&digest);
    }

    fn wipe(&self) {
        let mut state = self.state.lock();
        state.users.clear();
        state.by_uuid.clear();
        state.emails.clear();
    }
}
