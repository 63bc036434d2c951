//! Protobuf JSON (protojson) encoding of the ext_authz attribute context, and its reverse.
//!
//! The encoder produces what Go's `protojson.Marshal` produces with default options, the encoding
//! that the OPA Envoy plugin hands to policies. Names are lowerCamelCase and fields with zero
//! values are left out, except members of a oneof. 64-bit integers are strings, enums are names,
//! bytes are standard base64 and timestamps are RFC 3339. The encoder builds a `regorus::Value`
//! directly, because going through JSON text would add a JSON parse to every check.

mod decode;
mod timestamp;

#[cfg(test)]
mod tests;

use std::collections::HashMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64_STANDARD;
use envoy_types::pb::envoy::config::core::v3::address::Address as AddressKind;
use envoy_types::pb::envoy::config::core::v3::envoy_internal_address::AddressNameSpecifier;
use envoy_types::pb::envoy::config::core::v3::socket_address::{PortSpecifier, Protocol};
use envoy_types::pb::envoy::config::core::v3::{
    Address, EnvoyInternalAddress, HeaderMap, HeaderValue, Metadata, Pipe, SocketAddress,
};
use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{
    HttpRequest, Peer, Request, TlsSession,
};
use envoy_types::pb::google::protobuf::value::Kind;
use envoy_types::pb::google::protobuf::{Any, ListValue, Struct, Value as ProtoValue};
use regorus::Value;
use regorus::value::Object;

pub use decode::{ProtojsonError, check_request_from_json};

/// Returns a `&'static Value` string for a literal object key, made once per call site, so
/// building a document clones a shared string for each key instead of allocating one.
macro_rules! key {
    ($name:literal) => {{
        static KEY: std::sync::LazyLock<regorus::Value> =
            std::sync::LazyLock::new(|| regorus::Value::from($name));
        &*KEY
    }};
}
pub(crate) use key;
pub(crate) use timestamp::format_timestamp;

/// Encodes `ctx` as Go's `protojson.Marshal` would, as a policy value.
///
/// Two cases have no protojson encoding, because Go's encoder fails on them: a timestamp outside
/// years 1 to 9999, and a `google.protobuf.Value` that is NaN, infinite or has no kind. The first
/// is left out and the second becomes `null`. An `Any` in `typedFilterMetadata` is encoded as
/// `{"@type": type_url, "value": base64 of the message}`. protojson would write the fields of the
/// packed message instead, but that needs the message's schema, which is not known here.
pub fn attribute_context_to_value(ctx: &AttributeContext) -> Value {
    encode_attribute_context(ctx, None)
}

/// Encodes `ctx` like [`attribute_context_to_value`], replacing `request.http.headers` with
/// `http_headers` when it is given.
pub(crate) fn encode_attribute_context(
    ctx: &AttributeContext,
    http_headers: Option<Value>,
) -> Value {
    let mut object = ObjectBuilder::new();
    object.message(key!("source"), ctx.source.as_ref().map(encode_peer));
    object.message(
        key!("destination"),
        ctx.destination.as_ref().map(encode_peer),
    );
    object.message(
        key!("request"),
        ctx.request
            .as_ref()
            .map(|request| encode_request(request, http_headers)),
    );
    object.string_map(key!("contextExtensions"), &ctx.context_extensions);
    object.message(
        key!("metadataContext"),
        ctx.metadata_context.as_ref().map(encode_metadata),
    );
    object.message(
        key!("routeMetadataContext"),
        ctx.route_metadata_context.as_ref().map(encode_metadata),
    );
    object.message(
        key!("tlsSession"),
        ctx.tls_session.as_ref().map(encode_tls_session),
    );
    object.finish()
}

fn encode_peer(peer: &Peer) -> Value {
    let mut object = ObjectBuilder::new();
    object.message(key!("address"), peer.address.as_ref().map(encode_address));
    object.string(key!("service"), &peer.service);
    object.string_map(key!("labels"), &peer.labels);
    object.string(key!("principal"), &peer.principal);
    object.string(key!("certificate"), &peer.certificate);
    object.finish()
}

