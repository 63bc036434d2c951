//! The `jwt` section: identity providers whose tokens portcullis verifies before the policy.

use std::path::Path;
use std::time::Duration;

use portcullis_authz::identity::OnInvalidToken;
use portcullis_jwt::{ClaimToHeader, KeySource, ProviderConfig, SignatureAlgorithm, TokenLocation, VerifierConfig};

use super::fields::{Fields, Problem, problem};
use super::yaml::Node;

const PROVIDER_KEYS: &[&str] = &[
    "name",
    "issuer",
    "audiences",
    "jwks_uri",
    "discovery",
    "jwks_file",
    "jwks",
    "from_headers",
    "from_query",
    "from_cookies",
    "clock_skew",
    "require_expiration",
    "required_claims",
    "claims_to_headers",
    "forward",
    "hmac_secret_file",
    "algorithms",
    "refresh_interval",
    "min_refresh_interval",
    "max_refresh_interval",
    "unknown_kid_refetch_interval",
    "max_staleness",
    "fetch_timeout",
    "allow_http_loopback",
];

/// Token verification settings.
#[derive(Debug, Clone)]
pub struct JwtConfig {
    pub verifier: VerifierConfig,
    pub invalid_token: OnInvalidToken,
}

impl PartialEq for JwtConfig {
    fn eq(&self, other: &Self) -> bool {
        self.invalid_token == other.invalid_token && format!("{:?}", self.verifier) == format!("{:?}", other.verifier)
    }
}

/// Reads the `jwt` section; `None` when it is absent or lists no provider.
pub fn read_jwt(node: Option<&Node>, base_dir: &Path, problems: &mut Vec<Problem>) -> Option<JwtConfig> {
    let node = node?;
    let fields = Fields::new(
        Some(node),
        "jwt",
        &["providers", "invalid_token", "max_token_bytes", "token_cache_entries", "extra_ca_file"],
        base_dir,
        problems,
    );
    let invalid_token = match fields.choice("invalid_token", &["deny", "policy"], "deny", problems).as_str() {
        "policy" => OnInvalidToken::EvaluatePolicy,
        _ => OnInvalidToken::Deny,
    };

    let mut verifier = VerifierConfig::default();
    verifier.max_token_bytes = fields.integer("max_token_bytes", verifier.max_token_bytes as u64, 256..=1024 * 1024, problems) as usize;
    verifier.token_cache.max_entries =
        fields.integer("token_cache_entries", verifier.token_cache.max_entries as u64, 0..=10_000_000, problems) as usize;
    verifier.http.extra_ca_file = fields.path("extra_ca_file", problems);

    for (index, provider) in fields.sequence("providers", problems).iter().enumerate() {
        if let Some(provider) = read_provider(provider, &format!("jwt.providers[{index}]"), base_dir, problems) {
            verifier.providers.push(provider);
        }
    }
    if verifier.providers.is_empty() {
        problems.push(problem("jwt.providers", fields.line_of("providers"), "no provider; list at least one, or remove the jwt section".to_owned()));
        return None;
    }
    Some(JwtConfig { verifier, invalid_token })
}

fn read_provider(node: &Node, path: &str, base_dir: &Path, problems: &mut Vec<Problem>) -> Option<ProviderConfig> {
    let fields = Fields::new(Some(node), path, PROVIDER_KEYS, base_dir, problems);
    let required = |key: &str, problems: &mut Vec<Problem>| {
        let value = fields.string(key, problems);
        if value.is_none() && fields.node(key).is_none() {
            problems.push(problem(&fields.path_of(key), Some(node.line), "missing".to_owned()));
        }
        value
    };
    let name = required("name", problems);
    let issuer = required("issuer", problems);
    let keys = read_key_source(&fields, node, problems);

    let mut provider = ProviderConfig::new(name.unwrap_or_default(), issuer.unwrap_or_default(), KeySource::OidcDiscovery);
    provider.keys = keys;
    provider.audiences = fields.strings("audiences", problems);
    provider.locations = read_locations(&fields, problems);
    provider.clock_skew = fields.duration("clock_skew", provider.clock_skew, Duration::from_secs(3600), problems);
    provider.require_expiration = fields.bool("require_expiration", provider.require_expiration, problems);
    provider.required_claims = fields.strings("required_claims", problems);
    provider.claim_to_headers = read_claims_to_headers(&fields, problems);
    provider.forward = fields.bool("forward", provider.forward, problems);
    provider.hmac_secret_file = fields.path("hmac_secret_file", problems);
    provider.algorithms = read_algorithms(&fields, problems);

    let day = Duration::from_secs(24 * 3600);
    let jwks = &mut provider.jwks;
    jwks.default_refresh_interval = fields.duration("refresh_interval", jwks.default_refresh_interval, day, problems);
    jwks.min_refresh_interval = fields.duration("min_refresh_interval", jwks.min_refresh_interval, day, problems);
    jwks.max_refresh_interval = fields.duration("max_refresh_interval", jwks.max_refresh_interval, 7 * day, problems);
    jwks.unknown_kid_refetch_interval = fields.duration("unknown_kid_refetch_interval", jwks.unknown_kid_refetch_interval, day, problems);
    jwks.max_staleness = fields.duration("max_staleness", jwks.max_staleness, 30 * day, problems);
    jwks.fetch_timeout = fields.duration("fetch_timeout", jwks.fetch_timeout, Duration::from_secs(300), problems);
    jwks.allow_http_loopback = fields.bool("allow_http_loopback", jwks.allow_http_loopback, problems);
    Some(provider)
}

