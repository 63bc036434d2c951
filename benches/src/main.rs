//! Runs the load benchmarks and prints the comparison table.
//!
//! Each scenario starts its server, measures the time to ready and the idle memory, finds the
//! maximum throughput with a closed loop, measures latency with an open loop at half of
//! that, reads the peak memory, and stops the server. The floor is an always-allow ext_authz
//! server; the peer is OPA's REST server evaluating the same bundle on the same inputs.
//! The through-Envoy scenarios send the mix as HTTP requests through Envoy to a local
//! upstream, without the ext_authz filter and with it calling the floor or portcullis.
//! The Kafka scenarios share one single-node broker on 127.0.0.1 that the run starts before
//! the first of them and stops after the last.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use envoy_types::pb::envoy::service::auth::v3::CheckRequest;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use portcullis_bench::jwt;
use portcullis_bench::load::{Measurement, closed_loop, open_loop};
use portcullis_bench::metrics::{
    AUDIT_FAILURES, Buckets, DELIVERY_LAG, counters_by_kind, counters_since,
};
use portcullis_bench::process::{Server, free_address};
use portcullis_bench::report::{
    AuditFigures, Baselines, Judged, ScenarioResult, ThroughputTargets, check_targets, render,
    render_added_by_ext_authz, render_added_cost, render_audit_figures, render_through_envoy,
};
use portcullis_bench::requests::{MixEntry, opa_request_body, read_mix};
use portcullis_bench::target::Target;
use portcullis_bench::upstream::Upstream;
use portcullis_e2e::kafka::Kafka;

mod through_envoy;

/// Decision rule of the example bundle, for portcullis and for OPA.
const DECISION_PATH: &str = "envoy/authz/allow";

/// The Kafka topic of the audit scenarios, created before the first of them.
const AUDIT_TOPIC: &str = "portcullis-audit-bench";

/// Records between signed checkpoints in the spool and Kafka scenarios.
const CHECKPOINT_EVERY: u32 = 1000;

#[derive(Debug, Parser)]
#[command(
    about = "Benchmarks portcullis against an always-allow floor and OPA, and prints the comparison",
    long_about = "Benchmarks portcullis against an always-allow floor and OPA, and prints the comparison.\n\n\
Every run measures the floor and portcullis without audit, with the fsynced file and with the \
spool. --opa adds the peer, --jwt-keys the rows with an RS256 bearer token, --envoy the rows \
through Envoy, and --kafka the rows whose audit Kafka acknowledges. scripts/bench passes all of \
them; see benches/README.md for what each row measures."
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

    /// HTTP/2 connections for gRPC (OPA and Envoy over HTTP/1.1 use one connection per call in
    /// flight).
    #[arg(long, default_value_t = 4)]
    connections: usize,

    /// Folder with the dev-only RS256 key pair (`rs256-key.dev-only.pem`,
    /// `jwks.dev-only.json`); without it the JWT scenarios are not measured.
    #[arg(long)]
    jwt_keys: Option<PathBuf>,

    /// Run the Kafka scenarios against a broker started on 127.0.0.1 by the launcher in
    /// tests/src/kafka.rs, which installs Kafka with tests/peers/kafka.sh when it is missing.
    /// They verify a JWT too, so they need --jwt-keys.
    #[arg(long)]
    kafka: bool,

    /// The Envoy binary (1.40, as tests/peers/envoy.sh installs it); without it the
    /// through-Envoy scenarios are not measured.
    #[arg(long)]
    envoy: Option<PathBuf>,
}

/// A server under test and how to reach it.
enum Kind {
    Floor,
    Opa,
    Portcullis(Setup),
    /// HTTP requests through Envoy to the upstream, with the ext_authz filter calling this
    /// server, or without the filter when `None`.
    Envoy(Option<AuthzServer>),
}

/// The ext_authz server behind Envoy.
enum AuthzServer {
    Floor,
    Portcullis(Setup),
}

/// Where a portcullis scenario records its decision events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Audit {
    None,
    /// `audit.mode: file` with fsync, the chained file without checkpoints.
    File,
    /// `audit.mode: spool` with fsync and signed checkpoints, no Kafka.
    Spool,
    /// `audit.mode: kafka` without a spool: each check waits for Kafka's acknowledgement.
    Kafka,
    /// `audit.mode: kafka` with a spool to fall back on when Kafka is slow.
    KafkaWithSpool,
}

impl Audit {
    fn uses_kafka(self) -> bool {
        matches!(self, Audit::Kafka | Audit::KafkaWithSpool)
    }
}

