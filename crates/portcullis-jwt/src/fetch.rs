//! HTTP retrieval of JWKS and OpenID Connect discovery documents, with size, time and transport
//! limits.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use reqwest::Url;
use reqwest::header::{CACHE_CONTROL, HeaderMap};
use serde_json::Value;

use crate::config::HttpClientConfig;

/// Path of the discovery document under the issuer (OpenID Connect Discovery 1.0, section 4).
const DISCOVERY_PATH: &str = "/.well-known/openid-configuration";

/// Errors of one fetch. The last good keys stay in use while these happen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    /// The URL does not parse.
    #[error("invalid URL {url:?}: {reason}")]
    InvalidUrl {
        /// The rejected URL.
        url: String,
        /// Description of the problem.
        reason: String,
    },
    /// The URL is not HTTPS, and not a loopback HTTP URL allowed by configuration.
    #[error(
        "URL {url} must use https (plain http is allowed only for loopback hosts with allow_http_loopback)"
    )]
    InsecureUrl {
        /// The rejected URL.
        url: String,
    },
    /// Connecting, sending or reading failed.
    #[error("request to {url} failed: {reason}")]
    Request {
        /// The requested URL.
        url: String,
        /// The client's error text.
        reason: String,
    },
    /// No complete response within the fetch timeout.
    #[error("request to {url} timed out after {timeout:?}")]
    TimedOut {
        /// The requested URL.
        url: String,
        /// The configured limit.
        timeout: Duration,
    },
    /// The server returned a status other than 2xx.
    #[error("{url} returned HTTP status {status}")]
    Status {
        /// The requested URL.
        url: String,
        /// The status code.
        status: u16,
    },
    /// The body exceeds the configured maximum.
    #[error("response from {url} exceeds {limit} bytes")]
    TooLarge {
        /// The requested URL.
        url: String,
        /// The configured limit in bytes.
        limit: usize,
    },
    /// The discovery document is unusable.
    #[error("discovery document at {url} is invalid: {reason}")]
    Discovery {
        /// The requested URL.
        url: String,
        /// Description of the problem.
        reason: String,
    },
    /// The JWKS document is unusable.
    #[error("JWKS at {url} is invalid: {source}")]
    Jwks {
        /// The requested URL.
        url: String,
        /// Description of the problem.
        source: crate::jwks::JwksError,
    },
}

/// Errors of building the HTTP client.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ClientError {
    #[error("cannot read extra CA file {path}: {reason}")]
    CaFile { path: String, reason: String },
    #[error("cannot build the HTTPS client: {0}")]
    Build(String),
}

/// A successful response body and its caching hint.
#[derive(Debug)]
pub(crate) struct Fetched {
    pub body: Vec<u8>,
    /// `max-age` from `Cache-Control`; `Some(ZERO)` for `no-cache` or `no-store`.
    pub max_age: Option<Duration>,
}

/// Limits of one fetch, taken from the provider's configuration.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FetchLimits {
    pub timeout: Duration,
    pub max_bytes: usize,
}

