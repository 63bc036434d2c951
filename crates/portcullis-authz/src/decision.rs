//! Policy decisions: reading the value a policy returns, and the `CheckResponse` it gives.
//!
//! A decision has one of the shapes the OPA Envoy plugin accepts: `true` or `false`, or an object
//! with a boolean `allowed` and optional `headers`, `response_headers_to_add`,
//! `request_headers_to_remove`, `query_parameters_to_set`, `query_parameters_to_remove`, `body`,
//! `http_status` and `dynamic_metadata`. Members with other names are ignored, as the plugin
//! ignores them. Unlike the plugin, header names and values are checked here, so a policy cannot
//! inject headers through CR or LF.

mod response;

#[cfg(test)]
mod tests;

use envoy_types::pb::envoy::r#type::v3::StatusCode;
use regorus::Value;
use regorus::value::Object;
use serde::Serialize;

pub use response::{DECISION_ID_KEY, check_response};

/// Outcome of one check: whether the request passes, and the changes to it or to the denial
/// response.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Decision {
    pub allowed: bool,
    /// Status of the denial response; 403 when `None`. Ignored when the request is allowed.
    pub http_status: Option<u16>,
    /// Headers set on the upstream request when allowed, or on the denial response when denied.
    /// Names are lowercase and may repeat.
    pub headers: Vec<(String, String)>,
    /// Headers added to the upstream response when allowed.
    pub response_headers_to_add: Vec<(String, String)>,
    /// Lowercase names of request headers removed before the request goes upstream.
    pub request_headers_to_remove: Vec<String>,
    pub query_parameters_to_set: Vec<(String, String)>,
    pub query_parameters_to_remove: Vec<String>,
    /// Body of the denial response. Ignored when the request is allowed.
    pub body: Option<String>,
    /// Metadata that Envoy stores for later filters and access logs.
    pub dynamic_metadata: serde_json::Map<String, serde_json::Value>,
    /// Reason for a decision made by portcullis itself, for decision logs. `None` for decisions
    /// from a policy.
    pub reason: Option<String>,
}

impl Decision {
    /// Builds a denial made by portcullis rather than by a policy, such as 401 for an invalid
    /// token. The caller sets `body` and `headers` if the response needs them.
    pub fn deny(status: u16, reason: impl Into<String>) -> Decision {
        Decision {
            allowed: false,
            http_status: Some(status),
            reason: Some(reason.into()),
            ..Decision::default()
        }
    }
}

/// A policy result that is not a valid decision.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecisionError {
    #[error("the policy decision is undefined because no rule produced a value")]
    Undefined,

    #[error("the policy decision must be a boolean or an object, found {found}")]
    InvalidType { found: String },

    #[error("the policy decision object has no \"allowed\" field")]
    MissingAllowed,

    #[error("decision field \"{field}\" must be {expected}, found {found}")]
    InvalidField {
        /// Path of the member, such as `headers[1].x-user`.
        field: String,
        expected: &'static str,
        found: String,
    },

    #[error("decision field \"{field}\" contains an invalid HTTP header name {name}")]
    InvalidHeaderName {
        field: String,
        /// The name, quoted and cut to 40 characters.
        name: String,
    },

    #[error(
        "decision field \"{field}\" contains CR, LF or NUL, which headers and query parameters must not contain: {value}"
    )]
    ForbiddenCharacter {
        field: String,
        /// The text, quoted and cut to 40 characters, because it may carry data from the request.
        value: String,
    },
}

/// Reads the decision a policy returned.
///
/// # Errors
///
/// Returns [`DecisionError::Undefined`] for an undefined result and another variant, naming the
/// member and what it contains, for any other value that is not a valid decision. A request must be
/// denied when its decision is invalid.
pub fn parse_decision(value: &Value) -> Result<Decision, DecisionError> {
    match value {
        Value::Undefined => Err(DecisionError::Undefined),
        Value::Bool(allowed) => Ok(Decision {
            allowed: *allowed,
            ..Decision::default()
        }),
        Value::Object(members) => parse_decision_object(members),
        other => Err(DecisionError::InvalidType {
            found: describe(other),
        }),
    }
}

