//! A list of node names held in one allocation, shared by every equal list.

use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::de::{SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, LazyLock, Mutex, PoisonError, Weak};

/// Node names, in the order given, kept as one string: a CachedImage's `cachedNodes` names every
/// node holding its image, and the operator caches every CachedImage, so at 200 images on 5000 nodes
/// a vector of strings would hold a million allocations (about 51 MiB); this holds 200.
///
/// Equal lists share that one string: in a settled fleet every image is cached on every node of
/// its pool, so 200 statuses naming the same 5000 nodes hold one copy of the names, not 200 (15 MiB
/// at that size), and the cache's copy of a status costs no copy of its names.
///
/// It reads and writes as a JSON array of strings, with the same schema. A name with a line break
/// in it cannot be a node's (node names are DNS subdomains) and is left out when read.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct NodeNames {
    /// The names, each followed by a line break; `None` for no names.
    joined: Option<Arc<str>>,
}

impl NodeNames {
    fn new(joined: String) -> Self {
        Self {
            joined: (!joined.is_empty()).then(|| shared::get(joined)),
        }
    }

    fn joined(&self) -> &str {
        self.joined.as_deref().unwrap_or_default()
    }

    /// The names, in order.
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.joined().split_terminator('\n')
    }

    /// How many names.
    pub fn len(&self) -> usize {
        self.joined().bytes().filter(|b| *b == b'\n').count()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.joined.is_none()
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
        Self::new(joined)
    }
}

impl Drop for NodeNames {
    fn drop(&mut self) {
        if let Some(joined) = self.joined.take() {
            shared::release(joined);
        }
    }
}

/// The table of lists in use, by the hash of their text.
///
/// It holds weak references, so a list goes when its last holder drops it. Every release of a
/// list takes the table's lock, so the last holder sees itself as the last and removes the entry
/// (a clone, made without the lock, needs a holder to clone from).
mod shared {
    use super::*;

    type Table = HashMap<u64, Vec<Weak<str>>>;

    pub(super) static TABLE: LazyLock<(RandomState, Mutex<Table>)> =
        LazyLock::new(|| (RandomState::new(), Mutex::new(Table::new())));

    pub(super) fn table() -> std::sync::MutexGuard<'static, Table> {
        TABLE.1.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The shared copy of `joined`, made if there is none.
    pub(super) fn get(joined: String) -> Arc<str> {
        let hash = TABLE.0.hash_one(joined.as_str());
        let mut table = table();
        let same = table.entry(hash).or_default();
        if let Some(existing) = same
            .iter()
            .filter_map(Weak::upgrade)
            .find(|s| **s == *joined)
        {
            return existing;
        }
        let made: Arc<str> = joined.into();
        same.push(Arc::downgrade(&made));
        made
    }

    /// Drops one holder's reference to a list, and the table's entry with the last.
    pub(super) fn release(joined: Arc<str>) {
        let mut table = table();
        if Arc::strong_count(&joined) == 1 {
            let hash = TABLE.0.hash_one(&*joined);
            if let Some(same) = table.get_mut(&hash) {
                same.retain(|w| !std::ptr::addr_eq(w.as_ptr(), Arc::as_ptr(&joined)));
                if same.is_empty() {
                    table.remove(&hash);
                }
            }
        }
        drop(joined);
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
                Ok(NodeNames::new(joined))
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

    #[test]
    fn cachedimage_node_names_share_one_copy_and_it_goes_with_the_last() {
        let unique = format!("shared-{:?}", std::thread::current().id());
        let a: NodeNames = [unique.as_str(), "n1", "n2"].into_iter().collect();
        let b: NodeNames =
            serde_json::from_value(serde_json::json!([unique, "n1", "n2"])).expect("a list");
        let other: NodeNames = [unique.as_str(), "n2"].into_iter().collect();
        let (Some(x), Some(y), Some(z)) = (&a.joined, &b.joined, &other.joined) else {
            panic!("three lists of names");
        };
        assert!(
            Arc::ptr_eq(x, y),
            "equal lists, read or built, share one copy"
        );
        assert!(!Arc::ptr_eq(x, z));
        // Entries under the text's hash, live or not (no other list has this text).
        let holding = |text: &str| {
            let hash = shared::TABLE.0.hash_one(text);
            shared::table().get(&hash).map_or(0, Vec::len)
        };
        let text = format!("{unique}\nn1\nn2\n");
        assert_eq!(holding(&text), 1);
        drop(a);
        assert_eq!(holding(&text), 1, "b still holds the list");
        drop(b);
        assert_eq!(holding(&text), 0, "the entry went with the last holder");
        drop(other);
    }
}
