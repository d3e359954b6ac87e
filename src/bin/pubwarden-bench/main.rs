//! `pubwarden-bench`: benchmarks pubwarden against direct Redis and an L4 relay
//! (HAProxy `mode tcp`, `nbthread 1`) in one run, alternating the targets round
//! by round so that machine noise hits all of them alike.
//!
//! It starts its own `redis-server` (CPU 0), HAProxy and pubwarden in front of it
//! (CPU 1, shared with this load generator), runs every scenario against every
//! target for several rounds, and prints medians with ratios to direct Redis and
//! to HAProxy. Scenarios: `publish` (pipelined PUBLISH throughput), `fanout` and
//! `fanout-psub` (published and delivered msgs/s with SUBSCRIBE / PSUBSCRIBE
//! subscribers), `latency` (p50/p99/p99.9/max at fixed offered rates, measured
//! from the scheduled send time), `connscale` (time to subscribe N connections,
//! proxy RSS per connection). Every delivery is checked by sequence number:
//! lost, duplicated and out-of-order must all be 0. The exit status is 0 when
//! every run completed with clean counts, 1 otherwise, 2 on setup errors.
//! `connscale` is capped to what the open-file limit allows (a 1:1 proxy needs
//! two descriptors per client: 9,500 under this machine's hard limit of 20,000).
//!
//! Full run (about 2.5-3 minutes), from the repository root:
//!
//! ```text
//! cargo build --release --bin pubwarden --bin pubwarden-bench
//! target/release/pubwarden-bench --json bench.json
//! ```
//!
//! Quick smoke run (a few seconds per scenario, 1000 connections):
//!
//! ```text
//! target/release/pubwarden-bench --quick
//! ```
//!
//! Cluster mode (`--cluster`): a 3-master Redis Cluster (no replicas) on free
//! loopback ports, all masters on the Redis CPU. Every channel shares the hash
//! tag `{bench}`, so `redis` (direct) and `haproxy` reach the one master that
//! owns that slot, while `pubwarden` runs with `upstream.mode: cluster` (its
//! classic pub/sub goes to its home master, its SPUBLISH/SSUBSCRIBE to the
//! slot's master). The sharded scenarios (`spublish`, `sfanout`, `slatency`)
//! work in both modes:
//!
//! ```text
//! target/release/pubwarden-bench --cluster --scenarios publish,fanout,sfanout,latency --quick
//! ```
//!
//! Without pubwarden (e.g. before it is built):
//! `target/release/pubwarden-bench --quick --targets redis,haproxy`.
//! Comparing pubwarden configurations:
//! `target/release/pubwarden-bench --pubwarden-config policy=policy.yaml`.

mod cli;
mod load;
mod payload;
mod report;
mod resp;
mod scenarios;
mod sys;
mod targets;

use anyhow::{Context, Result, anyhow};
use clap::Parser;
use cli::{Args, Plan};
use report::{Record, esc, num};
use scenarios::{RunResult, Scenario};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use targets::{Fleet, FleetSpec, Pinning};

fn main() {
    let args = Args::parse();
    match real_main(args) {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("pubwarden-bench: error: {e:#}");
            std::process::exit(2);
        }
    }
}

