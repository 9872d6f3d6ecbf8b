//! The event `input` as the engine takes it. The daemon builds it as a regorus value directly
//! (`events::input::InputBuilder`); fixtures, replays and tools hold JSON, converted here by
//! walking the serde_json tree (no JSON text in between: printing and re-parsing every event
//! would cost more than evaluating most rules). [`EventInput`] is what both forms offer the
//! engine: the fields prefilters read, the event type, the regorus value.
//!
//! The JSON conversion avoids allocations where it can: field names and the small vocabulary of
//! enum-like values are shared strings (`events::value::shared_string`); and an
//! [`InputConverter`] kept by each evaluating session reuses the converted `pod` and
//! `process.ancestors` while they stay the same from one event to the next (consecutive events
//! mostly come from the same pod and process tree). The result is always equal to a fresh
//! conversion.
use std::collections::BTreeMap;

use regorus::Value;

use super::model::EventType;
use crate::events::value::shared_string as string;

/// Converts one serde_json value into the equivalent regorus value.
pub fn to_rego_value(json: &serde_json::Value) -> Value {
    match json {
        serde_json::Value::Null => Value::Null,
        serde_json::Value::Bool(b) => Value::Bool(*b),
        serde_json::Value::Number(n) => number(n),
        serde_json::Value::String(s) => string(s),
        serde_json::Value::Array(items) => {
            Value::from(items.iter().map(to_rego_value).collect::<Vec<_>>())
        }
        serde_json::Value::Object(fields) => object(fields.iter().map(|(k, v)| (string(k), to_rego_value(v)))),
    }
}

/// Builds event inputs, reusing the parts that repeat from one event to the next. Keep one per
/// evaluating thread (a rule `Session` has one).
#[derive(Debug, Default)]
pub struct InputConverter {
    pod: Option<(serde_json::Value, Value)>,
    ancestors: Option<(serde_json::Value, Value)>,
}

impl InputConverter {
    /// The same value as `to_rego_value(json)`.
    pub fn convert(&mut self, json: &serde_json::Value) -> Value {
        let serde_json::Value::Object(fields) = json else {
            return to_rego_value(json);
        };
        object(fields.iter().map(|(k, v)| {
            let value = match (k.as_str(), v) {
                ("pod", serde_json::Value::Object(_)) => reuse(&mut self.pod, v),
                ("process", serde_json::Value::Object(process)) => object(process.iter().map(|(k, v)| {
                    let value = match (k.as_str(), v) {
                        ("ancestors", serde_json::Value::Array(_)) => reuse(&mut self.ancestors, v),
                        _ => to_rego_value(v),
                    };
                    (string(k), value)
                })),
                _ => to_rego_value(v),
            };
            (string(k), value)
        }))
    }
}

/// An object from its fields. Collecting into a `BTreeMap` first builds it in one pass from the
/// (already sorted) serde_json fields, where inserting one field at a time would search each time.
fn object(fields: impl Iterator<Item = (Value, Value)>) -> Value {
    Value::from(fields.collect::<BTreeMap<_, _>>())
}

/// The converted value of `json`, from `slot` when it holds the same JSON.
fn reuse(slot: &mut Option<(serde_json::Value, Value)>, json: &serde_json::Value) -> Value {
    if let Some((previous, value)) = slot {
        if previous == json {
            return value.clone();
        }
    }
    let value = to_rego_value(json);
    *slot = Some((json.clone(), value.clone()));
    value
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

/// A key of a prefilter's field path (`"dup.new_fd"` is two): its text, its regorus value
/// (made once, so looking it up in a regorus object allocates nothing) and its array index when
/// it is a number.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldKey {
    pub name: String,
    value: Value,
    index: Option<usize>,
}

impl FieldKey {
    pub fn new(name: &str) -> FieldKey {
        FieldKey { name: name.to_string(), value: string(name), index: name.parse().ok() }
    }
}

/// What a prefilter sees of a field: the kinds its tests can judge.
#[derive(Debug, Clone, Copy)]
pub enum FieldKind<'a> {
    Str(&'a str),
    /// As a float (for equality, as Rego compares 1 and 1.0) and as integer bits (for masks).
    Number { float: Option<f64>, bits: Option<u64> },
    Bool(bool),
    Null,
    Array,
    /// Objects, sets, undefined: nothing a test can judge.
    Other,
}

/// An event as the rule engine may be given it: the JSON of fixtures, replays and tools, or the
/// regorus value the daemon builds directly (`events::input::InputBuilder`). Prefilters read
/// fields through it; evaluation takes it as a regorus value.
pub trait EventInput {
    /// The object field (or array element) `key`.
    fn field(&self, key: &FieldKey) -> Option<&Self>;
    fn kind(&self) -> FieldKind<'_>;
    /// The elements when this is an array (none otherwise).
    fn items(&self) -> impl Iterator<Item = &Self>;
    /// The event's `type`, which decides the rules it is evaluated against.
    fn event_type(&self) -> Result<EventType, String>;
    /// The input as the engine takes it (`converter` reuses what repeats between events).
    fn to_rego(&self, converter: &mut InputConverter) -> Value;
}

