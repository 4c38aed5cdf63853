-- A batch of job results written in one call (`Store::write_keys`): one round trip to Postgres,
-- and one transaction when called on its own, instead of BEGIN, one statement per kind of result
-- and COMMIT. A purchase's last keys wait for this write.
--
-- Element i of the arrays is one result: the statement that writes it (0 created, 1 failed,
-- 2 deleted, 3 config synced, 4 lost), its round (creates that claim the same server key id run
-- oldest fence first), its key, the fence of the attempt that produced it, and its values a, b, n
-- (`KeyWrite::columns`). The statements run grouped by statement and round, in that order.
--
-- Every statement checks the fence (a result of an older attempt than the row's is not applied)
-- and that the key is in a state the result may apply to (a create never resurrects a key being
-- deleted). A delete clears the key's server id: the key is gone, and a server may hand the id out
-- again (Outline < 1.8 after a wipe). Every write but a failure clears `failed_transiently`.
--
-- Returns one row per result not applied (idx counts from 0), with its row's fence and state after
-- the batch; both NULL when the row is gone.
--
-- Its statements use generic plans: a custom plan for each call's arrays cost more to make than to
-- run (0.45 ms of a 1 ms call for one result), and the generic plan (index lookups per result)
-- is the right one for a batch of any size.
CREATE FUNCTION keyfleet_write_keys(
    p_statement int[], p_round int[], p_subscription_id text[], p_server_id bigint[],
    p_fence bigint[], p_a text[], p_b text[], p_n bigint[])
RETURNS TABLE (idx int, row_fence bigint, row_state text)
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    g record;
    applied int[] := '{}';
    written int[];
BEGIN
    FOR g IN
        SELECT t.statement,
               array_agg(t.i::int - 1) AS idx, array_agg(t.subscription_id) AS subscription_id,
               array_agg(t.server_id) AS server_id, array_agg(t.fence) AS fence,
               array_agg(t.a) AS a, array_agg(t.b) AS b, array_agg(t.n) AS n
        FROM unnest(p_statement, p_round, p_subscription_id, p_server_id, p_fence, p_a, p_b, p_n)
             WITH ORDINALITY AS t(statement, round, subscription_id, server_id, fence, a, b, n, i)
        GROUP BY t.statement, t.round
        ORDER BY t.statement, t.round
    LOOP
        IF g.statement = 0 THEN
            -- Before the creates: a server that hands out an id again (Outline < 1.8 after a wipe)
            -- has lost the key another live row of that server still records under it. A create
            -- that applies takes the id from such a row if an older attempt wrote that row (its
            -- fence is lower): the row goes back to pending with its id, link and sync time
            -- cleared, so reconcile creates it again; a row being deleted stays deleting (its key
            -- is gone already, and its delete must not remove the new key by that id).
            UPDATE keys d
            SET state = CASE WHEN d.state = 'deleting' THEN 'deleting' ELSE 'pending' END,
                server_key_id = NULL, link = NULL, config_synced_at = NULL,
                failed_transiently = false,
                last_error = CASE WHEN d.state = 'deleting'
                    THEN 'the server reassigned this key''s id to another key: the key is gone'
                    ELSE 'the server reassigned this key''s id to another key: to be created again'
                    END,
                updated_at = now()
            FROM unnest(g.idx, g.subscription_id, g.server_id, g.fence, g.a, g.b, g.n)
                     AS u(idx, subscription_id, server_id, fence, a, b, n)
                 JOIN keys k ON k.subscription_id = u.subscription_id AND k.server_id = u.server_id
            WHERE k.fence <= u.fence AND k.state IN ('pending', 'active', 'failed')
              AND d.server_id = u.server_id AND d.server_key_id = u.a
              AND d.subscription_id <> u.subscription_id
              AND d.state <> 'deleted' AND d.fence < u.fence;

            WITH w AS (
                UPDATE keys k
                SET state = 'active', server_key_id = u.a, link = u.b, config_synced_at = now(),
                    config_generation = s.config_generation, last_error = NULL,
                    failed_transiently = false, fence = u.fence, updated_at = now()
                FROM unnest(g.idx, g.subscription_id, g.server_id, g.fence, g.a, g.b, g.n)
                         AS u(idx, subscription_id, server_id, fence, a, b, n),
                     servers s
                WHERE k.subscription_id = u.subscription_id AND k.server_id = u.server_id
                  AND k.fence <= u.fence AND s.id = u.server_id
                  AND k.state IN ('pending', 'active', 'failed')
                RETURNING u.idx)
            SELECT array_agg(w.idx) INTO written FROM w;
        ELSIF g.statement = 1 THEN
            WITH w AS (
                UPDATE keys k
                SET state = 'failed', last_error = u.a, failed_transiently = u.n <> 0,
                    fence = u.fence, updated_at = now()
                FROM unnest(g.idx, g.subscription_id, g.server_id, g.fence, g.a, g.b, g.n)
                         AS u(idx, subscription_id, server_id, fence, a, b, n)
                WHERE k.subscription_id = u.subscription_id AND k.server_id = u.server_id
                  AND k.fence <= u.fence AND k.state IN ('pending', 'failed')
                RETURNING u.idx)
            SELECT array_agg(w.idx) INTO written FROM w;
        ELSIF g.statement = 2 THEN
            WITH w AS (
                UPDATE keys k
                SET state = 'deleted', server_key_id = NULL, link = NULL, config_synced_at = NULL,
                    deleted_at = now(), last_error = NULL, failed_transiently = false,
                    fence = u.fence, updated_at = now()
                FROM unnest(g.idx, g.subscription_id, g.server_id, g.fence, g.a, g.b, g.n)
                         AS u(idx, subscription_id, server_id, fence, a, b, n)
                WHERE k.subscription_id = u.subscription_id AND k.server_id = u.server_id
                  AND k.fence <= u.fence AND k.state IN ('deleting', 'deleted')
                RETURNING u.idx)
            SELECT array_agg(w.idx) INTO written FROM w;
        ELSIF g.statement = 3 THEN
            WITH w AS (
                UPDATE keys k
                SET link = u.a, config_synced_at = now(), config_generation = u.n,
                    fence = u.fence, updated_at = now()
                FROM unnest(g.idx, g.subscription_id, g.server_id, g.fence, g.a, g.b, g.n)
                         AS u(idx, subscription_id, server_id, fence, a, b, n)
                WHERE k.subscription_id = u.subscription_id AND k.server_id = u.server_id
                  AND k.fence <= u.fence AND k.state = 'active'
                RETURNING u.idx)
            SELECT array_agg(w.idx) INTO written FROM w;
        ELSIF g.statement = 4 THEN
            WITH w AS (
                UPDATE keys k
                SET state = 'pending', server_key_id = NULL, link = NULL, config_synced_at = NULL,
                    last_error = 'missing on the server at reconcile', failed_transiently = false,
                    fence = u.fence, updated_at = now()
                FROM unnest(g.idx, g.subscription_id, g.server_id, g.fence, g.a, g.b, g.n)
                         AS u(idx, subscription_id, server_id, fence, a, b, n)
                WHERE k.subscription_id = u.subscription_id AND k.server_id = u.server_id
                  AND k.fence <= u.fence AND k.state = 'active'
                RETURNING u.idx)
            SELECT array_agg(w.idx) INTO written FROM w;
        ELSE
            RAISE EXCEPTION 'keyfleet_write_keys: unknown statement % for result %',
                g.statement, g.idx[1];
        END IF;
        applied := applied || coalesce(written, '{}');
    END LOOP;

    RETURN QUERY
        SELECT t.i::int - 1, k.fence, k.state
        FROM unnest(p_subscription_id, p_server_id) WITH ORDINALITY AS t(subscription_id, server_id, i)
             LEFT JOIN keys k ON k.subscription_id = t.subscription_id AND k.server_id = t.server_id
        WHERE NOT (t.i::int - 1 = ANY (applied));
END
$$;
