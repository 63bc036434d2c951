//! The bundle's `.manifest` file and OPA's rules for manifest roots.

use serde_json::Value as JsonValue;

use crate::error::BundleError;

/// Rego syntax version that a bundle declares in its manifest (`rego_version`, OPA 1.x).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegoVersion {
    /// Rego v0: `if` and `contains` are optional keywords, as before OPA 1.0.
    V0,
    /// Rego v1: the OPA 1.x default.
    V1,
}

/// The fields of `.manifest` that portcullis uses. Unknown keys are ignored, as OPA does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Manifest {
    pub revision: Option<String>,
    /// Roots without leading or trailing `/`. The empty string is the whole `data` tree.
    pub roots: Vec<String>,
    pub rego_version: Option<RegoVersion>,
}

impl Default for Manifest {
    /// Returns the manifest of a bundle without `.manifest`, which owns the whole `data`
    /// tree, as in OPA.
    fn default() -> Self {
        Manifest {
            revision: None,
            roots: vec![String::new()],
            rego_version: None,
        }
    }
}

impl Manifest {
    /// Parses `.manifest` and checks that its roots do not overlap.
    // NOTE: OPA's per-file `file_rego_versions` key is ignored, so a bundle that mixes
    // v0 and v1 files must be converted to one version before portcullis can load it.
    pub fn parse(bytes: &[u8]) -> Result<Manifest, BundleError> {
        let document: JsonValue = serde_json::from_slice(bytes).map_err(|error| invalid(&error))?;
        let JsonValue::Object(fields) = document else {
            return Err(invalid("the manifest must be a JSON object"));
        };

        let revision = match fields.get("revision") {
            None | Some(JsonValue::Null) => None,
            Some(JsonValue::String(revision)) if revision.is_empty() => None,
            Some(JsonValue::String(revision)) => Some(revision.clone()),
            Some(other) => {
                return Err(invalid(format!("revision must be a string, found {other}")));
            }
        };

        let roots = match fields.get("roots") {
            None | Some(JsonValue::Null) => Manifest::default().roots,
            Some(JsonValue::Array(items)) => parse_roots(items)?,
            Some(other) => {
                return Err(invalid(format!(
                    "roots must be an array of strings, found {other}"
                )));
            }
        };
        check_roots_disjoint(&roots)?;

        let rego_version = match fields.get("rego_version") {
            None | Some(JsonValue::Null) => None,
            Some(value) if value.as_u64() == Some(0) => Some(RegoVersion::V0),
            Some(value) if value.as_u64() == Some(1) => Some(RegoVersion::V1),
            Some(other) => {
                return Err(invalid(format!(
                    "rego_version must be 0 or 1, found {other}"
                )));
            }
        };

        Ok(Manifest {
            revision,
            roots,
            rego_version,
        })
    }
}

fn parse_roots(items: &[JsonValue]) -> Result<Vec<String>, BundleError> {
    let mut roots = Vec::with_capacity(items.len());
    for item in items {
        let JsonValue::String(root) = item else {
            return Err(invalid(format!("roots must contain strings, found {item}")));
        };
        roots.push(root.trim_matches('/').to_string());
    }
    Ok(roots)
}

/// Rejects roots where one contains the other, which OPA also rejects.
fn check_roots_disjoint(roots: &[String]) -> Result<(), BundleError> {
    for (index, first) in roots.iter().enumerate() {
        for second in &roots[index + 1..] {
            if root_contains(first, second) || root_contains(second, first) {
                return Err(invalid(format!("roots {first:?} and {second:?} overlap")));
            }
        }
    }
    Ok(())
}

/// Returns whether `path` (slash-separated, no leading `/`) lies under `root`.
///
/// The comparison is per path segment, so root `envoy` contains `envoy/authz` but not
/// `envoyx`.
pub(crate) fn root_contains(root: &str, path: &str) -> bool {
    if root.is_empty() {
        return true;
    }

    let mut path_segments = path.split('/');
    root.split('/')
        .all(|root_segment| path_segments.next() == Some(root_segment))
}

/// Returns whether any of `roots` contains `path`.
pub(crate) fn roots_contain(roots: &[String], path: &str) -> bool {
    roots.iter().any(|root| root_contains(root, path))
}

fn invalid(message: impl ToString) -> BundleError {
    BundleError::InvalidManifest {
        message: message.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_contains_compares_whole_segments() {
        assert!(root_contains("envoy", "envoy"));
        assert!(root_contains("envoy", "envoy/authz"));
        assert!(!root_contains("envoy", "envoyx"));
        assert!(!root_contains("envoy/authz", "envoy"));
        assert!(root_contains("", "anything/at/all"));
    }

    #[test]
    fn manifest_without_roots_owns_everything() {
        let manifest = Manifest::parse(br#"{"revision": "r1", "metadata": {"x": 1}}"#).unwrap();

        assert_eq!(manifest.revision.as_deref(), Some("r1"));
        assert_eq!(manifest.roots, vec![String::new()]);
        assert_eq!(manifest.rego_version, None);
    }

    #[test]
    fn manifest_roots_are_trimmed_of_slashes() {
        let manifest = Manifest::parse(br#"{"roots": ["/envoy/", "acme/x"]}"#).unwrap();

        assert_eq!(
            manifest.roots,
            vec!["envoy".to_string(), "acme/x".to_string()]
        );
    }

    #[test]
    fn manifest_with_overlapping_roots_is_rejected() {
        let error = Manifest::parse(br#"{"roots": ["envoy", "envoy/authz"]}"#).unwrap_err();

        assert_eq!(
            error.to_string(),
            r#"invalid bundle manifest .manifest: roots "envoy" and "envoy/authz" overlap"#
        );
    }

    #[test]
    fn manifest_revision_must_be_a_string() {
        let error = Manifest::parse(br#"{"revision": 7}"#).unwrap_err();

        assert_eq!(
            error.to_string(),
            "invalid bundle manifest .manifest: revision must be a string, found 7"
        );
    }

    #[test]
    fn manifest_rego_version_zero_selects_v0() {
        let manifest = Manifest::parse(br#"{"rego_version": 0}"#).unwrap();

        assert_eq!(manifest.rego_version, Some(RegoVersion::V0));
    }
}
