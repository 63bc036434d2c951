//! Reading a `CheckRequest` from its protojson text, for checks replayed from files.
//!
//! The reader accepts what Go's `protojson.Unmarshal` accepts for these messages. A field may be
//! given under its lowerCamelCase JSON name or its original snake_case name, and `null` leaves it
//! unset. Integers may be JSON numbers or decimal strings, enums names or numbers, and bytes
//! standard or URL-safe base64 with or without padding. An unknown field is an error that names
//! its JSON path.

use std::collections::HashMap;

use base64::Engine as _;
use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use envoy_types::pb::envoy::config::core::v3::address::Address as AddressKind;
use envoy_types::pb::envoy::config::core::v3::envoy_internal_address::AddressNameSpecifier;
use envoy_types::pb::envoy::config::core::v3::socket_address::{PortSpecifier, Protocol};
use envoy_types::pb::envoy::config::core::v3::{
    Address, EnvoyInternalAddress, HeaderMap, HeaderValue, Metadata, Pipe, SocketAddress,
};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{
    HttpRequest, Peer, Request, TlsSession,
};
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use envoy_types::pb::google::protobuf::value::Kind;
use envoy_types::pb::google::protobuf::{Any, ListValue, NullValue, Struct, Value as ProtoValue};
use serde_json::Value as Json;

use super::timestamp::parse_timestamp;

/// A protojson document that does not describe a `CheckRequest`.
///
/// Every variant carries the JSON path of the offending field, such as
/// `attributes.request.http.headers`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtojsonError {
    #[error("{path}: unknown field")]
    UnknownField { path: String },

    #[error("{path}: field given twice, as {first:?} and as {second:?}")]
    DuplicateField {
        path: String,
        first: String,
        second: String,
    },

    #[error("{path}: only one of {first:?} and {second:?} may be set")]
    OneofConflict {
        path: String,
        first: String,
        second: String,
    },

    #[error("{path}: expected {expected}, found {found}")]
    InvalidValue {
        path: String,
        expected: &'static str,
        found: String,
    },
}

/// Reads a `CheckRequest` from its protojson form, `{"attributes": {...}}`.
pub fn check_request_from_json(json: &Json) -> Result<CheckRequest, ProtojsonError> {
    let mut request = CheckRequest::default();
    for field in message_fields(json, "", &[("attributes", "attributes")])? {
        match field.name {
            "attributes" => request.attributes = Some(attribute_context(&field)?),
            _ => return Err(field.unknown()),
        }
    }
    Ok(request)
}

fn attribute_context(field: &Field<'_>) -> Result<AttributeContext, ProtojsonError> {
    const NAMES: &[(&str, &str)] = &[
        ("source", "source"),
        ("destination", "destination"),
        ("request", "request"),
        ("contextExtensions", "context_extensions"),
        ("metadataContext", "metadata_context"),
        ("routeMetadataContext", "route_metadata_context"),
        ("tlsSession", "tls_session"),
    ];
    let mut context = AttributeContext::default();
    for field in message_fields(field.value, &field.path, NAMES)? {
        match field.name {
            "source" => context.source = Some(peer(&field)?),
            "destination" => context.destination = Some(peer(&field)?),
            "request" => context.request = Some(request(&field)?),
            "contextExtensions" => context.context_extensions = string_map(&field)?,
            "metadataContext" => context.metadata_context = Some(metadata(&field)?),
            "routeMetadataContext" => context.route_metadata_context = Some(metadata(&field)?),
            "tlsSession" => context.tls_session = Some(tls_session(&field)?),
            _ => return Err(field.unknown()),
        }
    }
    Ok(context)
}

fn peer(field: &Field<'_>) -> Result<Peer, ProtojsonError> {
    const NAMES: &[(&str, &str)] = &[
        ("address", "address"),
        ("service", "service"),
        ("labels", "labels"),
        ("principal", "principal"),
        ("certificate", "certificate"),
    ];
    let mut peer = Peer::default();
    for field in message_fields(field.value, &field.path, NAMES)? {
        match field.name {
            "address" => peer.address = Some(address(&field)?),
            "service" => peer.service = string(&field)?,
            "labels" => peer.labels = string_map(&field)?,
            "principal" => peer.principal = string(&field)?,
            "certificate" => peer.certificate = string(&field)?,
            _ => return Err(field.unknown()),
        }
    }
    Ok(peer)
}

