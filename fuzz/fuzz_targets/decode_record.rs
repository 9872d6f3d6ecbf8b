//! The ring-buffer record decoder on any bytes, every event kind: the first byte picks the kind
//! written into the header, the second whether the record keeps its length (truncated or
//! oversized) or is cut to the kind's exact wire size, so both the length checks and every
//! kind's field decoding are reached. An error or an event, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use palisade::events::decode::{DecodeError, decode};

const KIND_OFFSET: usize = std::mem::offset_of!(palisade_common::EventHeader, kind);

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        let _ = decode(data);
        return;
    }
    let (kind, exact, rest) = (data[0], data[1] & 1 == 1, &data[2..]);
    let mut record = rest.to_vec();
    if record.len() >= KIND_OFFSET + 4 {
        record[KIND_OFFSET..KIND_OFFSET + 4].copy_from_slice(&u32::from(kind).to_ne_bytes());
    }
    match decode(&record) {
        Err(DecodeError::WrongLength { expected, len, .. }) => {
            assert_ne!(expected, len);
            if exact {
                record.resize(expected, 0);
                let event = decode(&record).expect("a record of the kind's exact size decodes");
                serde_json::to_string(&event).expect("an event serialises");
            }
        }
        Ok(event) => {
            serde_json::to_string(&event).expect("an event serialises");
        }
        Err(_) => {}
    }
});
