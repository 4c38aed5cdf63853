-- What each scheduled sweep tick found and enqueued, written in the transaction that commits the
-- tick (the dashboard's Sweeps page). NULL on ticks fired before this migration.
ALTER TABLE sweep_ticks
    -- Server name -> jobs the sweep found to do there.
    ADD COLUMN jobs        JSONB,
    -- Of those, how many were new (the rest were already queued).
    ADD COLUMN enqueued    INTEGER CHECK (enqueued >= 0),
    -- Not-yet-started jobs cancelled because their key is being deleted.
    ADD COLUMN cancelled   BIGINT CHECK (cancelled >= 0),
    ADD COLUMN duration_ms INTEGER CHECK (duration_ms >= 0);

CREATE INDEX sweep_ticks_recent ON sweep_ticks (sweep, fired_at DESC);