/// How a portcullis scenario is configured.
#[derive(Debug, Clone, Copy)]
struct Setup {
    /// A name for its files: configuration, spool folder, instance id.
    label: &'static str,
    audit: Audit,
    /// Verify the RS256 bearer token that every request then carries.
    jwt: bool,
}

/// Returns the throughput targets that apply to a portcullis row. The peer evaluates the
/// policy without a token and records nothing, so only `audit none` does the peer's work. The
/// floor target covers the check with and without a token. Audit writes have their own targets.
fn throughput_targets(setup: &Setup) -> ThroughputTargets {
    let records = setup.audit != Audit::None;
    let peer = if records {
        Judged::No("the peer records no audit")
    } else if setup.jwt {
        Judged::No("the peer verifies no token")
    } else {
        Judged::Yes
    };
    let floor = if records {
        Judged::No("the target covers checks without audit writes")
    } else {
        Judged::Yes
    };
    ThroughputTargets { peer, floor }
}

/// What the portcullis configurations of a run share.
struct Shared<'a> {
    bundle: &'a Path,
    work: &'a Path,
    signing_key: &'a Path,
    jwks: Option<&'a Path>,
    kafka_bootstrap: Option<String>,
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

/// Runs every scenario in a temporary folder. When the run fails after a server started, the
/// folder is kept so that the server logs named in the error can be read.
async fn run(args: &Args) -> Result<(), String> {
    check_args(args)?;
    let work = tempfile::tempdir()
        .map_err(|error| format!("cannot create a temporary folder: {error}"))?;
    match run_in(args, work.path()).await {
        Ok(()) => Ok(()),
        Err(message) if !contains_log(work.path()) => Err(message),
        Err(message) => {
            let kept_folder = work.keep();
            Err(format!(
                "{message}\n(server logs and configurations kept in {})",
                kept_folder.display()
            ))
        }
    }
}

/// Rejects options that cannot make a run, before anything starts.
fn check_args(args: &Args) -> Result<(), String> {
    if args.kafka && args.jwt_keys.is_none() {
        return Err("the Kafka scenarios verify a JWT: --kafka needs --jwt-keys".to_string());
    }
    if !(args.duration.is_finite() && args.duration > 0.0) {
        return Err(format!(
            "invalid --duration {}: expected seconds above 0, such as 10",
            args.duration
        ));
    }
    if !(args.warmup.is_finite() && args.warmup >= 0.0) {
        return Err(format!(
            "invalid --warmup {}: expected 0 or more seconds, such as 2",
            args.warmup
        ));
    }
    if args.concurrency == 0 {
        return Err("invalid --concurrency 0: expected 1 or more calls in flight".to_string());
    }
    if args.connections == 0 {
        return Err("invalid --connections 0: expected 1 or more connections".to_string());
    }
    Ok(())
}

/// Returns whether `folder` contains a server log, the files a failed run keeps it for.
fn contains_log(folder: &Path) -> bool {
    std::fs::read_dir(folder).is_ok_and(|entries| {
        entries.flatten().any(|entry| {
            entry
                .path()
                .extension()
                .is_some_and(|extension| extension == "log")
        })
    })
}

