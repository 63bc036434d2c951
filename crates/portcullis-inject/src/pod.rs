//! Reading the few fields of a pod that decide whether and how it is injected.

use serde_json::{Map, Value};

use crate::review::MutationError;

/// Annotation or label that opts a pod out of injection with the value `"false"`.
pub const INJECT_ANNOTATION: &str = "portcullis.io/inject";
/// The label form of [`INJECT_ANNOTATION`]; the webhook's objectSelector also matches it, so
/// the API server does not even call the injector for such pods.
pub const INJECT_LABEL: &str = "portcullis.io/inject";
/// Annotation that the injector adds to every pod it injects.
pub const INJECTED_ANNOTATION: &str = "portcullis.io/injected";
/// Name of the injected container. A pod that already has a container or init container of
/// this name is left alone.
pub const SIDECAR_CONTAINER_NAME: &str = "portcullis";

/// Reason to admit a pod without a patch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SkipReason {
    OptedOutByAnnotation,
    OptedOutByLabel,
    AlreadyAnnotated,
    ContainerPresent,
}

impl SkipReason {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            SkipReason::OptedOutByAnnotation => "opted out by annotation portcullis.io/inject",
            SkipReason::OptedOutByLabel => "opted out by label portcullis.io/inject",
            SkipReason::AlreadyAnnotated => "already injected (annotation portcullis.io/injected)",
            SkipReason::ContainerPresent => "already has a container named portcullis",
        }
    }
}

/// A read-only view of a pod object.
pub(crate) struct Pod<'a> {
    object: &'a Map<String, Value>,
}

impl<'a> Pod<'a> {
    pub(crate) fn new(value: &'a Value) -> Result<Self, MutationError> {
        match value {
            Value::Object(object) => Ok(Pod { object }),
            other => Err(MutationError::WrongType {
                path: "request.object".to_owned(),
                expected: "an object",
                found: json_kind(other),
            }),
        }
    }

    /// Returns the reason to leave the pod alone, if there is one.
    pub(crate) fn skip_reason(&self) -> Result<Option<SkipReason>, MutationError> {
        if self
            .string_entry("annotations", INJECT_ANNOTATION)?
            .is_some_and(is_false)
        {
            return Ok(Some(SkipReason::OptedOutByAnnotation));
        }
        if self
            .string_entry("labels", INJECT_LABEL)?
            .is_some_and(is_false)
        {
            return Ok(Some(SkipReason::OptedOutByLabel));
        }
        if self.string_entry("annotations", INJECTED_ANNOTATION)? == Some("true") {
            return Ok(Some(SkipReason::AlreadyAnnotated));
        }
        for field in ["initContainers", "containers"] {
            let has_sidecar = self.containers(field)?.iter().any(|container| {
                container.get("name") == Some(&Value::from(SIDECAR_CONTAINER_NAME))
            });
            if has_sidecar {
                return Ok(Some(SkipReason::ContainerPresent));
            }
        }
        Ok(None)
    }

