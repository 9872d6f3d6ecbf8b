//! Serializing straight into regorus values: the rule input is built as the engine's own value
//! tree from the typed event, with no serde_json tree in between (building that tree and then
//! converting it cost more than judging most events). `to_value(x)` equals
//! `regorus::Value::from_json_str(&serde_json::to_string(x))` for every type the input uses; a
//! test keeps the two in step.
//!
//! Field names and the small vocabulary of enum-like values (event types, fd kinds, ops,
//! families) are shared, reference-counted strings made once per process ([`shared_string`]).
use std::collections::BTreeMap;
use std::sync::OnceLock;

use regorus::Value;
use serde::ser::{self, Serialize};

/// Why a value could not be serialized. The input's types cannot fail (strings, numbers, bools,
/// vectors, maps with string keys); this is for map keys that are not strings.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ValueError(String);

impl ser::Error for ValueError {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        ValueError(msg.to_string())
    }
}

/// `value` as a regorus value, as serde_json would have printed it and regorus parsed it.
pub fn to_value<T: Serialize + ?Sized>(value: &T) -> Result<Value, ValueError> {
    value.serialize(ValueSerializer)
}

/// An object from (key, value) pairs, built in one pass (a `BTreeMap` sorts them; regorus then
/// freezes it into its sorted slice).
pub fn object(fields: impl IntoIterator<Item = (Value, Value)>) -> Value {
    Value::from(fields.into_iter().collect::<BTreeMap<_, _>>())
}

struct ValueSerializer;

/// Integers widen losslessly to the i64 or u64 a regorus number is made from.
macro_rules! integers_as_numbers {
    ($($method:ident: $ty:ty as $wide:ty),* $(,)?) => {
        $(fn $method(self, v: $ty) -> Result<Value, ValueError> {
            Ok(Value::from(<$wide>::from(v)))
        })*
    };
}

impl ser::Serializer for ValueSerializer {
    type Ok = Value;
    type Error = ValueError;
    type SerializeSeq = SeqBuilder;
    type SerializeTuple = SeqBuilder;
    type SerializeTupleStruct = SeqBuilder;
    type SerializeTupleVariant = VariantSeq;
    type SerializeMap = MapBuilder;
    type SerializeStruct = MapBuilder;
    type SerializeStructVariant = VariantMap;

    fn serialize_bool(self, v: bool) -> Result<Value, ValueError> {
        Ok(Value::Bool(v))
    }
    integers_as_numbers! {
        serialize_i8: i8 as i64, serialize_i16: i16 as i64, serialize_i32: i32 as i64, serialize_i64: i64 as i64,
        serialize_u8: u8 as u64, serialize_u16: u16 as u64, serialize_u32: u32 as u64, serialize_u64: u64 as u64,
    }
    fn serialize_f32(self, v: f32) -> Result<Value, ValueError> {
        self.serialize_f64(f64::from(v))
    }
    fn serialize_f64(self, v: f64) -> Result<Value, ValueError> {
        // serde_json prints a non-finite float as null.
        Ok(if v.is_finite() { Value::from(v) } else { Value::Null })
    }
    fn serialize_char(self, v: char) -> Result<Value, ValueError> {
        Ok(shared_string(v.encode_utf8(&mut [0u8; 4])))
    }
    fn serialize_str(self, v: &str) -> Result<Value, ValueError> {
        Ok(shared_string(v))
    }
    fn serialize_bytes(self, v: &[u8]) -> Result<Value, ValueError> {
        Ok(Value::from(v.iter().map(|&b| Value::from(u64::from(b))).collect::<Vec<_>>()))
    }
    fn serialize_none(self) -> Result<Value, ValueError> {
        Ok(Value::Null)
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<Value, ValueError> {
        value.serialize(self)
    }
    fn serialize_unit(self) -> Result<Value, ValueError> {
        Ok(Value::Null)
    }
    fn serialize_unit_struct(self, _name: &'static str) -> Result<Value, ValueError> {
        Ok(Value::Null)
    }
    fn serialize_unit_variant(self, _name: &'static str, _index: u32, variant: &'static str) -> Result<Value, ValueError> {
        Ok(shared_string(variant))
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(self, _name: &'static str, value: &T) -> Result<Value, ValueError> {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<Value, ValueError> {
        Ok(object([(shared_string(variant), value.serialize(self)?)]))
    }
    fn serialize_seq(self, len: Option<usize>) -> Result<SeqBuilder, ValueError> {
        Ok(SeqBuilder(Vec::with_capacity(len.unwrap_or(0))))
    }
    fn serialize_tuple(self, len: usize) -> Result<SeqBuilder, ValueError> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_struct(self, _name: &'static str, len: usize) -> Result<SeqBuilder, ValueError> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<VariantSeq, ValueError> {
        Ok(VariantSeq { variant, items: SeqBuilder(Vec::with_capacity(len)) })
    }
    fn serialize_map(self, _len: Option<usize>) -> Result<MapBuilder, ValueError> {
        Ok(MapBuilder::default())
    }
    fn serialize_struct(self, _name: &'static str, _len: usize) -> Result<MapBuilder, ValueError> {
        Ok(MapBuilder::default())
    }
    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<VariantMap, ValueError> {
        Ok(VariantMap { variant, fields: MapBuilder::default() })
    }
}

struct SeqBuilder(Vec<Value>);

impl ser::SerializeSeq for SeqBuilder {
    type Ok = Value;
    type Error = ValueError;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), ValueError> {
        self.0.push(value.serialize(ValueSerializer)?);
        Ok(())
    }
    fn end(self) -> Result<Value, ValueError> {
        Ok(Value::from(self.0))
    }
}

impl ser::SerializeTuple for SeqBuilder {
    type Ok = Value;
    type Error = ValueError;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), ValueError> {
        ser::SerializeSeq::serialize_element(self, value)
    }
    fn end(self) -> Result<Value, ValueError> {
        ser::SerializeSeq::end(self)
    }
}

