//! The write-back against a real Postgres: error classification, isolation of a bad result within
//! its batch, server ids handed out again, failures that may pass, and why a result was not applied.
//! Each test gets its own database.

use std::{borrow::Cow, sync::Arc, time::Duration};

use keyfleet_core::{ServerId, ServerKind, SubscriptionId};
use keyfleet_store::{
    Error, KeyWrite, NewServer, Store, WriteBack, WriteBackConfig, WriteOutcome,
    sqlstate_is_transient,
};
use sqlx::Row;

fn base_database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A fresh, migrated database, dropped by `cleanup`.
struct Db {
    name: String,
    url: String,
    store: Store,
}

impl Db {
    async fn new() -> Self {
        let name = format!("kf_store_test_{}", uuid::Uuid::new_v4().simple());
        let admin = Store::connect(&base_database_url(), 1)
            .await
            .expect("Postgres is reachable (DATABASE_URL)");
        admin
            .execute_admin(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        admin.pool().close().await;
        let mut url = url::Url::parse(&base_database_url()).unwrap();
        url.set_path(&format!("/{name}"));
        let url = url.to_string();
        let store = Store::connect(&url, 4).await.unwrap();
        store.migrate().await.unwrap();
        Self { name, url, store }
    }

    async fn cleanup(self) {
        self.store.pool().close().await;
        let admin = Store::connect(&base_database_url(), 1).await.unwrap();
        admin
            .execute_admin(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .await
            .unwrap();
        admin.pool().close().await;
    }

    async fn add_server(&self, name: &str) -> ServerId {
        self.store
            .add_server(&NewServer {
                name: name.into(),
                kind: ServerKind::V2ray,
                api_url: "http://127.0.0.1:1".into(),
                api_key: Some("secret".into()),
                cert_sha256: None,
                max_in_flight: 4,
                grpc: None,
                key_secret: None,
            })
            .await
            .unwrap()
            .id
    }

    /// Active subscriptions `s0`..`s{n-1}`, each with a pending key on `server`.
    async fn pending_keys(&self, server: ServerId, n: usize) -> Vec<SubscriptionId> {
        self.sql(&format!(
            "INSERT INTO subscriptions (id) SELECT 's' || g FROM generate_series(0, {}) g;
             INSERT INTO keys (subscription_id, server_id) SELECT 's' || g, {server} FROM generate_series(0, {}) g",
            n - 1,
            n - 1
        ))
        .await;
        (0..n).map(|i| sub(&format!("s{i}"))).collect()
    }

    async fn sql(&self, sql: &str) {
        sqlx::raw_sql(sql).execute(self.store.pool()).await.unwrap();
    }

    async fn count(&self, sql: &str) -> i64 {
        sqlx::query(sql)
            .fetch_one(self.store.pool())
            .await
            .unwrap()
            .get(0)
    }

    /// (state, server_key_id, link, config_synced_at is set, last_error, failed_transiently)
    async fn key(&self, sub: &SubscriptionId, server: ServerId) -> KeyState {
        let row = sqlx::query(
            "SELECT state, server_key_id, link, config_synced_at IS NOT NULL, last_error, failed_transiently
             FROM keys WHERE subscription_id = $1 AND server_id = $2",
        )
        .bind(sub.as_str())
        .bind(server.0)
        .fetch_one(self.store.pool())
        .await
        .unwrap();
        KeyState {
            state: row.get(0),
            server_key_id: row.get(1),
            link: row.get(2),
            synced: row.get(3),
            last_error: row.get(4),
            failed_transiently: row.get(5),
        }
    }
}

#[derive(Debug)]
struct KeyState {
    state: String,
    server_key_id: Option<String>,
    link: Option<String>,
    synced: bool,
    last_error: Option<String>,
    failed_transiently: bool,
}

fn sub(s: &str) -> SubscriptionId {
    SubscriptionId::parse(s).unwrap()
}

fn created(sub: &SubscriptionId, server: ServerId, fence: i64, id: &str) -> KeyWrite {
    KeyWrite::Created {
        subscription: sub.clone(),
        server,
        fence,
        server_key_id: id.into(),
        link: format!("vless://{id}@secret-link.example:443?sub={sub}"),
    }
}

/// A write-back that flushes exactly when `n` results are in (one batch), never before.
fn one_batch_writeback(store: &Store, n: usize) -> (WriteBack, tokio::task::JoinHandle<()>) {
    WriteBack::spawn_with(
        store.clone(),
        WriteBackConfig {
            max_batch: 500,
            max_delay: Duration::from_secs(30),
            retry_delay: Duration::from_millis(20),
        },
        Some(Arc::new(move || n)),
    )
}

async fn write_all(
    writeback: &WriteBack,
    writes: Vec<KeyWrite>,
) -> Vec<Result<WriteOutcome, Error>> {
    futures::future::join_all(writes.into_iter().map(|w| writeback.write(w))).await
}

fn db_error(e: sqlx::Error) -> Error {
    Error::Db(e)
}

fn sqlstate(e: &Error) -> String {
    match e {
        Error::Db(sqlx::Error::Database(db)) => db.code().unwrap_or_default().into_owned(),
        other => panic!("not a database error: {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Classification

async fn exec<'e>(
    ex: impl sqlx::PgExecutor<'e>,
    sql: &'e str,
) -> Result<sqlx::postgres::PgQueryResult, sqlx::Error> {
    sqlx::query(sql).execute(ex).await
}

/// Asserts that `result` failed with SQLSTATE `code` and is classified `transient` (or not).
fn assert_class<T: std::fmt::Debug>(result: Result<T, sqlx::Error>, code: &str, transient: bool) {
    let e = db_error(result.unwrap_err());
    assert_eq!(sqlstate(&e), code, "{e}");
    assert_eq!(e.is_transient(), transient, "{code}: {e}");
}

#[tokio::test]
async fn real_postgres_errors_are_classified_by_sqlstate() {
    let db = Db::new().await;
    let pool = db.store.pool();
    db.sql("CREATE TABLE t (id INT PRIMARY KEY, v INT, CHECK (v >= 0)); INSERT INTO t VALUES (1, 0), (2, 0)")
        .await;

    // 25006: a write in a read-only transaction (a replica promoted away, or a failover).
    let mut tx = pool.begin().await.unwrap();
    exec(&mut *tx, "SET TRANSACTION READ ONLY").await.unwrap();
    assert_class(exec(&mut *tx, "UPDATE t SET v = 1").await, "25006", true);
    drop(tx);

    // 55P03: a lock not available (NOWAIT while another transaction holds it).
    let mut holder = pool.begin().await.unwrap();
    exec(&mut *holder, "SELECT * FROM t WHERE id = 1 FOR UPDATE")
        .await
        .unwrap();
    let nowait = exec(pool, "SELECT * FROM t WHERE id = 1 FOR UPDATE NOWAIT").await;
    assert_class(nowait, "55P03", true);
    holder.rollback().await.unwrap();

    // 40001: a concurrent update under REPEATABLE READ.
    let mut rr = pool.begin().await.unwrap();
    exec(&mut *rr, "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .await
        .unwrap();
    exec(&mut *rr, "SELECT v FROM t WHERE id = 1")
        .await
        .unwrap();
    exec(pool, "UPDATE t SET v = 5 WHERE id = 1").await.unwrap();
    assert_class(
        exec(&mut *rr, "UPDATE t SET v = 6 WHERE id = 1").await,
        "40001",
        true,
    );
    drop(rr);

    // 40P01: a deadlock between two transactions.
    let deadlock = |first: &'static str, second: &'static str| async move {
        let mut tx = pool.begin().await.unwrap();
        exec(&mut *tx, "SET LOCAL deadlock_timeout = '50ms'")
            .await
            .unwrap();
        exec(&mut *tx, first).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        exec(&mut *tx, second).await
    };
    let (one, two) = (
        "UPDATE t SET v = v + 1 WHERE id = 1",
        "UPDATE t SET v = v + 1 WHERE id = 2",
    );
    let (a, b) = tokio::join!(deadlock(one, two), deadlock(two, one));
    let victim = if a.is_err() { a } else { b };
    assert_class(victim, "40P01", true);

    // A terminated backend (57P01 or the connection cut under it): transient either way.
    let mut conn = pool.acquire().await.unwrap();
    let pid: i32 = sqlx::query("SELECT pg_backend_pid()")
        .fetch_one(&mut *conn)
        .await
        .unwrap()
        .get(0);
    sqlx::query("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .execute(pool)
        .await
        .unwrap();
    let e = db_error(exec(&mut *conn, "SELECT 1").await.unwrap_err());
    assert!(e.is_transient(), "{e:?}");
    drop(conn);

    // Permanent: bad values and constraints.
    let nul = sqlx::query("SELECT $1::text")
        .bind("a\0b")
        .execute(pool)
        .await;
    assert_class(nul, "22021", false);
    assert_class(exec(pool, "SELECT 'x'::int").await, "22P02", false);
    assert_class(
        exec(pool, "INSERT INTO t VALUES (1, 0)").await,
        "23505",
        false,
    );
    assert_class(exec(pool, "UPDATE t SET v = -1").await, "23514", false);
    let orphan = "INSERT INTO keys (subscription_id, server_id) VALUES ('nobody', 1)";
    assert_class(exec(pool, orphan).await, "23503", false);
    assert_class(exec(pool, "SELEC 1").await, "42601", false);
    // Not from the database: a missing row is the caller's business, a decode error a bug.
    let none = sqlx::query("SELECT 1 WHERE false").fetch_one(pool).await;
    assert!(!db_error(none.unwrap_err()).is_transient());
    let text = sqlx::query("SELECT 'x'::text")
        .fetch_one(pool)
        .await
        .unwrap();
    assert!(!db_error(text.try_get::<i64, _>(0).unwrap_err()).is_transient());

    // A closed pool (the process shutting down) and an unreachable server: transient.
    let other = Store::connect(&db.url, 1).await.unwrap();
    other.pool().close().await;
    let e = db_error(exec(other.pool(), "SELECT 1").await.unwrap_err());
    assert!(e.is_transient(), "{e}");
    let e = Store::connect("postgres://postgres@127.0.0.1:1/postgres", 1)
        .await
        .unwrap_err();
    assert!(e.is_transient(), "{e}");
    // Connecting to a database that does not exist (3D000) will not pass with time.
    let mut missing = url::Url::parse(&db.url).unwrap();
    missing.set_path("/kf_store_test_no_such_database");
    let e = Store::connect(missing.as_str(), 1).await.unwrap_err();
    assert!(!e.is_transient(), "{e}");

    db.cleanup().await;
}

/// A database error with just a SQLSTATE, for the codes a test cannot easily provoke.
#[derive(Debug)]
struct Coded(&'static str);

impl std::fmt::Display for Coded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SQLSTATE {}", self.0)
    }
}

impl std::error::Error for Coded {}

impl sqlx::error::DatabaseError for Coded {
    fn message(&self) -> &str {
        "constructed"
    }
    fn code(&self) -> Option<Cow<'_, str>> {
        Some(Cow::Borrowed(self.0))
    }
    fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        self
    }
    fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
        self
    }
    fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
        self
    }
    fn kind(&self) -> sqlx::error::ErrorKind {
        sqlx::error::ErrorKind::Other
    }
}

#[test]
fn sqlstates_are_classified() {
    let transient = [
        "40001", "40P01", "25006", "57P01", "57P02", "57P03", "55P03", "53000", "53100", "53200",
        "53300", "53400", "08000", "08001", "08003", "08004", "08006", "08P01",
    ];
    let permanent = [
        "23505", "23503", "23514", "23502", "22021", "22001", "22P02", "42601", "42P01", "42703",
        "57014", "25P02", "XX000", "P0001", "28P01", "3D000",
    ];
    for code in transient {
        assert!(sqlstate_is_transient(code), "{code}");
        let e = Error::Db(sqlx::Error::Database(Box::new(Coded(code))));
        assert!(e.is_transient(), "{code}");
        let e = Error::Connect {
            target: "x".into(),
            source: sqlx::Error::Database(Box::new(Coded(code))),
        };
        assert!(e.is_transient(), "connect: {code}");
    }
    for code in permanent {
        assert!(!sqlstate_is_transient(code), "{code}");
        let e = Error::Db(sqlx::Error::Database(Box::new(Coded(code))));
        assert!(!e.is_transient(), "{code}");
    }
    let io = Error::Db(sqlx::Error::Io(std::io::Error::from(
        std::io::ErrorKind::ConnectionReset,
    )));
    assert!(io.is_transient());
    assert!(Error::Db(sqlx::Error::PoolTimedOut).is_transient());
    assert!(Error::Db(sqlx::Error::Protocol("desync".into())).is_transient());
    assert!(!Error::Db(sqlx::Error::RowNotFound).is_transient());
    assert!(!Error::Db(sqlx::Error::ColumnNotFound("x".into())).is_transient());
    assert!(!Error::Rejected("bad".into()).is_transient());
    assert!(Error::WriteBackClosed.is_transient());
}

// ---------------------------------------------------------------------------------------------
// 2. Isolation

/// Asserts that every result but the `bad`-th was applied and that one was rejected with a message
/// that quotes no link; returns the message.
fn only_rejected(results: &[Result<WriteOutcome, Error>], bad: usize) -> String {
    for (i, result) in results.iter().enumerate() {
        if i != bad {
            assert_eq!(result.as_ref().unwrap(), &WriteOutcome::Applied, "row {i}");
        }
    }
    let Err(Error::Rejected(message)) = &results[bad] else {
        panic!("row {bad}: {:?}", results[bad]);
    };
    assert!(!message.contains("secret-link"), "no link text: {message}");
    message.clone()
}

#[tokio::test]
async fn a_nul_byte_in_one_link_fails_that_row_only() {
    let db = Db::new().await;
    let server = db.add_server("v1").await;
    let subs = db.pending_keys(server, 200).await;
    let poisoned = 137;
    let writes: Vec<KeyWrite> = subs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let mut w = created(s, server, i as i64 + 1, &format!("id-{i}"));
            if i == poisoned
                && let KeyWrite::Created { link, .. } = &mut w
            {
                link.insert(12, '\0');
            }
            w
        })
        .collect();
    let (writeback, task) = one_batch_writeback(&db.store, writes.len());
    let results = write_all(&writeback, writes).await;

    let message = only_rejected(&results, poisoned);
    assert!(message.contains("link contains a NUL byte"), "{message}");
    assert!(message.contains("s137"), "names the key: {message}");
    assert_eq!(
        db.count("SELECT count(*) FROM keys WHERE state = 'active' AND link IS NOT NULL")
            .await,
        199
    );
    let bad = db.key(&subs[poisoned], server).await;
    assert_eq!((bad.state.as_str(), bad.link), ("pending", None));
    drop(writeback);
    task.await.unwrap();
    db.cleanup().await;
}

