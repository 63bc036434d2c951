//! The policy input document built from a `CheckRequest`.
//!
//! The document has the shape the OPA Envoy plugin gives policies (`attributes`, `parsed_path`,
//! `parsed_query`, `parsed_body`, `truncated_body`, `version`), so policies written for that plugin
//! run unchanged. Where the plugin parses paths or queries wrongly, this module parses them as
//! docs/input.md describes instead of copying the fault.

mod body;
mod headers;
mod path;
mod summary;
pub mod wire;

#[cfg(test)]
mod tests;

use std::sync::LazyLock;

use envoy_types::pb::envoy::service::auth::v3::CheckRequest;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::HttpRequest;
use regorus::Value;
use regorus::value::Object;

use crate::protojson::{encode_attribute_context, key};

pub use summary::{RequestSummary, selected_headers};
pub use wire::decode_check_request;

/// The input document of one check. The request facts that decision logs and audit events
/// record are a [`RequestSummary`], made apart from it.
#[derive(Clone)]
pub struct PolicyInput {
    pub document: Value,
}

/// Hides the document, which contains request headers such as `authorization` with raw
/// credentials.
impl std::fmt::Debug for PolicyInput {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("PolicyInput")
            .field("document", &format_args!("<redacted>"))
            .finish()
    }
}

/// A request that cannot be turned into a policy input because of its content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    /// The body does not parse under the media type its `content-type` header declares. The
    /// request is the caller's fault, so it is denied with 400 Bad Request without evaluating the
    /// policy.
    #[error("{reason}")]
    MalformedBody {
        /// Media type without parameters, such as `application/json`.
        media_type: String,
        /// Short description of the fault, such as
        /// `request body is not valid JSON: expected value at line 1 column 5`.
        reason: String,
    },
}

/// The `version` member of every input document, as the OPA Envoy plugin sets it for the v3 API.
static VERSION: LazyLock<Value> = LazyLock::new(|| {
    let mut version = Object::new();
    version.insert(Value::from("ext_authz"), Value::from("v3"));
    version.insert(Value::from("encoding"), Value::from("protojson"));
    version.into_value()
});

/// Builds the policy input document of `request`.
///
/// # Errors
///
/// Returns [`InputError::MalformedBody`] when the body does not parse under its declared media
/// type. Paths, queries and headers never cause an error: invalid percent-encoding is kept as
/// written and bytes that are not UTF-8 become U+FFFD.
pub fn build_input(request: &CheckRequest) -> Result<PolicyInput, InputError> {
    let http = http_request(request);
    let body = match http {
        Some(http) => body::parse_body(http)?,
        None => body::ParsedBody::default(),
    };

    let mut document = Object::new();
    if let Some(attributes) = &request.attributes {
        let headers = http.and_then(headers::headers_from_header_map);
        document.insert(
            key!("attributes").clone(),
            encode_attribute_context(attributes, headers),
        );
    }

    let target = http.map_or("", |http| http.path.as_str());
    let (path, query_in_path) = path::split_target(target);
    let query = match http {
        Some(http) if !http.query.is_empty() => http.query.strip_prefix('?').unwrap_or(&http.query),
        _ => query_in_path.unwrap_or(""),
    };
    document.insert(key!("parsed_path").clone(), path::parse_path(path));
    document.insert(
        key!("parsed_query").clone(),
        path::parse_form(query.as_bytes()),
    );

    document.insert(
        key!("parsed_body").clone(),
        body.value.unwrap_or(Value::Null),
    );
    document.insert(key!("truncated_body").clone(), Value::from(body.truncated));
    document.insert(key!("version").clone(), VERSION.clone());

    Ok(PolicyInput {
        document: document.into_value(),
    })
}

fn http_request(request: &CheckRequest) -> Option<&HttpRequest> {
    request.attributes.as_ref()?.request.as_ref()?.http.as_ref()
}
