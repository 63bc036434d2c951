//! Building RFC 6902 JSON Patch operations that work on any pod shape.
//!
//! An `add` whose parent is missing fails the whole patch, so every helper here checks the
//! parent first: a missing or null array or map is added whole, an existing one gets new
//! members.

use serde_json::{Map, Value, json};

/// Insertion point of new items in an existing array.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Position {
    Front,
    Back,
}

/// A list of `add` operations.
#[derive(Debug, Default)]
pub(crate) struct Patch {
    operations: Vec<Value>,
}

impl Patch {
    pub(crate) fn into_operations(self) -> Vec<Value> {
        self.operations
    }

    /// Adds `key: value` to the map at `map_path` (such as `/metadata/annotations`). `existing`
    /// is the current map, `None` when it is missing or null.
    pub(crate) fn add_map_entry(
        &mut self,
        map_path: &str,
        existing: Option<&Map<String, Value>>,
        key: &str,
        value: Value,
    ) {
        match existing {
            Some(_) => self.add(format!("{map_path}/{}", escape_token(key)), value),
            None => self.add(map_path.to_owned(), json!({ key: value })),
        }
    }

    /// Adds `items` to the array at `array_path`, at the front or the back. `existing` is the
    /// current array, `None` when it is missing or null.
    pub(crate) fn add_array_items(
        &mut self,
        array_path: &str,
        existing: Option<&Vec<Value>>,
        items: Vec<Value>,
        position: Position,
    ) {
        if items.is_empty() {
            return;
        }
        if existing.is_none() {
            self.add(array_path.to_owned(), Value::Array(items));
            return;
        }
        match position {
            // Each insertion at index i shifts the items after it, so items keep their order.
            Position::Front => {
                for (index, item) in items.into_iter().enumerate() {
                    self.add(format!("{array_path}/{index}"), item);
                }
            }
            Position::Back => {
                for item in items {
                    self.add(format!("{array_path}/-"), item);
                }
            }
        }
    }

    fn add(&mut self, path: String, value: Value) {
        self.operations
            .push(json!({ "op": "add", "path": path, "value": value }));
    }
}

/// Escapes one reference token of a JSON Pointer (RFC 6901): `~` becomes `~0` and `/`
/// becomes `~1`, in that order, so that `portcullis.io/injected` stays one token.
pub(crate) fn escape_token(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_token_encodes_slash_and_tilde() {
        assert_eq!(
            escape_token("portcullis.io/injected"),
            "portcullis.io~1injected"
        );
        assert_eq!(escape_token("a~b"), "a~0b");
        assert_eq!(escape_token("~1"), "~01");
        assert_eq!(escape_token("/~"), "~1~0");
        assert_eq!(escape_token("plain"), "plain");
    }

    #[test]
    fn map_entry_adds_whole_map_when_missing() {
        let mut patch = Patch::default();

        patch.add_map_entry("/metadata/annotations", None, "a/b", json!("v"));

        assert_eq!(
            patch.into_operations(),
            vec![json!({ "op": "add", "path": "/metadata/annotations", "value": { "a/b": "v" } })]
        );
    }

    #[test]
    fn map_entry_adds_escaped_member_when_present() {
        let mut patch = Patch::default();
        let existing = Map::new();

        patch.add_map_entry(
            "/metadata/annotations",
            Some(&existing),
            "a/b~c",
            json!("v"),
        );

        assert_eq!(
            patch.into_operations(),
            vec![json!({ "op": "add", "path": "/metadata/annotations/a~1b~0c", "value": "v" })]
        );
    }

    #[test]
    fn array_items_add_whole_array_when_missing() {
        let mut patch = Patch::default();

        patch.add_array_items(
            "/spec/volumes",
            None,
            vec![json!(1), json!(2)],
            Position::Back,
        );

        assert_eq!(
            patch.into_operations(),
            vec![json!({ "op": "add", "path": "/spec/volumes", "value": [1, 2] })]
        );
    }

    #[test]
    fn array_items_at_front_keep_their_order() {
        let mut patch = Patch::default();
        let existing = vec![json!("old")];

        patch.add_array_items(
            "/spec/initContainers",
            Some(&existing),
            vec![json!("a"), json!("b")],
            Position::Front,
        );

        assert_eq!(
            patch.into_operations(),
            vec![
                json!({ "op": "add", "path": "/spec/initContainers/0", "value": "a" }),
                json!({ "op": "add", "path": "/spec/initContainers/1", "value": "b" }),
            ]
        );
    }

    #[test]
    fn array_items_at_back_append() {
        let mut patch = Patch::default();
        let existing = vec![json!("old")];

        patch.add_array_items(
            "/spec/volumes",
            Some(&existing),
            vec![json!("a"), json!("b")],
            Position::Back,
        );

        assert_eq!(
            patch.into_operations(),
            vec![
                json!({ "op": "add", "path": "/spec/volumes/-", "value": "a" }),
                json!({ "op": "add", "path": "/spec/volumes/-", "value": "b" }),
            ]
        );
    }

    #[test]
    fn empty_items_add_nothing() {
        let mut patch = Patch::default();

        patch.add_array_items("/spec/volumes", None, Vec::new(), Position::Back);

        assert!(patch.into_operations().is_empty());
    }
}