#[tokio::test]
async fn a_unique_violation_fails_that_row_only() {
    let db = Db::new().await;
    let server = db.add_server("v1").await;
    let subs = db.pending_keys(server, 200).await;
    // A live key that a newer attempt wrote holds the id row 57 claims: row 57 cannot take it.
    db.sql(&format!(
        "INSERT INTO subscriptions (id) VALUES ('holder');
         INSERT INTO keys (subscription_id, server_id, state, server_key_id, link, config_synced_at, fence)
         VALUES ('holder', {server}, 'active', 'id-57', 'vless://holder', now(), 1000000)"
    ))
    .await;
    let writes: Vec<KeyWrite> = subs
        .iter()
        .enumerate()
        .map(|(i, s)| created(s, server, i as i64 + 1, &format!("id-{i}")))
        .collect();
    let (writeback, task) = one_batch_writeback(&db.store, writes.len());
    let results = write_all(&writeback, writes).await;

    let message = only_rejected(&results, 57);
    assert!(message.contains("keys_server_key_id_unique"), "{message}");
    assert!(message.contains("23505"), "{message}");
    assert_eq!(
        db.count(
            "SELECT count(*) FROM keys WHERE state = 'active' AND subscription_id <> 'holder'"
        )
        .await,
        199
    );
    let holder = db.key(&sub("holder"), server).await;
    assert_eq!(
        (holder.state.as_str(), holder.server_key_id.as_deref()),
        ("active", Some("id-57"))
    );
    assert_eq!(db.key(&subs[57], server).await.state, "pending");
    drop(writeback);
    task.await.unwrap();
    db.cleanup().await;
}

