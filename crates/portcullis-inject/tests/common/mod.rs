//! Running helm and the schema validator for the chart tests, and reading their YAML output.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::{Map, Value};

/// Environment variable that names a helm binary instead of installing one.
pub const HELM_VARIABLE: &str = "PORTCULLIS_HELM";
/// Environment variable that turns a missing peer from a skip into a failure.
pub const REQUIRE_PEERS_VARIABLE: &str = "PORTCULLIS_REQUIRE_PEERS";

/// Release name and namespace of every rendering in the tests.
pub const RELEASE: &str = "t";
pub const NAMESPACE: &str = "portcullis-system";

pub fn repository_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the repository root exists")
}

pub fn chart_dir() -> PathBuf {
    repository_root().join("charts/portcullis")
}

/// Returns the helm binary, or `None` after printing `SKIPPED` when it cannot be installed.
///
/// Panics instead of skipping when `PORTCULLIS_REQUIRE_PEERS=1`, or when `PORTCULLIS_HELM`
/// names a missing file.
pub fn helm_or_skip(test: &str) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(HELM_VARIABLE) {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "{HELM_VARIABLE}={} is not a file",
            path.display()
        );
        return Some(path);
    }
    static INSTALLED: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let installed = INSTALLED
        .get_or_init(|| run_install_script(&repository_root().join("tests/peers/helm.sh")));
    found_or_skip(test, "helm", installed)
}

/// Returns a python that can import kubernetes_validate, or `None` after printing `SKIPPED`.
pub fn schema_validator_or_skip(test: &str) -> Option<PathBuf> {
    static INSTALLED: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let installed = INSTALLED
        .get_or_init(|| run_install_script(&chart_dir().join("tests/kubernetes-validate.sh")));
    found_or_skip(test, "kubernetes-validate", installed)
}

fn found_or_skip(test: &str, peer: &str, installed: &Result<PathBuf, String>) -> Option<PathBuf> {
    match installed {
        Ok(path) => Some(path.clone()),
        Err(reason) if std::env::var(REQUIRE_PEERS_VARIABLE).as_deref() == Ok("1") => {
            panic!("{test}: {peer} is not available and {REQUIRE_PEERS_VARIABLE}=1: {reason}")
        }
        Err(reason) => {
            // Written to the real stderr, which libtest does not capture, so that the skip
            // shows in a normal `cargo test` run.
            let line = format!(
                "SKIPPED: {test}: {peer} is not available: {reason} (set {REQUIRE_PEERS_VARIABLE}=1 to fail instead)\n"
            );
            let _ = std::io::stderr().write_all(line.as_bytes());
            None
        }
    }
}

/// Runs an install script that prints a path on its last stdout line.
fn run_install_script(script: &Path) -> Result<PathBuf, String> {
    let output = Command::new("bash")
        .arg(script)
        .output()
        .map_err(|error| format!("running {} failed: {error}", script.display()))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        return Err(format!(
            "{} exited with {}: {}",
            script.display(),
            output.status,
            stderr.trim()
        ));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let path = stdout.lines().last().unwrap_or_default().trim();
    if path.is_empty() {
        return Err(format!(
            "{} printed no path; stderr: {}",
            script.display(),
            stderr.trim()
        ));
    }
    Ok(PathBuf::from(path))
}

