//! The check pipeline and the gRPC `Authorization` service that runs it.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use envoy_types::pb::envoy::service::auth::v3::authorization_server::Authorization;
use envoy_types::pb::envoy::service::auth::v3::{CheckRequest, CheckResponse};
use portcullis_audit::{DecisionEvent, DecisionSink, EventDecision, EventPolicy, format_rfc3339};
use portcullis_policy::{Policy, PolicyStore};
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

use crate::decision::{Decision, check_response, parse_decision};
use crate::identity::{Authentication, IdentityCheck, OnInvalidToken, identity_document, identity_error_document, identity_event};
use crate::input::{InputError, RequestSummary, build_input, selected_headers};
use portcullis_jwt::TokenOutcome;

/// Status sent when portcullis itself cannot decide (policy error, undefined or malformed
/// decision). Envoy also sends 403 when an ext_authz call fails, so clients see the same status
/// either way. The reason goes to the log and the decision event, never to the client.
const INTERNAL_DENY_STATUS: u16 = 403;
/// Status sent when the decision event cannot be recorded in time: the request could
/// succeed later, so it is reported as unavailable rather than forbidden.
const AUDIT_UNAVAILABLE_STATUS: u16 = 503;
/// Status for a body that cannot be parsed under its declared media type.
const MALFORMED_BODY_STATUS: u16 = 400;
/// Status for a request whose token is present but invalid (RFC 6750, section 3.1).
const INVALID_TOKEN_STATUS: u16 = 401;
/// Status when a token cannot be verified because its provider's keys are unavailable.
const KEYS_UNAVAILABLE_STATUS: u16 = 503;

/// Text that replaces a redacted member of a decision event.
pub const REDACTED: &str = "[redacted]";

/// Contents of decision events beyond the fixed request summary.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventOptions {
    /// Lowercase names of request headers copied into `request.headers` when present.
    pub headers: Vec<String>,
    /// Dotted paths of members replaced by [`REDACTED`] when present: `request.<member>` (also
    /// `request.headers.<name>` and `request.trace.<name>`), `identity.<member>` or
    /// `decision.reason`.
    pub redact: Vec<String>,
}

/// Receives the outcome of every check, for metrics.
pub trait CheckObserver: Send + Sync {
    fn check_completed(&self, outcome: &CheckSummary);
}

/// What metrics need to know about one check.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckSummary {
    pub allowed: bool,
    pub http_status: u16,
    /// Reason portcullis denied on its own, as a short stable label (`invalid_token`, `keys_unavailable`, `malformed_body`,
    /// `policy_error`, `invalid_decision`, `audit_failed`). `None` when the policy decided.
    pub denied_by: Option<&'static str>,
    pub latency: Duration,
}

/// An observer that ignores everything, for the offline `check` command and tests.
#[derive(Debug, Default)]
pub struct NoObserver;

impl CheckObserver for NoObserver {
    fn check_completed(&self, _outcome: &CheckSummary) {}
}

/// Everything one check produced: the offline `check` command prints all of it.
#[derive(Debug, Clone)]
pub struct CheckOutcome {
    /// The policy input document; `None` when the request was denied before evaluation.
    pub input: Option<regorus::Value>,
    /// The raw value of the decision rule; `None` when the policy was not evaluated.
    pub policy_result: Option<regorus::Value>,
    pub decision: Decision,
    /// Reason portcullis denied on its own, as in [`CheckSummary::denied_by`].
    pub denied_by: Option<&'static str>,
    pub response: CheckResponse,
    pub event: DecisionEvent,
}

/// Runs the steps of one check: policy input, evaluation, decision, decision event and
/// response. Any failure on the way is a deny (fail closed).
pub struct Authorizer {
    policies: Arc<PolicyStore>,
    sink: Arc<dyn DecisionSink>,
    observer: Arc<dyn CheckObserver>,
    audit_timeout: Duration,
    authentication: Option<Authentication>,
    events: EventOptions,
}

/// A decision and how it came about, before it is recorded.
struct Verdict {
    input: Option<regorus::Value>,
    policy_result: Option<regorus::Value>,
    decision: Decision,
    denied_by: Option<&'static str>,
}