/// A transient error (here a lock not available) holds the whole batch and retries it: nothing is
/// split off or rejected, and it all commits once the lock is free.
#[tokio::test]
async fn a_transient_error_retries_the_whole_batch() {
    let db = Db::new().await;
    let server = db.add_server("v1").await;
    let subs = db.pending_keys(server, 20).await;
    db.sql(&format!(
        "ALTER DATABASE {} SET lock_timeout = '20ms'",
        db.name
    ))
    .await;
    let store = Store::connect(&db.url, 2).await.unwrap();
    let mut holder = db.store.pool().begin().await.unwrap();
    sqlx::query("SELECT 1 FROM keys WHERE subscription_id = 's5' FOR UPDATE")
        .execute(&mut *holder)
        .await
        .unwrap();
    let writes: Vec<KeyWrite> = subs
        .iter()
        .enumerate()
        .map(|(i, s)| created(s, server, 1, &format!("id-{i}")))
        .collect();
    let (writeback, task) = one_batch_writeback(&store, writes.len());
    let pending = tokio::spawn({
        let writeback = writeback.clone();
        async move { write_all(&writeback, writes).await }
    });
    // Several attempts fail on the lock meanwhile; none of the batch commits on its own.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        db.count("SELECT count(*) FROM keys WHERE state = 'active'")
            .await,
        0
    );
    assert!(!pending.is_finished());
    holder.rollback().await.unwrap();
    let results = pending.await.unwrap();
    assert!(
        results
            .iter()
            .all(|r| matches!(r, Ok(WriteOutcome::Applied))),
        "{results:?}"
    );
    assert_eq!(
        db.count("SELECT count(*) FROM keys WHERE state = 'active'")
            .await,
        20
    );
    drop(writeback);
    task.await.unwrap();
    store.pool().close().await;
    db.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// 3. Ids a server hands out again

