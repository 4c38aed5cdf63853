use std::sync::OnceLock;

use redis::Script;

/// The queue's Lua scripts, each prefixed with the shared helpers in `lua/common.lua` (and the
/// claim and finish with the claim itself, `lua/claim_next.lua`).
pub(crate) struct Scripts {
    pub enqueue: Script,
    pub claim: Script,
    pub finish: Script,
    pub heartbeat: Script,
    pub reap: Script,
    pub set_limit: Script,
    pub replay: Script,
    pub cancel: Script,
    pub init: Script,
    pub probe_result: Script,
    pub trim_dead: Script,
    pub discard: Script,
    pub server_stats: Script,
    pub hold: Script,
    pub purge: Script,
}

macro_rules! script {
    ($($file:literal),+) => {
        Script::new(concat!(
            include_str!("lua/common.lua"),
            $("\n", include_str!(concat!("lua/", $file))),+
        ))
    };
}

impl Scripts {
    pub fn get() -> &'static Self {
        static SCRIPTS: OnceLock<Scripts> = OnceLock::new();
        SCRIPTS.get_or_init(|| Self {
            enqueue: script!("enqueue.lua"),
            claim: script!("claim_next.lua", "claim.lua"),
            finish: script!("claim_next.lua", "finish.lua"),
            heartbeat: script!("heartbeat.lua"),
            reap: script!("reap.lua"),
            set_limit: script!("set_limit.lua"),
            replay: script!("replay.lua"),
            cancel: script!("cancel.lua"),
            init: script!("init.lua"),
            probe_result: script!("probe_result.lua"),
            trim_dead: script!("trim_dead.lua"),
            discard: script!("discard.lua"),
            server_stats: script!("server_stats.lua"),
            hold: script!("hold.lua"),
            purge: script!("purge.lua"),
        })
    }
}
