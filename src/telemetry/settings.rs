//! The `telemetry.tracing:` section of the settings file, and the standard
//! `OTEL_*` environment variables layered over it at start.

use std::fmt;
use std::time::Duration;

use crate::config::secret::{Secret, SecretSource};
use crate::config::yaml::boolean;
use crate::config::yaml::{self, MapView, Node, Reader, Value, join};

/// How spans travel to the collector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    HttpProtobuf,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Grpc => "grpc",
            Protocol::HttpProtobuf => "http/protobuf",
        }
    }

    fn parse(text: &str) -> Result<Protocol, String> {
        match text.trim() {
            "grpc" => Ok(Protocol::Grpc),
            "http/protobuf" => Ok(Protocol::HttpProtobuf),
            other => Err(format!(
                "`{other}` is not an OTLP protocol (use grpc or http/protobuf)"
            )),
        }
    }

    /// The collector's conventional address for this protocol.
    pub fn default_endpoint(self) -> &'static str {
        match self {
            Protocol::Grpc => "http://localhost:4317",
            Protocol::HttpProtobuf => "http://localhost:4318",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TracingSettings {
    /// Export spans at all. `OTEL_EXPORTER_OTLP_ENDPOINT` alone also turns it on.
    pub enabled: bool,
    /// Collector base URL; `None`: the protocol's default on localhost.
    pub endpoint: Option<String>,
    pub protocol: Protocol,
    /// Extra request headers (gRPC metadata), e.g. an API key.
    pub headers: Vec<(String, Secret)>,
    /// How long one export request may take.
    pub timeout: Duration,
    pub service_name: String,
    pub resource_attributes: Vec<(String, String)>,
    /// Fraction of publishes (and of deliveries not linked to one) traced.
    pub sampling_ratio: f64,
    /// Also trace AUTH, HELLO, (UN)SUBSCRIBE ... as database client spans.
    pub control_commands: bool,
    /// Channel globs whose messages carry trace context in an envelope.
    pub envelope: Vec<String>,
    /// Finished spans waiting for export; past it spans are dropped (and counted).
    pub max_queue_size: usize,
}

impl Default for TracingSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            endpoint: None,
            protocol: Protocol::Grpc,
            headers: Vec::new(),
            timeout: Duration::from_secs(10),
            service_name: "pubwarden".into(),
            resource_attributes: Vec::new(),
            sampling_ratio: 0.01,
            control_commands: false,
            envelope: Vec::new(),
            max_queue_size: 2048,
        }
    }
}

fn ratio(text: &str) -> Result<f64, String> {
    let r: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("`{text}` is not a number between 0 and 1"))?;
    if !(0.0..=1.0).contains(&r) {
        return Err(format!("{r} is outside 0..=1"));
    }
    Ok(r)
}

fn endpoint(text: &str) -> Result<String, String> {
    let t = text.trim();
    if !(t.starts_with("http://") || t.starts_with("https://")) || t.len() < 10 {
        return Err(format!(
            "`{text}` is not a collector URL (e.g. http://otel-collector:4317)"
        ));
    }
    Ok(t.trim_end_matches('/').to_string())
}

/// Reads `telemetry:` from the settings root into `out`.
pub fn read(r: &mut Reader, root: &Option<MapView<'_>>, out: &mut TracingSettings) {
    let t = r.section(root, "telemetry", &["tracing"]);
    let m = r.section(
        &t,
        "tracing",
        &[
            "enabled",
            "endpoint",
            "protocol",
            "headers",
            "timeout",
            "service_name",
            "resource_attributes",
            "sampling_ratio",
            "control_commands",
            "envelope",
            "max_queue_size",
        ],
    );
    if let Some(v) = r.field(&m, "enabled", boolean) {
        out.enabled = v;
    }
    if let Some(v) = r.field(&m, "endpoint", endpoint) {
        out.endpoint = Some(v);
    }
    if let Some(v) = r.field(&m, "protocol", Protocol::parse) {
        out.protocol = v;
    }
    if let Some(v) = r.field(&m, "timeout", |t| {
        yaml::duration(t).and_then(|d| {
            if d.is_zero() {
                Err("must be longer than zero".into())
            } else {
                Ok(d)
            }
        })
    }) {
        out.timeout = v;
    }
    if let Some(v) = r.field(&m, "service_name", |t| {
        let t = t.trim();
        if t.is_empty() {
            Err("is empty".to_string())
        } else {
            Ok(t.to_string())
        }
    }) {
        out.service_name = v;
    }
    if let Some(v) = r.field(&m, "sampling_ratio", ratio) {
        out.sampling_ratio = v;
    }
    if let Some(v) = r.field(&m, "control_commands", boolean) {
        out.control_commands = v;
    }
    if let Some(v) = r.field(&m, "max_queue_size", yaml::number(1, 1_000_000)) {
        out.max_queue_size = v as usize;
    }
    let Some(m) = m else { return };
    if let Some((node, path)) = m.get("headers") {
        out.headers = read_headers(r, node, &path);
    }
    if let Some((node, path)) = m.get("resource_attributes") {
        out.resource_attributes = read_pairs(r, node, &path);
    }
    if let Some((node, path)) = m.get("envelope") {
        out.envelope = read_globs(r, node, &path);
    }
}