#[tokio::test]
async fn a_deleted_key_does_not_block_its_id() {
    let db = Db::new().await;
    let server = db.add_server("o1").await;
    let subs = db.pending_keys(server, 3).await;
    // A key deleted before this change still records its id.
    db.sql(&format!(
        "UPDATE keys SET state = 'deleted', server_key_id = '7', deleted_at = now()
         WHERE subscription_id = 's0' AND server_id = {server}"
    ))
    .await;
    let out = db
        .store
        .write_keys(&[created(&subs[1], server, 10, "7")])
        .await
        .unwrap();
    assert_eq!(out, vec![WriteOutcome::Applied]);
    assert_eq!(
        db.key(&subs[1], server).await.server_key_id.as_deref(),
        Some("7")
    );

    // The Deleted write forgets the id: the key is gone, and the server may hand it out again.
    db.sql(&format!(
        "UPDATE keys SET state = 'deleting' WHERE subscription_id = 's1' AND server_id = {server}"
    ))
    .await;
    let deleted = KeyWrite::Deleted {
        subscription: subs[1].clone(),
        server,
        fence: 11,
    };
    assert_eq!(
        db.store.write_keys(&[deleted]).await.unwrap(),
        vec![WriteOutcome::Applied]
    );
    let row = db.key(&subs[1], server).await;
    assert_eq!((row.state.as_str(), row.server_key_id), ("deleted", None));
    let out = db
        .store
        .write_keys(&[created(&subs[2], server, 12, "7")])
        .await
        .unwrap();
    assert_eq!(out, vec![WriteOutcome::Applied]);
    // Nothing was displaced: the deleted rows stay deleted.
    assert_eq!(
        db.count("SELECT count(*) FROM keys WHERE state = 'deleted'")
            .await,
        2
    );
    db.cleanup().await;
}

