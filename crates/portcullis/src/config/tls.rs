//! The `tls` and `vault` sections: where the mTLS certificate of the ext_authz listener comes
//! from (Vault PKI or files), how it rotates, and how portcullis logs in to Vault.

use std::path::{Path, PathBuf};
use std::time::Duration;

use portcullis_pki::files::{DEFAULT_RELOAD_INTERVAL, FileSettings};
use portcullis_pki::vault::{DEFAULT_KUBERNETES_TOKEN_FILE, DEFAULT_TIMEOUT, IssueSettings, VaultAuth, VaultSettings, spiffe_id};
use portcullis_pki::RotationSettings;

use super::fields::{Fields, Problem, problem};
use super::yaml::{Node, NodeValue};

const TLS_KEYS: &[&str] = &[
    "source",
    "pki_mount",
    "pki_role",
    "common_name",
    "dns_names",
    "uri_sans",
    "spiffe",
    "ttl",
    "cert_file",
    "key_file",
    "ca_file",
    "reload_interval",
    "extra_roots_files",
    "renew_fraction",
    "jitter_fraction",
    "min_retry",
    "max_retry",
    "expiry_margin",
];

/// Environment variables that fill in `tls.spiffe.namespace` and `tls.spiffe.service_account`
/// when the file leaves them out. One configuration file is shared by every pod of a
/// namespace, so the injector sets these from each pod through the downward API.
const SPIFFE_NAMESPACE_VARIABLE: &str = "POD_NAMESPACE";
const SPIFFE_SERVICE_ACCOUNT_VARIABLE: &str = "SERVICE_ACCOUNT";

/// A day: long enough that Vault is asked rarely, short enough that a leaked key is useful
/// for a day at most. Vault roles often cap TTLs lower; the role's cap wins.
const DEFAULT_CERTIFICATE_TTL: Duration = Duration::from_secs(24 * 3600);

/// The source of the listener's certificate.
#[derive(Debug, Clone, PartialEq)]
pub enum TlsSource {
    Vault { vault: VaultSettings, issue: IssueSettings },
    Files(FileSettings),
}

/// mTLS on the ext_authz TCP listener.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsConfig {
    pub source: TlsSource,
    /// PEM files of roots trusted in addition to the source's CA chain.
    pub extra_roots_files: Vec<PathBuf>,
    pub rotation: RotationSettings,
}

/// Reads the `tls` section and, when its source is Vault, the `vault` section.
pub fn read_tls(tls: Option<&Node>, vault: Option<&Node>, vault_line: Option<usize>, base_dir: &Path, problems: &mut Vec<Problem>) -> Option<TlsConfig> {
    let Some(tls) = tls else {
        if vault.is_some() {
            problems.push(problem("vault", vault_line, "vault is set but tls is not; add a tls section, because Vault is only used for the listener's certificate".to_owned()));
        }
        return None;
    };
    let fields = Fields::new(Some(tls), "tls", TLS_KEYS, base_dir, problems);
    let default_source = if vault.is_some() { "vault" } else { "files" };
    // Every part is read even when an earlier one failed, so all problems are reported.
    let source = match fields.choice("source", &["vault", "files"], default_source, problems).as_str() {
        "vault" => {
            let vault = match vault {
                Some(vault) => read_vault(vault, base_dir, problems),
                None => {
                    problems.push(problem("vault", fields.line_of("source"), "missing; tls.source is vault, so a vault section must say how to reach Vault".to_owned()));
                    None
                }
            };
            let issue = read_issue(&fields, tls, &environment_variable, problems);
            vault.zip(issue).map(|(vault, issue)| TlsSource::Vault { vault, issue })
        }
        _ => read_files(&fields, tls, problems).map(TlsSource::Files),
    };

    let mut extra_roots_files = Vec::new();
    for (index, path) in fields.strings("extra_roots_files", problems).into_iter().enumerate() {
        let path = base_dir.join(path);
        if !path.is_file() {
            problems.push(problem(&format!("tls.extra_roots_files[{index}]"), fields.line_of("extra_roots_files"), format!("{} not found", path.display())));
        }
        extra_roots_files.push(path);
    }

    let rotation = read_rotation(&fields, problems);
    Some(TlsConfig { source: source?, extra_roots_files, rotation })
}

