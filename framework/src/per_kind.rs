//! What a controller declares per watched kind (how its objects are trimmed, which of their changes
//! wake reconciles), stored by the declaration's type, which names the kind (`TrimFn<Node>`,
//! `WakeFn<Pod>`, …).

use std::any::{Any, TypeId};
use std::collections::HashMap;

/// One value per declaration type.
#[derive(Default)]
pub(crate) struct PerKind(HashMap<TypeId, Box<dyn Any + Send + Sync>>);

impl PerKind {
    /// Declares `value` (replacing an earlier one of the same type).
    pub(crate) fn set<V: Send + Sync + 'static>(&mut self, value: V) {
        self.0.insert(TypeId::of::<V>(), Box::new(value));
    }

    /// The declared value of type `V`, if any.
    pub(crate) fn get<V: Clone + 'static>(&self) -> Option<V> {
        self.0
            .get(&TypeId::of::<V>())
            .and_then(|v| v.downcast_ref::<V>())
            .cloned()
    }
}