fn address(field: &Field<'_>) -> Result<Address, ProtojsonError> {
    const NAMES: &[(&str, &str)] = &[
        ("socketAddress", "socket_address"),
        ("pipe", "pipe"),
        ("envoyInternalAddress", "envoy_internal_address"),
    ];
    let mut oneof = Oneof::new(&field.path);
    for field in message_fields(field.value, &field.path, NAMES)? {
        let kind = match field.name {
            "socketAddress" => AddressKind::SocketAddress(socket_address(&field)?),
            "pipe" => AddressKind::Pipe(pipe(&field)?),
            "envoyInternalAddress" => {
                AddressKind::EnvoyInternalAddress(envoy_internal_address(&field)?)
            }
            _ => return Err(field.unknown()),
        };
        oneof.set(&field, kind)?;
    }
    Ok(Address {
        address: oneof.into_value(),
    })
}

fn socket_address(field: &Field<'_>) -> Result<SocketAddress, ProtojsonError> {
    const NAMES: &[(&str, &str)] = &[
        ("protocol", "protocol"),
        ("address", "address"),
        ("portValue", "port_value"),
        ("namedPort", "named_port"),
        ("resolverName", "resolver_name"),
        ("ipv4Compat", "ipv4_compat"),
        ("networkNamespaceFilepath", "network_namespace_filepath"),
    ];
    let mut socket = SocketAddress::default();
    let mut port = Oneof::new(&field.path);
    for field in message_fields(field.value, &field.path, NAMES)? {
        match field.name {
            "protocol" => socket.protocol = protocol(&field)?,
            "address" => socket.address = string(&field)?,
            "portValue" => port.set(&field, PortSpecifier::PortValue(uint32(&field)?))?,
            "namedPort" => port.set(&field, PortSpecifier::NamedPort(string(&field)?))?,
            "resolverName" => socket.resolver_name = string(&field)?,
            "ipv4Compat" => socket.ipv4_compat = boolean(&field)?,
            "networkNamespaceFilepath" => socket.network_namespace_filepath = string(&field)?,
            _ => return Err(field.unknown()),
        }
    }
    socket.port_specifier = port.into_value();
    Ok(socket)
}

fn pipe(field: &Field<'_>) -> Result<Pipe, ProtojsonError> {
    let mut pipe = Pipe::default();
    for field in message_fields(
        field.value,
        &field.path,
        &[("path", "path"), ("mode", "mode")],
    )? {
        match field.name {
            "path" => pipe.path = string(&field)?,
            "mode" => pipe.mode = uint32(&field)?,
            _ => return Err(field.unknown()),
        }
    }
    Ok(pipe)
}

fn envoy_internal_address(field: &Field<'_>) -> Result<EnvoyInternalAddress, ProtojsonError> {
    const NAMES: &[(&str, &str)] = &[
        ("serverListenerName", "server_listener_name"),
        ("endpointId", "endpoint_id"),
    ];
    let mut internal = EnvoyInternalAddress::default();
    for field in message_fields(field.value, &field.path, NAMES)? {
        match field.name {
            "serverListenerName" => {
                internal.address_name_specifier =
                    Some(AddressNameSpecifier::ServerListenerName(string(&field)?));
            }
            "endpointId" => internal.endpoint_id = string(&field)?,
            _ => return Err(field.unknown()),
        }
    }
    Ok(internal)
}

fn request(field: &Field<'_>) -> Result<Request, ProtojsonError> {
    let mut request = Request::default();
    for field in message_fields(
        field.value,
        &field.path,
        &[("time", "time"), ("http", "http")],
    )? {
        match field.name {
            "time" => {
                let text = string(&field)?;
                let time = parse_timestamp(&text)
                    .map_err(|reason| field.invalid("an RFC 3339 timestamp", reason))?;
                request.time = Some(time);
            }
            "http" => request.http = Some(http_request(&field)?),
            _ => return Err(field.unknown()),
        }
    }
    Ok(request)
}

