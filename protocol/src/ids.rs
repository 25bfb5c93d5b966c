//! Identifier rules shared by server and client.
//!
//! User and device ids are short ASCII tokens, so they can be embedded in storage keys and
//! conversation ids with `:` and `/` as unambiguous separators.

/// Longest accepted user, device or conversation-name id, in bytes.
pub const MAX_ID_BYTES: usize = 64;

/// Why an id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    #[error("id is empty")]
    Empty,
    #[error("id is longer than {MAX_ID_BYTES} bytes")]
    TooLong,
    #[error("id contains {0:?}; allowed are ASCII letters, digits and . _ - @ +")]
    BadChar(char),
}

/// Checks a user or device id: 1 to 64 of `A-Z a-z 0-9 . _ - @ +`.
pub fn validate_id(id: &str) -> Result<(), IdError> {
    if id.is_empty() {
        return Err(IdError::Empty);
    }
    if id.len() > MAX_ID_BYTES {
        return Err(IdError::TooLong);
    }
    match id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@' | '+')))
    {
        Some(c) => Err(IdError::BadChar(c)),
        None => Ok(()),
    }
}

/// The id of the direct conversation between two users: the same whichever of them asks.
pub fn direct_conversation_id(a: &str, b: &str) -> String {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    // Built on every direct send: one exact allocation, no formatting machinery.
    let mut id = String::with_capacity(lo.len() + hi.len() + 3);
    id.push_str("d:");
    id.push_str(lo);
    id.push(':');
    id.push_str(hi);
    id
}

/// The two members of a direct conversation id, if it is one.
pub fn direct_members(conversation_id: &str) -> Option<(&str, &str)> {
    let rest = conversation_id.strip_prefix("d:")?;
    let (a, b) = rest.split_once(':')?;
    (validate_id(a).is_ok() && validate_id(b).is_ok()).then_some((a, b))
}

/// The message id of a stored message: unique because `seq` is unique in its conversation.
pub fn message_id(conversation_id: &str, seq: u64) -> String {
    // Built for every stored message: one exact allocation, no formatting machinery.
    let mut digits = itoa::Buffer::new();
    let seq = digits.format(seq);
    let mut id = String::with_capacity(conversation_id.len() + 1 + seq.len());
    id.push_str(conversation_id);
    id.push('/');
    id.push_str(seq);
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked() {
        assert!(validate_id("alice").is_ok());
        assert!(validate_id("a.b_c-d@e+f9").is_ok());
        assert_eq!(validate_id(""), Err(IdError::Empty));
        assert_eq!(validate_id("a:b"), Err(IdError::BadChar(':')));
        assert_eq!(validate_id(&"x".repeat(65)), Err(IdError::TooLong));
    }

    #[test]
    fn direct_ids_are_symmetric() {
        assert_eq!(
            direct_conversation_id("bob", "alice"),
            direct_conversation_id("alice", "bob")
        );
        assert_eq!(direct_members("d:alice:bob"), Some(("alice", "bob")));
        assert_eq!(direct_members("g:123"), None);
        assert_eq!(direct_conversation_id("bob", "alice"), "d:alice:bob");
    }

    #[test]
    fn message_ids_name_conversation_and_seq() {
        assert_eq!(message_id("d:alice:bob", 0), "d:alice:bob/0");
        assert_eq!(message_id("g:7", 1234), "g:7/1234");
        assert_eq!(message_id("g:7", u64::MAX), format!("g:7/{}", u64::MAX));
    }
}
