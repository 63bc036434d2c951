//! End-to-end tests: a real Envoy with the ext_authz filter in front of the portcullis binary
//! and a recording upstream. Each test writes its own policy bundle, so it controls every
//! decision it asserts.
//!
//! The tests skip with a `SKIPPED:` line when Envoy cannot be installed, unless
//! `PORTCULLIS_REQUIRE_PEERS=1`. They fail when the portcullis binary has not been built.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http::Method;
use portcullis_e2e::{
    Envoy, EnvoyOptions, HttpRequest, HttpResponse, Portcullis, PortcullisOptions, UPSTREAM_BODY,
    Upstream, envoy_binary_or_skip, send, write_bundle,
};
use tempfile::TempDir;

/// Allows `/ok/...` (adding `x-added`, removing `x-secret`), denies `/throttled/...` with 429
/// and its own body and header, denies `/teapot/...` with 418 (which Envoy's `StatusCode`
/// enum lacks), and denies everything else with the default 403.
const POLICY_V1: &str = r#"package envoy.authz

default allow := false

allow := {"allowed": true, "headers": {"x-added": "yes"}, "request_headers_to_remove": ["x-secret"]} if {
	input.parsed_path[0] == "ok"
}

allow := {"allowed": false, "http_status": 429, "body": "slow down", "headers": {"x-deny-reason": "throttled"}} if {
	input.parsed_path[0] == "throttled"
}

allow := {"allowed": false, "http_status": 418, "body": "no tea"} if {
	input.parsed_path[0] == "teapot"
}
"#;

/// Rule appended to [`POLICY_V1`] by the reload test, allowing `/flip`.
const FLIP_ALLOW_RULE: &str = r#"
allow := {"allowed": true} if {
	input.parsed_path[0] == "flip"
}
"#;

/// Maximum wait for the audit events of requests that already got their response.
const AUDIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Envoy, portcullis and the upstream, with the bundle folder the policy is read from.
struct Stack {
    // Field order is drop order: Envoy stops before portcullis, so it logs no failed checks.
    envoy: Envoy,
    portcullis: Portcullis,
    upstream: Upstream,
    bundle_dir: PathBuf,
    _bundle_root: TempDir,
}

impl Stack {
    /// Writes `rego` as bundle revision `r1` and starts the upstream, portcullis and Envoy.
    /// Returns `None` when the test is skipped because Envoy cannot be installed.
    async fn start(
        test: &str,
        rego: &str,
        configure: impl FnOnce(&mut PortcullisOptions),
    ) -> Option<Stack> {
        let envoy_binary = envoy_binary_or_skip(test)?;
        let portcullis_binary =
            Portcullis::binary().unwrap_or_else(|error| panic!("{test}: {error}"));

        let bundle_root = tempfile::tempdir().expect("creating the bundle folder failed");
        let bundle_dir = bundle_root.path().join("bundle");
        write_bundle(&bundle_dir, "r1", rego).expect("writing the bundle failed");
        let mut options = PortcullisOptions::new(&bundle_dir);
        configure(&mut options);

        let upstream = Upstream::start()
            .await
            .expect("starting the upstream failed");
        let portcullis = Portcullis::start(&portcullis_binary, &options)
            .await
            .unwrap_or_else(|error| panic!("{test}: starting portcullis failed: {error}"));
        let envoy_options = EnvoyOptions::new(portcullis.grpc_address(), upstream.address());
        let envoy = Envoy::start(&envoy_binary, &envoy_options)
            .await
            .unwrap_or_else(|error| panic!("{test}: starting Envoy failed: {error}"));

        Some(Stack {
            envoy,
            portcullis,
            upstream,
            bundle_dir,
            _bundle_root: bundle_root,
        })
    }

    /// Sends `request` through Envoy, panicking with both logs when the exchange fails.
    async fn send(&self, request: HttpRequest) -> HttpResponse {
        send(self.envoy.listener_address(), &request)
            .await
            .unwrap_or_else(|error| {
                panic!(
                    "{} {} failed: {error}\n{}",
                    request.method,
                    request.path,
                    self.logs()
                )
            })
    }

