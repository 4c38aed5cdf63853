//! The settings of an `xray-grpc` server (an Xray-core or V2Ray node's own gRPC API): the inbound
//! users are added to, the API package, and the parameters of every client link. The CLI's
//! flags and the API's `grpc` object are this one struct; its errors name the field.

use std::net::Ipv6Addr;

use keyfleet_vpn::{AccountKind, GrpcApi, GrpcSettings, LinkParams, LinkSecurity};
use serde::Deserialize;
use utoipa::ToSchema;

use super::{InvalidServer, invalid};

/// `server add --kind xray-grpc` input, as given (validated by [`validate_grpc`]).
#[derive(Debug, Clone, Default, clap::Args, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GrpcInput {
    /// xray-grpc: the tag of the inbound users are added to.
    #[arg(long)]
    pub inbound_tag: Option<String>,
    /// xray-grpc: the API's package, `xray` (Xray-core) or `v2ray` (V2Ray/v2fly); detected on
    /// first use when absent.
    #[arg(long)]
    pub grpc_api: Option<String>,
    /// xray-grpc: the inbound's protocol, `vless` (default) or `vmess`.
    #[arg(long)]
    pub protocol: Option<String>,
    /// xray-grpc: the host or IP clients connect to (the link's address).
    #[arg(long)]
    pub link_address: Option<String>,
    /// xray-grpc: the port clients connect to.
    #[arg(long)]
    pub link_port: Option<u32>,
    /// xray-grpc: `none` (default), `tls` or `reality`.
    #[arg(long)]
    pub link_security: Option<String>,
    /// xray-grpc: the transport, `tcp` (default), `ws`, `grpc`, `httpupgrade`, `xhttp`, ...
    #[arg(long)]
    pub link_network: Option<String>,
    /// xray-grpc, tls/reality: the server name clients send.
    #[arg(long)]
    pub link_sni: Option<String>,
    /// xray-grpc, tls/reality: the uTLS fingerprint (`chrome`, `firefox`, ...).
    #[arg(long)]
    pub link_fingerprint: Option<String>,
    /// xray-grpc, tls: ALPN, comma-separated.
    #[arg(long)]
    pub link_alpn: Option<String>,
    /// xray-grpc, reality (required): the server's public key (`pbk`).
    #[arg(long)]
    pub link_public_key: Option<String>,
    /// xray-grpc, reality: the short id (`sid`), 0-16 hex digits.
    #[arg(long)]
    pub link_short_id: Option<String>,
    /// xray-grpc, reality: the spider path (`spx`).
    #[arg(long)]
    pub link_spider_x: Option<String>,
    /// xray-grpc, vless over tls/reality: the flow, e.g. `xtls-rprx-vision`.
    #[arg(long)]
    pub link_flow: Option<String>,
    /// xray-grpc, ws/httpupgrade/xhttp: the path.
    #[arg(long)]
    pub link_path: Option<String>,
    /// xray-grpc, ws/httpupgrade/xhttp: the Host header.
    #[arg(long)]
    pub link_host: Option<String>,
    /// xray-grpc, grpc transport: the service name.
    #[arg(long)]
    pub link_service_name: Option<String>,
    /// xray-grpc: the label clients show (the `#` part); the server's name by default.
    #[arg(long)]
    pub link_remark: Option<String>,
}

const NETWORKS: [&str; 9] = [
    "tcp",
    "raw",
    "ws",
    "grpc",
    "httpupgrade",
    "xhttp",
    "splithttp",
    "kcp",
    "h2",
];
const FLOWS: [&str; 2] = ["xtls-rprx-vision", "xtls-rprx-vision-udp443"];

impl GrpcInput {
    /// Whether any field is given (a non-gRPC server must give none).
    pub fn is_empty(&self) -> bool {
        self.first_given().is_none()
    }

