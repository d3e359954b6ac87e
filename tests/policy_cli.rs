//! The command line with a policy: `pubwarden check-config` (the shipped example explained in
//! plain words; a bad policy with every mistake listed at once, with key paths and lines),
//! pubwarden refusing to start with a bad policy, and `pubwarden hash-password`.

mod support;

use support::policy::*;
use support::*;

/// The policy's mistakes, each on its own line (1-based, as written below).
const BAD_POLICY: &str = "\
mode: enforce
allow_plaintext_passwords: false
users:
  bob:
    passwords:
      - plain: hunter2-not-for-logs
    channels:
      publish: {pattern: \"orders.*\"}
      subscribe: [\"orders.*\"]
    colour: blue
rate_limits:
  - name: zero-rate
    messages_per_second: 0
    key: nobody
";

/// The password in [`BAD_POLICY`], which must never be printed.
const PLAIN_SECRET: &str = "hunter2-not-for-logs";

/// (key path, with list indexes written `.N`; line) of every mistake in [`BAD_POLICY`].
const BAD_POLICY_ERRORS: &[(&str, usize)] = &[
    // A plain password without `allow_plaintext_passwords: true`.
    ("users.bob.passwords.0", 6),
    // A mapping where a list of globs belongs.
    ("users.bob.channels.publish", 8),
    // An unknown key.
    ("users.bob.colour", 10),
    // A rate limit with a zero rate.
    ("rate_limits.0.messages_per_second", 13),
    // An unknown `key:` value.
    ("rate_limits.0.key", 14),
];

/// `a.b[3].c` -> `a.b.3.c`, so either list notation is accepted.
fn normalise_path(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(ch) = chars.next() {
        if ch == '[' && chars.peek().is_some_and(char::is_ascii_digit) {
            out.push('.');
            while let Some(&d) = chars.peek() {
                chars.next();
                if d == ']' {
                    break;
                }
                out.push(d);
            }
        } else {
            out.push(ch);
        }
    }
    out
}

/// Panics unless every mistake of [`BAD_POLICY`] is reported on a line of its own with its key
/// path and `(line N, column M)`, and the plain password is not printed.
fn assert_lists_every_mistake(run: &CliRun, what: &str) {
    let output = run.output();
    let lines: Vec<String> = output.lines().map(normalise_path).collect();
    let mut missing = Vec::new();
    for (path, line) in BAD_POLICY_ERRORS {
        let wanted = format!("(line {line}, column ");
        let found = lines
            .iter()
            .any(|l| l.contains(path) && l.contains(&wanted));
        if !found {
            missing.push(format!("{path} {wanted}...)"));
        }
    }
    assert!(
        missing.is_empty(),
        "{what}: these mistakes are not reported with their key path and line: {missing:#?}\n\
         exit code {:?}; output:\n{output}",
        run.code
    );
    assert!(
        !output.contains(PLAIN_SECRET),
        "{what}: the plain password appears in the output:\n{output}"
    );
}

#[test]
fn check_config_explains_the_shipped_policy() {
    let run = run_cli(
        &[
            "check-config",
            "config/pubwarden.yaml",
            "--policy",
            "config/policy.yaml",
        ],
        b"",
        &[],
        secs(20),
    );
    let out = run.output();
    assert_eq!(run.code, Some(0), "check-config failed:\n{out}");
    // The effective settings ...
    assert!(
        out.contains("listen"),
        "no effective settings printed:\n{out}"
    );
    // ... and every user, explained.
    for user in ["default", "orders-service", "operator"] {
        assert!(out.contains(user), "user {user} is not explained:\n{out}");
    }
    // What follows the first mention of orders-service (its explanation, whatever the layout)
    // states its channel rules, the deny list included.
    let at = out.find("orders-service").unwrap_or(0);
    let section: String = out[at..].chars().take(1200).collect();
    for needle in [
        "publish",
        "subscribe",
        "orders.*",
        "orders.internal.*",
        "inventory.*",
    ] {
        assert!(
            section.contains(needle),
            "`{needle}` is missing from orders-service's explanation:\n{section}\n\nwhole output:\n{out}"
        );
    }
}

#[test]
fn check_config_finds_the_policy_named_by_the_settings_file() {
    // A settings file elsewhere naming its policy relatively; check-config runs from the
    // package root, so the path must be resolved against the settings file's directory.
    let shipped = std::fs::read_to_string("config/policy.yaml").expect("read config/policy.yaml");
    let settings = write_settings(&shipped, "");
    let run = run_cli(
        &["check-config", settings.to_str().expect("utf-8 path")],
        b"",
        &[],
        secs(20),
    );
    let out = run.output();
    assert_eq!(run.code, Some(0), "check-config failed:\n{out}");
    assert!(
        out.contains("orders-service") && out.contains("orders.*"),
        "the policy named by the settings file is not explained:\n{out}"
    );
}

#[test]
fn check_config_lists_every_policy_mistake() {
    let settings = write_settings(BAD_POLICY, "");
    let bad = settings.with_file_name("policy.yaml");
    let bad = bad.to_str().expect("utf-8 path");
    // Via --policy ...
    let run = run_cli(
        &["check-config", "config/pubwarden.yaml", "--policy", bad],
        b"",
        &[],
        secs(20),
    );
    assert_eq!(
        run.code,
        Some(64),
        "check-config --policy <bad>: want exit 64; output:\n{}",
        run.output()
    );
    assert_lists_every_mistake(&run, "check-config --policy <bad>");
    // ... and via the settings file's `policy:` key.
    let run = run_cli(
        &["check-config", settings.to_str().expect("utf-8 path")],
        b"",
        &[],
        secs(20),
    );
    assert_eq!(
        run.code,
        Some(64),
        "check-config <settings naming the bad policy>: want exit 64; output:\n{}",
        run.output()
    );
    assert_lists_every_mistake(&run, "check-config <settings naming the bad policy>");
}

#[test]
fn plain_passwords_are_accepted_only_when_allowed() {
    let policy = |allow: bool| {
        format!(
            "allow_plaintext_passwords: {allow}\nusers:\n  bob:\n    passwords:\n      - plain: {PLAIN_SECRET}\n"
        )
    };
    let refused = write_settings(&policy(false), "");
    let run = run_cli(
        &["check-config", refused.to_str().expect("utf-8 path")],
        b"",
        &[],
        secs(20),
    );
    assert_eq!(
        run.code,
        Some(64),
        "plain password without the flag:\n{}",
        run.output()
    );
    assert!(
        normalise_path(&run.output()).contains("users.bob.passwords.0"),
        "the error does not name users.bob.passwords[0]:\n{}",
        run.output()
    );
    assert!(
        !run.output().contains(PLAIN_SECRET),
        "password printed:\n{}",
        run.output()
    );
    let allowed = write_settings(&policy(true), "");
    let run = run_cli(
        &["check-config", allowed.to_str().expect("utf-8 path")],
        b"",
        &[],
        secs(20),
    );
    assert_eq!(
        run.code,
        Some(0),
        "plain password with the flag:\n{}",
        run.output()
    );
    assert!(
        !run.output().contains(PLAIN_SECRET),
        "password printed:\n{}",
        run.output()
    );
}

/// Runs pubwarden (not check-config) with `args` and `env`; it must exit on its own.
fn run_proxy(args: &[&str], env: &[(&str, &str)]) -> CliRun {
    let listen = loopback(free_port()).to_string();
    let admin = loopback(free_port()).to_string();
    // Nothing needs to listen upstream: the policy must be rejected before that matters.
    let upstream = loopback(free_port()).to_string();
    let mut all = vec![
        "--listen",
        listen.as_str(),
        "--upstream",
        upstream.as_str(),
        "--admin-listen",
        admin.as_str(),
    ];
    all.extend_from_slice(args);
    run_cli(&all, b"", env, secs(10))
}

#[test]
fn pubwarden_refuses_to_start_with_a_bad_policy() {
    let settings = write_settings(BAD_POLICY, "");
    let run = run_proxy(&["--config", settings.to_str().expect("utf-8 path")], &[]);
    assert_eq!(
        run.code,
        Some(64),
        "pubwarden with a bad policy (settings `policy:` key) must exit 64 at once \
         (None: still running after 10 s); output:\n{}",
        run.output()
    );
    assert_lists_every_mistake(&run, "pubwarden --config <settings naming the bad policy>");

    // Named by PUBWARDEN_POLICY instead.
    let bad = settings.with_file_name("policy.yaml");
    let run = run_proxy(
        &["--config", "config/pubwarden.yaml"],
        &[("PUBWARDEN_POLICY", bad.to_str().expect("utf-8 path"))],
    );
    assert_eq!(
        run.code,
        Some(64),
        "pubwarden with PUBWARDEN_POLICY=<bad> must exit 64; output:\n{}",
        run.output()
    );
    assert_lists_every_mistake(&run, "PUBWARDEN_POLICY=<bad>");

    // A policy file that does not exist.
    let dir = scratch_dir("missing-policy");
    let settings = dir.join("settings.yaml");
    write_file(&settings, "policy: no-such-policy.yaml\n");
    let run = run_proxy(&["--config", settings.to_str().expect("utf-8 path")], &[]);
    assert_eq!(
        run.code,
        Some(64),
        "pubwarden with a missing policy file must exit 64; output:\n{}",
        run.output()
    );
    assert!(
        run.output().contains("no-such-policy.yaml"),
        "the error should name the missing file:\n{}",
        run.output()
    );
}

#[test]
fn hash_password_output_authenticates() {
    const PASSWORD: &str = "correct horse battery staple";
    let run = run_cli(
        &["hash-password"],
        format!("{PASSWORD}\n").as_bytes(),
        &[],
        secs(20),
    );
    assert_eq!(run.code, Some(0), "hash-password failed:\n{}", run.output());
    let line = run.stdout.trim().to_string();
    assert_eq!(
        line,
        hashed(PASSWORD),
        "hash-password must print sha256:<hex of the password without its newline>"
    );
    assert!(
        !run.output().contains(PASSWORD),
        "hash-password echoed the password:\n{}",
        run.output()
    );
    // Without a trailing newline: the same hash.
    let run2 = run_cli(&["hash-password"], PASSWORD.as_bytes(), &[], secs(20));
    assert_eq!(
        run2.code,
        Some(0),
        "hash-password (no newline):\n{}",
        run2.output()
    );
    assert_eq!(
        run2.stdout.trim(),
        line,
        "hash with and without a trailing newline"
    );

    // The printed line, pasted into a policy, lets the user in with the original password.
    let policy = format!(
        "auth:\n  max_failures_per_minute: 0\nusers:\n  carl:\n    passwords: [{}]\n    channels:\n      publish: [\"*\"]\n      subscribe: [\"*\"]\n",
        yq(&line)
    );
    let (_redis, proxy) = start_with_policy(&policy, "");
    let mut c = proxy.connect();
    expect_reply(&mut c, &["PING"], NOAUTH);
    expect_reply(
        &mut c,
        &["AUTH", "carl", &format!("{PASSWORD}\n")],
        WRONGPASS,
    );
    expect_reply(&mut c, &["AUTH", "carl", "correct horse"], WRONGPASS);
    expect_reply(&mut c, &["AUTH", "carl", PASSWORD], OK);
    expect_reply(&mut c, &["PUBLISH", "any", "x"], b":0\r\n");
    let mut h = proxy.connect();
    let hello = call(&mut h, &["HELLO", "3", "AUTH", "carl", PASSWORD]);
    assert!(
        hello.starts_with(b"%"),
        "HELLO 3 AUTH carl: {}",
        text(&hello)
    );
}

#[test]
fn sha256_helper_is_right() {
    // The test suite's own SHA-256, against the value in config/policy.yaml and FIPS vectors.
    assert_eq!(
        hashed("password"),
        "sha256:5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8"
    );
    assert_eq!(
        sha256_hex(b""),
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    assert_eq!(
        sha256_hex(b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
        "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
    );
}
