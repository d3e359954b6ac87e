//! Checks of the Helm charts under `helm/` that need no helm binary (helm is
//! not installable on the CI machines; `helm lint` / `helm template` are for
//! machines that have it, see docs/kubernetes.md):
//!
//! - the settings and policy the chart mounts, from every values file of
//!   `VALUES_FILES` (the defaults, the example app's values, the TLS test
//!   values under `helm/pubwarden/ci/`), pass `pubwarden check-config`, with
//!   real PEM certificates and keys where the chart mounts TLS Secrets;
//! - those values files validate against values.schema.json, and mistyped
//!   values are rejected;
//! - the settings keys the chart owns (TLS ones included) are refused in
//!   `config.settings`;
//! - every `.Values.x` the templates read exists in values.yaml;
//! - every YAML and JSON file outside `templates/` parses;
//! - the chart's copies of the alert rules and dashboards equal
//!   `dashboards/`, and the rules pass `promtool check rules`.
//!
//! YAML and JSON Schema work is done by `helm/chart_check.py` (PyYAML and
//! jsonschema; Debian: `apt-get install python3-yaml python3-jsonschema`);
//! the test certificates by the `openssl` command it calls (Debian:
//! `apt-get install openssl`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

const INSTALL_HINT: &str = "install them with `apt-get install -y python3-yaml python3-jsonschema` \
     (bash .ci/run does), or point PUBWARDEN_TEST_PYTHON at a python3 that has PyYAML and jsonschema";

/// chart_check.py's exit status when the openssl command is missing.
const NO_OPENSSL: i32 = 4;

const OPENSSL_HINT: &str = "the chart checks make test certificates for the TLS Secrets the chart \
     mounts with the openssl command; install it with `apt-get install -y openssl`";

/// How a values file applies to the pubwarden chart.
#[derive(Clone, Copy, Debug)]
enum Applies {
    /// It is the chart's values.yaml.
    Chart,
    /// Over the chart's values.yaml, as `helm install -f FILE` (and
    /// chart-testing, for `ci/*-values.yaml`) does.
    Over,
    /// Its `pubwarden:` section, in an app chart that depends on this one.
    Subchart,
}

/// A values file the chart is checked with, and lines `pubwarden
/// check-config` must print for what the chart renders from it.
struct ValuesFile {
    /// Relative to the repository root.
    path: &'static str,
    applies: Applies,
    expect: &'static [&'static str],
}

/// Every values file the chart checks run over. Each file under
/// `helm/pubwarden/ci/` must be here (`ci_values_files_are_all_checked`).
const VALUES_FILES: &[ValuesFile] = &[
    ValuesFile {
        path: "helm/pubwarden/values.yaml",
        applies: Applies::Chart,
        expect: &[
            "listen: 0.0.0.0:6380",
            "drain_timeout: 10000ms",
            "No policy",
        ],
    },
    ValuesFile {
        path: "helm/example-app/values.yaml",
        applies: Applies::Subchart,
        expect: &[
            // Sidecar: only the pod's own containers reach the RESP port.
            "listen: 127.0.0.1:6380",
            "policy: mode enforce",
            "password: <redacted, from file",
        ],
    },
    ValuesFile {
        path: "helm/pubwarden/ci/tls-gateway-values.yaml",
        applies: Applies::Over,
        expect: &[
            "listen: 0.0.0.0:6380",
            // The TLS listener on the gateway's address, mTLS optional, the
            // client CA from its own Secret; handshake_timeout passed through
            // from config.settings.tls.
            "\ntls:\n  listen: 0.0.0.0:6390\n",
            "/etc/pubwarden/tls/tls.crt\n",
            "/etc/pubwarden/tls/tls.key\n",
            "client_ca_file: ",
            "/etc/pubwarden/tls-client-ca/ca.crt\n",
            "client_auth: optional",
            "handshake_timeout: 3000ms",
            "only: false",
            // TLS to Redis with a CA, a name and a client certificate.
            "/etc/pubwarden/upstream-ca/ca.crt\n",
            "server_name: redis-master.redis.svc.cluster.local",
            "/etc/pubwarden/upstream-client/tls.crt\n",
            "/etc/pubwarden/upstream-client/tls.key\n",
            "insecure_skip_verify: false",
            "policy: mode enforce",
        ],
    },
    ValuesFile {
        path: "helm/pubwarden/ci/tls-sidecar-values.yaml",
        applies: Applies::Over,
        expect: &[
            // Plaintext for the app in the pod; TLS on the pod's address.
            "listen: 127.0.0.1:6380",
            "\ntls:\n  listen: 0.0.0.0:6390\n",
            // Client certificates verified against ca.crt of the same Secret.
            "/etc/pubwarden/tls/ca.crt\n",
            "client_auth: required",
            "/etc/pubwarden/upstream-ca/server-ca.pem\n",
            "insecure_skip_verify: false",
            "No policy",
        ],
    },
];

