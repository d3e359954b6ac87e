//! Command-line flags and their resolution into a run plan.

use crate::scenarios::{Params, Scenario};
use anyhow::{Result, anyhow, bail};
use clap::Parser;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "pubwarden-bench",
    about = "Benchmark pubwarden against direct Redis and HAProxy (mode tcp), round by round",
    long_about = None
)]
pub struct Args {
    /// Targets to run: redis (direct), haproxy (L4 reference), pubwarden.
    /// Targets added with --pubwarden-config are always included.
    #[arg(long, value_delimiter = ',', default_value = "redis,haproxy,pubwarden")]
    pub targets: Vec<String>,

    /// Scenarios: publish, fanout, fanout-psub, latency, connscale, and the
    /// sharded spublish, sfanout, slatency (SPUBLISH / SSUBSCRIBE; Redis 7).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "publish,fanout,fanout-psub,latency,connscale"
    )]
    pub scenarios: Vec<String>,

    /// Extra pubwarden target NAME started with `--config PATH` (repeatable).
    #[arg(long = "pubwarden-config", value_name = "NAME=PATH")]
    pub pubwarden_configs: Vec<String>,

    /// Config file for the plain `pubwarden` target (default: none).
    #[arg(long, value_name = "PATH")]
    pub pubwarden_base_config: Option<PathBuf>,

    /// pubwarden binary.
    #[arg(long, default_value = "target/release/pubwarden")]
    pub pubwarden_bin: String,

    /// redis-server binary.
    #[arg(long, default_value = "redis-server")]
    pub redis_bin: String,

    /// haproxy binary.
    #[arg(long, default_value = "haproxy")]
    pub haproxy_bin: String,

    /// Run against a Redis Cluster of 3 masters (no replicas) started by the
    /// bench: `redis` and `haproxy` reach the master owning the benchmark's
    /// channels (which share the hash tag {bench}), `pubwarden` runs with
    /// `upstream.mode: cluster` and the nodes as seeds.
    #[arg(long)]
    pub cluster: bool,

    /// redis-cli binary (for `redis-cli --cluster create` with --cluster).
    #[arg(long, default_value = "redis-cli")]
    pub redis_cli_bin: String,

    /// Rounds; each round runs every target once per scenario, in rotated order
    /// [default: 5, quick: 2].
    #[arg(long)]
    pub rounds: Option<usize>,

    /// Measured seconds per scenario run [default: 1.2, quick: 0.5].
    #[arg(long)]
    pub duration: Option<f64>,

    /// Unmeasured warm-up seconds before each measurement [default: 0.3, quick: 0.15].
    #[arg(long)]
    pub warmup: Option<f64>,

    /// Publishers in the publish scenario.
    #[arg(long, default_value_t = 4)]
    pub publishers: usize,

    /// Publishers in the fan-out scenarios.
    #[arg(long, default_value_t = 2)]
    pub fanout_publishers: usize,

    /// Subscribers in the fan-out scenarios (each on all channels).
    #[arg(long, default_value_t = 16)]
    pub subscribers: usize,

    /// Payload size in bytes (>= 32: header with publisher, seq, timestamp).
    #[arg(long, default_value_t = 128)]
    pub payload_size: usize,

    /// Channels.
    #[arg(long, default_value_t = 8)]
    pub channels: usize,

    /// PUBLISH commands per pipelined write.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,

    /// Maximum PUBLISH replies outstanding per publisher.
    #[arg(long, default_value_t = 256)]
    pub max_outstanding: usize,

    /// Fan-out flow control: messages a subscriber may lag behind publishers.
    #[arg(long, default_value_t = 2048)]
    pub lag_window: u64,

    /// Offered rates (msgs/s) for the latency scenario.
    #[arg(long, value_delimiter = ',', default_value = "5000,20000")]
    pub latency_rates: Vec<u64>,

    /// Subscribers in the latency scenario.
    #[arg(long, default_value_t = 4)]
    pub latency_subscribers: usize,

    /// Subscribers in the connection-scale scenario [default: 10000, quick: 1000].
    #[arg(long)]
    pub conn_subscribers: Option<usize>,

    /// Connections opened concurrently in the connection-scale scenario.
    #[arg(long, default_value_t = 256)]
    pub conn_concurrency: usize,

    /// Smoke test: 2 short rounds, 1000 connections.
    #[arg(long)]
    pub quick: bool,

    /// Write all raw round results as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,

    /// Do not pin processes to CPUs.
    #[arg(long)]
    pub no_pin: bool,

    /// CPU for redis-server.
    #[arg(long, default_value_t = 0)]
    pub redis_cpu: usize,

    /// CPU shared by the proxy under test and the load generator.
    #[arg(long, default_value_t = 1)]
    pub load_cpu: usize,

    /// Directory for logs and generated configs [default: a fresh one under /tmp].
    #[arg(long)]
    pub workdir: Option<PathBuf>,
}

/// Everything the run needs, validated.
#[derive(Debug, Clone)]
pub struct Plan {
    pub rounds: usize,
    pub scenarios: Vec<Scenario>,
    pub params: Params,
    pub haproxy: bool,
    pub redis: bool,
    pub cluster: bool,
    /// (target name, config) for each pubwarden target.
    pub pubwardens: Vec<(String, Option<PathBuf>)>,
}

