//! Prometheus for the metrics tests: the `promtool` and `prometheus` binaries (Debian's
//! `prometheus` package; a test that needs them fails with the install hint, never skips), a
//! private Prometheus server on a free loopback port killed on drop, and small readers for the
//! exposition text and the query API's JSON.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::net::{RawConn, free_port, http_get, loopback};
use super::procs::{scratch_dir, tail_file};

const INSTALL_HINT: &str = "install it with `apt-get install -y prometheus` (gives prometheus and promtool; .ci/run does this)";

/// Runs `promtool <args>`, panicking with the install hint if it is missing.
pub fn promtool(args: &[&str], stdin: Option<&Path>) -> Output {
    let mut cmd = Command::new("promtool");
    cmd.args(args);
    if let Some(path) = stdin {
        cmd.stdin(File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display())));
    }
    match cmd.output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("promtool not found: {INSTALL_HINT}")
        }
        Err(e) => panic!("run promtool: {e}"),
    }
}

/// stdout and stderr of a finished command, for failure messages.
pub fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A Prometheus server of this test's own, killed on drop.
pub struct Prometheus {
    child: Option<Child>,
    addr: SocketAddr,
    log: PathBuf,
}

impl Prometheus {
    /// Starts Prometheus scraping `target`'s `/metrics` every second, with `namespace` and `pod`
    /// target labels as Kubernetes service discovery would add them.
    pub fn start(target: SocketAddr, namespace: &str, pod: &str) -> Prometheus {
        let dir = scratch_dir("prometheus");
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: pubwarden\n    scrape_interval: 1s\n    scrape_timeout: 900ms\n\
                 \x20   static_configs:\n      - targets: ['{target}']\n        labels:\n          namespace: '{namespace}'\n          pod: '{pod}'\n"
            ),
        )
        .expect("write prometheus.yml");
        let mut last = String::new();
        for attempt in 0..3 {
            let addr = loopback(free_port());
            let log = dir.join(format!("prometheus-{attempt}.log"));
            let out = File::create(&log).expect("create prometheus log");
            let spawned = Command::new("prometheus")
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.join(format!("data-{attempt}")).display()
                ))
                .arg(format!("--web.listen-address={addr}"))
                .arg("--log.level=warn")
                .stdin(Stdio::null())
                .stdout(out.try_clone().expect("clone log"))
                .stderr(out)
                .spawn();
            let child = match spawned {
                Ok(c) => c,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    panic!("prometheus not found: {INSTALL_HINT}")
                }
                Err(e) => panic!("spawn prometheus: {e}"),
            };
            let mut p = Prometheus {
                child: Some(child),
                addr,
                log,
            };
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Some(c) = p.child.as_mut()
                    && let Ok(Some(status)) = c.try_wait()
                {
                    last = format!("exited with {status}: {}", tail_file(&p.log, 30));
                    break;
                }
                if matches!(http_get(addr, "/-/ready"), Some((200, _))) {
                    return p;
                }
                if Instant::now() >= deadline {
                    panic!("prometheus not ready in 30 s: {}", tail_file(&p.log, 30));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        panic!("prometheus did not start: {last}");
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn logs(&self) -> String {
        tail_file(&self.log, 50)
    }

    /// Runs an instant query.
    pub fn query(&self, expr: &str) -> QueryResult {
        let path = format!("/api/v1/query?query={}", urlencode(expr));
        match http_get(self.addr, &path) {
            Some((status, body)) => QueryResult { status, body },
            None => QueryResult {
                status: 0,
                body: "no HTTP answer".into(),
            },
        }
    }

    /// Polls `expr` until it returns data, for at most `timeout`.
    pub fn wait_for_data(&self, expr: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.query(expr).has_data() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The answer of `/api/v1/query`.
#[derive(Debug, Clone)]
pub struct QueryResult {
    pub status: u16,
    pub body: String,
}

impl QueryResult {
    /// Prometheus accepted the expression.
    pub fn parsed(&self) -> bool {
        self.status == 200 && self.body.contains("\"status\":\"success\"")
    }

    /// ... and it returned at least one series or a scalar.
    pub fn has_data(&self) -> bool {
        self.parsed()
            && !self.body.contains("\"result\":[]")
            && (self.body.contains("\"result\":[{")
                || self.body.contains("\"resultType\":\"scalar\""))
    }
}

/// Percent-encodes a query parameter.
pub fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `GET /metrics` from pubwarden's admin listener, with a given `Accept`: status line headers and
/// body, as raw text.
pub fn scrape_with_accept(admin: SocketAddr, accept: &str) -> (String, String) {
    let mut conn = RawConn::connect(admin);
    conn.send(
        format!("GET /metrics HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\nAccept: {accept}\r\n\r\n")
            .as_bytes(),
    );
    let (bytes, _) = conn.read_until_eof(Duration::from_secs(5));
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (head.to_string(), body.to_string())
}

/// `GET /metrics` in the Prometheus text format.
pub fn scrape(admin: SocketAddr) -> String {
    match http_get(admin, "/metrics") {
        Some((200, body)) => body,
        other => panic!("GET /metrics on {admin}: {other:?}"),
    }
}

/// The value of the sample `name{labels}` (labels exactly as rendered, in order, e.g.
/// `group="orders",kind="message"`; empty for none) in exposition text.
pub fn sample(text: &str, name: &str, labels: &str) -> Option<f64> {
    let key = if labels.is_empty() {
        format!("{name} ")
    } else {
        format!("{name}{{{labels}}} ")
    };
    text.lines()
        .find_map(|l| l.strip_prefix(&key))
        .and_then(|v| v.trim().parse().ok())
}

/// Every string value of `"key": "..."` in a JSON document, unescaped.
pub fn json_strings(json: &str, key: &str) -> Vec<String> {
    let needle = format!("\"{key}\": \"");
    let mut out = Vec::new();
    let mut rest = json;
    while let Some(i) = rest.find(&needle) {
        rest = &rest[i + needle.len()..];
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let mut end = rest.len();
        while let Some((j, c)) = chars.next() {
            match c {
                '"' => {
                    end = j + 1;
                    break;
                }
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, 't')) => value.push('\t'),
                    Some((_, 'u')) => {
                        let hex: String = (0..4)
                            .filter_map(|_| chars.next().map(|(_, h)| h))
                            .collect();
                        if let Some(ch) =
                            u32::from_str_radix(&hex, 16).ok().and_then(char::from_u32)
                        {
                            value.push(ch);
                        }
                    }
                    Some((_, other)) => value.push(other),
                    None => {}
                },
                c => value.push(c),
            }
        }
        out.push(value);
        rest = &rest[end..];
    }
    out
}

