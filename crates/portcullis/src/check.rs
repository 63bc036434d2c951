//! The offline tools: `portcullis check` decides one request as `serve` would, and
//! `portcullis config validate` reports every problem in a configuration file.

use std::path::Path;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::HeaderValueOption;
use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use envoy_types::pb::envoy::service::auth::v3::CheckResponse;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use portcullis_audit::NullSink;
use portcullis_authz::protojson::check_request_from_json;
use portcullis_authz::service::{Authorizer, NoObserver};
use portcullis_policy::PolicyStore;
use serde_json::{Value, json};

use crate::config::{Config, ConfigError};
use crate::serve::{load_policy, start_authentication};
use crate::{EXIT_BUNDLE, EXIT_CONFIG, EXIT_FAILURE};

/// Decides the CheckRequest in `request_path` with the configured policy and prints the
/// input document, the policy result, the decision and the CheckResponse as JSON.
pub fn run(config_path: &Path, request_path: &Path) -> u8 {
    let config = match Config::load(config_path) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("portcullis: {error}");
            return EXIT_CONFIG;
        }
    };
    let request = match read_request(request_path) {
        Ok(request) => request,
        Err(message) => {
            eprintln!("portcullis: {message}");
            return EXIT_FAILURE;
        }
    };
    let policy = match load_policy(&config.policy.bundle, &config.policy.decision) {
        Ok(policy) => policy,
        Err(message) => {
            eprintln!("portcullis: {message}");
            return EXIT_BUNDLE;
        }
    };

    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("portcullis: cannot start the async runtime: {error}");
            return EXIT_FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        let mut authorizer = Authorizer::new(Arc::new(PolicyStore::new(policy)), Arc::new(NullSink), Arc::new(NoObserver), config.audit.timeout);
        if let Some(jwt) = &config.jwt {
            match start_authentication(jwt, Arc::new(portcullis_jwt::NoopObserver)).await {
                Ok(authentication) => authorizer = authorizer.with_authentication(authentication),
                Err(message) => return Err(message),
            }
        }
        Ok(authorizer.check(request).await)
    });
    let outcome = match outcome {
        Ok(outcome) => outcome,
        Err(message) => {
            eprintln!("portcullis: {message}");
            return EXIT_CONFIG;
        }
    };

    let report = json!({
        "input": outcome.input.as_ref().map(to_json),
        "policy_result": outcome.policy_result.as_ref().map(to_json),
        "decision": outcome.decision,
        "response": response_to_json(&outcome.response),
        "event": outcome.event,
    });
    match serde_json::to_string_pretty(&report) {
        Ok(text) => {
            println!("{text}");
            policy_failure_code(&outcome)
        }
        Err(error) => {
            eprintln!("portcullis: cannot print the result: {error}");
            EXIT_FAILURE
        }
    }
}

/// Returns 1 when the policy failed to produce a valid decision (an evaluation error or a
/// malformed decision), else 0. Scripts can then tell a broken policy from a deny.
fn policy_failure_code(outcome: &portcullis_authz::service::CheckOutcome) -> u8 {
    match outcome.denied_by {
        Some(reason @ ("policy_error" | "invalid_decision")) => {
            let detail = outcome.decision.reason.as_deref().unwrap_or(reason);
            eprintln!("portcullis: the policy did not produce a valid decision: {detail}");
            EXIT_FAILURE
        }
        _ => 0,
    }
}

fn read_request(path: &Path) -> Result<envoy_types::pb::envoy::service::auth::v3::CheckRequest, String> {
    let text = std::fs::read_to_string(path).map_err(|error| format!("cannot read request file {}: {error}", path.display()))?;
    let json: Value = serde_json::from_str(&text).map_err(|error| format!("request file {} is not valid JSON: {error}", path.display()))?;
    check_request_from_json(&json).map_err(|error| format!("request file {} is not a CheckRequest: {error}", path.display()))
}

