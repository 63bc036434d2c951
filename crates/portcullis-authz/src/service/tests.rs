use std::sync::Mutex;

use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use futures::future::BoxFuture;
use portcullis_audit::{AuditPipeline, NoAuditObserver, PipelineConfig, SinkError, SpoolConfig};
use portcullis_policy::load_bundle;

use super::*;

const POLICY: &str = "package envoy.authz\n\ndefault allow := false\n\nallow if input.parsed_path[0] == \"open\"\n";

/// Keeps every recorded event in memory.
#[derive(Default)]
struct MemorySink {
    events: Mutex<Vec<DecisionEvent>>,
}

impl DecisionSink for MemorySink {
    fn record(&self, event: &DecisionEvent) -> BoxFuture<'static, Result<(), SinkError>> {
        self.events.lock().unwrap().push(event.clone());
        Box::pin(async { Ok(()) })
    }

    fn flush(&self) -> BoxFuture<'static, Result<(), SinkError>> {
        Box::pin(async { Ok(()) })
    }

    fn name(&self) -> &'static str {
        "memory"
    }
}

fn policies(dir: &std::path::Path) -> Arc<PolicyStore> {
    let bundle = dir.join("bundle");
    std::fs::create_dir_all(bundle.join("envoy")).unwrap();
    std::fs::write(bundle.join("envoy/policy.rego"), POLICY).unwrap();
    let loaded = load_bundle(&bundle).unwrap();
    Arc::new(PolicyStore::new(Policy::compile(&loaded, "envoy/authz/allow").unwrap()))
}

fn request(path: &str, headers: &[(&str, &str)]) -> CheckRequest {
    let mut http = HttpRequest { method: "GET".to_owned(), path: path.to_owned(), host: "shop.test".to_owned(), ..Default::default() };
    for (name, value) in headers {
        http.headers.insert((*name).to_owned(), (*value).to_owned());
    }
    CheckRequest {
        attributes: Some(AttributeContext { request: Some(Request { time: None, http: Some(http) }), ..Default::default() }),
    }
}

#[tokio::test]
async fn event_carries_allowed_fields_only() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Arc::new(MemorySink::default());
    let options = EventOptions { headers: vec!["x-tenant".to_owned()], redact: vec!["request.path".to_owned(), "request.headers.x-tenant".to_owned()] };
    let authorizer = Authorizer::new(policies(dir.path()), sink.clone(), Arc::new(NoObserver), Duration::from_secs(1)).with_event_options(options);

    let headers = [("x-tenant", "acme"), ("x-other", "kept out"), ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")];
    let outcome = authorizer.check(request("/open/secret-report", &headers)).await;

    assert!(outcome.decision.allowed);
    let events = sink.events.lock().unwrap();
    let event = serde_json::to_value(&events[0]).unwrap();
    assert_eq!(event["schema"], "portcullis.decision.v2");
    assert_eq!(event["event_id"].as_str().unwrap().len(), 36);
    assert_ne!(event["event_id"], event["decision_id"]);
    assert_eq!(event["request"]["path"], REDACTED);
    assert_eq!(event["request"]["authority"], "shop.test");
    assert_eq!(event["request"]["headers"], serde_json::json!({"x-tenant": REDACTED}));
    assert_eq!(event["request"]["trace"]["traceparent"], "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
    assert!(!event.to_string().contains("kept out"));
    assert!(!event.to_string().contains("secret-report"));
}

#[tokio::test]
async fn full_spool_denies_checks_with_503() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = PipelineConfig::new("pod-a");
    config.spool = Some(SpoolConfig { dir: dir.path().join("spool"), max_bytes: 3000, segment_bytes: 1024, fsync: false });
    let pipeline = Arc::new(AuditPipeline::start(config, None, Arc::new(NoAuditObserver)).unwrap());
    let authorizer = Authorizer::new(policies(dir.path()), pipeline, Arc::new(NoObserver), Duration::from_secs(1));

    let mut statuses = Vec::new();
    for _ in 0..20 {
        let outcome = authorizer.check(request("/open", &[])).await;
        statuses.push((outcome.decision.allowed, outcome.event.decision.http_status, outcome.denied_by));
    }

    let first_denied = statuses.iter().position(|(allowed, _, _)| !allowed).expect("the spool fills up");
    assert!(first_denied > 0, "{statuses:?}");
    assert!(statuses[..first_denied].iter().all(|status| *status == (true, 200, None)), "{statuses:?}");
    assert!(statuses[first_denied..].iter().all(|status| *status == (false, 503, Some("audit_failed"))), "{statuses:?}");
}

