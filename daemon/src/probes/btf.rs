//! Just enough of a BTF reader to find struct member offsets in the running kernel.
//!
//! aya-ebpf has no CO-RE relocations for Rust programs, so the few kernel struct fields the
//! probes read (task_struct.real_parent/tgid/cred/exit_code, cred.uid/gid/euid/egid) are
//! resolved here from /sys/kernel/btf/vmlinux and handed to the programs in PROBE_CONFIG.

use std::collections::HashMap;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BtfError {
    #[error("BTF blob too short ({0} bytes)")]
    TooShort(usize),
    #[error("bad BTF magic {0:#06x}")]
    BadMagic(u16),
    #[error("BTF section out of bounds: {0}")]
    OutOfBounds(&'static str),
    #[error("unknown BTF kind {kind} at type id {id}")]
    UnknownKind { kind: u32, id: u32 },
    #[error("struct {0} not found in BTF")]
    StructNotFound(String),
    #[error("member {member} not found in struct {strukt}")]
    MemberNotFound { strukt: String, member: String },
}

const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;

#[derive(Debug, Clone)]
struct Member {
    name: String,
    type_id: u32,
    /// Offset in bits.
    bit_offset: u32,
}

#[derive(Debug, Clone)]
struct TypeEntry {
    kind: u32,
    /// Referenced type for typedef/const/volatile etc.
    type_ref: u32,
    members: Vec<Member>,
}

/// Parsed types (only what offset lookups need).
pub struct Btf {
    /// Index = type id (id 0 is void).
    types: Vec<TypeEntry>,
    structs_by_name: HashMap<String, u32>,
}

fn read_u32(data: &[u8], at: usize) -> Option<u32> {
    let bytes = data.get(at..at + 4)?;
    Some(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

fn read_u16(data: &[u8], at: usize) -> Option<u16> {
    let bytes = data.get(at..at + 2)?;
    Some(u16::from_le_bytes([bytes[0], bytes[1]]))
}

fn read_str(strings: &[u8], off: u32) -> String {
    let start = off as usize;
    let Some(rest) = strings.get(start..) else { return String::new() };
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end]).into_owned()
}

impl Btf {
    pub fn from_sys_fs() -> Result<Btf, Box<dyn std::error::Error + Send + Sync>> {
        let data = std::fs::read("/sys/kernel/btf/vmlinux")?;
        Ok(Btf::parse(&data)?)
    }

    pub fn parse(data: &[u8]) -> Result<Btf, BtfError> {
        if data.len() < 24 {
            return Err(BtfError::TooShort(data.len()));
        }
        let magic = read_u16(data, 0).ok_or(BtfError::TooShort(data.len()))?;
        if magic != 0xeb9f {
            return Err(BtfError::BadMagic(magic));
        }
        let field = |at| read_u32(data, at).ok_or(BtfError::TooShort(data.len()));
        let hdr_len = field(4)? as usize;
        let type_off = field(8)? as usize;
        let type_len = field(12)? as usize;
        let str_off = field(16)? as usize;
        let str_len = field(20)? as usize;
        let types_data = data
            .get(hdr_len + type_off..hdr_len + type_off + type_len)
            .ok_or(BtfError::OutOfBounds("types"))?;
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or(BtfError::OutOfBounds("strings"))?;

        let mut types = vec![TypeEntry { kind: 0, type_ref: 0, members: vec![] }];
        let mut structs_by_name = HashMap::new();
        let mut at = 0usize;
        while at + 12 <= types_data.len() {
            let id = types.len() as u32;
            let oob = BtfError::OutOfBounds("type entry");
            let name_off = read_u32(types_data, at).ok_or(BtfError::OutOfBounds("type entry"))?;
            let info = read_u32(types_data, at + 4).ok_or(oob)?;
            let size_or_type = read_u32(types_data, at + 8).ok_or(BtfError::OutOfBounds("type entry"))?;
            at += 12;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let kind_flag = info >> 31 == 1;
            let mut members = Vec::new();
            let extra = match kind {
                1 => 4,                       // INT
                2 | 7 | 8 | 9 | 10 | 11 | 12 | 16 | 18 => 0,
                3 => 12,                      // ARRAY
                KIND_STRUCT | KIND_UNION => {
                    for m in 0..vlen {
                        let base = at + m * 12;
                        let name = read_u32(types_data, base).ok_or(BtfError::OutOfBounds("member"))?;
                        let type_id = read_u32(types_data, base + 4).ok_or(BtfError::OutOfBounds("member"))?;
                        let offset = read_u32(types_data, base + 8).ok_or(BtfError::OutOfBounds("member"))?;
                        let bit_offset = if kind_flag { offset & 0x00ff_ffff } else { offset };
                        members.push(Member { name: read_str(strings, name), type_id, bit_offset });
                    }
                    12 * vlen
                }
                6 => 8 * vlen,                // ENUM
                13 => 8 * vlen,               // FUNC_PROTO
                14 => 4,                      // VAR
                15 => 12 * vlen,              // DATASEC
                17 => 4,                      // DECL_TAG
                19 => 12 * vlen,              // ENUM64
                other => return Err(BtfError::UnknownKind { kind: other, id }),
            };
            at += extra;
            let name = read_str(strings, name_off);
            if kind == KIND_STRUCT && !name.is_empty() {
                structs_by_name.entry(name).or_insert(id);
            }
            types.push(TypeEntry { kind, type_ref: size_or_type, members });
        }
        Ok(Btf { types, structs_by_name })
    }

    /// Byte offset of `member` in `struct strukt`, looking through anonymous structs/unions.
    pub fn member_offset(&self, strukt: &str, member: &str) -> Result<u32, BtfError> {
        let id = *self
            .structs_by_name
            .get(strukt)
            .ok_or_else(|| BtfError::StructNotFound(strukt.to_string()))?;
        self.find_member(id, member, 0)
            .map(|bits| bits / 8)
            .ok_or_else(|| BtfError::MemberNotFound { strukt: strukt.to_string(), member: member.to_string() })
    }

    fn find_member(&self, id: u32, member: &str, depth: u32) -> Option<u32> {
        if depth > 8 {
            return None;
        }
        let entry = self.types.get(id as usize)?;
        for m in &entry.members {
            if m.name == member {
                return Some(m.bit_offset);
            }
        }
        for m in entry.members.iter().filter(|m| m.name.is_empty()) {
            let inner = self.resolve(m.type_id);
            if let Some(off) = self.find_member(inner, member, depth + 1) {
                return Some(m.bit_offset + off);
            }
        }
        None
    }

    /// Follows typedef/const/volatile/restrict/type-tag to the underlying type.
    fn resolve(&self, mut id: u32) -> u32 {
        for _ in 0..16 {
            match self.types.get(id as usize) {
                Some(t) if matches!(t.kind, 8 | 9 | 10 | 11 | 18) => id = t.type_ref,
                _ => break,
            }
        }
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a tiny BTF blob: struct outer { int a; union { int b; int c; }; }.
    fn sample() -> Vec<u8> {
        let strings = b"\0int\0outer\0a\0b\0c\0".to_vec();
        let name = |s: &str| -> u32 {
            let pos = strings.windows(s.len() + 1).position(|w| &w[..s.len()] == s.as_bytes() && w[s.len()] == 0);
            pos.map(|p| p as u32).unwrap_or(0)
        };
        let mut types = Vec::new();
        let push = |v: &mut Vec<u8>, x: u32| v.extend_from_slice(&x.to_le_bytes());
        // id 1: INT "int" size 4
        push(&mut types, name("int"));
        push(&mut types, 1 << 24);
        push(&mut types, 4);
        push(&mut types, 32);
        // id 2: anonymous UNION { b: int @0, c: int @0 }
        push(&mut types, 0);
        push(&mut types, (5 << 24) | 2);
        push(&mut types, 4);
        for m in ["b", "c"] {
            push(&mut types, name(m));
            push(&mut types, 1);
            push(&mut types, 0);
        }
        // id 3: STRUCT outer { a: int @0, <anon>: union @32 }
        push(&mut types, name("outer"));
        push(&mut types, (4 << 24) | 2);
        push(&mut types, 8);
        push(&mut types, name("a"));
        push(&mut types, 1);
        push(&mut types, 0);
        push(&mut types, 0);
        push(&mut types, 2);
        push(&mut types, 32);
        let mut blob = Vec::new();
        blob.extend_from_slice(&0xeb9fu16.to_le_bytes());
        blob.push(1);
        blob.push(0);
        for x in [24u32, 0, types.len() as u32, types.len() as u32, strings.len() as u32] {
            blob.extend_from_slice(&x.to_le_bytes());
        }
        blob.extend_from_slice(&types);
        blob.extend_from_slice(&strings);
        blob
    }

    #[test]
    fn finds_direct_and_anonymous_members() {
        let btf = Btf::parse(&sample()).expect("parse");
        assert_eq!(btf.member_offset("outer", "a"), Ok(0));
        assert_eq!(btf.member_offset("outer", "c"), Ok(4));
        assert!(matches!(btf.member_offset("outer", "zz"), Err(BtfError::MemberNotFound { .. })));
        assert!(matches!(btf.member_offset("nope", "a"), Err(BtfError::StructNotFound(_))));
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(Btf::parse(&[0u8; 4]).err(), Some(BtfError::TooShort(4)));
        let mut blob = sample();
        blob[0] = 0;
        assert!(matches!(Btf::parse(&blob), Err(BtfError::BadMagic(_))));
        let mut blob = sample();
        blob[12] = 0xff; // type_len beyond the blob
        assert!(matches!(Btf::parse(&blob), Err(BtfError::OutOfBounds(_))));
    }

    #[test]
    fn running_kernel_has_task_struct_offsets() {
        let Ok(btf) = Btf::from_sys_fs() else {
            eprintln!("SKIP: /sys/kernel/btf/vmlinux not readable");
            return;
        };
        let tgid = btf.member_offset("task_struct", "tgid").expect("task_struct.tgid");
        let parent = btf.member_offset("task_struct", "real_parent").expect("real_parent");
        assert_ne!(tgid, parent);
        assert!(btf.member_offset("cred", "euid").expect("cred.euid") > 0);
    }
}
