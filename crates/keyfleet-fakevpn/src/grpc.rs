//! A fake Xray-core node: the gRPC `HandlerService.AlterInbound` (add and remove users of one
//! inbound) and `StatsService.QueryStats` / `GetSysStats`, served by tonic on a loopback port 0,
//! with the answers a real node gives ("User … already exists.", "User … not found.", an unknown
//! inbound, a package it does not serve). Like a real node it keeps users in memory only:
//! [`FakeGrpcNode::restart`] forgets them and zeroes the counters and the uptime.
//!
//! Same meter and holds as the HTTP fakes, and scripted faults ([`GrpcFault`]).

use std::{
    collections::{BTreeMap, VecDeque},
    io,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use parking_lot::Mutex;
use prost::Message;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::{
    Endpoint, Hold, MeterSnapshot,
    hold::Holds,
    meter::{Meter, Outcome},
};

use keyfleet_proto::xray::{
    app::{
        proxyman::command::{
            AddUserOperation, AlterInboundRequest, AlterInboundResponse, GetInboundUserRequest,
            GetInboundUserResponse, RemoveUserOperation,
            handler_service_server::{HandlerService, HandlerServiceServer},
        },
        stats::command::{
            QueryStatsRequest, QueryStatsResponse, Stat, SysStatsRequest, SysStatsResponse,
            stats_service_server::{StatsService, StatsServiceServer},
        },
    },
    common::{protocol::User, serial::TypedMessage},
    proxy::{vless, vmess},
};

/// A scripted fault of the next call to an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrpcFault {
    /// `UNAVAILABLE` before acting (the node is restarting).
    Unavailable,
    /// The node acts, then the answer is lost: the caller sees `UNAVAILABLE`.
    LostAfterCommit,
    /// `INTERNAL` before acting.
    Internal,
}

/// A fake node; dropping it stops it.
pub struct FakeGrpcNode {
    node: Arc<Node>,
    addr: SocketAddr,
}

struct Node {
    inbound_tag: String,
    /// Serves `GetInboundUsers` (Xray-core 24.11+); otherwise it answers UNIMPLEMENTED.
    lists_users: bool,
    meter: Arc<Meter>,
    holds: Holds,
    closing: watch::Sender<bool>,
    state: Mutex<NodeState>,
    faults: Mutex<VecDeque<(Endpoint, GrpcFault)>>,
}

struct NodeState {
    /// email (lowercase) → uuid.
    users: BTreeMap<String, String>,
    counters: BTreeMap<String, i64>,
    started: Instant,
    /// Added to the uptime: a fresh fake has "run" for an hour, so a restart visibly lowers it.
    uptime_offset: Duration,
}

impl FakeGrpcNode {
    /// Serves on a loopback port 0; users are added to the inbound `inbound_tag`. Like V2Ray and
    /// Xray before 24.11, it has no list of its users.
    pub async fn start(inbound_tag: &str) -> io::Result<Self> {
        Self::start_with(inbound_tag, false).await
    }

    /// A node that also lists its users (`GetInboundUsers`, Xray-core 24.11 and later).
    pub async fn start_listing(inbound_tag: &str) -> io::Result<Self> {
        Self::start_with(inbound_tag, true).await
    }