impl Authorizer {
    pub fn new(
        policies: Arc<PolicyStore>,
        sink: Arc<dyn DecisionSink>,
        observer: Arc<dyn CheckObserver>,
        audit_timeout: Duration,
    ) -> Self {
        Self { policies, sink, observer, audit_timeout, authentication: None, events: EventOptions::default() }
    }

    /// Sets the headers and redactions of decision events.
    pub fn with_event_options(mut self, events: EventOptions) -> Self {
        self.events = events;
        self
    }

    /// Verifies callers' tokens before the policy runs.
    pub fn with_authentication(mut self, authentication: Authentication) -> Self {
        self.authentication = Some(authentication);
        self
    }

    /// Decides one request and records its event. The response is only returned once the
    /// event is recorded; when that fails or times out, the request is denied with 503.
    pub async fn check(&self, request: CheckRequest) -> CheckOutcome {
        let started = Instant::now();
        let time = SystemTime::now();
        let decision_id = uuid::Uuid::now_v7().to_string();
        let policy = self.policies.current();
        let summary = RequestSummary::from_request(&request);

        let identity = match &self.authentication {
            Some(authentication) => Some(authentication.check(&request).await),
            None => None,
        };
        let on_invalid_token = self.authentication.as_ref().map_or(OnInvalidToken::Deny, |a| a.on_invalid_token);
        let mut verdict = decide(&request, &policy, &decision_id, identity.as_ref(), on_invalid_token);
        let latency = started.elapsed();

        let mut event = DecisionEvent {
            schema: DecisionEvent::SCHEMA,
            event_id: uuid::Uuid::now_v7().to_string(),
            decision_id: decision_id.clone(),
            time: format_rfc3339(time),
            request: self.request_event(&request, &summary),
            identity: identity.as_ref().map(|identity| identity_event(&identity.outcome)),
            decision: event_decision(&verdict),
            policy: EventPolicy {
                bundle_revision: policy.revision().to_owned(),
                bundle_digest: policy.digest().to_owned(),
                decision_path: policy.decision_path().to_owned(),
            },
            latency_us: latency.as_micros().try_into().unwrap_or(u64::MAX),
            amends: None,
        };
        redact(&mut event, &self.events.redact);

        if let Err(reason) = self.record(&event).await {
            warn!(decision.id = %decision_id, sink = self.sink.name(), %reason, "decision event not recorded; denying the request");
            verdict.decision = Decision::deny(AUDIT_UNAVAILABLE_STATUS, "decision event could not be recorded");
            verdict.denied_by = Some("audit_failed");
            event = self.record_correction(event, &verdict);
        }

        log_decision(&decision_id, &summary, &verdict);
        let response = check_response(&verdict.decision, &decision_id);
        self.observer.check_completed(&CheckSummary {
            allowed: verdict.decision.allowed,
            http_status: event.decision.http_status,
            denied_by: verdict.denied_by,
            latency: started.elapsed(),
        });

        CheckOutcome {
            input: verdict.input,
            policy_result: verdict.policy_result,
            decision: verdict.decision,
            denied_by: verdict.denied_by,
            response,
            event,
        }
    }

    /// Builds the `request` member of an event: the summary and the allowed headers.
    fn request_event(&self, request: &CheckRequest, summary: &RequestSummary) -> serde_json::Value {
        let mut value = serde_json::to_value(summary).unwrap_or(serde_json::Value::Null);
        if self.events.headers.is_empty() {
            return value;
        }
        let headers = selected_headers(request, &self.events.headers);
        if let (Some(object), false) = (value.as_object_mut(), headers.is_empty()) {
            object.insert("headers".to_owned(), serde_json::json!(headers));
        }
        value
    }