fn read_rotation(fields: &Fields<'_>, problems: &mut Vec<Problem>) -> RotationSettings {
    let defaults = RotationSettings::default();
    let hour = Duration::from_secs(3600);
    let renew_fraction = fraction(fields, "renew_fraction", defaults.renew_fraction, problems);
    let jitter_fraction = fraction(fields, "jitter_fraction", defaults.jitter_fraction, problems);
    if jitter_fraction >= renew_fraction {
        problems.push(problem(
            "tls.jitter_fraction",
            fields.line_of("jitter_fraction"),
            format!("{jitter_fraction} must be smaller than renew_fraction ({renew_fraction}), or renewal could be due at issuance"),
        ));
    }
    let min_retry = fields.duration("min_retry", defaults.min_retry, hour, problems);
    let max_retry = fields.duration("max_retry", defaults.max_retry, hour, problems);
    if min_retry.is_zero() || max_retry < min_retry {
        problems.push(problem("tls.max_retry", fields.line_of("max_retry"), "min_retry must be above zero and max_retry at least min_retry".to_owned()));
    }
    RotationSettings { renew_fraction, jitter_fraction, min_retry, max_retry, expiry_margin: fields.duration("expiry_margin", defaults.expiry_margin, hour, problems) }
}

/// Reads a number in [0, 1).
fn fraction(fields: &Fields<'_>, key: &str, default: f64, problems: &mut Vec<Problem>) -> f64 {
    let Some(node) = fields.node(key) else { return default };
    let value = match node.value {
        NodeValue::Float(value) => value,
        NodeValue::Integer(value) => value as f64,
        _ => f64::NAN,
    };
    if (0.0..1.0).contains(&value) {
        value
    } else {
        problems.push(problem(&fields.path_of(key), Some(node.line), "expected a number from 0 up to (not including) 1, such as 0.667".to_owned()));
        default
    }
}

/// Reads a non-empty environment variable.
fn environment_variable(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|value| !value.is_empty())
}

fn read_issue(fields: &Fields<'_>, tls: &Node, environment: &dyn Fn(&str) -> Option<String>, problems: &mut Vec<Problem>) -> Option<IssueSettings> {
    let common_name = fields.string("common_name", problems);
    if common_name.is_none() && fields.node("common_name").is_none() {
        problems.push(problem("tls.common_name", Some(tls.line), "missing; Vault issues certificates for a common name, such as portcullis.shop.svc".to_owned()));
    }
    let mut uri_sans = fields.strings("uri_sans", problems);
    if let Some(spiffe) = fields.node("spiffe") {
        uri_sans.push(read_spiffe(spiffe, environment, problems));
    }
    let ttl = fields.duration("ttl", DEFAULT_CERTIFICATE_TTL, Duration::from_secs(365 * 86_400), problems);
    if ttl < Duration::from_secs(1) {
        problems.push(problem("tls.ttl", fields.line_of("ttl"), "must be at least 1s".to_owned()));
    }
    Some(IssueSettings {
        mount: fields.string("pki_mount", problems).unwrap_or_else(|| "pki".to_owned()),
        role: fields.string("pki_role", problems).unwrap_or_else(|| "portcullis".to_owned()),
        common_name: common_name?,
        dns_names: fields.strings("dns_names", problems),
        uri_sans,
        ttl,
    })
}

/// Reads `tls.spiffe` into its SPIFFE ID. A namespace or service account left out of the
/// file comes from its environment variable.
fn read_spiffe(spiffe: &Node, environment: &dyn Fn(&str) -> Option<String>, problems: &mut Vec<Problem>) -> String {
    let fields = Fields::new(Some(spiffe), "tls.spiffe", &["trust_domain", "namespace", "service_account"], Path::new(""), problems);
    let mut part = |key: &str, variable: Option<&str>| {
        let in_file = fields.node(key).is_some();
        if !in_file && let Some(value) = variable.and_then(environment) {
            return value;
        }
        let value = fields.string(key, problems);
        if value.as_deref().is_none_or(str::is_empty) {
            let missing = match variable {
                Some(variable) if !in_file => format!("missing and {variable} is not set"),
                _ => "missing".to_owned(),
            };
            problems.push(problem(
                &fields.path_of(key),
                fields.line_of(key),
                format!("{missing}; a SPIFFE ID needs trust_domain, namespace and service_account"),
            ));
        }
        value.unwrap_or_default()
    };
    let trust_domain = part("trust_domain", None);
    let namespace = part("namespace", Some(SPIFFE_NAMESPACE_VARIABLE));
    let service_account = part("service_account", Some(SPIFFE_SERVICE_ACCOUNT_VARIABLE));
    spiffe_id(&trust_domain, &namespace, &service_account)
}

