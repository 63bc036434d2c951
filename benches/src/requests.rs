//! The request mix: ext_authz CheckRequests read from protojson files, the OPA input
//! documents that `portcullis check` builds from the same files, and the HTTP requests that
//! the through-Envoy scenarios send in their place.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use envoy_types::pb::envoy::service::auth::v3::CheckRequest;
use portcullis_authz::protojson::check_request_from_json;
use serde_json::Value;

/// A request file that cannot be used in the mix.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("cannot read request folder {path}: {source}")]
    Folder {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("request folder {path} contains no .json files")]
    Empty { path: PathBuf },

    #[error("cannot read request file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("request file {path} is not valid JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },

    #[error("request file {path} is not a CheckRequest: {source}")]
    Protojson {
        path: PathBuf,
        source: portcullis_authz::protojson::ProtojsonError,
    },
}

/// One request of the mix, under the name of its file.
#[derive(Debug, Clone)]
pub struct MixEntry {
    pub name: String,
    pub path: PathBuf,
    pub request: CheckRequest,
}

/// Reads every `.json` file of `folder` as a protojson CheckRequest, sorted by file name so
/// that every run sends the mix in the same order.
pub fn read_mix(folder: &Path) -> Result<Vec<MixEntry>, RequestError> {
    let entries = std::fs::read_dir(folder).map_err(|source| RequestError::Folder {
        path: folder.to_path_buf(),
        source,
    })?;
    let mut paths = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| RequestError::Folder {
            path: folder.to_path_buf(),
            source,
        })?;
        let path = entry.path();
        if path
            .extension()
            .is_some_and(|extension| extension == "json")
        {
            paths.push(path);
        }
    }
    if paths.is_empty() {
        return Err(RequestError::Empty {
            path: folder.to_path_buf(),
        });
    }
    paths.sort();

    paths.into_iter().map(|path| read_entry(&path)).collect()
}