/// Records events only after a delay, as a slow spool or broker would.
struct SlowSink {
    delay: Duration,
    events: Arc<Mutex<Vec<DecisionEvent>>>,
}

impl DecisionSink for SlowSink {
    fn record(&self, event: &DecisionEvent) -> BoxFuture<'static, Result<(), SinkError>> {
        let (delay, events, event) = (self.delay, Arc::clone(&self.events), event.clone());
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            events.lock().unwrap().push(event);
            Ok(())
        })
    }

    fn flush(&self) -> BoxFuture<'static, Result<(), SinkError>> {
        Box::pin(async { Ok(()) })
    }

    fn name(&self) -> &'static str {
        "slow"
    }
}

#[tokio::test(start_paused = true)]
async fn cancelled_call_still_records_its_event() {
    let dir = tempfile::tempdir().unwrap();
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::new(SlowSink { delay: Duration::from_millis(300), events: Arc::clone(&events) });
    let authorizer = Authorizer::new(policies(dir.path()), sink, Arc::new(NoObserver), Duration::from_secs(1));
    let service = AuthzService::new(Arc::new(authorizer));

    // Envoy gives up after 50 ms: the call's future is dropped before the event is recorded.
    let call = service.check(tonic::Request::new(request("/open/door", &[])));
    let outcome = tokio::time::timeout(Duration::from_millis(50), call).await;
    assert!(outcome.is_err(), "the call finished before its deadline");
    assert!(events.lock().unwrap().is_empty(), "recorded before the delay");

    tokio::time::sleep(Duration::from_millis(500)).await;

    let recorded = events.lock().unwrap();
    assert_eq!(recorded.len(), 1);
    assert!(recorded[0].decision.allowed);
    assert_eq!(recorded[0].request["path"], "/open/door");
}

/// Keeps every event but fails the first one, as a sink whose acknowledgement came too late.
#[derive(Default)]
struct FirstFailsSink {
    events: Mutex<Vec<DecisionEvent>>,
}

impl DecisionSink for FirstFailsSink {
    fn record(&self, event: &DecisionEvent) -> BoxFuture<'static, Result<(), SinkError>> {
        let mut events = self.events.lock().unwrap();
        events.push(event.clone());
        let first = events.len() == 1;
        Box::pin(async move { if first { Err(SinkError::Stopped("test".to_owned())) } else { Ok(()) } })
    }

    fn flush(&self) -> BoxFuture<'static, Result<(), SinkError>> {
        Box::pin(async { Ok(()) })
    }

    fn name(&self) -> &'static str {
        "first-fails"
    }
}

#[tokio::test]
async fn unrecorded_event_is_corrected_to_503() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Arc::new(FirstFailsSink::default());
    let authorizer = Authorizer::new(policies(dir.path()), sink.clone(), Arc::new(NoObserver), Duration::from_secs(1));

    let outcome = authorizer.check(request("/open/door", &[])).await;
    tokio::task::yield_now().await;

    assert!(!outcome.decision.allowed);
    let events = sink.events.lock().unwrap();
    assert_eq!(events.len(), 2);
    let (original, correction) = (&events[0], &events[1]);
    assert_eq!((original.decision.allowed, original.decision.http_status), (true, 200));
    assert_eq!((correction.decision.allowed, correction.decision.http_status), (false, 503));
    assert_eq!(correction.amends.as_deref(), Some(original.event_id.as_str()));
    assert_eq!(correction.decision_id, original.decision_id);
    assert_ne!(correction.event_id, original.event_id);
    assert_eq!(outcome.event.event_id, correction.event_id);
}