/// Returns Ok(false) if the run completed but some run or check failed.
fn real_main(args: Args) -> Result<bool> {
    let mut plan = args.plan()?;

    // Pin before any thread exists, so every thread of the generator inherits it.
    let cpus = sys::allowed_cpus()?;
    let pin_ok = !args.no_pin
        && args.redis_cpu != args.load_cpu
        && cpus.contains(&args.redis_cpu)
        && cpus.contains(&args.load_cpu);
    let pinning_text = if pin_ok {
        sys::pin_current_thread(args.load_cpu)?;
        format!(
            "{redis} on CPU {r} (taskset -c {r}); proxy under test (haproxy / pubwarden) on CPU {l} \
             (taskset -c {l}); load generator (this process, all threads) on CPU {l} (sched_setaffinity)",
            redis = if args.cluster {
                "redis-server (all 3 cluster masters)"
            } else {
                "redis-server"
            },
            r = args.redis_cpu,
            l = args.load_cpu
        )
    } else if args.no_pin {
        "none (--no-pin)".to_string()
    } else {
        format!(
            "none: CPUs {} and {} are not both available (allowed: {cpus:?}); results will be noisier",
            args.redis_cpu, args.load_cpu
        )
    };
    let pin = Pinning {
        redis_cpu: pin_ok.then_some(args.redis_cpu),
        proxy_cpu: pin_ok.then_some(args.load_cpu),
    };

    // Proxies need two descriptors per client; children inherit this limit.
    let want_fds = ((plan.params.conn_subscribers as u64) * 3 + 4096).max(262_144);
    let nofile = sys::raise_nofile(want_fds)?;
    // A 1:1 proxy holds two descriptors per client connection; keep headroom.
    let max_conns = (nofile.saturating_sub(1000) / 2).max(1) as usize;
    if plan.scenarios.contains(&Scenario::ConnScale) && plan.params.conn_subscribers > max_conns {
        println!(
            "pubwarden-bench: connscale: {} subscribers reduced to {max_conns}: the open-file limit is \
             {nofile} (hard limit; a proxy needs 2 descriptors per connection)",
            plan.params.conn_subscribers
        );
        plan.params.conn_subscribers = max_conns;
    }

    let (workdir, temp_workdir) = match &args.workdir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!("pubwarden-bench.{}", std::process::id())),
            true,
        ),
    };
    std::fs::create_dir_all(&workdir).with_context(|| format!("creating {}", workdir.display()))?;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building tokio runtime")?;
    let local = tokio::task::LocalSet::new();
    let outcome = local.block_on(&rt, async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing SIGTERM handler")?;
        tokio::select! {
            r = run(&args, &plan, pin, &pinning_text, &workdir, nofile) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted (Ctrl-C); children stopped")),
            _ = term.recv() => Err(anyhow!("terminated (SIGTERM); children stopped")),
        }
    });
    // Child processes were stopped when `run` returned or was dropped.
    match &outcome {
        Ok(true) if temp_workdir => {
            let _ = std::fs::remove_dir_all(&workdir);
        }
        _ => eprintln!("pubwarden-bench: logs kept in {}", workdir.display()),
    }
    outcome
}

