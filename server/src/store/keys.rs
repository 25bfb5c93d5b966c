//! Storage key layout. Ids never contain 0x00 (they are validated ASCII), so `id 0x00 ...`
//! keys sort by id first and a prefix scan of `id 0x00` finds exactly one id's entries.
//! Sequences are big-endian so that byte order is numeric order.

pub const SEP: u8 = 0;

/// `a 0x00`: the prefix of every key under `a`.
pub fn prefix(a: &str) -> Vec<u8> {
    prefix_with_room(a, 0)
}

/// `a 0x00`, with room for `more` bytes after it (keys are built on every write; growing
/// them afterwards showed up as reallocations in the writer's profile).
fn prefix_with_room(a: &str, more: usize) -> Vec<u8> {
    let mut key = Vec::with_capacity(a.len() + 1 + more);
    key.extend_from_slice(a.as_bytes());
    key.push(SEP);
    key
}

/// `a 0x00 seq`: inbox (`user`) and conversation log (`conversation`) keys.
pub fn seq_key(a: &str, seq: u64) -> Vec<u8> {
    let mut key = prefix_with_room(a, 8);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// `a 0x00 b`: membership, per-user conversation index, idempotency, cursors.
pub fn pair_key(a: &str, b: &str) -> Vec<u8> {
    let mut key = prefix_with_room(a, b.len());
    key.extend_from_slice(b.as_bytes());
    key
}

/// `conversation 0x00 user 0x00 kind`: receipt high-water marks.
pub fn mark_key(conversation: &str, user: &str, kind: u8) -> Vec<u8> {
    let mut key = prefix_with_room(conversation, user.len() + 2);
    key.extend_from_slice(user.as_bytes());
    key.push(SEP);
    key.push(kind);
    key
}

/// The sequence at the end of a `seq_key`.
pub fn seq_of(key: &[u8]) -> Option<u64> {
    let tail: [u8; 8] = key.get(key.len().checked_sub(8)?..)?.try_into().ok()?;
    Some(u64::from_be_bytes(tail))
}

/// The part after `prefix` in a `pair_key`.
pub fn second_of<'a>(key: &'a [u8], first: &str) -> Option<&'a str> {
    let rest = key.strip_prefix(first.as_bytes())?.strip_prefix(&[SEP])?;
    std::str::from_utf8(rest).ok()
}

pub fn u64_value(value: &[u8]) -> u64 {
    value.try_into().map(u64::from_be_bytes).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_keys_sort_numerically_within_an_id() {
        assert!(seq_key("alice", 2) < seq_key("alice", 256));
        assert!(seq_key("alice", u64::MAX) < prefix("alice0"));
        assert_eq!(seq_of(&seq_key("bob", 77)), Some(77));
        assert_eq!(second_of(&pair_key("g:1", "carol"), "g:1"), Some("carol"));
    }
}
