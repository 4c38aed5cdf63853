use axum::http::Method;

/// One call of either API, as the meter counts and faults target them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Endpoint {
    // V2Ray panel
    CreateUser,
    ListUsers,
    GetLink,
    DeleteUser,
    Stats,
    // Outline
    ServerInfo,
    CreateKeyPost,
    CreateKeyPut,
    GetKey,
    ListKeys,
    DeleteKey,
    RenameKey,
    DataLimit,
    Transfer,
    // Xray/V2Ray node over gRPC
    /// `AlterInbound` with an `AddUserOperation`.
    AddUser,
    /// `AlterInbound` with a `RemoveUserOperation`.
    RemoveUser,
    QueryStats,
    SysStats,
    /// Any path or method neither API has, and every Outline request with a wrong prefix.
    Unknown,
}

impl Endpoint {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::CreateUser => "create_user",
            Self::ListUsers => "list_users",
            Self::GetLink => "get_link",
            Self::DeleteUser => "delete_user",
            Self::Stats => "stats",
            Self::ServerInfo => "server_info",
            Self::CreateKeyPost => "create_key_post",
            Self::CreateKeyPut => "create_key_put",
            Self::GetKey => "get_key",
            Self::ListKeys => "list_keys",
            Self::DeleteKey => "delete_key",
            Self::RenameKey => "rename_key",
            Self::DataLimit => "data_limit",
            Self::Transfer => "transfer",
            Self::AddUser => "add_user",
            Self::RemoveUser => "remove_user",
            Self::QueryStats => "query_stats",
            Self::SysStats => "sys_stats",
            Self::Unknown => "unknown",
        }
    }

    pub fn is_create(&self) -> bool {
        matches!(
            self,
            Self::CreateUser | Self::CreateKeyPost | Self::CreateKeyPut | Self::AddUser
        )
    }

    /// Endpoints that change server state; only these get the probabilistic "after commit" faults.
    pub fn is_mutating(&self) -> bool {
        self.is_create()
            || matches!(
                self,
                Self::DeleteUser
                    | Self::DeleteKey
                    | Self::RenameKey
                    | Self::DataLimit
                    | Self::RemoveUser
            )
    }
}

/// A routed request: which endpoint, and the id in its path if it has one.
#[derive(Clone, Debug)]
pub(crate) struct Call {
    pub endpoint: Endpoint,
    pub id: String,
    pub method: Method,
}

impl Call {
    pub fn new(endpoint: Endpoint, id: &str, method: &Method) -> Self {
        Self {
            endpoint,
            id: id.to_owned(),
            method: method.clone(),
        }
    }
}

/// Path segments without the leading slash; a trailing slash is ignored.
pub(crate) fn segments(path: &str) -> Vec<&str> {
    let path = path.strip_prefix('/').unwrap_or(path);
    let path = path.strip_suffix('/').unwrap_or(path);
    if path.is_empty() {
        Vec::new()
    } else {
        path.split('/').collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serialises_as_its_name() {
        for e in [
            Endpoint::CreateUser,
            Endpoint::CreateKeyPut,
            Endpoint::Unknown,
        ] {
            assert_eq!(serde_json::to_value(e).unwrap(), e.as_str());
        }
        assert_eq!(segments("/api/users/"), ["api", "users"]);
        assert!(segments("/").is_empty());
    }
}