async fn run(
    args: &Args,
    plan: &Plan,
    pin: Pinning,
    pinning_text: &str,
    workdir: &std::path::Path,
    nofile: u64,
) -> Result<bool> {
    let bench_start = Instant::now();
    println!("pubwarden-bench: pinning: {pinning_text}");
    let spec = FleetSpec {
        redis_bin: args.redis_bin.clone(),
        haproxy_bin: args.haproxy_bin.clone(),
        pubwarden_bin: args.pubwarden_bin.clone(),
        haproxy: plan.haproxy,
        pubwardens: plan.pubwardens.clone(),
        workdir: workdir.to_path_buf(),
        pin,
        haproxy_maxconn: nofile
            .saturating_sub(256)
            .div_euclid(2)
            .clamp(1000, 100_000),
        cluster: plan.cluster,
        redis_cli_bin: args.redis_cli_bin.clone(),
    };
    let mut fleet = Fleet::start(&spec).await?;
    if let Some(c) = &fleet.cluster {
        let nodes: Vec<String> = c.nodes.iter().map(|n| n.to_string()).collect();
        println!(
            "pubwarden-bench: cluster of {} masters ({}); hash tag {} is slot {}, owned by {}",
            nodes.len(),
            nodes.join(", "),
            targets::HASH_TAG,
            c.slot,
            c.owner
        );
    }
    for t in &fleet.targets {
        println!(
            "pubwarden-bench: target {:<12} {} (pid {})",
            t.name, t.addr, t.pid
        );
    }
    let mut targets: Vec<targets::Target> = fleet
        .targets
        .iter()
        .filter(|t| plan.redis || t.kind != targets::Kind::Redis)
        .cloned()
        .collect();
    if targets.is_empty() {
        return Err(anyhow!("no targets selected"));
    }
    let cluster = fleet.cluster.clone();
    let names: Vec<String> = targets.iter().map(|t| t.name.clone()).collect();
    let redis_nodes = fleet.redis_nodes.clone();
    let baseline = Fleet::connected_clients(&redis_nodes).await?;

    let est: Duration = plan
        .scenarios
        .iter()
        .map(|s| s.estimate(&plan.params) * (plan.rounds * targets.len()) as u32)
        .sum();
    let total_runs = plan.scenarios.len() * plan.rounds * targets.len();
    println!(
        "pubwarden-bench: {} scenarios x {} rounds x {} targets = {total_runs} runs, about {:.0} s",
        plan.scenarios.len(),
        plan.rounds,
        targets.len(),
        est.as_secs_f64()
    );

    let mut records: Vec<Record> = Vec::new();
    let mut run_no = 0usize;
    for &scn in &plan.scenarios {
        println!("\n-- {}: {}", scn.id(), scn.describe(&plan.params));
        for round in 0..plan.rounds {
            let mut order: Vec<usize> = (0..targets.len()).collect();
            order.rotate_left(round % targets.len());
            for (pos, ti) in order.into_iter().enumerate() {
                fleet.check_alive()?;
                if scn == Scenario::ConnScale && targets[ti].kind != targets::Kind::Redis {
                    // Fresh proxy process: its RSS must not include memory kept
                    // from earlier runs.
                    targets[ti] = fleet.restart(&targets[ti].name).await?;
                }
                let t = &targets[ti];
                run_no += 1;
                let tag = if plan.cluster {
                    // One slot for every channel of the run.
                    format!("{}.pwb:{}:{run_no}", targets::HASH_TAG, std::process::id())
                } else {
                    format!("pwb:{}:{run_no}", std::process::id())
                };
                let at_secs = bench_start.elapsed().as_secs_f64();
                let limit = plan.params.warmup + plan.params.duration + Duration::from_secs(150);
                let result = match tokio::time::timeout(
                    limit,
                    scenarios::run(scn, t, &plan.params, bench_start, &tag),
                )
                .await
                {
                    Ok(Ok(r)) => Ok(r),
                    Ok(Err(e)) => Err(format!("{e:#}")),
                    Err(_) => Err(format!("run did not finish within {limit:?}")),
                };
                println!(
                    "[{run_no:>3}/{total_runs} {:>6.1}s] {:<12} round {}/{} {:<12} {}",
                    bench_start.elapsed().as_secs_f64(),
                    scn.id(),
                    round + 1,
                    plan.rounds,
                    t.name,
                    progress(&result)
                );
                records.push(Record {
                    scenario: scn,
                    target: t.name.clone(),
                    round,
                    order: pos,
                    at_secs,
                    result,
                });
                // Let every proxy close its upstream connections before the next run.
                let settled = wait_clients(&redis_nodes, baseline).await;
                if !settled {
                    eprintln!(
                        "pubwarden-bench: warning: Redis still has extra clients 10 s after a run on {}",
                        t.name
                    );
                }
            }
        }
    }
    fleet.check_alive()?;
    let total = bench_start.elapsed().as_secs_f64();
    drop(fleet);

    print!(
        "{}",
        report::table(&records, &plan.scenarios, &names, &plan.params)
    );
    println!("\npinning: {pinning_text}\ntotal time: {total:.1} s");

    if let Some(path) = &args.json {
        write_json(
            path,
            args,
            plan,
            pinning_text,
            &targets,
            &records,
            &names,
            total,
            cluster.as_ref(),
        )?;
        println!("raw results written to {}", path.display());
    }
    let all_ok = records.iter().all(|r| match &r.result {
        Ok(res) => res.check.ok() && res.errors.is_empty(),
        Err(_) => false,
    });
    if !all_ok {
        println!(
            "RESULT: FAILED (a run failed or a correctness check was not 0; see '!' lines above)"
        );
    } else {
        println!("RESULT: OK (all runs completed; lost/duplicated/out-of-order all 0)");
    }
    Ok(all_ok)
}