async fn run_in(args: &Args, work: &Path) -> Result<(), String> {
    let bundle = std::fs::canonicalize(&args.bundle)
        .map_err(|error| format!("bundle {} not found: {error}", args.bundle.display()))?;
    let mix = read_mix(&args.requests).map_err(|error| error.to_string())?;
    let checked = check_mix(args, &bundle, &mix, work)?;
    let signing_key = generate_signing_key(args, work)?;
    let (jwks, token) = match &args.jwt_keys {
        Some(folder) => {
            let folder = std::fs::canonicalize(folder).map_err(|error| {
                format!("JWT key folder {} not found: {error}", folder.display())
            })?;
            let issued_at = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |since| since.as_secs());
            let token = jwt::sign_token(&folder.join("rs256-key.dev-only.pem"), issued_at)
                .map_err(|error| error.to_string())?;
            (Some(folder.join("jwks.dev-only.json")), Some(token))
        }
        None => {
            eprintln!("portcullis-bench: no --jwt-keys given; the JWT scenarios are not measured");
            (None, None)
        }
    };
    if !args.kafka {
        eprintln!("portcullis-bench: no --kafka given; the Kafka scenarios are not measured");
    }
    if args.envoy.is_none() {
        eprintln!(
            "portcullis-bench: no --envoy given; the through-Envoy scenarios are not measured"
        );
    }

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
    let mut portcullis = |name, label, audit, jwt| {
        scenarios.push(Scenario {
            name,
            kind: Kind::Portcullis(Setup { label, audit, jwt }),
        })
    };
    portcullis("portcullis, audit none", "none", Audit::None, false);
    portcullis("portcullis, audit file fsync", "file", Audit::File, false);
    portcullis("portcullis, audit spool", "spool", Audit::Spool, false);
    if token.is_some() {
        portcullis("portcullis, JWT (RS256)", "jwt", Audit::None, true);
        portcullis("portcullis, JWT + spool", "jwt-spool", Audit::Spool, true);
    }
    if args.envoy.is_some() {
        let mut envoy = |name, authz| {
            scenarios.push(Scenario {
                name,
                kind: Kind::Envoy(authz),
            })
        };
        envoy("envoy only (no ext_authz)", None);
        envoy("envoy + floor", Some(AuthzServer::Floor));
        envoy(
            "envoy + portcullis (audit none)",
            Some(AuthzServer::Portcullis(Setup {
                label: "envoy-none",
                audit: Audit::None,
                jwt: false,
            })),
        );
        if token.is_some() {
            envoy(
                "envoy + portcullis (JWT)",
                Some(AuthzServer::Portcullis(Setup {
                    label: "envoy-jwt",
                    audit: Audit::None,
                    jwt: true,
                })),
            );
        }
    }
    if args.kafka {
        scenarios.push(Scenario {
            name: "portcullis, JWT + kafka",
            kind: Kind::Portcullis(Setup {
                label: "jwt-kafka",
                audit: Audit::Kafka,
                jwt: true,
            }),
        });
        scenarios.push(Scenario {
            name: "portcullis, JWT + kafka + spool fallback",
            kind: Kind::Portcullis(Setup {
                label: "jwt-kafka-spool",
                audit: Audit::KafkaWithSpool,
                jwt: true,
            }),
        });
    }

    let mut kafka: Option<Kafka> = None;
    let last_kafka_scenario = scenarios.iter().rposition(
        |scenario| matches!(&scenario.kind, Kind::Portcullis(setup) if setup.audit.uses_kafka()),
    );
    let mut upstream: Option<Upstream> = None;
    let mut results = Vec::new();
    let mut portcullis_rows: Vec<(usize, Setup)> = Vec::new();
    let mut through_envoy = Vec::new();
    let mut audit_figures = Vec::new();
    let mut peer_decisions: Option<Vec<bool>> = None;
    for (index, scenario) in scenarios.iter().enumerate() {
        if let Kind::Portcullis(setup) = &scenario.kind
            && setup.audit.uses_kafka()
            && kafka.is_none()
        {
            kafka = Some(start_kafka().await?);
        }
        if matches!(scenario.kind, Kind::Envoy(_)) && upstream.is_none() {
            upstream = Some(
                Upstream::start().map_err(|error| format!("cannot start the upstream: {error}"))?,
            );
        }
        let shared = Shared {
            bundle: &bundle,
            work,
            signing_key: &signing_key,
            jwks: jwks.as_deref(),
            kafka_bootstrap: kafka.as_ref().map(Kafka::bootstrap_servers),
        };
        eprintln!("portcullis-bench: {}", scenario.name);
        if let Kind::Envoy(authz) = &scenario.kind {
            let upstream = upstream
                .as_ref()
                .expect("the upstream starts before the first Envoy scenario");
            let row = through_envoy::run_through_envoy(
                args,
                scenario.name,
                authz.as_ref(),
                &shared,
                &mix,
                &checked.statuses,
                token.as_deref(),
                upstream.address(),
            )
            .await?;
            through_envoy.push(row);
            continue;
        }
        let outcome = run_scenario(
            args,
            scenario,
            &shared,
            &mix,
            &checked.opa_bodies,
            token.as_deref(),
        )
        .await?;
        match scenario.kind {
            Kind::Opa => peer_decisions = Some(outcome.decisions),
            Kind::Portcullis(_) => compare_decisions(
                scenario.name,
                &mix,
                &outcome.decisions,
                peer_decisions.as_deref(),
            )?,
            Kind::Floor | Kind::Envoy(_) => {}
        }
        if let Kind::Portcullis(setup) = scenario.kind {
            portcullis_rows.push((results.len(), setup));
        }
        results.push(outcome.result);
        audit_figures.extend(outcome.audit);
        if Some(index) == last_kafka_scenario
            && let Some(mut broker) = kafka.take()
        {
            eprintln!("portcullis-bench: stopping Kafka");
            if let Err(error) = broker.stop().await {
                eprintln!("portcullis-bench: Kafka did not stop cleanly ({error}); killed it");
                broker.kill();
            }
        }
    }

    let baselines = Baselines {
        floor: results.first(),
        peer: results
            .iter()
            .find(|result| result.name.starts_with("peer")),
    };
    println!("{}", render(&results, &baselines));
    if let Some(none) = results
        .iter()
        .find(|result| result.name == "portcullis, audit none")
    {
        let others: Vec<&ScenarioResult> = results
            .iter()
            .filter(|result| result.name.starts_with("portcullis") && result.name != none.name)
            .collect();
        println!("{}", render_added_cost(none, &others));
    }
    if !through_envoy.is_empty() {
        println!("{}", render_through_envoy(&through_envoy));
        let (proxy_only, with_authz) = through_envoy.split_first().expect("not empty");
        let others: Vec<&ScenarioResult> = with_authz.iter().map(|row| &row.result).collect();
        println!("{}", render_added_by_ext_authz(&proxy_only.result, &others));
    }
    if !audit_figures.is_empty() {
        println!("{}", render_audit_figures(&audit_figures));
    }
    println!("Targets:");
    for (index, setup) in &portcullis_rows {
        for line in check_targets(&results[*index], &baselines, throughput_targets(setup)) {
            println!("  {line}");
        }
    }
    println!(
        "\n{} requests in the mix, {} s per measurement, {} calls in flight over {} HTTP/2 connections (OPA and Envoy: HTTP/1.1 keep-alive, one connection per call in flight); the load generator{} shares the machine's {} CPUs with the servers.",
        mix.len(),
        args.duration,
        args.concurrency,
        args.connections,
        match (args.kafka, args.envoy.is_some()) {
            (true, true) => " (and the Kafka broker, Envoy and the upstream in their scenarios)",
            (true, false) => " (and, in the Kafka scenarios, the broker)",
            (false, true) => " (and, in the through-Envoy scenarios, Envoy and the upstream)",
            (false, false) => "",
        },
        std::thread::available_parallelism()
            .map(|count| count.get())
            .unwrap_or(1),
    );
    Ok(())
}

