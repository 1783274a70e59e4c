//! The frame: the one unit on every keyfort connection, client and peer alike (docs/format.md
//! §5). A fixed 32-byte header — magic, version, flags, opcode, request id, payload length, a
//! crc32c of the header and one of the payload — then the payload. The header is checked before
//! its length is trusted, so a corrupt or hostile length is refused at once instead of making the
//! reader wait for (or allocate) bytes that will never come.

use thiserror::Error;

/// "KFRM": first bytes of every frame.
pub const FRAME_MAGIC: [u8; 4] = *b"KFRM";
/// Version of the frame layout.
pub const FRAME_VERSION: u8 = 1;
/// Bytes of the fixed header.
pub const FRAME_HEADER_BYTES: usize = 32;
/// Largest payload of one frame: a snapshot chunk (1 MiB) or a batch of raft messages fits
/// with room; anything larger is split by its sender. Enforced on encode and decode.
pub const MAX_FRAME_PAYLOAD_BYTES: usize = 8 << 20;

/// Flag bits (byte 5). Bits not named here must be zero.
pub mod flags {
    /// The frame answers the request with the same request id.
    pub const RESPONSE: u8 = 1 << 0;
    /// The payload is a typed error, not the operation's result.
    pub const ERROR: u8 = 1 << 1;
    /// More frames with the same request id follow (streams: snapshot chunks).
    pub const MORE: u8 = 1 << 2;
    /// Every bit this version defines.
    pub const KNOWN: u8 = RESPONSE | ERROR | MORE;
}

/// A frame's header fields besides the checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub flags: u8,
    /// What the frame asks or answers; the protocols define the values.
    pub opcode: u16,
    /// Chosen by the requester, echoed by the answer; pipelined requests are matched by it.
    pub request_id: u64,
}

/// A decoded frame borrowing its payload from the read buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    pub header: FrameHeader,
    pub payload: &'a [u8],
}

/// Why bytes are not a frame. Each is final for the connection: the reader cannot find the next
/// frame boundary after any of them, so the connection is closed.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum FrameError {
    #[error("bad frame magic {0:02x?} (not a keyfort connection, or out of step)")]
    BadMagic([u8; 4]),
    #[error("frame header crc32c mismatch")]
    BadHeaderCrc,
    #[error("unsupported frame version {0} (this build speaks {FRAME_VERSION})")]
    BadVersion(u8),
    #[error("unknown frame flags {0:#04x}")]
    BadFlags(u8),
    #[error("reserved frame header bytes are not zero")]
    BadReserved,
    #[error("frame payload of {len} bytes exceeds the maximum of {max}")]
    TooLong { len: usize, max: usize },
    #[error("frame payload crc32c mismatch")]
    BadPayloadCrc,
}

/// Appends the frame of `header` and `payload` to `out`.
pub fn encode(header: FrameHeader, payload: &[u8], out: &mut Vec<u8>) -> Result<(), FrameError> {
    if payload.len() > MAX_FRAME_PAYLOAD_BYTES {
        return Err(FrameError::TooLong {
            len: payload.len(),
            max: MAX_FRAME_PAYLOAD_BYTES,
        });
    }
    if header.flags & !flags::KNOWN != 0 {
        return Err(FrameError::BadFlags(header.flags));
    }
    let mut h = [0u8; FRAME_HEADER_BYTES];
    h[0..4].copy_from_slice(&FRAME_MAGIC);
    h[4] = FRAME_VERSION;
    h[5] = header.flags;
    h[6..8].copy_from_slice(&header.opcode.to_le_bytes());
    h[8..16].copy_from_slice(&header.request_id.to_le_bytes());
    h[16..20].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    let header_crc = crc32c::crc32c(&h[0..20]);
    h[20..24].copy_from_slice(&header_crc.to_le_bytes());
    h[24..28].copy_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    // 28..32 reserved, zero.
    out.reserve(FRAME_HEADER_BYTES + payload.len());
    out.extend_from_slice(&h);
    out.extend_from_slice(payload);
    Ok(())
}

/// Decodes the frame at the start of `buf`. `Ok(None)`: not all of it has arrived yet (read
/// more and call again); `Ok(Some((frame, n)))`: a whole frame of `n` bytes. Never reads past a
/// frame and never panics.
pub fn decode(buf: &[u8]) -> Result<Option<(Frame<'_>, usize)>, FrameError> {
    // The magic is checked as soon as it has arrived, so a stranger is refused early.
    let have = buf.len().min(4);
    if buf[..have] != FRAME_MAGIC[..have] {
        let mut m = [0u8; 4];
        m[..have].copy_from_slice(&buf[..have]);
        return Err(FrameError::BadMagic(m));
    }
    if buf.len() < FRAME_HEADER_BYTES {
        return Ok(None);
    }
    let h = &buf[..FRAME_HEADER_BYTES];
    let u32_at = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().expect("4 bytes"));
    if crc32c::crc32c(&h[0..20]) != u32_at(20) {
        return Err(FrameError::BadHeaderCrc);
    }
    if h[4] != FRAME_VERSION {
        return Err(FrameError::BadVersion(h[4]));
    }
    if h[5] & !flags::KNOWN != 0 {
        return Err(FrameError::BadFlags(h[5]));
    }
    if u32_at(28) != 0 {
        return Err(FrameError::BadReserved);
    }
    let len = u32_at(16) as usize;
    if len > MAX_FRAME_PAYLOAD_BYTES {
        return Err(FrameError::TooLong {
            len,
            max: MAX_FRAME_PAYLOAD_BYTES,
        });
    }
    let Some(payload) = buf.get(FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + len) else {
        return Ok(None);
    };
    if crc32c::crc32c(payload) != u32_at(24) {
        return Err(FrameError::BadPayloadCrc);
    }
    let header = FrameHeader {
        flags: h[5],
        opcode: u16::from_le_bytes([h[6], h[7]]),
        request_id: u64::from_le_bytes(h[8..16].try_into().expect("8 bytes")),
    };
    Ok(Some((Frame { header, payload }, FRAME_HEADER_BYTES + len)))
}
