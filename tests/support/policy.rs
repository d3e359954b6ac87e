//! Helpers for the policy tests (`tests/policy_*.rs`): policy and settings files, pubwarden
//! started with a policy, Redis servers locked down with ACL users, one description of a user
//! turned both into a Redis `ACL SETUSER` and into a pubwarden policy entry, and scripted
//! comparisons of direct Redis ACL with pubwarden's policy.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::net::RawConn;
use super::procs::{Pubwarden, RedisServer, WaitFor, scratch_dir, wait_exit};
use super::resp::{encode, escape, escape_short};
use super::script::{Event, Session, What, diff_transcripts, run_script};

/// Redis user of the tests themselves (admin connections straight to Redis).
pub const ADMIN_USER: &str = "pw-test-admin";
pub const ADMIN_PASS: &str = "admin-secret-9f2c61";
/// Redis user pubwarden connects as (`upstream.username`), allowed everything.
pub const PROXY_USER: &str = "pubwarden-upstream";
pub const PROXY_PASS: &str = "upstream-secret-41d7e0";
/// The environment variable that carries [`PROXY_PASS`] to pubwarden.
pub const PROXY_PASS_ENV: &str = "PW_TEST_UPSTREAM_PASSWORD";

/// How long one reply may take.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------
// SHA-256 (FIPS 180-4), so the tests write `sha256:<hex>` entries without depending on the code
// under test.

const K: [u32; 64] = [
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
];

/// The SHA-256 of `data` as 64 lower-case hex digits.
pub fn sha256_hex(data: &[u8]) -> String {
    let mut h: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];
    let mut msg = data.to_vec();
    let bit_len = (data.len() as u64).wrapping_mul(8);
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&bit_len.to_be_bytes());
    for block in msg.chunks(64) {
        let mut w = [0u32; 64];
        for (i, word) in block.chunks(4).enumerate() {
            w[i] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16]
                .wrapping_add(s0)
                .wrapping_add(w[i - 7])
                .wrapping_add(s1);
        }
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut hh] = h;
        for i in 0..64 {
            let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
            let ch = (e & f) ^ (!e & g);
            let t1 = hh
                .wrapping_add(s1)
                .wrapping_add(ch)
                .wrapping_add(K[i])
                .wrapping_add(w[i]);
            let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
            let maj = (a & b) ^ (a & c) ^ (b & c);
            let t2 = s0.wrapping_add(maj);
            hh = g;
            g = f;
            f = e;
            e = d.wrapping_add(t1);
            d = c;
            c = b;
            b = a;
            a = t1.wrapping_add(t2);
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e, f, g, hh]) {
            *x = x.wrapping_add(y);
        }
    }
    h.iter().map(|x| format!("{x:08x}")).collect()
}

/// A policy password entry: `sha256:<hex>` of `password`.
pub fn hashed(password: &str) -> String {
    format!("sha256:{}", sha256_hex(password.as_bytes()))
}

/// A YAML double-quoted scalar.
pub fn yq(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// A YAML flow list of double-quoted scalars.
pub fn yaml_list(items: &[&str]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| yq(s)).collect();
    format!("[{}]", quoted.join(", "))
}

// ---------------------------------------------------------------------------------------------
// Files and processes.

/// Writes `policy.yaml` (the policy) and `settings.yaml` (`policy: policy.yaml` followed by
/// `extra_settings`) into a fresh scratch directory; returns the settings file's path.
pub fn write_settings(policy_yaml: &str, extra_settings: &str) -> PathBuf {
    let dir = scratch_dir("policy");
    write_file(&dir.join("policy.yaml"), policy_yaml);
    let settings = dir.join("settings.yaml");
    write_file(&settings, &format!("policy: policy.yaml\n{extra_settings}"));
    settings
}