fn read_files(fields: &Fields<'_>, tls: &Node, problems: &mut Vec<Problem>) -> Option<FileSettings> {
    let mut required = |key: &str| {
        let path = fields.path(key, problems);
        match &path {
            None if fields.node(key).is_none() => problems.push(problem(
                &fields.path_of(key),
                Some(tls.line),
                "missing; without Vault, tls needs cert_file, key_file and ca_file".to_owned(),
            )),
            Some(path) if !path.is_file() => problems.push(problem(&fields.path_of(key), fields.line_of(key), format!("{} not found", path.display()))),
            _ => {}
        }
        path
    };
    let (cert_file, key_file, ca_file) = (required("cert_file"), required("key_file"), required("ca_file"));
    Some(FileSettings {
        cert_file: cert_file?,
        key_file: key_file?,
        ca_file: ca_file?,
        reload_interval: fields.duration("reload_interval", DEFAULT_RELOAD_INTERVAL, Duration::from_secs(3600), problems),
    })
}

fn read_vault(node: &Node, base_dir: &Path, problems: &mut Vec<Problem>) -> Option<VaultSettings> {
    let fields = Fields::new(Some(node), "vault", &["address", "namespace", "ca_file", "timeout", "auth"], base_dir, problems);
    let address = fields.string("address", problems);
    match &address {
        None if fields.node("address").is_none() => {
            problems.push(problem("vault.address", Some(node.line), "missing; set it to Vault's address, such as https://vault.vault.svc:8200".to_owned()));
        }
        Some(address) => {
            if let Err(message) = check_vault_address(address) {
                problems.push(problem("vault.address", fields.line_of("address"), message));
            }
        }
        None => {}
    }
    let ca_file = fields.path("ca_file", problems);
    if let Some(path) = ca_file.as_ref().filter(|path| !path.is_file()) {
        problems.push(problem("vault.ca_file", fields.line_of("ca_file"), format!("{} not found", path.display())));
    }
    let auth = match fields.node("auth") {
        Some(auth) => read_auth(auth, base_dir, problems),
        None => {
            problems.push(problem("vault.auth", Some(node.line), "missing; set auth.method to kubernetes, approle or token".to_owned()));
            None
        }
    };
    Some(VaultSettings {
        address: address?,
        namespace: fields.string("namespace", problems).filter(|namespace| !namespace.is_empty()),
        ca_file,
        timeout: fields.duration("timeout", DEFAULT_TIMEOUT, Duration::from_secs(300), problems),
        auth: auth?,
    })
}

/// Accepts `https://` addresses, and `http://` only on loopback, because the Vault token
/// and the private keys travel in these requests.
fn check_vault_address(address: &str) -> Result<(), String> {
    let (scheme, rest) = address.split_once("://").ok_or_else(|| format!("invalid address {address:?}; expected https://HOST:PORT"))?;
    let host = rest.split('/').next().unwrap_or_default();
    let host = match host.rsplit_once(':') {
        Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) => name,
        _ => host,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("invalid address {address:?}; expected https://HOST:PORT"));
    }
    match scheme {
        "https" => Ok(()),
        "http" if host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback()) => Ok(()),
        "http" => Err(format!("{address:?} is plain HTTP to another host; use https, because Vault tokens and private keys cross this connection")),
        _ => Err(format!("invalid scheme in {address:?}; expected https")),
    }
}

fn read_auth(node: &Node, base_dir: &Path, problems: &mut Vec<Problem>) -> Option<VaultAuth> {
    let fields = Fields::new(
        Some(node),
        "vault.auth",
        &["method", "mount", "role", "service_account_token_file", "role_id", "secret_id_file", "token_file"],
        base_dir,
        problems,
    );
    let method = fields.choice("method", &["kubernetes", "approle", "token"], "kubernetes", problems);
    let mount = fields.string("mount", problems).unwrap_or_else(|| method.clone());
    let mut required_string = |key: &str| {
        let value = fields.string(key, problems);
        if value.is_none() && fields.node(key).is_none() {
            problems.push(problem(&fields.path_of(key), Some(node.line), format!("missing; the {method} method needs it")));
        }
        value
    };
    match method.as_str() {
        "approle" => {
            let role_id = required_string("role_id");
            let secret_id_file = required_file(&fields, node, "secret_id_file", problems);
            Some(VaultAuth::AppRole { mount, role_id: role_id?, secret_id_file: secret_id_file? })
        }
        "token" => Some(VaultAuth::TokenFile { path: required_file(&fields, node, "token_file", problems)? }),
        _ => {
            let role = required_string("role");
            let token_file = fields.path("service_account_token_file", problems).unwrap_or_else(|| PathBuf::from(DEFAULT_KUBERNETES_TOKEN_FILE));
            Some(VaultAuth::Kubernetes { mount, role: role?, token_file })
        }
    }
}

