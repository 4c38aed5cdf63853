-- The HTTP API: bearer tokens, idempotent provision receipts, subscription owners, operator
-- pauses, server revisions (running workers rebuild a server's client when it changes), and a
-- notification when a subscription's keys change (provision calls wait on it, they never poll).

CREATE TABLE api_tokens (
    id           BIGSERIAL PRIMARY KEY,
    name         TEXT NOT NULL CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$'),
    role         TEXT NOT NULL CHECK (role IN ('producer', 'admin', 'viewer')),
    -- SHA-256 of the token: the token itself is shown once, at creation, and never stored.
    token_sha256 BYTEA NOT NULL UNIQUE CHECK (length(token_sha256) = 32),
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_used_at TIMESTAMPTZ,
    revoked_at   TIMESTAMPTZ
);

-- A provision call's receipt, per producer and Idempotency-Key: a repeat returns it unchanged.
CREATE TABLE provision_receipts (
    producer        TEXT NOT NULL,
    idempotency_key TEXT NOT NULL CHECK (length(idempotency_key) BETWEEN 1 AND 255),
    -- SHA-256 of the canonical request (subscription and body): a different request with the
    -- same key is refused.
    request_sha256  BYTEA NOT NULL,
    subscription_id TEXT NOT NULL,
    receipt         JSONB NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (producer, idempotency_key)
);
CREATE INDEX provision_receipts_created_at ON provision_receipts (created_at);

-- The producer (token name) that first provisioned a subscription through the API; NULL when it
-- came from the CLI or before the API existed.
ALTER TABLE subscriptions ADD COLUMN owner TEXT;

ALTER TABLE servers
    ADD COLUMN paused   BOOLEAN NOT NULL DEFAULT FALSE,
    ADD COLUMN revision BIGINT NOT NULL DEFAULT 1;

-- One notification per subscription whose keys a statement changed, delivered at commit.
CREATE FUNCTION keyfleet_notify_keys() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('keyfleet_keys', s.subscription_id)
    FROM (SELECT DISTINCT subscription_id FROM changed) s;
    RETURN NULL;
END
$$;

CREATE TRIGGER keys_notify_insert AFTER INSERT ON keys
    REFERENCING NEW TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION keyfleet_notify_keys();
CREATE TRIGGER keys_notify_update AFTER UPDATE ON keys
    REFERENCING NEW TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION keyfleet_notify_keys();