fn entries<'a>(r: &mut Reader, node: &'a Node, path: &str) -> &'a [(Node, Node)] {
    match &node.value {
        Value::Map(e) => e,
        Value::Null => &[],
        _ => {
            r.error(path, node.pos, "expected a mapping of names to values");
            &[]
        }
    }
}

fn key_of(k: &Node) -> &str {
    match &k.value {
        Value::Scalar(s, _) => s,
        _ => "",
    }
}

fn read_headers(r: &mut Reader, node: &Node, path: &str) -> Vec<(String, Secret)> {
    let mut out = Vec::new();
    for (k, v) in entries(r, node, path) {
        let name = key_of(k);
        let p = join(path, name);
        let valid_name = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'));
        if !valid_name {
            r.error(&p, k.pos, format!("`{name}` is not a header name"));
            continue;
        }
        let source = match &v.value {
            Value::Scalar(text, _) => Secret::load(SecretSource::Plain, Some(text)),
            Value::Map(_) => {
                let view = r.map(v, &p, &["env", "file"]);
                let env = r.field(&view, "env", |t| Ok(t.trim().to_string()));
                let file = r.field(&view, "file", |t| Ok(t.trim().to_string()));
                match (env, file) {
                    (Some(e), None) => Secret::load(SecretSource::Env(e), None),
                    (None, Some(f)) => Secret::load(SecretSource::File(f), None),
                    _ => Err("give a value, or exactly one of {env: VAR} or {file: PATH}".into()),
                }
            }
            _ => Err("expected a value, {env: VAR} or {file: PATH}".into()),
        };
        match source {
            Ok(s) if s.expose().iter().all(|b| *b >= 0x20 && *b != 0x7f) => {
                out.push((name.to_ascii_lowercase(), s));
            }
            Ok(_) => r.error(&p, v.pos, "the value has control characters"),
            Err(e) => r.error(&p, v.pos, e),
        }
    }
    out
}

fn read_pairs(r: &mut Reader, node: &Node, path: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (k, v) in entries(r, node, path) {
        let name = key_of(k).to_string();
        let p = join(path, &name);
        if let Some(text) = r.scalar(v, &p) {
            out.push((name, text.to_string()));
        }
    }
    out
}

fn read_globs(r: &mut Reader, node: &Node, path: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (item, p) in r.items(node, path, "Redis glob patterns") {
        match r.scalar(item, &p) {
            Some("") => r.error(&p, item.pos, "is empty"),
            Some(t) => out.push(t.to_string()),
            None => {}
        }
    }
    out
}

/// Reads one environment variable; empty counts as unset, as the
/// OpenTelemetry specification asks.
fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

impl TracingSettings {
    /// These settings with the standard `OTEL_*` variables applied over
    /// them, plus a warning for each variable that was ignored. Invalid
    /// values are ignored (the specification's rule), never fatal.
    pub fn with_env(&self) -> (TracingSettings, Vec<String>) {
        self.with_env_from(var)
    }