/// Reads a path that must be set. The file itself is read at every login, so it may appear
/// after start-up (a projected token, a secret ID delivered later).
fn required_file(fields: &Fields<'_>, node: &Node, key: &str, problems: &mut Vec<Problem>) -> Option<PathBuf> {
    let path = fields.path(key, problems);
    if path.is_none() && fields.node(key).is_none() {
        problems.push(problem(&fields.path_of(key), Some(node.line), "missing".to_owned()));
    }
    path
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const BASE: &str = "listen:\n  address: 127.0.0.1:9191\npolicy:\n  bundle: bundle\n";

    fn parse(extra: &str) -> (Result<Config, Vec<Problem>>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("bundle")).unwrap();
        for name in ["cert.pem", "key.pem", "ca.pem"] {
            std::fs::write(dir.path().join(name), "").unwrap();
        }
        (Config::parse(&format!("{BASE}{extra}"), dir.path()), dir)
    }

    fn rendered(result: Result<Config, Vec<Problem>>) -> Vec<String> {
        result.err().unwrap().iter().map(ToString::to_string).collect()
    }

    #[test]
    fn vault_source_reads_auth_issue_and_rotation() {
        let (config, dir) = parse(
            "vault:\n  address: https://vault.example:8200\n  namespace: team-a\n  auth:\n    method: kubernetes\n    role: portcullis\ntls:\n  common_name: authz.shop.svc\n  dns_names: [authz]\n  spiffe:\n    trust_domain: cluster.local\n    namespace: shop\n    service_account: cart\n  ttl: 6h\n  renew_fraction: 0.5\n  max_retry: 30s\n",
        );

        let tls = config.unwrap().tls.unwrap();
        let TlsSource::Vault { vault, issue } = tls.source else { panic!("expected the Vault source") };
        assert_eq!(vault.address, "https://vault.example:8200");
        assert_eq!(vault.namespace.as_deref(), Some("team-a"));
        assert_eq!(vault.timeout, DEFAULT_TIMEOUT);
        assert_eq!(
            vault.auth,
            VaultAuth::Kubernetes { mount: "kubernetes".to_owned(), role: "portcullis".to_owned(), token_file: PathBuf::from(DEFAULT_KUBERNETES_TOKEN_FILE) }
        );
        assert_eq!(issue.mount, "pki");
        assert_eq!(issue.role, "portcullis");
        assert_eq!(issue.common_name, "authz.shop.svc");
        assert_eq!(issue.dns_names, vec!["authz".to_owned()]);
        assert_eq!(issue.uri_sans, vec!["spiffe://cluster.local/ns/shop/sa/cart".to_owned()]);
        assert_eq!(issue.ttl, Duration::from_secs(6 * 3600));
        assert_eq!(tls.rotation.renew_fraction, 0.5);
        assert_eq!(tls.rotation.max_retry, Duration::from_secs(30));
        assert_eq!(tls.rotation.min_retry, Duration::from_secs(1));
        drop(dir);
    }

    #[test]
    fn files_source_takes_paths_from_the_config_folder() {
        let (config, dir) = parse("tls:\n  cert_file: cert.pem\n  key_file: key.pem\n  ca_file: ca.pem\n");

        let tls = config.unwrap().tls.unwrap();
        assert_eq!(
            tls.source,
            TlsSource::Files(FileSettings {
                cert_file: dir.path().join("cert.pem"),
                key_file: dir.path().join("key.pem"),
                ca_file: dir.path().join("ca.pem"),
                reload_interval: DEFAULT_RELOAD_INTERVAL,
            })
        );
    }

    #[test]
    fn every_tls_and_vault_problem_is_reported_with_its_line() {
        let (config, _dir) = parse(
            "vault:\n  address: http://vault:8200\n  auth:\n    method: approle\n    role_id: r\ntls:\n  spiffe:\n    trust_domain: cluster.local\n  renew_fraction: 1.5\n  jitter_fraction: 0.2\n  colour: blue\n",
        );

        assert_eq!(
            rendered(config),
            vec![
                "tls.colour (line 15): unknown key; expected one of: source, pki_mount, pki_role, common_name, dns_names, uri_sans, spiffe, ttl, cert_file, key_file, ca_file, reload_interval, extra_roots_files, renew_fraction, jitter_fraction, min_retry, max_retry, expiry_margin",
                "vault.address (line 6): \"http://vault:8200\" is plain HTTP to another host; use https, because Vault tokens and private keys cross this connection",
                "vault.auth.secret_id_file (line 8): missing",
                "tls.common_name (line 11): missing; Vault issues certificates for a common name, such as portcullis.shop.svc",
                "tls.spiffe.namespace (line 12): missing and POD_NAMESPACE is not set; a SPIFFE ID needs trust_domain, namespace and service_account",
                "tls.spiffe.service_account (line 12): missing and SERVICE_ACCOUNT is not set; a SPIFFE ID needs trust_domain, namespace and service_account",
                "tls.renew_fraction (line 13): expected a number from 0 up to (not including) 1, such as 0.667",
            ]
        );
    }

    #[test]
    fn vault_without_tls_is_rejected() {
        let (config, _dir) = parse("vault:\n  address: https://vault:8200\n");

        assert_eq!(
            rendered(config),
            vec!["vault (line 6): vault is set but tls is not; add a tls section, because Vault is only used for the listener's certificate"]
        );
    }

    #[test]
    fn missing_certificate_files_are_named() {
        let (config, dir) = parse("tls:\n  source: files\n  cert_file: missing.pem\n  key_file: key.pem\n");

        assert_eq!(
            rendered(config),
            vec![
                format!("tls.cert_file (line 7): {} not found", dir.path().join("missing.pem").display()),
                "tls.ca_file (line 6): missing; without Vault, tls needs cert_file, key_file and ca_file".to_owned(),
            ]
        );
    }

    /// Reads `spiffe_yaml` as the `tls.spiffe` mapping, with `environment` as the process
    /// environment.
    fn spiffe_with_environment(spiffe_yaml: &str, environment: &[(&str, &str)]) -> (String, Vec<String>) {
        let node = crate::config::yaml::parse(spiffe_yaml).unwrap();
        let lookup = |name: &str| environment.iter().find(|(key, _)| *key == name).map(|(_, value)| (*value).to_owned());
        let mut problems = Vec::new();
        let id = read_spiffe(&node, &lookup, &mut problems);
        (id, problems.iter().map(ToString::to_string).collect())
    }

    #[test]
    fn spiffe_parts_default_to_environment() {
        let (id, problems) = spiffe_with_environment("trust_domain: cluster.local\n", &[("POD_NAMESPACE", "shop"), ("SERVICE_ACCOUNT", "cart")]);

        assert_eq!(id, "spiffe://cluster.local/ns/shop/sa/cart");
        assert_eq!(problems, Vec::<String>::new());
    }

    #[test]
    fn spiffe_file_parts_override_environment() {
        let (id, problems) = spiffe_with_environment(
            "trust_domain: cluster.local\nnamespace: billing\nservice_account: invoices\n",
            &[("POD_NAMESPACE", "shop"), ("SERVICE_ACCOUNT", "cart")],
        );

        assert_eq!(id, "spiffe://cluster.local/ns/billing/sa/invoices");
        assert_eq!(problems, Vec::<String>::new());
    }

    #[test]
    fn spiffe_part_missing_everywhere_is_rejected() {
        let (_, problems) = spiffe_with_environment("trust_domain: cluster.local\nservice_account: \"\"\n", &[("SERVICE_ACCOUNT", "cart")]);

        assert_eq!(
            problems,
            vec![
                "tls.spiffe.namespace (line 1): missing and POD_NAMESPACE is not set; a SPIFFE ID needs trust_domain, namespace and service_account",
                "tls.spiffe.service_account (line 2): missing; a SPIFFE ID needs trust_domain, namespace and service_account",
            ]
        );
    }

    #[test]
    fn vault_address_must_be_https_unless_loopback() {
        assert_eq!(check_vault_address("https://vault.vault.svc:8200"), Ok(()));
        assert_eq!(check_vault_address("http://127.0.0.1:8200"), Ok(()));
        assert_eq!(check_vault_address("http://[::1]:8200"), Ok(()));
        assert_eq!(check_vault_address("http://localhost:8200"), Ok(()));
        assert_eq!(
            check_vault_address("http://vault:8200"),
            Err("\"http://vault:8200\" is plain HTTP to another host; use https, because Vault tokens and private keys cross this connection".to_owned())
        );
        assert!(check_vault_address("vault:8200").is_err());
    }
}
