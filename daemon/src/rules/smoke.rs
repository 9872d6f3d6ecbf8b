//! The built-in events every rule is run on at load, within its budget, so that a pack that
//! loads also runs: the documented example of each event type (rules/README.md, whose examples
//! a test keeps equal to the schema the daemon produces).
use std::sync::OnceLock;

use super::model::EventType;

const README: &str = include_str!("../../../rules/README.md");

/// One event per event type (the README's examples; the envelope example fills any type the
/// README lacks, so the set always covers every type).
pub fn events() -> &'static [serde_json::Value] {
    static EVENTS: OnceLock<Vec<serde_json::Value>> = OnceLock::new();
    EVENTS.get_or_init(|| {
        let mut examples: Vec<serde_json::Value> = Vec::new();
        let mut rest = README;
        while let Some(start) = rest.find("```json\n") {
            let body = &rest[start + 8..];
            let Some(end) = body.find("```") else { break };
            if let Ok(value) = serde_json::from_str::<serde_json::Value>(&body[..end]) {
                if value.get("type").and_then(serde_json::Value::as_str).is_some() {
                    examples.push(value);
                }
            }
            rest = &body[end + 3..];
        }
        let mut events = Vec::new();
        for ty in EventType::ALL {
            match examples.iter().find(|e| e["type"] == ty.as_str()) {
                Some(example) => events.push(example.clone()),
                None => {
                    // A bare envelope of this type: rules see absent fields as undefined.
                    let mut bare = examples.first().cloned().unwrap_or_else(|| serde_json::json!({}));
                    bare["type"] = ty.as_str().into();
                    events.push(bare);
                }
            }
        }
        events
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_documented_event_per_type() {
        let events = events();
        assert_eq!(events.len(), EventType::ALL.len());
        for (event, ty) in events.iter().zip(EventType::ALL) {
            assert_eq!(event["type"], ty.as_str());
            assert!(event.get(ty.as_str()).is_some(), "README has no example of {ty}: {event}");
        }
    }
}