impl EventInput for serde_json::Value {
    fn field(&self, key: &FieldKey) -> Option<&Self> {
        match self {
            serde_json::Value::Object(fields) => fields.get(&key.name),
            serde_json::Value::Array(items) => key.index.and_then(|i| items.get(i)),
            _ => None,
        }
    }

    fn kind(&self) -> FieldKind<'_> {
        match self {
            serde_json::Value::String(s) => FieldKind::Str(s),
            serde_json::Value::Number(n) => FieldKind::Number {
                float: n.as_f64(),
                bits: n.as_u64().or_else(|| n.as_i64().map(|i| i as u64)),
            },
            serde_json::Value::Bool(b) => FieldKind::Bool(*b),
            serde_json::Value::Null => FieldKind::Null,
            serde_json::Value::Array(_) => FieldKind::Array,
            serde_json::Value::Object(_) => FieldKind::Other,
        }
    }

    fn items(&self) -> impl Iterator<Item = &Self> {
        self.as_array().into_iter().flatten()
    }

    fn event_type(&self) -> Result<EventType, String> {
        event_type(self)
    }

    fn to_rego(&self, converter: &mut InputConverter) -> Value {
        converter.convert(self)
    }
}

impl EventInput for Value {
    fn field(&self, key: &FieldKey) -> Option<&Self> {
        match self {
            Value::Object(fields) => fields.get(&key.value),
            Value::Array(items) => key.index.and_then(|i| items.get(i)),
            _ => None,
        }
    }

    fn kind(&self) -> FieldKind<'_> {
        match self {
            Value::String(s) => FieldKind::Str(s),
            Value::Number(n) => FieldKind::Number { float: n.as_f64(), bits: n.as_u64().or_else(|| n.as_i64().map(|i| i as u64)) },
            Value::Bool(b) => FieldKind::Bool(*b),
            Value::Null => FieldKind::Null,
            Value::Array(_) => FieldKind::Array,
            Value::Set(_) | Value::Object(_) | Value::Undefined => FieldKind::Other,
        }
    }

    fn items(&self) -> impl Iterator<Item = &Self> {
        let items = match self {
            Value::Array(items) => Some(items.iter()),
            _ => None,
        };
        items.into_iter().flatten()
    }

    fn event_type(&self) -> Result<EventType, String> {
        let Some(FieldKind::Str(raw)) = self.field(&FieldKey::type_key()).map(EventInput::kind) else {
            return Err("event has no string field \"type\"".to_string());
        };
        raw.parse::<EventType>().map_err(|e| e.to_string())
    }

    fn to_rego(&self, _converter: &mut InputConverter) -> Value {
        // Reference-counted: a clone is a count increment.
        self.clone()
    }
}

impl FieldKey {
    /// `type`, made once.
    fn type_key() -> &'static FieldKey {
        static TYPE: std::sync::OnceLock<FieldKey> = std::sync::OnceLock::new();
        TYPE.get_or_init(|| FieldKey::new("type"))
    }
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

    #[test]
    fn the_converter_reuses_nothing_that_changed() {
        let mut converter = InputConverter::default();
        let events = [
            serde_json::json!({"type": "open", "pod": {"namespace": "a", "labels": {"app": "x"}},
                "process": {"pid": 1, "stdio": {"stdin": "tty"}, "ancestors": [{"pid": 1, "comm": "sh"}]},
                "open": {"path": "/etc/shadow", "flags_names": ["O_RDONLY"]}}),
            serde_json::json!({"type": "open", "pod": {"namespace": "a", "labels": {"app": "x"}},
                "process": {"pid": 2, "ancestors": [{"pid": 1, "comm": "sh"}]}, "open": {"path": "/x"}}),
            serde_json::json!({"type": "exec", "pod": {"namespace": "b", "labels": {"app": "x"}},
                "process": {"pid": 2, "ancestors": [{"pid": 1, "comm": "bash"}]}, "exec": {"argv": ["a"]}}),
            serde_json::json!({"type": "exec", "pod": null, "process": {"pid": 2, "ancestors": []}}),
            serde_json::json!({"type": "exec", "pod": {"namespace": "b", "labels": {"app": "x"}},
                "process": {"pid": 2, "ancestors": [{"pid": 1, "comm": "bash"}]}}),
            serde_json::json!(["not", "an", "object"]),
        ];
        for event in events.iter().chain(events.iter()) {
            let converted = converter.convert(event);
            assert_eq!(converted, Value::from_json_str(&event.to_string()).expect("parses"));
            assert_eq!(to_json(&converted), *event);
        }
    }
}
