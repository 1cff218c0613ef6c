//! A list of node names held in one allocation.

use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::de::{SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::borrow::Cow;
use std::fmt;

/// Node names, in the order given, kept as one string: a CachedImage's `cachedNodes` names every
/// node holding its image, and the operator caches every CachedImage, so at 200 images on 5000 nodes
/// a vector of strings would hold a million allocations (about 51 MiB); this holds 200.
///
/// It reads and writes as a JSON array of strings, with the same schema. A name with a line break
/// in it cannot be a node's (node names are DNS subdomains) and is left out when read.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct NodeNames {
    /// The names, each followed by a line break.
    joined: Box<str>,
}

impl NodeNames {
    /// The names, in order.
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.joined.split_terminator('\n')
    }

    /// How many names.
    pub fn len(&self) -> usize {
        self.joined.bytes().filter(|b| *b == b'\n').count()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.joined.is_empty()
    }

    /// Whether `name` is one of them.
    pub fn contains(&self, name: &str) -> bool {
        self.iter().any(|n| n == name)
    }

    /// The names as a vector.
    pub fn to_vec(&self) -> Vec<String> {
        self.iter().map(str::to_owned).collect()
    }
}

/// Appends `name` to `joined`, unless it holds a line break.
fn push(joined: &mut String, name: &str) {
    if !name.contains('\n') {
        joined.push_str(name);
        joined.push('\n');
    }
}

impl<S: AsRef<str>> FromIterator<S> for NodeNames {
    fn from_iter<I: IntoIterator<Item = S>>(names: I) -> Self {
        let mut joined = String::new();
        names
            .into_iter()
            .for_each(|n| push(&mut joined, n.as_ref()));
        Self {
            joined: joined.into_boxed_str(),
        }
    }
}

impl fmt::Debug for NodeNames {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl Serialize for NodeNames {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.iter())
    }
}

impl<'de> Deserialize<'de> for NodeNames {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Names;
        impl<'de> Visitor<'de> for Names {
            type Value = NodeNames;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of node names")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<NodeNames, A::Error> {
                let mut joined = String::new();
                while let Some(name) = seq.next_element::<Cow<'de, str>>()? {
                    push(&mut joined, &name);
                }
                Ok(NodeNames {
                    joined: joined.into_boxed_str(),
                })
            }
        }
        deserializer.deserialize_seq(Names)
    }
}

impl JsonSchema for NodeNames {
    fn schema_name() -> Cow<'static, str> {
        Vec::<String>::schema_name()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        Vec::<String>::json_schema(generator)
    }

    fn inline_schema() -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cachedimage_node_names_read_and_write_as_a_list_of_strings() {
        let names: NodeNames = serde_json::from_str(r#"["a","b\nc","node-2"]"#).expect("a list");
        assert_eq!(
            names.to_vec(),
            ["a", "node-2"],
            "a name with a line break is no node's"
        );
        assert_eq!(names.len(), 2);
        assert!(names.contains("node-2") && !names.contains("b"));
        assert_eq!(
            serde_json::to_string(&names).expect("serialisable"),
            r#"["a","node-2"]"#
        );
        let empty = NodeNames::default();
        assert!(empty.is_empty());
        assert_eq!(empty.iter().count(), 0);
        assert_eq!(serde_json::to_string(&empty).expect("serialisable"), "[]");
        assert_eq!(
            serde_json::to_value(schemars::schema_for!(NodeNames)).expect("a schema")["type"],
            "array"
        );
        assert_eq!(format!("{names:?}"), r#"["a", "node-2"]"#);
    }
}