fn parse_decision_object(members: &Object) -> Result<Decision, DecisionError> {
    let member = |name: &str| members.get(&Value::from(name));

    let allowed = match member("allowed") {
        None => return Err(DecisionError::MissingAllowed),
        Some(Value::Bool(allowed)) => *allowed,
        Some(other) => return Err(invalid_field("allowed", "a boolean", other)),
    };

    let mut decision = Decision {
        allowed,
        ..Decision::default()
    };
    if let Some(value) = member("headers") {
        decision.headers = name_value_pairs(value, "headers", NameRule::HeaderName)?;
    }
    if let Some(value) = member("response_headers_to_add") {
        decision.response_headers_to_add =
            name_value_pairs(value, "response_headers_to_add", NameRule::HeaderName)?;
    }
    if let Some(value) = member("request_headers_to_remove") {
        decision.request_headers_to_remove =
            names(value, "request_headers_to_remove", NameRule::HeaderName)?;
    }
    if let Some(value) = member("query_parameters_to_set") {
        decision.query_parameters_to_set =
            name_value_pairs(value, "query_parameters_to_set", NameRule::QueryParameter)?;
    }
    if let Some(value) = member("query_parameters_to_remove") {
        decision.query_parameters_to_remove = names(
            value,
            "query_parameters_to_remove",
            NameRule::QueryParameter,
        )?;
    }
    if let Some(value) = member("body") {
        decision.body = Some(string(value, "body", "a string")?.to_owned());
    }
    if let Some(value) = member("http_status") {
        decision.http_status = Some(http_status(value)?);
    }
    if let Some(value) = member("dynamic_metadata") {
        decision.dynamic_metadata = dynamic_metadata(value)?;
    }
    Ok(decision)
}

/// Rule that names in a list of names or of name/value pairs must follow.
#[derive(Debug, Clone, Copy)]
enum NameRule {
    /// An HTTP field name (RFC 9110 token), lowercased. Pseudo-headers such as `:path` are
    /// rejected because they are not header fields.
    HeaderName,
    /// Any text without CR, LF or NUL.
    QueryParameter,
}

impl NameRule {
    fn apply(self, name: &str, field: &str) -> Result<String, DecisionError> {
        match self {
            NameRule::HeaderName if is_header_name(name) => Ok(name.to_ascii_lowercase()),
            NameRule::HeaderName => Err(DecisionError::InvalidHeaderName {
                field: field.to_owned(),
                name: quote_shortened(name),
            }),
            NameRule::QueryParameter => {
                check_characters(name, field)?;
                Ok(name.to_owned())
            }
        }
    }
}

/// Reads an object from names to a string or an array of strings, or an array of such objects
/// (which lets a name repeat), into name/value pairs in order.
fn name_value_pairs(
    value: &Value,
    field: &str,
    rule: NameRule,
) -> Result<Vec<(String, String)>, DecisionError> {
    const EXPECTED: &str = "an object of names to strings, or an array of such objects";
    let mut pairs = Vec::new();
    match value {
        Value::Object(members) => add_pairs(members, field, rule, &mut pairs)?,
        Value::Array(_) | Value::Set(_) => {
            for (index, item) in sequence(value).enumerate() {
                let item_field = format!("{field}[{index}]");
                match item {
                    Value::Object(members) => add_pairs(members, &item_field, rule, &mut pairs)?,
                    other => {
                        return Err(invalid_field(
                            &item_field,
                            "an object of names to strings",
                            other,
                        ));
                    }
                }
            }
        }
        other => return Err(invalid_field(field, EXPECTED, other)),
    }
    Ok(pairs)
}

fn add_pairs(
    members: &Object,
    field: &str,
    rule: NameRule,
    pairs: &mut Vec<(String, String)>,
) -> Result<(), DecisionError> {
    for (key, value) in members.iter_sorted() {
        let Value::String(name) = key else {
            return Err(invalid_field(field, "an object with string keys", key));
        };
        let name = rule.apply(name, field)?;
        let value_field = format!("{field}.{name}");
        match value {
            Value::String(text) => {
                check_characters(text, &value_field)?;
                pairs.push((name, text.to_string()));
            }
            Value::Array(_) | Value::Set(_) => {
                for (index, item) in sequence(value).enumerate() {
                    let item_field = format!("{value_field}[{index}]");
                    let text = string(item, &item_field, "a string")?;
                    check_characters(text, &item_field)?;
                    pairs.push((name.clone(), text.to_owned()));
                }
            }
            other => {
                return Err(invalid_field(
                    &value_field,
                    "a string or an array of strings",
                    other,
                ));
            }
        }
    }
    Ok(())
}

/// Reads an array (or set) of names.
fn names(value: &Value, field: &str, rule: NameRule) -> Result<Vec<String>, DecisionError> {
    if !matches!(value, Value::Array(_) | Value::Set(_)) {
        return Err(invalid_field(field, "an array of strings", value));
    }
    sequence(value)
        .enumerate()
        .map(|(index, item)| {
            let item_field = format!("{field}[{index}]");
            rule.apply(string(item, &item_field, "a string")?, &item_field)
        })
        .collect()
}

