//! Runs the load benchmarks and prints the comparison table.
//!
//! Each scenario starts its server, measures the time to ready and the idle memory, finds the
//! maximum throughput with a closed loop, measures latency with an open loop at half of
//! that, reads the peak memory, and stops the server. The floor is an always-allow ext_authz
//! server; the peer is OPA's REST server evaluating the same bundle on the same inputs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use portcullis_bench::load::{Measurement, closed_loop, open_loop};
use portcullis_bench::process::{Server, free_address};
use portcullis_bench::report::{Baselines, ScenarioResult, check_targets, render};
use portcullis_bench::requests::{MixEntry, opa_request_body, read_mix};
use portcullis_bench::target::Target;

/// Decision rule of the example bundle, for portcullis and for OPA.
const DECISION_PATH: &str = "envoy/authz/allow";

/// Scenarios of the full suite that this version does not run yet.
const NOT_MEASURED: &[&str] = &["portcullis, JWT (RS256)", "portcullis, Kafka sink"];

#[derive(Debug, Parser)]
#[command(
    about = "Benchmarks portcullis against an always-allow floor and OPA, and prints the comparison"
)]
struct Args {
    /// The portcullis binary (a release build).
    #[arg(long)]
    portcullis: PathBuf,

    /// The always-allow floor server binary (portcullis-floor, a release build).
    #[arg(long)]
    floor: PathBuf,

    /// The OPA binary; without it the peer is not measured and ratios against it show `-`.
    #[arg(long)]
    opa: Option<PathBuf>,

    /// The policy bundle folder.
    #[arg(long)]
    bundle: PathBuf,

    /// Folder of protojson CheckRequest files that form the request mix.
    #[arg(long)]
    requests: PathBuf,

    /// Seconds of each measurement (closed loop and open loop each).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,

    /// Seconds of closed-loop warm-up before each measurement; not recorded.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,

    /// Calls in flight in the closed loop.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,

    /// HTTP/2 connections for gRPC (OPA over HTTP/1.1 uses one connection per call in flight).
    #[arg(long, default_value_t = 4)]
    connections: usize,
}