    /// Returns `metadata`; `None` when it is missing or null.
    pub(crate) fn metadata(&self) -> Result<Option<&'a Map<String, Value>>, MutationError> {
        optional_object(self.object.get("metadata"), "request.object.metadata")
    }

    /// Returns `metadata.<field>` (`labels` or `annotations`); `None` when missing or null.
    pub(crate) fn metadata_map(
        &self,
        field: &str,
    ) -> Result<Option<&'a Map<String, Value>>, MutationError> {
        let Some(metadata) = self.metadata()? else {
            return Ok(None);
        };
        optional_object(
            metadata.get(field),
            &format!("request.object.metadata.{field}"),
        )
    }

    /// Returns `spec`, which every pod has.
    pub(crate) fn spec(&self) -> Result<&'a Map<String, Value>, MutationError> {
        optional_object(self.object.get("spec"), "request.object.spec")?
            .ok_or(MutationError::MissingSpec)
    }

    /// Returns the array `spec.<field>`; `None` when it is missing or null.
    pub(crate) fn spec_array(&self, field: &str) -> Result<Option<&'a Vec<Value>>, MutationError> {
        let path = format!("request.object.spec.{field}");
        match self.spec()?.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Array(items)) => Ok(Some(items)),
            Some(other) => Err(MutationError::WrongType {
                path,
                expected: "an array",
                found: json_kind(other),
            }),
        }
    }

    /// Returns the objects of `spec.containers` or `spec.initContainers`.
    pub(crate) fn containers(
        &self,
        field: &str,
    ) -> Result<Vec<&'a Map<String, Value>>, MutationError> {
        let Some(items) = self.spec_array(field)? else {
            return Ok(Vec::new());
        };
        items
            .iter()
            .enumerate()
            .map(|(index, item)| {
                item.as_object().ok_or_else(|| MutationError::WrongType {
                    path: format!("request.object.spec.{field}[{index}]"),
                    expected: "an object",
                    found: json_kind(item),
                })
            })
            .collect()
    }

    /// Returns the names in `spec.volumes`.
    pub(crate) fn volume_names(&self) -> Result<Vec<&'a str>, MutationError> {
        let Some(volumes) = self.spec_array("volumes")? else {
            return Ok(Vec::new());
        };
        Ok(volumes
            .iter()
            .filter_map(|volume| volume.get("name").and_then(Value::as_str))
            .collect())
    }

    /// Returns each container's name with the `containerPort` numbers it declares.
    pub(crate) fn declared_ports(&self) -> Result<Vec<(String, i64)>, MutationError> {
        let mut ports = Vec::new();
        for field in ["initContainers", "containers"] {
            for container in self.containers(field)? {
                let name = container
                    .get("name")
                    .and_then(Value::as_str)
                    .unwrap_or("(unnamed)");
                let declared = container
                    .get("ports")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|port| port.get("containerPort").and_then(Value::as_i64));
                ports.extend(declared.map(|port| (name.to_owned(), port)));
            }
        }
        Ok(ports)
    }

    /// Returns `metadata.name`, or `metadata.generateName` for pods of a controller, for logs.
    pub(crate) fn display_name(&self) -> String {
        let metadata = self.object.get("metadata");
        let field = |key: &str| metadata.and_then(|m| m.get(key)).and_then(Value::as_str);
        match (field("name"), field("generateName")) {
            (Some(name), _) if !name.is_empty() => name.to_owned(),
            (_, Some(prefix)) if !prefix.is_empty() => format!("{prefix}*"),
            _ => "(unnamed)".to_owned(),
        }
    }

    /// Returns the string value of `metadata.<map>.<key>`. A value that is not a string is
    /// invalid in a pod, so it is reported instead of ignored.
    fn string_entry(&self, map: &str, key: &str) -> Result<Option<&'a str>, MutationError> {
        let Some(entries) = self.metadata_map(map)? else {
            return Ok(None);
        };
        match entries.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(value)) => Ok(Some(value.as_str())),
            Some(other) => Err(MutationError::WrongType {
                path: format!("request.object.metadata.{map}[{key:?}]"),
                expected: "a string",
                found: json_kind(other),
            }),
        }
    }
}

/// Opt-out values are compared without regard to case and surrounding spaces, so that
/// `False` opts out too instead of silently injecting.
fn is_false(value: &str) -> bool {
    value.trim().eq_ignore_ascii_case("false")
}

fn optional_object<'a>(
    value: Option<&'a Value>,
    path: &str,
) -> Result<Option<&'a Map<String, Value>>, MutationError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(object)) => Ok(Some(object)),
        Some(other) => Err(MutationError::WrongType {
            path: path.to_owned(),
            expected: "an object",
            found: json_kind(other),
        }),
    }
}

/// Names the JSON type of `value` for error messages.
pub(crate) fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