fn read_entry(path: &Path) -> Result<MixEntry, RequestError> {
    let text = std::fs::read_to_string(path).map_err(|source| RequestError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let json: Value = serde_json::from_str(&text).map_err(|source| RequestError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    let request = check_request_from_json(&json).map_err(|source| RequestError::Protojson {
        path: path.to_path_buf(),
        source,
    })?;
    let name = path
        .file_stem()
        .map(|stem| stem.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(MixEntry {
        name,
        path: path.to_path_buf(),
        request,
    })
}

/// An HTTP request rebuilt from a CheckRequest of the mix, to send through Envoy.
#[derive(Debug, Clone)]
pub struct HttpMixRequest {
    pub method: http::Method,
    /// Path with the query, as the client sent it.
    pub path: String,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

/// Headers that the HTTP client derives from the request itself, so they are not copied from
/// the CheckRequest: a copied `content-length` could disagree with the body sent.
const DERIVED_HEADERS: [&str; 3] = ["content-length", "transfer-encoding", "connection"];

/// Rebuilds the HTTP request that a CheckRequest describes: its method, path, headers and body.
/// The `:authority` pseudo-header becomes `host`, other pseudo-headers are dropped, and the body
/// is `raw_body`, else `body`.
///
/// NOTE: only the `headers` map is read, not `header_map`, because the mix does not use it.
pub fn http_request_from_check(request: &CheckRequest) -> Result<HttpMixRequest, String> {
    let http = request
        .attributes
        .as_ref()
        .and_then(|attributes| attributes.request.as_ref())
        .and_then(|request| request.http.as_ref())
        .ok_or("the CheckRequest has no attributes.request.http")?;
    let method = http::Method::from_bytes(http.method.as_bytes())
        .map_err(|_| format!("invalid HTTP method {:?}", http.method))?;
    if !http.path.starts_with('/') {
        return Err(format!("path {:?} does not start with /", http.path));
    }
    // A valid path and query keeps the URI that `Target::http` builds from it valid too.
    if http.path.parse::<http::uri::PathAndQuery>().is_err() {
        return Err(format!(
            "invalid path {:?}: expected a path and query as sent on the wire, with spaces and other reserved bytes percent-encoded",
            http.path
        ));
    }

    let mut names: Vec<&String> = http.headers.keys().collect();
    names.sort();
    let mut headers = http::HeaderMap::new();
    for name in names {
        let value = &http.headers[name];
        let name = match name.as_str() {
            ":authority" => "host",
            pseudo if pseudo.starts_with(':') => continue,
            derived if DERIVED_HEADERS.contains(&derived) => continue,
            other => other,
        };
        let header_name = http::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("invalid header name {name:?}"))?;
        let header_value = http::HeaderValue::from_str(value)
            .map_err(|_| format!("invalid value of header {name}"))?;
        headers.insert(header_name, header_value);
    }
    if !headers.contains_key(http::header::HOST) && !http.host.is_empty() {
        let host = http::HeaderValue::from_str(&http.host)
            .map_err(|_| format!("invalid host {:?}", http.host))?;
        headers.insert(http::header::HOST, host);
    }

    let body = if http.raw_body.is_empty() {
        Bytes::from(http.body.clone())
    } else {
        Bytes::from(http.raw_body.clone())
    };
    Ok(HttpMixRequest {
        method,
        path: http.path.clone(),
        headers,
        body,
    })
}

/// Wraps the input document of a `portcullis check` result as the body of a request to
/// OPA's Data API, `{"input": ...}`. Returns `None` when the result has no `input`.
pub fn opa_request_body(check_output: &Value) -> Option<Vec<u8>> {
    let input = check_output.get("input")?;
    let body = serde_json::json!({ "input": input });
    serde_json::to_vec(&body).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opa_body_wraps_check_input() {
        let output = serde_json::json!({"input": {"parsed_path": ["public"]}, "decision": {"allowed": true}});

        let body = opa_request_body(&output).unwrap();

        assert_eq!(
            String::from_utf8(body).unwrap(),
            r#"{"input":{"parsed_path":["public"]}}"#
        );
    }

    fn check_request(json: serde_json::Value) -> CheckRequest {
        check_request_from_json(&json).unwrap()
    }

    #[test]
    fn http_request_rebuilt_from_check() {
        let request = check_request(serde_json::json!({"attributes": {"request": {"http": {
            "method": "POST",
            "path": "/api/orders?dry=1",
            "headers": {
                ":authority": "shop.example.com",
                ":method": "POST",
                ":path": "/api/orders?dry=1",
                "content-type": "application/json",
                "content-length": "99",
                "x-role": "admin"
            },
            "body": "{\"quantity\": 3}"
        }}}}));

        let http = http_request_from_check(&request).unwrap();

        assert_eq!(http.method, http::Method::POST);
        assert_eq!(http.path, "/api/orders?dry=1");
        assert_eq!(http.headers.len(), 3);
        assert_eq!(http.headers["host"], "shop.example.com");
        assert_eq!(http.headers["content-type"], "application/json");
        assert_eq!(http.headers["x-role"], "admin");
        assert_eq!(http.body, Bytes::from_static(b"{\"quantity\": 3}"));
    }

    #[test]
    fn http_request_takes_host_field_without_authority() {
        let request = check_request(serde_json::json!({"attributes": {"request": {"http": {
            "method": "GET",
            "path": "/",
            "host": "api.example.com"
        }}}}));

        let http = http_request_from_check(&request).unwrap();

        assert_eq!(http.headers["host"], "api.example.com");
        assert!(http.body.is_empty());
    }

    #[test]
    fn http_request_rejects_relative_path() {
        let request = check_request(serde_json::json!({"attributes": {"request": {"http": {
            "method": "GET",
            "path": "admin"
        }}}}));

        let error = http_request_from_check(&request).unwrap_err();

        assert_eq!(error, r#"path "admin" does not start with /"#);
    }

    #[test]
    fn http_request_rejects_unencoded_space() {
        let request = check_request(serde_json::json!({"attributes": {"request": {"http": {
            "method": "GET",
            "path": "/admin settings"
        }}}}));

        let error = http_request_from_check(&request).unwrap_err();

        assert!(
            error.starts_with(r#"invalid path "/admin settings""#),
            "{error}"
        );
    }

    #[test]
    fn http_request_needs_http_attributes() {
        let error = http_request_from_check(&CheckRequest::default()).unwrap_err();

        assert_eq!(error, "the CheckRequest has no attributes.request.http");
    }

    #[test]
    fn opa_body_missing_without_input() {
        let output = serde_json::json!({"decision": {"allowed": true}});

        assert!(opa_request_body(&output).is_none());
    }

    #[test]
    fn mix_reads_files_in_name_order() {
        let folder = tempfile::tempdir().unwrap();
        std::fs::write(
            folder.path().join("b.json"),
            r#"{"attributes": {"request": {"http": {"method": "POST"}}}}"#,
        )
        .unwrap();
        std::fs::write(
            folder.path().join("a.json"),
            r#"{"attributes": {"request": {"http": {"method": "GET"}}}}"#,
        )
        .unwrap();
        std::fs::write(folder.path().join("notes.txt"), "not a request").unwrap();

        let mix = read_mix(folder.path()).unwrap();

        let names: Vec<&str> = mix.iter().map(|entry| entry.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        let method = &mix[0]
            .request
            .attributes
            .as_ref()
            .unwrap()
            .request
            .as_ref()
            .unwrap()
            .http
            .as_ref()
            .unwrap()
            .method;
        assert_eq!(method, "GET");
    }

    #[test]
    fn mix_rejects_unknown_field() {
        let folder = tempfile::tempdir().unwrap();
        std::fs::write(
            folder.path().join("bad.json"),
            r#"{"attributes": {"requets": {}}}"#,
        )
        .unwrap();

        let error = read_mix(folder.path()).unwrap_err();

        assert!(matches!(error, RequestError::Protojson { .. }), "{error}");
        assert!(
            error
                .to_string()
                .contains("attributes.requets: unknown field"),
            "{error}"
        );
    }

    #[test]
    fn mix_rejects_empty_folder() {
        let folder = tempfile::tempdir().unwrap();

        let error = read_mix(folder.path()).unwrap_err();

        assert!(matches!(error, RequestError::Empty { .. }), "{error}");
    }
}
