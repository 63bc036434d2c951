//! Validation of the configuration and the runtime form of each provider.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::DecodingKey;
use reqwest::header::HeaderName;

use crate::algorithm::SignatureAlgorithm;
use crate::claims::ClaimRules;
use crate::clock::Clock;
use crate::config::{
    ClaimToHeader, JwksFetchConfig, KeySource, ProviderConfig, TokenLocation, VerifierConfig,
};
use crate::error::ConfigProblem;
use crate::fetch::{build_client, checked_url, discovery_url};
use crate::jwks::parse_jwks;
use crate::keys::{ProviderKeys, RemoteSource};
use crate::observer::JwtObserver;

/// Minimum HMAC secret length accepted in configuration: the HS256 key size (RFC 7518, 3.2).
const MIN_HMAC_SECRET_BYTES: usize = 32;

/// A provider ready for verification.
pub(crate) struct Provider {
    pub name: String,
    pub issuer: String,
    pub claim_rules: ClaimRules,
    pub algorithms: Vec<SignatureAlgorithm>,
    pub claim_to_headers: Vec<ClaimToHeader>,
    pub forward: bool,
    pub keys: Option<Arc<ProviderKeys>>,
    pub hmac_secret: Option<HmacSecret>,
}

pub(crate) struct HmacSecret {
    pub key: DecodingKey,
    pub length: usize,
}

/// A distinct token location and the providers that read it.
#[derive(Debug)]
pub(crate) struct LocationEntry {
    pub location: TokenLocation,
    pub providers: Vec<usize>,
}

/// Everything built from the configuration.
pub(crate) struct Setup {
    pub providers: Vec<Provider>,
    pub locations: Vec<LocationEntry>,
}

