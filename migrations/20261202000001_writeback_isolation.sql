-- Write-back isolation: server ids handed out again, and failures that may pass.

-- A key whose job was dead-lettered after its attempts ran out on transient errors (connect, timeout,
-- 5xx, 429) may succeed later: `Store::requeue_failed_keys` puts those back to pending. Set by the
-- `Failed` write, cleared by every other write and by the requeue; only meaningful in state 'failed'.
ALTER TABLE keys ADD COLUMN failed_transiently BOOLEAN NOT NULL DEFAULT false;

-- Outline < 1.8 hands ids out again after a wipe, so an id is unique among a server's live keys only.
-- A deleted key is gone from its server: its id means nothing any more, and the `Deleted` write now
-- clears it. Clear it on the rows deleted before, so a re-provision (deleted -> pending) never brings
-- back an id the server may have given to another key, and traffic readings never land on them.
UPDATE keys SET server_key_id = NULL WHERE state = 'deleted' AND server_key_id IS NOT NULL;

DROP INDEX keys_server_key_id_unique;
CREATE UNIQUE INDEX keys_server_key_id_unique ON keys (server_id, server_key_id)
    WHERE server_key_id IS NOT NULL AND state <> 'deleted';
