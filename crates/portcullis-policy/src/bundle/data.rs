//! Data files (`data.json`, `data.yaml`, `data.yml`): parsing, placement in the data
//! document, and the manifest-roots check.

use saphyr::{LoadableYamlNode, Scalar, Yaml};
use saphyr_parser::{Event, Parser as YamlParser};
use serde_json::{Map as JsonMap, Value as JsonValue};

use super::manifest::roots_contain;
use crate::error::BundleError;

/// Maximum nesting of a YAML data document, the same bound serde_json applies to JSON.
///
/// saphyr 0.3.4 overflowed a 2 MiB thread stack, which aborts the process, on 200,000
/// levels of `- ` (a 400 KB file). Depth is therefore checked on the event stream before a
/// tree is built.
const MAX_YAML_DEPTH: usize = 128;

/// Parses a `data.json` file.
pub(crate) fn parse_json(file: &str, bytes: &[u8]) -> Result<JsonValue, BundleError> {
    serde_json::from_slice(bytes).map_err(|error| BundleError::InvalidData {
        file: file.to_string(),
        line: error.line(),
        column: error.column(),
        message: error.to_string(),
    })
}

/// Parses a `data.yaml` file holding exactly one YAML document into a JSON value.
///
/// Mapping keys that are numbers, booleans or null become strings, as OPA's YAML loader
/// (sigs.k8s.io/yaml) does. Anchors and aliases are expanded.
pub(crate) fn parse_yaml(file: &str, bytes: &[u8]) -> Result<JsonValue, BundleError> {
    let text = std::str::from_utf8(bytes).map_err(|_| BundleError::InvalidUtf8 {
        file: file.to_string(),
    })?;
    check_yaml_depth(file, text)?;

    let documents = Yaml::load_from_str(text).map_err(|error| BundleError::InvalidData {
        file: file.to_string(),
        line: error.marker().line(),
        column: error.marker().col() + 1,
        message: error.info().to_string(),
    })?;
    let [document] = documents.as_slice() else {
        return Err(yaml_error(
            file,
            format!("expected one YAML document, found {}", documents.len()),
        ));
    };

    yaml_to_json(document).map_err(|message| yaml_error(file, message))
}

/// Rejects YAML whose nesting, with aliases expanded, exceeds [`MAX_YAML_DEPTH`].
fn check_yaml_depth(file: &str, text: &str) -> Result<(), BundleError> {
    // Each open collection remembers its anchor and the deepest level seen inside it, so an
    // alias can be charged with the depth of the subtree it will expand to.
    struct OpenCollection {
        anchor: usize,
        depth: usize,
        deepest: usize,
    }

    let mut open: Vec<OpenCollection> = Vec::new();
    let mut anchor_depths: std::collections::HashMap<usize, usize> = Default::default();

    for event in YamlParser::new_from_str(text) {
        let (event, span) = event.map_err(|error| BundleError::InvalidData {
            file: file.to_string(),
            line: error.marker().line(),
            column: error.marker().col() + 1,
            message: error.info().to_string(),
        })?;
        let depth = open.len();

        let reached = match event {
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                open.push(OpenCollection {
                    anchor,
                    depth: depth + 1,
                    deepest: depth + 1,
                });
                depth + 1
            }
            Event::SequenceEnd | Event::MappingEnd => {
                if let Some(closed) = open.pop() {
                    if closed.anchor > 0 {
                        anchor_depths.insert(closed.anchor, closed.deepest - closed.depth + 1);
                    }
                    if let Some(parent) = open.last_mut() {
                        parent.deepest = parent.deepest.max(closed.deepest);
                    }
                }
                continue;
            }
            Event::Alias(anchor) => depth + anchor_depths.get(&anchor).copied().unwrap_or(0),
            _ => depth,
        };

        if let Some(innermost) = open.last_mut() {
            innermost.deepest = innermost.deepest.max(reached);
        }
        if reached > MAX_YAML_DEPTH {
            return Err(BundleError::InvalidData {
                file: file.to_string(),
                line: span.start.line(),
                column: span.start.col() + 1,
                message: format!("YAML nesting exceeds {MAX_YAML_DEPTH} levels"),
            });
        }
    }
    Ok(())
}

fn yaml_to_json(node: &Yaml<'_>) -> Result<JsonValue, String> {
    match node {
        Yaml::Value(scalar) => scalar_to_json(scalar),
        Yaml::Sequence(items) => items
            .iter()
            .map(yaml_to_json)
            .collect::<Result<Vec<_>, _>>()
            .map(JsonValue::Array),
        Yaml::Mapping(entries) => {
            let mut object = JsonMap::with_capacity(entries.len());
            for (key, value) in entries {
                object.insert(yaml_key(key)?, yaml_to_json(value)?);
            }
            Ok(JsonValue::Object(object))
        }
        Yaml::Tagged(_, inner) => yaml_to_json(inner),
        Yaml::Representation(text, _, _) => Ok(JsonValue::String(text.to_string())),
        Yaml::Alias(_) => Err("unresolved YAML alias".to_string()),
        Yaml::BadValue => Err("invalid YAML value (bad tag or unknown anchor)".to_string()),
    }
}