fn encode_address(address: &Address) -> Value {
    let mut object = ObjectBuilder::new();
    match &address.address {
        Some(AddressKind::SocketAddress(socket)) => {
            object.insert(key!("socketAddress"), encode_socket_address(socket));
        }
        Some(AddressKind::Pipe(pipe)) => object.insert(key!("pipe"), encode_pipe(pipe)),
        Some(AddressKind::EnvoyInternalAddress(internal)) => {
            object.insert(
                key!("envoyInternalAddress"),
                encode_envoy_internal_address(internal),
            );
        }
        None => {}
    }
    object.finish()
}

fn encode_socket_address(socket: &SocketAddress) -> Value {
    let mut object = ObjectBuilder::new();
    if socket.protocol != 0 {
        // protojson writes an enum number that has no name as the number itself.
        let protocol = match Protocol::try_from(socket.protocol) {
            Ok(protocol) => Value::from(protocol.as_str_name()),
            Err(_) => Value::from(socket.protocol),
        };
        object.insert(key!("protocol"), protocol);
    }
    object.string(key!("address"), &socket.address);
    // Members of a oneof have presence, so protojson writes them even when they are zero.
    match &socket.port_specifier {
        Some(PortSpecifier::PortValue(port)) => {
            object.insert(key!("portValue"), Value::from(*port))
        }
        Some(PortSpecifier::NamedPort(name)) => {
            object.insert(key!("namedPort"), Value::from(name.as_str()))
        }
        None => {}
    }
    object.string(key!("resolverName"), &socket.resolver_name);
    object.bool(key!("ipv4Compat"), socket.ipv4_compat);
    object.string(
        key!("networkNamespaceFilepath"),
        &socket.network_namespace_filepath,
    );
    object.finish()
}

fn encode_pipe(pipe: &Pipe) -> Value {
    let mut object = ObjectBuilder::new();
    object.string(key!("path"), &pipe.path);
    object.uint32(key!("mode"), pipe.mode);
    object.finish()
}

fn encode_envoy_internal_address(internal: &EnvoyInternalAddress) -> Value {
    let mut object = ObjectBuilder::new();
    match &internal.address_name_specifier {
        Some(AddressNameSpecifier::ServerListenerName(name)) => {
            object.insert(key!("serverListenerName"), Value::from(name.as_str()));
        }
        None => {}
    }
    object.string(key!("endpointId"), &internal.endpoint_id);
    object.finish()
}

fn encode_request(request: &Request, http_headers: Option<Value>) -> Value {
    let mut object = ObjectBuilder::new();
    if let Some(time) = &request.time
        && let Some(text) = format_timestamp(time)
    {
        object.insert(key!("time"), Value::from(text));
    }
    object.message(
        key!("http"),
        request
            .http
            .as_ref()
            .map(|http| encode_http_request(http, http_headers)),
    );
    object.finish()
}

fn encode_http_request(http: &HttpRequest, http_headers: Option<Value>) -> Value {
    let mut object = ObjectBuilder::new();
    object.string(key!("id"), &http.id);
    object.string(key!("method"), &http.method);
    match http_headers {
        Some(headers) => object.insert(key!("headers"), headers),
        None => object.string_map(key!("headers"), &http.headers),
    }
    object.message(
        key!("headerMap"),
        http.header_map.as_ref().map(encode_header_map),
    );
    object.string(key!("path"), &http.path);
    object.string(key!("host"), &http.host);
    object.string(key!("scheme"), &http.scheme);
    object.string(key!("query"), &http.query);
    object.string(key!("fragment"), &http.fragment);
    object.int64(key!("size"), http.size);
    object.string(key!("protocol"), &http.protocol);
    object.string(key!("body"), &http.body);
    object.bytes(key!("rawBody"), &http.raw_body);
    object.finish()
}

fn encode_header_map(header_map: &HeaderMap) -> Value {
    let mut object = ObjectBuilder::new();
    if !header_map.headers.is_empty() {
        let headers: Vec<Value> = header_map.headers.iter().map(encode_header_value).collect();
        object.insert(key!("headers"), Value::from(headers));
    }
    object.finish()
}

fn encode_header_value(header: &HeaderValue) -> Value {
    let mut object = ObjectBuilder::new();
    object.string(key!("key"), &header.key);
    object.string(key!("value"), &header.value);
    object.bytes(key!("rawValue"), &header.raw_value);
    object.finish()
}

