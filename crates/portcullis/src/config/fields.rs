//! Typed reading of configuration mappings that collects every problem instead of stopping
//! at the first, each named by its key path and line.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::yaml::{Node, NodeValue};

/// One thing wrong with a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key path, e.g. `listen.max_message_bytes`; empty for the whole file.
    pub path: String,
    /// 1-based line of the offending node, when known.
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = if self.path.is_empty() { "(file)" } else { &self.path };
        match self.line {
            Some(line) => write!(f, "{path} (line {line}): {}", self.message),
            None => write!(f, "{path}: {}", self.message),
        }
    }
}

/// Key names that would hold a secret inline. Secrets belong in files referenced by path,
/// so they never land in a ConfigMap, a shell history or a log of the configuration.
const SECRET_KEYS: &[&str] = &["password", "secret", "token", "private_key", "client_secret", "api_key"];

/// Reads the keys of one mapping. Unknown keys are reported when the reader is created;
/// each typed getter reports a wrong type or value and returns `None`.
pub struct Fields<'a> {
    entries: &'a [(String, Node)],
    path: String,
    line: Option<usize>,
    base_dir: &'a Path,
}

impl<'a> Fields<'a> {
    /// Starts reading `node` at `path`, which must be a mapping with keys from `known`.
    /// A missing section (`None`) reads as an empty mapping so every key takes its default.
    pub fn new(
        node: Option<&'a Node>,
        path: &str,
        known: &[&str],
        base_dir: &'a Path,
        problems: &mut Vec<Problem>,
    ) -> Fields<'a> {
        let empty: &'a [(String, Node)] = &[];
        let entries = match node.map(|node| &node.value) {
            None | Some(NodeValue::Null) => empty,
            Some(NodeValue::Mapping(entries)) => entries.as_slice(),
            Some(other) => {
                problems.push(problem(path, node.map(|node| node.line), format!("expected a mapping, found {}", other.kind())));
                empty
            }
        };

        for (key, value) in entries {
            let key_path = join(path, key);
            if SECRET_KEYS.contains(&key.as_str()) {
                problems.push(problem(
                    &key_path,
                    Some(value.line),
                    "secrets are not accepted inline in the configuration; settings that need a secret take the path of a file that contains it".to_owned(),
                ));
            } else if !known.contains(&key.as_str()) {
                problems.push(problem(
                    &key_path,
                    Some(value.line),
                    format!("unknown key; expected one of: {}", known.join(", ")),
                ));
            }
        }