pub fn write_file(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// Pubwarden in front of `upstream` with `policy_yaml` (via the settings file's `policy:` key)
/// and `extra_settings` appended to the settings file; `env` is added to its environment.
pub fn start_pubwarden_with_policy(
    upstream: &RedisServer,
    policy_yaml: &str,
    extra_settings: &str,
    env: &[(&str, &str)],
) -> Pubwarden {
    let settings = write_settings(policy_yaml, extra_settings);
    Pubwarden::start_custom(upstream.port(), Some(&settings), WaitFor::Ready, &[], env)
}

/// A fresh Redis (open, default user allowed everything) and pubwarden in front of it with
/// `policy_yaml`; `extra_settings` is appended to the settings file.
pub fn start_with_policy(policy_yaml: &str, extra_settings: &str) -> (RedisServer, Pubwarden) {
    let redis = RedisServer::start();
    let proxy = start_pubwarden_with_policy(&redis, policy_yaml, extra_settings, &[]);
    (redis, proxy)
}

/// What a finished CLI run left behind.
#[derive(Debug)]
pub struct CliRun {
    /// The exit code; None if it was killed after the timeout (or died of a signal).
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CliRun {
    /// stdout and stderr together (where a message lands is not part of the interface).
    pub fn output(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

/// Runs `pubwarden <args>` with `stdin` as its input, extra `env`, in the package root (as
/// `cargo test` does); killed after `timeout`.
pub fn run_cli(args: &[&str], stdin: &[u8], env: &[(&str, &str)], timeout: Duration) -> CliRun {
    let dir = scratch_dir("policy-cli");
    let out_path = dir.join("stdout");
    let err_path = dir.join("stderr");
    let mut child = Command::new(Pubwarden::bin())
        .args(args)
        .envs(env.iter().copied())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::piped())
        .stdout(std::fs::File::create(&out_path).expect("create stdout file"))
        .stderr(std::fs::File::create(&err_path).expect("create stderr file"))
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", Pubwarden::bin()));
    {
        let mut input = child.stdin.take().expect("piped stdin");
        // The child may exit without reading (e.g. a usage error): ignore a broken pipe.
        let _ = input.write_all(stdin);
    }
    let code = match wait_exit(&mut child, timeout) {
        Some(status) => status.code(),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            None
        }
    };
    let read =
        |p: &Path| String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned();
    CliRun {
        code,
        stdout: read(&out_path),
        stderr: read(&err_path),
    }
}

// ---------------------------------------------------------------------------------------------
// Raw connections.

/// Sends one command and returns its reply frame (panics if none arrives in time).
pub fn call(c: &mut RawConn, args: &[&str]) -> Vec<u8> {
    c.send(&encode(args));
    let got = c.read_frames(1, REPLY_TIMEOUT);
    match got.frames.into_iter().next() {
        Some(f) => f,
        None => panic!(
            "{args:?}: no reply ({:?}), incomplete bytes {}",
            got.stop,
            escape_short(&got.partial, 200)
        ),
    }
}

/// Sends one command and asserts its reply bytes.
pub fn expect_reply(c: &mut RawConn, args: &[&str], want: &[u8]) {
    let got = call(c, args);
    assert_eq!(
        escape(&got),
        escape(want),
        "reply to {args:?} (got, wanted)"
    );
}

/// The reply as text, for messages.
pub fn text(frame: &[u8]) -> String {
    escape(frame)
}

pub const OK: &[u8] = b"+OK\r\n";
pub const NOAUTH: &[u8] = b"-NOAUTH Authentication required.\r\n";
pub const WRONGPASS: &[u8] = b"-WRONGPASS invalid username-password pair or user is disabled.\r\n";
pub const NOPERM_CHANNEL: &[u8] =
    b"-NOPERM this user has no permissions to access one of the channels used as arguments\r\n";

/// `-NOPERM this user has no permissions to run the '<cmd>' command`.
pub fn noperm_command(cmd: &str) -> Vec<u8> {
    format!("-NOPERM this user has no permissions to run the '{cmd}' command\r\n").into_bytes()
}

/// A RESP2 `message` delivery.
pub fn message(channel: &str, payload: &str) -> Vec<u8> {
    encode_array(&["message", channel, payload])
}

/// A RESP2 array of bulk strings (the shape of confirmations and deliveries).
pub fn encode_array(items: &[&str]) -> Vec<u8> {
    // A reply array of bulks has the same bytes as a request multibulk.
    encode(items)
}

// ---------------------------------------------------------------------------------------------
// Redis with ACL users.

/// Locks a fresh Redis down: adds [`ADMIN_USER`] and [`PROXY_USER`] (both allowed everything)
/// and disables the `default` user, so every client must AUTH. Returns an admin connection.
pub fn lock_down(redis: &RedisServer) -> RawConn {
    let mut c = RawConn::connect(redis.addr());
    for (user, pass) in [(ADMIN_USER, ADMIN_PASS), (PROXY_USER, PROXY_PASS)] {
        let pass = format!(">{pass}");
        expect_reply(
            &mut c,
            &[
                "ACL", "SETUSER", user, "reset", "on", &pass, "~*", "&*", "+@all",
            ],
            OK,
        );
    }
    expect_reply(&mut c, &["AUTH", ADMIN_USER, ADMIN_PASS], OK);
    expect_reply(&mut c, &["ACL", "SETUSER", "default", "reset", "off"], OK);
    c
}

/// A connection to a locked-down Redis, authenticated as [`ADMIN_USER`].
pub fn admin(redis: &RedisServer) -> RawConn {
    let mut c = RawConn::connect(redis.addr());
    expect_reply(&mut c, &["AUTH", ADMIN_USER, ADMIN_PASS], OK);
    c
}

/// One user, described once and expressed both as a Redis ACL user and as a pubwarden policy
/// user, so the two express the same rules.
///
/// Redis has a single channel list per user, so `channels` is used for both `publish` and
/// `subscribe`, and there is no `deny` list. Commands: Redis applies its rules in order, so the
/// ACL is built as allowed categories, then denied categories, then allowed command names,
/// then denied command names; that is the policy's "a rule naming a command beats a category;
/// among categories deny wins".
#[derive(Debug, Clone)]
pub struct AclUser {
    pub name: &'static str,
    /// None: `nopass`.
    pub password: Option<&'static str>,
    pub enabled: bool,
    pub channels: Vec<&'static str>,
    /// `(allow, deny)`; None leaves `commands` out of the policy (the safe default).
    pub commands: Option<(Vec<&'static str>, Vec<&'static str>)>,
}

/// The policy's documented default command rules, for a user that does not say.
pub const SAFE_DEFAULT_ALLOW: &[&str] = &["@pubsub", "@connection", "@read", "@transaction"];
pub const SAFE_DEFAULT_DENY: &[&str] = &["@dangerous", "@admin", "@scripting"];

impl AclUser {
    pub fn new(name: &'static str, password: &'static str) -> AclUser {
        AclUser {
            name,
            password: Some(password),
            enabled: true,
            channels: Vec::new(),
            commands: None,
        }
    }

    pub fn nopass(name: &'static str) -> AclUser {
        AclUser {
            password: None,
            ..AclUser::new(name, "")
        }
    }

    pub fn disabled(mut self) -> AclUser {
        self.enabled = false;
        self
    }

    pub fn channels(mut self, channels: &[&'static str]) -> AclUser {
        self.channels = channels.to_vec();
        self
    }

    pub fn commands(mut self, allow: &[&'static str], deny: &[&'static str]) -> AclUser {
        self.commands = Some((allow.to_vec(), deny.to_vec()));
        self
    }

    /// The `ACL SETUSER` arguments for Redis.
    pub fn redis_acl(&self) -> Vec<String> {
        let mut a: Vec<String> = ["ACL", "SETUSER", self.name, "reset"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.push(if self.enabled { "on" } else { "off" }.into());
        match self.password {
            Some(p) => a.push(format!(">{p}")),
            None => a.push("nopass".into()),
        }
        // The policy has no key rules: Redis must not check keys either.
        a.push("~*".into());
        a.push("resetchannels".into());
        for ch in &self.channels {
            a.push(format!("&{ch}"));
        }
        let (allow, deny): (Vec<&str>, Vec<&str>) = match &self.commands {
            Some((allow, deny)) => (allow.clone(), deny.clone()),
            None => (SAFE_DEFAULT_ALLOW.to_vec(), SAFE_DEFAULT_DENY.to_vec()),
        };
        // Categories first (allowed, then denied), then command names (allowed, then denied).
        for (sign, list, categories) in [
            ('+', &allow, true),
            ('-', &deny, true),
            ('+', &allow, false),
            ('-', &deny, false),
        ] {
            for rule in list.iter() {
                if rule.starts_with('@') == categories {
                    a.push(format!("{sign}{rule}"));
                }
            }
        }
        a
    }

    /// This user's entry under `users:` in a policy file (indented by two spaces).
    pub fn policy_yaml(&self) -> String {
        let mut y = format!("  {}:\n", yq(self.name));
        y.push_str(&format!("    enabled: {}\n", self.enabled));
        match self.password {
            Some(p) => y.push_str(&format!("    passwords:\n      - {}\n", yq(&hashed(p)))),
            None => y.push_str("    nopass: true\n"),
        }
        y.push_str(&format!(
            "    channels:\n      publish: {}\n      subscribe: {}\n",
            yaml_list(&self.channels),
            yaml_list(&self.channels)
        ));
        if let Some((allow, deny)) = &self.commands {
            y.push_str(&format!(
                "    commands:\n      allow: {}\n      deny: {}\n",
                yaml_list(allow),
                yaml_list(deny)
            ));
        }
        y
    }
}

/// A whole enforce-mode policy for `users`, with the failed-AUTH limit off (the comparisons
/// send many wrong passwords on purpose).
pub fn policy_for(users: &[AclUser]) -> String {
    let mut y = String::from(
        "mode: enforce\nallow_plaintext_passwords: false\nauth:\n  max_failures_per_minute: 0\nusers:\n",
    );
    for u in users {
        y.push_str(&u.policy_yaml());
    }
    y
}

/// How pubwarden gets [`PROXY_PASS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Secret {
    /// `upstream.password: {env: PW_TEST_UPSTREAM_PASSWORD}`.
    Env,
    /// `upstream.password: {file: <path>}`.
    File,
}

/// One comparison script: a name, substrings that the direct-Redis transcript must contain
/// (so a mistake in the Redis side of the fixture cannot go unnoticed), and the script.
pub struct PolicyCase {
    pub name: &'static str,
    pub anchors: Vec<&'static str>,
    pub script: Box<dyn Fn(&mut Session)>,
}

/// A case; see [`PolicyCase`].
pub fn case(
    name: &'static str,
    anchors: &[&'static str],
    script: impl Fn(&mut Session) + 'static,
) -> PolicyCase {
    PolicyCase {
        name,
        anchors: anchors.to_vec(),
        script: Box::new(script),
    }
}

/// Real Redis ACL next to pubwarden's policy for the same users.
///
/// - `direct`: a Redis with the users as ACL users (and its own `default` user disabled unless
///   `users` defines `default`), which the scripts talk to directly;
/// - `upstream`: a locked-down Redis that knows none of the users, only [`PROXY_USER`], which
///   pubwarden uses (`upstream.username`/`upstream.password`);
/// - `proxy`: pubwarden with the equivalent policy (None with `PUBWARDEN_TESTS_SELF_CHECK=1`,
///   where the scripts run twice against `direct` to validate themselves).
pub struct AclFixture {
    pub direct: RedisServer,
    pub upstream: RedisServer,
    pub proxy: Option<Pubwarden>,
    pub users: Vec<AclUser>,
}

impl AclFixture {
    pub fn start(users: &[AclUser], secret: Secret) -> AclFixture {
        let direct = RedisServer::start();
        let mut admin_direct = lock_down(&direct);
        for u in users {
            let args = u.redis_acl();
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            expect_reply(&mut admin_direct, &args, OK);
        }
        let upstream = RedisServer::start();
        lock_down(&upstream);
        let self_check = std::env::var_os("PUBWARDEN_TESTS_SELF_CHECK").is_some();
        let proxy = (!self_check).then(|| {
            let policy = policy_for(users);
            match secret {
                Secret::Env => start_pubwarden_with_policy(
                    &upstream,
                    &policy,
                    &format!(
                        "upstream:\n  username: {PROXY_USER}\n  password:\n    env: {PROXY_PASS_ENV}\n"
                    ),
                    &[(PROXY_PASS_ENV, PROXY_PASS)],
                ),
                Secret::File => {
                    let dir = scratch_dir("upstream-secret");
                    let path = dir.join("password");
                    // A mounted Secret usually ends with a newline.
                    write_file(&path, &format!("{PROXY_PASS}\n"));
                    start_pubwarden_with_policy(
                        &upstream,
                        &policy,
                        &format!(
                            "upstream:\n  username: {PROXY_USER}\n  password:\n    file: {}\n",
                            yq(path.to_str().expect("utf-8 path"))
                        ),
                        &[],
                    )
                }
            }
        });
        AclFixture {
            direct,
            upstream,
            proxy,
            users: users.to_vec(),
        }
    }

    /// Where the compared runs go: pubwarden, or direct Redis again in self-check mode.
    pub fn target(&self) -> SocketAddr {
        self.proxy.as_ref().map_or(self.direct.addr(), |p| p.addr())
    }

    /// Runs every case against direct Redis (strict) and through pubwarden, and panics with
    /// every difference at once. `PUBWARDEN_TESTS_SHOW_DIRECT=1` prints the direct frames.
    pub fn compare(&self, name: &str, cases: Vec<PolicyCase>) {
        let self_check = self.proxy.is_none();
        let mut failures = Vec::new();
        for c in &cases {
            let want = run_script(self.direct.addr(), true, c.script.as_ref());
            let frames = direct_frames(&want);
            if std::env::var_os("PUBWARDEN_TESTS_SHOW_DIRECT").is_some() {
                eprintln!("{name}: case {}: direct Redis frames:", c.name);
                for f in &frames {
                    eprintln!("    {f}");
                }
            }
            let missing: Vec<&str> = c
                .anchors
                .iter()
                .copied()
                .filter(|a| !frames.iter().any(|f| f.contains(a)))
                .collect();
            assert!(
                missing.is_empty(),
                "{name}: case {}: the direct-Redis run lacks {missing:?}: the test's ACL fixture \
                 is wrong. Frames: {frames:#?}",
                c.name
            );
            let got = run_script(self.target(), self_check, c.script.as_ref());
            if let Some(report) = diff_transcripts(&want, &got) {
                failures.push(format!("case {}: {report}", c.name));
            }
        }
        if !failures.is_empty() {
            panic!(
                "{name}: {} of {} cases differ between Redis ACL and pubwarden's policy:\n\n{}",
                failures.len(),
                cases.len(),
                failures.join("\n")
            );
        }
    }

    /// Asserts that the upstream Redis never saw a client's credentials: its ACL LOG is empty
    /// (a forwarded AUTH of a user it does not know would be logged) and every connection
    /// there belongs to [`PROXY_USER`] (or to this admin connection). `expect_proxy_conn`
    /// also requires at least one of pubwarden's connections to be open now.
    pub fn assert_upstream_saw_only_pubwarden(&self, expect_proxy_conn: bool) {
        assert_upstream_saw_only_pubwarden(&self.upstream, expect_proxy_conn);
    }
}

/// See [`AclFixture::assert_upstream_saw_only_pubwarden`].
pub fn assert_upstream_saw_only_pubwarden(upstream: &RedisServer, expect_proxy_conn: bool) {
    let mut a = admin(upstream);
    let log = call(&mut a, &["ACL", "LOG"]);
    assert_eq!(
        text(&log),
        "*0\\r\\n",
        "the upstream Redis logged ACL events (a client's AUTH reached it?): {}",
        text(&log)
    );
    let list = call(&mut a, &["CLIENT", "LIST"]);
    let list = String::from_utf8_lossy(&list).into_owned();
    let users: Vec<&str> = list
        .lines()
        .filter_map(|l| l.split(' ').find_map(|f| f.strip_prefix("user=")))
        .collect();
    let strangers: Vec<&&str> = users
        .iter()
        .filter(|u| **u != PROXY_USER && **u != ADMIN_USER)
        .collect();
    assert!(
        strangers.is_empty(),
        "the upstream Redis has connections of users other than pubwarden's: {strangers:?}\n{list}"
    );
    if expect_proxy_conn {
        assert!(
            users.contains(&PROXY_USER),
            "no connection of pubwarden's user {PROXY_USER} on the upstream Redis:\n{list}"
        );
    }
}

/// The frames received in a transcript, as escaped text.
fn direct_frames(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match &e.what {
            What::Frame(f) => Some(escape(f)),
            _ => None,
        })
        .collect()
}