/// Validates `config` and builds the providers, collecting every problem.
pub(crate) fn build(
    config: &VerifierConfig,
    clock: &Arc<dyn Clock>,
    observer: &Arc<dyn JwtObserver>,
) -> Result<Setup, Vec<ConfigProblem>> {
    let mut problems = Vec::new();
    if jsonwebtoken::crypto::CryptoProvider::try_get_default().is_none() {
        problems.push(ConfigProblem::CryptoBackend);
    }
    if config.max_token_bytes == 0 {
        problems.push(ConfigProblem::ZeroMaxTokenBytes);
    }
    check_unique_names_and_issuers(&config.providers, &mut problems);

    let needs_client = config.providers.iter().any(|provider| {
        matches!(
            provider.keys,
            Some(KeySource::RemoteJwks { .. }) | Some(KeySource::OidcDiscovery)
        )
    });
    let client = if needs_client {
        match build_client(&config.http) {
            Ok(client) => Some(client),
            Err(error) => {
                problems.push(ConfigProblem::HttpClient(error.to_string()));
                None
            }
        }
    } else {
        None
    };

    let mut providers = Vec::new();
    for provider in &config.providers {
        if let Some(built) =
            build_provider(provider, client.as_ref(), clock, observer, &mut problems)
        {
            providers.push(built);
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }

    let locations = group_locations(&config.providers);
    Ok(Setup {
        providers,
        locations,
    })
}

fn check_unique_names_and_issuers(providers: &[ProviderConfig], problems: &mut Vec<ConfigProblem>) {
    let mut names: HashMap<&str, usize> = HashMap::new();
    let mut issuers: HashMap<&str, &str> = HashMap::new();
    for (index, provider) in providers.iter().enumerate() {
        if provider.name.is_empty() {
            problems.push(ConfigProblem::EmptyProviderName { index });
        } else if names.insert(&provider.name, index).is_some() {
            problems.push(ConfigProblem::DuplicateName {
                name: provider.name.clone(),
            });
        }
        if provider.issuer.is_empty() {
            problems.push(ConfigProblem::EmptyIssuer {
                provider: provider.name.clone(),
            });
        } else if let Some(first) = issuers.insert(&provider.issuer, &provider.name) {
            problems.push(ConfigProblem::DuplicateIssuer {
                issuer: provider.issuer.clone(),
                first: first.to_owned(),
                second: provider.name.clone(),
            });
        }
    }
}

fn build_provider(
    config: &ProviderConfig,
    client: Option<&reqwest::Client>,
    clock: &Arc<dyn Clock>,
    observer: &Arc<dyn JwtObserver>,
    problems: &mut Vec<ConfigProblem>,
) -> Option<Provider> {
    let problems_before = problems.len();
    let name = config.name.clone();

    check_locations(config, problems);
    let claim_to_headers = normalized_claim_headers(config, problems);
    check_fetch_settings(&name, &config.jwks, problems);
    let hmac_secret = config
        .hmac_secret_file
        .as_deref()
        .and_then(|path| read_hmac_secret(&name, path, problems));
    let algorithms = allowed_algorithms(config, hmac_secret.is_some(), problems);
    if config.keys.is_none() && config.hmac_secret_file.is_none() {
        problems.push(ConfigProblem::NoKeys {
            provider: name.clone(),
        });
    }
    let keys = config
        .keys
        .as_ref()
        .and_then(|source| build_keys(config, source, client, clock, observer, problems));

    if problems.len() != problems_before {
        return None;
    }
    Some(Provider {
        name,
        issuer: config.issuer.clone(),
        claim_rules: ClaimRules {
            audiences: config.audiences.clone(),
            clock_skew_seconds: config.clock_skew.as_secs_f64(),
            require_expiration: config.require_expiration,
            required_claims: config.required_claims.clone(),
        },
        algorithms,
        claim_to_headers,
        forward: config.forward,
        keys: keys.map(Arc::new),
        hmac_secret,
    })
}

fn check_locations(config: &ProviderConfig, problems: &mut Vec<ConfigProblem>) {
    for location in &config.locations {
        match location {
            TokenLocation::Header { name, .. }
                if HeaderName::from_bytes(name.as_bytes()).is_err() =>
            {
                problems.push(ConfigProblem::InvalidHeaderName {
                    provider: config.name.clone(),
                    name: name.clone(),
                });
            }
            TokenLocation::QueryParameter { name } if name.is_empty() => {
                problems.push(ConfigProblem::EmptyField {
                    provider: config.name.clone(),
                    field: "query parameter",
                });
            }
            TokenLocation::Cookie { name } if name.is_empty() => {
                problems.push(ConfigProblem::EmptyField {
                    provider: config.name.clone(),
                    field: "cookie",
                });
            }
            _ => {}
        }
    }
}

fn normalized_claim_headers(
    config: &ProviderConfig,
    problems: &mut Vec<ConfigProblem>,
) -> Vec<ClaimToHeader> {
    let mut normalized = Vec::new();
    for mapping in &config.claim_to_headers {
        if mapping.claim.is_empty() {
            problems.push(ConfigProblem::EmptyField {
                provider: config.name.clone(),
                field: "claim",
            });
        }
        match HeaderName::from_bytes(mapping.header.as_bytes()) {
            Ok(header) => normalized.push(ClaimToHeader {
                claim: mapping.claim.clone(),
                header: header.as_str().to_owned(),
            }),
            Err(_) => problems.push(ConfigProblem::InvalidHeaderName {
                provider: config.name.clone(),
                name: mapping.header.clone(),
            }),
        }
    }
    normalized
}

fn check_fetch_settings(
    provider: &str,
    settings: &JwksFetchConfig,
    problems: &mut Vec<ConfigProblem>,
) {
    let mut problem = |setting: String| {
        problems.push(ConfigProblem::FetchSetting {
            provider: provider.to_owned(),
            setting,
        })
    };
    let positive: [(&str, Duration); 5] = [
        (
            "default_refresh_interval",
            settings.default_refresh_interval,
        ),
        ("min_refresh_interval", settings.min_refresh_interval),
        ("fetch_timeout", settings.fetch_timeout),
        ("initial_backoff", settings.initial_backoff),
        ("max_staleness", settings.max_staleness),
    ];
    for (name, value) in positive {
        if value.is_zero() {
            problem(format!("{name} must be greater than 0"));
        }
    }
    if settings.min_refresh_interval > settings.max_refresh_interval {
        problem(format!(
            "min_refresh_interval {:?} is greater than max_refresh_interval {:?}",
            settings.min_refresh_interval, settings.max_refresh_interval
        ));
    }
    if settings.initial_backoff > settings.max_backoff {
        problem(format!(
            "initial_backoff {:?} is greater than max_backoff {:?}",
            settings.initial_backoff, settings.max_backoff
        ));
    }
    if settings.max_response_bytes == 0 {
        problem("max_response_bytes must be greater than 0".to_owned());
    }
}

/// Reads the secret file. One trailing newline (`\n` or `\r\n`) is removed, because editors and
/// `echo` add one; every other byte is part of the secret.
fn read_hmac_secret(
    provider: &str,
    path: &Path,
    problems: &mut Vec<ConfigProblem>,
) -> Option<HmacSecret> {
    let mut secret = match std::fs::read(path) {
        Ok(secret) => secret,
        Err(error) => {
            problems.push(ConfigProblem::ReadFile {
                provider: provider.to_owned(),
                path: path.display().to_string(),
                reason: error.to_string(),
            });
            return None;
        }
    };
    if secret.ends_with(b"\r\n") {
        secret.truncate(secret.len() - 2);
    } else if secret.ends_with(b"\n") {
        secret.truncate(secret.len() - 1);
    }
    if secret.len() < MIN_HMAC_SECRET_BYTES {
        problems.push(ConfigProblem::HmacSecretTooShort {
            provider: provider.to_owned(),
            path: path.display().to_string(),
            length: secret.len(),
        });
        return None;
    }
    let length = secret.len();
    let key = DecodingKey::from_secret(&secret).ok()?;
    Some(HmacSecret { key, length })
}

fn allowed_algorithms(
    config: &ProviderConfig,
    has_secret: bool,
    problems: &mut Vec<ConfigProblem>,
) -> Vec<SignatureAlgorithm> {
    if config.algorithms.is_empty() {
        let mut algorithms = SignatureAlgorithm::ASYMMETRIC.to_vec();
        if has_secret {
            algorithms.extend(SignatureAlgorithm::HMAC);
        }
        return algorithms;
    }
    for algorithm in &config.algorithms {
        if algorithm.is_hmac() && config.hmac_secret_file.is_none() {
            problems.push(ConfigProblem::HmacWithoutSecret {
                provider: config.name.clone(),
                algorithm: algorithm.to_string(),
            });
        }
    }
    config.algorithms.clone()
}

fn build_keys(
    config: &ProviderConfig,
    source: &KeySource,
    client: Option<&reqwest::Client>,
    clock: &Arc<dyn Clock>,
    observer: &Arc<dyn JwtObserver>,
    problems: &mut Vec<ConfigProblem>,
) -> Option<ProviderKeys> {
    let name = config.name.clone();
    let allow_http = config.jwks.allow_http_loopback;
    let url_problem = |source| ConfigProblem::Url {
        provider: name.clone(),
        source,
    };

    let remote = match source {
        KeySource::RemoteJwks { uri } => match checked_url(uri, allow_http) {
            Ok(url) => RemoteSource::Jwks(url),
            Err(error) => {
                problems.push(url_problem(error));
                return None;
            }
        },
        KeySource::OidcDiscovery => match discovery_url(&config.issuer, allow_http) {
            Ok(_) => RemoteSource::Discovery {
                issuer: config.issuer.clone(),
            },
            Err(error) => {
                problems.push(url_problem(error));
                return None;
            }
        },
        KeySource::File { path } => {
            let document = match std::fs::read(path) {
                Ok(document) => document,
                Err(error) => {
                    problems.push(ConfigProblem::ReadFile {
                        provider: name,
                        path: path.display().to_string(),
                        reason: error.to_string(),
                    });
                    return None;
                }
            };
            return fixed_keys(
                config,
                &document,
                &path.display().to_string(),
                clock,
                observer,
                problems,
            );
        }
        KeySource::Inline { jwks } => {
            return fixed_keys(
                config,
                jwks.as_bytes(),
                "inline configuration",
                clock,
                observer,
                problems,
            );
        }
    };

    let client = client?.clone();
    Some(ProviderKeys::remote(
        name,
        remote,
        client,
        config.jwks.clone(),
        clock.clone(),
        observer.clone(),
    ))
}

fn fixed_keys(
    config: &ProviderConfig,
    document: &[u8],
    origin: &str,
    clock: &Arc<dyn Clock>,
    observer: &Arc<dyn JwtObserver>,
    problems: &mut Vec<ConfigProblem>,
) -> Option<ProviderKeys> {
    match parse_jwks(document) {
        Ok(parsed) => Some(ProviderKeys::fixed(
            config.name.clone(),
            parsed,
            clock.clone(),
            observer.clone(),
        )),
        Err(source) => {
            problems.push(ConfigProblem::Jwks {
                provider: config.name.clone(),
                origin: origin.to_owned(),
                source,
            });
            None
        }
    }
}

/// Groups the configured locations so that each distinct location is read once per request.
/// Header names are compared in lowercase.
fn group_locations(providers: &[ProviderConfig]) -> Vec<LocationEntry> {
    let mut entries: Vec<LocationEntry> = Vec::new();
    for (index, provider) in providers.iter().enumerate() {
        let locations = if provider.locations.is_empty() {
            TokenLocation::default_locations()
        } else {
            provider.locations.clone()
        };
        for location in locations {
            let location = match location {
                TokenLocation::Header { name, value_prefix } => TokenLocation::Header {
                    name: name.to_ascii_lowercase(),
                    value_prefix,
                },
                other => other,
            };
            match entries.iter_mut().find(|entry| entry.location == location) {
                Some(entry) if !entry.providers.contains(&index) => entry.providers.push(index),
                Some(_) => {}
                None => entries.push(LocationEntry {
                    location,
                    providers: vec![index],
                }),
            }
        }
    }
    entries
}
