//! Arbitrary bytes as a client payload (docs/format.md §8): the first two bytes pick an opcode
//! (a client opcode from `op::ALL`, or any value), the rest is the payload. `Request::decode`,
//! `Response::decode` and `ErrorReply::decode` answer a message or a typed error, never a panic;
//! whatever decodes re-encodes to the same bytes (one encoding per message) and decodes again to
//! the same message; an opcode that is not a client opcode is `UnknownOpcode`.
#![no_main]

use keyfort_net::client_proto::*;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let raw = u16::from_le_bytes([data[0], data[1]]);
    let payload = &data[2..];
    // Top bit clear: one of the client opcodes; set: any value in 0..=0x7FFF (unknown client
    // opcodes, the peer range, 0).
    let opcode = if raw & 0x8000 == 0 {
        op::ALL[raw as usize % op::ALL.len()]
    } else {
        raw & 0x7FFF
    };
    let known = op::ALL.contains(&opcode);

    match Request::decode(opcode, payload) {
        Ok(q) => {
            assert!(known);
            assert_eq!(q.opcode(), opcode);
            let bytes = q.encode();
            assert_eq!(bytes, payload, "a decoded request re-encodes to its bytes");
            assert_eq!(Request::decode(opcode, &bytes).as_ref(), Ok(&q));
        }
        Err(e) => assert_eq!(known, e != ProtoError::UnknownOpcode(opcode)),
    }

    match Response::decode(opcode, payload) {
        Ok(r) => {
            assert!(known);
            let bytes = r.encode();
            assert_eq!(bytes, payload, "a decoded response re-encodes to its bytes");
            assert_eq!(Response::decode(opcode, &bytes).as_ref(), Ok(&r));
        }
        Err(e) => assert_eq!(known, e != ProtoError::UnknownOpcode(opcode)),
    }

    if let Ok(e) = ErrorReply::decode(payload) {
        assert!(e.message.len() <= MAX_ERROR_MESSAGE_BYTES);
        assert_eq!(ErrorCode::from_u16(e.code as u16), Some(e.code));
        let bytes = e.encode();
        assert_eq!(
            bytes, payload,
            "a decoded error reply re-encodes to its bytes"
        );
        assert_eq!(ErrorReply::decode(&bytes).as_ref(), Ok(&e));
    }
});