        Fields { entries, path: path.to_owned(), line: node.map(|node| node.line), base_dir }
    }

    /// Returns the node of `key`, if present and not null.
    pub fn node(&self, key: &str) -> Option<&'a Node> {
        self.entries
            .iter()
            .find(|(name, value)| name == key && value.value != NodeValue::Null)
            .map(|(_, value)| value)
    }

    pub fn path_of(&self, key: &str) -> String {
        join(&self.path, key)
    }

    /// Line of `key` when present, else the line of the mapping itself.
    pub fn line_of(&self, key: &str) -> Option<usize> {
        self.node(key).map(|node| node.line).or(self.line)
    }

    pub fn string(&self, key: &str, problems: &mut Vec<Problem>) -> Option<String> {
        let node = self.node(key)?;
        match &node.value {
            NodeValue::String(text) => Some(text.clone()),
            other => {
                problems.push(problem(&self.path_of(key), Some(node.line), format!("expected a string, found {}", other.kind())));
                None
            }
        }
    }

    pub fn bool(&self, key: &str, default: bool, problems: &mut Vec<Problem>) -> bool {
        let Some(node) = self.node(key) else { return default };
        match &node.value {
            NodeValue::Bool(value) => *value,
            other => {
                problems.push(problem(&self.path_of(key), Some(node.line), format!("expected true or false, found {}", other.kind())));
                default
            }
        }
    }

    /// Reads an integer within `range`.
    pub fn integer(&self, key: &str, default: u64, range: std::ops::RangeInclusive<u64>, problems: &mut Vec<Problem>) -> u64 {
        let Some(node) = self.node(key) else { return default };
        let out_of_range = |found: String| format!("expected an integer from {} to {}, found {found}", range.start(), range.end());
        match &node.value {
            NodeValue::Integer(value) if *value >= 0 && range.contains(&(*value as u64)) => *value as u64,
            NodeValue::Integer(value) => {
                problems.push(problem(&self.path_of(key), Some(node.line), out_of_range(value.to_string())));
                default
            }
            other => {
                problems.push(problem(&self.path_of(key), Some(node.line), out_of_range(other.kind().to_owned())));
                default
            }
        }
    }

    /// Reads a duration written as a humantime string (`250ms`, `5s`, `1m 30s`) or as `0`.
    pub fn duration(&self, key: &str, default: Duration, max: Duration, problems: &mut Vec<Problem>) -> Duration {
        let Some(node) = self.node(key) else { return default };
        let parsed = match &node.value {
            NodeValue::Integer(0) => Ok(Duration::ZERO),
            NodeValue::String(text) => humantime::parse_duration(text).map_err(|error| format!("invalid duration {text:?}: {error}; write it like 500ms, 5s or 2m")),
            other => Err(format!("expected a duration such as 5s, found {}", other.kind())),
        };
        match parsed {
            Ok(duration) if duration <= max => duration,
            Ok(duration) => {
                problems.push(problem(
                    &self.path_of(key),
                    Some(node.line),
                    format!("{} is longer than the maximum of {}", humantime::format_duration(duration), humantime::format_duration(max)),
                ));
                default
            }
            Err(message) => {
                problems.push(problem(&self.path_of(key), Some(node.line), message));
                default
            }
        }
    }

    /// Reads a listen address `IP:PORT`.
    pub fn socket_address(&self, key: &str, problems: &mut Vec<Problem>) -> Option<SocketAddr> {
        let text = self.string(key, problems)?;
        match text.parse() {
            Ok(address) => Some(address),
            Err(_) => {
                problems.push(problem(
                    &self.path_of(key),
                    self.line_of(key),
                    format!("invalid address {text:?}; expected IP:PORT such as 127.0.0.1:9191 or [::1]:9191"),
                ));
                None
            }
        }
    }

    /// Reads a file system path. A relative path is taken from the configuration file's folder.
    pub fn path(&self, key: &str, problems: &mut Vec<Problem>) -> Option<PathBuf> {
        let text = self.string(key, problems)?;
        if text.is_empty() {
            problems.push(problem(&self.path_of(key), self.line_of(key), "the path is empty".to_owned()));
            return None;
        }
        Some(self.base_dir.join(text))
    }

    /// Returns the items of a sequence at `key`. A missing key is an empty list.
    pub fn sequence(&self, key: &str, problems: &mut Vec<Problem>) -> &'a [Node] {
        let Some(node) = self.node(key) else { return &[] };
        match &node.value {
            NodeValue::Sequence(items) => items.as_slice(),
            other => {
                problems.push(problem(&self.path_of(key), Some(node.line), format!("expected a sequence, found {}", other.kind())));
                &[]
            }
        }
    }

    /// Reads a sequence of strings at `key`. A missing key is an empty list.
    pub fn strings(&self, key: &str, problems: &mut Vec<Problem>) -> Vec<String> {
        let mut strings = Vec::new();
        for (index, item) in self.sequence(key, problems).iter().enumerate() {
            match &item.value {
                NodeValue::String(text) => strings.push(text.clone()),
                other => problems.push(problem(
                    &format!("{}[{index}]", self.path_of(key)),
                    Some(item.line),
                    format!("expected a string, found {}", other.kind()),
                )),
            }
        }
        strings
    }

    /// Reads one of `choices`.
    pub fn choice(&self, key: &str, choices: &[&str], default: &str, problems: &mut Vec<Problem>) -> String {
        let Some(text) = self.string(key, problems) else { return default.to_owned() };
        if choices.contains(&text.as_str()) {
            text
        } else {
            problems.push(problem(
                &self.path_of(key),
                self.line_of(key),
                format!("invalid value {text:?}; expected one of: {}", choices.join(", ")),
            ));
            default.to_owned()
        }
    }
}

pub fn problem(path: &str, line: Option<usize>, message: String) -> Problem {
    Problem { path: path.to_owned(), line, message }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() { key.to_owned() } else { format!("{path}.{key}") }
}