fn http_request(field: &Field<'_>) -> Result<HttpRequest, ProtojsonError> {
    const NAMES: &[(&str, &str)] = &[
        ("id", "id"),
        ("method", "method"),
        ("headers", "headers"),
        ("headerMap", "header_map"),
        ("path", "path"),
        ("host", "host"),
        ("scheme", "scheme"),
        ("query", "query"),
        ("fragment", "fragment"),
        ("size", "size"),
        ("protocol", "protocol"),
        ("body", "body"),
        ("rawBody", "raw_body"),
    ];
    let mut http = HttpRequest::default();
    for field in message_fields(field.value, &field.path, NAMES)? {
        match field.name {
            "id" => http.id = string(&field)?,
            "method" => http.method = string(&field)?,
            "headers" => http.headers = string_map(&field)?,
            "headerMap" => http.header_map = Some(header_map(&field)?),
            "path" => http.path = string(&field)?,
            "host" => http.host = string(&field)?,
            "scheme" => http.scheme = string(&field)?,
            "query" => http.query = string(&field)?,
            "fragment" => http.fragment = string(&field)?,
            "size" => http.size = int64(&field)?,
            "protocol" => http.protocol = string(&field)?,
            "body" => http.body = string(&field)?,
            "rawBody" => http.raw_body = bytes(&field)?,
            _ => return Err(field.unknown()),
        }
    }
    Ok(http)
}

fn header_map(field: &Field<'_>) -> Result<HeaderMap, ProtojsonError> {
    let mut map = HeaderMap::default();
    for field in message_fields(field.value, &field.path, &[("headers", "headers")])? {
        match field.name {
            "headers" => {
                map.headers = array(&field)?
                    .iter()
                    .map(|item| header_value(item))
                    .collect::<Result<_, _>>()?;
            }
            _ => return Err(field.unknown()),
        }
    }
    Ok(map)
}

fn header_value(field: &Field<'_>) -> Result<HeaderValue, ProtojsonError> {
    const NAMES: &[(&str, &str)] = &[
        ("key", "key"),
        ("value", "value"),
        ("rawValue", "raw_value"),
    ];
    let mut header = HeaderValue::default();
    for field in message_fields(field.value, &field.path, NAMES)? {
        match field.name {
            "key" => header.key = string(&field)?,
            "value" => header.value = string(&field)?,
            "rawValue" => header.raw_value = bytes(&field)?,
            _ => return Err(field.unknown()),
        }
    }
    Ok(header)
}

fn metadata(field: &Field<'_>) -> Result<Metadata, ProtojsonError> {
    const NAMES: &[(&str, &str)] = &[
        ("filterMetadata", "filter_metadata"),
        ("typedFilterMetadata", "typed_filter_metadata"),
    ];
    let mut metadata = Metadata::default();
    for field in message_fields(field.value, &field.path, NAMES)? {
        match field.name {
            "filterMetadata" => {
                for entry in map_entries(&field)? {
                    let fields = proto_struct(&entry.field)?;
                    metadata
                        .filter_metadata
                        .insert(entry.key.to_owned(), fields);
                }
            }
            "typedFilterMetadata" => {
                for entry in map_entries(&field)? {
                    let any = any(&entry.field)?;
                    metadata
                        .typed_filter_metadata
                        .insert(entry.key.to_owned(), any);
                }
            }
            _ => return Err(field.unknown()),
        }
    }
    Ok(metadata)
}

/// Reads an `Any` in the form the encoder writes, `{"@type": url, "value": base64}`.
///
/// protojson would spell out the fields of the packed message instead of `value`, but that needs
/// the message's descriptor, which this reader does not have.
fn any(field: &Field<'_>) -> Result<Any, ProtojsonError> {
    let mut any = Any::default();
    let mut has_type = false;
    for field in message_fields(
        field.value,
        &field.path,
        &[("@type", "@type"), ("value", "value")],
    )? {
        match field.name {
            "@type" => {
                any.type_url = string(&field)?;
                has_type = true;
            }
            "value" => any.value = bytes(&field)?,
            _ => return Err(field.unknown()),
        }
    }
    if !has_type {
        return Err(ProtojsonError::InvalidValue {
            path: field.path.clone(),
            expected: "an Any with an \"@type\" field",
            found: describe(field.value),
        });
    }
    Ok(any)
}

fn tls_session(field: &Field<'_>) -> Result<TlsSession, ProtojsonError> {
    let mut session = TlsSession::default();
    for field in message_fields(field.value, &field.path, &[("sni", "sni")])? {
        match field.name {
            "sni" => session.sni = string(&field)?,
            _ => return Err(field.unknown()),
        }
    }
    Ok(session)
}

/// Reads a `google.protobuf.Struct` from the JSON object it stands for.
fn proto_struct(field: &Field<'_>) -> Result<Struct, ProtojsonError> {
    let mut fields = HashMap::new();
    for entry in map_entries(field)? {
        fields.insert(entry.key.to_owned(), proto_value(&entry.field)?);
    }
    Ok(Struct { fields })
}