    async fn start_with(inbound_tag: &str, lists_users: bool) -> io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (closing, mut closed) = watch::channel(false);
        let node = Arc::new(Node {
            inbound_tag: inbound_tag.to_owned(),
            lists_users,
            meter: Arc::new(Meter::new()),
            holds: Holds::default(),
            closing,
            state: Mutex::new(NodeState {
                users: BTreeMap::new(),
                counters: BTreeMap::new(),
                started: Instant::now(),
                uptime_offset: Duration::from_secs(3600),
            }),
            faults: Mutex::default(),
        });
        let service = Service(Arc::clone(&node));
        let server = tonic::transport::Server::builder()
            .add_service(HandlerServiceServer::new(service.clone()))
            .add_service(StatsServiceServer::new(service))
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener),
                async move {
                    let _ = closed.wait_for(|c| *c).await;
                },
            );
        tokio::spawn(async move {
            if let Err(e) = server.await {
                tracing::warn!(error = %e, "The fake gRPC node stopped.");
            }
        });
        Ok(Self { node, addr })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn api_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn inbound_tag(&self) -> &str {
        &self.node.inbound_tag
    }

    /// What a restart does to a real node: every user added over the API is gone, counters
    /// and uptime start at zero.
    pub fn restart(&self) {
        let mut state = self.node.state.lock();
        state.users.clear();
        state.counters.clear();
        state.started = Instant::now();
        state.uptime_offset = Duration::ZERO;
    }

    /// The users, email → uuid.
    pub fn users(&self) -> BTreeMap<String, String> {
        self.node.state.lock().users.clone()
    }

    /// Adds a user behind keyfleet's back (by hand, or left by another tool).
    pub fn add_user(&self, email: &str, uuid: &str) {
        self.node
            .state
            .lock()
            .users
            .insert(email.to_ascii_lowercase(), uuid.to_owned());
    }

    /// Removes a user behind keyfleet's back; whether it was there.
    pub fn remove_user(&self, email: &str) -> bool {
        self.node
            .state
            .lock()
            .users
            .remove(&email.to_ascii_lowercase())
            .is_some()
    }

    /// Counts traffic of a user, as the node does while it proxies (nothing for an unknown one).
    pub fn add_traffic(&self, email: &str, uplink: i64, downlink: i64) {
        let mut state = self.node.state.lock();
        let email = email.to_ascii_lowercase();
        if !state.users.contains_key(&email) {
            return;
        }
        for (dir, n) in [("uplink", uplink), ("downlink", downlink)] {
            *state
                .counters
                .entry(format!("user>>>{email}>>>traffic>>>{dir}"))
                .or_default() += n;
        }
    }

    /// The next call to `endpoint` fails with `fault` (faults queue in order).
    pub fn inject(&self, endpoint: Endpoint, fault: GrpcFault) {
        self.node.faults.lock().push_back((endpoint, fault));
    }

    /// Parks calls to `endpoint` right before they act, until released.
    pub fn hold(&self, endpoint: Endpoint) -> Hold {
        self.node.holds.add(endpoint)
    }

    pub fn meter(&self) -> MeterSnapshot {
        let users = self.node.state.lock().users.len() as u64;
        self.node.meter.snapshot(users)
    }
}

impl Drop for FakeGrpcNode {
    fn drop(&mut self) {
        self.node.closing.send_replace(true);
    }
}

#[derive(Clone)]
struct Service(Arc<Node>);

impl Node {
    fn take_fault(&self, endpoint: Endpoint) -> Option<GrpcFault> {
        let mut faults = self.faults.lock();
        let i = faults.iter().position(|(e, _)| *e == endpoint)?;
        faults.remove(i).map(|(_, f)| f)
    }

    /// Counts the call, applies its fault and holds, runs `act`, and records the answer.
    async fn call<T>(
        &self,
        endpoint: Endpoint,
        act: impl FnOnce(&Self) -> Result<T, Status>,
    ) -> Result<Response<T>, Status> {
        let mut visit = self.meter.arrive(endpoint);
        let fault = self.take_fault(endpoint);
        let result = match fault {
            Some(GrpcFault::Unavailable) => Err(Status::unavailable("fake: node restarting")),
            Some(GrpcFault::Internal) => Err(Status::internal("fake: internal error")),
            Some(GrpcFault::LostAfterCommit) | None => {
                self.holds.pass(endpoint, &self.closing).await;
                let acted = act(self);
                if fault.is_some() {
                    Err(Status::unavailable(
                        "fake: connection lost after the node acted",
                    ))
                } else {
                    acted
                }
            }
        };
        visit.answered(match &result {
            Ok(_) => 200,
            Err(s) if s.code() == tonic::Code::Unknown => 400,
            Err(_) => 503,
        });
        result.map(Response::new)
    }

    fn check_tag(&self, tag: &str) -> Result<(), Status> {
        if tag != self.inbound_tag {
            return Err(Status::unknown(format!(
                "app/proxyman/command: failed to get handler: {tag} > app/proxyman/inbound: handler not found: {tag}"
            )));
        }
        Ok(())
    }

