//! The through-Envoy scenarios of the `portcullis-bench` binary: HTTP requests through Envoy to
//! the upstream, with or without the ext_authz filter.

use std::net::SocketAddr;
use std::sync::Arc;

use portcullis_bench::envoy_stats::ext_authz_failures;
use portcullis_bench::metrics::counters_since;
use portcullis_bench::report::{ScenarioResult, ThroughEnvoy};
use portcullis_bench::requests::{MixEntry, http_request_from_check};
use portcullis_bench::target::Target;
use portcullis_e2e::{Envoy, EnvoyOptions};

use super::{
    Args, AuthzServer, Client, Shared, TokioExecutor, decide_each, log_path, measure,
    report_failed_calls, scenario_requests, start_floor, start_portcullis,
};

/// Sends the mix as HTTP requests through Envoy to `upstream`, with the ext_authz filter
/// calling `authz` or without the filter, and returns the row's figures.
///
/// Each request must come back with the status of its decision: 200 for every request without
/// the filter or with the floor, and with portcullis the status of `portcullis check`'s
/// decision. A request that returns another status in the setup check fails the run.
///
/// NOTE: the statuses expected with portcullis come from `portcullis check` without a token.
/// The JWT row expects the same ones, which holds for the example policy because it does not
/// read `input.identity`.
#[allow(clippy::too_many_arguments)]
pub(super) async fn run_through_envoy(
    args: &Args,
    name: &str,
    authz: Option<&AuthzServer>,
    shared: &Shared<'_>,
    mix: &[MixEntry],
    decided_statuses: &[http::StatusCode],
    token: Option<&str>,
    upstream: SocketAddr,
) -> Result<ThroughEnvoy, String> {
    let log = log_path(shared, name);
    let client = Client::builder(TokioExecutor::new()).build_http();
    let envoy_binary = args
        .envoy
        .as_ref()
        .expect("the Envoy scenarios run only with --envoy");

    let started = match authz {
        None => None,
        Some(AuthzServer::Floor) => Some(start_floor(args, name, &log).await?),
        Some(AuthzServer::Portcullis(setup)) => {
            Some(start_portcullis(args, name, setup, shared, &log, &client).await?)
        }
    };
    let jwt = matches!(authz, Some(AuthzServer::Portcullis(setup)) if setup.jwt);
    let statuses: Vec<http::StatusCode> = match authz {
        Some(AuthzServer::Portcullis(_)) => decided_statuses.to_vec(),
        None | Some(AuthzServer::Floor) => vec![http::StatusCode::OK; mix.len()],
    };
    let mut requests = Vec::with_capacity(mix.len());
    for ((check, entry), status) in scenario_requests(name, mix, jwt, token)?
        .iter()
        .zip(mix)
        .zip(statuses)
    {
        let request = http_request_from_check(check)
            .map_err(|error| format!("{}: {error}", entry.path.display()))?;
        requests.push((request, status));
    }

    // The gRPC cluster of a bootstrap without the filter is never called, so any address will do.
    let authz_address = started
        .as_ref()
        .map_or(SocketAddr::from(([127, 0, 0, 1], 9)), |started| {
            started.address
        });
    let mut options = EnvoyOptions::new(authz_address, upstream);
    options.ext_authz = authz.is_some();
    options.ext_authz_debug_log = false;
    let envoy_started = std::time::Instant::now();
    let envoy = Envoy::start(envoy_binary, &options)
        .await
        .map_err(|error| format!("{name}: cannot start Envoy: {error}"))?;
    let ready_after = envoy_started.elapsed();
    let target = Target::http(envoy.listener_address(), args.concurrency, requests);

    decide_each(&target).await.map_err(|error| {
        format!(
            "{name}: {error}\nEnvoy's log ends with:\n{}",
            envoy.log_tail()
        )
    })?;
    let failures_before = read_envoy_failures(&envoy).await?;
    let (max_throughput, half_load, _) = measure(args, Arc::new(target), None).await?;
    let failures_after = read_envoy_failures(&envoy).await?;
    report_failed_calls(name, &max_throughput, &half_load);
    let rss_load_bytes = started
        .as_ref()
        .and_then(|started| started.server.peak_rss_bytes());
    drop(envoy);
    if let Some(started) = started {
        started.server.stop().await;
    }

    if max_throughput.succeeded == 0 {
        let error = max_throughput
            .first_error
            .unwrap_or_else(|| "no call returned".to_string());
        return Err(format!(
            "{name}: no request succeeded in the closed loop: {error}"
        ));
    }
    let result = ScenarioResult {
        name: name.to_string(),
        max_throughput,
        half_load,
        ready_after,
        rss_idle_bytes: None,
        rss_load_bytes,
    };
    Ok(ThroughEnvoy {
        result,
        authz_failures: authz.map(|_| counters_since(&failures_after, &failures_before)),
    })
}

/// Reads Envoy's ext_authz failure counters from its admin `/stats`.
async fn read_envoy_failures(envoy: &Envoy) -> Result<Vec<(String, u64)>, String> {
    let response = portcullis_e2e::send(
        envoy.admin_address(),
        &portcullis_e2e::HttpRequest::get("/stats?filter=ext_authz"),
    )
    .await
    .map_err(|error| format!("cannot read Envoy's /stats: {error}"))?;
    Ok(ext_authz_failures(&response.body_text()))
}
