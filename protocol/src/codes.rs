//! Application error codes, shared by `Error` frames, QUIC connection close and stream resets.

pub use crate::pb::ErrorCode;

impl ErrorCode {
    /// The code as sent in QUIC CONNECTION_CLOSE and RESET_STREAM frames.
    pub fn as_u32(self) -> u32 {
        // Protobuf enums are i32 on the wire, but every tern code is non-negative.
        u32::try_from(self as i32).unwrap_or(ErrorCode::Internal as u32)
    }

    /// The code for a number received from the wire; unknown numbers are `None`.
    pub fn from_u32(code: u32) -> Option<Self> {
        i32::try_from(code)
            .ok()
            .and_then(|c| Self::try_from(c).ok())
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str_name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_through_u32() {
        for raw in 0..=40u32 {
            if let Some(code) = ErrorCode::from_u32(raw) {
                assert_eq!(code.as_u32(), raw);
            }
        }
        assert_eq!(ErrorCode::from_u32(6), Some(ErrorCode::TokenInvalid));
        assert_eq!(ErrorCode::from_u32(u32::MAX), None);
    }
}