#[tokio::test]
async fn a_reused_id_displaces_the_stale_live_key() {
    let db = Db::new().await;
    let server = db.add_server("o1").await;
    let subs = db.pending_keys(server, 4).await;
    // s0 was active with id 7 and s1 being deleted with id 8 when the server was wiped; the server
    // then handed out 7 and 8 to the new keys of s2 and s3.
    assert_eq!(
        db.store
            .write_keys(&[
                created(&subs[0], server, 5, "7"),
                created(&subs[1], server, 6, "8")
            ])
            .await
            .unwrap(),
        vec![WriteOutcome::Applied, WriteOutcome::Applied]
    );
    db.sql("UPDATE keys SET state = 'deleting' WHERE subscription_id = 's1'")
        .await;
    let out = db
        .store
        .write_keys(&[
            created(&subs[2], server, 9, "7"),
            created(&subs[3], server, 10, "8"),
        ])
        .await
        .unwrap();
    assert_eq!(out, vec![WriteOutcome::Applied, WriteOutcome::Applied]);

    let new = db.key(&subs[2], server).await;
    assert_eq!(
        (new.state.as_str(), new.server_key_id.as_deref()),
        ("active", Some("7"))
    );
    let stale = db.key(&subs[0], server).await;
    assert_eq!(stale.state, "pending", "{stale:?}");
    assert_eq!(
        (stale.server_key_id, stale.link, stale.synced),
        (None, None, false)
    );
    assert!(stale.last_error.unwrap().contains("reassigned"));
    // A key being deleted stays so (its key is gone), and its delete can no longer hit id 8.
    let deleting = db.key(&subs[1], server).await;
    assert_eq!(
        (deleting.state.as_str(), deleting.server_key_id),
        ("deleting", None)
    );
    assert_eq!(
        db.key(&subs[3], server).await.server_key_id.as_deref(),
        Some("8")
    );

    // A create older than the row holding the id does not take it.
    let e = db
        .store
        .write_keys(&[created(&subs[0], server, 8, "7")])
        .await
        .unwrap_err();
    assert!(!e.is_transient(), "{e}");
    assert_eq!(
        db.key(&subs[2], server).await.server_key_id.as_deref(),
        Some("7")
    );
    db.cleanup().await;
}