/// The `expr:` of every rule in a Prometheus rules file, with its alert name.
pub fn rule_exprs(yaml: &str) -> Vec<(String, String)> {
    let lines: Vec<&str> = yaml.lines().collect();
    let mut out = Vec::new();
    let mut alert = String::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let t = line.trim_start();
        if let Some(name) = t.strip_prefix("- alert:") {
            alert = name.trim().to_string();
        }
        if let Some(v) = t.strip_prefix("expr:") {
            let v = v.trim();
            if v == "|" || v == "|-" || v == ">" {
                let indent = line.len() - t.len();
                let mut body = Vec::new();
                i += 1;
                while i < lines.len() {
                    let l = lines[i];
                    let li = l.len() - l.trim_start().len();
                    if !l.trim().is_empty() && li <= indent {
                        break;
                    }
                    body.push(l.trim());
                    i += 1;
                }
                out.push((alert.clone(), body.join("\n").trim().to_string()));
                continue;
            }
            out.push((alert.clone(), v.trim_matches('\'').to_string()));
        }
        i += 1;
    }
    out
}

/// Grafana's variables, replaced as a dashboard with "All" selected would.
pub fn substitute_grafana_vars(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$__interval", "15s")
        .replace("$__range", "5m")
        .replace("$namespace", ".*")
        .replace("$pod", ".*")
        .replace("$group", ".*")
        .replace("$user", ".*")
}