    pub fn with_env_from(
        &self,
        get: impl Fn(&str) -> Option<String>,
    ) -> (TracingSettings, Vec<String>) {
        let mut s = self.clone();
        let mut warnings = Vec::new();
        if let Some(e) = get("OTEL_EXPORTER_OTLP_ENDPOINT") {
            match endpoint(&e) {
                Ok(e) => {
                    s.endpoint = Some(e);
                    s.enabled = true;
                }
                Err(why) => warnings.push(format!("OTEL_EXPORTER_OTLP_ENDPOINT ignored: {why}")),
            }
        }
        if let Some(p) = get("OTEL_EXPORTER_OTLP_PROTOCOL") {
            match Protocol::parse(&p) {
                Ok(p) => s.protocol = p,
                Err(why) => warnings.push(format!("OTEL_EXPORTER_OTLP_PROTOCOL ignored: {why}")),
            }
        }
        if let Some(name) = get("OTEL_SERVICE_NAME") {
            s.service_name = name.trim().to_string();
        }
        if let Some(attrs) = get("OTEL_RESOURCE_ATTRIBUTES") {
            for pair in attrs.split(',') {
                let Some((k, v)) = pair.split_once('=') else {
                    warnings.push(format!("OTEL_RESOURCE_ATTRIBUTES: `{pair}` has no `=`"));
                    continue;
                };
                let (k, v) = (k.trim().to_string(), percent_decode(v.trim()));
                s.resource_attributes.retain(|(name, _)| *name != k);
                s.resource_attributes.push((k, v));
            }
        }
        if let Some(sampler) = get("OTEL_TRACES_SAMPLER") {
            let arg = get("OTEL_TRACES_SAMPLER_ARG");
            match sampler_ratio(&sampler, arg.as_deref()) {
                Ok(r) => s.sampling_ratio = r,
                Err(why) => warnings.push(format!("OTEL_TRACES_SAMPLER ignored: {why}")),
            }
        }
        if get("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
            s.enabled = false;
        }
        (s, warnings)
    }
}

/// The root sampling ratio an `OTEL_TRACES_SAMPLER` names. pubwarden's
/// spans are roots except deliveries of an envelope, which always follow
/// their publish, so every sampler is taken as its parent-based form.
fn sampler_ratio(sampler: &str, arg: Option<&str>) -> Result<f64, String> {
    let arg_ratio = || match arg {
        None => Ok(1.0),
        Some(a) => ratio(a).map_err(|e| format!("OTEL_TRACES_SAMPLER_ARG: {e}")),
    };
    match sampler.trim() {
        "always_on" | "parentbased_always_on" => Ok(1.0),
        "always_off" | "parentbased_always_off" => Ok(0.0),
        "traceidratio" | "parentbased_traceidratio" => arg_ratio(),
        other => Err(format!(
            "`{other}` is not supported (use always_on, always_off, traceidratio or their parentbased_ forms)"
        )),
    }
}

/// `%XX` escapes, as OTEL_RESOURCE_ATTRIBUTES values may use them.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let Some(h) = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(h);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn yaml_str(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'/'));
    if plain {
        s.to_string()
    } else {
        format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
    }
}

