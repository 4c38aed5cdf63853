-- Desired and observed state of keyfleet: the servers, the subscriptions, and one key per
-- subscription x server. Postgres holds the intent; Redis only carries work.

CREATE TABLE servers (
    id                BIGSERIAL PRIMARY KEY,
    name              TEXT NOT NULL UNIQUE
                      CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$'),
    kind              TEXT NOT NULL CHECK (kind IN ('v2ray', 'outline')),
    api_url           TEXT NOT NULL CHECK (api_url ~ '^https?://[^/?#]+'),
    api_key           TEXT CHECK (api_key <> ''),
    cert_sha256       TEXT CHECK (cert_sha256 ~ '^[0-9A-F]{64}$'),
    max_in_flight     INTEGER NOT NULL DEFAULT 4 CHECK (max_in_flight BETWEEN 1 AND 1000),
    active            BOOLEAN NOT NULL DEFAULT TRUE,
    -- Bumped when every link on the server changes (e.g. a Reality key rotation).
    config_generation BIGINT NOT NULL DEFAULT 1,
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT servers_credentials_match_kind CHECK (
        (kind = 'v2ray' AND api_key IS NOT NULL AND cert_sha256 IS NULL)
        OR (kind = 'outline' AND cert_sha256 IS NOT NULL AND api_key IS NULL AND api_url ~ '^https://')
    )
);

CREATE TABLE subscriptions (
    id         TEXT PRIMARY KEY CHECK (id ~ '^[a-z0-9_-]{1,64}$'),
    expires_at TIMESTAMPTZ,
    status     TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'expired', 'cancelled')),
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- state: pending (create queued) -> active (exists on the server, link stored)
--        -> deleting -> deleted; failed = its last job was dead-lettered (see last_error).
CREATE TABLE keys (
    subscription_id   TEXT NOT NULL REFERENCES subscriptions (id) ON DELETE CASCADE,
    server_id         BIGINT NOT NULL REFERENCES servers (id) ON DELETE CASCADE,
    state             TEXT NOT NULL DEFAULT 'pending'
                      CHECK (state IN ('pending', 'active', 'deleting', 'deleted', 'failed')),
    server_key_id     TEXT,
    link              TEXT,
    config_synced_at  TIMESTAMPTZ,
    config_generation BIGINT,
    last_error        TEXT,
    -- Fence token of the newest job attempt that wrote this row: an older attempt cannot overwrite it.
    fence             BIGINT NOT NULL DEFAULT 0,
    enqueued_at       TIMESTAMPTZ,
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (subscription_id, server_id),
    CONSTRAINT keys_active_has_link CHECK (
        state <> 'active' OR (server_key_id IS NOT NULL AND link IS NOT NULL AND config_synced_at IS NOT NULL)
    )
);

CREATE UNIQUE INDEX keys_server_key_id_unique ON keys (server_id, server_key_id) WHERE server_key_id IS NOT NULL;
CREATE INDEX keys_server_state ON keys (server_id, state);