/// Starts the broker and creates the audit topic.
async fn start_kafka() -> Result<Kafka, String> {
    eprintln!("portcullis-bench: starting Kafka on 127.0.0.1");
    let kafka = Kafka::start()
        .await
        .map_err(|error| format!("cannot start Kafka: {error}"))?;
    kafka
        .create_topic(AUDIT_TOPIC, 1)
        .await
        .map_err(|error| format!("cannot create the topic {AUDIT_TOPIC}: {error}"))?;
    Ok(kafka)
}

/// Writes the checkpoint signing key with `portcullis audit keygen`, as an operator would.
fn generate_signing_key(args: &Args, work: &Path) -> Result<PathBuf, String> {
    let private_key = work.join("checkpoint-key.pem");
    let output = std::process::Command::new(&args.portcullis)
        .args(["audit", "keygen", "--private-key"])
        .arg(&private_key)
        .arg("--public-key")
        .arg(work.join("checkpoint-key.pub.pem"))
        .output()
        .map_err(|error| {
            format!(
                "cannot run {} audit keygen: {error}",
                args.portcullis.display()
            )
        })?;
    if !output.status.success() {
        return Err(format!(
            "portcullis audit keygen failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(private_key)
}

/// Results of `portcullis check` for each request of the mix.
struct CheckedMix {
    /// OPA's request bodies, `{"input": ...}`.
    opa_bodies: Vec<Vec<u8>>,
    /// The HTTP status that Envoy returns with portcullis deciding: 200 for an allow, else
    /// the decision's `http_status` (403 when it has none).
    statuses: Vec<http::StatusCode>,
}

/// Runs `portcullis check` on each request of the mix. OPA's request bodies are built from
/// the input documents it prints, so that OPA evaluates exactly the input portcullis builds.
fn check_mix(
    args: &Args,
    bundle: &Path,
    mix: &[MixEntry],
    work: &Path,
) -> Result<CheckedMix, String> {
    let config = work.join("check.yaml");
    write_config(&config, "127.0.0.1:1", None, bundle, NO_AUDIT, "")?;

    let mut bodies = Vec::with_capacity(mix.len());
    let mut statuses = Vec::with_capacity(mix.len());
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
        statuses.push(expected_status(&json).ok_or_else(|| {
            format!(
                "portcullis check printed no decision with `allowed` for {}",
                entry.path.display()
            )
        })?);
    }
    Ok(CheckedMix {
        opa_bodies: bodies,
        statuses,
    })
}

/// Returns the HTTP status that Envoy sends for the `decision` of a `portcullis check` result: 200 for
/// an allow, the decision's `http_status` for a deny, or 403, Envoy's status for a deny without
/// one.
fn expected_status(check_output: &serde_json::Value) -> Option<http::StatusCode> {
    let decision = check_output.get("decision")?;
    if decision.get("allowed")?.as_bool()? {
        return Some(http::StatusCode::OK);
    }
    let status = decision
        .get("http_status")
        .and_then(serde_json::Value::as_u64)
        .and_then(|status| u16::try_from(status).ok())
        .and_then(|status| http::StatusCode::from_u16(status).ok());
    Some(status.unwrap_or(http::StatusCode::FORBIDDEN))
}

/// The audit section of a configuration that records nothing.
const NO_AUDIT: &str = "audit:\n  mode: none\n";

/// Writes a portcullis configuration with the given `audit` and `jwt` sections.
fn write_config(
    path: &Path,
    listen: &str,
    admin: Option<&str>,
    bundle: &Path,
    audit: &str,
    jwt: &str,
) -> Result<(), String> {
    let admin = admin
        .map(|address| format!("admin:\n  address: {address}\n"))
        .unwrap_or_default();
    let text = format!(
        "listen:\n  address: {listen}\n{admin}policy:\n  bundle: {}\n  decision: {DECISION_PATH}\n{audit}{jwt}log:\n  level: warn\nshutdown:\n  drain: 0\n",
        bundle.display()
    );
    std::fs::write(path, text).map_err(|error| format!("cannot write {}: {error}", path.display()))
}

/// Returns the `audit` section of a scenario. Every mode that has checkpoints signs one every
/// `CHECKPOINT_EVERY` records with the key from `portcullis audit keygen`.
fn audit_section(setup: &Setup, shared: &Shared<'_>) -> Result<String, String> {
    let work = shared.work;
    let label = setup.label;
    let checkpoint = format!(
        "  instance_id: bench-{label}\n  checkpoint:\n    every: {CHECKPOINT_EVERY}\n    signing_key_file: {}\n",
        shared.signing_key.display()
    );
    let spool = format!(
        "  spool:\n    dir: {}\n    fsync: true\n",
        work.join(format!("spool-{label}")).display()
    );
    let kafka = || {
        shared
            .kafka_bootstrap
            .as_ref()
            .map(|bootstrap| {
                format!(
                    "  kafka:\n    bootstrap_servers: [{bootstrap}]\n    topic: {AUDIT_TOPIC}\n"
                )
            })
            .ok_or_else(|| format!("scenario {label} needs Kafka, which is not running"))
    };
    Ok(match setup.audit {
        Audit::None => NO_AUDIT.to_string(),
        Audit::File => format!(
            "audit:\n  mode: file\n  path: {}\n  fsync: true\n",
            work.join(format!("decisions-{label}.jsonl")).display()
        ),
        Audit::Spool => format!("audit:\n  mode: spool\n{spool}{checkpoint}"),
        Audit::Kafka => format!(
            "audit:\n  mode: kafka\n  state_file: {}\n{}{checkpoint}",
            work.join(format!("kafka-state-{label}.json")).display(),
            kafka()?
        ),
        Audit::KafkaWithSpool => format!("audit:\n  mode: kafka\n{spool}{}{checkpoint}", kafka()?),
    })
}

/// Returns the `jwt` section with one RS256 provider whose keys come from the dev-only JWKS.
fn jwt_section(shared: &Shared<'_>) -> Result<String, String> {
    let jwks = shared
        .jwks
        .ok_or("a JWT scenario runs only with --jwt-keys")?;
    Ok(format!(
        "jwt:\n  providers:\n    - name: bench\n      issuer: {}\n      audiences: [{}]\n      jwks_file: {}\n      algorithms: [RS256]\n",
        jwt::ISSUER,
        jwt::AUDIENCE,
        jwks.display()
    ))
}

/// What one scenario measured.
struct Outcome {
    result: ScenarioResult,
    /// Whether each request of the mix was allowed.
    decisions: Vec<bool>,
    /// Audit figures from portcullis's metrics, for the scenarios that record events.
    audit: Option<AuditFigures>,
}

/// Runs one scenario and returns its figures and the decision for each request of the mix.
async fn run_scenario(
    args: &Args,
    scenario: &Scenario,
    shared: &Shared<'_>,
    mix: &[MixEntry],
    opa_bodies: &[Vec<u8>],
    token: Option<&str>,
) -> Result<Outcome, String> {
    let log = log_path(shared, scenario.name);
    let client = Client::builder(TokioExecutor::new()).build_http();
    let mut admin_address = None;

    let (server, target, ready_after) = match &scenario.kind {
        Kind::Floor => {
            let started = start_floor(args, scenario.name, &log).await?;
            let requests = scenario_requests(scenario.name, mix, false, token)?;
            let target = Target::grpc(started.address, args.connections, requests)
                .await
                .map_err(|error| error.to_string())?;
            (started.server, target, started.ready_after)
        }
        Kind::Opa => {
            let address = free_address().map_err(|error| error.to_string())?;
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
                &shared.bundle.display().to_string(),
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
        Kind::Portcullis(setup) => {
            let started =
                start_portcullis(args, scenario.name, setup, shared, &log, &client).await?;
            admin_address = started.admin;
            let requests = scenario_requests(scenario.name, mix, setup.jwt, token)?;
            let target = Target::grpc(started.address, args.connections, requests)
                .await
                .map_err(|error| error.to_string())?;
            (started.server, target, started.ready_after)
        }
        Kind::Envoy(_) => unreachable!("run_through_envoy runs the Envoy scenarios"),
    };
    let rss_idle_bytes = server.peak_rss_bytes();

    if let (Kind::Portcullis(setup), Some(admin)) = (&scenario.kind, admin_address)
        && setup.audit.uses_kafka()
    {
        let waited = wait_for_first_delivery(&target, &client, admin)
            .await
            .map_err(|error| format!("{}: {error}", scenario.name))?;
        eprintln!(
            "portcullis-bench: first record acknowledged by Kafka {} ms after /readyz",
            waited.as_millis()
        );
    }
    let decisions = decide_each(&target)
        .await
        .map_err(|error| format!("{}: {error}", scenario.name))?;
    let target = Arc::new(target);
    let metrics = admin_address.map(|admin| (&client, admin));
    let (max_throughput, half_load, snapshots) =
        measure(args, Arc::clone(&target), metrics).await?;
    let rss_load_bytes = server.peak_rss_bytes();
    server.stop().await;
    report_failed_calls(scenario.name, &max_throughput, &half_load);

    if max_throughput.succeeded == 0 {
        let error = max_throughput
            .first_error
            .unwrap_or_else(|| "no call returned".to_string());
        return Err(format!(
            "{}: no call succeeded in the closed loop: {error}",
            scenario.name
        ));
    }
    let audit = match (&scenario.kind, snapshots) {
        (Kind::Portcullis(setup), Some([warm, full, half])) if setup.audit != Audit::None => {
            Some(AuditFigures {
                name: scenario.name.to_string(),
                lag_full: full.lag.since(&warm.lag),
                lag_half: half.lag.since(&full.lag),
                failures_full: counters_since(&full.failures, &warm.failures),
                failures_half: counters_since(&half.failures, &full.failures),
            })
        }
        _ => None,
    };
    let result = ScenarioResult {
        name: scenario.name.to_string(),
        max_throughput,
        half_load,
        ready_after,
        rss_idle_bytes,
        rss_load_bytes,
    };
    Ok(Outcome {
        result,
        decisions,
        audit,
    })
}

/// An ext_authz server that is running and ready.
struct AuthzStarted {
    server: Server,
    /// The gRPC listener.
    address: SocketAddr,
    /// portcullis's admin listener; the floor has none.
    admin: Option<SocketAddr>,
    ready_after: Duration,
}

/// Returns the log file of a scenario's server, named after the scenario.
fn log_path(shared: &Shared<'_>, name: &str) -> PathBuf {
    shared.work.join(format!(
        "{}.log",
        name.replace([' ', ',', ':', '(', ')', '+'], "_")
    ))
}

/// Returns the CheckRequests of the mix, with the bearer token added for a JWT scenario.
fn scenario_requests(
    name: &str,
    mix: &[MixEntry],
    jwt: bool,
    token: Option<&str>,
) -> Result<Vec<CheckRequest>, String> {
    let requests: Vec<CheckRequest> = mix.iter().map(|entry| entry.request.clone()).collect();
    match (jwt, token) {
        (true, Some(token)) => Ok(jwt::with_bearer(&requests, token)),
        (true, None) => Err(format!("{name}: no token to send")),
        (false, _) => Ok(requests),
    }
}

/// Starts the always-allow floor and waits until a Check call succeeds.
async fn start_floor(args: &Args, name: &str, log: &Path) -> Result<AuthzStarted, String> {
    let address = free_address().map_err(|error| error.to_string())?;
    let mut server = Server::start(name, &args.floor, &[address.to_string()], log)
        .map_err(|error| error.to_string())?;
    let ready_after = server
        .wait_ready(|| async {
            Target::grpc(address, 1, vec![CheckRequest::default()])
                .await?
                .call(0, 0)
                .await
                .map(|_| ())
        })
        .await
        .map_err(|error| error.to_string())?;
    Ok(AuthzStarted {
        server,
        address,
        admin: None,
        ready_after,
    })
}

/// Writes the configuration of `setup`, starts portcullis and waits until `/readyz` returns
/// 200.
async fn start_portcullis(
    args: &Args,
    name: &str,
    setup: &Setup,
    shared: &Shared<'_>,
    log: &Path,
    client: &Client<HttpConnector, Full<Bytes>>,
) -> Result<AuthzStarted, String> {
    let address = free_address().map_err(|error| error.to_string())?;
    let admin = free_address().map_err(|error| error.to_string())?;
    let config = shared.work.join(format!("portcullis-{}.yaml", setup.label));
    let jwt = if setup.jwt {
        jwt_section(shared)?
    } else {
        String::new()
    };
    write_config(
        &config,
        &address.to_string(),
        Some(&admin.to_string()),
        shared.bundle,
        &audit_section(setup, shared)?,
        &jwt,
    )?;
    let serve_args = ["serve", "--config", &config.display().to_string()].map(String::from);
    let mut server = Server::start(name, &args.portcullis, &serve_args, log)
        .map_err(|error| error.to_string())?;
    let ready_after = server
        .wait_ready(|| readyz_ok(client, admin))
        .await
        .map_err(|error| error.to_string())?;
    Ok(AuthzStarted {
        server,
        address,
        admin: Some(admin),
        ready_after,
    })
}

/// Prints the first error of each loop that had failed calls, since the table shows only
/// their number.
fn report_failed_calls(name: &str, max_throughput: &Measurement, half_load: &Measurement) {
    for (label, measurement) in [("closed loop", max_throughput), ("open loop", half_load)] {
        if let Some(error) = &measurement.first_error {
            eprintln!(
                "portcullis-bench: {name}: {} calls failed in the {label}, the first with: {error}",
                measurement.failed
            );
        }
    }
}

/// Audit metrics of portcullis at one moment.
struct Snapshot {
    lag: Buckets,
    failures: Vec<(String, u64)>,
}

/// Warms up, finds the maximum throughput, then measures latency at half of it. With
/// `metrics`, also reads portcullis's `/metrics` after the warm-up, after the closed loop and
/// after the open loop.
async fn measure(
    args: &Args,
    target: Arc<Target>,
    metrics: Option<(&Client<HttpConnector, Full<Bytes>>, SocketAddr)>,
) -> Result<(Measurement, Measurement, Option<[Snapshot; 3]>), String> {
    let duration = Duration::from_secs_f64(args.duration);
    if args.warmup > 0.0 {
        closed_loop(
            Arc::clone(&target),
            args.concurrency,
            Duration::from_secs_f64(args.warmup),
        )
        .await;
    }
    let after_warmup = snapshot(metrics).await?;
    let max_throughput = closed_loop(Arc::clone(&target), args.concurrency, duration).await;
    let after_closed = snapshot(metrics).await?;
    let half_rate = max_throughput.throughput() / 2.0;
    let half_load = open_loop(target, half_rate, args.connections, duration).await;
    let after_open = snapshot(metrics).await?;
    let snapshots = match (after_warmup, after_closed, after_open) {
        (Some(warm), Some(full), Some(half)) => Some([warm, full, half]),
        _ => None,
    };
    Ok((max_throughput, half_load, snapshots))
}

/// Reads the audit metrics, or nothing without an admin address.
async fn snapshot(
    metrics: Option<(&Client<HttpConnector, Full<Bytes>>, SocketAddr)>,
) -> Result<Option<Snapshot>, String> {
    let Some((client, admin)) = metrics else {
        return Ok(None);
    };
    let text = get_text(client, admin, "/metrics").await?;
    Ok(Some(Snapshot {
        lag: Buckets::parse(&text, DELIVERY_LAG),
        failures: counters_by_kind(&text, AUDIT_FAILURES),
    }))
}

/// Maximum wait after /readyz for Kafka to acknowledge the first record.
const FIRST_DELIVERY_TIMEOUT: Duration = Duration::from_secs(60);

/// Sends the first request of the mix until Kafka has acknowledged a record, and returns how
/// long that took.
///
/// With a spool, portcullis reports ready before its producer has an idempotent producer id
/// from the broker. A broker started seconds earlier replies `Coordinator load in progress` for
/// a while, and checks sent meanwhile wait for `audit.delivery_timeout`, which would make the
/// first loop measure that wait. Without a spool, `/readyz` itself waits for the first
/// acknowledgement, so this returns after one call.
async fn wait_for_first_delivery(
    target: &Target,
    client: &Client<HttpConnector, Full<Bytes>>,
    admin: SocketAddr,
) -> Result<Duration, String> {
    let started = std::time::Instant::now();
    loop {
        // The decision does not matter: its event is delivered either way.
        let _ = target.call(0, 0).await;
        let text = get_text(client, admin, "/metrics").await?;
        if Buckets::parse(&text, DELIVERY_LAG).total() > 0 {
            return Ok(started.elapsed());
        }
        if started.elapsed() > FIRST_DELIVERY_TIMEOUT {
            return Err(format!(
                "Kafka acknowledged no record within {FIRST_DELIVERY_TIMEOUT:?} after /readyz"
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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
    get_text(client, admin, "/readyz").await.map(|_| ())
}

/// GETs `path` from the admin server and returns the body of a 200 response.
async fn get_text(
    client: &Client<HttpConnector, Full<Bytes>>,
    admin: SocketAddr,
    path: &str,
) -> Result<String, String> {
    let uri: http::Uri = format!("http://{admin}{path}")
        .parse()
        .expect("an IP:PORT address and an absolute path form a valid URI");
    let request = http::Request::get(uri)
        .body(Full::new(Bytes::new()))
        .map_err(|error| error.to_string())?;
    let response = client
        .request(request)
        .await
        .map_err(|error| error.to_string())?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|error| error.to_string())?
        .to_bytes();
    if status == http::StatusCode::OK {
        Ok(String::from_utf8_lossy(&body).into_owned())
    } else {
        Err(format!("{path} returned {status}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        let required = [
            "portcullis-bench",
            "--portcullis",
            "p",
            "--floor",
            "f",
            "--bundle",
            "b",
        ];
        let requests = ["--requests", "r"];
        Args::parse_from(required.iter().chain(&requests).chain(extra))
    }

    #[test]
    fn check_args_rejects_unusable_options() {
        assert!(check_args(&args(&[])).is_ok());
        let kafka = check_args(&args(&["--kafka"])).unwrap_err();
        assert!(kafka.contains("--kafka needs --jwt-keys"), "{kafka}");
        let duration = check_args(&args(&["--duration", "0"])).unwrap_err();
        assert!(duration.contains("invalid --duration 0"), "{duration}");
        let not_a_number = check_args(&args(&["--duration", "NaN"])).unwrap_err();
        assert!(
            not_a_number.contains("invalid --duration NaN"),
            "{not_a_number}"
        );
        let warmup = check_args(&args(&["--warmup=-1"])).unwrap_err();
        assert!(warmup.contains("invalid --warmup -1"), "{warmup}");
        let concurrency = check_args(&args(&["--concurrency", "0"])).unwrap_err();
        assert!(
            concurrency.contains("invalid --concurrency 0"),
            "{concurrency}"
        );
        let connections = check_args(&args(&["--connections", "0"])).unwrap_err();
        assert!(
            connections.contains("invalid --connections 0"),
            "{connections}"
        );
    }

    #[test]
    fn throughput_targets_follow_row_work() {
        let setup = |audit, jwt| Setup {
            label: "test",
            audit,
            jwt,
        };

        assert_eq!(
            throughput_targets(&setup(Audit::None, false)),
            ThroughputTargets {
                peer: Judged::Yes,
                floor: Judged::Yes
            }
        );
        assert_eq!(
            throughput_targets(&setup(Audit::None, true)),
            ThroughputTargets {
                peer: Judged::No("the peer verifies no token"),
                floor: Judged::Yes
            }
        );
        for audit in [
            Audit::File,
            Audit::Spool,
            Audit::Kafka,
            Audit::KafkaWithSpool,
        ] {
            let targets = throughput_targets(&setup(audit, true));
            assert_eq!(
                targets.peer,
                Judged::No("the peer records no audit"),
                "{audit:?}"
            );
            assert!(matches!(targets.floor, Judged::No(_)), "{audit:?}");
        }
    }

    #[test]
    fn contains_log_needs_log_file() {
        let folder = tempfile::tempdir().unwrap();
        std::fs::write(folder.path().join("portcullis-none.yaml"), "").unwrap();
        assert!(!contains_log(folder.path()));
        std::fs::write(folder.path().join("portcullis-none.log"), "").unwrap();
        assert!(contains_log(folder.path()));
    }

    #[test]
    fn expected_status_follows_decision() {
        let allowed = serde_json::json!({"decision": {"allowed": true, "http_status": null}});
        let bad_request = serde_json::json!({"decision": {"allowed": false, "http_status": 400}});
        let plain_deny = serde_json::json!({"decision": {"allowed": false}});

        assert_eq!(expected_status(&allowed), Some(http::StatusCode::OK));
        assert_eq!(
            expected_status(&bad_request),
            Some(http::StatusCode::BAD_REQUEST)
        );
        assert_eq!(
            expected_status(&plain_deny),
            Some(http::StatusCode::FORBIDDEN)
        );
    }

    #[test]
    fn expected_status_needs_decision() {
        assert_eq!(expected_status(&serde_json::json!({"input": {}})), None);
        assert_eq!(
            expected_status(&serde_json::json!({"decision": {"http_status": 403}})),
            None
        );
    }
}