fn progress(r: &Result<RunResult, String>) -> String {
    match r {
        Err(e) => format!("ERROR: {e}"),
        Ok(res) => {
            let ms: Vec<String> = res
                .metrics
                .iter()
                .map(|m| {
                    format!(
                        "{} {} {}",
                        m.name,
                        report::fmt_value(m.value, m.unit),
                        m.unit
                    )
                })
                .collect();
            let verdict = if res.check.ok() && res.errors.is_empty() {
                "ok".to_string()
            } else {
                format!(
                    "CHECK FAILED (lost {}, dup {}, ooo {}, errors {})",
                    res.check.lost,
                    res.check.duplicated,
                    res.check.out_of_order,
                    res.errors.len()
                )
            };
            format!("{}  {verdict}", ms.join(", "))
        }
    }
}

/// Waits (at most 10 s) until Redis (all nodes) is back to `baseline` clients.
async fn wait_clients(redis: &[std::net::SocketAddr], baseline: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        match Fleet::connected_clients(redis).await {
            Ok(n) if n <= baseline => return true,
            Ok(_) => {}
            Err(_) => return false,
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[allow(clippy::too_many_arguments)]
fn write_json(
    path: &PathBuf,
    args: &Args,
    plan: &Plan,
    pinning: &str,
    targets: &[targets::Target],
    records: &[Record],
    names: &[String],
    total: f64,
    cluster: Option<&targets::ClusterInfo>,
) -> Result<()> {
    let p = &plan.params;
    let cmdline: Vec<String> = std::env::args().map(|a| esc(&a)).collect();
    let tjson: Vec<String> = targets
        .iter()
        .map(|t| {
            format!(
                "{{\"name\":{},\"kind\":{},\"addr\":{},\"pid\":{}}}",
                esc(&t.name),
                esc(&format!("{:?}", t.kind).to_lowercase()),
                esc(&t.addr.to_string()),
                t.pid
            )
        })
        .collect();
    let scen: Vec<String> = plan
        .scenarios
        .iter()
        .map(|s: &Scenario| {
            format!(
                "{{\"id\":{},\"description\":{}}}",
                esc(&s.id()),
                esc(&s.describe(p))
            )
        })
        .collect();
    let mut header = vec![
        ("tool".to_string(), esc("pubwarden-bench")),
        ("version".into(), esc(env!("CARGO_PKG_VERSION"))),
        ("command_line".into(), format!("[{}]", cmdline.join(","))),
        ("quick".into(), args.quick.to_string()),
        ("rounds".into(), plan.rounds.to_string()),
        ("pinning".into(), esc(pinning)),
        (
            "params".into(),
            format!(
                "{{\"duration_secs\":{},\"warmup_secs\":{},\"payload_size\":{},\"channels\":{},\"publishers\":{},\
                 \"fanout_publishers\":{},\"subscribers\":{},\"batch\":{},\"max_outstanding\":{},\"lag_window\":{},\
                 \"latency_subscribers\":{},\"conn_subscribers\":{},\"conn_concurrency\":{}}}",
                num(p.duration.as_secs_f64()),
                num(p.warmup.as_secs_f64()),
                p.payload_size,
                p.channels,
                p.publishers,
                p.fanout_publishers,
                p.subscribers,
                p.batch,
                p.max_outstanding,
                p.lag_window,
                p.latency_subscribers,
                p.conn_subscribers,
                p.conn_concurrency
            ),
        ),
        ("targets".into(), format!("[{}]", tjson.join(","))),
        ("scenarios".into(), format!("[{}]", scen.join(","))),
        ("total_secs".into(), num(total)),
    ];
    if let Some(c) = cluster {
        let nodes: Vec<String> = c.nodes.iter().map(|n| esc(&n.to_string())).collect();
        header.push((
            "cluster".into(),
            format!(
                "{{\"masters\":[{}],\"hash_tag\":{},\"slot\":{},\"owner\":{}}}",
                nodes.join(","),
                esc(targets::HASH_TAG),
                c.slot,
                esc(&c.owner.to_string())
            ),
        ));
    }
    let doc = report::json(&header, records, &plan.scenarios, names);
    std::fs::write(path, doc).with_context(|| format!("writing {}", path.display()))
}