    fn first_given(&self) -> Option<&'static str> {
        let fields: [(&'static str, bool); 18] = [
            ("inbound_tag", self.inbound_tag.is_some()),
            ("grpc_api", self.grpc_api.is_some()),
            ("protocol", self.protocol.is_some()),
            ("link_address", self.link_address.is_some()),
            ("link_port", self.link_port.is_some()),
            ("link_security", self.link_security.is_some()),
            ("link_network", self.link_network.is_some()),
            ("link_sni", self.link_sni.is_some()),
            ("link_fingerprint", self.link_fingerprint.is_some()),
            ("link_alpn", self.link_alpn.is_some()),
            ("link_public_key", self.link_public_key.is_some()),
            ("link_short_id", self.link_short_id.is_some()),
            ("link_spider_x", self.link_spider_x.is_some()),
            ("link_flow", self.link_flow.is_some()),
            ("link_path", self.link_path.is_some()),
            ("link_host", self.link_host.is_some()),
            ("link_service_name", self.link_service_name.is_some()),
            ("link_remark", self.link_remark.is_some()),
        ];
        fields.into_iter().find(|(_, given)| *given).map(|(f, _)| f)
    }
}

/// Rejects gRPC settings on a server of another kind.
pub fn reject_grpc_input(input: Option<&GrpcInput>, kind: &str) -> Result<(), InvalidServer> {
    match input.and_then(GrpcInput::first_given) {
        Some(field) => Err(invalid(
            field,
            format!("only for xray-grpc servers, not {kind}"),
        )),
        None => Ok(()),
    }
}

/// Text of a setting: trimmed, 1-`max` characters, no control characters.
fn text(field: &'static str, value: &str, max: usize) -> Result<String, InvalidServer> {
    let value = value.trim();
    if value.is_empty() || value.chars().count() > max || value.chars().any(char::is_control) {
        return Err(invalid(
            field,
            format!("must be 1-{max} characters without control characters"),
        ));
    }
    Ok(value.to_owned())
}

fn optional(
    field: &'static str,
    value: Option<&String>,
    max: usize,
) -> Result<Option<String>, InvalidServer> {
    value.map(|v| text(field, v, max)).transpose()
}

fn host(field: &'static str, value: &str) -> Result<String, InvalidServer> {
    let value = text(field, value, 253)?;
    if value.parse::<Ipv6Addr>().is_ok() {
        return Ok(value);
    }
    match url::Host::parse(&value) {
        Ok(_) if !value.contains(['/', '?', '#', '@', ':', ' ']) => Ok(value),
        _ => Err(invalid(
            field,
            format!("{value:?} is not a host name or an IP address"),
        )),
    }
}