    /// Records, without waiting, a second event that states the 503 the request got after
    /// all, and returns it. The first event may still reach the audit log (a sink that timed
    /// out can deliver it later) with the policy's decision in it; the correction names it in
    /// `amends`, so the trail shows the status the caller received.
    fn record_correction(&self, original: DecisionEvent, verdict: &Verdict) -> DecisionEvent {
        let mut correction = original;
        correction.amends = Some(std::mem::replace(&mut correction.event_id, uuid::Uuid::now_v7().to_string()));
        correction.decision = event_decision(verdict);

        let recorded = self.sink.record(&correction);
        let (decision_id, sink) = (correction.decision_id.clone(), self.sink.name());
        tokio::spawn(async move {
            if let Err(error) = recorded.await {
                warn!(decision.id = %decision_id, sink, %error, "the 503 correction of a decision event was not recorded either");
            }
        });
        correction
    }

    async fn record(&self, event: &DecisionEvent) -> Result<(), String> {
        match tokio::time::timeout(self.audit_timeout, self.sink.record(event)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(error.to_string()),
            Err(_) => Err(format!("timed out after {:?}", self.audit_timeout)),
        }
    }
}

fn decide(
    request: &CheckRequest,
    policy: &Policy,
    decision_id: &str,
    identity: Option<&IdentityCheck>,
    on_invalid_token: OnInvalidToken,
) -> Verdict {
    if let Some(TokenOutcome::Invalid(invalid)) = identity.map(|identity| &identity.outcome)
        && !invalid.reason.is_caller_fault()
    {
        // The token may be fine: the provider's keys could not be fetched. Envoy may retry.
        let decision = Decision::deny(KEYS_UNAVAILABLE_STATUS, format!("token not verified: {}", invalid.message));
        return Verdict { input: None, policy_result: None, decision, denied_by: Some("keys_unavailable") };
    }
    if let Some(TokenOutcome::Invalid(invalid)) = identity.map(|identity| &identity.outcome)
        && on_invalid_token == OnInvalidToken::Deny
    {
        let mut decision = Decision::deny(INVALID_TOKEN_STATUS, format!("invalid token: {}", invalid.message));
        decision.headers.push(("www-authenticate".to_owned(), invalid.www_authenticate()));
        decision.body = Some(format!("invalid token: {}\n", invalid.message));
        return Verdict { input: None, policy_result: None, decision, denied_by: Some("invalid_token") };
    }

    let mut input = match build_input(request) {
        Ok(input) => input,
        Err(InputError::MalformedBody { reason, .. }) => {
            let mut decision = Decision::deny(MALFORMED_BODY_STATUS, reason.clone());
            decision.body = Some(reason);
            return Verdict { input: None, policy_result: None, decision, denied_by: Some("malformed_body") };
        }
    };

    if let Some(identity) = identity {
        add_identity(&mut input.document, &identity.outcome);
    }

    let result = match policy.evaluate(input.document.clone()) {
        Ok(result) => result,
        Err(error) => {
            warn!(decision.id = %decision_id, policy.revision = policy.revision(), %error, "policy evaluation failed; denying");
            let decision = Decision::deny(INTERNAL_DENY_STATUS, format!("policy evaluation failed: {error}"));
            return Verdict { input: Some(input.document), policy_result: None, decision, denied_by: Some("policy_error") };
        }
    };

    match parse_decision(&result) {
        Ok(mut decision) => {
            if let Some(identity) = identity.filter(|_| decision.allowed) {
                apply_upstream_headers(&mut decision, identity);
            }
            Verdict { input: Some(input.document), policy_result: Some(result), decision, denied_by: None }
        }
        Err(error) => {
            warn!(decision.id = %decision_id, policy.revision = policy.revision(), policy.decision = policy.decision_path(), %error, "invalid policy decision; denying");
            let decision = Decision::deny(INTERNAL_DENY_STATUS, format!("invalid policy decision: {error}"));
            Verdict { input: Some(input.document), policy_result: Some(result), decision, denied_by: Some("invalid_decision") }
        }
    }
}

/// Adds `input.identity` for a verified caller, or `input.identity_error` for an invalid
/// token that the policy is asked to judge.
fn add_identity(document: &mut regorus::Value, outcome: &TokenOutcome) {
    let (key, value) = match outcome {
        TokenOutcome::NoToken => return,
        TokenOutcome::Valid(identity) => ("identity", identity_document(identity)),
        TokenOutcome::Invalid(invalid) => ("identity_error", identity_error_document(invalid)),
    };
    if let Ok(object) = document.as_object_mut() {
        object.insert(regorus::Value::from(key), value);
    }
}