/// Builds the shared HTTP client: rustls with the ring provider, the system trust store plus
/// the optional extra CA file, and no redirects, because a redirect could lead from an HTTPS
/// URL to a plain HTTP one.
pub(crate) fn build_client(config: &HttpClientConfig) -> Result<reqwest::Client, ClientError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let extra_roots = match &config.extra_ca_file {
        Some(path) => read_ca_file(path)?,
        None => Vec::new(),
    };
    let verifier =
        rustls_platform_verifier::Verifier::new_with_extra_roots(extra_roots, provider.clone())
            .map_err(|error| ClientError::Build(error.to_string()))?;
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| ClientError::Build(error.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();

    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("portcullis-jwt/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|error| ClientError::Build(error.to_string()))
}

fn read_ca_file(
    path: &Path,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, ClientError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;

    let ca_error = |reason: String| ClientError::CaFile {
        path: path.display().to_string(),
        reason,
    };
    let certificates = CertificateDer::pem_file_iter(path)
        .map_err(|error| ca_error(error.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| ca_error(error.to_string()))?;
    if certificates.is_empty() {
        return Err(ca_error("no PEM certificate found".to_owned()));
    }
    Ok(certificates)
}

/// Parses `url` and applies the transport rule: HTTPS, or plain HTTP to a loopback host when
/// `allow_http_loopback` is set.
pub(crate) fn checked_url(url: &str, allow_http_loopback: bool) -> Result<Url, FetchError> {
    let parsed = Url::parse(url).map_err(|error| FetchError::InvalidUrl {
        url: url.to_owned(),
        reason: error.to_string(),
    })?;
    match parsed.scheme() {
        "https" => Ok(parsed),
        "http" if allow_http_loopback && is_loopback_host(&parsed) => Ok(parsed),
        _ => Err(FetchError::InsecureUrl {
            url: url.to_owned(),
        }),
    }
}

fn is_loopback_host(url: &Url) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    match host.parse::<IpAddr>() {
        Ok(address) => address.is_loopback(),
        Err(_) => host.eq_ignore_ascii_case("localhost"),
    }
}

/// Returns the discovery URL of an issuer: the issuer without a trailing slash, then
/// `/.well-known/openid-configuration`.
pub(crate) fn discovery_url(issuer: &str, allow_http_loopback: bool) -> Result<Url, FetchError> {
    checked_url(
        &format!("{}{DISCOVERY_PATH}", issuer.trim_end_matches('/')),
        allow_http_loopback,
    )
}

/// GETs `url` within `limits`.
pub(crate) async fn fetch(
    client: &reqwest::Client,
    url: &Url,
    limits: FetchLimits,
) -> Result<Fetched, FetchError> {
    let request = async {
        let mut response = client
            .get(url.clone())
            .header(
                reqwest::header::ACCEPT,
                "application/json, application/jwk-set+json",
            )
            .send()
            .await
            .map_err(|error| request_error(url, &error))?;

        let status = response.status();
        if !status.is_success() {
            return Err(FetchError::Status {
                url: url.to_string(),
                status: status.as_u16(),
            });
        }
        let max_age = max_age(response.headers());
        if response
            .content_length()
            .is_some_and(|length| length > limits.max_bytes as u64)
        {
            return Err(FetchError::TooLarge {
                url: url.to_string(),
                limit: limits.max_bytes,
            });
        }

        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|error| request_error(url, &error))?
        {
            if body.len() + chunk.len() > limits.max_bytes {
                return Err(FetchError::TooLarge {
                    url: url.to_string(),
                    limit: limits.max_bytes,
                });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Fetched { body, max_age })
    };

    tokio::time::timeout(limits.timeout, request)
        .await
        .unwrap_or_else(|_| {
            Err(FetchError::TimedOut {
                url: url.to_string(),
                timeout: limits.timeout,
            })
        })
}

/// Fetches the discovery document and returns its `jwks_uri`. The document's `issuer` must equal
/// the configured issuer (OpenID Connect Discovery 1.0, section 4.3), so that a document served
/// for another issuer cannot redirect key retrieval.
pub(crate) async fn discover_jwks_uri(
    client: &reqwest::Client,
    issuer: &str,
    limits: FetchLimits,
    allow_http_loopback: bool,
) -> Result<Url, FetchError> {
    let url = discovery_url(issuer, allow_http_loopback)?;
    let fetched = fetch(client, &url, limits).await?;
    let discovery_error = |reason: String| FetchError::Discovery {
        url: url.to_string(),
        reason,
    };

    let document: Value = serde_json::from_slice(&fetched.body)
        .map_err(|error| discovery_error(format!("not valid JSON: {error}")))?;
    match document.get("issuer").and_then(Value::as_str) {
        Some(found) if found == issuer => {}
        Some(found) => {
            return Err(discovery_error(format!(
                "issuer is {found:?}, expected {issuer:?}"
            )));
        }
        None => return Err(discovery_error("no issuer string".to_owned())),
    }
    let jwks_uri = document
        .get("jwks_uri")
        .and_then(Value::as_str)
        .ok_or_else(|| discovery_error("no jwks_uri string".to_owned()))?;
    checked_url(jwks_uri, allow_http_loopback)
}

fn request_error(url: &Url, error: &reqwest::Error) -> FetchError {
    // The source chain contains the useful part (connection refused, TLS failure).
    let mut reason = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        reason.push_str(": ");
        reason.push_str(&cause.to_string());
        source = cause.source();
    }
    FetchError::Request {
        url: url.to_string(),
        reason,
    }
}

/// Reads `max-age` from `Cache-Control`; `no-cache` and `no-store` count as zero.
pub(crate) fn max_age(headers: &HeaderMap) -> Option<Duration> {
    let mut result = None;
    for value in headers.get_all(CACHE_CONTROL) {
        let Ok(value) = value.to_str() else { continue };
        for directive in value.split(',') {
            let directive = directive.trim().to_ascii_lowercase();
            if directive == "no-cache" || directive == "no-store" {
                return Some(Duration::ZERO);
            }
            if let Some(seconds) = directive.strip_prefix("max-age=")
                && let Ok(seconds) = seconds.trim_matches('"').parse::<u64>()
            {
                result = Some(Duration::from_secs(seconds));
            }
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for value in values {
            map.append(CACHE_CONTROL, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn max_age_is_read_from_cache_control() {
        assert_eq!(
            max_age(&headers(&["public, max-age=3600"])),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(
            max_age(&headers(&["Max-Age=60, must-revalidate"])),
            Some(Duration::from_secs(60))
        );
        assert_eq!(max_age(&headers(&["no-cache"])), Some(Duration::ZERO));
        assert_eq!(max_age(&headers(&["max-age=abc"])), None);
        assert_eq!(max_age(&headers(&[])), None);
    }

    #[test]
    fn https_urls_are_accepted() {
        assert!(checked_url("https://issuer.example/jwks", false).is_ok());
    }

    #[test]
    fn plain_http_is_rejected_without_the_flag() {
        assert_eq!(
            checked_url("http://127.0.0.1:8080/jwks", false),
            Err(FetchError::InsecureUrl {
                url: "http://127.0.0.1:8080/jwks".to_owned()
            })
        );
    }

    #[test]
    fn plain_http_loopback_allowed_with_flag() {
        for url in [
            "http://127.0.0.1:8080/jwks",
            "http://127.8.9.1/jwks",
            "http://[::1]:80/jwks",
            "http://localhost/jwks",
        ] {
            assert!(checked_url(url, true).is_ok(), "{url} should be accepted");
        }
    }

    #[test]
    fn plain_http_other_hosts_rejected_with_flag() {
        for url in [
            "http://10.0.0.1/jwks",
            "http://issuer.example/jwks",
            "http://localhost.example/jwks",
        ] {
            assert_eq!(
                checked_url(url, true),
                Err(FetchError::InsecureUrl {
                    url: url.to_owned()
                })
            );
        }
    }

    #[test]
    fn other_schemes_are_rejected() {
        assert_eq!(
            checked_url("file:///etc/jwks.json", true),
            Err(FetchError::InsecureUrl {
                url: "file:///etc/jwks.json".to_owned()
            })
        );
    }

    #[test]
    fn discovery_url_drops_trailing_slash() {
        assert_eq!(
            discovery_url("https://issuer.example/realms/a/", false)
                .unwrap()
                .as_str(),
            "https://issuer.example/realms/a/.well-known/openid-configuration"
        );
    }
}