#[tokio::test]
async fn two_creates_claiming_one_id_in_a_batch_resolve_to_the_newest() {
    let db = Db::new().await;
    let server = db.add_server("o1").await;
    let subs = db.pending_keys(server, 12).await;
    let mut writes: Vec<KeyWrite> = subs[2..]
        .iter()
        .enumerate()
        .map(|(i, s)| created(s, server, 100 + i as i64, &format!("other-{i}")))
        .collect();
    // The newer claim first in the batch: the order of the batch does not decide, the fence does.
    writes.insert(3, created(&subs[1], server, 21, "7"));
    writes.insert(6, created(&subs[0], server, 20, "7"));
    let (writeback, task) = one_batch_writeback(&db.store, writes.len());
    let results = write_all(&writeback, writes).await;
    assert!(
        results
            .iter()
            .all(|r| matches!(r, Ok(WriteOutcome::Applied))),
        "{results:?}"
    );
    let winner = db.key(&subs[1], server).await;
    assert_eq!(
        (winner.state.as_str(), winner.server_key_id.as_deref()),
        ("active", Some("7"))
    );
    let loser = db.key(&subs[0], server).await;
    assert_eq!(
        (loser.state.as_str(), loser.server_key_id),
        ("pending", None)
    );
    assert_eq!(
        db.count("SELECT count(*) FROM keys WHERE state = 'active'")
            .await,
        11
    );
    drop(writeback);
    task.await.unwrap();
    db.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// 4. Failures that may pass

#[tokio::test]
async fn transient_failures_are_remembered_and_requeued() {
    let db = Db::new().await;
    let server = db.add_server("v1").await;
    let other = db.add_server("v2").await;
    let subs = db.pending_keys(server, 5).await;
    db.sql(&format!(
        "INSERT INTO keys (subscription_id, server_id) SELECT id, {other} FROM subscriptions;
         UPDATE subscriptions SET status = 'cancelled' WHERE id = 's3';
         UPDATE subscriptions SET expires_at = now() - interval '1 minute' WHERE id = 's4'"
    ))
    .await;
    let failed = |s: &SubscriptionId, server: ServerId, transient: bool| KeyWrite::Failed {
        subscription: s.clone(),
        server,
        fence: 1,
        error: format!("gave up: transient={transient}"),
        transient,
    };
    let out = db
        .store
        .write_keys(&[
            failed(&subs[0], server, true),
            failed(&subs[1], server, false),
            failed(&subs[2], server, true),
            failed(&subs[3], server, true),
            failed(&subs[4], server, true),
            failed(&subs[0], other, true),
        ])
        .await
        .unwrap();
    assert!(out.iter().all(WriteOutcome::is_applied));
    assert!(db.key(&subs[0], server).await.failed_transiently);
    assert!(!db.key(&subs[1], server).await.failed_transiently);
    let stored = db.store.stored_keys(server).await.unwrap();
    let flag = |s: &str| {
        stored
            .iter()
            .find(|k| k.subscription.as_str() == s)
            .unwrap()
            .failed_transiently
    };
    assert!(flag("s0") && !flag("s1") && flag("s2"));

    // s3 is cancelled, s4 past its expiry, s1 failed for good, the other server's key is not asked.
    let retryable = vec![subs[0].clone(), subs[2].clone()];
    assert_eq!(
        db.store.retryable_failed_keys(server).await.unwrap(),
        retryable
    );
    assert_eq!(
        db.store.requeue_failed_keys(server).await.unwrap(),
        retryable
    );
    let row = db.key(&subs[0], server).await;
    assert_eq!(row.state, "pending");
    assert_eq!(row.last_error.as_deref(), Some("gave up: transient=true"));
    assert!(!row.failed_transiently);
    assert_eq!(db.key(&subs[1], server).await.state, "failed");
    assert_eq!(db.key(&subs[3], server).await.state, "failed");
    assert_eq!(db.key(&subs[0], other).await.state, "failed");
    assert!(
        db.store
            .requeue_failed_keys(server)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        db.store
            .retryable_failed_keys(server)
            .await
            .unwrap()
            .is_empty()
    );

    // A later result clears the flag: a create that succeeds, or a failure that is permanent.
    let out = db
        .store
        .write_keys(&[
            created(&subs[0], other, 2, "a"),
            failed(&subs[2], server, false),
        ])
        .await
        .unwrap();
    assert!(out.iter().all(WriteOutcome::is_applied), "{out:?}");
    assert!(!db.key(&subs[0], other).await.failed_transiently);
    assert!(!db.key(&subs[2], server).await.failed_transiently);
    db.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// 5. Why a result was not applied

#[tokio::test]
async fn outcomes_say_why_a_result_was_not_applied() {
    let db = Db::new().await;
    let server = db.add_server("v1").await;
    let subs = db.pending_keys(server, 4).await;
    db.sql(
        "UPDATE keys SET fence = 50 WHERE subscription_id = 's1';
         UPDATE keys SET state = 'deleting', fence = 3 WHERE subscription_id = 's2'",
    )
    .await;
    let out = db
        .store
        .write_keys(&[
            created(&subs[0], server, 10, "a"),
            created(&subs[1], server, 10, "b"),
            created(&subs[2], server, 10, "c"),
            created(&sub("nobody"), server, 10, "d"),
            KeyWrite::ConfigSynced {
                subscription: subs[3].clone(),
                server,
                fence: 10,
                link: "vless://x".into(),
                generation: 1,
            },
        ])
        .await
        .unwrap();
    assert_eq!(
        out,
        vec![
            WriteOutcome::Applied,
            WriteOutcome::Fenced { row_fence: 50 },
            WriteOutcome::StateMoved {
                state: "deleting".into()
            },
            WriteOutcome::Missing,
            WriteOutcome::StateMoved {
                state: "pending".into()
            },
        ]
    );
    // Through the write-back: two results for one key in a batch, the older is fenced by the newer.
    let (writeback, task) = one_batch_writeback(&db.store, 2);
    let results = write_all(
        &writeback,
        vec![
            created(&subs[3], server, 30, "e"),
            created(&subs[3], server, 20, "e"),
        ],
    )
    .await;
    assert_eq!(results[0].as_ref().unwrap(), &WriteOutcome::Applied);
    assert_eq!(
        results[1].as_ref().unwrap(),
        &WriteOutcome::Fenced { row_fence: 30 }
    );
    drop(writeback);
    task.await.unwrap();
    db.cleanup().await;
}

/// A batch waiting for a contributor that then ends without adding to it (its job finished, or
/// wrote in an earlier batch) is flushed on `recount`, not at the end of its window: a purchase's
/// last keys are not held back by a job that is already gone.
#[tokio::test]
async fn a_recount_flushes_a_batch_whose_other_contributors_are_gone() {
    use std::sync::atomic::{AtomicUsize, Ordering};

    let db = Db::new().await;
    let server = db.add_server("v1").await;
    let subs = db.pending_keys(server, 1).await;
    let held = Arc::new(AtomicUsize::new(2));
    let counted = held.clone();
    let (writeback, task) = WriteBack::spawn_with(
        db.store.clone(),
        WriteBackConfig {
            max_batch: 500,
            max_delay: Duration::from_secs(600),
            retry_delay: Duration::from_millis(20),
        },
        Some(Arc::new(move || counted.load(Ordering::SeqCst))),
    );
    let outcome = {
        let write = writeback.write(created(&subs[0], server, 1, "id-0"));
        tokio::pin!(write);
        // Two jobs held, one result in: the batch waits for the other (its window is ten minutes).
        assert!(
            tokio::time::timeout(Duration::from_millis(200), &mut write)
                .await
                .is_err()
        );
        held.store(1, Ordering::SeqCst);
        writeback.recount();
        tokio::time::timeout(Duration::from_secs(30), write)
            .await
            .expect("flushed on the recount, not at the end of its window")
            .unwrap()
    };
    assert_eq!(outcome, WriteOutcome::Applied);
    assert_eq!(db.key(&subs[0], server).await.state, "active");
    drop(writeback);
    task.await.unwrap();
    db.cleanup().await;
}

/// A batch that holds every result still to come does not wait for the commit of the batch
/// before it: the results in a batch being committed count as in, and two batches commit at
/// once. The first commit is held by a row lock another transaction takes (a barrier, not a
/// sleep); the second batch commits while it waits.
#[tokio::test]
async fn a_ready_batch_commits_while_the_batch_before_it_is_still_committing() {
    use std::sync::atomic::{AtomicUsize, Ordering};

    let db = Db::new().await;
    let server = db.add_server("v1").await;
    let subs = db.pending_keys(server, 2).await;
    let held = Arc::new(AtomicUsize::new(1));
    let counted = held.clone();
    let (writeback, task) = WriteBack::spawn_with(
        db.store.clone(),
        WriteBackConfig {
            max_batch: 500,
            max_delay: Duration::from_secs(600),
            retry_delay: Duration::from_millis(20),
        },
        Some(Arc::new(move || counted.load(Ordering::SeqCst))),
    );
    let mut blocker = db.store.pool().begin().await.unwrap();
    sqlx::query("SELECT 1 FROM keys WHERE subscription_id = $1 FOR UPDATE")
        .bind(subs[0].as_str())
        .execute(&mut *blocker)
        .await
        .unwrap();

    // One job held, its result in: flushed at once, and stuck behind the row lock.
    let first = tokio::spawn({
        let writeback = writeback.clone();
        let write = created(&subs[0], server, 1, "id-0");
        async move { writeback.write(write).await }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE wait_event_type = 'Lock' AND datname = current_database()",
        )
        .fetch_one(db.store.pool())
        .await
        .unwrap();
        if waiting > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the first batch never reached the lock"
        );
        tokio::task::yield_now().await;
    }
    // A second job, whose result is all that is still to come besides the one being committed.
    held.store(2, Ordering::SeqCst);
    let second = tokio::time::timeout(
        Duration::from_secs(30),
        writeback.write(created(&subs[1], server, 2, "id-1")),
    )
    .await
    .expect("the second batch committed while the first waited for its lock")
    .unwrap();
    assert_eq!(second, WriteOutcome::Applied);
    assert!(
        !first.is_finished(),
        "the first batch is still held by the lock"
    );
    assert_eq!(db.key(&subs[1], server).await.state, "active");

    blocker.rollback().await.unwrap();
    assert_eq!(first.await.unwrap().unwrap(), WriteOutcome::Applied);
    assert_eq!(db.key(&subs[0], server).await.state, "active");
    drop(writeback);
    task.await.unwrap();
    db.cleanup().await;
}