/// Reads the one key source of a provider: `jwks_uri`, `discovery: true`, `jwks_file` or
/// `jwks`. A provider with only `hmac_secret_file` has none.
fn read_key_source(fields: &Fields<'_>, node: &Node, problems: &mut Vec<Problem>) -> Option<KeySource> {
    let mut sources = Vec::new();
    if let Some(uri) = fields.string("jwks_uri", problems) {
        sources.push(("jwks_uri", KeySource::RemoteJwks { uri }));
    }
    if fields.bool("discovery", false, problems) {
        sources.push(("discovery", KeySource::OidcDiscovery));
    }
    if let Some(path) = fields.path("jwks_file", problems) {
        sources.push(("jwks_file", KeySource::File { path }));
    }
    if let Some(jwks) = fields.string("jwks", problems) {
        sources.push(("jwks", KeySource::Inline { jwks }));
    }

    match sources.len() {
        0 if fields.node("hmac_secret_file").is_some() => None,
        0 => {
            problems.push(problem(
                &fields.path_of("jwks_uri"),
                Some(node.line),
                "no key source; set one of jwks_uri, discovery: true, jwks_file or jwks".to_owned(),
            ));
            None
        }
        1 => sources.pop().map(|(_, source)| source),
        _ => {
            let names: Vec<&str> = sources.iter().map(|(name, _)| *name).collect();
            problems.push(problem(
                &fields.path_of(names[1]),
                fields.line_of(names[1]),
                format!("more than one key source ({}); keep exactly one", names.join(", ")),
            ));
            None
        }
    }
}

fn read_locations(fields: &Fields<'_>, problems: &mut Vec<Problem>) -> Vec<TokenLocation> {
    let mut locations = Vec::new();
    for (index, item) in fields.sequence("from_headers", problems).iter().enumerate() {
        let path = format!("{}[{index}]", fields.path_of("from_headers"));
        let header = Fields::new(Some(item), &path, &["name", "prefix"], Path::new(""), problems);
        match header.string("name", problems) {
            Some(name) => locations.push(TokenLocation::Header {
                name: name.to_ascii_lowercase(),
                value_prefix: header.string("prefix", problems),
            }),
            None => problems.push(problem(&format!("{path}.name"), Some(item.line), "missing".to_owned())),
        }
    }
    for name in fields.strings("from_query", problems) {
        locations.push(TokenLocation::QueryParameter { name });
    }
    for name in fields.strings("from_cookies", problems) {
        locations.push(TokenLocation::Cookie { name });
    }
    locations
}

fn read_claims_to_headers(fields: &Fields<'_>, problems: &mut Vec<Problem>) -> Vec<ClaimToHeader> {
    let mut copies = Vec::new();
    for (index, item) in fields.sequence("claims_to_headers", problems).iter().enumerate() {
        let path = format!("{}[{index}]", fields.path_of("claims_to_headers"));
        let copy = Fields::new(Some(item), &path, &["claim", "header"], Path::new(""), problems);
        match (copy.string("claim", problems), copy.string("header", problems)) {
            (Some(claim), Some(header)) => copies.push(ClaimToHeader { claim, header: header.to_ascii_lowercase() }),
            _ => problems.push(problem(&path, Some(item.line), "needs both claim and header".to_owned())),
        }
    }
    copies
}

fn read_algorithms(fields: &Fields<'_>, problems: &mut Vec<Problem>) -> Vec<SignatureAlgorithm> {
    let mut algorithms = Vec::new();
    for name in fields.strings("algorithms", problems) {
        match name.parse::<SignatureAlgorithm>() {
            Ok(algorithm) => algorithms.push(algorithm),
            Err(error) => problems.push(problem(&fields.path_of("algorithms"), fields.line_of("algorithms"), error.to_string())),
        }
    }
    algorithms
}