/// The section as YAML, as `check-config` prints it. Header values never
/// appear: only where they come from.
impl fmt::Display for TracingSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "telemetry:")?;
        writeln!(f, "  tracing:")?;
        writeln!(f, "    enabled: {}", self.enabled)?;
        if let Some(e) = &self.endpoint {
            writeln!(f, "    endpoint: {}", yaml_str(e))?;
        }
        writeln!(f, "    protocol: {}", self.protocol.as_str())?;
        if self.headers.is_empty() {
            writeln!(f, "    headers: {{}}")?;
        } else {
            writeln!(f, "    headers:")?;
            for (k, v) in &self.headers {
                let shown = match &v.source {
                    SecretSource::Env(var) => format!("{{env: {}}}", yaml_str(var)),
                    SecretSource::File(p) => format!("{{file: {}}}", yaml_str(p)),
                    SecretSource::Plain => "\"<redacted>\"".to_string(),
                };
                writeln!(f, "      {}: {shown}", yaml_str(k))?;
            }
        }
        writeln!(f, "    timeout: {}ms", self.timeout.as_millis())?;
        writeln!(f, "    service_name: {}", yaml_str(&self.service_name))?;
        if self.resource_attributes.is_empty() {
            writeln!(f, "    resource_attributes: {{}}")?;
        } else {
            writeln!(f, "    resource_attributes:")?;
            for (k, v) in &self.resource_attributes {
                writeln!(f, "      {}: {}", yaml_str(k), yaml_str(v))?;
            }
        }
        writeln!(f, "    sampling_ratio: {}", self.sampling_ratio)?;
        writeln!(f, "    control_commands: {}", self.control_commands)?;
        let globs: Vec<String> = self.envelope.iter().map(|p| yaml_str(p)).collect();
        writeln!(f, "    envelope: [{}]", globs.join(", "))?;
        writeln!(f, "    max_queue_size: {}", self.max_queue_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> (TracingSettings, Vec<String>) {
        let doc = yaml::parse(text).unwrap();
        let mut r = Reader::default();
        let root = r.map(&doc, "", &["telemetry"]);
        let mut s = TracingSettings::default();
        read(&mut r, &root, &mut s);
        (s, r.errors.iter().map(ToString::to_string).collect())
    }

    #[test]
    fn every_key_reads_and_prints_back() {
        let text = "telemetry:\n  tracing:\n    enabled: true\n    endpoint: http://collector:4318/\n    protocol: http/protobuf\n    headers:\n      x-api-key: abc\n    timeout: 3s\n    service_name: edge\n    resource_attributes:\n      deployment.environment: prod\n    sampling_ratio: 0.25\n    control_commands: true\n    envelope: [\"orders.*\", chat]\n    max_queue_size: 100\n";
        let (s, errs) = parse(text);
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(s.endpoint.as_deref(), Some("http://collector:4318"));
        assert_eq!(s.protocol, Protocol::HttpProtobuf);
        assert_eq!(s.headers[0].1.expose(), b"abc");
        assert_eq!(s.sampling_ratio, 0.25);
        assert_eq!(s.envelope, vec!["orders.*".to_string(), "chat".into()]);
        let printed = s.to_string();
        assert!(!printed.contains("abc"), "{printed}");
        let (mut again, errs) = parse(&printed.replace("\"<redacted>\"", "abc"));
        assert!(errs.is_empty(), "{errs:?}\n{printed}");
        again.headers = s.headers.clone();
        assert_eq!(again, s);
    }

    #[test]
    fn mistakes_are_reported() {
        let text = "telemetry:\n  tracing:\n    sampling_ratio: 2\n    protocol: udp\n    endpoint: collector\n    headers:\n      \"bad name\": x\n      token: {env: PUBWARDEN_SURELY_UNSET_VAR}\n    bogus: 1\n";
        let (_, errs) = parse(text);
        assert_eq!(errs.len(), 6, "{errs:?}");
        assert!(errs.iter().all(|e| !e.contains("SURELY_UNSET_VAR=")));
    }

    #[test]
    fn environment_wins_and_bad_values_are_ignored() {
        let env = |k: &str| -> Option<String> {
            match k {
                "OTEL_EXPORTER_OTLP_ENDPOINT" => Some("http://c:4318".into()),
                "OTEL_EXPORTER_OTLP_PROTOCOL" => Some("http/protobuf".into()),
                "OTEL_TRACES_SAMPLER" => Some("parentbased_traceidratio".into()),
                "OTEL_TRACES_SAMPLER_ARG" => Some("0.5".into()),
                "OTEL_SERVICE_NAME" => Some("svc".into()),
                "OTEL_RESOURCE_ATTRIBUTES" => Some("a=1,b=x%20y,broken".into()),
                _ => None,
            }
        };
        let (s, warnings) = TracingSettings::default().with_env_from(env);
        assert!(s.enabled);
        assert_eq!(s.protocol, Protocol::HttpProtobuf);
        assert_eq!(s.sampling_ratio, 0.5);
        assert_eq!(s.service_name, "svc");
        assert_eq!(
            s.resource_attributes,
            vec![("a".into(), "1".into()), ("b".into(), "x y".into())]
        );
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        let (s, warnings) = TracingSettings::default()
            .with_env_from(|k| (k == "OTEL_TRACES_SAMPLER").then(|| "jaeger_remote".to_string()));
        assert_eq!(s.sampling_ratio, 0.01);
        assert!(!s.enabled);
        assert_eq!(warnings.len(), 1);
    }
}