impl ser::SerializeTupleStruct for SeqBuilder {
    type Ok = Value;
    type Error = ValueError;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), ValueError> {
        ser::SerializeSeq::serialize_element(self, value)
    }
    fn end(self) -> Result<Value, ValueError> {
        ser::SerializeSeq::end(self)
    }
}

struct VariantSeq {
    variant: &'static str,
    items: SeqBuilder,
}

impl ser::SerializeTupleVariant for VariantSeq {
    type Ok = Value;
    type Error = ValueError;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), ValueError> {
        ser::SerializeSeq::serialize_element(&mut self.items, value)
    }
    fn end(self) -> Result<Value, ValueError> {
        Ok(object([(shared_string(self.variant), Value::from(self.items.0))]))
    }
}

#[derive(Default)]
struct MapBuilder {
    fields: BTreeMap<Value, Value>,
    key: Option<Value>,
}

impl ser::SerializeMap for MapBuilder {
    type Ok = Value;
    type Error = ValueError;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), ValueError> {
        self.key = Some(key.serialize(KeySerializer)?);
        Ok(())
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), ValueError> {
        let key = self.key.take().ok_or_else(|| ValueError("a map value without its key".into()))?;
        self.fields.insert(key, value.serialize(ValueSerializer)?);
        Ok(())
    }
    fn end(self) -> Result<Value, ValueError> {
        Ok(Value::from(self.fields))
    }
}

impl ser::SerializeStruct for MapBuilder {
    type Ok = Value;
    type Error = ValueError;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, key: &'static str, value: &T) -> Result<(), ValueError> {
        self.fields.insert(shared_string(key), value.serialize(ValueSerializer)?);
        Ok(())
    }
    fn end(self) -> Result<Value, ValueError> {
        Ok(Value::from(self.fields))
    }
}

struct VariantMap {
    variant: &'static str,
    fields: MapBuilder,
}

impl ser::SerializeStructVariant for VariantMap {
    type Ok = Value;
    type Error = ValueError;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, key: &'static str, value: &T) -> Result<(), ValueError> {
        ser::SerializeStruct::serialize_field(&mut self.fields, key, value)
    }
    fn end(self) -> Result<Value, ValueError> {
        Ok(object([(shared_string(self.variant), Value::from(self.fields.fields))]))
    }
}

/// Map keys: strings, and numbers and bools printed as strings (what serde_json does with them).
struct KeySerializer;

/// Keys of these types are printed, as serde_json prints them.
macro_rules! key_as_text {
    ($($method:ident: $ty:ty),* $(,)?) => {
        $(fn $method(self, v: $ty) -> Result<Value, ValueError> {
            Self::text(v)
        })*
    };
}

fn not_a_key(what: &str) -> ValueError {
    ValueError(format!("a map key must be a string, not {what}"))
}

impl KeySerializer {
    fn text(s: impl ToString) -> Result<Value, ValueError> {
        Ok(Value::String(s.to_string().into()))
    }
}

