//! Bad input is rejected with a message that says what and where, a non-zero exit, and nothing
//! half-written.

use crate::harness::TestEnv;

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_rejected(out: &std::process::Output, mentions: &str) {
    assert!(
        !out.status.success(),
        "expected a failure, got success: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let err = stderr(out);
    assert!(
        err.contains(mentions),
        "error should mention {mentions:?}: {err}"
    );
    assert!(!err.contains("panicked"), "no panics: {err}");
}

#[tokio::test]
async fn bad_server_definitions_are_rejected_and_nothing_is_stored() {
    let env = TestEnv::new().await;
    let base = ["server", "add", "--name", "s1"];
    let cases: &[(&[&str], &str)] = &[
        (
            &[
                "--kind",
                "wireguard",
                "--api-url",
                "http://127.0.0.1:1",
                "--api-key",
                "k",
            ],
            "--kind",
        ),
        (
            &[
                "--kind",
                "v2ray",
                "--api-url",
                "not a url",
                "--api-key",
                "k",
            ],
            "--api-url",
        ),
        (
            &[
                "--kind",
                "v2ray",
                "--api-url",
                "ftp://127.0.0.1/",
                "--api-key",
                "k",
            ],
            "--api-url",
        ),
        (
            &["--kind", "v2ray", "--api-url", "http://127.0.0.1:1"],
            "--api-key",
        ),
        (
            &[
                "--kind",
                "outline",
                "--api-url",
                "https://127.0.0.1:1/x",
                "--cert-sha256",
                "XYZ",
            ],
            "--cert-sha256",
        ),
        (
            &[
                "--kind",
                "outline",
                "--api-url",
                "https://127.0.0.1:1/x",
                "--cert-sha256",
                &"A".repeat(63),
            ],
            "64",
        ),
        (
            &[
                "--kind",
                "outline",
                "--api-url",
                "http://127.0.0.1:1/x",
                "--cert-sha256",
                &"A".repeat(64),
            ],
            "https",
        ),
        (
            &[
                "--kind",
                "v2ray",
                "--api-url",
                "http://127.0.0.1:1",
                "--api-key",
                "k",
                "--max-in-flight",
                "0",
            ],
            "--max-in-flight",
        ),
    ];
    for (extra, mentions) in cases {
        let args: Vec<&str> = base.iter().chain(extra.iter()).copied().collect();
        assert_rejected(&env.run(&args), mentions);
    }
    assert_eq!(
        env.ok(&["server", "list", "--json"]).trim(),
        "[]",
        "nothing half-written"
    );

    env.ok(&[
        "server",
        "add",
        "--name",
        "s1",
        "--kind",
        "v2ray",
        "--api-url",
        "http://127.0.0.1:1",
        "--api-key",
        "k",
    ]);
    let dup = env.run(&[
        "server",
        "add",
        "--name",
        "s1",
        "--kind",
        "v2ray",
        "--api-url",
        "http://127.0.0.1:2",
        "--api-key",
        "k",
    ]);
    assert_rejected(&dup, "already exists");
    let listed: serde_json::Value =
        serde_json::from_str(&env.ok(&["server", "list", "--json"])).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert!(
        !listed.to_string().contains("\"k\""),
        "server list never prints the API key: {listed}"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn bad_subscription_input_is_rejected_and_nothing_is_stored() {
    let env = TestEnv::new().await;
    assert_rejected(
        &env.run(&["status", "--subscription", "nope", "--json"]),
        "unknown subscription",
    );
    assert_rejected(
        &env.run(&["provision", "--subscription", "a/b"]),
        "--subscription",
    );
    assert_rejected(
        &env.run(&[
            "provision",
            "--subscription",
            "s1",
            "--expires-at",
            "tomorrow",
        ]),
        "--expires-at",
    );
    assert_rejected(
        &env.run(&[
            "provision",
            "--subscription",
            "s1",
            "--expires-at",
            "2001-01-01T00:00:00Z",
        ]),
        "past",
    );
    assert!(
        !env.store
            .subscription_exists(&"s1".parse().unwrap())
            .await
            .unwrap(),
        "nothing half-written"
    );
    assert_eq!(
        env.queue.stats().await.unwrap().ready,
        0,
        "nothing enqueued"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn bad_configuration_is_rejected_with_the_variable_named() {
    let env = TestEnv::new().await;
    let run_with = |var: &str, value: &str| {
        env.keyfleet()
            .env(var, value)
            .args(["server", "list"])
            .output()
            .unwrap()
    };
    let out = run_with(
        "DATABASE_URL",
        "postgres://nobody:hunter2@127.0.0.1:1/nowhere",
    );
    assert_rejected(&out, "127.0.0.1:1/nowhere");
    assert!(
        !stderr(&out).contains("hunter2"),
        "the password is never printed"
    );
    assert_rejected(
        &run_with("DATABASE_URL", "mysql://127.0.0.1/x"),
        "DATABASE_URL",
    );
    assert_rejected(
        &run_with("DATABASE_URL", "postgres://127.0.0.1:notaport/x"),
        "DATABASE_URL",
    );
    assert_rejected(&run_with("REDIS_URL", "http://127.0.0.1"), "REDIS_URL");
    assert_rejected(&run_with("KEYFLEET_LEASE_MS", "soon"), "KEYFLEET_LEASE_MS");
    let bad_prefix = env
        .keyfleet()
        .env("KEYFLEET_REDIS_PREFIX", "has space")
        .args(["provision", "--subscription", "s1"])
        .output()
        .unwrap();
    assert_rejected(&bad_prefix, "prefix");
    env.cleanup().await;
}

#[test]
fn every_command_has_help() {
    let commands: &[&[&str]] = &[
        &[],
        &["migrate"],
        &["server"],
        &["server", "add"],
        &["server", "list"],
        &["server", "set-limit"],
        &["provision"],
        &["worker"],
        &["status"],
        &["demo"],
    ];
    for args in commands {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_keyfleet"))
            .args(*args)
            .arg("--help")
            .output()
            .unwrap();
        assert!(out.status.success(), "keyfleet {args:?} --help failed");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Usage"),
            "keyfleet {args:?} --help prints usage"
        );
    }
}

#[tokio::test]
async fn set_limit_changes_the_fleet_wide_limit_at_run_time() {
    let env = TestEnv::new().await;
    env.ok(&[
        "server",
        "add",
        "--name",
        "s1",
        "--kind",
        "v2ray",
        "--api-url",
        "http://127.0.0.1:1",
        "--api-key",
        "k",
        "--max-in-flight",
        "1",
    ]);
    let out = env.ok(&["server", "set-limit", "s1", "3"]);
    assert!(out.contains("3"), "{out}");
    let listed: serde_json::Value =
        serde_json::from_str(&env.ok(&["server", "list", "--json"])).unwrap();
    assert_eq!(listed[0]["max_in_flight"], 3);
    // The queue now lets three jobs of s1 be claimed at once, and no fourth.
    let server = keyfleet_core::ServerId(listed[0]["id"].as_i64().unwrap());
    for i in 0..4 {
        let sub = format!("s{i}").parse().unwrap();
        env.queue
            .enqueue(&keyfleet_core::JobPayload::create(server, sub))
            .await
            .unwrap();
    }
    let mut claimed = 0;
    while let keyfleet_queue::Claim::Job(_) = env.queue.claim("test").await.unwrap() {
        claimed += 1;
    }
    assert_eq!(claimed, 3);
    assert_rejected(
        &env.run(&["server", "set-limit", "s1", "0"]),
        "out of range",
    );
    assert_rejected(
        &env.run(&["server", "set-limit", "nope", "2"]),
        "no server named",
    );
    env.cleanup().await;
}

#[tokio::test]
async fn dead_jobs_can_be_purged_and_recover_re_derives_work_from_postgres() {
    let env = TestEnv::new().await;
    env.ok(&[
        "server",
        "add",
        "--name",
        "p1",
        "--kind",
        "v2ray",
        "--api-url",
        "http://127.0.0.1:1",
        "--api-key",
        "k",
    ]);
    env.ok(&["provision", "--subscription", "pu-1"]);
    env.ok(&["provision", "--subscription", "pu-2"]);
    for _ in 0..2 {
        let keyfleet_queue::Claim::Job(job) = env.queue.claim("test").await.unwrap() else {
            panic!("a create to claim");
        };
        let dead = keyfleet_queue::Finish::Dead {
            error: "401".into(),
            server_fault: false,
        };
        env.queue.finish(&job, &dead).await.unwrap();
    }
    assert_eq!(env.queue.stats().await.unwrap().dead, 2);
    let out = env.ok(&["dlq", "purge", "--older-than-hours", "1"]);
    assert!(out.contains("purged 0"), "{out}");
    assert_rejected(&env.run(&["dlq", "purge"]), "required");
    let out = env.ok(&["dlq", "purge", "--all"]);
    assert!(out.contains("purged 2"), "{out}");
    assert_eq!(env.queue.stats().await.unwrap().dead, 0);

    // Redis loses everything; `keyfleet recover` puts the two pending creates back.
    env.queue.purge().await.unwrap();
    let report: serde_json::Value = serde_json::from_str(&env.ok(&["recover", "--json"])).unwrap();
    assert_eq!(report["creates"], 2, "{report}");
    assert_eq!(report["enqueued"], 2, "{report}");
    assert_eq!(env.queue.stats().await.unwrap().ready, 2);
    let again: serde_json::Value = serde_json::from_str(&env.ok(&["recover", "--json"])).unwrap();
    assert_eq!(again["enqueued"], 0, "nothing queued twice: {again}");
    assert!(again["epoch"].as_i64() > report["epoch"].as_i64());
    env.cleanup().await;
}

#[tokio::test]
async fn secrets_come_from_files_or_variables_and_a_command_line_secret_warns() {
    let env = TestEnv::new().await;
    let dir =
        std::env::temp_dir().join(format!("kf-e2e-secrets-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, content: &str| {
        let path = dir.join(name);
        std::fs::write(&path, content).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let key_file = write("api-key", "k3y-from-file\n");
    let url_file = write("api-url", "https://127.0.0.1:1/s3cret-prefix\n");
    let database_url_file = write("database-url", &format!("{}\n", env.database_url));
    let pin = "AB".repeat(32);
    let v2ray = |name: &'static str| {
        [
            "server",
            "add",
            "--name",
            name,
            "--kind",
            "v2ray",
            "--api-url",
            "http://127.0.0.1:1",
        ]
    };
    let quiet = |out: &std::process::Output| {
        assert!(out.status.success(), "{}", stderr(out));
        assert!(!stderr(out).contains("warning"), "{}", stderr(out));
    };

    quiet(&env.run(&[&v2ray("from-file")[..], &["--api-key-file", &key_file]].concat()));
    quiet(
        &env.keyfleet()
            .env("KEYFLEET_SERVER_API_KEY", "k3y-from-env")
            .args(v2ray("from-env"))
            .output()
            .unwrap(),
    );
    let outline = [
        "server",
        "add",
        "--name",
        "nl-1",
        "--kind",
        "outline",
        "--cert-sha256",
        &pin,
    ];
    quiet(&env.run(&[&outline[..], &["--api-url-file", &url_file]].concat()));

    let argv = env.run(&[&v2ray("from-argv")[..], &["--api-key", "k3y-from-argv"]].concat());
    assert!(argv.status.success(), "{}", stderr(&argv));
    assert!(
        stderr(&argv).contains("warning: --api-key on the command line")
            && stderr(&argv).contains("--api-key-file"),
        "{}",
        stderr(&argv)
    );
    let mut outline_argv = outline;
    outline_argv[3] = "nl-2";
    let argv = env.run(
        &[
            &outline_argv[..],
            &["--api-url", "https://127.0.0.1:2/s3cret"],
        ]
        .concat(),
    );
    assert!(argv.status.success(), "{}", stderr(&argv));
    assert!(
        stderr(&argv).contains("warning: --api-url on the command line"),
        "{}",
        stderr(&argv)
    );

    let both = env.run(
        &[
            &v2ray("both")[..],
            &["--api-key", "k", "--api-key-file", &key_file],
        ]
        .concat(),
    );
    assert_rejected(
        &both,
        "--api-key (or KEYFLEET_SERVER_API_KEY) and --api-key-file",
    );
    let missing = env.run(&[&v2ray("missing")[..], &["--api-key-file", "/nonexistent/k"]].concat());
    assert_rejected(
        &missing,
        "--api-key-file: cannot read the file /nonexistent/k",
    );

    let stored: std::collections::HashMap<String, (Option<String>, String)> = env
        .store
        .list_servers()
        .await
        .unwrap()
        .into_iter()
        .map(|s| (s.name, (s.api_key, s.api_url)))
        .collect();
    assert_eq!(stored["from-file"].0.as_deref(), Some("k3y-from-file"));
    assert_eq!(stored["from-env"].0.as_deref(), Some("k3y-from-env"));
    assert_eq!(stored["from-argv"].0.as_deref(), Some("k3y-from-argv"));
    assert_eq!(stored["nl-1"].1, "https://127.0.0.1:1/s3cret-prefix");
    assert!(!stored.contains_key("both") && !stored.contains_key("missing"));

    // DATABASE_URL from a file; with both set, nothing starts.
    let listed = env
        .keyfleet()
        .env_remove("DATABASE_URL")
        .env("DATABASE_URL_FILE", &database_url_file)
        .args(["server", "list"])
        .output()
        .unwrap();
    assert!(listed.status.success(), "{}", stderr(&listed));
    assert!(String::from_utf8_lossy(&listed.stdout).contains("nl-1"));
    let both = env
        .keyfleet()
        .env("DATABASE_URL_FILE", &database_url_file)
        .args(["server", "list"])
        .output()
        .unwrap();
    assert_rejected(&both, "DATABASE_URL and DATABASE_URL_FILE are both set");
    std::fs::remove_dir_all(&dir).unwrap();
    env.cleanup().await;
}
