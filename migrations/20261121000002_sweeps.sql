-- Deletion, traffic accounting and once-per-tick sweeps.

ALTER TABLE keys
    ADD COLUMN deleted_at TIMESTAMPTZ,
    -- Cumulative bytes (V2Ray): only ever grows; a counter reset on the server is detected by
    -- traffic_last_raw going down and the new reading is added rather than subtracted.
    ADD COLUMN traffic_bytes BIGINT NOT NULL DEFAULT 0 CHECK (traffic_bytes >= 0),
    ADD COLUMN traffic_last_raw BIGINT,
    -- Outline reports a rolling 30-day figure that can go down: stored as reported, never summed.
    ADD COLUMN traffic_window_bytes BIGINT,
    ADD COLUMN traffic_updated_at TIMESTAMPTZ;

-- Fence of the newest traffic collection applied: a stalled collector cannot apply an old reading.
ALTER TABLE servers ADD COLUMN traffic_fence BIGINT NOT NULL DEFAULT 0;

CREATE INDEX keys_active_config ON keys (server_id, config_synced_at) WHERE state = 'active';
CREATE INDEX subscriptions_expiry ON subscriptions (expires_at) WHERE status = 'active';

-- One row per sweep per scheduled tick: the primary key is the claim, so any number of scheduler
-- replicas fire each tick exactly once.
CREATE TABLE sweep_ticks (
    sweep    TEXT NOT NULL,
    tick_at  TIMESTAMPTZ NOT NULL,
    fired_by TEXT NOT NULL,
    fired_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (sweep, tick_at)
);