fn scalar_to_json(scalar: &Scalar<'_>) -> Result<JsonValue, String> {
    Ok(match scalar {
        Scalar::Null => JsonValue::Null,
        Scalar::Boolean(value) => JsonValue::Bool(*value),
        Scalar::Integer(value) => JsonValue::from(*value),
        Scalar::FloatingPoint(value) => serde_json::Number::from_f64(value.into_inner())
            .map(JsonValue::Number)
            .ok_or_else(|| format!("{} cannot be represented in JSON", value.into_inner()))?,
        Scalar::String(value) => JsonValue::String(value.to_string()),
    })
}

fn yaml_key(key: &Yaml<'_>) -> Result<String, String> {
    match key {
        Yaml::Value(Scalar::String(text)) => Ok(text.to_string()),
        Yaml::Value(Scalar::Null) => Ok("null".to_string()),
        Yaml::Value(Scalar::Boolean(value)) => Ok(value.to_string()),
        Yaml::Value(Scalar::Integer(value)) => Ok(value.to_string()),
        Yaml::Value(Scalar::FloatingPoint(value)) => Ok(value.into_inner().to_string()),
        Yaml::Tagged(_, inner) => yaml_key(inner),
        other => Err(format!(
            "mapping keys must be scalars, found {}",
            yaml_kind(other)
        )),
    }
}