/// A server under test and how to reach it.
enum Kind {
    Floor,
    Opa,
    Portcullis { sink: &'static str },
}

struct Scenario {
    name: &'static str,
    kind: Kind,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("portcullis-bench: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Runs every scenario in a temporary folder, which is kept when the run fails so that the
/// server logs named in the error can be read.
async fn run(args: &Args) -> Result<(), String> {
    let work = tempfile::tempdir()
        .map_err(|error| format!("cannot create a temporary folder: {error}"))?;
    match run_in(args, work.path()).await {
        Ok(()) => Ok(()),
        Err(message) => {
            let kept_folder = work.keep();
            Err(format!(
                "{message}\n(server logs and configurations kept in {})",
                kept_folder.display()
            ))
        }
    }
}

async fn run_in(args: &Args, work: &Path) -> Result<(), String> {
    let bundle = std::fs::canonicalize(&args.bundle)
        .map_err(|error| format!("bundle {} not found: {error}", args.bundle.display()))?;
    let mix = read_mix(&args.requests).map_err(|error| error.to_string())?;
    let opa_bodies = build_opa_bodies(args, &bundle, &mix, work)?;

    let mut scenarios = vec![Scenario {
        name: "floor (always allow)",
        kind: Kind::Floor,
    }];
    if args.opa.is_some() {
        scenarios.push(Scenario {
            name: "peer: OPA REST",
            kind: Kind::Opa,
        });
    } else {
        eprintln!("portcullis-bench: no --opa given; the peer is not measured");
    }
    scenarios.push(Scenario {
        name: "portcullis, audit none",
        kind: Kind::Portcullis { sink: "none" },
    });
    scenarios.push(Scenario {
        name: "portcullis, file fsync on",
        kind: Kind::Portcullis { sink: "fsync" },
    });
    scenarios.push(Scenario {
        name: "portcullis, file fsync off",
        kind: Kind::Portcullis { sink: "nofsync" },
    });

    let mut results = Vec::new();
    let mut peer_decisions: Option<Vec<bool>> = None;
    for scenario in &scenarios {
        eprintln!("portcullis-bench: {}", scenario.name);
        let (result, decisions) =
            run_scenario(args, scenario, &bundle, &mix, &opa_bodies, work).await?;
        match scenario.kind {
            Kind::Opa => peer_decisions = Some(decisions),
            Kind::Portcullis { .. } => {
                compare_decisions(scenario.name, &mix, &decisions, peer_decisions.as_deref())?
            }
            Kind::Floor => {}
        }
        results.push(result);
    }

    let baselines = Baselines {
        floor: results.first(),
        peer: results
            .iter()
            .find(|result| result.name.starts_with("peer")),
    };
    println!("{}", render(&results, &baselines, NOT_MEASURED));
    println!("Targets:");
    for result in results
        .iter()
        .filter(|result| result.name.starts_with("portcullis"))
    {
        for line in check_targets(result, &baselines) {
            println!("  {line}");
        }
    }
    println!(
        "\n{} requests in the mix, {} s per measurement, {} calls in flight over {} HTTP/2 connections (OPA: HTTP/1.1 keep-alive); the load generator shares the machine's {} CPUs with the servers.",
        mix.len(),
        args.duration,
        args.concurrency,
        args.connections,
        std::thread::available_parallelism()
            .map(|count| count.get())
            .unwrap_or(1),
    );
    Ok(())
}

/// Builds OPA's request bodies from the input documents that `portcullis check` prints, so
/// that OPA evaluates exactly the input portcullis builds.
fn build_opa_bodies(
    args: &Args,
    bundle: &Path,
    mix: &[MixEntry],
    work: &Path,
) -> Result<Vec<Vec<u8>>, String> {
    let config = work.join("check.yaml");
    write_config(&config, "127.0.0.1:1", None, bundle, "none", work)?;

    let mut bodies = Vec::with_capacity(mix.len());
    for entry in mix {
        let output = std::process::Command::new(&args.portcullis)
            .arg("check")
            .arg("--config")
            .arg(&config)
            .arg("--request")
            .arg(&entry.path)
            .output()
            .map_err(|error| format!("cannot run {} check: {error}", args.portcullis.display()))?;
        if !output.status.success() {
            return Err(format!(
                "portcullis check failed on {}: {}",
                entry.path.display(),
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        let json: serde_json::Value = serde_json::from_slice(&output.stdout).map_err(|error| {
            format!(
                "portcullis check printed invalid JSON for {}: {error}",
                entry.path.display()
            )
        })?;
        let body = opa_request_body(&json).ok_or_else(|| {
            format!(
                "portcullis check printed no `input` for {}",
                entry.path.display()
            )
        })?;
        bodies.push(body);
    }
    Ok(bodies)
}

/// Writes a portcullis configuration; `sink` is `none`, `fsync` or `nofsync`.
fn write_config(
    path: &Path,
    listen: &str,
    admin: Option<&str>,
    bundle: &Path,
    sink: &str,
    work: &Path,
) -> Result<(), String> {
    let admin = admin
        .map(|address| format!("admin:\n  address: {address}\n"))
        .unwrap_or_default();
    let audit = match sink {
        "none" => "audit:\n  sink: none\n".to_string(),
        fsync => format!(
            "audit:\n  sink: file\n  path: {}\n  fsync: {}\n",
            work.join(format!("decisions-{fsync}.jsonl")).display(),
            fsync == "fsync"
        ),
    };
    let text = format!(
        "listen:\n  address: {listen}\n{admin}policy:\n  bundle: {}\n  decision: {DECISION_PATH}\n{audit}log:\n  level: warn\nshutdown:\n  drain: 0\n",
        bundle.display()
    );
    std::fs::write(path, text).map_err(|error| format!("cannot write {}: {error}", path.display()))
}

/// Runs one scenario and returns its figures and the decision for each request of the mix.
async fn run_scenario(
    args: &Args,
    scenario: &Scenario,
    bundle: &Path,
    mix: &[MixEntry],
    opa_bodies: &[Vec<u8>],
    work: &Path,
) -> Result<(ScenarioResult, Vec<bool>), String> {
    let address = free_address().map_err(|error| error.to_string())?;
    let log = work.join(format!(
        "{}.log",
        scenario.name.replace([' ', ',', ':', '(', ')'], "_")
    ));
    let requests: Vec<_> = mix.iter().map(|entry| entry.request.clone()).collect();

    let (server, target, ready_after) = match &scenario.kind {
        Kind::Floor => {
            let mut server =
                Server::start(scenario.name, &args.floor, &[address.to_string()], &log)
                    .map_err(|error| error.to_string())?;
            let ready_after = server
                .wait_ready(|| async {
                    Target::grpc(address, 1, requests.clone())
                        .await?
                        .call(0, 0)
                        .await
                        .map(|_| ())
                })
                .await
                .map_err(|error| error.to_string())?;
            let target = Target::grpc(address, args.connections, requests)
                .await
                .map_err(|error| error.to_string())?;
            (server, target, ready_after)
        }
        Kind::Opa => {
            let opa = args
                .opa
                .as_ref()
                .expect("the OPA scenario runs only with --opa");
            let opa_args = [
                "run",
                "--server",
                "--addr",
                &address.to_string(),
                "--log-level",
                "error",
                "--bundle",
                &bundle.display().to_string(),
            ]
            .map(String::from);
            let mut server = Server::start(scenario.name, opa, &opa_args, &log)
                .map_err(|error| error.to_string())?;
            let target = Target::opa(address, DECISION_PATH, opa_bodies.to_vec());
            let ready_after = server
                .wait_ready(|| async { target.call(0, 0).await.map(|_| ()) })
                .await
                .map_err(|error| error.to_string())?;
            (server, target, ready_after)
        }
        Kind::Portcullis { sink } => {
            let admin = free_address().map_err(|error| error.to_string())?;
            let config = work.join(format!("portcullis-{sink}.yaml"));
            write_config(
                &config,
                &address.to_string(),
                Some(&admin.to_string()),
                bundle,
                sink,
                work,
            )?;
            let serve_args = ["serve", "--config", &config.display().to_string()].map(String::from);
            let mut server = Server::start(scenario.name, &args.portcullis, &serve_args, &log)
                .map_err(|error| error.to_string())?;
            let client = Client::builder(TokioExecutor::new()).build_http();
            let ready_after = server
                .wait_ready(|| readyz_ok(&client, admin))
                .await
                .map_err(|error| error.to_string())?;
            let target = Target::grpc(address, args.connections, requests)
                .await
                .map_err(|error| error.to_string())?;
            (server, target, ready_after)
        }
    };
    let rss_idle_bytes = server.peak_rss_bytes();

    let decisions = decide_each(&target)
        .await
        .map_err(|error| format!("{}: {error}", scenario.name))?;
    let target = Arc::new(target);
    let (max_throughput, half_load) = measure(args, Arc::clone(&target)).await;
    let rss_load_bytes = server.peak_rss_bytes();
    server.stop().await;

    if max_throughput.succeeded == 0 {
        let error = max_throughput
            .first_error
            .unwrap_or_else(|| "no call returned".to_string());
        return Err(format!(
            "{}: no call succeeded in the closed loop: {error}",
            scenario.name
        ));
    }
    let result = ScenarioResult {
        name: scenario.name.to_string(),
        max_throughput,
        half_load,
        ready_after,
        rss_idle_bytes,
        rss_load_bytes,
    };
    Ok((result, decisions))
}

/// Warms up, finds the maximum throughput, then measures latency at half of it.
async fn measure(args: &Args, target: Arc<Target>) -> (Measurement, Measurement) {
    let duration = Duration::from_secs_f64(args.duration);
    if args.warmup > 0.0 {
        closed_loop(
            Arc::clone(&target),
            args.concurrency,
            Duration::from_secs_f64(args.warmup),
        )
        .await;
    }
    let max_throughput = closed_loop(Arc::clone(&target), args.concurrency, duration).await;
    let half_rate = max_throughput.throughput() / 2.0;
    let half_load = open_loop(target, half_rate, args.connections, duration).await;
    (max_throughput, half_load)
}

/// Sends each request of the mix once and returns whether each was allowed.
async fn decide_each(target: &Target) -> Result<Vec<bool>, String> {
    let mut decisions = Vec::with_capacity(target.mix_len());
    for index in 0..target.mix_len() {
        decisions.push(
            target
                .call(0, index)
                .await
                .map_err(|error| error.to_string())?,
        );
    }
    Ok(decisions)
}

/// Fails when portcullis and OPA decided any request of the mix differently, because the
/// comparison would then not be between the same work.
fn compare_decisions(
    name: &str,
    mix: &[MixEntry],
    decisions: &[bool],
    peer: Option<&[bool]>,
) -> Result<(), String> {
    let Some(peer) = peer else { return Ok(()) };
    for ((entry, ours), theirs) in mix.iter().zip(decisions).zip(peer) {
        if ours != theirs {
            return Err(format!(
                "{name} and OPA disagree on {}: portcullis allowed={ours}, OPA allowed={theirs}",
                entry.name
            ));
        }
    }
    Ok(())
}

async fn readyz_ok(
    client: &Client<HttpConnector, Full<Bytes>>,
    admin: SocketAddr,
) -> Result<(), String> {
    let uri: http::Uri = format!("http://{admin}/readyz")
        .parse()
        .expect("an IP:PORT address forms a valid URI");
    let request = http::Request::get(uri)
        .body(Full::new(Bytes::new()))
        .map_err(|error| error.to_string())?;
    let response = client
        .request(request)
        .await
        .map_err(|error| error.to_string())?;
    if response.status() == http::StatusCode::OK {
        Ok(())
    } else {
        Err(format!("/readyz returned {}", response.status()))
    }
}
