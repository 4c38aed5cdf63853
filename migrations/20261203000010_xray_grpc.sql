-- A third kind of server: an Xray-core or V2Ray node driven over its own gRPC API.
-- grpc:       its settings (inbound tag, API package, account protocol, link parameters), JSON.
-- key_secret: the secret its users' uuids are derived from (a credential, like api_key).
ALTER TABLE servers ADD COLUMN grpc JSONB;
ALTER TABLE servers ADD COLUMN key_secret TEXT CHECK (key_secret <> '');

ALTER TABLE servers DROP CONSTRAINT servers_kind_check;
ALTER TABLE servers ADD CONSTRAINT servers_kind_check
    CHECK (kind IN ('v2ray', 'outline', 'xray-grpc'));

ALTER TABLE servers DROP CONSTRAINT servers_credentials_match_kind;
ALTER TABLE servers ADD CONSTRAINT servers_credentials_match_kind CHECK (
    (kind = 'v2ray' AND api_key IS NOT NULL AND cert_sha256 IS NULL
        AND grpc IS NULL AND key_secret IS NULL)
    OR (kind = 'outline' AND cert_sha256 IS NOT NULL AND api_key IS NULL AND api_url ~ '^https://'
        AND grpc IS NULL AND key_secret IS NULL)
    OR (kind = 'xray-grpc' AND api_key IS NULL AND cert_sha256 IS NULL AND api_url ~ '^http://'
        AND jsonb_typeof(grpc) = 'object' AND key_secret IS NOT NULL)
);

-- xray-grpc: when the node last said it started (now − its uptime), at the last traffic reading.
-- A later start means its counters restarted at zero.
ALTER TABLE servers ADD COLUMN node_started_at TIMESTAMPTZ;