fn yaml_kind(node: &Yaml<'_>) -> &'static str {
    match node {
        Yaml::Sequence(_) => "a sequence",
        Yaml::Mapping(_) => "a mapping",
        _ => "a non-scalar value",
    }
}

fn yaml_error(file: &str, message: String) -> BundleError {
    BundleError::InvalidDataValue {
        file: file.to_string(),
        message,
    }
}

/// Merges `value` into `document` at `path` (the data file's folder), as OPA does: objects
/// merge key by key, and any other overlap is a conflict.
pub(crate) fn place(
    document: &mut JsonMap<String, JsonValue>,
    path: &[&str],
    value: JsonValue,
    file: &str,
) -> Result<(), BundleError> {
    let conflict = |depth: usize| BundleError::DataConflict {
        file: file.to_string(),
        path: format!("/{}", path[..depth].join("/")),
    };

    let Some((last, parents)) = path.split_last() else {
        let JsonValue::Object(fields) = value else {
            return Err(BundleError::RootDataNotObject {
                file: file.to_string(),
                found: json_kind(&value),
            });
        };
        return merge_objects(document, fields, &mut Vec::new()).map_err(|mut at| {
            at.insert(0, String::new());
            BundleError::DataConflict {
                file: file.to_string(),
                path: at.join("/"),
            }
        });
    };

    let mut current = document;
    for (depth, segment) in parents.iter().enumerate() {
        let child = current
            .entry(segment.to_string())
            .or_insert_with(|| JsonValue::Object(JsonMap::new()));
        let JsonValue::Object(child) = child else {
            return Err(conflict(depth + 1));
        };
        current = child;
    }

    match current.get_mut(*last) {
        None => {
            current.insert(last.to_string(), value);
            Ok(())
        }
        Some(JsonValue::Object(existing)) => {
            let JsonValue::Object(fields) = value else {
                return Err(conflict(path.len()));
            };
            merge_objects(existing, fields, &mut Vec::new()).map_err(|at| {
                BundleError::DataConflict {
                    file: file.to_string(),
                    path: format!("/{}/{}", path.join("/"), at.join("/")),
                }
            })
        }
        Some(_) => Err(conflict(path.len())),
    }
}

/// Deep-merges `incoming` into `target`; on conflict returns the relative key path.
fn merge_objects(
    target: &mut JsonMap<String, JsonValue>,
    incoming: JsonMap<String, JsonValue>,
    at: &mut Vec<String>,
) -> Result<(), Vec<String>> {
    for (key, value) in incoming {
        match (target.get_mut(&key), value) {
            (None, value) => {
                target.insert(key, value);
            }
            (Some(JsonValue::Object(existing)), JsonValue::Object(fields)) => {
                at.push(key);
                merge_objects(existing, fields, at)?;
                at.pop();
            }
            (Some(_), _) => {
                at.push(key);
                return Err(at.clone());
            }
        }
    }
    Ok(())
}

/// Checks every data path against the manifest roots with OPA's rule.
///
/// A value is permitted when a root contains its path. An object that is a parent of a
/// root is also permitted, and its members are checked one by one.
pub(crate) fn check_roots(document: &JsonValue, roots: &[String]) -> Result<(), BundleError> {
    let mut pending: Vec<(String, &JsonValue)> = vec![(String::new(), document)];

    while let Some((path, node)) = pending.pop() {
        if roots_contain(roots, &path) {
            continue;
        }

        let is_parent_of_root = roots
            .iter()
            .any(|root| path.is_empty() || super::manifest::root_contains(&path, root));
        match node {
            JsonValue::Object(fields) if is_parent_of_root => {
                for (key, child) in fields {
                    let child_path = if path.is_empty() {
                        key.clone()
                    } else {
                        format!("{path}/{key}")
                    };
                    pending.push((child_path, child));
                }
            }
            _ => {
                return Err(BundleError::DataOutsideRoots {
                    path: format!("/{path}"),
                    roots: roots.to_vec(),
                });
            }
        }
    }
    Ok(())
}

fn json_kind(value: &JsonValue) -> &'static str {
    match value {
        JsonValue::Null => "null",
        JsonValue::Bool(_) => "a boolean",
        JsonValue::Number(_) => "a number",
        JsonValue::String(_) => "a string",
        JsonValue::Array(_) => "an array",
        JsonValue::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn placed(files: &[(&[&str], JsonValue)]) -> Result<JsonValue, BundleError> {
        let mut document = JsonMap::new();
        for (path, value) in files {
            place(&mut document, path, value.clone(), "data.json")?;
        }
        Ok(JsonValue::Object(document))
    }

    #[test]
    fn place_nests_value_under_folder_path() {
        let document = placed(&[(&["a", "b"], json!({"x": 1}))]).unwrap();

        assert_eq!(document, json!({"a": {"b": {"x": 1}}}));
    }

    #[test]
    fn place_merges_objects_from_two_files() {
        let document = placed(&[
            (&[], json!({"a": {"b": {"x": 1}}})),
            (&["a", "b"], json!({"y": 2})),
        ])
        .unwrap();

        assert_eq!(document, json!({"a": {"b": {"x": 1, "y": 2}}}));
    }

    #[test]
    fn place_reports_conflicting_leaf_path() {
        let error =
            placed(&[(&[], json!({"a": {"b": 1}})), (&["a"], json!({"b": 2}))]).unwrap_err();

        assert_eq!(
            error.to_string(),
            "data file data.json conflicts with other bundle data at path /a/b"
        );
    }

    #[test]
    fn root_data_must_be_an_object() {
        let error = placed(&[(&[], json!([1, 2]))]).unwrap_err();

        assert_eq!(
            error.to_string(),
            "data file data.json at the bundle root must contain an object, found an array"
        );
    }

    #[test]
    fn check_roots_allows_parents_of_roots() {
        let roots = vec!["envoy/authz".to_string()];

        assert!(check_roots(&json!({"envoy": {"authz": {"x": 1}}}), &roots).is_ok());
        let error = check_roots(&json!({"envoy": {"other": 1}}), &roots).unwrap_err();
        assert_eq!(
            error.to_string(),
            r#"manifest roots ["envoy/authz"] do not permit data at path /envoy/other"#
        );
    }

    #[test]
    fn yaml_numbers_and_keys_convert_like_opa() {
        let value = parse_yaml("data.yaml", b"1: one\ntrue: yes\nlist: [1, 2.5, null]\n").unwrap();

        assert_eq!(
            value,
            json!({"1": "one", "true": "yes", "list": [1, 2.5, null]})
        );
    }

    #[test]
    fn yaml_anchor_is_expanded() {
        let value = parse_yaml("data.yaml", b"base: &b {x: 1}\ncopy: *b\n").unwrap();

        assert_eq!(value, json!({"base": {"x": 1}, "copy": {"x": 1}}));
    }

    #[test]
    fn yaml_deep_nesting_is_rejected_before_building() {
        let text = "- ".repeat(200_000) + "1\n";

        let error = parse_yaml("a/data.yaml", text.as_bytes()).unwrap_err();

        assert_eq!(
            error.to_string(),
            "invalid data file a/data.yaml at line 1, column 257: YAML nesting exceeds 128 levels"
        );
    }

    #[test]
    fn yaml_nesting_through_aliases_is_counted() {
        // Each anchor nests the previous one two levels deeper, so the expanded document is
        // deeper than any single line shows.
        let mut text = String::from("a0: &a0 [[1]]\n");
        for index in 1..80 {
            text.push_str(&format!("a{index}: &a{index} [[*a{}]]\n", index - 1));
        }

        let error = parse_yaml("data.yaml", text.as_bytes()).unwrap_err();

        assert!(
            error
                .to_string()
                .ends_with("YAML nesting exceeds 128 levels"),
            "unexpected error: {error}"
        );
    }

    #[test]
    fn yaml_with_two_documents_is_rejected() {
        let error = parse_yaml("data.yaml", b"a: 1\n---\nb: 2\n").unwrap_err();

        assert_eq!(
            error.to_string(),
            "invalid data file data.yaml: expected one YAML document, found 2"
        );
    }
}