    fn add(&self, op: AddUserOperation) -> Result<(), Status> {
        let user = op
            .user
            .ok_or_else(|| Status::unknown("fake: AddUserOperation without a user"))?;
        let account = user
            .account
            .ok_or_else(|| Status::unknown("fake: user without an account"))?;
        let id = match account.r#type.as_str() {
            "xray.proxy.vless.Account" => vless::Account::decode(account.value.as_slice())
                .map(|a| a.id)
                .map_err(|e| Status::unknown(format!("fake: bad vless account: {e}")))?,
            "xray.proxy.vmess.Account" => vmess::Account::decode(account.value.as_slice())
                .map(|a| a.id)
                .map_err(|e| Status::unknown(format!("fake: bad vmess account: {e}")))?,
            other => {
                return Err(Status::unknown(format!(
                    "fake: unknown account type {other}"
                )));
            }
        };
        if uuid::Uuid::parse_str(&id).is_err() {
            return Err(Status::unknown("proxy/vless: failed to parse ID"));
        }
        let mut state = self.state.lock();
        let email = user.email.to_ascii_lowercase();
        if state.users.contains_key(&email) {
            drop(state);
            self.meter.record(Outcome::Conflict);
            return Err(Status::unknown(format!(
                "app/proxyman/command: failed to add user > proxy/vless: User {} already exists.",
                user.email
            )));
        }
        state.users.insert(email, id);
        drop(state);
        self.meter.record(Outcome::Created);
        Ok(())
    }

    fn remove(&self, op: RemoveUserOperation) -> Result<(), Status> {
        let removed = self
            .state
            .lock()
            .users
            .remove(&op.email.to_ascii_lowercase())
            .is_some();
        if !removed {
            return Err(Status::unknown(format!(
                "app/proxyman/command: failed to remove user > proxy/vless: User {} not found.",
                op.email
            )));
        }
        self.meter.record(Outcome::Deleted);
        Ok(())
    }
}

#[tonic::async_trait]
impl HandlerService for Service {
    async fn alter_inbound(
        &self,
        request: Request<AlterInboundRequest>,
    ) -> Result<Response<AlterInboundResponse>, Status> {
        let request = request.into_inner();
        let op = request.operation.unwrap_or_default();
        match op.r#type.as_str() {
            "xray.app.proxyman.command.AddUserOperation" => {
                let add = AddUserOperation::decode(op.value.as_slice())
                    .map_err(|e| Status::unknown(format!("fake: {e}")))?;
                self.0
                    .call(Endpoint::AddUser, |node| {
                        node.check_tag(&request.tag)?;
                        node.add(add).map(|()| AlterInboundResponse {})
                    })
                    .await
            }
            "xray.app.proxyman.command.RemoveUserOperation" => {
                let remove = RemoveUserOperation::decode(op.value.as_slice())
                    .map_err(|e| Status::unknown(format!("fake: {e}")))?;
                self.0
                    .call(Endpoint::RemoveUser, |node| {
                        node.check_tag(&request.tag)?;
                        node.remove(remove).map(|()| AlterInboundResponse {})
                    })
                    .await
            }
            other => Err(Status::unknown(format!(
                "app/proxyman/command: unknown operation {other}"
            ))),
        }
    }

    async fn get_inbound_users(
        &self,
        request: Request<GetInboundUserRequest>,
    ) -> Result<Response<GetInboundUserResponse>, Status> {
        if !self.0.lists_users {
            return Err(Status::unimplemented(
                "unknown method GetInboundUsers for service xray.app.proxyman.command.HandlerService",
            ));
        }
        let request = request.into_inner();
        self.0
            .call(Endpoint::ListUsers, |node| {
                node.check_tag(&request.tag)?;
                let state = node.state.lock();
                let users = state
                    .users
                    .iter()
                    .filter(|(email, _)| request.email.is_empty() || **email == request.email)
                    .map(|(email, id)| User {
                        level: 0,
                        email: email.clone(),
                        account: Some(TypedMessage {
                            r#type: "xray.proxy.vless.Account".into(),
                            value: vless::Account {
                                id: id.clone(),
                                flow: String::new(),
                                encryption: "none".into(),
                            }
                            .encode_to_vec(),
                        }),
                    })
                    .collect();
                Ok(GetInboundUserResponse { users })
            })
            .await
    }
}

#[tonic::async_trait]
impl StatsService for Service {
    async fn query_stats(
        &self,
        request: Request<QueryStatsRequest>,
    ) -> Result<Response<QueryStatsResponse>, Status> {
        let request = request.into_inner();
        self.0
            .call(Endpoint::QueryStats, |node| {
                let mut state = node.state.lock();
                let mut stat = Vec::new();
                for (name, value) in state.counters.iter_mut() {
                    if name.contains(&request.pattern) {
                        stat.push(Stat {
                            name: name.clone(),
                            value: *value,
                        });
                        if request.reset {
                            *value = 0;
                        }
                    }
                }
                Ok(QueryStatsResponse { stat })
            })
            .await
    }

    async fn get_sys_stats(
        &self,
        _request: Request<SysStatsRequest>,
    ) -> Result<Response<SysStatsResponse>, Status> {
        self.0
            .call(Endpoint::SysStats, |node| {
                let state = node.state.lock();
                let uptime = state.started.elapsed() + state.uptime_offset;
                Ok(SysStatsResponse {
                    uptime: u32::try_from(uptime.as_secs()).unwrap_or(u32::MAX),
                    ..SysStatsResponse::default()
                })
            })
            .await
    }
}
