//! AdmissionReview v1 in, AdmissionReview v1 out.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Map, Value, json};

use crate::config::{FailurePolicy, InjectorConfig};
use crate::patch::{Patch, Position};
use crate::pod::{INJECTED_ANNOTATION, Pod};
use crate::sidecar;

const ADMISSION_API_VERSION: &str = "admission.k8s.io/v1";

/// HTTP status of the Status object in a rejection. The pod itself may be fine; what failed is
/// the injection, so it is reported as a server-side error.
const REJECTION_STATUS_CODE: u16 = 500;

/// A reason the injector could not inject a pod.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum MutationError {
    #[error("{path} is {found}; expected {expected}")]
    WrongType {
        path: String,
        expected: &'static str,
        found: &'static str,
    },
    #[error("unsupported AdmissionReview apiVersion {found:?}; expected {ADMISSION_API_VERSION}")]
    UnsupportedApiVersion { found: String },
    #[error("the AdmissionReview has no request")]
    MissingRequest,
    #[error("request.{field} is missing")]
    MissingRequestField { field: &'static str },
    #[error("request.object.spec is missing")]
    MissingSpec,
    #[error("the pod already has a volume named {name:?}")]
    VolumeNameTaken { name: String },
    #[error("container {container:?} already declares port {port}, which the sidecar uses")]
    PortTaken { container: String, port: i64 },
}