impl ValuesFile {
    fn path(&self) -> PathBuf {
        root().join(self.path)
    }

    /// chart_check.py arguments that apply the file to the chart.
    fn args(&self) -> Vec<String> {
        let defaults = path_str(&chart().join("values.yaml")).to_string();
        match self.applies {
            Applies::Chart => vec![],
            Applies::Over => vec!["--defaults".into(), defaults],
            Applies::Subchart => vec!["--subchart".into(), "pubwarden".into(), defaults],
        }
    }
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn chart() -> PathBuf {
    root().join("helm/pubwarden")
}

fn example_app() -> PathBuf {
    root().join("helm/example-app")
}

/// A python3 that can import yaml and jsonschema; panics with an install hint
/// when there is none (the test never skips).
fn python() -> &'static str {
    static PYTHON: OnceLock<String> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let mut candidates = Vec::new();
        if let Ok(p) = std::env::var("PUBWARDEN_TEST_PYTHON") {
            candidates.push(p);
        }
        candidates.push("python3".into());
        candidates.push("/usr/bin/python3".into());
        let mut tried = Vec::new();
        for c in candidates {
            match Command::new(&c)
                .args(["-c", "import yaml, jsonschema"])
                .output()
            {
                Ok(out) if out.status.success() => return c,
                Ok(out) => tried.push(format!(
                    "{c}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )),
                Err(e) => tried.push(format!("{c}: {e}")),
            }
        }
        panic!(
            "no python3 with PyYAML and jsonschema found ({}); {INSTALL_HINT}",
            tried.join("; ")
        );
    })
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    if out.status.code() == Some(3) {
        panic!(
            "{cmd:?}: {}; {INSTALL_HINT}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    if out.status.code() == Some(NO_OPENSSL) {
        panic!(
            "{cmd:?}: {}; {OPENSSL_HINT}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs helm/chart_check.py with these arguments.
fn chart_check(args: &[&str]) -> Output {
    run(Command::new(python())
        .arg(root().join("helm/chart_check.py"))
        .args(args))
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// A fresh temporary directory for one test.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pubwarden-helm-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// Renders what the chart mounts for these values (see chart_check.py
/// `render`) and runs `pubwarden check-config` on it with the chart's
/// environment variables. Returns check-config's output.
fn check_config(values: &Path, extra: &[&str], dir: &Path) -> String {
    let mut args = vec!["render", path_str(values), path_str(dir)];
    args.extend_from_slice(extra);
    let out = chart_check(&args);
    assert!(
        out.status.success(),
        "rendering {} failed:\n{}",
        values.display(),
        text(&out)
    );
    let env = std::fs::read_to_string(dir.join("env")).expect("env file");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pubwarden"));
    for var in [
        "PUBWARDEN_CONFIG",
        "PUBWARDEN_POLICY",
        "PUBWARDEN_LISTEN",
        "PUBWARDEN_UPSTREAM",
        "PUBWARDEN_ADMIN_LISTEN",
    ] {
        cmd.env_remove(var);
    }
    for line in env.lines() {
        let (k, v) = line.split_once('=').expect("NAME=VALUE");
        cmd.env(k, v);
    }
    cmd.arg("check-config").arg(dir.join("pubwarden.yaml"));
    let out = run(&mut cmd);
    assert!(
        out.status.success(),
        "pubwarden check-config rejected what the chart renders from {}:\n{}",
        values.display(),
        text(&out)
    );
    text(&out)
}

/// `check_config` for one of `VALUES_FILES`, with its expectations.
fn check_values_file(vf: &ValuesFile, extra: &[&str], dir: &Path) -> String {
    let mut args: Vec<&str> = extra.to_vec();
    let applies = vf.args();
    args.extend(applies.iter().map(String::as_str));
    let out = check_config(&vf.path(), &args, dir);
    for needle in vf.expect {
        assert!(
            out.contains(needle),
            "check-config output for {} lacks `{needle}`:\n{out}",
            vf.path
        );
    }
    out
}

#[test]
fn values_files_pass_check_config() {
    for (i, vf) in VALUES_FILES.iter().enumerate() {
        let dir = temp_dir(&format!("values-{i}"));
        check_values_file(vf, &[], &dir);
        match vf.applies {
            Applies::Chart => {
                // The default policy content is off by default; check it as if enabled.
                let dir = temp_dir(&format!("values-{i}-policy"));
                let out = check_config(&vf.path(), &["--enable-policy"], &dir);
                assert!(out.contains("policy: mode audit"), "{out}");
            }
            Applies::Subchart => {
                // The app's policy map replaces the chart's default policy (a
                // string) whole: no audit-mode `default` user with @all is
                // merged in.
                let policy = read(&dir.join("policy.yaml"));
                assert!(!policy.contains("audit"), "{policy}");
            }
            Applies::Over => {}
        }
    }
}

#[test]
fn ci_values_files_are_all_checked() {
    let ci = chart().join("ci");
    let mut found = 0;
    for entry in std::fs::read_dir(&ci).unwrap_or_else(|e| panic!("{}: {e}", ci.display())) {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        assert!(
            name.ends_with("-values.yaml"),
            "helm/pubwarden/ci/{name}: chart-testing reads only *-values.yaml there"
        );
        let path = format!("helm/pubwarden/ci/{name}");
        assert!(
            VALUES_FILES.iter().any(|vf| vf.path == path),
            "{path} is not in VALUES_FILES of tests/helm_chart.rs"
        );
        found += 1;
    }
    assert!(
        found >= 2,
        "the TLS test values are missing from helm/pubwarden/ci/"
    );
}

#[test]
fn tls_material_is_real_and_matching() {
    // The render step writes real certificates where the chart mounts TLS
    // Secrets, so check-config's key/certificate checks mean something: a
    // key that does not belong to the certificate is refused.
    let vf = VALUES_FILES
        .iter()
        .find(|vf| vf.path.ends_with("tls-gateway-values.yaml"))
        .unwrap();
    let dir = temp_dir("tls-mismatch");
    check_values_file(vf, &[], &dir);
    let mounted = dir.join("root/etc/pubwarden");
    let cert = read(&mounted.join("tls/tls.crt"));
    assert!(cert.starts_with("-----BEGIN CERTIFICATE-----"), "{cert}");
    std::fs::copy(
        mounted.join("upstream-client/tls.key"),
        mounted.join("tls/tls.key"),
    )
    .unwrap();
    let env = read(&dir.join("env"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pubwarden"));
    for var in [
        "PUBWARDEN_CONFIG",
        "PUBWARDEN_POLICY",
        "PUBWARDEN_LISTEN",
        "PUBWARDEN_UPSTREAM",
        "PUBWARDEN_ADMIN_LISTEN",
    ] {
        cmd.env_remove(var);
    }
    for line in env.lines() {
        let (k, v) = line.split_once('=').expect("NAME=VALUE");
        cmd.env(k, v);
    }
    let out = run(cmd.arg("check-config").arg(dir.join("pubwarden.yaml")));
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("tls.key_file"),
        "the mismatched key should be reported at tls.key_file:\n{}",
        text(&out)
    );
}

#[test]
fn chart_owned_tls_settings_are_refused() {
    // What templates/_helpers.tpl `fail`s on, as the render step reports it.
    let dir = temp_dir("tls-refused");
    let defaults = chart().join("values.yaml");
    let cases = [
        (
            "tls:\n  enabled: true\n  secretName: gw-tls\nconfig:\n  settings:\n    tls:\n      listen: 0.0.0.0:6390\n",
            "config.settings.tls.listen is set by the chart when tls.enabled is true",
        ),
        (
            "tls:\n  enabled: true\n  secretName: gw-tls\nconfig:\n  settings:\n    tls:\n      cert_file: /x/tls.crt\n",
            "config.settings.tls.cert_file is set by the chart",
        ),
        (
            "upstreamTls:\n  enabled: true\nconfig:\n  settings:\n    upstream:\n      address: rediss://r:6380\n      tls:\n        server_name: r\n",
            "config.settings.upstream.tls.server_name is set by the chart when upstreamTls.enabled is true",
        ),
        (
            "upstreamTls:\n  enabled: true\nconfig:\n  settings:\n    upstream:\n      address: redis://r:6379\n",
            "contradicts config.settings.upstream.address redis://",
        ),
        (
            "tls:\n  enabled: true\n",
            "tls.enabled needs tls.secretName",
        ),
        (
            "tls:\n  enabled: true\n  secretName: gw-tls\n  port: 6380\n",
            "tls.port (6380) must differ from ports.resp",
        ),
        (
            "tls:\n  enabled: true\n  secretName: gw-tls\n  port: 9480\n  only: true\n",
            "tls.port (9480) must differ from ports.admin",
        ),
        (
            "upstreamTls:\n  enabled: true\n  caSecretName: ca\n  insecureSkipVerify: true\n",
            "upstreamTls.insecureSkipVerify contradicts upstreamTls.caSecretName",
        ),
    ];
    for (i, (values, expect)) in cases.iter().enumerate() {
        let file = dir.join(format!("refused-{i}.yaml"));
        std::fs::write(&file, values).unwrap();
        let out = chart_check(&[
            "render",
            path_str(&file),
            path_str(&dir.join(format!("out-{i}"))),
            "--defaults",
            path_str(&defaults),
        ]);
        assert!(
            !out.status.success(),
            "the chart accepted\n{values}\n{}",
            text(&out)
        );
        assert!(
            text(&out).contains(expect),
            "the refusal of\n{values}should say `{expect}`:\n{}",
            text(&out)
        );
    }
}

#[test]
fn tls_settings_by_hand_pass_check_config() {
    // The escape hatch: with tls.enabled off, `tls:` in config.settings with
    // files from secretMounts is the user's own and is checked like the
    // chart's.
    let dir = temp_dir("tls-by-hand");
    let file = dir.join("values.yaml");
    std::fs::write(
        &file,
        "secretMounts:\n  - name: own-tls\n    secretName: own-tls\n\
         config:\n  settings:\n    tls:\n      listen: 0.0.0.0:7443\n\
         \x20     cert_file: /etc/pubwarden/secrets/own-tls/tls.crt\n\
         \x20     key_file: /etc/pubwarden/secrets/own-tls/tls.key\n\
         \x20     client_ca_file: /etc/pubwarden/secrets/own-tls/ca.crt\n",
    )
    .unwrap();
    let defaults = chart().join("values.yaml");
    let out = check_config(
        &file,
        &["--defaults", path_str(&defaults)],
        &dir.join("out"),
    );
    assert!(out.contains("\ntls:\n  listen: 0.0.0.0:7443\n"), "{out}");
    // pubwarden's default with a client CA.
    assert!(out.contains("client_auth: required"), "{out}");
    // A TLS file in no mounted directory would not exist in the pod.
    std::fs::write(
        &file,
        "config:\n  settings:\n    tls:\n      listen: 0.0.0.0:7443\n\
         \x20     cert_file: /certs/tls.crt\n      key_file: /certs/tls.key\n",
    )
    .unwrap();
    let out = chart_check(&[
        "render",
        path_str(&file),
        path_str(&dir.join("out-unmounted")),
        "--defaults",
        path_str(&defaults),
    ]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("config.settings.tls.cert_file: /certs/tls.crt is not in a directory the container mounts"),
        "{}",
        text(&out)
    );
}

#[test]
fn values_validate_against_the_schema() {
    let schema = chart().join("values.schema.json");
    for vf in VALUES_FILES {
        let path = vf.path();
        let mut args = vec!["validate", path_str(&schema), path_str(&path)];
        let applies = vf.args();
        args.extend(applies.iter().map(String::as_str));
        let out = chart_check(&args);
        assert!(out.status.success(), "{}: {}", vf.path, text(&out));
    }
}

#[test]
fn mistyped_values_are_rejected_by_the_schema() {
    let schema = chart().join("values.schema.json");
    let dir = temp_dir("mistyped");
    // (values file, text the error must contain: the key path, mostly)
    let cases = [
        ("replicaCount: \"3\"\n", ": replicaCount: "),
        ("replicas: 3\n", "'replicas' was unexpected"),
        ("mode: sidecars\n", ": mode: "),
        (
            "image:\n  repository: pubwarden\n  tag: 1.0\n",
            ": image.tag: ",
        ),
        ("service:\n  port: 70000\n", ": service.port: "),
        (
            "ports:\n  resp: \"6380\"\n  admin: 9480\n",
            ": ports.resp: ",
        ),
        (
            "podAnnotations:\n  sidecar.istio.io/inject: false\n",
            ": podAnnotations.sidecar.istio.io/inject: ",
        ),
        (
            "dashboards:\n  labels:\n    grafana_dashboard: 1\n",
            ": dashboards.labels.grafana_dashboard: ",
        ),
        (
            "resources:\n  limits:\n    memory: 256MB\n",
            ": resources.limits.memory: ",
        ),
        (
            "shutdown:\n  drainTimeoutSeconds: 10s\n  preStopSleepSeconds: 5\n  extraGraceSeconds: 5\n",
            ": shutdown.drainTimeoutSeconds: ",
        ),
        (
            "config:\n  settings:\n    shutdown:\n      drain_timeout: 30s\n",
            ": config.settings.shutdown.drain_timeout: ",
        ),
        (
            "config:\n  settings:\n    listen: 0.0.0.0:6380\n",
            ": config.settings.listen: ",
        ),
        (
            "config:\n  settings:\n    log:\n      format: yaml\n",
            ": config.settings.log.format: ",
        ),
        ("policy:\n  enabled: yes please\n", ": policy.enabled: "),
        (
            "policy:\n  content:\n    mode: enforcing\n",
            ": policy.content.mode: ",
        ),
        (
            "secretMounts:\n  - name: Redis_Auth\n    secretName: x\n",
            ": secretMounts.0.name: ",
        ),
        ("secretMounts:\n  - secret: x\n", ": secretMounts.0: "),
        (
            "metrics:\n  serviceMonitor:\n    enabled: \"true\"\n",
            ": metrics.serviceMonitor.enabled: ",
        ),
        ("podAntiAffinity: always\n", ": podAntiAffinity: "),
        ("tls:\n  enabled: \"true\"\n", ": tls.enabled: "),
        ("tls:\n  port: 0\n", ": tls.port: "),
        ("tls:\n  clientAuth: require\n", ": tls.clientAuth: "),
        ("tls:\n  secretName: My_Cert\n", ": tls.secretName: "),
        ("tls:\n  clientCaKey: \"ca/crt\"\n", ": tls.clientCaKey: "),
        (
            "tls:\n  port: 6390\n  onlyTls: true\n",
            "'onlyTls' was unexpected",
        ),
        // Enabled without its Secret.
        (
            "tls:\n  enabled: true\n  secretName: \"\"\n",
            ": tls.secretName: ",
        ),
        // Chart-owned keys, refused only when the chart manages TLS.
        (
            "tls:\n  enabled: true\n  secretName: gw-tls\nconfig:\n  settings:\n    tls:\n      listen: 0.0.0.0:6390\n",
            ": config.settings.tls.listen: ",
        ),
        (
            "tls:\n  enabled: true\n  secretName: gw-tls\nconfig:\n  settings:\n    tls:\n      client_auth: required\n",
            ": config.settings.tls.client_auth: ",
        ),
        (
            "upstreamTls:\n  enabled: true\nconfig:\n  settings:\n    upstream:\n      tls:\n        ca_file: /etc/ca.crt\n",
            ": config.settings.upstream.tls.ca_file: ",
        ),
        (
            "upstreamTls:\n  enabled: true\nconfig:\n  settings:\n    upstream:\n      address: redis://r:6379\n",
            ": config.settings.upstream.address: ",
        ),
        (
            "upstreamTls:\n  enabled: true\n  caSecretName: redis-ca\n  insecureSkipVerify: true\n",
            ": upstreamTls.insecureSkipVerify: ",
        ),
        (
            "upstreamTls:\n  insecureSkipVerify: \"no\"\n",
            ": upstreamTls.insecureSkipVerify: ",
        ),
        (
            "upstreamTls:\n  caSecretName: Redis_CA\n",
            ": upstreamTls.caSecretName: ",
        ),
        (
            "upstreamTls:\n  serverName: 42\n",
            ": upstreamTls.serverName: ",
        ),
        ("service:\n  tlsPort: \"6390\"\n", ": service.tlsPort: "),
        // The escape hatch is typed too.
        (
            "config:\n  settings:\n    tls:\n      client_auth: always\n",
            ": config.settings.tls.client_auth: ",
        ),
        (
            "config:\n  settings:\n    upstream:\n      address: rediss://user:secret@redis:6380\n",
            ": config.settings.upstream.address: ",
        ),
        (
            "policy:\n  content:\n    users:\n      orders:\n        tls_identities: [\"orders-service\"]\n",
            ": policy.content.users.orders.tls_identities.0: ",
        ),
    ];
    for (i, (values, expect)) in cases.iter().enumerate() {
        let file = dir.join(format!("bad-{i}.yaml"));
        std::fs::write(&file, values).unwrap();
        let out = chart_check(&["validate", path_str(&schema), path_str(&file)]);
        let msg = text(&out);
        assert!(
            !out.status.success(),
            "the schema accepted mistyped values:\n{values}\n{msg}"
        );
        assert!(
            msg.contains(expect),
            "the error for\n{values}should contain `{expect}`:\n{msg}"
        );
    }
    // The same mistake inside an app chart's `pubwarden:` section.
    let file = dir.join("bad-parent.yaml");
    std::fs::write(
        &file,
        "pubwarden:\n  mode: sidecar\n  sidecar:\n    native: \"yes\"\n",
    )
    .unwrap();
    let defaults = chart().join("values.yaml");
    let out = chart_check(&[
        "validate",
        path_str(&schema),
        path_str(&file),
        "--subchart",
        "pubwarden",
        path_str(&defaults),
    ]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains(": sidecar.native: "), "{}", text(&out));
}

#[test]
fn secret_files_must_be_mounted() {
    // A password file outside every secretMounts directory would not exist in
    // the pod: the render step refuses it.
    let dir = temp_dir("unmounted");
    let file = dir.join("values.yaml");
    std::fs::write(
        &file,
        "pubwarden:\n  mode: sidecar\n  config:\n    settings:\n      upstream:\n        \
         username: u\n        password: {file: /var/run/secrets/redis/pw}\n",
    )
    .unwrap();
    let defaults = chart().join("values.yaml");
    let out = chart_check(&[
        "render",
        path_str(&file),
        path_str(&dir.join("out")),
        "--subchart",
        "pubwarden",
        path_str(&defaults),
    ]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("not in a secretMounts directory"),
        "{}",
        text(&out)
    );
}

#[test]
fn templates_read_only_values_that_exist() {
    let out = chart_check(&["values-refs", path_str(&chart())]);
    assert!(out.status.success(), "{}", text(&out));
    let defaults = chart().join("values.yaml");
    let out = chart_check(&[
        "values-refs",
        path_str(&example_app()),
        "--subchart",
        "pubwarden",
        path_str(&defaults),
    ]);
    assert!(out.status.success(), "{}", text(&out));
}

/// Files under `dir`, recursively, skipping `templates/` directories.
fn files_outside_templates(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n != "templates") {
                files_outside_templates(&path, out);
            }
        } else {
            out.push(path);
        }
    }
}

#[test]
fn yaml_and_json_files_outside_templates_parse() {
    let mut files = Vec::new();
    files_outside_templates(&root().join("helm"), &mut files);
    let files: Vec<String> = files
        .iter()
        .filter(|p| {
            p.extension()
                .is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
        })
        .map(|p| path_str(p).to_string())
        .collect();
    for expected in [
        "helm/pubwarden/Chart.yaml",
        "helm/pubwarden/values.yaml",
        "helm/pubwarden/values.schema.json",
        "helm/pubwarden/files/alerts.yaml",
        "helm/example-app/Chart.yaml",
        "helm/example-app/values.yaml",
    ] {
        assert!(
            files.iter().any(|f| f.ends_with(expected)),
            "{expected} not found among {files:?}"
        );
    }
    let mut args = vec!["parse"];
    args.extend(files.iter().map(String::as_str));
    let out = chart_check(&args);
    assert!(out.status.success(), "{}", text(&out));
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The value of a top-level `key: value` line of a YAML file.
fn top_level(yaml: &str, key: &str) -> String {
    yaml.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no `{key}:` line"))
        .trim()
        .trim_matches('"')
        .to_string()
}

#[test]
fn chart_versions_agree() {
    let cargo = read(&root().join("Cargo.toml"));
    let crate_version = cargo
        .lines()
        .find_map(|l| l.strip_prefix("version = "))
        .expect("Cargo.toml version")
        .trim_matches('"');
    let chart_yaml = read(&chart().join("Chart.yaml"));
    assert_eq!(
        top_level(&chart_yaml, "appVersion"),
        crate_version,
        "helm/pubwarden/Chart.yaml appVersion must be the crate's version"
    );
    let chart_version = top_level(&chart_yaml, "version");
    let app = read(&example_app().join("Chart.yaml"));
    let dep = app
        .split("- name: pubwarden")
        .nth(1)
        .expect("example-app depends on pubwarden");
    assert!(
        dep.contains(&format!("version: {chart_version}")),
        "example-app must depend on pubwarden chart {chart_version}"
    );
    // The example's sidecar tag is the pubwarden version it was written for.
    let app_values = read(&example_app().join("values.yaml"));
    assert!(
        app_values.contains(&format!("tag: \"{crate_version}\"")),
        "helm/example-app/values.yaml pubwarden.image.tag must be {crate_version}"
    );
}

#[test]
fn chart_alerts_equal_dashboards_alerts_and_pass_promtool() {
    let chart_rules = chart().join("files/alerts.yaml");
    assert!(
        read(&chart_rules) == read(&root().join("dashboards/alerts.yaml")),
        "helm/pubwarden/files/alerts.yaml differs from dashboards/alerts.yaml; \
         copy it: cp dashboards/alerts.yaml helm/pubwarden/files/alerts.yaml"
    );
    let out = match Command::new("promtool")
        .args(["check", "rules"])
        .arg(&chart_rules)
        .output()
    {
        Ok(out) => out,
        Err(e) => panic!(
            "cannot run promtool ({e}); install it with `apt-get install -y prometheus` (bash .ci/run does)"
        ),
    };
    assert!(
        out.status.success(),
        "promtool check rules:\n{}",
        text(&out)
    );
}

#[test]
fn chart_dashboards_equal_dashboards_dir() {
    let json_names = |dir: &Path| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".json"))
            .collect();
        names.sort();
        names
    };
    let source = root().join("dashboards");
    let copies = chart().join("files/dashboards");
    let names = json_names(&source);
    assert!(!names.is_empty(), "no dashboards in dashboards/");
    assert_eq!(
        json_names(&copies),
        names,
        "helm/pubwarden/files/dashboards/ must hold exactly dashboards/*.json; \
         copy them: cp dashboards/*.json helm/pubwarden/files/dashboards/"
    );
    for name in &names {
        assert!(
            read(&source.join(name)) == read(&copies.join(name)),
            "helm/pubwarden/files/dashboards/{name} differs from dashboards/{name}; copy it again"
        );
    }
}

#[test]
fn default_container_is_hardened_and_probed() {
    // The securityContext and probes the issue asks for, in the defaults.
    let values = read(&chart().join("values.yaml"));
    for needle in [
        "runAsNonRoot: true",
        "readOnlyRootFilesystem: true",
        "allowPrivilegeEscalation: false",
        "drop: [\"ALL\"]",
        "type: RuntimeDefault",
        "path: /healthz",
        "path: /readyz",
        "grafana_dashboard: \"1\"",
    ] {
        assert!(values.contains(needle), "values.yaml lacks `{needle}`");
    }
    let helpers = read(&chart().join("templates/_helpers.tpl"));
    // Secrets mounted with subPath never see updates: renewed certificates
    // would not reach pubwarden's rotation.
    assert!(
        !helpers.contains("subPath:"),
        "_helpers.tpl mounts something with subPath"
    );
    // chart_check.py mirrors where the chart mounts the TLS Secrets.
    let check = read(&root().join("helm/chart_check.py"));
    for (define, constant, dir) in [
        ("pubwarden.tlsDir", "TLS_DIR", "/etc/pubwarden/tls"),
        (
            "pubwarden.tlsClientCaDir",
            "TLS_CLIENT_CA_DIR",
            "/etc/pubwarden/tls-client-ca",
        ),
        (
            "pubwarden.upstreamCaDir",
            "UPSTREAM_CA_DIR",
            "/etc/pubwarden/upstream-ca",
        ),
        (
            "pubwarden.upstreamClientDir",
            "UPSTREAM_CLIENT_DIR",
            "/etc/pubwarden/upstream-client",
        ),
    ] {
        assert!(
            helpers.contains(&format!("define \"{define}\" -}}}}{dir}{{{{")),
            "_helpers.tpl: {define} should be {dir}"
        );
        assert!(
            check.contains(&format!("{constant} = \"{dir}\"")),
            "helm/chart_check.py: {constant} should be {dir}, as {define} in _helpers.tpl"
        );
    }
    for define in [
        "pubwarden.sidecar.container",
        "pubwarden.sidecar.volumes",
        "pubwarden.sidecar.podAnnotations",
        "pubwarden.sidecar.podLabels",
    ] {
        assert!(
            helpers.contains(&format!("define \"{define}\"")),
            "_helpers.tpl lacks {define}"
        );
    }
}