impl ser::Serializer for KeySerializer {
    type Ok = Value;
    type Error = ValueError;
    type SerializeSeq = ser::Impossible<Value, ValueError>;
    type SerializeTuple = ser::Impossible<Value, ValueError>;
    type SerializeTupleStruct = ser::Impossible<Value, ValueError>;
    type SerializeTupleVariant = ser::Impossible<Value, ValueError>;
    type SerializeMap = ser::Impossible<Value, ValueError>;
    type SerializeStruct = ser::Impossible<Value, ValueError>;
    type SerializeStructVariant = ser::Impossible<Value, ValueError>;

    key_as_text! {
        serialize_bool: bool, serialize_i8: i8, serialize_i16: i16, serialize_i32: i32, serialize_i64: i64,
        serialize_u8: u8, serialize_u16: u16, serialize_u32: u32, serialize_u64: u64,
    }
    fn serialize_f32(self, _v: f32) -> Result<Value, ValueError> {
        Err(not_a_key("a float"))
    }
    fn serialize_f64(self, _v: f64) -> Result<Value, ValueError> {
        Err(not_a_key("a float"))
    }
    fn serialize_char(self, v: char) -> Result<Value, ValueError> {
        Self::text(v)
    }
    fn serialize_str(self, v: &str) -> Result<Value, ValueError> {
        Ok(shared_string(v))
    }
    fn serialize_bytes(self, _v: &[u8]) -> Result<Value, ValueError> {
        Err(not_a_key("bytes"))
    }
    fn serialize_none(self) -> Result<Value, ValueError> {
        Err(not_a_key("null"))
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<Value, ValueError> {
        value.serialize(self)
    }
    fn serialize_unit(self) -> Result<Value, ValueError> {
        Err(not_a_key("null"))
    }
    fn serialize_unit_struct(self, _name: &'static str) -> Result<Value, ValueError> {
        Err(not_a_key("null"))
    }
    fn serialize_unit_variant(self, _name: &'static str, _index: u32, variant: &'static str) -> Result<Value, ValueError> {
        Ok(shared_string(variant))
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(self, _name: &'static str, value: &T) -> Result<Value, ValueError> {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
        _value: &T,
    ) -> Result<Value, ValueError> {
        Err(not_a_key("an enum variant with data"))
    }
    fn serialize_seq(self, _len: Option<usize>) -> Result<Self::SerializeSeq, ValueError> {
        Err(not_a_key("a sequence"))
    }
    fn serialize_tuple(self, _len: usize) -> Result<Self::SerializeTuple, ValueError> {
        Err(not_a_key("a tuple"))
    }
    fn serialize_tuple_struct(self, _name: &'static str, _len: usize) -> Result<Self::SerializeTupleStruct, ValueError> {
        Err(not_a_key("a tuple"))
    }
    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeTupleVariant, ValueError> {
        Err(not_a_key("an enum variant with data"))
    }
    fn serialize_map(self, _len: Option<usize>) -> Result<Self::SerializeMap, ValueError> {
        Err(not_a_key("a map"))
    }
    fn serialize_struct(self, _name: &'static str, _len: usize) -> Result<Self::SerializeStruct, ValueError> {
        Err(not_a_key("a struct"))
    }
    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeStructVariant, ValueError> {
        Err(not_a_key("an enum variant with data"))
    }
}

/// Field names of the input schema and the enum-like values events carry. A string equal to
/// one of them shares one allocation instead of getting its own.
const WORDS: &[&str] = &[
    "BPF_MAP_CREATE", "BPF_PROG_LOAD", "CLONE_NEWCGROUP", "CLONE_NEWIPC", "CLONE_NEWNET",
    "CLONE_NEWNS", "CLONE_NEWPID", "CLONE_NEWUSER", "CLONE_NEWUTS", "O_APPEND", "O_CLOEXEC",
    "O_CREAT", "O_NONBLOCK", "O_RDONLY", "O_RDWR", "O_TRUNC", "O_WRONLY", "PTRACE_ATTACH",
    "PTRACE_SEIZE", "addr", "address", "ancestors", "argc", "args", "argv", "at_flags", "bpf",
    "cap_effective", "cap_inheritable", "cap_permitted", "capset", "cgroup_id", "child_pid",
    "chmod", "cmd", "cmd_name", "cmdline", "comm", "commit_creds", "connect", "creat", "create", "cred",
    "cwd", "delete_module", "dirfd", "dup", "dup2", "dup3", "egid", "euid", "exe", "exe_resolved",
    "exec", "exit", "exit_code", "family", "fchmod", "fchmodat", "fd", "file", "fileless",
    "filename", "finit_module", "flags", "flags_names", "fork", "fstype", "ftruncate", "gid",
    "inet", "inet6", "init_module", "kprobe", "ktime_ns", "labels", "len", "memfd", "mode",
    "module", "mount", "name", "namespace", "new_fd", "new_fd_kind", "new_path", "node", "null",
    "old_egid", "old_euid", "old_fd", "old_gid", "old_path", "old_uid", "op", "open", "openat",
    "openat2", "other", "parent_pid", "path", "path_arg", "path_resolved", "pid", "pipe", "pod",
    "port", "ppid", "process", "ptrace", "rename", "renameat", "renameat2", "request",
    "request_name", "result", "rmdir", "service_account", "setgid", "setns", "setregid",
    "setresgid", "setresuid", "setreuid", "setuid", "size", "socket", "source", "start_ns",
    "stderr", "stdin", "stdio", "stdout", "target", "target_pid", "tid", "time", "tracepoint",
    "truncate", "truncated", "tty", "type", "uid", "umount", "unix", "unix_path", "unknown",
    "unlink", "unlinkat", "unshare", "via_execveat", "write",
];

/// The shared words, in an open-addressing table keyed by an FNV-1a hash: a lookup is one short
/// hash and usually one comparison, cheaper than the allocation it saves.
struct Words {
    slots: Vec<Option<(&'static str, Value)>>,
}

const WORD_SLOTS: usize = 512;

/// Only strings this short are looked up (every word is; longer strings skip the hash).
const MAX_WORD_LEN: usize = 16;

fn hash(s: &str) -> usize {
    let mut h: u32 = 0x811c_9dc5;
    for b in s.bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    h as usize & (WORD_SLOTS - 1)
}

fn words() -> &'static Words {
    static SHARED: OnceLock<Words> = OnceLock::new();
    SHARED.get_or_init(|| {
        let mut slots: Vec<Option<(&'static str, Value)>> = vec![None; WORD_SLOTS];
        for word in WORDS {
            let mut i = hash(word);
            loop {
                match &slots[i] {
                    None => {
                        slots[i] = Some((word, Value::String((*word).into())));
                        break;
                    }
                    Some((w, _)) if w == word => break,
                    Some(_) => i = (i + 1) & (WORD_SLOTS - 1),
                }
            }
        }
        Words { slots }
    })
}

/// A regorus string, shared when it is one of the common words.
pub fn shared_string(s: &str) -> Value {
    if s.len() <= MAX_WORD_LEN {
        let slots = &words().slots;
        let mut i = hash(s);
        while let Some((word, value)) = &slots[i] {
            if *word == s {
                return value.clone();
            }
            i = (i + 1) & (WORD_SLOTS - 1);
        }
    }
    Value::String(s.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Serialize)]
    struct Sample {
        name: &'static str,
        big: u64,
        neg: i64,
        small: i32,
        ratio: f64,
        flag: bool,
        missing: Option<String>,
        present: Option<String>,
        list: Vec<String>,
        empty: Vec<u32>,
        labels: BTreeMap<String, String>,
        nested: Vec<Inner>,
        #[serde(skip)]
        _hidden: u32,
    }

    #[derive(serde::Serialize)]
    struct Inner {
        pid: u32,
        exe: Option<String>,
    }

    #[test]
    fn serializes_like_serde_json_parsed_by_regorus() {
        let sample = Sample {
            name: "socket",
            big: u64::MAX,
            neg: -100,
            small: -1,
            ratio: 1.5,
            flag: true,
            missing: None,
            present: Some("/usr/bin/dash with a long tail".into()),
            list: vec!["sh".into(), "-c".into(), "ünïcode \\x00".into()],
            empty: vec![],
            labels: BTreeMap::from([("app".into(), "web".into()), ("b".into(), String::new())]),
            nested: vec![Inner { pid: 1, exe: None }, Inner { pid: 2, exe: Some("/bin/sh".into()) }],
            _hidden: 7,
        };
        let direct = to_value(&sample).expect("serializes");
        let parsed = Value::from_json_str(&serde_json::to_string(&sample).expect("json")).expect("parses");
        assert_eq!(direct, parsed);
    }

    #[test]
    fn shared_words_are_found() {
        assert!(WORDS.iter().all(|w| w.len() <= MAX_WORD_LEN));
        for word in WORDS {
            let Value::String(shared) = shared_string(word) else { panic!("not a string") };
            assert_eq!(&*shared, *word);
            // The same allocation every time.
            let Value::String(again) = shared_string(word) else { panic!("not a string") };
            assert!(regorus::Rc::ptr_eq(&shared, &again), "{word} is not shared");
        }
        assert_eq!(shared_string("socket"), Value::from("socket"));
        assert_eq!(shared_string("/etc/shadow"), Value::from("/etc/shadow"));
    }
}