/// Reads a `google.protobuf.Value` from any JSON value. Here `null` is a value of its own.
fn proto_value(field: &Field<'_>) -> Result<ProtoValue, ProtojsonError> {
    let kind = match field.value {
        Json::Null => Kind::NullValue(NullValue::NullValue as i32),
        Json::Bool(flag) => Kind::BoolValue(*flag),
        Json::Number(number) => match number.as_f64() {
            Some(number) => Kind::NumberValue(number),
            None => return Err(field.invalid("a number that fits a double", number.to_string())),
        },
        Json::String(text) => Kind::StringValue(text.clone()),
        Json::Array(_) => {
            let values = array(field)?
                .iter()
                .map(|item| proto_value(item))
                .collect::<Result<_, _>>()?;
            Kind::ListValue(ListValue { values })
        }
        Json::Object(_) => Kind::StructValue(proto_struct(field)?),
    };
    Ok(ProtoValue { kind: Some(kind) })
}

/// One JSON member standing for a protobuf field, with its canonical (lowerCamelCase) name and
/// the JSON path used in error messages.
struct Field<'a> {
    name: &'static str,
    value: &'a Json,
    path: String,
}

impl Field<'_> {
    fn unknown(&self) -> ProtojsonError {
        ProtojsonError::UnknownField {
            path: self.path.clone(),
        }
    }

    fn invalid(&self, expected: &'static str, found: String) -> ProtojsonError {
        ProtojsonError::InvalidValue {
            path: self.path.clone(),
            expected,
            found,
        }
    }

    fn wrong_type(&self, expected: &'static str) -> ProtojsonError {
        self.invalid(expected, describe(self.value))
    }
}

/// Matches the members of the JSON object `value` against a message's fields, given as
/// `(json_name, proto_name)` pairs. Members set to `null` are dropped, as protojson treats them as
/// unset.
fn message_fields<'a>(
    value: &'a Json,
    path: &str,
    names: &[(&'static str, &'static str)],
) -> Result<Vec<Field<'a>>, ProtojsonError> {
    let Json::Object(members) = value else {
        return Err(ProtojsonError::InvalidValue {
            path: display_path(path),
            expected: "an object",
            found: describe(value),
        });
    };

    let mut seen: Vec<(&'static str, &'a str)> = Vec::with_capacity(members.len());
    let mut fields = Vec::with_capacity(members.len());
    for (key, member) in members {
        let child_path = join_path(path, key);
        let Some(&(name, _)) = names
            .iter()
            .find(|(json_name, proto_name)| key == json_name || key == proto_name)
        else {
            return Err(ProtojsonError::UnknownField { path: child_path });
        };
        if let Some((_, first)) = seen.iter().find(|(seen_name, _)| *seen_name == name) {
            return Err(ProtojsonError::DuplicateField {
                path: display_path(path),
                first: (*first).to_owned(),
                second: key.clone(),
            });
        }
        seen.push((name, key.as_str()));

        if !member.is_null() {
            fields.push(Field {
                name,
                value: member,
                path: child_path,
            });
        }
    }
    Ok(fields)
}

/// A protobuf oneof being read: records which member was set and rejects a second one.
struct Oneof<'p, T> {
    path: &'p str,
    value: Option<(T, &'static str)>,
}

impl<'p, T> Oneof<'p, T> {
    fn new(path: &'p str) -> Self {
        Self { path, value: None }
    }

    fn set(&mut self, field: &Field<'_>, value: T) -> Result<(), ProtojsonError> {
        if let Some((_, first)) = &self.value {
            return Err(ProtojsonError::OneofConflict {
                path: display_path(self.path),
                first: (*first).to_owned(),
                second: field.name.to_owned(),
            });
        }
        self.value = Some((value, field.name));
        Ok(())
    }

    fn into_value(self) -> Option<T> {
        self.value.map(|(value, _)| value)
    }
}

/// One entry of a JSON object standing for a protobuf map.
struct MapEntry<'a> {
    key: &'a str,
    field: Field<'a>,
}

fn map_entries<'a>(field: &Field<'a>) -> Result<Vec<MapEntry<'a>>, ProtojsonError> {
    let Json::Object(members) = field.value else {
        return Err(field.wrong_type("an object"));
    };
    Ok(members
        .iter()
        .map(|(key, value)| MapEntry {
            key,
            field: Field {
                name: field.name,
                value,
                path: format!("{}[{key:?}]", field.path),
            },
        })
        .collect())
}