/// Output of one helm run.
pub struct HelmOutput {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

pub fn run_helm(helm: &Path, arguments: &[&str]) -> HelmOutput {
    let output = Command::new(helm)
        .args(arguments)
        .current_dir(repository_root())
        .output()
        .unwrap_or_else(|error| panic!("running {} failed: {error}", helm.display()));
    HelmOutput {
        success: output.status.success(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Renders the chart with an optional values file and extra `--set` style arguments, and
/// panics with helm's message when rendering fails.
pub fn render(helm: &Path, values: Option<&Path>, extra: &[&str]) -> String {
    let chart = chart_dir();
    let chart = chart.to_str().expect("the chart path is UTF-8");
    let values_text =
        values.map(|path| path.to_str().expect("the values path is UTF-8").to_owned());
    let mut arguments = vec!["template", RELEASE, chart, "--namespace", NAMESPACE];
    if let Some(values) = &values_text {
        arguments.extend(["--values", values.as_str()]);
    }
    arguments.extend_from_slice(extra);

    let output = run_helm(helm, &arguments);
    assert!(
        output.success,
        "helm {} failed: {}",
        arguments.join(" "),
        output.stderr
    );
    output.stdout
}

/// Returns the values files under `charts/portcullis/tests/values`, sorted.
pub fn values_files() -> Vec<PathBuf> {
    sorted_yaml_files(&chart_dir().join("tests/values"))
}

/// Returns the values files under `charts/portcullis/tests/invalid`, sorted.
pub fn invalid_values_files() -> Vec<PathBuf> {
    sorted_yaml_files(&chart_dir().join("tests/invalid"))
}

fn sorted_yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|error| panic!("listing {} failed: {error}", dir.display()))
        .map(|entry| entry.expect("reading a folder entry failed").path())
        .filter(|path| {
            path.extension()
                .is_some_and(|extension| extension == "yaml")
        })
        .collect();
    files.sort();
    files
}

/// Parses a multi-document YAML stream into JSON values, skipping empty documents.
pub fn parse_documents(text: &str) -> Vec<Value> {
    use saphyr::{LoadableYamlNode, Yaml};

    let documents =
        Yaml::load_from_str(text).unwrap_or_else(|error| panic!("invalid YAML: {error}"));
    documents
        .iter()
        .map(yaml_to_json)
        .filter(|document| !document.is_null())
        .collect()
}

pub fn parse_yaml(text: &str) -> Value {
    let mut documents = parse_documents(text);
    assert_eq!(documents.len(), 1, "expected one YAML document in:\n{text}");
    documents.remove(0)
}

fn yaml_to_json(node: &saphyr::Yaml<'_>) -> Value {
    use saphyr::{Scalar, Yaml};

    match node {
        Yaml::Value(Scalar::Null) => Value::Null,
        Yaml::Value(Scalar::Boolean(value)) => Value::Bool(*value),
        Yaml::Value(Scalar::Integer(value)) => Value::from(*value),
        Yaml::Value(Scalar::FloatingPoint(value)) => Value::from(value.into_inner()),
        Yaml::Value(Scalar::String(value)) => Value::String(value.to_string()),
        Yaml::Representation(text, _, _) => Value::String(text.to_string()),
        Yaml::Sequence(items) => Value::Array(items.iter().map(yaml_to_json).collect()),
        Yaml::Mapping(entries) => {
            let mut object = Map::new();
            for (key, value) in entries {
                let key = match key {
                    Yaml::Value(Scalar::String(text)) => text.to_string(),
                    other => panic!("unsupported YAML key {other:?}"),
                };
                object.insert(key, yaml_to_json(value));
            }
            Value::Object(object)
        }
        other => panic!("unsupported YAML node {other:?}"),
    }
}

/// Returns the objects of `kind`.
pub fn of_kind<'a>(documents: &'a [Value], kind: &str) -> Vec<&'a Value> {
    documents
        .iter()
        .filter(|document| document["kind"] == kind)
        .collect()
}

/// Returns the one object of `kind` named `name` in `namespace` (`None` for cluster scope).
pub fn find<'a>(
    documents: &'a [Value],
    kind: &str,
    namespace: Option<&str>,
    name: &str,
) -> &'a Value {
    let matches: Vec<&Value> = documents
        .iter()
        .filter(|document| {
            document["kind"] == kind
                && document["metadata"]["name"] == name
                && document["metadata"]["namespace"].as_str() == namespace
        })
        .collect();
    assert_eq!(
        matches.len(),
        1,
        "expected one {kind} {namespace:?}/{name}, found {}",
        matches.len()
    );
    matches[0]
}