/// Adds the identity's header changes to an allowed request: claims copied into headers, the
/// token removed when it is not forwarded, and claim headers a client may have forged removed.
fn apply_upstream_headers(decision: &mut Decision, identity: &IdentityCheck) {
    let upstream = &identity.upstream;
    let mut headers = upstream.set.clone();
    headers.append(&mut decision.headers);
    decision.headers = headers;
    decision.request_headers_to_remove.extend(upstream.remove.iter().cloned());
    decision.query_parameters_to_remove.extend(upstream.remove_query_parameters.iter().cloned());
}

/// Replaces the members named by `paths` with [`REDACTED`] where the event has them.
fn redact(event: &mut DecisionEvent, paths: &[String]) {
    for path in paths {
        let (root, rest) = path.split_once('.').unwrap_or((path.as_str(), ""));
        match root {
            "request" => redact_value(&mut event.request, rest),
            "identity" => {
                if let Some(identity) = event.identity.as_mut() {
                    redact_value(identity, rest);
                }
            }
            "decision" if rest == "reason" => {
                if let Some(reason) = event.decision.reason.as_mut() {
                    *reason = REDACTED.to_owned();
                }
            }
            _ => {}
        }
    }
}

/// Replaces the member at a dotted path inside `value`. At each level the rest of the path is
/// first tried as one member name, so header names that contain a dot can be redacted.
fn redact_value(value: &mut serde_json::Value, path: &str) {
    let Some(object) = value.as_object_mut() else { return };
    if let Some(member) = object.get_mut(path) {
        *member = serde_json::Value::String(REDACTED.to_owned());
        return;
    }
    if let Some((first, rest)) = path.split_once('.')
        && let Some(member) = object.get_mut(first)
    {
        redact_value(member, rest);
    }
}

fn event_decision(verdict: &Verdict) -> EventDecision {
    let decision = &verdict.decision;
    EventDecision {
        allowed: decision.allowed,
        http_status: if decision.allowed { 200 } else { decision.http_status.unwrap_or(INTERNAL_DENY_STATUS) },
        reason: decision.reason.clone(),
    }
}

/// Logs denies at info and allows at debug, as one event with structured fields.
fn log_decision(decision_id: &str, summary: &RequestSummary, verdict: &Verdict) {
    let decision = &verdict.decision;
    if decision.allowed {
        debug!(decision.id = %decision_id, http.method = %summary.method, http.path = %summary.path, "request allowed");
    } else {
        info!(
            decision.id = %decision_id,
            http.method = %summary.method,
            http.path = %summary.path,
            http.status = decision.http_status.unwrap_or(INTERNAL_DENY_STATUS),
            denied_by = verdict.denied_by.unwrap_or("policy"),
            reason = decision.reason.as_deref().unwrap_or(""),
            "request denied"
        );
    }
}

/// The ext_authz v3 gRPC service.
#[derive(Clone)]
pub struct AuthzService {
    authorizer: Arc<Authorizer>,
}

impl AuthzService {
    pub fn new(authorizer: Arc<Authorizer>) -> Self {
        Self { authorizer }
    }
}

#[tonic::async_trait]
impl Authorization for AuthzService {
    async fn check(&self, request: Request<CheckRequest>) -> Result<Response<CheckResponse>, Status> {
        // The check runs in its own task so that a call Envoy cancels or times out still
        // finishes and records its decision event.
        let authorizer = Arc::clone(&self.authorizer);
        let check = tokio::spawn(async move { authorizer.check(request.into_inner()).await.response });
        match check.await {
            Ok(response) => Ok(Response::new(response)),
            Err(error) => {
                tracing::error!(%error, "check task failed; denying");
                let decision = Decision::deny(INTERNAL_DENY_STATUS, "internal error");
                Ok(Response::new(check_response(&decision, "unknown")))
            }
        }
    }
}

#[cfg(test)]
mod tests;