fn array<'a>(field: &Field<'a>) -> Result<Vec<Field<'a>>, ProtojsonError> {
    let Json::Array(items) = field.value else {
        return Err(field.wrong_type("an array"));
    };
    Ok(items
        .iter()
        .enumerate()
        .map(|(index, value)| Field {
            name: field.name,
            value,
            path: format!("{}[{index}]", field.path),
        })
        .collect())
}

fn string(field: &Field<'_>) -> Result<String, ProtojsonError> {
    match field.value {
        Json::String(text) => Ok(text.clone()),
        _ => Err(field.wrong_type("a string")),
    }
}

fn boolean(field: &Field<'_>) -> Result<bool, ProtojsonError> {
    match field.value {
        Json::Bool(flag) => Ok(*flag),
        _ => Err(field.wrong_type("a boolean")),
    }
}

fn string_map(field: &Field<'_>) -> Result<HashMap<String, String>, ProtojsonError> {
    map_entries(field)?
        .into_iter()
        .map(|entry| Ok((entry.key.to_owned(), string(&entry.field)?)))
        .collect()
}

fn int64(field: &Field<'_>) -> Result<i64, ProtojsonError> {
    integer(field)
        .and_then(|value| i64::try_from(value).ok())
        .ok_or_else(|| field.wrong_type("a 64-bit integer, as a number or a decimal string"))
}

fn uint32(field: &Field<'_>) -> Result<u32, ProtojsonError> {
    integer(field)
        .and_then(|value| u32::try_from(value).ok())
        .ok_or_else(|| field.wrong_type("an unsigned 32-bit integer"))
}

/// Reads an integer given as a JSON number (an integral one, exponent allowed) or as a string of
/// decimal digits, as protojson accepts for every integer type.
fn integer(field: &Field<'_>) -> Option<i128> {
    match field.value {
        Json::Number(number) => {
            if let Some(value) = number.as_i64() {
                return Some(i128::from(value));
            }
            if let Some(value) = number.as_u64() {
                return Some(i128::from(value));
            }
            integral_f64(number.as_f64()?)
        }
        Json::String(text) => text.parse::<i128>().ok(),
        _ => None,
    }
}

fn integral_f64(value: f64) -> Option<i128> {
    // 2^64 bounds every integer type protobuf has, and an f64 below it converts exactly.
    const LIMIT: f64 = 18_446_744_073_709_551_616.0;
    if value.fract() != 0.0 || value.abs() >= LIMIT {
        return None;
    }
    Some(value as i128)
}

fn protocol(field: &Field<'_>) -> Result<i32, ProtojsonError> {
    if let Json::String(name) = field.value {
        return Protocol::from_str_name(name)
            .map(|protocol| protocol as i32)
            .ok_or_else(|| field.wrong_type("\"TCP\" or \"UDP\""));
    }
    integer(field)
        .and_then(|value| i32::try_from(value).ok())
        .ok_or_else(|| field.wrong_type("\"TCP\" or \"UDP\""))
}

fn bytes(field: &Field<'_>) -> Result<Vec<u8>, ProtojsonError> {
    const CONFIG: GeneralPurposeConfig =
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
    const STANDARD: GeneralPurpose = GeneralPurpose::new(&alphabet::STANDARD, CONFIG);
    const URL_SAFE: GeneralPurpose = GeneralPurpose::new(&alphabet::URL_SAFE, CONFIG);

    let text = string(field)?;
    let engine = if text.contains(['-', '_']) {
        &URL_SAFE
    } else {
        &STANDARD
    };
    engine.decode(&text).map_err(|error| {
        field.invalid(
            "base64 bytes",
            format!("{} ({error})", describe(field.value)),
        )
    })
}

fn join_path(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

fn display_path(path: &str) -> String {
    if path.is_empty() {
        "(top level)".to_owned()
    } else {
        path.to_owned()
    }
}

/// Describes a JSON value for an error message, cutting long strings.
fn describe(value: &Json) -> String {
    const MAX_CHARS: usize = 40;
    match value {
        Json::Null => "null".to_owned(),
        Json::Bool(flag) => flag.to_string(),
        Json::Number(number) => number.to_string(),
        Json::String(text) if text.chars().count() > MAX_CHARS => {
            let start: String = text.chars().take(MAX_CHARS).collect();
            format!("{start:?}...")
        }
        Json::String(text) => format!("{text:?}"),
        Json::Array(_) => "an array".to_owned(),
        Json::Object(_) => "an object".to_owned(),
    }
}