fn secs(name: &str, v: f64) -> Result<Duration> {
    if !(v.is_finite() && (0.0..=600.0).contains(&v)) {
        bail!("--{name} must be between 0 and 600 seconds, got {v}");
    }
    Ok(Duration::from_secs_f64(v))
}

impl Args {
    pub fn plan(&self) -> Result<Plan> {
        let q = self.quick;
        let rounds = self.rounds.unwrap_or(if q { 2 } else { 5 });
        if !(1..=1000).contains(&rounds) {
            bail!("--rounds must be 1..=1000");
        }
        let duration = secs(
            "duration",
            self.duration.unwrap_or(if q { 0.5 } else { 1.2 }),
        )?;
        if duration.is_zero() {
            bail!("--duration must be > 0");
        }
        let warmup = secs("warmup", self.warmup.unwrap_or(if q { 0.15 } else { 0.3 }))?;
        let conn_subscribers = self
            .conn_subscribers
            .unwrap_or(if q { 1000 } else { 10_000 });

        let checks: [(&str, usize, usize, usize); 9] = [
            ("publishers", self.publishers, 1, 1024),
            ("fanout-publishers", self.fanout_publishers, 1, 1024),
            ("subscribers", self.subscribers, 1, 10_000),
            (
                "payload-size",
                self.payload_size,
                crate::payload::HEADER_LEN,
                1 << 20,
            ),
            ("channels", self.channels, 1, 10_000),
            ("batch", self.batch, 1, 100_000),
            ("latency-subscribers", self.latency_subscribers, 1, 10_000),
            ("conn-subscribers", conn_subscribers, 1, 200_000),
            ("conn-concurrency", self.conn_concurrency, 1, 100_000),
        ];
        for (name, v, lo, hi) in checks {
            if !(lo..=hi).contains(&v) {
                bail!("--{name} must be in {lo}..={hi}, got {v}");
            }
        }
        if self.max_outstanding < self.batch {
            bail!("--max-outstanding must be >= --batch");
        }
        if self.lag_window == 0 {
            bail!("--lag-window must be > 0");
        }

        let mut scenarios = Vec::new();
        for s in &self.scenarios {
            match s.trim() {
                "publish" => scenarios.push(Scenario::Publish),
                "fanout" => scenarios.push(Scenario::Fanout),
                "fanout-psub" => scenarios.push(Scenario::FanoutPsub),
                "latency" => {
                    for &r in &self.latency_rates {
                        if !(1..=10_000_000).contains(&r) {
                            bail!("latency rate must be 1..=10000000 msgs/s, got {r}");
                        }
                        scenarios.push(Scenario::Latency(r));
                    }
                }
                "connscale" => scenarios.push(Scenario::ConnScale),
                "spublish" => scenarios.push(Scenario::SPublish),
                "sfanout" => scenarios.push(Scenario::SFanout),
                "slatency" => {
                    for &r in &self.latency_rates {
                        if !(1..=10_000_000).contains(&r) {
                            bail!("latency rate must be 1..=10000000 msgs/s, got {r}");
                        }
                        scenarios.push(Scenario::SLatency(r));
                    }
                }
                other => bail!(
                    "unknown scenario {other:?} (known: publish, fanout, fanout-psub, latency, connscale, \
                     spublish, sfanout, slatency)"
                ),
            }
        }
        scenarios.dedup();
        if scenarios.is_empty() {
            bail!("no scenarios selected");
        }

        let (mut redis, mut haproxy, mut pubwardens) = (false, false, Vec::new());
        for t in &self.targets {
            match t.trim() {
                "redis" => redis = true,
                "haproxy" => haproxy = true,
                "pubwarden" => {
                    pubwardens.push(("pubwarden".to_string(), self.pubwarden_base_config.clone()))
                }
                other => bail!("unknown target {other:?} (known: redis, haproxy, pubwarden)"),
            }
        }
        for spec in &self.pubwarden_configs {
            let (name, path) = spec
                .split_once('=')
                .ok_or_else(|| anyhow!("--pubwarden-config wants NAME=PATH, got {spec:?}"))?;
            let name = name.trim();
            let valid = !name.is_empty()
                && name.len() <= 32
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            if !valid
                || ["redis", "haproxy"].contains(&name)
                || pubwardens.iter().any(|(n, _)| n == name)
            {
                bail!("--pubwarden-config: invalid or duplicate target name {name:?}");
            }
            pubwardens.push((name.to_string(), Some(PathBuf::from(path))));
        }
        Ok(Plan {
            rounds,
            scenarios,
            haproxy,
            redis,
            cluster: self.cluster,
            pubwardens,
            params: Params {
                duration,
                warmup,
                payload_size: self.payload_size,
                channels: self.channels,
                publishers: self.publishers,
                fanout_publishers: self.fanout_publishers,
                subscribers: self.subscribers,
                batch: self.batch,
                max_outstanding: self.max_outstanding,
                lag_window: self.lag_window,
                latency_subscribers: self.latency_subscribers,
                conn_subscribers,
                conn_concurrency: self.conn_concurrency,
                cluster: self.cluster,
            },
        })
    }
}
