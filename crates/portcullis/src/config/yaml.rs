//! A YAML document read into a small tree that keeps each node's line, so configuration
//! problems can name both the key path and where it sits in the file.

use saphyr::{LoadableYamlNode, MarkedYaml, Scalar, YamlData};

/// One YAML node with the 1-based line it starts on.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub line: usize,
    pub value: NodeValue,
}

#[derive(Debug, Clone, PartialEq)]
pub enum NodeValue {
    Null,
    Bool(bool),
    Integer(i64),
    Float(f64),
    String(String),
    Sequence(Vec<Node>),
    /// Keys in document order. Non-string keys are kept as their YAML text.
    Mapping(Vec<(String, Node)>),
    /// Aliases, tags and anything else a configuration file has no use for.
    Unsupported(&'static str),
}

impl NodeValue {
    /// Names the kind of value for error messages (`found a sequence`).
    pub fn kind(&self) -> &'static str {
        match self {
            NodeValue::Null => "null",
            NodeValue::Bool(_) => "a boolean",
            NodeValue::Integer(_) => "an integer",
            NodeValue::Float(_) => "a number",
            NodeValue::String(_) => "a string",
            NodeValue::Sequence(_) => "a sequence",
            NodeValue::Mapping(_) => "a mapping",
            NodeValue::Unsupported(kind) => kind,
        }
    }
}

/// A YAML syntax error with its position.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid YAML at line {line}, column {column}: {message}")]
pub struct SyntaxError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// Parses a single YAML document. An empty file is an empty mapping.
pub fn parse(text: &str) -> Result<Node, SyntaxError> {
    let documents = MarkedYaml::load_from_str(text).map_err(|error| SyntaxError {
        line: error.marker().line(),
        column: error.marker().col() + 1,
        message: error.info().to_owned(),
    })?;
    let mut documents = documents.into_iter();
    let root = match documents.next() {
        Some(document) => convert(&document),
        None => Node { line: 1, value: NodeValue::Mapping(Vec::new()) },
    };
    if let Some(extra) = documents.next() {
        return Err(SyntaxError {
            line: extra.span.start.line(),
            column: 1,
            message: "more than one YAML document; a configuration file must contain exactly one".to_owned(),
        });
    }
    Ok(root)
}

fn convert(node: &MarkedYaml<'_>) -> Node {
    let line = node.span.start.line();
    let value = match &node.data {
        YamlData::Value(scalar) => convert_scalar(scalar),
        YamlData::Sequence(items) => NodeValue::Sequence(items.iter().map(convert).collect()),
        YamlData::Mapping(entries) => NodeValue::Mapping(
            entries
                .iter()
                .map(|(key, value)| (key_text(key), convert(value)))
                .collect(),
        ),
        YamlData::Representation(text, _, _) => NodeValue::String(text.to_string()),
        YamlData::Tagged(_, _) => NodeValue::Unsupported("a tagged value"),
        YamlData::Alias(_) => NodeValue::Unsupported("an alias"),
        YamlData::BadValue => NodeValue::Unsupported("an invalid value"),
    };
    Node { line, value }
}

fn convert_scalar(scalar: &Scalar<'_>) -> NodeValue {
    match scalar {
        Scalar::Null => NodeValue::Null,
        Scalar::Boolean(value) => NodeValue::Bool(*value),
        Scalar::Integer(value) => NodeValue::Integer(*value),
        Scalar::FloatingPoint(value) => NodeValue::Float(value.into_inner()),
        Scalar::String(value) => NodeValue::String(value.to_string()),
    }
}

fn key_text(key: &MarkedYaml<'_>) -> String {
    match &key.data {
        YamlData::Value(Scalar::String(text)) => text.to_string(),
        YamlData::Value(Scalar::Integer(value)) => value.to_string(),
        YamlData::Value(Scalar::Boolean(value)) => value.to_string(),
        YamlData::Value(Scalar::FloatingPoint(value)) => value.to_string(),
        YamlData::Value(Scalar::Null) => "null".to_owned(),
        YamlData::Representation(text, _, _) => text.to_string(),
        _ => "<complex key>".to_owned(),
    }
}
