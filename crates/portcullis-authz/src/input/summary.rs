//! The few request facts that decision logs and audit events record.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::core::v3::Address;
use envoy_types::pb::envoy::config::core::v3::address::Address as AddressKind;
use envoy_types::pb::envoy::config::core::v3::envoy_internal_address::AddressNameSpecifier;
use envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier;
use envoy_types::pb::envoy::service::auth::v3::CheckRequest;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::Peer;
use serde::Serialize;

use super::headers::header;
use super::path::split_target;

/// Trace context headers copied into every summary, so an event can be joined with the
/// request's trace: W3C Trace Context and the Zipkin B3 headers that Envoy and Istio propagate.
const TRACE_HEADERS: [&str; 6] = ["traceparent", "tracestate", "b3", "x-b3-traceid", "x-b3-spanid", "x-b3-sampled"];

/// Identifying facts of one checked request. A field is empty when the request does not carry it,
/// and empty fields are left out when serialized.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RequestSummary {
    /// The `x-request-id` header: the id Envoy also sends upstream and writes to its access
    /// log, so an event can be joined with both.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub request_id: String,
    /// `http.id`, Envoy's own id of the HTTP stream.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub stream_id: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub method: String,
    /// `http.host`, the `:authority` or `host` of the request.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub authority: String,
    /// `http.path` without its query and fragment, still percent-encoded.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub path: String,
    /// Downstream peer address, such as `10.0.0.7:51324` or `[::1]:8080`.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub source_address: String,
    /// Downstream peer identity, such as a SPIFFE ID from its client certificate.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub source_principal: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub destination_address: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub destination_principal: String,
    /// HTTP version, such as `HTTP/1.1` or `HTTP/2`.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub protocol: String,
    /// Trace context headers present on the request, by lowercase name.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub trace: BTreeMap<String, String>,
}

impl RequestSummary {
    /// Collects the summary of `request`. It works on any request, including one whose input
    /// cannot be built.
    pub fn from_request(request: &CheckRequest) -> RequestSummary {
        let attributes = request.attributes.as_ref();
        let source = attributes.and_then(|attributes| attributes.source.as_ref());
        let destination = attributes.and_then(|attributes| attributes.destination.as_ref());
        let http = attributes
            .and_then(|attributes| attributes.request.as_ref())
            .and_then(|request| request.http.as_ref());

        let mut summary = RequestSummary {
            source_address: source.map(peer_address).unwrap_or_default(),
            source_principal: source
                .map(|peer| peer.principal.clone())
                .unwrap_or_default(),
            destination_address: destination.map(peer_address).unwrap_or_default(),
            destination_principal: destination
                .map(|peer| peer.principal.clone())
                .unwrap_or_default(),
            ..RequestSummary::default()
        };
        let Some(http) = http else {
            return summary;
        };

        summary.request_id = header(http, "x-request-id")
            .map(String::from)
            .unwrap_or_default();
        summary.stream_id = http.id.clone();
        summary.method = http.method.clone();
        summary.authority = http.host.clone();
        summary.path = split_target(&http.path).0.to_owned();
        summary.protocol = http.protocol.clone();
        summary.trace = selected_headers(request, &TRACE_HEADERS);
        summary
    }
}

/// Collects the request headers named in `names` (lowercase) that the request carries; repeated
/// headers are joined with commas as Envoy joins them.
pub fn selected_headers<S: AsRef<str>>(request: &CheckRequest, names: &[S]) -> BTreeMap<String, String> {
    let http = request
        .attributes
        .as_ref()
        .and_then(|attributes| attributes.request.as_ref())
        .and_then(|request| request.http.as_ref());
    let Some(http) = http else {
        return BTreeMap::new();
    };
    names
        .iter()
        .filter_map(|name| {
            let name = name.as_ref();
            header(http, name).map(|value| (name.to_owned(), value.into_owned()))
        })
        .collect()
}

fn peer_address(peer: &Peer) -> String {
    peer.address
        .as_ref()
        .map(format_address)
        .unwrap_or_default()
}

/// Formats an Envoy address as `host:port` with IPv6 hosts in brackets, as the path of a pipe, or
/// as `envoy://listener/endpoint` for an internal address.
fn format_address(address: &Address) -> String {
    let Some(kind) = address.address.as_ref() else {
        return String::new();
    };
    match kind {
        AddressKind::SocketAddress(socket) => {
            let host = if socket.address.contains(':') {
                format!("[{}]", socket.address)
            } else {
                socket.address.clone()
            };
            match &socket.port_specifier {
                Some(PortSpecifier::PortValue(port)) => format!("{host}:{port}"),
                Some(PortSpecifier::NamedPort(name)) => format!("{host}:{name}"),
                None => host,
            }
        }
        AddressKind::Pipe(pipe) => pipe.path.clone(),
        AddressKind::EnvoyInternalAddress(internal) => {
            let listener = match &internal.address_name_specifier {
                Some(AddressNameSpecifier::ServerListenerName(name)) => name.as_str(),
                None => "",
            };
            format!("envoy://{listener}/{}", internal.endpoint_id)
        }
    }
}