fn encode_metadata(metadata: &Metadata) -> Value {
    let mut object = ObjectBuilder::new();
    if !metadata.filter_metadata.is_empty() {
        let mut filters = Object::new();
        for (name, fields) in &metadata.filter_metadata {
            filters.insert(Value::from(name.as_str()), encode_struct(fields));
        }
        object.insert(key!("filterMetadata"), filters.into_value());
    }
    if !metadata.typed_filter_metadata.is_empty() {
        let mut filters = Object::new();
        for (name, any) in &metadata.typed_filter_metadata {
            filters.insert(Value::from(name.as_str()), encode_any(any));
        }
        object.insert(key!("typedFilterMetadata"), filters.into_value());
    }
    object.finish()
}

fn encode_tls_session(session: &TlsSession) -> Value {
    let mut object = ObjectBuilder::new();
    object.string(key!("sni"), &session.sni);
    object.finish()
}

/// Encodes a `google.protobuf.Struct` as the JSON object it stands for.
pub(crate) fn encode_struct(fields: &Struct) -> Value {
    let mut object = Object::new();
    for (name, value) in &fields.fields {
        object.insert(Value::from(name.as_str()), encode_proto_value(value));
    }
    object.into_value()
}

fn encode_proto_value(value: &ProtoValue) -> Value {
    match &value.kind {
        Some(Kind::NumberValue(number)) if number.is_finite() => Value::from(*number),
        Some(Kind::StringValue(text)) => Value::from(text.as_str()),
        Some(Kind::BoolValue(flag)) => Value::from(*flag),
        Some(Kind::StructValue(fields)) => encode_struct(fields),
        Some(Kind::ListValue(list)) => encode_list(list),
        // NaN, infinities and a missing kind have no JSON form; protojson fails on them.
        Some(Kind::NumberValue(_)) | Some(Kind::NullValue(_)) | None => Value::Null,
    }
}

fn encode_list(list: &ListValue) -> Value {
    Value::from(
        list.values
            .iter()
            .map(encode_proto_value)
            .collect::<Vec<_>>(),
    )
}

fn encode_any(any: &Any) -> Value {
    let mut object = ObjectBuilder::new();
    object.insert(key!("@type"), Value::from(any.type_url.as_str()));
    object.bytes(key!("value"), &any.value);
    object.finish()
}

/// A JSON object under construction that leaves out fields holding their zero value, as protojson
/// does for proto3 fields without presence.
struct ObjectBuilder {
    object: Object,
}

impl ObjectBuilder {
    fn new() -> Self {
        Self {
            object: Object::new(),
        }
    }

    fn insert(&mut self, name: &Value, value: Value) {
        self.object.insert(name.clone(), value);
    }

    fn string(&mut self, name: &Value, value: &str) {
        if !value.is_empty() {
            self.insert(name, Value::from(value));
        }
    }

    fn bool(&mut self, name: &Value, value: bool) {
        if value {
            self.insert(name, Value::from(true));
        }
    }

    fn uint32(&mut self, name: &Value, value: u32) {
        if value != 0 {
            self.insert(name, Value::from(value));
        }
    }

    /// Writes a 64-bit integer as a decimal string, as protojson does so that JavaScript readers
    /// keep every digit.
    fn int64(&mut self, name: &Value, value: i64) {
        if value != 0 {
            self.insert(name, Value::from(value.to_string()));
        }
    }

    fn bytes(&mut self, name: &Value, value: &[u8]) {
        if !value.is_empty() {
            self.insert(name, Value::from(BASE64_STANDARD.encode(value)));
        }
    }

    /// Writes a message field. A message that is present is written even when all its fields are
    /// zero, because message fields have presence.
    fn message(&mut self, name: &Value, value: Option<Value>) {
        if let Some(value) = value {
            self.insert(name, value);
        }
    }

    fn string_map(&mut self, name: &Value, map: &HashMap<String, String>) {
        if map.is_empty() {
            return;
        }
        let mut object = Object::new();
        for (key, value) in map {
            object.insert(Value::from(key.as_str()), Value::from(value.as_str()));
        }
        self.insert(name, object.into_value());
    }

    fn finish(self) -> Value {
        self.object.into_value()
    }
}