/// Checks the settings of an xray-grpc server; every error names its field.
pub fn validate_grpc(input: &GrpcInput) -> Result<GrpcSettings, InvalidServer> {
    let inbound_tag = text(
        "inbound_tag",
        input
            .inbound_tag
            .as_deref()
            .ok_or_else(|| invalid("inbound_tag", "required for an xray-grpc server"))?,
        255,
    )?;
    let api = input
        .grpc_api
        .as_deref()
        .map(|a| {
            a.trim()
                .parse::<GrpcApi>()
                .map_err(|e| invalid("grpc_api", e))
        })
        .transpose()?;
    let protocol = match input.protocol.as_deref().map(str::trim) {
        None | Some("vless") => AccountKind::Vless,
        Some("vmess") => AccountKind::Vmess,
        Some(other) => {
            return Err(invalid(
                "protocol",
                format!("{other:?} is not one of \"vless\", \"vmess\""),
            ));
        }
    };
    let address = host(
        "link_address",
        input
            .link_address
            .as_deref()
            .ok_or_else(|| invalid("link_address", "required for an xray-grpc server"))?,
    )?;
    let port = match input.link_port {
        None => return Err(invalid("link_port", "required for an xray-grpc server")),
        Some(p) => u16::try_from(p)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| invalid("link_port", format!("{p} is out of range: use 1..=65535")))?,
    };
    let security = match input.link_security.as_deref().map(str::trim) {
        None | Some("none") => LinkSecurity::None,
        Some("tls") => LinkSecurity::Tls,
        Some("reality") => LinkSecurity::Reality,
        Some(other) => {
            return Err(invalid(
                "link_security",
                format!("{other:?} is not one of \"none\", \"tls\", \"reality\""),
            ));
        }
    };
    let network = match input.link_network.as_deref().map(str::trim) {
        None => "tcp".to_owned(),
        Some(n) if NETWORKS.contains(&n) => n.to_owned(),
        Some(other) => {
            return Err(invalid(
                "link_network",
                format!("{other:?} is not one of {}", NETWORKS.join(", ")),
            ));
        }
    };
    let sni = input
        .link_sni
        .as_deref()
        .map(|s| host("link_sni", s))
        .transpose()?;
    let fingerprint = optional("link_fingerprint", input.link_fingerprint.as_ref(), 32)?;
    let alpn = optional("link_alpn", input.link_alpn.as_ref(), 64)?;
    let public_key = optional("link_public_key", input.link_public_key.as_ref(), 64)?;
    let short_id = optional("link_short_id", input.link_short_id.as_ref(), 16)?;
    let spider_x = optional("link_spider_x", input.link_spider_x.as_ref(), 255)?;
    let flow = optional("link_flow", input.link_flow.as_ref(), 32)?;
    let path = optional("link_path", input.link_path.as_ref(), 255)?;
    let link_host = input
        .link_host
        .as_deref()
        .map(|h| host("link_host", h))
        .transpose()?;
    let service_name = optional("link_service_name", input.link_service_name.as_ref(), 255)?;
    let remark = optional("link_remark", input.link_remark.as_ref(), 64)?;

    let only_with = |field: &'static str, given: bool, ok: bool, what: &str| {
        if given && !ok {
            Err(invalid(field, format!("only with {what}")))
        } else {
            Ok(())
        }
    };
    let secure = security != LinkSecurity::None;
    let reality = security == LinkSecurity::Reality;
    only_with(
        "link_sni",
        sni.is_some(),
        secure,
        "--link-security tls or reality",
    )?;
    only_with(
        "link_fingerprint",
        fingerprint.is_some(),
        secure,
        "--link-security tls or reality",
    )?;
    only_with(
        "link_alpn",
        alpn.is_some(),
        security == LinkSecurity::Tls,
        "--link-security tls",
    )?;
    only_with(
        "link_public_key",
        public_key.is_some(),
        reality,
        "--link-security reality",
    )?;
    only_with(
        "link_short_id",
        short_id.is_some(),
        reality,
        "--link-security reality",
    )?;
    only_with(
        "link_spider_x",
        spider_x.is_some(),
        reality,
        "--link-security reality",
    )?;
    only_with(
        "link_flow",
        flow.is_some(),
        protocol == AccountKind::Vless && secure,
        "--protocol vless over tls or reality",
    )?;
    let http_like = matches!(
        network.as_str(),
        "ws" | "httpupgrade" | "xhttp" | "splithttp" | "h2"
    );
    only_with(
        "link_path",
        path.is_some(),
        http_like,
        "--link-network ws, httpupgrade, xhttp or h2",
    )?;
    only_with(
        "link_host",
        link_host.is_some(),
        http_like,
        "--link-network ws, httpupgrade, xhttp or h2",
    )?;
    only_with(
        "link_service_name",
        service_name.is_some(),
        network == "grpc",
        "--link-network grpc",
    )?;
    if reality {
        let key = public_key
            .as_deref()
            .ok_or_else(|| invalid("link_public_key", "required with --link-security reality"))?;
        let valid = key.len() == 43
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !valid {
            return Err(invalid(
                "link_public_key",
                "must be the 43-character base64url X25519 public key (xray x25519)",
            ));
        }
        if sni.is_none() {
            return Err(invalid("link_sni", "required with --link-security reality"));
        }
        if protocol == AccountKind::Vmess {
            return Err(invalid("link_security", "reality needs --protocol vless"));
        }
    }
    if let Some(sid) = &short_id
        && (sid.len() % 2 != 0 || !sid.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return Err(invalid(
            "link_short_id",
            "must be an even number (0-16) of hex digits",
        ));
    }
    if let Some(f) = &flow
        && !FLOWS.contains(&f.as_str())
    {
        return Err(invalid(
            "link_flow",
            format!("{f:?} is not one of {}", FLOWS.join(", ")),
        ));
    }
    if let Some(p) = &path
        && !p.starts_with('/')
    {
        return Err(invalid("link_path", "must start with '/'"));
    }
    Ok(GrpcSettings {
        inbound_tag,
        api,
        protocol,
        link: LinkParams {
            address,
            port,
            security,
            network,
            sni,
            fingerprint,
            alpn,
            public_key,
            short_id,
            spider_x,
            flow,
            path,
            host: link_host,
            service_name,
            remark,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reality() -> GrpcInput {
        GrpcInput {
            inbound_tag: Some("vless-in".into()),
            link_address: Some("vpn.example.net".into()),
            link_port: Some(443),
            link_security: Some("reality".into()),
            link_sni: Some("www.example.com".into()),
            link_public_key: Some("A".repeat(43)),
            link_short_id: Some("ab12".into()),
            link_flow: Some("xtls-rprx-vision".into()),
            ..GrpcInput::default()
        }
    }

    fn field(input: GrpcInput) -> String {
        validate_grpc(&input).unwrap_err().to_string()
    }

    #[test]
    fn valid_reality_settings() {
        let s = validate_grpc(&reality()).unwrap();
        assert_eq!(s.protocol, AccountKind::Vless);
        assert_eq!(s.link.network, "tcp");
        assert_eq!(s.api, None);
    }

    #[test]
    fn each_bad_field_is_named() {
        let e = field(GrpcInput {
            inbound_tag: None,
            ..reality()
        });
        assert!(e.contains("--inbound-tag") && e.contains("required"), "{e}");
        assert!(
            field(GrpcInput {
                link_port: Some(70000),
                ..reality()
            })
            .contains("--link-port")
        );
        assert!(
            field(GrpcInput {
                link_port: None,
                ..reality()
            })
            .contains("--link-port")
        );
        assert!(
            field(GrpcInput {
                link_address: Some("a b/c".into()),
                ..reality()
            })
            .contains("--link-address")
        );
        assert!(
            field(GrpcInput {
                link_public_key: None,
                ..reality()
            })
            .contains("--link-public-key")
        );
        assert!(
            field(GrpcInput {
                link_public_key: Some("short".into()),
                ..reality()
            })
            .contains("--link-public-key")
        );
        assert!(
            field(GrpcInput {
                link_short_id: Some("xyz".into()),
                ..reality()
            })
            .contains("--link-short-id")
        );
        assert!(
            field(GrpcInput {
                link_flow: Some("bogus".into()),
                ..reality()
            })
            .contains("--link-flow")
        );
        assert!(
            field(GrpcInput {
                grpc_api: Some("clash".into()),
                ..reality()
            })
            .contains("--grpc-api")
        );
        assert!(
            field(GrpcInput {
                protocol: Some("trojan".into()),
                ..reality()
            })
            .contains("--protocol")
        );
        assert!(
            field(GrpcInput {
                link_network: Some("carrier-pigeon".into()),
                ..reality()
            })
            .contains("--link-network")
        );
        assert!(
            field(GrpcInput {
                link_path: Some("/ws".into()),
                ..reality()
            })
            .contains("--link-path")
        );
        let e = field(GrpcInput {
            link_security: None,
            ..reality()
        });
        assert!(
            e.contains("--link-sni") && e.contains("tls or reality"),
            "{e}"
        );
        assert!(
            field(GrpcInput {
                inbound_tag: Some("a\nb".into()),
                ..reality()
            })
            .contains("--inbound-tag")
        );
    }

    #[test]
    fn other_kinds_take_no_grpc_settings() {
        let e = reject_grpc_input(Some(&reality()), "v2ray")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--inbound-tag") && e.contains("only for xray-grpc"),
            "{e}"
        );
        assert!(reject_grpc_input(Some(&GrpcInput::default()), "v2ray").is_ok());
        assert!(GrpcInput::default().is_empty());
    }
}
