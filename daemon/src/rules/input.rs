//! The event `input` as a regorus value, built by walking the serde_json tree (no JSON text in
//! between: printing and re-parsing every event would cost more than evaluating most rules).
use std::collections::BTreeMap;

use regorus::Value;

use super::model::EventType;

/// Converts one serde_json value into the equivalent regorus value.
pub fn to_rego_value(json: &serde_json::Value) -> Value {
    match json {
        serde_json::Value::Null => Value::Null,
        serde_json::Value::Bool(b) => Value::Bool(*b),
        serde_json::Value::Number(n) => number(n),
        serde_json::Value::String(s) => Value::String(s.as_str().into()),
        serde_json::Value::Array(items) => {
            Value::from(items.iter().map(to_rego_value).collect::<Vec<_>>())
        }
        serde_json::Value::Object(fields) => Value::from(
            fields
                .iter()
                .map(|(k, v)| (Value::String(k.as_str().into()), to_rego_value(v)))
                .collect::<BTreeMap<_, _>>(),
        ),
    }
}

fn number(n: &serde_json::Number) -> Value {
    if let Some(i) = n.as_i64() {
        Value::from(i)
    } else if let Some(u) = n.as_u64() {
        Value::from(u)
    } else {
        // Not integral: f64 is all serde_json keeps without arbitrary_precision.
        Value::from(n.as_f64().unwrap_or(f64::NAN))
    }
}

/// Converts back, for printing what a rule produced.
pub fn to_json(value: &Value) -> serde_json::Value {
    serde_json::to_value(value).unwrap_or(serde_json::Value::Null)
}

/// The event's `type`, which decides the rules it is evaluated against.
pub fn event_type(input: &serde_json::Value) -> Result<EventType, String> {
    let raw = input
        .get("type")
        .and_then(serde_json::Value::as_str)
        .ok_or_else(|| "event has no string field \"type\"".to_string())?;
    raw.parse::<EventType>().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_like_the_json_parser() {
        let json = serde_json::json!({
            "type": "open", "ktime_ns": 18446744073709551615u64, "neg": -100, "f": 1.5,
            "pod": null, "truncated": false,
            "process": {"cmdline": ["bash", "-i"], "ancestors": [{"pid": 1}]}
        });
        let direct = to_rego_value(&json);
        let parsed = Value::from_json_str(&json.to_string()).expect("parses");
        assert_eq!(direct, parsed);
        assert_eq!(to_json(&direct), json);
    }
}
