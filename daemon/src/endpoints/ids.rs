//! The ids that name a pod across module boundaries, typed so a cgroup id is never mistaken
//! for an endpoint id, a pid or a count, and a pod is never a free-form string.
//!
//! On the wire (status, alerts, the quarantine state file) they look exactly as before: a
//! `PodKey` is the string `namespace/name`, the numeric ids are plain numbers.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A pod: `namespace/name`, the way operators name pods. Neither part is empty and the name
/// holds no `/`, so the string form parses back to the same key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodKey {
    namespace: String,
    name: String,
}

/// A string that is not `namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("pod must be NAMESPACE/NAME, got {0:?}")]
pub struct BadPodKey(pub String);

impl PodKey {
    /// The key of a pod whose parts come from a trusted source (the inventory, which validated
    /// them). Parts that could not be told apart again are refused.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Result<PodKey, BadPodKey> {
        let (namespace, name) = (namespace.into(), name.into());
        if namespace.is_empty() || name.is_empty() || namespace.contains('/') || name.contains('/') {
            return Err(BadPodKey(format!("{namespace}/{name}")));
        }
        Ok(PodKey { namespace, name })
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl fmt::Display for PodKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl FromStr for PodKey {
    type Err = BadPodKey;

    /// `namespace/name`: exactly one `/`, nothing empty on either side.
    fn from_str(text: &str) -> Result<PodKey, BadPodKey> {
        match text.split_once('/') {
            Some((namespace, name)) if !namespace.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(PodKey { namespace: namespace.to_string(), name: name.to_string() })
            }
            _ => Err(BadPodKey(text.to_string())),
        }
    }
}

impl Serialize for PodKey {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PodKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<PodKey, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl PodKey {
    /// The key of a pod whose parts the inventory validated as Kubernetes names (a DNS label
    /// and a DNS subdomain: never empty, never a `/`).
    pub(crate) fn from_validated(namespace: &str, name: &str) -> PodKey {
        PodKey { namespace: namespace.to_string(), name: name.to_string() }
    }
}

impl From<&crate::inventory::Endpoint> for PodKey {
    fn from(ep: &crate::inventory::Endpoint) -> PodKey {
        PodKey::from_validated(&ep.namespace, &ep.name)
    }
}

/// A numeric id newtype: the number on the wire (serde transparent), typed in the code.
macro_rules! numeric_id {
    ($(#[$doc:meta])* $name:ident($int:ty)) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub $int);

        impl $name {
            pub fn get(self) -> $int {
                self.0
            }
        }

        impl From<$int> for $name {
            fn from(id: $int) -> $name {
                $name(id)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

numeric_id!(
    /// A cgroup v2 id (the cgroup directory's inode number): what the kernel stamps on every
    /// event and what the datapath maps are keyed by.
    CgroupId(u64)
);

numeric_id!(
    /// A segmentation endpoint id (the compiler's stable per-pod number in the datapath maps; 0
    /// means "no local endpoint").
    EndpointId(u32)
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_keys_parse_back_to_themselves_and_refuse_what_is_ambiguous() {
        let key: PodKey = "shop/frontend-1".parse().expect("valid");
        assert_eq!((key.namespace(), key.name()), ("shop", "frontend-1"));
        assert_eq!(key.to_string().parse::<PodKey>(), Ok(key.clone()));
        assert_eq!(serde_json::to_value(&key).expect("json"), serde_json::json!("shop/frontend-1"));
        // A caller who controls the string must not be able to name a different pod, or one
        // whose parts cannot be told apart again.
        for bad in ["", "shop", "/x", "x/", "/", "a/b/c", "shop//x"] {
            assert!(bad.parse::<PodKey>().is_err(), "{bad:?} accepted");
            assert!(serde_json::from_value::<PodKey>(serde_json::json!(bad)).is_err(), "{bad:?} deserialized");
        }
        assert!(PodKey::new("a/b", "c").is_err(), "a namespace with a slash would print as a/b/c");
        assert!(PodKey::new("a", "").is_err());
    }

    #[test]
    fn numeric_ids_keep_their_wire_form() {
        assert_eq!(serde_json::to_value(CgroupId(42)).expect("json"), serde_json::json!(42));
        assert_eq!(serde_json::to_value(EndpointId(7)).expect("json"), serde_json::json!(7));
        assert_eq!(serde_json::from_value::<CgroupId>(serde_json::json!(42)).expect("back"), CgroupId(42));
    }
}