/// The injector's decision for one review.
#[derive(Debug)]
enum Outcome {
    Injected {
        operations: Vec<Value>,
        native: bool,
    },
    Skipped(&'static str),
    Failed(MutationError),
}

/// Decides an `admission.k8s.io/v1` AdmissionReview and returns the response review.
///
/// A pod CREATE gets a base64 JSON Patch that adds the sidecar and its volumes and marks the
/// pod with `portcullis.io/injected: "true"`. Other kinds and operations, opted-out pods and
/// pods injected before are allowed without a patch. When the pod cannot be injected (a
/// malformed object, a volume name or port already in use) the answer follows
/// `config.failure_policy`: `Ignore` allows the pod unchanged with a warning, `Fail`
/// rejects it with the reason. The function never panics on input.
pub fn mutate(review: &Value, config: &InjectorConfig) -> Value {
    let uid = review
        .pointer("/request/uid")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let outcome = decide(review, config);
    log_outcome(review, &outcome);

    let mut response = Map::new();
    response.insert("uid".to_owned(), Value::from(uid));
    match outcome {
        Outcome::Injected { operations, .. } => {
            let patch = serde_json::to_vec(&operations)
                .expect("serializing a JSON value to a vector cannot fail");
            response.insert("allowed".to_owned(), Value::Bool(true));
            response.insert("patchType".to_owned(), Value::from("JSONPatch"));
            response.insert("patch".to_owned(), Value::from(BASE64.encode(patch)));
        }
        Outcome::Skipped(_) => {
            response.insert("allowed".to_owned(), Value::Bool(true));
        }
        Outcome::Failed(error) => match config.failure_policy {
            FailurePolicy::Ignore => {
                response.insert("allowed".to_owned(), Value::Bool(true));
                response.insert(
                    "warnings".to_owned(),
                    json!([format!("portcullis sidecar not injected: {error}")]),
                );
            }
            FailurePolicy::Fail => {
                response.insert("allowed".to_owned(), Value::Bool(false));
                response.insert(
                    "status".to_owned(),
                    json!({
                        "code": REJECTION_STATUS_CODE,
                        "message": format!("portcullis sidecar injection failed: {error}"),
                    }),
                );
            }
        },
    }

    json!({
        "apiVersion": ADMISSION_API_VERSION,
        "kind": "AdmissionReview",
        "response": response,
    })
}

fn decide(review: &Value, config: &InjectorConfig) -> Outcome {
    match decide_or_fail(review, config) {
        Ok(outcome) => outcome,
        Err(error) => Outcome::Failed(error),
    }
}

fn decide_or_fail(review: &Value, config: &InjectorConfig) -> Result<Outcome, MutationError> {
    let api_version = review
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if api_version != ADMISSION_API_VERSION {
        return Err(MutationError::UnsupportedApiVersion {
            found: api_version.to_owned(),
        });
    }
    let request = review.get("request").ok_or(MutationError::MissingRequest)?;
    if request.get("uid").and_then(Value::as_str).is_none() {
        return Err(MutationError::MissingRequestField { field: "uid" });
    }

    // The webhook is registered for pod CREATE only; anything else passes untouched.
    let is_pod = request.pointer("/kind/kind").and_then(Value::as_str) == Some("Pod")
        && request
            .pointer("/kind/group")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .is_empty();
    if !is_pod {
        return Ok(Outcome::Skipped("not a pod"));
    }
    if request.get("operation").and_then(Value::as_str) != Some("CREATE") {
        return Ok(Outcome::Skipped("not a CREATE"));
    }
    if request
        .get("subResource")
        .and_then(Value::as_str)
        .is_some_and(|sub| !sub.is_empty())
    {
        return Ok(Outcome::Skipped("a subresource"));
    }

    let object = request
        .get("object")
        .ok_or(MutationError::MissingRequestField { field: "object" })?;
    let pod = Pod::new(object)?;
    if let Some(reason) = pod.skip_reason()? {
        return Ok(Outcome::Skipped(reason.as_str()));
    }

    let native = config.native_sidecar();
    let operations = injection_patch(&pod, config, native)?;
    Ok(Outcome::Injected { operations, native })
}

/// Builds the operations that add the marker annotation, the volumes and the container.
fn injection_patch(
    pod: &Pod<'_>,
    config: &InjectorConfig,
    native: bool,
) -> Result<Vec<Value>, MutationError> {
    let template = &config.sidecar;
    check_conflicts(pod, config)?;
    let mut patch = Patch::default();

    match pod.metadata()? {
        Some(_) => patch.add_map_entry(
            "/metadata/annotations",
            pod.metadata_map("annotations")?,
            INJECTED_ANNOTATION,
            Value::from("true"),
        ),
        None => patch.add_map_entry(
            "/metadata",
            None,
            "annotations",
            json!({ INJECTED_ANNOTATION: "true" }),
        ),
    }

    patch.add_array_items(
        "/spec/volumes",
        pod.spec_array("volumes")?,
        sidecar::volumes(template),
        Position::Back,
    );

    let container = sidecar::container(template, native);
    if native {
        // First among the init containers, so that it is running and ready before the other
        // init containers (such as istio-init) and the application start.
        patch.add_array_items(
            "/spec/initContainers",
            pod.spec_array("initContainers")?,
            vec![container],
            Position::Front,
        );
    } else {
        // Last, so that tools that pick the first container by default still pick the
        // application.
        patch.add_array_items(
            "/spec/containers",
            pod.spec_array("containers")?,
            vec![container],
            Position::Back,
        );
    }

    Ok(patch.into_operations())
}

/// Rejects pods whose volume names or declared ports collide with the sidecar's, because
/// adding the sidecar would make the pod invalid or bind a port twice.
fn check_conflicts(pod: &Pod<'_>, config: &InjectorConfig) -> Result<(), MutationError> {
    let template = &config.sidecar;
    let pod_volume_names = pod.volume_names()?;
    if let Some(name) = sidecar::volume_names(template)
        .into_iter()
        .find(|name| pod_volume_names.contains(name))
    {
        return Err(MutationError::VolumeNameTaken {
            name: name.to_owned(),
        });
    }

    let sidecar_ports = [
        i64::from(template.grpc_port),
        i64::from(template.admin_port),
    ];
    if let Some((container, port)) = pod
        .declared_ports()?
        .into_iter()
        .find(|(_, port)| sidecar_ports.contains(port))
    {
        return Err(MutationError::PortTaken { container, port });
    }
    Ok(())
}

fn log_outcome(review: &Value, outcome: &Outcome) {
    let namespace = review
        .pointer("/request/namespace")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let uid = review
        .pointer("/request/uid")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let pod_name = review
        .pointer("/request/object")
        .and_then(|object| Pod::new(object).ok())
        .map(|pod| pod.display_name())
        .unwrap_or_default();

    match outcome {
        Outcome::Injected { native, .. } => tracing::info!(
            review.uid = uid,
            pod.namespace = namespace,
            pod.name = %pod_name,
            native_sidecar = native,
            "injected the portcullis sidecar"
        ),
        Outcome::Skipped(reason) => tracing::debug!(
            review.uid = uid,
            pod.namespace = namespace,
            pod.name = %pod_name,
            reason,
            "left the pod unchanged"
        ),
        Outcome::Failed(error) => tracing::warn!(
            review.uid = uid,
            pod.namespace = namespace,
            pod.name = %pod_name,
            %error,
            "cannot inject the portcullis sidecar"
        ),
    }
}

#[cfg(test)]
mod tests;