fn http_status(value: &Value) -> Result<u16, DecisionError> {
    const FIELD: &str = "http_status";
    let code = match value {
        Value::Number(number) => number.as_i64(),
        _ => None,
    };
    let Some(code) = code.filter(|code| (100..=599).contains(code)) else {
        return Err(invalid_field(FIELD, "an integer from 100 to 599", value));
    };
    // Envoy rejects status codes missing from its StatusCode enum, such as 418 or 299.
    let supported = i32::try_from(code).is_ok_and(|code| StatusCode::try_from(code).is_ok());
    match u16::try_from(code) {
        Ok(code) if supported => Ok(code),
        _ => Err(invalid_field(
            FIELD,
            "an HTTP status code listed in Envoy's envoy.type.v3.StatusCode",
            value,
        )),
    }
}

fn dynamic_metadata(
    value: &Value,
) -> Result<serde_json::Map<String, serde_json::Value>, DecisionError> {
    match to_json(value, "dynamic_metadata")? {
        serde_json::Value::Object(map) => Ok(map),
        _ => Err(invalid_field("dynamic_metadata", "an object", value)),
    }
}

/// Converts a policy value to JSON. Sets become arrays; object keys must be strings.
fn to_json(value: &Value, field: &str) -> Result<serde_json::Value, DecisionError> {
    let json = match value {
        Value::Null => serde_json::Value::Null,
        Value::Bool(flag) => serde_json::Value::Bool(*flag),
        Value::String(text) => serde_json::Value::String(text.to_string()),
        Value::Number(_) => serde_json::to_value(value)
            .map_err(|_| invalid_field(field, "a number that JSON can represent", value))?,
        Value::Array(_) | Value::Set(_) => serde_json::Value::Array(
            sequence(value)
                .enumerate()
                .map(|(index, item)| to_json(item, &format!("{field}[{index}]")))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(members) => {
            let mut map = serde_json::Map::new();
            for (key, item) in members.iter_sorted() {
                let Value::String(name) = key else {
                    return Err(invalid_field(field, "an object with string keys", key));
                };
                map.insert(name.to_string(), to_json(item, &format!("{field}.{name}"))?);
            }
            serde_json::Value::Object(map)
        }
        Value::Undefined => return Err(invalid_field(field, "a defined value", value)),
    };
    Ok(json)
}

/// Iterates the items of an array or a set; nothing for other values.
fn sequence(value: &Value) -> Box<dyn Iterator<Item = &Value> + '_> {
    match value {
        Value::Array(items) => Box::new(items.iter()),
        Value::Set(items) => Box::new(items.iter()),
        _ => Box::new(std::iter::empty()),
    }
}

fn string<'a>(
    value: &'a Value,
    field: &str,
    expected: &'static str,
) -> Result<&'a str, DecisionError> {
    match value {
        Value::String(text) => Ok(text),
        other => Err(invalid_field(field, expected, other)),
    }
}

/// Rejects text containing CR, LF or NUL, which could end a header line and start a new one.
fn check_characters(text: &str, field: &str) -> Result<(), DecisionError> {
    if text.contains(['\r', '\n', '\0']) {
        return Err(DecisionError::ForbiddenCharacter {
            field: field.to_owned(),
            value: quote_shortened(text),
        });
    }
    Ok(())
}

/// Tells whether `name` is an HTTP field name: a non-empty RFC 9110 token.
fn is_header_name(name: &str) -> bool {
    const SYMBOLS: &[u8] = b"!#$%&'*+-.^_`|~";
    !name.is_empty()
        && name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || SYMBOLS.contains(&byte))
}

fn invalid_field(field: &str, expected: &'static str, found: &Value) -> DecisionError {
    DecisionError::InvalidField {
        field: field.to_owned(),
        expected,
        found: describe(found),
    }
}

/// Describes a policy value for an error message, cutting long strings.
fn describe(value: &Value) -> String {
    match value {
        Value::Undefined => "undefined".to_owned(),
        Value::Null => "null".to_owned(),
        Value::Bool(flag) => flag.to_string(),
        Value::Number(_) => value
            .to_json_str()
            .unwrap_or_else(|_| "a number".to_owned()),
        Value::String(text) => quote_shortened(text),
        Value::Array(_) => "an array".to_owned(),
        Value::Set(_) => "a set".to_owned(),
        Value::Object(_) => "an object".to_owned(),
    }
}

/// Quotes `text` with Rust escapes, cut to its first 40 characters followed by `...` when longer.
fn quote_shortened(text: &str) -> String {
    const MAX_CHARS: usize = 40;
    if text.chars().count() > MAX_CHARS {
        let start: String = text.chars().take(MAX_CHARS).collect();
        format!("{start:?}...")
    } else {
        format!("{text:?}")
    }
}
