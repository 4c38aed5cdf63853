//! The few protobuf messages and services of the Xray-core / V2Ray gRPC API keyfleet uses
//! (`proto/xray`, written from the public definitions: field numbers and types only), compiled
//! at build time. One compile for both sides: `keyfleet-vpn`'s client sends these messages
//! (choosing the package of the service path at run time, `xray.` or `v2ray.core.`), and
//! `keyfleet-fakevpn`'s fake node serves the generated Xray-core services.
//!
//! Invariant: nothing but generated code; no I/O.

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod xray {
    pub mod common {
        pub mod serial {
            include!(concat!(env!("OUT_DIR"), "/xray.common.serial.rs"));
        }
        pub mod protocol {
            include!(concat!(env!("OUT_DIR"), "/xray.common.protocol.rs"));
        }
    }
    pub mod proxy {
        pub mod vless {
            include!(concat!(env!("OUT_DIR"), "/xray.proxy.vless.rs"));
        }
        pub mod vmess {
            include!(concat!(env!("OUT_DIR"), "/xray.proxy.vmess.rs"));
        }
    }
    pub mod app {
        pub mod proxyman {
            pub mod command {
                include!(concat!(env!("OUT_DIR"), "/xray.app.proxyman.command.rs"));
            }
        }
        pub mod stats {
            pub mod command {
                include!(concat!(env!("OUT_DIR"), "/xray.app.stats.command.rs"));
            }
        }
    }
}