/// Converts a regorus value to JSON for printing; undefined prints as null.
fn to_json(value: &regorus::Value) -> Value {
    if *value == regorus::Value::Undefined {
        return Value::Null;
    }
    value.to_json_str().ok().and_then(|text| serde_json::from_str(&text).ok()).unwrap_or(Value::Null)
}

/// Renders the parts of a CheckResponse that Envoy acts on, in protobuf JSON field names.
fn response_to_json(response: &CheckResponse) -> Value {
    let status = response.status.as_ref().map(|status| json!({"code": status.code, "message": status.message}));
    let http_response = match &response.http_response {
        Some(HttpResponse::OkResponse(ok)) => json!({"okResponse": {
            "headers": headers_to_json(&ok.headers),
            "headersToRemove": ok.headers_to_remove,
            "responseHeadersToAdd": headers_to_json(&ok.response_headers_to_add),
            "queryParametersToSet": ok.query_parameters_to_set.iter().map(|p| json!({"key": p.key, "value": p.value})).collect::<Vec<_>>(),
            "queryParametersToRemove": ok.query_parameters_to_remove,
        }}),
        Some(HttpResponse::DeniedResponse(denied)) => json!({"deniedResponse": {
            "status": denied.status.as_ref().map(|status| status.code),
            "headers": headers_to_json(&denied.headers),
            "body": denied.body,
        }}),
        Some(HttpResponse::ErrorResponse(error)) => json!({"errorResponse": {
            "status": error.status.as_ref().map(|status| status.code),
            "headers": headers_to_json(&error.headers),
            "body": error.body,
        }}),
        None => Value::Null,
    };
    let metadata = response.dynamic_metadata.as_ref().map(struct_to_json).unwrap_or(Value::Null);
    json!({"status": status, "httpResponse": http_response, "dynamicMetadata": metadata})
}

fn headers_to_json(headers: &[HeaderValueOption]) -> Vec<Value> {
    headers
        .iter()
        .map(|option| {
            let header = option.header.as_ref();
            json!({
                "key": header.map(|h| h.key.as_str()).unwrap_or(""),
                "value": header.map(|h| h.value.as_str()).unwrap_or(""),
                "appendAction": HeaderAppendAction::try_from(option.append_action)
                    .map(|action| action.as_str_name().to_owned())
                    .unwrap_or_else(|_| option.append_action.to_string()),
            })
        })
        .collect()
}

fn struct_to_json(value: &envoy_types::pb::google::protobuf::Struct) -> Value {
    Value::Object(value.fields.iter().map(|(key, value)| (key.clone(), protobuf_value_to_json(value))).collect())
}

fn protobuf_value_to_json(value: &envoy_types::pb::google::protobuf::Value) -> Value {
    use envoy_types::pb::google::protobuf::value::Kind;
    match &value.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::NumberValue(number)) => json!(number),
        Some(Kind::StringValue(text)) => json!(text),
        Some(Kind::BoolValue(flag)) => json!(flag),
        Some(Kind::StructValue(inner)) => struct_to_json(inner),
        Some(Kind::ListValue(list)) => Value::Array(list.values.iter().map(protobuf_value_to_json).collect()),
    }
}

/// Reports every problem in a configuration file and whether its bundle loads.
pub fn validate(config_path: &Path) -> u8 {
    let config = match Config::load(config_path) {
        Ok(config) => config,
        Err(error @ ConfigError::Read { .. }) => {
            eprintln!("portcullis: {error}");
            return EXIT_CONFIG;
        }
        Err(error) => {
            eprintln!("{error}");
            return EXIT_CONFIG;
        }
    };
    match load_policy(&config.policy.bundle, &config.policy.decision) {
        Ok(policy) => {
            println!(
                "configuration file {} is valid; policy bundle revision {} compiles with decision {}",
                config_path.display(),
                policy.revision(),
                config.policy.decision
            );
            0
        }
        Err(message) => {
            eprintln!("configuration file {} has 1 problem:\n  policy.bundle: {message}", config_path.display());
            EXIT_BUNDLE
        }
    }
}