    /// Returns the log tails of Envoy and portcullis, for failure messages.
    fn logs(&self) -> String {
        format!("{}{}", self.envoy.log_tail(), self.portcullis.log_tail())
    }

    fn bundle_dir(&self) -> &Path {
        &self.bundle_dir
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_request_reaches_upstream_with_policy_headers() {
    let Some(stack) = Stack::start(
        "allowed_request_reaches_upstream_with_policy_headers",
        POLICY_V1,
        |_| {},
    )
    .await
    else {
        return;
    };

    let response = stack
        .send(
            HttpRequest::get("/ok/items?page=2")
                .with_header("x-secret", "s3cret")
                .with_header("x-keep", "kept"),
        )
        .await;

    assert_eq!(response.status, 200, "{}", stack.logs());
    assert_eq!(response.body_text(), UPSTREAM_BODY);
    let received = stack.upstream.requests();
    assert_eq!(received.len(), 1, "upstream requests: {received:?}");
    assert_eq!(received[0].method, Method::GET);
    assert_eq!(received[0].path, "/ok/items?page=2");
    assert_eq!(
        received[0].header("x-added"),
        Some("yes"),
        "headers: {:?}",
        received[0].headers
    );
    assert_eq!(
        received[0].header("x-secret"),
        None,
        "headers: {:?}",
        received[0].headers
    );
    assert_eq!(
        received[0].header("x-keep"),
        Some("kept"),
        "headers: {:?}",
        received[0].headers
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_request_gets_policy_status_body_and_headers() {
    let Some(stack) = Stack::start(
        "denied_request_gets_policy_status_body_and_headers",
        POLICY_V1,
        |_| {},
    )
    .await
    else {
        return;
    };

    let throttled = stack.send(HttpRequest::get("/throttled/orders")).await;
    let unmatched = stack.send(HttpRequest::get("/elsewhere")).await;

    assert_eq!(throttled.status, 429, "{}", stack.logs());
    assert_eq!(throttled.body_text(), "slow down");
    assert_eq!(
        throttled.header("x-deny-reason"),
        Some("throttled"),
        "headers: {:?}",
        throttled.headers
    );
    assert_eq!(unmatched.status, 403, "{}", stack.logs());
    assert_eq!(
        unmatched.header("x-deny-reason"),
        None,
        "headers: {:?}",
        unmatched.headers
    );
    assert_eq!(
        stack.upstream.requests().len(),
        0,
        "the upstream must not see denied requests"
    );
}

/// Envoy validates `http_status` against its `StatusCode` enum, so portcullis must not pass an
/// undefined code such as 418 through; the check fails closed instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undefined_policy_status_fails_closed() {
    let Some(stack) = Stack::start("undefined_policy_status_fails_closed", POLICY_V1, |_| {}).await
    else {
        return;
    };

    let teapot = stack.send(HttpRequest::get("/teapot/brew")).await;

    assert_eq!(teapot.status, 403, "{}", stack.logs());
    assert_eq!(stack.upstream.requests().len(), 0);
    let events = stack
        .portcullis
        .wait_for_audit_events(1, AUDIT_TIMEOUT)
        .await
        .unwrap_or_else(|error| panic!("{error}\n{}", stack.logs()));
    assert_eq!(events.len(), 1, "events: {events:#?}");
    assert_eq!(
        events[0]["decision"]["allowed"], false,
        "event: {}",
        events[0]
    );
    assert_eq!(
        events[0]["decision"]["http_status"], 403,
        "event: {}",
        events[0]
    );
    assert!(
        events[0]["decision"]["reason"].is_string(),
        "a deny by portcullis itself must carry a reason: {}",
        events[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_body_is_rejected_with_400() {
    let Some(stack) = Stack::start(
        "malformed_json_body_is_rejected_with_400",
        POLICY_V1,
        |_| {},
    )
    .await
    else {
        return;
    };

    let malformed = stack
        .send(
            HttpRequest::post("/ok/orders", "{\"quantity\": ")
                .with_header("content-type", "application/json"),
        )
        .await;
    let valid = stack
        .send(
            HttpRequest::post("/ok/orders", "{\"quantity\": 3}")
                .with_header("content-type", "application/json"),
        )
        .await;

    assert_eq!(
        malformed.status,
        400,
        "body {:?}\n{}",
        malformed.body_text(),
        stack.logs()
    );
    assert_eq!(
        valid.status,
        200,
        "the same path with valid JSON must pass\n{}",
        stack.logs()
    );
    let received = stack.upstream.requests();
    assert_eq!(
        received.len(),
        1,
        "only the valid request may reach the upstream: {received:?}"
    );
    assert_eq!(received[0].body.as_ref(), b"{\"quantity\": 3}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_reload_changes_outcome_without_failures() {
    // The reload interval is short so the test waits little; the loop bounds are far above
    // what the reload needs.
    const RELOAD_INTERVAL: Duration = Duration::from_millis(200);
    const RELOAD_TIMEOUT: Duration = Duration::from_secs(20);
    const MAX_LOOP_REQUESTS: usize = 5_000;
    const LOOP_REQUESTS_AFTER_RELOAD: usize = 20;

    let Some(stack) = Stack::start(
        "policy_reload_changes_outcome_without_failures",
        POLICY_V1,
        |options| {
            options.reload_interval = RELOAD_INTERVAL;
        },
    )
    .await
    else {
        return;
    };
    let stack = Arc::new(stack);
    let before = stack.send(HttpRequest::get("/flip")).await;
    assert_eq!(
        before.status,
        403,
        "/flip must be denied before the reload\n{}",
        stack.logs()
    );

    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let background = tokio::spawn(send_allowed_requests_until_stopped(
        Arc::clone(&stack),
        Arc::clone(&stop),
        Arc::clone(&sent),
        MAX_LOOP_REQUESTS,
    ));

    let policy_v2 = format!("{POLICY_V1}{FLIP_ALLOW_RULE}");
    write_bundle(stack.bundle_dir(), "r2", &policy_v2).expect("rewriting the bundle failed");
    let reload_started = Instant::now();
    let mut flip_requests = 1;
    loop {
        let response = stack.send(HttpRequest::get("/flip")).await;
        flip_requests += 1;
        if response.status == 200 {
            break;
        }
        assert_eq!(
            response.status,
            403,
            "/flip while reloading\n{}",
            stack.logs()
        );
        assert!(
            reload_started.elapsed() < RELOAD_TIMEOUT,
            "/flip still denied {RELOAD_TIMEOUT:?} after the bundle changed\n{}",
            stack.logs()
        );
        tokio::time::sleep(RELOAD_INTERVAL / 4).await;
    }
    // Keep the loop running for a while on the new policy before stopping it.
    let sent_at_reload = sent.load(Ordering::SeqCst);
    while sent.load(Ordering::SeqCst) < sent_at_reload + LOOP_REQUESTS_AFTER_RELOAD
        && !background.is_finished()
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let failures = background.await.expect("the background loop panicked");

    let loop_requests = sent.load(Ordering::SeqCst);
    assert_eq!(
        failures,
        Vec::<String>::new(),
        "allowed requests failed during the reload\n{}",
        stack.logs()
    );
    assert!(
        loop_requests >= sent_at_reload + LOOP_REQUESTS_AFTER_RELOAD,
        "the loop sent {loop_requests} requests, {sent_at_reload} before the reload"
    );
    assert_eq!(
        stack.upstream.requests_with_prefix("/ok/loop/").len(),
        loop_requests
    );

    // The loop has stopped, so this request runs on the settled new bundle.
    let last_flip = stack.send(HttpRequest::get("/flip")).await;
    assert_eq!(last_flip.status, 200, "{}", stack.logs());
    let total_requests = flip_requests + 1 + loop_requests;
    let events = stack
        .portcullis
        .wait_for_audit_events(total_requests, AUDIT_TIMEOUT)
        .await
        .unwrap_or_else(|error| panic!("{error}\n{}", stack.logs()));
    let last_flip_event = events
        .iter()
        .rev()
        .find(|event| event["request"]["path"] == "/flip")
        .expect("no audit event for /flip");
    assert_eq!(
        last_flip_event["policy"]["bundle_revision"], "r2",
        "event: {last_flip_event}"
    );
    assert_eq!(
        last_flip_event["decision"]["allowed"], true,
        "event: {last_flip_event}"
    );
}

/// Sends `GET /ok/loop/N` until `stop` is set or `max_requests` were sent, and returns a
/// description of every response that is not 200 with the upstream's body.
async fn send_allowed_requests_until_stopped(
    stack: Arc<Stack>,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
    max_requests: usize,
) -> Vec<String> {
    let mut failures = Vec::new();
    for index in 0..max_requests {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let path = format!("/ok/loop/{index}");
        let result = send(
            stack.envoy.listener_address(),
            &HttpRequest::get(path.as_str()),
        )
        .await;
        sent.fetch_add(1, Ordering::SeqCst);
        match result {
            Ok(response) if response.status == 200 && response.body_text() == UPSTREAM_BODY => {}
            Ok(response) => failures.push(format!(
                "{path}: {} {:?}",
                response.status,
                response.body_text()
            )),
            Err(error) => failures.push(format!("{path}: {error}")),
        }
    }
    failures
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_decision_writes_one_audit_event() {
    let Some(stack) = Stack::start("each_decision_writes_one_audit_event", POLICY_V1, |_| {}).await
    else {
        return;
    };
    // (request, expected status at the client, expected `decision.allowed`)
    let cases = [
        (HttpRequest::get("/ok/one"), 200, true),
        (HttpRequest::get("/throttled"), 429, false),
        (HttpRequest::get("/teapot"), 403, false),
        (HttpRequest::get("/elsewhere"), 403, false),
        (
            HttpRequest::post("/ok/orders", "{not json")
                .with_header("content-type", "application/json"),
            400,
            false,
        ),
        (HttpRequest::new(Method::HEAD, "/ok/two"), 200, true),
        (
            HttpRequest::post("/ok/orders", "{\"quantity\": 1}")
                .with_header("content-type", "application/json"),
            200,
            true,
        ),
    ];

    for (request, expected_status, _) in &cases {
        let response = stack.send(request.clone()).await;
        assert_eq!(
            response.status,
            *expected_status,
            "{} {}\n{}",
            request.method,
            request.path,
            stack.logs()
        );
    }
    let events = stack
        .portcullis
        .wait_for_audit_events(cases.len(), AUDIT_TIMEOUT)
        .await
        .unwrap_or_else(|error| panic!("{error}\n{}", stack.logs()));

    assert_eq!(events.len(), cases.len(), "events: {events:#?}");
    let mut decision_ids = HashSet::new();
    for ((request, expected_status, expected_allowed), event) in cases.iter().zip(&events) {
        assert_eq!(
            event["request"]["method"],
            request.method.as_str(),
            "event: {event}"
        );
        assert_eq!(
            event["request"]["path"],
            request.path.as_str(),
            "event: {event}"
        );
        assert_eq!(
            event["decision"]["allowed"], *expected_allowed,
            "event: {event}"
        );
        assert_eq!(
            event["decision"]["http_status"], *expected_status,
            "event: {event}"
        );
        assert_eq!(event["policy"]["bundle_revision"], "r1", "event: {event}");
        assert!(event["time"].is_string(), "event: {event}");
        assert!(event["latency_us"].is_u64(), "event: {event}");
        let decision_id = event["decision_id"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(!decision_id.is_empty(), "event: {event}");
        assert!(
            decision_ids.insert(decision_id),
            "duplicate decision_id in event: {event}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_then_exits_zero() {
    // Long enough for one readiness poll and one check through Envoy after the signal.
    const DRAIN: Duration = Duration::from_secs(2);
    // Time beyond the drain for a debug build to exit on a loaded 2-core machine.
    const EXIT_MARGIN: Duration = Duration::from_secs(2);

    let Some(mut stack) = Stack::start("sigterm_drains_then_exits_zero", POLICY_V1, |options| {
        options.drain = DRAIN;
    })
    .await
    else {
        return;
    };
    // An allowed request first, so that Envoy keeps an open HTTP/2 connection to portcullis.
    let before = stack.send(HttpRequest::get("/ok/before")).await;
    assert_eq!(before.status, 200, "{}", stack.logs());

    let signalled = Instant::now();
    stack
        .portcullis
        .send_sigterm()
        .unwrap_or_else(|error| panic!("{error}"));
    wait_until_not_ready(&stack.portcullis, DRAIN).await;
    let during = stack.send(HttpRequest::get("/ok/during")).await;
    let during_elapsed = signalled.elapsed();
    let status = stack
        .portcullis
        .wait_for_exit(DRAIN + EXIT_MARGIN)
        .await
        .unwrap_or_else(|error| panic!("{error}\n{}", stack.envoy.log_tail()));
    let exit_elapsed = signalled.elapsed();

    assert!(
        during_elapsed < DRAIN,
        "the check during the drain was sent too late to prove anything ({during_elapsed:?})"
    );
    assert_eq!(
        during.status,
        200,
        "checks must be answered during the drain\n{}",
        stack.logs()
    );
    assert_eq!(
        status.code(),
        Some(0),
        "exit status {status}\n{}",
        stack.portcullis.log_tail()
    );
    assert!(
        exit_elapsed >= DRAIN,
        "portcullis exited after {exit_elapsed:?}, before the {DRAIN:?} drain ended"
    );
    let events = stack
        .portcullis
        .audit_events()
        .unwrap_or_else(|error| panic!("{error}"));
    let paths: Vec<&str> = events
        .iter()
        .map(|event| event["request"]["path"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        paths,
        vec!["/ok/before", "/ok/during"],
        "events: {events:#?}"
    );
    // With portcullis gone, Envoy must fail closed.
    let after = stack.send(HttpRequest::get("/ok/after")).await;
    assert_eq!(after.status, 403, "{}", stack.envoy.log_tail());
    assert_eq!(stack.upstream.requests_with_prefix("/ok/after").len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_sigterm_ends_drain_early() {
    // Far longer than the test may take, so an exit before it proves the drain was cut short.
    const DRAIN: Duration = Duration::from_secs(30);
    const EXIT_TIMEOUT: Duration = Duration::from_secs(5);

    let Some(mut stack) = Stack::start("second_sigterm_ends_drain_early", POLICY_V1, |options| {
        options.drain = DRAIN;
    })
    .await
    else {
        return;
    };

    stack
        .portcullis
        .send_sigterm()
        .unwrap_or_else(|error| panic!("{error}"));
    wait_until_not_ready(&stack.portcullis, EXIT_TIMEOUT).await;
    stack
        .portcullis
        .send_sigterm()
        .unwrap_or_else(|error| panic!("{error}"));
    let status = stack
        .portcullis
        .wait_for_exit(EXIT_TIMEOUT)
        .await
        .unwrap_or_else(|error| panic!("{error}"));

    assert_eq!(
        status.code(),
        Some(0),
        "exit status {status}\n{}",
        stack.portcullis.log_tail()
    );
}

/// Polls `/readyz` until it returns 503, panicking when `timeout` passes first.
async fn wait_until_not_ready(portcullis: &Portcullis, timeout: Duration) {
    let started = Instant::now();
    loop {
        let status = portcullis.readiness_status().await;
        if matches!(status, Ok(code) if code == 503) {
            return;
        }
        assert!(
            started.elapsed() < timeout,
            "/readyz still returns {status:?} {timeout:?} after SIGTERM\n{}",
            portcullis.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
